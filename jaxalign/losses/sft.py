"""Supervised fine-tuning: next-token cross-entropy on completion tokens only."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxalign.logprobs import clamp_labels, over_sequence_chunks
from jaxalign.ops import masked_count, masked_sum


def _token_nll(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    logits = logits.astype(jnp.float32)  # [B,t,V], fused into the reductions
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B,t]
    labels = clamp_labels(labels, logits.shape[-1])  # -100 etc. read a real logit; masked later
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]  # [B,t]
    nll = lse - picked  # [B,t]
    if label_smoothing:
        # Cross-entropy against the uniform distribution: -mean_v log p_v = lse - mean_v z_v.
        uniform = lse - jnp.mean(logits, axis=-1)  # [B,t]
        nll = (1.0 - label_smoothing) * nll + label_smoothing * uniform
    return nll


def sft_loss(
    logits: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    *,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-mean cross-entropy over the masked (completion) tokens.

    `L = Σ_{b,t} m_{bt} · ℓ_{bt} / Σ_{b,t} m_{bt}` with `ℓ = -log softmax(z)[y]`, or with label
    smoothing ε (Szegedy et al. 2016, arXiv 1512.00567, §7) `ℓ = (1-ε)·(-log p_y) + ε·(-mean_v log
    p_v)`, the definition of `torch.nn.CrossEntropyLoss(label_smoothing=ε)` and TRL's SFTTrainer
    (which uses it). Prompt masking follows InstructGPT-style SFT: prompt and padding positions
    have mask 0.

    Args:
      logits: [B, T, V] any float dtype; logits[:, t] predicts labels[:, t].
      labels: int [B, T] next-token ids (already shifted: labels = tokens[:, 1:]); ids at masked
        positions may be anything (e.g. Hugging Face's -100).
      mask: [B, T] float/bool, 1 on completion tokens that count, 0 elsewhere (selected, so
        NaN/inf logits or out-of-range labels at masked positions cannot leak).
      label_smoothing: ε in [0, 1).
      chunk_size: optional sequence chunking (see `jaxalign.logprobs.token_logps`).

    Returns:
      (loss, metrics): loss float32 scalar (nats per token; 0 when the mask is empty); metrics
      `loss`, `loss_sum` (Σ m·ℓ) and `num_tokens` (Σ m) so that callers accumulating over
      micro-batches can form a true token mean, and `token_accuracy` (argmax == label).

    Raises:
      AssertionError: (chex) mismatched ranks or shapes.
      ValueError: label_smoothing outside [0, 1).
    """
    chex.assert_rank(logits, 3)
    chex.assert_equal_shape((labels, mask))
    chex.assert_equal_shape_prefix((logits, labels), 2)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    nll = over_sequence_chunks(
        lambda z, y: _token_nll(z, y, label_smoothing), chunk_size, logits, labels
    )  # [B,T]
    correct = jnp.argmax(logits, axis=-1) == labels  # [B,T]
    return _token_mean(nll, correct, mask)


def sft_token_loss(
    logps: jax.Array,
    mask: jax.Array,
    *,
    label_smoothing: float = 0.0,
    uniform_ce: jax.Array | None = None,
    correct: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`sft_loss` from per-token statistics instead of logits (what the fused output head
    `jaxalign.logprobs.head_stats` returns): ℓ = (1-ε)·(-logps) + ε·uniform_ce.

    Args:
      logps: float32 [B, T] label log-probs.
      mask: [B, T], 1 on the tokens that count (selected: anything may sit at masked positions).
      label_smoothing: ε in [0, 1); ε > 0 needs `uniform_ce`.
      uniform_ce: float32 [B, T], -mean_v log p_v (`HeadStats.uniform_ce`).
      correct: bool [B, T], argmax == label (`HeadStats.argmax == labels`); None omits
        `token_accuracy`.

    Returns:
      (loss, metrics) as `sft_loss` (`token_accuracy` only with `correct`).

    Raises:
      AssertionError: (chex) shapes that differ.
      ValueError: label_smoothing outside [0, 1), or ε > 0 without uniform_ce.
    """
    chex.assert_equal_shape((logps, mask))
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    nll = -logps  # [B,T]
    if label_smoothing:
        if uniform_ce is None:
            raise ValueError("sft_token_loss: label_smoothing > 0 needs uniform_ce (HeadStats.uniform_ce)")
        nll = (1.0 - label_smoothing) * nll + label_smoothing * uniform_ce
    return _token_mean(nll, correct, mask)


def _token_mean(nll, correct, mask):
    loss_sum = masked_sum(nll, mask)
    num_tokens = masked_count(mask)
    loss = loss_sum / jnp.maximum(num_tokens, 1.0)
    metrics = {"loss": loss, "loss_sum": loss_sum, "num_tokens": num_tokens}
    if correct is not None:
        metrics["token_accuracy"] = masked_sum(correct.astype(jnp.float32), mask) / jnp.maximum(num_tokens, 1.0)
    return loss, metrics
