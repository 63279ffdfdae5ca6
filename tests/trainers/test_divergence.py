"""Divergence is caught: non-finite updates are skipped (optax.apply_if_finite), the loop stops
after N in a row naming stage, step and metric, and no non-finite state is ever checkpointed."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.checkpoint import (
    NonFiniteError,
    first_nonfinite,
    make_checkpoint_manager,
    restore_checkpoint,
    save_checkpoint,
)
from jaxalign.metrics import MetricsWriter, read_metrics, write_json
from jaxalign.optim import OptimConfig, make_optimizer, nonfinite_metrics
from jaxalign.trainers.loop import train_loop
from jaxalign.trainers.state import create_train_state, make_train_step


def quadratic_loss(params, batch, rng):
    del rng
    loss = jnp.sum(jnp.square(params["w"] - batch["x"]))
    return loss, {"aux": jnp.sum(batch["x"])}


def setup(lr=0.1, accum=1):
    tx, schedule = make_optimizer(OptimConfig(learning_rate=lr, total_steps=100, weight_decay=0.0, grad_accum_steps=accum))
    state = create_train_state({"w": jnp.full(3, 5.0)}, tx, 0)
    return make_train_step(quadratic_loss, tx, schedule, donate=False), state


def batch(bad: bool):
    return {"x": jnp.array([1.0, jnp.nan if bad else 2.0, 3.0])}


def test_nonfinite_update_is_skipped_and_counted():
    step, state = setup()
    s1, m1 = step(state, batch(False))
    assert float(m1["nonfinite"]) == 0.0 and int(m1["skipped_steps"]) == 0
    s2, m2 = step(s1, batch(True))
    # Skipped: parameters and the inner optimizer state are exactly the previous ones.
    np.testing.assert_array_equal(s2.params["w"], s1.params["w"])
    for a, b in zip(jax.tree.leaves(s2.opt_state.inner_state), jax.tree.leaves(s1.opt_state.inner_state)):
        np.testing.assert_array_equal(a, b)
    assert int(s2.step) == 2  # the micro-step counter still advances (the data moves on)
    assert float(m2["nonfinite"]) == 1.0 and int(m2["consecutive_skipped"]) == 1
    s3, m3 = step(s2, batch(True))
    assert int(m3["consecutive_skipped"]) == 2 and int(m3["skipped_steps"]) == 2
    s4, m4 = step(s3, batch(False))
    assert int(m4["consecutive_skipped"]) == 0 and int(m4["skipped_steps"]) == 2
    assert first_nonfinite(s4) is None


def test_nonfinite_micro_batch_never_reaches_the_accumulator():
    step, state = setup(accum=2)
    clean, _ = step(step(state, batch(False))[0], batch(False))
    poisoned, m = step(state, batch(False))
    poisoned, m = step(poisoned, batch(True))  # skipped: the accumulator keeps one micro-batch
    poisoned, m = step(poisoned, batch(False))  # completes the update with two clean ones
    np.testing.assert_array_equal(poisoned.params["w"], clean.params["w"])
    assert first_nonfinite(poisoned) is None


def test_logged_learning_rate_is_the_one_each_update_uses():
    """Accumulation is given once (to the optimizer): the step reads the update count from the
    optimizer state, so a skipped micro-batch does not advance the logged schedule either."""
    step, state = setup(accum=2)
    tx, schedule = make_optimizer(OptimConfig(learning_rate=0.1, total_steps=100, weight_decay=0.0, grad_accum_steps=2))
    logged = []
    for bad in (False, True, False, False, False):  # micro-steps 0..4; 1 is skipped
        state, m = step(state, batch(bad))
        logged.append(float(m["learning_rate"]))
    # updates complete at micro-steps 2 and 4; micro-steps // 2 would say s(1) at 2 and s(2) at 4
    expected = [float(schedule(n)) for n in (0, 0, 0, 1, 1)]
    assert logged == expected and expected[0] != expected[3]


def test_without_the_guard_there_are_no_counters():
    tx, _ = make_optimizer(OptimConfig(total_steps=10, skip_nonfinite=False))
    assert nonfinite_metrics(tx.init({"w": jnp.zeros(2)})) == {}


def test_loop_stops_after_consecutive_skips_and_keeps_the_finite_checkpoint(tmp_path):
    step, state = setup()
    manager = make_checkpoint_manager(tmp_path / "ckpt", save_every=2, keep=1)
    writer = MetricsWriter(tmp_path, tensorboard=False)
    with pytest.raises(NonFiniteError, match=r"sft: step 7: 3 consecutive updates skipped .*loss=nan"):
        train_loop(
            step, state, lambda i: batch(i >= 4), num_steps=20, stage="sft", writer=writer,
            log_every=5, checkpoints=manager, progress=False, max_skipped_steps=3,
        )
    manager.wait_until_finished()
    writer.close()
    # Steps 5, 6, 7 were skipped; checkpoints at 2, 4, 6 hold finite parameters (keep=1: step 6).
    assert manager.all_steps() == [6]
    restored = restore_checkpoint(manager, jax.eval_shape(lambda: state))
    assert first_nonfinite(restored) is None
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [5, 7]  # the log step and the step that stopped the run
    assert records[-1]["loss"] is None and records[-1]["consecutive_skipped"] == 3


def test_save_checkpoint_refuses_a_nonfinite_state(tmp_path):
    manager = make_checkpoint_manager(tmp_path, save_every=1)
    good = {"a": jnp.ones(2), "b": {"c": jnp.arange(3)}}
    assert save_checkpoint(manager, 1, good, force=True)
    bad = {"a": jnp.ones(2), "b": {"c": jnp.array([0.0, jnp.inf])}}
    with pytest.raises(NonFiniteError, match=r"step 2 .*\['b'\]\['c'\] is not finite"):
        save_checkpoint(manager, 2, bad, force=True)
    manager.wait_until_finished()
    assert manager.all_steps() == [1]


def test_metrics_are_strict_json_and_a_torn_line_is_dropped(tmp_path, caplog):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.write(1, {"loss": np.float32(np.nan), "g": np.array([1.0, np.inf])}, stage="x")
    writer.write(2, {"loss": 1.5}, stage="x")
    writer.close()
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines()
    assert json.loads(lines[0], parse_constant=lambda c: pytest.fail(f"bare {c}")) == {
        "step": 1, "stage": "x", "loss": None, "g": [1.0, None]
    }
    path.write_text(path.read_text() + '{"step": 3, "stage": "x", "lo')  # killed mid-write
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert f"{path}: line 3 is torn" in caplog.text
    reopened = MetricsWriter(tmp_path, tensorboard=False)  # appending after a torn line repairs it first
    reopened.write(3, {"loss": 2.0}, stage="x")
    reopened.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    path.write_text('{"step": 1}\n{broken\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not JSON"):
        read_metrics(path)
    out = write_json(tmp_path / "summary.json", {"a": float("nan"), "b": [np.float32(2.0)]})
    assert json.loads(out.read_text()) == {"a": None, "b": [2.0]}


def test_loop_stops_an_update_larger_than_the_weights(tmp_path):
    """lr = 1e6 diverges with every number finite: the first update dwarfs the weights."""
    step, state = setup(lr=1e6)
    _, metrics = step(state, batch(False))
    # Adam's first update is lr · sign(g) per coordinate: ‖Δ‖ / ‖w‖ = 1e6·√3 / (5·√3)
    # up to Adam's eps/|g| (1e-9) and the rounding of two 3-term norms and a quotient: 1e-4 is
    # ~800 ulps (measured 6.7e-6 relative under SSE4.2)
    np.testing.assert_allclose(metrics["update_ratio"], 1e6 / 5, rtol=1e-4)
    step, state = setup(lr=1e6)
    manager = make_checkpoint_manager(tmp_path / "ckpt", save_every=1)
    writer = MetricsWriter(tmp_path, tensorboard=False)
    with pytest.raises(NonFiniteError, match=r"sft: step 1: update_ratio=2e\+05 > max_update_ratio=1"):
        train_loop(step, state, lambda i: batch(False), num_steps=5, stage="sft", writer=writer,
                   log_every=5, checkpoints=manager, progress=False)
    manager.wait_until_finished()
    assert manager.all_steps() == []  # the diverged state was never saved
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["update_ratio"] == pytest.approx(2e5, rel=1e-4)  # as above
    # healthy steps sit far below the bound, and None switches the check off
    step, state = setup(lr=0.1)
    _, m = step(state, batch(False))
    assert 0 < float(m["update_ratio"]) < 0.05
