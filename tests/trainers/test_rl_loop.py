import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jaxalign.data as jd
from jaxalign.checkpoint import make_checkpoint_manager
from jaxalign.decoding import SamplingConfig
from jaxalign.lora import LoraConfig, init_lora, merge_lora
from jaxalign.metrics import MetricsWriter, read_metrics
from jaxalign.models import get_config, init_params
from jaxalign.rollout import evaluate_policy, grpo_rollout
from jaxalign.scoring import completion_logps
from jaxalign.trainers import create_train_state, make_grpo_step
from jaxalign.trainers.rl_loop import grpo_loop

TOK = jd.byte_tokenizer()
SAMPLING = SamplingConfig(max_new_tokens=6, eos_id=TOK.eos_id, pad_id=TOK.pad_id)
CONFIG = get_config("gpt2-tiny", vocab_size=TOK.vocab_size, max_seq_len=32, n_layers=1)
PARAMS = jax.tree.map(lambda x: x * 3, init_params(CONFIG, jax.random.key(0)))
OTHER = jax.tree.map(lambda x: x * 3, init_params(CONFIG, jax.random.key(1)))


def odd_length(completions, **_):
    return np.array([len(c) % 2 for c in completions], np.float32)


def test_evaluate_policy_rewards_columns_and_kl():
    tokens, mask = jd.collate_prompts(["1+1=", "22+3="], TOK)
    seen = {}

    def reward(completions, *, answers):
        seen["answers"] = answers
        return odd_length(completions)

    kw = dict(reward_fn=reward, decode=TOK.decode, sampling=SamplingConfig(max_new_tokens=6, temperature=1.0,
              eos_id=TOK.eos_id, pad_id=TOK.pad_id), rng=jax.random.key(2), samples=3, columns={"answers": ["2", "25"]})
    out = evaluate_policy(PARAMS, CONFIG, tokens, mask, ref_params=OTHER, **kw)
    assert seen["answers"] == ["2"] * 3 + ["25"] * 3  # prompt-major, S copies each
    np.testing.assert_array_equal(out.rewards, odd_length(out.completions))
    batch, kl = out.batch, out.batch.kl()
    lengths = np.asarray(batch.lengths)
    assert batch.completion_tokens.shape == (6, 6) and lengths.shape == (6,)
    assert out.metrics["reward_mean"] == pytest.approx(float(out.rewards.mean()), rel=1e-6)  # a mean of 6 of 0/1
    # KL: the sampled log-ratio summed over each completion, from teacher-forced passes of both
    prompts, masks = jnp.repeat(tokens, 3, 0), jnp.repeat(mask, 3, 0)
    comp_mask = (np.arange(6)[None] < lengths[:, None]).astype(np.float32)
    lp = completion_logps(PARAMS, CONFIG, prompts, masks, batch.completion_tokens)
    ref = completion_logps(OTHER, CONFIG, prompts, masks, batch.completion_tokens)
    # sums of <= 6 logp differences, |logp| <= 18: atol is 47 ulps of 18; measured 2.6
    np.testing.assert_allclose(kl, np.sum((lp - ref) * comp_mask, -1), rtol=1e-4, atol=1e-4)
    assert np.abs(kl).max() > 0.1
    same = evaluate_policy(PARAMS, CONFIG, tokens, mask, ref_params=PARAMS, **kw)
    np.testing.assert_allclose(same.batch.kl(), 0.0, atol=1e-4)  # as above; measured 2.4e-6
    no_ref = evaluate_policy(PARAMS, CONFIG, tokens, mask, **kw)
    assert no_ref.batch.kl() is None and "kl" not in no_ref.metrics


def run_loop(tmp_path, name):
    tx = optax.adam(1e-2)
    step = make_grpo_step(CONFIG, tx, lambda s: 1e-2, beta=0.0, max_length=6)
    state = create_train_state(jax.tree.map(jnp.copy, PARAMS), tx, 0)
    tokens, mask = jd.collate_prompts(["1+1=", "22+3="], TOK)
    writer = MetricsWriter(tmp_path / name, tensorboard=False)
    evals = []
    state, summary = grpo_loop(
        step, state, lambda it: (tokens, mask, {}), config=CONFIG, num_iterations=3,
        rng=jax.random.key(5), writer=writer, inner_steps=2, eval_every=2,
        eval_fn=lambda p: evals.append(1) or {"n": float(len(evals))},
        checkpoints=make_checkpoint_manager(tmp_path / name / "ckpt", save_every=2), progress=False,
        group_size=4, reward_fn=odd_length, decode=TOK.decode, sampling=SAMPLING,
    )
    writer.close()
    return state, summary, read_metrics(writer.path)


