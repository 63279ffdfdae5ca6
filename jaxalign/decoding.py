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

import functools

import chex
import flax.struct
import jax
import jax.numpy as jnp

from jaxalign.models.config import TransformerConfig
from jaxalign.models.transformer import KVCache, forward_with_cache, init_cache


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
    """Logits of the distribution to sample from: divided by temperature, then top-k and nucleus
    (top-p, Holtzman et al. 2020, arXiv 1904.09751) filtering set excluded tokens to -inf.

    Args:
      logits: float [B, V] next-token logits.
      temperature: > 0.
      top_k: keep the k largest logits (ties at the k-th value are kept).
      top_p: keep the smallest set of most likely tokens whose probability reaches top_p (the most
        likely token is always kept).

    Returns:
      float32 [B, V].
    """
    z = logits.astype(jnp.float32) / temperature  # [B,V]
    if top_k is not None:
        kth = jax.lax.top_k(z, top_k)[0][:, -1:]  # [B,1]
        z = jnp.where(z < kth, -jnp.inf, z)
    if top_p is not None:
        order = jnp.argsort(-z, axis=-1)  # [B,V] descending
        sorted_z = jnp.take_along_axis(z, order, axis=-1)
        probs = jax.nn.softmax(sorted_z, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of strictly better tokens
        drop_sorted = mass_before >= top_p  # the top-1 token has mass_before = 0 and stays
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(z.shape[0])[:, None], order].set(drop_sorted)
        z = jnp.where(drop, -jnp.inf, z)
    return z


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


@functools.partial(
    jax.jit,
    static_argnames=("config", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id", "pad_id"),
)
def generate(
    params,
    config: TransformerConfig,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    *,
    max_new_tokens: int,
    rng: jax.Array,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> Generation:
    """Samples up to `max_new_tokens` tokens after each left-padded prompt, with a KV cache.

    One compiled program per (shapes, config, sampling settings): the prompt is prefilled in one
    call, then a `jax.lax.while_loop` decodes one token per iteration until every row has emitted
    `eos_id` or `max_new_tokens` is reached. The cache is pre-allocated with P + N slots, or with
    `config.sliding_window` slots used as a rolling buffer.

    Args:
      params, config: the model.
      prompt_tokens: int32 [B, P], left-padded; every row needs at least one real token.
      prompt_mask: [B, P], 1 on real prompt tokens, 0 on padding.
      max_new_tokens: N.
      rng: a PRNG key (unused for greedy decoding).
      temperature: 0.0 for greedy (argmax) decoding, else the softmax temperature.
      top_k: optional top-k filtering.
      top_p: optional nucleus filtering, in (0, 1].
      eos_id: a row stops after emitting it (None: always N tokens).
      pad_id: written after a row's EOS.

    Returns:
      `Generation` (tokens, logps, model_logps, mask, lengths).

    Raises:
      ValueError: P + N > config.max_seq_len, or bad sampling settings.
    """
    chex.assert_rank(prompt_tokens, 2)
    chex.assert_equal_shape((prompt_tokens, prompt_mask))
    b, p = prompt_tokens.shape
    n = max_new_tokens
    if n < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {n}")
    if p + n > config.max_seq_len:
        raise ValueError(f"prompt length {p} + max_new_tokens {n} exceeds max_seq_len {config.max_seq_len}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= config.vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size], got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")

    positions = prompt_positions(prompt_mask)  # [B,P]
    cache = init_cache(config, b, p + n)
    logits, cache = forward_with_cache(params, config, prompt_tokens, cache, positions)  # [B,P,V]
    state = SamplingState(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        logits=logits[:, -1].astype(jnp.float32),
        positions=positions[:, -1] + 1,
        done=jnp.zeros((b,), bool),
        tokens=jnp.full((b, n), pad_id, jnp.int32),
        logps=jnp.zeros((b, n), jnp.float32),
        model_logps=jnp.zeros((b, n), jnp.float32),
        rng=rng,
    )

    def cond(s: SamplingState) -> jax.Array:
        return (s.step < n) & ~jnp.all(s.done)

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

    final = jax.lax.while_loop(cond, body, state)
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
        logps=final.logps * mask,
        model_logps=final.model_logps * mask,
        mask=mask,
        lengths=jnp.sum(produced, axis=-1).astype(jnp.int32),
    )
