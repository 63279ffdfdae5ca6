"""PPO-ptx (InstructGPT arXiv 2203.02155 Eq. 2): the PPO step plus γ·(token-mean SFT NLL)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxalign.data as jd
from jaxalign.metrics import compilations
from jaxalign.models import get_config, init_params
from jaxalign.optim import OptimConfig, make_optimizer
from jaxalign.rollout import PPORollout
from jaxalign.scoring import init_actor_critic
from jaxalign.trainers import create_train_state, make_ppo_step, ppo_batch_loss, ppo_update, sft_batch_loss
from jaxalign.trainers.ppo import PPOPtxBatch
from tests._tolerance import ulps

TOK = jd.byte_tokenizer()
CONFIG = get_config("gpt2-tiny", vocab_size=TOK.vocab_size, max_seq_len=32, n_layers=1, d_model=32, n_heads=2)
B, P, N = 4, 6, 5
GAMMA = 2.0


@pytest.fixture(scope="module")
def setup():
    """Actor-critic params, a synthetic rollout (old log-probs near the fresh policy's, −log V,
    plus noise, so some ratios clip) and a 4-row SFT batch of right-padded byte strings."""
    params = init_actor_critic(init_params(CONFIG, jax.random.key(0)), config=CONFIG, rng=jax.random.key(1))
    rng = np.random.default_rng(2)  # NumPy draws: no eager JAX op to compile
    prompt_mask = np.ones((B, P), np.float32)
    prompt_mask[0, :2] = 0.0  # row 0 left-padded
    logps = np.full((B, N), -np.log(CONFIG.vocab_size), np.float32)  # small init: near-uniform
    rollout = PPORollout(
        prompt_tokens=rng.integers(1, TOK.vocab_size, (B, P)).astype(np.int32), prompt_mask=prompt_mask,
        completion_tokens=rng.integers(1, TOK.vocab_size, (B, N)).astype(np.int32),
        completion_mask=(np.arange(N)[None] < np.array([[5], [3], [4], [1]])).astype(np.float32),
        old_logps=logps + 0.3 * rng.standard_normal((B, N), np.float32), ref_logps=logps,
        old_values=rng.standard_normal((B, N), np.float32), scores=np.zeros(B, np.float32),
        rewards=np.zeros((B, N), np.float32), advantages=rng.standard_normal((B, N), np.float32),
        returns=rng.standard_normal((B, N), np.float32),
    )
    texts = ["Once upon a time", "Lily was happy.", "Tom had a ball", "ok"]
    examples = [jd.Example(np.asarray(ids, np.int32), np.r_[0.0, np.ones(len(ids) - 1)].astype(np.float32))
                for ids in (TOK.encode(t) for t in texts)]
    sft = jd.collate_sft(examples, batch_size=4, buckets=(24,), pad_id=TOK.pad_id)
    return params, jax.tree.map(jnp.asarray, rollout), {k: jnp.asarray(v) for k, v in sft.items()}


def test_ptx_gradient_is_ppo_gradient_plus_gamma_sft_gradient(setup):
    params, rollout, sft = setup

    @jax.jit
    def grads(p):  # the joint loss and its two parts, differentiated separately (one compile)
        joint = jax.value_and_grad(lambda q: ppo_batch_loss(q, CONFIG, rollout, sft_batch=sft, ptx_coef=GAMMA), has_aux=True)
        ppo = jax.value_and_grad(lambda q: ppo_batch_loss(q, CONFIG, rollout), has_aux=True)
        nll = jax.value_and_grad(lambda q: sft_batch_loss(q, CONFIG, sft), has_aux=True)
        return joint(p), ppo(p), nll(p["policy"])

    ((loss, m), g), ((ppo, _), g_ppo), ((nll, _), g_sft) = grads(params)
    # the same maths in one program vs three: losses are token means of <= 20 terms, 64 ulps of the
    # largest; measured equal
    np.testing.assert_allclose(m["ptx_loss"], nll, rtol=0, atol=ulps(64, nll))
    np.testing.assert_allclose(loss, ppo + GAMMA * nll, rtol=0, atol=ulps(64, ppo + GAMMA * nll))
    want = {"policy": jax.tree.map(lambda a, b: a + GAMMA * b, g_ppo["policy"], g_sft), "value": g_ppo["value"]}
    # a weight's gradient is a sum over <= B·(P+N) = 44 (PPO) / 4·23 = 92 (SFT) positions of products
    # backpropagated through 2 layers of 64-wide sums, fused differently in the joint program: 1024
    # ulps of each leaf's largest |PPO| + γ·|SFT| term (the scale of the sums' roundings); measured 3
    for path, got, ref, a, b in zip(
        jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g), jax.tree.leaves(want),
        jax.tree.leaves(g_ppo), jax.tree.leaves({"policy": g_sft, "value": jax.tree.map(jnp.zeros_like, g_ppo["value"])}),
    ):
        scale = float(np.max(np.abs(a)) + GAMMA * np.max(np.abs(b)))
        np.testing.assert_allclose(got, ref, rtol=0, atol=ulps(1024, scale), err_msg=jax.tree_util.keystr(path[0]))
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_sft)) > 0  # the SFT term does contribute
    with pytest.raises(ValueError, match="exactly when ptx_coef > 0"):
        ppo_batch_loss(params, CONFIG, rollout, ptx_coef=GAMMA)
    with pytest.raises(ValueError, match="exactly when ptx_coef > 0"):
        ppo_batch_loss(params, CONFIG, rollout, sft_batch=sft)


def test_ptx_zero_is_the_plain_step_and_ppo_update_draws_by_step(setup):
    params, rollout, sft = setup
    tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-3, warmup_steps=0, total_steps=8, weight_decay=0.0))
    copy = lambda: create_train_state(jax.tree.map(jnp.copy, params), tx, 0)  # noqa: E731 - the step donates
    plain = make_ppo_step(CONFIG, tx, schedule).lower(copy(), rollout).as_text()
    zero = make_ppo_step(CONFIG, tx, schedule, ptx_coef=0.0).lower(copy(), rollout).as_text()
    assert zero == plain  # ptx_coef = 0: the PPO program itself (same StableHLO), so bit for bit

    drawn = []

    def ptx_batch_at(n):  # a pure function of the step: row n % 4 first
        drawn.append(n)
        return jax.tree.map(lambda x: jnp.roll(x, -n, axis=0), sft)

    step = make_ppo_step(CONFIG, tx, schedule, ptx_coef=GAMMA)
    with compilations(step) as compiled:
        state, first = ppo_update(step, copy(), rollout, epochs=1, num_minibatches=2, seed=0, ptx_batch_at=ptx_batch_at)
        state, second = ppo_update(step, state, rollout, epochs=1, num_minibatches=2, seed=1, ptx_batch_at=ptx_batch_at)
    assert drawn == [0, 1, 2, 3]  # the n-th optimizer step of the run gets batch n, across updates
    assert len(compiled) == 1  # one minibatch shape, one SFT shape: never a second specialisation
    assert first["ptx_loss"] > 0
    assert second["ptx_loss"] < first["ptx_loss"]  # γ = 2 on a 4-row batch: the NLL goes down
    with pytest.raises(ValueError, match="exactly when ptx_coef > 0"):  # a ptx step given plain rollouts
        ppo_update(step, state, rollout, epochs=1, num_minibatches=2, seed=0)
    with pytest.raises(ValueError, match="exactly when ptx_coef > 0"):  # a plain step given PPOPtxBatch
        make_ppo_step(CONFIG, tx, schedule)(state, PPOPtxBatch(rollout, sft))
