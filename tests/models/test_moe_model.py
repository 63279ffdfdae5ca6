"""MoE layers inside the Transformer (config, Block, router stats, decoding, scan) and the
Mixtral importer's parity with transformers 5.25's `MixtralForCausalLM` on random float32 weights."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from jaxalign.decoding import SamplingConfig, generate, prompt_positions
from jaxalign.logprobs import token_logps
from jaxalign.lora import LoraConfig, lora_targets
from jaxalign.losses.moe import load_balancing_loss
from jaxalign.models.config import get_config, moe_layers_from_hf, num_params, train_flops_per_token
from jaxalign.models.hf import load_hf_checkpoint
from jaxalign.models.hf_export import export_hf
from jaxalign.models.moe import MoEConfig
from jaxalign.models.transformer import forward, init_params, stack_layers
from jaxalign.optim import OptimConfig, make_optimizer
from jaxalign.trainers.sft import make_sft_step, sft_batch_loss
from jaxalign.trainers.step import create_train_state
from tests._tolerance import ulps

V = 97
MOE = MoEConfig.mixtral(num_experts=4, experts_per_token=2, moe_d_ff=48)
CONFIG = get_config("llama-tiny", vocab_size=V, max_seq_len=64, n_layers=3, moe=MOE, moe_layers=(1, 2))


@pytest.fixture(scope="module")
def model():
    # larger init so that greedy decoding is not dominated by one token and routes are not ties
    params = jax.tree.map(lambda x: x * 4, init_params(CONFIG, jax.random.key(1)))
    return CONFIG, params


# ---------------------------------------------------------------------------------------------
# config


def test_config_validation():
    base = get_config("llama-tiny")
    with pytest.raises(ValueError, match="moe_layers is set but moe is None"):
        base.replace(moe_layers=(0,))
    for bad in ((), (1, 0), (0, 0), (2,), [0]):
        with pytest.raises(ValueError, match="moe_layers"):
            base.replace(moe=MOE, moe_layers=bad)
    with pytest.raises(ValueError, match="family 'llama'"):
        get_config("gpt2-tiny", moe=MOE)
    with pytest.raises(ValueError, match="mixes MoE and dense"):
        base.replace(moe=MOE, moe_layers=(1,), scan_layers=True)
    base.replace(moe=MOE, scan_layers=True)  # all MoE: identical layers
    assert CONFIG.moe_layer_indices == (1, 2) and not CONFIG.is_moe_layer(0)
    assert base.replace(moe=MOE).moe_layer_indices == (0, 1)


def test_moe_layers_from_hf():
    assert moe_layers_from_hf(5, first_k_dense=2) == (2, 3, 4)
    assert moe_layers_from_hf(4) is None
    assert moe_layers_from_hf(6, sparse_step=2) == (1, 3, 5)  # (l + 1) % 2 == 0
    assert moe_layers_from_hf(4, mlp_only_layers=(0, 3)) == (1, 2)
    with pytest.raises(ValueError, match="no MoE layer"):
        moe_layers_from_hf(2, first_k_dense=2)


def test_num_params_total_and_active(model):
    config, params = model
    assert num_params(config) == sum(x.size for x in jax.tree.leaves(params))
    d, e, k, f = config.d_model, MOE.num_experts, MOE.experts_per_token, MOE.moe_d_ff
    # the active count drops (E - k) experts of 3·D·F in each of the 2 MoE layers
    assert num_params(config) - num_params(config, active=True) == 2 * (e - k) * 3 * d * f
    dense = config.replace(moe=None, moe_layers=None)
    assert num_params(dense) == num_params(dense, active=True)
    base = train_flops_per_token(config, 16)
    wide = train_flops_per_token(config.replace(moe=dataclasses.replace(MOE, num_experts=8)), 16)
    assert wide - base == 6 * 2 * d * 4  # more experts only widen the router [D, E]: 6·L_moe·D·ΔE
    deeper = train_flops_per_token(config.replace(moe=dataclasses.replace(MOE, experts_per_token=3)), 16)
    assert deeper - base == 6 * 2 * 3 * d * f  # one more active expert per token and MoE layer


def test_param_tree_and_lora_mlp_preset_skips_experts(model):
    config, params = model
    assert "mlp" in params["layers_0"] and "moe" not in params["layers_0"]
    assert "moe" in params["layers_1"] and "mlp" not in params["layers_1"]
    assert params["layers_1"]["moe"]["gate"]["kernel"].shape == (4, 64, 48)
    targets = lora_targets(params, LoraConfig(rank=2, targets=("mlp",)))
    assert targets and all(t.startswith("layers_0/") for t in targets)


# ---------------------------------------------------------------------------------------------
# forward, router stats, decoding, scan


def test_router_stats_come_out_of_forward(model):
    config, params = model
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, V, (2, 7)))
    pos = prompt_positions(jnp.array([[1] * 7, [0, 0] + [1] * 5]))
    logits, stats = forward(params, config, tokens, pos, return_router_stats=True)
    np.testing.assert_array_equal(logits, forward(params, config, tokens, pos))
    assert len(stats) == 2
    for s in stats:
        assert s.router_logits.shape == (2, 7, 4) and s.router_logits.dtype == jnp.float32
        assert s.expert_ids.shape == (2, 7, 2) and s.expert_ids.dtype == jnp.int32
        assert int(s.expert_load.sum()) == 12 * 2  # real tokens only (2 padded), k each
    assert not np.allclose(stats[0].router_logits, stats[1].router_logits)
    dense = get_config("llama-tiny", vocab_size=V)
    _, dense_stats = forward(init_params(dense, jax.random.key(0)), dense, tokens, return_router_stats=True)
    assert dense_stats == ()


def test_routing_changes_the_output(model):
    """The MoE output is used: zeroing one expert's down kernel changes the logits of tokens routed
    to it and only those."""
    config, params = model
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, V, (2, 9)))
    logits, stats = forward(params, config, tokens, return_router_stats=True)
    cut = jax.tree.map(lambda x: x, params)
    cut["layers_2"]["moe"]["down"]["kernel"] = params["layers_2"]["moe"]["down"]["kernel"].at[0].set(0.0)
    changed = np.any(np.asarray(forward(cut, config, tokens)) != np.asarray(logits), axis=-1)  # [B,T]
    np.testing.assert_array_equal(changed, np.any(np.asarray(stats[1].expert_ids) == 0, axis=-1))


def test_greedy_decoding_equals_teacher_forcing(model):
    config, params = model
    prompt = jnp.asarray(np.random.RandomState(2).randint(0, V, (3, 6)))
    mask = jnp.array([[1] * 6, [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    gen = generate(params, config, prompt, mask, rng=jax.random.key(0),
                   sampling=SamplingConfig(max_new_tokens=10, temperature=0.0))
    tokens = jnp.concatenate([prompt, gen.tokens], axis=1)
    pos = prompt_positions(jnp.concatenate([mask, jnp.ones_like(gen.tokens)], axis=1))
    logits = forward(params, config, tokens, pos)
    ref = token_logps(logits[:, 5:-1], gen.tokens)
    # cached vs one pass reorders the 64-term sums of 3 layers (as tests/test_decoding.py: 2·64
    # ulps of the logits, doubled for the log-softmax; one more layer: 384)
    np.testing.assert_allclose(gen.model_logps, ref, rtol=0, atol=ulps(384, ref))
    np.testing.assert_array_equal(gen.tokens, jnp.argmax(logits[:, 5:-1], axis=-1))


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scan_equals_unrolled_all_moe(remat):
    config = get_config("llama-tiny", vocab_size=V, max_seq_len=64, moe=MOE)
    params = jax.tree.map(lambda x: x * 4, init_params(config, jax.random.key(2)))
    scanned = config.replace(scan_layers=True, remat=remat)
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, V, (2, 8)))
    a, sa = forward(params, config, tokens, return_router_stats=True)
    b, sb = forward(stack_layers(params, config), scanned, tokens, return_router_stats=True)
    # the same maths in another program: 2 layers of 64-term sums, 2·64 ulps of the logits
    np.testing.assert_allclose(a, b, rtol=0, atol=ulps(128, a))
    assert len(sb) == 2
    for x, y in zip(sa, sb):
        np.testing.assert_array_equal(x.expert_ids, y.expert_ids)
        np.testing.assert_allclose(x.router_logits, y.router_logits, rtol=0, atol=ulps(128, x.router_logits))


# ---------------------------------------------------------------------------------------------
# Mixtral checkpoint parity (transformers 5.25 MixtralForCausalLM, eager attention and experts)

HF_B, HF_T = 2, 9


def randomise_hf(model, seed: int) -> None:
    """Linear weights N(0, 1/fan_in), embeddings N(0, 1), norm scales 1 + N(0, 0.1): activations
    stay O(1) and the router logits have std ~1, so top-k choices are not near-ties (HF's 0.02
    init gives router logits ~0.05 whose order rounding could flip)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if name.endswith("norm.weight"):
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=gen))
            elif "embed_tokens" in name:
                t.copy_(torch.randn(t.shape, generator=gen))
            else:
                t.copy_(torch.randn(t.shape, generator=gen) / np.sqrt(t.shape[-1]))


FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")


def build_hf(family: str):
    """A random-weight HF model of `family` (2-3 layers, E = 4, k = 2), eager attention and experts.
    Qwen2-MoE: shared expert behind its sigmoid gate, top-k weights not renormalised, layer 1
    dense (`mlp_only_layers`); Qwen3-MoE: head_dim 16 != D/N, q/k norms, renormalised, layer 1
    dense."""
    common = dict(vocab_size=V, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, max_position_embeddings=64, attn_implementation="eager",
                  experts_implementation="eager")
    if family == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=24, num_hidden_layers=2, num_local_experts=4, **common)
        model = transformers.MixtralForCausalLM(cfg)
    elif family == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(intermediate_size=40, moe_intermediate_size=24, num_hidden_layers=3,
                                          num_experts=4, shared_expert_intermediate_size=20, mlp_only_layers=[1],
                                          norm_topk_prob=False, **common)
        model = transformers.Qwen2MoeForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3MoeConfig(intermediate_size=40, moe_intermediate_size=24, num_hidden_layers=3,
                                          num_experts=4, head_dim=16, mlp_only_layers=[1], norm_topk_prob=True,
                                          **common)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    randomise_hf(model.eval(), 0)
    return model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    out = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        model = build_hf(family)
        path = tmp_path_factory.mktemp(family)
        model.save_pretrained(path)
        out[family] = (model, path)
    return out


