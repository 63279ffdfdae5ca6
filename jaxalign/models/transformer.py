"""Decoder-only transformer as Flax Linen modules, used only through the pure `apply`.

Shapes: B batch, T new tokens, S cache slots, D d_model, N query heads, K key/value heads, H head
size, F MLP width, V vocab, L layers. Every parameter carries logical axis names ("vocab",
"embed", "heads", "kv_heads", "head_dim", "mlp", "pos") so a rules table can map them onto a
device mesh (see `param_logical_axes`).

Two families share one module tree (parameter names are the same where the roles are):
* GPT-2 (Radford et al. 2019; nanoGPT's model.py): token + learned position embeddings,
  pre-LayerNorm blocks `x + attn(ln_1(x))`, `x + mlp(ln_2(x))`, a final LayerNorm, GELU (tanh
  approximation, HF "gelu_new"), biases on every projection, head tied to the token embedding.
* Llama (Touvron et al. 2023, arXiv 2302.13971; Qwen2, Mistral): rotary position embedding on q
  and k, pre-RMSNorm, SwiGLU MLP `down(silu(gate(x)) * up(x))`, no biases (Qwen2: q/k/v
  biases), grouped-query attention, tied or separate head. Qwen3 adds an RMSNorm over each
  head of q and k before RoPE (`qk_norm`).
* Gemma 2/3 (arXiv 2408.00118, 2503.19786; HF `Gemma2Model`/`Gemma3TextModel`): embeddings
  times √D, RMSNorm as x̂·(1 + w), `x + post_norm(attn(norm(x)))` and the same around a GeGLU
  MLP, scores scaled by `query_pre_attn_scalar`^-1/2, optional tanh soft-capping of attention
  and output logits (Gemma 2), per-layer local/global attention with its own RoPE θ (Gemma 3)
  and q/k norms (Gemma 3).

* DeepSeek-V2/V3 (arXiv 2405.04434, 2412.19437; HF `DeepseekV3ForCausalLM`): the Llama block
  with Multi-head Latent Attention (`config.mla`, jaxalign/models/mla.py) in every layer and a
  latent KV cache, and MoE FFNs after `first_k_dense_replace` dense layers (`config.moe_layers`).

Positions: `positions[b, t]` is the absolute position of token t of row b; -1 marks padding
(left-padded prompts), which is never attended to. The KV cache (`KVCache`) goes into and comes
out of every call, as in Gemma's decoding: call with the prompt to prefill, then one token at a
time.
"""

from __future__ import annotations

import contextvars
import math

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.models.attention_ops import (
    CachePlan,
    apply_rope,
    logical_dense,
    make_cache_plan,
    position_mask,
    write_slots,
)
from jaxalign.models.config import TransformerConfig
from jaxalign.models.mla import MLAttention, init_mla_layer_cache
from jaxalign.models.moe import MoE, RouterStats

Params = dict


@flax.struct.dataclass
class KVCache:
    """Pre-allocated keys and values of every layer, plus the position held in each slot.

    Attributes:
      keys, values: per layer [B, S, K, H] in the compute dtype, in one of two layouts: a tuple
        of L arrays (the unrolled model's, `scan_layers=False`) or one stacked array
        [L, B, S, K, H] (`init_cache` of a `scan_layers=True` config; `stack_cache` /
        `unstack_cache` convert). `keys[i]` is layer i's [B, S, K, H] in both. A model accepts
        either layout and returns the one its config asks for.
        With `config.mla` (DeepSeek's latent cache, arXiv 2405.04434 §2.1.2) `keys[i]` is layer
        i's normalised latent c^KV [B, S, kv_lora_rank] and `values[i]` its rotated rope key k^R
        [B, S, qk_rope_head_dim] (stacked: [L, B, S, d_c], [L, B, S, d_R]); nothing per head.
      positions: int32 [B, S], absolute position of the token in each slot; -1 = empty/padding.
      length: int32 scalar, tokens written so far; the next token goes to slot `length % S`
        (a rolling buffer when S is a sliding window).
    """

    keys: tuple[jax.Array, ...] | jax.Array
    values: tuple[jax.Array, ...] | jax.Array
    positions: jax.Array
    length: jax.Array

    @property
    def size(self) -> int:
        """Number of slots S."""
        return self.positions.shape[1]

    @property
    def stacked(self) -> bool:
        """Whether keys/values are stacked arrays [L, B, S, K, H] (else tuples of [B, S, K, H])."""
        return not isinstance(self.keys, (tuple, list))


def stack_cache(cache: KVCache) -> KVCache:
    """The cache with keys/values as stacked arrays [L, B, S, K, H] (a copy; as is if stacked)."""
    if cache.stacked:
        return cache
    return cache.replace(keys=jnp.stack(cache.keys), values=jnp.stack(cache.values))


