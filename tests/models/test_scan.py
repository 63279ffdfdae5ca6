"""Scan over layers (`TransformerConfig.scan_layers`): the same model as the unrolled one, its
parameters stacked [L, ...] under "layers" (`stack_layers` / `unstack_layers`)."""

import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from jaxalign.checkpoint import make_checkpoint_manager, restore_checkpoint, save_checkpoint
from jaxalign.decoding import SamplingConfig, generate
from jaxalign.lora import LoraConfig, apply_lora, init_lora, make_lora_loss_fn, merge_lora, unmerge_lora
from jaxalign.models import forward, forward_with_cache, get_config, init_cache, init_params
from jaxalign.models.hf import load_hf_checkpoint
from jaxalign.models.hf_export import export_hf
from jaxalign.models.llama2c import load_llama2c
from jaxalign.models.transformer import (
    param_logical_axes,
    stack_cache,
    stack_layers,
    unstack_cache,
    unstack_layers,
)
from jaxalign.prefix import PrefixConfig, init_prefix, prefix_cache, prefix_positions
from jaxalign.sharding import param_specs
from jaxalign.trainers.sft import make_sft_step, sft_batch_loss
from jaxalign.trainers.step import create_train_state
from tests._tolerance import ulps

PRESETS = ["gpt2-mini", "llama-tiny"]


def configs(preset, n_layers=3, **kw):
    base = get_config(preset, vocab_size=512, n_layers=n_layers, max_seq_len=64, **kw)
    return base, base.replace(scan_layers=True)


def tree_dict(tree):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("preset", PRESETS)
def test_init_and_round_trip(preset):
    base, scan = configs(preset)
    params = init_params(base, jax.random.key(0))
    stacked = stack_layers(params, base)
    assert "layers" in stacked and not any(k.startswith("layers_") for k in stacked)
    # the scanned model's own init has exactly this layout
    own = init_params(scan, jax.random.key(0))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), own) == jax.tree.map(lambda x: (x.shape, x.dtype), stacked)
    for x in jax.tree.leaves(stacked["layers"]):
        assert x.shape[0] == 3
    # per-layer init keys: the stacked layers differ from each other
    wq = own["layers"]["attn"]["wq"]["kernel"]
    assert not np.array_equal(wq[0], wq[1])
    back = unstack_layers(stacked, base)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    with pytest.raises(ValueError, match="already"):
        stack_layers(stacked, base)
    with pytest.raises(ValueError, match="layers_2"):
        stack_layers({k: v for k, v in params.items() if k != "layers_2"}, base)
    with pytest.raises(ValueError, match="no stacked"):
        unstack_layers(params, base)
    with pytest.raises(ValueError, match="n_layers=4"):
        unstack_layers(stacked, base.replace(n_layers=4))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("remat", ["none", "dots", "full"])
def test_scan_equals_unrolled_loss_and_gradients(preset, remat):
    base, scan = configs(preset)
    scan = scan.replace(remat=remat)
    params = init_params(base, jax.random.key(0))
    stacked = stack_layers(params, base)
    tokens = jax.random.randint(jax.random.key(1), (2, 33), 0, 512)
    batch = {"tokens": tokens, "mask": jnp.ones(tokens.shape, jnp.float32)}

    logits = jax.jit(forward, static_argnums=1)(params, base, tokens)
    logits_scan = jax.jit(forward, static_argnums=1)(stacked, scan, tokens)
    # The same ops on the same inputs per layer; XLA fuses a while-loop body (and a recomputed
    # block) differently from unrolled code, so reductions over D = 64-128 terms, 3 layers deep,
    # may round differently: 64 ulps of the logits' scale. Measured equal (0 ulps) on AVX-512.
    np.testing.assert_allclose(logits_scan, logits, rtol=0, atol=ulps(64, logits))

    def value_and_grad(p, c):
        return jax.jit(jax.value_and_grad(lambda q: sft_batch_loss(q, c, batch)[0]))(p)

    loss, grad = value_and_grad(params, base)
    loss_scan, grad_scan = value_and_grad(stacked, scan)
    # a mean of 64 token losses of magnitude ~ln V: 16 ulps (measured equal)
    np.testing.assert_allclose(loss_scan, loss, rtol=ulps(16))
    want = tree_dict(stack_layers(grad, base))
    got = tree_dict(grad_scan)
    assert sorted(want) == sorted(got)
    for name, g in got.items():
        # each gradient entry sums over 2·32 positions and D/F terms through 3 layers: 256 ulps
        # of the leaf's largest entry (as the remat test); measured <= 2.3 (0 under remat). GPT-2's key bias is 0 in
        # exact arithmetic (a shift of a query's scores): compared at its kernel's scale.
        scale = want[name.replace("['wk']['bias']", "['wk']['kernel']")]
        np.testing.assert_allclose(g, want[name], rtol=0, atol=ulps(256, scale), err_msg=name)