@pytest.fixture(scope="module")
def mixtral(hf_models):
    return hf_models["mixtral"]


def fuse_experts(path, out):
    """Rewrite a per-expert Mixtral checkpoint in v5's fused in-memory layout (mlp.gate.weight,
    mlp.experts.gate_up_proj [E, 2F, D] = cat(w1, w3) on dim 1, mlp.experts.down_proj [E, D, F])."""
    state = safetensors.numpy.load_file(path / "model.safetensors")
    fused = {k: v for k, v in state.items() if ".block_sparse_moe." not in k}
    for l in range(2):
        p = f"model.layers.{l}.block_sparse_moe."
        w = lambda n, p=p: np.stack([state[f"{p}experts.{e}.{n}.weight"] for e in range(4)])  # noqa: E731
        q = f"model.layers.{l}.mlp."
        fused[q + "gate.weight"] = state[p + "gate.weight"]
        fused[q + "experts.gate_up_proj"] = np.concatenate([w("w1"), w("w3")], axis=1)
        fused[q + "experts.down_proj"] = w("w2")
    out.mkdir()
    safetensors.numpy.save_file(fused, out / "model.safetensors")
    (out / "config.json").write_text((path / "config.json").read_text())


def test_mixtral_config_and_layouts(mixtral, tmp_path):
    _, path = mixtral
    config, params = load_hf_checkpoint(path)
    assert config.moe == MoEConfig.mixtral(num_experts=4, experts_per_token=2, moe_d_ff=24)
    assert config.moe_layers is None and config.moe_layer_indices == (0, 1)
    fuse_experts(path, tmp_path / "fused")
    _, fused = load_hf_checkpoint(tmp_path / "fused")
    jax.tree.map(np.testing.assert_array_equal, params, fused)
    _, stacked = load_hf_checkpoint(path, scan_layers=True)
    assert stacked["layers"]["moe"]["gate"]["kernel"].shape == (2, 4, 32, 24)


