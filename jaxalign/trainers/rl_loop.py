"""The RL outer loops and their evaluation: sample from the policy, score, optimise, repeat.

`grpo_loop` runs GRPO iterations (DeepSeekMath arXiv 2402.03300, Alg. 1): a `grpo_rollout` with
the current parameters, then μ calls of a `make_grpo_step` step on that rollout, logging each
iteration and evaluating every few. `ppo_loop` is its PPO twin (a `ppo_rollout`, `ppo_update`'s
epochs over minibatches, the adaptive KL controller). Both resume exactly from their own
checkpoints and stop on non-finite rollouts or repeatedly skipped updates. `evaluate_policy` samples completions of held-out prompts and
returns their rewards and, given a reference model, each completion's KL estimate, the two
numbers an RL-from-rules run reports before and after training.

Shapes: B prompts, S samples per prompt, P prompt length, N completion length.
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
from jaxalign.decoding import generate
from jaxalign.metrics import MetricsWriter, read_metrics
from jaxalign.models.config import TransformerConfig
from jaxalign.ops import masked_sum
from jaxalign.rollout import _jitted_completion_logps, decode_completions, grpo_rollout, ppo_rollout
from jaxalign.trainers.loop import check_skipped, check_update_ratio
from jaxalign.trainers.ppo import adaptive_kl_coef, ppo_update
from jaxalign.trainers.state import TrainState

# prompts_at(iteration) -> (prompt_tokens int32 [B,P] left-padded, prompt_mask [B,P], columns)
PromptsAt = Callable[[int], tuple[np.ndarray, np.ndarray, Mapping[str, Sequence[Any]]]]


class PolicySamples(NamedTuple):
    """Completions sampled from a policy, scored (host arrays, prompt-major: the S samples of
    prompt b are rows b·S … b·S + S − 1).

    Attributes:
      completions: B·S decoded completions (EOS dropped).
      rewards: float32 [B·S] from the reward function.
      kl: float32 [B·S] Σ_t (log π − log π_ref) over each completion (the k1 estimate of
        KL(π‖π_ref) of the whole sequence, in nats), or None without a reference.
      tokens: int32 [B·S, N] completion tokens (padding after EOS).
      lengths: int32 [B·S] completion lengths, EOS included.
    """

    completions: list[str]
    rewards: np.ndarray
    kl: np.ndarray | None
    tokens: np.ndarray
    lengths: np.ndarray


def evaluate_policy(
    params,
    config: TransformerConfig,
    prompt_tokens: np.ndarray,
    prompt_mask: np.ndarray,
    *,
    reward_fn: Callable[..., np.ndarray],
    decode: Callable[[Sequence[int]], str],
    rng: jax.Array,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    samples: int = 1,
    columns: Mapping[str, Sequence[Any]] | None = None,
    ref_params=None,
) -> PolicySamples:
    """Samples S completions per prompt, scores them, and measures their KL to a reference.

    With temperature 0 (greedy) use S = 1; at temperature > 0 the mean reward over S draws is the
    policy's expected reward (pass@1 for a 0/1 reward), what GRPO maximises. The KL is sampled
    from the policy itself, so it is an unbiased estimate of KL(π‖π_ref) only at temperature 1
    without top-k / top-p (otherwise it is the log-ratio under the truncated sampler).

    Args:
      params, config: the policy.
      prompt_tokens, prompt_mask: [B, P] left-padded prompts (`jaxalign.data.collate_prompts`).
      reward_fn: `reward_fn(completions, **columns) -> float32 [B·S]` (`jaxalign.rewards`).
      decode: token ids -> text.
      rng: PRNG key for sampling.
      max_new_tokens, eos_id, pad_id, temperature, top_k, top_p: as `generate`.
      samples: S >= 1.
      columns: per-prompt data (length B), repeated S times for the reward function.
      ref_params: the reference model (same config) for `kl`; None skips it.

    Returns:
      `PolicySamples`.

    Raises:
      ValueError: S < 1, or a reward of the wrong shape (and what `generate` raises).
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    b = prompt_tokens.shape[0]
    prompts = jnp.asarray(np.repeat(prompt_tokens, samples, axis=0))  # [B·S,P]
    masks = jnp.asarray(np.repeat(prompt_mask, samples, axis=0))  # [B·S,P]
    gen = generate(
        params, config, prompts, masks, max_new_tokens=max_new_tokens, rng=rng,
        temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id, pad_id=pad_id,
    )
    tokens, lengths = jax.device_get((gen.tokens, gen.lengths))
    completions = decode_completions(tokens, lengths, decode, eos_id)
    repeated = {k: [v for v in vals for _ in range(samples)] for k, vals in (columns or {}).items()}
    rewards = np.asarray(reward_fn(completions, **repeated), np.float32)
    if rewards.shape != (b * samples,):
        raise ValueError(f"reward_fn returned shape {rewards.shape}, expected ({b * samples},)")
    kl = None
    if ref_params is not None:
        ref_logps = _jitted_completion_logps(config)(
            ref_params, prompt_tokens=prompts, prompt_mask=masks, completion_tokens=gen.tokens
        )  # [B·S,N]
        kl = np.asarray(masked_sum(gen.model_logps - ref_logps, gen.mask, axis=-1), np.float32)
    return PolicySamples(completions, rewards, kl, np.asarray(tokens), np.asarray(lengths))


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
      step_fn: `make_grpo_step(...)`'s `step(state, rollout) -> (state, metrics)`.
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
      eval_fn: `eval_fn(params) -> dict of floats`, every `eval_every` iterations and at the end.
      eval_every: 0 evaluates only at the end.
      checkpoints: an orbax manager; the state is offered to it after each iteration (step = it)
        and saved at the end.
      progress: show a tqdm bar.
      max_skipped_steps: stop after this many consecutive optimiser steps skipped for
        non-finite gradients (`jaxalign.trainers.loop`).
      max_update_ratio: stop when an update's norm exceeds this fraction of the parameters'
        (`jaxalign.trainers.loop.check_update_ratio`); None disables it.
      **rollout_kwargs: `grpo_rollout`'s options (group_size, reward_fn, decode, max_new_tokens,
        eos_id, pad_id, temperature, top_k, top_p, scale, filter_zero_variance).

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
            rollout, roll_metrics, _ = grpo_rollout(
                state.params, config, tokens, mask, rng=key, ref_params=ref_params, columns=columns,
                **rollout_kwargs,
            )
            check_finite_rollout(
                {"rewards": rollout.rewards, "advantages": rollout.advantages, **roll_metrics}, stage="grpo", iteration=it
            )
            t1 = time.perf_counter()
            for _ in range(inner_steps):
                state, metrics = step_fn(state, rollout)
            record = {**jax.device_get(metrics), **roll_metrics}
            timing = {"rollout_seconds": t1 - t0, "update_seconds": time.perf_counter() - t1}
            for k, v in timing.items():
                seconds[k] += v
            writer.write(it, {**record, **timing}, stage="grpo")
            check_update_ratio(record, stage="grpo", step=it, max_update_ratio=max_update_ratio)
            check_skipped(record, stage="grpo", step=it, max_skipped_steps=max_skipped_steps)
            check_finite_rollout({"kl": record.get("kl", 0.0)}, stage="grpo", iteration=it)
            if eval_fn is not None and ((eval_every and it % eval_every == 0) or it == num_iterations):
                final_eval = dict(eval_fn(state.params))
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
      step_fn: `make_ppo_step(...)`'s `step(state, minibatch)`.
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
      rollout_metrics: optional `fn(rollout) -> dict of floats` logged with each iteration (e.g. a
        gold score of the decoded completions).
      eval_fn: `eval_fn(train_params) -> dict of floats`, every `eval_every` iterations and at the end.
      eval_every: 0 evaluates only at the end.
      checkpoints: an orbax manager; the `PPOState` is offered to it after each iteration.
      progress: show a tqdm bar.
      max_skipped_steps: stop after this many consecutive skipped (non-finite) updates.
      max_update_ratio: stop when an update's norm exceeds this fraction of the parameters'.
      **rollout_kwargs: `ppo_rollout`'s sampling and advantage options (max_new_tokens, eos_id,
        pad_id, temperature, top_k, top_p, kl_kind, gamma, lam, whiten_advantages,
        missing_eos_penalty, critic, value_config).

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
            rollout, roll = ppo_rollout(
                train.params, config, tokens, mask, ref_params=ref_params, score_fn=score_fn, rng=key,
                kl_coef=kl_coef, **rollout_kwargs,
            )
            extra = dict(rollout_metrics(rollout)) if rollout_metrics is not None else {}
            check_finite_rollout(
                {"scores": rollout.scores, "rewards": rollout.rewards, "advantages": rollout.advantages, **roll},
                stage="ppo", iteration=it,
            )
            t1 = time.perf_counter()
            train, upd = ppo_update(step_fn, train, rollout, epochs=epochs, num_minibatches=num_minibatches, seed=it)
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
                final_eval = dict(eval_fn(train.params))
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
