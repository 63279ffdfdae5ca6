import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn

from jaxalign.checkpoint import make_checkpoint_manager, restore_checkpoint, save_checkpoint
from jaxalign.lora import (
    LoraConfig,
    _adapters_beside_kernels,
    _dropout_interceptor,
    _unmerged_delta,
    apply_lora,
    init_lora,
    lora_targets,
    lora_trainable,
    lora_weight_decay_mask,
    make_lora_loss_fn,
    make_lora_optimizer,
    merge_lora,
    num_lora_params,
    unmerge_lora,
)
from jaxalign.metrics import compilations
from jaxalign.models import forward as _forward
from jaxalign.models import get_config, init_params, load_hf_checkpoint
from jaxalign.models.config import RopeScaling
from jaxalign.models.heads import init_scalar_model, sequence_scores
from jaxalign.models.hf_export import export_hf
from jaxalign.optim import OptimConfig, make_optimizer, weight_decay_mask
from jaxalign.trainers import create_train_state, make_train_step
from jaxalign.trainers.dpo import dpo_batch_loss, make_pair_logps_fn
from jaxalign.trainers.sft import sft_batch_loss
from tests._tolerance import ulps

V = 101
forward = jax.jit(_forward, static_argnums=1)  # one compilation per (config, shape), not op by op
TOKENS = np.random.RandomState(0).randint(0, V, (2, 13))


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def perturb(tree, seed, scale=0.05):
    """Nonzero adapters (a trained state), so that the tests see B != 0."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten(
        [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    )


@pytest.fixture(scope="module")
def gpt2():
    config = get_config("gpt2-tiny", vocab_size=V)
    return config, init_params(config, jax.random.key(0))


@pytest.fixture(scope="module")
def llama():  # grouped-query attention, Meta's interleaved RoPE (as stories260K), untied head
    config = get_config("llama-tiny", vocab_size=V, rope_interleaved=True, tie_embeddings=False)
    return config, init_params(config, jax.random.key(1))


def sft_batch(seed=0, b=4, t=17):
    rng = np.random.RandomState(seed)
    mask = np.zeros((b, t), np.float32)
    mask[:, t // 2 :] = 1.0
    return {"tokens": jnp.asarray(rng.randint(0, V, (b, t)), jnp.int32), "mask": jnp.asarray(mask)}


def pair_batch(b, t=12, seed=3):
    """A random preference batch [b, t], completions on the second half."""
    rng = np.random.RandomState(seed)
    mask = np.zeros((b, t), np.float32)
    mask[:, t // 2 :] = 1.0
    return {
        "chosen_tokens": jnp.asarray(rng.randint(0, V, (b, t)), jnp.int32),
        "rejected_tokens": jnp.asarray(rng.randint(0, V, (b, t)), jnp.int32),
        "chosen_mask": jnp.asarray(mask),
        "rejected_mask": jnp.asarray(mask),
    }


# --- targets and shapes ----------------------------------------------------------------------


def test_targets_presets_and_matrix_shapes(llama):
    config, params = llama
    n, k, h, d, f = config.n_heads, config.kv_heads, config.head_dim, config.d_model, config.ff_dim
    cfg = LoraConfig(rank=3, targets=("all",), dora=True)
    ad = init_lora(params, cfg, jax.random.key(0))
    attn, mlp = ad["layers_0"]["attn"], ad["layers_0"]["mlp"]
    assert attn["wq"]["lora_a"].shape == (d, 3) and attn["wq"]["lora_b"].shape == (3, n * h)
    assert attn["wk"]["lora_b"].shape == (3, k * h) and attn["wk"]["magnitude"].shape == (k * h,)
    assert attn["wo"]["lora_a"].shape == (n * h, 3) and attn["wo"]["lora_b"].shape == (3, d)
    assert mlp["down"]["lora_a"].shape == (f, 3) and mlp["gate"]["lora_b"].shape == (3, f)
    assert "embed" not in ad and "lm_head" not in ad
    assert len(lora_targets(params, cfg)) == config.n_layers * 7
    assert lora_targets(params, LoraConfig(targets=("qv",)))[:2] == ["layers_0/attn/wq", "layers_0/attn/wv"]
    assert lora_targets(params, LoraConfig(targets=("layers_1/attn/wq", "lm_head"))) == [
        "layers_1/attn/wq", "lm_head"
    ]
    assert len(lora_targets(params, LoraConfig(targets=("mlp",)))) == 3 * config.n_layers
    with pytest.raises(ValueError, match="matches no kernel"):
        init_lora(params, LoraConfig(targets=("attn/w_q",)), jax.random.key(0))
    with pytest.raises(ValueError):
        LoraConfig(targets="attention")
    # A ~ U(±1/sqrt(in)), B = 0, m = column norms of W over its input axis.
    a = np.asarray(attn["wo"]["lora_a"])
    assert np.abs(a).max() <= 1 / math.sqrt(n * h) and a.std() > 0.3 / math.sqrt(n * h)
    assert not np.any(np.asarray(attn["wo"]["lora_b"]))
    w = np.asarray(params["layers_0"]["attn"]["wk"]["kernel"]).reshape(d, k * h)
    # sqrt of a 64-term float32 sum of squares: <= 64 ulps; measured <= 1.4
    np.testing.assert_allclose(attn["wk"]["magnitude"], np.linalg.norm(w, axis=0), rtol=ulps(64))


# --- equivalence with the base and merge / unmerge ---------------------------------------------


@pytest.mark.parametrize("fixture", ["gpt2", "llama"])
def test_lora_at_init_is_exactly_the_base(fixture, request):
    config, params = request.getfixturevalue(fixture)
    cfg = LoraConfig(rank=4, targets=("all",))
    ad = init_lora(params, cfg, jax.random.key(2))
    effective = jax.jit(apply_lora, static_argnums=2)(params, ad, cfg)
    for got, want in zip(jax.tree.leaves(effective), jax.tree.leaves(params)):
        np.testing.assert_array_equal(got, want)
    tokens = jnp.asarray(TOKENS)
    np.testing.assert_array_equal(forward(effective, config, tokens), forward(params, config, tokens))


def test_effective_kernels_against_numpy(llama):
    config, params = llama
    cfg = LoraConfig(rank=4, alpha=8.0, targets=("attention", "mlp"))
    ad = perturb(init_lora(params, cfg, jax.random.key(3)), 4)
    eff = apply_lora(params, ad, cfg)
    s = 2.0
    for name, w_shape_in in (("wq", 1), ("wo", 2)):
        w = np.asarray(params["layers_1"]["attn"][name]["kernel"], np.float64)
        a = np.asarray(ad["layers_1"]["attn"][name]["lora_a"], np.float64)
        b = np.asarray(ad["layers_1"]["attn"][name]["lora_b"], np.float64)
        d_in = int(np.prod(w.shape[:w_shape_in]))
        want = (w.reshape(d_in, -1) + s * a @ b).reshape(w.shape)
        # W + s·A@B (rank 4): 1e-6 is 85 ulps of max|W'| ~ 0.1; measured 0.8
        np.testing.assert_allclose(eff["layers_1"]["attn"][name]["kernel"], want, atol=1e-6)
    # untouched leaves are the very same arrays
    assert eff["layers_1"]["ln_1"]["scale"] is params["layers_1"]["ln_1"]["scale"]


@pytest.mark.parametrize("dora", [False, True])
def test_merged_equals_apply_inside_forward_and_unmerge(gpt2, dora):
    config, params = gpt2
    cfg = LoraConfig(rank=4, targets=("all",), dora=dora)
    ad = perturb(init_lora(params, cfg, jax.random.key(5)), 6)
    tokens = jnp.asarray(TOKENS)
    inside = jax.jit(lambda a, p, t: forward(apply_lora(p, a, cfg), config, t))(ad, params, tokens)
    merged = merge_lora(params, ad, cfg)
    outside = forward(merged, config, tokens)
    # merged inside vs outside jit: fused differently, 2 layers of 64-term sums: 128 ulps; measured 1.6
    np.testing.assert_allclose(inside, outside, rtol=0, atol=ulps(128, outside))
    assert not np.allclose(outside, forward(params, config, tokens), atol=1e-3)  # adapters matter
    if dora:
        with pytest.raises(ValueError, match="not invertible"):
            unmerge_lora(merged, ad, cfg)
    else:
        restored = unmerge_lora(merged, ad, cfg)
        for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
            np.testing.assert_allclose(got, want, atol=1e-6)  # (W + s·AB) − s·AB: 1e-6 is 100 ulps of |W| ~ 0.08


def test_bfloat16_base_keeps_float32_updates(gpt2):
    config, params = gpt2
    base16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    cfg = LoraConfig(rank=2, targets=("attn/wq",))
    ad = perturb(init_lora(base16, cfg, jax.random.key(0)), 1, scale=1e-4)
    eff = apply_lora(base16, ad, cfg)
    kernel = eff["layers_0"]["attn"]["wq"]["kernel"]
    assert kernel.dtype == jnp.float32 and eff["layers_0"]["attn"]["wk"]["kernel"].dtype == jnp.bfloat16
    delta = kernel - base16["layers_0"]["attn"]["wq"]["kernel"].astype(jnp.float32)
    assert 0 < float(jnp.abs(delta).max()) < 1e-3  # far below bf16's resolution at |W| ~ 0.02
    assert merge_lora(base16, ad, cfg)["layers_0"]["attn"]["wq"]["kernel"].dtype == jnp.bfloat16


def test_apply_lora_jit_no_recompile(gpt2):
    config, params = gpt2
    cfg = LoraConfig(rank=2)
    ad = init_lora(params, cfg, jax.random.key(0))
    fn = jax.jit(lambda p, a: apply_lora(p, a, cfg))
    other = perturb(ad, 1)
    with compilations(fn) as compiled:
        fn(params, ad)
        fn(params, other)
    assert len(compiled) == 1


# --- DoRA ------------------------------------------------------------------------------------


def test_dora_at_init_equals_base_and_keeps_column_norms(llama):
    config, params = llama
    cfg = LoraConfig(rank=4, targets=("all",), dora=True)
    ad = init_lora(params, cfg, jax.random.key(7))
    tokens = jnp.asarray(TOKENS)
    eff = jax.jit(lambda p, a: apply_lora(p, a, cfg))(params, ad)
    for got, want in zip(jax.tree.leaves(eff), jax.tree.leaves(params)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)  # m/‖W‖_c is 1 up to rounding (8 ulps)
    # W' = W up to rounding, then 2 layers of 64-term sums: 128 ulps of max|logit|; measured 2.2
    np.testing.assert_allclose(
        forward(eff, config, tokens), forward(params, config, tokens), rtol=0,
        atol=ulps(128, forward(params, config, tokens)),
    )
    # After training: every column of W' has norm exactly m (DoRA Eq. 5).
    trained = perturb(ad, 8)
    eff = apply_lora(params, trained, cfg)
    w = np.asarray(eff["layers_1"]["attn"]["wo"]["kernel"]).reshape(config.d_model, config.d_model)
    m = np.asarray(trained["layers_1"]["attn"]["wo"]["magnitude"])
    np.testing.assert_allclose(np.linalg.norm(w, axis=0), np.abs(m), rtol=1e-5)  # 64-term norm: 84 ulps; measured 0.6


def test_dora_gradients_finite_magnitude_trains_and_detach(gpt2):
    config, params = gpt2
    batch = sft_batch()

    def grad_fn(detach):
        cfg = LoraConfig(rank=4, targets=("attention",), dora=True, dora_detach_norm=detach)
        loss = make_lora_loss_fn(lambda p, b, rng: sft_batch_loss(p, config, b, rng), cfg)
        return jax.jit(jax.grad(lambda a, p: loss(a, batch, None, p)[0]))

    detached, exact = grad_fn(True), grad_fn(False)
    ad = init_lora(params, LoraConfig(rank=4, targets=("attention",), dora=True), jax.random.key(9))
    g = detached(ad, params)
    for leaf in jax.tree.leaves(g):
        assert np.all(np.isfinite(leaf))
    wq = g["layers_0"]["attn"]["wq"]
    assert float(jnp.abs(wq["magnitude"]).max()) > 0 and float(jnp.abs(wq["lora_b"]).max()) > 0
    # The magnitude trains: one AdamW update moves it.
    tx, _ = make_optimizer(OptimConfig(learning_rate=1e-2, total_steps=10))
    updates, _ = tx.update(g, tx.init(ad), ad)
    assert float(jnp.abs(updates["layers_1"]["attn"]["wv"]["magnitude"]).min()) > 0
    # Detaching ‖V‖_c (DoRA §4.3) is an approximation: at B = 0 the magnitude gradients agree
    # (V = W either way); once B != 0 the B gradients differ. Both are finite.
    g_exact = exact(ad, params)
    np.testing.assert_allclose(
        g["layers_0"]["attn"]["wv"]["magnitude"], g_exact["layers_0"]["attn"]["wv"]["magnitude"],
        rtol=1e-5, atol=1e-9,  # two gradient programs, equal in exact arithmetic: 84 ulps; measured equal
    )
    trained = perturb(ad, 3, scale=0.2)
    g1, g2 = detached(trained, params), exact(trained, params)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g2))
    assert not np.allclose(
        g1["layers_0"]["attn"]["wv"]["lora_b"], g2["layers_0"]["attn"]["wv"]["lora_b"], rtol=1e-3
    )


# --- adapter-input dropout (the unmerged path) -------------------------------------------------


def test_unmerged_delta_against_numpy_with_its_mask(llama):
    """One projection: s·x̃·A·B (LoRA) and (m/‖V‖_c − 1)·x̃·W + (m/‖V‖_c)·s·x̃·A·B (DoRA, PEFT's
    forward), x̃ = x·mask/(1−p), and E[s·x̃·A·B] = s·x·A·B over many masks."""
    config, params = llama
    n, h, d = config.n_heads, config.head_dim, config.d_model
    x = jax.random.normal(jax.random.key(0), (3, 5, n, h))  # the input of wo [B,T,N,H]
    key = jax.random.key(1)
    keep = 0.7
    mask = np.asarray(jax.random.bernoulli(key, keep, (3, 5, n * h)))
    assert 0.5 < mask.mean() < 0.9
    xd = np.asarray(x, np.float64).reshape(3, 5, n * h) * mask / keep
    w = np.asarray(params["layers_0"]["attn"]["wo"]["kernel"], np.float64).reshape(n * h, d)
    for dora in (False, True):
        cfg = LoraConfig(rank=4, alpha=8.0, targets=("attn/wo",), dropout=1 - keep, dora=dora)
        module = perturb(init_lora(params, cfg, jax.random.key(2)), 3)["layers_0"]["attn"]["wo"]
        a, b = (np.asarray(module[k], np.float64) for k in ("lora_a", "lora_b"))
        want = 2.0 * xd @ a @ b
        if dora:
            scale = np.asarray(module["magnitude"], np.float64) / np.linalg.norm(w + 2.0 * a @ b, axis=0)
            want = (scale - 1) * (xd @ w) + scale * want
        got = _unmerged_delta(
            x, {**module, "kernel": params["layers_0"]["attn"]["wo"]["kernel"]},
            ("layers_0", "attn", "wo"), cfg, key,
        )
        assert got.shape == (3, 5, d)
        # float32 vs float64 x̃·A·B (64 terms): atol is 110 ulps of max|Δ| ~ 0.75; measured 2
        np.testing.assert_allclose(got, want.reshape(3, 5, d), rtol=1e-4, atol=1e-5)
    # Unbiased: the mean over 4000 masks of the LoRA branch is s·x·A·B.
    cfg = LoraConfig(rank=4, alpha=8.0, targets=("attn/wo",), dropout=0.3)
    module = perturb(init_lora(params, cfg, jax.random.key(2)), 3)["layers_0"]["attn"]["wo"]
    module = {**module, "kernel": params["layers_0"]["attn"]["wo"]["kernel"]}
    x1 = x[:1, :1]
    draws = jax.vmap(lambda k: _unmerged_delta(x1, module, ("layers_0", "attn", "wo"), cfg, k))(
        jax.random.split(jax.random.key(4), 4000)
    )  # [4000,1,1,D]
    exact = 2.0 * np.asarray(x1).reshape(1, n * h) @ np.asarray(module["lora_a"]) @ np.asarray(module["lora_b"])
    stderr = np.asarray(draws).std(0) / math.sqrt(4000)
    assert np.all(np.abs(np.asarray(draws).mean(0).reshape(1, d) - exact) < 5 * stderr.reshape(1, d))


@pytest.mark.parametrize("dora", [False, True])
def test_unmerged_forward_equals_apply_lora_at_no_drop(llama, dora):
    """The interceptor routes every adapted projection (q/k/v with GQA, wo's two input axes, the
    SwiGLU MLP and an untied lm_head): with masks that keep everything it equals `apply_lora`."""
    config, params = llama
    cfg = LoraConfig(rank=4, targets=("all", "lm_head"), dora=dora, dropout=1e-30)  # keep = 1.0f
    ad = perturb(init_lora(params, cfg, jax.random.key(2)), 3)
    tokens = jnp.asarray(TOKENS)
    want = forward(apply_lora(params, ad, cfg), config, tokens)
    with nn.intercept_methods(_dropout_interceptor(cfg, jax.random.key(5))):
        got = jax.jit(lambda p, t: _forward(p, config, t))(_adapters_beside_kernels(params, ad, cfg), tokens)
    np.testing.assert_allclose(got, want, atol=2e-5)  # unmerged vs merged: 160 ulps of |logit| ~ 1; measured 9
    assert not np.allclose(want, forward(params, config, tokens), atol=1e-2)


def test_adapter_dropout_in_training_and_reference_untouched(gpt2):
    """With dropout the DPO policy sees dropped-out adapter inputs, the reference (the base, no
    adapter leaves) does not; `dropout=False` or no key gives the weight-space loss."""
    config, params = gpt2
    cfg = LoraConfig(rank=4, targets=("all",), dropout=0.5)
    ad = perturb(init_lora(params, cfg, jax.random.key(0)), 1)
    batch = pair_batch(b=4)
    dpo = lambda p, b, r, ref: dpo_batch_loss(p, config, b, None, ref, beta=0.5)
    with_drop = jax.jit(make_lora_loss_fn(dpo, cfg))
    no_drop = jax.jit(make_lora_loss_fn(dpo, cfg, dropout=False))
    key = jax.random.PRNGKey(7)
    loss, m = with_drop(ad, batch, key, params, params)
    pair_fn = make_pair_logps_fn(config)
    ref_c, ref_r = pair_fn(params, batch)
    # rewards = β·(policy − reference): the reference part is the plain base model's log-probs
    # sums of ~30 logps (|sum| ~ 28), two programs: 1e-5 is 84 ulps of them; measured <= 0.6
    np.testing.assert_allclose(m["chosen_logps"] - m["chosen_rewards"] / 0.5, np.mean(ref_c), rtol=1e-5)
    np.testing.assert_allclose(m["rejected_logps"] - m["rejected_rewards"] / 0.5, np.mean(ref_r), rtol=1e-5)
    plain_loss, plain = no_drop(ad, batch, key, params, params)
    c, _ = pair_fn(apply_lora(params, ad, cfg), batch)
    np.testing.assert_allclose(plain["chosen_logps"], np.mean(c), rtol=1e-5)
    assert abs(float(m["chosen_logps"]) - float(plain["chosen_logps"])) > 1e-3  # masks applied
    other, _ = with_drop(ad, batch, jax.random.PRNGKey(8), params, params)
    assert float(other) != float(loss)  # another key, other masks
    np.testing.assert_array_equal(with_drop(ad, batch, key, params, params)[0], loss)  # same key
    np.testing.assert_array_equal(with_drop(ad, batch, None, params, params)[0], plain_loss)
    with pytest.raises(ValueError, match="dropout"):
        LoraConfig(dropout=1.0)


# --- training: only adapters change, optimizer state is adapter-sized ------------------------


def test_one_sft_step_changes_only_adapters(gpt2):
    config, params = gpt2
    cfg = LoraConfig(rank=4, targets=("attention",))
    base_copy = jax.tree.map(np.array, params)
    ad = init_lora(params, cfg, jax.random.key(11))
    tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-2, total_steps=10))
    loss_fn = make_lora_loss_fn(lambda p, b, rng: sft_batch_loss(p, config, b, rng), cfg)
    step = make_train_step(loss_fn, tx, schedule)
    state = create_train_state(ad, tx, 0)
    a0 = jax.tree.map(np.array, state.params)

    # Optimizer state: two Adam moments per adapter value + two int32 counts, and apply_if_finite's
    # two int32 counters and bool (9 bytes); nothing base-sized.
    n_adapter_leaves = len(jax.tree.leaves(ad))
    assert len(jax.tree.leaves(state.opt_state)) == 2 * n_adapter_leaves + 2 + 3
    assert nbytes(state.opt_state) == 2 * nbytes(ad) + 8 + 9
    assert nbytes(ad) < nbytes(params) / 10

    losses = []
    for i in range(3):
        state, metrics = step(state, sft_batch(), params)
        losses.append(float(metrics["loss"]))
        if i == 0:
            first = jax.tree.map(np.array, state.params)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(base_copy)):  # base untouched
        np.testing.assert_array_equal(got, want)
    wq0, wq1 = a0["layers_0"]["attn"]["wq"], first["layers_0"]["attn"]["wq"]
    assert not np.allclose(wq0["lora_b"], wq1["lora_b"])  # B moves first (dL/dB = s·Aᵀ·dL/dW')
    np.testing.assert_array_equal(wq0["lora_a"], wq1["lora_a"])  # dL/dA = s·dL/dW'·Bᵀ = 0 at B = 0
    assert not np.allclose(wq0["lora_a"], state.params["layers_0"]["attn"]["wq"]["lora_a"])
    assert losses[-1] < losses[0]


def test_weight_decay_masks(gpt2):
    config, params = gpt2
    cfg = LoraConfig(rank=2, targets=("attn/wq",), dora=True)
    ad = init_lora(params, cfg, jax.random.key(0))
    assert not any(jax.tree.leaves(weight_decay_mask(ad)))  # make_optimizer decays no adapter leaf
    mask = lora_weight_decay_mask(ad)["layers_0"]["attn"]["wq"]
    assert mask == {"lora_a": True, "lora_b": True, "magnitude": False}
    # With make_lora_optimizer, decay moves A at the first step even though its gradient is 0.
    opt = OptimConfig(learning_rate=0.1, weight_decay=0.5, total_steps=10, max_grad_norm=None)
    tx, _ = make_lora_optimizer(opt)
    zeros = jax.tree.map(jnp.zeros_like, ad)
    updates, _ = tx.update(zeros, tx.init(ad), ad)
    u = updates["layers_0"]["attn"]["wq"]
    np.testing.assert_allclose(u["lora_a"], -0.1 * 0.5 * ad["layers_0"]["attn"]["wq"]["lora_a"], rtol=1e-6)  # 2 products: 8 ulps
    assert not np.any(np.asarray(u["magnitude"]))
    tx_plain, _ = make_optimizer(opt)
    assert jax.tree.structure(tx.init(ad)) == jax.tree.structure(tx_plain.init(ad))


def test_reference_is_the_base_for_dpo(gpt2):
    """DPO with adapters: the reference is the base (adapters off), no copy of the weights."""
    config, params = gpt2
    cfg = LoraConfig(rank=4, targets=("all",))
    batch = pair_batch(b=2)
    loss_fn = make_lora_loss_fn(lambda p, b, r, ref: dpo_batch_loss(p, config, b, r, ref), cfg)
    tx, schedule = make_optimizer(OptimConfig(learning_rate=5e-3, total_steps=10))
    step = make_train_step(loss_fn, tx, schedule)
    state = create_train_state(init_lora(params, cfg, jax.random.key(0)), tx, 0)
    ref_logits = np.asarray(forward(params, config, jnp.asarray(TOKENS)))
    state, m0 = step(state, batch, params, params)  # base twice: the policy's base and the reference
    np.testing.assert_allclose(float(m0["loss"]), math.log(2), rtol=1e-6)  # policy == reference (8 ulps)
    for _ in range(3):
        state, m = step(state, batch, params, params)
    assert float(m["loss"]) < math.log(2)
    np.testing.assert_array_equal(forward(params, config, jnp.asarray(TOKENS)), ref_logits)
    policy = forward(apply_lora(params, state.params, cfg), config, jnp.asarray(TOKENS))
    assert not np.allclose(policy, ref_logits, atol=1e-4)


def test_adapter_only_checkpoint_round_trip(gpt2, tmp_path):
    config, params = gpt2
    cfg = LoraConfig(rank=4, targets=("all",), dora=True)
    tx, _ = make_optimizer(OptimConfig())
    state = create_train_state(perturb(init_lora(params, cfg, jax.random.key(0)), 1), tx, 0)
    manager = make_checkpoint_manager(tmp_path / "ckpt", save_every=1)
    assert save_checkpoint(manager, 5, state, force=True)
    manager.wait_until_finished()
    fresh = create_train_state(init_lora(params, cfg, jax.random.key(1)), tx, 0)
    restored = restore_checkpoint(manager, fresh)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(got, want)
    on_disk = sum(f.stat().st_size for f in (tmp_path / "ckpt").rglob("*") if f.is_file())
    assert on_disk < nbytes(params)  # adapters + moments, not the base
    tokens = jnp.asarray(TOKENS)
    np.testing.assert_array_equal(
        forward(apply_lora(params, restored.params, cfg), config, tokens),
        forward(apply_lora(params, state.params, cfg), config, tokens),
    )


# --- export to Hugging Face ------------------------------------------------------------------


def _nonzero_biases(params):
    def f(path, x):
        if str(getattr(path[-1], "key", "")) == "bias":
            return x + 0.1 * jax.random.normal(jax.random.key(len(path)), x.shape)
        return x

    return jax.tree_util.tree_map_with_path(f, params)


EXPORTS = {
    "gpt2-tied": ("gpt2-tiny", dict(), "GPT2LMHeadModel"),
    "gpt2-untied": ("gpt2-tiny", dict(tie_embeddings=False), "GPT2LMHeadModel"),
    "llama-interleaved-gqa": (  # stories260K's layout: Meta's interleaved RoPE, 4 query heads on 2 kv heads
        "llama-tiny",
        dict(
            rope_interleaved=True, tie_embeddings=False, rope_theta=5e5,
            rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16),
        ),
        "LlamaForCausalLM",
    ),
    "qwen2-bias-tied": ("llama-tiny", dict(qkv_bias=True, tie_embeddings=True), "Qwen2ForCausalLM"),
}


@pytest.mark.parametrize("case", list(EXPORTS))
def test_export_merged_weights_to_hf(case, tmp_path):
    preset, overrides, architecture = EXPORTS[case]
    config = get_config(preset, vocab_size=V, **overrides)
    params = _nonzero_biases(init_params(config, jax.random.key(0)))
    cfg = LoraConfig(rank=4, targets=("all",), dora=case.startswith("llama"))
    ad = perturb(init_lora(params, cfg, jax.random.key(1)), 2)
    tokens = jnp.asarray(TOKENS)
    want = np.asarray(forward(apply_lora(params, ad, cfg), config, tokens))
    export_hf(merge_lora(params, ad, cfg), config, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(model).__name__ == architecture
    with torch.no_grad():
        got = model(torch.tensor(TOKENS)).logits.numpy()
    # torch vs XLA, 2 layers of 64-term sums: 128 ulps of max|logit|; measured 3
    np.testing.assert_allclose(got, want, rtol=0, atol=ulps(128, want))
    if case == "llama-interleaved-gqa":  # jaxalign's importer reads it back in rotate-half layout
        config2, params2 = load_hf_checkpoint(tmp_path)
        assert not config2.rope_interleaved and config2.kv_heads == 2
        # re-imported rotate-half layout: other sums, 128 ulps of max|logit|; measured 2.4
        np.testing.assert_allclose(forward(params2, config2, tokens), want, rtol=0, atol=ulps(128, want))


# --- fully trained leaves (LoraConfig.trainable, PEFT's modules_to_save) -----------------------


@pytest.fixture(scope="module")
def reward_model():  # gpt2-tiny ties its embeddings: no lm_head, so "head" matches head/* only
    config = get_config("gpt2-tiny", vocab_size=V)
    return config, init_scalar_model(config, jax.random.key(4))


RM_LORA = LoraConfig(rank=2, targets=("attention",), trainable=("head",))


def bt_loss(params, config, batch):
    """The reward model's Bradley–Terry loss −mean log σ(r_c − r_r) + 0.01·mean (r_c + r_r)² on a
    preference batch (the centring term, TRL's `center_rewards_coefficient`, is what gives the
    head's bias a gradient: Bradley–Terry alone sees r_c − r_r, where the bias cancels)."""
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])  # [2B,T]
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])  # [2B,T]
    scores = sequence_scores(params, config, tokens, mask)  # [2B]
    b = batch["chosen_tokens"].shape[0]
    chosen, rejected = scores[:b], scores[b:]
    return -jnp.mean(jax.nn.log_sigmoid(chosen - rejected)) + 0.01 * jnp.mean((chosen + rejected) ** 2)