@pytest.mark.parametrize("preset", PRESETS)
def test_cached_greedy_decoding_with_left_padding(preset):
    base, scan = configs(preset)
    # larger init so that greedy decoding is not dominated by one token (as tests/test_decoding.py)
    params = jax.tree.map(lambda x: x * 4, init_params(base, jax.random.key(1)))
    stacked = stack_layers(params, base)
    prompts = jnp.asarray([[0, 0, 5, 6, 7], [9, 10, 11, 12, 13], [0, 3, 4, 5, 6]], jnp.int32)
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], jnp.float32)
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.0)
    a = generate(params, base, prompts, mask, sampling=sampling, rng=jax.random.key(0))
    b = generate(stacked, scan, prompts, mask, sampling=sampling, rng=jax.random.key(0))
    np.testing.assert_array_equal(b.tokens, a.tokens)
    # log-softmax of logits that agree to ~64 ulps (see the logits test): 64 ulps of max|logp|
    np.testing.assert_allclose(b.model_logps, a.model_logps, rtol=0, atol=ulps(64, a.model_logps))
    # several samples from one prefill repeat the stacked cache along its batch axis (axis 1)
    a2 = generate(params, base, prompts, mask, sampling=sampling, rng=jax.random.key(0), num_samples=2)
    b2 = generate(stacked, scan, prompts, mask, sampling=sampling, rng=jax.random.key(0), num_samples=2)
    np.testing.assert_array_equal(b2.tokens, a2.tokens)
    np.testing.assert_array_equal(b2.tokens[::2], a.tokens)


def test_cache_layouts():
    base, scan = configs("llama-tiny")
    params = init_params(base, jax.random.key(0))
    stacked = stack_layers(params, base)
    cache = init_cache(scan, 2, 16)
    assert cache.stacked and cache.keys.shape == (3, 2, 16, base.kv_heads, base.head_dim)
    assert not init_cache(base, 2, 16).stacked
    tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 512)
    # either layout in, the config's layout out, the same numbers
    _, from_stacked = forward_with_cache(stacked, scan, tokens, cache)
    logits, from_tuple = forward_with_cache(stacked, scan, tokens, init_cache(base, 2, 16))
    assert from_stacked.stacked and from_tuple.stacked
    np.testing.assert_array_equal(from_tuple.keys, from_stacked.keys)
    ref_logits, ref = forward_with_cache(params, base, tokens, init_cache(base, 2, 16))
    assert not ref.stacked
    _, ref_from_stacked = forward_with_cache(params, base, tokens, cache)
    assert not ref_from_stacked.stacked
    # the cached keys of 6 tokens: projections of D = 64 terms after 0-2 layers: 64 ulps
    for i in range(3):
        np.testing.assert_allclose(from_stacked.keys[i], ref.keys[i], rtol=0, atol=ulps(64, ref.keys[i]))
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=ulps(64, ref_logits))
    round_trip = stack_cache(unstack_cache(from_stacked))
    np.testing.assert_array_equal(round_trip.values, from_stacked.values)


def test_prefix_cache_feeds_a_scanned_model():
    base, scan = configs("llama-tiny")
    params = init_params(base, jax.random.key(0))
    stacked = stack_layers(params, base)
    pcfg = PrefixConfig(3)
    prefix = init_prefix(base, pcfg, jax.random.key(2))
    tokens = jax.random.randint(jax.random.key(1), (2, 5), 0, 512)
    positions = prefix_positions(jnp.broadcast_to(jnp.arange(5), (2, 5)), pcfg)
    ref, _ = forward_with_cache(params, base, tokens, prefix_cache(prefix, base, pcfg, 2, 5), positions)
    got, cache = forward_with_cache(stacked, scan, tokens, prefix_cache(prefix, scan, pcfg, 2, 5), positions)
    assert cache.stacked
    np.testing.assert_allclose(got, ref, rtol=0, atol=ulps(64, ref))  # as the logits test


def test_mixed_layer_types_refused():
    with pytest.raises(ValueError, match="scan_layers.*layer_types"):
        get_config("gemma2-tiny", scan_layers=True)
    # identical layers are fine, Gemma included
    get_config("gemma2-tiny", scan_layers=True, layer_types=("full", "full"))


