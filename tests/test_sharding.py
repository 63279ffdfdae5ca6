"""Sharded steps, checkpoints across meshes, generation and per-device memory on 8 simulated CPU
devices.

The device count is fixed when jax initialises, and the suite runs in one process where other
tests start jax with one CPU device. So in that process the 8-device tests below are skipped and
`test_sharding_on_8_simulated_devices` re-runs this file in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` (appended to any existing flags), where they
run and the wrapper is skipped. The rest of the suite keeps its single device untouched.

Reference = the same program on one device with no shardings; each mesh must reproduce its loss,
gradient norm and updated parameters within float32 tolerance (reductions run in another order).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jaxalign.data as jd
from jaxalign.checkpoint import make_checkpoint_manager, restore_checkpoint, save_checkpoint
from jaxalign.decoding import SamplingConfig, generate
from jaxalign.memory import estimate_memory, per_device_memory
from jaxalign.models import get_config, init_params, init_scalar_model, param_logical_axes
from jaxalign.optim import OptimConfig, make_optimizer
from jaxalign.rollout import PPORollout, Rollout
from jaxalign.scoring import actor_critic_shardings, init_actor_critic, scalar_model_shardings
from jaxalign.sharding import (
    MeshConfig,
    abstract_mesh,
    abstract_params,
    abstract_state,
    activation_sharding,
    logical_to_spec,
    make_mesh,
    param_shardings,
    param_specs,
    shard_batch,
    shard_state,
    sharding_fallbacks,
)
from jaxalign.trainers import (
    create_train_state,
    make_dpo_step,
    make_grpo_step,
    make_ppo_step,
    make_reward_step,
    make_sft_step,
)
from jaxalign.trainers.step import params_step_shardings, step_shardings
from tests._tolerance import ulps

TOK = jd.byte_tokenizer()
CONFIG = get_config("gpt2-tiny", vocab_size=TOK.vocab_size, max_seq_len=32, n_layers=1)
# eps=1e-6 (default 1e-8): Adam's first update is lr·g/(|g| + eps), slope lr·eps/(|g| + eps)² in g.
# Some gradients are zero in exact arithmetic (the key bias: softmax ignores a shift shared by all
# keys) and come out as float32 noise of ~1e-10 whose sign depends on the reduction order; with
# eps=1e-8 that noise moves such a parameter by ~lr/100, with 1e-6 by ~lr/10^4.
OPT = OptimConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10, eps=1e-6)
MESHES = {"8x1x1": MeshConfig(8, 1, 1), "2x4x1": MeshConfig(2, 4, 1), "2x2x2": MeshConfig(2, 2, 2)}

EIGHT = jax.device_count() == 8
eight_devices = pytest.mark.skipif(not EIGHT, reason="runs in test_sharding_on_8_simulated_devices")


@pytest.mark.skipif(EIGHT, reason="already on 8 devices")
def test_sharding_on_8_simulated_devices():
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "XLA_FLAGS": flags.strip(), "PYTHONPATH": os.pathsep.join(
        [str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        cwd=root, env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    assert " passed" in result.stdout and "skipped" in result.stdout  # the wrapper itself


def copy(tree):
    return jax.tree.map(jnp.copy, tree)


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope="module")
def params():
    return host(init_params(CONFIG, jax.random.key(0)))


@pytest.fixture(scope="module")
def pairs():
    return jd.tokenize_preference(jd.sorting_task(8, seed=0), TOK, max_length=32)


@pytest.fixture(scope="module")
def sft_batch(pairs):
    return jd.collate_sft([p.chosen for p in pairs], batch_size=8, buckets=(32,), pad_id=TOK.pad_id)


@pytest.fixture(scope="module")
def dpo_batch(pairs):
    return jd.collate_preference(pairs, batch_size=8, buckets=(32,), pad_id=TOK.pad_id)


@pytest.fixture(scope="module")
def rollout():
    """A random but well-formed rollout of 8 samples (2 prompts × G=4), one row excluded."""
    rng = np.random.default_rng(0)
    p, n = 6, 8
    prompt_mask = np.ones((8, p), np.float32)
    prompt_mask[::2, :2] = 0  # left padding
    lengths = rng.integers(1, n + 1, 8)
    completion_mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)
    old = rng.normal(-3.0, 0.3, (8, n)).astype(np.float32) * completion_mask
    return Rollout(
        prompt_tokens=(rng.integers(1, 200, (8, p)) * prompt_mask).astype(np.int32),
        prompt_mask=prompt_mask,
        completion_tokens=rng.integers(1, 200, (8, n)).astype(np.int32),
        completion_mask=completion_mask,
        old_logps=old,
        ref_logps=old + rng.normal(0, 0.1, (8, n)).astype(np.float32) * completion_mask,
        rewards=rng.normal(size=8).astype(np.float32),
        advantages=rng.normal(size=8).astype(np.float32),
        where=np.array([1, 1, 1, 0, 1, 1, 1, 1], np.float32),
    )


@pytest.fixture(scope="module")
def ppo_rollout(rollout):
    """The GRPO rollout's prompts and completions as PPO experience (per-token advantages)."""
    rng = np.random.default_rng(1)
    m = rollout.completion_mask
    per_token = lambda scale: (rng.normal(size=m.shape) * scale).astype(np.float32) * m  # noqa: E731
    return PPORollout(
        prompt_tokens=rollout.prompt_tokens, prompt_mask=rollout.prompt_mask,
        completion_tokens=rollout.completion_tokens, completion_mask=m,
        old_logps=rollout.old_logps, ref_logps=rollout.ref_logps, old_values=per_token(0.5),
        scores=rollout.rewards, rewards=per_token(0.1), advantages=per_token(1.0), returns=per_token(1.0),
    )


