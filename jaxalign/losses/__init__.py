"""Pure alignment losses: arrays in, `(loss, metrics)` out; no model calls."""

from jaxalign.losses.distill import (
    align_vocab,
    generalized_jsd_loss,
    kd_loss,
    on_policy_distill_advantages,
    token_divergence,
)
from jaxalign.losses.dpo import (
    DPO_LOSSES,
    LENGTH_NORMALISED_LOSSES,
    SORTED_LOSSES,
    DPOHyperparams,
    RewardBaseline,
    bco_pair_loss,
    dpo_loss,
    init_reward_baseline,
)
from jaxalign.losses.grpo import grpo_denominator, grpo_loss
from jaxalign.losses.kto import (
    kto_loss,
)
from jaxalign.losses.moe import (
    expert_bias_update,
    load_balancing_loss,
    router_z_loss,
    routing_change_fraction,
    sequence_balance_loss,
)
from jaxalign.losses.ppo import ppo_policy_loss, ppo_value_loss
from jaxalign.losses.preference import (
    orpo_loss,
    simpo_loss,
)
from jaxalign.losses.reward import pairwise_reward_loss
from jaxalign.losses.sft import sft_loss, sft_token_loss

__all__ = [
    "DPOHyperparams",
    "DPO_LOSSES",
    "LENGTH_NORMALISED_LOSSES",
    "RewardBaseline",
    "SORTED_LOSSES",
    "align_vocab",
    "bco_pair_loss",
    "dpo_loss",
    "expert_bias_update",
    "generalized_jsd_loss",
    "grpo_denominator",
    "grpo_loss",
    "init_reward_baseline",
    "kd_loss",
    "kto_loss",
    "load_balancing_loss",
    "on_policy_distill_advantages",
    "orpo_loss",
    "pairwise_reward_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "router_z_loss",
    "routing_change_fraction",
    "sequence_balance_loss",
    "sft_loss",
    "sft_token_loss",
    "simpo_loss",
    "token_divergence",
]
