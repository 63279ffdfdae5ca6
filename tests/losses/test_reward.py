import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxalign.losses import pairwise_reward_loss
from jaxalign.metrics import compilations
from tests._tolerance import ulps


def test_hand_computed_loss_accuracy_margin():
    # diffs 2 and -1: -log σ(2) = log(1 + e^-2), -log σ(-1) = log(1 + e)
    loss, m = pairwise_reward_loss(jnp.array([3.0, 0.0]), jnp.array([1.0, 1.0]))
    np.testing.assert_allclose(loss, (math.log1p(math.exp(-2)) + math.log1p(math.e)) / 2, rtol=1e-6)  # a few float32 roundings (exp/log1p within ~1 ulp each): 8 ulps
    np.testing.assert_allclose(m["accuracy"], 0.5)
    np.testing.assert_allclose(m["margin"], 0.5)
    np.testing.assert_allclose(m["chosen_rewards"], 1.5)


def test_margin_and_centering_match_trl_torch_definition():
    rng = np.random.RandomState(0)
    c, r, margin = rng.randn(5), rng.randn(5), np.abs(rng.randn(5))
    loss, _ = pairwise_reward_loss(jnp.asarray(c), jnp.asarray(r), margin=jnp.asarray(margin), center_coef=0.01)
    tc, tr, tm = (torch.tensor(x) for x in (c, r, margin))
    # TRL RewardTrainer.compute_loss: -logsigmoid(c - r - margin).mean() + coef * mean((c + r)^2)
    ref = -torch.nn.functional.logsigmoid(tc - tr - tm).mean() + 0.01 * torch.mean((tc + tr) ** 2)
    np.testing.assert_allclose(loss, ref.item(), rtol=1e-5)  # vs torch, a mean of softpluses: 84 ulps; measured 0.06


def test_where_equals_sliced_and_gradient():
    c, r = jnp.array([0.3, -0.2, 5.0]), jnp.array([0.1, 0.4, -7.0])
    where = jnp.array([1.0, 1.0, 0.0])
    loss, m = pairwise_reward_loss(c, r, where=where)
    sliced, ms = pairwise_reward_loss(c[:2], r[:2])
    np.testing.assert_allclose(loss, sliced, rtol=ulps(32))  # a mean over <= 8 rows regrouped: 32 ulps; measured equal
    np.testing.assert_allclose(m["accuracy"], ms["accuracy"])
    g = jax.grad(lambda c: pairwise_reward_loss(c, r, where=where)[0])(c)
    # d/dc -log σ(c - r) = -(1 - σ(c - r)) = -σ(r - c), averaged over the 2 real pairs
    np.testing.assert_allclose(g, -jax.nn.sigmoid(r - c) * where / 2, rtol=1e-6)  # one sigmoid, /2 exact: 8 ulps


def test_errors_and_no_recompile():
    with pytest.raises(ValueError, match="center_coef"):
        pairwise_reward_loss(jnp.zeros(2), jnp.zeros(2), center_coef=-1.0)
    with pytest.raises(AssertionError):
        pairwise_reward_loss(jnp.zeros(2), jnp.zeros(3))
    f = jax.jit(lambda c, r: pairwise_reward_loss(c, r)[0])
    a, b = jnp.zeros(4), jnp.ones(4)
    with compilations(f) as compiled:
        f(a, b)
        f(b, a)
    assert len(compiled) == 1
