"""Multi-head Latent Attention (jaxalign.models.mla) against Hugging Face `DeepseekV3Attention`
(transformers 5.25.0, torch CPU, float32), and its latent-cache decoding against its own forward.

Random weights are drawn so that attention scores have a spread of a few units: with the tiny
N(0, 0.02) init every softmax would be almost uniform and a wrong softmax scale would go unseen.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import DeepseekV3Config
from transformers.cache_utils import DynamicCache
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, yarn_apply_mscale
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

from jaxalign.metrics import compilations
from jaxalign.models.attention_ops import make_cache_plan
from jaxalign.models.mla import (
    MLAConfig,
    MLAttention,
    YarnScaling,
    absorbed_attention,
    attention_flops,
    gqa_cache_bytes_per_token,
    init_mla_layer_cache,
    mla_cache_bytes_per_token,
    mla_rope_frequencies,
    naive_attention,
    rope_attention_factor,
)
from tests._tolerance import ulps

D, H, C, DN, DR, DV, DQ = 16, 2, 8, 4, 4, 4, 12
T = 21
# factor 4 over an original context of 8: positions up to 30 reach well past it; mscale_all_dim
# 0.5 != mscale 1 makes both YaRN effects differ from 1 (cos/sin ×1.0648, softmax scale ×1.1434).
YARN = YarnScaling(factor=4.0, original_max_position=8, mscale=1.0, mscale_all_dim=0.5)


def make_config(q_lora=DQ, interleaved=True, yarn=None, bias=False, **kw) -> MLAConfig:
    return MLAConfig(n_heads=H, kv_lora_rank=C, qk_nope_head_dim=DN, qk_rope_head_dim=DR, v_head_dim=DV,
                     q_lora_rank=q_lora, rope_interleaved=interleaved, yarn=yarn, attention_bias=bias, **kw)


def hf_config(cfg: MLAConfig) -> DeepseekV3Config:
    """The HF config of the same layer; rope settings go in v5's `rope_parameters` dict."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.yarn is not None:
        y = cfg.yarn
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": y.factor,
                "original_max_position_embeddings": y.original_max_position, "beta_fast": y.beta_fast,
                "beta_slow": y.beta_slow, "mscale": y.mscale, "mscale_all_dim": y.mscale_all_dim,
                "truncate": y.truncate}
        if y.attention_factor is not None:
            rope["attention_factor"] = y.attention_factor
    return DeepseekV3Config(
        hidden_size=D, num_hidden_layers=1, num_attention_heads=H, num_key_value_heads=H,
        kv_lora_rank=C, q_lora_rank=cfg.q_lora_rank, qk_rope_head_dim=DR, qk_nope_head_dim=DN,
        v_head_dim=DV, rope_interleave=cfg.rope_interleaved,
        # YaRN's extended context = factor × original (HF warns otherwise); unused without YaRN
        max_position_embeddings=64 if cfg.yarn is None else int(cfg.yarn.factor * cfg.yarn.original_max_position),
        rope_parameters=rope, attention_bias=cfg.attention_bias, attn_implementation="eager",
    )


def random_state_dict(cfg: MLAConfig, seed=0) -> dict[str, np.ndarray]:
    """HF-layout float32 weights; std 1/sqrt(fan_in) (×1.5 on the up-projections) and norm
    weights 1 + 0.2·N(0,1), so that scores spread over a few units."""
    rng = np.random.default_rng(seed)
    w = lambda out, fan_in, gain=1.0: (gain * rng.standard_normal((out, fan_in)) / np.sqrt(fan_in)).astype(np.float32)
    vec = lambda n, mean=0.0: (mean + 0.2 * rng.standard_normal(n)).astype(np.float32)
    dqk = DN + DR
    sd = {}
    if cfg.q_lora_rank is None:
        sd["q_proj.weight"] = w(H * dqk, D, 1.5)
    else:
        sd["q_a_proj.weight"] = w(DQ, D)
        sd["q_a_layernorm.weight"] = vec(DQ, 1.0)
        sd["q_b_proj.weight"] = w(H * dqk, DQ, 1.5)
    sd["kv_a_proj_with_mqa.weight"] = w(C + DR, D, 1.5)
    sd["kv_a_layernorm.weight"] = vec(C, 1.0)
    sd["kv_b_proj.weight"] = w(H * (DN + DV), C, 1.5)
    sd["o_proj.weight"] = w(D, H * DV)
    if cfg.attention_bias:
        sd["kv_a_proj_with_mqa.bias"] = vec(C + DR)
        sd["o_proj.bias"] = vec(D)
        if cfg.q_lora_rank is not None:
            sd["q_a_proj.bias"] = vec(DQ)
    return sd