def unstack_cache(cache: KVCache) -> KVCache:
    """The cache with keys/values as tuples of L arrays [B, S, K, H] (as is if unstacked)."""
    if not cache.stacked:
        return cache
    return cache.replace(keys=tuple(cache.keys), values=tuple(cache.values))


def init_cache(config: TransformerConfig, batch: int, max_len: int) -> KVCache:
    """An empty cache for `batch` rows and up to `max_len` tokens per row.

    When every layer slides (`config.cache_window` = W < max_len, e.g. Mistral) the cache holds
    only W slots and is used as a rolling buffer; memory is then O(W) whatever the generation
    length. A model mixing local and global layers (Gemma 2/3) keeps `max_len` slots in every
    layer and its local layers mask by position.

    Keys and values are tuples of L arrays [B, S, K, H] in `config.dtype`, or, with
    `config.scan_layers`, stacked arrays [L, B, S, K, H] (what the scanned layers read and write
    without a copy at the scan boundary). With `config.mla` they are the latents [B, S, d_c] and
    rope keys [B, S, d_R] of each layer (stacked [L, B, S, d_c], [L, B, S, d_R]):
    (d_c + d_R)·L numbers per token (`mla.mla_cache_bytes_per_token`).
    """
    window = config.cache_window
    size = max_len if window is None else min(max_len, window)
    if config.mla is None:
        shape = (batch, size, config.kv_heads, config.head_dim)
        layer = (jnp.zeros(shape, config.dtype), jnp.zeros(shape, config.dtype))
    else:
        layer = init_mla_layer_cache(config.mla, batch, size, config.dtype)  # [B,S,d_c], [B,S,d_R]
    if config.scan_layers:
        keys = jnp.zeros((config.n_layers, *layer[0].shape), config.dtype)
        values = jnp.zeros((config.n_layers, *layer[1].shape), config.dtype)
    else:
        keys = tuple(jnp.zeros_like(layer[0]) for _ in range(config.n_layers))
        values = tuple(jnp.zeros_like(layer[1]) for _ in range(config.n_layers))
    return KVCache(
        keys=keys,
        values=values,
        positions=jnp.full((batch, size), -1, jnp.int32),
        length=jnp.zeros((), jnp.int32),
    )


# Mesh axes that split the batch dimension of activations while a sharded program is traced;
# set (with the abstract mesh) by `jaxalign.sharding.activation_sharding`. Default (): no
# constraint, so single-device programs are unchanged. (Flax's logical-axis rules context cannot
# serve here: under it, apply re-evaluates the DenseGeneral kernel init and constrains the
# flattened kernel with the unflattened names.)
ACTIVATION_BATCH_AXES: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "jaxalign_activation_batch_axes", default=()
)


def _constrain_batch(x: jax.Array) -> jax.Array:
    """Residual stream [B, T, D] with B split over `ACTIVATION_BATCH_AXES` (no-op when unset)."""
    axes = ACTIVATION_BATCH_AXES.get()
    if not axes:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes))


