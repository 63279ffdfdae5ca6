"""Training-memory estimate of a jaxalign transformer: parameters, gradients, optimizer state and
activations, in bytes, from the config alone (no arrays are allocated).

State (exact for `make_optimizer` + `make_train_step`):
* params: every parameter in `param_dtype` (with LoRA: the frozen base plus the adapters in
  `LoraConfig.param_dtype`).
* grads: one gradient per *trainable* value, in its dtype (with LoRA: adapter-sized).
* optimizer state: AdamW keeps two moments per trainable value in the trainable dtype (optax's
  default: `mu_dtype=None` and ν follow the params, so float32 for float32 params) plus two int32
  counts (Adam's and the learning-rate schedule's). Clipping and the masked weight decay hold no
  arrays. SGD (no momentum) keeps only the schedule count.
  With `grad_accum_steps > 1`, optax.MultiSteps adds a float32 accumulator per trainable value
  (its `accumulator_dtype` default, whatever the param dtype) and two int32 step counters;
  optax.apply_if_finite (the non-finite guard, on by default) two int32 counters and a bool.
* step/rng of the `TrainState`: 12 bytes; the batch: int32 tokens + float32 mask.

The usual rule of thumb "(2 + 8) bytes per parameter" for bf16 training with Adam counts bf16
weights (2 bytes) plus two float32 Adam moments (8 bytes); it leaves out the gradients (2 more
bytes in bf16, or fused into the update), a float32 master copy (4 more; the "16 bytes/param" of
mixed-precision Adam in ZeRO, Rajbhandari et al. 2019, arXiv 1910.02054 §3.1, is 2 + 2 + 4 + 4 +
4), and all activations. In jaxalign: the default float32 params cost 4 (params) + 4 (grads) + 8
(moments) = 16 bytes per parameter before activations; `param_dtype=bfloat16` costs 2 + 2 + 2·2
= 8, since optax keeps the moments in the param dtype (pass `mu_dtype` to change that); with
LoRA the frozen base pays its storage only and the adapters pay the rest.

Activations (saved by the forward pass for the backward pass), per layer, in the compute dtype
c = itemsize(compute_dtype). Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models", arXiv 2205.05198, §4.1) count sbh(34 + 5as/h) bytes for 16-bit GPT
with Megatron's fused kernels; a `jax.grad` of this model compiled by XLA keeps more, and the
count below is what XLA keeps: it was read off the peak of XLA's live-range report
(`--xla_dump_to`, `*-live-range.txt`, "Stack trace breakdown for peak usage") for GPT-2 and
Llama blocks, each buffer attributed to the op that made it:

    norms        3 per norm (LayerNorm: x - mean and the normalised x, then the affine output;
                 RMSNorm: x·rsqrt, the output and the product with the scale)   6·B·T·D·c
                 (Gemma's two sandwich norms add 6·B·T·D·c, Qwen3/Gemma 3's q/k norms
                 3·B·T·(N + K)·H·c: counted alike, not yet read off XLA's report)
    residuals    the two residual sums of the block                             2·B·T·D·c
    q, k, v      after the projections (and RoPE)                               B·T·(N + 2K)·H·c
    attn out     input of wo                                                    B·T·N·H·c
    mlp          GPT-2: up output, tanh and the GELU product                    3·B·T·F·c
                 Llama: gate, up, sigmoid, silu(gate) and silu(gate)·up         5·B·T·F·c
    scores       "xla" (what `jax.nn.dot_product_attention` runs with implementation=None on
                 every backend): the float32 softmax's max-subtracted logits, exp and
                 probabilities [B,N,T,T], plus the probabilities cast to c when c != 4
                                                                               B·N·T²·(12 + [c != 4]·c)
                 "flash" (cuDNN / Pallas kernels): float32 log-sum-exp only     4·B·N·T
    dropout      on the attention and MLP outputs (if dropout > 0): XLA keeps the random
                 bits of `jax.random.bernoulli` (two uint32 words per element from threefry)
                 and recomputes the mask in the backward pass                   2·8·B·T·D

MoE layers (`TransformerConfig.moe`; `ffn_activation_bytes`) replace the MLP term by the
router's float32 logits, scores and gate matrix (8·N·E·4 with N = B·T, plus the tokens N·D·c) and
the experts': on the dense all-experts path 6·N·E·F·c + 4·N·E·F (gate and up outputs, sigmoid,
silu, product, and the float32 gate-weighted product, every expert on every token) plus two
expert-weight-sized buffers 2·E·D·F·c of the backward einsums; on the grouped ("ragged") path
N·k·(5·F·c + D·(2·c + 4)). A shared expert adds a SwiGLU's 5·N·Fs·c and its gate N·D·c. Read off
XLA:CPU's one-layer increments like the dense blocks: the dense path within 2% at k = 2..4
(E = 4..32), 14% high at k = 1. The grouped count is what a grouped-matmul kernel keeps; XLA:CPU
expands `jax.lax.ragged_dot` over all E groups and keeps about 2.4·N·k·E·F·c instead (measured:
2.9× the count at E = 8, k = 2, F = 128), so on CPU the "ragged" figures are not a measurement.

MLA blocks (`TransformerConfig.mla`; `mla_projection_width`) replace q, k, v and the attention
output by the latents, their norms and the per-head tensors of the naive (training) form, and
the scores have MLA's H heads; `kv_cache_bytes` sizes a decoding cache (MLA: the latent and the
rope key per slot).

Rematerialisation (`TransformerConfig.remat`, one `nn.remat` per block): "full" keeps only each
block's input B·T·D·c; "dots" keeps the input and the outputs of the projection matmuls, q, k, v
(B·T·(N + 2K)·H·c), wo's and down's outputs (2·B·T·D·c) and the MLP's up (and gate) outputs
(B·T·F·c each); with either, one layer's full set is live again during its backward pass. These
are the counts remat is meant to give, as on GPU/TPU and inside `scan_layers`; on XLA:CPU with
unrolled layers the compiler schedules the recomputation early and keeps the "none" set
(measured: temp bytes equal for all three policies).

Head and loss: the embedding output and the final norm (4·B·T·D·c), then the output head.
Unfused (`head_chunk=None`): the logits [B,T,V] in c when c != 4 (in float32 they are consumed by
the loss's fusion), and the loss's float32 work: the loss keeps exp(z - max) [B,T,V] for the
backward pass, which materialises the float32 gradient of the logits [B,T,V] next to it:
B·T·V·(8 + [c != 4]·c). Fused (`jaxalign.logprobs.head_stats`, the trainers' default: chunks of
n = B·⌈head_chunk / B⌉ tokens, rematerialised in a scan): the same work for one chunk,
n·V·(8 + [c != 4]·c), plus two more [V, D] buffers in the param dtype for the head weight's
cotangent that the scan accumulates (measured on XLA:CPU, float32: the V-slope of the step's
temp bytes is 8·n + 3·4·D per vocabulary entry, against 8·B·T + 4·D unfused). Where chunks would
not save memory (B·T <= n + D, `head_chunk_positions`) the head is one chunk: the unfused count.

Weight operands: a matmul saves its operands, so when the kernel is cast to a compute dtype other
than its storage dtype, the cast copy lives until the backward pass (c bytes per matmul weight,
the tied embedding included); with LoRA the merged kernels W' = W + s·A·B of the targeted modules
are such operands too (c bytes per targeted value, plus a float32 copy of V per value for DoRA).

Frozen base (LoRA): a frozen kernel's backward pass needs dx = dy·Wᵀ, not its input, so the
inputs only frozen kernels read are not kept (the down projection's [F] where it has no adapter,
wo's [N·H] likewise); norms with frozen parameters keep 2 tensors instead of 3 (RMSNorm: 1 when
only frozen kernels read its output, the final norm included), and the embedding's output is not
kept (see `_frozen_base_savings`).

LoRA with adapter dropout (`LoraConfig.dropout > 0`) trains through the unmerged branch instead
(see `jaxalign.lora`): no merged kernels, but per adapted projection with inputs x [B,T,in] it
keeps x (c), dropout(x) (a = the itemsize of the (x, A) promotion, float32 for float32 adapters),
the 1-byte mask, and x̃·A [B,T,r] (a), i.e. B·T·(in·(c + a + 1) + r·a); DoRA adds x̃·W and
x̃·A·B [B,T,out] (2·a per output) for the magnitude's gradient, and V (the exact norm gradient
only). On XLA:CPU x is kept next to x̃, as counted; a backend that fuses the mask into the
matmul's operand could keep less.

Peak. Activations and gradients do not peak together: the backward pass frees a layer's saved
tensors as it produces that layer's gradients, so live memory falls from "all activations" at
the start of the backward pass to "all gradients" at its end, and then the optimizer update
holds the gradients plus one more trainable-sized temporary (the clipped gradients: every leaf
waits for the global norm; measured on XLA:CPU: temp = exactly 2 × gradient bytes when the
activations are negligible). So

    temporaries = max(activations, grads + optimizer_work)     total = params + optimizer_state
                                                                       + inputs + temporaries

Validation (tests/test_memory.py): params, grads and optimizer-state bytes equal the live buffers
of a real `make_sft_step` state exactly; `total` is within 10% of `compiled.memory_analysis()`
(argument + temp bytes) of real SFT and LoRA/DoRA steps in float32 (GPT-2 and Llama blocks, with
and without dropout; measured 0.99-1.04, GPT-2 124M at B=4, T=512 1.02), and one block's count
is XLA's increment from one layer to two within 5%. Not within 10%: the smallest activations
(B·T = 256 with LoRA on the tiny Llama presets, 0.84-0.90: XLA:CPU then keeps two of the three
[B,N,T,T] softmax tensors), and bfloat16 compute on XLA:CPU (1.1-1.3): its bf16 normalisation
computes elementwise ops in float32 and keeps those copies, which GPUs and TPUs, with native
bf16, do not; on those backends the bf16 figures here are the intended count, not a measured one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from jaxalign.logprobs import HEAD_CHUNK_TOKENS, head_chunk_positions
from jaxalign.lora import LoraConfig, init_lora
from jaxalign.models.config import Remat, TransformerConfig, num_params
from jaxalign.models.mla import MLAConfig
from jaxalign.models.transformer import init_params
from jaxalign.optim import OptimConfig, make_optimizer
from jaxalign.sharding import (
    DEFAULT_RULES,
    LogicalRules,
    abstract_params,
    batch_axes,
    opt_state_like_params,
    param_specs,
)

Attention = Literal["xla", "flash"]


def _itemsize(dtype) -> int:
    return int(np.dtype(jnp.dtype(dtype)).itemsize)


def _abstract_params(config: TransformerConfig, param_dtype) -> Any:
    config = config.replace(param_dtype=param_dtype)
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def lora_sizes(config: TransformerConfig, lora: LoraConfig, param_dtype=jnp.float32) -> dict[str, int]:
    """Element counts of a LoRA setup, from abstract shapes (nothing is allocated).

    Returns:
      `adapters` (trainable values), `targeted` (values of the base kernels that get adapters),
      `targeted_in` / `targeted_out` (the input / output widths summed over the adapted kernels,
      so B·T·targeted_in is the size of all their inputs), `rank_sum` (r summed over them), and
      the layers whose MLP down projection (`frozen_down`) / attention output projection
      (`frozen_wo`) has no adapter, and `norms_feeding_frozen`: the block norms whose output
      only frozen kernels read (the final norm always feeds the frozen output head).

    Counted on the unrolled layout (`layers_{i}` modules): a `scan_layers` model's stacked
    adapters ([L, in, r], `jaxalign.lora`) hold the same values.
    """
    config = config.replace(scan_layers=False)
    params = _abstract_params(config, param_dtype)
    adapters = jax.eval_shape(lambda p: init_lora(p, lora, jax.random.key(0)), params)
    targeted = targeted_in = targeted_out = rank_sum = 0
    targeted_modules = set()
    for path, a in jax.tree_util.tree_flatten_with_path(adapters)[0]:
        if str(getattr(path[-1], "key", path[-1])) == "lora_a":
            module = params
            for key in path[:-1]:
                module = module[key.key]
            targeted += module["kernel"].size
            targeted_in += a.shape[0]
            targeted_out += module["kernel"].size // a.shape[0]
            rank_sum += a.shape[1]
            targeted_modules.add("/".join(str(key.key) for key in path[:-1]))
    # Saved inputs that only a frozen kernel's weight gradient would read (dx = dy·Wᵀ needs W,
    # not x): the MLP's down input [F] and wo's input [N·H], per layer; and the block norms whose
    # output feeds only frozen kernels (q/k/v, up/gate).
    frozen_down = frozen_wo = norms_feeding_frozen = 0
    for layer in range(config.n_layers):
        hit = lambda *names: any(f"layers_{layer}/{name}" in targeted_modules for name in names)  # noqa: B023 - called within this iteration
        frozen_down += not config.is_moe_layer(layer) and not hit("mlp/down")  # MoE experts: never LoRA targets
        frozen_wo += not hit("attn/wo")
        norms_feeding_frozen += (not hit("attn/wq", "attn/wk", "attn/wv")) + (not hit("mlp/up", "mlp/gate"))
    return {
        "adapters": sum(x.size for x in jax.tree.leaves(adapters)),
        "targeted": targeted,
        "targeted_in": targeted_in,
        "targeted_out": targeted_out,
        "rank_sum": rank_sum,
        "frozen_down": frozen_down,
        "frozen_wo": frozen_wo,
        "norms_feeding_frozen": norms_feeding_frozen,
    }


def remat_saved_bytes_per_layer(
    config: TransformerConfig, *, batch: int, seq_len: int, compute_dtype, remat: Remat, layer: int = 0
) -> int:
    """Bytes a rematerialised block (`layer`: its FFN is dense or MoE) keeps between its forward
    and backward passes: its input for "full"; the input and the projection outputs for "dots"
    (see the module docstring)."""
    b, t, d, c = batch, seq_len, config.d_model, _itemsize(compute_dtype)
    if remat == "full":
        return b * t * d * c
    if remat == "dots":
        n, k, h = config.n_heads, config.kv_heads, config.head_dim
        attn = b * t * (2 * d + (n + 2 * k) * h) * c  # input, wo's output; q, k, v
        if config.mla is not None:  # input, o's output; q_a, q_b, kv_a, kv_b outputs
            m = config.mla
            width = (m.q_lora_rank or 0) + m.n_heads * m.qk_head_dim + m.kv_lora_rank + m.qk_rope_head_dim
            attn = b * t * (2 * d + width + m.n_heads * (m.qk_nope_head_dim + m.v_head_dim)) * c
        return attn + _ffn_dot_bytes(config, layer, b * t, c)
    raise ValueError(f"remat must be 'dots' or 'full' here, got {remat!r}")


def _ffn_dot_bytes(config: TransformerConfig, layer: int, n: int, c: int) -> int:
    """What "dots" remat keeps of `layer`'s FFN for N = B·T tokens: the matmul outputs (dense
    MLP: up (and gate) [N, F] and down [N, D]; MoE: the router logits [N, E] in float32, the
    experts' gate and up outputs ([N, E, F] each on the dense path, [N·k, F] on the grouped one),
    their down output ([N, D] / [N·k, D]), and the shared expert's three)."""
    d = config.d_model
    if not config.is_moe_layer(layer):
        return n * ((1 if config.mlp == "gelu" else 2) * config.ff_dim + d) * c  # up (gate); down
    m = config.moe
    e, k, f = m.num_experts, m.experts_per_token, m.moe_d_ff
    rows = n * e if m.impl == "dense" else n * k  # rows the expert matmuls produce
    total = n * e * 4 + rows * 2 * f * c + (n if m.impl == "dense" else rows) * d * c
    if m.shared_d_ff:
        total += n * (2 * m.shared_d_ff + d) * c
    return total


