"""GRPO on GSM8K grade-school math with a verifiable reward: the recipe for a real checkpoint.

Data: ../shared/data/gsm8k/{train,test}.jsonl (openai/grade-school-math; `load_gsm8k` validates
every row). Each question goes into DeepSeek-R1-Zero's prompt template (`jaxalign.data.r1_prompt`;
why that template rather than GSM8K's `#### N`: see `jaxalign/data/gsm8k.py`). Reward per
completion = accuracy_weight · [final number in `<answer>…</answer>` equals the gold `#### N`]
+ format_weight · [completion is exactly `<think>…</think> <answer>…</answer>`]
(`exact_match_reward`, `format_reward`). GRPO (G samples per prompt, group-relative advantages,
clipped ratio, k3 KL to the start model) then maximises it. Reported before and after: greedy
accuracy and format rate on the first --eval-problems test problems.

With a tokenizer that has a chat template (a Hugging Face checkpoint directory with
`tokenizer.json`; `--chat` defaults to using it), the prompt is that template's rendering of
`r1_messages(question)`: the R1 instructions as the system turn, the question as the user turn,
then the assistant header (`add_generation_prompt`), as TRL's and Open-R1's GRPO recipes prompt
instruct checkpoints. Without one, the plain R1-Zero string.

The defaults are a pipeline check that runs in about a minute on CPU, with the pretrained
stories260K (TinyStories, 260K parameters) as policy: it cannot solve GSM8K (accuracy 0), but
every stage runs as it would with a real model. A real run, on one GPU, from a Hugging Face
checkpoint directory (here Qwen2.5-0.5B-Instruct, tokenizer and chat template read from the same
directory; a SentencePiece `tokenizer.model` or GPT-2 `.tiktoken` file works too):

  python -m experiments.grpo_gsm8k --output-dir runs/gsm8k_qwen \\
      --model /ckpt/Qwen2.5-0.5B-Instruct --tokenizer /ckpt/Qwen2.5-0.5B-Instruct \\
      --dtype bfloat16 --max-prompt-length 384 --max-new-tokens 320 \\
      --group-size 8 --prompts-per-iteration 16 --grpo-iterations 500 --grpo-lr 1e-6 \\
      --beta 0.04 --temperature 1.0 --eval-problems 1319 --eval-every 50 --checkpoint-every 100

Writes into --output-dir: config.json, metrics.jsonl, summary.json, samples.jsonl (the final
evaluation's completions), grpo.png, checkpoints/grpo/ (orbax TrainState every --checkpoint-every
iterations and at the end; `--resume` continues from the latest with the same prompts and keys).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import tyro

import jaxalign.data as jd
from experiments._common import (
    SHARED_DATA,
    STORIES260K_MODEL,
    STORIES260K_TOKENIZER,
    RunDir,
    before_after,
    check_context,
    draw_at,
    format_table,
    load_model,
    use_chat,
)
from experiments._grpo import GRPOConfig, grpo_before_after, write_outputs
from experiments._scaling import plot_scaling, scaling_figures, scaling_table
from jaxalign import (
    SamplingConfig,
    evaluate_policy,
    exact_match_reward,
    format_reward,
    get_config,
    init_params,
    weighted_sum,
)
from jaxalign.metrics import dumps, setup_logging
from jaxalign.models import PRESETS

log = logging.getLogger("grpo_gsm8k")


@dataclasses.dataclass
class Config(GRPOConfig):
    """GRPO on GSM8K: R1-Zero prompt template, accuracy + format reward."""

    output_dir: Path = Path("runs/grpo_gsm8k")
    train_data: str = str(SHARED_DATA / "gsm8k/train.jsonl")
    test_data: str = str(SHARED_DATA / "gsm8k/test.jsonl")
    model: str = STORIES260K_MODEL
    """A model preset (random init, e.g. gpt2-tiny), a llama2.c .bin, a Hugging Face checkpoint
    directory or (online) hub id."""
    tokenizer: str = STORIES260K_TOKENIZER
    """SentencePiece .model, .tiktoken ranks file, a Hugging Face directory with tokenizer.json,
    'gpt2' (online) or 'bytes'."""
    chat: bool | None = None
    """Render prompts with the tokenizer's chat template (None: when it has one)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype (parameters stay float32)."""
    max_prompt_length: int = 448
    """Prompts longer than this many tokens are left out (their count is logged)."""
    max_new_tokens: int = 32
    train_problems: int | None = None
    """Use only the first N training problems that fit (None: all that fit)."""
    eval_problems: int = 8
    """Evaluate on the first N test problems (that fit --max-prompt-length)."""
    eval_batch_size: int = 64
    scaling_samples: int = 0
    """n > 0: inference-time scaling figures of the trained policy on the test problems (pass@k,
    maj@k, weighted maj@k, best-of-k by confidence for k = 1 … n, at --temperature), printed and
    drawn in scaling.png. 16 is the usual figure; it costs n sampled completions per problem."""
    accuracy_weight: float = 1.0
    format_weight: float = 0.2
    grpo_iterations: int = 2
    prompts_per_iteration: int = 2
    group_size: int = 4
    grpo_lr: float = 1e-6
    eval_every: int = 0


