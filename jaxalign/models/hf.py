"""Import Hugging Face `transformers` checkpoints into jaxalign parameter pytrees.

Supported: `GPT2LMHeadModel`, `LlamaForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`,
`MistralForCausalLM`, `Gemma2ForCausalLM`, `Gemma3ForCausalLM` (model_type "gemma3_text"),
`MixtralForCausalLM`, `Qwen2MoeForCausalLM`, `Qwen3MoeForCausalLM` and `DeepseekV3ForCausalLM`
(MLA attention with YaRN, DeepSeek MoE) directories holding `config.json` and either `model.safetensors` (possibly sharded with
`model.safetensors.index.json`) or `pytorch_model.bin`.
The `.bin` reader unpickles only tensor storage records (no torch import, no arbitrary code).
Online users may pass a hub id ("gpt2", "openai-community/gpt2-medium"); it is fetched with
`huggingface_hub.snapshot_download`.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from jaxalign.models.config import RopeScaling, TransformerConfig, moe_layers_from_hf
from jaxalign.models.mla import MLAConfig, YarnScaling
from jaxalign.models.moe import MoEConfig
from jaxalign.models.transformer import stack_layers

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def resolve_checkpoint_dir(path_or_hub_id: str | os.PathLike) -> Path:
    """Returns a local directory for a checkpoint path or (online) a Hugging Face hub id.

    Raises:
      FileNotFoundError: a local path that does not exist, or a directory without weights.
    """
    path = Path(path_or_hub_id)
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: expected a checkpoint directory, got a file")
        return path
    text = str(path_or_hub_id)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    from huggingface_hub import snapshot_download  # installed with `datasets`

    return Path(
        snapshot_download(text, allow_patterns=["config.json", "*.safetensors", "*.json", "*.bin"])
    )


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object read from `path`.

    Raises:
      ValueError: the file is not UTF-8, not valid JSON (the message names the file, the line and
        the column), or holds something other than a JSON object.
    """
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from err
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: line {err.lineno}, column {err.colno}: not valid JSON "
            f"({err.msg.removesuffix(' starting at')})"
        ) from err
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got a JSON {type(value).__name__}")
    return value


def _read_config(directory: Path) -> dict[str, Any]:
    config_path = directory / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path}: missing (every HF checkpoint has a config.json)")
    return _read_json(config_path)


class _TorchUnpickler(pickle.Unpickler):
    """Unpickles a torch zip checkpoint into NumPy arrays, refusing every non-tensor global."""

    _DTYPES = {
        "FloatStorage": np.float32,
        "HalfStorage": np.float16,
        "DoubleStorage": np.float64,
        "LongStorage": np.int64,
        "IntStorage": np.int32,
        "BoolStorage": np.bool_,
        "ByteStorage": np.uint8,
    }

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive, self._prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "torch" and name in self._DTYPES:
            return self._DTYPES[name]
        if module == "torch" and name == "BFloat16Storage":
            raise ValueError("pytorch_model.bin holds bfloat16 tensors; convert it to safetensors")
        raise pickle.UnpicklingError(f"pytorch_model.bin: refusing to load global {module}.{name}")

    def persistent_load(self, pid):
        _, dtype, key, _location, _numel = pid
        raw = self._archive.read(f"{self._prefix}/data/{key}")
        return np.frombuffer(raw, dtype=dtype)

    @staticmethod
    def _rebuild_tensor(storage, offset, size, stride, *_):
        itemsize = storage.dtype.itemsize
        return np.lib.stride_tricks.as_strided(
            storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
        ).copy()


def _load_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            if pkl is None:
                raise ValueError(f"{path}: no data.pkl in the zip archive (not a torch.save file)")
            prefix = pkl[: -len("/data.pkl")]
            with archive.open(pkl) as f:
                return dict(_TorchUnpickler(f, archive, prefix).load())
    except (zipfile.BadZipFile, EOFError, KeyError) as err:  # KeyError: a missing data/ record
        raise ValueError(f"{path}: not a readable torch checkpoint (truncated?): {err}") from err
    except (pickle.UnpicklingError, ValueError) as err:
        if str(err).startswith(str(path)):
            raise
        detail = str(err).removeprefix("pytorch_model.bin: ").removeprefix("pytorch_model.bin ")
        raise ValueError(f"{path}: {detail}") from err


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of one .safetensors file; a truncated or malformed file raises ValueError."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such safetensors file")
    try:
        return safetensors.numpy.load_file(path)
    except safetensors.SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file (truncated?): {err}") from err


def check_finite(state: Mapping[str, np.ndarray], source: str | os.PathLike) -> None:
    """Checks that every floating-point tensor of `state` holds only finite values.

    One pass per tensor, with no temporary arrays: `min` and `max` propagate NaN and reach ±inf.

    Raises:
      ValueError: `"{source}: tensor '{name}' holds NaN or inf ..."` for the first bad tensor in
        `state`'s order.
    """
    for name, value in state.items():
        value = np.asarray(value)
        if value.size == 0 or not np.issubdtype(value.dtype, np.inexact):
            continue
        if not (np.isfinite(value.min()) and np.isfinite(value.max())):
            bad = ~np.isfinite(value)
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{source}: tensor {name!r} holds NaN or inf ({int(bad.sum())} of {value.size} "
                f"values; first at index {first}: {value[first]})"
            )