def test_qwen_moe_configs(hf_models):
    config, params = load_hf_checkpoint(hf_models["qwen2_moe"][1])
    assert config.moe_layers == (0, 2) and config.qkv_bias and not config.moe.norm_topk_prob
    assert config.moe.shared_d_ff == 20 and config.moe.shared_gate and config.d_ff == 40
    assert "mlp" in params["layers_1"] and params["layers_0"]["moe"]["shared_gate"]["kernel"].shape == (32, 1)
    config, _ = load_hf_checkpoint(hf_models["qwen3_moe"][1])
    assert config.head_dim == 16 and config.qk_norm and config.moe.norm_topk_prob and config.moe.shared_d_ff == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_router_logits_and_aux_loss_match_hf(hf_models, family):
    hf, path = hf_models[family]
    config, params = load_hf_checkpoint(path)
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, V, (HF_B, HF_T))
    mask = np.ones((HF_B, HF_T), np.int64)
    mask[1, 6:] = 0  # right padding: the real tokens' outputs do not depend on it (causal)
    with torch.no_grad():
        out = hf(torch.tensor(tokens), attention_mask=torch.tensor(mask), output_router_logits=True)
    logits, stats = jax.jit(lambda p, t: forward(p, config, t, return_router_stats=True))(params, tokens)
    real = mask.astype(bool)
    ref = out.logits.numpy()
    # float32, a different summation order (torch vs XLA) through 2 layers whose longest sums
    # are the 32-term projections, the 24-term expert down projections and the 9-key attention:
    # ~2 layers · 32 terms · a few roundings each -> 256 ulps of the largest logit (~1e-4 here)
    err = np.abs(np.asarray(logits)[real] - ref[real]).max()
    assert err <= ulps(256, ref[real]), err
    assert len(stats) == len(out.router_logits) == 2  # Qwen's dense layer 1 has no router
    for s, r in zip(stats, out.router_logits):
        r = r.numpy().reshape(HF_B, HF_T, 4)
        # router logits are layer 0's / 1's first sums: 32 terms of O(1) -> 64 ulps of them
        np.testing.assert_allclose(np.asarray(s.router_logits)[real], r[real], rtol=0,
                                   atol=ulps(64, r[real]))
        np.testing.assert_array_equal(np.asarray(s.expert_ids)[real],
                                      np.argsort(-r, axis=-1, kind="stable")[..., :2][real])
    aux, _ = load_balancing_loss(tuple(s.router_logits for s in stats), top_k=2, mask=jnp.asarray(mask))
    # a mean over 2·15 real tokens of softmax probabilities (≤ 1) times counts, E = 4: 64 ulps of it
    np.testing.assert_allclose(float(aux), float(out.aux_loss), rtol=ulps(64))
    unmasked, _ = load_balancing_loss(tuple(s.router_logits for s in stats), top_k=2)
    assert abs(float(unmasked) - float(aux)) > 1e-4  # the padding matters: the mask is tested


