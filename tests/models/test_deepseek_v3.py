"""DeepSeek-V3 in the Transformer: MLA attention in every layer with a latent KV cache, DeepSeek
MoE after the first dense layers, the HF importer / exporter, and parity with transformers 5.25's
`DeepseekV3ForCausalLM` on random float32 weights (eager attention and experts)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from jaxalign.decoding import SamplingConfig, generate, prompt_positions
from jaxalign.logprobs import token_logps
from jaxalign.losses.moe import load_balancing_loss
from jaxalign.models.config import get_config, num_params, train_flops_per_token
from jaxalign.models.hf import deepseek_config_from_hf, load_hf_checkpoint
from jaxalign.models.hf_export import export_hf
from jaxalign.models.load import load_pretrained
from jaxalign.models.mla import MLAConfig, gqa_cache_bytes_per_token, mla_cache_bytes_per_token
from jaxalign.models.transformer import (
    forward,
    forward_with_cache,
    init_cache,
    init_params,
    param_logical_axes,
    stack_layers,
)
from jaxalign.sharding import MeshConfig, abstract_mesh, abstract_params, param_specs, sharding_fallbacks
from tests._tolerance import ulps
from tests.models.test_moe_model import randomise_hf

V = 97
TINY = get_config("deepseek-v3-tiny", vocab_size=V)
# the same attention without MoE: identical layers, so scan_layers applies
DENSE = TINY.replace(moe=None, moe_layers=None)


def scaled_params(config, seed):
    # larger init so that greedy decoding is not dominated by one token and routes are not ties
    return jax.tree.map(lambda x: x * 4, init_params(config, jax.random.key(seed)))


@pytest.fixture(scope="module")
def tiny():
    return TINY, scaled_params(TINY, 1)


# ---------------------------------------------------------------------------------------------
# config, parameter tree, cache layout


def test_config_validation():
    mla = TINY.mla
    with pytest.raises(ValueError, match="mla needs family 'llama'"):
        get_config("gpt2-tiny", mla=dataclasses.replace(mla, n_heads=4))
    with pytest.raises(ValueError, match="mla.n_heads=4 differs from n_heads=8"):
        TINY.replace(n_heads=8)
    with pytest.raises(ValueError, match="rope_theta/rope_interleaved"):
        TINY.replace(rope_theta=5e5)
    for field, value in (("n_kv_heads", 2), ("qk_norm", True), ("sliding_window", 8), ("qkv_bias", True),
                         ("attention_impl", "cudnn"), ("head_size", 16)):
        with pytest.raises(ValueError, match=f"TransformerConfig.{field}=.* does not apply to MLA"):
            TINY.replace(**{field: value})
    with pytest.raises(ValueError, match="must be an MLAConfig"):
        TINY.replace(mla={"n_heads": 4})
    assert hash(TINY) == hash(get_config("deepseek-v3-tiny", vocab_size=V))


def test_param_tree_axes_and_sharding(tiny):
    config, params = tiny
    attn = params["layers_0"]["attn"]
    assert set(attn) == {"q_a", "q_a_norm", "q_b", "kv_a", "kv_a_norm", "kv_b", "o"}
    assert attn["kv_b"]["kernel"].shape == (16, 4, 8 + 12) and attn["q_b"]["kernel"].shape == (24, 4, 16)
    assert "mlp" in params["layers_0"] and "moe" in params["layers_1"]
    assert params["layers_1"]["moe"]["bias"].shape == (8,)
    assert num_params(config) == sum(x.size for x in jax.tree.leaves(params))
    axes = param_logical_axes(config)
    assert tuple(axes["layers_0"]["attn"]["q_a"]["kernel"]) == ("embed", "q_lora")
    assert tuple(axes["layers_2"]["attn"]["kv_b"]["kernel"]) == ("kv_lora", "heads", "head_dim")
    # every leaf resolves under the one rules table on a (data, fsdp, tensor) = (2, 2, 2) mesh: no
    # unknown logical name (that raises); heads (4) split over tensor, D = 64 over fsdp
    mesh = abstract_mesh(MeshConfig(data=2, fsdp=2, tensor=2), 8)
    specs = param_specs(config, mesh)
    assert tuple(specs["layers_0"]["attn"]["q_b"]["kernel"]) == (None, "tensor", None)
    assert tuple(specs["layers_0"]["attn"]["kv_a"]["kernel"]) == ("fsdp", None)
    fallbacks = sharding_fallbacks(param_logical_axes(config), abstract_params(config), mesh)
    assert fallbacks and all("'vocab'" in f for f in fallbacks)  # only V = 97 is indivisible


@pytest.mark.parametrize("scan", [False, True])
def test_init_cache_holds_latent_and_rope_key_only(scan):
    config = DENSE.replace(scan_layers=scan)
    cache = init_cache(config, 2, 10)
    if scan:
        assert cache.keys.shape == (3, 2, 10, 16) and cache.values.shape == (3, 2, 10, 8)
    else:
        assert [k.shape for k in cache.keys] == [(2, 10, 16)] * 3
        assert [v.shape for v in cache.values] == [(2, 10, 8)] * 3
    per_token = sum(x.nbytes for x in jax.tree.leaves((cache.keys, cache.values))) / (2 * 10)
    assert per_token == mla_cache_bytes_per_token(config.mla, jnp.float32, config.n_layers) == (16 + 8) * 4 * 3


def test_deepseek_v3_preset_counts_and_cache_bytes():
    config = get_config("deepseek-v3")
    # DeepSeek-V3 report (arXiv 2412.19437 §1 / Table 1): 671B total, 37B activated per token; the
    # 671,026,419,200 main-model parameters (without the 14B MTP module) that the released
    # checkpoint holds, the 58·256 router biases included
    assert num_params(config) == 671_026_419_200
    assert round(num_params(config, active=True) / 1e9) == 38  # 37.55e9: "37B" in the report
    # latent cache per token: 61 layers · (512 + 64) bf16 = 70,272 bytes; the same model's heads
    # expanded (128 heads · (192-wide keys + 128-wide values)) would cache 71.1× more
    mla = mla_cache_bytes_per_token(config.mla, jnp.bfloat16, 61)
    mha = gqa_cache_bytes_per_token(128, 192, jnp.bfloat16, 61, value_dim=128)
    assert mla == 70_272 and mha == 4_997_120
    # a GQA model with 8 KV heads of 128 (Llama-3-70B style) at the same depth: 8·256·2·61
    assert gqa_cache_bytes_per_token(8, 128, jnp.bfloat16, 61) == 249_856


# deepseek-ai/DeepSeek-V3's config.json (v4 keys, DeepSeek's remote-code fields), minus its fp8
# quantization_config and auto_map
V3_CONFIG_JSON = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "ep_size": 1, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8,
    "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
    "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True, "tie_word_embeddings": False,
    "rope_theta": 10000, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                          "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                          "type": "yarn"},
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 1,
}


def test_released_config_maps_to_the_preset():
    assert deepseek_config_from_hf(V3_CONFIG_JSON) == get_config("deepseek-v3")
    y = get_config("deepseek-v3").mla
    assert y.softmax_scale == pytest.approx(192**-0.5 * (0.1 * np.log(40) + 1) ** 2, rel=1e-12)
    for field, value, match in (("quantization_config", {"quant_method": "fp8"}, "quantization_config"),
                                ("scoring_func", "softmax", "scoring_func"),
                                ("hidden_act", "gelu", "hidden_act")):
        with pytest.raises(ValueError, match=match):
            deepseek_config_from_hf({**V3_CONFIG_JSON, field: value})


def test_flops_count_mla_widths():
    t = 16
    m = DENSE.mla
    # the attention term: 6·L·T·H·(d_n + d_R + d_v) (score and weighted-sum widths), not 12·L·T·D
    attn = train_flops_per_token(DENSE, t) - 6 * (num_params(DENSE, embeddings=False, active=True) + V * 64)
    assert attn == 6 * 3 * t * m.n_heads * (m.qk_head_dim + m.v_head_dim)
    # the matmul count grows with MLA's own widths: a wider latent adds L·(D + 1 + H·(d_n + d_v)) per unit
    wider = DENSE.replace(mla=dataclasses.replace(m, kv_lora_rank=m.kv_lora_rank + 1))
    assert num_params(wider) - num_params(DENSE) == 3 * (64 + 1 + m.n_heads * (m.qk_nope_head_dim + m.v_head_dim))


# ---------------------------------------------------------------------------------------------
# decoding, scan, remat, router stats


def assert_greedy_equals_teacher_forcing(params, config, prompt, mask, new_tokens):
    """Greedy `generate` (prefill, then the absorbed latent-cache decode one token at a time)
    against one teacher-forced naive pass over prompt + generated tokens: the same argmax and
    log-probs. Returns the generated tokens [B, new_tokens]."""
    gen = generate(params, config, prompt, mask, rng=jax.random.key(0),
                   sampling=SamplingConfig(max_new_tokens=new_tokens, temperature=0.0))
    p = prompt.shape[1]
    tokens = jnp.concatenate([prompt, gen.tokens], axis=1)
    pos = prompt_positions(jnp.concatenate([mask, jnp.ones_like(gen.tokens)], axis=1))
    logits = forward(params, config, tokens, pos)
    ref = token_logps(logits[:, p - 1:-1], gen.tokens)
    # cached vs one pass reorders the ≤ 96-term sums of 3 layers and the softmax over ≤ 76 keys:
    # as test_moe_model's decode test, 384 ulps of the log-probs
    err = float(jnp.abs(gen.model_logps - ref).max())
    assert err <= ulps(384, ref), err
    np.testing.assert_array_equal(gen.tokens, jnp.argmax(logits[:, p - 1:-1], axis=-1))
    return np.asarray(gen.tokens)


def test_greedy_decoding_equals_teacher_forcing(tiny):
    config, params = tiny
    prompt = jnp.asarray(np.random.RandomState(2).randint(0, V, (3, 6)))
    mask = jnp.array([[1] * 6, [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    # positions up to 75, beyond YaRN's original 32 (the scaled frequencies are exercised), and
    # more steps than one decode segment (SamplingConfig.attend_bucket = 64): the latent cache grows
    tokens = assert_greedy_equals_teacher_forcing(params, config, prompt, mask, 70)
    assert len(set(tokens.ravel().tolist())) > 3  # not one repeated token


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_equals_unrolled_pure_mla(remat):
    params = scaled_params(DENSE, 2)
    scanned = DENSE.replace(scan_layers=True, remat=remat)
    stacked = stack_layers(params, DENSE)
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, V, (2, 8)))
    a = forward(params, DENSE, tokens)
    b = forward(stacked, scanned, tokens)
    # the same maths in another program: 3 layers of ≤ 96-term sums, 2·96 ulps of the logits
    np.testing.assert_allclose(a, b, rtol=0, atol=ulps(192, a))
    # the stacked latent cache: prefill + decode in the scanned model equals the unrolled one
    la, ca = forward_with_cache(params, DENSE, tokens[:, :5], init_cache(DENSE, 2, 8))
    lb, cb = forward_with_cache(stacked, scanned, tokens[:, :5], init_cache(scanned, 2, 8))
    assert cb.keys.shape == (3, 2, 8, 16) and cb.values.shape == (3, 2, 8, 8)
    for _ in range(3):
        nxt = jnp.argmax(la[:, -1:], axis=-1)
        la, ca = forward_with_cache(params, DENSE, nxt, ca)
        lb, cb = forward_with_cache(stacked, scanned, nxt, cb)
        np.testing.assert_allclose(la, lb, rtol=0, atol=ulps(192, la))
    np.testing.assert_allclose(jnp.stack(ca.keys), cb.keys, rtol=0, atol=ulps(192, cb.keys))


def test_remat_gradients_equal(tiny):
    config, params = tiny
    tokens = jnp.asarray(np.random.RandomState(4).randint(0, V, (2, 7)))

    def loss(p, cfg):
        return jnp.mean(jnp.square(forward(p, cfg, tokens)))

    g0 = jax.grad(loss)(params, config)
    assert np.abs(np.asarray(g0["layers_2"]["attn"]["kv_b"]["kernel"])).max() > 0
    for remat in ("full", "dots"):
        g1 = jax.grad(loss)(params, config.replace(remat=remat))
        # the recomputed forward is the same program piece by piece, but XLA may fuse it
        # differently: 3 layers of ≤ 96-term sums each way, 2·192 ulps of each gradient's
        # magnitude (measured 0)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
            np.testing.assert_allclose(a, b, rtol=0, atol=ulps(384, a), err_msg=f"{remat} {jax.tree_util.keystr(path)}")


def test_router_stats_and_routing_replay(tiny):
    config, params = tiny
    tokens = jnp.asarray(np.random.RandomState(6).randint(0, V, (2, 8)))
    logits, stats = forward(params, config, tokens, return_router_stats=True)
    assert len(stats) == 2 and stats[0].router_logits.shape == (2, 8, 8) and stats[0].expert_ids.shape == (2, 8, 2)
    # group-limited: both choices of a token lie in one group of 4 (n_group 2, topk_group 1)
    groups = np.asarray(stats[1].expert_ids) // 4
    np.testing.assert_array_equal(groups[..., 0], groups[..., 1])
    own = tuple(s.expert_ids for s in stats)
    np.testing.assert_array_equal(forward(params, config, tokens, routing=own), logits)
    other = tuple((ids + 4) % 8 for ids in own)  # the other group
    moved = forward(params, config, tokens, routing=other)
    assert np.all(np.any(np.asarray(moved) != np.asarray(logits), axis=-1))


# ---------------------------------------------------------------------------------------------
# checkpoint parity with transformers 5.25 DeepseekV3ForCausalLM

HF_B, HF_T = 2, 40  # positions up to 39, beyond YaRN's original_max_position_embeddings = 16
E = 8


def hf_config(**kw):
    """3 layers (layer 0 dense: first_k_dense_replace 1), 8 routed experts in 2 groups of which
    1 is kept, 2 shared experts, q/kv latents, d_v != d_n, YaRN ×4 over 16 positions with
    mscale_all_dim 0.5 != mscale 1, so both YaRN factors differ from 1 (cos/sin ×1.065, softmax
    scale ×1.143)."""
    rope = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16,
                beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.5)
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                num_attention_heads=2, num_key_value_heads=2, n_shared_experts=2, n_routed_experts=E,
                num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, kv_lora_rank=8,
                q_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=6, max_position_embeddings=64,
                rope_parameters=rope, attn_implementation="eager", experts_implementation="eager")
    return transformers.DeepseekV3Config(**{**base, **kw})


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(hf_config()).eval()
    # O(1) activations, router logits of std ~1 (no near-ties); the selection bias (a buffer that
    # HF initialises to 0) becomes N(0, 1/8), so that it changes choices
    randomise_hf(model, 0)
    path = tmp_path_factory.mktemp("deepseek_v3")
    model.save_pretrained(path)
    return model, path


def test_config_import_and_param_count(hf_model):
    hf, path = hf_model
    config, params = load_hf_checkpoint(path)
    m = config.mla
    assert (m.n_heads, m.kv_lora_rank, m.q_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) == (
        2, 8, 12, 4, 4, 6)
    assert m.rope_interleaved and m.yarn.factor == 4.0 and m.yarn.original_max_position == 16
    assert (m.yarn.mscale, m.yarn.mscale_all_dim) == (1.0, 0.5)
    assert config.moe_layers == (1, 2) and config.d_ff == 48 and not config.tie_embeddings
    moe = config.moe
    assert (moe.router, moe.router_bias, moe.n_group, moe.topk_group, moe.routed_scale) == ("sigmoid", True, 2, 1, 2.5)
    assert moe.shared_d_ff == 32 and not moe.shared_gate and moe.norm_topk_prob
    # HF counts parameters only; e_score_correction_bias [E] is a buffer there, a param here
    assert num_params(config) == hf.num_parameters() + 2 * E == sum(x.size for x in jax.tree.leaves(params))
    bias = hf.model.layers[1].mlp.gate.e_score_correction_bias.numpy()
    np.testing.assert_array_equal(params["layers_1"]["moe"]["bias"], bias)


def router_outputs(hf, tokens, mask):
    """HF's forward with each router's (logits, top-k weights, top-k ids) captured by hooks."""
    caught = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda mod, args, out: caught.append(out))
             for layer in hf.model.layers[1:]]
    try:
        with torch.no_grad():
            out = hf(torch.tensor(tokens), attention_mask=torch.tensor(mask), output_router_logits=True)
    finally:
        for h in hooks:
            h.remove()
    return out, caught


def test_logits_router_logits_and_aux_loss_match_hf(hf_model):
    hf, path = hf_model
    config, params = load_hf_checkpoint(path)
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, V, (HF_B, HF_T))
    mask = np.ones((HF_B, HF_T), np.int64)
    mask[1, 30:] = 0  # right padding: the real tokens' outputs do not depend on it (causal)
    out, caught = router_outputs(hf, tokens, mask)
    logits, stats = jax.jit(lambda p, t: forward(p, config, t, return_router_stats=True))(params, tokens)
    real = mask.astype(bool)
    ref = out.logits.numpy()
    # float32, torch vs XLA order through 3 layers whose longest sums are the 48-term dense MLP,
    # the 32-term projections and the ≤ 40-key softmax: a few hundred roundings on each path,
    # each ≤ 1/2 ulp of the largest logit: 256 ulps of max|logit| (1e-4 relative at |3.4|);
    # measured ~3e-6 (8 ulps)
    err = np.abs(np.asarray(logits)[real] - ref[real]).max()
    assert err <= ulps(256, ref[real]), err
    assert len(stats) == len(out.router_logits) == len(caught) == 2  # the dense layer 0 has no router
    for s, r, (_, hf_w, hf_ids) in zip(stats, out.router_logits, caught):
        r = r.numpy().reshape(HF_B, HF_T, E)
        # router logits are 32-term sums over a residual stream that went through 1-2 layers:
        # 64 ulps of max|z| (1e-5 relative); measured ≤ 2.3e-6 absolute
        np.testing.assert_allclose(np.asarray(s.router_logits)[real], r[real], rtol=0, atol=ulps(64, r[real]))
        # the biased, group-limited selection and the renormalised ×2.5 weights equal HF's
        # (HF's topk is unsorted: compare sorted by expert id)
        ids = np.asarray(s.expert_ids).reshape(-1, 2)
        hf_ids, hf_w = hf_ids.numpy(), hf_w.numpy()
        o, ho = np.argsort(ids, axis=-1), np.argsort(hf_ids, axis=-1)
        take = lambda a, i: np.take_along_axis(a, i, axis=-1)  # noqa: E731
        np.testing.assert_array_equal(take(ids, o)[real.ravel()], take(hf_ids, ho)[real.ravel()])
        # weights: a sigmoid and a 2-term normalisation of the logits above, 64 ulps of 2.5
        np.testing.assert_allclose(take(np.asarray(s.weights).reshape(-1, 2), o)[real.ravel()],
                                   take(hf_w, ho)[real.ravel()], rtol=0, atol=ulps(64, 2.5))
    # HF's pooled load-balancing loss (Mixtral form; DeepseekV3ForCausalLM itself computes none)
    # on its router logits, against ours on ours, masked by the attention mask
    ref_aux = float(load_balancing_loss_func(out.router_logits, E, 2, torch.tensor(mask)))
    aux, _ = load_balancing_loss(tuple(s.router_logits for s in stats), top_k=2, mask=jnp.asarray(mask))
    # a mean over 2·70 real tokens of softmax probabilities (≤ 1) times counts, E = 8, with the
    # same top-2 choices: torch vs XLA summation order of ~140-term means, plus probabilities that
    # inherit the router logits' few-ulp differences: 64 ulps relative (7.6e-6); measured 1 ulp
    np.testing.assert_allclose(float(aux), ref_aux, rtol=ulps(64))
    unmasked, _ = load_balancing_loss(tuple(s.router_logits for s in stats), top_k=2)
    assert abs(float(unmasked) - float(aux)) > 1e-4  # the padding matters: the mask is tested


def test_direct_query_biases_no_yarn_all_dense_match_hf(tmp_path):
    """The importer's other branches: no q_lora_rank (V2-Lite's direct `q_proj`), attention
    biases, plain RoPE with rope_interleave False, and first_k_dense_replace = n_layers (no MoE
    layer: `moe` None, and scan_layers applies)."""
    torch.manual_seed(1)
    hf = transformers.DeepseekV3ForCausalLM(hf_config(
        q_lora_rank=None, attention_bias=True, rope_interleave=False, first_k_dense_replace=3,
        rope_parameters={"rope_type": "default", "rope_theta": 5e4})).eval()
    randomise_hf(hf, 1)
    hf.save_pretrained(tmp_path)
    config, params = load_hf_checkpoint(tmp_path)
    assert config.moe is None and config.mla.q_lora_rank is None and config.mla.yarn is None
    assert config.mla.attention_bias and not config.rope_interleaved and config.rope_theta == 5e4
    assert set(params["layers_0"]["attn"]) == {"q", "kv_a", "kv_a_norm", "kv_b", "o"}
    assert num_params(config) == hf.num_parameters()  # no MoE layer: no selection-bias buffers
    tokens = np.random.RandomState(1).randint(0, V, (HF_B, HF_T))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    logits = np.asarray(forward(params, config, jnp.asarray(tokens)))
    # as test_logits_router_logits_and_aux_loss_match_hf: 256 ulps of max|logit|
    err = np.abs(logits - ref).max()
    assert err <= ulps(256, ref), err
    _, stacked = load_hf_checkpoint(tmp_path, scan_layers=True)
    scanned = np.asarray(forward(stacked, config.replace(scan_layers=True), jnp.asarray(tokens)))
    np.testing.assert_allclose(scanned, logits, rtol=0, atol=ulps(192, logits))  # as the scan test


def test_yarn_matters_beyond_the_original_context(hf_model):
    """The same weights without YaRN give other logits at every position after 0 (so the parity
    above tests the scaling): YaRN's cos/sin and softmax factors act at every position, the
    frequency blend too. Position 0 has one key, and a one-key softmax is scale-invariant: equal
    there, which is why parity at position 0 alone would prove nothing."""
    _, path = hf_model
    config, params = load_hf_checkpoint(path)
    plain = config.replace(mla=dataclasses.replace(config.mla, yarn=None))
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, V, (1, HF_T)))
    diff = np.abs(np.asarray(forward(params, config, tokens) - forward(params, plain, tokens))).max(axis=-1)
    assert diff[0, 0] == 0.0 and diff[0, 1:].min() > 1e-3


def fuse_experts(path, out):
    """Rewrite the per-expert checkpoint in v5's fused in-memory layout (mlp.experts.gate_up_proj
    [E, 2F, D] = cat(gate, up) on dim 1, mlp.experts.down_proj [E, D, F])."""
    state = safetensors.numpy.load_file(path / "model.safetensors")
    fused = {k: v for k, v in state.items() if ".mlp.experts." not in k}
    for layer in (1, 2):
        p = f"model.layers.{layer}.mlp.experts."
        w = lambda n, p=p: np.stack([state[f"{p}{e}.{n}.weight"] for e in range(E)])  # noqa: E731
        fused[p + "gate_up_proj"] = np.concatenate([w("gate_proj"), w("up_proj")], axis=1)
        fused[p + "down_proj"] = w("down_proj")
    out.mkdir()
    safetensors.numpy.save_file(fused, out / "model.safetensors")
    (out / "config.json").write_text((path / "config.json").read_text())


def test_fused_expert_layout_loads_the_same(hf_model, tmp_path):
    _, path = hf_model
    _, params = load_hf_checkpoint(path)
    fuse_experts(path, tmp_path / "fused")
    _, fused = load_hf_checkpoint(tmp_path / "fused")
    jax.tree.map(np.testing.assert_array_equal, params, fused)


def test_export_hf_round_trip(hf_model, tmp_path):
    """export_hf writes what transformers loads as the same DeepseekV3ForCausalLM: reloaded logits
    equal the original's exactly (float32 weights copied), and importing the export gives the
    config and params back exactly."""
    hf, path = hf_model
    config, params = load_hf_checkpoint(path)
    export_hf(params, config, tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager", experts_implementation="eager").eval()
    assert type(again) is type(hf)
    tokens = torch.tensor(np.random.RandomState(5).randint(0, V, (2, 30)))
    with torch.no_grad():
        np.testing.assert_array_equal(again(tokens).logits.numpy(), hf(tokens).logits.numpy())
    config2, params2 = load_hf_checkpoint(tmp_path / "out")
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    # a pure-MLA dense model exports too (first_k_dense_replace = n_layers) and comes back equal
    dense = init_params(DENSE, jax.random.key(0))
    export_hf(dense, DENSE, tmp_path / "dense")
    assert json.loads((tmp_path / "dense" / "config.json").read_text())["first_k_dense_replace"] == 3
    config3, params3 = load_hf_checkpoint(tmp_path / "dense")
    assert config3 == DENSE
    jax.tree.map(np.testing.assert_array_equal, dense, params3)


def test_export_refuses_what_deepseek_v3_cannot_hold(tmp_path):
    for bad in (TINY.replace(moe_layers=(0, 2)),  # a dense layer after an MoE one
                TINY.replace(moe=dataclasses.replace(TINY.moe, router="softmax", n_group=1, router_bias=False)),
                TINY.replace(tie_embeddings=True)):
        with pytest.raises(ValueError, match="export: "):  # refused from the config, before any tensor
            export_hf(abstract_params(bad), bad, tmp_path)


def test_imported_model_greedy_decode_equals_teacher_forcing(hf_model):
    _, path = hf_model
    config, params = load_hf_checkpoint(path)
    prompt = jnp.asarray(np.random.RandomState(8).randint(0, V, (2, 5)))
    mask = jnp.array([[1] * 5, [0, 0, 1, 1, 1]])
    assert_greedy_equals_teacher_forcing(params, config, prompt, mask, 24)  # to position 28 > 16


# ---------------------------------------------------------------------------------------------
# refusals before any compute


def write_config(directory, **fields):
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(fields))
    return directory


LLAMA = dict(model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4)


@pytest.mark.parametrize("loader", [load_hf_checkpoint, load_pretrained])
@pytest.mark.parametrize("kind", ["yarn", "dynamic", "longrope"])
def test_unimplemented_rope_scaling_is_refused_before_the_weights(tmp_path, loader, kind):
    # no weight file in the directory: the refusal comes from config.json alone
    path = write_config(tmp_path / "llama", **LLAMA,
                        rope_scaling={"rope_type": kind, "factor": 4.0, "original_max_position_embeddings": 16})
    with pytest.raises(ValueError, match=rf"{path / 'config.json'}: field rope_scaling.rope_type = '{kind}'"):
        loader(path)


def test_deepseek_rope_other_than_yarn_is_refused(tmp_path):
    cfg = hf_config(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}).to_dict()
    path = write_config(tmp_path / "ds", **{k: v for k, v in cfg.items() if not k.startswith("_")})
    with pytest.raises(ValueError, match=r"config.json: field rope_parameters.rope_type = 'dynamic'"):
        load_hf_checkpoint(path)


def test_deepseek_mla_rope_cache_shapes_from_the_import(hf_model):
    """The imported model's cache holds (latent [B,S,8], k_rope [B,S,4]) per layer."""
    _, path = hf_model
    config, _ = load_hf_checkpoint(path)
    cache = init_cache(config, 2, 12)
    assert [k.shape for k in cache.keys] == [(2, 12, 8)] * 3 and [v.shape for v in cache.values] == [(2, 12, 4)] * 3
    assert isinstance(config.mla, MLAConfig)