def load_state_dict(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads every tensor of a HF checkpoint directory as NumPy arrays (name -> array).

    Raises:
      FileNotFoundError: none of model.safetensors, its index, or pytorch_model.bin is present,
        or a shard the index names is missing.
      ValueError: a weight file (or the index) that cannot be read, e.g. a truncated
        model.safetensors, or a tensor holding NaN or inf; the message names the file (and the
        tensor, by its checkpoint name such as `transformer.h.0.attn.c_attn.weight`).
    """
    directory = Path(directory)
    if (directory / "model.safetensors").exists():
        files = [directory / "model.safetensors"]
    elif (index := directory / "model.safetensors.index.json").exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: field 'weight_map' is missing or empty")
        files = [directory / shard for shard in sorted(set(weight_map.values()))]
    elif (directory / "pytorch_model.bin").exists():
        state = _load_torch_bin(directory / "pytorch_model.bin")
        check_finite(state, directory / "pytorch_model.bin")
        return state
    else:
        raise FileNotFoundError(f"{directory}: no weights found (looked for {', '.join(_WEIGHT_FILES)})")
    state: dict[str, np.ndarray] = {}
    for file in files:
        tensors = _load_safetensors(file)
        check_finite(tensors, file)
        state.update(tensors)
    return state


def _tensor_getter(state: Mapping[str, np.ndarray], prefix: str, config: TransformerConfig):
    """`get(name, shape, full=False)`: the tensor `prefix + name` (or `name` with full=True) as a
    `config.param_dtype` array, after checking that it exists and has `shape`.

    The returned function raises KeyError (missing tensor) or ValueError (wrong shape), naming it.
    """

    def get(name: str, shape: tuple[int, ...], full: bool = False) -> jnp.ndarray:
        key = name if full else prefix + name
        if key not in state:
            raise KeyError(f"checkpoint is missing tensor {key!r}")
        value = np.asarray(state[key])
        if value.shape != shape:
            raise ValueError(f"checkpoint tensor {key!r} has shape {value.shape}, expected {shape}")
        return jnp.asarray(value, dtype=config.param_dtype)

    return get


def gpt2_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> TransformerConfig:
    """Maps a Hugging Face GPT2Config dict to a `TransformerConfig`.

    Raises:
      ValueError: an activation other than GPT-2's tanh GELU, or a non-GPT-2 model_type.
    """
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"config.json: model_type {hf.get('model_type')!r} is not 'gpt2'")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"config.json: activation_function {act!r} unsupported (need gelu_new)")
    return TransformerConfig(
        family="gpt2",
        vocab_size=hf["vocab_size"],
        max_seq_len=hf["n_positions"],
        d_model=hf["n_embd"],
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or None,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        **overrides,
    )


def gpt2_params_from_state_dict(
    state: Mapping[str, np.ndarray], config: TransformerConfig
) -> dict[str, Any]:
    """Converts GPT-2 tensors (HF names, Conv1D [in, out] layout) to jaxalign parameters.

    Raises:
      KeyError: a tensor the model needs is missing (the message names it).
      ValueError: a tensor's shape disagrees with `config`.
    """
    get = _tensor_getter(state, "transformer." if "transformer.wte.weight" in state else "", config)
    d, n, h = config.d_model, config.n_heads, config.head_dim

    def ln(name: str) -> dict[str, jnp.ndarray]:
        return {"scale": get(f"{name}.weight", (d,)), "bias": get(f"{name}.bias", (d,))}

    params: dict[str, Any] = {
        "embed": {"embedding": get("wte.weight", (config.vocab_size, d))},
        "pos_embed": {"embedding": get("wpe.weight", (config.max_seq_len, d))},
        "ln_f": ln("ln_f"),
    }
    for i in range(config.n_layers):
        p = f"h.{i}."
        qkv_w = get(p + "attn.c_attn.weight", (d, 3 * d))  # Conv1D: [in, out]
        qkv_b = get(p + "attn.c_attn.bias", (3 * d,))
        wq, wk, wv = jnp.split(qkv_w, 3, axis=1)
        bq, bk, bv = jnp.split(qkv_b, 3)
        params[f"layers_{i}"] = {
            "ln_1": ln(p + "ln_1"),
            "ln_2": ln(p + "ln_2"),
            "attn": {
                "wq": {"kernel": wq.reshape(d, n, h), "bias": bq.reshape(n, h)},
                "wk": {"kernel": wk.reshape(d, n, h), "bias": bk.reshape(n, h)},
                "wv": {"kernel": wv.reshape(d, n, h), "bias": bv.reshape(n, h)},
                "wo": {
                    "kernel": get(p + "attn.c_proj.weight", (d, d)).reshape(n, h, d),
                    "bias": get(p + "attn.c_proj.bias", (d,)),
                },
            },
            "mlp": {
                "up": {
                    "kernel": get(p + "mlp.c_fc.weight", (d, config.ff_dim)),
                    "bias": get(p + "mlp.c_fc.bias", (config.ff_dim,)),
                },
                "down": {
                    "kernel": get(p + "mlp.c_proj.weight", (config.ff_dim, d)),
                    "bias": get(p + "mlp.c_proj.bias", (d,)),
                },
            },
        }
    if not config.tie_embeddings:
        params["lm_head"] = {"kernel": get("lm_head.weight", (config.vocab_size, d), full=True).T}
    return params


_LLAMA_TYPES = ("llama", "qwen2", "qwen3", "mistral")
_GEMMA_TYPES = ("gemma2", "gemma3_text")
_MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
_DEEPSEEK_TYPES = ("deepseek_v3",)
_HF_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


def _rope_kind(hf: Mapping[str, Any]) -> tuple[str, dict[str, Any], str]:
    """(the config.json field naming the RoPE type, e.g. "rope_scaling.rope_type", the dict
    holding the scaling settings, the type): v4's `rope_scaling` wins over v5's
    `rope_parameters` when both are present, as HF's config conversion reads it; "default"
    when neither names a type."""
    for name in ("rope_scaling", "rope_parameters"):
        block = hf.get(name)
        if isinstance(block, Mapping) and ("rope_type" in block or "type" in block):
            key = "rope_type" if "rope_type" in block else "type"
            return f"{name}.{key}", dict(block), str(block[key])
    return "rope_parameters.rope_type", {}, "default"


def _rope_settings(
    hf: Mapping[str, Any], default_theta: float = 10000.0
) -> tuple[float, RopeScaling | None]:
    """RoPE θ and scaling from either the pre-v5 keys (rope_theta, rope_scaling) or v5's
    `rope_parameters` (one dict; see `_gemma3_rope` for the per-layer-type form).

    Raises:
      ValueError: a RoPE scaling type other than "default", "linear" and "llama3".
    """
    params = dict(hf.get("rope_parameters") or {})
    theta = float(hf.get("rope_theta", params.get("rope_theta", default_theta)))
    field, scaling, kind = _rope_kind(hf)
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling(factor=float(scaling["factor"]), rope_type="linear")
    if kind != "llama3":
        raise ValueError(
            f"config.json: field {field} = {kind!r}: this RoPE scaling is not implemented for "
            f"{hf.get('model_type')!r} (default, linear, llama3)"
        )
    return theta, RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position=int(scaling["original_max_position_embeddings"]),
    )


def _head_size(hf: Mapping[str, Any]) -> int | None:
    """`head_size` for a config.json whose `head_dim` is not hidden_size / num_heads."""
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    return None if head_dim in (None, d // n) and d % n == 0 else int(head_dim)


def _decoder_shape(hf: Mapping[str, Any], *, max_positions: int, tied: bool) -> dict[str, Any]:
    """The `TransformerConfig` sizes every Llama-style config.json spells the same way; defaults
    (`max_positions`, `tied`, RMSNorm ε 1e-6) where the file omits a field, as HF's classes do.

    Raises:
      KeyError: a required size (vocab_size, hidden_size, ...) is missing.
    """
    n = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("max_position_embeddings", max_positions),
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n,
        n_kv_heads=hf.get("num_key_value_heads") or n,
        d_ff=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", tied),
    )


def llama_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> TransformerConfig:
    """Maps a Hugging Face Llama / Qwen2 / Mistral config dict to a `TransformerConfig`.

    Raises:
      ValueError: a model_type, activation, head_dim or RoPE scaling this model does not support.
    """
    model_type = hf.get("model_type")
    if model_type not in _LLAMA_TYPES:
        raise ValueError(f"config.json: model_type {model_type!r} is not one of {_LLAMA_TYPES}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} unsupported (need silu)")
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d // n) and model_type != "qwen3":
        raise ValueError(f"config.json: head_dim {hf['head_dim']} != hidden_size / num_heads")
    theta, scaling = _rope_settings(hf)
    window = hf.get("sliding_window") if model_type == "mistral" else None
    if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        raise ValueError(f"config.json: {model_type} per-layer sliding windows are not supported")
    return TransformerConfig(
        family="llama",
        **_decoder_shape(hf, max_positions=2048, tied=False),
        qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        rope_theta=theta,
        rope_interleaved=False,  # HF permutes q/k rows so that rotate_half applies
        rope_scaling=scaling,
        sliding_window=window,
        head_size=_head_size(hf) if model_type == "qwen3" else None,
        qk_norm=model_type == "qwen3",
        **overrides,
    )


def _gemma_layer_types(hf: Mapping[str, Any], model_type: str) -> tuple[str, ...]:
    """Per-layer "full"/"sliding" from config.json's `layer_types`, else the family's pattern
    (Gemma 2: sliding, full, ...; Gemma 3: `sliding_window_pattern` = 6, every 6th layer full),
    as transformers 5 derives it."""
    n_layers = hf["num_hidden_layers"]
    names = hf.get("layer_types")
    if names is None:
        every = 2 if model_type == "gemma2" else int(hf.get("sliding_window_pattern", 6))
        return tuple("sliding" if (i + 1) % every else "full" for i in range(n_layers))
    if len(names) != n_layers or any(x not in _HF_LAYER_TYPES for x in names):
        raise ValueError(
            f"config.json: layer_types must list {n_layers} of {sorted(_HF_LAYER_TYPES)}, got {names}"
        )
    return tuple(_HF_LAYER_TYPES[x] for x in names)


def _gemma3_rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None, float]:
    """(global θ, global scaling, local θ) of a Gemma 3 config: transformers 5 writes
    `rope_parameters` = {"full_attention": {...}, "sliding_attention": {...}}; v4 wrote
    `rope_theta`, `rope_scaling` and `rope_local_base_freq` (defaults 1e6 and 1e4)."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        theta, scaling = _rope_settings({"rope_parameters": params.get("full_attention")}, 1e6)
        local, local_scaling = _rope_settings(
            {"rope_parameters": params.get("sliding_attention")}, 1e4
        )
        if local_scaling is not None:
            raise ValueError("config.json: RoPE scaling on Gemma 3's sliding layers is not supported")
        return theta, scaling, local
    theta, scaling = _rope_settings(hf, 1e6)
    return theta, scaling, float(hf.get("rope_local_base_freq", 1e4))


def gemma_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> TransformerConfig:
    """Maps a Hugging Face Gemma 2 (`gemma2`) or Gemma 3 text (`gemma3_text`) config dict to a
    `TransformerConfig` (family "gemma"; HF defaults where config.json omits a field).

    Raises:
      ValueError: a model_type, activation or layer pattern this model does not support, or
        bidirectional attention (EmbeddingGemma).
    """
    model_type = hf.get("model_type")
    if model_type not in _GEMMA_TYPES:
        raise ValueError(f"config.json: model_type {model_type!r} is not one of {_GEMMA_TYPES}")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        raise ValueError(f"config.json: hidden_activation {act!r} unsupported (need gelu_pytorch_tanh)")
    if hf.get("use_bidirectional_attention"):
        raise ValueError("config.json: use_bidirectional_attention (EmbeddingGemma) is not supported")
    if hf.get("attention_bias"):  # HF Gemma then biases o_proj too, which this model lacks
        raise ValueError("config.json: attention_bias is not supported for Gemma")
    head_dim = int(hf.get("head_dim", 256))
    if model_type == "gemma2":
        (theta, scaling), local = _rope_settings(hf), None
        softcaps = (hf.get("attn_logit_softcapping", 50.0), hf.get("final_logit_softcapping", 30.0))
    else:
        theta, scaling, local = _gemma3_rope(hf)
        softcaps = (hf.get("attn_logit_softcapping"), hf.get("final_logit_softcapping"))
    return TransformerConfig(
        family="gemma",
        **_decoder_shape(hf, max_positions=8192, tied=True),
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=hf.get("sliding_window", 4096),
        head_size=head_dim,
        qk_norm=model_type == "gemma3_text",
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", head_dim)),
        attn_softcap=None if softcaps[0] is None else float(softcaps[0]),
        final_softcap=None if softcaps[1] is None else float(softcaps[1]),
        layer_types=_gemma_layer_types(hf, model_type),
        rope_local_theta=local,
        **overrides,
    )


def llama_params_from_state_dict(
    state: Mapping[str, np.ndarray], config: TransformerConfig
) -> dict[str, Any]:
    """Converts Llama-, Qwen3-, Gemma-, MoE- and DeepSeek-V3-family tensors (HF names,
    nn.Linear [out, in] layout) to jaxalign params (MLA attention: `mla_params_from_state_dict`). Gemma's norm weights are stored as HF stores them (w of x̂·(1 + w)); its
    `post_attention_layernorm` is the sandwich norm after attention (`ln_post_attn`) and
    `pre_feedforward_layernorm` the MLP's input norm (`ln_2`).

    Raises:
      KeyError: a tensor the model needs is missing (the message names it).
      ValueError: a tensor's shape disagrees with `config`.
    """
    d, n, k, h, f = config.d_model, config.n_heads, config.kv_heads, config.head_dim, config.ff_dim
    get = _tensor_getter(state, "model." if "model.embed_tokens.weight" in state else "", config)

    def proj(name: str, heads: int) -> dict[str, jnp.ndarray]:
        out = {"kernel": get(f"{name}.weight", (heads * h, d)).T.reshape(d, heads, h)}
        if config.qkv_bias:
            out["bias"] = get(f"{name}.bias", (heads * h,)).reshape(heads, h)
        return out

    params: dict[str, Any] = {
        "embed": {"embedding": get("embed_tokens.weight", (config.vocab_size, d))},
        "ln_f": {"scale": get("norm.weight", (d,))},
    }
    for i in range(config.n_layers):
        p = f"layers.{i}."
        if config.mla is not None:
            attn = mla_params_from_state_dict(get, p + "self_attn.", config)
        else:
            attn = {
                "wq": proj(p + "self_attn.q_proj", n),
                "wk": proj(p + "self_attn.k_proj", k),
                "wv": proj(p + "self_attn.v_proj", k),
                "wo": {"kernel": get(p + "self_attn.o_proj.weight", (d, n * h)).T.reshape(n, h, d)},
            }
        params[f"layers_{i}"] = {"ln_1": {"scale": get(p + "input_layernorm.weight", (d,))}, "attn": attn}
        layer = params[f"layers_{i}"]
        if config.is_moe_layer(i):
            layer["moe"] = moe_params_from_state_dict(state, get, p, config)
        else:
            layer["mlp"] = {
                "gate": {"kernel": get(p + "mlp.gate_proj.weight", (f, d)).T},
                "up": {"kernel": get(p + "mlp.up_proj.weight", (f, d)).T},
                "down": {"kernel": get(p + "mlp.down_proj.weight", (d, f)).T},
            }
        if config.sandwich_norms:
            layer["ln_2"] = {"scale": get(p + "pre_feedforward_layernorm.weight", (d,))}
            layer["ln_post_attn"] = {"scale": get(p + "post_attention_layernorm.weight", (d,))}
            layer["ln_post_mlp"] = {"scale": get(p + "post_feedforward_layernorm.weight", (d,))}
        else:
            layer["ln_2"] = {"scale": get(p + "post_attention_layernorm.weight", (d,))}
        if config.qk_norm:
            layer["attn"]["q_norm"] = {"scale": get(p + "self_attn.q_norm.weight", (h,))}
            layer["attn"]["k_norm"] = {"scale": get(p + "self_attn.k_norm.weight", (h,))}
    if not config.tie_embeddings:
        params["lm_head"] = {"kernel": get("lm_head.weight", (config.vocab_size, d), full=True).T}
    return params


def mla_params_from_state_dict(get, attn_prefix: str, config: TransformerConfig) -> dict[str, Any]:
    """One layer's HF `DeepseekV3Attention` tensors as `MLAttention` params (transformers 5.25
    names under `attn_prefix`, e.g. "layers.3.self_attn."): kernel = weight.T, reshaped per head.

    `q_a_proj` [d_q, D] -> q_a [D, d_q]; `q_a_layernorm` [d_q]; `q_b_proj` [H·(d_n+d_R), d_q] ->
    q_b [d_q, H, d_n+d_R] (V2-Lite, no q_lora_rank: `q_proj` [H·(d_n+d_R), D] -> q);
    `kv_a_proj_with_mqa` [d_c+d_R, D] -> kv_a [D, d_c+d_R]; `kv_a_layernorm` [d_c];
    `kv_b_proj` [H·(d_n+d_v), d_c] -> kv_b [d_c, H, d_n+d_v] (row i·(d_n+d_v)+j is head i,
    channel j; keys first); `o_proj` [D, H·d_v] -> o [H, d_v, D]; biases of q_a, kv_a, o with
    `attention_bias`. HF's interleaved RoPE rotates the same channel pairs as `MLAttention` with
    `rope_interleaved`, so no row permutation is needed.

    `get` is `_tensor_getter`'s function. Raises KeyError (missing tensor) or ValueError (shape).
    """
    m, d = config.mla, config.d_model
    h, dqk, dn, dv = m.n_heads, m.qk_head_dim, m.qk_nope_head_dim, m.v_head_dim
    c, dr = m.kv_lora_rank, m.qk_rope_head_dim
    p = attn_prefix
    out: dict[str, Any] = {}
    if m.q_lora_rank is None:
        out["q"] = {"kernel": get(p + "q_proj.weight", (h * dqk, d)).T.reshape(d, h, dqk)}
    else:
        dq = m.q_lora_rank
        out["q_a"] = {"kernel": get(p + "q_a_proj.weight", (dq, d)).T}
        if m.attention_bias:
            out["q_a"]["bias"] = get(p + "q_a_proj.bias", (dq,))
        out["q_a_norm"] = {"scale": get(p + "q_a_layernorm.weight", (dq,))}
        out["q_b"] = {"kernel": get(p + "q_b_proj.weight", (h * dqk, dq)).T.reshape(dq, h, dqk)}
    out["kv_a"] = {"kernel": get(p + "kv_a_proj_with_mqa.weight", (c + dr, d)).T}
    out["kv_a_norm"] = {"scale": get(p + "kv_a_layernorm.weight", (c,))}
    out["kv_b"] = {"kernel": get(p + "kv_b_proj.weight", (h * (dn + dv), c)).T.reshape(c, h, dn + dv)}
    out["o"] = {"kernel": get(p + "o_proj.weight", (d, h * dv)).T.reshape(h, dv, d)}
    if m.attention_bias:
        out["kv_a"]["bias"] = get(p + "kv_a_proj_with_mqa.bias", (c + dr,))
        out["o"]["bias"] = get(p + "o_proj.bias", (d,))
    return out


def _moe_prefix(state: Mapping[str, np.ndarray], model_prefix: str, layer_prefix: str) -> str:
    """The MoE block's name in a layer: Mixtral's on-disk "block_sparse_moe." if present, else
    "mlp." (v5's in-memory name and Qwen-MoE's; a missing router then raises naming it)."""
    if f"{model_prefix}{layer_prefix}block_sparse_moe.gate.weight" in state:
        return layer_prefix + "block_sparse_moe."
    return layer_prefix + "mlp."


def moe_params_from_state_dict(
    state: Mapping[str, np.ndarray], get, layer_prefix: str, config: TransformerConfig
) -> dict[str, Any]:
    """One layer's MoE tensors (HF names) as the `MoE` module's params (see jaxalign/models/moe.py).

    Accepts both expert layouts of transformers 5.25: per expert, as `save_pretrained` writes
    them (Mixtral `block_sparse_moe.experts.{e}.w1/w3/w2.weight` [F, D], [F, D], [D, F]; Qwen-MoE
    `mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`), and fused, as the v5 modules hold them
    (`mlp.experts.gate_up_proj` [E, 2F, D] = cat(W1, W3) on dim 1, `mlp.experts.down_proj`
    [E, D, F]). Router `gate.weight` [E, D]; Qwen2-MoE's `shared_expert.{gate,up,down}_proj` and
    `shared_expert_gate.weight` [1, D]; DeepSeek's `shared_experts.*` and
    `gate.e_score_correction_bias` [E].

    Raises:
      KeyError: a tensor is missing (named); ValueError: a shape disagrees with `config.moe`.
    """
    m, d = config.moe, config.d_model
    e, f = m.num_experts, m.moe_d_ff
    prefix = "model." if "model.embed_tokens.weight" in state else ""
    p = _moe_prefix(state, prefix, layer_prefix)
    full = lambda name, shape: get(p + name, shape)  # noqa: E731
    out: dict[str, Any] = {"router": {"kernel": full("gate.weight", (e, d)).T.astype(jnp.float32)}}
    if prefix + p + "experts.gate_up_proj" in state:
        gate_up = full("experts.gate_up_proj", (e, 2 * f, d))
        out["gate"] = {"kernel": gate_up[:, :f].transpose(0, 2, 1)}
        out["up"] = {"kernel": gate_up[:, f:].transpose(0, 2, 1)}
        out["down"] = {"kernel": full("experts.down_proj", (e, d, f)).transpose(0, 2, 1)}
    else:
        names = ("w1", "w3", "w2") if prefix + p + "experts.0.w1.weight" in state else (
            "gate_proj", "up_proj", "down_proj")
        stack = lambda n, shape: jnp.stack(  # noqa: E731
            [full(f"experts.{i}.{n}.weight", shape).T for i in range(e)])
        out["gate"] = {"kernel": stack(names[0], (f, d))}  # [E,D,F]
        out["up"] = {"kernel": stack(names[1], (f, d))}
        out["down"] = {"kernel": stack(names[2], (d, f))}  # [E,F,D]
    if m.shared_d_ff:
        fs = m.shared_d_ff
        sh = "shared_expert." if prefix + p + "shared_expert.gate_proj.weight" in state else "shared_experts."
        out["shared"] = {
            "gate": {"kernel": full(sh + "gate_proj.weight", (fs, d)).T},
            "up": {"kernel": full(sh + "up_proj.weight", (fs, d)).T},
            "down": {"kernel": full(sh + "down_proj.weight", (d, fs)).T},
        }
    if m.shared_gate:
        out["shared_gate"] = {"kernel": full("shared_expert_gate.weight", (1, d)).T}
    if m.router_bias:
        out["bias"] = full("gate.e_score_correction_bias", (e,)).astype(jnp.float32)
    return out


def moe_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> TransformerConfig:
    """Maps a Hugging Face Mixtral / Qwen2-MoE / Qwen3-MoE config dict to a `TransformerConfig`
    with `moe` set (transformers 5.25 `MixtralConfig`, `Qwen2MoeConfig`, `Qwen3MoeConfig`).

    Mixtral: every layer MoE, E = `num_local_experts`, F = `intermediate_size`, renormalised
    top-k. Qwen-MoE: F = `moe_intermediate_size`, `norm_topk_prob`, dense layers of width
    `intermediate_size` where `mlp_only_layers` / `decoder_sparse_step` say (`moe_layers_from_hf`);
    Qwen2-MoE: q/k/v biases and a sigmoid-gated shared expert; Qwen3-MoE: per-head q/k norms.

    Raises:
      ValueError: another model_type, activation or RoPE scaling, Qwen's per-layer sliding
        windows, or a non-zero `router_jitter_noise` (training-time noise not implemented).
    """
    model_type = hf.get("model_type")
    if model_type not in _MOE_TYPES:
        raise ValueError(f"config.json: model_type {model_type!r} is not one of {_MOE_TYPES}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} unsupported (need silu)")
    if hf.get("router_jitter_noise") or hf.get("use_sliding_window"):
        raise ValueError("config.json: router_jitter_noise / use_sliding_window are not supported")
    theta, scaling = _rope_settings(hf)
    shape = _decoder_shape(hf, max_positions=4096, tied=False)
    e, k = hf.get("num_local_experts", hf.get("num_experts")), hf["num_experts_per_tok"]
    if model_type == "mixtral":
        moe, layers = MoEConfig.mixtral(num_experts=e, experts_per_token=k, moe_d_ff=hf["intermediate_size"]), None
    else:
        shared = hf.get("shared_expert_intermediate_size", 0) if model_type == "qwen2_moe" else 0
        moe = MoEConfig(num_experts=e, experts_per_token=k, moe_d_ff=hf["moe_intermediate_size"],
                        shared_d_ff=shared, shared_gate=shared > 0,
                        norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
        layers = moe_layers_from_hf(shape["n_layers"], sparse_step=hf.get("decoder_sparse_step", 1),
                                    mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()))
    return TransformerConfig(
        family="llama", **shape,
        qkv_bias=model_type == "qwen2_moe" or bool(hf.get("attention_bias", False)),
        rope_theta=theta, rope_interleaved=False, rope_scaling=scaling,
        sliding_window=hf.get("sliding_window") if model_type == "mixtral" else None,
        head_size=_head_size(hf), qk_norm=model_type == "qwen3_moe",
        moe=moe, moe_layers=layers, **overrides,
    )


def _yarn_from_hf(hf: Mapping[str, Any]) -> tuple[float, YarnScaling | None]:
    """RoPE θ and YaRN settings of a DeepSeek config.json (v4 `rope_scaling` / v5
    `rope_parameters`), with HF `_compute_yarn_parameters`'s defaults (transformers 5.25): a
    missing factor is max_position_embeddings / original_max_position_embeddings, beta_fast /
    beta_slow 32 / 1, a missing mscale or mscale_all_dim is 0 (HF's None: the cos/sin factor is
    then g(s, 1)), truncate True.

    Raises:
      ValueError: a RoPE type other than default and yarn, or partial rotary (names the field).
      KeyError: yarn without original_max_position_embeddings.
    """
    params = dict(hf.get("rope_parameters") or {})
    theta = float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))
    field, y, kind = _rope_kind(hf)
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise ValueError(
            f"config.json: field {field} = {kind!r}: this RoPE scaling is not implemented for "
            f"{hf.get('model_type')!r} (default, yarn)"
        )
    if float(y.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"config.json: field {field.split('.')[0]}.partial_rotary_factor != 1 is not implemented")
    original = int(y["original_max_position_embeddings"])
    factor = y.get("factor") or hf["max_position_embeddings"] / original
    return theta, YarnScaling(
        factor=float(factor), original_max_position=original,
        beta_fast=float(y.get("beta_fast") or 32.0), beta_slow=float(y.get("beta_slow") or 1.0),
        mscale=float(y.get("mscale") or 0.0), mscale_all_dim=float(y.get("mscale_all_dim") or 0.0),
        attention_factor=None if y.get("attention_factor") is None else float(y["attention_factor"]),
        truncate=bool(y.get("truncate", True)),
    )


