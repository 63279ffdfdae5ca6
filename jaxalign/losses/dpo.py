"""Direct Preference Optimization and its reference-based variants (TRL's `DPOTrainer` loss types).

Every variant is a function of the two implicit log-ratios against the frozen reference,
`c = log π(y_w|x) - log π_ref(y_w|x)` and `r = log π(y_l|x) - log π_ref(y_l|x)` ([B] each),
most of them of the DPO logit `h = c - r` alone. The formulas are those of TRL 1.16.0,
`trl/trainer/dpo_trainer.py`, `DPOTrainer._compute_loss` (the `loss_type` branches, lines
1386-1510), checked against an independent float64 NumPy transcription of them
(tests/losses/test_dpo.py, tests/losses/test_dpo_family.py), not against a running TRL.
(Equation numbers as TRL cites them.) Two deviations, both documented where they apply:

- label smoothing ε in "sigmoid" (and "sigmoid_norm") is the conservative DPO (cDPO) of
  Mitchell 2023 ("A note on DPO with noisy preferences"), TRL 0.19's "sigmoid"; TRL 1.16's
  "sigmoid" has no ε, so parity with 1.16 holds at ε = 0 only.
- "bco_pair" takes BCO's reward shift δ as an argument (`reward_baseline`): δ = 0 is TRL 1.16's
  formula; `bco_pair_loss` threads TRL 0.19's running mean of the rewards as explicit state.

The reference-free losses (SimPO, ORPO) are in `jaxalign.losses.preference`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from jaxalign.ops import masked_mean, select


class DPOHyperparams(NamedTuple):
    """The scalars a per-pair DPO loss may read (each loss reads only its own).

    Attributes:
      beta: β > 0, the KL-regularisation strength (IPO's τ).
      label_smoothing: ε (sigmoid, sigmoid_norm, robust, exo_pair, aot, aot_unpaired).
      discopop_tau: τ > 0 of DiscoPOP's mixing sigmoid.
      reward_baseline: δ, BCO's reward shift (float32 scalar, nats·β; bco_pair only).
    """

    beta: float
    label_smoothing: float
    discopop_tau: float
    reward_baseline: jax.Array | float


def _sigmoid(c: jax.Array, r: jax.Array, hp: DPOHyperparams) -> jax.Array:
    # DPO, Rafailov et al. 2023 (arXiv 2305.18290) Eq. 7; with ε > 0 the conservative DPO
    # label-smoothing of Mitchell 2023 (cDPO; TRL 0.19's "sigmoid" with label_smoothing).
    z, eps = hp.beta * (c - r), hp.label_smoothing
    return -jax.nn.log_sigmoid(z) * (1 - eps) - jax.nn.log_sigmoid(-z) * eps


def _robust(c: jax.Array, r: jax.Array, hp: DPOHyperparams) -> jax.Array:
    # Robust DPO, Chowdhury et al. 2024 (arXiv 2403.00409) Eq. 8: unbiased under label-flip rate ε.
    z, eps = hp.beta * (c - r), hp.label_smoothing
    return (-jax.nn.log_sigmoid(z) * (1 - eps) + jax.nn.log_sigmoid(-z) * eps) / (1 - 2 * eps)


def _hinge(c: jax.Array, r: jax.Array, hp: DPOHyperparams) -> jax.Array:
    # SLiC-HF, Zhao et al. 2023 (arXiv 2305.10425) Eq. 2 on the reference-normalised margin.
    return jax.nn.relu(1.0 - hp.beta * (c - r))


def _ipo(c: jax.Array, r: jax.Array, hp: DPOHyperparams) -> jax.Array:
    # IPO, Azar et al. 2023 (arXiv 2310.12036) Eq. 17: regress h onto 1/(2β) (β is their τ).
    return ((c - r) - 1.0 / (2.0 * hp.beta)) ** 2


def _exo_pair(c: jax.Array, r: jax.Array, hp: DPOHyperparams) -> jax.Array:
    # EXO, Ji et al. 2024 (arXiv 2402.00856) Eq. 16 for K = 2: KL(p_θ || p_ε) between the
    # policy's softmax over {y_w, y_l} with logits β·(c, r) and the smoothed labels (1-ε, ε).
    z, eps = hp.beta * (c - r), hp.label_smoothing
    return jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - jnp.log1p(-eps)) + jax.nn.sigmoid(-z) * (
        jax.nn.log_sigmoid(-z) - jnp.log(eps)
    )


def _nca_pair(c: jax.Array, r: jax.Array, hp: DPOHyperparams) -> jax.Array:
    # NCA, Chen et al. 2024 (arXiv 2402.05369), pairwise form: absolute, not relative, rewards.
    zc, zr = hp.beta * c, hp.beta * r
    return -jax.nn.log_sigmoid(zc) - 0.5 * jax.nn.log_sigmoid(-zc) - 0.5 * jax.nn.log_sigmoid(-zr)


def _bco_pair(c: jax.Array, r: jax.Array, hp: DPOHyperparams) -> jax.Array:
    # BCO, Jung et al. 2024 (arXiv 2404.04656) on pairs: chosen classified above the reward shift
    # δ, rejected below it.
    delta = hp.reward_baseline
    return -jax.nn.log_sigmoid(hp.beta * c - delta) - jax.nn.log_sigmoid(-(hp.beta * r - delta))


def _sppo_hard(c: jax.Array, r: jax.Array, hp: DPOHyperparams) -> jax.Array:
    # SPPO, Wu et al. 2024 (arXiv 2405.00675) Eq. 4.7 with hard win probabilities P = 1 / 0.
    return (c - 0.5 / hp.beta) ** 2 + (r + 0.5 / hp.beta) ** 2


def _apo_zero(c: jax.Array, r: jax.Array, hp: DPOHyperparams) -> jax.Array:
    # APO-zero, D'Oosterlinck et al. 2024 (arXiv 2408.06266) Eq. 7: chosen up, rejected down.
    return (1 - jax.nn.sigmoid(hp.beta * c)) + jax.nn.sigmoid(hp.beta * r)


def _apo_down(c: jax.Array, r: jax.Array, hp: DPOHyperparams) -> jax.Array:
    # APO-down, arXiv 2408.06266 Eq. 8: chosen down, rejected down more.
    return jax.nn.sigmoid(hp.beta * c) + (1 - jax.nn.sigmoid(hp.beta * (c - r)))


def _discopop(c: jax.Array, r: jax.Array, hp: DPOHyperparams) -> jax.Array:
    # DiscoPOP, Lu et al. 2024 (arXiv 2406.08414) Eq. 5: logistic loss blended with the
    # exponential one by m = σ(β h / τ). exp(-z)·m is taken as exp(log σ(z/τ) - z), the same
    # number, so a very negative z gives 0·(huge) = 0, not exp overflow times 0 = NaN.
    z, tau = hp.beta * (c - r), hp.discopop_tau
    logistic = -jax.nn.log_sigmoid(z) * jax.nn.sigmoid(-z / tau)  # (1 - m) = σ(-z/τ)
    return logistic + jnp.exp(jax.nn.log_sigmoid(z / tau) - z)


PairLoss = Callable[[jax.Array, jax.Array, DPOHyperparams], jax.Array]
"""`loss(chosen_logratios [B], rejected_logratios [B], hyperparams) -> per-pair loss [B]`."""

DPO_LOSSES: dict[str, PairLoss] = {
    "sigmoid": _sigmoid,
    "sigmoid_norm": _sigmoid,  # on length-averaged log-probs (TRL divides by the token counts)
    "robust": _robust,
    "hinge": _hinge,
    "ipo": _ipo,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    # AOT, Melnyk et al. 2024 (arXiv 2406.05882): the sigmoid/cDPO loss on batch-sorted
    # margins (policy vs reference, or chosen vs rejected log-ratios: see `dpo_loss`).
    "aot": _sigmoid,
    "aot_unpaired": _sigmoid,  # TRL 0.19's "aot_pair"
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
}
"""Per-pair loss of each DPO `loss_type` (TRL 1.16's names), for `dpo_loss`."""

LENGTH_NORMALISED_LOSSES = frozenset({"ipo", "sigmoid_norm"})
"""DPO loss types whose log-probs are length-averaged (`sequence_logps(..., average=True)`)."""

SORTED_LOSSES = frozenset({"aot", "aot_unpaired"})
"""DPO loss types that sort across the batch (their per-pair terms do not belong to one pair)."""


def _sort_kept(x: jax.Array, keep: jax.Array) -> jax.Array:
    # The kept entries ascending, then the padding (already selected to 0): padding never
    # interleaves with real pairs, so sorting the masked batch equals sorting the sliced one.
    _, out = jax.lax.sort((jnp.where(keep, 0, 1), x), num_keys=2)  # [B]
    return out


def _check_hyperparams(loss_type: str, beta: float, eps: float, discopop_tau: float) -> None:
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"loss_type must be one of {sorted(DPO_LOSSES)}, got {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {eps}")
    if loss_type == "exo_pair" and eps == 0.0:
        raise ValueError("exo_pair needs label_smoothing > 0 (log ε); the EXO paper uses 1e-3")
    if discopop_tau <= 0:
        raise ValueError(f"discopop_tau must be positive, got {discopop_tau}")


def dpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float | None = None,
    discopop_tau: float = 0.05,
    reward_baseline: jax.Array | float = 0.0,
    where: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPO-family preference loss from completion log-probs of policy and frozen reference.

    With the log-ratios `c = chosen - ref_chosen`, `r = rejected - ref_rejected` and `h = c - r`
    (all [B]), z = β h, σ the logistic function, the per-pair losses are (TRL 1.16 names)
      sigmoid:      -(1-ε)·log σ(z) - ε·log σ(-z)      (DPO, arXiv 2305.18290, Eq. 7; ε: cDPO)
      sigmoid_norm: sigmoid on length-averaged log-probs
      robust:       ((1-ε)·(-log σ(z)) + ε·log σ(-z)) / (1 - 2ε)   (rDPO, arXiv 2403.00409, Eq. 8)
      hinge:        max(0, 1 - z)                                  (SLiC-HF, arXiv 2305.10425)
      ipo:          (h - 1/(2β))², length-averaged log-probs       (IPO, arXiv 2310.12036, Eq. 17)
      exo_pair:     σ(z)(log σ(z) - log(1-ε)) + σ(-z)(log σ(-z) - log ε)  (EXO, 2402.00856, Eq. 16)
      nca_pair:     -log σ(βc) - ½ log σ(-βc) - ½ log σ(-βr)       (NCA, arXiv 2402.05369)
      bco_pair:     -log σ(βc - δ) - log σ(-(βr - δ))              (BCO, arXiv 2404.04656)
      sppo_hard:    (c - 1/(2β))² + (r + 1/(2β))²                  (SPPO, arXiv 2405.00675, Eq. 4.7)
      aot:          sigmoid on sort(chosen - rejected) - sort(ref_chosen - ref_rejected)
      aot_unpaired: sigmoid on sort(c) - sort(r)                   (AOT, arXiv 2406.05882)
      apo_zero:     1 - σ(βc) + σ(βr)                              (APO, arXiv 2408.06266, Eq. 7)
      apo_down:     σ(βc) + 1 - σ(z)                               (APO, Eq. 8)
      discopop:     -log σ(z)·(1 - σ(z/τ)) + exp(-z)·σ(z/τ)        (DiscoPOP, 2406.08414, Eq. 5)
    and the loss is their mean over the pairs selected by `where` (for aot: the sorted entries
    of the selected pairs). These are TRL 1.16.0's `DPOTrainer._compute_loss` formulas
    (dpo_trainer.py lines 1386-1510, f_divergence_type="reverse_kl", no WPO weighting, no LD-DPO
    α), except ε > 0 in sigmoid/sigmoid_norm (TRL 0.19's cDPO; 1.16 has no ε there) and δ ≠ 0 in
    bco_pair (TRL 0.19's running mean; `bco_pair_loss`). Log-probs are *summed* over completion
    tokens, except for `LENGTH_NORMALISED_LOSSES` (ipo, sigmoid_norm), where TRL divides by the
    completion length: pass `sequence_logps(..., average=True)` of policy and reference.

    Args:
      chosen_logps, rejected_logps: float [B] policy log-probs of the preferred / dispreferred
        completions (nats).
      ref_chosen_logps, ref_rejected_logps: float [B] the same under the reference model.
      beta: β > 0, the KL-regularisation strength (IPO's τ).
      loss_type: a key of `DPO_LOSSES`.
      label_smoothing: ε in [0, 0.5): the assumed label-flip rate for sigmoid, sigmoid_norm,
        robust, aot, aot_unpaired; EXO's ε (> 0) for exo_pair; ignored by the others (as in TRL).
        None (default): 0, but 1e-3 for exo_pair (EXO's recommended value; TRL 0.19's fallback).
      discopop_tau: τ > 0 of discopop (TRL's `discopop_tau`, default 0.05 as in the paper).
      reward_baseline: δ of bco_pair (float32 scalar in units of β·nats); 0 is TRL 1.16's.
      where: optional bool/float [B]; pairs with 0 are excluded (static-shape batch padding).
        NaN or inf in an excluded pair changes neither the loss nor any gradient.

    Returns:
      (loss, metrics): float32 scalar loss; metrics `loss`, `chosen_rewards` and
      `rejected_rewards` (means of β·(logp - ref_logp), the implicit rewards), `reward_accuracy`
      (fraction with chosen reward > rejected reward), `reward_margin` (mean difference), and
      `logits` (mean h), all over the selected pairs.

    Raises:
      AssertionError: (chex) inputs that are not equal-shaped [B] vectors.
      ValueError: unknown loss_type, β <= 0, ε outside [0, 0.5), ε = 0 with exo_pair, τ <= 0.
    """
    chex.assert_rank(chosen_logps, 1)
    chex.assert_equal_shape((chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps))
    if label_smoothing is None:
        label_smoothing = 1e-3 if loss_type == "exo_pair" else 0.0
    _check_hyperparams(loss_type, beta, label_smoothing, discopop_tau)
    if where is not None:
        chex.assert_equal_shape((chosen_logps, where))
    # Padding pairs (where == 0) are selected to 0 first, so NaN there reaches no loss or gradient.
    keep = jnp.ones(chosen_logps.shape, bool) if where is None else jnp.asarray(where) != 0  # [B]
    f32 = lambda x: select(keep, x.astype(jnp.float32))  # noqa: E731
    chosen_logps, rejected_logps = f32(chosen_logps), f32(rejected_logps)
    ref_chosen_logps, ref_rejected_logps = f32(ref_chosen_logps), f32(ref_rejected_logps)

    chosen_logratios = chosen_logps - ref_chosen_logps  # [B]
    rejected_logratios = rejected_logps - ref_rejected_logps  # [B]
    a, b, loss_where = chosen_logratios, rejected_logratios, where
    if loss_type == "aot":  # sorted policy margins against sorted reference margins
        a, b = chosen_logps - rejected_logps, ref_chosen_logps - ref_rejected_logps
    if loss_type in SORTED_LOSSES:
        a, b = _sort_kept(a, keep), _sort_kept(b, keep)
        loss_where = None if where is None else jnp.arange(keep.shape[0]) < jnp.sum(keep)
    hp = DPOHyperparams(beta, label_smoothing, discopop_tau, reward_baseline)
    losses = DPO_LOSSES[loss_type](a, b, hp)  # [B]
    loss = masked_mean(losses, loss_where)
    chosen_rewards = beta * chosen_logratios  # [B]
    rejected_rewards = beta * rejected_logratios  # [B]
    return loss, {
        "loss": loss,
        "chosen_rewards": masked_mean(chosen_rewards, where),
        "rejected_rewards": masked_mean(rejected_rewards, where),
        "reward_accuracy": masked_mean((chosen_rewards > rejected_rewards).astype(jnp.float32), where),
        "reward_margin": masked_mean(chosen_rewards - rejected_rewards, where),
        "logits": masked_mean(chosen_logratios - rejected_logratios, where),
    }


class RewardBaseline(NamedTuple):
    """BCO's reward shift δ: the running mean of each batch's mean implicit reward.

    Attributes:
      mean: float32 [] the running mean δ (units of β·nats).
      count: float32 [] batches seen.
    """

    mean: jax.Array
    count: jax.Array


def init_reward_baseline() -> RewardBaseline:
    """δ = 0 before any batch (TRL's `RunningMoments()`: mean 0, count 1e-24 ≈ 0)."""
    return RewardBaseline(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))


def bco_pair_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    baseline: RewardBaseline,
    *,
    beta: float = 0.1,
    where: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], RewardBaseline]:
    """BCO on preference pairs with its running reward shift δ as explicit state in and out.

    The batch's mean implicit reward `m = mean(β·c ∪ β·r)` over the selected pairs (under
    stop_gradient) updates the running mean first, `δ' = δ + (m - δ) / (n + 1)`, and the loss is
    `dpo_loss(..., loss_type="bco_pair", reward_baseline=δ')`:
    -log σ(βc - δ') - log σ(-(βr - δ')) (BCO, Jung et al. 2024, arXiv 2404.04656: δ is a moving
    average of the rewards). This is TRL 0.19.0's bco_pair
    (trl/trainer/dpo_trainer.py lines 1063-1073 with `RunningMoments.update` of one scalar,
    trl/trainer/utils.py lines 728-754); TRL 1.16 dropped δ (δ = 0: `dpo_loss` itself). A batch
    with no selected pair leaves the state unchanged. Single-process: TRL averages m across
    ranks first; with data parallelism inside one jit program `where`'s mean already does.

    Args:
      chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps: float [B] summed
        completion log-probs (nats) of policy and reference, as for `dpo_loss`.
      baseline: the state from the previous step (`init_reward_baseline()` at the start).
      beta: β > 0.
      where: optional bool/float [B] selecting the real pairs.

    Returns:
      (loss, metrics, new_baseline): `dpo_loss`'s loss and metrics plus `reward_baseline` (δ'),
      and the updated state to pass to the next step.

    Raises:
      AssertionError, ValueError: as `dpo_loss`.
    """
    chex.assert_rank(chosen_logps, 1)
    keep = jnp.ones(chosen_logps.shape, bool) if where is None else jnp.asarray(where) != 0  # [B]
    rewards = beta * jnp.concatenate(
        [chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps]
    )  # [2B]
    batch_mean = jax.lax.stop_gradient(masked_mean(rewards, jnp.concatenate([keep, keep])))
    count = baseline.count + 1.0
    mean = baseline.mean + (batch_mean - baseline.mean) / count
    seen = jnp.any(keep)  # an all-padding batch leaves the state as it was
    mean, count = jnp.where(seen, mean, baseline.mean), jnp.where(seen, count, baseline.count)
    loss, metrics = dpo_loss(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
        beta=beta, loss_type="bco_pair", reward_baseline=mean, where=where,
    )
    return loss, {**metrics, "reward_baseline": mean}, RewardBaseline(mean, count)
