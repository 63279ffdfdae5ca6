"""Trainers: jit-compiled steps composed from pure losses, and the loop that drives them."""

from jaxalign.trainers.dpo import (
    dpo_batch_loss,
    make_dpo_step,
    make_pair_logps_fn,
    pair_logps,
    reference_logps,
)
from jaxalign.trainers.grpo import grpo_batch_loss, make_grpo_step
from jaxalign.trainers.ppo import adaptive_kl_coef, make_ppo_step, ppo_batch_loss, ppo_update
from jaxalign.trainers.reward import (
    evaluate_reward_model,
    make_reward_eval_step,
    make_reward_step,
    pair_scores,
    reward_batch_loss,
)
from jaxalign.trainers.loop import count_tokens, train_loop
from jaxalign.trainers.rl_loop import PolicySamples, evaluate_policy, grpo_loop
from jaxalign.trainers.sft import make_sft_eval_step, make_sft_step, sft_batch_loss
from jaxalign.trainers.state import TrainState, create_train_state, make_train_step

__all__ = [
    "PolicySamples",
    "TrainState",
    "adaptive_kl_coef",
    "evaluate_reward_model",
    "make_ppo_step",
    "make_reward_eval_step",
    "make_reward_step",
    "pair_scores",
    "ppo_batch_loss",
    "ppo_update",
    "reward_batch_loss",
    "count_tokens",
    "create_train_state",
    "dpo_batch_loss",
    "evaluate_policy",
    "grpo_batch_loss",
    "grpo_loop",
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
