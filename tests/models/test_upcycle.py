"""Sparse upcycling (arXiv 2212.05055): a dense SwiGLU model copied into Mixtral-style MoE layers
computes the same function (noise 0, any router), its experts differ by the stated relative
noise, and what cannot be upcycled is refused."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.models.config import get_config
from jaxalign.models.moe import MoEConfig
from jaxalign.models.transformer import forward, init_params, stack_layers
from jaxalign.models.upcycle import upcycle_ffn, upcycle_to_moe
from tests._tolerance import ulps

V = 97
DENSE = get_config("llama-tiny", vocab_size=V, max_seq_len=64, n_layers=3)
E, K = 4, 2


@pytest.fixture(scope="module")
def dense():
    # larger init (×4) so the FFNs matter in the logits and a wrong copy could not hide
    params = jax.tree.map(lambda x: x * 4, init_params(DENSE, jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, V)
    return params, tokens, forward(params, DENSE, tokens)


def upcycled_tolerance(config, logits, num_experts: int) -> float:
    """Where upcycled and dense logits may differ: float32 rounding only. In each MoE layer the
    down projection sums E·F products (E copies weighted by g) where the dense one sums F, and
    the renormalised weights sum to 1 within ~2 ulps; a float32 sum of n terms computed in
    another order differs typically by ~sqrt(n) ulps of its scale. The L layers add their
    errors, and the logits carry them at their own magnitude: L·(sqrt(E·F) + 2) ulps of
    max|logits| (measured: 7 ulps on stories260K, where this gives 195)."""
    n_moe = len(config.moe_layer_indices)
    return ulps(n_moe * (math.sqrt(num_experts * config.ff_dim) + 2), logits)


@pytest.mark.parametrize("router_std", [0.02, 3.0])
def test_noise_free_upcycling_keeps_the_dense_logits_for_any_router(dense, router_std):
    params, tokens, want = dense
    moe_params, moe_config = upcycle_to_moe(params, DENSE, num_experts=E, top_k=K, rng=jax.random.key(2),
                                            router_std=router_std)
    got, stats = forward(moe_params, moe_config, tokens, return_router_stats=True)
    np.testing.assert_allclose(got, want, rtol=0, atol=upcycled_tolerance(moe_config, want, E))
    # the router really routes: at std 3 the tokens do not all pick the same experts, and
    # the weights are far from uniform, yet the output is unchanged (weights sum to 1)
    ids = np.asarray(stats[0].expert_ids)
    assert len(np.unique(ids[..., 0])) > 1
    w = np.asarray(stats[0].weights)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=ulps(4))
    if router_std > 1:
        assert w[..., 0].mean() > 0.6  # top weight well above the uniform 1/k


def test_config_shapes_dtypes_and_untouched_params(dense):
    params, _, _ = dense
    moe_params, moe_config = upcycle_to_moe(params, DENSE, num_experts=E, top_k=K, noise_std=0.1,
                                            rng=jax.random.key(2), layers=(0, 2))
    assert moe_config.moe == MoEConfig.mixtral(num_experts=E, experts_per_token=K, moe_d_ff=DENSE.ff_dim)
    assert moe_config.moe_layers == (0, 2) and moe_config.moe_layer_indices == (0, 2)
    assert moe_config.replace(moe=None, moe_layers=None) == DENSE
    d, f = DENSE.d_model, DENSE.ff_dim
    for i in (0, 2):
        moe = moe_params[f"layers_{i}"]["moe"]
        assert "mlp" not in moe_params[f"layers_{i}"]
        shapes = jax.tree.map(lambda x: (x.shape, x.dtype), moe)
        assert shapes == {"router": {"kernel": ((d, E), jnp.float32)},
                          "gate": {"kernel": ((E, d, f), jnp.float32)},
                          "up": {"kernel": ((E, d, f), jnp.float32)},
                          "down": {"kernel": ((E, f, d), jnp.float32)}}
    # the dense layer, attention, norms and embeddings are the very same arrays; params unchanged
    assert moe_params["layers_1"]["mlp"] is params["layers_1"]["mlp"]
    assert moe_params["layers_0"]["attn"] is params["layers_0"]["attn"] and moe_params["embed"] is params["embed"]
    assert "mlp" in params["layers_0"] and "moe" not in params["layers_0"]
    # the parameter tree is exactly the one the MoE model initialises
    want = jax.tree.map(lambda x: (x.shape, x.dtype), init_params(moe_config, jax.random.key(0)))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), moe_params) == want


def test_noise_is_relative_to_each_kernel_and_differs_per_expert(dense):
    params, tokens, want = dense
    noise = 0.1
    moe_params, moe_config = upcycle_to_moe(params, DENSE, num_experts=E, top_k=K, noise_std=noise,
                                            rng=jax.random.key(3))
    for i in range(DENSE.n_layers):
        for name in ("gate", "up", "down"):
            w = np.asarray(params[f"layers_{i}"]["mlp"][name]["kernel"], np.float64)
            experts = np.asarray(moe_params[f"layers_{i}"]["moe"][name]["kernel"], np.float64)
            z = (experts - w) / w.std()  # [E,...] should be i.i.d. N(0, noise²)
            # sample std of n = D·F draws: relative standard error 1/sqrt(2n) (~0.5% here); 6 of them
            n = w.size
            np.testing.assert_allclose(z.reshape(E, -1).std(axis=1), noise, rtol=6 / math.sqrt(2 * n))
            np.testing.assert_allclose(z.mean(), 0.0, atol=6 * noise / math.sqrt(z.size))
            # independent per expert: the correlation of two experts' noise is ~1/sqrt(n)
            corr = np.corrcoef(z.reshape(E, -1))
            assert np.max(np.abs(corr - np.eye(E))) < 6 / math.sqrt(n)
    # the noisy model is no longer the dense one (but close: noise 0.1 of the kernels' spread)
    got = forward(moe_params, moe_config, tokens)
    assert float(jnp.max(jnp.abs(got - want))) > 100 * upcycled_tolerance(moe_config, want, E)


def test_router_gets_no_task_gradient_until_the_experts_differ(dense):
    """With exact copies y = (Σ g)·FFN = FFN, so d loss / d router is 0 (up to rounding): the
    router only starts learning once the experts have been pushed apart (here by noise)."""
    params, tokens, _ = dense

    def router_grad(noise_std):
        p, c = upcycle_to_moe(params, DENSE, num_experts=E, top_k=K, noise_std=noise_std,
                              rng=jax.random.key(4), router_std=1.0)

        def loss(p):
            logits = forward(p, c, tokens[:, :-1])
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

        return jax.grad(loss)(p)["layers_1"]["moe"]["router"]["kernel"]

    exact, noisy = router_grad(0.0), router_grad(0.3)
    scale = float(jnp.max(jnp.abs(noisy)))
    assert scale > 1e-4
    # the exact-copy gradient is the rounding of Σ_i ∂g_i·FFN with Σ_i ∂g_i = 0: a few ulps of
    # the terms, which are of the noisy gradient's size; 1e-3 of it is thousands of ulps above
    assert float(jnp.max(jnp.abs(exact))) < 1e-3 * scale


def test_layer_draws_are_independent_of_the_other_layers_and_deterministic(dense):
    params, _, _ = dense
    kw = dict(num_experts=E, top_k=K, noise_std=0.2, rng=jax.random.key(5))
    every, _ = upcycle_to_moe(params, DENSE, **kw)
    again, _ = upcycle_to_moe(params, DENSE, **kw)
    one, _ = upcycle_to_moe(params, DENSE, layers=(1,), **kw)
    jax.tree.map(np.testing.assert_array_equal, every, again)
    jax.tree.map(np.testing.assert_array_equal, every["layers_1"], one["layers_1"])


def test_scan_layout_is_upcycled_when_every_layer_is(dense):
    params, tokens, want = dense
    scanned = DENSE.replace(scan_layers=True)
    kw = dict(num_experts=E, top_k=K, noise_std=0.2, rng=jax.random.key(6))
    moe_scanned, cfg_scanned = upcycle_to_moe(stack_layers(params, DENSE), scanned, **kw)
    moe_unrolled, cfg_unrolled = upcycle_to_moe(params, DENSE, **kw)
    assert cfg_scanned.scan_layers and cfg_scanned.moe_layers is None
    jax.tree.map(np.testing.assert_array_equal, moe_scanned, stack_layers(moe_unrolled, cfg_unrolled))
    exact, _ = upcycle_to_moe(stack_layers(params, DENSE), scanned, num_experts=E, top_k=K, rng=jax.random.key(6))
    got = forward(exact, cfg_scanned, tokens)
    # scan vs unrolled adds the same kind of reordering as the MoE sums: the same budget, twice
    np.testing.assert_allclose(got, want, rtol=0, atol=2 * upcycled_tolerance(cfg_scanned, want, E))
    with pytest.raises(ValueError, match="scan_layers model, whose layers must stay identical"):
        upcycle_to_moe(stack_layers(params, DENSE), scanned, num_experts=E, top_k=K, rng=jax.random.key(6),
                       layers=(0, 1))


def test_refusals(dense):
    params, _, _ = dense
    key = jax.random.key(0)
    gpt2 = get_config("gpt2-tiny", vocab_size=V)
    with pytest.raises(ValueError, match="family 'gpt2' has a 'gelu' MLP.*only a SwiGLU MLP"):
        upcycle_to_moe(init_params(gpt2, key), gpt2, num_experts=E, top_k=K, rng=key)
    gemma = get_config("gemma2-tiny", vocab_size=V)
    with pytest.raises(ValueError, match="family 'gemma' has a 'geglu' MLP"):
        upcycle_to_moe({}, gemma, num_experts=E, top_k=K, rng=key)
    with pytest.raises(ValueError, match="top_k=3 exceeds num_experts=2"):
        upcycle_to_moe(params, DENSE, num_experts=2, top_k=3, rng=key)
    for name, kw in (("num_experts", dict(num_experts=0, top_k=1)), ("top_k", dict(num_experts=4, top_k=0))):
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            upcycle_to_moe(params, DENSE, rng=key, **kw)
    with pytest.raises(ValueError, match="noise_std must be >= 0"):
        upcycle_to_moe(params, DENSE, num_experts=E, top_k=K, noise_std=-0.1, rng=key)
    for bad in ((), (2, 0), (1, 1), (3,)):
        with pytest.raises(ValueError, match=r"layers=.* must be non-empty, sorted, distinct and in \[0, n_layers=3\)"):
            upcycle_to_moe(params, DENSE, num_experts=E, top_k=K, rng=key, layers=bad)
    moe_params, moe_config = upcycle_to_moe(params, DENSE, num_experts=E, top_k=K, rng=key)
    with pytest.raises(ValueError, match="already MoE"):
        upcycle_to_moe(moe_params, moe_config, num_experts=E, top_k=K, rng=key)
    with pytest.raises(KeyError, match="no 'layers_2'"):
        upcycle_to_moe({k: v for k, v in params.items() if k != "layers_2"}, DENSE, num_experts=E, top_k=K, rng=key)
    biased = {**params["layers_0"]["mlp"], "up": {**params["layers_0"]["mlp"]["up"], "bias": jnp.zeros(DENSE.ff_dim)}}
    with pytest.raises(ValueError, match="bias-free SwiGLU MLP"):
        upcycle_ffn(biased, num_experts=E, noise_std=0.0, router_std=0.02, rng=key)


def test_stories260k_upcycled_keeps_its_logits(shared_data):
    from jaxalign.models.llama2c import load_llama2c

    config, params = load_llama2c(str(shared_data / "models/stories260K/stories260K.bin"))
    tokens = jax.random.randint(jax.random.key(7), (2, 48), 0, config.vocab_size)
    want = forward(params, config, tokens)
    moe_params, moe_config = upcycle_to_moe(params, config, num_experts=8, top_k=2, rng=jax.random.key(8))
    got = forward(moe_params, moe_config, tokens)
    np.testing.assert_allclose(got, want, rtol=0, atol=upcycled_tolerance(moe_config, want, 8))
