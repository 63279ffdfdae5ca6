"""Export jaxalign parameters to a Hugging Face `transformers` checkpoint directory.

The inverse of `jaxalign.models.hf` (kept in its own file so that importing stays independent of
exporting): writes `config.json` and `model.safetensors` that
`transformers.AutoModelForCausalLM.from_pretrained(directory)` loads as

* `GPT2LMHeadModel` for `family="gpt2"`: Conv1D weights in [in, out] layout, `c_attn` the
  concatenation [q | k | v] along the output axis;
* `LlamaForCausalLM` for `family="llama"` (`Qwen2ForCausalLM` when `qkv_bias`, since HF Llama's
  `attention_bias` would also add an o_proj bias this model lacks; `MistralForCausalLM` with a
  sliding window): nn.Linear weights in [out, in] layout. HF applies RoPE "rotate-half" style, so
  a model with `rope_interleaved=True` (Meta / llama2.c layout, e.g. stories260K) has the rows of
  each q/k head permuted from (x0, x1, x2, x3, ...) pairs to (x0, x2, ..., x1, x3, ...) halves:
  `w.reshape(heads, H/2, 2, in).transpose(0, 2, 1, 3)`, the permutation of Meta's
  `convert_llama_weights_to_hf.py`; attention scores are unchanged because q and k get the same
  permutation. `Qwen3ForCausalLM` when `qk_norm` (per-head q/k norms, no q/k/v biases);
* `MixtralForCausalLM` / `Qwen2MoeForCausalLM` / `Qwen3MoeForCausalLM` for a config with `moe`
  (chosen by `qkv_bias` / `qk_norm`; `moe_layers` as Qwen's `mlp_only_layers`), the experts in
  the per-expert layout `save_pretrained` writes (`moe_state_dict`);
* `DeepseekV3ForCausalLM` for a config with `mla` (`mla_state_dict`; its MoE, if any, routed as
  DeepSeek-V3 with dense layers first, `first_k_dense_replace`; YaRN in `rope_parameters`);
* `Gemma2ForCausalLM` / `Gemma3ForCausalLM` (model_type "gemma3_text", chosen by `qk_norm`) for
  `family="gemma"`: norm weights as stored (w of x̂·(1 + w)); `ln_post_attn` is HF's
  `post_attention_layernorm`, `ln_2` its `pre_feedforward_layernorm`.

To export a LoRA/DoRA fine-tune, merge first: `export_hf(merge_lora(base, adapters, cfg), ...)`.
No tokenizer files are written; copy the tokenizer of the base checkpoint alongside.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from jaxalign.models.config import TransformerConfig
from jaxalign.models.transformer import unstack_layers

_DTYPES = {"float32": np.float32, "float16": np.float16}


def _np(x, dtype) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32).astype(dtype))


def _rotate_half_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Permutes the rows of a q/k weight [heads·H, ...] from interleaved pairs to HF halves."""
    h = w.shape[0] // heads
    rest = w.shape[1:]
    return w.reshape(heads, h // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def gpt2_state_dict(
    params: dict[str, Any], config: TransformerConfig, dtype=np.float32
) -> dict[str, np.ndarray]:
    """HF `GPT2LMHeadModel` tensors (names with the "transformer." prefix) from jaxalign params."""
    if config.kv_heads != config.n_heads:
        raise ValueError("GPT-2 export: grouped-query attention has no GPT2LMHeadModel equivalent")
    d = config.d_model
    state: dict[str, np.ndarray] = {
        "transformer.wte.weight": _np(params["embed"]["embedding"], dtype),
        "transformer.wpe.weight": _np(params["pos_embed"]["embedding"], dtype),
        "transformer.ln_f.weight": _np(params["ln_f"]["scale"], dtype),
        "transformer.ln_f.bias": _np(params["ln_f"]["bias"], dtype),
    }
    for i in range(config.n_layers):
        layer, p = params[f"layers_{i}"], f"transformer.h.{i}."
        attn, mlp = layer["attn"], layer["mlp"]
        for ln in ("ln_1", "ln_2"):
            state[p + f"{ln}.weight"] = _np(layer[ln]["scale"], dtype)
            state[p + f"{ln}.bias"] = _np(layer[ln]["bias"], dtype)
        qkv = [np.asarray(attn[n]["kernel"]).reshape(d, -1) for n in ("wq", "wk", "wv")]
        state[p + "attn.c_attn.weight"] = _np(np.concatenate(qkv, axis=1), dtype)  # [D, 3D]
        state[p + "attn.c_attn.bias"] = _np(
            np.concatenate([np.asarray(attn[n]["bias"]).reshape(-1) for n in ("wq", "wk", "wv")]), dtype
        )
        state[p + "attn.c_proj.weight"] = _np(np.asarray(attn["wo"]["kernel"]).reshape(-1, d), dtype)
        state[p + "attn.c_proj.bias"] = _np(attn["wo"]["bias"], dtype)
        state[p + "mlp.c_fc.weight"] = _np(mlp["up"]["kernel"], dtype)  # [D, F]
        state[p + "mlp.c_fc.bias"] = _np(mlp["up"]["bias"], dtype)
        state[p + "mlp.c_proj.weight"] = _np(mlp["down"]["kernel"], dtype)  # [F, D]
        state[p + "mlp.c_proj.bias"] = _np(mlp["down"]["bias"], dtype)
    if not config.tie_embeddings:
        state["lm_head.weight"] = _np(np.asarray(params["lm_head"]["kernel"]).T, dtype)  # [V, D]
    return state


