import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses.grpo import grpo_denominator, grpo_loss
from jaxalign.metrics import compilations
from tests._tolerance import ulps

AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
LEVELS = ("token", "sequence", "sequence_token")


def batch(seed=0, b=6, t=7):
    rng = np.random.RandomState(seed)
    logps = rng.randn(b, t) * 0.5 - 2
    old = logps + rng.randn(b, t) * 0.3
    ref = logps + rng.randn(b, t) * 0.3
    adv = rng.randn(b)
    lengths = rng.randint(1, t + 1, b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    return logps, old, ref, adv, mask


def np_grpo(lp, old, ref, adv, mask, eps_low, eps_high, beta, agg, level, max_len):
    """Independent transcription of TRL GRPOTrainer._compute_loss (float64)."""
    log_ratio = lp - old
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / np.maximum(mask.sum(-1), 1))[:, None] * np.ones_like(lp)
    ratio = np.exp(log_ratio)
    per = -np.minimum(ratio * adv[:, None], np.clip(ratio, 1 - eps_low, 1 + eps_high) * adv[:, None])
    per = per + beta * (np.exp(ref - lp) - (ref - lp) - 1)
    if agg == "seq_mean_token_mean":
        return ((per * mask).sum(-1) / np.maximum(mask.sum(-1), 1)).mean()
    if agg == "token_mean":
        return (per * mask).sum() / mask.sum()
    return (per * mask).sum() / (lp.shape[0] * max_len)


def test_hand_computed_on_policy():
    lp = jnp.zeros((2, 4)) - 1.0
    mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]], jnp.float32)
    adv = jnp.array([1.0, 0.5])
    kw = dict(beta=0.0)
    # on-policy: ρ = 1, per-token loss −A
    np.testing.assert_allclose(grpo_loss(lp, lp, None, adv, mask, loss_agg="seq_mean_token_mean", **kw)[0], -0.75)
    # means of <= 6 terms, exp, log: a few roundings each, 8 ulps; measured <= 0.9
    np.testing.assert_allclose(grpo_loss(lp, lp, None, adv, mask, loss_agg="token_mean", **kw)[0], -4 / 6, rtol=1e-6)
    np.testing.assert_allclose(
        grpo_loss(lp, lp, None, adv, mask, loss_agg="seq_mean_token_sum_norm", max_length=5, **kw)[0], -0.4, rtol=1e-6
    )
    # KL: log π/π_ref = 1 on every token -> k3 = e^-1, added with β = 0.1
    loss, m = grpo_loss(lp, lp, lp - 1.0, adv, mask, beta=0.1)
    np.testing.assert_allclose(loss, -0.75 + 0.1 * np.exp(-1.0), rtol=1e-6)
    np.testing.assert_allclose(m["kl"], np.exp(-1.0), rtol=1e-6)


def test_decoupled_clip_fractions():
    # ρ = 1.25 with A > 0: clipped at 1.2 but not at 1.28 (DAPO clip-higher); ρ = 0.7 with A < 0: clipped low
    lp = jnp.log(jnp.array([[1.25], [0.7]]))
    old = jnp.zeros((2, 1))
    adv = jnp.array([1.0, -1.0])
    mask = jnp.ones((2, 1))
    _, m = grpo_loss(lp, old, None, adv, mask, beta=0.0)
    np.testing.assert_allclose([m["clip_fraction_high"], m["clip_fraction_low"]], [0.5, 0.5])
    loss, m = grpo_loss(lp, old, None, adv, mask, beta=0.0, clip_eps_high=0.28)
    np.testing.assert_allclose(m["clip_fraction_high"], 0.0)
    np.testing.assert_allclose(loss, (-1.25 + 0.8) / 2, rtol=1e-6)  # exp(log 1.25) within an ulp: 8 ulps


@pytest.mark.parametrize("agg,level", [(a, l) for a in AGGS for l in ("token", "sequence")])
def test_matches_trl_reference(agg, level):
    lp, old, ref, adv, mask = batch()
    loss, _ = grpo_loss(*map(jnp.asarray, (lp, old, ref, adv, mask)), clip_eps=0.2, clip_eps_high=0.28,
                        beta=0.04, loss_agg=agg, importance_level=level, max_length=7)
    # float32 vs float64 over 6x7 tokens, the sums partly cancelling: 84 ulps; measured 0.9
    np.testing.assert_allclose(loss, np_grpo(lp, old, ref, adv, mask, 0.2, 0.28, 0.04, agg, level, 7), rtol=1e-5)