def to_params(sd: dict[str, np.ndarray], cfg: MLAConfig) -> dict:
    """HF `self_attn.*` weights -> MLAttention params: kernel = weight.T, reshaped per head."""
    dqk = DN + DR
    p = {}
    if cfg.q_lora_rank is None:
        p["q"] = {"kernel": sd["q_proj.weight"].T.reshape(D, H, dqk)}
    else:
        p["q_a"] = {"kernel": sd["q_a_proj.weight"].T}
        p["q_a_norm"] = {"scale": sd["q_a_layernorm.weight"]}
        p["q_b"] = {"kernel": sd["q_b_proj.weight"].T.reshape(DQ, H, dqk)}
    p["kv_a"] = {"kernel": sd["kv_a_proj_with_mqa.weight"].T}
    p["kv_a_norm"] = {"scale": sd["kv_a_layernorm.weight"]}
    p["kv_b"] = {"kernel": sd["kv_b_proj.weight"].T.reshape(C, H, DN + DV)}
    p["o"] = {"kernel": sd["o_proj.weight"].T.reshape(H, DV, D)}
    if cfg.attention_bias:
        p["kv_a"]["bias"] = sd["kv_a_proj_with_mqa.bias"]
        p["o"]["bias"] = sd["o_proj.bias"]
        if cfg.q_lora_rank is not None:
            p["q_a"]["bias"] = sd["q_a_proj.bias"]
    return jax.tree.map(jnp.asarray, p)


def init_tree(cfg: MLAConfig):
    x = jnp.zeros((1, 1, D))
    pos = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(
        functools.partial(MLAttention(cfg, d_model=D).init, padded=False, layer_cache=None, plan=None,
                          deterministic=True),
        jax.random.key(0), x, pos,
    )


def make_plan(cache_positions, length, positions, write_first=True):
    """The `CachePlan` exactly as `Transformer.__call__` builds it (cache without a window), with
    `write_first` forced when False (the rolling-buffer chunk path)."""
    plan = make_cache_plan(cache_positions, length, positions, window=None)
    return plan if write_first else plan.replace(write_first=False)


def apply_raw(params, x, positions, *, cfg, padded=True, cache=None, slot_positions=None, length=0,
              write_first=True):
    """(out [B,T,D], updated layer cache or None, slot positions after the call or None); the
    plan is built inside the traced function, as `Transformer` does."""
    plan = None if cache is None else make_plan(slot_positions, length, positions, write_first)
    out, new_cache = MLAttention(cfg, d_model=D).apply(
        {"params": params}, x, positions, padded=padded, layer_cache=cache, plan=plan, deterministic=True
    )
    return out, new_cache, (None if plan is None else plan.new_positions)


apply = jax.jit(apply_raw, static_argnames=("cfg", "padded", "write_first"))


def hf_attention(cfg: MLAConfig, sd, x: np.ndarray, positions: np.ndarray, cache=None) -> np.ndarray:
    """HF `DeepseekV3Attention` alone (eager), with its own rotary embedding class and an additive
    mask that hides padding (position -1) and the future."""
    hcfg = hf_config(cfg)
    att = DeepseekV3Attention(hcfg, layer_idx=0).eval()
    att.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    xt = torch.from_numpy(x)
    cos, sin = DeepseekV3RotaryEmbedding(hcfg)(xt, torch.from_numpy(np.maximum(positions, 0)))
    visible = (positions[:, None, :] >= 0) & (positions[:, None, :] <= positions[:, :, None])  # [B,T,S]
    mask = np.where(visible, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None]
    with torch.no_grad():
        out, weights = att(xt, (cos, sin), torch.from_numpy(mask), cache=cache)
    return out.numpy(), weights.numpy()


