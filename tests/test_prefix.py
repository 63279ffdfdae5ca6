"""Prefix-tuning (jaxalign.prefix): parity with PEFT 0.21.2's `PrefixTuning` on tiny GPT-2 and
grouped-query Llama models, cached decoding == the teacher-forced pass, gradients and training
reach the prefix only, prefix-sized checkpoints."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers

from jaxalign.checkpoint import make_checkpoint_manager, restore_checkpoint, save_checkpoint
from jaxalign.decoding import SamplingConfig, generate, prompt_positions
from jaxalign.logprobs import token_logps
from jaxalign.losses.dpo import dpo_loss
from jaxalign.models import forward as _forward
from jaxalign.models import get_config, init_params, load_hf_checkpoint
from jaxalign.models.transformer import forward_with_cache
from jaxalign.optim import OptimConfig, make_optimizer
from jaxalign.prefix import (
    PREFIX_PARAMS,
    PrefixConfig,
    init_prefix,
    make_prefix_loss_fn,
    merge_prefix,
    num_prefix_params,
    prefix_cache,
    prefix_kv,
    prefix_positions,
)
from jaxalign.prefix import prefix_forward as _prefix_forward
from jaxalign.scoring import completion_logps
from jaxalign.trainers import create_train_state, make_sft_step, make_train_step
from jaxalign.trainers.dpo import dpo_batch_loss, pair_logps
from jaxalign.trainers.sft import sft_batch_loss
from tests._tolerance import ulps

V = 97
P = 5
# one compilation per (config, shape), not op by op
forward = jax.jit(_forward, static_argnums=1)
prefix_forward = jax.jit(_prefix_forward, static_argnums=(2, 3))


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


# --- parity with PEFT -------------------------------------------------------------------------


def hf_model(family):
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=V, n_positions=40, n_embd=48, n_layer=2, n_head=4,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).eval()
    # grouped-query: 6 query heads on 2 kv heads, so PEFT's token_dim is K·H = 16, not D = 48
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                                   num_key_value_heads=2, intermediate_size=80, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def peft_prefix_tree(encoder, projection):
    """PEFT's `prompt_encoder.default` weights as a jaxalign prefix tree (kernels = weight.T)."""
    sd = {k: v.detach().numpy() for k, v in encoder.state_dict().items()}
    tree = {"embedding": jnp.asarray(sd["embedding.weight"])}
    if projection:
        for i in (0, 2):
            tree[f"transform_{i}"] = {"kernel": jnp.asarray(sd[f"transform.{i}.weight"].T),
                                      "bias": jnp.asarray(sd[f"transform.{i}.bias"])}
    return tree


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("projection", [False, True])
def test_logits_match_peft_prefix_tuning(family, projection, tmp_path):
    model = hf_model(family)
    model.save_pretrained(tmp_path)  # before PEFT wraps it (the base weights stay as they are)
    config, params = load_hf_checkpoint(tmp_path)
    peft_config = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection,
        encoder_hidden_size=24 if projection else None,
    )
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(model, peft_config).eval()
    pcfg = PrefixConfig(P, projection=projection, projection_hidden=24 if projection else None)
    prefix = peft_prefix_tree(peft_model.prompt_encoder["default"], projection)
    tokens = np.random.RandomState(0).randint(0, V, (2, 11))
    with torch.no_grad():  # no padding: PEFT + HF derive positions P, P+1, ... from the cache length
        want = peft_model(input_ids=torch.tensor(tokens)).logits.numpy()
    got = np.asarray(prefix_forward(params, prefix, config, pcfg, jnp.asarray(tokens)))
    # torch vs XLA, 2 layers of 48-term sums, softmax over P + 11 keys (the prefix's N(0,1)
    # values included): 128 ulps of max|logit| as the plain parity tests; measured <= 2.7
    np.testing.assert_allclose(got, want, rtol=0, atol=ulps(128, want))
    # the prefix matters: the plain model is far from it
    assert np.max(np.abs(np.asarray(forward(params, config, jnp.asarray(tokens))) - want)) > 1e3 * ulps(128, want)
    # merged (the MLP evaluated once, dropped): the same keys and values, the same logits
    merged = merge_prefix(prefix, config, pcfg)
    assert set(merged) == {"embedding"}
    again = np.asarray(prefix_forward(params, merged, config, pcfg.merged(), jnp.asarray(tokens)))
    # the same flat P_θ up to the MLP's rounding inside another program: 8 ulps of max|logit|
    # (measured 0)
    np.testing.assert_allclose(again, got, rtol=0, atol=ulps(8, got))