def gsm8k_reward(*, accuracy_weight: float = 1.0, format_weight: float = 0.2):
    """`reward(completions, *, answers) = a·exact_match + f·format` (see the module docstring)."""
    return weighted_sum((exact_match_reward, accuracy_weight), (format_reward, format_weight))


def load_policy(cfg: Config, tokenizer: jd.Tokenizer):
    """(config, params): a preset initialised at random, or pretrained weights.

    Raises:
      ValueError: a tokenizer with more ids than the pretrained model's vocabulary, or a prompt
        and completion longer than its context.
    """
    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    length = cfg.max_prompt_length + cfg.max_new_tokens
    if cfg.model in PRESETS:
        config = get_config(cfg.model, vocab_size=tokenizer.vocab_size, max_seq_len=length, dtype=dtype)
        return config, init_params(config, jax.random.key(cfg.seed))
    config, params = load_model(cfg.model, tokenizer, tokenizer_spec=cfg.tokenizer, dtype=dtype)
    check_context(config, length, model=cfg.model, flags=(
        f"--max-prompt-length {cfg.max_prompt_length} + --max-new-tokens {cfg.max_new_tokens}"
    ))
    return config, params


def prompt_ids(rows: list[dict], tokenizer: jd.Tokenizer, chat: bool) -> list[list[int]]:
    """Each row's prompt as token ids: the chat template's rendering of `r1_messages(question)`
    with the assistant header (the template writes any BOS), or BOS + the plain R1 prompt."""
    if chat:
        return [
            jd.encode_chat(tokenizer, jd.r1_messages(r["question"]), add_generation_prompt=True)[0]
            for r in rows
        ]
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return [bos + ids for ids in tokenizer.encode_batch([r["prompt"] for r in rows])]


def fitting_rows(
    dataset, tokenizer: jd.Tokenizer, max_prompt_length: int, limit: int | None, *, chat: bool
) -> list[dict]:
    """The first `limit` rows (all when None) whose prompt fits `max_prompt_length` tokens
    (BOS included), with their prompt token ids under "ids". Rows are tokenized 512 at a time
    and only until `limit` fit."""
    fitting: list[dict] = []
    for start in range(0, len(dataset), 512):
        rows = dataset.select(range(start, min(start + 512, len(dataset)))).to_list()
        ids = prompt_ids(rows, tokenizer, chat)
        fitting += [{**r, "ids": i} for r, i in zip(rows, ids) if len(i) <= max_prompt_length]
        if limit is not None and len(fitting) >= limit:
            break
    return fitting[:limit]


def collate(rows: list[dict], tokenizer: jd.Tokenizer, buckets) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts of `rows`, padded to a bucket width (few widths: few compilations)."""
    width = jd.bucket_length(max(len(r["ids"]) for r in rows), buckets)
    return jd.pad_prompts([r["ids"] for r in rows], pad_id=tokenizer.pad_id, length=width)


def load_problems(cfg: Config, tokenizer: jd.Tokenizer) -> tuple[list[dict], list[dict]]:
    """(train, test): the problems of --train-data / --test-data that fit --max-prompt-length.

    Raises:
      ValueError: fewer training problems fit than --prompts-per-iteration, or no test problem.
    """
    train_set, test_set = jd.load_gsm8k(cfg.train_data), jd.load_gsm8k(cfg.test_data)
    chat = use_chat(cfg.chat, tokenizer, cfg.tokenizer)
    train = fitting_rows(train_set, tokenizer, cfg.max_prompt_length, cfg.train_problems, chat=chat)
    test = fitting_rows(test_set, tokenizer, cfg.max_prompt_length, cfg.eval_problems, chat=chat)
    log.info("using %d train / %d test problems (of %d / %d; prompts over %d tokens left out)",
             len(train), len(test), len(train_set), len(test_set), cfg.max_prompt_length)
    if len(train) < cfg.prompts_per_iteration or not test:
        raise ValueError(f"too few problems fit --max-prompt-length {cfg.max_prompt_length}: "
                         f"{len(train)} train, {len(test)} test")
    return train, test


def make_evaluate(cfg: Config, config, tokenizer: jd.Tokenizer, test: list[dict], reward_fn, buckets):
    """`evaluate(params) -> (figures, samples)`: greedy accuracy, format rate and reward on the
    held-out `test` problems, and each problem's completion."""

    def evaluate(p) -> tuple[dict[str, float], list[dict]]:
        completions, rewards = [], []
        for start in range(0, len(test), cfg.eval_batch_size):
            chunk = test[start : start + cfg.eval_batch_size]
            tokens, mask = collate(chunk, tokenizer, buckets)
            scored = evaluate_policy(
                p, config, tokens, mask, reward_fn=reward_fn, decode=tokenizer.decode,
                rng=jax.random.key(cfg.seed),
                columns={"answers": [r["answer"] for r in chunk]}, sampling=SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id),)
            completions += scored.completions
            rewards.append(scored.rewards)
        accuracy = exact_match_reward(completions, answers=[r["answer"] for r in test])
        samples = [{"question": r["question"], "answer": r["answer"], "completion": c, "correct": bool(a)}
                   for r, c, a in zip(test, completions, accuracy)]
        return {"accuracy": float(accuracy.mean()), "format": float(format_reward(completions).mean()),
                "reward": float(np.concatenate(rewards).mean())}, samples

    return evaluate