def _init(std: float, axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


def _zeros(axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _ones(axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def _dense(
    config: TransformerConfig,
    features: int | tuple[int, ...],
    kernel_axes: tuple[str, ...],
    *,
    std: float,
    name: str,
    axis: int | tuple[int, ...] = -1,
    use_bias: bool = True,
) -> nn.DenseGeneral:
    """A projection whose kernel and bias carry logical axis names (bias: output axes), in the
    config's dtypes (`attention_ops.logical_dense`)."""
    return logical_dense(features, kernel_axes, std=std, name=name, dtype=config.dtype,
                         param_dtype=config.param_dtype, axis=axis, use_bias=use_bias)


def _residual_std(config: TransformerConfig) -> float:
    """GPT-2 paper: projections into the residual stream start at N(0, 0.02/sqrt(2·L))."""
    return 0.02 / math.sqrt(2 * config.n_layers)


class OffsetRMSNorm(nn.Module):
    """Gemma's RMSNorm: x·rsqrt(mean(x²) + ε)·(1 + scale), computed in float32 and cast back
    (HF `Gemma3RMSNorm`: "(x * w).to(float16)", not Llama's "x.to(float16) * w"); `scale` [F]
    is zero at init, so the norm starts as the identity's direction."""

    epsilon: float
    dtype: object
    param_dtype: object
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", _zeros((self.axis_name,)), (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.epsilon)
        return (normed * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)


def _norm(config: TransformerConfig, name: str, axis_name: str = "embed") -> nn.Module:
    """The family's norm over the last axis; its parameters carry the logical axis `axis_name`
    ("embed" for the residual stream, "head_dim" for Qwen3/Gemma 3's per-head q/k norms)."""
    if config.norm == "layernorm":
        return nn.LayerNorm(
            epsilon=config.norm_eps,
            dtype=config.dtype,
            param_dtype=config.param_dtype,
            scale_init=_ones((axis_name,)),
            bias_init=_zeros((axis_name,)),
            name=name,
        )
    if config.norm_unit_offset:
        return OffsetRMSNorm(config.norm_eps, config.dtype, config.param_dtype, axis_name, name=name)
    return nn.RMSNorm(
        epsilon=config.norm_eps,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        scale_init=_ones((axis_name,)),
        name=name,
    )


def rope_frequencies(config: TransformerConfig, layer: int = 0) -> np.ndarray:
    """Inverse frequencies θ^(-2i/H), i < H/2, float32 [H/2] (RoFormer, arXiv 2104.09864 Eq. 15)
    of `layer` (θ and scaling from `config.layer_rope(layer)`: Gemma 3's local layers use their
    own θ), with Llama 3's or linear long-context scaling applied when set."""
    h = config.head_dim
    theta, scaling = config.layer_rope(layer)
    inv_freq = 1.0 / (theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
    if scaling is not None and scaling.rope_type == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    if scaling is not None:  # Meta's llama3 `apply_scaling`
        wavelen = 2 * np.pi / inv_freq
        low_wavelen = scaling.original_max_position / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position / scaling.high_freq_factor
        smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        inv_freq = np.where(
            wavelen < high_wavelen,
            inv_freq,
            np.where(wavelen > low_wavelen, inv_freq / scaling.factor, blended),
        )
    return inv_freq.astype(np.float32)


def _softcapped_attention(q, k, v, mask, *, scale: float, softcap: float) -> jax.Array:
    """softmax(c·tanh(scale·q·kᵀ / c) masked)·v for q [B,T,N,H], k/v [B,S,K,H], mask bool
    [B,1,T,S] (Gemma 2's attention-logit capping, HF `eager_attention_forward` with `softcap`).

    `jax.nn.dot_product_attention` has no soft-capping, so this path spells the einsums; scores
    and softmax are float32. Rows with no visible key (padding queries) get a uniform softmax
    over finite values, never NaN.
    """
    b, t, n, h = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, n // kv, h)  # [B,T,K,G,H]
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    scores = softcap * jnp.tanh(scores / softcap)  # [B,K,G,T,S]
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


def _attend(cfg: TransformerConfig, q, k, v, *, mask=None, window: int | None = None) -> jax.Array:
    """Attention of q [B,T,N,H] over k/v [B,S,K,H]: with `mask` (bool [B,1,T,S]) when given,
    else causal with an optional sliding `window` (T == S). Scale `cfg.attn_scale`; kernel
    `cfg.attention_impl` ("xla": XLA's einsums and softmax, [B,N,T,S] scores materialised;
    "cudnn": the fused flash-attention kernel on NVIDIA GPUs)."""
    if cfg.attn_softcap is not None:
        if mask is None:
            pos = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), q.shape[:2])
            mask = position_mask(pos, pos, window)
        return _softcapped_attention(q, k, v, mask, scale=cfg.attn_scale, softcap=cfg.attn_softcap)
    impl = cfg.attention_impl  # one call site per case, one place to switch kernels
    if mask is not None:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=cfg.attn_scale, implementation=impl)
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=True, local_window_size=local, scale=cfg.attn_scale, implementation=impl
    )


class Attention(nn.Module):
    """Causal self-attention with separate q/k/v projections (grouped-query when K < N).

    `layer` selects the layer's window and RoPE (`config.layer_window`, `config.layer_rope`).
    """

    config: TransformerConfig
    layer: int = 0

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        *,
        padded: bool,
        layer_cache: tuple[jax.Array, jax.Array] | None,
        plan: CachePlan | None,
        deterministic: bool,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        cfg = self.config
        n, k, h = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        qkv_bias = cfg.qkv_biases
        std = 0.02
        window = cfg.layer_window(self.layer)
        q = _dense(cfg, (n, h), ("embed", "heads", "head_dim"), std=std, name="wq", use_bias=qkv_bias)(x)
        kk = _dense(cfg, (k, h), ("embed", "kv_heads", "head_dim"), std=std, name="wk", use_bias=qkv_bias)(x)
        v = _dense(cfg, (k, h), ("embed", "kv_heads", "head_dim"), std=std, name="wv", use_bias=qkv_bias)(x)
        # q [B,T,N,H]; kk, v [B,T,K,H]
        if cfg.qk_norm:  # Qwen3 / Gemma 3: per-head norms before RoPE
            q = _norm(cfg, "q_norm", "head_dim")(q)
            kk = _norm(cfg, "k_norm", "head_dim")(kk)
        if not cfg.learned_positions:  # RoPE
            inv_freq = rope_frequencies(cfg, self.layer)
            rope_pos = jnp.maximum(positions, 0)
            q = apply_rope(q, rope_pos, inv_freq, interleaved=cfg.rope_interleaved)
            kk = apply_rope(kk, rope_pos, inv_freq, interleaved=cfg.rope_interleaved)

        new_cache = None
        if layer_cache is None:
            if padded:  # left padding: mask padded keys by position instead of plain causality
                out = _attend(cfg, q, kk, v, mask=position_mask(positions, positions, window))
            else:
                out = _attend(cfg, q, kk, v, window=window)
        else:
            out, new_cache = _cached_attention(cfg, q, kk, v, positions, layer_cache, plan, window)
        out = _dense(
            cfg, cfg.d_model, ("heads", "head_dim", "embed"), std=_residual_std(cfg), name="wo",
            axis=(-2, -1), use_bias=cfg.output_biases,
        )(out)  # [B,T,D]
        return nn.Dropout(cfg.dropout)(out, deterministic=deterministic), new_cache