def ffn_activation_bytes(config: TransformerConfig, layer: int, *, batch: int, seq_len: int, compute_dtype) -> int:
    """Bytes `layer`'s FFN saves for its backward pass (see the module docstring's "MoE").

    Dense MLP: GPT-2 3·N·F·c (up, tanh, GELU product), SwiGLU 5·N·F·c (gate, up, sigmoid,
    silu(gate), product), N = B·T. MoE layer (`config.is_moe_layer`), E experts of width F, k per
    token:
      router        float32 logits, scores, top-k and gate matrix [N, E], the tokens [N, D]
                                                                            8·N·E·4 + N·D·c
      dense path    ("dense", every expert on every token) the gate and up outputs, sigmoid,
                    silu(gate), product [N, E, F] in c, the float32 gate-weighted product, plus two
                    expert-weight-sized buffers of the backward einsums
                                                                  6·N·E·F·c + 4·N·E·F + 2·E·D·F·c
      grouped path  ("ragged": only the N·k assignments) the same five [N·k, F] tensors, the
                    gathered rows and the down output [N·k, D] in c, and the float32 weighted
                    rows                                            N·k·(5·F·c + D·(2·c + 4))
      shared expert a SwiGLU of width Fs (5·N·Fs·c), its sigmoid gate's output N·D·c.
    """
    n, d, c = batch * seq_len, config.d_model, _itemsize(compute_dtype)
    if not config.is_moe_layer(layer):
        return (3 if config.mlp == "gelu" else 5) * n * config.ff_dim * c
    m = config.moe
    e, k, f = m.num_experts, m.experts_per_token, m.moe_d_ff
    total = 8 * n * e * 4 + n * d * c
    if m.impl == "dense":
        total += 6 * n * e * f * c + 4 * n * e * f + 2 * e * d * f * c
    else:
        total += n * k * (5 * f * c + d * (2 * c + 4))
    if m.shared_d_ff:
        total += 5 * n * m.shared_d_ff * c + (n * d * c if m.shared_gate else 0)
    return total


