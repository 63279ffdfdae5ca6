"""Scalar heads on the transformer trunk: reward models and value models (critics).

A reward / value model is the language model's trunk with its output head replaced by a linear
map D -> 1 (InstructGPT, arXiv 2203.02155 §3.5; Stiennon et al. 2020, arXiv 2009.01325). Its
parameters are a plain pytree `{"backbone": <transformer params>, "head": {"kernel": [D],
"bias": []}}`, so it trains, checkpoints and shards like any other params; the trunk's own output
head (the tied embedding or `lm_head`) is simply not used.

Shapes: B batch, T tokens, D d_model. Scores are float32, in the reward model's own (arbitrary)
units: only differences matter for Bradley–Terry.
"""

from __future__ import annotations

import math
from typing import Literal

import chex
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxalign.models.config import TransformerConfig
from jaxalign.models.transformer import forward, init_params, param_logical_axes
from jaxalign.ops import last_token_index, masked_mean

Params = dict


def init_scalar_head(config: TransformerConfig, rng: jax.Array) -> Params:
    """A fresh head `{"kernel": float32 [D], "bias": float32 []}`.

    kernel ~ N(0, 1/(D+1)), bias 0: the initialisation of Stiennon et al. 2020 (their reward
    head, as in TRL's `AutoModelForCausalLMWithValueHead` summarisation recipe), which gives scores
    of order 1 at the start.
    """
    std = 1.0 / math.sqrt(config.d_model + 1)
    return {
        "kernel": std * jax.random.normal(rng, (config.d_model,), jnp.float32),
        "bias": jnp.zeros((), jnp.float32),
    }


def init_scalar_model(config: TransformerConfig, rng: jax.Array, backbone: Params | None = None) -> Params:
    """Reward or value model params `{"backbone", "head"}`.

    Args:
      config: the trunk's config.
      rng: key for the head (and for the trunk when `backbone` is None).
      backbone: transformer params to start from (an SFT or pretrained policy, as InstructGPT
        does); None initialises the trunk at random. The tree is used as given (copy it first if
        the caller also trains it elsewhere with buffer donation).
    """
    k_trunk, k_head = jax.random.split(rng)
    if backbone is None:
        backbone = init_params(config, k_trunk)
    return {"backbone": backbone, "head": init_scalar_head(config, k_head)}


def scalar_head_logical_axes() -> Params:
    """Logical axis names of `init_scalar_head`'s leaves: the kernel's D is "embed" (split like
    the trunk's width), the bias is replicated (for `jaxalign.sharding.partition_specs`)."""
    return {"kernel": PartitionSpec("embed"), "bias": PartitionSpec()}


def scalar_model_logical_axes(config: TransformerConfig) -> Params:
    """Logical axis names of `init_scalar_model`'s `{"backbone", "head"}` tree."""
    return {"backbone": param_logical_axes(config), "head": scalar_head_logical_axes()}


def apply_scalar_head(head: Params, hidden: jax.Array) -> jax.Array:
    """hidden [..., D] (any float dtype) -> float32 scores [...] = hidden · kernel + bias.

    Raises:
      AssertionError: (chex) a kernel that is not [D].
    """
    chex.assert_shape(head["kernel"], (hidden.shape[-1],))
    return hidden.astype(jnp.float32) @ head["kernel"].astype(jnp.float32) + head["bias"]


def token_scores(
    params: Params,
    config: TransformerConfig,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    *,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """The head's score after every token: float32 [B, T] for tokens int32 [B, T].

    Score t depends on tokens 0..t only (causal trunk). `positions` as in `forward` (-1 on left
    padding); the default 0..T-1 is right for right-padded rows.
    """
    hidden = forward(
        params["backbone"], config, tokens, positions, dropout_rng=dropout_rng, return_hidden=True
    )  # [B,T,D]
    return apply_scalar_head(params["head"], hidden)  # [B,T]


def pool_scores(
    scores: jax.Array, mask: jax.Array, *, pool: Literal["last", "mean"] = "last"
) -> jax.Array:
    """One score per sequence from per-token scores.

    "last": the score at the last mask-1 token, i.e. after the whole response including its EOS
    (InstructGPT / DeepSpeed-Chat / TRL `get_reward`); "mean": the mean over mask-1 tokens.

    Args:
      scores: float32 [B, T]; mask: [B, T], 1.0 on response tokens.

    Returns:
      float32 [B] (0 for an all-zero mask row under "mean").

    Raises:
      AssertionError: (chex) scores and mask of different shapes.
      ValueError: unknown pool.
    """
    chex.assert_equal_shape((scores, mask))
    if pool == "last":
        last = jnp.maximum(last_token_index(mask), 0)  # [B]
        return jnp.take_along_axis(scores, last[:, None], axis=1)[:, 0]
    if pool == "mean":
        return masked_mean(scores, mask, axis=1)
    raise ValueError(f"pool must be 'last' or 'mean', got {pool!r}")


def sequence_scores(
    params: Params,
    config: TransformerConfig,
    tokens: jax.Array,
    mask: jax.Array,
    positions: jax.Array | None = None,
    *,
    pool: Literal["last", "mean"] = "last",
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """Reward-model score of each sequence: float32 [B].

    Args:
      params: `{"backbone", "head"}` from `init_scalar_model`.
      config: the trunk's config.
      tokens: int32 [B, T] prompt + response (right-padded, or left-padded with `positions`).
      mask: [B, T] 1.0 on response tokens (where "mean" averages; "last" reads the last one).
      positions: optional int32 [B, T], -1 on left padding.
      pool: see `pool_scores`.
      dropout_rng: enables dropout.
    """
    scores = token_scores(params, config, tokens, positions, dropout_rng=dropout_rng)  # [B,T]
    return pool_scores(scores, mask, pool=pool)