bt_loss_jit = jax.jit(bt_loss, static_argnums=1)  # for comparisons that need no exactness


def moved_head(params, seed=0):
    """A 'trained' head: kernel moved by O(its own size), bias 0.7 (the fresh one is 0)."""
    kernel = params["head"]["kernel"]
    noise = jax.random.normal(jax.random.key(seed), kernel.shape, kernel.dtype)
    return {"kernel": kernel + 0.3 * noise, "bias": jnp.asarray(0.7, params["head"]["bias"].dtype)}


def test_trainable_head_copies_apply_and_gradients(reward_model):
    config, params = reward_model
    ad = init_lora(params, RM_LORA, jax.random.key(0))
    assert lora_trainable(params, RM_LORA) == ["head/bias", "head/kernel"]
    assert set(ad) == {"backbone", "head"} and set(ad["head"]) == {"kernel", "bias"}
    assert set(ad["backbone"]["layers_0"]["attn"]["wq"]) == {"lora_a", "lora_b"}
    for name in ("kernel", "bias"):  # a copy of the base head, in its own dtype (float32)
        assert ad["head"][name].dtype == jnp.float32
        np.testing.assert_array_equal(ad["head"][name], params["head"][name])
    # The LoRA leaves are bit for bit those made without `trainable` (no key is drawn for copies).
    lora_only = init_lora(params, LoraConfig(rank=2, targets=("attention",)), jax.random.key(0))
    assert jax.tree.structure(ad["backbone"]) == jax.tree.structure(lora_only["backbone"])
    for got, want in zip(jax.tree.leaves(ad["backbone"]), jax.tree.leaves(lora_only["backbone"])):
        np.testing.assert_array_equal(got, want)
    assert num_lora_params(ad) == num_lora_params(lora_only) + config.d_model + 1
    # The copies are new buffers: donating the adapters (as the train step does) keeps the base.
    base = jax.tree.map(jnp.copy, params)
    jax.jit(lambda a: jax.tree.map(lambda x: x + 1, a), donate_argnums=0)(init_lora(base, RM_LORA, jax.random.key(0)))
    assert not base["head"]["kernel"].is_deleted() and not base["head"]["bias"].is_deleted()
    np.testing.assert_array_equal(base["head"]["kernel"], params["head"]["kernel"])

    # apply_lora: the copies at head/*, the base everywhere else (B = 0: W + s·A·0 is W exactly).
    head = moved_head(params)
    trained = {**ad, "head": head}
    eff = apply_lora(params, trained, RM_LORA)
    assert eff["head"]["kernel"] is head["kernel"] and eff["head"]["bias"] is head["bias"]
    assert jax.tree.structure(eff) == jax.tree.structure(params)
    for got, want in zip(jax.tree.leaves(eff["backbone"]), jax.tree.leaves(params["backbone"])):
        np.testing.assert_array_equal(got, want)

    # Gradients reach the copies, and are the full-fine-tuning gradients of the head. Exact: the
    # effective backbone is bit for bit the base and the head copy is the head leaf, so both are
    # the same primitives on the same values, run op by op (no jit: no program-dependent fusion).
    batch = pair_batch(b=4)
    g = jax.grad(lambda a: bt_loss(apply_lora(params, a, RM_LORA), config, batch))(trained)
    g_full = jax.grad(lambda p: bt_loss(p, config, batch))({"backbone": params["backbone"], "head": head})
    for name in ("kernel", "bias"):
        assert float(jnp.abs(g["head"][name]).max()) > 1e-3
        np.testing.assert_array_equal(g["head"][name], g_full["head"][name])
    wq = g["backbone"]["layers_0"]["attn"]["wq"]
    assert float(jnp.abs(wq["lora_b"]).max()) > 0 and not np.any(np.asarray(wq["lora_a"]))  # B = 0
    # ... and a different head gives a different loss: the copies, not the base head, are used.
    assert abs(float(bt_loss_jit(eff, config, batch)) - float(bt_loss_jit(params, config, batch))) > 1e-3