def gpt2_hf_config(config: TransformerConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """A GPT2Config dict for `config` (dropout off: exported for inference and fine-tuning)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.max_seq_len,
        "n_ctx": config.max_seq_len,
        "n_embd": config.d_model,
        "n_layer": config.n_layers,
        "n_head": config.n_heads,
        "n_inner": config.d_ff,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.norm_eps,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": config.tie_embeddings,
        # GPT-2's <|endoftext|> id where the vocabulary has it (HF's default would be out of range).
        "bos_token_id": 50256 if config.vocab_size > 50256 else None,
        "eos_token_id": 50256 if config.vocab_size > 50256 else None,
        "torch_dtype": torch_dtype,
    }


def _llama_model_type(config: TransformerConfig) -> str:
    """The HF model_type that holds `config` exactly.

    Raises:
      ValueError: a combination no HF class of these families has (the message says which).
    """
    if config.mla is not None:
        return _deepseek_model_type(config)
    if config.moe is not None:
        return _moe_model_type(config)
    if config.family == "gemma":
        if config.qkv_bias:
            raise ValueError("export: HF Gemma's attention_bias also biases o_proj; qkv_bias has no class")
        if config.qk_norm and config.attn_softcap is not None:
            raise ValueError("export: Gemma with q/k norms and attention soft-capping has no HF class")
        if not config.qk_norm and config.rope_local_theta is not None:
            raise ValueError("export: Gemma 2 has no separate local RoPE θ (rope_local_theta)")
        return "gemma3_text" if config.qk_norm else "gemma2"
    if config.layer_types is not None or config.attn_softcap or config.final_softcap:
        raise ValueError("export: layer_types / soft-capping in the llama family have no HF class here")
    if config.qk_norm:
        if config.qkv_bias or config.sliding_window is not None:
            raise ValueError("export: Qwen3 (qk_norm) with q/k/v biases or a sliding window is not exported")
        return "qwen3"
    if config.head_size is not None:
        raise ValueError("export: a head_size other than d_model / n_heads needs qk_norm (Qwen3) here")
    if config.qkv_bias and config.sliding_window is not None:
        raise ValueError("export: q/k/v biases with a sliding window have no HF equivalent here")
    if config.qkv_bias:
        return "qwen2"
    return "mistral" if config.sliding_window is not None else "llama"


def llama_state_dict(
    params: dict[str, Any], config: TransformerConfig, dtype=np.float32
) -> dict[str, np.ndarray]:
    """HF Llama-family tensors ("model." prefix, nn.Linear [out, in]) from jaxalign params."""
    d, n, k, h = config.d_model, config.n_heads, config.kv_heads, config.head_dim

    def linear(kernel, rows: int) -> np.ndarray:  # jaxalign [in, ...] -> HF [out, in]
        return np.asarray(kernel, dtype=np.float32).reshape(rows, -1).T

    state: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": _np(params["embed"]["embedding"], dtype),
        "model.norm.weight": _np(params["ln_f"]["scale"], dtype),
    }
    for i in range(config.n_layers):
        layer, p = params[f"layers_{i}"], f"model.layers.{i}."
        attn = layer["attn"]
        state[p + "input_layernorm.weight"] = _np(layer["ln_1"]["scale"], dtype)
        if config.sandwich_norms:  # Gemma's names: see the module docstring
            state[p + "post_attention_layernorm.weight"] = _np(layer["ln_post_attn"]["scale"], dtype)
            state[p + "pre_feedforward_layernorm.weight"] = _np(layer["ln_2"]["scale"], dtype)
            state[p + "post_feedforward_layernorm.weight"] = _np(layer["ln_post_mlp"]["scale"], dtype)
        else:
            state[p + "post_attention_layernorm.weight"] = _np(layer["ln_2"]["scale"], dtype)
        if config.qk_norm:
            state[p + "self_attn.q_norm.weight"] = _np(attn["q_norm"]["scale"], dtype)
            state[p + "self_attn.k_norm.weight"] = _np(attn["k_norm"]["scale"], dtype)
        if config.mla is not None:
            state.update(mla_state_dict(attn, config, p + "self_attn.", dtype))
        for name, heads, rope in () if config.mla is not None else (("q", n, True), ("k", k, True), ("v", k, False)):
            proj = attn[f"w{name}"]
            w = linear(proj["kernel"], d)  # [heads·H, D]
            b = np.asarray(proj["bias"], np.float32).reshape(-1) if config.qkv_bias else None
            if rope and config.rope_interleaved:
                w = _rotate_half_rows(w, heads)
                b = None if b is None else _rotate_half_rows(b, heads)
            state[p + f"self_attn.{name}_proj.weight"] = _np(w, dtype)
            if b is not None:
                state[p + f"self_attn.{name}_proj.bias"] = _np(b, dtype)
        if config.mla is None:
            state[p + "self_attn.o_proj.weight"] = _np(linear(attn["wo"]["kernel"], n * h), dtype)  # [D, N·H]
        if config.is_moe_layer(i):
            state.update(moe_state_dict(layer["moe"], config, p, dtype))
        else:
            for name in ("gate", "up", "down"):
                state[p + f"mlp.{name}_proj.weight"] = _np(np.asarray(layer["mlp"][name]["kernel"]).T, dtype)
    if not config.tie_embeddings:
        state["lm_head.weight"] = _np(np.asarray(params["lm_head"]["kernel"]).T, dtype)  # [V, D]
    return state


def mla_state_dict(attn: dict[str, Any], config: TransformerConfig, attn_prefix: str,
                   dtype=np.float32) -> dict[str, np.ndarray]:
    """One `MLAttention` layer's params as HF `DeepseekV3Attention` tensors (transformers 5.25;
    the inverse of `hf.mla_params_from_state_dict`): weight = kernel flattened to [in, out], then
    transposed to nn.Linear's [out, in]."""
    d = config.d_model

    def linear(kernel, rows: int) -> np.ndarray:  # jaxalign [in..., out...] -> HF [out, in]
        return _np(np.asarray(kernel, dtype=np.float32).reshape(rows, -1).T, dtype)

    m, p = config.mla, attn_prefix
    state: dict[str, np.ndarray] = {}
    if m.q_lora_rank is None:
        state[p + "q_proj.weight"] = linear(attn["q"]["kernel"], d)
    else:
        state[p + "q_a_proj.weight"] = linear(attn["q_a"]["kernel"], d)
        state[p + "q_a_layernorm.weight"] = _np(attn["q_a_norm"]["scale"], dtype)
        state[p + "q_b_proj.weight"] = linear(attn["q_b"]["kernel"], m.q_lora_rank)
        if m.attention_bias:
            state[p + "q_a_proj.bias"] = _np(attn["q_a"]["bias"], dtype)
    state[p + "kv_a_proj_with_mqa.weight"] = linear(attn["kv_a"]["kernel"], d)
    state[p + "kv_a_layernorm.weight"] = _np(attn["kv_a_norm"]["scale"], dtype)
    state[p + "kv_b_proj.weight"] = linear(attn["kv_b"]["kernel"], m.kv_lora_rank)
    state[p + "o_proj.weight"] = linear(attn["o"]["kernel"], m.n_heads * m.v_head_dim)
    if m.attention_bias:
        state[p + "kv_a_proj_with_mqa.bias"] = _np(attn["kv_a"]["bias"], dtype)
        state[p + "o_proj.bias"] = _np(attn["o"]["bias"], dtype)
    return state


