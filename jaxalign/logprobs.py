"""Log-probabilities of labels under logits, without a full log-softmax copy.

`log softmax(z)[y] = z[y] - logsumexp(z)`: one gather and one reduction over the vocabulary, both
in float32 whatever the logits' dtype. XLA fuses the upcast into the reduction, so no second
[B, T, V] array is materialised; with `chunk_size` the sequence is processed in slices under
`jax.lax.map`, so even unfused backends hold at most [B, chunk, V] extra float32 values.

Shapes: B batch, T sequence, V vocab. Log-probs are float32 nats.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from jaxalign.ops import masked_mean, masked_sum


def over_sequence_chunks(
    fn: Callable[..., object], chunk_size: int | None, *arrays: jax.Array, remat: bool = False
):
    """Applies `fn(*arrays) -> [B, t]` (or a tuple of such arrays) over sequence chunks of size
    `chunk_size` (axis 1), one chunk at a time (`jax.lax.map`), so per-token work on [B, T, V]
    logits (log-probs, entropy, the SFT NLL) holds only a [B, chunk_size, V] slice of
    temporaries at once.

    Args:
      fn: maps arrays [B, c, ...] to [B, c] (or a tuple of [B, c] arrays, any dtypes); applied
        to each chunk and to the remainder.
      chunk_size: positions per chunk; None (or >= T) applies `fn` to the whole sequence.
      *arrays: [B, T, ...] each, chunked along axis 1.
      remat: wrap `fn` in `jax.checkpoint`, so that under differentiation each chunk's
        intermediates (e.g. the [B, c, V] logits a head computes inside `fn`) are recomputed in
        the backward pass instead of stored: only the chunks' inputs are kept.

    Returns:
      [B, T] (or the tuple of [B, T] arrays), the chunks' outputs concatenated.

    Raises:
      ValueError: chunk_size <= 0.
    """
    t = arrays[0].shape[1]
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    # prevent_cse=False inside the scan (jax.checkpoint's advice: scan already keeps XLA from
    # merging the recomputation back); True for a call outside it.
    whole = jax.checkpoint(fn) if remat else fn
    if chunk_size is None or chunk_size >= t:
        return whole(*arrays)
    body = jax.checkpoint(fn, prevent_cse=False) if remat else fn
    n_full = t // chunk_size
    head_len = n_full * chunk_size
    b = arrays[0].shape[0]

    def to_chunks(x: jax.Array) -> jax.Array:  # [B, n*c, ...] -> [n, B, c, ...]
        x = x[:, :head_len]
        x = x.reshape(x.shape[0], n_full, chunk_size, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    head = jax.lax.map(lambda xs: body(*xs), tuple(to_chunks(a) for a in arrays))  # [n, B, c] each
    head = jax.tree.map(lambda h: jnp.moveaxis(h, 0, 1).reshape(b, head_len), head)  # [B, n*c]
    if head_len == t:
        return head
    tail = whole(*(a[:, head_len:] for a in arrays))  # [B, t - n*c] each
    return jax.tree.map(lambda h, r: jnp.concatenate([h, r], axis=1), head, tail)


def clamp_labels(labels: jax.Array, vocab_size: int) -> jax.Array:
    """Label ids clipped into [0, V): a gather with `-100` (Hugging Face's ignore index) or any
    other out-of-range id then reads a real logit (a finite, meaningless value that the mask
    selects away) instead of XLA's out-of-bounds fill (NaN for float gathers)."""
    return jnp.clip(labels, 0, vocab_size - 1)


def _token_logps(logits: jax.Array, labels: jax.Array) -> jax.Array:
    logits = logits.astype(jnp.float32)  # [B,t,V], fused into the two reductions below
    labels = clamp_labels(labels, logits.shape[-1])  # [B,t]
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]  # [B,t]
    return picked - jax.nn.logsumexp(logits, axis=-1)  # [B,t]


def token_logps(
    logits: jax.Array, labels: jax.Array, *, chunk_size: int | None = None
) -> jax.Array:
    """Per-token log-probabilities `log softmax(logits)[labels]`.

    Args:
      logits: [B, T, V] any float dtype (bf16 logits are upcast per element, inside the reduction).
      labels: int [B, T] token ids in [0, V). An id outside that range (padding, `-100`) is
        clamped into it, so its log-prob is finite but meaningless: mask it out
        (`sequence_logps` and every loss select, so it cannot leak).
      chunk_size: if set, process the sequence in chunks of this many positions (extra peak memory
        O(B·chunk·V) instead of O(B·T·V) on backends that do not fuse the upcast).

    Returns:
      float32 [B, T] log-probabilities (nats, <= 0).

    Raises:
      AssertionError: (chex) ranks or leading shapes that disagree.
      ValueError: a non-positive chunk_size.
    """
    chex.assert_rank(logits, 3)
    chex.assert_rank(labels, 2)
    chex.assert_equal_shape_prefix((logits, labels), 2)
    return over_sequence_chunks(_token_logps, chunk_size, logits, labels)


