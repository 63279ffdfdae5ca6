"""KTO: Kahneman-Tversky Optimisation on unpaired desirable / undesirable completions
(Ethayarajh et al. 2024, arXiv 2402.01306), as TRL's KTOTrainer computes it."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxalign.ops import masked_count, masked_mean, masked_sum, select


def _where(mask: jax.Array | None, like: jax.Array) -> jax.Array:
    return jnp.ones(like.shape, bool) if mask is None else mask.astype(bool)


def kto_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    policy_KL_logps: jax.Array,  # noqa: N803 - TRL's name
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    ref_KL_logps: jax.Array,  # noqa: N803 - TRL's name
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    chosen_where: jax.Array | None = None,
    rejected_where: jax.Array | None = None,
    kl_where: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """KTO loss (arXiv 2402.01306, Eq. 7 as TRL cites it) with the reference point z₀ estimated
    from mismatched (prompt, completion) pairs:

      z₀ = max(0, mean_j (log π(y'_j|x_j) − log π_ref(y'_j|x_j)))      (no gradient)
      desirable y:   ℓ = λ_D · (1 − σ(β·(log π/π_ref(y|x) − z₀)))
      undesirable y: ℓ = λ_U · (1 − σ(β·(z₀ − log π/π_ref(y|x))))
      L = (Σ_desirable ℓ + Σ_undesirable ℓ) / (#desirable + #undesirable)

    This is TRL 1.16.0's `KTOTrainer._compute_loss` with loss_type="kto" (kto_trainer.py lines
    1442-1481 and `losses.nanmean()` at line 1547): the KL estimate is detached, averaged over the
    KL batch (over all ranks in TRL) and clamped at 0; the loss is a plain mean over all
    completions of the batch, so λ_D / λ_U (TRL desirable_weight / undesirable_weight) are the
    knobs that rebalance unequal counts (TRL warns unless λ_D·n_D / (λ_U·n_U) is in [1, 4/3],
    lines 1165-1181).
    TRL builds the KL pairs by rotating the completions by one within the batch (x_i with
    y_{i−1}); any mismatched pairs of the same completions do.

    Args:
      policy_chosen_logps, ref_chosen_logps: float [Bc] summed completion log-probs (nats) of the
        desirable examples under the policy and the frozen reference.
      policy_rejected_logps, ref_rejected_logps: float [Br] the same for the undesirable ones
        (Bc, Br may be 0).
      policy_KL_logps, ref_KL_logps: float [Bk] the same for the mismatched KL pairs.
      beta: β > 0 (TRL default 0.1).
      desirable_weight, undesirable_weight: λ_D, λ_U ≥ 0 (TRL default 1.0).
      chosen_where, rejected_where, kl_where: optional [Bc] / [Br] / [Bk] masks (selected: an
        unselected entry, NaN included, changes nothing); a fixed-shape trainer passes all B
        log-probs as both chosen and rejected with `label` and `~label`.

    Returns:
      (loss, metrics): float32 scalar (0 for an empty batch); metrics `loss`, `kl` (z₀),
      `chosen_rewards`, `rejected_rewards` (means of β·log π/π_ref, detached, TRL's
      rewards/chosen and rewards/rejected; 0 when there are none), `reward_margin` (their
      difference), `num_chosen`, `num_rejected`.

    Raises:
      AssertionError: (chex) inputs not rank 1, or policy / reference / mask shapes that differ.
      ValueError: beta <= 0 or a negative weight.
    """
    chex.assert_rank((policy_chosen_logps, policy_rejected_logps, policy_KL_logps), 1)
    chex.assert_equal_shape((policy_chosen_logps, ref_chosen_logps))
    chex.assert_equal_shape((policy_rejected_logps, ref_rejected_logps))
    chex.assert_equal_shape((policy_KL_logps, ref_KL_logps))
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(f"weights must be >= 0, got {desirable_weight}, {undesirable_weight}")
    c_where, r_where = _where(chosen_where, policy_chosen_logps), _where(rejected_where, policy_rejected_logps)
    k_where = _where(kl_where, policy_KL_logps)
    chex.assert_equal_shape((policy_chosen_logps, c_where))
    chex.assert_equal_shape((policy_rejected_logps, r_where))
    chex.assert_equal_shape((policy_KL_logps, k_where))

    def log_ratio(policy, ref, where):  # selected before the subtraction: NaN cannot leak
        return select(where, policy.astype(jnp.float32)) - select(where, ref.astype(jnp.float32))

    kl = jax.lax.stop_gradient(
        jnp.maximum(masked_mean(log_ratio(policy_KL_logps, ref_KL_logps, k_where), k_where), 0.0)
    )
    chosen = log_ratio(policy_chosen_logps, ref_chosen_logps, c_where)  # [Bc]
    rejected = log_ratio(policy_rejected_logps, ref_rejected_logps, r_where)  # [Br]
    chosen_losses = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (chosen - kl)))
    rejected_losses = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (kl - rejected)))
    n_chosen, n_rejected = masked_count(c_where), masked_count(r_where)
    total = masked_sum(chosen_losses, c_where) + masked_sum(rejected_losses, r_where)
    loss = total / jnp.maximum(n_chosen + n_rejected, 1.0)
    chosen_rewards = masked_mean(jax.lax.stop_gradient(beta * chosen), c_where)
    rejected_rewards = masked_mean(jax.lax.stop_gradient(beta * rejected), r_where)
    return loss, {
        "loss": loss,
        "kl": kl,
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "reward_margin": chosen_rewards - rejected_rewards,
        "num_chosen": n_chosen,
        "num_rejected": n_rejected,
    }


__all__ = ["kto_loss"]
