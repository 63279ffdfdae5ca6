"""MoE auxiliary losses (jaxalign/losses/moe.py) against transformers 5.25 (Mixtral's
`load_balancing_loss_func`, Switch's `router_z_loss_func`), a NumPy transcription of DeepSeek-V3's
sequence-wise loss, hand values, select semantics and compilation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func

from jaxalign.losses.moe import (
    expert_bias_update,
    expert_load,
    load_balancing_loss,
    router_z_loss,
    sequence_balance_loss,
)
from jaxalign.metrics import compilations
from jaxalign.models.moe import MoEConfig, route
from tests._tolerance import ulps

L, B, T, E, K = 3, 2, 6, 8, 2
MASK = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], np.int64)  # left padding in row 0


def logits(seed=0, shape=(L, B, T, E)):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def topk_gap(z: np.ndarray, k: int) -> float:
    """Smallest gap between the k-th and (k+1)-th softmax probability (float64) over rows."""
    p = np.exp(z - z.max(-1, keepdims=True))
    p = np.sort(p / p.sum(-1, keepdims=True), -1)[..., ::-1]
    return float((p[..., k - 1] - p[..., k]).min())


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_matches_transformers(masked):
    z = logits()
    assert topk_gap(z, K) > 1e-4  # torch and XLA softmax cannot disagree on the top k
    hf = load_balancing_loss_func(
        tuple(torch.from_numpy(z[l].reshape(B * T, E)) for l in range(L)), E, K,
        attention_mask=torch.from_numpy(MASK) if masked else None,
    ).item()
    mask = jnp.asarray(MASK) if masked else None
    fn = jax.jit(lambda z, m: load_balancing_loss(z, top_k=K, mask=m))
    z1 = jnp.asarray(z + 1.0)
    with compilations(fn) as compiled:
        loss, metrics = fn(jnp.asarray(z), mask)
        fn(z1, mask)
    assert len(compiled) == 1
    # f is exact (integer counts over the real rows); P sums L·B·T = 36 probabilities <= 1 in
    # another order: 2·36 ulps of P, times E·Σf = E·k relative: 2·36 ulps of the loss (~k);
    # measured <= 2 ulps (4.8e-7 with the mask, 0 without)
    np.testing.assert_allclose(loss, hf, rtol=0, atol=ulps(72, hf))
    np.testing.assert_allclose(metrics["tokens_per_expert"].sum(), K, rtol=1e-6)  # Σ_e f_e = k
    np.testing.assert_allclose(metrics["router_prob_per_expert"].sum(), 1.0, rtol=1e-6)
    # the same statistics from the tuple of per-layer [B·T, E] arrays and a flat [B·T] mask
    flat = load_balancing_loss(tuple(jnp.asarray(z[l].reshape(B * T, E)) for l in range(L)), top_k=K,
                               mask=None if mask is None else mask.reshape(-1))[0]
    np.testing.assert_allclose(flat, loss, rtol=0, atol=ulps(8, loss))  # same sums, reshaped


def test_load_balancing_masked_equals_sliced_even_with_nan():
    z = logits(1)
    real = MASK.astype(bool)
    poisoned = np.where(real[None, :, :, None], z, np.nan).astype(np.float32)
    sliced = z[:, real]  # [L, 10, E]: the real tokens only, no mask

    def f(zz, mask):
        return load_balancing_loss(zz, top_k=K, mask=mask)[0]

    want, g_want = jax.value_and_grad(f)(jnp.asarray(sliced), None)
    got, g = jax.value_and_grad(f)(jnp.asarray(poisoned), jnp.asarray(MASK))
    np.testing.assert_allclose(got, want, rtol=0, atol=ulps(8, want))  # same terms, same order
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(np.asarray(g)[:, ~real], 0.0)  # padding gets no gradient
    np.testing.assert_allclose(np.asarray(g)[:, real], g_want, rtol=0, atol=ulps(8, g_want))
    assert float(f(jnp.asarray(poisoned), jnp.zeros((B, T)))) == 0.0  # no real token: 0, not NaN


def test_load_balancing_uniform_minimum_is_k_and_expert_ids_path():
    # uniform probabilities (zero logits) and a perfectly balanced assignment: f_e = k/E, P_e = 1/E,
    # E·Σ_e f_e P_e = k exactly (HF's Mixtral test asserts ≈ 2 for k = 2)
    ids = (np.arange(4 * E)[:, None] * K + np.arange(K)) % E  # [32, k], every expert 8 times
    loss, m = load_balancing_loss(jnp.zeros((1, 4 * E, E)), expert_ids=jnp.asarray(ids[None]))
    np.testing.assert_allclose(loss, K, rtol=1e-6)
    np.testing.assert_allclose(m["tokens_per_expert"], np.full(E, K / E), rtol=1e-6)
    # expert_ids equal to topk(softmax) gives the top_k path's loss
    z = jnp.asarray(logits(2))
    chosen = jax.lax.top_k(jax.nn.softmax(z), K)[1]
    a = load_balancing_loss(z, top_k=K, mask=jnp.asarray(MASK))[0]
    b = load_balancing_loss(z, expert_ids=chosen, mask=jnp.asarray(MASK))[0]
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="exactly one"):
        load_balancing_loss(z, top_k=K, expert_ids=chosen)
    with pytest.raises(ValueError, match="top_k"):
        load_balancing_loss(z, top_k=E + 1)


def test_router_z_loss_matches_switch_transformers_and_masks():
    z = logits(3, (3, 5, E)) * 3
    hf = router_z_loss_func(torch.from_numpy(z)).item()
    fn = jax.jit(lambda z, m: router_z_loss(z, mask=m))
    z0, z1 = jnp.asarray(z), jnp.asarray(z + 1)
    with compilations(fn) as compiled:
        loss, m = fn(z0, None)
        fn(z1, None)
    assert len(compiled) == 1  # the unmasked call, twice
    # logsumexp of 8 terms (a few ulps of |lse| ~ 5), squared (×2 relative), a 15-term mean:
    # 32 ulps of the loss; measured 0
    np.testing.assert_allclose(loss, hf, rtol=0, atol=ulps(32, hf))
    np.testing.assert_allclose(router_z_loss(jnp.zeros((4, E)))[0], np.log(E) ** 2, rtol=1e-6)  # hand value
    # masked == sliced, with NaN and inf at the masked tokens, and no gradient reaches them
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], bool)
    poisoned = np.where(mask[..., None], z, np.nan).astype(np.float32)
    poisoned[0, 3] = np.inf
    got, g = jax.value_and_grad(lambda zz: router_z_loss(zz, mask=jnp.asarray(mask))[0])(jnp.asarray(poisoned))
    want = router_z_loss(jnp.asarray(z[mask]))[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=ulps(16, want))  # same terms, other order
    assert np.isfinite(np.asarray(g)).all() and (np.asarray(g)[~mask] == 0).all()


def np_sequence_balance(z: np.ndarray, ids: np.ndarray, k: int) -> float:
    """DeepSeek-V3 report §2.1.2, one layer, float64, every row one full sequence."""
    s = 1 / (1 + np.exp(-z.astype(np.float64)))
    s_norm = s / s.sum(-1, keepdims=True)
    b, t, e = z.shape
    losses = []
    for row in range(b):
        f = np.array([(ids[row] == i).any(-1).sum() for i in range(e)]) * e / (k * t)
        p = s_norm[row].mean(0)
        losses.append((f * p).sum())
    return float(np.mean(losses))


def test_sequence_balance_loss():
    z = logits(4, (B, T, E))
    cfg = MoEConfig(num_experts=E, experts_per_token=K, moe_d_ff=4, router="sigmoid")
    ids = route(jnp.asarray(z.reshape(-1, E)), None, cfg)[0].reshape(B, T, K)
    loss, m = jax.jit(sequence_balance_loss)(jnp.asarray(z), ids)
    want = np_sequence_balance(z, np.asarray(ids), K)
    # T-term means of values <= E/k and <= 1, an E-term sum: 32 ulps of the loss; measured 0.7
    np.testing.assert_allclose(loss, want, rtol=0, atol=ulps(32, want))
    assert m["per_sequence"].shape == (B,)
    # uniform minimum 1: equal scores, every expert chosen k·T/E times in each sequence
    balanced = (np.arange(T * 4)[:, None] * K + np.arange(K)) % E
    one, _ = sequence_balance_loss(jnp.zeros((1, T * 4, E)), jnp.asarray(balanced[None]))
    np.testing.assert_allclose(one, 1.0, rtol=1e-6)
    # masked == each sequence sliced to its real tokens, NaN at padding; stacked layers average
    poisoned = np.where(MASK.astype(bool)[..., None], z, np.nan).astype(np.float32)
    got, g = jax.value_and_grad(
        lambda zz: sequence_balance_loss(zz, ids, mask=jnp.asarray(MASK))[0])(jnp.asarray(poisoned))
    rows = [sequence_balance_loss(jnp.asarray(z[r][MASK[r] == 1][None]),
                                  ids[r][MASK[r] == 1][None])[0] for r in range(B)]
    np.testing.assert_allclose(got, np.mean(rows), rtol=0, atol=ulps(16, got))
    assert np.isfinite(np.asarray(g)).all() and (np.asarray(g)[MASK == 0] == 0).all()
    stacked, _ = sequence_balance_loss(jnp.stack([jnp.asarray(z), jnp.asarray(z)]), jnp.stack([ids, ids]))
    np.testing.assert_allclose(stacked, loss, rtol=0, atol=ulps(4, loss))


def test_expert_bias_update_hand_example_and_errors():
    g = 0.001
    counts = jnp.asarray([5, 1, 2, 0])  # mean 2
    np.testing.assert_array_equal(expert_bias_update(jnp.zeros(4), counts, gamma=g),
                                  np.float32([-g, g, 0.0, g]))  # the average expert is unchanged
    stacked = expert_bias_update(jnp.zeros((2, 4)), jnp.asarray([[5, 1, 2, 0], [0, 0, 0, 4]]), gamma=g)
    np.testing.assert_array_equal(stacked, np.float32([[-g, g, 0, g], [g, g, g, -g]]))  # per layer
    np.testing.assert_array_equal(expert_bias_update(jnp.ones(4), counts, gamma=0.0), np.ones(4))
    with pytest.raises(ValueError, match="gamma"):
        expert_bias_update(jnp.zeros(4), counts, gamma=-1.0)
    with pytest.raises(AssertionError):
        expert_bias_update(jnp.zeros(4), jnp.zeros(5), gamma=g)


def test_bias_updates_balance_an_imbalanced_router():
    # sigmoid router with a strong preference for low expert ids; the bias alone (no gradient,
    # no aux loss) spreads the load: max/mean load from ~3.2 to ~1.1 in 100 updates
    cfg = MoEConfig(num_experts=8, experts_per_token=2, moe_d_ff=4, router="sigmoid", router_bias=True)
    z = jax.random.normal(jax.random.key(0), (512, 8)) + jnp.linspace(2.0, -2.0, 8)

    @jax.jit
    def step(bias):
        ids, _ = route(z, bias, cfg)
        counts = expert_load(ids, None, 8)
        return expert_bias_update(bias, counts, gamma=0.01), counts

    bias = jnp.zeros(8)
    with compilations(step) as compiled:
        bias, first = step(bias)
        for _ in range(100):
            bias, counts = step(bias)
    assert float(first.max() / first.mean()) > 2.5
    assert float(counts.max() / counts.mean()) < 1.25
    assert len(compiled) == 1
