import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.advantages import (
    explained_variance,
    gae,
    group_advantages,
    kl_penalty,
    masked_whiten,
    ppo_token_rewards,
    rloo_advantages,
)
from jaxalign.metrics import compilations
from tests._tolerance import ulps


def np_gae(rewards, values, mask, gamma, lam):
    """TRL PPOTrainer's loop (values zeroed past the response), written independently."""
    b, t = rewards.shape
    values = values * mask
    adv = np.zeros((b, t))
    last = np.zeros(b)
    for i in reversed(range(t)):
        nxt = values[:, i + 1] if i < t - 1 else 0.0
        delta = rewards[:, i] + gamma * nxt - values[:, i]
        m_next = mask[:, i + 1] if i < t - 1 else 0.0
        last = delta + gamma * lam * m_next * last
        adv[:, i] = last
    return adv * mask, (adv + values) * mask


def test_gae_hand_computed():
    r = jnp.array([[1.0, 0.0, 2.0]])
    v = jnp.array([[0.5, 1.0, 0.0]])
    adv, ret = gae(r, v, jnp.ones((1, 3)), gamma=0.9, lam=0.5)
    # δ2 = 2; δ1 = 0 + 0.9·0 − 1 = −1; δ0 = 1 + 0.9·1 − 0.5 = 1.4
    # A2 = 2; A1 = −1 + 0.45·2 = −0.1; A0 = 1.4 + 0.45·(−0.1) = 1.355
    # a 3-step scan over terms <= 2 (−0.1 = −1 + 0.45·2 cancels, and FMA may fuse it): 16 ulps of 2,
    # not relative to −0.1 (rtol=1e-6 there was under one ulp of the terms)
    np.testing.assert_allclose(adv, [[1.355, -0.1, 2.0]], rtol=0, atol=ulps(16, 2.0))
    np.testing.assert_allclose(ret, [[1.855, 0.9, 2.0]], rtol=0, atol=ulps(16, 2.0))
    # γ = λ = 1: every advantage is the final reward minus the value there
    adv, ret = gae(jnp.array([[0.0, 0.0, 1.0]]), jnp.full((1, 3), 0.25), jnp.ones((1, 3)), gamma=1.0, lam=1.0)
    np.testing.assert_allclose(adv, [[0.75, 0.75, 0.75]], rtol=1e-6)  # exact in float32; 8 ulps of slack
    np.testing.assert_allclose(ret, [[1.0, 1.0, 1.0]], rtol=1e-6)


def test_gae_matches_numpy_reference():
    rng = np.random.RandomState(0)
    r, v = rng.randn(4, 9), rng.randn(4, 9)
    lengths = np.array([9, 5, 1, 7])
    mask = (np.arange(9)[None] < lengths[:, None]).astype(np.float32)
    adv, ret = gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(mask), gamma=0.95, lam=0.9)
    ref_adv, ref_ret = np_gae(r, v, mask, 0.95, 0.9)
    # a 9-step float32 scan vs float64, |values| <= 5: 1e-5 is 17 ulps of 5; measured 1
    np.testing.assert_allclose(adv, ref_adv, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, atol=1e-5)


def test_gae_masked_equals_sliced():
    rng = np.random.RandomState(1)
    r, v = jnp.asarray(rng.randn(1, 8)), jnp.asarray(rng.randn(1, 8))
    mask = jnp.asarray((np.arange(8) < 5).astype(np.float32)[None])
    full, _ = gae(r, v, mask, gamma=0.9, lam=0.8)
    sliced, _ = gae(r[:, :5], v[:, :5], jnp.ones((1, 5)), gamma=0.9, lam=0.8)
    # the masked tail adds exact zeros; a 5-step scan compiled for other shapes may fuse its 3 ops
    # differently: 16 ulps of max|A| (1e-6 was 4); measured equal
    np.testing.assert_allclose(full[:, :5], sliced, rtol=0, atol=ulps(16, sliced))
    assert float(jnp.abs(full[:, 5:]).sum()) == 0.0


def test_gae_no_recompile():
    fn = jax.jit(lambda r, v, m: gae(r, v, m))
    x = jnp.ones((2, 4))
    y = x * 2
    with compilations(fn) as compiled:
        fn(x, x, x)
        fn(y, x, x)
    assert len(compiled) == 1  # the new function once; the second call, same shapes, compiles nothing


