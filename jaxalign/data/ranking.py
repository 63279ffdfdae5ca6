"""Ranked answers to preference pairs (InstructGPT's K-way rankings, arXiv 2203.02155 §3.5).

Labelers rank K answers to one prompt; every ordered pair (better, worse) is one Bradley–Terry
comparison, C(K, 2) of them. InstructGPT trains on all of a prompt's pairs in one batch element
to avoid overfitting to correlated pairs; the seeds cap them at a fixed number per prompt, which
is what `ranked_pairs` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def ranked_pairs(
    scores: Sequence[float],
    *,
    max_pairs: int | None = None,
    rng: np.random.Generator | None = None,
) -> list[tuple[int, int]]:
    """(chosen, rejected) index pairs from K scored answers of one prompt.

    Every pair whose scores differ gives one pair, the higher-scored answer as chosen; ties carry
    no preference and are dropped. With more than `max_pairs` pairs, `max_pairs` of them are drawn
    without replacement.

    Args:
      scores: K scores (higher = better), e.g. a ranking turned into −rank.
      max_pairs: cap per prompt (None: all); needs `rng` when it binds.
      rng: NumPy generator for the subsample.

    Returns:
      A list of (chosen_index, rejected_index), in (i, j) lexicographic order of the kept pairs.

    Raises:
      ValueError: max_pairs < 1, a score that is NaN, or a cap that binds without an rng.
    """
    s = np.asarray(scores, np.float64)
    if np.isnan(s).any():
        raise ValueError(f"scores contain NaN: {list(scores)}")
    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
    pairs = [
        (i, j) if s[i] > s[j] else (j, i)
        for i in range(len(s))
        for j in range(i + 1, len(s))
        if s[i] != s[j]
    ]
    if max_pairs is not None and len(pairs) > max_pairs:
        if rng is None:
            raise ValueError(f"{len(pairs)} pairs exceed max_pairs={max_pairs}: pass rng to subsample")
        keep = np.sort(rng.choice(len(pairs), size=max_pairs, replace=False))
        pairs = [pairs[k] for k in keep]
    return pairs
