"""Transformer configuration and named presets.

One frozen dataclass describes every decoder-only model jaxalign builds. It is hashable, so it can
be closed over by `jax.jit`'d functions or passed as a static argument without retracing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax.numpy as jnp

from jaxalign.models.mla import MLAConfig, YarnScaling
from jaxalign.models.moe import MoEConfig

Family = Literal["gpt2", "llama", "gemma"]
LayerType = Literal["full", "sliding"]
Remat = Literal["none", "dots", "full"]
AttentionImpl = Literal["xla", "cudnn"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling.

    `rope_type` "llama3" (Meta's `apply_scaling`; HF rope_type "llama3"): wavelengths longer than
    original_max_position / low_freq_factor are divided by `factor`, shorter than
    original_max_position / high_freq_factor are kept, and the band between is interpolated
    smoothly. "linear" (position interpolation, Chen et al. 2023, arXiv 2306.15595; HF rope_type
    "linear", used by Gemma 3's global layers): every frequency is divided by `factor`.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    rope_type: Literal["llama3", "linear"] = "llama3"

    def __post_init__(self):
        if self.rope_type not in ("llama3", "linear"):
            raise ValueError(f"RopeScaling.rope_type: unknown type {self.rope_type!r} (llama3, linear)")
        if self.factor <= 0:
            raise ValueError(f"RopeScaling.factor must be positive, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of a decoder-only transformer.

    Attributes:
      family: architecture family.
        "gpt2": learned positions, pre-LayerNorm with bias, GELU (tanh) MLP, biases on every
        projection (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners").
        "llama": rotary positions, pre-RMSNorm, SwiGLU MLP, no biases except optional q/k/v
        biases (Touvron et al. 2023, arXiv 2302.13971; Qwen2 adds the q/k/v biases, Qwen3 the
        per-head q/k RMSNorm `qk_norm`).
        "gemma": rotary positions, RMSNorm applied as x̂·(1 + w) (scales stored as w, zero at
        init), GeGLU MLP down(gelu_tanh(gate(x))·up(x)), a second norm after attention and after
        the MLP ("sandwich" norms), embeddings scaled by √d_model, no biases (Gemma Team 2024,
        arXiv 2403.08295; Gemma 2, arXiv 2408.00118, adds `attn_softcap` / `final_softcap` and
        alternating local/global `layer_types`; Gemma 3, arXiv 2503.19786, adds `qk_norm` and
        `rope_local_theta`).
      vocab_size: number of token ids V.
      max_seq_len: longest sequence the model accepts (GPT-2: number of learned positions).
      d_model: residual width D.
      n_layers: number of transformer blocks L.
      n_heads: query heads N; head size H = `head_size`, or d_model // n_heads when unset.
      n_kv_heads: key/value heads K (N % K == 0); None means K = N (multi-head attention).
      d_ff: hidden width F of the MLP; None means 4 * d_model.
      norm_eps: LayerNorm / RMSNorm epsilon (GPT-2 and Llama: 1e-5, Qwen2: 1e-6).
      tie_embeddings: output head shares the token embedding matrix (GPT-2: True).
      qkv_bias: biases on the q/k/v projections ("llama" family only; GPT-2 always has them, Qwen2
        sets this True, Llama and Mistral False).
      rope_theta: RoPE base θ (Su et al. 2021, arXiv 2104.09864): frequencies θ^(-2i/H).
      rope_interleaved: rotate interleaved (even, odd) channel pairs, as Meta's original and
        llama2.c checkpoints do; False rotates the two halves of each head, as Hugging Face's
        Llama / Qwen2 / Mistral checkpoints do (their q/k weights are permuted accordingly).
      rope_scaling: optional Llama 3 frequency scaling.
      sliding_window: if set, position q attends only to keys k with q - W < k <= q (Mistral,
        arXiv 2310.06825) in the layers `layer_types` marks "sliding" (every layer when
        `layer_types` is None); when every layer slides, decoding needs a KV cache of only W slots.
      dropout: dropout rate on embeddings, attention output and MLP output (GPT-2 pretraining: 0.1;
        fine-tuning here defaults to 0.0). Attention probabilities are not dropped, so that the
        attention stays a single fused `jax.nn.dot_product_attention` call.
      dtype: compute dtype of activations and matmuls (e.g. jnp.bfloat16).
      param_dtype: storage dtype of parameters (float32 keeps optimizer updates exact).
      head_size: per-head width H when it is not d_model // n_heads (Qwen3-0.6B: D=1024, N=16,
        H=128; Gemma: H=256). None means d_model // n_heads.
      qk_norm: RMSNorm over each head's H channels of q and of k, after the projection and before
        RoPE (Qwen3; Gemma 3, there with the (1 + w) form); parameters `q_norm`, `k_norm` [H].
      query_pre_attn_scalar: attention scores are q·k / sqrt(query_pre_attn_scalar) (Gemma's
        config field of that name); None means sqrt(H).
      attn_softcap: attention logits become c·tanh(s / c) before masking and softmax (Gemma 2:
        c = 50); None disables.
      final_softcap: output logits become c·tanh(z / c) (Gemma 2: c = 30); None disables.
      layer_types: per layer "full" (global) or "sliding" (local, window `sliding_window`) attention,
        as Hugging Face's `layer_types` ("full_attention" / "sliding_attention"; Gemma 2 alternates
        sliding, full, ...; Gemma 3 has five sliding layers per full one). None means every layer
        slides when `sliding_window` is set, and none does otherwise.
      rope_local_theta: RoPE θ of the sliding layers when `layer_types` is set (Gemma 3's
        `rope_local_base_freq` = 10,000, without `rope_scaling`); None means `rope_theta` and
        `rope_scaling` in every layer.
      remat: rematerialisation of each block under a gradient (`jax.checkpoint` through
        `nn.remat`; values and gradients are unchanged, memory traded for recomputation):
        "none" saves every activation the backward pass reads; "dots" saves only the outputs of
        the projection matmuls (`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`) and
        recomputes norms, RoPE, the attention softmax and activations; "full" saves only each
        block's input and recomputes the whole block (one more forward pass of the layers).
        A training choice: set it on the config a step is built with
        (`dataclasses.replace(config, remat="full")`); the parameters are the same.
      attention_impl: `jax.nn.dot_product_attention`'s implementation for the model's attention
        (training, prefill and decoding): "xla" (every backend; on CPU the only one) or
        "cudnn" (NVIDIA's fused flash-attention kernel: GPU only, bfloat16/float16 compute, no
        soft-capping; JAX raises at compile time where it cannot run).
      scan_layers: run the L blocks as one `flax.linen.scan` (a `lax.scan` over stacked
        parameters: params["layers"], every leaf [L, ...] with the logical axis "layers", KV
        caches from `init_cache` [L, B, S, K, H]) instead of L unrolled blocks ("layers_0", ...).
        Values are the same up to float rounding; the program holds one block, so compile time
        hardly grows with L, and `remat` acts inside the scanned body, where XLA keeps only the
        saved residuals per layer (on XLA:CPU, remat of unrolled blocks saves no memory).
        Convert parameters with `stack_layers` / `unstack_layers`. Needs identical layers:
        refused with `layer_types` mixing "full" and "sliding" (Gemma 2/3), and with MoE and
        dense layers mixed (`moe_layers`).
      moe: the Mixture-of-Experts FFN of the MoE layers (`jaxalign.models.moe.MoEConfig`: experts,
        k, routing family); None = every layer has the dense MLP. An MoE layer's FFN is the
        `MoE` module mounted as "moe" (params["layers_i"]["moe"], no "mlp"), with no biases,
        so the "llama" family only (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3's FFN).
      moe_layers: indices of the MoE layers (sorted, distinct, in [0, n_layers)); the others keep
        the dense MLP of width `d_ff`. None = every layer is MoE when `moe` is set. The HF forms
        map onto it: DeepSeek's `first_k_dense_replace` = k gives (k, ..., L-1); Qwen2-MoE's
        layer l is sparse iff l not in `mlp_only_layers` and (l + 1) % `decoder_sparse_step` == 0
        (`moe_layers_from_hf`).
      mla: Multi-head Latent Attention (DeepSeek-V2/V3, `jaxalign.models.mla.MLAConfig`) in every
        layer instead of q/k/v attention: the block's "attn" is an `MLAttention` (params
        q_a/q_a_norm/q_b or q, kv_a, kv_a_norm, kv_b, o), and the KV cache holds per layer only
        the normalised latent [B, S, kv_lora_rank] (`KVCache.keys`) and the rotated rope key
        [B, S, qk_rope_head_dim] (`KVCache.values`). "llama" family only; `mla.n_heads` must equal
        `n_heads`, `rope_theta` / `rope_interleaved` must equal the MLA config's (its YaRN is
        `mla.yarn`; `rope_scaling` stays None), and the q/k/v-attention options (n_kv_heads,
        head_size, qkv_bias, qk_norm, windows, soft-capping, query_pre_attn_scalar, cudnn) are
        refused. None = the standard attention.
    """

    family: Family = "gpt2"
    vocab_size: int = 50257
    max_seq_len: int = 1024
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None
    d_ff: int | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False
    rope_theta: float = 10000.0
    rope_interleaved: bool = False
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    head_size: int | None = None
    qk_norm: bool = False
    query_pre_attn_scalar: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    layer_types: tuple[LayerType, ...] | None = None
    rope_local_theta: float | None = None
    remat: Remat = "none"
    attention_impl: AttentionImpl = "xla"
    scan_layers: bool = False
    moe: MoEConfig | None = None
    moe_layers: tuple[int, ...] | None = None
    mla: MLAConfig | None = None

    def __post_init__(self):
        if self.family not in ("gpt2", "llama", "gemma"):
            raise ValueError(f"TransformerConfig.family: unknown family {self.family!r}")
        self._check_mla()
        if self.mla is None and self.head_size is None and self.d_model % self.n_heads:
            raise ValueError(
                f"TransformerConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        if self.head_size is not None and self.head_size <= 0:
            raise ValueError(f"TransformerConfig.head_size must be positive, got {self.head_size}")
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"TransformerConfig: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}"
            )
        if self.mla is None and not self.learned_positions and self.head_dim % 2:
            raise ValueError(f"TransformerConfig: RoPE needs an even head_dim, got {self.head_dim}")
        if self.family == "gpt2" and (self.qk_norm or self.head_size or self.layer_types):
            raise ValueError("TransformerConfig: qk_norm, head_size and layer_types need a RoPE family")
        self._check_layer_types()
        for name in ("query_pre_attn_scalar", "attn_softcap", "final_softcap", "rope_local_theta"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"TransformerConfig.{name} must be positive, got {value}")
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TransformerConfig.{name} must be positive, got {getattr(self, name)}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"TransformerConfig.sliding_window must be >= 1, got {self.sliding_window}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TransformerConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.remat not in ("none", "dots", "full"):
            raise ValueError(f"TransformerConfig.remat: {self.remat!r} is not 'none', 'dots' or 'full'")
        if self.attention_impl not in ("xla", "cudnn"):
            raise ValueError(f"TransformerConfig.attention_impl: {self.attention_impl!r} is not 'xla' or 'cudnn'")
        if self.attention_impl == "cudnn" and self.attn_softcap is not None:
            raise ValueError("TransformerConfig: attention_impl='cudnn' has no attention soft-capping (attn_softcap)")
        if self.scan_layers and self.layer_types is not None and len(set(self.layer_types)) > 1:
            raise ValueError(
                "TransformerConfig.scan_layers needs identical layers, but layer_types mixes "
                f"{sorted(set(self.layer_types))} (per-layer window and RoPE); use scan_layers=False"
            )
        self._check_moe()

    def _check_mla(self) -> None:
        m = self.mla
        if m is None:
            return
        if not isinstance(m, MLAConfig):
            raise ValueError(f"TransformerConfig.mla must be an MLAConfig, got {type(m).__name__}")
        if self.family != "llama":
            raise ValueError(f"TransformerConfig.mla needs family 'llama', got {self.family!r}")
        if m.n_heads != self.n_heads:
            raise ValueError(f"TransformerConfig.mla.n_heads={m.n_heads} differs from n_heads={self.n_heads}")
        if m.rope_theta != self.rope_theta or m.rope_interleaved != self.rope_interleaved:
            raise ValueError(
                f"TransformerConfig.mla: rope_theta/rope_interleaved ({m.rope_theta}, {m.rope_interleaved}) "
                f"differ from the config's ({self.rope_theta}, {self.rope_interleaved}); set both alike"
            )
        refused = dict(n_kv_heads=None, head_size=None, qkv_bias=False, qk_norm=False, rope_scaling=None,
                       sliding_window=None, layer_types=None, attn_softcap=None, query_pre_attn_scalar=None,
                       rope_local_theta=None, attention_impl="xla")
        for name, allowed in refused.items():
            if getattr(self, name) != allowed:
                raise ValueError(
                    f"TransformerConfig.{name}={getattr(self, name)!r} does not apply to MLA attention "
                    f"(mla is set; YaRN goes in mla.yarn)"
                )

    def _check_moe(self) -> None:
        if self.moe is None:
            if self.moe_layers is not None:
                raise ValueError("TransformerConfig.moe_layers is set but moe is None")
            return
        if not isinstance(self.moe, MoEConfig):
            raise ValueError(f"TransformerConfig.moe must be a MoEConfig, got {type(self.moe).__name__}")
        if self.family != "llama":
            raise ValueError(f"TransformerConfig.moe needs family 'llama' (SwiGLU experts), got {self.family!r}")
        if self.moe_layers is not None:
            layers = self.moe_layers
            if not isinstance(layers, tuple):
                raise ValueError("TransformerConfig.moe_layers must be a tuple (the config is hashed)")
            if not layers or list(layers) != sorted(set(layers)) or not 0 <= layers[0] <= layers[-1] < self.n_layers:
                raise ValueError(
                    f"TransformerConfig.moe_layers={layers} must be non-empty, sorted, distinct and "
                    f"in [0, n_layers={self.n_layers})"
                )
        if self.scan_layers and len(self.moe_layer_indices) != self.n_layers:
            raise ValueError(
                "TransformerConfig.scan_layers needs identical layers, but moe_layers="
                f"{self.moe_layers} mixes MoE and dense layers; use scan_layers=False"
            )

    def _check_layer_types(self) -> None:
        if self.layer_types is None:
            return
        if not isinstance(self.layer_types, tuple):
            raise ValueError("TransformerConfig.layer_types must be a tuple (the config is hashed)")
        if len(self.layer_types) != self.n_layers:
            raise ValueError(
                f"TransformerConfig.layer_types has {len(self.layer_types)} entries for "
                f"n_layers={self.n_layers}"
            )
        for i, kind in enumerate(self.layer_types):
            if kind not in ("full", "sliding"):
                raise ValueError(f"TransformerConfig.layer_types[{i}]: {kind!r} is not 'full' or 'sliding'")
        if "sliding" in self.layer_types and self.sliding_window is None:
            raise ValueError("TransformerConfig.layer_types has sliding layers but no sliding_window")

    @property
    def head_dim(self) -> int:
        """Per-head width H: `head_size`, or d_model // n_heads."""
        return self.head_size or self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads K (equals n_heads for multi-head attention)."""
        return self.n_kv_heads or self.n_heads

    @property
    def ff_dim(self) -> int:
        """MLP hidden width F (GPT-2 default 4·D; Llama presets set d_ff explicitly)."""
        return self.d_ff or 4 * self.d_model

    # Family differences, derived here once: the model, the memory planner and the parameter
    # counts read these properties, never `family` itself.

    @property
    def learned_positions(self) -> bool:
        """GPT-2 adds a learned position embedding; Llama rotates q and k instead (RoPE)."""
        return self.family == "gpt2"

    @property
    def norm(self) -> Literal["layernorm", "rmsnorm"]:
        """GPT-2: LayerNorm with a bias; Llama and Gemma: RMSNorm (scale only)."""
        return "layernorm" if self.family == "gpt2" else "rmsnorm"

    @property
    def norm_unit_offset(self) -> bool:
        """Gemma's RMSNorm multiplies by (1 + w) and stores w (zero at init); others by w."""
        return self.family == "gemma"

    @property
    def sandwich_norms(self) -> bool:
        """Gemma 2/3: a norm after attention and after the MLP, before each residual add."""
        return self.family == "gemma"

    @property
    def embed_scale(self) -> float | None:
        """Gemma multiplies token embeddings by √d_model (in the compute dtype); others: None."""
        return math.sqrt(self.d_model) if self.family == "gemma" else None

    @property
    def mlp(self) -> Literal["gelu", "swiglu", "geglu"]:
        """GPT-2: up -> GELU (tanh) -> down; Llama: SwiGLU, down(silu(gate(x)) · up(x));
        Gemma: GeGLU, down(gelu_tanh(gate(x)) · up(x)) (Shazeer 2020, arXiv 2002.05202)."""
        return {"gpt2": "gelu", "llama": "swiglu", "gemma": "geglu"}[self.family]

    @property
    def attn_scale(self) -> float:
        """Multiplier of q·k: 1/sqrt(query_pre_attn_scalar), or 1/sqrt(H)."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_window(self, layer: int) -> int | None:
        """Sliding window W of `layer` (None: global attention)."""
        if self.layer_types is None or self.layer_types[layer] == "sliding":
            return self.sliding_window
        return None

    def layer_rope(self, layer: int) -> tuple[float, RopeScaling | None]:
        """(θ, scaling) of `layer`'s RoPE: `rope_local_theta` without scaling on the sliding
        layers of a model that sets it (Gemma 3), else (`rope_theta`, `rope_scaling`)."""
        if self.rope_local_theta is not None and self.layer_window(layer) is not None:
            return self.rope_local_theta, None
        return self.rope_theta, self.rope_scaling

    @property
    def cache_window(self) -> int | None:
        """Slots a KV cache needs at most: W when every layer slides, else None (the full length;
        the sliding layers of a mixed model mask by position instead)."""
        if all(self.layer_window(i) is not None for i in range(self.n_layers)):
            return self.sliding_window
        return None

    @property
    def qkv_biases(self) -> bool:
        """Biases on the q/k/v projections: always for GPT-2, `qkv_bias` for Llama (Qwen2)."""
        return self.family == "gpt2" or self.qkv_bias

    @property
    def output_biases(self) -> bool:
        """Biases on the attention output and MLP projections (GPT-2 only)."""
        return self.family == "gpt2"

    def is_moe_layer(self, layer: int) -> bool:
        """Whether `layer`'s FFN is the MoE (else the dense MLP)."""
        return self.moe is not None and (self.moe_layers is None or layer in self.moe_layers)

    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        """The MoE layers in order (() without `moe`): the order of `Transformer`'s router stats."""
        return tuple(i for i in range(self.n_layers) if self.is_moe_layer(i))

    def replace(self, **changes) -> "TransformerConfig":
        """Returns a copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)


# GPT-2 sizes from the GPT-2 paper / Hugging Face configs; the small CPU presets keep GPT-2's shape
# rules (head size 16-64, MLP 4x) at widths that train in seconds on two CPU cores.
_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(d_model=768, n_layers=12, n_heads=12),
    "gpt2-medium": dict(d_model=1024, n_layers=24, n_heads=16),
    "gpt2-large": dict(d_model=1280, n_layers=36, n_heads=20),
    "gpt2-xl": dict(d_model=1600, n_layers=48, n_heads=25),
    "gpt2-tiny": dict(d_model=64, n_layers=2, n_heads=4, max_seq_len=256),
    "gpt2-mini": dict(d_model=128, n_layers=4, n_heads=4, max_seq_len=512),
    "gpt2-small-cpu": dict(d_model=256, n_layers=6, n_heads=8, max_seq_len=512),
    # Karpathy's llama2.c TinyStories model (../shared/data/models/stories260K).
    "stories260K": dict(
        family="llama", vocab_size=512, max_seq_len=512, d_model=64, n_layers=5, n_heads=8,
        n_kv_heads=4, d_ff=172, rope_interleaved=True,
    ),
    # Shapes of meta-llama/Llama-3.2-1B and Qwen/Qwen2.5-0.5B (config.json of each).
    "llama-3.2-1b": dict(
        family="llama", vocab_size=128256, max_seq_len=131072, d_model=2048, n_layers=16,
        n_heads=32, n_kv_heads=8, d_ff=8192, rope_theta=500000.0,
        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
    ),
    "qwen2.5-0.5b": dict(
        family="llama", vocab_size=151936, max_seq_len=32768, d_model=896, n_layers=24,
        n_heads=14, n_kv_heads=2, d_ff=4864, norm_eps=1e-6, qkv_bias=True, rope_theta=1000000.0,
    ),
    "llama-tiny": dict(
        family="llama", max_seq_len=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=172,
    ),
    # Shapes of Qwen/Qwen3-0.6B and google/gemma-3-1b-it (config.json of each).
    "qwen3-0.6b": dict(
        family="llama", vocab_size=151936, max_seq_len=40960, d_model=1024, n_layers=28,
        n_heads=16, n_kv_heads=8, head_size=128, d_ff=3072, norm_eps=1e-6, qk_norm=True,
        rope_theta=1000000.0,
    ),
    "gemma-3-1b": dict(
        family="gemma", vocab_size=262144, max_seq_len=32768, d_model=1152, n_layers=26,
        n_heads=4, n_kv_heads=1, head_size=256, d_ff=6912, norm_eps=1e-6, qk_norm=True,
        query_pre_attn_scalar=256.0, sliding_window=512, rope_theta=1000000.0,
        rope_local_theta=10000.0,
        layer_types=tuple("full" if (i + 1) % 6 == 0 else "sliding" for i in range(26)),
    ),
    # CPU test shapes of the same families: head size unlike d_model / n_heads, and (Gemma)
    # both layer kinds with a window shorter than the test sequences.
    "qwen3-tiny": dict(
        family="llama", max_seq_len=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
        head_size=32, d_ff=128, norm_eps=1e-6, qk_norm=True, rope_theta=1000000.0,
    ),
    "gemma2-tiny": dict(
        family="gemma", max_seq_len=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
        head_size=32, d_ff=128, norm_eps=1e-6, query_pre_attn_scalar=24.0, attn_softcap=50.0,
        final_softcap=30.0, sliding_window=4, layer_types=("sliding", "full"),
    ),
    "gemma3-tiny": dict(
        family="gemma", max_seq_len=512, d_model=64, n_layers=3, n_heads=4, n_kv_heads=1,
        head_size=32, d_ff=128, norm_eps=1e-6, qk_norm=True, query_pre_attn_scalar=32.0,
        sliding_window=4, rope_theta=1000000.0, rope_local_theta=10000.0,
        layer_types=("sliding", "sliding", "full"),
    ),
    # MoE: Mixtral-8x7B and Qwen1.5-MoE-A2.7B at the transformers 5.25 `MixtralConfig` /
    # `Qwen2MoeConfig` class defaults (Qwen's released config.json sets rope_theta 1e6: load the
    # checkpoint for that), and CPU test shapes of the three MoE families (Qwen: layer 1 dense).
    "mixtral-8x7b": dict(
        family="llama", vocab_size=32000, max_seq_len=131072, d_model=4096, n_layers=32, n_heads=32,
        n_kv_heads=8, d_ff=14336, rope_theta=1000000.0, tie_embeddings=False, moe=MoEConfig.mixtral(),
    ),
    "qwen1.5-moe-a2.7b": dict(
        family="llama", vocab_size=151936, max_seq_len=32768, d_model=2048, n_layers=24, n_heads=16,
        d_ff=5632, norm_eps=1e-6, qkv_bias=True, tie_embeddings=False, moe=MoEConfig.qwen2_moe(),
    ),
    "mixtral-tiny": dict(
        family="llama", max_seq_len=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
        rope_theta=1000000.0, moe=MoEConfig.mixtral(num_experts=4, moe_d_ff=64),
    ),
    "qwen2-moe-tiny": dict(
        family="llama", max_seq_len=512, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=128,
        norm_eps=1e-6, qkv_bias=True, moe_layers=(0, 2),
        moe=MoEConfig.qwen2_moe(num_experts=8, experts_per_token=2, moe_d_ff=32, shared_d_ff=64),
    ),
    "qwen3-moe-tiny": dict(
        family="llama", max_seq_len=512, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, head_size=32,
        d_ff=128, norm_eps=1e-6, qk_norm=True, rope_theta=1000000.0, moe_layers=(0, 2),
        moe=MoEConfig.qwen3_moe(num_experts=8, experts_per_token=2, moe_d_ff=32),
    ),
    # DeepSeek-V3 (671B total, 37B active; deepseek-ai/DeepSeek-V3 config.json and
    # inference/configs/config_671B.json): MLA in all 61 layers, the first 3 dense (F = 18432), then
    # 256 routed + 1 shared experts of 2048, YaRN ×40 over 4096. The multi-token-prediction
    # module (HF `num_nextn_predict_layers`, checkpoint layer 61) is not part of the model here.
    "deepseek-v3": dict(
        family="llama", vocab_size=129280, max_seq_len=163840, d_model=7168, n_layers=61, n_heads=128,
        d_ff=18432, norm_eps=1e-6, rope_theta=10000.0, rope_interleaved=True, tie_embeddings=False,
        moe=MoEConfig.deepseek_v3(), moe_layers=tuple(range(3, 61)),
        mla=MLAConfig(n_heads=128, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                      q_lora_rank=1536, rope_theta=10000.0, rope_interleaved=True,
                      yarn=YarnScaling(factor=40.0, original_max_position=4096, beta_fast=32.0, beta_slow=1.0,
                                       mscale=1.0, mscale_all_dim=1.0)),
    ),
    # CPU test shape of the same model: layer 0 dense, 8 routed experts in 2 groups (1 kept),
    # 2 shared, YaRN ×4 over 32 positions with mscale_all_dim != mscale (both YaRN factors ≠ 1).
    "deepseek-v3-tiny": dict(
        family="llama", max_seq_len=128, d_model=64, n_layers=3, n_heads=4, d_ff=96, norm_eps=1e-6,
        rope_theta=10000.0, rope_interleaved=True, tie_embeddings=False, moe_layers=(1, 2),
        moe=MoEConfig.deepseek_v3(num_experts=8, experts_per_token=2, moe_d_ff=32, shared_d_ff=64, n_group=2,
                                  topk_group=1),
        mla=MLAConfig(n_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                      q_lora_rank=24, rope_theta=10000.0, rope_interleaved=True,
                      yarn=YarnScaling(factor=4.0, original_max_position=32, mscale=1.0, mscale_all_dim=0.5)),
    ),
}

PRESETS: tuple[str, ...] = tuple(_PRESETS)


def get_config(name: str, **overrides: Any) -> TransformerConfig:
    """Returns the named preset, with `overrides` (e.g. vocab_size=257, dtype=jnp.bfloat16).

    Presets: gpt2 (124M), gpt2-medium (355M), gpt2-large (774M), gpt2-xl (1.5B); the CPU-sized
    gpt2-tiny, gpt2-mini, gpt2-small-cpu, llama-tiny, qwen3-tiny, gemma2-tiny, gemma3-tiny and
    the MoE mixtral-tiny, qwen2-moe-tiny, qwen3-moe-tiny and the MLA + MoE deepseek-v3-tiny;
    stories260K (llama2.c TinyStories); and the shapes of llama-3.2-1b, qwen2.5-0.5b, qwen3-0.6b,
    gemma-3-1b, mixtral-8x7b, qwen1.5-moe-a2.7b and deepseek-v3 (671B, for planning).

    Raises:
      ValueError: unknown preset name (the message lists the known ones).
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return TransformerConfig(**{**_PRESETS[name], **overrides})


