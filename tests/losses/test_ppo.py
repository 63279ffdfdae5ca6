import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import ppo_policy_loss, ppo_value_loss
from tests._tolerance import ulps
from tests.conftest import compile_count


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
    fn(v, v, v, jnp.ones((1, 3)))
    fn(v * 2, v, v, jnp.ones((1, 3)))
    assert compile_count(fn) == 1
    with pytest.raises(ValueError, match="clip_eps"):
        ppo_value_loss(v, v, v, v, clip_eps=0.0)
