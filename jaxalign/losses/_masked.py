"""Masked reductions shared by the losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of x over entries where mask is nonzero (plain mean when mask is None); 0 if empty."""
    if mask is None:
        return jnp.mean(x)
    w = mask.astype(jnp.float32)
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)