def moe_state_dict(moe: dict[str, Any], config: TransformerConfig, layer_prefix: str,
                   dtype=np.float32) -> dict[str, np.ndarray]:
    """One MoE layer's HF tensors in the per-expert layout `save_pretrained` writes (transformers
    5.25; `from_pretrained` fuses them): Mixtral `block_sparse_moe.gate.weight` [E, D] and
    `block_sparse_moe.experts.{e}.w1/w3/w2.weight` [F, D], [F, D], [D, F]; Qwen2/3-MoE and
    DeepSeek-V3 `mlp.gate.weight`, `mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`; Qwen2-MoE's
    `mlp.shared_expert.{gate,up,down}_proj.weight` and `mlp.shared_expert_gate.weight` [1, D];
    DeepSeek-V3's `mlp.shared_experts.{gate,up,down}_proj.weight` and
    `mlp.gate.e_score_correction_bias` [E] (float32 whatever `dtype`, as HF keeps it)."""
    mixtral = _llama_model_type(config) == "mixtral"
    p = layer_prefix + ("block_sparse_moe." if mixtral else "mlp.")
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    state = {p + "gate.weight": _np(np.asarray(moe["router"]["kernel"]).T, dtype)}
    for ours, theirs in zip(("gate", "up", "down"), names):
        kernel = np.asarray(moe[ours]["kernel"])  # [E, in, out]
        for e in range(kernel.shape[0]):
            state[p + f"experts.{e}.{theirs}.weight"] = _np(kernel[e].T, dtype)
    if "shared" in moe:
        shared = "shared_experts" if config.mla is not None else "shared_expert"  # DeepSeek's plural
        for name in ("gate", "up", "down"):
            state[p + f"{shared}.{name}_proj.weight"] = _np(np.asarray(moe["shared"][name]["kernel"]).T, dtype)
    if "shared_gate" in moe:
        state[p + "shared_expert_gate.weight"] = _np(np.asarray(moe["shared_gate"]["kernel"]).T, dtype)
    if "bias" in moe:
        state[p + "gate.e_score_correction_bias"] = _np(moe["bias"], np.float32)
    return state


