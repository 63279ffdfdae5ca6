"""Masked reductions with select semantics: what sits at a masked position cannot leak.

Every masked reduction in jaxalign goes through these. A position counts where `mask != 0`
(bool, or float 1.0 / 0.0); the value there is *selected* with `jnp.where`, never multiplied by
the mask, so NaN, ±inf or garbage at a masked position (padding, Hugging Face's `-100` label
turned into a log-prob) changes neither the result nor the gradient with respect to the
positions that count. `x * mask` would give `nan * 0 = nan`.

Gradients: `jnp.where(mask, x, 0)` passes a zero cotangent to masked positions of `x`, so the
reductions here are safe to differentiate. A caller that computes `f(x)` *before* reducing
(e.g. `exp(log_ratio)`) should first replace masked inputs with `select(mask, x)` (the
"double where"): otherwise `0 · f'(nan) = nan` reaches the masked positions' cotangent.

Shapes: any; `mask` broadcasts against `x` (e.g. [B, T] against [B, T], or [B] rows).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def _counts(mask: jax.Array) -> jax.Array:
    return mask.astype(bool) if mask.dtype != jnp.bool_ else mask


def select(mask: jax.Array, x: jax.Array, fill: float = 0.0) -> jax.Array:
    """`x` where mask != 0, `fill` elsewhere (same dtype as `x`): the safe input of a masked op.

    Args:
      mask: bool or float, broadcastable to `x`.
      x: any array.
      fill: value at masked positions.
    """
    return jnp.where(_counts(mask), x, jnp.asarray(fill, x.dtype))


def masked_sum(x: jax.Array, mask: jax.Array, *, axis: int | tuple[int, ...] | None = None) -> jax.Array:
    """Σ x over the entries where mask != 0, in float32.

    Args:
      x: float array.
      mask: bool or {0, 1} float, broadcastable to `x`.
      axis: axes to reduce (None: all).

    Returns:
      float32, `x`'s shape without `axis`.
    """
    return jnp.sum(select(mask, x.astype(jnp.float32)), axis=axis)


def masked_count(mask: jax.Array, *, axis: int | tuple[int, ...] | None = None) -> jax.Array:
    """Number of entries with mask != 0 (float32, so it divides without a cast)."""
    return jnp.sum(_counts(mask).astype(jnp.float32), axis=axis)


def masked_mean(
    x: jax.Array, mask: jax.Array | None, *, axis: int | tuple[int, ...] | None = None
) -> jax.Array:
    """Mean of x over the entries where mask != 0; 0 where nothing counts. float32.

    Args:
      x: float array.
      mask: bool or {0, 1} float of `x`'s shape (or broadcastable), or None for a plain mean.
      axis: axes to reduce (None: all).
    """
    if mask is None:
        return jnp.mean(x.astype(jnp.float32), axis=axis)
    mask = jnp.broadcast_to(mask, x.shape)
    return masked_sum(x, mask, axis=axis) / jnp.maximum(masked_count(mask, axis=axis), 1.0)


def masked_var(x: jax.Array, mask: jax.Array, *, unbiased: bool = True) -> jax.Array:
    """Variance of x over the entries where mask != 0 (all axes), float32 scalar.

    `unbiased=True` divides by n − 1 (torch.var, TRL's `masked_var`), else by n; the divisor is at
    least 1, so one counted entry gives 0.
    """
    mask = jnp.broadcast_to(mask, x.shape)
    n = masked_count(mask)
    centred = select(mask, x.astype(jnp.float32) - masked_mean(x, mask))
    return jnp.sum(jnp.square(centred)) / jnp.maximum(n - 1.0 if unbiased else n, 1.0)


def masked_whiten(
    x: jax.Array, mask: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8
) -> jax.Array:
    """(x − mean) / std over the masked entries (PPO advantage whitening; TRL `masked_whiten`,
    which uses the unbiased variance). With `shift_mean=False` the mean is added back.

    Args:
      x: float [...]; mask: same shape, nonzero on entries that count.
      shift_mean: subtract the mean (True) or keep it.
      eps: added to the variance.

    Returns:
      float32, same shape; masked-out entries are 0.

    Raises:
      AssertionError: (chex) shapes differ.
    """
    chex.assert_equal_shape((x, mask))
    x = select(mask, x.astype(jnp.float32))
    mean = masked_mean(x, mask)
    out = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        out = out + mean
    return select(mask, out)


def last_token_index(mask: jax.Array) -> jax.Array:
    """Index of the last nonzero entry of each row of mask [B, T]: int32 [B], −1 for an empty row.

    Raises:
      AssertionError: (chex) mask is not rank 2.
    """
    chex.assert_rank(mask, 2)
    idx = jnp.arange(mask.shape[1], dtype=jnp.int32)
    return jnp.max(jnp.where(_counts(mask), idx, -1), axis=1)
