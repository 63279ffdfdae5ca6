"""Unreadable or non-finite checkpoints are refused naming the file, and the tensor or field
(issue 13, item 7): Hugging Face directories written by `transformers`, llama2.c `.bin` files."""

import json

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from jaxalign.models import load_hf_checkpoint
from jaxalign.models.llama2c import load_llama2c
from jaxalign.models.load import load_pretrained


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A random tiny GPT-2 saved with `save_pretrained` (config.json + model.safetensors)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    path = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


@pytest.fixture
def checkpoint(gpt2_dir, tmp_path):
    """A fresh copy of `gpt2_dir` to damage."""
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((gpt2_dir / name).read_bytes())
    return tmp_path


def test_intact_checkpoint_loads(checkpoint):
    config, _ = load_pretrained(checkpoint)
    assert (config.d_model, config.n_layers) == (32, 2)


def test_truncated_safetensors_names_the_file(checkpoint):
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    for cut in (len(data) // 2, 4):
        weights.write_bytes(data[:cut])
        with pytest.raises(ValueError) as err:
            load_hf_checkpoint(checkpoint)
        assert str(err.value).startswith(f"{weights}: not a readable safetensors file (truncated?): ")


def test_truncated_config_names_file_and_line(checkpoint):
    config = checkpoint / "config.json"
    text = config.read_text()
    cut = text.index('"n_embd"') + 4
    config.write_text(text[:cut])
    line = text[:cut].count("\n") + 1
    with pytest.raises(ValueError) as err:
        load_pretrained(checkpoint)
    assert str(err.value).startswith(f"{config}: line {line}, column ")
    assert "not valid JSON (Unterminated string)" in str(err.value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.pop("n_embd"), "missing field 'n_embd' (needed for gpt2)"),
        (lambda c: c.update(activation_function="relu"), "activation_function 'relu' unsupported"),
        (lambda c: c.update(model_type="bert"), "model_type 'bert' is not supported"),
    ],
)
def test_malformed_config_fields_name_file_and_field(checkpoint, edit, message):
    config = checkpoint / "config.json"
    fields = json.loads(config.read_text())
    edit(fields)
    config.write_text(json.dumps(fields))
    with pytest.raises(ValueError) as err:
        load_hf_checkpoint(checkpoint)
    assert str(err.value).startswith(f"{config}: {message}")


def test_config_that_is_not_an_object(checkpoint):
    (checkpoint / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"^{checkpoint / 'config.json'}: expected a JSON object, got a JSON list$"):
        load_hf_checkpoint(checkpoint)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_hf_tensor_names_tensor_and_file(checkpoint, bad):
    weights = checkpoint / "model.safetensors"
    state = safetensors.numpy.load_file(weights)
    state["transformer.h.0.attn.c_attn.weight"][3, 5] = bad
    state["transformer.h.1.mlp.c_fc.bias"][0] = bad  # later in the file: not the one named
    safetensors.numpy.save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        load_hf_checkpoint(checkpoint)
    assert str(err.value) == (
        f"{weights}: tensor 'transformer.h.0.attn.c_attn.weight' holds NaN or inf "
        f"(1 of {32 * 96} values; first at index (3, 5): {bad})"
    )


def test_non_finite_pytorch_bin_and_truncated_bin(gpt2_dir, tmp_path):
    model = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir)
    model.config.save_pretrained(tmp_path)
    state = model.state_dict()
    state["transformer.wpe.weight"][7, 1] = float("nan")
    weights = tmp_path / "pytorch_model.bin"
    torch.save(state, weights)
    with pytest.raises(ValueError, match=rf"^{weights}: tensor 'transformer.wpe.weight' holds NaN or inf \(1 of "):
        load_hf_checkpoint(tmp_path)
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"^{weights}: not a readable torch checkpoint \(truncated\?\): "):
        load_hf_checkpoint(tmp_path)


def test_sharded_checkpoint_names_the_bad_shard(gpt2_dir, tmp_path):
    model = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    shard = tmp_path / index["transformer.h.1.attn.c_proj.weight"]
    state = safetensors.numpy.load_file(shard)
    state["transformer.h.1.attn.c_proj.weight"][0, 0] = np.inf
    safetensors.numpy.save_file(state, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"^{shard}: tensor 'transformer.h.1.attn.c_proj.weight' holds NaN or inf"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'model.safetensors.index.json'}: line 1, column 16: not valid JSON"):
        load_hf_checkpoint(tmp_path)


def _llama2c_file(path, *, bad_at: int | None = None):
    """A random llama2.c legacy export (dim 16, 2 layers, 4 heads, 2 KV heads, vocab 11, seq 8)."""
    dim, hidden, layers, heads, kv, vocab, seq = 16, 24, 2, 4, 2, 11, 8
    h = dim // heads
    sizes = [vocab * dim, layers * dim, layers * dim * dim, 2 * layers * kv * h * dim,
             layers * dim * dim, layers * dim, 3 * layers * hidden * dim, dim, 2 * seq * h // 2]
    floats = np.random.RandomState(0).randn(sum(sizes)).astype(np.float32)
    if bad_at is not None:
        floats[bad_at] = np.nan
    header = np.array([dim, hidden, layers, heads, kv, vocab, seq], np.int32)
    path.write_bytes(header.tobytes() + floats.tobytes())
    return path


def test_non_finite_llama2c_tensor_names_tensor_and_file(tmp_path):
    config, _ = load_llama2c(_llama2c_file(tmp_path / "ok.bin"))
    assert config.n_layers == 2
    # tok_embeddings (11 x 16) and attention_norm (2 x 16) come first; then wq [2, 16, 16]
    bad = _llama2c_file(tmp_path / "nan.bin", bad_at=11 * 16 + 2 * 16 + 16 * 16 + 3 * 16 + 5)
    with pytest.raises(ValueError) as err:
        load_pretrained(bad)
    assert str(err.value) == f"{bad}: tensor 'wq' holds NaN or inf (1 of 512 values; first at index (1, 3, 5): nan)"