def inputs(seed=1):
    """x [2,T,D]; row 0 at positions 10..30 (past YaRN's original 8), row 1 left-padded by 4."""
    x = np.random.default_rng(seed).standard_normal((2, T, D)).astype(np.float32)
    pos = np.stack([np.arange(10, 10 + T), np.r_[np.full(4, -1), np.arange(T - 4)]]).astype(np.int32)
    return x, pos


# torch vs XLA float32: chains of <= 21-term sums (projections over D=16, d_q=12, d_c=8, scores
# over 8 channels, a softmax and a weighted sum over <= 21 keys, o over 8): ~100 roundings on the
# path to each output, each <= 1/2 ulp of max|out|; 96 ulps of max|out| (1.1e-5 relative); measured <= 3.1.
HF_ULPS = 96


CASES = [  # (q_lora_rank, rope_interleaved, yarn, attention_bias)
    (DQ, True, None, False),
    (None, True, None, False),
    (DQ, False, None, True),
    (None, False, YARN, False),
    (DQ, True, YARN, True),
]


@pytest.mark.parametrize("q_lora,interleaved,yarn,bias", CASES)
def test_parity_with_hf_deepseek_v3(q_lora, interleaved, yarn, bias):
    cfg = make_config(q_lora, interleaved, yarn, bias)
    sd = random_state_dict(cfg)
    params = to_params(sd, cfg)
    abstract = nn.meta.unbox(init_tree(cfg)["params"])
    assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, params)
    x, pos = inputs()
    ref, weights = hf_attention(cfg, sd, x, pos)
    # the softmax is far from uniform, so a wrong scale would show: at the last query the visible
    # keys' weights span over a factor 10 in every row and head (measured >= 50)
    last = weights[:, :, -1]  # [B,H,S]
    visible = (pos >= 0)[:, None, :]
    assert (last.max(-1) / np.where(visible, last, np.inf).min(-1)).min() > 10
    ours, cache, _ = apply(params, jnp.asarray(x), jnp.asarray(pos), cfg=cfg)
    assert cache is None
    real = pos >= 0
    np.testing.assert_allclose(np.asarray(ours)[real], ref[real], rtol=0, atol=ulps(HF_ULPS, ref[real]))


def test_yarn_softmax_scale_matters_beyond_position_zero():
    """τ's m² under YaRN: dropping it (same cos/sin factor, mscale_all_dim 0) must break parity at
    later positions while position 0 (one visible key: softmax of one score is 1) still agrees."""
    cfg = make_config(DQ, True, YARN)
    sd = random_state_dict(cfg)
    params = to_params(sd, cfg)
    x, pos = inputs()
    pos[0] = np.arange(T)  # row 0 starts at position 0
    ref, _ = hf_attention(cfg, sd, x, pos)
    tol = ulps(HF_ULPS, ref[pos >= 0])
    no_m2 = YarnScaling(factor=4.0, original_max_position=8, mscale=1.0, mscale_all_dim=0.0,
                        attention_factor=rope_attention_factor(cfg))
    assert make_config(DQ, True, no_m2).softmax_scale == pytest.approx((DN + DR) ** -0.5)
    wrong = np.asarray(apply(params, jnp.asarray(x), jnp.asarray(pos), cfg=make_config(DQ, True, no_m2))[0])
    np.testing.assert_allclose(wrong[0, 0], ref[0, 0], rtol=0, atol=tol)  # scale-invariant at position 0
    assert np.abs(wrong[0, 1:] - ref[0, 1:]).max() > 100 * tol


