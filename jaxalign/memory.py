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
  (its `accumulator_dtype` default, whatever the param dtype) and two int32 step counters.
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
c = itemsize(compute_dtype), following the tensor-by-tensor count of Korthikanti et al. 2022
("Reducing Activation Recomputation in Large Transformer Models", arXiv 2205.05198, §4.1, which
gives sbh(34 + 5as/h) bytes for 16-bit GPT with dropout), adapted to this model (no dropout
masks unless `config.dropout > 0`, SwiGLU for Llama, grouped-query K/V, and the attention that
`jax.nn.dot_product_attention` actually runs):

    norms       2 · (input + output)                       4·B·T·D·c
    q, k, v     inputs of the score and value einsums      B·T·(N + 2K)·H·c
    attn out    input of wo                                B·T·D·c
    mlp         GPT-2: up output, gelu output              2·B·T·F·c
                Llama: gate, up, silu(gate)·up             3·B·T·F·c
    scores      "xla" (the default of dot_product_attention on every backend, which jaxalign's
                model calls with implementation=None): the float32 masked logits, exp and
                softmax [B,N,T,T] plus the bool mask, plus the probabilities cast to c when
                c != 4                                     B·N·T²·(13 + [c != 4]·c)
                "flash" (cuDNN / Pallas kernels): float32 log-sum-exp only   4·B·N·T
    dropout     1-byte masks on the attention and MLP outputs (if dropout > 0)   2·B·T·D

(GPT-2 with F = 4D and c = 2: 2·(4 + 1 + 3 + 1 + 8)·BTD = 34·BTD minus Korthikanti's dropout
bytes, the same count.) With `remat=True` (one `jax.checkpoint` per block, which the current
`Transformer` does not apply: an estimate for planning), a layer keeps only its input B·T·D·c and
one layer's full set is live again during its backward pass.

Head and loss: the final norm (2·B·T·D·c), the logits [B,T,V] in c, and the loss's float32 work:
`jaxalign.losses.sft_loss` keeps exp(z - max) [B,T,V] in float32 for the backward pass, and the
backward pass materialises the float32 gradient [B,T,V] of the logits:  B·T·V·(c + 8).

Weight operands: a matmul saves its operands, so when the kernel is cast to a compute dtype other
than its storage dtype, the cast copy lives until the backward pass (c bytes per matmul weight,
the tied embedding included); with LoRA the merged kernels W' = W + s·A·B of the targeted modules
are such operands too (c bytes per targeted value, plus a float32 copy of V per value for DoRA).

LoRA with adapter dropout (`LoraConfig.dropout > 0`) trains through the unmerged branch instead
(see `jaxalign.lora`): no merged kernels, but per adapted projection with inputs x [B,T,in] it
keeps x (c), dropout(x) (a = the itemsize of the (x, A) promotion, float32 for float32 adapters),
the 1-byte mask, and x̃·A [B,T,r] (a), i.e. B·T·(in·(c + a + 1) + r·a); DoRA adds x̃·W and
x̃·A·B [B,T,out] (2·a per output) for the magnitude's gradient, and V (the exact norm gradient
only). On XLA:CPU x is kept next to x̃, as counted; a backend that fuses the mask into the
matmul's operand could keep less.

