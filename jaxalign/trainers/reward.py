"""Reward-model training (Bradley–Terry on preference pairs) and evaluation.

The batch is a preference batch from `jaxalign.data.collate_preference`: `chosen_tokens`,
`rejected_tokens` int32 [B, T] right-padded, `chosen_mask`, `rejected_mask` float32 [B, T]
(1.0 on response tokens incl. EOS), optionally `margin` float32 [B]. Both sides go through one
[2B, T] forward pass; the params are `jaxalign.models.heads.init_scalar_model`'s
`{"backbone", "head"}`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from jaxalign.lora import LoraConfig
from jaxalign.losses.reward import pairwise_reward_loss
from jaxalign.models.config import TransformerConfig
from jaxalign.models.heads import apply_scalar_head, pool_scores
from jaxalign.models.transformer import forward
from jaxalign.ops import masked_count, masked_sum, select
from jaxalign.trainers.sft import (
    ROUTER_AUX_LOSS_COEF,
    ROUTER_Z_LOSS_COEF,
    check_router_loss_coefs,
    right_padded_real,
    with_router_losses,
)
from jaxalign.trainers.step import Batch, Metrics, StepShardings, make_train_step


def pair_scores(
    params,
    config: TransformerConfig,
    batch: Batch,
    dropout_rng: jax.Array | None = None,
    *,
    pool: Literal["last", "mean"] = "last",
    return_router_stats: bool = False,
) -> tuple[jax.Array, jax.Array] | tuple[jax.Array, jax.Array, tuple]:
    """(chosen_rewards [B], rejected_rewards [B]) float32 from one [2B, T] forward pass
    (`jaxalign.models.heads.sequence_scores`, written out to keep the trunk's router stats);
    with `return_router_stats`, a third element: the trunk's MoE `RouterStats` over [2B, T]
    (chosen rows first; () for a dense trunk)."""
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])  # [2B,T]
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])  # [2B,T]
    hidden, router = forward(
        params["backbone"], config, tokens, dropout_rng=dropout_rng, return_hidden=True, return_router_stats=True
    )  # [2B,T,D]
    scores = pool_scores(apply_scalar_head(params["head"], hidden), mask, pool=pool)  # [2B]
    b = batch["chosen_tokens"].shape[0]
    return (scores[:b], scores[b:], router) if return_router_stats else (scores[:b], scores[b:])


def reward_batch_loss(
    params,
    config: TransformerConfig,
    batch: Batch,
    dropout_rng: jax.Array | None = None,
    *,
    pool: Literal["last", "mean"] = "last",
    center_coef: float = 0.0,
    router_aux_loss_coef: float = ROUTER_AUX_LOSS_COEF,
    router_z_loss_coef: float = ROUTER_Z_LOSS_COEF,
) -> tuple[jax.Array, Metrics]:
    """`pairwise_reward_loss` of the reward model on a preference batch.

    Filler rows of a static-shape batch (all-zero `chosen_mask`) are excluded; a `margin` [B] key
    in the batch is passed on as Llama 2's margin. For an MoE trunk the loss adds
    `router_aux_loss_coef`·L_aux + `router_z_loss_coef`·L_z over the real tokens of the [2B, T]
    pass (each row up to its last response token; `jaxalign.trainers.sft.with_router_losses`)
    and the metrics `aux_loss`, `z_loss`.

    Raises:
      ValueError: a negative router loss coefficient.
    """
    check_router_loss_coefs(router_aux_loss_coef, router_z_loss_coef)
    chosen, rejected, router = pair_scores(params, config, batch, dropout_rng, pool=pool, return_router_stats=True)
    loss, metrics = pairwise_reward_loss(
        chosen,
        rejected,
        margin=batch.get("margin"),
        center_coef=center_coef,
        where=jnp.sum(batch["chosen_mask"], axis=-1) > 0,
    )
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])  # [2B,T]
    return with_router_losses(
        loss, metrics, router, right_padded_real(mask), router_aux_loss_coef=router_aux_loss_coef,
        router_z_loss_coef=router_z_loss_coef,
    )


def make_reward_step(
    config: TransformerConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    pool: Literal["last", "mean"] = "last",
    center_coef: float = 0.0,
    router_aux_loss_coef: float = ROUTER_AUX_LOSS_COEF,
    router_z_loss_coef: float = ROUTER_Z_LOSS_COEF,
    dropout: bool = True,
    lora: LoraConfig | None = None,
    shardings: StepShardings | None = None,
) -> Callable:
    """jit-compiled `step(state, batch) -> (state, metrics)` minimising `reward_batch_loss`.

    Metrics: loss, accuracy, margin, chosen/rejected_rewards (and `make_train_step`'s). With
    `lora`, the state's params are adapters of the `{"backbone", "head"}` tree and the step is
    `step(state, batch, base_params)`; train the fresh head in full with
    `LoraConfig(trainable=("head",))` (PEFT's `modules_to_save`, as TRL's reward trainer does
    with a peft config). `shardings`: `params_step_shardings(...,
    jaxalign.scoring.scalar_model_shardings(config, mesh), ...)`. For an MoE trunk the loss adds
    `router_aux_loss_coef` (0.001) × L_aux + `router_z_loss_coef` (0) × L_z and the metrics
    `aux_loss`, `z_loss` (`reward_batch_loss`).

    Raises:
      ValueError: a negative router loss coefficient.
    """
    check_router_loss_coefs(router_aux_loss_coef, router_z_loss_coef)

    def loss_fn(params, batch, dropout_rng):
        return reward_batch_loss(
            params, config, batch, dropout_rng, pool=pool, center_coef=center_coef,
            router_aux_loss_coef=router_aux_loss_coef, router_z_loss_coef=router_z_loss_coef,
        )

    return make_train_step(
        loss_fn, tx, schedule, config=config, dropout=dropout, lora=lora, shardings=shardings
    )


def make_reward_eval_step(config: TransformerConfig, *, pool: Literal["last", "mean"] = "last") -> Callable:
    """jit-compiled `eval_step(params, batch) -> metrics` (sums, for exact means over batches):
    `pairs`, `correct` (r_c > r_r), `margin_sum`, `loss_sum` (−log σ(r_c − r_r))."""

    @jax.jit
    def eval_step(params, batch):
        chosen, rejected = pair_scores(params, config, batch, pool=pool)
        real = jnp.sum(batch["chosen_mask"], axis=-1) > 0  # [B]: padding pairs have empty masks
        diff = select(real, chosen - rejected)
        return {
            "pairs": masked_count(real),
            "correct": masked_count(real & (diff > 0)),
            "margin_sum": masked_sum(diff, real),
            "loss_sum": masked_sum(-jax.nn.log_sigmoid(diff), real),
        }

    return eval_step


def evaluate_reward_model(eval_step: Callable, params, batches) -> dict[str, float]:
    """Held-out `accuracy`, `margin` and `loss` (exact means over every real pair of `batches`)."""
    totals: dict[str, float] = {}
    for batch in batches:
        for k, v in jax.device_get(eval_step(params, batch)).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    n = max(totals.get("pairs", 0.0), 1.0)
    return {
        "accuracy": totals["correct"] / n,
        "margin": totals["margin_sum"] / n,
        "loss": totals["loss_sum"] / n,
        "pairs": totals["pairs"],
    }