def run(cfg: Config) -> dict:
    """Loads data and model, evaluates, runs GRPO, evaluates; returns (and writes) the summary."""
    run_dir = RunDir.open(cfg)
    if (done := run_dir.finished_summary()) is not None:
        return done
    tokenizer = jd.load_tokenizer(cfg.tokenizer)
    config, params = load_policy(cfg, tokenizer)
    buckets = jd.default_buckets(cfg.max_prompt_length, min_bucket=64)
    train, test = load_problems(cfg, tokenizer)
    reward_fn = gsm8k_reward(accuracy_weight=cfg.accuracy_weight, format_weight=cfg.format_weight)
    writer = run_dir.begin()

    def prompts_at(it):  # a pure function of (seed, iteration): a resumed run draws the same
        chosen = draw_at(cfg.seed + 3, it, len(train), cfg.prompts_per_iteration)
        batch = [train[i] for i in chosen]
        tokens, mask = collate(batch, tokenizer, buckets)
        return tokens, mask, {"answers": [r["answer"] for r in batch]}

    grpo = grpo_before_after(
        cfg, config, params, prompts_at, evaluate=make_evaluate(cfg, config, tokenizer, test, reward_fn, buckets),
        reward_fn=reward_fn, tokenizer=tokenizer, max_new_tokens=cfg.max_new_tokens, writer=writer,
        eval_during=bool(cfg.eval_every),
    )
    with (cfg.output_dir / "samples.jsonl").open("w") as f:
        f.writelines(dumps(s) + "\n" for s in grpo.after_extra)
    summary = {
        **before_after(grpo.before, grpo.after, prefix="test_"),
        "train_problems": len(train),
        "test_problems": len(test),
        **grpo.training,
    }
    if cfg.scaling_samples:
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                  eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        chunks = [test[i : i + cfg.eval_batch_size] for i in range(0, len(test), cfg.eval_batch_size)]
        batches = ((*collate(c, tokenizer, buckets), [r["answer"] for r in c]) for c in chunks)
        summary["scaling"] = scaling_figures(grpo.params, config, tokenizer, batches, samples=cfg.scaling_samples,
                                             sampling=sampling, seed=cfg.seed + 5)
        plot_scaling(summary["scaling"], run_dir.path / "scaling.png", title="GSM8K test, after GRPO")
    return write_outputs(
        run_dir, writer, summary,
        [("grpo", "reward_mean"), ("grpo_eval", "accuracy"), ("grpo_eval", "format"), ("grpo", "kl")],
        title="GRPO on GSM8K",
    )


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point: runs and prints the before/after table."""
    setup_logging()
    summary = run(tyro.cli(Config, args=argv))
    rows = [("  " + name, summary[f"test_{name}_before"], summary[f"test_{name}_after"])
            for name in ("accuracy", "format", "reward")]
    rows.append(("train reward, first/last 20% iters", summary["train_reward_first"], summary["train_reward_last"]))
    print(format_table(f"GSM8K test ({summary['test_problems']} problems, greedy)", ("before", "after"), rows,
                       widths=(40, 10, 10)))
    if "scaling" in summary:
        print("\ninference-time scaling after GRPO (test accuracy, k samples per problem):")
        print(scaling_table(summary["scaling"]))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
