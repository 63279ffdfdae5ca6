import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxalign.data as jd
from jaxalign.advantages import gae
from jaxalign.decoding import SamplingConfig
from jaxalign.logprobs import entropy
from jaxalign.metrics import compilations
from jaxalign.models import get_config, init_params, init_scalar_model, logits_from_hidden, sequence_scores
from jaxalign.models.heads import apply_scalar_head
from jaxalign.ops import masked_whiten
from jaxalign.optim import OptimConfig, make_optimizer
from jaxalign.rollout import ppo_rollout
from jaxalign.scoring import (
    completion_hidden,
    completion_logps,
    critic_kind,
    init_actor_critic,
    policy_and_values,
    reward_model_scorer,
)
from jaxalign.trainers import adaptive_kl_coef, create_train_state, make_ppo_step, ppo_update
from tests._tolerance import ulps

TOK = jd.byte_tokenizer()
CONFIG = get_config("gpt2-tiny", vocab_size=TOK.vocab_size, max_seq_len=32)
PROMPTS = ["ab", "hello", "x", "q: 1+1", "zz", "tell", "a story", "ok"]


@pytest.fixture(scope="module")
def policy():
    return jax.tree.map(lambda x: x * 2, init_params(CONFIG, jax.random.key(0)))


def count_a(prompt_tokens, prompt_mask, completion_tokens, completion_mask):
    """Score: number of 'a' bytes in the response."""
    return jnp.sum((completion_tokens == ord("a")) * completion_mask, axis=1)


def make_rollout(params, ref, *, seed=1, **kw):
    tokens, mask = jd.collate_prompts(PROMPTS, TOK)
    out = ppo_rollout(
        params, CONFIG, tokens, mask, ref_params=ref, score_fn=count_a,
        sampling=SamplingConfig(max_new_tokens=8, eos_id=TOK.eos_id, pad_id=TOK.pad_id), rng=jax.random.key(seed),
        decode=TOK.decode, **kw,
    )
    # the record every rollout returns: the scores as rewards, the decoded completions
    np.testing.assert_array_equal(out.rewards, out.batch.scores)
    lengths = np.asarray(out.batch.completion_mask).sum(1).astype(int)
    tokens = np.asarray(out.batch.completion_tokens)
    assert out.completions == [TOK.decode([t for t in row[:n] if t != TOK.eos_id]) for row, n in zip(tokens, lengths)]
    return out.batch, out.metrics


def test_policy_and_values_shared_and_separate(policy):
    tokens, mask = (jnp.asarray(x) for x in jd.collate_prompts(PROMPTS[:3], TOK))
    completion = jax.random.randint(jax.random.key(2), (3, 5), 0, TOK.vocab_size)
    shared = init_actor_critic(policy, config=CONFIG, rng=jax.random.key(3))
    assert critic_kind(shared) == "shared"
    stats, values = policy_and_values(shared, CONFIG, tokens, mask, completion)
    hidden = completion_hidden(policy, CONFIG, tokens, mask, completion)
    # two programs through 2 layers of 64-term sums: 128 ulps of max|value|, not of each value (a
    # value near 0 has the rounding of the large terms); measured equal
    np.testing.assert_allclose(values, apply_scalar_head(shared["value"]["head"], hidden), rtol=0, atol=ulps(128, values))
    logits = logits_from_hidden(policy, CONFIG, hidden)  # [B,N,V], the unfused head
    lp = jax.nn.log_softmax(logits.astype(jnp.float32))
    lp = jnp.take_along_axis(lp, completion[..., None], -1)[..., 0]
    # 256 ulps of max|logp| as in tests/test_decoding.py; measured 0.5
    np.testing.assert_allclose(lp, completion_logps(policy, CONFIG, tokens, mask, completion), rtol=0, atol=ulps(256, lp))
    np.testing.assert_allclose(stats.logps, lp, rtol=0, atol=ulps(256, lp))
    ent = entropy(logits)  # [B,N] nats <= log V: the same 256 ulps of its magnitude
    np.testing.assert_allclose(stats.entropy, ent, rtol=0, atol=ulps(256, ent))

    critic = init_scalar_model(CONFIG, jax.random.key(4))
    separate = init_actor_critic(policy, critic, config=CONFIG, rng=jax.random.key(3))
    assert critic_kind(separate) == "separate"
    _, v2 = policy_and_values(separate, CONFIG, tokens, mask, completion)
    np.testing.assert_allclose(
        v2, apply_scalar_head(critic["head"], completion_hidden(critic["backbone"], CONFIG, tokens, mask, completion)),
        rtol=0, atol=ulps(128, v2),  # as above; measured equal
    )
    with pytest.raises(ValueError, match=r"params\['value'\] must be \{'head'\}"):
        policy_and_values({"policy": policy, "value": {"kernel": 0}}, CONFIG, tokens, mask, completion)
    with pytest.raises(ValueError, match="PPO params must be"):
        critic_kind(policy)