def head_bytes(
    config: TransformerConfig, *, batch: int, seq_len: int, compute_dtype, param_dtype, head_chunk: int | None
) -> int:
    """Bytes the embedding output, the final norm and the output head with its loss keep for the
    backward pass (see the module docstring's "Head and loss")."""
    b, t, d, v, c = batch, seq_len, config.d_model, config.vocab_size, _itemsize(compute_dtype)
    p = _itemsize(param_dtype)
    per_token = v * (8 + (c if c != 4 else 0))  # float32 exp(z - max) and d(logits), logits in c
    tokens = b * t
    if head_chunk is not None:
        tokens = b * head_chunk_positions(b, t, head_chunk, d)
    head = 4 * b * t * d * c + tokens * per_token
    if tokens < b * t:  # a scan over chunks: the head weight's cotangent accumulates in its carry
        head += 2 * v * d * p
    return head


def mla_projection_width(m: MLAConfig) -> int:
    """Values per token an MLA block keeps for its backward pass besides the scores (naive form,
    `jaxalign.models.mla`): the query latent and its RMSNorm 4·d_q (0 without q_lora_rank), the
    kv latent and its norm 4·d_c, the rope key before and after RoPE 2·d_R, and per head the
    query (q_b's output and the roped part), the key (kv_b's output and the concatenation) and
    the value and attention output: H·(3·d_n + 3·d_R + 2·d_v). Read off XLA:CPU's one-layer
    increments (deepseek-v3-tiny shapes, each width doubled in turn): within 8% of the
    attention's share, which the [B, H, T, T] scores dominate."""
    dq = m.q_lora_rank or 0
    return 4 * dq + 4 * m.kv_lora_rank + 2 * m.qk_rope_head_dim + m.n_heads * (
        3 * m.qk_nope_head_dim + 3 * m.qk_rope_head_dim + 2 * m.v_head_dim)


