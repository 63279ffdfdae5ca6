"""Reward model (Bradley–Terry) on real human preference pairs: Anthropic HH-RLHF, harmless split.

Default: `../shared/data/hh-rlhf/harmless-base-test.jsonl.gz` (2,312 pairs of whole
`Human: … Assistant: …` transcripts, split at the last shared assistant turn by
`jaxalign.data.split_transcripts`), the GPT-2 tokenizer from `../shared/data/tokenizers/`, and a
small GPT-2-shaped trunk trained from scratch (`--init` takes a Hugging Face GPT-2 / Llama
directory or a llama2.c `.bin` to start from a pretrained trunk instead). A split of the pairs,
drawn with --seed, is held out; the script reports held-out pairwise accuracy (the share of
held-out pairs where the model scores the human-chosen reply higher) before and after training,
beside the accuracy of the "shorter reply wins" rule on the same pairs, a baseline that needs no
model.

  python -m experiments.reward_model                    # default, a few minutes on 2 CPU cores

Writes into --output-dir: config.json, metrics.jsonl, summary.json, reward_model.png,
checkpoints/ (the `{"backbone", "head"}` TrainState every --checkpoint-every steps and at the end;
`--resume` continues from the latest).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import time
from pathlib import Path
from typing import Literal

import jax
import numpy as np
import tyro

import jaxalign.data as jd
from experiments._common import SHARED_DATA, RunDir, format_table, load_model, train_reward_model
from jaxalign import OptimConfig, get_config, init_scalar_model, plot_metrics
from jaxalign.metrics import setup_logging

log = logging.getLogger("reward_model")


@dataclasses.dataclass
class Config:
    """Train a Bradley–Terry reward model on preference pairs and report held-out accuracy."""

    output_dir: Path = Path("runs/reward_model")
    data: str = str(SHARED_DATA / "hh-rlhf/harmless-base-test.jsonl.gz")
    """Preference file or hub id (any format `load_preference_dataset` accepts)."""
    tokenizer: str = str(SHARED_DATA / "tokenizers/gpt2/gpt2.tiktoken")
    init: str | None = None
    """Pretrained trunk (HF directory, llama2.c .bin or hub id); default: from scratch."""
    model: str = "gpt2-mini"
    """Preset for a from-scratch trunk."""
    max_examples: int | None = None
    val_fraction: float = 0.2
    max_length: int = 192
    """Tokens per side (the prompt is truncated from the left)."""
    batch_size: int = 16
    steps: int = 300
    lr: float = 3e-4
    warmup_steps: int = 20
    pool: Literal["last", "mean"] = "last"
    center_coef: float = 0.0
    """λ of the reward-centering term (TRL center_rewards_coefficient; 0 = off)."""
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    resume: bool = False
    """Continue the run in --output-dir from its latest checkpoint."""
    progress: bool = True


def load_pairs(cfg: Config, tok: jd.Tokenizer) -> tuple[list, list, float]:
    """(train, held-out) PreferenceExamples of --data (split with --seed), and the held-out
    accuracy of the "shorter reply wins" rule."""
    dataset = jd.load_preference_dataset(cfg.data)
    if cfg.max_examples is not None:
        dataset = dataset.select(range(min(cfg.max_examples, len(dataset))))
    train_rows, val_rows = jd.train_val_split(dataset, cfg.val_fraction, seed=cfg.seed, source=cfg.data)
    train = jd.tokenize_preference(train_rows, tok, max_length=cfg.max_length)
    val = jd.tokenize_preference(val_rows, tok, max_length=cfg.max_length)
    shorter_wins = float(np.mean([len(c) < len(r) for c, r in zip(val_rows["chosen"], val_rows["rejected"])]))
    return train, val, shorter_wins


def build_model(cfg: Config, tok: jd.Tokenizer):
    """(config, params) of the scalar model: the --init trunk (checked against the tokenizer) or
    a from-scratch --model preset, with a fresh head."""
    if cfg.init is None:
        config = get_config(cfg.model, vocab_size=tok.vocab_size, max_seq_len=cfg.max_length)
        backbone = None
    else:
        config, backbone = load_model(cfg.init, tok, tokenizer_spec=cfg.tokenizer, model_flag="--init")
    return config, init_scalar_model(config, jax.random.key(cfg.seed), backbone)


def run(cfg: Config) -> dict:
    """Trains the reward model; returns (and writes) the summary."""
    t_start = time.perf_counter()
    run_dir = RunDir.open(cfg)
    if (done := run_dir.finished_summary()) is not None:
        return done
    # every input is validated before the model is built (OptimConfig refuses a bad warm-up)
    optim = OptimConfig(learning_rate=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps)
    tok = jd.load_tokenizer(cfg.tokenizer)
    train, val, shorter_wins = load_pairs(cfg, tok)
    config, params = build_model(cfg, tok)
    collate = functools.partial(
        jd.collate_preference, batch_size=cfg.batch_size, buckets=jd.default_buckets(cfg.max_length), pad_id=tok.pad_id
    )
    writer = run_dir.begin()
    _, before, after, loop = train_reward_model(
        config, params, train, val, optim=optim, collate=collate, batch_size=cfg.batch_size, seed=cfg.seed,
        writer=writer, checkpoint_dir=cfg.output_dir / "checkpoints", checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=cfg.keep_checkpoints, resume=cfg.resume, num_steps=cfg.steps, log_every=10,
        eval_every=cfg.eval_every, progress=cfg.progress, pool=cfg.pool, center_coef=cfg.center_coef,
    )
    writer.close()
    summary = {
        "train_pairs": len(train),
        "heldout_pairs": int(after["pairs"]),
        "heldout_accuracy_before": before["accuracy"],
        "heldout_accuracy_after": after["accuracy"],
        "heldout_loss_before": before["loss"],
        "heldout_loss_after": after["loss"],
        "heldout_margin_after": after["margin"],
        "shorter_reply_wins_accuracy": shorter_wins,
        "tokens_per_s": loop["tokens_per_s"],
        "total_seconds": time.perf_counter() - t_start,
    }
    plot_metrics(
        writer.path, cfg.output_dir / "reward_model.png",
        [("reward_model", "loss"), ("reward_model", "accuracy"), ("reward_model_eval", "accuracy"),
         ("reward_model", "learning_rate")],
        title="Bradley-Terry reward model",
    )
    return run_dir.write_summary(summary)


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point: prints the held-out table."""
    setup_logging()
    s = run(tyro.cli(Config, args=argv))
    print(f"{s['train_pairs']} train pairs, {s['heldout_pairs']} held-out pairs")
    print(format_table("held-out", ("before", "after"), [
        ("  pairwise accuracy", s["heldout_accuracy_before"], s["heldout_accuracy_after"]),
        ("  loss (nats/pair)", s["heldout_loss_before"], s["heldout_loss_after"]),
        ("  shorter-reply-wins rule", s["shorter_reply_wins_accuracy"]),
    ], widths=(30, 10, 10)))
    return s


if __name__ == "__main__":
    main(sys.argv[1:])