@pytest.mark.parametrize("family", FAMILIES)
def test_export_hf_round_trip(hf_models, family, tmp_path):
    """export_hf writes what transformers loads as the same model: the same architecture, and
    the reloaded model's logits equal the original's (the float32 weights are copied bit for bit:
    the same program on the same weights; torch's CPU kernels may still pick another summation
    order for differently aligned buffers: Qwen2-MoE measured 7.2e-7 absolute, a few ulps of max|logits|
    with transformers 5.25, so 64 ulps); importing the export gives the params back exactly."""
    hf, path = hf_models[family]
    config, params = load_hf_checkpoint(path)
    export_hf(params, config, tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager", experts_implementation="eager").eval()
    assert type(again) is type(hf)
    tokens = torch.tensor(np.random.RandomState(5).randint(0, V, (2, 7)))
    with torch.no_grad():
        want = hf(tokens).logits.numpy()
        np.testing.assert_allclose(again(tokens).logits.numpy(), want, rtol=0, atol=ulps(64, want))
    config2, params2 = load_hf_checkpoint(tmp_path / "out")
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_export_refuses_what_no_hf_moe_class_holds(tmp_path):
    base = get_config("llama-tiny", vocab_size=V, moe=MOE)
    for bad in (base.replace(moe=MoEConfig.deepseek_v3(num_experts=4, experts_per_token=2, moe_d_ff=8,
                                                       shared_d_ff=8, n_group=2, topk_group=1)),
                base.replace(moe_layers=(1,)),  # Mixtral has no dense layers
                base.replace(moe=dataclasses.replace(MOE, norm_topk_prob=False))):
        with pytest.raises(ValueError, match="export"):
            export_hf(init_params(bad, jax.random.key(0)), bad, tmp_path)


# ---------------------------------------------------------------------------------------------
# SFT with the router's auxiliary loss


def sft_batch():
    rng = np.random.RandomState(7)
    tokens = jnp.asarray(rng.randint(0, V, (3, 10)), jnp.int32)
    mask = np.zeros((3, 10), np.float32)
    mask[0, 4:] = 1  # prompt 0..3, completion to the end
    mask[1, 3:7] = 1  # then 3 padding tokens
    return {"tokens": tokens, "mask": jnp.asarray(mask)}  # row 2: a filler row


def test_sft_loss_adds_router_aux_loss(model):
    config, params = model
    batch = sft_batch()
    ce, m0 = sft_batch_loss(params, config, batch, router_aux_loss_coef=0.0)
    total, m = sft_batch_loss(params, config, batch, router_aux_loss_coef=0.5)
    assert float(m0["loss"]) == float(ce) == float(m["loss"])  # "loss" stays the CE
    # independently: HF's attention mask of these rows (real up to the last completion token)
    real = np.zeros((3, 9), bool)
    real[0, :] = True
    real[1, :6] = True  # inputs 0..5 predict tokens 1..6; token 6 is the last completion token
    _, stats = forward(params, config, batch["tokens"][:, :-1], return_router_stats=True)
    aux, _ = load_balancing_loss(tuple(s.router_logits for s in stats), top_k=2, mask=jnp.asarray(real))
    assert float(m["aux_loss"]) == float(m0["aux_loss"])
    np.testing.assert_allclose(float(m["aux_loss"]), float(aux), rtol=ulps(16))  # the same sums, another jit
    np.testing.assert_allclose(float(total), float(ce) + 0.5 * float(aux), rtol=ulps(16))
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        sft_batch_loss(params, config, batch, router_aux_loss_coef=-1.0)
    dense = get_config("llama-tiny", vocab_size=V)
    assert "aux_loss" not in sft_batch_loss(init_params(dense, jax.random.key(0)), dense, batch)[1]


def test_router_gets_gradient_from_aux_loss_and_sft_step_logs_it(model):
    config, params = model
    batch = sft_batch()
    grad = lambda c: jax.grad(lambda p: sft_batch_loss(p, config, batch, router_aux_loss_coef=c)[0])(params)  # noqa: E731
    g0, g1 = grad(0.0), grad(1.0)
    router = lambda g: np.asarray(g["layers_1"]["moe"]["router"]["kernel"])  # noqa: E731
    assert np.abs(router(g1) - router(g0)).max() > 1e-4
    tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-3, warmup_steps=1, total_steps=4))
    step = make_sft_step(config, tx, schedule)
    state, metrics = step(create_train_state(jax.tree.map(jnp.copy, params), tx, 0), batch)
    assert np.isfinite(float(metrics["aux_loss"])) and float(metrics["aux_loss"]) >= 2.0 - 1e-5  # >= k