def test_kl_estimators_hand_computed_and_unbiased():
    lp, ref = jnp.array([[-1.0]]), jnp.array([[-2.0]])  # log π/π_ref = 1
    np.testing.assert_allclose(kl_penalty(lp, ref, kind="k1"), [[1.0]])
    np.testing.assert_allclose(kl_penalty(lp, ref, kind="k2"), [[0.5]])
    # e^-1 + 1 − 1: terms up to 1 + e^-1 cancel, so 8 ulps of those rather than of e^-1
    np.testing.assert_allclose(kl_penalty(lp, ref, kind="k3"), [[np.exp(-1.0)]], rtol=0, atol=ulps(8, 1 + np.exp(-1.0)))
    # Monte Carlo: E_{x~π}[k1] = E[k3] = KL(π‖π_ref) for two categoricals
    p = np.array([0.6, 0.3, 0.1])
    q = np.array([0.2, 0.5, 0.3])
    exact = float(np.sum(p * np.log(p / q)))
    x = jax.random.choice(jax.random.key(0), 3, (200_000,), p=jnp.asarray(p))
    lp, ref = jnp.log(jnp.asarray(p))[x][None], jnp.log(jnp.asarray(q))[x][None]
    for kind in ("k1", "k3"):
        # statistical, not rounding: the mean of 2e5 draws has a stderr of 0.5% (k1) / 0.12% (k3) of KL
        np.testing.assert_allclose(float(kl_penalty(lp, ref, kind=kind).mean()), exact, rtol=0.02)
    assert float(kl_penalty(lp, ref, kind="k3").min()) >= 0.0
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(lp, ref, kind="k4")


def test_group_advantages_hand_computed():
    r = jnp.array([1.0, 0.0, 3.0, 3.0])
    std = np.std([1.0, 0.0], ddof=1)  # 0.7071
    np.testing.assert_allclose(
        # mean, std (2 terms, a sqrt) and a division: a few roundings, 8 ulps; measured 0.2
        group_advantages(r, group_size=2), [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.0, 0.0], rtol=1e-6
    )
    np.testing.assert_allclose(group_advantages(r, group_size=2, scale="none"), [0.5, -0.5, 0.0, 0.0])
    batch_std = np.std([1.0, 0.0, 3.0, 3.0], ddof=1)
    np.testing.assert_allclose(
        # as above, the std over 4 terms; measured 0.05
        group_advantages(r, group_size=2, scale="batch"), np.array([0.5, -0.5, 0, 0]) / (batch_std + 1e-4), rtol=1e-6
    )
    with pytest.raises(ValueError, match="groups"):
        group_advantages(r, group_size=3)


def test_rloo_hand_computed():
    # leave-one-out baselines: 2.5, 2, 1.5
    np.testing.assert_allclose(rloo_advantages(jnp.array([1.0, 2.0, 3.0]), group_size=3), [-1.5, 0.0, 1.5], rtol=1e-6)  # exact


