"""Masks mean select: NaN, ±inf or `-100` at masked positions change no result and no gradient.

Each function runs twice on the same counted values: once with finite filler at the masked
positions, once with NaN / inf (and `-100` labels). Select semantics make the two the same
program on the same selected values, so results and gradients are compared *exactly*; the
gradient at masked positions must be 0. The sliced comparisons check the masked value itself.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.advantages import explained_variance, gae, ppo_token_rewards
from jaxalign.logprobs import sequence_logps, token_logps
from jaxalign.losses.dpo import DPO_LOSSES, dpo_loss
from jaxalign.losses.grpo import grpo_loss
from jaxalign.losses.ppo import ppo_policy_loss, ppo_value_loss
from jaxalign.losses.reward import pairwise_reward_loss
from jaxalign.losses.sft import sft_loss
from jaxalign.models.heads import pool_scores
from jaxalign.ops import masked_whiten

B, T, V = 4, 6, 11
RNG = np.random.RandomState(0)
MASK = np.array([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], np.float32)
ROWS = np.array([1, 1, 0, 1], np.float32)  # pair / row padding for the [B] losses


def poisoned(x, mask, value=np.nan):
    """x with `value` at the positions where mask == 0 (mask broadcast to x's leading axes)."""
    m = np.asarray(mask, bool).reshape(mask.shape + (1,) * (np.ndim(x) - np.ndim(mask)))
    return jnp.asarray(np.where(m, x, value), jnp.float32)


def assert_same_and_grad_zero_outside(fn, args, mask, argnums):
    """fn(*args) on clean and NaN/inf-poisoned copies of args[argnums]: identical value and
    gradients; gradients 0 where masked."""
    clean = [jnp.asarray(a, jnp.float32) if i in argnums else a for i, a in enumerate(args)]
    bad = list(clean)
    for n, i in enumerate(argnums):
        bad[i] = poisoned(clean[i], mask, (np.nan, np.inf, -np.inf)[n % 3])
    value_and_grad = jax.value_and_grad(lambda *a: fn(*a), argnums=argnums)
    (v_clean, g_clean), (v_bad, g_bad) = value_and_grad(*clean), value_and_grad(*bad)
    assert np.isfinite(float(v_bad))
    np.testing.assert_array_equal(v_bad, v_clean)
    outside = ~np.asarray(mask, bool)
    for gc, gb in zip(g_clean, g_bad):
        np.testing.assert_array_equal(gb, gc)
        gb = np.asarray(gb)
        assert np.all(gb.reshape(outside.shape + gb.shape[outside.ndim:])[outside] == 0)


def token_args():
    logps = RNG.randn(B, T) * 0.5 - 2
    return logps, logps + RNG.randn(B, T) * 0.3, logps + RNG.randn(B, T) * 0.3


def test_sequence_logps_hand_computed_with_nan_padding():
    lp = jnp.array([[1.0, 2.0, jnp.nan, 4.0]])
    mask = jnp.array([[1.0, 0.0, 0.0, 1.0]])
    np.testing.assert_array_equal(sequence_logps(lp, mask, average=True), [2.5])
    np.testing.assert_array_equal(sequence_logps(lp, mask), [5.0])
    for average in (False, True):
        assert_same_and_grad_zero_outside(
            lambda x, average=average: jnp.sum(sequence_logps(x, MASK, average=average)), (RNG.randn(B, T),), MASK, (0,)
        )


def test_minus_100_labels_at_masked_positions():
    logits = jnp.asarray(RNG.randn(B, T, V), jnp.float32)
    labels = RNG.randint(0, V, (B, T))
    hf_labels = jnp.asarray(np.where(MASK > 0, labels, -100))
    lp = token_logps(logits, hf_labels)
    assert np.all(np.isfinite(np.asarray(lp)))  # the clamped gather reads a real logit
    np.testing.assert_array_equal(
        sequence_logps(lp, MASK), sequence_logps(token_logps(logits, jnp.asarray(labels)), MASK)
    )
    loss, m = sft_loss(logits, hf_labels, MASK)
    ref, ref_m = sft_loss(logits, jnp.asarray(labels), MASK)
    np.testing.assert_array_equal(loss, ref)
    np.testing.assert_array_equal(m["token_accuracy"], ref_m["token_accuracy"])
    # Against the sliced computation: the counted positions only, as one row each.
    rows, cols = np.nonzero(MASK)
    sliced, _ = sft_loss(logits[rows, cols][None], jnp.asarray(labels[rows, cols])[None], jnp.ones((1, rows.size)))
    np.testing.assert_allclose(loss, sliced, rtol=8 * np.finfo(np.float32).eps)  # mean of 10 O(1) terms


def test_sft_loss_with_nan_logits_at_masked_positions():
    logits = RNG.randn(B, T, V)
    labels = jnp.asarray(np.where(MASK > 0, RNG.randint(0, V, (B, T)), -100))
    for smoothing in (0.0, 0.1):
        fn = lambda z, smoothing=smoothing: sft_loss(z, labels, MASK, label_smoothing=smoothing)[0]  # noqa: E731
        clean = jnp.asarray(logits, jnp.float32)
        bad = poisoned(clean, MASK)
        np.testing.assert_array_equal(fn(bad), fn(clean))
        # The gradient reaches every counted position unchanged (masked positions' logits are NaN,
        # so their own cotangent is the model's problem, not the loss's).
        g_clean, g_bad = jax.grad(fn)(clean), jax.grad(fn)(bad)
        np.testing.assert_array_equal(np.asarray(g_bad)[MASK > 0], np.asarray(g_clean)[MASK > 0])


def test_ppo_losses():
    logps, old, _ = token_args()
    adv = RNG.randn(B, T)
    assert_same_and_grad_zero_outside(
        lambda lp, o, a: ppo_policy_loss(lp, o, a, MASK, clip_eps=0.2)[0], (logps, old, adv), MASK, (0, 1, 2)
    )
    values = RNG.randn(B, T)
    assert_same_and_grad_zero_outside(
        lambda v, o, r: ppo_value_loss(v, o, r, MASK, clip_eps=0.2)[0],
        (values, values + 0.3 * RNG.randn(B, T), RNG.randn(B, T)), MASK, (0, 1, 2),
    )
    for key in ("clip_fraction", "approx_kl", "ratio"):
        clean = ppo_policy_loss(jnp.asarray(logps), jnp.asarray(old), jnp.asarray(adv), MASK)[1][key]
        bad = ppo_policy_loss(poisoned(logps, MASK), poisoned(old, MASK), poisoned(adv, MASK), MASK)[1][key]
        np.testing.assert_array_equal(bad, clean)


@pytest.mark.parametrize(
    "agg,level", list(itertools.product(("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"),
                                        ("token", "sequence", "sequence_token")))
)
def test_grpo_loss(agg, level):
    logps, old, ref = token_args()
    adv = RNG.randn(B)
    kw = dict(loss_agg=agg, importance_level=level, max_length=T, beta=0.04)
    assert_same_and_grad_zero_outside(
        lambda lp, o, r: grpo_loss(lp, o, r, jnp.asarray(adv), MASK, **kw)[0], (logps, old, ref), MASK, (0, 1, 2)
    )
    # Padding rows (where == 0) may hold NaN in every input, advantages included.
    rows_mask = np.broadcast_to(ROWS[:, None], (B, T)) * MASK
    bad_adv = jnp.asarray(np.where(ROWS > 0, adv, np.nan), jnp.float32)
    bad_lp = poisoned(logps, rows_mask)
    clean = grpo_loss(jnp.asarray(logps), jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv), MASK, where=ROWS, **kw)
    bad = grpo_loss(bad_lp, poisoned(old, rows_mask), poisoned(ref, rows_mask), bad_adv, MASK, where=ROWS, **kw)
    for key in clean[1]:
        np.testing.assert_array_equal(bad[1][key], clean[1][key], err_msg=key)