def moe_layers_from_hf(n_layers: int, *, first_k_dense: int = 0, sparse_step: int = 1,
                       mlp_only_layers: tuple[int, ...] = ()) -> tuple[int, ...] | None:
    """`TransformerConfig.moe_layers` from the HF forms: DeepSeek's `first_k_dense_replace`
    (layers < k dense) and Qwen2/3-MoE's `decoder_sparse_step` / `mlp_only_layers` (layer l is
    sparse iff l not in mlp_only_layers and (l + 1) % step == 0; `Qwen2MoeDecoderLayer`,
    transformers 5.25). Returns None when every layer is MoE.

    Raises:
      ValueError: sparse_step < 1, or no layer left sparse.
    """
    if sparse_step < 1:
        raise ValueError(f"decoder_sparse_step must be >= 1, got {sparse_step}")
    layers = tuple(
        i for i in range(n_layers)
        if i >= first_k_dense and i not in mlp_only_layers and (i + 1) % sparse_step == 0
    )
    if not layers:
        raise ValueError(f"no MoE layer among {n_layers} (first_k_dense={first_k_dense}, "
                         f"sparse_step={sparse_step}, mlp_only_layers={mlp_only_layers})")
    return None if len(layers) == n_layers else layers


def _ffn_params(config: TransformerConfig, layer: int, active: bool) -> int:
    """Parameters of `layer`'s FFN: the dense MLP, or the MoE's router [D, E], experts 3·E·D·F
    (k of them when `active`), shared expert 3·D·Fs, shared gate D and selection bias E (the bias
    is not a matmul weight: left out of the active count)."""
    d = config.d_model
    if not config.is_moe_layer(layer):
        f = config.ff_dim
        mlp = (2 if config.mlp == "gelu" else 3) * d * f  # up, down (+ gate for SwiGLU / GeGLU)
        return mlp + ((f + d) if config.output_biases else 0)
    m = config.moe
    experts = m.experts_per_token if active else m.num_experts
    total = d * m.num_experts + 3 * experts * d * m.moe_d_ff + 3 * d * m.shared_d_ff
    total += d if m.shared_gate else 0
    total += m.num_experts if (m.router_bias and not active) else 0
    return total


