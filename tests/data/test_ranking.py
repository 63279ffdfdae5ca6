import numpy as np
import pytest

from jaxalign.data import ranked_pairs


def test_all_pairs_better_first_and_ties_dropped():
    assert ranked_pairs([1.0, 3.0, 2.0]) == [(1, 0), (2, 0), (1, 2)]
    assert ranked_pairs([2.0, 2.0, 0.0]) == [(0, 2), (1, 2)]  # the tie (0, 1) carries no preference
    assert ranked_pairs([5.0]) == []


def test_cap_subsamples_distinct_pairs():
    scores = np.arange(9.0)  # C(9, 2) = 36 pairs
    kept = ranked_pairs(scores, max_pairs=10, rng=np.random.default_rng(0))
    assert len(kept) == len(set(kept)) == 10
    assert all(scores[c] > scores[r] for c, r in kept)
    assert ranked_pairs(scores, max_pairs=10, rng=np.random.default_rng(0)) == kept  # seeded
    assert len(ranked_pairs(scores[:4], max_pairs=10)) == 6  # cap not binding: no rng needed


def test_errors():
    with pytest.raises(ValueError, match="max_pairs"):
        ranked_pairs([1.0, 2.0], max_pairs=0)
    with pytest.raises(ValueError, match="pass rng"):
        ranked_pairs([1.0, 2.0, 3.0], max_pairs=1)
    with pytest.raises(ValueError, match="NaN"):
        ranked_pairs([1.0, float("nan")])
