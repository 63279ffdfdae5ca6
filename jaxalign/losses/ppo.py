"""PPO's clipped policy and value losses (Schulman et al. 2017, arXiv 1707.06347), per token.

Both are token means over the masked response tokens of the batch, as in TRL's PPOTrainer
(`masked_mean`) and OpenRLHF; `loss_sum` and `num_tokens` are returned too so that callers
splitting a batch into micro-batches can form the same mean.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxalign.ops import masked_count, masked_mean, masked_sum, select


def ppo_policy_loss(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_eps: float = 0.2,
    dual_clip: float | None = None,
    log_ratio_clip: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped surrogate objective, negated: L = mean_t max(−A_t·ρ_t, −A_t·clip(ρ_t, 1−ε, 1+ε)),
    ρ_t = exp(log π(a_t) − log π_old(a_t))  (PPO paper, Eq. 7).

    Dual-clip PPO (Ye et al. 2020, arXiv 1912.09729, §"Dual-clip PPO") bounds the loss of a
    negative-advantage token whose ratio has grown large: with `dual_clip` = c > 1, A_t < 0 gets
    min(max(−A_t·ρ_t, −A_t·clip(ρ_t, 1−ε, 1+ε)), −c·A_t) (no gradient once the bound is active).
    `log_ratio_clip` = κ clamps log ρ to [−κ, κ] before the exp (gradient 0 outside, as
    `torch.clamp`); veRL uses κ = 20 always. Both follow verl 0.9.1
    verl/trainer/ppo/core_algos.py `compute_policy_loss_vanilla` (lines 1336-1358: clip_ratio_c,
    default 3.0 there, and the [−20, 20] clamp of `negative_approx_kl`, both always on: veRL's
    loss is dual_clip=3.0, log_ratio_clip=20.0 here); with both None (default) the loss is the
    plain PPO one, unchanged.

    Args:
      logps: float [B, T] log-probs of the taken tokens under the policy being optimised.
      old_logps: float [B, T] the same under the policy that sampled them (constants).
      advantages: float [B, T] per-token advantages (e.g. whitened GAE).
      mask: [B, T] 1.0 on response tokens (selected: padding may hold anything, NaN included).
      clip_eps: ε.
      dual_clip: c > 1 (veRL clip_ratio_c), or None for no dual clip.
      log_ratio_clip: κ > 0 (veRL: 20), or None for no clamp.

    Returns:
      (loss, metrics): float32 scalar; metrics `loss`, `loss_sum`, `num_tokens`, `clip_fraction`
      (tokens where the clipped term was the active one; veRL pg_clipfrac), `dual_clip_fraction`
      (tokens with A < 0 where the dual-clip bound was the active one; veRL pg_clipfrac_lower;
      0 without dual_clip), `approx_kl` (½·mean (log ρ)², TRL's estimator, of the clamped log ρ),
      `ratio` (mean ρ).

    Raises:
      AssertionError: (chex) mismatched ranks or shapes.
      ValueError: clip_eps <= 0, dual_clip <= 1 or log_ratio_clip <= 0.
    """
    chex.assert_rank(logps, 2)
    chex.assert_equal_shape((logps, old_logps, advantages, mask))
    if clip_eps <= 0:
        raise ValueError(f"clip_eps must be positive, got {clip_eps}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (Ye et al. 2020; veRL asserts clip_ratio_c > 1), got {dual_clip}")
    if log_ratio_clip is not None and log_ratio_clip <= 0:
        raise ValueError(f"log_ratio_clip must be positive, got {log_ratio_clip}")
    # Select before exp: NaN/inf at masked positions must reach neither the loss nor its gradient.
    logps, old_logps, advantages = (select(mask, x.astype(jnp.float32)) for x in (logps, old_logps, advantages))
    log_ratio = logps - old_logps  # [B,T]
    if log_ratio_clip is not None:  # torch.clamp, gradient included: 1 on [−κ, κ], 0 outside
        log_ratio = jnp.where(jnp.abs(log_ratio) > log_ratio_clip, jnp.sign(log_ratio) * log_ratio_clip, log_ratio)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = jnp.maximum(unclipped, clipped)  # [B,T]
    dual_active = jnp.zeros(per_token.shape, bool)
    if dual_clip is not None:
        bound = -advantages * dual_clip  # [B,T], > 0 where A < 0
        dual_active = (advantages < 0) & (per_token > bound)
        per_token = jnp.where(dual_active, bound, per_token)
    loss_sum = masked_sum(per_token, mask)
    num_tokens = masked_count(mask)
    loss = loss_sum / jnp.maximum(num_tokens, 1.0)
    return loss, {
        "loss": loss,
        "loss_sum": loss_sum,
        "num_tokens": num_tokens,
        "clip_fraction": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "dual_clip_fraction": masked_mean(dual_active.astype(jnp.float32), mask),
        "approx_kl": 0.5 * masked_mean(jnp.square(log_ratio), mask),
        "ratio": masked_mean(ratio, mask),
    }


def ppo_value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    *,
    clip_eps: float = 0.2,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped value loss: ½·mean_t max((V_t − R_t)², (V_old,t + clip(V_t − V_old,t, ±ε) − R_t)²)
    (PPO as implemented in OpenAI baselines ppo2 and TRL's PPOTrainer `vf_coef` term).

    Args:
      values: float [B, T] current value predictions.
      old_values: float [B, T] predictions at rollout time (constants).
      returns: float [B, T] targets (e.g. GAE returns).
      mask: [B, T] 1.0 on response tokens.
      clip_eps: ε for the value clip (same units as the values).

    Returns:
      (loss, metrics): float32 scalar; metrics `loss`, `loss_sum`, `num_tokens`, `clip_fraction`
      (tokens where the clipped error was the larger one).

    Raises:
      AssertionError: (chex) mismatched ranks or shapes.
      ValueError: clip_eps <= 0.
    """
    chex.assert_rank(values, 2)
    chex.assert_equal_shape((values, old_values, returns, mask))
    if clip_eps <= 0:
        raise ValueError(f"clip_eps must be positive, got {clip_eps}")
    values, old_values, returns = (select(mask, x.astype(jnp.float32)) for x in (values, old_values, returns))
    clipped_values = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
    err, err_clipped = jnp.square(values - returns), jnp.square(clipped_values - returns)
    per_token = 0.5 * jnp.maximum(err, err_clipped)  # [B,T]
    loss_sum = masked_sum(per_token, mask)
    num_tokens = masked_count(mask)
    loss = loss_sum / jnp.maximum(num_tokens, 1.0)
    return loss, {
        "loss": loss,
        "loss_sum": loss_sum,
        "num_tokens": num_tokens,
        "clip_fraction": masked_mean((err_clipped > err).astype(jnp.float32), mask),
    }