@pytest.mark.parametrize(
    "yarn",
    [
        YARN,
        YarnScaling(factor=4.0, original_max_position=8, mscale=0.707, mscale_all_dim=0.0, truncate=False),
        YarnScaling(factor=2.5, original_max_position=8, attention_factor=0.9),
    ],
)
def test_yarn_parameters_match_hf(yarn):
    cfg = make_config(DQ, True, yarn)
    hcfg = hf_config(cfg)
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](hcfg)
    # float64 then float32 here vs float32 pow / divide / blend in torch: a few roundings
    np.testing.assert_allclose(mla_rope_frequencies(cfg), inv_freq.numpy(), rtol=ulps(8), atol=0)
    assert rope_attention_factor(cfg) == pytest.approx(factor, rel=1e-12)
    assert cfg.softmax_scale == pytest.approx(yarn_apply_mscale(hcfg.rope_parameters, (DN + DR) ** -0.5), rel=1e-12)


@pytest.mark.parametrize("truncate", [True, False])
def test_yarn_deepseek_v3_dimensions(truncate):
    """V3's shipped rope_parameters (d_R 64, factor 40, original 4096, mscale = mscale_all_dim = 1):
    all 32 frequencies against HF (the ramp spans several channels here), cos/sin factor 1,
    softmax scale 192^-0.5·(0.1·ln 40 + 1)²."""
    y = YarnScaling(factor=40.0, original_max_position=4096, mscale=1.0, mscale_all_dim=1.0, truncate=truncate)
    cfg = MLAConfig(n_heads=128, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                    q_lora_rank=1536, yarn=y)
    hcfg = DeepseekV3Config(hidden_size=64, num_attention_heads=128, max_position_embeddings=163840, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "truncate": truncate})
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](hcfg)
    ours = mla_rope_frequencies(cfg)
    assert ours.shape == (32,)
    np.testing.assert_allclose(ours, inv_freq.numpy(), rtol=ulps(8), atol=0)
    plain = 1.0 / 10000 ** (np.arange(0, 64, 2) / 64)
    ratio = ours / plain  # 1 below the ramp, 1/40 above it, in between on the ramp
    assert ratio[0] == pytest.approx(1.0) and ratio[-1] == pytest.approx(1 / 40)
    assert ((ratio < 0.99) & (ratio > 1 / 40 * 1.01)).sum() >= 3  # blended channels
    other = mla_rope_frequencies(dataclasses.replace(cfg, yarn=dataclasses.replace(y, truncate=not truncate)))
    assert np.abs(other - ours).max() > 1e-3 * ours.max()  # `truncate` changes the ramp
    assert factor == 1.0 and rope_attention_factor(cfg) == 1.0
    assert cfg.softmax_scale == pytest.approx(192**-0.5 * (0.1 * np.log(40) + 1) ** 2, rel=1e-12)
    assert (0.1 * np.log(40) + 1) ** 2 == pytest.approx(1.874, abs=1e-3)


# Cached (absorbed or naive, latent cache) vs uncached naive, both XLA float32: the same sums in a
# different association (W^{UK} folded into q: 4+8-term sums instead of 8+4; scores over S=24 slots
# with exactly-zero masked terms vs 21 keys); 64 ulps of max|out|; measured <= 2.0.
CACHE_ULPS = 64


@pytest.mark.parametrize("mode,q_lora,yarn", [("absorbed", DQ, YARN), ("auto", None, None)])
def test_prefill_then_decode_equals_forward(mode, q_lora, yarn):
    cfg = make_config(q_lora, True, yarn, cache_attention=mode)
    params = to_params(random_state_dict(cfg), cfg)
    x, pos = inputs()
    full = np.asarray(apply(params, jnp.asarray(x), jnp.asarray(pos), cfg=cfg)[0])
    prompt, size = 9, 24
    # auto: the 9-token prefill takes the naive path, each decode step the absorbed one
    assert attention_flops(cfg, prompt, size, absorbed=True) > attention_flops(cfg, prompt, size, absorbed=False)
    assert attention_flops(cfg, 1, size, absorbed=True) < attention_flops(cfg, 1, size, absorbed=False)
    step = jax.jit(functools.partial(apply_raw, cfg=cfg))
    cache = init_mla_layer_cache(cfg, 2, size)
    slot_pos = jnp.full((2, size), -1, jnp.int32)
    with compilations(step) as compiled:
        out, cache, slot_pos = step(params, jnp.asarray(x[:, :prompt]), jnp.asarray(pos[:, :prompt]), cache=cache,
                                    slot_positions=slot_pos, length=jnp.asarray(0))
        outs = [np.asarray(out)]
        for t in range(prompt, T):
            out, cache, slot_pos = step(params, jnp.asarray(x[:, t:t + 1]), jnp.asarray(pos[:, t:t + 1]), cache=cache,
                                        slot_positions=slot_pos, length=jnp.asarray(t))
            outs.append(np.asarray(out))
    assert len(compiled) == 2  # the prefill, then one decode program for every step
    decoded = np.concatenate(outs, axis=1)
    real = pos >= 0
    np.testing.assert_allclose(decoded[real], full[real], rtol=0, atol=ulps(CACHE_ULPS, full[real]))
    assert cache[0].shape == (2, size, C) and cache[1].shape == (2, size, DR)
    np.testing.assert_array_equal(np.asarray(slot_pos)[:, :T], pos)
    assert float(jnp.abs(cache[0][:, T:]).max()) == 0.0  # slots past the sequence never written


