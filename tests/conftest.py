"""Shared test fixtures: the real data folder beside the repo, and a compile counter."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """`../shared/data` relative to the repo root; skips the test where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} not present (only on the project's machines)")
    return SHARED_DATA


def compile_count(jitted) -> int:
    """Number of compiled specialisations a `jax.jit` function holds."""
    return jitted._cache_size()
