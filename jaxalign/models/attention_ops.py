"""Attention primitives shared by `transformer.Attention` and `mla.MLAttention`: RoPE, the
position mask, slot writes into a KV cache, the per-call cache plan, and the projection builder
whose parameters carry logical axis names.

One module below both attention layers, so that transformer.py (which mounts either layer in its
`Block`) and mla.py (which must not import transformer.py: that would close a cycle) read the same
code. Shapes: B batch, T new tokens, S cache slots, n heads, H channels per head.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class CachePlan:
    """Where one call's new tokens go in the KV cache, computed once by `Transformer` and shared
    by every layer (standard and MLA alike).

    Attributes:
      slots: int32 [T - skip], the slots receiving the kept new tokens.
      old_positions, new_positions: int32 [B, S], the slot positions before and after this call.
      skip: leading new tokens that do not fit (a chunk longer than a rolling buffer); static.
      write_first: the new tokens can be written before attention reads the buffer (a cache as
        long as the sequence, or one token into a rolling buffer); static.
    """

    slots: jax.Array
    old_positions: jax.Array
    new_positions: jax.Array
    skip: int = flax.struct.field(pytree_node=False)
    write_first: bool = flax.struct.field(pytree_node=False)


def make_cache_plan(cache_positions: jax.Array, length: jax.Array, positions: jax.Array,
                    *, window: int | None) -> CachePlan:
    """The `CachePlan` of T new tokens at `positions` int32 [B, T] into a cache whose slots hold
    `cache_positions` int32 [B, S] after `length` (int32 scalar) tokens: slot of token j =
    (length + skip + j) mod S, skip = max(0, T - S) (only a rolling buffer, `window` set, can
    take more tokens than slots).

    Raises:
      ValueError: T > S for a cache without a window.
      AssertionError: (chex) positions not rank 2 or cache_positions not rank 2.
    """
    chex.assert_rank([cache_positions, positions], 2)
    size, t = cache_positions.shape[1], positions.shape[1]
    if window is None and t > size:
        raise ValueError(f"{t} new tokens do not fit a KV cache of {size} slots")
    skip = max(0, t - size)
    slots = (length + skip + jnp.arange(t - skip)) % size  # [T - skip]
    new_positions = cache_positions.at[:, slots].set(positions[:, skip:])  # [B,S]
    return CachePlan(slots, cache_positions, new_positions, skip, window is None or t == 1)


def apply_rope(
    x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, *, interleaved: bool, factor: float = 1.0
) -> jax.Array:
    """factor·RoPE(x): rotates each (pair of) channel(s) of x [B, T, n, H] by angle
    position·freq (RoFormer, arXiv 2104.09864 Eq. 34), in float32, cast back to x.dtype.

    Args:
      x: [B, T, n, H] queries or keys (H even).
      positions: int [B, T] absolute positions (clamp padding's -1 to 0 before the call).
      inv_freq: float32 [H/2] inverse frequencies (`transformer.rope_frequencies`,
        `mla.mla_rope_frequencies`).
      interleaved: rotate pairs (x[2i], x[2i+1]) in place (Meta / llama2.c / DeepSeek layout);
        otherwise pairs (x[i], x[i + H/2]) (Hugging Face "rotate_half").
      factor: multiplies cos and sin (YaRN's attention factor, HF `attention_scaling`); the
        default 1 adds no multiplication to the program.

    Raises:
      AssertionError: (chex) x not rank 4, positions not [B, T].
    """
    chex.assert_rank([x, positions], [4, 2])
    chex.assert_equal_shape_prefix([x, positions], 2)
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B,T,H/2]
    cos = jnp.cos(angles)[:, :, None, :]  # [B,T,1,H/2]
    sin = jnp.sin(angles)[:, :, None, :]
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    xf = x.astype(jnp.float32)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]  # [B,T,n,H/2]
        out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(x.shape)
    else:
        half = x.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def position_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None = None) -> jax.Array:
    """bool [B, 1, T, S]: key s is visible to query t iff it is real (k_pos >= 0), not in the
    future (k_pos <= q_pos) and, with a window W, q_pos - k_pos < W (Mistral, arXiv 2310.06825).

    Args:
      q_pos: int [B, T] query positions; k_pos: int [B, S] key positions (-1 = empty/padding).

    Raises:
      AssertionError: (chex) q_pos or k_pos not rank 2.
    """
    chex.assert_rank([q_pos, k_pos], 2)
    q = q_pos[:, None, :, None]  # [B,1,T,1]
    k = k_pos[:, None, None, :]  # [B,1,1,S]
    visible = (k >= 0) & (k <= q)
    if window is not None:
        visible &= q - k < window
    return visible


def write_slots(buffer: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """buffer[:, slots] = new (cast to buffer's dtype) for buffer [B, S, ...] and new
    [B, len(slots), ...]; a dynamic-update-slice for the one-token decode step (no scatter).

    Raises:
      AssertionError: (chex) new and buffer differ in rank or trailing shape.
    """
    chex.assert_equal_rank([buffer, new])
    chex.assert_shape(new, (buffer.shape[0], slots.shape[0], *buffer.shape[2:]))
    if new.shape[1] == 1:
        start = (0, slots[0]) + (0,) * (buffer.ndim - 2)
        return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), start)
    return buffer.at[:, slots].set(new.astype(buffer.dtype))


def logical_dense(
    features: int | tuple[int, ...],
    kernel_axes: tuple[str | None, ...],
    *,
    std: float,
    name: str,
    dtype: Any,
    param_dtype: Any,
    axis: int | tuple[int, ...] = -1,
    use_bias: bool = True,
) -> nn.DenseGeneral:
    """A `DenseGeneral` projection whose kernel (init N(0, std²)) carries the logical axis names
    `kernel_axes` (input axes, then output axes) and whose bias (zeros) carries the output ones,
    so that one rules table (`jaxalign.sharding.DEFAULT_RULES`) maps both onto a mesh."""
    n_out = len(features) if isinstance(features, tuple) else 1
    return nn.DenseGeneral(
        features=features,
        axis=axis,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(stddev=std), kernel_axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), kernel_axes[-n_out:]),
        name=name,
    )
