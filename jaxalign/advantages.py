"""Advantage estimators and KL estimators shared by the RL losses and trainers (pure functions).

Shapes: B sequences, T response tokens, G samples per prompt. `mask` is 1.0 on response tokens
that count, 0.0 on padding; a response occupies a prefix of its row's masked positions.
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp

from jaxalign.ops import last_token_index, masked_var, masked_whiten, select

__all__ = [  # masked_whiten and last_token_index live in jaxalign.ops; re-exported for one release
    "KLKind", "explained_variance", "gae", "group_advantages", "kl_penalty", "last_token_index",
    "masked_whiten", "ppo_token_rewards", "rloo_advantages",
]


def gae(
    rewards: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over each response (Schulman et al. 2016, arXiv
    1506.02438, Eq. 16), computed right to left with `jax.lax.scan(..., reverse=True)`.

      δ_t = r_t + γ·m_{t+1}·V_{t+1} − V_t,    A_t = δ_t + γλ·m_{t+1}·A_{t+1},    R_t = A_t + V_t

    The value after the last response token is 0 (the episode ends), as in TRL's PPOTrainer and
    OpenRLHF; masked positions get advantage and return 0.

    Args:
      rewards: float [B, T] per-token rewards (e.g. −β·KL, plus the score at the last token).
      values: float [B, T] value estimates V(s_t).
      mask: [B, T] 1.0 on response tokens.
      gamma: discount γ in [0, 1].
      lam: GAE λ in [0, 1].

    Returns:
      (advantages [B, T], returns [B, T]), float32.

    Raises:
      AssertionError: (chex) rewards not rank 2, or values / mask of another shape.
    """
    chex.assert_rank(rewards, 2)
    chex.assert_equal_shape((rewards, values, mask))
    # Select, then compute: padding may hold anything (NaN included) and must not reach the scan.
    rewards, values = select(mask, rewards.astype(jnp.float32)), select(mask, values.astype(jnp.float32))
    counts = mask.astype(bool)
    next_mask = jnp.concatenate([counts[:, 1:], jnp.zeros_like(counts[:, :1])], axis=1)  # [B,T]
    next_values = select(next_mask, jnp.concatenate([values[:, 1:], values[:, :1]], axis=1))  # [B,T]
    deltas = rewards + gamma * next_values - values  # [B,T]

    def step(carry, xs):
        delta, m_next = xs  # [B], [B] bool
        advantage = delta + gamma * lam * jnp.where(m_next, carry, 0.0)
        return advantage, advantage

    _, advantages = jax.lax.scan(
        step, jnp.zeros(rewards.shape[0], jnp.float32), (deltas.T, next_mask.T), reverse=True
    )
    advantages = select(mask, advantages.T)  # [B,T]
    return advantages, select(mask, advantages + values)


KLKind = Literal["k1", "k2", "k3", "low_var_kl"]
"""The per-token KL estimators of `kl_penalty`."""

_LOW_VAR_KL_LOG_RATIO_CLAMP = 20.0
"""veRL clamps log π_ref/π to ±20 before the exp of its "low_var_kl" (exp(20) ≈ 4.9e8)."""
_LOW_VAR_KL_VALUE_CLAMP = 10.0
"""veRL clamps the per-token "low_var_kl" value to [−10, 10]."""


def _clamp(x: jax.Array, low: float, high: float) -> jax.Array:
    """`torch.clamp(x, low, high)` including its gradient: 1 on the closed interval [low, high],
    0 outside (`jnp.clip` passes ½ at the end points, where its max/min tie)."""
    return jnp.where(x < low, low, jnp.where(x > high, high, x))


