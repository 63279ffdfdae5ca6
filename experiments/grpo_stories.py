"""GRPO from a real pretrained model toward a rule reward: stories260K learns to bring in a dog.

The policy starts as the llama2.c TinyStories model stories260K (../shared/data/models/
stories260K/, SentencePiece tok512). Prompts are story openings ("Once upon a time", "Tom
went to the park."); the reward is `keyword_reward`: 1.0 when the sampled continuation mentions
a target word ("dog" / "dogs" as whole words, any case), else 0. A k3 KL term (β) to the
pretrained model keeps the text a TinyStories story rather than a string of dogs.

On openings held out from training it reports, before and after GRPO: the expected reward
(fraction of sampled continuations that mention the word, `--eval-samples` draws per opening at
the rollout temperature) and the KL(π‖π_ref) per continuation (nats, the k1 estimate on those
samples: exactly 0 before training), plus sample texts.

  python -m experiments.grpo_stories               # defaults: about 70 s on 2 CPU cores
  python -m experiments.grpo_stories --grpo-iterations 40 --prompts-per-iteration 16 \
      --eval-samples 16 --max-new-tokens 48            # about 4 minutes
  python -m experiments.grpo_stories --keywords cat cats --beta 0.1

Measured here (8 held-out openings; reward = fraction of sampled continuations that mention
"dog"/"dogs"; KL in nats per continuation):
  defaults (15 iterations × 8 prompts × G 8, 32 new tokens, 64 eval draws):
    reward 0.031 -> 0.859, KL 0.000 -> 7.8
  the 4-minute run above (40 × 16 × 8, 48 new tokens, 128 eval draws):
    reward 0.047 -> 0.891, KL 0.000 -> 9.4
  with β = 0.04 (GRPO's default) at the defaults: reward -> 0.953 but KL -> 20.1, and the
  text degrades faster ("Sara and her dog played ... with dog, which she had a do").

Writes into --output-dir: metrics.jsonl, summary.json (figures and samples), grpo.png.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tyro

import jaxalign.data as jd
from experiments._common import (
    HELD_OUT_STORY_OPENINGS,
    STORIES260K_MODEL,
    STORIES260K_TOKENIZER,
    STORY_OPENINGS,
    RunDir,
    before_after,
    decode_with_prompt,
    draw_at,
    format_table,
    load_model_and_tokenizer,
)
from experiments._grpo import GRPOConfig, grpo_before_after, write_outputs
from jaxalign import SamplingConfig, evaluate_policy, keyword_reward
from jaxalign.metrics import setup_logging

log = logging.getLogger("grpo_stories")

TRAIN_OPENINGS, HELD_OUT_OPENINGS = STORY_OPENINGS, HELD_OUT_STORY_OPENINGS


@dataclasses.dataclass
class Config(GRPOConfig):
    """GRPO of stories260K toward mentioning a target word, with a KL term to the start model."""

    output_dir: Path = Path("runs/grpo_stories")
    model: str = STORIES260K_MODEL
    """llama2.c .bin file or Hugging Face checkpoint directory (`load_pretrained`)."""
    tokenizer: str = STORIES260K_TOKENIZER
    """SentencePiece .model, .tiktoken ranks file, 'gpt2' (online) or 'bytes'."""
    keywords: tuple[str, ...] = ("dog", "dogs")
    """The reward's target words (whole words, any case)."""
    cap: int = 1
    """Mentions that earn the full reward (1: any mention)."""
    max_new_tokens: int = 32
    grpo_iterations: int = 15
    prompts_per_iteration: int = 8
    group_size: int = 8
    grpo_lr: float = 3e-4
    beta: float = 0.2
    """Larger than GRPO's 0.04: against group-normalised advantages of order 1, β = 0.04 barely
    restrains this 260K-parameter model (measured: KL 20 nats vs 7.8 at 0.2, same reward rise)."""
    eval_samples: int = 8
    """Sampled continuations per held-out opening for the before/after figures."""
    num_sample_texts: int = 4
    """Sample texts (first draw of the first held-out openings) kept in summary.json."""
    eval_every: int = 0


