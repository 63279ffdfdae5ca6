"""Fault injection for the kill-and-resume tests: run an experiment's `main` in a subprocess
that SIGKILLs (or SIGINTs) itself at a chosen metrics record, then compare runs.

The kill is injected from the test side: the subprocess wraps `MetricsWriter.write` so that
writing the record (`stage`, `step`) kills the process, either just after the record is flushed
or halfway through writing it (a torn last line). Nothing in the library knows about it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxalign.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]

_DRIVER = """
import os, signal, sys, importlib
# A SIGINT that the parent blocks or ignores (a pytest worker's state) would be inherited and the
# injected interrupt never delivered: restore Python's own handling first.
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
signal.signal(signal.SIGINT, signal.default_int_handler)
from jaxalign import metrics
module, at_stage, at_step, how, args = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:]
original = metrics.MetricsWriter.write
def write(self, step, values, *, stage="train"):
    if stage == at_stage and int(step) == at_step:
        if how == "torn":  # killed halfway through the line
            self._file.write('{"step": %d, "stage": "%s", "lo' % (step, stage))
            self._file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        record = original(self, step, values, stage=stage)
        os.kill(os.getpid(), signal.SIGINT if how == "sigint" else signal.SIGKILL)
        return record
    return original(self, step, values, stage=stage)
metrics.MetricsWriter.write = write
importlib.import_module(module).main(args)
"""

TIMING = ("tokens_per_s", "seconds", "steps_per_s")


def run_killed(module: str, args: list[str], *, stage: str, step: int, how: str = "kill") -> int:
    """Runs `python -c DRIVER module stage step how *args` from the repo root; returns its exit
    code (−9 for SIGKILL; SIGINT raises KeyboardInterrupt, exit 1 or −2)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, module, stage, str(step), how, *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode != 0, f"the run was not killed at {stage}:{step}\n{proc.stderr[-3000:]}"
    return proc.returncode


def deterministic_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl without wall-clock figures (throughput, seconds)."""
    return [
        {k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in read_metrics(path)
    ]


def deterministic_summary(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if not any(t in k for t in TIMING)}


def latest_checkpoint_arrays(directory: Path) -> dict[str, np.ndarray]:
    """{key path: array} of the latest orbax checkpoint in `directory` (restored as numpy)."""
    with ocp.CheckpointManager(directory.absolute()) as manager:
        restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(restored)[0]}


def assert_same_checkpoints(a: Path, b: Path) -> None:
    """The latest checkpoints under a and b hold bit-identical arrays."""
    left, right = latest_checkpoint_arrays(a), latest_checkpoint_arrays(b)
    assert left.keys() == right.keys()
    for k in left:
        np.testing.assert_array_equal(left[k], right[k], err_msg=k)
