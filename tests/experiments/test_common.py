"""The plumbing the experiments share (experiments/_common.py): figures, tables, checks, resume."""

import math
import types

import jax.numpy as jnp
import numpy as np
import pytest

from experiments._common import (
    STORIES260K_MODEL,
    before_after,
    check_context,
    check_vocab,
    format_table,
    resume_or_start,
    trend,
)
from jaxalign import save_checkpoint


def test_trend_means_the_first_and_last_fifth():
    values = [float(v) for v in range(16)]  # 16 · 0.2 = 3.2: three values at each end
    assert trend("r", values) == {"r_first": 1.0, "r_last": 14.0}
    assert trend("r", values, round_up=True) == {"r_first": 1.5, "r_last": 13.5}  # ceil: four
    assert trend("r", values[:15]) == trend("r", values[:15], round_up=True)  # 15 · 0.2 = 3.0
    assert trend("r", [2.0, 4.0]) == {"r_first": 2.0, "r_last": 4.0}  # at least one value
    assert all(math.isnan(x) for x in trend("r", []).values())


def test_before_after_keys_in_order():
    figures = before_after({"a": 1, "b": 2}, {"a": 3, "b": 4}, prefix="test_")
    assert list(figures.items()) == [("test_a_before", 1), ("test_b_before", 2), ("test_a_after", 3), ("test_b_after", 4)]
    assert list(before_after({"x": 0}, {"x": 1}, labels=("sft", "grpo"))) == ["x_sft", "x_grpo"]


def test_format_table_aligns_numbers_strings_and_missing_figures():
    table = format_table("metric", ("before", "after"), [
        ("  loss", 1.23456, None),
        ("  one value", 0.5),
        ("span", f"{'12':>20}"),
    ], widths=(12, 10, 10), fmt=".2f", rule=True)
    assert table.splitlines() == [
        "metric          before     after",
        "-" * 32,
        "  loss            1.23       n/a",
        "  one value       0.50",
        "span                          12",
    ]


def test_vocab_and_context_checks_name_flags_files_and_sizes():
    tokenizer = types.SimpleNamespace(vocab_size=513)
    config = types.SimpleNamespace(vocab_size=512, max_seq_len=256)
    check_vocab(types.SimpleNamespace(vocab_size=512), config, tokenizer_spec="t", model="m")
    with pytest.raises(ValueError, match=r"--tokenizer tok.model has 513 ids but --init m.bin has a vocabulary of 512"):
        check_vocab(tokenizer, config, tokenizer_spec="tok.model", model="m.bin", model_flag="--init")
    check_context(config, 256, flags="--max-length 256", model="m")
    with pytest.raises(ValueError, match=r"--max-length 300 = 300 tokens exceed the context of --model m, 256 tokens"):
        check_context(config, 300, flags="--max-length 300", model="m")
    assert STORIES260K_MODEL.endswith("shared/data/models/stories260K/stories260K.bin")


def test_resume_or_start_restores_only_with_resume(tmp_path):
    fresh = {"w": jnp.zeros(3)}
    manager, state = resume_or_start(tmp_path / "ck", fresh, resume=True, save_every=1, keep=1)
    assert state is fresh  # nothing saved yet: start afresh
    save_checkpoint(manager, 4, {"w": jnp.arange(3.0)}, force=True)
    manager.wait_until_finished()
    _, state = resume_or_start(tmp_path / "ck", fresh, resume=False, save_every=1, keep=1)
    assert state is fresh
    _, state = resume_or_start(tmp_path / "ck", fresh, resume=True, save_every=1, keep=1)
    np.testing.assert_array_equal(state["w"], [0.0, 1.0, 2.0])
