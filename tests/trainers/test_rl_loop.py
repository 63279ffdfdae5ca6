import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxalign.data as jd
from jaxalign.checkpoint import make_checkpoint_manager
from jaxalign.metrics import MetricsWriter, read_metrics
from jaxalign.models import get_config, init_params
from jaxalign.rollout import completion_logps
from jaxalign.trainers import create_train_state, make_grpo_step
from jaxalign.trainers.rl_loop import evaluate_policy, grpo_loop

TOK = jd.byte_tokenizer()
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

    kw = dict(reward_fn=reward, decode=TOK.decode, rng=jax.random.key(2), max_new_tokens=6,
              eos_id=TOK.eos_id, pad_id=TOK.pad_id, temperature=1.0, samples=3, columns={"answers": ["2", "25"]})
    out = evaluate_policy(PARAMS, CONFIG, tokens, mask, ref_params=OTHER, **kw)
    assert seen["answers"] == ["2"] * 3 + ["25"] * 3  # prompt-major, S copies each
    np.testing.assert_array_equal(out.rewards, odd_length(out.completions))
    assert out.tokens.shape == (6, 6) and out.lengths.shape == (6,)
    # KL: the sampled log-ratio summed over each completion, from teacher-forced passes of both
    prompts, masks = jnp.repeat(tokens, 3, 0), jnp.repeat(mask, 3, 0)
    comp_mask = (np.arange(6)[None] < out.lengths[:, None]).astype(np.float32)
    lp = completion_logps(PARAMS, CONFIG, prompts, masks, jnp.asarray(out.tokens))
    ref = completion_logps(OTHER, CONFIG, prompts, masks, jnp.asarray(out.tokens))
    np.testing.assert_allclose(out.kl, np.sum((lp - ref) * comp_mask, -1), rtol=1e-4, atol=1e-4)
    assert np.abs(out.kl).max() > 0.1
    same = evaluate_policy(PARAMS, CONFIG, tokens, mask, ref_params=PARAMS, **kw)
    np.testing.assert_allclose(same.kl, 0.0, atol=1e-4)
    assert evaluate_policy(PARAMS, CONFIG, tokens, mask, **kw).kl is None


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
        group_size=4, reward_fn=odd_length, decode=TOK.decode, max_new_tokens=6,
        eos_id=TOK.eos_id, pad_id=TOK.pad_id,
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