Validation (tests/test_memory.py): params, grads and optimizer-state bytes equal the live buffers
of a real `make_sft_step` state exactly; the total (state + activations) is compared with
`compiled.memory_analysis()` (argument + temp bytes). XLA:CPU fuses elementwise work and reuses
buffers, so its activation bytes differ from the count above; the measured ratios are in the
test file.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.lora import LoraConfig, init_lora
from jaxalign.models.config import TransformerConfig, num_params
from jaxalign.models.transformer import init_params

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
      so B·T·targeted_in is the size of all their inputs) and `rank_sum` (r summed over them).
    """
    params = _abstract_params(config, param_dtype)
    adapters = jax.eval_shape(lambda p: init_lora(p, lora, jax.random.key(0)), params)
    targeted = targeted_in = targeted_out = rank_sum = 0
    for path, a in jax.tree_util.tree_flatten_with_path(adapters)[0]:
        if str(getattr(path[-1], "key", path[-1])) == "lora_a":
            module = params
            for key in path[:-1]:
                module = module[key.key]
            targeted += module["kernel"].size
            targeted_in += a.shape[0]
            targeted_out += module["kernel"].size // a.shape[0]
            rank_sum += a.shape[1]
    return {
        "adapters": sum(x.size for x in jax.tree.leaves(adapters)),
        "targeted": targeted,
        "targeted_in": targeted_in,
        "targeted_out": targeted_out,
        "rank_sum": rank_sum,
    }


def activation_bytes_per_layer(
    config: TransformerConfig,
    *,
    batch: int,
    seq_len: int,
    compute_dtype,
    attention: Attention = "xla",
) -> int:
    """Bytes one transformer block saves for its backward pass (see the module docstring)."""
    b, t, d, f = batch, seq_len, config.d_model, config.ff_dim
    n, k, h = config.n_heads, config.kv_heads, config.head_dim
    c = _itemsize(compute_dtype)
    btd = b * t * d
    total = 4 * btd * c  # two norms: input and output
    total += b * t * (n + 2 * k) * h * c  # q, k, v
    total += btd * c  # attention output (input of wo)
    total += (2 if config.family == "gpt2" else 3) * b * t * f * c
    if attention == "xla":
        total += b * n * t * t * (13 + (c if c != 4 else 0))
    elif attention == "flash":
        total += 4 * b * n * t
    else:
        raise ValueError(f"attention must be 'xla' or 'flash', got {attention!r}")
    if config.dropout > 0:
        total += 2 * btd
    return total


def estimate_memory(
    config: TransformerConfig,
    *,
    batch: int,
    seq_len: int,
    param_dtype=jnp.float32,
    compute_dtype=jnp.float32,
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw",
    lora: LoraConfig | None = None,
    remat: bool = False,
    grad_accum_steps: int = 1,
    attention: Attention = "xla",
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
      remat: per-block rematerialisation (planning only; see the module docstring).
      grad_accum_steps: > 1 adds optax.MultiSteps' gradient accumulator.
      attention: "xla" (what the model runs now) or "flash" (a fused kernel without [T, T]).

    Returns:
      dict of int bytes: `params` (all resident parameters), `trainable` (the subset that is
      trained), `grads`, `optimizer_state`, `activations` (= `layers` + `head` + `weight_copies`),
      `layers`, `head` (final norm, logits, loss work), `weight_copies` (cast / merged kernel
      operands), `inputs` (batch arrays + TrainState step/rng), and `total` (the sum of params,
      grads, optimizer_state, activations and inputs).
    """
    if optimizer not in ("adamw", "adam", "sgd"):
        raise ValueError(f"optimizer must be 'adamw', 'adam' or 'sgd', got {optimizer!r}")
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
    if optimizer == "sgd":
        opt = 4
    else:
        opt = 2 * trainable + 2 * 4
    if grad_accum_steps > 1:
        opt += trainable_count * 4 + 2 * 4  # MultiSteps: float32 accumulator + two int32 steps

    b, t, d, v = batch, seq_len, config.d_model, config.vocab_size
    per_layer = activation_bytes_per_layer(
        config, batch=b, seq_len=t, compute_dtype=compute_dtype, attention=attention
    )
    if remat:
        layers = config.n_layers * b * t * d * c + per_layer
    else:
        layers = config.n_layers * per_layer
    head = 2 * b * t * d * c + b * t * v * (c + 8)
    if config.dropout > 0:
        head += b * t * d  # embedding dropout mask

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
    total = params_bytes + trainable + opt + activations + inputs
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
        "total": int(total),
    }


def _norm_and_bias_count(config: TransformerConfig) -> int:
    """Parameters that are not matmul weights: norm scales/biases and projection biases."""
    d, l = config.d_model, config.n_layers
    h, n, k, f = config.head_dim, config.n_heads, config.kv_heads, config.ff_dim
    if config.family == "gpt2":
        return l * (n * h + 2 * k * h + d + f + d + 4 * d) + 2 * d
    qkv = (n * h + 2 * k * h) if config.qkv_bias else 0
    return l * (qkv + 2 * d) + d
