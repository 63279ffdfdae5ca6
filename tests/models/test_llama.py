import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxalign.data as jd
from jaxalign.models import forward, get_config, init_params, load_hf_checkpoint, num_params
from jaxalign.models.llama2c import llama2c_rope_tables, load_llama2c
from jaxalign.models.transformer import rope_frequencies
from tests._tolerance import ulps

TOKENS = np.random.RandomState(0).randint(0, 101, (2, 21))


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def roundtrip(model, tmp_path):
    model.save_pretrained(tmp_path)
    return load_hf_checkpoint(tmp_path)


def small(cls, **kw):
    base = dict(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=2, intermediate_size=80, max_position_embeddings=64)
    torch.manual_seed(0)
    return cls(cls.config_class(**{**base, **kw})).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_llama_parity_gqa(tmp_path, tied):
    model = small(transformers.LlamaForCausalLM, tie_word_embeddings=tied, rms_norm_eps=1e-5)
    config, params = roundtrip(model, tmp_path)
    assert (config.family, config.kv_heads, config.tie_embeddings, config.qkv_bias) == ("llama", 2, tied, False)
    # torch vs XLA, 2 layers of 48-term sums: 128 ulps of max|logit|; measured <= 2.8
    np.testing.assert_allclose(
        forward(params, config, jnp.asarray(TOKENS)), hf_logits(model, TOKENS), rtol=0,
        atol=ulps(128, hf_logits(model, TOKENS)),
    )
    assert sum(x.size for x in jax.tree.leaves(params)) == num_params(config)


def test_llama3_rope_scaling_parity(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    model = small(transformers.LlamaForCausalLM, rope_theta=500000.0, rope_scaling=scaling)
    config, params = roundtrip(model, tmp_path)
    assert config.rope_scaling is not None and config.rope_theta == 500000.0
    # torch vs XLA, 2 layers of 48-term sums: 128 ulps of max|logit|; measured <= 2.8
    np.testing.assert_allclose(
        forward(params, config, jnp.asarray(TOKENS)), hf_logits(model, TOKENS), rtol=0,
        atol=ulps(128, hf_logits(model, TOKENS)),
    )


def test_qwen2_parity_qkv_bias(tmp_path):
    model = small(transformers.Qwen2ForCausalLM, tie_word_embeddings=True, rope_theta=1e6)
    with torch.no_grad():  # HF initialises biases to zero: make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_()
    config, params = roundtrip(model, tmp_path)
    assert config.qkv_bias and "bias" in params["layers_0"]["attn"]["wq"]
    # torch vs XLA, 2 layers of 48-term sums: 128 ulps of max|logit|; measured <= 2.8
    np.testing.assert_allclose(
        forward(params, config, jnp.asarray(TOKENS)), hf_logits(model, TOKENS), rtol=0,
        atol=ulps(128, hf_logits(model, TOKENS)),
    )


def test_mistral_sliding_window_parity(tmp_path):
    model = small(transformers.MistralForCausalLM, sliding_window=5)
    config, params = roundtrip(model, tmp_path)
    assert config.sliding_window == 5
    out = np.asarray(forward(params, config, jnp.asarray(TOKENS)))
    # torch vs XLA, 2 layers of 48-term sums: 128 ulps of max|logit|; measured <= 2.8
    np.testing.assert_allclose(out, hf_logits(model, TOKENS), rtol=0, atol=ulps(128, out))
    # the window matters: full attention differs after position 5
    full = np.asarray(forward(params, config.replace(sliding_window=None), jnp.asarray(TOKENS)))
    # the two masks agree on the first 5 positions: same sums there, measured equal; 1e-5 is 160 ulps
    np.testing.assert_allclose(out[:, :5], full[:, :5], atol=1e-5)
    assert not np.allclose(out[:, 6:], full[:, 6:], atol=1e-3)


def test_left_padding_positions_mask_padded_keys():
    config = get_config("llama-tiny", vocab_size=101)
    params = init_params(config, jax.random.key(0))
    toks = jnp.asarray(TOKENS[:1, :8])
    plain = forward(params, config, toks)
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), toks], axis=1)
    positions = jnp.concatenate([jnp.full((1, 3), -1), jnp.arange(8)[None]], axis=1)
    out = forward(params, config, padded, positions)
    # 11 vs 8 keys (3 masked): other reduction shapes, 2 layers of 64-term sums: 128 ulps; measured equal
    np.testing.assert_allclose(out[:, 3:], plain, rtol=0, atol=ulps(128, plain))