def test_masked_whiten():
    x = jnp.array([[1.0, 2.0, 3.0, 100.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    out = masked_whiten(x, mask)
    # unbiased std of 1,2,3 is 1: exact here, but an approximate rsqrt may cost a few ulps of |x| <= 3
    np.testing.assert_allclose(out, [[-1.0, 0.0, 1.0, 0.0]], rtol=0, atol=ulps(16, 3.0))
    np.testing.assert_allclose(masked_whiten(x, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]], rtol=0, atol=ulps(16, 3.0))


def test_ppo_token_rewards_hand_computed():
    logps = jnp.array([[-1.0, -2.0, -0.5, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    ref = jnp.array([[-1.5, -1.0, -0.5, 0.0], [-0.5, 0.0, 0.0, 0.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    rewards, kl = ppo_token_rewards(jnp.array([2.0, -1.0]), logps, ref, mask, kl_coef=0.1)
    # k1 = logp - ref: row 0 [0.5, -1, 0], row 1 [-0.5]; score at the last response token
    # one subtraction and one product each: 8 ulps
    np.testing.assert_allclose(kl, [[0.5, -1.0, 0.0, 0.0], [-0.5, 0.0, 0.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(rewards, [[-0.05, 0.1, 2.0, 0.0], [0.05 - 1.0, 0.0, 0.0, 0.0]], rtol=1e-6)
    _, k3 = ppo_token_rewards(jnp.zeros(2), logps, ref, mask, kl_coef=0.1, kind="k3")
    # e^-0.5 + 0.5 − 1 = 0.107 cancels terms <= 1: 8 ulps of 1, not of 0.107
    np.testing.assert_allclose(k3[0, 0], np.exp(-0.5) + 0.5 - 1, rtol=0, atol=ulps(8, 1.0))


def test_explained_variance():
    r = jnp.array([[1.0, 2.0, 3.0, 100.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    np.testing.assert_allclose(explained_variance(r, r, mask), 1.0)
    np.testing.assert_allclose(explained_variance(jnp.full_like(r, 7.0), r, mask), 0.0, atol=1e-6)  # exact: 1 − 1
    # V = R + noise: 1 - var(noise)/var(R) with var(R) = 2/3 over the masked entries
    v = r + jnp.array([[0.5, -0.5, 0.0, 0.0]])
    np.testing.assert_allclose(explained_variance(v, r, mask), 1 - (1 / 6) / (2 / 3), rtol=1e-6)  # 3-term variances: 8 ulps


def np_verl_low_var_kl(logprob, ref_logprob):
    """verl 0.9.1 verl/trainer/ppo/core_algos.py `kl_penalty_forward`, "low_var_kl" branch
    (lines 2239-2245), transcribed from torch to NumPy float64."""
    kl = ref_logprob - logprob
    kl = np.clip(kl, -20, 20)  # "For numerical stability"
    ratio = np.exp(kl)
    kld = ratio - kl - 1
    return np.clip(kld, -10, 10)


def test_low_var_kl_matches_verl_transcription():
    rng = np.random.RandomState(2)
    ref = rng.uniform(-8, 0, (4, 64)).astype(np.float32)
    # log π_ref/π over [-30, 30]: both clamps (|x| > 20; k3 > 10 at x > 2.6 or x < -11) and the middle
    lp = (ref - np.concatenate([rng.uniform(-30, 30, (4, 32)), rng.uniform(-3, 3, (4, 32))], 1)).astype(np.float32)
    got = kl_penalty(jnp.asarray(lp), jnp.asarray(ref), kind="low_var_kl")
    want = np_verl_low_var_kl(lp.astype(np.float64), ref.astype(np.float64))
    # values <= 10: the float32 log-ratio's rounding (½ ulp of |x| <= 30, times |e^x − 1| <= 13 where
    # unclamped) and expm1's and the subtraction's roundings: ~4 ulps of 10; 16 for the margin
    np.testing.assert_allclose(got, want, rtol=0, atol=ulps(16, 10.0))
    assert float(jnp.max(got)) == 10.0 and float(jnp.min(got)) >= 0.0
    unclamped = np.abs(ref - lp) < 2.5  # k3 < 10 there: the same float32 ops as kind="k3"
    k3 = kl_penalty(jnp.asarray(lp), jnp.asarray(ref), kind="k3")
    np.testing.assert_array_equal(np.asarray(got)[unclamped], np.asarray(k3)[unclamped])


def test_low_var_kl_hand_values_at_the_clamps_and_gradients():
    x = np.array([[0.0, 1.0, 2.0, 3.0, 20.0, 25.0, -10.0, -11.0, -25.0]], np.float32)  # log π_ref/π
    lp, ref = jnp.asarray(-x), jnp.zeros_like(jnp.asarray(x))
    got = kl_penalty(lp, ref, kind="low_var_kl")
    # e^x − x − 1, capped at 10: e^3 − 4 = 16.1, e^20 − 21, e^-11 + 10 and (x clamped to -20) e^-20 + 19 hit the cap
    want = [0.0, np.e - 2, np.exp(2.0) - 3, 10.0, 10.0, 10.0, np.exp(-10.0) + 9, 10.0, 10.0]
    np.testing.assert_allclose(got, [want], rtol=0, atol=ulps(8, 10.0))  # one expm1 and a subtraction, values <= 10
    g_lp, g_ref = jax.grad(lambda a, b: kl_penalty(a, b, kind="low_var_kl").sum(), argnums=(0, 1))(lp, ref)
    # unclamped: k3's gradient ∂/∂log π = 1 − π_ref/π = 1 − e^x (and the opposite for log π_ref);
    # where a clamp binds, 0 (torch.clamp's gradient)
    want_g = [0.0, 1 - np.e, 1 - np.exp(2.0), 0.0, 0.0, 0.0, 1 - np.exp(-10.0), 0.0, 0.0]
    np.testing.assert_allclose(g_lp, [want_g], rtol=0, atol=ulps(8, np.exp(2.0)))  # one expm1 each
    np.testing.assert_array_equal(g_ref, -g_lp)


def test_low_var_kl_rewards_ignore_nan_at_masked_positions():
    logps = jnp.array([[-1.0, -4.0, -0.5, 0.0], [-1.0, -2.0, 0.0, 0.0]])
    ref = jnp.array([[-1.5, -1.0, -0.5, 0.0], [-0.5, -14.0, 0.0, 0.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    poison = jnp.where(mask > 0, 0.0, jnp.nan)

    def rewards(lp, rf):
        return ppo_token_rewards(jnp.array([2.0, -1.0]), lp, rf, mask, kl_coef=0.1, kind="low_var_kl")

    clean_r, clean_kl = rewards(logps, ref)
    dirty_r, dirty_kl = rewards(logps + poison, ref + poison)
    np.testing.assert_array_equal(dirty_r, clean_r)  # same program, same selected inputs: exact
    np.testing.assert_array_equal(dirty_kl, clean_kl)
    assert float(clean_kl[1, 1]) == 10.0  # log π_ref/π = −12: 11 + e^-12, capped
    g = jax.grad(lambda lp: rewards(lp, ref + poison)[0].sum())(logps + poison)
    assert np.all(np.isfinite(g)) and float(jnp.abs(jnp.where(mask > 0, 0.0, g)).sum()) == 0.0