def _cached_attention(cfg, q, k_new, v_new, positions, layer_cache, plan, window):
    """Attention of T new queries over the cached keys plus the T new ones; updates the cache.

    `plan` (`CachePlan`) is computed once per call by `Transformer` and shared by every layer;
    `window` is this layer's (None: global).

    When the new tokens cannot overwrite a key that one of them still needs (a cache as long as
    the sequence, or one token into a rolling buffer) they are written first and attention reads
    the buffer alone. A multi-token chunk into a rolling buffer instead attends over
    [old cache; new keys] and is written afterwards (only its last S tokens fit).
    """
    k_buf, v_buf = layer_cache  # [B,S,K,H]
    slots, skip, write_first = plan.slots, plan.skip, plan.write_first
    old_positions, new_positions = plan.old_positions, plan.new_positions
    if write_first:
        k_buf = write_slots(k_buf, k_new[:, skip:], slots)
        v_buf = write_slots(v_buf, v_new[:, skip:], slots)
        mask = position_mask(positions, new_positions, window)  # [B,1,T,S]
        out = _attend(cfg, q, k_buf.astype(q.dtype), v_buf.astype(q.dtype), mask=mask)
    else:
        keys = jnp.concatenate([k_buf.astype(q.dtype), k_new], axis=1)  # [B,S+T,K,H]
        values = jnp.concatenate([v_buf.astype(q.dtype), v_new], axis=1)
        key_pos = jnp.concatenate([old_positions, positions], axis=1)  # [B,S+T]
        mask = position_mask(positions, key_pos, window)
        out = _attend(cfg, q, keys, values, mask=mask)
        k_buf = write_slots(k_buf, k_new[:, skip:], slots)
        v_buf = write_slots(v_buf, v_new[:, skip:], slots)
    return out, (k_buf, v_buf)