def test_kv_layout_and_zero_prefix_is_not_the_identity(llama):
    config, params = llama[:2]
    l, k, h = config.n_layers, config.kv_heads, config.head_dim
    pcfg = PrefixConfig(3)
    flat = jnp.arange(3 * 2 * l * k * h, dtype=jnp.float32).reshape(3, -1)
    keys, values = prefix_kv({"embedding": flat}, config, pcfg)
    view = np.asarray(flat).reshape(3, 2 * l, k, h)  # PEFT's view [P, 2L, K, H]: rows 2l, 2l+1
    for layer in range(l):
        np.testing.assert_array_equal(keys[layer], view[:, 2 * layer])
        np.testing.assert_array_equal(values[layer], view[:, 2 * layer + 1])
    zero = init_prefix(config, PrefixConfig(3, init="zero"), jax.random.key(1))
    assert not np.any(np.asarray(zero["embedding"]))
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, V, (2, 7)))
    with_zero = prefix_forward(params, zero, config, pcfg, tokens)
    # zero values still take softmax weight exp(q·0) = 1 per slot: not the base model (and RoPE
    # positions move by P)
    assert np.max(np.abs(np.asarray(with_zero) - np.asarray(forward(params, config, tokens)))) > 1e-3


def test_refusals():
    config = get_config("gpt2-tiny", vocab_size=V)
    pcfg = PrefixConfig(4, projection=True)
    prefix = jax.eval_shape(lambda: init_prefix(config, pcfg, jax.random.key(0)))  # shapes only
    merged = jax.eval_shape(lambda p: merge_prefix(p, config, pcfg), prefix)
    with pytest.raises(ValueError, match="merged"):  # a merged (direct) tree read with the MLP config
        prefix_kv(merged, config, pcfg)
    with pytest.raises(ValueError, match="does not match"):
        prefix_kv(prefix, config, PrefixConfig(5, projection=True))
    with pytest.raises(ValueError, match="context"):
        prefix_cache(prefix, config, pcfg, 1, config.max_seq_len - 3)
    with pytest.raises(ValueError, match="window"):
        init_prefix(get_config("gemma3-tiny"), PrefixConfig(4), jax.random.key(0))
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PrefixConfig(0)
    with pytest.raises(ValueError, match="projection_hidden"):
        PrefixConfig(4, projection_hidden=8)


# --- cached decoding == teacher-forced pass, left padding -------------------------------------


@pytest.fixture(scope="module")
def llama():
    config = get_config("llama-tiny", vocab_size=V)
    pcfg = PrefixConfig(P, projection=True, projection_hidden=16)
    prefix = jax.jit(init_prefix, static_argnums=(0, 1))(config, pcfg, jax.random.key(1))
    return config, init_params(config, jax.random.key(0)), pcfg, prefix