def _mla_params(m: MLAConfig, d: int) -> int:
    """Parameters of one MLA layer (`mla.MLAttention`; DeepSeek-V2 §2.1): q_a [D,d_q] + its
    RMSNorm [d_q] + q_b [d_q,H,d_n+d_R] (or q [D,H,d_n+d_R] without q_lora_rank), kv_a
    [D,d_c+d_R] + its RMSNorm [d_c], kv_b [d_c,H,d_n+d_v], o [H,d_v,D], and with attention_bias
    the biases of q_a, kv_a and o."""
    h, dqk = m.n_heads, m.qk_head_dim
    if m.q_lora_rank is None:
        q = d * h * dqk
    else:
        q = d * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * h * dqk
    kv = d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
    kv += m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim)
    total = q + kv + h * m.v_head_dim * d
    if m.attention_bias:
        total += (m.q_lora_rank or 0) + m.kv_lora_rank + m.qk_rope_head_dim + d
    return total


def num_params(config: TransformerConfig, *, embeddings: bool = True, active: bool = False) -> int:
    """Parameter count of the model `config` describes (tied head counted once).

    Args:
      embeddings: include token and position embeddings (set False for the "non-embedding"
        count that Kaplan et al. 2020 use in the 6N FLOPs rule).
      active: count, in MoE layers, only the parameters one token uses: the router, k of the E
        routed experts and the shared expert (what its FLOPs scale with); False counts all E.

    MLA layers count `_mla_params` (checked against HF `DeepseekV3ForCausalLM.num_parameters()`,
    which leaves out the selection biases, HF buffers: tests/models/test_deepseek_v3.py).
    """
    d, l = config.d_model, config.n_layers
    h, n, k = config.head_dim, config.n_heads, config.kv_heads
    if config.mla is not None:
        attn = _mla_params(config.mla, d)
    else:
        attn = d * n * h + 2 * d * k * h + n * h * d
        attn += (n * h + 2 * k * h) if config.qkv_biases else 0
        attn += d if config.output_biases else 0  # the attention output's bias
    per_norm = 2 * d if config.norm == "layernorm" else d  # LayerNorm: scale and bias
    norms, final = (4 if config.sandwich_norms else 2) * per_norm, per_norm  # per block, final
    norms += 2 * h if config.qk_norm else 0
    total = l * (attn + norms) + final + sum(_ffn_params(config, i, active) for i in range(l))
    if embeddings:
        total += config.vocab_size * d
        if config.learned_positions:
            total += config.max_seq_len * d
        if not config.tie_embeddings:
            total += d * config.vocab_size
    return total