class MLP(nn.Module):
    """GPT-2: down(gelu_tanh(up(x))). Llama: down(silu(gate(x)) * up(x)) (SwiGLU); Gemma:
    down(gelu_tanh(gate(x)) * up(x)) (GeGLU, HF "gelu_pytorch_tanh"; both Shazeer 2020, arXiv
    2002.05202)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        cfg = self.config
        bias = cfg.output_biases
        up = _dense(cfg, cfg.ff_dim, ("embed", "mlp"), std=0.02, name="up", use_bias=bias)(x)  # [B,T,F]
        if cfg.mlp == "gelu":
            h = jax.nn.gelu(up, approximate=True)  # GPT-2's "gelu_new"
        else:
            gate = _dense(cfg, cfg.ff_dim, ("embed", "mlp"), std=0.02, name="gate", use_bias=False)(x)
            act = jax.nn.silu(gate) if cfg.mlp == "swiglu" else jax.nn.gelu(gate, approximate=True)
            h = act * up  # [B,T,F]
        out = _dense(
            cfg, cfg.d_model, ("mlp", "embed"), std=_residual_std(cfg), name="down", use_bias=bias
        )(h)  # [B,T,D]
        return nn.Dropout(cfg.dropout)(out, deterministic=deterministic)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + ffn(ln_2(x)); Gemma's sandwich
    norms make these x + ln_post_attn(attn(ln_1(x))) and x + ln_post_mlp(mlp(ln_2(x))).

    The attention ("attn") is `Attention`, or with `config.mla` the `MLAttention` of
    jaxalign/models/mla.py (its layer cache then (latent, k_rope), not (k, v)). The FFN is the
    dense `MLP` ("mlp"), or in the layers `config.is_moe_layer` marks the routed
    `MoE` ("moe": a name LoRA's "mlp" preset does not match, so its 3-D expert kernels are never
    LoRA targets), followed by the same dropout. MoE routing is per token, so cached decoding
    needs nothing cached for it.

    Returns (x [B, T, D], (the layer's updated (k, v) cache or None, `RouterStats` of an MoE
    layer or None)); the stats' `expert_load` counts real tokens only (positions >= 0).
    """

    config: TransformerConfig
    layer: int = 0

    @nn.compact
    def __call__(self, x, positions, layer_cache, plan, padded: bool, deterministic: bool, routing=None):
        # positional, so that nn.remat can mark `padded` and `deterministic` static (argnums 5, 6);
        # `routing`: int [B, T, k] expert ids to replay in an MoE layer (None: the router's choice)
        cfg = self.config
        if cfg.mla is None:
            attn = Attention(cfg, self.layer, name="attn")
        else:  # DeepSeek-V2/V3: same call signature, latent (c^KV, k^R) layer cache
            attn = MLAttention(cfg.mla, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                               dropout=cfg.dropout, init_std=0.02, out_init_std=_residual_std(cfg), name="attn")
        attn_out, new_cache = attn(
            _norm(cfg, "ln_1")(x),
            positions,
            padded=padded,
            layer_cache=layer_cache,
            plan=plan,
            deterministic=deterministic,
        )
        if cfg.sandwich_norms:
            attn_out = _norm(cfg, "ln_post_attn")(attn_out)
        x = x + attn_out
        h = _norm(cfg, "ln_2")(x)  # [B,T,D]
        stats = None
        if cfg.is_moe_layer(self.layer):
            moe = MoE(cfg.moe, dtype=cfg.dtype, param_dtype=cfg.param_dtype, init_std=0.02,
                      out_init_std=_residual_std(cfg), name="moe")
            mlp_out, stats = moe(h, routing=routing, mask=positions >= 0)  # [B,T,D]
            mlp_out = nn.Dropout(cfg.dropout)(mlp_out, deterministic=deterministic)
        else:
            mlp_out = MLP(cfg, name="mlp")(h, deterministic=deterministic)
        if cfg.sandwich_norms:
            mlp_out = _norm(cfg, "ln_post_mlp")(mlp_out)
        x = x + mlp_out
        # the residual stream's batch split, after every block (inside the scan too)
        return _constrain_batch(x), (new_cache, stats)  # [B,T,D]


REMAT_POLICIES = {
    "full": None,  # jax.checkpoint's default: nothing saveable, only the block's inputs are kept
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _remat_block(remat: str, *, prevent_cse: bool = True):
    """`Block`, or `Block` under `nn.remat` with the config's policy (see `TransformerConfig.remat`).

    Under a gradient a rematerialised block keeps only what its policy saves and recomputes the
    rest in the backward pass: "full" keeps the block's input (B·T·D) and recomputes everything,
    "dots" also keeps the outputs of the projections (matmuls without batch dimensions: q, k, v,
    wo, the MLP's), recomputing norms, RoPE, the attention softmax and the activations. Without a
    gradient (decoding) it is the plain block.

    `prevent_cse=False` inside `nn.scan` (`jax.checkpoint`'s advice: the scan already stops XLA
    from merging the recomputation into the forward pass, and the barrier would only cost time).
    """
    if remat == "none":
        return Block
    return nn.remat(Block, policy=REMAT_POLICIES[remat], static_argnums=(5, 6), prevent_cse=prevent_cse)


# Name of the stacked block subtree of a `scan_layers=True` model: params["layers"], every leaf
# with a leading axis of size L (logical axis "layers"); the unrolled model has "layers_0", ...
SCAN_NAME = "layers"


def _scanned_blocks(config: TransformerConfig) -> nn.Module:
    """All L blocks as one `nn.scan` over a (rematerialised) `Block`: the carry is the residual
    stream [B, T, D], the scanned inputs and outputs the layer's cache (k, v) [L, B, S, K, H]
    (None without a cache), the scanned outputs also the router stats (leaves [L, ...]; None
    without MoE); positions, the cache plan, `padded` and `deterministic` are broadcast.
    Parameters are created stacked (axis 0, logical name "layers"), with per-layer init and
    dropout keys."""
    scan = nn.scan(
        _remat_block(config.remat, prevent_cse=False),
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, 0, nn.broadcast, nn.broadcast, nn.broadcast, 0),
        length=config.n_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scan(config, 0, name=SCAN_NAME)


def _check_scan_layout(params: Params, config: TransformerConfig, *, stacked: bool) -> None:
    names = [f"layers_{i}" for i in range(config.n_layers)]
    if stacked:
        if SCAN_NAME in params:
            raise ValueError(f"stack_layers: params already hold a stacked {SCAN_NAME!r} subtree")
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"stack_layers: params lack {missing[:4]} (config.n_layers={config.n_layers})")
        extra = [k for k in params if k.startswith("layers_") and k not in names]
        if extra:
            raise ValueError(f"stack_layers: params hold {extra[:4]} beyond config.n_layers={config.n_layers}")
    else:
        if SCAN_NAME not in params:
            raise ValueError(f"unstack_layers: params have no stacked {SCAN_NAME!r} subtree")
        for path, x in jax.tree_util.tree_leaves_with_path(params[SCAN_NAME]):
            if x.ndim == 0 or x.shape[0] != config.n_layers:
                raise ValueError(
                    f"unstack_layers: {SCAN_NAME}{jax.tree_util.keystr(path)} has shape {x.shape}, "
                    f"not a leading axis of config.n_layers={config.n_layers}"
                )