def kv_cache_bytes(config: TransformerConfig, batch: int, max_len: int) -> int:
    """Bytes of `init_cache(config, batch, max_len)`: per layer and slot, keys and values of
    K heads × H channels in `config.dtype` (MLA: the latent d_c and the rope key d_R only), plus
    the int32 slot positions and length. Slots: max_len, or the rolling window when every layer
    slides (`config.cache_window`)."""
    window = config.cache_window
    slots = max_len if window is None else min(max_len, window)
    if config.mla is not None:
        per_slot = config.mla.kv_lora_rank + config.mla.qk_rope_head_dim
    else:
        per_slot = 2 * config.kv_heads * config.head_dim
    return config.n_layers * batch * slots * per_slot * _itemsize(config.dtype) + batch * slots * 4 + 4


def activation_bytes_per_layer(
    config: TransformerConfig,
    *,
    batch: int,
    seq_len: int,
    compute_dtype,
    attention: Attention = "xla",
    layer: int = 0,
) -> int:
    """Bytes transformer block `layer` saves for its backward pass (see the module docstring; the
    layer index matters only where dense and MoE FFNs mix, `ffn_activation_bytes`)."""
    b, t, d = batch, seq_len, config.d_model
    n, k, h = config.n_heads, config.kv_heads, config.head_dim
    c = _itemsize(compute_dtype)
    btd = b * t * d
    total = 6 * btd * c  # two norms, three tensors each
    if config.sandwich_norms:  # Gemma's post-attention and post-MLP norms, counted alike
        total += 6 * btd * c
    if config.qk_norm:  # per-head q/k norms, three tensors each (not yet read off XLA's report)
        total += 3 * b * t * (n + k) * h * c
    total += 2 * btd * c  # the two residual sums
    if config.mla is not None:  # MLA's projections, latent norms and per-head q, k, v
        total += b * t * mla_projection_width(config.mla) * c
        n = config.mla.n_heads
    else:
        total += b * t * (n + 2 * k) * h * c  # q, k, v
        total += b * t * n * h * c  # attention output (input of wo)
    total += ffn_activation_bytes(config, layer, batch=b, seq_len=t, compute_dtype=compute_dtype)
    if attention == "xla":
        total += b * n * t * t * (12 + (c if c != 4 else 0))
    elif attention == "flash":
        total += 4 * b * n * t
    else:
        raise ValueError(f"attention must be 'xla' or 'flash', got {attention!r}")
    if config.dropout > 0:
        total += 2 * 8 * btd  # two dropout sites, the random bits kept as two uint32 words
    return total


