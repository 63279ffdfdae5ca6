"""Every preference loss type through the trainer: the batch losses equal the pure losses on the
same log-probs, steps run (with and without a reference), and the CLI offers every type."""

import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxalign.data as jd
from jaxalign.losses.dpo import LENGTH_NORMALISED_LOSSES, dpo_loss
from jaxalign.losses.preference import orpo_loss, simpo_loss
from jaxalign.models import get_config, init_params
from jaxalign.trainers import create_train_state, make_dpo_step, pair_logps
from jaxalign.trainers.dpo import (
    PREFERENCE_LOSS_TYPES,
    REFERENCE_FREE_LOSSES,
    preference_loss_fn,
    uses_average_logps,
)
from tests._tolerance import ulps

TOK = jd.byte_tokenizer()
CONFIG = get_config("gpt2-tiny", vocab_size=TOK.vocab_size, max_seq_len=32, n_layers=1)
BETA = 0.5


@pytest.fixture(scope="module")
def setup():
    params = init_params(CONFIG, jax.random.key(0))
    ref = init_params(CONFIG, jax.random.key(1))  # another model: the log-ratios are not all 0
    pairs = jd.tokenize_preference(jd.sorting_task(3, seed=0), TOK, max_length=32)
    batch = jd.collate_preference(pairs, batch_size=4, buckets=(32,), pad_id=TOK.pad_id)  # 1 filler row
    return params, ref, batch


IN_STEP_REFERENCE = ("aot", "ipo", "sigmoid_norm")  # the others read precomputed reference log-probs


def pure_loss(loss_type, logps, lengths, where):
    """`loss_type`'s pure loss on log-probs computed independently of the trainer's wiring."""
    avg = loss_type in ("ipo", "sigmoid_norm", "simpo")
    (c, r), (rc, rr) = logps[avg]
    if loss_type == "simpo":
        return simpo_loss(c, r, beta=BETA, where=where), c
    if loss_type == "orpo":
        return orpo_loss(c, r, *lengths, beta=BETA, where=where), c / jnp.maximum(lengths[0], 1)
    return dpo_loss(c, r, rc, rr, beta=BETA, loss_type=loss_type, where=where), c


@jax.jit
def batch_losses(params, ref, batch):
    """Every loss type's trainer (loss, metrics), its pure (loss, metrics) and the policy's
    log-probs as that loss sees them, in one compiled program (one compilation, not sixteen)."""
    where = jnp.sum(batch["chosen_mask"], -1) > 0
    lengths = tuple(jnp.sum(batch[k][:, 1:], -1) for k in ("chosen_mask", "rejected_mask"))
    logps = {avg: (pair_logps(params, CONFIG, batch, average=avg), pair_logps(ref, CONFIG, batch, average=avg)) for avg in (False, True)}
    out = {}
    for t in PREFERENCE_LOSS_TYPES:
        fn = preference_loss_fn(CONFIG, loss_type=t, beta=BETA)
        if t in REFERENCE_FREE_LOSSES:
            got = fn(params, batch, None)
        elif t in IN_STEP_REFERENCE:
            got = fn(params, batch, None, ref)
        else:  # as `reference_logps` precomputes them (summed for these types)
            rc, rr = logps[False][1]
            got = fn(params, {**batch, "ref_chosen_logps": rc, "ref_rejected_logps": rr}, None)
        out[t] = got, pure_loss(t, logps, lengths, where)
    return out


def test_every_loss_type_equals_the_pure_loss_on_the_same_logps(setup):
    params, ref, batch = setup
    out = jax.device_get(batch_losses(params, ref, batch))
    where = np.asarray(batch["chosen_mask"]).sum(-1) > 0
    assert where.tolist() == [True, True, True, False]
    for t in PREFERENCE_LOSS_TYPES:
        (loss, metrics), ((want, want_metrics), c) = out[t]
        assert np.isfinite(loss), t
        # the same formula on the same float32 log-probs, which XLA may fuse differently (FMA
        # contraction) where it does not merge them: a few roundings of terms no larger than
        # |loss| + 1; 32 ulps
        np.testing.assert_allclose(loss, want, rtol=0, atol=ulps(32, abs(float(want)) + 1), err_msg=t)
        for key, value in want_metrics.items():
            np.testing.assert_allclose(metrics[key], value, rtol=0, atol=ulps(32, abs(float(value)) + 1), err_msg=f"{t} {key}")
        # log-prob metrics: over the real pairs, averaged where the loss averages (a mean of 3)
        np.testing.assert_allclose(metrics["chosen_logps"], np.mean(c[where]), rtol=ulps(8), err_msg=t)


def test_length_normalised_types_average():
    assert LENGTH_NORMALISED_LOSSES == {"ipo", "sigmoid_norm"}
    assert [t for t in PREFERENCE_LOSS_TYPES if uses_average_logps(t)] == ["ipo", "sigmoid_norm", "orpo", "simpo"]


def test_reference_free_step_runs_and_descends(setup):
    # the step with a reference (ref_params, precomputed) is tests/trainers/test_steps.py's; every
    # DPO type shares it, the loss function aside (checked above)
    params, _, batch = setup
    tx = optax.sgd(0.1)  # the step builder is under test, not the optimizer: the cheapest to compile
    step = make_dpo_step(CONFIG, tx, optax.constant_schedule(0.1), beta=BETA, loss_type="orpo")
    state = create_train_state(jax.tree.map(jnp.copy, params), tx, 0)
    losses = []
    for _ in range(3):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert np.all(np.isfinite(losses)) and float(m["grad_norm"]) > 0
    assert losses[-1] < losses[0]  # three steps on one batch descend its loss


def test_misconfigured_steps_raise(setup):
    params, ref, batch = setup
    with pytest.raises(ValueError, match="reference-free"):
        preference_loss_fn(CONFIG, loss_type="simpo")(params, batch, None, ref)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        preference_loss_fn(CONFIG, loss_type="kto_pair")
    with pytest.raises(ValueError, match="needs reference log-probs"):
        preference_loss_fn(CONFIG, loss_type="nca_pair")(params, batch, None)


def test_cli_lists_and_accepts_every_loss_type():
    tyro = pytest.importorskip("tyro")
    from experiments import sft_dpo

    assert set(typing.get_args(sft_dpo.LossType)) == {*PREFERENCE_LOSS_TYPES, "kto"}
    for t in PREFERENCE_LOSS_TYPES:
        assert tyro.cli(sft_dpo.Config, args=["--loss-type", t]).loss_type == t
