import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import ppo_policy_loss, ppo_value_loss
from jaxalign.metrics import compilations
from tests._tolerance import ulps


def test_policy_loss_hand_computed():
    # token 0: A = 1, ρ = 1.5 -> max(-1.5, -1.2) = -1.2 (clipped); token 1: A = -1, ρ = 0.5 -> max(0.5, 0.8) = 0.8
    # token 2: A = 2, ρ = 1 -> -2 (unclipped); token 3 masked out
    logps = jnp.log(jnp.array([[1.5, 0.5, 1.0, 9.0]]))
    old = jnp.zeros((1, 4))
    adv = jnp.array([[1.0, -1.0, 2.0, 5.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    loss, m = ppo_policy_loss(logps, old, adv, mask, clip_eps=0.2)
    # a 3-term mean of clipped products: a few roundings, 8 ulps; measured <= 0.6
    np.testing.assert_allclose(loss, (-1.2 + 0.8 - 2.0) / 3, rtol=1e-6)
    np.testing.assert_allclose(m["clip_fraction"], 2 / 3, rtol=1e-6)
    np.testing.assert_allclose(m["ratio"], 1.0, rtol=1e-6)


def test_policy_gradient_vanishes_where_clipped():
    logps = jnp.log(jnp.array([[1.5, 1.1]]))
    adv = jnp.array([[1.0, 1.0]])
    g = jax.grad(lambda lp: ppo_policy_loss(lp, jnp.zeros((1, 2)), adv, jnp.ones((1, 2)))[0])(logps)
    assert float(g[0, 0]) == 0.0  # ratio 1.5 > 1.2 with A > 0: clipped, no gradient
    np.testing.assert_allclose(g[0, 1], -1.1 / 2, rtol=1e-6)  # d(-A ρ)/dlogp = -A ρ, token mean


def np_policy(lp, old, adv, mask, eps):
    ratio = np.exp(lp - old)
    per = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps))
    return (per * mask).sum() / mask.sum()


def test_policy_loss_matches_numpy_and_masked_equals_sliced():
    rng = np.random.RandomState(0)
    lp, old, adv = rng.randn(3, 6) * 0.3 - 2, rng.randn(3, 6) * 0.3 - 2, rng.randn(3, 6)
    mask = np.ones((3, 6))
    mask[:, 4:] = 0
    loss, m = ppo_policy_loss(*map(jnp.asarray, (lp, old, adv, mask)), clip_eps=0.1)
    np.testing.assert_allclose(loss, np_policy(lp, old, adv, mask, 0.1), rtol=1e-5)  # float32 vs float64 mean: 84 ulps; measured 0.4
    sliced, _ = ppo_policy_loss(*(jnp.asarray(x[:, :4]) for x in (lp, old, adv)), jnp.ones((3, 4)), clip_eps=0.1)
    np.testing.assert_allclose(loss, sliced, rtol=ulps(32))  # a token mean regrouped by the slicing: 32 ulps; measured equal
    assert float(m["num_tokens"]) == 12


def test_value_loss_hand_computed():
    # V = 2, V_old = 1, R = 3: unclipped (2-3)^2 = 1; clipped V' = 1.2, (1.2-3)^2 = 3.24 -> 0.5·3.24
    # V = 0.9, V_old = 1, R = 0: (0.9)^2 = 0.81; clipped 0.9 (inside) -> 0.5·0.81
    loss, m = ppo_value_loss(jnp.array([[2.0, 0.9]]), jnp.array([[1.0, 1.0]]), jnp.array([[3.0, 0.0]]), jnp.ones((1, 2)))
    np.testing.assert_allclose(loss, (0.5 * 3.24 + 0.5 * 0.81) / 2, rtol=1e-6)  # squares of 1.8, 0.9: 8 ulps; measured 0.6
    np.testing.assert_allclose(m["clip_fraction"], 0.5)


def test_value_loss_gradient_and_no_recompile():
    v = jnp.array([[0.5, 1.0, 1.5]])
    g = jax.grad(lambda v: ppo_value_loss(v, v, jnp.zeros((1, 3)), jnp.ones((1, 3)))[0])(v)
    np.testing.assert_allclose(g, v / 3, rtol=1e-6)  # d/dv ½ v² / 3 (old = v: clip inactive)
    fn = jax.jit(lambda *a: ppo_value_loss(*a)[0])
    v2, ones = v * 2, jnp.ones((1, 3))
    with compilations(fn) as compiled:
        fn(v, v, v, ones)
        fn(v2, v, v, ones)
    assert len(compiled) == 1
    with pytest.raises(ValueError, match="clip_eps"):
        ppo_value_loss(v, v, v, v, clip_eps=0.0)


def np_verl_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange, clip_ratio_c):
    """verl 0.9.1 verl/trainer/ppo/core_algos.py `compute_policy_loss_vanilla` (lines 1336-1365,
    cliprange_low = cliprange_high = cliprange, loss_agg_mode "token-mean"), torch -> NumPy float64."""
    negative_approx_kl = np.clip(log_prob - old_log_prob, -20.0, 20.0)
    ratio = np.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * np.clip(ratio, 1 - cliprange, 1 + cliprange)
    clip_pg_losses1 = np.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = ((pg_losses2 > pg_losses1) * response_mask).sum() / response_mask.sum()
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = np.minimum(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = ((clip_pg_losses1 > pg_losses3) * (advantages < 0) * response_mask).sum() / response_mask.sum()
    pg_losses = np.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    return (pg_losses * response_mask).sum() / response_mask.sum(), pg_clipfrac, pg_clipfrac_lower


def test_dual_clip_and_log_ratio_clamp_match_verl_transcription():
    rng = np.random.RandomState(3)
    old = rng.uniform(-6, -1, (4, 16)).astype(np.float32)
    # log ρ up to ±25: ratios beyond 3 (the dual clip) and beyond e^20 (the clamp)
    lp = (old + np.concatenate([rng.randn(4, 12), rng.uniform(-25, 25, (4, 4))], 1)).astype(np.float32)
    adv = rng.randn(4, 16).astype(np.float32)
    mask = (np.arange(16)[None] < np.array([[16], [9], [13], [1]])).astype(np.float32)
    loss, m = ppo_policy_loss(*map(jnp.asarray, (lp, old, adv, mask)), clip_eps=0.2, dual_clip=3.0, log_ratio_clip=20.0)
    want, clipfrac, clipfrac_lower = np_verl_policy_loss(*(x.astype(np.float64) for x in (old, lp, adv, mask)), 0.2, 3.0)
    assert 0 < clipfrac_lower < clipfrac  # the draw exercises the dual clip
    # a 39-token mean of terms up to 3·|A| ~ 10 and, where the clamp leaves ρ = e^20 with A > 0, of
    # −(1+ε)·A (clipped): float32 products and an exp (relative 4 ulps each) summed in float32:
    # 39·4 ulps of the largest |term|; measured 0.1
    terms = np.maximum(3.0 * np.abs(adv), 1.2 * np.abs(adv))
    np.testing.assert_allclose(loss, want, rtol=0, atol=ulps(39 * 4, terms))
    np.testing.assert_allclose(m["clip_fraction"], clipfrac, rtol=1e-6)  # ratios of counts <= 39: exact up to 1 rounding
    np.testing.assert_allclose(m["dual_clip_fraction"], clipfrac_lower, rtol=1e-6)


def test_dual_clip_hand_computed_and_gradient():
    # token 0: A = −1, ρ = 4: PPO max(4, 0.8) = 4 > 3 = −c·A -> 3 (dual clip); token 1: A = −1, ρ = 2 -> 2
    # token 2: A = 1, ρ = 4 -> max(−4, −1.2) = −1.2 (dual clip is for A < 0 only); token 3 masked, NaN
    logps = jnp.log(jnp.array([[4.0, 2.0, 4.0, jnp.nan]]))
    old = jnp.zeros((1, 4))
    adv = jnp.array([[-1.0, -1.0, 1.0, jnp.nan]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    loss, m = ppo_policy_loss(logps, old, adv, mask, dual_clip=3.0)
    np.testing.assert_allclose(loss, (3.0 + 2.0 - 1.2) / 3, rtol=1e-6)  # exp(log 4) and a 3-term mean: 8 ulps
    np.testing.assert_allclose(m["dual_clip_fraction"], 1 / 3, rtol=1e-6)
    plain, pm = ppo_policy_loss(logps, old, adv, mask)
    np.testing.assert_allclose(plain, (4.0 + 2.0 - 1.2) / 3, rtol=1e-6)  # as above
    assert float(pm["dual_clip_fraction"]) == 0.0
    g = jax.grad(lambda lp: ppo_policy_loss(lp, old, adv, mask, dual_clip=3.0)[0])(logps)
    # dual-clipped and clipped tokens: 0; token 1: d(−A ρ)/dlogp = −A·ρ = 2, over 3 tokens
    np.testing.assert_allclose(g, [[0.0, 2.0 / 3, 0.0, 0.0]], rtol=1e-6)  # as above
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_policy_loss(logps, old, adv, mask, dual_clip=1.0)
    with pytest.raises(ValueError, match="log_ratio_clip"):
        ppo_policy_loss(logps, old, adv, mask, log_ratio_clip=0.0)


def test_log_ratio_clamp_hand_computed_and_gradient():
    # log ρ = −30, 30, 20, 0.1 with κ = 20: ρ = e^-20, e^20, e^20 (end point: gradient passes), e^0.1
    logps = jnp.array([[-30.0, 30.0, 20.0, 0.1]])
    old, mask = jnp.zeros((1, 4)), jnp.ones((1, 4))
    adv = jnp.array([[-1.0, -1.0, -1.0, -1.0]])  # A < 0: unclipped −A·ρ is the max for ρ > 0.8
    loss, m = ppo_policy_loss(logps, old, adv, mask, log_ratio_clip=20.0)
    # token 0: max(e^-20, 0.8) = 0.8 (clipped); 1, 2: e^20; 3: e^0.1
    np.testing.assert_allclose(loss, (0.8 + 2 * np.exp(20.0) + np.exp(0.1)) / 4, rtol=1e-6)  # dominated by 2·e^20: 8 ulps
    np.testing.assert_allclose(m["approx_kl"], 0.5 * (3 * 400 + 0.01) / 4, rtol=1e-6)  # of the clamped log ρ
    g = jax.grad(lambda lp: ppo_policy_loss(lp, old, adv, mask, log_ratio_clip=20.0)[0])(logps)
    # d(−A·e^{log ρ})/dlogp = ρ/4 where the clamp lets the gradient through (inside and at the end point)
    np.testing.assert_allclose(g, [[0.0, 0.0, np.exp(20.0) / 4, np.exp(0.1) / 4]], rtol=1e-6)  # one exp each
    unclamped, _ = ppo_policy_loss(logps, old, adv, mask)
    assert float(unclamped) > float(loss)  # e^30 without the clamp