_SUM_BLOCK = 256


def _two_level_sum(x: jax.Array) -> jax.Array:
    """Sum over the last axis as blocks of `_SUM_BLOCK` terms, then over the block sums.

    XLA:CPU emits some fused last-axis reductions as one running float32 sum: measured 1.8e-5
    relative error on the entropy of a [1, T, 32768] array (and of [B, 1, V] chunks), where
    the same sum over [2, T, V] is good to 2e-7. Two levels bound each running sum to
    max(256, ⌈V/256⌉) terms; the barrier keeps XLA from merging them back into one reduction.
    """
    v = x.shape[-1]
    if v <= _SUM_BLOCK:
        return jnp.sum(x, axis=-1)
    pad = -v % _SUM_BLOCK
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])  # zeros add nothing
    blocks = jnp.sum(x.reshape(*x.shape[:-1], -1, _SUM_BLOCK), axis=-1)  # [..., ⌈V/256⌉]
    return jnp.sum(jax.lax.optimization_barrier(blocks), axis=-1)


def _entropy(logits: jax.Array) -> jax.Array:
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B,t,V] z - lse(z)
    probs = jnp.exp(log_probs)  # [B,t,V]
    # p·log p is 0 where p is 0 (a -inf logit, or underflow): select log p to 0 there first, so
    # neither the value nor the gradient meets 0·(-inf).
    safe = jnp.where(probs > 0, log_probs, 0.0)  # [B,t,V]
    return -_two_level_sum(probs * safe)  # [B,t]


def entropy(logits: jax.Array, *, chunk_size: int | None = None) -> jax.Array:
    """Entropy of the categorical distribution softmax(logits), per position.

    `H = −Σ_v p_v · log p_v` with `log p = z − logsumexp(z)` (`jax.nn.log_softmax`, which
    subtracts the row max first), in float32. Summing p·log p directly avoids the cancellation
    of the form `logsumexp(z) − Σ p·z` (two numbers near max z subtracted: 2e-5 absolute error on
    a V = 32768 row with one logit 20 above N(0, 4) others, against a float64 reference; this
    form: 1e-7). The sum over V runs in two levels (`_two_level_sum`), so the result is good to
    ~4e-7 relative (measured, V up to 151936) whatever the batch, sequence and chunk shapes,
    chunked or not. Terms with p = 0 (a -inf logit, e.g. after top-k filtering, or exp underflow)
    count 0 in value and gradient. A row whose logits are all -inf is no distribution: NaN.

    Args:
      logits: [B, T, V] any float dtype; -inf entries allowed.
      chunk_size: optional sequence chunking, as in `token_logps`.

    Returns:
      float32 [B, T] entropies in nats, in [0, log V].

    Raises:
      AssertionError: (chex) logits not rank 3.
      ValueError: a non-positive chunk_size.
    """
    chex.assert_rank(logits, 3)
    return over_sequence_chunks(_entropy, chunk_size, logits)


def sequence_logps(
    token_logps: jax.Array, mask: jax.Array, *, average: bool = False
) -> jax.Array:
    """Sum (or mean) of per-token log-probs over the masked positions of each sequence.

    Args:
      token_logps: float [B, T] per-token log-probs (e.g. from `token_logps`).
      mask: [B, T], 1.0 on tokens that count (the completion), 0.0 on prompt and padding; values
        at masked positions are selected away, so NaN or -inf there cannot leak.
      average: divide by the number of counted tokens (IPO's length normalisation); rows with no
        counted token give 0.

    Returns:
      float32 [B] log-probability of each completion (nats).

    Raises:
      AssertionError: (chex) token_logps not rank 2, or mask of another shape.
    """
    chex.assert_rank(token_logps, 2)
    chex.assert_equal_shape((token_logps, mask))
    if average:
        return masked_mean(token_logps, mask, axis=-1)
    return masked_sum(token_logps, mask, axis=-1)


# --------------------------------------------------------------------------------------------
# The fused, chunked output head: per-token statistics from hidden states, no [B, T, V] array.

HEAD_CHUNK_TOKENS = 1024
"""Default tokens per chunk of `head_stats` (B rows × ⌈1024 / B⌉ positions): a float32 chunk of
logits is 1024·V·4 bytes (206 MB at GPT-2's V = 50,257; 622 MB at Qwen's 151,936), and the
backward pass holds about three such arrays (logits, softmax, their cotangent) at once."""


class HeadStats(NamedTuple):
    """Per-token statistics of the output distribution softmax(z), z = head(hidden).

    Attributes:
      logps: float32 [B, T], log softmax(z)[label] (nats).
      uniform_ce: float32 [B, T], −mean_v log softmax(z)_v = logsumexp(z) − mean_v z_v (the
        cross-entropy against the uniform distribution, label smoothing's second term), or None.
      entropy: float32 [B, T], −Σ_v p_v log p_v (nats; as `entropy`), or None.
      argmax: int32 [B, T], argmax_v z_v (the first on ties, as `jnp.argmax`), or None.
    """

    logps: jax.Array
    uniform_ce: jax.Array | None = None
    entropy: jax.Array | None = None
    argmax: jax.Array | None = None


