"""What the GRPO experiments share: their common flags and the optimiser/step/loop set-up.

Each experiment (grpo_arithmetic, grpo_gsm8k, grpo_stories) subclasses `GRPOConfig` with its own
data and model flags and defaults, then calls `grpo_before_after` with its prompts, reward and
evaluation.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

import jaxalign.data as jd
from experiments._common import RunDir, log_once, resume_or_start, trend
from jaxalign import (
    MetricsWriter,
    OptimConfig,
    SamplingConfig,
    TrainState,
    TransformerConfig,
    create_train_state,
    grpo_loop,
    make_grpo_step,
    make_optimizer,
    plot_metrics,
)
from jaxalign.rewards import RewardFn
from jaxalign.trainers.rl_loop import PromptsAt

log = logging.getLogger("experiments")


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
    tokenizer: jd.Tokenizer,
    max_new_tokens: int,
    writer: MetricsWriter,
    eval_fn=None,
    step_kwargs: Mapping[str, Any] | None = None,
    rollout_kwargs: Mapping[str, Any] | None = None,
) -> tuple[TrainState, dict[str, Any]]:
    """GRPO from `params` (which also become the frozen reference when β > 0): a constant
    learning rate AdamW without weight decay, `make_grpo_step` with `cfg`'s loss options, and
    `grpo_loop` with `cfg`'s rollout options. `params` themselves are never donated. The state
    is checkpointed under `cfg.output_dir/checkpoints/grpo` every `cfg.checkpoint_every` iterations;
    with `cfg.resume` the loop continues from the latest one. `step_kwargs` go to
    `make_grpo_step` beside `cfg`'s loss options (which they override, e.g. an arm's
    `importance_level`), `rollout_kwargs` to `grpo_loop`'s rollouts; both default to none, so
    the experiments that pass neither run as before.

    Returns:
      `grpo_loop`'s (state, summary), the summary with `grpo_seconds` (wall time of the loop,
      its evaluations included) added.
    """
    ref_params = jax.tree.map(jnp.copy, params) if cfg.beta else None
    updates = cfg.grpo_iterations * cfg.inner_steps
    tx, schedule = make_optimizer(
        OptimConfig(learning_rate=cfg.grpo_lr, total_steps=updates, end_learning_rate=cfg.grpo_lr, weight_decay=0.0)
    )
    loss_options = dict(
        beta=cfg.beta, clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high, loss_agg=cfg.loss_agg,
        importance_level=cfg.importance_level, max_length=max_new_tokens,
    )
    step = make_grpo_step(config, tx, schedule, **{**loss_options, **(step_kwargs or {})})
    checkpoints, state = resume_or_start(
        cfg.output_dir / "checkpoints" / "grpo", create_train_state(jax.tree.map(jnp.copy, params), tx, cfg.seed + 1),
        resume=cfg.resume, save_every=cfg.checkpoint_every, keep=cfg.keep_checkpoints,
    )
    t0 = time.perf_counter()
    state, summary = grpo_loop(
        step, state, prompts_at, config=config, num_iterations=cfg.grpo_iterations,
        rng=jax.random.key(cfg.seed + 2), writer=writer, ref_params=ref_params,
        inner_steps=cfg.inner_steps, eval_fn=eval_fn, eval_every=cfg.eval_every,
        checkpoints=checkpoints, progress=cfg.progress, group_size=cfg.group_size,
        reward_fn=reward_fn, decode=tokenizer.decode, scale=cfg.scale, filter_zero_variance=cfg.filter_zero_variance, sampling=SamplingConfig(max_new_tokens=max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id),
        **(rollout_kwargs or {}),)
    return state, {**summary, "grpo_seconds": time.perf_counter() - t0}


def training_figures(result: dict[str, Any]) -> dict[str, float]:
    """`train_grpo`'s summary as the figures every GRPO experiment reports: the mean rollout
    reward over the first and the last 20% of iterations (`trend`), and the time spent."""
    return {
        **trend("train_reward", result["reward_mean"]),
        **{name: result[name] for name in ("grpo_seconds", "rollout_seconds", "update_seconds")},
    }


class BeforeAfter(NamedTuple):
    """What `grpo_before_after` measured.

    Attributes:
      before, after: the evaluation's figures for the start and the trained policy.
      before_extra, after_extra: what the evaluation returned beside them (samples, texts).
      training: `training_figures` of the run.
      params: the trained policy's parameters.
    """

    before: dict[str, float]
    after: dict[str, float]
    before_extra: Any
    after_extra: Any
    training: dict[str, float]
    params: Any


def grpo_before_after(
    cfg: GRPOConfig,
    config: TransformerConfig,
    params,
    prompts_at: PromptsAt,
    *,
    evaluate: Callable[[Any], tuple[dict[str, float], Any]],
    reward_fn: RewardFn,
    tokenizer: jd.Tokenizer,
    max_new_tokens: int,
    writer: MetricsWriter,
    eval_during: bool,
    reuse_final_eval: bool = False,
    step_kwargs: Mapping[str, Any] | None = None,
    rollout_kwargs: Mapping[str, Any] | None = None,
) -> BeforeAfter:
    """Evaluates `params`, trains them with GRPO (`train_grpo`), evaluates the result; both
    evaluations are logged (once) as "grpo_eval" records at iterations 0 and --grpo-iterations.

    Args:
      evaluate: `evaluate(params) -> (figures, extra)`, figures a dict of floats.
      eval_during: also evaluate every --eval-every iterations (and at the end) inside the loop.
      reuse_final_eval: the loop's final evaluation is the "after" figures (no extra needed), so
        it is not computed again; it is when the run was resumed past its end.
      step_kwargs, rollout_kwargs: as `train_grpo` (e.g. one arm of a comparison).
      The rest: as `train_grpo`.

    Returns:
      `BeforeAfter` (before/after figures and extras, `training_figures`, trained params).
    """
    before, before_extra = evaluate(params)
    log.info("before GRPO: %s", before)
    log_once(writer, 0, before, stage="grpo_eval")
    state, result = train_grpo(
        cfg, config, params, prompts_at, reward_fn=reward_fn, tokenizer=tokenizer,
        max_new_tokens=max_new_tokens, writer=writer,
        eval_fn=(lambda p: evaluate(p)[0]) if eval_during else None,
        step_kwargs=step_kwargs, rollout_kwargs=rollout_kwargs,
    )
    if reuse_final_eval and result["final_eval"]:
        after, after_extra = result["final_eval"], None
    else:
        after, after_extra = evaluate(state.params)
    log.info("after GRPO: %s", after)
    log_once(writer, cfg.grpo_iterations, after, stage="grpo_eval")
    return BeforeAfter(before, after, before_extra, after_extra, training_figures(result), state.params)


def write_outputs(run_dir: RunDir, writer: MetricsWriter, summary: dict, curves, *, title: str) -> dict:
    """Closes `writer`, plots `grpo.png` (the `(stage, metric)` curves of `metrics.jsonl`) and
    writes `summary.json`; returns the summary as written."""
    writer.close()
    plot_metrics(writer.path, run_dir.path / "grpo.png", curves, title=title)
    return run_dir.write_summary(summary)
