"""The RL outer loops: sample from the policy, score, optimise, repeat.

`grpo_loop` runs GRPO iterations (DeepSeekMath arXiv 2402.03300, Alg. 1): a `grpo_rollout` with
the current policy, then μ calls of a `make_grpo_step` step on that rollout, logging each
iteration and evaluating every few. `ppo_loop` is its PPO twin (a `ppo_rollout`, `ppo_update`'s
epochs over minibatches, the adaptive KL controller). Both take a `policy_fn` that turns the
train state into the params to sample with (default: the state's params; a LoRA run merges its
adapters into the base) and `step_args` for the step's extra arguments (a LoRA step's base), so
full and LoRA runs go through the same loop. Both resume exactly from their own checkpoints and
stop on non-finite rollouts or repeatedly skipped updates. Held-out evaluation is
`jaxalign.rollout.evaluate_policy` (re-exported here).

Shapes: B prompts, P prompt length, N completion length.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from jaxalign.checkpoint import NonFiniteError, save_checkpoint
from jaxalign.metrics import MetricsWriter, read_metrics
from jaxalign.models.config import TransformerConfig
from jaxalign.rollout import evaluate_policy, grpo_rollout, ppo_rollout
from jaxalign.trainers.loop import check_skipped, check_update_ratio
from jaxalign.trainers.ppo import PtxBatchAt, adaptive_kl_coef, ppo_update
from jaxalign.trainers.step import TrainState

# prompts_at(iteration) -> (prompt_tokens int32 [B,P] left-padded, prompt_mask [B,P], columns)
PromptsAt = Callable[[int], tuple[np.ndarray, np.ndarray, Mapping[str, Sequence[Any]]]]
# policy_fn(state) -> the params the rollout samples with (and eval_fn evaluates)
PolicyFn = Callable[[Any], Any]


def _params_of(state) -> Any:
    return state.params


def check_finite_rollout(values: Mapping[str, Any], *, stage: str, iteration: int) -> None:
    """Raises `NonFiniteError` naming stage, iteration and field when a rollout's rewards,
    advantages, KL or any float metric holds NaN or inf (a diverged policy or a broken reward)."""
    for name, value in values.items():
        v = np.asarray(jax.device_get(value))
        if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v)):
            raise NonFiniteError(
                f"{stage}: iteration {iteration}: {name} is not finite "
                f"({int(np.sum(~np.isfinite(v)))} of {v.size} values); stopping before the update"
            )


def _restart(writer: MetricsWriter, rng: jax.Array, start: int, stage: str) -> jax.Array:
    """Where an RL loop resumes at iteration `start`: drops the records of `stage` and
    f"{stage}_eval" logged after it and returns `rng` advanced past the keys already used."""
    for name in (stage, f"{stage}_eval"):
        writer.truncate_after(start, stage=name)
    for _ in range(start):
        rng, _ = jax.random.split(rng)
    return rng


def _save(checkpoints: ocp.CheckpointManager | None, it: int, state, *, final: bool, stage: str) -> None:
    """Offers the state of iteration `it` to the manager (saved at the end regardless)."""
    if checkpoints is None:
        return
    try:
        save_checkpoint(checkpoints, it, state, force=final)
    except NonFiniteError as e:
        raise NonFiniteError(f"{stage}: iteration {it}: {e}") from e


def grpo_loop(
    step_fn: Callable[[TrainState, Any], tuple[TrainState, dict]],
    state: TrainState,
    prompts_at: PromptsAt,
    *,
    config: TransformerConfig,
    num_iterations: int,
    rng: jax.Array,
    writer: MetricsWriter,
    ref_params=None,
    inner_steps: int = 1,
    policy_fn: PolicyFn = _params_of,
    step_args: tuple = (),
    eval_fn: Callable[[Any], Mapping[str, float]] | None = None,
    eval_every: int = 0,
    checkpoints: ocp.CheckpointManager | None = None,
    progress: bool = True,
    max_skipped_steps: int = 3,
    max_update_ratio: float | None = 1.0,
    **rollout_kwargs,
) -> tuple[TrainState, dict[str, Any]]:
    """Runs GRPO iterations from the one `state` is at to `num_iterations`: rollout with the
    current params, μ optimiser steps.

    Iteration `it` (1-based) samples with the key of the `it`-th `jax.random.split` of `rng`
    (`rng, key = split(rng)`), so two runs with the same arguments see the same samples. A state
    restored from a checkpoint of this loop (its `step` = it·μ) continues at iteration it + 1 with
    the keys and prompts (`prompts_at` must be a pure function of the iteration) it would have
    had; the records of "grpo"/"grpo_eval" logged after iteration it are dropped first, so a
    killed and resumed run logs every iteration once.

    Args:
      step_fn: `make_grpo_step(...)`'s `step(state, rollout, *step_args) -> (state, metrics)`.
      state: the policy's `TrainState` (its params are donated to the step), fresh or restored.
      prompts_at: `prompts_at(it) -> (prompt_tokens [B, P], prompt_mask [B, P], columns)`, the
        prompts of iteration it and their reward columns (e.g. {"answers": [...]}, length B).
      config: the policy's config.
      num_iterations: rollouts of the whole run.
      rng: PRNG key for sampling.
      writer: records stage "grpo" (the last inner step's metrics plus the rollout's
        `reward_mean`, `reward_std`, `zero_variance_fraction`, `completion_length`, and
        `rollout_seconds`, `update_seconds`) at step it, and "grpo_eval" records.
      ref_params: the frozen reference for the KL term (None when β = 0). Must not share buffers
        with `state.params` (the step donates them): pass a copy.
      inner_steps: μ, optimiser steps per rollout.
      policy_fn: `policy_fn(state) -> params` to sample with and evaluate (default: the
        state's params; a LoRA run passes `lambda s: merge_lora(base, s.params, lora)`).
      step_args: extra arguments of every step call (a LoRA step's base params).
      eval_fn: `eval_fn(policy_params) -> dict of floats`, every `eval_every` iterations and at
        the end.
      eval_every: 0 evaluates only at the end.
      checkpoints: an orbax manager; the state is offered to it after each iteration (step = it)
        and saved at the end.
      progress: show a tqdm bar.
      max_skipped_steps: stop after this many consecutive optimiser steps skipped for
        non-finite gradients (`jaxalign.trainers.loop`).
      max_update_ratio: stop when an update's norm exceeds this fraction of the parameters'
        (`jaxalign.trainers.loop.check_update_ratio`); None disables it.
      **rollout_kwargs: `grpo_rollout`'s options (group_size, reward_fn, decode, sampling,
        scale, filter_zero_variance).

    Returns:
      (state, summary): summary `reward_mean` (per iteration, list, from the run's records so a
      resumed run reports all of them), `final_eval` (the last `eval_fn` record, {} without one),
      `rollout_seconds` and `update_seconds` (totals of this call).

    Raises:
      NonFiniteError: non-finite rewards, advantages or KL in a rollout, `max_skipped_steps`
        skipped steps in a row, an update over `max_update_ratio`, or a non-finite state due to
        be checkpointed (stage, iteration and field named).
      ValueError: a state whose step is not a whole number of iterations.
    """
    if int(state.step) % inner_steps:
        raise ValueError(f"state.step={int(state.step)} is not a multiple of inner_steps={inner_steps}")
    start = int(state.step) // inner_steps
    rng = _restart(writer, rng, start, "grpo")
    final_eval, seconds = {}, {"rollout_seconds": 0.0, "update_seconds": 0.0}
    bar = tqdm(total=num_iterations, initial=start, desc="grpo", disable=not progress, leave=False)
    try:
        for it in range(start + 1, num_iterations + 1):
            tokens, mask, columns = prompts_at(it)
            rng, key = jax.random.split(rng)
            t0 = time.perf_counter()
            rollout, _, roll_metrics, _ = grpo_rollout(
                policy_fn(state), config, tokens, mask, rng=key, ref_params=ref_params, columns=columns,
                **rollout_kwargs,
            )
            check_finite_rollout(
                {"rewards": rollout.rewards, "advantages": rollout.advantages, **roll_metrics}, stage="grpo", iteration=it
            )
            t1 = time.perf_counter()
            for _ in range(inner_steps):
                state, metrics = step_fn(state, rollout, *step_args)
            record = {**jax.device_get(metrics), **roll_metrics}
            timing = {"rollout_seconds": t1 - t0, "update_seconds": time.perf_counter() - t1}
            for k, v in timing.items():
                seconds[k] += v
            writer.write(it, {**record, **timing}, stage="grpo")
            check_update_ratio(record, stage="grpo", step=it, max_update_ratio=max_update_ratio)
            check_skipped(record, stage="grpo", step=it, max_skipped_steps=max_skipped_steps)
            check_finite_rollout({"kl": record.get("kl", 0.0)}, stage="grpo", iteration=it)
            if eval_fn is not None and ((eval_every and it % eval_every == 0) or it == num_iterations):
                final_eval = dict(eval_fn(policy_fn(state)))
                writer.write(it, final_eval, stage="grpo_eval")
            _save(checkpoints, it, state, final=it == num_iterations, stage="grpo")
            bar.set_postfix(reward=f"{roll_metrics['reward_mean']:.3f}")
            bar.update(1)
    finally:  # a stopped run still commits the checkpoints it started
        bar.close()
        if checkpoints is not None:
            checkpoints.wait_until_finished()
    rewards = [r["reward_mean"] for r in read_metrics(writer.path) if r["stage"] == "grpo"]
    return state, {"reward_mean": rewards, "final_eval": final_eval, **seconds}


class PPOState(NamedTuple):
    """What a PPO run checkpoints: the actor-critic `TrainState` and the adaptive-KL controller's
    current β (float32 scalar). The iteration is `train.step // (epochs · num_minibatches)`."""

    train: TrainState
    kl_coef: jax.Array


def ppo_loop(
    step_fn: Callable[[TrainState, Any], tuple[TrainState, dict]],
    state: PPOState,
    prompts_at: Callable[[int], tuple[np.ndarray, np.ndarray]],
    *,
    config: TransformerConfig,
    num_iterations: int,
    rng: jax.Array,
    writer: MetricsWriter,
    ref_params,
    score_fn: Callable[..., jax.Array],
    epochs: int = 4,
    num_minibatches: int = 1,
    kl_target: float | None = None,
    kl_horizon: float = 10_000.0,
    policy_fn: PolicyFn = _params_of,
    step_args: tuple = (),
    ptx_batch_at: PtxBatchAt | None = None,
    rollout_metrics: Callable[[Any], Mapping[str, float]] | None = None,
    eval_fn: Callable[[Any], Mapping[str, float]] | None = None,
    eval_every: int = 0,
    checkpoints: ocp.CheckpointManager | None = None,
    progress: bool = True,
    max_skipped_steps: int = 3,
    max_update_ratio: float | None = 1.0,
    **rollout_kwargs,
) -> tuple[PPOState, dict[str, Any]]:
    """Runs PPO iterations from the one `state` is at to `num_iterations`: `ppo_rollout` with the
    current policy and critic, `ppo_update` (K epochs of shuffled minibatches), then the adaptive
    KL controller (Ziegler et al. 2019 §2.2; fixed β when `kl_target` is None).

    Iteration `it` (1-based) samples with the `it`-th `jax.random.split` of `rng` and shuffles
    minibatches with seed `it`; a state restored from this loop's checkpoint continues with the
    keys, prompts (`prompts_at` must be a pure function of the iteration), β and records it would
    have had (records of "ppo"/"ppo_eval" after its iteration are dropped first).

    Args:
      step_fn: `make_ppo_step(...)`'s `step(state, minibatch, *step_args)`.
      state: `PPOState(train_state, kl_coef)`, fresh or restored (the params are donated).
      prompts_at: `prompts_at(it) -> (prompt_tokens [B, P], prompt_mask [B, P])`.
      config: the policy's config.
      num_iterations: rollouts of the whole run.
      rng: PRNG key for sampling.
      writer: records stage "ppo" at step it (rollout metrics, `ppo_update`'s means, what
        `rollout_metrics` adds, `kl_coef` used) and "ppo_eval" records.
      ref_params: the frozen reference policy (KL penalty); must not share buffers with the state.
      score_fn: `score_fn(prompt_tokens, prompt_mask, completion_tokens, completion_mask) -> [B]`.
      epochs, num_minibatches: `ppo_update`'s K and minibatch count.
      kl_target, kl_horizon: the adaptive controller (`adaptive_kl_coef`); None: fixed β.
      policy_fn: `policy_fn(train_state) -> {"policy", "value"}` params to sample with and
        evaluate (default: the state's params; LoRA: `merge_lora(base, s.params, lora)`).
      step_args: extra arguments of every step call (a LoRA step's base params).
      ptx_batch_at: PPO-ptx (a step made with ptx_coef > 0): `ptx_batch_at(n)`, the SFT batch of
        the optimizer step that starts at train step n, a pure function of n so that a resumed
        run draws the same batches (`ppo_update`).
      rollout_metrics: optional `fn(output) -> dict of floats` of the iteration's
        `RolloutOutput`, logged with it (e.g. a gold score of `output.completions`; pass
        `decode` in the rollout options to get them).
      eval_fn: `eval_fn(policy_params) -> dict of floats`, every `eval_every` iterations and at
        the end.
      eval_every: 0 evaluates only at the end.
      checkpoints: an orbax manager; the `PPOState` is offered to it after each iteration.
      progress: show a tqdm bar.
      max_skipped_steps: stop after this many consecutive skipped (non-finite) updates.
      max_update_ratio: stop when an update's norm exceeds this fraction of the parameters'.
      **rollout_kwargs: `ppo_rollout`'s sampling and advantage options (sampling, decode,
        kl_kind, gamma, lam, whiten_advantages, missing_eos_penalty, value_config).

    Returns:
      (state, summary): summary `score` and `kl_coef` per iteration (lists, from the records),
      `final_eval` ({} without one), `rollout_seconds`, `update_seconds` (this call).

    Raises:
      NonFiniteError: non-finite scores, rewards, advantages or KL, `max_skipped_steps` skipped
        updates in a row, an update over `max_update_ratio`, or a non-finite state due to be
        checkpointed (iteration and field named).
    """
    per_iteration = epochs * num_minibatches
    if int(state.train.step) % per_iteration:
        raise ValueError(f"state step {int(state.train.step)} is not a multiple of epochs × minibatches = {per_iteration}")
    start = int(state.train.step) // per_iteration
    rng = _restart(writer, rng, start, "ppo")
    train, kl_coef = state.train, float(np.float32(state.kl_coef))
    final_eval, seconds = {}, {"rollout_seconds": 0.0, "update_seconds": 0.0}
    bar = tqdm(total=num_iterations, initial=start, desc="ppo", disable=not progress, leave=False)
    try:
        for it in range(start + 1, num_iterations + 1):
            tokens, mask = prompts_at(it)
            rng, key = jax.random.split(rng)
            t0 = time.perf_counter()
            output = ppo_rollout(
                policy_fn(train), config, tokens, mask, ref_params=ref_params, score_fn=score_fn, rng=key,
                kl_coef=kl_coef, **rollout_kwargs,
            )
            rollout, roll = output.batch, output.metrics
            extra = dict(rollout_metrics(output)) if rollout_metrics is not None else {}
            check_finite_rollout(
                {"scores": rollout.scores, "rewards": rollout.rewards, "advantages": rollout.advantages, **roll},
                stage="ppo", iteration=it,
            )
            t1 = time.perf_counter()
            train, upd = ppo_update(
                step_fn, train, rollout, epochs=epochs, num_minibatches=num_minibatches, seed=it, step_args=step_args,
                ptx_batch_at=ptx_batch_at,
            )
            timing = {"rollout_seconds": t1 - t0, "update_seconds": time.perf_counter() - t1}
            for k, v in timing.items():
                seconds[k] += v
            writer.write(it, {**roll, **upd, **extra, **timing}, stage="ppo")
            check_update_ratio(upd, stage="ppo", step=it, max_update_ratio=max_update_ratio)  # the cause first
            check_skipped(upd, stage="ppo", step=it, max_skipped_steps=max_skipped_steps)
            if kl_target is not None:  # float32, as checkpointed: a resumed run continues with the same β
                kl_coef = float(np.float32(
                    adaptive_kl_coef(kl_coef, roll["kl"], tokens.shape[0], target=kl_target, horizon=kl_horizon)
                ))
            if eval_fn is not None and ((eval_every and it % eval_every == 0) or it == num_iterations):
                final_eval = dict(eval_fn(policy_fn(train)))
                writer.write(it, final_eval, stage="ppo_eval")
            _save(checkpoints, it, PPOState(train, jnp.float32(kl_coef)), final=it == num_iterations, stage="ppo")
            bar.set_postfix(score=f"{roll['score']:.3f}")
            bar.update(1)
    finally:  # a stopped run still commits the checkpoints it started
        bar.close()
        if checkpoints is not None:
            checkpoints.wait_until_finished()
    records = [r for r in read_metrics(writer.path) if r["stage"] == "ppo"]
    summary = {
        "score": [r["score"] for r in records],
        "kl_coef": [r["kl_coef"] for r in records],
        "final_eval": final_eval,
        **seconds,
    }
    return PPOState(train, jnp.float32(kl_coef)), summary


__all__ = [
    "PPOState",
    "PolicyFn",
    "PromptsAt",
    "check_finite_rollout",
    "evaluate_policy",  # re-exported from jaxalign.rollout, where it moved
    "grpo_loop",
    "ppo_loop",
]
