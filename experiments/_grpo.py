"""What the GRPO experiments share: their common flags and the optimiser/step/loop set-up.

Each experiment (grpo_arithmetic, grpo_gsm8k, grpo_stories) subclasses `GRPOConfig` with its own
data and model flags and defaults, then calls `train_grpo` with its prompts, reward and
evaluation.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp

from experiments._common import RunDir
from jaxalign.checkpoint import make_checkpoint_manager, restore_checkpoint
from jaxalign.data import Tokenizer
from jaxalign.metrics import MetricsWriter, plot_metrics
from jaxalign.models import TransformerConfig
from jaxalign.optim import OptimConfig, make_optimizer
from jaxalign.rewards import RewardFn
from jaxalign.trainers import TrainState, create_train_state, make_grpo_step
from jaxalign.trainers.rl_loop import PromptsAt, grpo_loop

# The rollout reward of training is reported as the mean over this fraction of the first and of
# the last iterations (one iteration's mean is noisy).
_TREND_FRACTION = 0.2


@dataclasses.dataclass
class GRPOConfig:
    """GRPO hyperparameters (names as in DeepSeekMath / DAPO / TRL's GRPOConfig)."""

    output_dir: Path = Path("runs/grpo")
    seed: int = 0
    grpo_iterations: int = 60
    prompts_per_iteration: int = 32
    group_size: int = 8
    """G: completions sampled per prompt."""
    inner_steps: int = 1
    """μ: optimisation steps per rollout."""
    grpo_lr: float = 1e-4
    beta: float = 0.04
    """KL coefficient β (k3 estimator) to the reference model; 0 drops the reference."""
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    """ε_high of DAPO's clip-higher (0.28 there); None: = clip_eps."""
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "seq_mean_token_mean"
    importance_level: Literal["token", "sequence", "sequence_token"] = "token"
    scale: Literal["group", "batch", "none"] = "group"
    """Advantage scaling: group std (GRPO), batch std, none (Dr. GRPO)."""
    filter_zero_variance: bool = True
    """Drop groups whose rewards are all equal from the loss (DAPO dynamic sampling)."""
    temperature: float = 1.0
    """Sampling temperature of rollouts (and of the sampled evaluation)."""
    top_p: float | None = None
    eval_every: int = 10
    checkpoint_every: int = 5
    """Iterations between checkpoints of the policy's TrainState (and at the end)."""
    keep_checkpoints: int = 2
    resume: bool = False
    """Continue the run in --output-dir from its latest checkpoint (same prompts, keys, records)."""
    progress: bool = True


def train_grpo(
    cfg: GRPOConfig,
    config: TransformerConfig,
    params,
    prompts_at: PromptsAt,
    *,
    reward_fn: RewardFn,
    tokenizer: Tokenizer,
    max_new_tokens: int,
    writer: MetricsWriter,
    eval_fn=None,
) -> tuple[TrainState, dict[str, Any]]:
    """GRPO from `params` (which also become the frozen reference when β > 0): a constant
    learning rate AdamW without weight decay, `make_grpo_step` with `cfg`'s loss options, and
    `grpo_loop` with `cfg`'s rollout options. `params` themselves are never donated. The state
    is checkpointed under `cfg.output_dir/checkpoints/grpo` every `cfg.checkpoint_every` iterations;
    with `cfg.resume` the loop continues from the latest one.

    Returns:
      `grpo_loop`'s (state, summary), the summary with `grpo_seconds` (wall time of the loop,
      its evaluations included) added.
    """
    ref_params = jax.tree.map(jnp.copy, params) if cfg.beta else None
    updates = cfg.grpo_iterations * cfg.inner_steps
    tx, schedule = make_optimizer(
        OptimConfig(learning_rate=cfg.grpo_lr, total_steps=updates, end_learning_rate=cfg.grpo_lr, weight_decay=0.0)
    )
    step = make_grpo_step(
        config, tx, schedule, beta=cfg.beta, clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
        loss_agg=cfg.loss_agg, importance_level=cfg.importance_level, max_length=max_new_tokens,
    )
    state = create_train_state(jax.tree.map(jnp.copy, params), tx, cfg.seed + 1)
    checkpoints = make_checkpoint_manager(
        cfg.output_dir / "checkpoints" / "grpo", save_every=cfg.checkpoint_every, keep=cfg.keep_checkpoints
    )
    if cfg.resume and (restored := restore_checkpoint(checkpoints, state)) is not None:
        state = restored
    t0 = time.perf_counter()
    state, summary = grpo_loop(
        step, state, prompts_at, config=config, num_iterations=cfg.grpo_iterations,
        rng=jax.random.key(cfg.seed + 2), writer=writer, ref_params=ref_params,
        inner_steps=cfg.inner_steps, eval_fn=eval_fn, eval_every=cfg.eval_every,
        checkpoints=checkpoints, progress=cfg.progress, group_size=cfg.group_size,
        reward_fn=reward_fn, decode=tokenizer.decode, max_new_tokens=max_new_tokens,
        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, temperature=cfg.temperature,
        top_p=cfg.top_p, scale=cfg.scale, filter_zero_variance=cfg.filter_zero_variance,
    )
    return state, {**summary, "grpo_seconds": time.perf_counter() - t0}


def training_figures(result: dict[str, Any]) -> dict[str, float]:
    """`train_grpo`'s summary as the figures every GRPO experiment reports: the mean rollout
    reward over the first and the last 20% of iterations, and the time spent."""
    rewards = result["reward_mean"]
    k = max(1, int(len(rewards) * _TREND_FRACTION))
    return {
        "train_reward_first": float(sum(rewards[:k]) / k),
        "train_reward_last": float(sum(rewards[-k:]) / k),
        **{name: result[name] for name in ("grpo_seconds", "rollout_seconds", "update_seconds")},
    }


def write_outputs(run_dir: RunDir, metrics_path: Path, summary: dict, curves, *, title: str) -> dict:
    """`grpo.png` (the `(stage, metric)` curves of `metrics.jsonl`) and `summary.json`; returns
    the summary as written."""
    plot_metrics(metrics_path, run_dir.path / "grpo.png", curves, title=title)
    return run_dir.write_summary(summary)