def test_trainable_head_on_the_dropout_path(reward_model):
    """With adapter dropout the loss runs the base with the adapters beside its kernels under
    the interceptor; the trained head copies must be used there too. At B = 0 the adapter branch
    adds exactly 0, so the loss is exactly the full model's with the trained head (op by op, as
    above), and differs from the base head's."""
    config, params = reward_model
    cfg = LoraConfig(rank=2, targets=("attention",), trainable=("head",), dropout=0.1)
    head = moved_head(params, seed=1)
    trained = {**init_lora(params, cfg, jax.random.key(0)), "head": head}
    beside = _adapters_beside_kernels(params, trained, cfg)
    assert beside["head"]["kernel"] is head["kernel"] and beside["head"]["bias"] is head["bias"]
    assert set(beside["backbone"]["layers_0"]["attn"]["wq"]) == {"kernel", "bias", "lora_a", "lora_b"}
    batch = pair_batch(b=4)
    loss_fn = make_lora_loss_fn(lambda p, b, rng: bt_loss(p, config, b), cfg)
    loss, g = jax.value_and_grad(loss_fn)(trained, batch, jax.random.key(3), params)
    want, g_want = jax.value_and_grad(lambda p: bt_loss(p, config, batch))(
        {"backbone": params["backbone"], "head": head}
    )
    np.testing.assert_array_equal(loss, want)
    for name in ("kernel", "bias"):
        assert float(jnp.abs(g["head"][name]).max()) > 1e-3
        np.testing.assert_array_equal(g["head"][name], g_want["head"][name])
    assert abs(float(loss) - float(bt_loss_jit(params, config, batch))) > 1e-3  # base head: another loss
    # It was the dropout path: B's gradient sees the dropped-out inputs x̃, not x.
    g_plain = jax.grad(loss_fn)(trained, batch, None, params)  # no key: weight-space apply_lora
    np.testing.assert_array_equal(g_plain["head"]["kernel"], g_want["head"]["kernel"])
    b_drop = g["backbone"]["layers_0"]["attn"]["wv"]["lora_b"]
    b_plain = g_plain["backbone"]["layers_0"]["attn"]["wv"]["lora_b"]
    assert not np.allclose(b_drop, b_plain, rtol=1e-2)