def stack_layers(params: Params, config: TransformerConfig) -> Params:
    """The unrolled layout (`params["layers_0"]`, ..., `params["layers_{L-1}"]`) turned into the
    scanned one (`params["layers"]`, every leaf stacked to [L, ...]), for `scan_layers=True`.

    Works on any tree keyed like the params at its top level: a parameter tree, a LoRA adapter
    tree whose adapters cover every layer (`init_lora` on the unrolled params), optimizer
    moments. Other keys (embeddings, final norm, head) are kept as they are (the same arrays).
    Stacking copies; `unstack_layers(stack_layers(p, c), c)` equals p exactly.

    Raises:
      ValueError: a layer i < config.n_layers is missing, a "layers_i" with i >= n_layers is
        present, or the tree is already stacked; the layers' trees differ in structure or shape
        (from `jax.tree.map`).
    """
    _check_scan_layout(params, config, stacked=True)
    names = [f"layers_{i}" for i in range(config.n_layers)]
    out = {k: v for k, v in params.items() if k not in names}
    out[SCAN_NAME] = jax.tree.map(lambda *xs: jnp.stack(xs), *(params[n] for n in names))
    return out


def unstack_layers(params: Params, config: TransformerConfig) -> Params:
    """The inverse of `stack_layers`: `params["layers"]` ([L, ...] leaves) split into
    `params["layers_0"]`, ..., `params["layers_{L-1}"]` (the unrolled layout: `scan_layers=False`,
    `export_hf`, per-layer LoRA patterns such as "layers_3/attn/wq").

    Raises:
      ValueError: no "layers" subtree, or a leaf of it without a leading axis of n_layers.
    """
    _check_scan_layout(params, config, stacked=False)
    out = {k: v for k, v in params.items() if k != SCAN_NAME}
    for i in range(config.n_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params[SCAN_NAME])
    return out


