"""GRPO and its successors as one clipped-ratio policy loss with explicit choices.

  ρ      importance ratio π/π_old: per token (GRPO, DeepSeekMath arXiv 2402.03300 Eq. 3), per
         sequence as exp of the length-mean log-ratio (GSPO, arXiv 2507.18071 Eq. 7), or GSPO-token
         (value of the sequence ratio, gradient of each token; GSPO Eq. 13).
  clip   ρ clipped to [1 − ε_low, 1 + ε_high] (DAPO's decoupled "clip-higher", arXiv 2503.14476).
  KL     + β·KL(π‖π_ref) per token with the k1/k2/k3 estimator (GRPO: k3).
  agg    how per-token losses become a scalar (m the mask; the peers, checked in `grpo_loss`):
           "token_mean"              Σ_{i,t} m·ℓ / Σ_{i,t} m           = verl token-mean, TRL dapo (DAPO)
           "seq_mean_token_mean"     mean_i Σ_t m·ℓ / max(Σ_t m, 1)    = TRL grpo (verl seq-mean-token-mean
                                                                       drops token-less rows from the mean)
           "seq_mean_token_sum_norm" Σ_{i,t} m·ℓ / (B · L_max)         = TRL dr_grpo (Dr. GRPO, arXiv
                                                                       2503.20783); verl seq-mean-token-
                                                                       sum-norm is B times this

Every mode is `loss_sum / denominator` with both terms additive over examples, so a batch split
into micro-batches (or sharded across devices) reproduces the whole batch's loss and gradient
exactly when each part divides its `loss_sum` by the whole batch's denominator
(`grpo_denominator(mask, ...)`, passed as `denominator=`).
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp

from jaxalign.advantages import KLKind, kl_penalty
from jaxalign.ops import masked_count, masked_mean, masked_sum, select

LossAgg = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
ImportanceLevel = Literal["token", "sequence", "sequence_token"]


def _per_sequence_terms(
    per_token: jax.Array, mask: jax.Array, loss_agg: LossAgg, max_length: int | None
) -> jax.Array:
    """Each example's additive share of `loss_sum` under `loss_agg`: float32 [B]."""
    token_sums = masked_sum(per_token, mask, axis=-1)  # [B]
    if loss_agg == "seq_mean_token_mean":
        return token_sums / jnp.maximum(masked_count(mask, axis=-1), 1.0)
    if loss_agg == "seq_mean_token_sum_norm":
        return token_sums / max_length
    return token_sums


def grpo_denominator(
    mask: jax.Array, *, loss_agg: LossAgg = "seq_mean_token_mean", where: jax.Array | None = None
) -> jax.Array:
    """The denominator of `loss_agg` for a (whole) batch: counted tokens for "token_mean",
    counted sequences otherwise. float32 scalar.

    Args:
      mask: [B, T] 1.0 on completion tokens.
      loss_agg: the aggregation mode.
      where: optional [B]; rows with 0 are excluded (batch padding).
    """
    rows = jnp.ones(mask.shape[:1], bool) if where is None else where.astype(bool)
    if loss_agg == "token_mean":
        return masked_count(mask.astype(bool) & rows[:, None])
    return masked_count(rows)


