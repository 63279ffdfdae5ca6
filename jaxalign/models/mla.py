"""Multi-head Latent Attention (MLA) of DeepSeek-V2/V3, as a Flax Linen module and pure helpers.

Source: DeepSeek-V2, arXiv 2405.04434 §2.1 (Eqs. 9-19); DeepSeek-V3, arXiv 2412.19437 §2.1.1;
checked against Hugging Face `transformers` 5.25.0 `DeepseekV3Attention`
(models/deepseek_v3/modeling_deepseek_v3.py) and the absorbed decode of DeepSeek's
`inference/model.py` (class `MLA`, `attn_impl="absorb"`).

Shapes: B batch, T new tokens, S cache slots (or keys), D d_model, H heads, d_n = qk_nope_head_dim,
d_R = qk_rope_head_dim, d_v = v_head_dim, d_c = kv_lora_rank, d_q = q_lora_rank.

    c^Q = RMSNorm(W^{DQ} x)                    [B,T,d_q]      (Eq. 12; `q_a`, `q_a_norm`)
    [q^C_i; q^R_i] = (W^{UQ} c^Q)_i            [B,T,H,d_n+d_R] (Eqs. 13-14; `q_b`; V2-Lite: `q`)
    [c^{KV}; k^R] = W^{DKV,KR} x               [B,T,d_c+d_R]  (Eqs. 9, 15; `kv_a`)
    c^{KV} <- RMSNorm(c^{KV}); k^R <- RoPE(k^R), one rope key shared by all heads
    [k^C_i; v_i] = (W^{UKV} c^{KV})_i          [B,S,H,d_n+d_v] (Eqs. 10-11; `kv_b`)
    o_i = softmax_s(τ (q^C_i·k^C_i + q^R_i·k^R)) v_i;   u = W^O [o_1; ...; o_H]   (Eqs. 16-19)

with τ = (d_n + d_R)^(-1/2)·m², m = 0.1·mscale_all_dim·ln(factor) + 1 under YaRN (1 otherwise).
The two RMSNorms after the down-projections are not in the paper's equations; they are in the
released models (HF `q_a_layernorm`, `kv_a_layernorm`, eps 1e-6).

Only c^{KV} (after its RMSNorm) and k^R (after RoPE) are cached: d_c + d_R numbers per token and
layer (576 for V3, against 2·128·128 = 32,768 for the same model with 128-head MHA). Training and
long prefills expand K and V per head ("naive"); decoding multiplies W^{UK} into the query and
W^{UV} into the output ("absorbed", §2.1.2 of the paper) so that attention runs over the latent.

RoPE layout: `rope_interleaved=True` rotates channel pairs (2i, 2i+1) and returns them in place
(Meta layout); Hugging Face's `apply_rotary_pos_emb_interleave` rotates the same pairs but returns
[evens; odds] (half-split). Dot products agree; a cached k^R here equals HF's up to the fixed
permutation `ours[..., 0::2] == hf[..., :d_R/2]`, `ours[..., 1::2] == hf[..., d_R/2:]`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.models.attention_ops import CachePlan, apply_rope, logical_dense, position_mask, write_slots

LayerCache = tuple[jax.Array, jax.Array]  # (latent [B,S,d_c], k_rope [B,S,d_R])


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """YaRN long-context RoPE scaling (Peng et al. 2023, arXiv 2309.00071), as DeepSeek uses it.

    Mirrors HF `_compute_yarn_parameters` (transformers 5.25.0, modeling_rope_utils.py) and the
    `rope_parameters` keys of a DeepSeek config.json ({"rope_type": "yarn", "factor", ...}).

    Attributes:
      factor: context extension s > 0 (DeepSeek-V3: 40); frequencies below the ramp are divided by it.
      original_max_position: pretraining context L (V3: 4096; HF `original_max_position_embeddings`).
      beta_fast, beta_slow: rotation counts bounding the linear ramp between extrapolated (kept)
        and interpolated (divided) frequencies (paper defaults 32 and 1).
      mscale, mscale_all_dim: DeepSeek's two YaRN magnitude exponents. The cos/sin of RoPE are
        multiplied by g(s, mscale)/g(s, mscale_all_dim) when both are non-zero, else by g(s, 1),
        with g(s, m) = 0.1·m·ln(s) + 1 (1 for s <= 1); the softmax scale by g(s, mscale_all_dim)²
        when mscale_all_dim is non-zero (HF `yarn_apply_mscale`). V3: 1.0 and 1.0; V2-Lite:
        0.707 and 0.707.
      attention_factor: overrides the cos/sin factor when set (HF key of that name).
      truncate: round the ramp bounds outwards to integers (HF `truncate`, default True).
    """

    factor: float
    original_max_position: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if not self.factor > 0:
            raise ValueError(f"YarnScaling.factor must be positive, got {self.factor}")
        if self.original_max_position < 1:
            raise ValueError(f"YarnScaling.original_max_position must be >= 1, got {self.original_max_position}")
        for name in ("beta_fast", "beta_slow"):
            if not getattr(self, name) > 0:
                raise ValueError(f"YarnScaling.{name} must be positive, got {getattr(self, name)}")
        for name in ("mscale", "mscale_all_dim"):
            if getattr(self, name) < 0:
                raise ValueError(f"YarnScaling.{name} must be >= 0, got {getattr(self, name)}")
        if self.attention_factor is not None and not self.attention_factor > 0:
            raise ValueError(f"YarnScaling.attention_factor must be positive, got {self.attention_factor}")


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Shape hyperparameters of one MLA layer (frozen and hashable: a static jit argument).

    Attributes:
      n_heads: attention heads H (HF `num_attention_heads`; V3: 128).
      kv_lora_rank: latent width d_c (V3: 512).
      qk_nope_head_dim: per-head width d_n of the position-free query/key part (V3: 128).
      qk_rope_head_dim: width d_R of the rotary query part and of the shared rope key (V3: 64; even).
      v_head_dim: per-head value width d_v (V3: 128).
      q_lora_rank: query latent width d_q (V3: 1536); None projects q directly (V2-Lite).
      rope_theta: RoPE base θ (V3: 10000).
      rope_interleaved: rotate channel pairs (2i, 2i+1) (HF `rope_interleave`, V3: True); False
        rotates (i, i + d_R/2).
      yarn: optional YaRN scaling (V3's config.json ships factor 40, original 4096).
      attention_bias: biases on `q_a`, `kv_a` and `o` (HF `attention_bias`; V3: False).
      norm_eps: epsilon of the two latent RMSNorms (HF `DeepseekV3RMSNorm` default 1e-6; HF does
        not pass `rms_norm_eps` to them).
      cache_attention: how attention over a cache is computed: "absorbed" always, "naive"
        (expand K, V per head) always, or "auto": whichever `attention_flops` counts as fewer for
        the call's static shapes (absorbed for decoding, naive for long chunked prefills).
    """

    n_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    rope_theta: float = 10000.0
    rope_interleaved: bool = True
    yarn: YarnScaling | None = None
    attention_bias: bool = False
    norm_eps: float = 1e-6
    cache_attention: Literal["auto", "absorbed", "naive"] = "auto"

    def __post_init__(self):
        for name in ("n_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"MLAConfig.{name} must be a positive int, got {value!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise ValueError(f"MLAConfig.q_lora_rank must be a positive int or None, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"MLAConfig.qk_rope_head_dim must be even for RoPE, got {self.qk_rope_head_dim}")
        if not self.rope_theta > 1:
            raise ValueError(f"MLAConfig.rope_theta must be > 1, got {self.rope_theta}")
        if not self.norm_eps > 0:
            raise ValueError(f"MLAConfig.norm_eps must be positive, got {self.norm_eps}")
        if self.yarn is not None and not isinstance(self.yarn, YarnScaling):
            raise ValueError(f"MLAConfig.yarn must be a YarnScaling or None, got {type(self.yarn).__name__}")
        if self.cache_attention not in ("auto", "absorbed", "naive"):
            raise ValueError(
                f"MLAConfig.cache_attention: unknown mode {self.cache_attention!r} (auto, absorbed, naive)"
            )

    @property
    def qk_head_dim(self) -> int:
        """d_n + d_R, the per-head query/key width that sets the softmax scale."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """τ = (d_n + d_R)^(-1/2)·m², m = g(factor, mscale_all_dim) under YaRN, else 1.

        HF `DeepseekV3Attention.scaling` = `yarn_apply_mscale(rope_parameters, qk_head_dim**-0.5)`;
        DeepSeek `inference/model.py` MLA.__init__ (`softmax_scale * mscale * mscale`).
        """
        scale = self.qk_head_dim**-0.5
        if self.yarn is not None and self.yarn.mscale_all_dim:
            m = yarn_get_mscale(self.yarn.factor, self.yarn.mscale_all_dim)
            scale *= m * m
        return scale


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN magnitude g(s, m) = 0.1·m·ln(s) + 1, and 1 for s <= 1 (arXiv 2309.00071 Eq. 21;
    HF `yarn_get_mscale`, transformers 5.25.0)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def rope_attention_factor(config: MLAConfig) -> float:
    """The factor HF multiplies RoPE's cos and sin by (`attention_scaling` of
    `DeepseekV3RotaryEmbedding`): 1 without YaRN; `yarn.attention_factor` when set; else
    g(s, mscale)/g(s, mscale_all_dim) when both are non-zero, else g(s, 1)
    (HF `_compute_yarn_parameters`, transformers 5.25.0)."""
    y = config.yarn
    if y is None:
        return 1.0
    if y.attention_factor is not None:
        return float(y.attention_factor)
    if y.mscale and y.mscale_all_dim:
        return yarn_get_mscale(y.factor, y.mscale) / yarn_get_mscale(y.factor, y.mscale_all_dim)
    return yarn_get_mscale(y.factor)


def mla_rope_frequencies(config: MLAConfig) -> np.ndarray:
    """Inverse frequencies float32 [d_R/2] of the rope part: θ^(-2i/d_R) (RoFormer, arXiv
    2104.09864 Eq. 15), YaRN-blended when `config.yarn` is set.

    YaRN (arXiv 2309.00071 §3.2, "NTK-by-parts"; HF `_compute_yarn_parameters`): with
    dim(r) = d_R·ln(L / (2π r)) / (2 ln θ) the channel that turns r times over the original
    context L, the ramp runs from dim(beta_fast) to dim(beta_slow) (rounded outwards when
    `truncate`, clipped to [0, d_R - 1]); channels below it keep θ^(-2i/d_R) (extrapolation),
    channels above it are divided by `factor` (interpolation), linearly blended in between.
    """
    d = config.qk_rope_head_dim
    base = config.rope_theta
    inv_freq = 1.0 / (base ** (np.arange(0, d, 2, dtype=np.float64) / d))  # [d/2]
    y = config.yarn
    if y is None:
        return inv_freq.astype(np.float32)

    def correction_dim(rotations: float) -> float:
        return d * math.log(y.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(y.beta_fast), correction_dim(y.beta_slow)
    if y.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # HF: prevents a division by zero
    ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)  # [d/2]
    keep = 1.0 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    return (inv_freq / y.factor * (1.0 - keep) + inv_freq * keep).astype(np.float32)


def attention_flops(config: MLAConfig, new_tokens: int, keys: int, *, absorbed: bool) -> int:
    """Multiply-add count (per batch row) of MLA's attention core over `keys` latent entries.

    Naive: expand K^C, V for every key (keys·H·d_c·(d_n+d_v)), then per (query, key, head) a
    (d_n+d_R)-wide score and a d_v-wide output. Absorbed: fold W^{UK} into each query and W^{UV}
    into each output (T·H·d_c·(d_n+d_v)), then per (query, key, head) a (d_c+d_R)-wide score and a
    d_c-wide output. Absorbed wins for decoding (T = 1: ~H·S·(2·d_c+d_R) against
    ~H·S·d_c·(d_n+d_v)); for S >> 1 naive wins once T exceeds about
    d_c·(d_n+d_v)/(2·d_c-d_n-d_v) (V3: 512·256/768 ~ 170 tokens).
    """
    c, h = config.kv_lora_rank, config.n_heads
    dn, dr, dv = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    if absorbed:
        return new_tokens * h * c * (dn + dv) + new_tokens * keys * h * (c + dr + c)
    return keys * h * c * (dn + dv) + new_tokens * keys * h * (dn + dr + dv)


def mla_cache_bytes_per_token(config: MLAConfig, dtype: Any, n_layers: int = 1) -> int:
    """Bytes the MLA cache holds per token: (d_c + d_R)·itemsize(dtype)·n_layers.

    DeepSeek-V2 §2.1.4 / Table 1: MLA caches (d_c + d_R)·L elements per token (V3 in bf16:
    576·2 = 1152 bytes per layer).
    """
    return (config.kv_lora_rank + config.qk_rope_head_dim) * jnp.dtype(dtype).itemsize * n_layers


def gqa_cache_bytes_per_token(
    kv_heads: int, key_dim: int, dtype: Any, n_layers: int = 1, value_dim: int | None = None
) -> int:
    """Bytes a grouped-query (or, kv_heads = heads, multi-head) KV cache holds per token:
    kv_heads·(key_dim + value_dim)·itemsize(dtype)·n_layers, value_dim defaulting to key_dim
    (DeepSeek-V2 Table 1: 2·n_g·d_h·L elements). V3's heads expanded would be 128·(192 + 128).
    """
    value_dim = key_dim if value_dim is None else value_dim
    return kv_heads * (key_dim + value_dim) * jnp.dtype(dtype).itemsize * n_layers


def init_mla_layer_cache(config: MLAConfig, batch: int, size: int, dtype: Any = jnp.float32) -> LayerCache:
    """An empty cache of one MLA layer: (latent zeros [B,S,d_c], k_rope zeros [B,S,d_R]) in `dtype`.

    Slot positions, the write pointer and the `plan` stay with the model's `KVCache`, shared by
    all layers, exactly as for `Attention`.
    """
    return (
        jnp.zeros((batch, size, config.kv_lora_rank), dtype),
        jnp.zeros((batch, size, config.qk_rope_head_dim), dtype),
    )


def _check_attention_inputs(q_nope, q_rope, latent, k_rope, kv_b, mask) -> None:
    chex.assert_rank([q_nope, q_rope, latent, k_rope, kv_b, mask], [4, 4, 3, 3, 3, 4])
    b, t, h, dn = q_nope.shape
    s, c = latent.shape[1:]
    chex.assert_shape(q_rope, (b, t, h, None))
    chex.assert_shape(k_rope, (b, s, q_rope.shape[-1]))
    chex.assert_shape(latent, (b, s, c))
    chex.assert_shape(kv_b, (c, h, None))
    chex.assert_shape(mask, (b, 1, t, s))
    if kv_b.shape[-1] <= dn:
        raise ValueError(f"kv_b: last axis {kv_b.shape[-1]} leaves no value channels after d_n={dn}")


def naive_attention(
    q_nope: jax.Array,
    q_rope: jax.Array,
    latent: jax.Array,
    k_rope: jax.Array,
    kv_b: jax.Array,
    mask: jax.Array,
    *,
    scale: float,
) -> jax.Array:
    """MLA over latent keys with K and V expanded per head (DeepSeek-V2 Eqs. 10-11, 16-18).

    k_{s,i} = [W^{UK}_i c_s; k^R_s], v_{s,i} = W^{UV}_i c_s, then one
    `jax.nn.dot_product_attention` call with an explicit `scale` (its default, 1/sqrt of the key
    width, would be wrong under YaRN). That call needs equal key and value widths, so the narrower
    of q/k and v is zero-padded (zero channels add nothing to a dot product) and v's are sliced off.

    Args:
      q_nope: [B,T,H,d_n] position-free query part q^C.
      q_rope: [B,T,H,d_R] rotated query part q^R.
      latent: [B,S,d_c] normalised latents c^{KV}.
      k_rope: [B,S,d_R] rotated rope keys k^R (one per token, shared by the heads).
      kv_b: [d_c,H,d_n+d_v] the up-projection W^{UKV} (key channels first, as HF's `kv_b_proj`).
      mask: bool [B,1,T,S], True where query t may attend to key s (select, not multiply).
      scale: softmax scale τ.

    Returns:
      [B,T,H,d_v] in q_nope's dtype. A query row with no visible key gets a finite average.

    Raises:
      AssertionError (chex): inconsistent ranks or shapes.
      ValueError: kv_b's last axis leaves no value channels after d_n.
    """
    _check_attention_inputs(q_nope, q_rope, latent, k_rope, kv_b, mask)
    dn = q_nope.shape[-1]
    dtype = q_nope.dtype
    w = kv_b.astype(dtype)
    k_nope = jnp.einsum("bsc,chn->bshn", latent.astype(dtype), w[..., :dn])  # [B,S,H,d_n]
    v = jnp.einsum("bsc,chv->bshv", latent.astype(dtype), w[..., dn:])  # [B,S,H,d_v]
    k_r = jnp.broadcast_to(k_rope.astype(dtype)[:, :, None, :], (*k_nope.shape[:3], k_rope.shape[-1]))
    q = jnp.concatenate([q_nope, q_rope], axis=-1)  # [B,T,H,d_n+d_R]
    k = jnp.concatenate([k_nope, k_r], axis=-1)  # [B,S,H,d_n+d_R]
    dqk, dv = q.shape[-1], v.shape[-1]
    width = max(dqk, dv)

    def pad(x):
        return jnp.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[-1])])

    out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), mask=mask, scale=scale)  # [B,T,H,width]
    return out[..., :dv]


def absorbed_attention(
    q_nope: jax.Array,
    q_rope: jax.Array,
    latent: jax.Array,
    k_rope: jax.Array,
    kv_b: jax.Array,
    mask: jax.Array,
    *,
    scale: float,
) -> jax.Array:
    """MLA over the latent cache with W^{UK} and W^{UV} absorbed (DeepSeek-V2 §2.1.2; DeepSeek
    `inference/model.py` MLA.forward, `attn_impl="absorb"`).

        q̂_{t,i} = W^{UK⊤}_i q^C_{t,i}                       "bthn,chn->bthc"   [B,T,H,d_c]
        score_{t,s,i} = τ (q̂_{t,i}·c_s + q^R_{t,i}·k^R_s)    "bthc,bsc->bhts"   (float32)
        ô_{t,i} = Σ_s softmax_s(score)·c_s                   "bhts,bsc->bthc"
        o_{t,i} = W^{UV}_i ô_{t,i}                           "bthc,chv->bthv"

    i.e. multi-query attention with one (d_c + d_R)-wide key and one d_c-wide value per token:
    K and V are never expanded, and W^{UK}, W^{UV} are views of `kv_b` (no new parameters).
    Scores and softmax are float32.

    Args:
      Same as `naive_attention` (q_nope [B,T,H,d_n], q_rope [B,T,H,d_R], latent [B,S,d_c],
      k_rope [B,S,d_R], kv_b [d_c,H,d_n+d_v], mask bool [B,1,T,S], scale τ).

    Returns:
      [B,T,H,d_v] in q_nope's dtype; equal to `naive_attention` up to rounding.

    Raises:
      AssertionError (chex): inconsistent ranks or shapes.
      ValueError: kv_b's last axis leaves no value channels after d_n.
    """
    _check_attention_inputs(q_nope, q_rope, latent, k_rope, kv_b, mask)
    dn = q_nope.shape[-1]
    dtype = q_nope.dtype
    w = kv_b.astype(dtype)
    latent = latent.astype(dtype)
    q_hat = jnp.einsum("bthn,chn->bthc", q_nope, w[..., :dn])  # [B,T,H,d_c]
    scores = jnp.einsum("bthc,bsc->bhts", q_hat, latent, preferred_element_type=jnp.float32)
    scores += jnp.einsum("bthr,bsr->bhts", q_rope, k_rope.astype(dtype), preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores * scale, jnp.finfo(jnp.float32).min)  # [B,H,T,S]
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    o_hat = jnp.einsum("bhts,bsc->bthc", probs, latent)  # [B,T,H,d_c]
    return jnp.einsum("bthc,chv->bthv", o_hat, w[..., dn:])  # [B,T,H,d_v]


def _logical(init, axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(init, axes)


class _Kernel(nn.Module):
    """A bare matmul kernel `kernel` [shape] with logical axes, for a weight that several einsums
    read (kv_b: the naive expansion and the absorbed W^{UK}, W^{UV} views). Named "kernel" like a
    Dense's, so weight decay (`optim.weight_decay_mask`) and LoRA target paths treat it alike."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    std: float
    param_dtype: Any

    @nn.compact
    def __call__(self) -> jax.Array:
        init = _logical(nn.initializers.normal(stddev=self.std), self.axes)
        return self.param("kernel", init, self.shape, self.param_dtype)


class MLAttention(nn.Module):
    """Causal Multi-head Latent Attention layer (DeepSeek-V2 §2.1; HF `DeepseekV3Attention`,
    transformers 5.25.0), with the call signature of `transformer.Attention`: `Block` mounts it
    as "attn" in every layer when `TransformerConfig.mla` is set.

    Parameters (logical axes): `q_a` [D,d_q] ("embed","q_lora"), `q_a_norm` [d_q] ("q_lora"),
    `q_b` [d_q,H,d_n+d_R] ("q_lora","heads","head_dim") -- or, with q_lora_rank None, `q`
    [D,H,d_n+d_R] ("embed","heads","head_dim"); `kv_a` [D,d_c+d_R] ("embed","kv_lora"),
    `kv_a_norm` [d_c] ("kv_lora"), `kv_b` [d_c,H,d_n+d_v] ("kv_lora","heads","head_dim"; a kernel
    read by einsums, not a Dense), `o`
    [H,d_v,D] ("heads","head_dim","embed"). Biases (attention_bias) carry the output axes.
    HF mapping: kernel = weight.T reshaped (kv_b_proj row i·(d_n+d_v)+j is head i, channel j).

    Attributes:
      config: the layer's `MLAConfig`.
      d_model: residual width D.
      dtype, param_dtype: compute and storage dtypes.
      dropout: dropout rate on the output (as `Attention`: probabilities are not dropped).
      init_std, out_init_std: normal init std of the input projections and of `o`.

    Call args:
      x: [B,T,D] in `dtype`.
      positions: int32 [B,T] absolute positions, -1 on (left) padding (never attended to).
      padded: mask keys by position (needed with padding and no cache), else plain causal.
      layer_cache: None, or (latent [B,S,d_c], k_rope [B,S,d_R]) of this layer.
      plan: with a cache, the model's `attention_ops.CachePlan` of this call (slots, slot
        positions before and after, skip, write_first), shared with every layer.
      deterministic: False enables dropout (needs an rng "dropout").

    Returns:
      (out [B,T,D] in `dtype`, the updated (latent, k_rope) in the cache's dtype, or None
      without a cache).

    Raises:
      ValueError: exactly one of layer_cache and plan is given.
      AssertionError (chex): x not [B,T,D], positions not [B,T].
    """

    config: MLAConfig
    d_model: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dropout: float = 0.0
    init_std: float = 0.02
    out_init_std: float = 0.02

    def _dense(self, features, axes, *, name, std, axis=-1, use_bias=False) -> nn.DenseGeneral:
        return logical_dense(features, axes, std=std, name=name, dtype=self.dtype, param_dtype=self.param_dtype,
                             axis=axis, use_bias=use_bias)

    def _rms_norm(self, axis_name: str, name: str) -> nn.RMSNorm:
        return nn.RMSNorm(
            epsilon=self.config.norm_eps,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            scale_init=_logical(nn.initializers.ones_init(), (axis_name,)),
            name=name,
        )

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        *,
        padded: bool,
        layer_cache: LayerCache | None,
        plan: CachePlan | None,
        deterministic: bool,
    ) -> tuple[jax.Array, LayerCache | None]:
        cfg = self.config
        h, dn, dr = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        c, dv, dqk = cfg.kv_lora_rank, cfg.v_head_dim, cfg.qk_head_dim
        chex.assert_rank([x, positions], [3, 2])
        chex.assert_equal_shape_prefix([x, positions], 2)
        if (layer_cache is None) != (plan is None):
            raise ValueError("MLAttention: layer_cache and plan go together (both None or both set)")
        std = self.init_std
        bias = cfg.attention_bias

        if cfg.q_lora_rank is None:  # V2-Lite: q = W^Q x
            q = self._dense((h, dqk), ("embed", "heads", "head_dim"), name="q", std=std)(x)
        else:
            c_q = self._dense(cfg.q_lora_rank, ("embed", "q_lora"), name="q_a", std=std, use_bias=bias)(x)
            c_q = self._rms_norm("q_lora", "q_a_norm")(c_q)  # [B,T,d_q]
            q = self._dense((h, dqk), ("q_lora", "heads", "head_dim"), name="q_b", std=std)(c_q)
        # q [B,T,H,d_n+d_R]
        kv = self._dense(c + dr, ("embed", "kv_lora"), name="kv_a", std=std, use_bias=bias)(x)  # [B,T,d_c+d_R]
        latent = self._rms_norm("kv_lora", "kv_a_norm")(kv[..., :c])  # [B,T,d_c]
        kv_b = _Kernel((c, h, dn + dv), ("kv_lora", "heads", "head_dim"), std, self.param_dtype, name="kv_b")()
        # kv_b [d_c,H,d_n+d_v]

        # RoPE on the d_R slice only, with YaRN's cos/sin factor (HF DeepseekV3RotaryEmbedding).
        inv_freq = mla_rope_frequencies(cfg)
        rope_pos = jnp.maximum(positions, 0)
        factor = rope_attention_factor(cfg)
        rope = dict(interleaved=cfg.rope_interleaved, factor=factor)
        q_rope = apply_rope(q[..., dn:], rope_pos, inv_freq, **rope)  # [B,T,H,d_R]
        k_rope = apply_rope(kv[..., None, c:], rope_pos, inv_freq, **rope)[:, :, 0]  # [B,T,d_R]
        q_nope = q[..., :dn]  # [B,T,H,d_n]
        scale = cfg.softmax_scale

        new_cache = None
        if layer_cache is None:
            if padded:  # left padding: mask padded keys by position, not by index
                mask = position_mask(positions, positions)
            else:
                t = x.shape[1]
                mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (x.shape[0], 1, t, t))
            out = naive_attention(q_nope, q_rope, latent, k_rope, kv_b, mask, scale=scale)
        else:
            out, new_cache = _cached_mla(cfg, q_nope, q_rope, latent, k_rope, kv_b, positions, layer_cache, plan)
        # out [B,T,H,d_v]
        out = self._dense(
            self.d_model, ("heads", "head_dim", "embed"), name="o", std=self.out_init_std, axis=(-2, -1),
            use_bias=bias,
        )(out)  # [B,T,D]
        return nn.Dropout(self.dropout)(out, deterministic=deterministic), new_cache


def _cached_mla(cfg: MLAConfig, q_nope, q_rope, latent_new, k_rope_new, kv_b, positions, layer_cache,
                plan: CachePlan):
    """The latent-cache counterpart of the standard layer's cached attention: T new queries over
    the cached latents plus the T new ones, same `plan`; the cache is written in its own dtype.
    Attention is absorbed or naive per `cfg.cache_attention`."""
    c_buf, r_buf = layer_cache  # [B,S,d_c], [B,S,d_R]
    chex.assert_rank([c_buf, r_buf], 3)
    slots, skip, write_first = plan.slots, plan.skip, plan.write_first
    old_positions, new_positions = plan.old_positions, plan.new_positions
    if write_first:
        c_buf = write_slots(c_buf, latent_new[:, skip:], slots)
        r_buf = write_slots(r_buf, k_rope_new[:, skip:], slots)
        latent, k_rope, key_pos = c_buf, r_buf, new_positions
    else:  # rolling buffer, chunk: attend over [old cache; new], write afterwards
        latent = jnp.concatenate([c_buf.astype(latent_new.dtype), latent_new], axis=1)  # [B,S+T,d_c]
        k_rope = jnp.concatenate([r_buf.astype(k_rope_new.dtype), k_rope_new], axis=1)  # [B,S+T,d_R]
        key_pos = jnp.concatenate([old_positions, positions], axis=1)  # [B,S+T]
        c_buf = write_slots(c_buf, latent_new[:, skip:], slots)
        r_buf = write_slots(r_buf, k_rope_new[:, skip:], slots)
    mask = position_mask(positions, key_pos)  # [B,1,T,S(+T)]
    t, s = q_nope.shape[1], latent.shape[1]
    if cfg.cache_attention == "auto":
        absorbed = attention_flops(cfg, t, s, absorbed=True) <= attention_flops(cfg, t, s, absorbed=False)
    else:
        absorbed = cfg.cache_attention == "absorbed"
    attend = absorbed_attention if absorbed else naive_attention
    out = attend(q_nope, q_rope, latent.astype(q_nope.dtype), k_rope.astype(q_nope.dtype), kv_b, mask,
                 scale=cfg.softmax_scale)
    return out, (c_buf, r_buf)