def _deepseek_model_type(config: TransformerConfig) -> str:
    """"deepseek_v3" when `DeepseekV3ForCausalLM` holds an MLA `config` exactly.

    Raises:
      ValueError: what that class lacks: routing other than sigmoid with the selection bias, a
        gated shared expert or one not a whole number of experts wide, dense layers other than
        the first k (`first_k_dense_replace`), or tied embeddings.
    """
    if config.tie_embeddings:
        raise ValueError("export: DeepseekV3ForCausalLM has an untied lm_head")
    m = config.moe
    if m is None:
        return "deepseek_v3"  # every layer dense: first_k_dense_replace = n_layers
    if m.router != "sigmoid" or not m.router_bias or m.shared_gate:
        raise ValueError("export: DeepSeek-V3 routes with sigmoid scores and a selection bias, no shared gate")
    if m.shared_d_ff % m.moe_d_ff:
        raise ValueError(f"export: DeepSeek-V3's shared width {m.shared_d_ff} is not a multiple of "
                         f"moe_d_ff={m.moe_d_ff} (n_shared_experts)")
    layers = config.moe_layer_indices
    if layers != tuple(range(layers[0], config.n_layers)):
        raise ValueError(f"export: DeepSeek-V3 has dense layers only before the first MoE one, got moe_layers={layers}")
    return "deepseek_v3"


