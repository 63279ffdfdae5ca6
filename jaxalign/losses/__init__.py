"""Pure alignment losses: arrays in, `(loss, metrics)` out; no model calls."""

from jaxalign.losses.dpo import DPO_LOSSES, dpo_loss
from jaxalign.losses.grpo import grpo_denominator, grpo_loss
from jaxalign.losses.ppo import ppo_policy_loss, ppo_value_loss
from jaxalign.losses.reward import pairwise_reward_loss
from jaxalign.losses.sft import sft_loss

__all__ = [
    "DPO_LOSSES",
    "dpo_loss",
    "grpo_denominator",
    "grpo_loss",
    "pairwise_reward_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "sft_loss",
]
