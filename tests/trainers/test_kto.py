"""KTO's step: the mismatched pairs of `collate_kto`, the loss equal to `kto_loss` of the
separately computed log-probs, steps that separate desirable from undesirable, and
`sft_dpo.py --loss-type kto` end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxalign.data as jd
from jaxalign.logprobs import sequence_logps, token_logps
from jaxalign.losses.kto import kto_loss
from jaxalign.models import forward, get_config, init_params
from jaxalign.optim import OptimConfig, make_optimizer
from jaxalign.trainers import create_train_state, pair_logps
from jaxalign.trainers.kto import kto_batch_loss, make_kto_step
from tests._tolerance import ulps

TOK = jd.byte_tokenizer()
CONFIG = get_config("gpt2-tiny", vocab_size=TOK.vocab_size, max_seq_len=64, n_layers=1)


def pair(prompt, chosen, rejected):
    ex = lambda c: jd.Example(np.array(prompt + c, np.int32), np.array([0] * len(prompt) + [1] * len(c), np.float32))
    return jd.PreferenceExample(ex(chosen), ex(rejected))


@pytest.fixture(scope="module")
def batch():
    pairs = [pair([1, 2], [3, 4, 5], [6]), pair([7], [8, 9], [10, 11]), pair([12, 13, 14], [15], [16, 17])]
    return pairs, jd.collate_kto(pairs, batch_size=4, buckets=(8, 16), pad_id=0)


def test_kl_pairs_borrow_the_previous_chosen_completion(batch):
    _, b = batch
    assert b["kl_tokens"].shape == (4, 8)
    np.testing.assert_array_equal(b["kl_tokens"][:3, :5], [[1, 2, 15, 0, 0], [7, 3, 4, 5, 0], [12, 13, 14, 8, 9]])
    np.testing.assert_array_equal(b["kl_mask"][:3, :5], [[0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 0, 1, 1]])
    assert b["kl_mask"][3].sum() == 0 and b["chosen_mask"][3].sum() == 0  # the filler row


def test_loss_equals_kto_loss_of_the_three_scores(batch):
    _, b = batch
    b = jax.tree.map(jnp.asarray, b)
    params, ref = init_params(CONFIG, jax.random.key(0)), init_params(CONFIG, jax.random.key(1))
    loss, metrics = jax.jit(lambda p, r: kto_batch_loss(p, CONFIG, b, None, r, beta=0.5))(params, ref)

    def kl_logps(p):
        t, m = b["kl_tokens"], b["kl_mask"]
        return sequence_logps(token_logps(forward(p, CONFIG, t[:, :-1]), t[:, 1:]), m[:, 1:])

    real = jnp.array([True, True, True, False])
    want, want_metrics = jax.jit(lambda p, r: kto_loss(
        *pair_logps(p, CONFIG, b), kl_logps(p), *pair_logps(r, CONFIG, b), kl_logps(r), beta=0.5,
        chosen_where=real, rejected_where=real, kl_where=real,
    ))(params, ref)
    # one [3B] forward against [2B] + [B]: the same sums, possibly blocked differently; log-probs
    # of ≤ 4 tokens of a 1-layer model over 257 ids are ~5 nats each: 64 ulps of 20 nats
    np.testing.assert_allclose(float(loss), float(want), atol=ulps(64, 20.0))
    np.testing.assert_allclose(float(metrics["kl"]), float(want_metrics["kl"]), atol=ulps(64, 20.0))
    assert float(metrics["num_chosen"]) == 3.0


def test_steps_raise_desirable_over_undesirable(batch):
    _, b = batch
    params = init_params(CONFIG, jax.random.key(0))
    ref = jax.tree.map(jnp.copy, params)
    tx, schedule = make_optimizer(OptimConfig(learning_rate=3e-3, total_steps=10))
    step = make_kto_step(CONFIG, tx, schedule, beta=0.5)
    state = create_train_state(params, tx, 0)
    margins = []
    for _ in range(10):
        state, m = step(state, b, ref)
        margins.append(float(m["reward_margin"]))
    assert margins[0] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 0
    assert margins[-1] > 1.0  # measured: 0 -> 3.08 (β·nats) in 10 Adam steps on one batch


@pytest.mark.slow
def test_sft_dpo_runs_kto(tmp_path):
    from experiments.sft_dpo import main

    summary = main(["--output-dir", str(tmp_path), "--loss-type", "kto", "--model", "gpt2-tiny",
                    "--synthetic-examples", "48", "--max-length", "64", "--batch-size", "4", "--sft-steps", "3",
                    "--dpo-steps", "4", "--eval-every", "0", "--no-progress"])
    assert np.isfinite(summary["dpo_val_reward_margin_after"])