def kl_penalty(logps: jax.Array, ref_logps: jax.Array, *, kind: KLKind = "k1") -> jax.Array:
    """Per-token estimators of KL(π ‖ π_ref) from log-probs of tokens sampled from π
    (Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html).

      k1 = log π − log π_ref                          (unbiased, can be negative)
      k2 = ½ (log π − log π_ref)²                     (biased, low variance)
      k3 = exp(log π_ref − log π) − (log π_ref − log π) − 1   (unbiased, always ≥ 0; GRPO's KL,
                                                       DeepSeekMath arXiv 2402.03300 Eq. 4)
      low_var_kl = clamp(k3 with x = clamp(log π_ref − log π, ±20), −10, 10)

    "low_var_kl" is veRL's name for k3 as it computes it (verl 0.9.1,
    verl/trainer/ppo/core_algos.py `kl_penalty_forward`, lines 2239-2245; the same branch serves
    its "k3"): the log-ratio is clamped to [−20, 20] before the exp, the per-token value to
    [−10, 10]. Since k3 ≥ 0 only the upper clamp can bind: at log π_ref/π ≳ 2.6 (π_ref/π ≳ 13.6)
    or ≲ −11. Gradient: where neither clamp binds it is k3's, ∂/∂log π = 1 − π_ref/π; where one
    binds (strictly outside the interval) it is 0, as `torch.clamp`'s (the end points themselves
    pass the gradient, as in torch). The clamped value is no longer an unbiased estimate of the
    KL; it bounds what one outlier token can add to a reward or loss. veRL's `exp(x) − x − 1` is
    computed here as `expm1(x) − x` (same value up to rounding, exact near x = 0). veRL's "+"
    variants (straight-through k2 gradient, "k3+") are not provided.

    Args:
      logps, ref_logps: float [B, T] log-probs (nats) of the sampled tokens under π and π_ref.
      kind: "k1", "k2", "k3" or "low_var_kl".

    Returns:
      float32 [B, T] (apply the mask yourself: select, e.g. `ppo_token_rewards`).

    Raises:
      AssertionError: (chex) logps and ref_logps of different shapes.
      ValueError: unknown kind.
    """
    chex.assert_equal_shape((logps, ref_logps))
    log_ratio = logps.astype(jnp.float32) - ref_logps.astype(jnp.float32)  # log π/π_ref
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio)
    if kind == "k3":
        return jnp.expm1(-log_ratio) + log_ratio
    if kind == "low_var_kl":
        x = _clamp(-log_ratio, -_LOW_VAR_KL_LOG_RATIO_CLAMP, _LOW_VAR_KL_LOG_RATIO_CLAMP)  # log π_ref/π
        return _clamp(jnp.expm1(x) - x, -_LOW_VAR_KL_VALUE_CLAMP, _LOW_VAR_KL_VALUE_CLAMP)
    raise ValueError(f"kind must be 'k1', 'k2', 'k3' or 'low_var_kl', got {kind!r}")


def group_advantages(
    rewards: jax.Array,
    *,
    group_size: int,
    scale: Literal["group", "batch", "none"] = "group",
    eps: float = 1e-4,
) -> jax.Array:
    """Group-relative advantages of GRPO (DeepSeekMath, arXiv 2402.03300, §4.1.2):
    A_i = (r_i − mean(r_group)) / (std + eps).

    Rewards come prompt-major: the G samples of prompt p are entries p·G … p·G + G − 1. The std is
    the unbiased one (torch.std, as TRL's GRPOTrainer computes it); `scale` = "group" divides by
    each group's std (GRPO), "batch" by the whole batch's (TRL scale_rewards="batch", Hu et al.
    REINFORCE++), "none" not at all (Dr. GRPO, arXiv 2503.20783 §3.1).

    Args:
      rewards: float [B·G] one scalar per sample.
      group_size: G ≥ 2.
      scale: "group", "batch" or "none".
      eps: added to the std (TRL: 1e-4).

    Returns:
      float32 [B·G].

    Raises:
      AssertionError: (chex) rewards not rank 1.
      ValueError: G < 2, a length not divisible by G, or an unknown scale.
    """
    chex.assert_rank(rewards, 1)
    if group_size < 2 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards of length {rewards.shape[0]} do not split into groups of {group_size} >= 2")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    grouped = rewards.astype(jnp.float32).reshape(-1, group_size)  # [B,G]
    centred = grouped - jnp.mean(grouped, axis=1, keepdims=True)
    if scale == "group":
        centred = centred / (jnp.std(grouped, axis=1, keepdims=True, ddof=1) + eps)
    elif scale == "batch":
        centred = centred / (jnp.std(grouped, ddof=1) + eps)
    return centred.reshape(-1)