def _deepseek_fields(config: TransformerConfig) -> dict[str, Any]:
    """The DeepSeek-V3 config.json fields (transformers 5.25 `DeepseekV3Config`) beyond the Llama
    ones; YaRN in v5's `rope_parameters` only (`rope_scaling` None, so that no reader has two
    sources to reconcile)."""
    a, m = config.mla, config.moe
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": a.rope_theta}
    if a.yarn is not None:
        y = a.yarn
        rope = {"rope_type": "yarn", "rope_theta": a.rope_theta, "factor": y.factor,
                "original_max_position_embeddings": y.original_max_position, "beta_fast": y.beta_fast,
                "beta_slow": y.beta_slow, "mscale": y.mscale, "mscale_all_dim": y.mscale_all_dim,
                "truncate": y.truncate}
        if y.attention_factor is not None:
            rope["attention_factor"] = y.attention_factor
    f = config.ff_dim if m is None else m.moe_d_ff
    out: dict[str, Any] = {
        "num_key_value_heads": config.n_heads,  # HF repeats K/V by num_heads / num_key_value_heads
        "kv_lora_rank": a.kv_lora_rank, "q_lora_rank": a.q_lora_rank, "qk_nope_head_dim": a.qk_nope_head_dim,
        "qk_rope_head_dim": a.qk_rope_head_dim, "v_head_dim": a.v_head_dim, "head_dim": a.qk_rope_head_dim,
        "rope_interleave": a.rope_interleaved, "attention_bias": a.attention_bias,
        "rope_parameters": rope, "rope_scaling": None,
        "first_k_dense_replace": config.n_layers if m is None else config.moe_layer_indices[0],
        "moe_intermediate_size": f, "num_nextn_predict_layers": 0,
        "n_routed_experts": 1 if m is None else m.num_experts,
        "num_experts_per_tok": 1 if m is None else m.experts_per_token,
        "n_shared_experts": 0 if m is None else m.shared_d_ff // m.moe_d_ff,
        "routed_scaling_factor": 1.0 if m is None else m.routed_scale,
        "n_group": 1 if m is None else m.n_group, "topk_group": 1 if m is None else m.topk_group,
        "norm_topk_prob": True if m is None else m.norm_topk_prob,
    }
    return out


def _moe_model_type(config: TransformerConfig) -> str:
    """"mixtral", "qwen2_moe" or "qwen3_moe": the HF class that holds an MoE `config` exactly.

    Raises:
      ValueError: routing or a layer mix none of them has (sigmoid / grouped / biased / scaled
        routing, a shared expert outside Qwen2-MoE, dense layers in Mixtral, ...).
    """
    m = config.moe
    if m.router != "softmax" or m.n_group > 1 or m.router_bias or m.routed_scale != 1.0:
        raise ValueError("export: only softmax top-k routing (Mixtral / Qwen-MoE) is exported, "
                         "not DeepSeek's sigmoid / grouped / biased / scaled routing")
    if config.qk_norm:
        if config.qkv_bias or m.shared_d_ff or config.sliding_window is not None:
            raise ValueError("export: Qwen3-MoE (qk_norm) has no q/k/v biases, shared expert or sliding window")
        return "qwen3_moe"
    if config.head_size is not None and config.qkv_bias:
        raise ValueError("export: Qwen2-MoE needs head_dim = d_model / n_heads")
    if config.qkv_bias:
        if not (m.shared_d_ff and m.shared_gate) or config.sliding_window is not None:
            raise ValueError("export: Qwen2-MoE (qkv_bias) needs a gated shared expert and no sliding window")
        return "qwen2_moe"
    if m.shared_d_ff or config.moe_layers is not None or not m.norm_topk_prob:
        raise ValueError("export: Mixtral has no shared expert, no dense layers and renormalised top-k")
    return "mixtral"


def _moe_fields(config: TransformerConfig, model_type: str) -> dict[str, Any]:
    """The Mixtral / Qwen2-MoE / Qwen3-MoE config.json fields beyond the Llama ones."""
    m = config.moe
    out: dict[str, Any] = {"num_experts_per_tok": m.experts_per_token, "router_jitter_noise": 0.0,
                           "output_router_logits": False, "router_aux_loss_coef": 0.001}
    if model_type == "mixtral":
        return {**out, "num_local_experts": m.num_experts, "intermediate_size": m.moe_d_ff,
                "sliding_window": config.sliding_window}
    out.update(num_experts=m.num_experts, moe_intermediate_size=m.moe_d_ff, norm_topk_prob=m.norm_topk_prob,
               decoder_sparse_step=1, use_sliding_window=False, sliding_window=None,
               mlp_only_layers=[i for i in range(config.n_layers) if not config.is_moe_layer(i)])
    if model_type == "qwen2_moe":
        out.update(shared_expert_intermediate_size=m.shared_d_ff, qkv_bias=True)
    return out


