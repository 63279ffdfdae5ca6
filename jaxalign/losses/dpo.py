"""Direct Preference Optimization and its variants (IPO, hinge/SLiC, robust/cDPO-style).

Every variant is a function of the implicit-reward logit
`h = (log π(y_w|x) - log π(y_l|x)) - (log π_ref(y_w|x) - log π_ref(y_l|x))`
computed from summed completion log-probs (IPO: length-averaged ones, as TRL passes them).
The four losses follow the formulas of TRL's `DPOTrainer.dpo_loss` for loss_type in {"sigmoid",
"ipo", "hinge", "robust"}, checked against an independent float64 NumPy transcription of them
(tests/losses/test_dpo.py), not against a running TRL. Sigmoid with label_smoothing ε > 0 is the
conservative DPO of Mitchell 2023 ("A note on DPO with noisy preferences"); current TRL no longer
offers it under loss_type "sigmoid", so no TRL parity is claimed for that case.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

from jaxalign.ops import masked_mean, select


def _sigmoid(h: jax.Array, beta: float, eps: float) -> jax.Array:
    # DPO, Rafailov et al. 2023 (arXiv 2305.18290) Eq. 7; with ε > 0 the conservative DPO
    # label-smoothing of Mitchell 2023 (cDPO; older TRL's "sigmoid" with label_smoothing).
    return -jax.nn.log_sigmoid(beta * h) * (1 - eps) - jax.nn.log_sigmoid(-beta * h) * eps


def _robust(h: jax.Array, beta: float, eps: float) -> jax.Array:
    # Robust DPO, Chowdhury et al. 2024 (arXiv 2403.00409) Eq. 8: unbiased under label-flip rate ε.
    return (-jax.nn.log_sigmoid(beta * h) * (1 - eps) + jax.nn.log_sigmoid(-beta * h) * eps) / (
        1 - 2 * eps
    )


def _hinge(h: jax.Array, beta: float, eps: float) -> jax.Array:
    # SLiC-HF, Zhao et al. 2023 (arXiv 2305.10425) Eq. 2 on the reference-normalised margin.
    del eps
    return jax.nn.relu(1.0 - beta * h)


def _ipo(h: jax.Array, beta: float, eps: float) -> jax.Array:
    # IPO, Azar et al. 2023 (arXiv 2310.12036) Eq. 17: regress h onto 1/(2β) (β is their τ).
    del eps
    return (h - 1.0 / (2.0 * beta)) ** 2


DPO_LOSSES: dict[str, Callable[[jax.Array, float, float], jax.Array]] = {
    "sigmoid": _sigmoid,
    "robust": _robust,
    "hinge": _hinge,
    "ipo": _ipo,
}


def dpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    where: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPO-family preference loss from completion log-probs of policy and frozen reference.

    With `h = (c - r) - (c_ref - r_ref)` (all [B]) the per-pair losses are
      sigmoid: -(1-ε)·log σ(β h) - ε·log σ(-β h)                  (DPO, arXiv 2305.18290, Eq. 7)
      robust:  ((1-ε)·(-log σ(β h)) + ε·log σ(-β h)) / (1 - 2ε)   (rDPO, arXiv 2403.00409)
      hinge:   max(0, 1 - β h)                                    (SLiC-HF, arXiv 2305.10425)
      ipo:     (h - 1/(2β))²                                      (IPO, arXiv 2310.12036, Eq. 17)
    and the loss is their mean over the pairs selected by `where`. The formulas are those of TRL's
    `DPOTrainer.dpo_loss` for the same loss_type at ε = 0 (see the module docstring for what
    was checked, and for ε > 0). Log-probs are *summed* over completion tokens,
    except for IPO, where TRL (and the IPO paper's token-level view) pass the length-averaged
    log-prob: compute them with `sequence_logps(..., average=True)`.

    Args:
      chosen_logps, rejected_logps: float [B] policy log-probs of the preferred / dispreferred
        completions (nats).
      ref_chosen_logps, ref_rejected_logps: float [B] the same under the reference model.
      beta: β > 0, the KL-regularisation strength (IPO's τ).
      loss_type: one of "sigmoid", "robust", "hinge", "ipo".
      label_smoothing: ε, the assumed preference-label noise for sigmoid / robust (0 <= ε < 0.5).
      where: optional bool/float [B]; pairs with 0 are excluded (static-shape batch padding).

    Returns:
      (loss, metrics): float32 scalar loss; metrics `loss`, `chosen_rewards` and
      `rejected_rewards` (means of β·(logp - ref_logp), the implicit rewards), `reward_accuracy`
      (fraction with chosen reward > rejected reward), `reward_margin` (mean difference), and
      `logits` (mean h).

    Raises:
      AssertionError: (chex) inputs that are not equal-shaped [B] vectors.
      ValueError: unknown loss_type, β <= 0, ε outside [0, 0.5).
    """
    chex.assert_rank(chosen_logps, 1)
    chex.assert_equal_shape((chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps))
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"loss_type must be one of {sorted(DPO_LOSSES)}, got {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if where is not None:
        chex.assert_equal_shape((chosen_logps, where))
    # Padding pairs (where == 0) are selected to 0 first, so NaN there reaches no loss or gradient.
    keep = jnp.ones(chosen_logps.shape, bool) if where is None else where
    f32 = lambda x: select(keep, x.astype(jnp.float32))  # noqa: E731
    chosen_logps, rejected_logps = f32(chosen_logps), f32(rejected_logps)
    ref_chosen_logps, ref_rejected_logps = f32(ref_chosen_logps), f32(ref_rejected_logps)

    h = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)  # [B]
    losses = DPO_LOSSES[loss_type](h, beta, label_smoothing)  # [B]
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)  # [B]
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)  # [B]
    loss = masked_mean(losses, where)
    return loss, {
        "loss": loss,
        "chosen_rewards": masked_mean(chosen_rewards, where),
        "rejected_rewards": masked_mean(rejected_rewards, where),
        "reward_accuracy": masked_mean((chosen_rewards > rejected_rewards).astype(jnp.float32), where),
        "reward_margin": masked_mean(chosen_rewards - rejected_rewards, where),
        "logits": masked_mean(h, where),
    }
