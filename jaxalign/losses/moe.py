"""Mixture-of-Experts auxiliary losses and the aux-loss-free bias update (pure: arrays in).

Inputs are the router statistics an MoE layer returns (`jaxalign.models.moe.RouterStats`),
stacked over layers. Shapes: L MoE layers, N tokens (or [B, T]), E experts, k experts per token.
Layer axes lead: `router_logits` is [L, *tokens, E] (or a tuple of L arrays [*tokens, E], or a
single layer [*tokens, E]) and a `mask` has the token shape, broadcast over the layers.

Masks mean select: a masked token's logits are replaced by 0 *before* any nonlinearity (the
"double where" of `jaxalign.ops`), so NaN or inf there changes neither a loss nor its gradient.
Every loss returns (loss, metrics) and is 0 when no token is real.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp

from jaxalign.models.moe import expert_load

__all__ = [
    "expert_bias_update",
    "expert_load",
    "load_balancing_loss",
    "router_z_loss",
    "routing_change_fraction",
    "sequence_balance_loss",
]


def _stack(router_logits: jax.Array | Sequence[jax.Array]) -> jax.Array:
    if isinstance(router_logits, (tuple, list)):
        return jnp.stack([jnp.asarray(z) for z in router_logits])
    return jnp.asarray(router_logits)


def _token_mask(mask: jax.Array | None, token_shape: tuple[int, ...], lead: tuple[int, ...]) -> jax.Array:
    """bool [*lead, *token_shape]: the token mask broadcast over the leading (layer) axes."""
    if mask is None:
        return jnp.ones(lead + token_shape, bool)
    chex.assert_shape(mask, token_shape)
    return jnp.broadcast_to(mask != 0, lead + token_shape)


def _split(z: jax.Array, mask: jax.Array | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(layer axes, token axes) of logits [*layers, *tokens, E] given the mask's rank."""
    if z.ndim < 2:
        raise ValueError(f"router logits need rank >= 2 ([tokens, E]), got shape {z.shape}")
    n_tok = z.ndim - 2 if mask is None else mask.ndim  # no mask: [L, N, E] or [N, E]
    n_tok = max(n_tok, 1)
    if n_tok > z.ndim - 1:
        raise ValueError(f"mask of rank {mask.ndim} for router logits of shape {z.shape}")
    lead = z.shape[: z.ndim - 1 - n_tok]
    return lead, z.shape[z.ndim - 1 - n_tok : -1]