def peak_temporaries(activations: int, grads: int) -> int:
    """A train step's peak bytes beyond its arguments: the saved activations at the start of the
    backward pass, or at the update the gradients plus the clipped gradients (one more
    gradient-sized buffer), whichever is larger (see the module docstring's "Peak")."""
    return max(activations, 2 * grads)


def estimate_memory(
    config: TransformerConfig,
    *,
    batch: int,
    seq_len: int,
    param_dtype=jnp.float32,
    compute_dtype=jnp.float32,
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw",
    lora: LoraConfig | None = None,
    remat: Remat | None = None,
    grad_accum_steps: int = 1,
    attention: Attention | None = None,
    skip_nonfinite: bool = True,
    head_chunk: int | None = HEAD_CHUNK_TOKENS,
    float32_state: bool = False,
) -> dict[str, int]:
    """Bytes of one training step of `config` (see the module docstring for every formula).

    Args:
      config: the model (its own dtype fields are overridden by the two below).
      batch: rows per (micro-)batch B.
      seq_len: positions per row in the forward pass T (an SFT batch holds T + 1 tokens, shifted).
      param_dtype: storage dtype of the (base) parameters.
      compute_dtype: activation / matmul dtype.
      optimizer: "adamw"/"adam" (two moments + counts, as `jaxalign.optim.make_optimizer`) or
        "sgd" (no momentum).
      lora: train LoRA/DoRA adapters instead of the full model (base frozen, an argument);
        with `lora.dropout > 0` the activations of the unmerged adapter branch are counted.
      remat: per-block rematerialisation "none" / "dots" / "full" (default: `config.remat`;
        see the module docstring for what XLA:CPU does with unrolled layers).
      grad_accum_steps: > 1 adds optax.MultiSteps' gradient accumulator.
      attention: "xla" (XLA's attention: [B, N, T, T] scores) or "flash" (a fused kernel without
        them); default from `config.attention_impl` ("cudnn" is a flash kernel).
      skip_nonfinite: the optimizer is wrapped in optax.apply_if_finite (`OptimConfig`'s
        default): two int32 counters and a bool more state.
      head_chunk: the trainers' fused output head, tokens per chunk (their default); None: the
        unfused head with its [B, T, V] logits.
      float32_state: the moments (and an accumulator) are float32 whatever the trainable dtype
        (`OptimConfig.float32_state`).

    Returns:
      dict of int bytes: `params` (all resident parameters), `trainable` (the subset that is
      trained), `grads`, `optimizer_state`, `activations` (= `layers` + `head` + `weight_copies`),
      `layers`, `head` (final norm, logits, loss work), `weight_copies` (cast / merged kernel
      operands), `inputs` (batch arrays + TrainState step/rng), `optimizer_work` (the clipped
      gradients of the update), `temporaries` (the step's peak beyond its arguments:
      max(activations, grads + optimizer_work)) and `total` (params + optimizer_state + inputs +
      temporaries: the step's peak memory).
    """
    if optimizer not in ("adamw", "adam", "sgd"):
        raise ValueError(f"optimizer must be 'adamw', 'adam' or 'sgd', got {optimizer!r}")
    remat = config.remat if remat is None else remat
    if remat not in ("none", "dots", "full"):
        raise ValueError(f"remat must be 'none', 'dots' or 'full', got {remat!r}")
    if attention is None:
        attention = "flash" if config.attention_impl == "cudnn" else "xla"
    if batch < 1 or seq_len < 1 or grad_accum_steps < 1:
        raise ValueError("batch, seq_len and grad_accum_steps must be >= 1")
    p_size, c = _itemsize(param_dtype), _itemsize(compute_dtype)
    n_params = num_params(config)
    base_bytes = n_params * p_size
    sizes = None
    if lora is None:
        trainable_count, trainable_size, targeted = n_params, p_size, 0
        params_bytes = base_bytes
    else:
        sizes = lora_sizes(config, lora, param_dtype)
        trainable_count, targeted = sizes["adapters"], sizes["targeted"]
        trainable_size = _itemsize(lora.param_dtype)
        params_bytes = base_bytes + trainable_count * trainable_size
    trainable = trainable_count * trainable_size
    opt = _optimizer_state_bytes(
        optimizer, trainable_count, trainable, grad_accum_steps, skip_nonfinite, float32_state
    )

    b, t, d = batch, seq_len, config.d_model
    layers = _blocks_bytes(config, b, t, compute_dtype, attention, remat)
    head = head_bytes(
        config, batch=b, seq_len=t, compute_dtype=compute_dtype, param_dtype=param_dtype, head_chunk=head_chunk
    )
    if lora is not None:
        layers_saved, head_saved = _frozen_base_savings(config, sizes, b, t, c)
        layers -= layers_saved // config.n_layers if remat != "none" else layers_saved  # remat: one block's set
        head -= head_saved

    # Matmul weight operands that are not the stored parameters themselves.
    norm_and_bias = _norm_and_bias_count(config)
    matmul = n_params - norm_and_bias - (config.max_seq_len * d if config.learned_positions else 0)
    weight_copies = 0
    if c != p_size:
        weight_copies += (matmul - targeted) * c
    if lora is not None and lora.dropout == 0:  # weight space: the merged W' are matmul operands
        weight_copies += targeted * c
        if lora.dora:
            weight_copies += targeted * max(p_size, _itemsize(lora.param_dtype))
    elif lora is not None:  # unmerged: the adapter branch keeps activations instead
        a_size = max(c, _itemsize(lora.param_dtype))  # x̃ is computed in the dtype of (x, A)
        if c != p_size:
            weight_copies += targeted * c  # the base kernels cast for the base matmul
        if lora.dora and not lora.dora_detach_norm:
            weight_copies += targeted * max(p_size, _itemsize(lora.param_dtype))  # V for ∂‖V‖_c
        layers += b * t * (sizes["targeted_in"] * (c + a_size + 1) + sizes["rank_sum"] * a_size)
        if lora.dora:
            layers += 2 * b * t * sizes["targeted_out"] * a_size

    activations = layers + head + weight_copies
    inputs = b * (t + 1) * 8 + 12
    optimizer_work = trainable  # the clipped gradients, next to the gradients
    temporaries = peak_temporaries(activations, trainable)
    total = params_bytes + opt + inputs + temporaries
    return {
        "params": int(params_bytes),
        "trainable": int(trainable),
        "grads": int(trainable),
        "optimizer_state": int(opt),
        "activations": int(activations),
        "layers": int(layers),
        "head": int(head),
        "weight_copies": int(weight_copies),
        "inputs": int(inputs),
        "optimizer_work": int(optimizer_work),
        "temporaries": int(temporaries),
        "total": int(total),
    }


