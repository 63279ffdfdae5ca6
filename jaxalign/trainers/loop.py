"""The training loop shared by every trainer: steps, periodic evaluation, logging, checkpoints.

The loop is deliberately thin: the compiled step does the work, the data is a function of the step
index (`batch_at(step)`), so a run restored from a checkpoint at step s continues with exactly
the batches and PRNG keys it would have seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from jaxalign.checkpoint import save_checkpoint
from jaxalign.metrics import MetricsWriter
from jaxalign.trainers.state import TrainState


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
) -> tuple[TrainState, dict[str, float]]:
    """Runs `step_fn` from `state.step` up to `num_steps`.

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

    Returns:
      (state, summary): the final state and `{"tokens_per_s", "steps_per_s", "final_eval": ...}`;
      throughput excludes the first step of the call (compilation).
    """
    start = int(state.step)
    eval_record: dict[str, float] = {}
    timed_tokens, timed_steps, t0, paused = 0, 0, None, 0.0
    bar = tqdm(total=num_steps, initial=start, desc=stage, disable=not progress, leave=False)
    for step in range(start, num_steps):
        batch = batch_at(step)
        state, metrics = step_fn(state, batch, *extra_args)
        if t0 is None:  # first step compiles: start the clock once it has finished
            jax.block_until_ready(metrics)
            t0 = time.perf_counter()
        else:
            timed_tokens += count_tokens(batch)
            timed_steps += 1
        done = step + 1
        if done % log_every == 0 or done == num_steps:
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
            save_checkpoint(checkpoints, done, state, force=done == num_steps)
        bar.update(1)
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
