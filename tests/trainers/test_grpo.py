import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxalign.data as jd
from jaxalign.advantages import kl_penalty
from jaxalign.decoding import SamplingConfig, generate
from jaxalign.lora import LoraConfig, apply_lora, init_lora, merge_lora
from jaxalign.models import get_config, init_params
from jaxalign.rewards import exact_match_reward
from jaxalign.rollout import grpo_rollout
from jaxalign.scoring import completion_logps
from jaxalign.trainers import create_train_state, make_grpo_step
from tests._tolerance import ulps

TOK = jd.byte_tokenizer()
CONFIG = get_config("gpt2-tiny", vocab_size=TOK.vocab_size, max_seq_len=32)


def sampling(n):
    return SamplingConfig(max_new_tokens=n, eos_id=TOK.eos_id, pad_id=TOK.pad_id)


@pytest.fixture(scope="module")
def params():
    return jax.tree.map(lambda x: x * 3, init_params(CONFIG, jax.random.key(0)))


def test_completion_logps_equal_generation_logps(params):
    tokens, mask = jd.collate_prompts(["1+2=", "10+20=", "7="], TOK)
    gen = generate(params, CONFIG, jnp.asarray(tokens), jnp.asarray(mask), rng=jax.random.key(1), sampling=sampling(5))
    lp = completion_logps(params, CONFIG, jnp.asarray(tokens), jnp.asarray(mask), gen.tokens)
    # teacher-forced vs cached: 256 ulps of max|logp| as in tests/test_decoding.py; measured 2.2
    np.testing.assert_allclose(lp * gen.mask, gen.model_logps, rtol=0, atol=ulps(256, gen.model_logps))


def test_rollout_rewards_advantages_and_filter(params):
    prompts = ["1+1=", "2+2="]
    tokens, mask = jd.collate_prompts(prompts, TOK)

    # reward: 1 for completions starting with the sampled first row's text; groups then differ
    def reward(completions, *, answers):
        assert len(answers) == 8 and answers[:4] == ["2"] * 4  # columns repeated G times, prompt-major
        return np.array([float(len(c) % 2) for c in completions], np.float32)

    ro, rewards, metrics, completions = grpo_rollout(
        params, CONFIG, tokens, mask, group_size=4, reward_fn=reward, decode=TOK.decode,
        sampling=sampling(6), rng=jax.random.key(2), ref_params=params, columns={"answers": ["2", "4"]},
        filter_zero_variance=True,
    )
    assert ro.completion_tokens.shape == (8, 6) and len(completions) == 8
    np.testing.assert_array_equal(rewards, ro.rewards)
    r = np.asarray(ro.rewards).reshape(2, 4)
    expected = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)
    # mean, std and a division over 4 rewards: a few ulps of |A| <= 1.5; 1e-6 is 5 ulps; measured equal
    np.testing.assert_allclose(np.asarray(ro.advantages).reshape(2, 4), expected, rtol=1e-5, atol=1e-6)
    zero_var = np.all(r == r[:, :1], axis=1)
    np.testing.assert_array_equal(np.asarray(ro.where).reshape(2, 4), np.repeat(~zero_var[:, None], 4, 1))
    assert metrics["zero_variance_fraction"] == zero_var.mean()
    # reference == policy here: reference log-probs equal the rollout's
    # two programs (generation vs teacher-forced reference): 256 ulps of max|logp| as in tests/test_decoding.py; measured 2.3
    np.testing.assert_allclose(ro.ref_logps, ro.old_logps, rtol=0, atol=ulps(256, ro.old_logps))


