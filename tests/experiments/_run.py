"""Runs an experiment as README tells users to, `python -m experiments.<name> ...`, in a
subprocess at XLA's default optimisation level.

tests/conftest.py sets XLA:CPU's LLVM backend to level 0 for the test session, which makes the
compile-bound tests fast but the execution-bound end-to-end runs slower (the PPO experiment
52 s -> 75 s on 2 cores). The learning tests that train for a minute run here instead, with the
level the user gets. The persistent compilation cache (its directory in the environment) is
shared. Kill-and-resume tests do not use this: a run and its resumption must share flags.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.experiments._kill import ROOT

_LEVEL0 = "--xla_backend_optimization_level=0"


def run_experiment(module: str, args: list[str]) -> tuple[dict, str]:
    """(the summary.json in args' `--output-dir`, the run's stdout) after `python -m module
    *args`, which must exit 0 (the assertion shows its stderr's tail otherwise)."""
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if f != _LEVEL0)
    env = {**os.environ, "XLA_FLAGS": flags, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, f"python -m {module} exited {proc.returncode}\n{proc.stderr[-5000:]}"
    output_dir = Path(args[args.index("--output-dir") + 1])
    return json.loads((output_dir / "summary.json").read_text()), proc.stdout