@pytest.mark.parametrize("loss_type", sorted(DPO_LOSSES))
def test_dpo_and_reward_losses_with_nan_padding_pairs(loss_type):
    pairs = RNG.randn(4, B) - 5
    assert_same_and_grad_zero_outside(
        lambda c, r, rc, rr: dpo_loss(c, r, rc, rr, beta=0.1, loss_type=loss_type, where=ROWS)[0],
        tuple(pairs), ROWS, (0, 1, 2, 3),
    )
    assert_same_and_grad_zero_outside(
        lambda c, r: pairwise_reward_loss(c, r, center_coef=0.01, where=ROWS)[0], tuple(pairs[:2]), ROWS, (0, 1)
    )


def test_advantages_and_whitening():
    rewards, values = RNG.randn(B, T), RNG.randn(B, T)
    assert_same_and_grad_zero_outside(
        lambda r, v: jnp.sum(jnp.square(jnp.stack(gae(r, v, MASK, gamma=0.9, lam=0.8)))), (rewards, values), MASK, (0, 1)
    )
    assert_same_and_grad_zero_outside(lambda x: jnp.sum(masked_whiten(x, MASK) ** 3), (rewards,), MASK, (0,))
    logps, _, ref = token_args()
    scores = jnp.asarray(RNG.randn(B), jnp.float32)
    assert_same_and_grad_zero_outside(
        lambda lp, r: jnp.sum(jnp.square(ppo_token_rewards(scores, lp, r, MASK, kl_coef=0.1, kind="k3")[0])),
        (logps, ref), MASK, (0, 1),
    )
    assert_same_and_grad_zero_outside(
        lambda v, r: explained_variance(v, r, MASK), (values, rewards), MASK, (0, 1)
    )
    assert_same_and_grad_zero_outside(
        lambda s: jnp.sum(pool_scores(s, MASK, pool="mean")), (rewards,), MASK, (0,)
    )
    # gae of a prefix-masked row equals gae of the sliced row (row 1 is fully counted).
    adv, ret = gae(poisoned(rewards, MASK), poisoned(values, MASK), MASK, gamma=0.9, lam=0.8)
    adv1, ret1 = gae(jnp.asarray(rewards[1:2], jnp.float32), jnp.asarray(values[1:2], jnp.float32), MASK[1:2],
                     gamma=0.9, lam=0.8)
    np.testing.assert_array_equal(adv[1:2], adv1)
    np.testing.assert_array_equal(ret[1:2], ret1)
