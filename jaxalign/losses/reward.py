"""Pairwise (Bradley–Terry) reward-model loss.

InstructGPT (Ouyang et al. 2022, arXiv 2203.02155, Eq. 1) trains the reward model r on pairs of
answers to one prompt with  loss = −log σ(r(x, y_chosen) − r(x, y_rejected)): the Bradley–Terry
model P(chosen ≻ rejected) = σ(r_c − r_r) fitted by maximum likelihood. Llama 2 (arXiv
2307.09288, Eq. 2) subtracts a margin m(r) that grows with the annotators' preference strength;
Eisenstein et al. 2023 (arXiv 2312.09244) add a centering term λ·(r_c + r_r)² that pins the
rewards' mean near 0 (TRL's `center_rewards_coefficient`). This matches TRL RewardTrainer's
`compute_loss` term for term.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxalign.ops import masked_mean, select


def pairwise_reward_loss(
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
    *,
    margin: jax.Array | float | None = None,
    center_coef: float = 0.0,
    where: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = mean_i [−log σ(r_c,i − r_r,i − m_i)] + λ · mean_i (r_c,i + r_r,i)².

    Args:
      chosen_rewards: float [B] reward-model scores of the preferred answers.
      rejected_rewards: float [B] scores of the dispreferred answers.
      margin: optional m, a float or float [B] (Llama 2's preference-strength margin).
      center_coef: λ ≥ 0 (0 disables centering).
      where: optional [B] bool/float, 0 on padding pairs of a static-shape batch (excluded from
        every mean).

    Returns:
      (loss, metrics): float32 scalar; metrics `loss`, `accuracy` (share of pairs with r_c > r_r;
      ties count as wrong), `margin` (mean r_c − r_r), `chosen_rewards`, `rejected_rewards`
      (means).

    Raises:
      AssertionError: (chex) inputs that are not two equal-shaped [B] vectors.
      ValueError: center_coef < 0.
    """
    chex.assert_rank((chosen_rewards, rejected_rewards), 1)
    chex.assert_equal_shape((chosen_rewards, rejected_rewards))
    if center_coef < 0:
        raise ValueError(f"center_coef must be >= 0, got {center_coef}")
    # Padding pairs (where == 0) are selected to 0 first, so NaN there reaches no loss or gradient.
    keep = jnp.ones(chosen_rewards.shape, bool) if where is None else where
    chosen = select(keep, chosen_rewards.astype(jnp.float32))
    rejected = select(keep, rejected_rewards.astype(jnp.float32))
    diff = chosen - rejected  # [B]
    logits = diff if margin is None else diff - jnp.asarray(margin, jnp.float32)
    per_pair = -jax.nn.log_sigmoid(logits)  # [B]
    if center_coef:
        per_pair = per_pair + center_coef * jnp.square(chosen + rejected)
    loss = masked_mean(per_pair, where)
    return loss, {
        "loss": loss,
        "accuracy": masked_mean((diff > 0).astype(jnp.float32), where),
        "margin": masked_mean(diff, where),
        "chosen_rewards": masked_mean(chosen, where),
        "rejected_rewards": masked_mean(rejected, where),
    }