def test_grpo_loop_iterations_logging_eval_checkpoints_and_determinism(tmp_path):
    state, summary, records = run_loop(tmp_path, "a")
    assert int(state.step) == 6  # 3 iterations x 2 inner steps
    assert [r["step"] for r in records if r["stage"] == "grpo"] == [1, 2, 3]
    assert [(r["step"], r["n"]) for r in records if r["stage"] == "grpo_eval"] == [(2, 1.0), (3, 2.0)]
    assert summary["final_eval"] == {"n": 2.0} and len(summary["reward_mean"]) == 3
    assert [r["reward_mean"] for r in records if r["stage"] == "grpo"] == summary["reward_mean"]
    saved = {int(p.name) for p in (tmp_path / "a" / "ckpt").iterdir() if p.name.isdigit()}
    assert {2, 3} <= saved  # on the interval, and forced at the end
    # the same arguments give the same samples and updates
    again, summary2, _ = run_loop(tmp_path, "b")
    assert summary2["reward_mean"] == summary["reward_mean"]
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(a, b)


def test_grpo_loop_resumes_from_a_checkpoint_bit_identically(tmp_path):
    """A run stopped after iteration 2 and continued from its checkpoint equals one that ran
    through: same params, same records (the stale iteration-3 record of the killed run is dropped)."""
    whole, _, whole_records = run_loop(tmp_path, "whole")
    # a killed run: it got to iteration 3's record, but its last checkpoint is iteration 2
    killed, _, _ = run_loop(tmp_path, "killed")
    manager = make_checkpoint_manager(tmp_path / "killed" / "ckpt", save_every=2)
    manager.delete(3)
    tx = optax.adam(1e-2)
    fresh = create_train_state(jax.tree.map(jnp.copy, PARAMS), tx, 0)
    restored = manager.restore(2, args=ocp.args.StandardRestore(jax.eval_shape(lambda: fresh)))
    assert int(restored.step) == 4
    writer = MetricsWriter(tmp_path / "killed", tensorboard=False)
    evals = [1]  # the eval at iteration 2 already ran
    state, summary = grpo_loop(
        make_grpo_step(CONFIG, tx, lambda s: 1e-2, beta=0.0, max_length=6), restored,
        lambda it: (*jd.collate_prompts(["1+1=", "22+3="], TOK), {}), config=CONFIG, num_iterations=3,
        rng=jax.random.key(5), writer=writer, inner_steps=2, eval_every=2,
        eval_fn=lambda p: evals.append(1) or {"n": float(len(evals))},
        checkpoints=manager, progress=False, group_size=4, reward_fn=odd_length, decode=TOK.decode,
        sampling=SAMPLING,
    )
    writer.close()
    timing = ("rollout_seconds", "update_seconds")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]  # noqa: E731
    assert strip(read_metrics(writer.path)) == strip(whole_records)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(whole.params)):
        np.testing.assert_array_equal(a, b)


def ppo_setup(lr=1e-3):
    from jaxalign.optim import OptimConfig, make_optimizer
    from jaxalign.scoring import init_actor_critic
    from jaxalign.trainers import make_ppo_step
    from jaxalign.trainers.rl_loop import PPOState

    tx, schedule = make_optimizer(OptimConfig(learning_rate=lr, total_steps=100))
    params = init_actor_critic(jax.tree.map(jnp.copy, PARAMS), config=CONFIG, rng=jax.random.key(3))
    state = PPOState(create_train_state(params, tx, 0), jnp.float32(0.1))
    return make_ppo_step(CONFIG, tx, schedule), state


def count_one(prompt_tokens, prompt_mask, completion_tokens, completion_mask):
    return jnp.sum(jnp.where(completion_mask > 0, completion_tokens == ord("1"), False), axis=1).astype(jnp.float32)


def run_ppo(tmp_path, name, state, step, num_iterations, score_fn=count_one, manager=None):
    from jaxalign.trainers.rl_loop import ppo_loop

    tokens, mask = jd.collate_prompts(["1+1=", "22+3=", "7=", "x"], TOK)
    writer = MetricsWriter(tmp_path / name, tensorboard=False)
    try:
        return ppo_loop(
            step, state, lambda it: (tokens, mask), config=CONFIG, num_iterations=num_iterations,
            rng=jax.random.key(7), writer=writer, ref_params=PARAMS, score_fn=score_fn, epochs=2,
            num_minibatches=2, kl_target=0.5, kl_horizon=20.0, checkpoints=manager, progress=False,
            rollout_metrics=lambda out: {"length": float(np.asarray(out.batch.completion_mask).sum())},
            sampling=SAMPLING,
        )
    finally:
        writer.close()