def load_balancing_loss(
    router_logits: jax.Array | Sequence[jax.Array],
    *,
    top_k: int | None = None,
    expert_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Switch-style load-balancing loss pooled over layers, as transformers' Mixtral computes it:

      f_e = (1 / (L·Σm)) Σ_{l,t} m_t · [e ∈ TopK_l(t)]         (fraction of assignments, Σ_e f_e = k)
      P_e = (1 / (L·Σm)) Σ_{l,t} m_t · softmax(z_{l,t})_e      (mean router probability)
      L_aux = E · Σ_e f_e · P_e

    Statistics are pooled over all layers before the product (not a mean of per-layer losses),
    so the minimum, at uniform routing, is k (HF's own Mixtral test asserts ≈ 2 for k = 2).
    Multiply by `router_aux_loss_coef` (0.001 in Mixtral / Qwen-MoE) and add to the LM loss.
    Gradient flows through P only (f counts integer selections), as in HF.

    Source: Switch Transformers (Fedus et al. 2021, arXiv 2101.03961, Eqs. 4-6); transformers
    5.25 `models/mixtral/modeling_mixtral.py:load_balancing_loss_func` (also used by Qwen2-MoE /
    Qwen3-MoE), whose `attention_mask` is `mask` here.

    Args:
      router_logits: float [L, *tokens, E] (e.g. [L, N, E] or [L, B, T, E]), a tuple of L arrays
        [*tokens, E] (HF's `router_logits` output), or one layer [*tokens, E].
      top_k: k; the selection is then topk(softmax(z), k) per layer, as HF recomputes it.
      expert_ids: instead of top_k, the experts actually used, int [L, *tokens, k] (or the same
        rank as router_logits): needed when the selection is not topk of the softmax (a
        DeepSeek bias, replayed routes).
      mask: optional [*tokens]; nonzero = real token (HF attention_mask).

    Returns:
      (loss, metrics): float32 scalar; metrics `tokens_per_expert` f [E] and
      `router_prob_per_expert` P [E].

    Raises:
      ValueError: neither or both of top_k and expert_ids given, top_k outside [1, E], logits of
        rank below 2, or a mask rank that does not fit the logits.
      AssertionError: (chex) expert_ids or mask of the wrong shape.
    """
    z = _stack(router_logits).astype(jnp.float32)
    if (top_k is None) == (expert_ids is None):
        raise ValueError("pass exactly one of top_k and expert_ids")
    e = z.shape[-1]
    lead, tok = _split(z, mask)
    real = _token_mask(mask, tok, lead)  # [*L,*tok]
    z = jnp.where(real[..., None], z, 0.0)  # double where: no NaN reaches softmax's gradient
    probs = jax.nn.softmax(z, axis=-1)  # [*L,*tok,E]
    if expert_ids is None:
        if not 1 <= top_k <= e:
            raise ValueError(f"top_k must be in [1, {e}], got {top_k}")
        ids = jax.lax.top_k(jax.lax.stop_gradient(probs), top_k)[1]  # [*L,*tok,k]
    else:
        ids = jnp.asarray(expert_ids)
        chex.assert_shape(ids, z.shape[:-1] + (ids.shape[-1],))
    rows = jnp.sum(real.astype(jnp.float32))  # L·Σm
    denom = jnp.maximum(rows, 1.0)
    counts = expert_load(ids, real, e).astype(jnp.float32)  # [E] assignments of real tokens
    f = counts / denom
    p = jnp.sum(jnp.where(real[..., None], probs, 0.0).reshape(-1, e), axis=0) / denom  # [E]
    loss = e * jnp.sum(f * p)
    return loss, {"tokens_per_expert": f, "router_prob_per_expert": p}


def router_z_loss(
    router_logits: jax.Array | Sequence[jax.Array], *, mask: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Router z-loss L_z = mean over real tokens (and layers) of (logsumexp_e z_e)².

    Penalises large router logits for stability (ST-MoE, Zoph et al. 2022, arXiv 2202.08906,
    Eq. 5; coefficient 1e-3 there and in HF `router_z_loss_coef`). Without a mask it equals
    transformers 5.25 `switch_transformers.router_z_loss_func` (sum over [G, T] / (G·T)); HF's
    Switch concatenates all layers' logits on the token axis before calling it, i.e. the same
    pooled mean as the leading layer axis here.

    Args:
      router_logits: float [L, *tokens, E], a tuple of L [*tokens, E], or one layer [*tokens, E].
      mask: optional [*tokens]; nonzero = real token.

    Returns:
      (loss, metrics): float32 scalar; metrics `mean_logsumexp` (mean of logsumexp over the real
      tokens, unsquared).

    Raises:
      ValueError: logits of rank below 2, or a mask rank that does not fit the logits.
      AssertionError: (chex) a mask whose shape is not the logits' token shape.
    """
    z = _stack(router_logits).astype(jnp.float32)
    lead, tok = _split(z, mask)
    real = _token_mask(mask, tok, lead)
    lse = jax.nn.logsumexp(jnp.where(real[..., None], z, 0.0), axis=-1)  # [*L,*tok]
    denom = jnp.maximum(jnp.sum(real.astype(jnp.float32)), 1.0)
    loss = jnp.sum(jnp.where(real, jnp.square(lse), 0.0)) / denom
    return loss, {"mean_logsumexp": jnp.sum(jnp.where(real, lse, 0.0)) / denom}


def sequence_balance_loss(
    router_logits: jax.Array,
    expert_ids: jax.Array,
    *,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DeepSeek-V3's complementary sequence-wise balance loss (unscaled), averaged over sequences
    and layers:

      s_{t} = σ(z_t),  s̃_{i,t} = s_{i,t} / Σ_j s_{j,t}
      f_i = E / (k·T) · Σ_t [i ∈ TopK_t],   P_i = (1/T) Σ_t s̃_{i,t},   L_bal = Σ_i f_i P_i

    per sequence of T real tokens (mask), minimum 1 at uniform routing. Multiply by α (1e-4 in
    V3, "extremely small"). Gradient flows through P only.

    Source: DeepSeek-V3 report (arXiv 2412.19437 §2.1.2, "Complementary Sequence-Wise Auxiliary Loss"; α = 1e-4 in §4.2). HF's DeepseekV3ForCausalLM
    computes no auxiliary loss, so there is no library oracle; tests check a NumPy transcription
    of the equations and the uniform minimum.

    Args:
      router_logits: float [*layers, B, T, E] (sigmoid router logits).
      expert_ids: int [*layers, B, T, k], the experts used (chosen on s + bias).
      mask: optional [B, T]; nonzero = real token. Sequences with no real token are left out of
        the mean.

    Returns:
      (loss, metrics): float32 scalar; metrics `per_sequence` [*layers, B] (0 for empty rows).

    Raises:
      ValueError: router_logits of rank below 3.
      AssertionError: (chex) ids / mask shapes that do not match.
    """
    z = jnp.asarray(router_logits).astype(jnp.float32)
    if z.ndim < 3:
        raise ValueError(f"router_logits must be [*layers, B, T, E], got shape {z.shape}")
    ids = jnp.asarray(expert_ids)
    chex.assert_shape(ids, z.shape[:-1] + (ids.shape[-1],))
    e, k = z.shape[-1], ids.shape[-1]
    lead, (b, t) = z.shape[:-3], z.shape[-3:-1]
    real = _token_mask(mask, (b, t), lead)  # [*L,B,T]
    s = jax.nn.sigmoid(jnp.where(real[..., None], z, 0.0))  # [*L,B,T,E]
    s_norm = s / jnp.sum(s, axis=-1, keepdims=True)
    n_real = jnp.sum(real.astype(jnp.float32), axis=-1)  # [*L,B]
    denom = jnp.maximum(n_real, 1.0)[..., None]  # [*L,B,1]
    hit = (ids[..., None] == jnp.arange(e)) & real[..., None, None]  # [*L,B,T,k,E]
    f = (e / k) * jnp.sum(hit.astype(jnp.float32), axis=(-3, -2)) / denom  # [*L,B,E]
    p = jnp.sum(jnp.where(real[..., None], s_norm, 0.0), axis=-2) / denom  # [*L,B,E]
    per_seq = jnp.sum(f * p, axis=-1)  # [*L,B]
    has = n_real > 0
    per_seq = jnp.where(has, per_seq, 0.0)
    loss = jnp.sum(per_seq) / jnp.maximum(jnp.sum(has.astype(jnp.float32)), 1.0)
    return loss, {"per_sequence": per_seq}


def expert_bias_update(bias: jax.Array, counts: jax.Array, *, gamma: float) -> jax.Array:
    """Auxiliary-loss-free load balancing: b_i ← b_i + γ·sign(c̄ − c_i), float32 [..., E].

    Overloaded experts (c_i > c̄) get a lower selection bias, underloaded ones a higher; an
    expert at exactly the mean is unchanged. Apply after every optimizer step, per MoE layer,
    with c the token counts of the whole global batch (`expert_load` summed over layers' own
    routing, all data shards). The bias changes only which experts are chosen, never the gate
    weights (`jaxalign.models.moe.route`).

    Source: DeepSeek-V3 report (arXiv 2412.19437 §2.1.2, "Auxiliary-Loss-Free Load Balancing"; §4.2:
    bias update speed γ = 0.001, 0 for the last 500B tokens); Wang et al. 2024, arXiv 2408.15664, Alg. 1; MaxText
    `moe.py:calculate_load_balance_updates`, Megatron `get_updated_expert_bias`.

    Args:
      bias: float32 [..., E] (one row per layer if stacked).
      counts: [..., E] token counts (int or float), same shape.
      gamma: update speed γ >= 0.

    Raises:
      AssertionError: (chex) bias and counts of different shapes.
      ValueError: gamma < 0.
    """
    chex.assert_equal_shape((bias, counts))
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    c = counts.astype(jnp.float32)
    step = jnp.sign(jnp.mean(c, axis=-1, keepdims=True) - c)
    return (bias.astype(jnp.float32) + gamma * step).astype(bias.dtype)


def routing_change_fraction(expert_ids: jax.Array, recorded_ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Fraction of (real token, MoE layer) pairs whose top-k expert *set* differs from a recorded
    one: float32 scalar in [0, 1].

      frac = Σ_{t,l} m_t · [set(I_{t,l}) ≠ set(R_{t,l})] / (L · Σ_t m_t)

    The comparison is order-insensitive (ids are compared as sets, so a route whose k experts
    are merely re-ranked has not changed: the k contributions are summed). An RL trainer
    compares the routes the params being updated choose with those recorded under the sampling
    policy (Routing Replay, "Stabilizing MoE RL by aligning training and inference routers",
    arXiv 2510.11370, measures the same train/inference router disagreement). Ids are assumed
    distinct within a row (as top-k makes them). Select semantics: masked tokens count nothing
    whatever their ids; 0 when no token is real.

    Args:
      expert_ids: int [*tokens, L, k] (e.g. [B, N, L, k]), the experts now chosen.
      recorded_ids: int [*tokens, L, k], the recorded ones.
      mask: [*tokens]; nonzero = real token.

    Returns:
      float32 scalar.

    Raises:
      AssertionError: (chex) ids of different shapes, or a mask that is not their token shape.
    """
    chex.assert_equal_shape((expert_ids, recorded_ids))
    chex.assert_shape(mask, expert_ids.shape[:-2])
    same = jnp.all(jnp.any(expert_ids[..., :, None] == recorded_ids[..., None, :], axis=-1), axis=-1)  # [*tok,L]
    real = jnp.broadcast_to((mask != 0)[..., None], same.shape)  # [*tok,L]
    changed = jnp.sum(jnp.where(real, (~same).astype(jnp.float32), 0.0))
    return changed / jnp.maximum(jnp.sum(real.astype(jnp.float32)), 1.0)
