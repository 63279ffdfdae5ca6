import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import dpo_loss
from jaxalign.metrics import compilations
from tests._tolerance import ulps


def np_logsig(x):
    return -np.logaddexp(0.0, -x)


def np_dpo(c, r, rc, rr, beta, loss_type, eps):
    """Independent NumPy transcription of TRL's DPOTrainer.dpo_loss (float64)."""
    h = (c - r) - (rc - rr)
    if loss_type == "sigmoid":
        losses = -np_logsig(beta * h) * (1 - eps) - np_logsig(-beta * h) * eps
    elif loss_type == "robust":
        losses = (-np_logsig(beta * h) * (1 - eps) + np_logsig(-beta * h) * eps) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = np.maximum(0.0, 1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    return losses.mean(), beta * (c - rc), beta * (r - rr)


@pytest.fixture
def logps():
    rng = np.random.RandomState(2)
    return [rng.randn(8) * 5 - 20 for _ in range(4)]


def test_hand_computed_sigmoid():
    # Policy == reference: h = 0 and the loss is log 2 for every beta.
    z = jnp.array([-3.0, -7.0])
    loss, m = dpo_loss(z, z - 1, z, z - 1, beta=0.5)
    np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)  # a few float32 roundings (exp/log1p within ~1 ulp each): 8 ulps
    assert float(m["reward_accuracy"]) == 0.0 and float(m["reward_margin"]) == 0.0
    # h = 2, beta = 0.5: -log σ(1) = log(1 + e^-1)
    loss, m = dpo_loss(jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]), jnp.array([-2.0]), beta=0.5)
    np.testing.assert_allclose(loss, np.log1p(np.exp(-1.0)), rtol=1e-6)  # a few float32 roundings (exp/log1p within ~1 ulp each): 8 ulps
    np.testing.assert_allclose(m["chosen_rewards"], 0.5)
    np.testing.assert_allclose(m["rejected_rewards"], -0.5)
    np.testing.assert_allclose(m["reward_margin"], 1.0)
    assert float(m["reward_accuracy"]) == 1.0


def test_hand_computed_ipo_and_hinge():
    args = (jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]), jnp.array([-2.0]))  # h = 2
    np.testing.assert_allclose(dpo_loss(*args, beta=0.25, loss_type="ipo")[0], (2 - 2) ** 2)
    # 1/(2·0.1) and 1 − 0.1·2 round once or twice: 8 ulps
    np.testing.assert_allclose(dpo_loss(*args, beta=0.1, loss_type="ipo")[0], (2 - 5) ** 2, rtol=1e-6)
    np.testing.assert_allclose(dpo_loss(*args, beta=0.1, loss_type="hinge")[0], 0.8, rtol=1e-6)
    np.testing.assert_allclose(dpo_loss(*args, beta=1.0, loss_type="hinge")[0], 0.0)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_matches_numpy_reference(logps, loss_type, eps):
    loss, m = dpo_loss(*map(jnp.asarray, logps), beta=0.1, loss_type=loss_type, label_smoothing=eps)
    ref_loss, cr, rr = np_dpo(*logps, 0.1, loss_type, eps)
    # h = (c − r) − (rc − rr) cancels logps ~ 20 (2.4e-6 per ulp): 1e-5 relative, 1e-6 absolute on
    # the beta-scaled rewards; measured <= 1.7 ulps
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(m["chosen_rewards"], cr.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["reward_accuracy"], (cr > rr).mean())
    np.testing.assert_allclose(m["reward_margin"], (cr - rr).mean(), rtol=1e-5, atol=1e-6)


def test_where_equals_sliced(logps):
    x = list(map(jnp.asarray, logps))
    where = jnp.array([1, 1, 0, 1, 0, 0, 1, 1], bool)
    masked, mm = dpo_loss(*x, where=where)
    sliced, ms = dpo_loss(*[v[where] for v in x])
    # a mean over <= 8 rows regrouped by the slicing: up to 8 roundings, 32 ulps; measured equal
    np.testing.assert_allclose(masked, sliced, rtol=ulps(32))
    for k in ms:  # metrics cancel logps ~ 20 (see above): 84 ulps and 1e-7; measured <= 0.8
        np.testing.assert_allclose(mm[k], ms[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo"])
def test_gradients_finite_and_push_chosen_up(logps, loss_type):
    c, r, rc, rr = map(jnp.asarray, logps)
    g_c, g_r = jax.grad(lambda c, r: dpo_loss(c, r, rc, rr, loss_type=loss_type)[0], argnums=(0, 1))(c, r)
    assert np.all(np.isfinite(g_c)) and np.all(np.isfinite(g_r))
    np.testing.assert_allclose(g_c, -g_r, atol=1e-7)  # ±the same expression: 86 ulps of |g| ~ 0.01; measured equal
    if loss_type == "ipo":
        # IPO regresses h onto 1/(2β): it pushes chosen up only while h is below that target.
        h = (c - r) - (rc - rr)
        np.testing.assert_array_equal(np.sign(g_c), np.sign(h - 1 / (2 * 0.1)))
    else:
        # descending the loss raises chosen log-probs and lowers rejected ones (where active)
        assert np.all(g_c <= 0) and np.all(g_r >= 0)


def test_sigmoid_gradient_matches_closed_form(logps):
    # d/dc [-log σ(β h)] = -β σ(-β h) / B  (DPO paper, Eq. 7 gradient)
    c, r, rc, rr = map(jnp.asarray, logps)
    beta = 0.3
    g = jax.grad(lambda c: dpo_loss(c, r, rc, rr, beta=beta)[0])(c)
    h = (c - r) - (rc - rr)
    np.testing.assert_allclose(g, -beta * jax.nn.sigmoid(-beta * h) / 8, rtol=1e-5)  # h cancels logps ~ 20: 84 ulps; measured 0.9


def test_no_recompile(logps):
    x = list(map(jnp.asarray, logps))
    fn = jax.jit(lambda *a: dpo_loss(*a, beta=0.1)[0])
    x1 = [v + 1 for v in x]
    with compilations(fn) as compiled:
        fn(*x)
        fn(*x1)
    assert len(compiled) == 1


def test_bad_arguments_raise(logps):
    x = list(map(jnp.asarray, logps))
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*x, loss_type="nope")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*x, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*x, label_smoothing=0.5)
    with pytest.raises(AssertionError):
        dpo_loss(x[0], x[1][:3], x[2], x[3])