def deepseek_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> TransformerConfig:
    """Maps a Hugging Face DeepSeek-V3 config dict (`DeepseekV3Config`, transformers 5.25) to a
    `TransformerConfig` with `mla` and `moe`.

    MLA: `kv_lora_rank`, `q_lora_rank` (None: direct q), `qk_nope_head_dim`, `qk_rope_head_dim`,
    `v_head_dim`, `rope_interleave`, `attention_bias`, YaRN from `rope_scaling` /
    `rope_parameters` (`_yarn_from_hf`). MoE (`MoEConfig.deepseek_v3`): `n_routed_experts`,
    `num_experts_per_tok`, `moe_intermediate_size`, shared width `n_shared_experts` ×
    `moe_intermediate_size`, `norm_topk_prob`, `routed_scaling_factor`, `n_group` / `topk_group`
    (None: 1), selection bias `e_score_correction_bias`; layers < `first_k_dense_replace` dense
    with width `intermediate_size` (every layer dense: `moe` None). The multi-token-prediction
    layers (`num_nextn_predict_layers`, stored as layers >= num_hidden_layers) are not loaded,
    as HF's model does not build them.

    Raises:
      ValueError: another model_type or activation, an unimplemented RoPE scaling (names
        `rope_scaling.rope_type` / `rope_parameters.rope_type`), a quantized checkpoint
        (`quantization_config`, e.g. the released fp8 weights), or routing fields of DeepSeek's
        own config.json other than V3's (`scoring_func` sigmoid, `topk_method` noaux_tc).
      KeyError: a required field is missing.
    """
    model_type = hf.get("model_type")
    if model_type not in _DEEPSEEK_TYPES:
        raise ValueError(f"config.json: model_type {model_type!r} is not one of {_DEEPSEEK_TYPES}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} unsupported (need silu)")
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method") if isinstance(hf["quantization_config"], Mapping) else None
        raise ValueError(f"config.json: field quantization_config ({method!r}) is not supported: "
                         "dequantize the checkpoint (e.g. DeepSeek's fp8 weights to bf16) first")
    # DeepSeek's own config.json (remote code) also names V3's routing; HF's class implies it
    if hf.get("scoring_func", "sigmoid") != "sigmoid" or hf.get("topk_method", "noaux_tc") != "noaux_tc":
        raise ValueError(f"config.json: scoring_func {hf.get('scoring_func')!r} / topk_method "
                         f"{hf.get('topk_method')!r} are not DeepSeek-V3's (sigmoid, noaux_tc)")
    theta, yarn = _yarn_from_hf(hf)
    interleaved = bool(hf.get("rope_interleave", True))
    shape = _decoder_shape(hf, max_positions=4096, tied=False)
    shape.pop("n_kv_heads")  # MLA: the latent is shared by all heads (HF's num_key_value_heads is unused)
    q_lora = hf.get("q_lora_rank")
    mla = MLAConfig(
        n_heads=shape["n_heads"], kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
        q_lora_rank=None if q_lora is None else int(q_lora), rope_theta=theta, rope_interleaved=interleaved,
        yarn=yarn, attention_bias=bool(hf.get("attention_bias", False)),
    )
    first_dense = int(hf.get("first_k_dense_replace") or 0)
    moe = layers = None
    if first_dense < shape["n_layers"]:
        f = hf["moe_intermediate_size"]
        moe = MoEConfig.deepseek_v3(
            num_experts=hf["n_routed_experts"], experts_per_token=hf["num_experts_per_tok"], moe_d_ff=f,
            shared_d_ff=int(hf.get("n_shared_experts") or 0) * f,
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            routed_scale=float(hf.get("routed_scaling_factor", 2.5)),
            n_group=int(hf.get("n_group") or 1), topk_group=int(hf.get("topk_group") or 1),
        )
        layers = moe_layers_from_hf(shape["n_layers"], first_k_dense=first_dense)
    return TransformerConfig(
        family="llama", **shape, rope_theta=theta, rope_interleaved=interleaved,
        moe=moe, moe_layers=layers, mla=mla, **overrides,
    )


