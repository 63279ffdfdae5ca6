"""Import Karpathy's llama2.c legacy `.bin` checkpoints (e.g. the TinyStories stories*.bin).

Layout (llama2.c `export.py legacy_export`, read by `run.c`): a header of 7 int32
`dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len` (a negative vocab_size
means the classifier is *not* shared with the token embedding), then float32 tensors in this
order, each in PyTorch `nn.Linear` [out, in] layout:

    tok_embeddings [V, D]
    attention_norm [L, D]
    wq [L, N·H, D], wk [L, K·H, D], wv [L, K·H, D], wo [L, D, N·H]
    ffn_norm [L, D]
    w1 [L, F, D] (gate), w2 [L, D, F] (down), w3 [L, F, D] (up)
    norm [D]
    freq_cis_real [seq_len, H/2], freq_cis_imag [seq_len, H/2]
    output [V, D]            (only when the classifier is not shared)

RoPE rotates interleaved (even, odd) pairs, θ = 10000, RMSNorm ε = 1e-5 (run.c).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxalign.models.config import TransformerConfig
from jaxalign.models.hf import check_finite
from jaxalign.models.transformer import stack_layers

_HEADER = 7


def load_llama2c(path: str | os.PathLike, **config_overrides: Any) -> tuple[TransformerConfig, dict]:
    """Loads a llama2.c legacy checkpoint: returns `(config, params)`.

    Args:
      path: the `.bin` file.
      **config_overrides: e.g. `dtype=jnp.bfloat16`; `scan_layers=True` returns the params
        stacked (params["layers"], leaves [L, ...]), as that config asks.

    Raises:
      FileNotFoundError: no such file.
      ValueError: a header with non-positive sizes, or a file whose length does not match the
        header (truncated, or not a legacy export); the message names the file and both sizes.
        Or a tensor the model uses holding NaN or inf: `"{path}: tensor 'wq' holds NaN or inf
        (... first at index (layer, row, column) ...)"` (llama2.c's tensor names, stacked over
        layers; the unused RoPE tables are not checked).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such llama2.c checkpoint")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size < 4 * _HEADER:
        raise ValueError(f"{path}: {raw.size} bytes is too short for a llama2.c header")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = (
        int(v) for v in raw[: 4 * _HEADER].view(np.int32)
    )
    shared = vocab > 0
    vocab = abs(vocab)
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len) <= 0:
        raise ValueError(f"{path}: invalid header {dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len}")
    config = TransformerConfig(
        family="llama",
        vocab_size=vocab,
        max_seq_len=seq_len,
        d_model=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        d_ff=hidden,
        norm_eps=1e-5,
        tie_embeddings=shared,
        rope_theta=10000.0,
        rope_interleaved=True,
        **config_overrides,
    )
    h, l, k = config.head_dim, n_layers, n_kv_heads
    shapes = [
        ("tok_embeddings", (vocab, dim)),
        ("attention_norm", (l, dim)),
        ("wq", (l, n_heads * h, dim)),
        ("wk", (l, k * h, dim)),
        ("wv", (l, k * h, dim)),
        ("wo", (l, dim, n_heads * h)),
        ("ffn_norm", (l, dim)),
        ("w1", (l, hidden, dim)),
        ("w2", (l, dim, hidden)),
        ("w3", (l, hidden, dim)),
        ("norm", (dim,)),
        ("freq_cis_real", (seq_len, h // 2)),
        ("freq_cis_imag", (seq_len, h // 2)),
    ]
    if not shared:
        shapes.append(("output", (vocab, dim)))
    floats = raw[4 * _HEADER :]
    expected = 4 * sum(int(np.prod(s)) for _, s in shapes)
    if floats.size != expected:
        raise ValueError(
            f"{path}: {floats.size} bytes of tensors, but the header {dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len} "
            f"implies {expected}"
        )
    floats = floats.view(np.float32)
    tensors, offset = {}, 0
    for name, shape in shapes:
        size = int(np.prod(shape))
        tensors[name] = floats[offset : offset + size].reshape(shape)
        offset += size
    check_finite({k: v for k, v in tensors.items() if not k.startswith("freq_cis")}, path)
    params = _params_from_tensors(tensors, config)
    return config, stack_layers(params, config) if config.scan_layers else params


def _params_from_tensors(t: dict[str, np.ndarray], config: TransformerConfig) -> dict:
    d, n, k, h = config.d_model, config.n_heads, config.kv_heads, config.head_dim
    asj = lambda x: jnp.asarray(x, config.param_dtype)  # noqa: E731
    params: dict[str, Any] = {
        "embed": {"embedding": asj(t["tok_embeddings"])},
        "ln_f": {"scale": asj(t["norm"])},
    }
    for i in range(config.n_layers):
        params[f"layers_{i}"] = {
            "ln_1": {"scale": asj(t["attention_norm"][i])},
            "ln_2": {"scale": asj(t["ffn_norm"][i])},
            "attn": {
                "wq": {"kernel": asj(t["wq"][i].T.reshape(d, n, h))},
                "wk": {"kernel": asj(t["wk"][i].T.reshape(d, k, h))},
                "wv": {"kernel": asj(t["wv"][i].T.reshape(d, k, h))},
                "wo": {"kernel": asj(t["wo"][i].T.reshape(n, h, d))},
            },
            "mlp": {
                "gate": {"kernel": asj(t["w1"][i].T)},
                "down": {"kernel": asj(t["w2"][i].T)},
                "up": {"kernel": asj(t["w3"][i].T)},
            },
        }
    if not config.tie_embeddings:
        params["lm_head"] = {"kernel": asj(t["output"].T)}
    return params


def llama2c_rope_tables(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The (cos, sin) RoPE tables [seq_len, H/2] stored in a llama2.c checkpoint (for checks)."""
    raw = np.fromfile(path, dtype=np.uint8)
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = (int(v) for v in raw[:28].view(np.int32))
    h = dim // n_heads
    floats = raw[28:].view(np.float32)
    before = abs(vocab) * dim + n_layers * (
        dim + 2 * dim * dim + 2 * n_kv_heads * h * dim + dim + 3 * dim * hidden
    ) + dim
    half = seq_len * (h // 2)
    cos = floats[before : before + half].reshape(seq_len, h // 2)
    sin = floats[before + half : before + 2 * half].reshape(seq_len, h // 2)
    return cos, sin