class Transformer(nn.Module):
    """Decoder-only language model. Call through `Transformer(config).apply({"params": p}, ...)`.

    Args (of `__call__`):
      tokens: int32 [B, T] token ids.
      positions: optional int32 [B, T] absolute positions, -1 on padding (default 0..T-1 for
        every row, no padding). With padding and no cache, attention masks the padded keys.
      cache: optional `KVCache` (see `init_cache`): attention then also reads the cached keys, and
        the new tokens' keys and values are written to it.
      deterministic: False enables dropout; `apply` then needs `rngs={"dropout": key}`.
      return_hidden: return the final normalised hidden states [B, T, D] instead of logits.
      return_router_stats: also return the router statistics of the MoE layers.
      routing: Routing Replay (R3, arXiv 2510.11370): a tuple of int [B, T, k] expert ids, one per
        MoE layer in `config.moe_layer_indices` order (e.g. a rollout's `RouterStats.expert_ids`),
        used instead of the routers' own choice; the gate weights are recomputed from the live
        router logits at those ids (`jaxalign.models.moe.gate_weights`), so the routers still get
        gradients. None: every MoE layer routes itself.

    Returns:
      (logits [B, T, V] in `config.dtype` (or hidden states [B, T, D]), the updated cache or None;
      its keys/values stacked [L, B, S, K, H] with `config.scan_layers`, else tuples, whatever
      layout came in; with `config.mla` latents [.., B, S, d_c] and rope keys [.., B, S, d_R]
      instead, see `KVCache`), and with `return_router_stats` a third element: a tuple of
      `jaxalign.models.moe.RouterStats`, one per MoE layer in `config.moe_layer_indices` order
      (router_logits float32 [B, T, E], expert_ids int32 [B, T, k], weights float32 [B, T, k],
      expert_load int32 [E] over real tokens); () for a dense model.

    With `config.scan_layers` the blocks run as one `nn.scan` (parameters under "layers", each
    leaf [L, ...]; see `stack_layers`), `config.remat` applying inside the scanned body.

    Raises:
      ValueError: T > config.max_seq_len, T > the cache size for a cache without a window, or
        `routing` not one array per MoE layer.
      AssertionError: (chex) a routing array not [B, T, k].
    """

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        self.embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=_init(0.02, ("vocab", "embed")),
        )
        if cfg.learned_positions:
            self.pos_embed = nn.Embed(
                cfg.max_seq_len,
                cfg.d_model,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                embedding_init=_init(0.01, ("pos", "embed")),
            )
        if cfg.scan_layers:
            self.layers = _scanned_blocks(cfg)
        else:
            block = _remat_block(cfg.remat)
            self.layers = [block(cfg, i, name=f"layers_{i}") for i in range(cfg.n_layers)]
        self.ln_f = _norm(cfg, "ln_f")
        if not cfg.tie_embeddings:
            self.lm_head = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                kernel_init=_init(0.02, ("embed", "vocab")),
            )
        self.drop = nn.Dropout(cfg.dropout)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        *,
        cache: KVCache | None = None,
        deterministic: bool = True,
        return_hidden: bool = False,
        return_router_stats: bool = False,
        routing: tuple[jax.Array, ...] | None = None,
    ) -> tuple[jax.Array, KVCache | None] | tuple[jax.Array, KVCache | None, tuple[RouterStats, ...]]:
        cfg = self.config
        chex.assert_rank(tokens, 2)
        b, t = tokens.shape
        if t > cfg.max_seq_len:
            raise ValueError(f"tokens: sequence length {t} exceeds config.max_seq_len={cfg.max_seq_len}")
        padded = positions is not None
        if positions is None:
            start = 0 if cache is None else cache.length
            positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        chex.assert_equal_shape((tokens, positions))
        positions = positions.astype(jnp.int32)

        plan = None
        if cache is not None:
            plan = make_cache_plan(cache.positions, cache.length, positions, window=cfg.cache_window)

        x = self.embed(tokens)  # [B,T,D]
        if cfg.embed_scale is not None:  # Gemma: √D, rounded to the compute dtype as HF does
            x = x * jnp.asarray(cfg.embed_scale, x.dtype)
        if cfg.learned_positions:
            x = x + self.pos_embed(jnp.maximum(positions, 0))
        x = self.drop(x, deterministic=deterministic)
        x = _constrain_batch(x)
        x, new_keys, new_values, stats = self._run_layers(x, positions, cache, plan, padded, deterministic,
                                                          self._check_routing(routing, b, t))
        x = self.ln_f(x)  # [B,T,D]
        new_cache = None
        if cache is not None:
            new_cache = KVCache(
                keys=new_keys, values=new_values, positions=plan.new_positions,
                length=cache.length + t,
            )
        out = x if return_hidden else self.logits_from_hidden(x)
        return (out, new_cache, stats) if return_router_stats else (out, new_cache)

    def _check_routing(self, routing, b: int, t: int):
        """`routing` as a tuple with one int32 [B, T, k] per layer (None on dense layers), or None.

        Raises:
          ValueError: routing for a model without MoE layers, or not one array per MoE layer.
        """
        if routing is None:
            return None
        cfg = self.config
        moe_layers = cfg.moe_layer_indices
        if not moe_layers or len(routing) != len(moe_layers):
            raise ValueError(f"routing: {len(routing)} arrays for the {len(moe_layers)} MoE layers {moe_layers}")
        for r in routing:
            chex.assert_shape(r, (b, t, cfg.moe.experts_per_token))
        per_layer = dict(zip(moe_layers, routing))
        return tuple(per_layer.get(i) for i in range(cfg.n_layers))

    def _run_layers(self, x, positions, cache, plan, padded, deterministic, routing):
        """The L blocks: (x [B,T,D], new keys, new values (None without a cache), tuple of the
        MoE layers' `RouterStats` in layer order)."""
        cfg = self.config
        if cfg.scan_layers:
            stacked = None if cache is None else stack_cache(cache)
            # [L,B,S,K,H] each (MLA: [L,B,S,d_c], [L,B,S,d_R])
            layer_caches = None if cache is None else (stacked.keys, stacked.values)
            routes = None if routing is None else jnp.stack(routing)  # [L,B,T,k] (every layer MoE)
            x, (updated, stacked_stats) = self.layers(x, positions, layer_caches, plan, padded, deterministic,
                                                      routes)
            new_keys, new_values = (None, None) if cache is None else updated
            stats = () if stacked_stats is None else tuple(
                jax.tree.map(lambda a, i=i: a[i], stacked_stats) for i in range(cfg.n_layers)
            )
            return x, new_keys, new_values, stats
        new_keys, new_values, stats = [], [], []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
            route = None if routing is None else routing[i]
            x, (updated, layer_stats) = layer(x, positions, layer_cache, plan, padded, deterministic, route)
            if updated is not None:
                new_keys.append(updated[0])
                new_values.append(updated[1])
            if layer_stats is not None:
                stats.append(layer_stats)
        return x, tuple(new_keys), tuple(new_values), tuple(stats)

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """Output head: hidden [..., D] -> logits [..., V] (tied: hidden @ embeddingᵀ), soft-capped
        as c·tanh(z / c) when `config.final_softcap` = c is set (Gemma 2)."""
        if self.config.tie_embeddings:
            logits = self.embed.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        cap = self.config.final_softcap
        return logits if cap is None else cap * jnp.tanh(logits / cap)