def _blocks_bytes(config: TransformerConfig, b: int, t: int, compute_dtype, attention: Attention, remat: Remat) -> int:
    """Saved activations of all blocks: their sum, or with remat every block's saved set plus the
    largest block's full set (live again during its backward pass)."""
    per_layer = [
        activation_bytes_per_layer(config, batch=b, seq_len=t, compute_dtype=compute_dtype, attention=attention, layer=i)
        for i in range(config.n_layers)
    ]
    if remat == "none":
        return sum(per_layer)
    return max(per_layer) + sum(
        remat_saved_bytes_per_layer(config, batch=b, seq_len=t, compute_dtype=compute_dtype, remat=remat, layer=i)
        for i in range(config.n_layers)
    )


def _optimizer_state_bytes(
    optimizer: str, count: int, trainable: int, grad_accum_steps: int, skip_nonfinite: bool, float32_state: bool
) -> int:
    """Bytes of `make_optimizer`'s state over `count` trainable values of `trainable` bytes."""
    moment_bytes = count * 4 if float32_state else trainable
    opt = 4 if optimizer == "sgd" else 2 * moment_bytes + 2 * 4  # moments + Adam's and the schedule's counts
    if grad_accum_steps > 1:
        opt += count * 4 + 2 * 4  # MultiSteps: float32 accumulator + two int32 steps
    if skip_nonfinite:
        opt += 4 + 1 + 4  # apply_if_finite: int32 notfinite_count, bool last_finite, int32 total
    return opt


