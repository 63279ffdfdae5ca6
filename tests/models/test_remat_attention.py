"""Per-block rematerialisation (`TransformerConfig.remat`) and the attention kernel selection
(`TransformerConfig.attention_impl`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.decoding import SamplingConfig, generate
from jaxalign.models import forward, get_config, init_params
from jaxalign.trainers.sft import sft_batch_loss
from tests._tolerance import ulps


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_remat_policies_keep_values_and_gradients(preset):
    base = get_config(preset, vocab_size=256, dropout=0.1)
    params = init_params(base, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 33), 0, 256)
    batch = {"tokens": tokens, "mask": jnp.ones(tokens.shape, jnp.float32)}

    def value_and_grad(remat):
        config = base.replace(remat=remat)
        fn = lambda p: sft_batch_loss(p, config, batch, jax.random.key(2))[0]  # noqa: E731 - dropout on
        return jax.jit(jax.value_and_grad(fn))(params)

    ref, ref_grad = value_and_grad("none")
    for remat in ("dots", "full"):
        loss, grad = value_and_grad(remat)
        # The recomputation runs the same ops on the same inputs (dropout masks included: the key is
        # the same), but XLA fuses the recomputed block differently: 16 ulps of the loss, 256 of each
        # gradient leaf's largest entry (sums over 2·32 positions and D/F terms); measured 0 to 3.
        np.testing.assert_allclose(loss, ref, rtol=ulps(16))
        ref_leaves = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(ref_grad)}
        for path, g in jax.tree_util.tree_leaves_with_path(grad):
            name = jax.tree_util.keystr(path)
            # GPT-2's key bias has gradient 0 in exact arithmetic (q·b shifts a query's scores
            # alike): rounding noise of the key path, compared at its kernel's scale.
            scale = ref_leaves[name.replace("['wk']['bias']", "['wk']['kernel']")]
            np.testing.assert_allclose(g, ref_leaves[name], rtol=0, atol=ulps(256, scale), err_msg=name)


def test_remat_leaves_parameters_and_decoding_unchanged():
    base = get_config("llama-tiny", vocab_size=256)
    full = base.replace(remat="full")
    params = init_params(base, jax.random.key(0))
    assert jax.tree.structure(init_params(full, jax.random.key(0))) == jax.tree.structure(params)
    prompts = jnp.asarray([[0, 5, 6, 7], [9, 10, 11, 12]], jnp.int32)
    mask = jnp.asarray([[0, 1, 1, 1], [1, 1, 1, 1]], jnp.float32)
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.0)
    a = generate(params, base, prompts, mask, sampling=sampling, rng=jax.random.key(0))
    b = generate(params, full, prompts, mask, sampling=sampling, rng=jax.random.key(0))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.model_logps, b.model_logps)  # no gradient: the same program


def test_config_refuses_unknown_choices():
    with pytest.raises(ValueError, match="remat"):
        get_config("gpt2-tiny", remat="some")
    with pytest.raises(ValueError, match="attention_impl"):
        get_config("gpt2-tiny", attention_impl="flash")
    with pytest.raises(ValueError, match="soft-capping"):
        get_config("gemma2-tiny", attention_impl="cudnn")


def test_attention_impl_reaches_every_attention_call(monkeypatch):
    """Training (causal and left-padded) and cached decoding pass the configured kernel to
    `jax.nn.dot_product_attention`; on CPU, "cudnn" then fails where JAX lowers it."""
    seen = []
    original = jax.nn.dot_product_attention

    def spy(*args, implementation=None, **kwargs):
        seen.append(implementation)
        return original(*args, implementation=None if implementation == "cudnn" else implementation, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    config = get_config("llama-tiny", vocab_size=256, attention_impl="cudnn")
    params = init_params(config, jax.random.key(0))
    tokens = jnp.ones((2, 8), jnp.int32)
    forward(params, config, tokens)  # causal
    forward(params, config, tokens, jnp.broadcast_to(jnp.arange(8) - 1, (2, 8)))  # padded: a mask
    prompts, mask = tokens[:, :4], jnp.ones((2, 4), jnp.float32)
    generate(params, config, prompts, mask, sampling=SamplingConfig(max_new_tokens=2, temperature=0.0), rng=jax.random.key(0))
    assert len(seen) >= 3 * config.n_layers and set(seen) == {"cudnn"}
    monkeypatch.undo()
    if jax.default_backend() == "cpu":
        with pytest.raises(Exception, match="(?i)cudnn|gpu|cuda"):
            forward(params, config, tokens).block_until_ready()