def init_params(config: TransformerConfig, rng: jax.Array) -> Params:
    """Randomly initialised parameters (GPT-2 init: N(0, 0.02), residual outputs / sqrt(2L)).

    Args:
      config: the model.
      rng: a `jax.random.key`.

    Returns:
      The parameter pytree (plain arrays in `config.param_dtype`, logical-axis boxes removed).
    """
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = jax.jit(Transformer(config).init)(rng, tokens)
    return nn.meta.unbox(variables["params"])


def param_logical_axes(config: TransformerConfig) -> Params:
    """Pytree (same structure as the params) of `PartitionSpec`s of logical axis names.

    Computed by abstract evaluation; no parameter memory is allocated.
    """
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    abstract = jax.eval_shape(Transformer(config).init, jax.random.key(0), tokens)
    return nn.get_partition_spec(abstract)["params"]


def forward(
    params: Params,
    config: TransformerConfig,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    *,
    dropout_rng: jax.Array | None = None,
    return_hidden: bool = False,
    return_router_stats: bool = False,
    routing: tuple[jax.Array, ...] | None = None,
) -> jax.Array | tuple[jax.Array, tuple[RouterStats, ...]]:
    """Pure forward pass without a cache: logits [B, T, V] (in `config.dtype`) for tokens [B, T].

    Args:
      params: parameter pytree from `init_params` or a checkpoint importer.
      config: the model's `TransformerConfig`.
      tokens: int32 [B, T].
      positions: optional int32 [B, T] absolute positions, -1 on (left) padding.
      dropout_rng: a key enables dropout (training); None runs deterministically.
      return_hidden: return final hidden states [B, T, D] instead of logits.
      return_router_stats: return (logits, router stats): a tuple of `RouterStats`, one per MoE
        layer in order (() for a dense model; see `Transformer`), e.g. for
        `jaxalign.losses.moe.load_balancing_loss(tuple(s.router_logits for s in stats), ...)`.
      routing: expert ids to replay, one int [B, T, k] per MoE layer (see `Transformer`).

    Raises:
      ValueError: T exceeds `config.max_seq_len`; routing not one array per MoE layer.
    """
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    out = Transformer(config).apply(
        {"params": params},
        tokens,
        positions,
        deterministic=dropout_rng is None,
        return_hidden=return_hidden,
        return_router_stats=return_router_stats,
        routing=routing,
        rngs=rngs,
    )
    return (out[0], out[2]) if return_router_stats else out[0]


def forward_with_cache(
    params: Params,
    config: TransformerConfig,
    tokens: jax.Array,
    cache: KVCache,
    positions: jax.Array | None = None,
    *,
    dropout_rng: jax.Array | None = None,
    return_hidden: bool = False,
) -> tuple[jax.Array, KVCache]:
    """One prefill or decode call: logits [B, T, V] for the new tokens and the updated cache.

    Also a teacher-forced pass over a pre-filled cache (a prefix, `jaxalign.prefix`): the cache
    is an ordinary, differentiable input, so gradients reach the keys and values it holds.

    Args:
      tokens: int32 [B, T] new tokens.
      cache: the `KVCache` holding every earlier token (from `init_cache` for the first call).
      positions: int32 [B, T] absolute positions, -1 on padding (default: continue from
        `cache.length`, the right choice without padding).
      dropout_rng: a key enables dropout (training); None runs deterministically.
      return_hidden: return final hidden states [B, T, D] instead of logits.
    """
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    return Transformer(config).apply(
        {"params": params}, tokens, positions, cache=cache, deterministic=dropout_rng is None,
        return_hidden=return_hidden, rngs=rngs,
    )


def logits_from_hidden(params: Params, config: TransformerConfig, hidden: jax.Array) -> jax.Array:
    """Applies the output head to hidden states [..., D] -> logits [..., V]."""
    return Transformer(config).apply(
        {"params": params}, hidden, method=Transformer.logits_from_hidden
    )