def _frozen_base_savings(
    config: TransformerConfig, sizes: dict[str, int], b: int, t: int, c: int
) -> tuple[int, int]:
    """Activation bytes a frozen base does not keep (LoRA), against the full fine-tune's count:
    (summed over the blocks, in the head).

    Read off XLA's live-range report like the per-layer count: an input that only a frozen
    kernel's weight gradient would read is not kept (the down projection's input, wo's input);
    a norm with frozen parameters keeps 2 tensors instead of 3 (LayerNorm: x - mean and the
    normalised x; RMSNorm: the normalised x and, when a trained kernel reads it, the output; the
    final norm feeds the frozen output head); the embedding lookup's output is not kept.
    """
    d, f, nh = config.d_model, config.ff_dim, config.n_heads * config.head_dim
    rms = config.norm == "rmsnorm"
    blocks = sizes["frozen_down"] * f + sizes["frozen_wo"] * nh + 2 * config.n_layers * d
    blocks += sizes["norms_feeding_frozen"] * d if rms else 0
    head = (2 if rms else 1) * d + d  # the final norm, the embedding output
    return b * t * blocks * c, b * t * head * c


def _norm_and_bias_count(config: TransformerConfig) -> int:
    """Parameters that are not matmul weights: norm scales/biases and projection biases."""
    d, l = config.d_model, config.n_layers
    h, n, k, f = config.head_dim, config.n_heads, config.kv_heads, config.ff_dim
    qkv = (n * h + 2 * k * h) if config.qkv_biases else 0
    out = (d + f + d) if config.output_biases else 0  # wo, up and down biases
    norms = (4 * d, 2 * d) if config.norm == "layernorm" else (2 * d, d)  # per block, final
    block_norms = norms[0] * (2 if config.sandwich_norms else 1)  # Gemma: post-attn/MLP norms
    block_norms += 2 * h if config.qk_norm else 0  # per-head q/k norms (Qwen3, Gemma 3)
    return l * (qkv + out + block_norms) + norms[1]