# ---------------------------------------------------------------------------------------------
# routing replay through the model


@pytest.mark.parametrize("scan", [False, True])
def test_routing_replay(scan):
    config = get_config("llama-tiny", vocab_size=V, max_seq_len=64, moe=MOE, scan_layers=scan, remat="full")
    unrolled = config.replace(scan_layers=False, remat="none")
    params = jax.tree.map(lambda x: x * 4, init_params(unrolled, jax.random.key(4)))
    if scan:
        params = stack_layers(params, unrolled)
    tokens = jnp.asarray(np.random.RandomState(6).randint(0, V, (2, 8)))
    logits, stats = forward(params, config, tokens, return_router_stats=True)
    own = tuple(s.expert_ids for s in stats)
    replayed, rstats = forward(params, config, tokens, return_router_stats=True, routing=own)
    np.testing.assert_array_equal(replayed, logits)  # the same ids and weights: the same program values
    other = tuple((ids + 1) % MOE.num_experts for ids in own)  # every token sent elsewhere
    moved, mstats = forward(params, config, tokens, return_router_stats=True, routing=other)
    for s, ids in zip(mstats, other):
        np.testing.assert_array_equal(s.expert_ids, ids)
    assert np.all(np.any(np.asarray(moved) != np.asarray(logits), axis=-1))
    # the routers still get gradients under replay (weights from the live logits)
    g = jax.grad(lambda p: jnp.sum(forward(p, config, tokens, routing=other) ** 2))(params)
    kernel = g["layers"]["moe"]["router"]["kernel"] if scan else g["layers_1"]["moe"]["router"]["kernel"]
    assert np.abs(np.asarray(kernel)).max() > 0
    with pytest.raises(ValueError, match="routing"):
        forward(params, config, tokens, routing=own[:1])


def test_moe_presets():
    # Mixtral-8x7B: 46,702,792,704 parameters (the HF checkpoint's count; the paper's "47B total,
    # 13B active"); Qwen1.5-MoE-A2.7B: "14.3B total, 2.7B activated" (Qwen's release notes)
    mixtral = get_config("mixtral-8x7b")
    assert num_params(mixtral) == 46_702_792_704
    assert round(num_params(mixtral, active=True) / 1e9, 1) == 12.9
    qwen = get_config("qwen1.5-moe-a2.7b")
    assert round(num_params(qwen) / 1e9, 1) == 14.3 and round(num_params(qwen, active=True) / 1e9, 1) == 2.7
    for name in ("mixtral-tiny", "qwen2-moe-tiny", "qwen3-moe-tiny"):
        config = get_config(name, vocab_size=V)
        params = init_params(config, jax.random.key(0))
        assert num_params(config) == sum(x.size for x in jax.tree.leaves(params)), name
        assert np.all(np.isfinite(forward(params, config, jnp.ones((1, 4), jnp.int32))))


def test_lora_patterns_never_select_expert_kernels(model):
    config, params = model
    targets = lora_targets(params, LoraConfig(rank=2, targets=("gate",)))
    # "gate" would also hit the experts layers_{1,2}/moe/gate/kernel [E, D, F]: skipped
    assert targets == ["layers_0/mlp/gate"]
    assert lora_targets(params, LoraConfig(rank=2, targets=("moe/router",))) == [
        "layers_1/moe/router", "layers_2/moe/router"]
    with pytest.raises(ValueError, match="matches no kernel"):
        lora_targets(params, LoraConfig(rank=2, targets=("moe/down",)))
