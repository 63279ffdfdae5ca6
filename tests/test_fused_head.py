"""The fused, chunked output head (`jaxalign.logprobs.head_stats`, `jaxalign.scoring.label_stats`)
against the unfused reference (the full [B, T, V] logits, then the same statistics), and the
memory XLA reports for it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.logprobs import entropy, head_chunk_positions, head_stats, token_logps
from jaxalign.losses.sft import sft_loss
from jaxalign.metrics import compilations
from jaxalign.models import TransformerConfig, forward, init_params, logits_from_hidden
from jaxalign.scoring import label_stats
from jaxalign.trainers.sft import sft_batch_loss
from tests._tolerance import ulps

# Untied head with Gemma-2 soft-capping, so head_fn is more than one matmul; V = 300.
CONFIG = TransformerConfig(
    family="llama", vocab_size=300, d_model=32, n_layers=1, n_heads=2, max_seq_len=64, tie_embeddings=False,
    final_softcap=30.0,
)
GPT = TransformerConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=2, max_seq_len=64)  # tied head


def _inputs(config, b=3, t=20, seed=0):
    params = init_params(config, jax.random.key(seed))
    params = jax.tree.map(lambda x: x * 8.0, params)  # logits of O(1..10): real softmaxes, not uniform
    tokens = jax.random.randint(jax.random.key(seed + 1), (b, t), 0, config.vocab_size)
    return params, tokens


def _objective(config, chunk):
    def f(params, tokens):
        hidden = forward(params, config, tokens, return_hidden=True)  # [B,T,D]
        s = head_stats(
            hidden, tokens, lambda h: logits_from_hidden(params, config, h), chunk_tokens=chunk,
            uniform_ce=True, entropy=True, argmax=True,
        )
        # every statistic carries gradient into the objective, each with its own weight
        return jnp.sum(s.logps) + 0.5 * jnp.sum(s.entropy) + 0.25 * jnp.sum(s.uniform_ce), s

    return jax.value_and_grad(f, has_aux=True)


@pytest.mark.parametrize("config", [CONFIG, GPT], ids=["untied-softcap", "tied"])
@pytest.mark.parametrize("chunk", [1, 7, 12, 60, 1024])  # c = 1, 3 (tail 2), 4, 20 (whole), 20
def test_values_and_gradients_equal_the_unfused_head(config, chunk):
    params, tokens = _inputs(config)
    (ref, ref_stats), ref_grad = _objective(config, None)(params, tokens)
    (val, stats), grad = _objective(config, chunk)(params, tokens)
    hidden = forward(params, config, tokens, return_hidden=True)
    logits = logits_from_hidden(params, config, hidden)
    # the reference itself is the ordinary ops on the full logits (another program: 16 ulps)
    np.testing.assert_allclose(ref_stats.logps, token_logps(logits, tokens), rtol=0, atol=ulps(16, ref_stats.logps))
    np.testing.assert_allclose(ref_stats.entropy, entropy(logits), rtol=0, atol=ulps(16, ref_stats.entropy))
    np.testing.assert_array_equal(ref_stats.argmax, jnp.argmax(logits, -1))
    # Same maths per row, only the chunk shapes differ (XLA may vectorise a 300-term reduction
    # another way): 64 ulps of each statistic's magnitude; measured 0 to 2.
    for name in ("logps", "entropy", "uniform_ce"):
        a, b = getattr(stats, name), getattr(ref_stats, name)
        np.testing.assert_allclose(a, b, rtol=0, atol=ulps(64, b), err_msg=name)
    np.testing.assert_array_equal(stats.argmax, ref_stats.argmax)
    np.testing.assert_allclose(val, ref, rtol=ulps(64))
    _assert_grads_close(grad, ref_grad)


def _assert_grads_close(grad, ref_grad):
    # Gradients: sums over the positions and 300 logits of terms of size |g|: 1024 ulps of each
    # leaf's largest entry (measured up to 15). GPT-2's key bias has gradient 0 in exact
    # arithmetic (adding q·b to every score of a query leaves its softmax unchanged), so both
    # sides are rounding noise of the key path: compared at the key kernel's scale (measured 0.3).
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grad), jax.tree.leaves(ref_grad)):
        name = jax.tree_util.keystr(path)
        scale = r
        if "['wk']['bias']" in name:
            scale = ref_grad["layers_0"]["attn"]["wk"]["kernel"]
            assert float(jnp.max(jnp.abs(r))) < ulps(1024, scale)
        np.testing.assert_allclose(g, r, rtol=0, atol=ulps(1024, scale), err_msg=name)


def test_only_the_asked_statistics_are_returned():
    params, tokens = _inputs(GPT)
    hidden = forward(params, GPT, tokens, return_hidden=True)
    s = label_stats(params, GPT, hidden, tokens, head_chunk=8, entropy=True)
    assert s.uniform_ce is None and s.argmax is None and s.entropy.shape == (3, 20)
    assert s.logps.dtype == jnp.float32


def test_chunk_positions():
    assert head_chunk_positions(8, 1024, 1024) == 128  # 8 rows × 128 positions
    assert head_chunk_positions(3, 20, 1024) == 20  # never more than the sequence
    assert head_chunk_positions(2048, 20, 1024) == 1  # at least one position
    assert head_chunk_positions(3, 20, 7) == 3  # ⌈7 / 3⌉
    # with the head's width: chunks only when they save more than the two [V, D] buffers cost
    assert head_chunk_positions(8, 1024, 1024, 768) == 128  # 8192 tokens > 1024 + 768
    assert head_chunk_positions(1, 2048, 1024, 4096) == 2048  # 2048 <= 1024 + 4096: one chunk
    with pytest.raises(ValueError, match="positive number of tokens"):
        head_chunk_positions(3, 20, 0)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_sft_batch_loss_equals_sft_loss_on_full_logits(smoothing):
    params, tokens = _inputs(CONFIG, b=4, t=24, seed=3)
    mask = jnp.ones_like(tokens, jnp.float32).at[:, :9].set(0.0).at[1, 15:].set(0.0)  # prompt + padding
    batch = {"tokens": tokens, "mask": mask}

    def reference(p):
        logits = forward(p, CONFIG, tokens[:, :-1])
        return sft_loss(logits, tokens[:, 1:], mask[:, 1:], label_smoothing=smoothing)

    (ref, ref_m), ref_g = jax.value_and_grad(reference, has_aux=True)(params)
    for chunk in (None, 10):
        fn = functools.partial(sft_batch_loss, config=CONFIG, batch=batch, label_smoothing=smoothing, head_chunk=chunk)
        (loss, m), g = jax.value_and_grad(fn, has_aux=True)(params)
        # token means over ~50 tokens of 300-way reductions: 64 ulps of the loss; measured <= 2
        np.testing.assert_allclose(loss, ref, rtol=ulps(64))
        assert float(m["token_accuracy"]) == float(ref_m["token_accuracy"])
        assert float(m["num_tokens"]) == float(ref_m["num_tokens"]) == 3 * 15 + 6  # positions 9..23; row 1: 9..14
        _assert_grads_close(g, ref_g)


def test_no_recompile_on_a_second_call():
    params, tokens = _inputs(GPT)
    fn = jax.jit(lambda p, t: _objective(GPT, 7)(p, t)[0][0])
    flipped = jnp.flip(tokens, 1)
    with compilations(fn) as compiled:
        fn(params, tokens)
        fn(params, flipped)
    assert len(compiled) == 1


def test_xla_memory_shows_the_logits_gone():
    # B·T·V float32 logits = 8·256·50257·4 = 412 MB; a chunk of 256 tokens is 51 MB.
    config = TransformerConfig(vocab_size=50257, d_model=64, n_layers=1, n_heads=2, max_seq_len=256)
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((8, 256), jnp.int32)
    logits_bytes = 8 * 256 * 50257 * 4

    def temp(chunk):
        def loss(p, t):
            hidden = forward(p, config, t, return_hidden=True)
            return jnp.sum(label_stats(p, config, hidden, t, head_chunk=chunk, argmax=True).logps)

        return jax.jit(jax.grad(loss)).lower(params, tokens).compile().memory_analysis().temp_size_in_bytes

    unfused, fused = temp(None), temp(256)
    assert unfused > 1.5 * logits_bytes  # logits and their cotangent (measured 2.07×)
    # fused: the residual stream, the stacked chunk inputs and ~3 chunks of logits (measured 0.35×)
    assert fused < 0.6 * logits_bytes
