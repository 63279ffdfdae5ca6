import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses.kto import kto_loss
from jaxalign.metrics import compilations
from tests._tolerance import ulps


def np_trl_kto(chosen_logps, rejected_logps, KL_logps, ref_chosen_logps, ref_rejected_logps, ref_KL_logps,  # noqa: N803
               beta, desirable_weight, undesirable_weight):
    """TRL 1.16.0 trl/trainer/kto_trainer.py `KTOTrainer._compute_loss`, loss_type="kto" (lines
    1442-1481, `losses.nanmean()` at 1547), one rank, torch -> NumPy float64."""
    sigmoid = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    kl = max((KL_logps - ref_KL_logps).mean(), 0.0)  # .detach() ... .clamp(min=0)
    chosen_losses = 1 - sigmoid(beta * ((chosen_logps - ref_chosen_logps) - kl))
    rejected_losses = 1 - sigmoid(beta * (kl - (rejected_logps - ref_rejected_logps)))
    losses = np.concatenate((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    return losses.mean(), kl


def draw(seed, bc=5, br=3, bk=8, shift=0.5):
    rng = np.random.RandomState(seed)
    ref = [rng.uniform(-40, -10, n) for n in (bc, br, bk)]
    return [r + shift + rng.randn(len(r)) * 3 for r in ref], ref


@pytest.mark.parametrize("shift", [2.0, -2.0])  # z0 > 0, and a negative KL clamped to 0
def test_kto_matches_trl_transcription(shift):
    (pc, pr, pk), (rc, rr, rk) = draw(0, shift=shift)
    kw = dict(beta=0.2, desirable_weight=1.3, undesirable_weight=0.7)
    loss, m = jax.jit(lambda *a: kto_loss(*a, **kw))(*map(jnp.asarray, (pc, pr, pk, rc, rr, rk)))  # one compile
    want, kl = np_trl_kto(pc, pr, pk, rc, rr, rk, **kw)
    assert (kl > 0) == (shift > 0)
    # float32 inputs ~ 40 (their differences lose ulps of 40, times β = 0.2 into the sigmoid,
    # slope <= ¼), an 8-term KL mean, an 8-term loss mean: 64 ulps of 40·β; measured < 1
    np.testing.assert_allclose(loss, want, rtol=0, atol=ulps(64, 40 * 0.2))
    np.testing.assert_allclose(m["kl"], kl, rtol=0, atol=ulps(16, 40))  # differences of values ~ 40
    np.testing.assert_allclose(m["chosen_rewards"], 0.2 * np.mean(pc - rc), rtol=0, atol=ulps(16, 40 * 0.2))
    assert float(m["num_chosen"]) == 5 and float(m["num_rejected"]) == 3


def test_kto_hand_computed_gradient_and_detached_kl():
    # z0 = mean(1, 3) = 2; chosen log-ratio 2 -> 1 − σ(0) = ½; rejected log-ratio 2 -> ½; β = 1
    pc, rc = jnp.array([-3.0]), jnp.array([-5.0])
    pr, rr = jnp.array([-1.0]), jnp.array([-3.0])
    pk, rk = jnp.array([-1.0, -1.0]), jnp.array([-2.0, -4.0])
    (loss, m), g = jax.jit(jax.value_and_grad(  # one compile
        lambda *a: kto_loss(*a, beta=1.0, desirable_weight=2.0), argnums=(0, 1, 2), has_aux=True
    ))(pc, pr, pk, rc, rr, rk)
    np.testing.assert_allclose(loss, (2.0 * 0.5 + 0.5) / 2, rtol=1e-6)  # σ(0) is exact; one mean
    np.testing.assert_allclose(m["kl"], 2.0, rtol=1e-6)
    # d/dc λ_D(1 − σ(c − z0)) / 2 = −λ_D σ'(0) / 2 = −¼; rejected: +σ'(0)/2 = ⅛; the KL term: none
    np.testing.assert_allclose(g[0], [-0.25], rtol=1e-6)  # σ'(0) = ¼ exactly
    np.testing.assert_allclose(g[1], [0.125], rtol=1e-6)
    np.testing.assert_array_equal(g[2], [0.0, 0.0])
    with pytest.raises(ValueError, match="beta"):
        kto_loss(pc, pr, pk, rc, rr, rk, beta=0.0)
    with pytest.raises(ValueError, match="weights"):
        kto_loss(pc, pr, pk, rc, rr, rk, undesirable_weight=-1.0)


def test_kto_masked_equals_sliced_and_no_recompile():
    (pc, pr, pk), (rc, rr, rk) = draw(1, bc=6, br=6, bk=6)
    label = np.array([1, 0, 1, 1, 0, 0], bool)
    keep = np.array([1, 1, 1, 1, 1, 0], bool)  # the last row is batch filler
    nan = lambda x, where: jnp.asarray(np.where(where, x, np.nan))  # noqa: E731
    fn = jax.jit(lambda *a, **w: kto_loss(*a, beta=0.1, **w))
    # one fixed-shape batch, the labels as masks (NaN wherever a mask is off), vs the sliced arrays
    lp_c, lp_r = np.where(label, pc, pr), np.where(label, rc, rr)
    c, r = label & keep, ~label & keep
    masked_args = (nan(lp_c, keep), nan(lp_c, keep), nan(pk, keep), nan(lp_r, keep), nan(lp_r, keep), nan(rk, keep))
    wheres = dict(chosen_where=jnp.asarray(c), rejected_where=jnp.asarray(r), kl_where=jnp.asarray(keep))
    sliced_args = [jnp.asarray(x) for x in (lp_c[c], lp_c[r], pk[keep], lp_r[c], lp_r[r], rk[keep])]
    other_masks = dict(chosen_where=jnp.asarray(label), rejected_where=jnp.asarray(~label), kl_where=jnp.asarray(keep))
    zeros = (jnp.zeros(6),) * 6
    with compilations(fn) as compiled:
        masked, mm = fn(*masked_args, **wheres)
        sliced, sm = fn(*sliced_args)
        fn(*zeros, **other_masks)  # the masked shape with other masks and values: no new program
    assert len(compiled) == 2  # the masked shape once, the sliced once
    # the same terms summed in another grouping: 16 ulps of the largest (<= 1 per term); measured equal
    np.testing.assert_allclose(masked, sliced, rtol=0, atol=ulps(16, 1.0))
    np.testing.assert_allclose(mm["kl"], sm["kl"], rtol=0, atol=ulps(16, 40))  # a 5-term mean of values ~ 40
    assert np.isfinite(float(masked))
