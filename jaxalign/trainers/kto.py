"""KTO's train step: `kto_loss` on a `collate_kto` batch (desirable, undesirable and mismatched
completions), the policy and the frozen reference each scoring all three in one forward pass."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxalign.logprobs import HEAD_CHUNK_TOKENS
from jaxalign.lora import LoraConfig
from jaxalign.losses.kto import kto_loss
from jaxalign.models.config import TransformerConfig
from jaxalign.prefix import PrefixConfig
from jaxalign.scoring import row_logps
from jaxalign.trainers.sft import (
    ROUTER_AUX_LOSS_COEF,
    ROUTER_Z_LOSS_COEF,
    check_router_loss_coefs,
    right_padded_real,
    with_router_losses,
)
from jaxalign.trainers.step import Batch, Metrics, StepShardings, make_train_step

_SIDES = ("chosen", "rejected", "kl")


def kto_logps(
    params,
    config: TransformerConfig,
    batch: Batch,
    dropout_rng: jax.Array | None = None,
    *,
    head_chunk: int | None = HEAD_CHUNK_TOKENS,
    return_router_stats: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array] | tuple[jax.Array, jax.Array, jax.Array, tuple]:
    """Summed completion log-probs of the three sides of a `collate_kto` batch, in one [3B, L]
    forward pass.

    Args:
      params, config: the model.
      batch: `{side}_tokens` int32 [B, L] and `{side}_mask` float32 [B, L] for side in chosen,
        rejected, kl (1.0 on completion tokens).
      dropout_rng: key enabling dropout, or None.
      head_chunk: tokens per chunk of the fused output head (`jaxalign.scoring.row_logps`);
        None: the unfused reference.
      return_router_stats: also return the pass's MoE `RouterStats` over [3B, L-1] (sides in
        the order chosen, rejected, kl; () for a dense model).

    Returns:
      (chosen, rejected, kl) float32 [B] each, nats; with `return_router_stats`, a fourth
      element, the router stats.
    """
    tokens = jnp.concatenate([batch[f"{s}_tokens"] for s in _SIDES])  # [3B,L]
    mask = jnp.concatenate([batch[f"{s}_mask"] for s in _SIDES])  # [3B,L]
    seq, router = row_logps(
        params, config, tokens, mask, dropout_rng=dropout_rng, head_chunk=head_chunk, return_router_stats=True
    )  # [3B]
    sides = tuple(jnp.split(seq, 3))
    return (*sides, router) if return_router_stats else sides


def kto_batch_loss(
    params,
    config: TransformerConfig,
    batch: Batch,
    dropout_rng: jax.Array | None,
    ref_params,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    head_chunk: int | None = HEAD_CHUNK_TOKENS,
    router_aux_loss_coef: float = ROUTER_AUX_LOSS_COEF,
    router_z_loss_coef: float = ROUTER_Z_LOSS_COEF,
) -> tuple[jax.Array, Metrics]:
    """KTO loss of the policy on a `collate_kto` batch, the reference under `stop_gradient`.

    Filler rows (an all-zero chosen mask) take part in no term. Each real pair contributes one
    desirable and one undesirable example (TRL's `unpair_preference_dataset` view of paired
    data), so λ_D = λ_U = 1 meets TRL's balance rule.

    `head_chunk` as in `kto_logps`. For an MoE policy the loss adds `router_aux_loss_coef`·L_aux +
    `router_z_loss_coef`·L_z over the real tokens of all three sides' [3B, L] pass
    (`jaxalign.trainers.sft.with_router_losses`; the reference adds none).

    Returns:
      `kto_loss`'s (loss, metrics), plus `aux_loss` and `z_loss` for an MoE policy.

    Raises:
      ValueError: a negative router loss coefficient.
    """
    check_router_loss_coefs(router_aux_loss_coef, router_z_loss_coef)
    real = jnp.sum(batch["chosen_mask"], axis=-1) > 0  # [B]
    chosen, rejected, kl, router = kto_logps(
        params, config, batch, dropout_rng, head_chunk=head_chunk, return_router_stats=True
    )
    ref_chosen, ref_rejected, ref_kl = jax.lax.stop_gradient(kto_logps(ref_params, config, batch, head_chunk=head_chunk))
    loss, metrics = kto_loss(
        chosen, rejected, kl, ref_chosen, ref_rejected, ref_kl,
        beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        chosen_where=real, rejected_where=real, kl_where=real,
    )
    mask = jnp.concatenate([batch[f"{s}_mask"] for s in _SIDES])  # [3B,L]
    return with_router_losses(
        loss, metrics, router, right_padded_real(mask[:, 1:]), router_aux_loss_coef=router_aux_loss_coef,
        router_z_loss_coef=router_z_loss_coef,
    )


def make_kto_step(
    config: TransformerConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    head_chunk: int | None = HEAD_CHUNK_TOKENS,
    router_aux_loss_coef: float = ROUTER_AUX_LOSS_COEF,
    router_z_loss_coef: float = ROUTER_Z_LOSS_COEF,
    dropout: bool = True,
    lora: LoraConfig | None = None,
    prefix: PrefixConfig | None = None,
    shardings: StepShardings | None = None,
) -> Callable:
    """jit-compiled KTO step `step(state, batch, ref_params) -> (state, metrics)` on
    `jaxalign.data.collate_kto` batches.

    Metrics: loss, kl (z₀), chosen/rejected rewards, reward_margin, num_chosen, num_rejected,
    grad_norm, learning_rate (and `make_train_step`'s). With `lora` the step is
    `step(state, batch, base_params, ref_params)` (the base itself can be the reference).
    `prefix` (`jaxalign.prefix.PrefixConfig`) trains a prefix-tuning prefix of the frozen params
    instead, the way `lora` trains adapters (`make_train_step`). `head_chunk`: tokens per chunk
    of the fused output head (None: the unfused reference). MoE policies: the loss adds
    `router_aux_loss_coef` (0.001) × L_aux + `router_z_loss_coef` (0) × L_z, metrics `aux_loss`,
    `z_loss` (`kto_batch_loss`).

    Raises:
      ValueError: a negative router loss coefficient.
    """
    check_router_loss_coefs(router_aux_loss_coef, router_z_loss_coef)

    def loss_fn(params, batch, dropout_rng, ref_params):
        return kto_batch_loss(
            params, config, batch, dropout_rng, ref_params, beta=beta,
            desirable_weight=desirable_weight, undesirable_weight=undesirable_weight, head_chunk=head_chunk,
            router_aux_loss_coef=router_aux_loss_coef, router_z_loss_coef=router_z_loss_coef,
        )

    return make_train_step(loss_fn, tx, schedule, config=config, dropout=dropout, lora=lora, prefix=prefix, shardings=shardings)
