"""Preference training: completion log-probs of chosen/rejected pairs, reference log-probs, step.

One step builder, `make_dpo_step`, for every preference loss type (`PREFERENCE_LOSS_TYPES`): the
DPO family of `jaxalign.losses.dpo` (`dpo_batch_loss`), and the reference-free SimPO and ORPO of
`jaxalign.losses.preference` (`simpo_batch_loss`, `orpo_batch_loss`), which skip the reference.
The reference model's log-probs come either precomputed once over the dataset (batch keys
`ref_chosen_logps`, `ref_rejected_logps`; TRL's `precompute_ref_log_probs=True`) or from frozen
reference params passed to every step (`ref_params` argument; TRL's default).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxalign.logprobs import HEAD_CHUNK_TOKENS
from jaxalign.lora import LoraConfig
from jaxalign.losses.dpo import DPO_LOSSES, LENGTH_NORMALISED_LOSSES, dpo_loss
from jaxalign.losses.preference import orpo_loss, simpo_loss
from jaxalign.models.config import TransformerConfig
from jaxalign.ops import masked_count, masked_mean
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

REFERENCE_FREE_LOSSES = ("orpo", "simpo")
"""Preference loss types that need no reference model (length-averaged policy log-probs only)."""

PREFERENCE_LOSS_TYPES = (*sorted(DPO_LOSSES), *REFERENCE_FREE_LOSSES)
"""Every `loss_type` `make_dpo_step` accepts: the DPO family, then SimPO and ORPO."""


def uses_average_logps(loss_type: str) -> bool:
    """Whether `loss_type` scores completions by length-averaged log-probs (IPO, sigmoid_norm,
    SimPO, ORPO) rather than summed ones: the `average` of `pair_logps` / `reference_logps`."""
    return loss_type in LENGTH_NORMALISED_LOSSES or loss_type in REFERENCE_FREE_LOSSES


def pair_logps(
    params,
    config: TransformerConfig,
    batch: Batch,
    dropout_rng: jax.Array | None = None,
    *,
    average: bool = False,
    head_chunk: int | None = HEAD_CHUNK_TOKENS,
    return_router_stats: bool = False,
) -> tuple[jax.Array, jax.Array] | tuple[jax.Array, jax.Array, tuple]:
    """Completion log-probs of both sides of a preference batch, in one forward pass of [2B, T].

    Args:
      params, config: the model.
      batch: `chosen_tokens`, `rejected_tokens` int32 [B, T] and `chosen_mask`, `rejected_mask`
        float32 [B, T] (1.0 on completion tokens), right-padded to the same T.
      dropout_rng: key enabling dropout, or None.
      average: length-normalised log-probs (IPO) instead of sums.
      head_chunk: tokens per chunk of the fused output head (`jaxalign.scoring.row_logps`: no
        [2B, T, V] logits are held); None: the unfused reference.
      return_router_stats: also return the pass's MoE `RouterStats` over [2B, T-1] (chosen rows
        first; () for a dense model).

    Returns:
      (chosen_logps [B], rejected_logps [B]) float32, nats; with `return_router_stats`, a third
      element, the router stats.
    """
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])  # [2B,T]
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])  # [2B,T]
    seq, router = row_logps(
        params, config, tokens, mask, average=average, dropout_rng=dropout_rng, head_chunk=head_chunk,
        return_router_stats=True,
    )  # [2B]
    b = batch["chosen_tokens"].shape[0]
    return (seq[:b], seq[b:], router) if return_router_stats else (seq[:b], seq[b:])


def pair_real_tokens(batch: Batch) -> jax.Array:
    """bool [2B, T-1]: the real input tokens of `pair_logps`'s pass (each row up to its last
    completion target, prompt included; `right_padded_real`), for the MoE router losses."""
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])  # [2B,T]
    return right_padded_real(mask[:, 1:])


def _real_pairs(batch: Batch) -> jax.Array:
    # Static-shape padding rows have an all-zero completion mask.
    return jnp.sum(batch["chosen_mask"], axis=-1) > 0  # [B]


def completion_lengths(batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Completion token counts of both sides, float32 [B] each: the tokens `pair_logps` sums
    (the masks shifted by one, as the log-probs are of tokens 1..T-1)."""
    return (
        masked_count(batch["chosen_mask"][:, 1:], axis=-1),
        masked_count(batch["rejected_mask"][:, 1:], axis=-1),
    )


