"""Transformer configuration and named presets.

One frozen dataclass describes every decoder-only model jaxalign builds. It is hashable, so it can
be closed over by `jax.jit`'d functions or passed as a static argument without retracing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp

Family = Literal["gpt2", "llama"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 RoPE frequency scaling (Meta's `apply_scaling`; HF rope_type "llama3").

    Wavelengths longer than original_max_position / low_freq_factor are divided by `factor`,
    shorter than original_max_position / high_freq_factor are kept, and the band between is
    interpolated smoothly.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of a decoder-only transformer.

    Attributes:
      family: architecture family.
        "gpt2": learned positions, pre-LayerNorm with bias, GELU (tanh) MLP, biases on every
        projection (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners").
        "llama": rotary positions, pre-RMSNorm, SwiGLU MLP, no biases except optional q/k/v
        biases (Touvron et al. 2023, arXiv 2302.13971; Qwen2 adds the q/k/v biases).
      vocab_size: number of token ids V.
      max_seq_len: longest sequence the model accepts (GPT-2: number of learned positions).
      d_model: residual width D.
      n_layers: number of transformer blocks L.
      n_heads: query heads N; head size H = d_model // n_heads.
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
        arXiv 2310.06825); decoding then needs a KV cache of only W slots.
      dropout: dropout rate on embeddings, attention output and MLP output (GPT-2 pretraining: 0.1;
        fine-tuning here defaults to 0.0). Attention probabilities are not dropped, so that the
        attention stays a single fused `jax.nn.dot_product_attention` call.
      dtype: compute dtype of activations and matmuls (e.g. jnp.bfloat16).
      param_dtype: storage dtype of parameters (float32 keeps optimizer updates exact).
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

    def __post_init__(self):
        if self.family not in ("gpt2", "llama"):
            raise ValueError(f"TransformerConfig.family: unknown family {self.family!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"TransformerConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"TransformerConfig: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}"
            )
        if self.family == "llama" and self.head_dim % 2:
            raise ValueError(f"TransformerConfig: RoPE needs an even head_dim, got {self.head_dim}")
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TransformerConfig.{name} must be positive, got {getattr(self, name)}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"TransformerConfig.sliding_window must be >= 1, got {self.sliding_window}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TransformerConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        """Per-head width H = d_model // n_heads."""
        return self.d_model // self.n_heads

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
        """GPT-2: LayerNorm with a bias; Llama: RMSNorm (scale only)."""
        return "layernorm" if self.family == "gpt2" else "rmsnorm"

    @property
    def mlp(self) -> Literal["gelu", "swiglu"]:
        """GPT-2: up -> GELU (tanh) -> down; Llama: SwiGLU, down(silu(gate(x)) · up(x))."""
        return "gelu" if self.family == "gpt2" else "swiglu"

    @property
    def qkv_biases(self) -> bool:
        """Biases on the q/k/v projections: always for GPT-2, `qkv_bias` for Llama (Qwen2)."""
        return self.family == "gpt2" or self.qkv_bias

    @property
    def output_biases(self) -> bool:
        """Biases on the attention output and MLP projections (GPT-2 only)."""
        return self.family == "gpt2"

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
}

PRESETS: tuple[str, ...] = tuple(_PRESETS)


def get_config(name: str, **overrides: Any) -> TransformerConfig:
    """Returns the named preset, with `overrides` (e.g. vocab_size=257, dtype=jnp.bfloat16).

    Presets: gpt2 (124M), gpt2-medium (355M), gpt2-large (774M), gpt2-xl (1.5B); the CPU-sized
    gpt2-tiny, gpt2-mini, gpt2-small-cpu, llama-tiny; stories260K (llama2.c TinyStories); and
    the shapes of llama-3.2-1b and qwen2.5-0.5b.

    Raises:
      ValueError: unknown preset name (the message lists the known ones).
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return TransformerConfig(**{**_PRESETS[name], **overrides})


def num_params(config: TransformerConfig, *, embeddings: bool = True) -> int:
    """Parameter count of the model `config` describes (tied head counted once).

    Args:
      embeddings: include token and position embeddings (set False for the "non-embedding"
        count that Kaplan et al. 2020 use in the 6N FLOPs rule).
    """
    d, f, l = config.d_model, config.ff_dim, config.n_layers
    h, n, k = config.head_dim, config.n_heads, config.kv_heads
    attn = d * n * h + 2 * d * k * h + n * h * d
    attn += (n * h + 2 * k * h) if config.qkv_biases else 0
    attn += d if config.output_biases else 0  # the attention output's bias
    mlp = (2 if config.mlp == "gelu" else 3) * d * f  # up, down (+ gate for SwiGLU)
    mlp += (f + d) if config.output_biases else 0
    per_norm = 2 * d if config.norm == "layernorm" else d  # LayerNorm: scale and bias
    norms, final = 2 * per_norm, per_norm  # two per block, one final
    total = l * (attn + mlp + norms) + final
    if embeddings:
        total += config.vocab_size * d
        if config.learned_positions:
            total += config.max_seq_len * d
        if not config.tie_embeddings:
            total += d * config.vocab_size
    return total


def train_flops_per_token(config: TransformerConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6·N + 12·L·T·D (forward + backward), in FLOPs.

    N counts every matmul weight including the output head (V·D); the second term is the attention
    scores and weighted sum (4·L·T·D forward, times 3 for forward + backward, causal masking not
    discounted), as in the PaLM paper's MFU definition (Chowdhery et al. 2022, arXiv 2204.02311,
    App. B: 6N + 12·L·H·Q·T).
    """
    n_matmul = num_params(config, embeddings=False) + config.vocab_size * config.d_model
    return 6.0 * n_matmul + 12.0 * config.n_layers * seq_len * config.d_model