def test_param_logical_axes_and_specs_of_the_stacked_tree():
    base, scan = configs("llama-tiny")
    axes = param_logical_axes(scan)
    flat = tree_dict(param_logical_axes(base))
    for name, spec in tree_dict(axes).items():
        if name.startswith("['layers']"):
            # the per-layer names behind a leading "layers"
            per_layer = flat[name.replace("['layers']", "['layers_0']", 1)]
            assert spec == PartitionSpec("layers", *per_layer), name
        else:
            assert spec == flat[name], name
    mesh = AbstractMesh((1, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    specs = param_specs(scan, mesh)
    assert specs["layers"]["attn"]["wq"]["kernel"] == PartitionSpec(None, "fsdp", "tensor", None)
    assert specs["layers"]["mlp"]["down"]["kernel"] == PartitionSpec(None, "tensor", "fsdp")


@pytest.mark.parametrize("preset", PRESETS)
def test_export_and_import_in_either_layout(preset, tmp_path):
    base, scan = configs(preset)
    params = init_params(base, jax.random.key(0))
    stacked = stack_layers(params, base)
    export_hf(params, base, tmp_path / "unrolled")
    export_hf(stacked, scan, tmp_path / "scanned")
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "unrolled" / name).read_bytes() == (tmp_path / "scanned" / name).read_bytes()
    assert "scan_layers" not in json.loads((tmp_path / "scanned" / "config.json").read_text())
    config, loaded = load_hf_checkpoint(tmp_path / "scanned", scan_layers=True)
    assert config == scan
    jax.tree.map(np.testing.assert_array_equal, loaded, stacked)


def test_checkpoint_of_stacked_params(tmp_path):
    base, scan = configs("llama-tiny")
    stacked = init_params(scan, jax.random.key(0))
    manager = make_checkpoint_manager(tmp_path, save_every=1)
    save_checkpoint(manager, 0, stacked, force=True)
    manager.wait_until_finished()
    restored = restore_checkpoint(manager, stacked)
    jax.tree.map(np.testing.assert_array_equal, restored, stacked)
    # an unrolled checkpoint restores as it was saved, then converts
    jax.tree.map(np.testing.assert_array_equal, stack_layers(unstack_layers(restored, base), base), stacked)


def test_llama2c_import_in_the_stacked_layout(shared_data):
    path = shared_data / "models/stories260K/stories260K.bin"
    config, params = load_llama2c(path)
    scan_config, stacked = load_llama2c(path, scan_layers=True)
    assert scan_config == config.replace(scan_layers=True)
    jax.tree.map(np.testing.assert_array_equal, stacked, stack_layers(params, config))


@pytest.mark.parametrize("dora", [False, True])
def test_lora_on_stacked_kernels(dora):
    base, scan = configs("llama-tiny")
    params = init_params(base, jax.random.key(0))
    stacked = stack_layers(params, base)
    cfg = LoraConfig(rank=4, targets=("all",), dora=dora)
    adapters = init_lora(params, cfg, jax.random.key(1))
    # trained-looking adapters: B != 0
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
        if str(p[-1].key) == "lora_b" else x,
        adapters,
    )
    own = init_lora(stacked, cfg, jax.random.key(1))
    a = own["layers"]["attn"]["wo"]["lora_a"]
    assert a.shape == (3, base.n_heads * base.head_dim, 4)
    assert own["layers"]["mlp"]["up"]["lora_b"].shape == (3, 4, base.ff_dim)
    if dora:
        assert own["layers"]["attn"]["wq"]["magnitude"].shape == (3, base.n_heads * base.head_dim)
        # DoRA's m = ‖W‖_c per layer, as the unrolled init computes it
        np.testing.assert_allclose(
            own["layers"]["attn"]["wq"]["magnitude"],
            stack_layers(init_lora(params, cfg, jax.random.key(1)), base)["layers"]["attn"]["wq"]["magnitude"],
            rtol=ulps(4),  # a 64-term float32 sum of squares and a sqrt, same order: measured equal
        )
    want = stack_layers(apply_lora(params, adapters, cfg), base)
    got = apply_lora(stacked, stack_layers(adapters, base), cfg)
    # the same matmuls per layer, batched over L: the same rounding (HIGHEST precision)
    for name, x in tree_dict(got).items():
        np.testing.assert_allclose(x, tree_dict(want)[name], rtol=0, atol=ulps(4, x), err_msg=name)
    merged = merge_lora(stacked, stack_layers(adapters, base), cfg)
    if not dora:
        back = unmerge_lora(merged, stack_layers(adapters, base), cfg)
        # W' - s·A·B: one rounding of the update's magnitude (~|W|): 4 ulps of W
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=ulps(4, y)), back, stacked)
    tokens = jax.random.randint(jax.random.key(3), (2, 9), 0, 512)
    ref = forward(apply_lora(params, adapters, cfg), base, tokens)
    out = forward(got, scan, tokens)
    np.testing.assert_allclose(out, ref, rtol=0, atol=ulps(64, ref))  # as the logits test