def _with_logps(loss: jax.Array, metrics: Metrics, chosen: jax.Array, rejected: jax.Array, real):
    # the policy's mean completion log-probs over the real pairs (the logged `logps/*` of TRL)
    from_real = {"chosen_logps": masked_mean(chosen, real), "rejected_logps": masked_mean(rejected, real)}
    return loss, {**metrics, **from_real}


def dpo_batch_loss(
    params,
    config: TransformerConfig,
    batch: Batch,
    dropout_rng: jax.Array | None = None,
    ref_params=None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float | None = None,
    discopop_tau: float = 0.05,
    head_chunk: int | None = HEAD_CHUNK_TOKENS,
    router_aux_loss_coef: float = ROUTER_AUX_LOSS_COEF,
    router_z_loss_coef: float = ROUTER_Z_LOSS_COEF,
) -> tuple[jax.Array, Metrics]:
    """DPO-family loss (`jaxalign.losses.dpo.dpo_loss`, any key of `DPO_LOSSES`) on a batch.

    Reference log-probs are read from `batch["ref_chosen_logps"]`/`batch["ref_rejected_logps"]`
    ([B] float32) when present, else computed from `ref_params` under `stop_gradient`. Log-probs
    are length-averaged for `LENGTH_NORMALISED_LOSSES` (ipo, sigmoid_norm), else summed;
    precomputed ones must be the same kind (`reference_logps(..., average=...)`). bco_pair runs
    with δ = 0 (TRL 1.16); the running-mean δ of TRL 0.19 is `jaxalign.losses.dpo.bco_pair_loss`.
    For an MoE policy the loss adds `router_aux_loss_coef`·L_aux + `router_z_loss_coef`·L_z of
    the policy's [2B, T] pass (`jaxalign.trainers.sft.with_router_losses`; the reference adds
    none) and the metrics `aux_loss`, `z_loss`.

    Raises:
      ValueError: neither precomputed reference log-probs nor `ref_params` are given; a bad
        loss_type or hyperparameter (`dpo_loss`); a negative router loss coefficient.
    """
    check_router_loss_coefs(router_aux_loss_coef, router_z_loss_coef)
    if "ref_chosen_logps" not in batch and ref_params is None:
        raise ValueError(
            "DPO needs reference log-probs: batch keys 'ref_chosen_logps'/'ref_rejected_logps' "
            "or ref_params"
        )
    average = loss_type in LENGTH_NORMALISED_LOSSES
    chosen, rejected, router = pair_logps(
        params, config, batch, dropout_rng, average=average, head_chunk=head_chunk, return_router_stats=True
    )
    if "ref_chosen_logps" in batch:
        ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    else:
        ref_chosen, ref_rejected = jax.lax.stop_gradient(
            pair_logps(ref_params, config, batch, average=average, head_chunk=head_chunk)
        )
    real = _real_pairs(batch)
    loss, metrics = dpo_loss(
        chosen, rejected, ref_chosen, ref_rejected,
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
        discopop_tau=discopop_tau, where=real,
    )
    loss, metrics = with_router_losses(
        loss, metrics, router, pair_real_tokens(batch), router_aux_loss_coef=router_aux_loss_coef,
        router_z_loss_coef=router_z_loss_coef,
    )
    return _with_logps(loss, metrics, chosen, rejected, real)


def simpo_batch_loss(
    params,
    config: TransformerConfig,
    batch: Batch,
    dropout_rng: jax.Array | None = None,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    head_chunk: int | None = HEAD_CHUNK_TOKENS,
    router_aux_loss_coef: float = ROUTER_AUX_LOSS_COEF,
    router_z_loss_coef: float = ROUTER_Z_LOSS_COEF,
) -> tuple[jax.Array, Metrics]:
    """SimPO (`jaxalign.losses.preference.simpo_loss`) on a preference batch: no reference;
    length-averaged policy log-probs. Metrics: simpo_loss's plus chosen/rejected_logps (and for
    an MoE policy the router losses, as `dpo_batch_loss`)."""
    check_router_loss_coefs(router_aux_loss_coef, router_z_loss_coef)
    chosen, rejected, router = pair_logps(
        params, config, batch, dropout_rng, average=True, head_chunk=head_chunk, return_router_stats=True
    )
    real = _real_pairs(batch)
    loss, metrics = simpo_loss(
        chosen, rejected, beta=beta, gamma=gamma, label_smoothing=label_smoothing, where=real
    )
    loss, metrics = with_router_losses(
        loss, metrics, router, pair_real_tokens(batch), router_aux_loss_coef=router_aux_loss_coef,
        router_z_loss_coef=router_z_loss_coef,
    )
    return _with_logps(loss, metrics, chosen, rejected, real)


