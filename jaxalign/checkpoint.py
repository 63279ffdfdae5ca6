"""Orbax checkpoints of a `TrainState`: save every N steps, keep K, resume from the latest.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoints intact and never a half-written "latest".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


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
    """
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