class _Body(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x, nn.Dense(4, name="proj")(x)  # carry unchanged: every layer sees the same x


class _Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(_Body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                       in_axes=0, length=3)
        return scan(name="layers")(x, jnp.zeros((3,)))[1]  # [L, B, 4]


def test_lora_dropout_in_scanned_layers_draws_per_layer_masks():
    x = jnp.ones((2, 8))
    params = _Scanned().init(jax.random.key(0), x)["params"]
    # every layer the same kernel, adapter and input: outputs can differ only through the masks
    same = lambda a: jnp.broadcast_to(a[:1], a.shape)  # noqa: E731
    params = jax.tree.map(same, params)
    cfg = LoraConfig(rank=2, targets=("proj",), dropout=0.5)
    adapters = jax.tree.map(same, init_lora(params, cfg, jax.random.key(1)))
    adapters["layers"]["proj"]["lora_b"] = jnp.ones_like(adapters["layers"]["proj"]["lora_b"])

    def run(p, batch, rng):
        rngs = None if rng is None else {"dropout": rng}
        return _Scanned().apply({"params": p}, batch, rngs=rngs)

    ys = make_lora_loss_fn(run, cfg)(adapters, x, jax.random.key(2), params)  # [L,B,4]
    no_dropout = _Scanned().apply({"params": apply_lora(params, adapters, cfg)}, x)
    assert not np.allclose(ys, no_dropout)  # the adapter branch was dropped out somewhere
    # one key per layer: a mask shared by the layers (a key from a trace-time counter) would
    # make the three rows equal
    assert not np.array_equal(ys[0], ys[1]) and not np.array_equal(ys[1], ys[2])
    with pytest.raises(ValueError, match="dropout rng"):
        lora_loss = make_lora_loss_fn(lambda p, b, r: run(p, b, None), cfg)
        lora_loss(adapters, x, jax.random.key(2), params)


@pytest.mark.parametrize("preset", ["gpt2-mini", "llama-tiny"])
def test_remat_inside_scan_saves_memory(preset):
    """On XLA:CPU, remat of unrolled blocks saves nothing (the scheduler undoes it); inside the
    scan the backward pass keeps only each layer's saved residuals."""

    def temp_bytes(config):
        params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
        batch = {"tokens": jax.ShapeDtypeStruct((8, 128), jnp.int32),
                 "mask": jax.ShapeDtypeStruct((8, 128), jnp.float32)}
        grad = jax.jit(jax.grad(lambda p, b: sft_batch_loss(p, config, b)[0]))
        return grad.lower(params, batch).compile().memory_analysis().temp_size_in_bytes

    base = get_config(preset, vocab_size=512, n_layers=4)
    unrolled = temp_bytes(base.replace(remat="full"))
    scanned = temp_bytes(base.replace(remat="full", scan_layers=True))
    # measured (B=8, T=128, 4 layers): gpt2-mini 73.5 MB unrolled (equal for none/dots/full) vs
    # 24.0 MB scanned; llama-tiny 44.7 MB vs 14.2 MB; the scan keeps ~1/3: assert under 1/2
    assert scanned < 0.5 * unrolled, (scanned, unrolled)


def _compile_seconds(config):
    tx = optax.adam(1e-3)
    step = make_sft_step(config, tx, lambda s: 1e-3)
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    state = jax.eval_shape(lambda p: create_train_state(p, tx, 0), params)
    batch = {"tokens": jax.ShapeDtypeStruct((2, 32), jnp.int32), "mask": jax.ShapeDtypeStruct((2, 32), jnp.float32)}
    start = time.perf_counter()
    step.lower(state, batch).compile()
    return time.perf_counter() - start


@pytest.fixture
def no_persistent_cache():
    """The persistent compilation cache (tests/conftest.py) off: a second compile of the same
    program would otherwise time a cache read."""
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", True)


def test_compile_time_hardly_grows_with_depth(no_persistent_cache):
    shallow_config, deep_config = (
        get_config("llama-tiny", vocab_size=512, n_layers=n, scan_layers=True) for n in (4, 32)
    )
    # compile times on a loaded 2-core machine are noisy: the min of 2, interleaved so that a
    # spell of load slows both depths alike
    times = [(_compile_seconds(shallow_config), _compile_seconds(deep_config)) for _ in range(2)]
    shallow, deep = min(t[0] for t in times), min(t[1] for t in times)
    # measured 6.0 s vs 6.3 s (ratio 1.05; unrolled: 4.6 s vs 13.6 s, ratio 3.0): the scanned
    # program holds one block whatever L. Asserted at the 1.5 the design asks for.
    assert deep <= 1.5 * shallow, (shallow, deep)
