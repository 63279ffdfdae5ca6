"""The code-generated sorting preference task."""

from __future__ import annotations

import re

import pytest

from jaxalign.data import sft_view, sorting_task


def numbers(text: str) -> list[int]:
    return [int(v) for v in text.split()]


def test_columns_and_rows():
    ds = sorting_task(200, seed=0, min_len=3, max_len=6)
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    assert len(ds) == 200
    for row in ds:
        match = re.fullmatch(r"sort: ((?:\d )*\d)\n", row["prompt"])
        assert match is not None, row["prompt"]
        given = numbers(match.group(1))
        assert 3 <= len(given) <= 6 and all(0 <= v <= 9 for v in given)
        assert numbers(row["chosen"]) == sorted(given)
        assert sorted(numbers(row["rejected"])) == sorted(given)
        assert row["rejected"] != row["chosen"]


def test_deterministic_given_seed():
    assert sorting_task(50, seed=7).to_list() == sorting_task(50, seed=7).to_list()
    assert sorting_task(50, seed=7).to_list() != sorting_task(50, seed=8).to_list()


def test_two_numbers_from_two_values_still_have_a_wrong_answer():
    ds = sorting_task(30, seed=0, min_len=2, max_len=2, max_value=1)
    assert set(ds["chosen"]) == {"0 1"} and set(ds["rejected"]) == {"1 0"}


def test_sft_view_of_sorting_task():
    pref = sorting_task(5, seed=1)
    sft = sft_view(pref)
    assert sft.column_names == ["prompt", "completion"]
    assert sft["completion"] == pref["chosen"]


@pytest.mark.parametrize(
    "kwargs", [{"min_len": 1}, {"min_len": 5, "max_len": 4}, {"max_value": 0}, {"n": -1}]
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        sorting_task(**{"n": 3, "seed": 0, **kwargs})