def orpo_batch_loss(
    params,
    config: TransformerConfig,
    batch: Batch,
    dropout_rng: jax.Array | None = None,
    *,
    beta: float = 0.1,
    head_chunk: int | None = HEAD_CHUNK_TOKENS,
    router_aux_loss_coef: float = ROUTER_AUX_LOSS_COEF,
    router_z_loss_coef: float = ROUTER_Z_LOSS_COEF,
) -> tuple[jax.Array, Metrics]:
    """ORPO (`jaxalign.losses.preference.orpo_loss`) on a preference batch: no reference; the
    NLL of the chosen completion tokens plus λ = `beta` times the odds-ratio term. Metrics:
    orpo_loss's plus chosen/rejected_logps (length-averaged, as the odds use them), and for an
    MoE policy the router losses (as `dpo_batch_loss`)."""
    check_router_loss_coefs(router_aux_loss_coef, router_z_loss_coef)
    chosen, rejected, router = pair_logps(
        params, config, batch, dropout_rng, head_chunk=head_chunk, return_router_stats=True
    )  # sums
    chosen_len, rejected_len = completion_lengths(batch)
    real = _real_pairs(batch)
    loss, metrics = orpo_loss(chosen, rejected, chosen_len, rejected_len, beta=beta, where=real)
    loss, metrics = with_router_losses(
        loss, metrics, router, pair_real_tokens(batch), router_aux_loss_coef=router_aux_loss_coef,
        router_z_loss_coef=router_z_loss_coef,
    )
    average = lambda x, n: x / jnp.maximum(n, 1.0)  # noqa: E731 - orpo_loss's own averages
    return _with_logps(loss, metrics, average(chosen, chosen_len), average(rejected, rejected_len), real)


def preference_loss_fn(
    config: TransformerConfig,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float | None = None,
    simpo_gamma: float = 0.5,
    discopop_tau: float = 0.05,
    head_chunk: int | None = HEAD_CHUNK_TOKENS,
    router_aux_loss_coef: float = ROUTER_AUX_LOSS_COEF,
    router_z_loss_coef: float = ROUTER_Z_LOSS_COEF,
) -> Callable:
    """`loss_fn(params, batch, dropout_rng, ref_params=None) -> (loss, metrics)` of `loss_type`
    (any of `PREFERENCE_LOSS_TYPES`), for `make_train_step`. The router loss coefficients apply
    to MoE policies (`dpo_batch_loss`).

    Raises:
      ValueError: unknown loss_type or a negative router loss coefficient (eagerly); at trace
        time, `ref_params` passed to a reference-free loss (a misconfigured step, not silently
        ignored).
    """
    if loss_type not in PREFERENCE_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {list(PREFERENCE_LOSS_TYPES)}, got {loss_type!r}")
    check_router_loss_coefs(router_aux_loss_coef, router_z_loss_coef)
    router = dict(router_aux_loss_coef=router_aux_loss_coef, router_z_loss_coef=router_z_loss_coef)
    if loss_type in DPO_LOSSES:

        def with_reference(params, batch, dropout_rng, ref_params=None):
            return dpo_batch_loss(
                params, config, batch, dropout_rng, ref_params, beta=beta, loss_type=loss_type,
                label_smoothing=label_smoothing, discopop_tau=discopop_tau, head_chunk=head_chunk, **router,
            )

        return with_reference
    if loss_type == "simpo":
        batch_loss = simpo_batch_loss
        kw = dict(beta=beta, gamma=simpo_gamma, label_smoothing=label_smoothing or 0.0)
    else:
        batch_loss, kw = orpo_batch_loss, dict(beta=beta)

    def reference_free(params, batch, dropout_rng, ref_params=None):
        if ref_params is not None:
            raise ValueError(f"loss_type {loss_type!r} is reference-free: pass no ref_params")
        return batch_loss(params, config, batch, dropout_rng, head_chunk=head_chunk, **kw, **router)

    return reference_free