def trained_params(kind, params):
    """The trained tree of each kind: the LM, a reward model, or PPO's policy + separate critic."""
    if kind == "reward":
        return {"backbone": params, "head": host(init_scalar_model(CONFIG, jax.random.key(1))["head"])}
    if kind == "ppo":
        critic = host(init_scalar_model(CONFIG, jax.random.key(2)))
        return host(init_actor_critic(params, critic, config=CONFIG, rng=jax.random.key(3)))
    return params


def run_step(kind, params, batch, mesh_name, loss_agg="seq_mean_token_mean"):
    """One step from fresh state; returns (loss, grad_norm, updated params) on the host."""
    tx, schedule = make_optimizer(OPT)
    mesh = None if mesh_name is None else make_mesh(MESHES[mesh_name])
    extra = (params,) if kind == "dpo" else ()
    trained = trained_params(kind, params)
    shardings = None
    if mesh is not None and kind == "reward":
        shardings = params_step_shardings(jax.eval_shape(lambda: trained), scalar_model_shardings(CONFIG, mesh), tx, mesh)
    elif mesh is not None and kind == "ppo":
        shardings = params_step_shardings(
            jax.eval_shape(lambda: trained), actor_critic_shardings(CONFIG, mesh, critic="separate"), tx, mesh
        )
    elif mesh is not None:
        shardings = step_shardings(CONFIG, tx, mesh, num_extra_params=len(extra))
    if kind == "sft":
        step = make_sft_step(CONFIG, tx, schedule, shardings=shardings)
    elif kind == "dpo":
        step = make_dpo_step(CONFIG, tx, schedule, shardings=shardings)
    elif kind == "reward":
        step = make_reward_step(CONFIG, tx, schedule, shardings=shardings)
    elif kind == "ppo":
        step = make_ppo_step(CONFIG, tx, schedule, shardings=shardings)  # critic read from the tree
    else:
        step = make_grpo_step(CONFIG, tx, schedule, loss_agg=loss_agg, shardings=shardings)
    params = trained
    state = create_train_state(copy(params), tx, 0)
    if mesh is None:
        new, metrics = step(state, jax.tree.map(jnp.asarray, batch), *map(copy, extra))
    else:
        state = shard_state(state, shardings.state)
        extra = tuple(shard_state(e, s) for e, s in zip(extra, shardings.extra))
        new, metrics = step(state, shard_batch(batch, mesh), *extra)
        # the step really ran sharded: fsdp/tensor split the weights, data the batch
        lm = {"reward": lambda t: t["backbone"], "ppo": lambda t: t["value"]["backbone"]}.get(kind, lambda t: t)
        kernel = lm(new.params)["layers_0"]["mlp"]["up"]["kernel"]
        assert kernel.sharding.spec == lm(shardings.state.params)["layers_0"]["mlp"]["up"]["kernel"].spec
    mu = optax.tree_utils.tree_get(new.opt_state, "mu")  # Adam's first moment = (1 - b1)·grads
    return float(metrics["loss"]), float(metrics["grad_norm"]), host(new.params), host(mu)