def test_gspo_token_has_sequence_value_and_token_gradients():
    lp, old, ref, adv, mask = map(jnp.asarray, batch(1))
    kw = dict(beta=0.0, clip_eps=10.0)  # no clipping: compare the raw objectives
    seq, _ = grpo_loss(lp, old, None, adv, mask, importance_level="sequence", **kw)
    tok, _ = grpo_loss(lp, old, None, adv, mask, importance_level="sequence_token", **kw)
    np.testing.assert_allclose(seq, tok, rtol=1e-6)  # same value: the stop-gradients are identities; 8 ulps
    g_seq = jax.grad(lambda x: grpo_loss(x, old, None, adv, mask, importance_level="sequence", **kw)[0])(lp)
    g_tok = jax.grad(lambda x: grpo_loss(x, old, None, adv, mask, importance_level="sequence_token", **kw)[0])(lp)
    s = jnp.exp(jnp.sum((lp - old) * mask, -1) / mask.sum(-1))  # [B]
    n_seq, length = lp.shape[0], mask.sum(-1)
    # GSPO: loss = mean_i(−A_i·s_i), ∂s_i/∂logp_t = s_i/|y_i|. GSPO-token: each token's term
    # −A_i·sg(s_i)·π_t/sg(π_t) has gradient −A_i·s_i, averaged over |y_i| tokens. With one advantage
    # per sequence the two gradients coincide (GSPO paper, §4.3).
    expected = (-adv * s / length / n_seq)[:, None] * mask
    # autodiff vs the closed form (a 7-term mean, an exp): 84 ulps, 1e-7 absolute near 0; measured 0.3
    np.testing.assert_allclose(g_seq, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_tok, expected, rtol=1e-5, atol=1e-7)
    # ...but they differ from the token-level ratio's gradient
    g_token = jax.grad(lambda x: grpo_loss(x, old, None, adv, mask, importance_level="token", **kw)[0])(lp)
    assert not np.allclose(g_token, expected, atol=1e-4)


@pytest.mark.parametrize("agg,level", list(itertools.product(AGGS, LEVELS)))
def test_micro_batches_reproduce_whole_batch(agg, level):
    lp, old, ref, adv, mask = map(jnp.asarray, batch(2, b=8))
    kw = dict(beta=0.04, clip_eps_high=0.28, loss_agg=agg, importance_level=level, max_length=7)
    whole_fn = lambda x: grpo_loss(x, old, ref, adv, mask, **kw)[0]  # noqa: E731
    whole, g_whole = jax.value_and_grad(whole_fn)(lp)
    denom = grpo_denominator(mask, loss_agg=agg)
    total, grads = 0.0, []
    for part in (slice(0, 3), slice(3, 5), slice(5, 8)):
        fn = lambda x, part=part: grpo_loss(x, old[part], ref[part], adv[part], mask[part], denominator=denom, **kw)[0]  # noqa: E731
        value, g = jax.value_and_grad(fn)(lp[part])
        total += value
        grads.append(g)
    # sums over 3 micro-batches vs one, terms of both signs: 84 ulps; measured 0.9. Per-token
    # gradients are the same expression in both: 84 ulps; measured equal
    np.testing.assert_allclose(total, whole, rtol=1e-5)
    np.testing.assert_allclose(jnp.concatenate(grads), g_whole, rtol=1e-5, atol=1e-8)
    # without the shared denominator the token mean of micro-batches is biased (the bug TRL fixed)
    if agg == "token_mean":
        naive = sum(float(grpo_loss(lp[p], old[p], ref[p], adv[p], mask[p], **kw)[0]) for p in (slice(0, 3), slice(3, 5), slice(5, 8))) / 3
        assert abs(naive - float(whole)) > 1e-3


def test_where_excludes_padding_rows():
    lp, old, ref, adv, mask = map(jnp.asarray, batch(3))
    where = jnp.array([1, 1, 0, 1, 0, 1], bool)
    for agg in AGGS:
        a, _ = grpo_loss(lp, old, ref, adv, mask, loss_agg=agg, max_length=7, where=where)
        b, _ = grpo_loss(lp[where], old[where], ref[where], adv[where], mask[where], loss_agg=agg, max_length=7)
        np.testing.assert_allclose(a, b, rtol=ulps(32))  # a mean over <= 6 rows regrouped: 32 ulps; measured equal


def test_finite_gradients_and_no_recompile():
    lp, old, ref, adv, mask = map(jnp.asarray, batch(4))
    fn = jax.jit(jax.grad(lambda x, o: grpo_loss(x, o, ref, adv, mask)[0]))
    lp2 = lp + 0.1
    with compilations(fn) as compiled:
        g = fn(lp, old)
        fn(lp2, old)
    assert np.all(np.isfinite(g))
    assert len(compiled) == 1


def test_errors():
    lp, old, ref, adv, mask = map(jnp.asarray, batch(5))
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(lp, old, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="max_length"):
        grpo_loss(lp, old, ref, adv, mask, loss_agg="seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="loss_agg"):
        grpo_loss(lp, old, ref, adv, mask, loss_agg="mean")