def make_dpo_step(
    config: TransformerConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float | None = None,
    simpo_gamma: float = 0.5,
    discopop_tau: float = 0.05,
    head_chunk: int | None = HEAD_CHUNK_TOKENS,
    router_aux_loss_coef: float = ROUTER_AUX_LOSS_COEF,
    router_z_loss_coef: float = ROUTER_Z_LOSS_COEF,
    dropout: bool = True,
    lora: LoraConfig | None = None,
    prefix: PrefixConfig | None = None,
    shardings: StepShardings | None = None,
) -> Callable:
    """jit-compiled preference step `step(state, batch, ref_params=None) -> (state, metrics)`.

    `loss_type` is any of `PREFERENCE_LOSS_TYPES`: a DPO-family type (`dpo_batch_loss`; `beta`
    is β, `label_smoothing` ε, `discopop_tau` τ) or the reference-free "simpo" (`beta` β,
    `simpo_gamma` γ, `label_smoothing` ε) and "orpo" (`beta` is λ). For the DPO family pass
    `ref_params` (frozen reference) unless the batch carries precomputed reference log-probs
    (see `reference_logps`; length-averaged ones where `uses_average_logps(loss_type)`); the
    reference-free types take no reference. Metrics: the loss function's (loss, chosen/rejected
    rewards, reward_accuracy, reward_margin, ...), chosen/rejected log-probs, grad_norm,
    learning_rate. With `lora`, the state's params are the adapters and the step is
    `step(state, batch, base_params, ref_params)`: pass the base itself as `ref_params`
    (adapters off = the reference, no second copy), or precompute reference log-probs with
    `reference_logps(base_params, ...)`; `lora.dropout` applies to the policy only (and not
    with `dropout=False`). `shardings` (`jaxalign.trainers.step_shardings(...,
    num_extra_params=1)` with `ref_params`) compiles the step for a device mesh.

    `prefix` (`jaxalign.prefix.PrefixConfig`) trains a prefix-tuning prefix of the frozen params
    instead, the way `lora` trains adapters (`make_train_step`). `head_chunk` (tokens per chunk of
    the fused output head; None: the unfused reference) as in `pair_logps`.
    For an MoE policy the loss adds `router_aux_loss_coef` (0.001, Mixtral's default; 0 disables)
    × L_aux + `router_z_loss_coef` (default 0) × L_z of the policy's pass and the metrics
    `aux_loss`, `z_loss` (`jaxalign.trainers.sft.with_router_losses`).

    Raises:
      ValueError: unknown loss_type; a negative router loss coefficient.
    """
    loss_fn = preference_loss_fn(
        config, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
        simpo_gamma=simpo_gamma, discopop_tau=discopop_tau, head_chunk=head_chunk,
        router_aux_loss_coef=router_aux_loss_coef, router_z_loss_coef=router_z_loss_coef,
    )
    return make_train_step(
        loss_fn, tx, schedule, config=config, dropout=dropout, lora=lora, prefix=prefix, shardings=shardings
    )


@functools.lru_cache(maxsize=32)
def make_pair_logps_fn(
    config: TransformerConfig, *, average: bool = False, head_chunk: int | None = HEAD_CHUNK_TOKENS
) -> Callable:
    """jit-compiled `fn(params, batch) -> (chosen_logps [B], rejected_logps [B])` (no dropout).

    Memoised on its (hashable) arguments, so every caller shares one compilation per shape.
    """
    return jax.jit(
        lambda params, batch: pair_logps(
            params, config, batch, average=average, head_chunk=head_chunk
        )
    )


def reference_logps(
    ref_params,
    config: TransformerConfig,
    batches: Iterable[Batch],
    *,
    average: bool = False,
    head_chunk: int | None = HEAD_CHUNK_TOKENS,
) -> tuple[np.ndarray, np.ndarray]:
    """Precomputes reference log-probs over a dataset, once.

    Args:
      ref_params, config: the frozen reference model.
      batches: the dataset's preference batches in order (e.g. every example once, the last batch
        padded with all-zero-mask rows).
      average: length-normalised (IPO) instead of summed log-probs.

    Returns:
      (ref_chosen_logps, ref_rejected_logps): float32 NumPy arrays, one entry per *real* row of
      the batches in order (padding rows dropped).
    """
    fn = make_pair_logps_fn(config, average=average, head_chunk=head_chunk)
    chosen, rejected = [], []
    for batch in batches:
        c, r = jax.device_get(fn(ref_params, batch))
        real = np.asarray(batch["chosen_mask"]).sum(-1) > 0
        chosen.append(c[real])
        rejected.append(r[real])
    return np.concatenate(chosen), np.concatenate(rejected)