def train_flops_per_token(config: TransformerConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6·N + 12·L·T·D (forward + backward), in FLOPs.

    N counts every matmul weight a token passes through, including the output head (V·D); in MoE
    layers only the router, the k routed experts a token is sent to and the shared expert
    (`num_params(active=True)`: counting all E experts would overstate MFU by ~E/k on the FFN).
    The second term is the attention scores and weighted sum (4·L·T·D forward, times 3 for
    forward + backward, causal masking not discounted), as in the PaLM paper's MFU definition
    (Chowdhery et al. 2022, arXiv 2204.02311, App. B: 6N + 12·L·H·Q·T). With MLA the score and
    value widths differ (H·(d_n+d_R) and H·d_v, not D each): 6·L·T·H·(d_n + d_R + d_v), the naive
    (training) form; MLA's up-projection kv_b is a weight, counted in N.
    """
    n_matmul = num_params(config, embeddings=False, active=True) + config.vocab_size * config.d_model
    if config.mla is not None:
        m = config.mla
        width = m.n_heads * (m.qk_head_dim + m.v_head_dim)  # score + weighted-sum widths
        return 6.0 * n_matmul + 6.0 * config.n_layers * seq_len * width
    return 6.0 * n_matmul + 12.0 * config.n_layers * seq_len * config.d_model