def random_attention_inputs(seed=0, b=2, t=3, s=11, h=H):
    rng = np.random.default_rng(seed)
    n = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    mask = rng.random((b, 1, t, s)) < 0.6
    mask[..., 0] = True  # every query sees at least one key
    mask[..., -2] = False  # and no query sees key s-2
    return n(b, t, h, DN), n(b, t, h, DR), n(b, s, C), n(b, s, DR), n(C, h, DN + DV) * 0.5, jnp.asarray(mask)


def test_absorbed_equals_naive_on_the_same_cache():
    q_nope, q_rope, latent, k_rope, kv_b, mask = random_attention_inputs()
    scale = make_config(yarn=YARN).softmax_scale
    naive = np.asarray(naive_attention(q_nope, q_rope, latent, k_rope, kv_b, mask, scale=scale))
    absorbed = np.asarray(absorbed_attention(q_nope, q_rope, latent, k_rope, kv_b, mask, scale=scale))
    assert naive.shape == (2, 3, H, DV)
    # the same float32 sums re-associated (4 x 8 channels either way) then an 11-key weighted
    # sum: 32 ulps of max|out|; measured <= 1.6 (and <= 1.1 against float64)
    np.testing.assert_allclose(absorbed, naive, rtol=0, atol=ulps(32, naive))
    # a key no query sees is selected away: other (finite) values there change nothing, bit for bit
    for attend in (naive_attention, absorbed_attention):
        junk = latent.at[:, -2].set(1e4), k_rope.at[:, -2].set(-1e4)
        np.testing.assert_array_equal(
            np.asarray(attend(q_nope, q_rope, *junk, kv_b, mask, scale=scale)),
            np.asarray(attend(q_nope, q_rope, latent, k_rope, kv_b, mask, scale=scale)),
        )
    # independent NumPy reference (float64) of the expanded form
    w = np.asarray(kv_b, np.float64)
    k = np.einsum("bsc,chn->bshn", np.asarray(latent, np.float64), w[..., :DN])
    v = np.einsum("bsc,chv->bshv", np.asarray(latent, np.float64), w[..., DN:])
    sc = scale * (np.einsum("bthn,bshn->bhts", np.asarray(q_nope, np.float64), k)
                  + np.einsum("bthr,bsr->bhts", np.asarray(q_rope, np.float64), np.asarray(k_rope, np.float64)))
    sc = np.where(np.asarray(mask), sc, -np.inf)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref = np.einsum("bhts,bshv->bthv", p, v)
    np.testing.assert_allclose(absorbed, ref, rtol=0, atol=ulps(32, ref))
    np.testing.assert_allclose(naive, ref, rtol=0, atol=ulps(32, ref))


BF16_HALF_ULP = 2.0**-8  # one bfloat16 rounding: <= 2^-8 relative (8 significant bits)