def make_evaluate(cfg: Config, config, tokenizer: jd.Tokenizer, reward_fn, *, width: int, ref_params):
    """`evaluate(params) -> (figures, texts)` on the held-out openings: the mean reward, KL to
    `ref_params` and completion length of --eval-samples draws per opening at the rollout
    temperature, and the first draw's text of the first --num-sample-texts openings."""
    held_tokens, held_mask = jd.collate_prompts(HELD_OUT_OPENINGS, tokenizer, length=width)

    def evaluate(p) -> tuple[dict[str, float], list[str]]:
        scored = evaluate_policy(
            p, config, held_tokens, held_mask, reward_fn=reward_fn, decode=tokenizer.decode,
            rng=jax.random.key(cfg.seed + 4), samples=cfg.eval_samples, ref_params=ref_params, sampling=SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id),)
        tokens, lengths = np.asarray(scored.batch.completion_tokens), np.asarray(scored.batch.lengths)
        rows = [i * cfg.eval_samples for i in range(min(cfg.num_sample_texts, len(HELD_OUT_OPENINGS)))]
        texts = [
            decode_with_prompt(tokenizer, held_tokens[i], held_mask[i], tokens[row], int(lengths[row]))
            for i, row in enumerate(rows)
        ]
        figures = {
            "reward": float(scored.rewards.mean()),
            "kl": float(scored.batch.kl().mean()),
            "completion_length": float(lengths.mean()),
        }
        return figures, texts

    return evaluate


def make_reward(cfg: Config):
    """`reward(completions) = keyword_reward(completions, keywords=--keywords, cap=--cap)`."""

    def reward_fn(completions, **_):
        return keyword_reward(completions, keywords=cfg.keywords, cap=cfg.cap)

    return reward_fn


def run(cfg: Config) -> dict:
    """GRPO from the pretrained model; returns (and writes) the before/after summary."""
    run_dir = RunDir.open(cfg)
    if (done := run_dir.finished_summary()) is not None:
        return done
    config, params, tokenizer = load_model_and_tokenizer(cfg.model, cfg.tokenizer)
    # one prompt width for rollouts and evaluation: generation and log-probs compile once
    width = jd.collate_prompts(TRAIN_OPENINGS + HELD_OUT_OPENINGS, tokenizer)[0].shape[1]
    reward_fn = make_reward(cfg)
    ref_params = jax.tree.map(jnp.copy, params)  # the start model, for the reported KL
    evaluate = make_evaluate(cfg, config, tokenizer, reward_fn, width=width, ref_params=ref_params)
    writer = run_dir.begin()

    def prompts_at(it):  # a pure function of (seed, iteration): a resumed run draws the same
        chosen = draw_at(cfg.seed + 3, it, len(TRAIN_OPENINGS), cfg.prompts_per_iteration)
        tokens, mask = jd.collate_prompts([TRAIN_OPENINGS[i] for i in chosen], tokenizer, length=width)
        return tokens, mask, {}

    grpo = grpo_before_after(
        cfg, config, params, prompts_at, evaluate=evaluate, reward_fn=reward_fn, tokenizer=tokenizer,
        max_new_tokens=cfg.max_new_tokens, writer=writer, eval_during=bool(cfg.eval_every),
    )
    summary = {
        **before_after(grpo.before, grpo.after),
        **grpo.training,
        "samples_before": grpo.before_extra,
        "samples_after": grpo.after_extra,
    }
    return write_outputs(
        run_dir, writer, summary,
        [("grpo", "reward_mean"), ("grpo", "kl"), ("grpo", "completion_length")],
        title=f"GRPO of stories260K toward {'/'.join(cfg.keywords)!r}",
    )


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point: runs, prints the before/after table and sample texts."""
    setup_logging()
    summary = run(tyro.cli(Config, args=argv))
    print(format_table("held-out openings", ("before", "after"), [
        ("  reward (mentions target word)", summary["reward_before"], summary["reward_after"]),
        ("  KL(policy || start model), nats", summary["kl_before"], summary["kl_after"]),
        ("  completion length, tokens",
         format(summary["completion_length_before"], ".1f"), format(summary["completion_length_after"], ".1f")),
        ("train reward, first/last 20% iters", summary["train_reward_first"], summary["train_reward_last"]),
    ], widths=(40, 10, 10)))
    for name in ("before", "after"):
        print(f"\n--- samples {name}")
        for text in summary[f"samples_{name}"]:
            print(" ", text.replace("\n", " "))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