def test_grpo_step_moves_logps_along_advantages(params):
    tokens, mask = jd.collate_prompts(["12+30=", "5+5=", "40+2=", "9+9="], TOK)
    ro = grpo_rollout(
        params, CONFIG, tokens, mask, group_size=6, reward_fn=exact_match_reward, decode=TOK.decode,
        sampling=sampling(4), rng=jax.random.key(3), columns={"answers": ["42", "10", "42", "18"]},
    ).batch
    # random model: rewards are all 0, so use synthetic advantages to test the update direction
    adv = jnp.asarray(np.random.RandomState(0).randn(24).astype(np.float32))
    ro = ro.replace(advantages=adv)
    tx = optax.sgd(1e-3)
    step = make_grpo_step(CONFIG, tx, lambda s: 1e-3, beta=0.0, max_length=4)
    state = create_train_state(jax.tree.map(jnp.copy, params), tx, 0)
    state, metrics = step(state, ro)
    # on-policy: ratio − 1 ≈ the mean logp difference of two programs, ~ulps of |logp| ~ 7 (1e-5 is
    # 12 of them); measured equal
    np.testing.assert_allclose(metrics["ratio"], 1.0, atol=1e-5)
    before = (ro.old_logps * ro.completion_mask).sum(-1)
    after = (completion_logps(state.params, CONFIG, ro.prompt_tokens, ro.prompt_mask, ro.completion_tokens) * ro.completion_mask).sum(-1)
    delta = np.asarray(after - before)
    assert np.corrcoef(delta, np.asarray(adv))[0, 1] > 0.5


def test_lora_grpo_step_trains_adapters_against_the_base_as_reference(params):
    """With `lora=`, the step takes the base as an argument; the rollout's reference log-probs are
    the base's (adapters off), so after one update the KL metric is the policy's k3 KL to the base."""
    tokens, mask = jd.collate_prompts(["12+30=", "5+5=", "40+2="], TOK)
    lora = LoraConfig(rank=4, targets=("all",))
    adapters = init_lora(params, lora, jax.random.key(5))
    ro = grpo_rollout(
        merge_lora(params, adapters, lora), CONFIG, tokens, mask, group_size=4,
        reward_fn=exact_match_reward, decode=TOK.decode, sampling=sampling(4), rng=jax.random.key(3),
        ref_params=params, columns={"answers": ["42", "10", "42"]},
    ).batch
    # B = 0: policy == base, from two programs: 256 ulps of max|logp| as in tests/test_decoding.py; measured 2
    np.testing.assert_allclose(ro.ref_logps, ro.old_logps, rtol=0, atol=ulps(256, ro.old_logps))
    ro = ro.replace(advantages=jnp.asarray(np.random.RandomState(1).randn(12).astype(np.float32)))
    tx = optax.adam(1e-2)
    step = make_grpo_step(CONFIG, tx, lambda s: 1e-2, beta=0.1, max_length=4, lora=lora)
    state = create_train_state(adapters, tx, 0)
    base_before = jax.tree.map(np.array, params)
    state, m0 = step(state, ro, params)
    np.testing.assert_allclose(m0["kl"], 0.0, atol=1e-6)  # k3 ≈ Δ²/2 for logp differences Δ ~ 1e-6; measured 2e-15
    np.testing.assert_allclose(m0["ratio"], 1.0, atol=1e-5)  # as above: 12 ulps of |logp|; measured 1.2e-7
    after_one = jax.tree.map(np.array, state.params)
    state, m1 = step(state, ro, params)
    logps = completion_logps(
        apply_lora(params, after_one, lora), CONFIG, ro.prompt_tokens, ro.prompt_mask, ro.completion_tokens
    )
    m = np.asarray(ro.completion_mask)
    want = np.sum(np.asarray(kl_penalty(logps, ro.ref_logps, kind="k3")) * m) / m.sum()
    assert float(m1["kl"]) > 1e-5
    np.testing.assert_allclose(m1["kl"], want, rtol=1e-4)  # step vs separate logps: 840 ulps; measured 2
    for got, before in zip(jax.tree.leaves(params), jax.tree.leaves(base_before)):
        np.testing.assert_array_equal(got, before)  # the base (the reference) never moves
    assert jax.tree.structure(state.params) == jax.tree.structure(adapters)