def test_greedy_decode_with_prefix_equals_teacher_forced(llama):
    config, params, pcfg, prefix = llama
    rng = np.random.RandomState(2)
    prompts = rng.randint(1, V, (3, 6))
    mask = np.ones((3, 6), np.int32)
    mask[1, :2] = 0  # left padding
    mask[2, :4] = 0
    prompts, mask = jnp.asarray(np.where(mask, prompts, 0)), jnp.asarray(mask)
    n = 5
    step = jax.jit(forward_with_cache, static_argnums=1)
    positions = prefix_positions(prompt_positions(mask), pcfg)  # [B,6]
    cache = prefix_cache(prefix, config, pcfg, 3, 6 + n)
    logits, cache = step(params, config, prompts, cache, positions)
    tokens, logps, last = [], [], positions[:, -1]
    for _ in range(n):  # greedy, one token per call over the prefix-filled cache
        token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        logps.append(jax.nn.log_softmax(logits[:, -1].astype(jnp.float32))[jnp.arange(3), token])
        tokens.append(token)
        last = last + 1
        logits, cache = step(params, config, token[:, None], cache, last[:, None])
    completion, decoded = jnp.stack(tokens, 1), np.asarray(jnp.stack(logps, 1))  # [B,N]

    # the GRPO scoring path (`completion_logps` -> `forward` with positions) under the prefix loss
    def score(p, batch, rng):
        logps = completion_logps(p, config, *batch)
        return logps.sum(), {"logps": logps}

    scorer = jax.jit(make_prefix_loss_fn(score, pcfg))
    scored = scorer(prefix, (prompts, mask, completion), None, params)[1]
    # the same sums in another order (one token vs a whole [T, S] score block per call): 2
    # layers of 32-term sums over |logit| <~ 1, log-probs ~ log V; 64 ulps of max|logp|
    # (measured 1.1)
    np.testing.assert_allclose(scored["logps"], decoded, rtol=0, atol=ulps(64, decoded))
    # left padding changes nothing: row 2 alone, unpadded
    row2 = scorer(prefix, (prompts[2:, 4:], mask[2:, 4:], completion[2:]), None, params)[1]
    np.testing.assert_allclose(row2["logps"], decoded[2:], rtol=0, atol=ulps(64, decoded))
    # `generate` over the same pre-filled cache is that loop in one while_loop
    gen = generate(params, config, prompts, mask, sampling=SamplingConfig(max_new_tokens=n, temperature=0.0),
                   rng=jax.random.key(0), cache=prefix_cache(prefix, config, pcfg, 3, 6 + n))
    np.testing.assert_array_equal(np.asarray(gen.tokens), np.asarray(completion))
    np.testing.assert_allclose(np.asarray(gen.model_logps), decoded, rtol=0, atol=ulps(64, decoded))


# --- gradients and training touch the prefix only ---------------------------------------------