# --------------------------------------------------------------------------------------------
# Per device: the same figures under a mesh's shardings.


def _shard_bytes(shape: Sequence[int], dtype, spec: PartitionSpec, mesh_shape: dict[str, int]) -> int:
    """Bytes one device holds of an array of `shape` split by `spec` (spec entries divide)."""
    n = 1
    for dim, size in enumerate(shape):
        entry = spec[dim] if dim < len(spec) else None
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        n *= size // math.prod(mesh_shape[a] for a in axes)
    return n * np.dtype(dtype).itemsize


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def per_device_memory(
    config: TransformerConfig,
    mesh: Mesh | AbstractMesh,
    *,
    batch: int,
    seq_len: int,
    tx: optax.GradientTransformation | None = None,
    rules: LogicalRules = DEFAULT_RULES,
    attention: Attention | None = None,
    remat: Remat | None = None,
    head_chunk: int | None = HEAD_CHUNK_TOKENS,
) -> dict[str, int]:
    """Bytes per device of one train step of `config` on `mesh`, from the shardings.

    params, grads (laid out like the params) and optimizer state are exact: each leaf's shard
    shape under `param_specs` / `opt_state_like_params`, summed (a replicated leaf counts in
    full on every device). Activations are `estimate_memory`'s for the per-device batch
    B / (data × fsdp) — with tensor > 1 an upper bound, since the head- and width-split tensors
    inside a block shrink by the tensor size too.

    Args:
      config: the model (param_dtype for storage, dtype for compute).
      mesh: a `Mesh` or `AbstractMesh` (see `jaxalign.sharding.abstract_mesh`) with the
        (data, fsdp, tensor) axes.
      batch: global batch B; seq_len: T of the forward pass.
      tx: the optimizer (default: `make_optimizer(OptimConfig())`, clipped AdamW).
      rules: the logical-axis rules.
      attention, remat, head_chunk: passed to `estimate_memory` (defaults from the config and
        the trainers).

    Returns:
      dict of int bytes per device: params, grads, optimizer_state, activations, inputs,
      temporaries = max(activations, 2 × grads) and total = params + optimizer_state + inputs +
      temporaries (see the module docstring for why gradients and activations do not add up).

    Raises:
      ValueError: `batch` not divisible by the batch shards.
    """
    if tx is None:
        tx = make_optimizer(OptimConfig())[0]
    mesh_shape = dict(mesh.shape)
    shards = math.prod(mesh_shape[a] for a in batch_axes(mesh, rules))
    if batch % shards:
        raise ValueError(f"batch {batch} is not divisible by the {shards} batch shards {batch_axes(mesh, rules)}")
    shapes = abstract_params(config)
    specs = param_specs(config, mesh, rules)
    params = sum(
        _shard_bytes(x.shape, x.dtype, s, mesh_shape)
        for x, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(specs, is_leaf=_is_spec))
    )
    opt_shapes = jax.eval_shape(tx.init, shapes)
    opt_specs = opt_state_like_params(tx, shapes, specs, PartitionSpec())
    optimizer_state = sum(
        _shard_bytes(x.shape, x.dtype, s, mesh_shape)
        for x, s in zip(jax.tree.leaves(opt_shapes), jax.tree.leaves(opt_specs, is_leaf=_is_spec))
    )
    local = estimate_memory(
        config, batch=batch // shards, seq_len=seq_len, param_dtype=config.param_dtype,
        compute_dtype=config.dtype, attention=attention, remat=remat, head_chunk=head_chunk,
    )
    out = {
        "params": params,
        "grads": params,
        "optimizer_state": optimizer_state,
        "activations": local["activations"],
        "inputs": local["inputs"],
        "temporaries": peak_temporaries(local["activations"], params),  # grads are laid out as params
    }
    out["total"] = params + optimizer_state + out["inputs"] + out["temporaries"]
    return {k: int(v) for k, v in out.items()}
