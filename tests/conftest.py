"""Shared test fixtures: the real data folder beside the repo; the test session's JAX settings.

Also a JAX persistent compilation cache for the whole test session, set here before any test
imports jax: the end-to-end tests run the same experiment several times (an uninterrupted run,
a killed one, its resumption, often in subprocesses), and each run would otherwise recompile the
same programs. The cache is keyed on the program, the backend and the XLA flags (jax's
`cache_key.get`), so a cached executable is the one a fresh compile would produce and results
stay bit-identical. It lives in a fresh temporary directory (inherited by xdist workers and
subprocesses through the environment) that the process which made it removes at exit; set
`JAX_COMPILATION_CACHE_DIR` yourself to keep one across sessions.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="jaxalign-test-jit-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
# cache every program: the tests' programs are small and compile in well under jax's 1 s default
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# XLA:CPU's LLVM backend at optimisation level 0 (read when the backend starts, after this
# module; inherited by xdist workers and subprocesses): most tests compile far more than they
# run. The HLO passes are the same; LLVM no longer vectorises or inlines the generated code, so
# a result may differ from the default level's in the last bits, as it does between CPUs, which
# every tolerance already allows. Measured on 2 cores (Sapphire Rapids): the compile-bound model
# and memory tests 268 s -> 178 s, the PPO experiment 52 s -> 75 s. Set a level in XLA_FLAGS
# yourself to test at another.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """`../shared/data` relative to the repo root; skips the test where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} not present (only on the project's machines)")
    return SHARED_DATA


# Longest first (LPT scheduling): xdist hands tests out in collection order, so a multi-minute
# test collected last (the 8-device sharding wrapper, tests/test_sharding.py) would run alone at
# the end while the other worker idles. Stable sort: the order within each group is unchanged.
_FIRST = ("test_sharding_on_8_simulated_devices",)
# unmarked tests measured at over a minute under the suite's load (pytest --durations)
_EARLY = ("test_ppo_loop_adapts_beta_and_resumes_bit_identically", "test_ppo_update_moves_policy_towards_advantage",
          "test_every_step_adds_router_losses", "test_device_suite_cpu_shapes_prints_one_json_line",
          "test_moe_layer_and_whole_step_report", "test_attend_buckets_give_the_same_generation")


def pytest_collection_modifyitems(config, items):
    """Runs the 8-device wrapper, then the `slow`-marked end-to-end tests, then the rest."""

    def rank(item) -> int:
        if item.name in _FIRST:
            return 0
        early = item.get_closest_marker("slow") or item.originalname in _EARLY
        return 1 if early else 2

    items.sort(key=rank)