def test_absorbed_and_naive_in_bfloat16():
    """bf16 activations (kv_b kept in float32 storage, used in bf16): both forms stay within a few
    bf16 roundings of the float32 result. About 6 roundings on the path (inputs, q̂ or expanded
    K/V, probabilities, ô, output), each <= 2^-8 of max|out|: 8·2^-8·max|out|; measured <= 2.1."""
    for seed in range(3):
        q_nope, q_rope, latent, k_rope, kv_b, mask = random_attention_inputs(seed)
        scale = make_config(yarn=YARN).softmax_scale
        ref = np.asarray(naive_attention(q_nope, q_rope, latent, k_rope, kv_b, mask, scale=scale))
        low = [a.astype(jnp.bfloat16) for a in (q_nope, q_rope, latent, k_rope)]
        for attend in (naive_attention, absorbed_attention):
            out = attend(*low, kv_b, mask, scale=scale)
            assert out.dtype == jnp.bfloat16
            np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=0,
                                       atol=8 * BF16_HALF_ULP * np.abs(ref).max())


def test_bfloat16_layer_with_bfloat16_latent_cache():
    """MLAttention(dtype=bf16) prefilling and decoding over a bf16 latent cache tracks the float32
    forward: ~12 bf16 roundings from x to out (projections, two norms, RoPE, q̂, probabilities,
    ô, o), each <= 2^-8 of max|out|: 16·2^-8·max|out|; measured <= 2.1."""
    cfg = make_config(DQ, True, YARN, cache_attention="absorbed")
    params = to_params(random_state_dict(cfg), cfg)
    x, pos = inputs()
    full = np.asarray(apply(params, jnp.asarray(x), jnp.asarray(pos), cfg=cfg)[0])

    @jax.jit
    def step(x, positions, cache, slot_positions, length):
        plan = make_plan(slot_positions, length, positions)
        out, cache = MLAttention(cfg, d_model=D, dtype=jnp.bfloat16).apply(
            {"params": params}, x, positions, padded=True, layer_cache=cache, plan=plan, deterministic=True)
        return out, cache, plan.new_positions

    cache, slot_pos, outs = init_mla_layer_cache(cfg, 2, 24, jnp.bfloat16), jnp.full((2, 24), -1, jnp.int32), []
    for lo, hi in [(0, 9)] + [(t, t + 1) for t in range(9, T)]:
        out, cache, slot_pos = step(jnp.asarray(x[:, lo:hi], jnp.bfloat16), jnp.asarray(pos[:, lo:hi]), cache,
                                    slot_pos, jnp.asarray(lo))
        outs.append(np.asarray(out, np.float32))
    assert out.dtype == jnp.bfloat16 and cache[0].dtype == cache[1].dtype == jnp.bfloat16
    real = pos >= 0
    decoded = np.concatenate(outs, axis=1)[real]
    np.testing.assert_allclose(decoded, full[real], rtol=0, atol=16 * BF16_HALF_ULP * np.abs(full[real]).max())

