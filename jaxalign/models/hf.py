"""Import Hugging Face `transformers` checkpoints into jaxalign parameter pytrees.

Supported: `GPT2LMHeadModel` / `GPT2Model` directories holding `config.json` and either
`model.safetensors` (possibly sharded with `model.safetensors.index.json`) or `pytorch_model.bin`.
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

from jaxalign.models.config import TransformerConfig

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


def _read_config(directory: Path) -> dict[str, Any]:
    config_path = directory / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path}: missing (every HF checkpoint has a config.json)")
    return json.loads(config_path.read_text())


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
    with zipfile.ZipFile(path) as archive:
        pkl = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        prefix = pkl[: -len("/data.pkl")]
        with archive.open(pkl) as f:
            return dict(_TorchUnpickler(f, archive, prefix).load())


def load_state_dict(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads every tensor of a HF checkpoint directory as NumPy arrays (name -> array).

    Raises:
      FileNotFoundError: none of model.safetensors, its index, or pytorch_model.bin is present.
    """
    directory = Path(directory)
    if (directory / "model.safetensors").exists():
        return safetensors.numpy.load_file(directory / "model.safetensors")
    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, np.ndarray] = {}
        for shard in shards:
            state.update(safetensors.numpy.load_file(directory / shard))
        return state
    if (directory / "pytorch_model.bin").exists():
        return _load_torch_bin(directory / "pytorch_model.bin")
    raise FileNotFoundError(f"{directory}: no weights found (looked for {', '.join(_WEIGHT_FILES)})")


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
    prefix = "transformer." if "transformer.wte.weight" in state else ""
    d, n, h = config.d_model, config.n_heads, config.head_dim

    def get(name: str, shape: tuple[int, ...]) -> jnp.ndarray:
        key = prefix + name
        if key not in state:
            raise KeyError(f"checkpoint is missing tensor {key!r}")
        value = np.asarray(state[key])
        if value.shape != shape:
            raise ValueError(f"checkpoint tensor {key!r} has shape {value.shape}, expected {shape}")
        return jnp.asarray(value, dtype=config.param_dtype)

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
        params["lm_head"] = {"kernel": jnp.asarray(state["lm_head.weight"], config.param_dtype).T}
    return params


def load_hf_checkpoint(
    path_or_hub_id: str | os.PathLike, **config_overrides: Any
) -> tuple[TransformerConfig, dict[str, Any]]:
    """Loads a Hugging Face GPT-2 checkpoint: returns `(config, params)`.

    Args:
      path_or_hub_id: a local directory with config.json + weights, or (online) a hub id.
      **config_overrides: e.g. `dtype=jnp.bfloat16`, `dropout=0.1`.

    Raises:
      FileNotFoundError: missing directory, config.json or weights.
      ValueError: unsupported model type / activation, or tensor shapes that disagree.
      KeyError: a tensor the model needs is missing.
    """
    directory = resolve_checkpoint_dir(path_or_hub_id)
    hf = _read_config(directory)
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(f"{directory}/config.json: model_type {model_type!r} is not supported yet")
    config = gpt2_config_from_hf(hf, **config_overrides)
    return config, gpt2_params_from_state_dict(load_state_dict(directory), config)