def assert_same(reference, sharded, initial, grad_atol=1e-5, update_rtol=1e-3):
    """Loss and grad norm to float32 rounding; the gradients (via Adam's first moment, linear in
    them) elementwise to `grad_atol` of the largest; the parameter update (new - initial params, the
    whole tree) to `update_rtol` of its L2 norm, since Adam's first step amplifies reduction-order
    noise in near-zero gradients elementwise (see OPT)."""
    loss, norm, params, mu = sharded
    # the loss: a mean over <= 8x31 tokens, split into per-shard partial sums: 32 ulps (measured <= 2.2)
    np.testing.assert_allclose(loss, reference[0], rtol=ulps(32))
    # the norm: a sqrt of a sum of ~1e5 squared gradients, each a reduction over the sharded batch:
    # 512 ulps (measured <= 30)
    np.testing.assert_allclose(norm, reference[1], rtol=ulps(512))
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(reference[3]))
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(reference[3])[0], jax.tree.leaves(mu)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=grad_atol * scale, err_msg="mu" + jax.tree_util.keystr(path))
    ref_update = jax.tree.map(np.subtract, reference[2], initial)
    diff = jax.tree.map(np.subtract, params, reference[2])
    assert optax.global_norm(diff) <= update_rtol * optax.global_norm(ref_update)


@eight_devices
@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo", "reward", "ppo"])
def test_sharded_step_equals_one_device(kind, params, sft_batch, dpo_batch, rollout, ppo_rollout):
    batch = {"sft": sft_batch, "dpo": dpo_batch, "grpo": rollout, "reward": dpo_batch, "ppo": ppo_rollout}[kind]
    reference = run_step(kind, params, batch, None)
    assert np.isfinite(reference[0]) and reference[1] > 0
    initial = trained_params(kind, params)
    # Gradients to 1e-5 of the largest: measured <= 7e-7 of it (<= 0.07 of the tolerance), both ISAs.
    # A reward model's loss reads one position per sequence, and chosen and rejected share their
    # prompt, so its trunk gradients are differences of near-equal sums: measured up to 1.2e-4 of the
    # largest gradient (the head's), 0.95 of the old 1e-4, and Adam's first step turns that noise
    # into an update 5e-4 of its norm apart (0.5 of the old 1e-3). Allow 10x both; a sharding bug
    # moves gradients and updates by O(1) of themselves.
    grad_atol, update_rtol = (1e-3, 1e-2) if kind == "reward" else (1e-5, 1e-3)
    # SFT on every mesh (pure data, data × fsdp, all three axes); the other steps share its
    # shardings code and run on (2, 2, 2), where each of data, fsdp and tensor splits in two.
    for name in MESHES if kind == "sft" else ["2x2x2"]:
        assert_same(reference, run_step(kind, params, batch, name), initial, grad_atol, update_rtol)


@eight_devices
@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_sum_norm"])
def test_grpo_loss_agg_sharded_equals_whole_batch(loss_agg, params, rollout):
    # issue 5 item 3: with the batch split over 4 data×fsdp shards the loss and its gradient are
    # those of the whole batch (the default mode is covered by the step test above)
    reference = run_step("grpo", params, rollout, None, loss_agg)
    assert_same(reference, run_step("grpo", params, rollout, "2x2x2", loss_agg), params)


@eight_devices
def test_sharded_step_constrains_activations_plain_step_does_not(params, sft_batch):
    tx, schedule = make_optimizer(OPT)
    shardings = step_shardings(CONFIG, tx, make_mesh(MeshConfig(2, 2, 2)))
    state = jax.eval_shape(lambda: create_train_state(params, tx, 0))
    sharded = make_sft_step(CONFIG, tx, schedule, shardings=shardings).lower(state, sft_batch).as_text()
    plain = make_sft_step(CONFIG, tx, schedule).lower(state, sft_batch).as_text()
    constraint = 'sharding_constraint %'
    # the residual stream after the embedding and after the one block, batch over data×fsdp
    assert sharded.count('[{"data", "fsdp"}, {}, {}]> : tensor<8x31x64xf32>') >= 2
    assert constraint in sharded and constraint not in plain


@eight_devices
def test_batch_stream_shards_partition_the_global_batch():
    examples = list(range(37))

    def collate(xs):
        return {"x": np.array(xs)}

    whole = jd.BatchStream(examples, 8, 3, collate)
    shards = [jd.BatchStream(examples, 2, 3, collate, num_shards=4, shard_index=i) for i in range(4)]
    assert whole.steps_per_epoch == shards[0].steps_per_epoch == 4
    for step in (0, 3, 4, 9):
        parts = [s.batch_at(step)["x"] for s in shards]
        assert all(len(p) == 2 for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), whole.batch_at(step)["x"])
    with pytest.raises(ValueError, match="shard_index"):
        jd.BatchStream(examples, 2, 3, collate, num_shards=4, shard_index=4)
    with pytest.raises(ValueError, match="drop_last"):
        jd.BatchStream(examples, 2, 3, collate, drop_last=False, num_shards=2)


