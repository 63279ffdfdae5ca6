"""DPO training: completion log-probs of chosen/rejected pairs, reference log-probs, train step.

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

from jaxalign.logprobs import sequence_logps, token_logps
from jaxalign.lora import LoraConfig
from jaxalign.losses.dpo import dpo_loss
from jaxalign.models.config import TransformerConfig
from jaxalign.models.transformer import forward
from jaxalign.trainers.step import Batch, Metrics, StepShardings, make_train_step


def pair_logps(
    params,
    config: TransformerConfig,
    batch: Batch,
    dropout_rng: jax.Array | None = None,
    *,
    average: bool = False,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Completion log-probs of both sides of a preference batch, in one forward pass of [2B, T].

    Args:
      params, config: the model.
      batch: `chosen_tokens`, `rejected_tokens` int32 [B, T] and `chosen_mask`, `rejected_mask`
        float32 [B, T] (1.0 on completion tokens), right-padded to the same T.
      dropout_rng: key enabling dropout, or None.
      average: length-normalised log-probs (IPO) instead of sums.
      chunk_size: sequence chunking of the log-prob gather.

    Returns:
      (chosen_logps [B], rejected_logps [B]) float32, nats.
    """
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])  # [2B,T]
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])  # [2B,T]
    logits = forward(params, config, tokens[:, :-1], dropout_rng=dropout_rng)  # [2B,T-1,V]
    logps = token_logps(logits, tokens[:, 1:], chunk_size=chunk_size)  # [2B,T-1]
    seq = sequence_logps(logps, mask[:, 1:], average=average)  # [2B]
    b = batch["chosen_tokens"].shape[0]
    return seq[:b], seq[b:]


def _real_pairs(batch: Batch) -> jax.Array:
    # Static-shape padding rows have an all-zero completion mask.
    return jnp.sum(batch["chosen_mask"], axis=-1) > 0  # [B]


def dpo_batch_loss(
    params,
    config: TransformerConfig,
    batch: Batch,
    dropout_rng: jax.Array | None = None,
    ref_params=None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
) -> tuple[jax.Array, Metrics]:
    """DPO loss of the policy on a preference batch.

    Reference log-probs are read from `batch["ref_chosen_logps"]`/`batch["ref_rejected_logps"]`
    ([B] float32) when present, else computed from `ref_params` under `stop_gradient`.

    Raises:
      ValueError: neither precomputed reference log-probs nor `ref_params` are given.
    """
    average = loss_type == "ipo"
    chosen, rejected = pair_logps(
        params, config, batch, dropout_rng, average=average, chunk_size=chunk_size
    )
    if "ref_chosen_logps" in batch:
        ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    elif ref_params is not None:
        ref_chosen, ref_rejected = jax.lax.stop_gradient(
            pair_logps(ref_params, config, batch, average=average, chunk_size=chunk_size)
        )
    else:
        raise ValueError(
            "DPO needs reference log-probs: batch keys 'ref_chosen_logps'/'ref_rejected_logps' "
            "or ref_params"
        )
    loss, metrics = dpo_loss(
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        where=_real_pairs(batch),
    )
    return loss, {**metrics, "chosen_logps": jnp.mean(chosen), "rejected_logps": jnp.mean(rejected)}


def make_dpo_step(
    config: TransformerConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
    dropout: bool = True,
    lora: LoraConfig | None = None,
    shardings: StepShardings | None = None,
) -> Callable:
    """jit-compiled DPO step `step(state, batch, ref_params=None) -> (state, metrics)`.

    Pass `ref_params` (frozen reference) unless the batch carries precomputed reference log-probs
    (see `reference_logps`). Metrics: loss, chosen/rejected rewards, reward_accuracy,
    reward_margin, logits, chosen/rejected log-probs, grad_norm, learning_rate. With `lora`, the
    state's params are the adapters and the step is `step(state, batch, base_params, ref_params)`:
    pass the base itself as `ref_params` (adapters off = the reference, no second copy), or
    precompute reference log-probs with `reference_logps(base_params, ...)`; `lora.dropout`
    applies to the policy only (and not with `dropout=False`). `shardings`
    (`jaxalign.trainers.step_shardings(..., num_extra_params=1)` with `ref_params`) compiles
    the step for a device mesh.
    """

    def loss_fn(params, batch, dropout_rng, ref_params=None):
        return dpo_batch_loss(
            params,
            config,
            batch,
            dropout_rng,
            ref_params,
            beta=beta,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
            chunk_size=chunk_size,
        )

    return make_train_step(
        loss_fn, tx, schedule, config=config, dropout=dropout, lora=lora, shardings=shardings
    )


@functools.lru_cache(maxsize=32)
def make_pair_logps_fn(
    config: TransformerConfig, *, average: bool = False, chunk_size: int | None = None
) -> Callable:
    """jit-compiled `fn(params, batch) -> (chosen_logps [B], rejected_logps [B])` (no dropout).

    Memoised on its (hashable) arguments, so every caller shares one compilation per shape.
    """
    return jax.jit(
        lambda params, batch: pair_logps(
            params, config, batch, average=average, chunk_size=chunk_size
        )
    )


def reference_logps(
    ref_params,
    config: TransformerConfig,
    batches: Iterable[Batch],
    *,
    average: bool = False,
    chunk_size: int | None = None,
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
    fn = make_pair_logps_fn(config, average=average, chunk_size=chunk_size)
    chosen, rejected = [], []
    for batch in batches:
        c, r = jax.device_get(fn(ref_params, batch))
        real = np.asarray(batch["chosen_mask"]).sum(-1) > 0
        chosen.append(c[real])
        rejected.append(r[real])
    return np.concatenate(chosen), np.concatenate(rejected)