def head_chunk_positions(batch: int, seq: int, chunk_tokens: int, width: int = 0) -> int:
    """Positions per chunk that hold about `chunk_tokens` tokens of a [batch, seq] array:
    clip(⌈chunk_tokens / batch⌉, 1, seq). Chunks are whole-batch slices along the sequence, so a
    batch split over devices stays split the same way in every chunk.

    With `width` = D (the head's input width) the whole sequence is one chunk unless chunking
    saves memory: the scan over chunks accumulates the head weight's cotangent in two more [V, D]
    buffers (8·V·D float32 bytes, what D tokens of logits work cost), so chunks pay only when
    batch·seq > tokens per chunk + D.

    Raises:
      ValueError: chunk_tokens <= 0.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"head chunk must be a positive number of tokens, got {chunk_tokens}")
    chunk = max(1, min(seq, -(-chunk_tokens // batch)))
    if batch * seq <= batch * chunk + width:
        return seq
    return chunk


def _logits_stats(logits, labels, *, uniform_ce: bool, entropy: bool, argmax: bool) -> HeadStats:
    z = logits.astype(jnp.float32)  # [B,t,V]
    lse = jax.nn.logsumexp(z, axis=-1)  # [B,t]
    picked = jnp.take_along_axis(z, clamp_labels(labels, z.shape[-1])[..., None], axis=-1)[..., 0]
    return HeadStats(
        logps=picked - lse,  # [B,t]
        uniform_ce=lse - jnp.mean(z, axis=-1) if uniform_ce else None,
        entropy=_entropy(z) if entropy else None,
        argmax=jnp.argmax(z, axis=-1).astype(jnp.int32) if argmax else None,
    )


def head_stats(
    hidden: jax.Array,
    labels: jax.Array,
    head_fn: Callable[[jax.Array], jax.Array],
    *,
    chunk_tokens: int | None = HEAD_CHUNK_TOKENS,
    uniform_ce: bool = False,
    entropy: bool = False,
    argmax: bool = False,
) -> HeadStats:
    """Label log-probs (and optionally the uniform cross-entropy, entropy and argmax) of the
    output head applied to final hidden states, chunk by chunk, without a [B, T, V] array.

    Each chunk of positions runs `head_fn` (the head matmul, soft-capping, ...) and reduces its
    [B, c, V] logits to [B, c] statistics at once; under differentiation the chunk is
    rematerialised (`jax.checkpoint` over a `jax.lax.map`), so the backward pass recomputes one
    chunk's logits at a time instead of storing them all: peak memory O(B·c·V) instead of
    O(B·T·V), for one extra head matmul (the forward one, recomputed). Gradients reach the head's
    parameters (closed over by `head_fn`) and the hidden states. The same idea as Liger-Kernel's
    fused linear cross-entropy and Wijmans et al. 2024 ("Cut Your Losses", arXiv 2411.09009),
    written with JAX's remat rather than a custom kernel. `chunk_tokens=None` is the unfused
    reference: the whole [B, T, V] logits, then the same statistics.

    Args:
      hidden: [B, T, D] final hidden states (any float dtype), position t predicting labels[:, t].
      labels: int [B, T] token ids; out-of-range ids (padding, -100) are clamped (their values are
        finite and meaningless: mask them).
      head_fn: hidden [B, c, D] -> logits [B, c, V] (e.g. `jaxalign.models.logits_from_hidden`
        with the params bound).
      chunk_tokens: about this many tokens per chunk (`head_chunk_positions`: one chunk when
        chunking would not save memory); None: unfused.
      uniform_ce, entropy, argmax: also compute these statistics (see `HeadStats`).

    Returns:
      `HeadStats` of float32 [B, T] (argmax int32), None for the statistics not asked for.

    Raises:
      AssertionError: (chex) hidden not rank 3, labels not [B, T].
      ValueError: chunk_tokens <= 0.
    """
    chex.assert_rank(hidden, 3)
    chex.assert_rank(labels, 2)
    chex.assert_equal_shape_prefix((hidden, labels), 2)
    flags = dict(uniform_ce=uniform_ce, entropy=entropy, argmax=argmax)
    if chunk_tokens is None:
        return _logits_stats(head_fn(hidden), labels, **flags)
    b, t = labels.shape
    chunk = head_chunk_positions(b, t, chunk_tokens, hidden.shape[-1])

    def chunk_stats(h, y):  # [B,c,D], [B,c] -> tuple of [B,c] (None fields dropped: no pytree holes)
        stats = _logits_stats(head_fn(h), y, **flags)
        return tuple(x for x in stats if x is not None)

    values = list(over_sequence_chunks(chunk_stats, chunk, hidden, labels, remat=True))
    fields = {"logps": values.pop(0)}
    for name, wanted in flags.items():
        fields[name] = values.pop(0) if wanted else None
    return HeadStats(**fields)