def test_trainable_bias_of_an_adapted_module(reward_model):
    """A fully trained bias beside an adapted kernel: both paths use the copy (B = 0, so both
    equal the full model with that bias, exactly)."""
    config, params = reward_model
    cfg = LoraConfig(rank=2, targets=("attn/wq",), trainable=(r"layers_0/attn/wq/bias$",), dropout=0.1)
    ad = init_lora(params, cfg, jax.random.key(0))
    bias = ad["backbone"]["layers_0"]["attn"]["wq"]["bias"]  # [N, H]
    bias = bias + jax.random.normal(jax.random.key(1), bias.shape)
    ad["backbone"]["layers_0"]["attn"]["wq"]["bias"] = bias
    assert set(ad["backbone"]["layers_0"]["attn"]["wq"]) == {"lora_a", "lora_b", "bias"}
    assert apply_lora(params, ad, cfg)["backbone"]["layers_0"]["attn"]["wq"]["bias"] is bias
    full = jax.tree.map(lambda x: x, params)
    full["backbone"]["layers_0"]["attn"]["wq"]["bias"] = bias
    batch = pair_batch(b=2)
    want = bt_loss(full, config, batch)
    loss_fn = make_lora_loss_fn(lambda p, b, rng: bt_loss(p, config, b), cfg)
    np.testing.assert_array_equal(loss_fn(ad, batch, None, params), want)  # apply_lora
    np.testing.assert_array_equal(loss_fn(ad, batch, jax.random.key(1), params), want)  # interceptor
    assert abs(float(want) - float(bt_loss_jit(params, config, batch))) > 1e-3


