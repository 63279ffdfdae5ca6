"""Trainers: jit-compiled steps composed from pure losses (one step builder, `step.py`), and the
loops that drive them (`loop.py` for supervised stages, `rl_loop.py` for GRPO and PPO)."""

from jaxalign.rollout import evaluate_policy
from jaxalign.trainers.distill import (
    distill_batch_loss,
    make_distill_step,
)
from jaxalign.trainers.dpo import (
    PREFERENCE_LOSS_TYPES,
    REFERENCE_FREE_LOSSES,
    completion_lengths,
    dpo_batch_loss,
    make_dpo_step,
    make_pair_logps_fn,
    orpo_batch_loss,
    pair_logps,
    preference_loss_fn,
    reference_logps,
    simpo_batch_loss,
    uses_average_logps,
)
from jaxalign.trainers.grpo import grpo_batch_loss, make_grpo_step
from jaxalign.trainers.kto import kto_batch_loss, kto_logps, make_kto_step
from jaxalign.trainers.loop import count_tokens, train_loop
from jaxalign.trainers.ppo import (
    PPOPtxBatch,
    adaptive_kl_coef,
    make_ppo_step,
    ppo_batch_loss,
    ppo_update,
)
from jaxalign.trainers.reward import (
    evaluate_reward_model,
    make_reward_eval_step,
    make_reward_step,
    pair_scores,
    reward_batch_loss,
)
from jaxalign.trainers.rl_loop import PolicyFn, PPOState, PromptsAt, grpo_loop, ppo_loop
from jaxalign.trainers.sft import (
    ROUTER_AUX_LOSS_COEF,
    ROUTER_Z_LOSS_COEF,
    make_sft_eval_step,
    make_sft_step,
    router_aux_loss,
    router_losses,
    sft_batch_loss,
    with_router_losses,
)
from jaxalign.trainers.step import (
    StepShardings,
    TrainState,
    create_train_state,
    make_train_step,
    params_step_shardings,
    step_shardings,
    train_state_shardings,
)

__all__ = [
    "PPOPtxBatch",
    "PPOState",
    "PREFERENCE_LOSS_TYPES",
    "PolicyFn",
    "PromptsAt",
    "REFERENCE_FREE_LOSSES",
    "ROUTER_AUX_LOSS_COEF",
    "ROUTER_Z_LOSS_COEF",
    "StepShardings",
    "TrainState",
    "adaptive_kl_coef",
    "completion_lengths",
    "count_tokens",
    "create_train_state",
    "distill_batch_loss",
    "dpo_batch_loss",
    "evaluate_policy",
    "evaluate_reward_model",
    "grpo_batch_loss",
    "grpo_loop",
    "kto_batch_loss",
    "kto_logps",
    "make_distill_step",
    "make_dpo_step",
    "make_grpo_step",
    "make_kto_step",
    "make_pair_logps_fn",
    "make_ppo_step",
    "make_reward_eval_step",
    "make_reward_step",
    "make_sft_eval_step",
    "make_sft_step",
    "make_train_step",
    "orpo_batch_loss",
    "pair_logps",
    "pair_scores",
    "params_step_shardings",
    "ppo_batch_loss",
    "ppo_loop",
    "ppo_update",
    "preference_loss_fn",
    "reference_logps",
    "reward_batch_loss",
    "router_aux_loss",
    "router_losses",
    "sft_batch_loss",
    "simpo_batch_loss",
    "step_shardings",
    "train_loop",
    "train_state_shardings",
    "uses_average_logps",
    "with_router_losses",
]