def grpo_loss(
    logps: jax.Array,
    old_logps: jax.Array,
    ref_logps: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    beta: float = 0.04,
    kl_kind: KLKind = "k3",
    loss_agg: LossAgg = "seq_mean_token_mean",
    importance_level: ImportanceLevel = "token",
    max_length: int | None = None,
    denominator: jax.Array | None = None,
    where: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped group-relative policy loss with optional KL to a reference.

    Per token: ℓ_{i,t} = −min(ρ_{i,t}·A_i, clip(ρ_{i,t}, 1−ε_low, 1+ε_high)·A_i) + β·KL_{i,t},
    aggregated by `loss_agg` (module docstring). Defaults are GRPO's (DeepSeekMath: ε = 0.2,
    β = 0.04, k3 KL, per-sequence token mean), which is TRL's `loss_type="grpo"`.

    Args:
      logps: float [B, T] log-probs of the sampled completion tokens under the current policy.
      old_logps: float [B, T] the same under the sampling policy (constants; equal to `logps`
        values on the first inner iteration, which makes ρ = 1).
      ref_logps: float [B, T] under the frozen reference, or None when beta == 0.
      advantages: float [B] one advantage per completion (e.g. `group_advantages`).
      mask: [B, T] 1.0 on completion tokens.
      clip_eps: ε_low (and ε_high unless given).
      clip_eps_high: ε_high (DAPO: 0.28).
      beta: KL coefficient β (0 disables the KL term; DAPO and Dr. GRPO use 0).
      kl_kind: KL estimator, k1 | k2 | k3 | low_var_kl (see `jaxalign.advantages.kl_penalty`).
      loss_agg: "token_mean", "seq_mean_token_mean" or "seq_mean_token_sum_norm". Checked
        against the peers' code: verl b178a3c (0.8.0.dev, 2026-01-29) `agg_loss` in
        verl/trainer/ppo/core_algos.py, and TRL f2cd577 (1.10.0.dev0, 2026-07-24)
        `GRPOTrainer._compute_loss` in trl/trainer/grpo_trainer.py; here with the whole batch's
        `denominator=` (B rows, m the mask):
        "token_mean" Σ m·ℓ / Σ m equals verl "token-mean" (Σ m·ℓ / batch_num_tokens · dp_size,
          the global token count; dp_size undoes the data-parallel gradient mean) and TRL
          "dapo" (Σ m·ℓ / (num_items_in_batch / num_processes), the generation batch's token
          count). TRL "bnpo" divides each micro-batch by its own token count (then by the
          accumulation steps): equal with one micro-batch, else a mean of micro-batch means.
        "seq_mean_token_mean" (1/B) Σ_i Σ_t m·ℓ / max(Σ_t m, 1) equals TRL "grpo" (per
          micro-batch, then / accumulation steps: equal for equal-size micro-batches). verl
          "seq-mean-token-mean" divides by Σ_t m + 1e-8 and averages over the rows that have a
          token only (global_batch_size defaults to those): equal when every row has one; with
          e token-less rows verl's is B / (B − e) times this.
        "seq_mean_token_sum_norm" Σ m·ℓ / (B · max_length) equals TRL "dr_grpo"
          (Σ m·ℓ / (B · max_completion_length), per micro-batch as for "grpo") with max_length =
          max_completion_length. verl "seq-mean-token-sum-norm" is Σ m·ℓ / loss_scale_factor
          (default: the padded response width) with no division by B: with loss_scale_factor =
          max_length, B times this (B the rows of its call), not the same loss.
        verl's "seq-mean-token-sum" (mean_i Σ_t m·ℓ) has no mode here.
      importance_level: "token", "sequence" (GSPO) or "sequence_token" (GSPO-token).
      max_length: L_max, required by "seq_mean_token_sum_norm" (the generation budget).
      denominator: divide `loss_sum` by this (the whole batch's `grpo_denominator`) instead of
        this batch's own; use when the batch is one micro-batch or shard of a larger one.
      where: optional bool/float [B]; rows with 0 contribute nothing (batch padding).

    Returns:
      (loss, metrics): float32 scalar; metrics `loss`, `loss_sum`, `denominator`, `kl` (mean
      per-token KL estimate), `ratio` (mean ρ over tokens), `clip_fraction_low` (tokens with
      A < 0 and ρ < 1 − ε_low, whose gradient the clip removes), `clip_fraction_high` (A > 0 and
      ρ > 1 + ε_high).

    Raises:
      AssertionError: (chex) logps not rank 2, old_logps / mask of another shape, or advantages
        not [B].
      ValueError: unknown loss_agg / importance_level, beta > 0 without ref_logps,
        "seq_mean_token_sum_norm" without max_length.
    """
    chex.assert_rank(logps, 2)
    chex.assert_equal_shape((logps, old_logps, mask))
    chex.assert_shape(advantages, logps.shape[:1])
    if loss_agg not in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        raise ValueError(f"unknown loss_agg {loss_agg!r}")
    if importance_level not in ("token", "sequence", "sequence_token"):
        raise ValueError(f"unknown importance_level {importance_level!r}")
    if beta and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps")
    if loss_agg == "seq_mean_token_sum_norm" and not max_length:
        raise ValueError("loss_agg='seq_mean_token_sum_norm' (Dr. GRPO) needs max_length")
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high

    rows = jnp.ones(logps.shape[:1], bool) if where is None else where.astype(bool)
    mask = mask.astype(bool) & rows[:, None]  # [B,T] bool: counted tokens of counted rows
    # Select before exp: NaN/inf at masked positions or rows must reach neither loss nor gradient.
    logps, old_logps = select(mask, logps.astype(jnp.float32)), select(mask, old_logps.astype(jnp.float32))
    advantages = select(rows, advantages.astype(jnp.float32))  # [B]
    log_ratio = logps - old_logps  # [B,T]
    if importance_level != "token":
        seq_log_ratio = masked_mean(log_ratio, mask, axis=-1)  # [B]
        if importance_level == "sequence":
            log_ratio = jnp.broadcast_to(seq_log_ratio[:, None], log_ratio.shape)
        else:  # value of the sequence ratio, gradient through each token's own log-prob
            log_ratio = jax.lax.stop_gradient(seq_log_ratio)[:, None] + logps - jax.lax.stop_gradient(logps)
    ratio = jnp.exp(log_ratio)  # [B,T]
    adv = advantages.astype(jnp.float32)[:, None]  # [B,1]
    per_token = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv)
    kl = jnp.zeros_like(per_token)
    if ref_logps is not None:
        kl = kl_penalty(logps, select(mask, ref_logps.astype(jnp.float32)), kind=kl_kind)  # [B,T]
        if beta:
            per_token = per_token + beta * kl

    loss_sum = jnp.sum(_per_sequence_terms(per_token, mask, loss_agg, max_length))
    if denominator is None:
        denominator = grpo_denominator(mask, loss_agg=loss_agg, where=rows)
    loss = loss_sum / jnp.maximum(denominator, 1e-8)
    ratio_value = jax.lax.stop_gradient(ratio)
    return loss, {
        "loss": loss,
        "loss_sum": loss_sum,
        "denominator": jnp.asarray(denominator, jnp.float32),
        "kl": masked_mean(kl, mask),
        "ratio": masked_mean(ratio_value, mask),
        "clip_fraction_low": masked_mean(((ratio_value < 1 - eps_low) & (adv < 0)).astype(jnp.float32), mask),
        "clip_fraction_high": masked_mean(((ratio_value > 1 + eps_high) & (adv > 0)).astype(jnp.float32), mask),
    }