def test_ppo_loop_adapts_beta_and_resumes_bit_identically(tmp_path):
    step, state = ppo_setup()
    whole, summary = run_ppo(tmp_path, "whole", state, step, 3)
    assert int(whole.train.step) == 3 * 2 * 2 and len(summary["score"]) == 3
    records = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and all("length" in r for r in records)
    # the logged β of iteration i+1 is the controller's update of iteration i's (float32)
    for prev, nxt in zip(records, records[1:]):
        from jaxalign.trainers import adaptive_kl_coef

        expected = np.float32(adaptive_kl_coef(prev["kl_coef"], prev["kl"], 4, target=0.5, horizon=20.0))
        assert nxt["kl_coef"] == pytest.approx(float(expected), rel=1e-6)  # float32 → JSON round trip
    # stop after 2 iterations (checkpointed), then continue to 3 from the checkpoint
    step, state = ppo_setup()
    manager = make_checkpoint_manager(tmp_path / "part" / "ckpt", save_every=1)
    run_ppo(tmp_path, "part", state, step, 2, manager=manager)
    restored = manager.restore(2, args=ocp.args.StandardRestore(jax.eval_shape(lambda: state)))
    resumed, _ = run_ppo(tmp_path, "part", restored, step, 3, manager=manager)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(whole)):
        np.testing.assert_array_equal(a, b)
    timing = ("rollout_seconds", "update_seconds")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]  # noqa: E731
    assert strip(read_metrics(tmp_path / "part" / "metrics.jsonl")) == strip(records)


def test_ppo_loop_stops_on_a_nonfinite_score(tmp_path):
    from jaxalign.checkpoint import NonFiniteError

    step, state = ppo_setup()
    nan_score = lambda *a: count_one(*a) * jnp.nan  # noqa: E731
    with pytest.raises(NonFiniteError, match=r"ppo: iteration 1: scores is not finite \(4 of 4 values\)"):
        run_ppo(tmp_path, "nan", state, step, 2, score_fn=nan_score)
    step, state = ppo_setup(lr=1e6)  # finite but diverged: the first update dwarfs the weights
    manager = make_checkpoint_manager(tmp_path / "lr" / "ckpt", save_every=1)
    with pytest.raises(NonFiniteError, match=r"ppo: step 1: update_ratio=.* > max_update_ratio=1"):
        run_ppo(tmp_path, "lr", state, step, 2, manager=manager)
    assert manager.all_steps() == []


def test_lora_grpo_runs_through_the_loop_with_a_policy_hook(tmp_path):
    """LoRA GRPO through `grpo_loop`: `policy_fn` merges the adapters to sample, `step_args`
    hands the step its base, the base is the reference. Two iterations equal the same rollouts
    and steps written out by hand, bit for bit, and the base never moves."""
    lora = LoraConfig(rank=2, targets=("all",))
    base = jax.tree.map(jnp.copy, PARAMS)
    base_before = jax.tree.map(np.array, base)
    tx = optax.adam(1e-2)
    step = make_grpo_step(CONFIG, tx, lambda s: 1e-2, beta=0.1, max_length=6, lora=lora)
    adapters = init_lora(base, lora, jax.random.key(4))
    tokens, mask = jd.collate_prompts(["1+1=", "22+3="], TOK)
    rollout_kw = dict(group_size=4, reward_fn=odd_length, decode=TOK.decode, sampling=SAMPLING)
    writer = MetricsWriter(tmp_path / "lora", tensorboard=False)
    state, summary = grpo_loop(
        step, create_train_state(jax.tree.map(jnp.copy, adapters), tx, 0), lambda it: (tokens, mask, {}),
        config=CONFIG, num_iterations=2, rng=jax.random.key(5), writer=writer, ref_params=base,
        policy_fn=lambda s: merge_lora(base, s.params, lora), step_args=(base,), progress=False, **rollout_kw,
    )
    writer.close()
    by_hand, rng = create_train_state(jax.tree.map(jnp.copy, adapters), tx, 0), jax.random.key(5)
    rewards = []
    for _ in range(2):
        rng, key = jax.random.split(rng)
        out = grpo_rollout(merge_lora(base, by_hand.params, lora), CONFIG, tokens, mask, rng=key, ref_params=base, **rollout_kw)
        by_hand, _ = step(by_hand, out.batch, base)
        rewards.append(out.metrics["reward_mean"])
    assert summary["reward_mean"] == rewards
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(by_hand.params)):
        np.testing.assert_array_equal(a, b)
    assert any(float(jnp.abs(b).max()) > 0 for b in jax.tree.leaves(state.params))  # lora_b trained
    for got, before in zip(jax.tree.leaves(base), jax.tree.leaves(base_before)):
        np.testing.assert_array_equal(got, before)