def sft_batch(b=4, t=12, seed=0):
    """A tiny task: every completion is the same fixed 6 tokens after a random prompt."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, V, (b, t))
    tokens[:, t // 2:] = np.arange(10, 10 + t - t // 2)
    mask = np.zeros((b, t), np.float32)
    mask[:, t // 2:] = 1.0
    return {"tokens": jnp.asarray(tokens, jnp.int32), "mask": jnp.asarray(mask)}


def test_sft_steps_train_only_the_prefix_and_reduce_the_loss(llama):
    config, params, pcfg, prefix = llama
    base_copy = jax.tree.map(np.array, params)
    tx, schedule = make_optimizer(OptimConfig(learning_rate=0.1, total_steps=30, warmup_steps=0))
    step = make_sft_step(config, tx, schedule, prefix=pcfg)  # make_train_step(sft_batch_loss, prefix=pcfg)
    state = create_train_state(jax.tree.map(jnp.copy, prefix), tx, 0)
    assert nbytes(state.opt_state) < 3 * nbytes(prefix) + 64  # two Adam moments, small counters
    batch = sft_batch()

    # every prefix leaf gets a gradient, equal to that of the explicit prefix_forward loss
    def explicit(pr):
        tokens = batch["tokens"]
        logits = prefix_forward(params, pr, config, pcfg, tokens[:, :-1])
        return -jnp.sum(jnp.where(batch["mask"][:, 1:] > 0, token_logps(logits, tokens[:, 1:]), 0.0))

    wrapped = make_prefix_loss_fn(lambda p, b, r: sft_batch_loss(p, config, b, r), pcfg)
    grads, want = jax.jit(  # one program for both
        lambda pr: (jax.grad(lambda q: wrapped(q, batch, None, params)[1]["loss_sum"])(pr), jax.grad(explicit)(pr))
    )(prefix)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        assert np.all(np.any(np.asarray(g) != 0, axis=0))  # every column moves
        # same maths, traced apart, summed in an order XLA may pick differently: 64 ulps of the
        # largest gradient (measured 0)
        np.testing.assert_allclose(g, w, rtol=0, atol=ulps(64, w))

    held_out = jax.jit(lambda pr: wrapped(pr, sft_batch(seed=1), None, params)[0])  # other prompts
    before, losses = float(held_out(prefix)), []
    for _ in range(15):
        state, metrics = step(state, batch, params)
        losses.append(float(metrics["loss"]))
    for got, was in zip(jax.tree.leaves(params), jax.tree.leaves(base_copy)):  # base bitwise intact
        np.testing.assert_array_equal(got, was)
    # a frozen random tiny model has little to steer (near-uniform logits, log V = 4.57): measured
    # 4.66 -> 4.09 over 15 steps at lr 0.1, every step lower
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.3, losses
    assert float(held_out(state.params)) < before - 0.3  # the task, not the batch
    with pytest.raises(ValueError, match="not both"):
        make_train_step(lambda p, b, r: (0.0, {}), tx, schedule, prefix=pcfg, lora=object())


def test_dpo_reference_is_the_base(llama):
    """The policy runs with the prefix, the reference (params without the prefix key) without."""
    config, params, pcfg, prefix = llama
    rng = np.random.RandomState(3)
    mask = np.zeros((2, 10), np.float32)
    mask[:, 5:] = 1.0
    batch = {
        "chosen_tokens": jnp.asarray(rng.randint(0, V, (2, 10)), jnp.int32),
        "rejected_tokens": jnp.asarray(rng.randint(0, V, (2, 10)), jnp.int32),
        "chosen_mask": jnp.asarray(mask), "rejected_mask": jnp.asarray(mask),
    }
    loss_fn = make_prefix_loss_fn(lambda p, b, r, ref: dpo_batch_loss(p, config, b, r, ref), pcfg)
    loss, _ = jax.jit(loss_fn)(prefix, batch, None, params, params)
    logps = jax.jit(lambda p, b: pair_logps(p, config, b))
    policy = logps({**params, PREFIX_PARAMS: prefix}, batch)  # no interceptor: the plain model
    reference = logps(params, batch)
    np.testing.assert_array_equal(policy[0], reference[0])  # the key alone changes nothing

    def with_prefix(b):
        tokens = jnp.concatenate([b["chosen_tokens"], b["rejected_tokens"]])
        m = jnp.concatenate([b["chosen_mask"], b["rejected_mask"]])
        logps = token_logps(prefix_forward(params, prefix, config, pcfg, tokens[:, :-1]), tokens[:, 1:])
        seq = jnp.sum(jnp.where(m[:, 1:] > 0, logps, 0.0), axis=-1)
        return seq[:2], seq[2:]

    want, _ = dpo_loss(*jax.jit(with_prefix)(batch), *reference)
    # sequence log-prob sums of 5 terms ~ log V, through a sigmoid: 64 ulps of |loss| (measured 0)
    np.testing.assert_allclose(float(loss), float(want), rtol=ulps(64))
    assert abs(float(loss) - math.log(2)) > 1e-4  # unlike LoRA, the prefix at init is not the base


def test_checkpoint_is_prefix_sized(llama, tmp_path):
    config, params, pcfg, prefix = llama
    tx = optax.adam(1e-3)
    state = create_train_state(prefix, tx, 0)
    manager = make_checkpoint_manager(tmp_path / "ckpt", save_every=1)
    assert save_checkpoint(manager, 1, state, force=True)
    manager.wait_until_finished()
    restored = restore_checkpoint(manager, create_train_state(init_prefix(config, pcfg, jax.random.key(9)), tx, 0))
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(got, want)
    on_disk = sum(f.stat().st_size for f in (tmp_path / "ckpt").rglob("*") if f.is_file())
    assert num_prefix_params(prefix) * 4 == nbytes(prefix)
    # prefix + two Adam moments (34 KB; orbax compresses them, measured 26 KB with its metadata),
    # never the 389 KB base
    assert on_disk < nbytes(state) + 64 * 1024
    assert on_disk < nbytes(params) / 4