def load_hf_checkpoint(
    path_or_hub_id: str | os.PathLike, **config_overrides: Any
) -> tuple[TransformerConfig, dict[str, Any]]:
    """Loads a Hugging Face GPT-2, Llama, Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3 (text), Mixtral,
    Qwen2-MoE, Qwen3-MoE or DeepSeek-V3 checkpoint: returns `(config, params)` (MoE experts in
    either the per-expert or the fused layout, `moe_params_from_state_dict`; DeepSeek-V3's MLA
    attention, `mla_params_from_state_dict`, and YaRN).

    The config is read and checked before any weight: a RoPE scaling this model does not
    implement (e.g. yarn for Llama/Qwen, dynamic, longrope) is refused naming the file and the
    field (`rope_scaling.rope_type` / `rope_parameters.rope_type`), with no tensor read.

    Args:
      path_or_hub_id: a local directory with config.json + weights, or (online) a hub id.
      **config_overrides: e.g. `dtype=jnp.bfloat16`, `dropout=0.1`, `scan_layers=True`.

    Returns:
      params in the layout the returned config asks for: per layer ("layers_0", ...), or with
      `scan_layers=True` stacked (params["layers"], leaves [L, ...]; `stack_layers`).

    Raises:
      FileNotFoundError: missing directory, config.json or weights.
      ValueError: a config.json that is not valid JSON or lacks a field the model needs, or an
        unsupported model type / activation / RoPE scaling (the message names config.json and
        the field); an unreadable (e.g. truncated) weight file, or a tensor holding NaN or inf
        (names the file and the tensor); tensor shapes that disagree with config.json.
      KeyError: a tensor the model needs is missing.
    """
    directory = resolve_checkpoint_dir(path_or_hub_id)
    hf = _read_config(directory)
    model_type = hf.get("model_type", "gpt2")
    if model_type == "gpt2":
        config = _config_from_hf(gpt2_config_from_hf, hf, directory, config_overrides)
        return config, _layout(gpt2_params_from_state_dict(load_state_dict(directory), config), config)
    if model_type in _LLAMA_TYPES + _GEMMA_TYPES + _MOE_TYPES + _DEEPSEEK_TYPES:
        mapping = {**dict.fromkeys(_LLAMA_TYPES, llama_config_from_hf), **dict.fromkeys(
            _GEMMA_TYPES, gemma_config_from_hf), **dict.fromkeys(_MOE_TYPES, moe_config_from_hf),
            **dict.fromkeys(_DEEPSEEK_TYPES, deepseek_config_from_hf)}[model_type]
        config = _config_from_hf(mapping, hf, directory, config_overrides)
        return config, _layout(llama_params_from_state_dict(load_state_dict(directory), config), config)
    raise ValueError(
        f"{directory / 'config.json'}: model_type {model_type!r} is not supported "
        f"(gpt2, {', '.join(_LLAMA_TYPES + _GEMMA_TYPES + _MOE_TYPES + _DEEPSEEK_TYPES)})"
    )


def _layout(params: dict[str, Any], config: TransformerConfig) -> dict[str, Any]:
    """Per-layer params as they are, or stacked for a `scan_layers=True` config."""
    return stack_layers(params, config) if config.scan_layers else params


def _config_from_hf(
    mapping, hf: Mapping[str, Any], directory: Path, overrides: Mapping[str, Any]
) -> TransformerConfig:
    """`mapping(hf, **overrides)`, its config.json errors re-raised naming the file's path.

    Raises:
      ValueError: `"{directory}/config.json: missing field 'n_embd' ..."`, or `mapping`'s own
        "config.json: ..." refusals with the full path.
    """
    path = directory / "config.json"
    try:
        return mapping(hf, **overrides)
    except KeyError as err:
        model_type = hf.get("model_type", "gpt2")
        raise ValueError(f"{path}: missing field {err.args[0]!r} (needed for {model_type})") from err
    except ValueError as err:
        if str(err).startswith("config.json: "):
            raise ValueError(f"{path}: {str(err).removeprefix('config.json: ')}") from err
        raise
