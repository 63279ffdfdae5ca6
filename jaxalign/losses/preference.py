"""Reference-free preference losses: SimPO and ORPO.

Both score a completion by its *length-averaged* log-prob under the policy alone, so neither
needs a reference model. Formulas: TRL 1.16.0, `trl/experimental/cpo/cpo_trainer.py`
(`CPOTrainer.cpo_loss`, loss_type="simpo", lines 715-722, with `average_log_prob=True`,
line 850) and `trl/experimental/orpo/orpo_trainer.py` (`log1mexp`, lines 87-91;
`ORPOTrainer.odds_ratio_loss`, lines 690-702; the total loss, line 848), checked against an
independent float64 NumPy transcription (tests/losses/test_dpo_family.py), not a running TRL.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxalign.ops import masked_mean, masked_sum, select


def _pair_metrics(chosen: jax.Array, rejected: jax.Array, beta: float, where) -> dict[str, jax.Array]:
    # TRL's CPO/ORPO rewards: β times the length-averaged policy log-prob.
    cr, rr = beta * chosen, beta * rejected  # [B]
    return {
        "chosen_rewards": masked_mean(cr, where),
        "rejected_rewards": masked_mean(rr, where),
        "reward_accuracy": masked_mean((cr > rr).astype(jnp.float32), where),
        "reward_margin": masked_mean(cr - rr, where),
    }


def _check_pair(chosen: jax.Array, rejected: jax.Array, where) -> jax.Array:
    chex.assert_rank(chosen, 1)
    chex.assert_equal_shape((chosen, rejected))
    if where is not None:
        chex.assert_equal_shape((chosen, where))
    return jnp.ones(chosen.shape, bool) if where is None else jnp.asarray(where) != 0  # [B]


def simpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    where: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SimPO: a reference-free DPO on length-averaged log-probs with a target reward margin γ.

    Per pair, with `z = β·((c̄ - r̄) - γ/β)` (= β(c̄ - r̄) - γ),
      loss = -(1-ε)·log σ(z) - ε·log σ(-z)
    (Meng, Xia & Chen 2024, "SimPO", arXiv 2405.14734, Eq. 6; ε > 0 is the cDPO smoothing TRL
    applies), averaged over the pairs selected by `where`. This is TRL 1.16.0's
    `CPOTrainer.cpo_loss` with loss_type="simpo", alpha=0 and cpo_alpha=0 (no BC/NLL term:
    `trl/experimental/cpo/cpo_trainer.py` lines 715-722); the order of operations follows it.

    Args:
      chosen_logps, rejected_logps: float [B] policy log-probs of the preferred / dispreferred
        completions *averaged* over their tokens (nats/token: `sequence_logps(..., average=True)`).
      beta: β > 0, the reward scale. The paper tunes β in the single digits; TRL's CPOConfig
        default (0.1) is DPO's, so pass it explicitly when matching a TRL run.
      gamma: γ >= 0, the target reward margin (TRL's `simpo_gamma`, default 0.5).
      label_smoothing: ε in [0, 0.5).
      where: optional bool/float [B]; pairs with 0 are excluded (their NaN/inf change nothing).

    Returns:
      (loss, metrics): float32 scalar; metrics `loss`, `chosen_rewards`, `rejected_rewards`
      (means of β·c̄, β·r̄: TRL's CPO rewards), `reward_accuracy`, `reward_margin`, `logits`
      (mean z).

    Raises:
      AssertionError: (chex) inputs that are not equal-shaped [B] vectors.
      ValueError: β <= 0, γ < 0, ε outside [0, 0.5).
    """
    keep = _check_pair(chosen_logps, rejected_logps, where)
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen = select(keep, chosen_logps.astype(jnp.float32))  # [B]
    rejected = select(keep, rejected_logps.astype(jnp.float32))  # [B]
    z = beta * ((chosen - rejected) - gamma / beta)  # [B]
    eps = label_smoothing
    losses = -jax.nn.log_sigmoid(z) * (1 - eps) - jax.nn.log_sigmoid(-z) * eps  # [B]
    loss = masked_mean(losses, where)
    return loss, {"loss": loss, **_pair_metrics(chosen, rejected, beta, where), "logits": masked_mean(z, where)}


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x <= 0, stably (TRL 1.16 `orpo_trainer.log1mexp`, Mächler 2012).

    Branches at -log 2: log1p(-exp(x)) below it, log(-expm1(x)) above. x is first clamped to
    at most -tiny (the smallest normal float32): an average log-prob that rounds to exactly 0
    (every token's probability rounds to 1) gives log(tiny) ≈ -87 instead of -inf, whose NaN
    gradient TRL would propagate; no x < -tiny changes.

    Args:
      x: float array, nats (a log-probability).

    Returns:
      float array of x's shape and dtype.
    """
    x = jnp.minimum(x, -jnp.finfo(x.dtype).tiny)
    t = -0.6931471805599453  # -log 2
    below = x < t
    # each branch sees only inputs it is finite on ("double where"), so the unselected one's
    # gradient is 0, not 0·inf = NaN (log1p(-exp(x)) has an infinite slope at x = 0)
    lo, hi = jnp.where(below, x, -1.0), jnp.where(below, -0.5, x)
    return jnp.where(below, jnp.log1p(-jnp.exp(lo)), jnp.log(-jnp.expm1(hi)))


def orpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    chosen_lengths: jax.Array,
    rejected_lengths: jax.Array,
    *,
    beta: float = 0.1,
    where: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """ORPO: the chosen completions' NLL plus λ times an odds-ratio preference term.

    With the length-averaged log-probs c̄ = chosen/len_c, r̄ = rejected/len_r ([B]) and
      log_odds = (c̄ - r̄) - (log(1 - e^c̄) - log(1 - e^r̄))      (log of odds(y_w)/odds(y_l))
      loss = NLL - λ·mean(log σ(log_odds)),   NLL = -Σ chosen / Σ len_c   (a token mean)
    (Hong, Lee & Thorne 2024, "ORPO", arXiv 2403.07691: L_SFT + λ·L_OR; TRL cites its Eqs. 4
    and 7), sums and means over the pairs selected by `where`. The odds-ratio term is TRL 1.16.0's `ORPOTrainer.odds_ratio_loss`
    (`trl/experimental/orpo/orpo_trainer.py` lines 690-702) and the total its line 848
    (`policy_nll_loss - losses.mean()`). One deviation, by what the caller passes: TRL's NLL
    is the token mean over prompt *and* completion of the chosen sequences (line 799); this one
    is over the completion tokens counted in `chosen_lengths`, the paper's L_SFT.

    Args:
      chosen_logps, rejected_logps: float [B] policy log-probs *summed* over the completion
        tokens (nats).
      chosen_lengths, rejected_lengths: float/int [B] the number of completion tokens summed
        (>= 1 for a selected pair; a length of 0 averages to 0).
      beta: λ > 0, the weight of the odds-ratio term (TRL's ORPOConfig `beta`, default 0.1).
      where: optional bool/float [B]; pairs with 0 are excluded (their NaN/inf change nothing).

    Returns:
      (loss, metrics): float32 scalar; metrics `loss`, `nll_loss`, `log_odds_ratio` (mean
      log σ(log_odds)), `log_odds_chosen` (mean log_odds), `chosen_rewards`,
      `rejected_rewards` (means of λ·c̄, λ·r̄: TRL's ORPO rewards), `reward_accuracy`,
      `reward_margin`.

    Raises:
      AssertionError: (chex) inputs that are not equal-shaped [B] vectors.
      ValueError: λ <= 0.
    """
    keep = _check_pair(chosen_logps, rejected_logps, where)
    chex.assert_equal_shape((chosen_logps, chosen_lengths, rejected_lengths))
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    f32 = lambda x: select(keep, x.astype(jnp.float32))  # noqa: E731
    chosen_sum, rejected_sum = f32(chosen_logps), f32(rejected_logps)  # [B]
    chosen_len, rejected_len = f32(chosen_lengths), f32(rejected_lengths)  # [B]
    chosen = chosen_sum / jnp.maximum(chosen_len, 1.0)  # [B] nats/token
    rejected = rejected_sum / jnp.maximum(rejected_len, 1.0)  # [B]
    nll = -masked_sum(chosen_sum, keep) / jnp.maximum(masked_sum(chosen_len, keep), 1.0)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))  # [B]
    ratio = jax.nn.log_sigmoid(log_odds)  # [B]
    loss = nll - masked_mean(beta * ratio, where)
    return loss, {
        "loss": loss,
        "nll_loss": nll,
        "log_odds_ratio": masked_mean(ratio, where),
        "log_odds_chosen": masked_mean(log_odds, where),
        **_pair_metrics(chosen, rejected, beta, where),
    }
