"""The training loop shared by every trainer: steps, periodic evaluation, logging, checkpoints.

The loop is deliberately thin: the compiled step does the work, the data is a function of the step
index (`batch_at(step)`), so a run restored from a checkpoint at step s continues with exactly
the batches and PRNG keys it would have seen.

Divergence: the optimizer skips an update whose gradients are not finite (`make_optimizer`'s
`apply_if_finite`); the loop stops the run with `NonFiniteError` (naming stage, step and the
first non-finite metric) once `max_skipped_steps` updates in a row were skipped, or as soon as an
update is larger than the weights (`update_ratio` > `max_update_ratio`, a learning rate far too
large while every number is still finite), before that state is checkpointed; and
`save_checkpoint` refuses a non-finite state, so the last checkpoint on disk is a good one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from jaxalign.checkpoint import NonFiniteError, save_checkpoint
from jaxalign.metrics import MetricsWriter
from jaxalign.trainers.state import TrainState


def first_nonfinite_metric(metrics: Mapping[str, Any]) -> str:
    """`"name=value"` of the first non-finite float metric (the loss first, then in order), or
    "none" when all are finite (the gradients alone were non-finite)."""
    names = sorted(metrics, key=lambda k: (k != "loss", k != "grad_norm"))
    for k in names:
        v = np.asarray(metrics[k])
        if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v)):
            return f"{k}={v.tolist()}"
    return "none"


def check_update_ratio(
    metrics: Mapping[str, Any], *, stage: str, step: int, max_update_ratio: float | None
) -> None:
    """Raises `NonFiniteError` when the step's `update_ratio` (‖update‖ / ‖params‖) exceeds
    `max_update_ratio`: an update larger than the weights themselves is a diverged run (a
    learning rate orders of magnitude too large), even while every number is still finite."""
    if max_update_ratio is None or "update_ratio" not in metrics:
        return
    ratio = float(np.asarray(metrics["update_ratio"]))
    if not ratio <= max_update_ratio:  # NaN too
        raise NonFiniteError(
            f"{stage}: step {step}: update_ratio={ratio:.3g} > max_update_ratio={max_update_ratio:g} "
            "(the update's norm exceeds the parameters'): the run diverged; stopping before the "
            "state is checkpointed. Lower the learning rate."
        )


def check_skipped(metrics: Mapping[str, Any], *, stage: str, step: int, max_skipped_steps: int) -> None:
    """Raises `NonFiniteError` when the step's `consecutive_skipped` count (from
    `jaxalign.optim.nonfinite_metrics`) has reached `max_skipped_steps`; no-op without it."""
    if "consecutive_skipped" not in metrics:
        return
    skipped = int(np.asarray(metrics["consecutive_skipped"]))
    if skipped >= max_skipped_steps:
        raise NonFiniteError(
            f"{stage}: step {step}: {skipped} consecutive updates skipped because their gradients "
            f"were not finite (first non-finite metric: {first_nonfinite_metric(metrics)}); stopping. "
            "The parameters were left at their last finite values and no non-finite checkpoint was "
            "written; lower the learning rate or check the data."
        )


def count_tokens(batch: Mapping[str, Any]) -> int:
    """Token positions a step processes: the total size of every `*tokens` array in the batch."""
    return int(sum(np.size(v) for k, v in batch.items() if k.endswith("tokens")))


def train_loop(
    step_fn: Callable[..., tuple[TrainState, dict]],
    state: TrainState,
    batch_at: Callable[[int], Mapping[str, Any]],
    *,
    num_steps: int,
    stage: str,
    writer: MetricsWriter,
    extra_args: tuple = (),
    eval_fn: Callable[[Any], Mapping[str, float]] | None = None,
    eval_every: int = 0,
    log_every: int = 10,
    checkpoints: ocp.CheckpointManager | None = None,
    progress: bool = True,
    max_skipped_steps: int = 3,
    max_update_ratio: float | None = 1.0,
    initial_eval: Mapping[str, float] | None = None,
) -> tuple[TrainState, dict[str, float]]:
    """Runs `step_fn` from `state.step` up to `num_steps`.

    A state restored from a checkpoint continues exactly: the batches are `batch_at(step)`, the
    dropout keys come from `state.rng`, and the records of `stage` and f"{stage}_eval" that the
    writer holds beyond `state.step` (logged by a run killed before it could checkpoint them)
    are dropped first, so every step is logged once.

    Args:
      step_fn: jit-compiled `step(state, batch, *extra_args) -> (state, metrics)`.
      state: initial or restored `TrainState`; the loop starts at its `step`.
      batch_at: the batch of a global step index (deterministic, see `jaxalign.data`).
      num_steps: total steps of this stage.
      stage: name written with each record ("sft", "dpo", ...); eval records use f"{stage}_eval".
      writer: the run's `MetricsWriter`.
      extra_args: extra step arguments (e.g. `(ref_params,)` for DPO).
      eval_fn: `eval_fn(params) -> dict of floats`, run every `eval_every` steps and at the end.
      eval_every: 0 evaluates only at the end.
      log_every: steps between training records (metrics are fetched from the device only then,
        so steps in between dispatch asynchronously).
      checkpoints: an orbax manager; the state is offered to it after every step (it saves on
        its interval) and saved unconditionally at the end.
      progress: show a tqdm progress bar.
      max_skipped_steps: stop after this many consecutive updates skipped for non-finite
        gradients. The count is read one step late (so the device keeps a step queued), and the
        step that reaches it is logged before the error.
      max_update_ratio: stop when a step's update is larger than this fraction of the parameters
        (global L2 norms; healthy runs sit near 1e-3); None disables the check.
      initial_eval: the evaluation of the initial params, logged as the f"{stage}_eval" record
        of step 0 when the loop starts at step 0.

    Returns:
      (state, summary): the final state and `{"tokens_per_s", "steps_per_s", "final_eval": ...}`;
      throughput excludes the first step of the call (compilation).

    Raises:
      NonFiniteError: `max_skipped_steps` consecutive skipped updates, an update over
        `max_update_ratio`, or a non-finite state due to be checkpointed.
    """
    if max_skipped_steps < 1:
        raise ValueError(f"max_skipped_steps must be >= 1, got {max_skipped_steps}")
    start = int(state.step)
    writer.truncate_after(start, stage=stage)
    writer.truncate_after(start if start else -1, stage=f"{stage}_eval")
    if initial_eval is not None and start == 0:
        writer.write(0, initial_eval, stage=f"{stage}_eval")
    eval_record: dict[str, float] = {}
    timed_tokens, timed_steps, t0, paused = 0, 0, None, 0.0
    bar = tqdm(total=num_steps, initial=start, desc=stage, disable=not progress, leave=False)
    previous = None  # (step, metrics) of the step before, checked once this one is queued

    def logged(done: int) -> bool:
        return done % log_every == 0 or done == num_steps

    def check(done: int, metrics) -> None:
        skipped = "consecutive_skipped" in metrics and int(metrics["consecutive_skipped"]) >= max_skipped_steps
        too_large = max_update_ratio is not None and "update_ratio" in metrics and not (
            float(metrics["update_ratio"]) <= max_update_ratio
        )
        if skipped or too_large:
            record = jax.device_get(metrics)
            if not logged(done):  # the step that stops the run is always in metrics.jsonl
                writer.write(done, record, stage=stage)
            check_update_ratio(record, stage=stage, step=done, max_update_ratio=max_update_ratio)  # the cause first
            check_skipped(record, stage=stage, step=done, max_skipped_steps=max_skipped_steps)

    try:
        for step in range(start, num_steps):
            batch = batch_at(step)
            state, metrics = step_fn(state, batch, *extra_args)
            if previous is not None:
                check(*previous)
            previous = (step + 1, metrics)
            if t0 is None:  # first step compiles: start the clock once it has finished
                jax.block_until_ready(metrics)
                t0 = time.perf_counter()
            else:
                timed_tokens += count_tokens(batch)
                timed_steps += 1
            done = step + 1
            if logged(done):
                record = jax.device_get(metrics)
                elapsed = time.perf_counter() - t0 - paused
                if timed_steps:
                    record["tokens_per_s"] = timed_tokens / elapsed
                writer.write(done, record, stage=stage)
                bar.set_postfix(loss=f"{float(record['loss']):.4f}")
            if eval_fn is not None and ((eval_every and done % eval_every == 0) or done == num_steps):
                jax.block_until_ready(state)  # charge pending steps to training, not to evaluation
                t_eval = time.perf_counter()
                eval_record = dict(eval_fn(state.params))
                writer.write(done, eval_record, stage=f"{stage}_eval")
                paused += time.perf_counter() - t_eval
            if checkpoints is not None:
                if done == num_steps or checkpoints.should_save(done):
                    check(done, metrics)  # a skipped run stops here rather than saving its last steps
                try:
                    save_checkpoint(checkpoints, done, state, force=done == num_steps)
                except NonFiniteError as e:
                    raise NonFiniteError(f"{stage}: step {done}: {e}") from e
            bar.update(1)
        if previous is not None:
            check(*previous)
    finally:  # a stopped run still commits the checkpoints it started
        bar.close()
        if checkpoints is not None:
            checkpoints.wait_until_finished()
    jax.block_until_ready(state)
    elapsed = (time.perf_counter() - t0 - paused) if t0 is not None else 0.0
    summary = {
        "tokens_per_s": timed_tokens / elapsed if timed_steps and elapsed > 0 else float("nan"),
        "steps_per_s": timed_steps / elapsed if timed_steps and elapsed > 0 else float("nan"),
        "final_eval": eval_record,
    }
    return state, summary
