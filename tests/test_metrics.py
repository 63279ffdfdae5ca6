"""Run logging: the JSONL writer's records and resume truncation, `setup_logging`, and the
`compilations` counter."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint  # noqa: F401  (installs a WARNING root handler through absl, see below)

from jaxalign.metrics import MetricsWriter, compilations, read_metrics, setup_logging


def test_writer_records_truncate_and_reopen(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    for step in range(1, 5):
        writer.write(step, {"loss": np.float32(1.0 / step), "acc": np.asarray([0.5])})
    writer.write(2, {"loss": 0.25}, stage="eval")
    writer.truncate_after(2, stage="train")  # a resumed run re-logs train steps 3 and 4
    writer.write(3, {"loss": 0.3})
    writer.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["stage"], r["step"]) for r in records] == [("train", 1), ("train", 2), ("eval", 2), ("train", 3)]
    assert records[1]["loss"] == np.float32(0.5) and records[0]["acc"] == 0.5
    assert isinstance(records[0]["loss"], float)


def test_setup_logging_prints_info_after_orbax_import(capsys):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logging.basicConfig(level=logging.INFO)  # what the experiments did: a no-op here
        if root.level != logging.INFO:  # orbax's import left a handler, so nothing changed
            logging.getLogger("experiment").info("lost")
            assert "lost" not in capsys.readouterr().err
        setup_logging()
        logging.getLogger("experiment").info("step 10: loss 1.25")
        logging.getLogger("absl").info("Finished saving checkpoint")  # orbax's per-save chatter
        err = capsys.readouterr().err
        assert "experiment: step 10: loss 1.25" in err and "checkpoint" not in err
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("absl").setLevel(logging.NOTSET)


def _doubler():
    def double(x):  # a new function object on every call, the same program
        return x * 2.0

    return double


def test_compilations_counts_each_specialisation_once():
    a, b, c = jnp.ones(3), jnp.zeros(3), jnp.ones(5)
    first = jax.jit(_doubler())
    with compilations(first) as compiled, compilations() as everything:
        first(a)
        first(b)  # same shape: cached
        first(c)  # a new shape: a second specialisation
        a + 1.0  # an eager op, only in the unfiltered list  # noqa: B018
    assert compiled == ["jit(double)", "jit(double)"]
    assert compiled == [n for n in everything if n == "jit(double)"] and len(everything) > len(compiled)
    with compilations(first) as again:
        first(a)
        first(c)
    assert again == []  # every shape seen: nothing compiled
    # a new function object with the same program is traced and lowered again (whether or not the
    # persistent cache of tests/conftest.py then supplies the executable): it counts
    second = jax.jit(_doubler())
    with compilations(second) as compiled:
        second(a)
    assert compiled == ["jit(double)"]