def test_trainable_errors(reward_model):
    config, params = reward_model
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"'value' matches no parameter.*'backbone/"):
        init_lora(params, LoraConfig(targets=("attention",), trainable=("value",)), key)
    overlap = LoraConfig(targets=("attention",), trainable=("head", "layers_1/attn/wq"))
    for fn in (lambda: init_lora(params, overlap, key), lambda: lora_trainable(params, overlap)):
        with pytest.raises(ValueError, match="'backbone/layers_1/attn/wq/kernel' is both a LoRA target"):
            fn()
    with pytest.raises(ValueError, match="string"):
        LoraConfig(trainable="head")
    with pytest.raises(ValueError, match="bad regular expression"):
        LoraConfig(trainable=("head[",))
    tree = {"dense": {"kernel": jnp.zeros((4, 3))}, "count": jnp.zeros((), jnp.int32), "x": {"magnitude": jnp.ones(3)}}
    with pytest.raises(ValueError, match="'count' has dtype int32"):
        init_lora(tree, LoraConfig(targets=("dense",), trainable=("count",)), key)
    with pytest.raises(ValueError, match="reserved"):
        init_lora(tree, LoraConfig(targets=("dense",), trainable=("x/",)), key)
    # Hand-edited adapter trees, checked by apply_lora and the dropout path alike.
    ad = init_lora(params, RM_LORA, key)
    bad = {
        KeyError: ({**ad, "value": {"bias": jnp.zeros(())}}, "'value/bias'.*no such leaf"),
        ValueError: ({**ad, "head": {**ad["head"], "kernel": jnp.zeros(3)}}, r"'head/kernel': shape \(3,\)"),
    }
    drop = LoraConfig(rank=2, targets=("attention",), trainable=("head",), dropout=0.1)
    for error, (tree, message) in bad.items():
        with pytest.raises(error, match=message):
            apply_lora(params, tree, RM_LORA)
        with pytest.raises(error, match=message):
            _adapters_beside_kernels(params, tree, drop)
    narrow = {**ad, "head": {**ad["head"], "kernel": ad["head"]["kernel"].astype(jnp.bfloat16)}}
    with pytest.raises(ValueError, match="'head/kernel': dtype bfloat16 in the adapters, float32"):
        apply_lora(params, narrow, RM_LORA)
    both = jax.tree.map(lambda x: x, ad)
    both["backbone"]["layers_0"]["attn"]["wq"]["kernel"] = params["backbone"]["layers_0"]["attn"]["wq"]["kernel"]
    with pytest.raises(ValueError, match="'backbone/layers_0/attn/wq/kernel'; a kernel is adapted or trained in full"):
        apply_lora(params, both, RM_LORA)


