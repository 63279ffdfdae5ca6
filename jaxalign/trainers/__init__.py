"""Trainers: jit-compiled steps composed from pure losses, and the loop that drives them."""

from jaxalign.trainers.dpo import (
    dpo_batch_loss,
    make_dpo_step,
    make_pair_logps_fn,
    pair_logps,
    reference_logps,
)
from jaxalign.trainers.grpo import grpo_batch_loss, make_grpo_step
from jaxalign.trainers.loop import count_tokens, train_loop
from jaxalign.trainers.sft import make_sft_eval_step, make_sft_step, sft_batch_loss
from jaxalign.trainers.state import TrainState, create_train_state, make_train_step

__all__ = [
    "TrainState",
    "count_tokens",
    "create_train_state",
    "dpo_batch_loss",
    "grpo_batch_loss",
    "make_dpo_step",
    "make_grpo_step",
    "make_pair_logps_fn",
    "make_sft_eval_step",
    "make_sft_step",
    "make_train_step",
    "pair_logps",
    "reference_logps",
    "sft_batch_loss",
    "train_loop",
]