def test_chunk_attending_old_cache_plus_new_equals_write_first():
    """`plan` with write_first False (attend over [cache; new], write afterwards, the rolling-buffer
    chunk path) gives the write-first result when nothing is overwritten."""
    cfg = make_config(cache_attention="absorbed")
    params = to_params(random_state_dict(cfg), cfg)
    x, pos = inputs()
    size = 24
    cache = init_mla_layer_cache(cfg, 2, size)
    slot_pos = jnp.full((2, size), -1, jnp.int32)
    _, cache, slot_pos = apply(params, jnp.asarray(x[:, :12]), jnp.asarray(pos[:, :12]), cfg=cfg, cache=cache,
                               slot_positions=slot_pos)
    chunk = dict(cfg=cfg, cache=cache, slot_positions=slot_pos, length=12)
    first = apply(params, jnp.asarray(x[:, 12:17]), jnp.asarray(pos[:, 12:17]), write_first=True, **chunk)
    after = apply(params, jnp.asarray(x[:, 12:17]), jnp.asarray(pos[:, 12:17]), write_first=False, **chunk)
    # same sums, masked-out empty slots contribute exact zeros; keys in another order: 32 ulps
    # (measured 0: XLA happens to sum them alike)
    np.testing.assert_allclose(np.asarray(after[0]), np.asarray(first[0]), rtol=0, atol=ulps(32, first[0]))
    for a, b in zip(after[1], first[1]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("interleaved", [True, False])
def test_latent_cache_equals_hf_cache(interleaved):
    """HF 5.x caches exactly (c^KV after kv_a_layernorm, k^R after RoPE) per layer as
    DynamicCache keys [B,1,S,d_c] and values [B,1,S,d_R]; ours holds the same numbers (k^R in
    Meta's interleaved order when `rope_interleaved`: HF returns it as [evens; odds])."""
    cfg = make_config(DQ, interleaved, YARN)
    sd = random_state_dict(cfg)
    params = to_params(sd, cfg)
    x, pos = inputs()
    hf_cache = DynamicCache(config=hf_config(cfg))
    hf_attention(cfg, sd, x, pos, cache=hf_cache)  # the prompt, as HF's prefill writes it
    hf_latent = hf_cache.layers[0].keys[:, 0].numpy()  # [B,T,d_c]
    hf_rope = hf_cache.layers[0].values[:, 0].numpy()  # [B,T,d_R]
    size = 24
    _, (latent, k_rope), _ = apply(params, jnp.asarray(x), jnp.asarray(pos), cfg=cfg,
                                   cache=init_mla_layer_cache(cfg, 2, size),
                                   slot_positions=jnp.full((2, size), -1, jnp.int32))
    latent, k_rope = np.asarray(latent)[:, :T], np.asarray(k_rope)[:, :T]
    if interleaved:  # ours [a0', b0', a1', b1'] ; HF [a0', a1', b0', b1']
        k_rope = np.concatenate([k_rope[..., 0::2], k_rope[..., 1::2]], axis=-1)
    # a 16-term projection then an 8-term RMS (latent) / a 4-channel rotation: 32 ulps; measured <= 1.5
    np.testing.assert_allclose(latent, hf_latent, rtol=0, atol=ulps(32, hf_latent))
    np.testing.assert_allclose(k_rope, hf_rope, rtol=0, atol=ulps(32, hf_rope))


def test_cache_bytes_per_token():
    cfg = make_config()
    for dtype, itemsize in ((jnp.float32, 4), (jnp.bfloat16, 2)):
        assert mla_cache_bytes_per_token(cfg, dtype) == (C + DR) * itemsize
        assert mla_cache_bytes_per_token(cfg, dtype, n_layers=3) == 3 * (C + DR) * itemsize
        latent, k_rope = init_mla_layer_cache(cfg, 2, 5, dtype)
        assert (latent.nbytes + k_rope.nbytes) / (2 * 5) == mla_cache_bytes_per_token(cfg, dtype)
    assert gqa_cache_bytes_per_token(kv_heads=8, key_dim=128, dtype=jnp.bfloat16, n_layers=2) == 2 * 8 * 256 * 2
    # DeepSeek-V3: 576 cached numbers per token and layer vs 128 heads × (192 + 128) expanded: 71×
    v3 = MLAConfig(n_heads=128, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
    assert mla_cache_bytes_per_token(v3, jnp.bfloat16) == 1152
    mha = gqa_cache_bytes_per_token(kv_heads=128, key_dim=192, value_dim=128, dtype=jnp.bfloat16)
    assert mha == 81920 and round(mha / 1152, 1) == 71.1


def test_gradients_finite_padding_ignored_and_no_recompile():
    cfg = make_config(DQ, True, YARN)
    params = to_params(random_state_dict(cfg), cfg)
    x, pos = inputs()
    real = jnp.asarray(pos >= 0)

    @jax.jit
    def loss(p, x):
        out, _ = MLAttention(cfg, d_model=D).apply({"params": p}, x, jnp.asarray(pos), padded=True,
                                                   layer_cache=None, plan=None, deterministic=True)
        return jnp.sum(jnp.where(real[..., None], out, 0.0) ** 2)

    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
    x1, x2 = jnp.asarray(x), x.copy()
    x2[1, :4] = 50.0  # other values at the padded tokens
    x2 = jnp.asarray(x2)
    with compilations() as compiled:
        g_params, g_x = grad_fn(params, x1)
        same = float(loss(params, x2)) == float(loss(params, x1))
        grad_fn(params, x2)
    # two programs, both named after `loss` (jax.grad keeps the name): the gradient's and the
    # loss's; the calls with other values at the padded tokens compile nothing
    assert compiled == ["jit(loss)", "jit(loss)"], compiled
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves((g_params, g_x)))
    assert float(jnp.abs(g_params["kv_b"]["kernel"]).max()) > 0
    assert float(jnp.abs(g_x[1, :4]).max()) == 0.0  # padded tokens are never attended to
    assert same  # other values at the padded tokens leave the loss and the real outputs bit-identical


def test_unpadded_causal_path_equals_position_masked_path():
    cfg = make_config(None, False)
    params = to_params(random_state_dict(cfg), cfg)
    x, _ = inputs()
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T))
    causal = apply(params, jnp.asarray(x), pos, cfg=cfg, padded=False)[0]
    masked = apply(params, jnp.asarray(x), pos, cfg=cfg, padded=True)[0]
    # the same boolean mask, built as a constant or from positions: XLA may fuse the two programs
    # differently (a 21-key softmax re-associated): 16 ulps of max|out|; measured <= 1.2
    np.testing.assert_allclose(np.asarray(causal), np.asarray(masked), rtol=0, atol=ulps(16, masked))


