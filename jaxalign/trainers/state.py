"""Moved to `jaxalign.trainers.step` (the train state and the one step builder); this module
re-exports its names for one release."""

from jaxalign.trainers.step import Batch, LossFn, Metrics, TrainState, create_train_state, make_train_step

__all__ = ["Batch", "LossFn", "Metrics", "TrainState", "create_train_state", "make_train_step"]