@eight_devices
def test_mesh_config_resolves_and_rejects():
    assert MeshConfig().axis_sizes(8) == (1, 8, 1)
    assert MeshConfig(data=2, fsdp=-1, tensor=2).axis_sizes(8) == (2, 2, 2)
    assert MeshConfig(data=-1, fsdp=1, tensor=4).axis_sizes(8) == (2, 1, 4)
    with pytest.raises(ValueError, match="data×fsdp×tensor = 4"):
        MeshConfig(2, 2, 1).axis_sizes(8)
    with pytest.raises(ValueError, match="only one axis"):
        MeshConfig(-1, -1, 1)
    with pytest.raises(ValueError, match="MeshConfig.tensor"):
        MeshConfig(1, -1, 0)
    with pytest.raises(ValueError, match="MeshConfig.fsdp=-1"):
        MeshConfig(3, -1, 1).axis_sizes(8)
    mesh = make_mesh(MeshConfig(2, 2, 2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


@eight_devices
def test_rules_fall_back_with_reasons():
    mesh = abstract_mesh(MeshConfig(2, 2, 2), 8)
    spec, why = logical_to_spec(("vocab", "embed"), (257, 64), mesh)
    assert spec == P(None, "fsdp") and "'vocab'" in why[0] and "replicated" in why[0]
    spec, why = logical_to_spec(("batch", None), (6, 5), abstract_mesh(MeshConfig(2, 4, 1), 8))
    assert spec == P("data", None) and "split over ('data',) only" in why[0]
    assert logical_to_spec(("batch", "embed"), (8, 64), mesh)[0] == P(("data", "fsdp"), None)
    with pytest.raises(ValueError, match="'nope' has no rule"):
        logical_to_spec(("nope",), (4,), mesh)
    specs = param_specs(CONFIG, mesh)
    assert specs["layers_0"]["attn"]["wq"]["kernel"] == P("fsdp", "tensor", None)
    assert specs["layers_0"]["mlp"]["down"]["kernel"] == P("tensor", "fsdp")
    fallbacks = sharding_fallbacks(param_logical_axes(CONFIG), abstract_params(CONFIG), mesh)
    assert fallbacks == ["embed/embedding: 'vocab' (dim 0) size 257 not divisible by {'tensor': 2}: replicated"]


@eight_devices
def test_shard_batch_splits_rows_and_names_bad_leaves(sft_batch):
    mesh = make_mesh(MeshConfig(2, 2, 2))
    batch = shard_batch(sft_batch, mesh)
    assert batch["tokens"].sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in batch["tokens"].addressable_shards} == {(2, 32)}
    np.testing.assert_array_equal(batch["tokens"], sft_batch["tokens"])
    with pytest.raises(ValueError, match="mask.*divisible by the 4 batch shards"):
        shard_batch({"mask": np.ones((6, 3))}, mesh)


@eight_devices
def test_checkpoint_restores_onto_other_meshes(params, tmp_path):
    tx, _ = make_optimizer(OPT)
    source = step_shardings(CONFIG, tx, make_mesh(MeshConfig(8, 1, 1)))
    state = create_train_state(copy(params), tx, 0)
    state = state.replace(opt_state=jax.tree.map(lambda x: x + 0.5 if x.ndim else x, state.opt_state))
    expected = host(state)
    manager = make_checkpoint_manager(tmp_path, save_every=1)
    save_checkpoint(manager, 1, shard_state(state, source.state))
    manager.wait_until_finished()
    shapes = jax.eval_shape(lambda: state)

    target = step_shardings(CONFIG, tx, make_mesh(MeshConfig(2, 2, 2)))
    restored = restore_checkpoint(manager, abstract_state(shapes, target.state))
    wq = restored.params["layers_0"]["attn"]["wq"]["kernel"]
    assert wq.sharding.spec == P("fsdp", "tensor") or wq.sharding.spec == P("fsdp", "tensor", None)
    jax.tree.map(np.testing.assert_array_equal, host(restored), expected)

    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restored = restore_checkpoint(manager, abstract_state(shapes, jax.tree.map(lambda _: one, shapes)))
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(restored))
    jax.tree.map(np.testing.assert_array_equal, host(restored), expected)


