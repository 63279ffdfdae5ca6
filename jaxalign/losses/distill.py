"""Knowledge distillation: a student matched to a teacher's next-token distributions, per token.

Teacher P = softmax(z_T/τ), student Q = softmax(z_S/τ) at each position (B batch, T sequence,
V vocabulary). The per-token divergence is summed over the vocabulary; losses are token means
over the masked (completion) positions, TRL's "batchmean" with labels (Σ over counted tokens /
max(#tokens, 1)). Divergences are computed in float32 whatever the logits' dtype.

* forward KL(P‖Q) = Σ_v p (log p − log q): mass-covering (Hinton et al. 2015, arXiv 1503.02531);
* reverse KL(Q‖P): mode-seeking (MiniLLM, Gu et al. 2023, arXiv 2306.08543);
* generalised JSD_β = β·KL(P‖M) + (1−β)·KL(Q‖M), M = β·P + (1−β)·Q (GKD, Agarwal et al. 2023,
  arXiv 2306.13649, Eq. 1), with TRL's endpoint convention β = 0 → KL(P‖Q), β = 1 → KL(Q‖P).
  The interior tends to 0 at both ends (≈ β·KL(P‖Q) near 0): the loss is discontinuous there.

Checked against TRL 1.16.0 `GKDTrainer.generalized_jsd_loss`
(trl/experimental/gkd/gkd_trainer.py L238–321), re-implemented in torch inside the test.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxalign.logprobs import over_sequence_chunks
from jaxalign.losses.sft import sft_loss
from jaxalign.ops import masked_count, masked_mean, masked_sum, select


def align_vocab(
    student_logits: jax.Array, teacher_logits: jax.Array, vocab_size: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """Both logits cut to a shared vocabulary.

    Checkpoints of one family pad their embedding tables differently (Qwen2.5-7B: V = 152,064,
    Qwen2.5-0.5B: 151,936, for a 151,665-token tokenizer), so their logits cannot be compared
    entry by entry. With `vocab_size` both are truncated to their first `vocab_size` ids
    (use the tokenizer's size, or min(V_S, V_T)); each softmax then renormalises over the shared
    ids. This is only right when the two models share one tokenizer: ids past the tokenizer are
    padding rows that no data holds. Different tokenizers need cross-tokenizer methods
    (e.g. TRL's GOLD), which this is not.

    Args:
      student_logits: [..., V_S] any float dtype.
      teacher_logits: [..., V_T] with the same leading shape.
      vocab_size: the shared size; None requires V_S == V_T.

    Returns:
      (student_logits[..., :V], teacher_logits[..., :V]).

    Raises:
      AssertionError: (chex) leading shapes that differ.
      ValueError: V_S != V_T without `vocab_size`, or `vocab_size` above either (or < 1).
    """
    chex.assert_equal_shape_prefix((student_logits, teacher_logits), student_logits.ndim - 1)
    v_s, v_t = student_logits.shape[-1], teacher_logits.shape[-1]
    if vocab_size is None:
        if v_s != v_t:
            raise ValueError(
                f"student vocabulary {v_s} != teacher vocabulary {v_t}: pass vocab_size (the "
                "tokenizer's size, shared by both) to truncate both logits to it"
            )
        return student_logits, teacher_logits
    if not 1 <= vocab_size <= min(v_s, v_t):
        raise ValueError(f"vocab_size must be in [1, min({v_s}, {v_t})], got {vocab_size}")
    return student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """Σ_v p (log p − log q) over the last axis; terms with p = 0 count 0 (value and gradient)."""
    p = jnp.exp(log_p)
    # Select both logs to 0 where p = 0 (a -inf logit or underflow) so that neither the value nor
    # the gradient meets 0·(-inf).
    live = p > 0
    log_p, log_q = jnp.where(live, log_p, 0.0), jnp.where(live, log_q, 0.0)
    return jnp.sum(jnp.where(live, p * (log_p - log_q), 0.0), axis=-1)


def _token_jsd(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    mask: jax.Array,
    beta: float,
    temperature: float,
) -> jax.Array:
    # Masked positions read zeros, so NaN/inf there reaches neither the value nor the gradient.
    keep = mask[..., None] > 0  # [B,t,1]
    zs = jnp.where(keep, student_logits.astype(jnp.float32), 0.0) / temperature  # [B,t,V]
    zt = jnp.where(keep, teacher_logits.astype(jnp.float32), 0.0) / temperature
    log_q = jax.nn.log_softmax(zs, axis=-1)  # student
    log_p = jax.nn.log_softmax(zt, axis=-1)  # teacher
    if beta == 0.0:
        return _kl(log_p, log_q)  # KL(P‖Q), forward
    if beta == 1.0:
        return _kl(log_q, log_p)  # KL(Q‖P), reverse
    # log M = logsumexp(log q + log(1−β), log p + log β), elementwise, in log space.
    log_m = jnp.logaddexp(log_q + jnp.log1p(-beta), log_p + jnp.log(beta))
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def token_divergence(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    mask: jax.Array | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> jax.Array:
    """Per-position generalised JSD_β between teacher and student, summed over the vocabulary.

    β = 0 is the forward KL(P‖Q), β = 1 the reverse KL(Q‖P), 0 < β < 1 GKD's JSD_β
    (module docstring; TRL's `generalized_jsd_loss` before reduction, summed over V).

    Args:
      student_logits, teacher_logits: [B, T, V] any float dtype (same V: see `align_vocab`).
      mask: optional [B, T]; positions with 0 give 0 and their logits may hold anything.
      beta: β in [0, 1].
      temperature: τ > 0; both logits are divided by it.
      chunk_size: process the sequence in chunks of this many positions (`over_sequence_chunks`),
        so only [B, chunk, V] float32 temporaries are live at once.

    Returns:
      float32 [B, T] divergences (nats, ≥ 0).

    Raises:
      AssertionError: (chex) shapes that differ, or not rank 3.
      ValueError: β outside [0, 1], τ <= 0, chunk_size <= 0.
    """
    chex.assert_rank(student_logits, 3)
    chex.assert_equal_shape((student_logits, teacher_logits))
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if mask is None:
        mask = jnp.ones(student_logits.shape[:2], jnp.float32)
    chex.assert_equal_shape_prefix((student_logits, mask), 2)
    div = over_sequence_chunks(
        lambda zs, zt, m: _token_jsd(zs, zt, m, float(beta), float(temperature)),
        chunk_size,
        student_logits,
        teacher_logits,
        mask,
    )
    return select(mask, div)


def generalized_jsd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    mask: jax.Array,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    num_items: jax.Array | float | None = None,
    chunk_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GKD's loss: the token mean of `token_divergence` over the masked positions.

    Equals TRL 1.16.0 `GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels,
    beta, temperature, reduction="batchmean", num_items_in_batch=num_items)` with labels = −100
    where mask is 0 (checked in tests/losses/test_distill.py). No τ² factor (TRL's
    convention; `kd_loss` is Hinton's, with it). TRL's GKD calls it at τ = 1 whatever its
    generation temperature (0.9 by default).

    Args:
      student_logits, teacher_logits: [B, T, V]; logits[:, t] predicts token t + 1.
      mask: [B, T] 1 on completion positions that count (selected: padding may hold NaN).
      beta, temperature, chunk_size: as in `token_divergence`.
      num_items: divide the sum by this global token count instead of this batch's (gradient
        accumulation over micro-batches of unequal token counts; trl#4719).

    Returns:
      (loss, metrics): float32 scalar loss (nats per token; 0 for an empty mask); metrics `loss`,
      `loss_sum`, `num_tokens`.

    Raises:
      as `token_divergence`.
    """
    div = token_divergence(
        student_logits, teacher_logits, mask, beta=beta, temperature=temperature,
        chunk_size=chunk_size,
    )  # [B,T]
    loss_sum = masked_sum(div, mask)
    num_tokens = masked_count(mask)
    denom = jnp.maximum(num_tokens, 1.0) if num_items is None else jnp.asarray(num_items, jnp.float32)
    loss = loss_sum / denom
    return loss, {"loss": loss, "loss_sum": loss_sum, "num_tokens": num_tokens}


def kd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    mask: jax.Array,
    *,
    temperature: float = 1.0,
    beta: float = 0.0,
    alpha: float = 1.0,
    labels: jax.Array | None = None,
    chunk_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Hinton's logit distillation: L = α·τ²·D_β(P_τ, Q_τ) + (1 − α)·CE(labels, Q_1).

    Hinton, Vinyals & Dean 2015 (arXiv 1503.02531, §2): ∂KL(P_τ‖Q_τ)/∂z_S = (q_τ − p_τ)/τ, so τ²
    keeps the soft term's gradient on the scale of the hard one as τ varies. D_β is
    `token_divergence` (β = 0, the default, the paper's forward KL; β = 1 reverse KL; between,
    GKD's JSD), token-averaged over the mask. The hard term is `sft_loss` at τ = 1 on `labels`.
    Tunix's `LogitStrategy` is this with β = 0 (defaults τ = 2, α = 0.5) but averages over every
    position; here the mask selects.

    Args:
      student_logits, teacher_logits: [B, T, V]; logits[:, t] predicts labels[:, t].
      mask: [B, T] 1 on positions that count (selected).
      temperature: τ > 0.
      beta: β in [0, 1] of the divergence.
      alpha: α in [0, 1], the soft term's weight; α < 1 requires `labels`.
      labels: int [B, T] next-token ids for the hard term.
      chunk_size: as in `token_divergence`.

    Returns:
      (loss, metrics): float32 scalar; metrics `loss`, `divergence` (token-mean D_β at τ, without
      τ²), `num_tokens`, and `ce` (the hard term) when `labels` is given.

    Raises:
      AssertionError: (chex) shapes that differ.
      ValueError: α outside [0, 1], α < 1 without labels, and `token_divergence`'s.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha < 1.0 and labels is None:
        raise ValueError("alpha < 1 mixes in the cross-entropy on labels: pass labels")
    div = token_divergence(
        student_logits, teacher_logits, mask, beta=beta, temperature=temperature,
        chunk_size=chunk_size,
    )
    divergence = masked_mean(div, mask)
    loss = alpha * temperature**2 * divergence
    metrics = {"divergence": divergence, "num_tokens": masked_count(mask)}
    if labels is not None:
        ce, _ = sft_loss(student_logits, labels, mask, chunk_size=chunk_size)
        loss = loss + (1.0 - alpha) * ce
        metrics["ce"] = ce
    metrics["loss"] = loss
    return loss, metrics


def on_policy_distill_advantages(
    logps: jax.Array, teacher_logps: jax.Array, mask: jax.Array
) -> jax.Array:
    """Per-token advantages of on-policy distillation: A_t = log π_T(y_t|y_<t) − log π_S(y_t|y_<t).

    On tokens y sampled from the student π_S, −A_t is a one-sample estimate of the per-token
    reverse KL(π_S‖π_T); maximising Σ_t A_t·log π_S with the importance-ratio policy gradient
    (`ppo_policy_loss(logps, old_logps=logps at sampling, advantages=A)`) minimises it
    (Thinking Machines' "On-Policy Distillation", 2025; TRL's MiniLLM trainer with
    `rkl_advantage=True, single_step_decomposition=False, gamma=0`). Treat the result as a
    constant (it is computed from the sampling-time log-probs).

    Args:
      logps: float [B, T] the student's log-probs of its sampled tokens.
      teacher_logps: float [B, T] the teacher's log-probs of the same tokens at the same positions.
      mask: [B, T] 1 on completion tokens (selected: 0 elsewhere, NaN there cannot leak).

    Returns:
      float32 [B, T] advantages (nats), 0 off the mask.

    Raises:
      AssertionError: (chex) shapes that differ.
    """
    chex.assert_rank(logps, 2)
    chex.assert_equal_shape((logps, teacher_logps, mask))
    return select(mask, teacher_logps.astype(jnp.float32)) - select(mask, logps.astype(jnp.float32))