def test_param_logical_axes():
    specs = jax.tree.map(tuple, nn.get_partition_spec(init_tree(make_config(bias=True))["params"]),
                         is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    assert specs["q_a"] == {"kernel": ("embed", "q_lora"), "bias": ("q_lora",)}
    assert specs["q_a_norm"] == {"scale": ("q_lora",)}
    assert specs["q_b"] == {"kernel": ("q_lora", "heads", "head_dim")}
    assert specs["kv_a"] == {"kernel": ("embed", "kv_lora"), "bias": ("kv_lora",)}
    assert specs["kv_a_norm"] == {"scale": ("kv_lora",)}
    assert specs["kv_b"] == {"kernel": ("kv_lora", "heads", "head_dim")}
    assert specs["o"] == {"kernel": ("heads", "head_dim", "embed"), "bias": ("embed",)}
    lite = jax.tree.map(tuple, nn.get_partition_spec(init_tree(make_config(q_lora=None))["params"]),
                        is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    assert set(lite) == {"q", "kv_a", "kv_a_norm", "kv_b", "o"}
    assert lite["q"] == {"kernel": ("embed", "heads", "head_dim")}


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(n_heads=0), "n_heads"),
        (dict(kv_lora_rank=-1), "kv_lora_rank"),
        (dict(qk_rope_head_dim=3), "qk_rope_head_dim"),
        (dict(q_lora_rank=0), "q_lora_rank"),
        (dict(v_head_dim=2.0), "v_head_dim"),
        (dict(rope_theta=1.0), "rope_theta"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(cache_attention="flash"), "cache_attention"),
        (dict(yarn={"factor": 4}), "yarn"),
    ],
)
def test_config_errors_name_the_field(kw, field):
    base = dict(n_heads=H, kv_lora_rank=C, qk_nope_head_dim=DN, qk_rope_head_dim=DR, v_head_dim=DV)
    with pytest.raises(ValueError, match=f"MLAConfig.{field}"):
        MLAConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(factor=0.0), "factor"),
        (dict(original_max_position=0), "original_max_position"),
        (dict(beta_fast=0.0), "beta_fast"),
        (dict(mscale_all_dim=-1.0), "mscale_all_dim"),
        (dict(attention_factor=0.0), "attention_factor"),
    ],
)
def test_yarn_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"YarnScaling.{field}"):
        YarnScaling(**{**dict(factor=4.0, original_max_position=8), **kw})


def test_config_is_hashable_and_cache_plan_checked():
    assert hash(make_config(yarn=YARN)) == hash(make_config(yarn=YARN))
    cfg = make_config()
    params = to_params(random_state_dict(cfg), cfg)
    x, pos = inputs()
    with pytest.raises(ValueError, match="layer_cache and plan"):
        MLAttention(cfg, d_model=D).apply({"params": params}, jnp.asarray(x), jnp.asarray(pos), padded=True,
                                          layer_cache=init_mla_layer_cache(cfg, 2, 24), plan=None, deterministic=True)