def test_trainable_merge_unmerge_and_dtypes(reward_model):
    config, params = reward_model
    key = jax.random.key(0)
    # A bfloat16 base: the head copy is float32 (promoted to param_dtype), exactly the base values.
    base16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    ad16 = init_lora(base16, RM_LORA, key)
    assert ad16["head"]["kernel"].dtype == jnp.float32
    np.testing.assert_array_equal(ad16["head"]["kernel"], base16["head"]["kernel"].astype(jnp.float32))
    trained16 = perturb(ad16, 1)  # B != 0 and a moved head
    assert apply_lora(base16, trained16, RM_LORA)["head"]["kernel"].dtype == jnp.float32
    merged16 = merge_lora(base16, trained16, RM_LORA)
    for name in ("kernel", "bias"):  # the trained head, cast to the base dtype
        assert merged16["head"][name].dtype == jnp.bfloat16
        np.testing.assert_array_equal(merged16["head"][name], trained16["head"][name].astype(jnp.bfloat16))
    assert not np.array_equal(merged16["head"]["kernel"], base16["head"]["kernel"])
    # A float32 leaf stays float32 with a bfloat16 param_dtype (never lowered).
    low = init_lora(params, dataclasses.replace(RM_LORA, param_dtype=jnp.bfloat16), key)
    assert low["head"]["kernel"].dtype == jnp.float32
    assert low["backbone"]["layers_0"]["attn"]["wq"]["lora_a"].dtype == jnp.bfloat16

    # unmerge: the kernels come back, the head keeps its trained value; strict refuses.
    trained = perturb(init_lora(params, RM_LORA, key), 2)
    merged = merge_lora(params, trained, RM_LORA)
    np.testing.assert_array_equal(merged["head"]["kernel"], trained["head"]["kernel"])  # float32 -> float32
    restored = unmerge_lora(merged, trained, RM_LORA)
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(restored["head"][name], trained["head"][name])
    for got, want in zip(jax.tree.leaves(restored["backbone"]), jax.tree.leaves(params["backbone"])):
        np.testing.assert_allclose(got, want, atol=1e-6)  # (W + s·AB) − s·AB: 1e-6 is 100 ulps of |W| ~ 0.08
    for got, want in zip(jax.tree.leaves(apply_lora(restored, trained, RM_LORA)["head"]), jax.tree.leaves(merged["head"])):
        np.testing.assert_array_equal(got, want)  # re-applying gives the merged head back
    with pytest.raises(ValueError, match=r"strict=True.*'head/bias', 'head/kernel'"):
        unmerge_lora(merged, trained, RM_LORA, strict=True)
    lora_only = LoraConfig(rank=2, targets=("attention",))
    plain = perturb(init_lora(params, lora_only, key), 2)
    unmerge_lora(merge_lora(params, plain, lora_only), plain, lora_only, strict=True)  # nothing to lose


