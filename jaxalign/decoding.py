"""KV-cache generation: prefill, then one token per step inside a single `jax.lax.while_loop`.

Prompts are left-padded (`prompt_mask` 0 on padding), so every row's last prompt token sits in
the last column and all rows decode in lock-step; positions count real tokens only, so a prompt
yields the same completion however much padding it carries. Each sampled token comes with two
log-probs: under the distribution it was drawn from (temperature / top-k / top-p applied) and
under the unmodified model (temperature 1, no filtering) — the `old_logps` PPO and GRPO need,
equal to `token_logps` of a teacher-forced pass over the same tokens.

Shapes: B batch, P prompt length, N max_new_tokens, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import flax.struct
import jax
import jax.numpy as jnp

from jaxalign.models.config import TransformerConfig
from jaxalign.models.transformer import KVCache, forward_with_cache, init_cache
from jaxalign.ops import select


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How `generate` samples: one frozen, hashable value (a static argument of the compiled
    program) that travels from a script's flags to `generate`, the rollouts and
    `evaluate_policy`.

    Attributes:
      max_new_tokens: N >= 1, tokens generated per row at most.
      temperature: 0.0 for greedy (argmax) decoding, else the softmax temperature (> 0).
      top_k: optional top-k filtering, k >= 1 (checked against the vocabulary by `generate`;
        see `sampling_logits`).
      top_p: optional nucleus filtering, in (0, 1]; 1.0 is no filtering.
      eos_id: a row stops after emitting it (None: always N tokens).
      pad_id: written after a row's EOS.
      attend_bucket: decode steps per segment of `generate`'s loop: segment j's steps attend
        only the first P + min(N, (j+1)·attend_bucket) cache slots (all that can be filled by
        its end) instead of all P + N, so attention costs grow with the tokens that exist, to
        within attend_bucket/2 on average; each segment is one more compiled loop body, and the
        cache grows (a copy) between segments. None (or >= N): one segment over all P + N slots.
        Not applied to a rolling buffer (`cache_window` < P + N) or a pre-filled `cache`.

    Raises:
      ValueError: on construction, max_new_tokens < 1, temperature < 0, top_k < 1, top_p
        outside (0, 1] or attend_bucket < 1 (the message names the field).
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos_id: int | None = None
    pad_id: int = 0
    attend_bucket: int | None = 64

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"SamplingConfig.top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.attend_bucket is not None and self.attend_bucket < 1:
            raise ValueError(f"SamplingConfig.attend_bucket must be >= 1 or None, got {self.attend_bucket}")

    @property
    def greedy(self) -> bool:
        """Argmax decoding (temperature 0)."""
        return self.temperature == 0.0


@flax.struct.dataclass
class Generation:
    """What `generate` returns.

    Attributes:
      tokens: int32 [B, N] sampled tokens; `pad_id` after a row's EOS.
      logps: float32 [B, N] log-prob of each token under the sampling distribution (0 for greedy).
      model_logps: float32 [B, N] log-prob under the unmodified model (softmax of raw logits).
      mask: float32 [B, N] 1.0 on generated tokens up to and including EOS, 0.0 after.
      lengths: int32 [B] number of generated tokens (the mask's row sums).
    """

    tokens: jax.Array
    logps: jax.Array
    model_logps: jax.Array
    mask: jax.Array
    lengths: jax.Array


@flax.struct.dataclass
class SamplingState:
    """The `while_loop` carry: step counter, cache, logits to sample from, output buffers."""

    step: jax.Array  # int32 scalar
    cache: KVCache
    logits: jax.Array  # float32 [B, V], next-token logits
    positions: jax.Array  # int32 [B], position of the next token of each row
    done: jax.Array  # bool [B], row has emitted EOS
    tokens: jax.Array  # int32 [B, N]
    logps: jax.Array  # float32 [B, N]
    model_logps: jax.Array  # float32 [B, N]
    rng: jax.Array


def sampling_logits(
    logits: jax.Array, *, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> jax.Array:
    """Logits of the distribution to sample from: divided by temperature, then top-k, then nucleus
    (top-p, Holtzman et al. 2020, arXiv 1904.09751) filtering, which set excluded tokens to -inf.

    Order and rules are Hugging Face's `TemperatureLogitsWarper`, `TopKLogitsWarper` and
    `TopPLogitsWarper` with `min_tokens_to_keep=1` (transformers 5.24,
    `generation/logits_process.py`; `GenerationMixin._get_logits_processor` applies them in this
    order, top-p after top-k and renormalised over the top-k survivors, and skips top-p when
    top_p >= 1). Kept sets are equal to HF's except among tied logits (below) and where a mass
    lies within rounding of top_p; logits / temperature agree to 1 float32 ulp (XLA's division
    by a constant is not always correctly rounded, torch's is).

    Top-k keeps every token whose logit is >= the k-th largest: ties at the k-th value are all
    kept (HF removes `scores < topk(scores, k)[..., -1]`), so more than k may remain; k >= V keeps
    all.

    Top-p keeps the smallest prefix of the tokens sorted by decreasing probability whose mass
    reaches top_p: a token is kept iff the probability mass strictly before it in that order is
    < top_p, so the most likely token is always kept (HF's `min_tokens_to_keep=1`). Ties: equal
    logits are ordered by vocabulary id, lower id first (a stable sort), so a cut inside a run of
    equal logits keeps the lower ids. HF keeps as many of them, but which ones follows
    `torch.sort`, whose order of equal values is unspecified (on CPU, short rows: the higher ids).
    Precision: the mass is summed in float32 from the end that makes the compared sum at most
    1/2 (from the top for top_p <= 1/2, from the tail for top_p > 1/2, so a tail of tiny
    probabilities is not rounded away against a running total near 1), and a sum within a
    relative `_TOP_P_RTOL` = 2^-20 of its threshold (top_p·total, or (1 − top_p)·total for the
    tail) counts as reaching it. So probabilities that add up to top_p exactly are cut there: HF's
    documented [0.3, 0.1, 0.1, 0.5] at 0.8 keeps [0.3, 0.5] (HF itself keeps two of ten 0.1s at
    top_p = 0.1). The float32 sums are good to ~4e-7 (measured, V <= 151936); on random rows the
    kept sets equal those of the float64 rule. top_p >= 1 skips the filter: an exact identity.

    Args:
      logits: float [B, V] next-token logits; -inf entries (already excluded) stay -inf.
      temperature: > 0.
      top_k: None, or keep the k >= 1 largest logits (ties at the k-th value kept).
      top_p: None, or in (0, 1]: nucleus filtering as above.

    Returns:
      float32 [B, V].

    Raises:
      ValueError: top_k < 1, or top_p outside (0, 1].
    """
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    z = logits.astype(jnp.float32) / temperature  # [B,V]
    if top_k is not None and top_k < z.shape[-1]:
        kth = jax.lax.top_k(z, top_k)[0][:, -1:]  # [B,1]
        z = jnp.where(z < kth, -jnp.inf, z)
    if top_p is not None and top_p < 1.0:
        z = jnp.where(_top_p_keep(z, top_p), z, -jnp.inf)
    return z


_TOP_P_RTOL = 2.0**-20  # relative slack of the top-p comparison: 8 float32 ulps of 1


def _top_p_keep(z: jax.Array, top_p: float) -> jax.Array:
    """bool [B, V]: the tokens nucleus filtering keeps (see `sampling_logits`)."""
    order = jnp.argsort(-z, axis=-1, stable=True)  # [B,V] descending; ties: lower id first
    sorted_z = jnp.take_along_axis(z, order, axis=-1)  # [B,V]
    weights = jnp.exp(sorted_z - sorted_z[:, :1])  # [B,V] unnormalised probabilities, first = 1
    if top_p <= 0.5:
        inclusive = jnp.cumsum(weights, axis=-1)  # [B,V]
        total = inclusive[:, -1:]  # [B,1]
        before = jnp.concatenate([jnp.zeros_like(inclusive[:, :1]), inclusive[:, :-1]], axis=-1)
        keep_sorted = before < top_p * (1.0 - _TOP_P_RTOL) * total  # mass before < p
    else:
        tail = jnp.flip(jnp.cumsum(jnp.flip(weights, -1), axis=-1), -1)  # [B,V] mass at or after
        total = tail[:, :1]  # [B,1]
        keep_sorted = tail > (1.0 - top_p) * (1.0 + _TOP_P_RTOL) * total  # ⟺ mass before < p
    keep_sorted = keep_sorted.at[:, 0].set(True)  # HF's min_tokens_to_keep = 1
    rows = jnp.arange(z.shape[0])[:, None]  # [B,1]
    return jnp.zeros_like(keep_sorted).at[rows, order].set(keep_sorted)


def _pick(logps: jax.Array, tokens: jax.Array) -> jax.Array:
    return jnp.take_along_axis(logps, tokens[:, None], axis=-1)[:, 0]


def _sample(logits, rng, *, temperature, top_k, top_p):
    """Returns (token [B], sampling log-prob [B], model log-prob [B])."""
    model_logps = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B,V]
    if temperature == 0.0:  # greedy: a point mass, log-prob 0
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return token, jnp.zeros(token.shape, jnp.float32), _pick(model_logps, token)
    z = sampling_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    token = jax.random.categorical(rng, z, axis=-1).astype(jnp.int32)
    return token, _pick(jax.nn.log_softmax(z, axis=-1), token), _pick(model_logps, token)


def prompt_positions(prompt_mask: jax.Array) -> jax.Array:
    """Positions of left-padded prompt tokens: 0, 1, ... over real tokens, -1 on padding.

    Args:
      prompt_mask: [B, P], 1 on real tokens, 0 on (left) padding.

    Returns:
      int32 [B, P].
    """
    real = prompt_mask.astype(bool)
    return jnp.where(real, jnp.cumsum(real, axis=-1) - 1, -1).astype(jnp.int32)


def attend_sizes(config: TransformerConfig, prompt_len: int, sampling: SamplingConfig) -> tuple[int, ...]:
    """Cache slots of each decode segment of `generate` (see `SamplingConfig.attend_bucket`):
    P + min(N, (j+1)·bucket) for j = 0, 1, ...; (P + N,) for one segment (no bucket, bucket >= N,
    or a rolling buffer: `config.cache_window` < P + N)."""
    p, n, bucket = prompt_len, sampling.max_new_tokens, sampling.attend_bucket
    window = config.cache_window
    if bucket is None or bucket >= n or (window is not None and window < p + n):
        return (p + n,)
    return tuple(p + min(n, end) for end in range(bucket, n + bucket, bucket))


def grow_cache(cache: KVCache, size: int) -> KVCache:
    """`cache` with `size` >= cache.size slots: the new slots empty (zeros, position -1), the
    filled ones and `length` unchanged, so the next token still goes to slot `length` (a cache
    that never wrapped). Works on both layouts (slot axis 1 of [B, S, ...] per layer, axis 2 of
    stacked [L, B, S, ...])."""
    extra = size - cache.size
    if extra < 0:
        raise ValueError(f"grow_cache: {size} slots < the cache's {cache.size}")
    if extra == 0:
        return cache
    axis = 2 if cache.stacked else 1

    def pad(x: jax.Array) -> jax.Array:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, extra)
        return jnp.pad(x, widths)

    keys, values = jax.tree.map(pad, cache.keys), jax.tree.map(pad, cache.values)
    if not cache.stacked:
        keys, values = tuple(keys), tuple(values)
    positions = jnp.pad(cache.positions, ((0, 0), (0, extra)), constant_values=-1)
    return cache.replace(keys=keys, values=values, positions=positions)


def repeat_rows(tree, n: int):
    """Every batch-major array of `tree` (a `KVCache`, logits, positions) with each row repeated
    `n` times in place (`jnp.repeat(x, n, axis=0)`); scalars (the cache's `length`) as they are.
    A stacked cache's keys/values [L, B, S, K, H] repeat along their batch axis 1."""

    def rows(x, axis=0):
        return jnp.repeat(x, n, axis=axis) if x.ndim else x

    def repeat(node):
        if isinstance(node, KVCache) and node.stacked:
            return node.replace(
                keys=rows(node.keys, 1), values=rows(node.values, 1),
                positions=rows(node.positions), length=node.length,
            )
        return jax.tree.map(rows, node)

    return jax.tree.map(repeat, tree, is_leaf=lambda x: isinstance(x, KVCache))


def _check_generate_args(config: TransformerConfig, p: int, sampling: SamplingConfig, num_samples: int) -> None:
    """`generate`'s trace-time refusals (see its Raises)."""
    n, top_k = sampling.max_new_tokens, sampling.top_k
    if p >= config.max_seq_len:  # before the max_new_tokens check: the prompt is the cause
        raise ValueError(
            f"prompt is {p} tokens (the left-padded batch width), the model's context is "
            f"{config.max_seq_len} (config.max_seq_len): no room for a new token"
        )
    if p + n > config.max_seq_len:
        raise ValueError(f"prompt length {p} + max_new_tokens {n} exceeds max_seq_len {config.max_seq_len}")
    if top_k is not None and top_k > config.vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size={config.vocab_size}], got {top_k}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")


@functools.partial(jax.jit, static_argnames=("config", "sampling", "num_samples"))
def generate(
    params,
    config: TransformerConfig,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    *,
    sampling: SamplingConfig,
    rng: jax.Array,
    num_samples: int = 1,
    cache: KVCache | None = None,
) -> Generation:
    """Samples up to `sampling.max_new_tokens` tokens after each left-padded prompt, with a KV
    cache.

    One compiled program per (shapes, config, sampling): the prompt is prefilled in one call,
    then a `jax.lax.while_loop` decodes one token per iteration until every row has emitted
    `sampling.eos_id` or N = `sampling.max_new_tokens` is reached. The cache is pre-allocated
    with P + N slots, or with `config.cache_window` slots used as a rolling buffer. With
    `sampling.attend_bucket` = b < N the loop runs in segments of b steps, segment j over a
    cache of P + min(N, (j+1)·b) slots (grown between segments; `attend_sizes`), so early steps
    do not attend empty slots: the same tokens and log-probs up to float32 summation order.

    Args:
      params, config: the model.
      prompt_tokens: int32 [B, P], left-padded; every row needs at least one real token, and
        P < config.max_seq_len (the cache holds P + N positions).
      prompt_mask: [B, P], 1 on real prompt tokens, 0 on padding.
      sampling: the `SamplingConfig` (N, temperature, top-k, top-p, EOS and padding ids).
      rng: a PRNG key (unused for greedy decoding).
      num_samples: n >= 1 completions per prompt from one prefill: the prompt's cache and last
        logits are repeated n times after the prefill (inference-time scaling, GRPO groups), so
        the B·(n−1)·P prefill tokens of repeating the prompts are not paid. Output rows
        i·n … i·n + n − 1 are prompt i's samples (`np.repeat` order), each row with its own draws.
      cache: a pre-filled `KVCache` of B rows and at least its filled slots + P + N slots, e.g.
        a prefix (`jaxalign.prefix.prefix_cache`); the prompt's positions then continue after
        its `length` filled slots, as Hugging Face counts a prefix. None: an empty cache.

    Returns:
      `Generation` (tokens, logps, model_logps, mask, lengths), all with B·n rows.

    Raises:
      ValueError: raised at trace time, before any compute: P >= config.max_seq_len ("prompt is
        P tokens ..., the model's context is M (config.max_seq_len)"), P + N >
        config.max_seq_len, top_k > config.vocab_size (and `SamplingConfig`'s own checks).
      AssertionError: (chex) prompt_tokens not rank 2, or prompt_mask of another shape.
      ValueError: num_samples < 1.
    """
    chex.assert_rank(prompt_tokens, 2)
    chex.assert_equal_shape((prompt_tokens, prompt_mask))
    b, p = prompt_tokens.shape
    n, eos_id, pad_id = sampling.max_new_tokens, sampling.eos_id, sampling.pad_id
    temperature, top_k, top_p = sampling.temperature, sampling.top_k, sampling.top_p
    _check_generate_args(config, p, sampling, num_samples)

    positions = prompt_positions(prompt_mask)  # [B,P]
    sizes = attend_sizes(config, p, sampling) if cache is None else (None,)
    if cache is None:
        cache = init_cache(config, b, sizes[0])
    else:  # pre-filled (a prefix): real tokens follow its filled slots
        positions = jnp.where(positions >= 0, positions + cache.length, -1)
    logits, cache = forward_with_cache(params, config, prompt_tokens, cache, positions)  # [B,P,V]
    last_logits, next_positions = logits[:, -1].astype(jnp.float32), positions[:, -1] + 1  # [B,V], [B]
    if num_samples > 1:
        cache, last_logits, next_positions = repeat_rows((cache, last_logits, next_positions), num_samples)
        b = b * num_samples
    state = SamplingState(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        logits=last_logits,
        positions=next_positions,
        done=jnp.zeros((b,), bool),
        tokens=jnp.full((b, n), pad_id, jnp.int32),
        logps=jnp.zeros((b, n), jnp.float32),
        model_logps=jnp.zeros((b, n), jnp.float32),
        rng=rng,
    )

    def cond(end: int, s: SamplingState) -> jax.Array:
        return (s.step < end) & ~jnp.all(s.done)

    def body(s: SamplingState) -> SamplingState:
        rng, key = jax.random.split(s.rng)
        token, logp, model_logp = _sample(s.logits, key, temperature=temperature, top_k=top_k, top_p=top_p)
        token = jnp.where(s.done, pad_id, token)  # [B]
        logp, model_logp = jnp.where(s.done, 0.0, logp), jnp.where(s.done, 0.0, model_logp)
        done = s.done | (token == eos_id) if eos_id is not None else s.done
        logits, cache = forward_with_cache(
            params, config, token[:, None], s.cache, s.positions[:, None]
        )  # [B,1,V]
        return SamplingState(
            step=s.step + 1,
            cache=cache,
            logits=logits[:, 0].astype(jnp.float32),
            positions=s.positions + 1,
            done=done,
            tokens=s.tokens.at[:, s.step].set(token),
            logps=s.logps.at[:, s.step].set(logp),
            model_logps=s.model_logps.at[:, s.step].set(model_logp),
            rng=rng,
        )

    final = state
    for j, size in enumerate(sizes):  # segment j: steps up to `end`, over `size` slots
        if j > 0:
            final = final.replace(cache=grow_cache(final.cache, size))
        end = n if size is None else size - p  # token of step s goes to slot p + s < size
        final = jax.lax.while_loop(functools.partial(cond, end), body, final)
    # A token counts if it was produced before its row's EOS (inclusive) and before the loop ended.
    index = jnp.arange(n)[None, :]  # [1,N]
    if eos_id is None:
        produced = jnp.broadcast_to(index < final.step, (b, n))
    else:
        is_eos = final.tokens == eos_id  # [B,N]
        first_eos = jnp.where(jnp.any(is_eos, axis=-1), jnp.argmax(is_eos, axis=-1), n)  # [B]
        produced = (index <= first_eos[:, None]) & (index < final.step)
    mask = produced.astype(jnp.float32)
    return Generation(
        tokens=jnp.where(produced, final.tokens, pad_id),
        logps=select(produced, final.logps),  # after EOS the buffers hold what was never sampled
        model_logps=select(produced, final.model_logps),
        mask=mask,
        lengths=jnp.sum(produced, axis=-1).astype(jnp.int32),
    )