def test_rollout_rewards_kl_and_gae(policy):
    params = init_actor_critic(policy, config=CONFIG, rng=jax.random.key(3))
    ref = jax.tree.map(lambda x: x * 0.9, policy)
    ro, m = make_rollout(params, ref, kl_coef=0.2, missing_eos_penalty=1.0)
    mask = np.asarray(ro.completion_mask)
    kl = (np.asarray(ro.old_logps) - np.asarray(ro.ref_logps)) * mask  # k1
    np.testing.assert_allclose(
        # generation vs teacher-forced: 256 ulps of max|logp| as in tests/test_decoding.py; measured 1.2
        ro.old_logps, completion_logps(policy, CONFIG, ro.prompt_tokens, ro.prompt_mask, ro.completion_tokens) * mask,
        rtol=0, atol=ulps(256, ro.old_logps),
    )
    np.testing.assert_allclose(
        # as above; measured 1.9
        ro.ref_logps, completion_logps(ref, CONFIG, ro.prompt_tokens, ro.prompt_mask, ro.completion_tokens) * mask,
        rtol=0, atol=ulps(256, ro.ref_logps),
    )
    # summed per-token rewards = score − β·ΣKL; the score sits on the last response token
    # sums of <= 8 terms, kl from logps ~ 7: atol is 12 ulps of them; measured 0.4
    np.testing.assert_allclose(np.sum(ro.rewards, 1), np.asarray(ro.scores) - 0.2 * kl.sum(1), rtol=1e-4, atol=1e-5)
    raw = np.asarray(count_a(None, None, ro.completion_tokens, ro.completion_mask))
    lengths = mask.sum(1).astype(int)
    has_eos = np.array([row[n - 1] == TOK.eos_id for row, n in zip(np.asarray(ro.completion_tokens), lengths)])
    np.testing.assert_allclose(ro.scores, raw - 1.0 * ~has_eos)
    np.testing.assert_allclose(m["score"], np.mean(ro.scores), rtol=1e-6)  # a mean of 8 small integers: 8 ulps
    np.testing.assert_allclose(m["kl"], kl.sum(1).mean(), rtol=1e-4, atol=1e-6)  # differences of logps ~ 7; measured equal
    adv, ret = gae(ro.rewards, ro.old_values, ro.completion_mask, gamma=1.0, lam=0.95)
    # GAE, a <= 8-step scan of 3 ops each, fused into the rollout: 64 ulps of max|return|; measured equal
    np.testing.assert_allclose(ro.returns, ret, rtol=0, atol=ulps(64, ret))
    # whitening (a masked mean and std): atol is 25 ulps of |A| <= 3.4; measured equal
    np.testing.assert_allclose(ro.advantages, masked_whiten(adv, ro.completion_mask), rtol=1e-4, atol=1e-5)


