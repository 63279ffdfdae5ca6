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
from jaxalign.metrics import setup_logging
from jaxalign.models import load_pretrained
from jaxalign.rewards import keyword_reward
from jaxalign.trainers.rl_loop import evaluate_policy

from experiments._common import RunDir, draw_at, log_once
from experiments._grpo import GRPOConfig, train_grpo, training_figures, write_outputs

log = logging.getLogger("grpo_stories")

_STORIES = Path(__file__).resolve().parents[1].parent / "shared/data/models/stories260K"

# Story openings in the style of TinyStories, written for this experiment.
TRAIN_OPENINGS = (
    "Once upon a time",
    "Once upon a time, there was a little girl named Lily.",
    "One day, a boy named Tom",
    "Tom went to the park.",
    "There was a big red ball.",
    "Sue and her mom went to the store.",
    "Once upon a time, there was a little boy.",
    "One sunny day,",
    "Ben liked to play outside.",
    "Anna had a new toy.",
    "The sun was warm and bright.",
    "Once upon a time, in a small house,",
    "Max was very happy.",
    "One day, Lily found a box.",
    "There was a little bird in a tree.",
    "Mia and Sam were friends.",
)
HELD_OUT_OPENINGS = (
    "Once upon a time, there was a girl named Sara.",
    "One day, Tim went outside.",
    "Jack had a big blue car.",
    "It was a cold morning.",
    "Lucy wanted to go to the beach.",
    "Once upon a time, a little boy lived in a town.",
    "The children played in the garden.",
    "Kate saw a shiny rock.",
)


@dataclasses.dataclass
class Config(GRPOConfig):
    """GRPO of stories260K toward mentioning a target word, with a KL term to the start model."""

    output_dir: Path = Path("runs/grpo_stories")
    model: str = str(_STORIES / "stories260K.bin")
    """llama2.c .bin file or Hugging Face checkpoint directory (`load_pretrained`)."""
    tokenizer: str = str(_STORIES / "tok512.model")
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


def run(cfg: Config) -> dict:
    """GRPO from the pretrained model; returns (and writes) the before/after summary."""
    run_dir = RunDir.open(cfg)
    if (done := run_dir.finished_summary()) is not None:
        return done
    config, params = load_pretrained(cfg.model)
    tokenizer = jd.load_tokenizer(cfg.tokenizer)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"--tokenizer has {tokenizer.vocab_size} ids, --model only {config.vocab_size}")

    def reward_fn(completions, **_):
        return keyword_reward(completions, keywords=cfg.keywords, cap=cfg.cap)

    # one prompt width for rollouts and evaluation: generation and log-probs compile once
    width = jd.collate_prompts(TRAIN_OPENINGS + HELD_OUT_OPENINGS, tokenizer)[0].shape[1]
    held_tokens, held_mask = jd.collate_prompts(HELD_OUT_OPENINGS, tokenizer, length=width)
    ref_params = jax.tree.map(jnp.copy, params)  # the start model, for the reported KL

    def evaluate(p) -> tuple[dict[str, float], list[str]]:
        scored = evaluate_policy(
            p, config, held_tokens, held_mask, reward_fn=reward_fn, decode=tokenizer.decode,
            rng=jax.random.key(cfg.seed + 4), max_new_tokens=cfg.max_new_tokens,
            eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, temperature=cfg.temperature,
            top_p=cfg.top_p, samples=cfg.eval_samples, ref_params=ref_params,
        )
        texts = []
        for i in range(min(cfg.num_sample_texts, len(HELD_OUT_OPENINGS))):
            row, n = i * cfg.eval_samples, int(scored.lengths[i * cfg.eval_samples])
            prompt_ids = held_tokens[i][held_mask[i] > 0].tolist()
            completion = [t for t in scored.tokens[row, :n].tolist() if t != tokenizer.eos_id]
            # decode prompt and completion together: SentencePiece drops a leading space otherwise
            texts.append(tokenizer.decode(prompt_ids + completion))
        figures = {
            "reward": float(scored.rewards.mean()),
            "kl": float(scored.kl.mean()),
            "completion_length": float(scored.lengths.mean()),
        }
        return figures, texts

    writer = run_dir.begin()
    before, texts_before = evaluate(params)
    log.info("before GRPO: %s", before)
    log_once(writer, 0, before, stage="grpo_eval")

    def prompts_at(it):  # a pure function of (seed, iteration): a resumed run draws the same
        chosen = draw_at(cfg.seed + 3, it, len(TRAIN_OPENINGS), cfg.prompts_per_iteration)
        tokens, mask = jd.collate_prompts([TRAIN_OPENINGS[i] for i in chosen], tokenizer, length=width)
        return tokens, mask, {}

    state, result = train_grpo(
        cfg, config, params, prompts_at, reward_fn=reward_fn, tokenizer=tokenizer,
        max_new_tokens=cfg.max_new_tokens, writer=writer,
        eval_fn=(lambda p: evaluate(p)[0]) if cfg.eval_every else None,
    )
    after, texts_after = evaluate(state.params)
    log.info("after GRPO: %s", after)
    log_once(writer, cfg.grpo_iterations, after, stage="grpo_eval")
    writer.close()
    summary = {
        **{f"{name}_before": v for name, v in before.items()},
        **{f"{name}_after": v for name, v in after.items()},
        **training_figures(result),
        "samples_before": texts_before,
        "samples_after": texts_after,
    }
    return write_outputs(
        run_dir, writer.path, summary,
        [("grpo", "reward_mean"), ("grpo", "kl"), ("grpo", "completion_length")],
        title=f"GRPO of stories260K toward {'/'.join(cfg.keywords)!r}",
    )


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point: runs, prints the before/after table and sample texts."""
    setup_logging()
    summary = run(tyro.cli(Config, args=argv))
    print(f"{'held-out openings':<40}{'before':>10}{'after':>10}")
    print(f"{'  reward (mentions target word)':<40}{summary['reward_before']:>10.3f}{summary['reward_after']:>10.3f}")
    print(f"{'  KL(policy || start model), nats':<40}{summary['kl_before']:>10.3f}{summary['kl_after']:>10.3f}")
    print(f"{'  completion length, tokens':<40}{summary['completion_length_before']:>10.1f}{summary['completion_length_after']:>10.1f}")
    print(f"{'train reward, first/last 20% iters':<40}{summary['train_reward_first']:>10.3f}{summary['train_reward_last']:>10.3f}")
    for name in ("before", "after"):
        print(f"\n--- samples {name}")
        for text in summary[f"samples_{name}"]:
            print(" ", text.replace("\n", " "))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