@pytest.fixture(scope="module")
def stories(shared_data_module):
    return load_llama2c(shared_data_module / "models/stories260K/stories260K.bin")


@pytest.fixture(scope="module")
def shared_data_module():
    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} not present")
    return SHARED_DATA


def test_stories260k_header_and_rope_tables(stories, shared_data_module):
    config, params = stories
    assert config == get_config("stories260K")
    cos, sin = llama2c_rope_tables(shared_data_module / "models/stories260K/stories260K.bin")
    angles = np.arange(config.max_seq_len)[:, None] * rope_frequencies(config)[None]
    # float32 angles pos·θ (pos < 512): rounding them costs <= 1.9e-6 (half an ulp of 51 rad, θ = 0.1;
    # θ = 1 gives integers), a 1-ulp θ up to 3.8e-6 more; measured 1.8e-6 with both ISAs: 128 ulps of 1
    np.testing.assert_allclose(cos, np.cos(angles), atol=ulps(128))
    np.testing.assert_allclose(sin, np.sin(angles), atol=ulps(128))


def _interleaved_to_halves(w, heads):
    """Meta -> HF q/k row permutation (transformers' convert_llama_weights_to_hf `permute`)."""
    out_dim, in_dim = w.shape
    return w.reshape(heads, out_dim // heads // 2, 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


def test_stories260k_matches_transformers_with_permuted_weights(stories):
    """Real weights: our interleaved-RoPE model == HF's rotate-half Llama after HF's permutation."""
    config, params = stories
    hf_config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=5,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(hf_config).eval()
    t = lambda x: torch.tensor(np.asarray(x))  # noqa: E731
    state = {"model.embed_tokens.weight": t(params["embed"]["embedding"]), "model.norm.weight": t(params["ln_f"]["scale"])}
    for i in range(5):
        p, a, m = params[f"layers_{i}"], params[f"layers_{i}"]["attn"], params[f"layers_{i}"]["mlp"]
        pre = f"model.layers.{i}."
        state[pre + "input_layernorm.weight"] = t(p["ln_1"]["scale"])
        state[pre + "post_attention_layernorm.weight"] = t(p["ln_2"]["scale"])
        state[pre + "self_attn.q_proj.weight"] = t(_interleaved_to_halves(np.asarray(a["wq"]["kernel"]).reshape(64, -1).T, 8))
        state[pre + "self_attn.k_proj.weight"] = t(_interleaved_to_halves(np.asarray(a["wk"]["kernel"]).reshape(64, -1).T, 4))
        state[pre + "self_attn.v_proj.weight"] = t(np.asarray(a["wv"]["kernel"]).reshape(64, -1).T)
        state[pre + "self_attn.o_proj.weight"] = t(np.asarray(a["wo"]["kernel"]).reshape(-1, 64).T)
        for name in ("gate", "up", "down"):
            state[pre + f"mlp.{name}_proj.weight"] = t(np.asarray(m[name]["kernel"]).T)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state)
    tokens = np.random.RandomState(3).randint(0, 512, (2, 40))
    # torch vs XLA, 5 layers of 64-term sums, |logit| ~ 18: 128 ulps of it; measured 7 (1e-4 was 47)
    np.testing.assert_allclose(
        forward(params, config, jnp.asarray(tokens)), hf_logits(model, tokens), rtol=0,
        atol=ulps(128, hf_logits(model, tokens)),
    )


def test_stories260k_greedy_text(stories, shared_data_module):
    config, params = stories
    tok = jd.load_tokenizer(shared_data_module / "models/stories260K/tok512.model")
    ids = [tok.bos_id]
    step = jax.jit(lambda t: forward(params, config, t))
    for _ in range(12):
        ids.append(int(jnp.argmax(step(jnp.asarray([ids]))[0, -1])))
    assert tok.decode(ids).startswith("Once upon a time, there was a little")


def test_llama2c_truncated_file_error(tmp_path, shared_data_module):
    data = (shared_data_module / "models/stories260K/stories260K.bin").read_bytes()
    bad = tmp_path / "cut.bin"
    bad.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="cut.bin.*implies"):
        load_llama2c(bad)
    with pytest.raises(FileNotFoundError):
        load_llama2c(tmp_path / "nope.bin")


def test_preset_parameter_counts_match_published_models():
    # Hugging Face model cards / safetensors metadata of each model.
    assert num_params(get_config("llama-3.2-1b")) == 1_235_814_400
    assert num_params(get_config("qwen2.5-0.5b")) == 494_032_768
    # llama2.c stories260K: 260K parameters (its name); the exact count of the .bin's tensors
    assert num_params(get_config("stories260K")) == 260_032