def test_reward_model_scorer_equals_unpadded_score():
    rm = init_scalar_model(CONFIG, jax.random.key(5))
    tokens, mask = (jnp.asarray(x) for x in jd.collate_prompts(["ab", "hello"], TOK))
    completion = jnp.array([[97, 98, TOK.eos_id, 0], [99, 100, 101, 102]])
    cmask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]], jnp.float32)
    s = reward_model_scorer(rm, CONFIG)(tokens, mask, completion, cmask)
    row0 = jnp.asarray([TOK.encode("ab") + [97, 98, TOK.eos_id]])
    # other shapes through 2 layers: 128 ulps of the scores (see test_policy_and_values...); measured 1.4
    np.testing.assert_allclose(s[0], sequence_scores(rm, CONFIG, row0, jnp.ones_like(row0, jnp.float32)), rtol=0, atol=ulps(128, s))


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_ppo_update_moves_policy_towards_advantage(policy, critic):
    value = init_scalar_model(CONFIG, jax.random.key(4), jax.tree.map(jnp.copy, policy)) if critic == "separate" else None
    params = init_actor_critic(jax.tree.map(jnp.copy, policy), value, config=CONFIG, rng=jax.random.key(3))
    ref = jax.tree.map(jnp.copy, policy)
    ro, _ = make_rollout(params, ref, kl_coef=0.05)
    tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-3, warmup_steps=0, total_steps=8, weight_decay=0.0))
    step = make_ppo_step(CONFIG, tx, schedule)
    assert critic_kind(params) == critic
    state = create_train_state(params, tx, 0)
    with compilations(step) as compiled:
        state, first = step(state, ro)  # the first step sees the rollout policy itself
        state, m = ppo_update(step, state, ro, epochs=2, num_minibatches=2, seed=0)
    assert len(compiled) == 2  # whole batch and minibatch shapes, nothing more
    # ratio − 1 ≈ the mean logp difference of rollout and step, ~ulps of |logp| ~ 7 (1e-5 is 12 of
    # them; approx_kl < 1e-9 bounds its rms by 4.5e-5); measured equal
    np.testing.assert_allclose(first["ratio"], 1.0, atol=1e-5)
    assert float(first["clip_fraction"]) == 0.0 and float(first["approx_kl"]) < 1e-9
    new = completion_logps(state.params["policy"], CONFIG, ro.prompt_tokens, ro.prompt_mask, ro.completion_tokens)
    gain = float(jnp.sum(ro.advantages * (new - ro.old_logps) * ro.completion_mask))
    assert gain > 0, gain  # the surrogate objective improved: positive-advantage tokens became likelier
    assert np.isfinite(m["value_loss"]) and m["final_approx_kl"] > 0
    _, after = step(state, ro)
    assert float(after["value_loss"]) < float(first["value_loss"])
    with pytest.raises(ValueError, match="num_minibatches=3"):
        ppo_update(step, state, ro, epochs=1, num_minibatches=3, seed=0)


def test_adaptive_kl_coef_hand_computed():
    # KL 2x the target: error clipped to +0.2; β·(1 + 0.2·256/10000)
    np.testing.assert_allclose(adaptive_kl_coef(0.1, 12.0, 256, target=6.0, horizon=10000), 0.1 * (1 + 0.2 * 0.0256))
    np.testing.assert_allclose(adaptive_kl_coef(0.1, 5.4, 100, target=6.0, horizon=1000), 0.1 * (1 - 0.1 * 0.1))
    with pytest.raises(ValueError, match="positive"):
        adaptive_kl_coef(0.1, 1.0, 1, target=0.0, horizon=1.0)


def test_lora_ppo_step_trains_adapters_and_the_critic(policy):
    """PPO through the one step builder with LoRA: adapters on the policy, the value head trained
    in full (`trainable=("^value/",)`), the base actor-critic passed to the step and unchanged."""
    from jaxalign.lora import LoraConfig, init_lora, merge_lora

    base = init_actor_critic(jax.tree.map(jnp.copy, policy), config=CONFIG, rng=jax.random.key(3))
    base_before = jax.tree.map(np.array, base)
    lora = LoraConfig(rank=2, targets=("attention",), trainable=("^value/",))
    adapters = init_lora(base, lora, jax.random.key(4))
    ro, _ = make_rollout(merge_lora(base, adapters, lora), base["policy"], kl_coef=0.05)
    tx, schedule = make_optimizer(OptimConfig(learning_rate=3e-3, warmup_steps=0, total_steps=8, weight_decay=0.0))
    step = make_ppo_step(CONFIG, tx, schedule, lora=lora)
    state = create_train_state(adapters, tx, 0)
    state, first = step(state, ro, base)
    np.testing.assert_allclose(first["ratio"], 1.0, atol=1e-5)  # B = 0: the rollout policy (as above)
    state, m = ppo_update(step, state, ro, epochs=2, num_minibatches=1, seed=0, step_args=(base,))  # one shape, one compile
    for got, before in zip(jax.tree.leaves(base), jax.tree.leaves(base_before)):
        np.testing.assert_array_equal(got, before)
    assert not np.array_equal(state.params["value"]["head"]["kernel"], base_before["value"]["head"]["kernel"])
    merged = merge_lora(base, state.params, lora)["policy"]
    new = completion_logps(merged, CONFIG, ro.prompt_tokens, ro.prompt_mask, ro.completion_tokens)
    gain = float(jnp.sum(ro.advantages * (new - ro.old_logps) * ro.completion_mask))
    assert gain > 0, gain  # the adapters moved the policy along the advantages
