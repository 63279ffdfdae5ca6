"""Orbax checkpoints of a `TrainState`: save every N steps, keep K, resume from the latest.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoints intact and never a half-written "latest". A state with
a non-finite float anywhere is never saved (`save_checkpoint` raises `NonFiniteError`), so a
diverged run cannot rotate its last good checkpoint away.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


class NonFiniteError(FloatingPointError):
    """A run diverged and must not continue: NaN/inf parameters or rewards, repeated skipped
    (non-finite) updates, or an update larger than the parameters themselves. The message names
    the stage, step and tensor or metric."""


def first_nonfinite(tree: Any) -> str | None:
    """Key path (e.g. `"['params']['layers_0']['attn']['wq']['kernel']"`) of the first floating
    leaf of `tree` holding a NaN or inf, or None when every float is finite. One fused reduction
    per leaf, fetched from the device together."""
    leaves = [
        (path, x)
        for path, x in jax.tree_util.tree_leaves_with_path(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    finite = jax.device_get([jnp.all(jnp.isfinite(x)) for _, x in leaves])
    for (path, _), ok in zip(leaves, finite):
        if not bool(np.asarray(ok)):
            return jax.tree_util.keystr(path)
    return None


def make_checkpoint_manager(
    directory: str | os.PathLike, *, save_every: int, keep: int | None = 3
) -> ocp.CheckpointManager:
    """A `CheckpointManager` saving a pytree every `save_every` steps and keeping the last `keep`.

    Args:
      directory: created if missing (made absolute: orbax requires it).
      save_every: steps between checkpoints (`save(..., force=True)` saves off-schedule).
      keep: number of most recent checkpoints kept (None keeps all).

    Raises:
      ValueError: save_every < 1.
    """
    if save_every < 1:
        raise ValueError(f"save_every must be >= 1, got {save_every}")
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every, max_to_keep=keep, create=True
    )
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save_checkpoint(
    manager: ocp.CheckpointManager, step: int, state: Any, *, force: bool = False
) -> bool:
    """Saves `state` (any pytree of arrays) at `step` if the interval says so or `force`.

    Returns whether a save was started (orbax finishes it in the background; call
    `manager.wait_until_finished()` before exiting).

    Raises:
      NonFiniteError: the state due to be saved holds a NaN or inf (naming the step and the
        first such tensor); nothing is written, earlier checkpoints stay.
    """
    if not (force or manager.should_save(step)):
        return False
    if (bad := first_nonfinite(state)) is not None:
        raise NonFiniteError(
            f"refusing to save checkpoint step {step} to {manager.directory}: {bad} is not finite"
        )
    return manager.save(step, args=ocp.args.StandardSave(state), force=force)


def restore_checkpoint(
    manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None
) -> Any | None:
    """Restores the checkpoint at `step` (default: the latest) into the structure, shapes, dtypes
    and shardings of `abstract_state` (a pytree of arrays or `jax.ShapeDtypeStruct`s).

    Returns None when the directory holds no checkpoint.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