def rloo_advantages(rewards: jax.Array, *, group_size: int) -> jax.Array:
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024, arXiv
    2402.14740, Eq. 6): A_i = r_i − mean_{j≠i} r_j = G/(G−1)·(r_i − mean(r_group)).

    Args:
      rewards: float [B·G], prompt-major as in `group_advantages`.
      group_size: G ≥ 2.

    Returns:
      float32 [B·G].

    Raises:
      ValueError: G < 2 or a length not divisible by G.
    """
    centred = group_advantages(rewards, group_size=group_size, scale="none")
    return centred * (group_size / (group_size - 1))


def ppo_token_rewards(
    scores: jax.Array,
    logps: jax.Array,
    ref_logps: jax.Array,
    mask: jax.Array,
    *,
    kl_coef: float | jax.Array,
    kind: KLKind = "k1",
) -> tuple[jax.Array, jax.Array]:
    """Per-token RLHF rewards: r_t = −β·KL_t, plus the sequence score at the last response token
    (Ziegler et al. 2019, arXiv 1909.08593, Eq. 2; InstructGPT arXiv 2203.02155 Eq. 2; TRL's
    PPOTrainer and OpenRLHF `compute_reward` put the score at the last non-padding token the same
    way).

    Args:
      scores: float [B] reward-model (or rule) score of each response.
      logps: float [B, T] log-probs of the response tokens under the sampling policy.
      ref_logps: float [B, T] the same under the frozen reference.
      mask: [B, T] 1.0 on response tokens (a prefix of each row).
      kl_coef: β ≥ 0 (float or traced scalar: the adaptive controller changes it between rollouts).
      kind: KL estimator (`kl_penalty`): TRL and OpenRLHF default to "k1"; "k3" is never negative;
        "low_var_kl" is veRL's clamped k3.

    Returns:
      (rewards float32 [B, T], kl float32 [B, T]), both 0 where mask is 0. An all-zero mask row
      gets no score.

    Raises:
      AssertionError: (chex) scores not rank 1, or logps / ref_logps / mask of different shapes.
    """
    chex.assert_rank(scores, 1)
    chex.assert_equal_shape((logps, ref_logps, mask))
    kl = select(mask, kl_penalty(select(mask, logps), select(mask, ref_logps), kind=kind))  # [B,T]
    last = last_token_index(mask)  # [B], -1: empty row
    at_last = jnp.arange(mask.shape[1])[None, :] == last[:, None]  # [B,T]
    rewards = -kl_coef * kl + select(at_last, jnp.broadcast_to(scores.astype(jnp.float32)[:, None], kl.shape))
    return rewards, kl


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """1 − Var[R − V] / Var[R] over the masked entries (the critic diagnostic of OpenAI baselines
    and TRL's PPOTrainer): 1 is a perfect critic, 0 no better than a constant, < 0 worse.

    Args:
      values, returns: float [B, T]; mask: [B, T] 1.0 on entries that count.

    Returns:
      float32 scalar (NaN when the returns have zero variance).

    Raises:
      AssertionError: (chex) values, returns and mask of different shapes.
    """
    chex.assert_equal_shape((values, returns, mask))
    returns = select(mask, returns.astype(jnp.float32))
    residuals = returns - select(mask, values.astype(jnp.float32))
    return 1.0 - masked_var(residuals, mask, unbiased=False) / masked_var(returns, mask, unbiased=False)