@eight_devices
def test_generation_under_mesh_matches_one_device(params):
    tokens, mask = jd.collate_prompts(["3 1 2 =", "9 8 =", "5 =", "7 7 1 4 ="], TOK)
    gen_kw = dict(rng=jax.random.key(0), sampling=SamplingConfig(max_new_tokens=6, temperature=0.0, pad_id=TOK.pad_id))
    big = jax.tree.map(lambda x: x * 4, params)  # sharper logits: distinct greedy choices
    reference = generate(big, CONFIG, jnp.asarray(tokens), jnp.asarray(mask), **gen_kw)

    mesh = make_mesh(MeshConfig(data=4, fsdp=1, tensor=2))  # batch over data, heads over tensor
    sharded_params = shard_state(big, param_shardings(CONFIG, mesh))
    prompts = shard_batch({"tokens": tokens, "mask": mask}, mesh)
    with activation_sharding(mesh):
        gen = generate(sharded_params, CONFIG, prompts["tokens"], prompts["mask"], **gen_kw)
    assert len(gen.tokens.sharding.device_set) == 8
    np.testing.assert_array_equal(gen.tokens, reference.tokens)
    # sharded vs one device: 256 ulps of max|logp| as in tests/test_decoding.py; measured <= 7.4
    np.testing.assert_allclose(gen.model_logps, reference.model_logps, rtol=0, atol=ulps(256, reference.model_logps))


@eight_devices
@pytest.mark.parametrize("mesh_config", [MeshConfig(2, 2, 2), MeshConfig(8, 1, 1), MeshConfig(1, 2, 4)])
def test_per_device_memory_equals_addressable_shards(params, mesh_config):
    tx, _ = make_optimizer(OPT)
    mesh = make_mesh(mesh_config)
    shardings = step_shardings(CONFIG, tx, mesh)
    state = shard_state(create_train_state(copy(params), tx, 0), shardings.state)
    device = jax.devices()[0]

    def on_device(tree):
        return sum(
            s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device
        )

    report = per_device_memory(CONFIG, mesh, batch=8, seq_len=31, tx=tx)
    assert report["params"] == report["grads"] == on_device(state.params)
    assert report["optimizer_state"] == on_device(state.opt_state)
    full = per_device_memory(CONFIG, abstract_mesh(MeshConfig(1, 1, 1), 1), batch=8, seq_len=31, tx=tx)
    shards = mesh_config.data * mesh_config.fsdp
    assert report["activations"] == estimate_memory(CONFIG, batch=8 // shards, seq_len=31)["activations"]
    assert report["params"] < full["params"] or mesh_config.data == 8
    with pytest.raises(ValueError, match="batch 7 is not divisible"):
        per_device_memory(CONFIG, mesh, batch=7, seq_len=31)



MOE = get_config("mixtral-tiny", vocab_size=TOK.vocab_size, max_seq_len=32, n_layers=1)


@eight_devices
def test_moe_sft_step_sharded_equals_one_device(sft_batch):
    """A Mixtral-style MoE SFT step (4 experts, top-2, the load-balancing term in the loss) on a
    (2, 2, 2) mesh equals the one-device step: experts replicated ("expert" rule), D over fsdp, F
    over tensor."""
    params = host(init_params(MOE, jax.random.key(0)))
    # Router weights scaled up (std 0.02 -> 1): top-2 gaps far above the reduction-order noise of
    # the router logits, so no token's route can flip between the two programs.
    params["layers_0"]["moe"]["router"]["kernel"] = params["layers_0"]["moe"]["router"]["kernel"] * 50.0
    tx, schedule = make_optimizer(OPT)

    def one_step(mesh_config):
        mesh = None if mesh_config is None else make_mesh(mesh_config)
        shardings = None if mesh is None else step_shardings(MOE, tx, mesh)
        step = make_sft_step(MOE, tx, schedule, shardings=shardings)
        state = create_train_state(copy(params), tx, 0)
        if mesh is None:
            new, metrics = step(state, jax.tree.map(jnp.asarray, sft_batch))
        else:
            new, metrics = step(shard_state(state, shardings.state), shard_batch(sft_batch, mesh))
            expert = new.params["layers_0"]["moe"]["up"]["kernel"]  # [E, D, F]
            assert expert.sharding.spec == shardings.state.params["layers_0"]["moe"]["up"]["kernel"].spec
        mu = optax.tree_utils.tree_get(new.opt_state, "mu")
        return float(metrics["loss"]), float(metrics["grad_norm"]), host(new.params), host(mu)

    reference = one_step(None)
    assert np.isfinite(reference[0]) and reference[1] > 0
    # the same bounds as the dense steps (test_sharded_step_equals_one_device)
    assert_same(reference, one_step(MESHES["2x2x2"]), params)