def _rope_dicts(theta: float, scaling) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(v5 `rope_parameters`, v4 `rope_scaling`) for one RoPE setting."""
    if scaling is None:
        return {"rope_type": "default", "rope_theta": theta}, None
    if scaling.rope_type == "linear":
        legacy = {"rope_type": "linear", "factor": scaling.factor}
    else:
        legacy = {
            "rope_type": "llama3",
            "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position,
        }
    return {**legacy, "rope_theta": theta}, legacy


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM", "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}


def _integral(x: float) -> int:
    """`x` as an int, which HF's strict Gemma config classes require.

    Raises:
      ValueError: `x` is not a whole number.
    """
    if float(x) != int(x):
        raise ValueError(f"export: Gemma's query_pre_attn_scalar must be a whole number, got {x}")
    return int(x)


def _gemma_fields(config: TransformerConfig, model_type: str) -> dict[str, Any]:
    """The Gemma 2/3 config.json fields beyond the Llama ones."""
    kinds = config.layer_types or ("sliding" if config.sliding_window else "full",) * config.n_layers
    out: dict[str, Any] = {
        "hidden_activation": "gelu_pytorch_tanh",
        # HF's config class declares an int; a fractional scalar would not load there.
        "query_pre_attn_scalar": _integral(config.query_pre_attn_scalar or config.head_dim),
        "attn_logit_softcapping": config.attn_softcap,
        "final_logit_softcapping": config.final_softcap,
        "sliding_window": config.sliding_window,
        "layer_types": [f"{kind}_attention" for kind in kinds],
    }
    if model_type == "gemma3_text":
        local = config.rope_local_theta or config.rope_theta
        local_scaling = None if config.rope_local_theta is not None else config.rope_scaling
        out["rope_parameters"] = {
            "full_attention": _rope_dicts(config.rope_theta, config.rope_scaling)[0],
            "sliding_attention": _rope_dicts(local, local_scaling)[0],
        }
        out["rope_local_base_freq"] = local
    return out


def llama_hf_config(config: TransformerConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """A Llama / Qwen2 / Qwen3 / Mistral / Gemma 2 / Gemma 3 (text) config dict for `config`.

    RoPE settings are written both as transformers v5 `rope_parameters` and as the v4 keys
    `rope_theta` / `rope_scaling` (Gemma 3: v5's per-layer-type dict and `rope_local_base_freq`).

    Raises:
      ValueError: a config no HF class of these families holds (see `_llama_model_type`).
    """
    model_type = _llama_model_type(config)
    rope, scaling = _rope_dicts(config.rope_theta, config.rope_scaling)
    out: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ff_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "rope_theta": config.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": rope,
        "torch_dtype": torch_dtype,
    }
    if model_type == "mistral":
        out["sliding_window"] = config.sliding_window
    if model_type in ("qwen2", "qwen3"):
        out["use_sliding_window"] = False
        out["sliding_window"] = None
        out["max_window_layers"] = config.n_layers
    if model_type in ("gemma2", "gemma3_text"):
        out.update(_gemma_fields(config, model_type))
    if model_type == "deepseek_v3":
        out.update(_deepseek_fields(config))
    elif config.moe is not None:
        out.update(_moe_fields(config, model_type))
    return out


def export_hf(
    params: dict[str, Any],
    config: TransformerConfig,
    directory: str | os.PathLike,
    *,
    dtype: str = "float32",
) -> Path:
    """Writes `config.json` and `model.safetensors` for `transformers.AutoModelForCausalLM`.

    Args:
      params: a plain jaxalign parameter tree (merge LoRA adapters first with `merge_lora`), in
        the layout of `config` (stacked "layers" when `config.scan_layers`).
      config: the model's `TransformerConfig`.
      directory: created if missing; existing files of the same names are overwritten.
      dtype: "float32" or "float16" (safetensors' NumPy writer has no bfloat16; bfloat16 params
        are widened to float32 exactly).

    Returns:
      The directory as a `Path`.

    Raises:
      ValueError: an unknown dtype, or a model with no HF equivalent (GPT-2 with grouped-query
        attention; q/k/v biases together with a sliding window; the other combinations
        `_llama_model_type` names).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"export_hf: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    np_dtype = _DTYPES[dtype]
    if config.scan_layers:  # Hugging Face's layout is per layer
        params = unstack_layers(params, config)
    # the config first: a model with no HF class is refused before any tensor is converted
    if config.family == "gpt2":
        hf = gpt2_hf_config(config, dtype)
        state = gpt2_state_dict(params, config, np_dtype)
    else:
        hf = llama_hf_config(config, dtype)
        state = llama_state_dict(params, config, np_dtype)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    safetensors.numpy.save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
