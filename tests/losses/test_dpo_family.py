"""The DPO loss types beyond sigmoid/robust/hinge/ipo, and the reference-free SimPO and ORPO,
against float64 NumPy transcriptions of TRL's formulas.

TRL 1.16.0: `trl/trainer/dpo_trainer.py` `DPOTrainer._compute_loss` lines 1386-1510 (the
loss_type branches), `trl/experimental/cpo/cpo_trainer.py` lines 715-722 (simpo),
`trl/experimental/orpo/orpo_trainer.py` lines 87-91 (log1mexp), 690-702 and 848 (ORPO); TRL
0.19.0 `dpo_trainer.py` lines 1063-1073 and `utils.py` 728-754 (bco_pair's running mean).

How the tolerances are derived. The transcriptions do TRL's log-ratio subtractions in float32,
as TRL does on a float32 model: a single IEEE subtraction of the same two float32 numbers is
the same number in NumPy and XLA, so both sides see bit-identical log-ratios and differ only by
the float32 rounding of what follows (exp/log/sigmoid, a product or two, the batch mean). Each
transcription also returns the per-pair *magnitude* M (the sum of |terms| whose sum is the loss,
widened where an argument's rounding is amplified, see discopop); the float32 result then lies
within a few ulps of M per operation: ~16 ulps for the deepest loss here, so 64 ulps of M.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses.dpo import (
    DPO_LOSSES,
    RewardBaseline,
    bco_pair_loss,
    dpo_loss,
    init_reward_baseline,
)
from jaxalign.losses.preference import log1mexp, orpo_loss, simpo_loss
from jaxalign.metrics import compilations
from tests._tolerance import F32_EPS, ulps

F32, F64 = np.float32, np.float64
# One padding pattern and two batch sizes ([8], [2]) throughout: eager JAX compiles each
# operation once per shape, so shared shapes keep the file fast.
WHERE = np.array([1, 0, 1, 1, 0, 1, 1, 1], bool)
NEW_TYPES = [
    "sigmoid_norm", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop",
]


def np_logsig(x):
    return -np.logaddexp(0.0, -x)


def np_sig(x):
    return np.exp(np_logsig(x))


def np_trl_dpo(c, r, rc, rr, *, beta, loss_type, eps=0.0, tau=0.05, delta=0.0):
    """TRL 1.16.0 DPOTrainer._compute_loss per-pair loss (reverse KL, no weighting) -> (loss [B],
    magnitude [B]), float64 after TRL's float32 log-ratio subtractions. `delta`: TRL 0.19's bco δ."""
    c, r, rc, rr = (np.asarray(x, F32) for x in (c, r, rc, rr))
    cl, rl = c - rc, r - rr  # chosen_logratios, rejected_logratios (float32)
    d = cl - rl  # delta_score
    if loss_type == "aot":
        d = np.sort(c - r) - np.sort(rc - rr)
    elif loss_type == "aot_unpaired":
        d = np.sort(cl) - np.sort(rl)
    cl, rl, d = cl.astype(F64), rl.astype(F64), d.astype(F64)
    z, extra = beta * d, 0.0
    if loss_type in ("sigmoid_norm", "aot", "aot_unpaired"):  # sigmoid_norm: TRL has no ε there
        terms = [-np_logsig(z) * (1 - eps), -np_logsig(-z) * eps]
    elif loss_type == "exo_pair":
        qw, ql = np_sig(z), np_sig(-z)
        terms = [qw * np_logsig(z), -qw * np.log1p(-eps), ql * np_logsig(-z), -ql * np.log(eps)]
    elif loss_type == "nca_pair":
        terms = [-np_logsig(beta * cl), -0.5 * np_logsig(-beta * cl), -0.5 * np_logsig(-beta * rl)]
    elif loss_type == "bco_pair":
        terms = [-np_logsig(beta * cl - delta), -np_logsig(-(beta * rl - delta))]
    elif loss_type == "sppo_hard":
        terms = [(cl - 0.5 / beta) ** 2, (rl + 0.5 / beta) ** 2]
    elif loss_type == "apo_zero":
        terms = [np.ones_like(z), -np_sig(beta * cl), np_sig(beta * rl)]
    elif loss_type == "apo_down":
        terms = [np_sig(beta * cl), np.ones_like(z), -np_sig(z)]
    elif loss_type == "discopop":
        m = np_sig(z / tau)
        terms = [-np_logsig(z) * (1 - m), np.exp(-z) * m]
        # jaxalign takes exp(-z)·m as exp(log σ(z/τ) - z): the exponent's rounding, up to
        # ulps of |z|/τ + |z|, becomes a relative error of the exp term
        extra = terms[1] * np.abs(z) * (1 + 1 / tau)
    loss = sum(terms)
    return loss, sum(np.abs(t) for t in terms) + extra


def draw(seed, b=8, scale=5.0, shift=-20.0):
    """Four float32 [b] log-prob vectors (chosen, rejected, ref_chosen, ref_rejected)."""
    rng = np.random.RandomState(seed)
    return [(rng.randn(b) * scale + shift).astype(F32) for _ in range(4)]


def assert_close_to(actual, expected, magnitude, k=64):
    """|actual - expected| <= k float32 ulps of the mean per-pair magnitude (module docstring)."""
    np.testing.assert_allclose(actual, expected, rtol=0, atol=ulps(k, np.mean(magnitude)))


@pytest.mark.parametrize("loss_type", NEW_TYPES)
def test_matches_trl_transcription(loss_type):
    x, beta = draw(1), 0.3
    eps = 0.2 if loss_type in ("aot", "aot_unpaired") else (1e-3 if loss_type == "exo_pair" else 0.0)
    loss, m = dpo_loss(*map(jnp.asarray, x), beta=beta, loss_type=loss_type, label_smoothing=eps)
    ref, mag = np_trl_dpo(*x, beta=beta, loss_type=loss_type, eps=eps)
    assert_close_to(loss, ref.mean(), mag)
    cl = x[0].astype(F64) - x[2]
    # β·(c - rc) of |c - rc| <= ~40 and a mean of 8: 32 ulps of β·40
    np.testing.assert_allclose(m["chosen_rewards"], beta * cl.mean(), rtol=0, atol=ulps(32, beta * 40))


def test_trl_formulas_hand_computed():
    # all log-ratios 0 (policy == reference), β = 0.5
    z = jnp.array([-3.0, -7.0])
    zero = dict(beta=0.5)
    value = lambda t, **kw: float(dpo_loss(z, z - 1, z, z - 1, loss_type=t, **zero, **kw)[0])  # noqa: E731
    # σ(0) = ½ everywhere; a few float32 roundings of numbers ~1: 16 ulps
    tol = ulps(16, 2.0)
    assert abs(value("nca_pair") - 2 * np.log(2)) <= tol  # -log ½ - ½ log ½ - ½ log ½
    assert abs(value("bco_pair") - 2 * np.log(2)) <= tol
    assert abs(value("apo_zero") - 1.0) <= tol  # 1 - ½ + ½
    assert abs(value("apo_down") - 1.0) <= tol  # ½ + 1 - ½
    assert abs(value("sppo_hard") - 2.0) <= tol  # (0 - 1)² + (0 + 1)² at 1/(2β) = 1
    assert abs(value("discopop") - (np.log(2) + 1) / 2) <= tol  # ½·log 2 + ½·e^0
    # KL of (½, ½) from (1-ε, ε): log ½ - ½ log(ε(1-ε))
    assert abs(value("exo_pair", label_smoothing=0.1) - (np.log(0.5) - 0.5 * np.log(0.09))) <= tol
    # bco with δ = 1 at zero log-ratios: -log σ(-1) - log σ(1) = log((1 + e)(1 + e⁻¹))
    assert abs(value("bco_pair", reward_baseline=1.0) - np.log(2 + np.e + 1 / np.e)) <= tol


def test_aot_sorts_across_the_batch_by_hand():
    # policy margins (3, -1) and reference margins (0, 2), β = 1: sorted (-1, 3) - (0, 2) = (-1, 1),
    # loss = ½(log(1 + e) + log(1 + e⁻¹)) = ½ log(2 + e + e⁻¹); unsorted pairs would give h = ±3.
    c, r = jnp.array([0.0, -1.0]), jnp.array([-3.0, 0.0])
    rc, rr = jnp.array([-1.0, -1.0]), jnp.array([-1.0, -3.0])
    loss, m = dpo_loss(c, r, rc, rr, beta=1.0, loss_type="aot")
    assert abs(float(loss) - 0.5 * np.log(2 + np.e + 1 / np.e)) <= ulps(16, 2.0)
    np.testing.assert_allclose(m["logits"], 0.0, atol=ulps(4, 3.0))  # (3 - 3)/2: unsorted h
    # aot_unpaired sorts the log-ratios (1, 0) and (-2, 3): sorted (0, 1) - (-2, 3) = (2, -2)
    loss, _ = dpo_loss(c, r, rc, rr, beta=1.0, loss_type="aot_unpaired")
    assert abs(float(loss) - 0.5 * np.log(2 + np.exp(2) + np.exp(-2))) <= ulps(16, 3.0)


def test_sigmoid_norm_is_sigmoid_on_length_averaged_logps():
    # TRL divides each side's summed log-ratio by its completion length; jaxalign averages the
    # log-probs first (sequence_logps(average=True)): (c - rc)/n = c/n - rc/n.
    sums = draw(2)
    lengths = [np.array([3, 7, 1, 12, 5, 9, 2, 4], F32), np.array([6, 2, 8, 3, 10, 1, 7, 5], F32)]
    n = [lengths[0], lengths[1], lengths[0], lengths[1]]
    avg = [jnp.asarray(s / k) for s, k in zip(sums, n)]
    loss, _ = dpo_loss(*avg, beta=0.5, loss_type="sigmoid_norm")
    same, _ = dpo_loss(*avg, beta=0.5, loss_type="sigmoid")
    np.testing.assert_array_equal(loss, same)  # one function, one program
    s64 = [s.astype(F64) for s in sums]
    d = (s64[0] - s64[2]) / n[0] - (s64[1] - s64[3]) / n[1]
    ref = -np_logsig(0.5 * d).mean()
    # the averages are rounded before their difference (TRL: after): each of the 4 averages
    # (|avg| <= 30) is off by half an ulp, then 3 subtractions: 4 ulps of 30 in d; β·|σ'| <= ½
    # carries it to the loss, plus 16 ulps of the loss's own rounding
    np.testing.assert_allclose(loss, ref, rtol=0, atol=0.5 * ulps(4, 30.0) + ulps(16, max(ref, 1)))


def test_padding_pairs_with_nan_equal_sliced():
    x = draw(3)
    where = WHERE
    bad = [jnp.asarray(np.where(where, v, np.nan)) for v in x]
    sliced = [jnp.asarray(v[where]) for v in x]
    for loss_type in NEW_TYPES:
        kw = dict(beta=0.1, loss_type=loss_type)
        masked, mm = dpo_loss(*bad, where=jnp.asarray(where), **kw)
        plain, ms = dpo_loss(*sliced, **kw)
        _, mag = np_trl_dpo(*[v[where] for v in x], beta=0.1, loss_type=loss_type, eps=1e-3)
        # the same per-pair values averaged over 6 rows in another order: 8 ulps of M
        assert_close_to(masked, plain, mag, k=8)
        for key in ms:  # the metrics: means over the same 6 rows (|rewards| <= β·40)
            np.testing.assert_allclose(mm[key], ms[key], rtol=0, atol=ulps(8, 40.0), err_msg=key)
    # finite gradients, 0 on padding pairs holding NaN: tests/test_masking.py, for every DPO_LOSSES key


def test_gradients_match_analytic_forms():
    x = draw(4, scale=1.0, shift=-2.0)
    c, r, rc, rr = map(jnp.asarray, x)
    cl = (x[0] - x[2]).astype(F64)  # bit-identical float32 log-ratios (module docstring)
    rl = (x[1] - x[3]).astype(F64)
    beta, b = 0.7, len(cl)
    z = beta * (cl - rl)
    s = np_sig(z) * np_sig(-z)  # σ'(z)
    eps = 0.05
    expected = {  # d loss / d chosen_logps, d loss / d rejected_logps
        # d/dz KL = σ(z)σ(-z)·(z - log((1-ε)/ε)): the minimum sits at z = log((1-ε)/ε)
        "exo_pair": (beta / b * s * (z - np.log((1 - eps) / eps)),) * 1,
        "nca_pair": (beta / b * (-np_sig(-beta * cl) + 0.5 * np_sig(beta * cl)), beta / b * 0.5 * np_sig(beta * rl)),
        "apo_zero": (-beta / b * np_sig(beta * cl) * np_sig(-beta * cl), beta / b * np_sig(beta * rl) * np_sig(-beta * rl)),
        "sppo_hard": (2 / b * (cl - 0.5 / beta), 2 / b * (rl + 0.5 / beta)),
    }
    expected["exo_pair"] = (expected["exo_pair"][0], -expected["exo_pair"][0])
    for loss_type, (gc, gr) in expected.items():
        fn = lambda c, r: dpo_loss(c, r, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)[0]  # noqa: B023
        got_c, got_r = jax.jit(jax.grad(fn, argnums=(0, 1)))(c, r)
        # the same float32 log-ratios; a few roundings of each gradient term: 32 ulps of max|g|
        scale = max(np.max(np.abs(gc)), np.max(np.abs(gr)))
        np.testing.assert_allclose(got_c, gc, rtol=0, atol=ulps(32, scale), err_msg=loss_type)
        np.testing.assert_allclose(got_r, gr, rtol=0, atol=ulps(32, scale), err_msg=loss_type)


def central_difference(f, xs, h=1e-5):
    """d f / d xs[k][i] of a float64 function of a list of [B] arrays (error ~h²·|f'''| ~ 1e-10)."""
    out = []
    for k in range(len(xs)):
        g = np.zeros_like(xs[k], F64)
        for i in range(len(xs[k])):
            up = [v.astype(F64).copy() for v in xs]
            dn = [v.astype(F64).copy() for v in xs]
            up[k][i] += h
            dn[k][i] -= h
            g[i] = (f(*up) - f(*dn)) / (2 * h)
        out.append(g)
    return out


@pytest.mark.parametrize("loss_type", ["aot", "discopop"])
def test_gradients_match_finite_differences(loss_type):
    # inputs of size ~2 keep the float32 log-ratios within ~1 ulp of 6 of the float64 ones; the
    # gradient (β/B)·f'(z) then moves by (β/B)·|f''|·β·δ, |f''| <= 1/τ: at β = 0.1 that is
    # ~(0.1/B)·20·0.1·5e-7 ~ 1e-7/B against |g| ~ 0.05/B, 17 ulps of max|g|; tolerance 64
    x = draw(5, scale=1.0, shift=-2.0)
    ref = lambda *a: np_trl_dpo_f64(*a, beta=0.1, loss_type=loss_type)  # noqa: E731
    want = central_difference(ref, x)
    got = jax.jit(jax.grad(lambda *a: dpo_loss(*a, beta=0.1, loss_type=loss_type)[0], argnums=(0, 1, 2, 3)))(*map(jnp.asarray, x))
    scale = max(np.max(np.abs(w)) for w in want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=ulps(64, scale))


def np_trl_dpo_f64(c, r, rc, rr, *, beta, loss_type):
    """`np_trl_dpo`'s mean loss with every operation in float64 (for finite differences)."""
    cl, rl = c - rc, r - rr
    d = np.sort(c - r) - np.sort(rc - rr) if loss_type == "aot" else cl - rl
    z = beta * d
    if loss_type == "aot":
        return float(np.mean(-np_logsig(z)))
    m = np_sig(z / 0.05)
    return float(np.mean(-np_logsig(z) * (1 - m) + np.exp(-z) * m))


def test_discopop_has_no_overflow_nan():
    # z = β h = -100: TRL's exp(100)·σ(-2000) = inf·0 = NaN in float32; the same number, ~0·100 + 0
    c, r = jnp.array([-1000.0, -1000.0]), jnp.array([0.0, 0.0])  # [2] like the other hand tests
    loss, _ = dpo_loss(c, r, r, r, beta=0.1, loss_type="discopop")
    g = jax.jit(jax.grad(lambda c: dpo_loss(c, r, r, r, beta=0.1, loss_type="discopop")[0]))(c)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(g))
    np.testing.assert_allclose(loss, 100.0, rtol=ulps(8))  # -log σ(-100)·σ(2000) = 100


# --- bco_pair's running reward baseline ---------------------------------------------------


def np_running_moments_mean(batch_means):
    """TRL 0.19.0 RunningMoments.update (utils.py 728-754) fed one scalar per step: the means."""
    mean, var, count = 0.0, 1.0, 1e-24
    out = []
    for x in batch_means:
        delta = x - mean
        tot = count + 1
        var = (var * count + delta**2 * count / tot) / tot
        mean += delta / tot
        count = tot
        out.append(mean)
    return out


def test_bco_running_baseline_matches_trl_0_19():
    state = init_reward_baseline()
    beta, where = 0.1, np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)
    means, deltas, losses = [], [], []
    for seed in range(3):
        x = draw(10 + seed)
        cl, rl = x[0] - x[2], x[1] - x[3]  # float32, as jaxalign and TRL
        means.append(float(np.mean(beta * np.concatenate([cl[where], rl[where]]).astype(F64))))
        bad = [jnp.asarray(np.where(where, v, np.nan)) for v in x]  # padding NaN: ignored
        loss, m, state = bco_pair_loss(*bad, state, beta=beta, where=jnp.asarray(where))
        deltas.append(float(m["reward_baseline"]))
        losses.append((float(loss), x))
    want = np_running_moments_mean(means)
    # running means of means of 12 rewards |βx| <= 4: 16 ulps of 4
    np.testing.assert_allclose(deltas, want, rtol=0, atol=ulps(16, 4.0))
    assert float(state.count) == 3.0
    for (loss, x), delta in zip(losses, want):
        ref, mag = np_trl_dpo(*[v[where] for v in x], beta=beta, loss_type="bco_pair", delta=delta)
        # plus δ's own rounding (16 ulps of 4) through |d loss/d δ| <= 2
        assert_close_to(loss, ref.mean(), mag + 2 * 16 * 4.0)


def test_bco_all_padding_batch_keeps_the_state():
    state = RewardBaseline(jnp.float32(0.3), jnp.float32(5.0))
    x = [jnp.full(8, jnp.nan) for _ in range(4)]
    _, _, new = bco_pair_loss(*x, state, where=jnp.zeros(8, bool))
    assert float(new.mean) == np.float32(0.3) and float(new.count) == 5.0
    # δ reaches the loss only through stop_gradient: the gradient is that of a fixed δ
    y = list(map(jnp.asarray, draw(7)))
    g = jax.jit(jax.grad(lambda c: bco_pair_loss(c, *y[1:], init_reward_baseline())[0]))(y[0])
    delta = bco_pair_loss(*y, init_reward_baseline())[1]["reward_baseline"]
    g_fixed = jax.jit(jax.grad(lambda c: dpo_loss(c, *y[1:], loss_type="bco_pair", reward_baseline=delta)[0]))(y[0])
    # two programs of the same elementwise gradient (fusion may contract a·b + c into an FMA): 4 ulps
    np.testing.assert_allclose(g, g_fixed, rtol=0, atol=ulps(4, np.max(np.abs(g_fixed))))


# --- SimPO ------------------------------------------------------------------------------------


def np_trl_simpo(c, r, *, beta, gamma, eps=0.0):
    """TRL 1.16.0 CPOTrainer.cpo_loss, loss_type="simpo", alpha=0 (cpo_trainer.py 715-722)."""
    logits = (np.asarray(c, F32) - np.asarray(r, F32)).astype(F64)  # float32 in TRL
    z = beta * (logits - gamma / beta)
    terms = [-np_logsig(z) * (1 - eps), -np_logsig(-z) * eps]
    return sum(terms), sum(np.abs(t) for t in terms)


def avg_logps(seed, b=8):
    rng = np.random.RandomState(seed)
    return [(-rng.uniform(0.05, 3.0, b)).astype(F32) for _ in range(2)]


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_matches_trl_and_by_hand(eps):
    c, r = avg_logps(20)
    loss, m = simpo_loss(jnp.asarray(c), jnp.asarray(r), beta=2.5, gamma=1.2, label_smoothing=eps)
    ref, mag = np_trl_simpo(c, r, beta=2.5, gamma=1.2, eps=eps)
    assert_close_to(loss, ref.mean(), mag)
    np.testing.assert_allclose(m["reward_margin"], 2.5 * np.mean(c.astype(F64) - r), rtol=0, atol=ulps(32, 2.5 * 3))
    # equal log-probs: z = -γ, loss = log(1 + e^γ) (ε = 0)
    same = jnp.array([-1.0, -2.0])
    loss, _ = simpo_loss(same, same, beta=2.0, gamma=0.5)
    assert abs(float(loss) - np.log1p(np.exp(0.5))) <= ulps(16, 1.0)


def test_simpo_gradient_and_padding():
    c, r = avg_logps(21)
    where = WHERE
    beta, gamma = 2.0, 0.5
    fn = lambda c, r: simpo_loss(c, r, beta=beta, gamma=gamma, where=jnp.asarray(where))[0]  # noqa: E731
    bad_c, bad_r = (jnp.asarray(np.where(where, v, np.nan)) for v in (c, r))
    gc, gr = jax.jit(jax.grad(fn, argnums=(0, 1)))(bad_c, bad_r)
    # d/dc̄ -log σ(z) = -β σ(-z) / n over the n real pairs
    z = beta * ((c - r).astype(F64) - gamma / beta)
    want = np.where(where, -beta * np_sig(-z) / where.sum(), 0.0)
    np.testing.assert_allclose(gc, want, rtol=0, atol=ulps(32, np.max(np.abs(want))))  # a few roundings of each
    np.testing.assert_allclose(gr, -want, rtol=0, atol=ulps(32, np.max(np.abs(want))))
    sliced, _ = simpo_loss(jnp.asarray(c[where]), jnp.asarray(r[where]), beta=beta, gamma=gamma)
    _, mag = np_trl_simpo(c[where], r[where], beta=beta, gamma=gamma)
    assert_close_to(fn(bad_c, bad_r), sliced, mag, k=8)  # 6 rows summed in another order


# --- ORPO -------------------------------------------------------------------------------------


def np_log1mexp(x):
    t = -0.6931471805599453
    return np.where(x < t, np.log1p(-np.exp(x)), np.log(-np.expm1(x)))


def np_trl_orpo(c_sum, r_sum, c_len, r_len, *, beta, average_dtype=F32):
    """TRL 1.16.0 ORPO (orpo_trainer.py 87-91, 690-702, 848) -> (loss, magnitude, ratio,
    log_odds); the averages (get_batch_logps, average_log_prob=True) in float32 as TRL's (F64 for
    finite differences), the rest float64. The NLL is the token mean over the chosen
    completions (TRL's also counts prompt tokens)."""
    avg = lambda s, n: (np.asarray(s, average_dtype) / np.asarray(n, average_dtype)).astype(F64)  # noqa: E731
    c, r = avg(c_sum, c_len), avg(r_sum, r_len)
    nll = -np.sum(np.asarray(c_sum, F64)) / np.sum(c_len)
    log_odds = (c - r) - (np_log1mexp(c) - np_log1mexp(r))
    ratio = np_logsig(log_odds)
    loss = nll - np.mean(beta * ratio)
    # |nll| (a sum of 8 float32 sums: 8 ulps), and the terms of log_odds carried by β·σ(-log_odds) <= β
    magnitude = abs(nll) + beta * np.mean(np.abs(c) + np.abs(r) + np.abs(np_log1mexp(c)) + np.abs(np_log1mexp(r)) + np.abs(ratio))
    return loss, magnitude, ratio, log_odds


def orpo_inputs(seed, b=8):
    rng = np.random.RandomState(seed)
    lengths = [rng.randint(1, 20, b).astype(F32) for _ in range(2)]
    sums = [(-lengths[k] * rng.uniform(0.02, 3.0, b)).astype(F32) for k in range(2)]
    return sums[0], sums[1], lengths[0], lengths[1]


def test_orpo_matches_trl():
    x = orpo_inputs(30)
    loss, m = orpo_loss(*map(jnp.asarray, x), beta=0.1)
    ref, mag, ratio, log_odds = np_trl_orpo(*x, beta=0.1)
    assert_close_to(loss, ref, mag)
    np.testing.assert_allclose(m["log_odds_ratio"], ratio.mean(), rtol=0, atol=ulps(64, 10 * np.mean(np.abs(ratio)) + 10))
    np.testing.assert_allclose(m["nll_loss"], -x[0].astype(F64).sum() / x[2].sum(), rtol=ulps(16))  # 8 sums and a division


def test_orpo_by_hand():
    # average log-prob log ½ on both sides: odds 1 each, log_odds = 0, log σ(0) = -log 2;
    # NLL = log 2 per token: loss = log 2 + λ log 2
    half = np.log(0.5)
    two = lambda v: jnp.array([v, v])  # noqa: E731 - [2] like the other hand tests
    loss, m = orpo_loss(two(3 * half), two(2 * half), two(3.0), two(2.0), beta=0.25)
    assert abs(float(loss) - 1.25 * np.log(2)) <= ulps(16, 1.0)
    assert abs(float(m["log_odds_chosen"])) <= ulps(8, 1.0)


def test_orpo_gradient_finite_differences_and_padding():
    x = orpo_inputs(31)
    where = WHERE
    ref = lambda cs, rs: float(  # noqa: E731
        np_trl_orpo(cs[where], rs[where], x[2][where], x[3][where], beta=0.2, average_dtype=F64)[0]
    )
    want = central_difference(ref, [x[0], x[1]])
    bad = [jnp.asarray(np.where(where, v, np.nan)) for v in x]
    fn = lambda cs, rs: orpo_loss(cs, rs, bad[2], bad[3], beta=0.2, where=jnp.asarray(where))[0]  # noqa: E731
    got = jax.jit(jax.grad(fn, argnums=(0, 1)))(bad[0], bad[1])
    # averages of <= 19 tokens ~1 (ulps ~1e-7), amplified by |log1mexp''| <= 1/|x|² ~ 2500 at x ~ -0.02,
    # through β/n and 1/len: 64 ulps of max|g|; measured below 4
    scale = max(np.max(np.abs(w)) for w in want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=ulps(64, scale))
        np.testing.assert_array_equal(np.asarray(g)[~where], 0.0)
    sliced, _ = orpo_loss(*[jnp.asarray(v[where]) for v in x], beta=0.2)
    _, mag, _, _ = np_trl_orpo(*[v[where] for v in x], beta=0.2)
    assert_close_to(fn(bad[0], bad[1]), sliced, mag, k=16)  # the same values, another summation order


def test_orpo_certain_chosen_is_finite():
    # an average log-prob of exactly 0 (every token's probability rounds to 1): TRL's log1mexp
    # gives -inf and a NaN gradient; here the clamp to -tiny keeps both finite
    r, n = jnp.array([-4.0, -4.0]), jnp.array([3.0, 3.0])
    g = jax.jit(jax.grad(lambda c: orpo_loss(c, r, n, n)[0]))(jnp.array([0.0, -1.0]))
    assert np.all(np.isfinite(g))
    assert np.isfinite(float(log1mexp(jnp.float32(0.0))))
    xs = np.array([-1e-6, -0.1, -0.69, -0.7, -5.0, -50.0], F32)
    # log1mexp is TRL's function below -tiny: a few ulps of |log(1 - e^x)|
    np.testing.assert_allclose(log1mexp(jnp.asarray(xs)), np_log1mexp(xs.astype(F64)), rtol=ulps(8), atol=F32_EPS * 1e-21)


# --- shared -----------------------------------------------------------------------------------


def test_no_recompile_and_bad_arguments():
    x = list(map(jnp.asarray, draw(8)))
    fn = jax.jit(lambda *a: dpo_loss(*a, beta=0.1, loss_type="aot")[0])
    x1 = [v + 1 for v in x]
    with compilations(fn) as compiled:
        fn(*x)
        fn(*x1)
    assert len(compiled) == 1
    simpo = jax.jit(lambda c, r: simpo_loss(c, r)[0])
    with compilations(simpo) as compiled:
        simpo(x[0], x[1])
        simpo(x[2], x[3])
    assert len(compiled) == 1
    with pytest.raises(ValueError, match="exo_pair needs label_smoothing"):
        dpo_loss(*x, loss_type="exo_pair", label_smoothing=0.0)
    with pytest.raises(ValueError, match="discopop_tau"):
        dpo_loss(*x, loss_type="discopop", discopop_tau=0.0)
    with pytest.raises(ValueError, match="gamma"):
        simpo_loss(x[0], x[1], gamma=-1.0)
    with pytest.raises(ValueError, match="beta"):
        orpo_loss(x[0], x[1], x[2], x[3], beta=0.0)
    with pytest.raises(AssertionError):
        orpo_loss(x[0], x[1], x[2][:3], x[3])
    assert set(NEW_TYPES) | {"sigmoid", "robust", "hinge", "ipo"} == set(DPO_LOSSES)


def test_exo_default_label_smoothing_is_the_papers():
    x = list(map(jnp.asarray, draw(9)))
    np.testing.assert_array_equal(
        dpo_loss(*x, loss_type="exo_pair")[0], dpo_loss(*x, loss_type="exo_pair", label_smoothing=1e-3)[0]
    )