def test_trainable_weight_decay_mask_and_dora(reward_model):
    config, params = reward_model
    cfg = dataclasses.replace(RM_LORA, dora=True)
    ad = init_lora(params, cfg, jax.random.key(0))
    mask = lora_weight_decay_mask(ad)
    # the head as in full fine-tuning (jaxalign.optim decays kernels only), LoRA as before
    assert mask["head"] == {"kernel": True, "bias": False} == weight_decay_mask(params)["head"]
    assert mask["backbone"]["layers_0"]["attn"]["wq"] == {"lora_a": True, "lora_b": True, "magnitude": False}
    assert apply_lora(params, ad, cfg)["head"]["kernel"] is ad["head"]["kernel"]
    ad["head"]["bias"] = jnp.asarray(0.5, jnp.float32)  # nonzero, so that decay would show
    opt = OptimConfig(learning_rate=0.1, weight_decay=0.5, total_steps=10, max_grad_norm=None)
    tx, _ = make_lora_optimizer(opt)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, ad), tx.init(ad), ad)
    # −lr·wd·w, two float32 products: 8 ulps
    np.testing.assert_allclose(updates["head"]["kernel"], -0.1 * 0.5 * ad["head"]["kernel"], rtol=ulps(8))
    assert float(updates["head"]["bias"]) == 0.0
