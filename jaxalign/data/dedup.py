"""Training-data deduplication: exact (normalised-text hash) and near (MinHash + LSH) duplicates.

Host-side Python; JAX adds nothing here. The sketches and the banding are datasketch's (PyPI
``datasketch`` 2.0): ``MinHash`` signatures over word n-gram shingles and a ``MinHashLSH`` index
whose band count ``b`` and rows per band ``r`` are datasketch's optimum for the threshold
(``_optimal_param``, false-positive / false-negative weights 0.5 / 0.5; see
../shared/specs/seed-features.md §6 for its table). What this module adds is the pipeline of
text-dedup / FineWeb style: normalise and shingle, drop exact duplicates, sketch the rest, take
LSH candidate pairs, optionally verify each with the exact Jaccard similarity of the shingle
sets, and join the accepted pairs by union-find into clusters, keeping the first document of
each. Everything is deterministic across processes: shingles hash with SHA-1, never Python's
per-process salted ``hash()``.

Pitfalls handled (spec §6.5): an empty shingle set has an all-max signature that collides with
every other empty one, so documents with fewer than ``min_tokens`` tokens are never clustered;
unsegmented Chinese / Japanese text has no spaces, so each Han or kana character is a token (the
word n-grams are then character n-grams); the LSH threshold is a soft S-curve, so ``verify``
checks candidates exactly; union-find chains A~B~C even where A and C are further apart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import unicodedata
from collections.abc import Sequence

import datasketch
import numpy as np

__all__ = [
    "DedupReport",
    "DedupResult",
    "dedup",
    "minhashes",
    "normalized_tokens",
    "shingles",
    "text_fingerprint",
]

# Han ideographs (URO, ext. A, compatibility, ext. B-F, 々〆〇) and kana: written without spaces,
# so each character is one token. Hangul is written with spaces and stays in word runs.
_CJK = "\u3005-\u3007\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
# text-dedup's normalisation: lowercase, split on Unicode \W (so a token is a \w run), plus the
# CJK characters above as one-character tokens.
_TOKEN = re.compile(rf"[{_CJK}]|(?:(?![{_CJK}])\w)+")
_SCHEMES = ("affine32", "affine64", "legacy")
_PREVIEW = 80  # characters of each example document kept in the report


def normalized_tokens(text: str) -> list[str]:
    """The tokens that shingles and exact-duplicate keys are made of.

    NFKC-normalised (full-width forms folded), lowercased, split on Unicode ``\\W`` (punctuation
    and whitespace separate tokens and are dropped; text-dedup's normalisation), with each Han
    ideograph or kana character a token of its own.

    Args:
        text: one document.

    Returns:
        The tokens, in order (``[]`` for blank or punctuation-only text).
    """
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


def shingles(text: str, *, ngram: int = 5) -> frozenset[bytes]:
    """The set of normalised word ``ngram``-grams of ``text`` (character n-grams for CJK text).

    A document with fewer than ``ngram`` tokens gives one shingle of all its tokens; one with
    none gives the empty set. Shingles are the tokens joined by one space, UTF-8 encoded.

    Args:
        text: one document.
        ngram: tokens per shingle, >= 1 (text-dedup and FineWeb use 5).

    Raises:
        ValueError: ``ngram`` is not an integer >= 1.

    Returns:
        A frozenset of ``bytes``.
    """
    _check_int("ngram", ngram, 1)
    tokens = normalized_tokens(text)
    if len(tokens) < ngram:
        return frozenset([" ".join(tokens).encode()]) if tokens else frozenset()
    return frozenset(" ".join(tokens[i : i + ngram]).encode() for i in range(len(tokens) - ngram + 1))


def text_fingerprint(text: str) -> str:
    """SHA-1 hex digest of the normalised text (``normalized_tokens`` joined by one space).

    Two texts that differ only in case, punctuation, whitespace or full-width forms share a
    fingerprint; it is the key of the exact-duplicate pass, equal in every process.
    """
    return hashlib.sha1(" ".join(normalized_tokens(text)).encode()).hexdigest()


def minhashes(
    shingle_sets: Sequence[frozenset[bytes] | set[bytes]],
    *,
    num_perm: int = 128,
    seed: int = 1,
    scheme: str = "affine32",
) -> list[datasketch.MinHash]:
    """datasketch MinHash sketches of ``shingle_sets`` (``MinHash.bulk``, SHA-1 input hash).

    ``sig_j(S) = min_{x in S} h_j(x)`` for ``num_perm`` hash functions ``h_j`` drawn from ``seed``;
    ``P[sig_j(A) = sig_j(B)] = J(A, B)``, so ``MinHash.jaccard`` estimates the Jaccard
    similarity with standard error ``sqrt(J (1 - J) / num_perm)``. The scheme is datasketch
    2.0's: ``"affine32"`` (its default; fixes the large-set bias of 1.x, datasketch#212),
    ``"affine64"``, or ``"legacy"`` (datasketch <= 1.x values, ``((a h + b) mod (2^61 - 1)) &
    (2^32 - 1)``). Sketches of different schemes or seeds are not comparable.

    Args:
        shingle_sets: N sets of ``bytes`` (see ``shingles``).
        num_perm: K, hash functions per sketch, >= 2.
        seed: the seed of the hash functions' parameters.
        scheme: one of ``"affine32"``, ``"affine64"``, ``"legacy"``.

    Raises:
        ValueError: ``num_perm`` < 2 or not an integer, or an unknown ``scheme``.

    Returns:
        N ``datasketch.MinHash``; ``.digest()`` is the signature, uint32 [K] (uint64 for
        ``"affine64"`` and ``"legacy"``).
    """
    _check_int("num_perm", num_perm, 2)
    if scheme not in _SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(_SCHEMES)}, got {scheme!r}")
    # the minimum is order-free, so a set's iteration order (salted per process) cannot matter
    return datasketch.MinHash.bulk([list(s) for s in shingle_sets], num_perm=num_perm, seed=seed, scheme=scheme)


@dataclasses.dataclass(frozen=True)
class DedupReport:
    """What ``dedup`` found and the settings it ran with.

    Attributes:
        num_documents: N, documents given.
        num_short: documents with fewer than ``min_tokens`` tokens (empty ones included): kept,
            never clustered.
        num_exact_duplicates: documents removed because their normalised text equals another's
            (``text_fingerprint``).
        num_near_duplicates: documents removed beyond those, as members of a near-duplicate cluster.
        num_clusters: clusters of two or more documents (exact and near duplicates together).
        cluster_sizes: their sizes, largest first.
        examples: the member indices of the largest clusters (up to ``max_examples``), each
            ascending; the first one is the document kept.
        example_texts: the first 80 characters of each of those members.
        candidate_pairs: distinct pairs the LSH index proposed (among exact-distinct documents).
        accepted_pairs: those joined (all of them unless ``verify``).
        threshold, num_perm, bands, rows, ngram, min_tokens, verify, seed, scheme: the settings;
            ``bands`` x ``rows`` is the banding datasketch's ``MinHashLSH`` chose.
    """

    num_documents: int
    num_short: int
    num_exact_duplicates: int
    num_near_duplicates: int
    num_clusters: int
    cluster_sizes: tuple[int, ...]
    examples: tuple[tuple[int, ...], ...]
    example_texts: tuple[tuple[str, ...], ...]
    candidate_pairs: int
    accepted_pairs: int
    threshold: float
    num_perm: int
    bands: int
    rows: int
    ngram: int
    min_tokens: int
    verify: bool
    seed: int
    scheme: str

    @property
    def num_removed(self) -> int:
        """Documents removed: exact plus near duplicates."""
        return self.num_exact_duplicates + self.num_near_duplicates

    def summary(self) -> str:
        """One line: counts and settings, e.g. for a log."""
        return (
            f"{self.num_removed} of {self.num_documents} removed ({self.num_exact_duplicates} exact, "
            f"{self.num_near_duplicates} near duplicates in {self.num_clusters} clusters, largest "
            f"{max(self.cluster_sizes, default=1)}; {self.num_short} short, never clustered); "
            f"Jaccard >= {self.threshold} on {self.ngram}-gram shingles, {self.num_perm} perms "
            f"({self.scheme}, seed {self.seed}), LSH {self.bands} bands x {self.rows} rows, "
            f"{self.candidate_pairs} candidate pairs, {self.accepted_pairs} "
            + ("verified" if self.verify else "accepted unverified")
        )


@dataclasses.dataclass(frozen=True)
class DedupResult:
    """``dedup``'s answer.

    Attributes:
        keep: bool [N], True for the first (lowest-index) document of each cluster and for
            every document in no cluster.
        cluster_ids: int64 [N], the index of the document kept for each one's cluster
            (``cluster_ids[i] == i`` exactly where ``keep[i]``).
        report: a ``DedupReport``.
    """

    keep: np.ndarray
    cluster_ids: np.ndarray
    report: DedupReport


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _lsh_index(threshold: float, num_perm: int) -> datasketch.MinHashLSH:
    """datasketch's index with its optimal banding for ``threshold``, errors naming our arguments."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be a Jaccard similarity in (0, 1), got {threshold!r}")
    try:
        return datasketch.MinHashLSH(threshold=float(threshold), num_perm=num_perm)
    except ValueError as err:  # e.g. "The number of bands are too small (b < 2)"
        raise ValueError(f"threshold {threshold} with num_perm {num_perm}: datasketch refuses ({err})") from err


class _UnionFind:
    """Disjoint sets over 0..n-1 whose root is always the smallest member (the one kept)."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def _jaccard(a: frozenset[bytes], b: frozenset[bytes]) -> float:
    return len(a & b) / len(a | b)


def _near_pairs(
    sets: dict[int, frozenset[bytes]], lsh: datasketch.MinHashLSH, *, threshold: float, verify: bool, **sketch
) -> tuple[list[tuple[int, int]], int]:
    """Pairs ``(i, j)``, i < j, among the documents ``sets`` that the LSH index proposes (and,
    with ``verify``, whose exact shingle Jaccard is >= ``threshold``); and the candidate count."""
    keys = sorted(sets)
    sketches = minhashes([sets[k] for k in keys], num_perm=lsh.h, **sketch)
    with lsh.insertion_session() as session:
        for key, m in zip(keys, sketches):
            session.insert(key, m, check_duplication=False)
    candidates = {(min(i, j), max(i, j)) for i, m in zip(keys, sketches) for j in lsh.query(m) if j != i}
    pairs = sorted(p for p in candidates if not verify or _jaccard(sets[p[0]], sets[p[1]]) >= threshold)
    return pairs, len(candidates)


def dedup(
    texts: Sequence[str],
    *,
    threshold: float = 0.7,
    num_perm: int = 128,
    ngram: int = 5,
    min_tokens: int = 5,
    verify: bool = True,
    seed: int = 1,
    scheme: str = "affine32",
    max_examples: int = 3,
) -> DedupResult:
    """Find exact and near-duplicate documents; keep the first of each cluster.

    1. Documents with fewer than ``min_tokens`` tokens (``normalized_tokens``) are set aside:
       kept, in no cluster (an empty or tiny shingle set collides with every other one).
    2. Exact pass: documents with equal ``text_fingerprint`` (SHA-1 of the normalised text) join.
    3. Near pass, over one document per fingerprint: ``ngram``-gram ``shingles``, ``minhashes``
       (datasketch 2.0), a datasketch ``MinHashLSH(threshold, num_perm)`` index (its optimal
       ``b`` bands x ``r`` rows: a pair with Jaccard ``s`` is a candidate with probability
       ``1 - (1 - s^r)^b``), then each candidate pair joins if ``verify`` is False or its exact
       shingle Jaccard is >= ``threshold`` (text-dedup's ``check_false_positive``).
    4. Union-find over the joined pairs; a cluster keeps its lowest index. Clusters chain:
       A~B and B~C put A, B, C together even if J(A, C) < ``threshold``.

    Defaults: text-dedup's threshold 0.7 and word 5-grams (min length 5), datasketch's 128
    permutations and seed 1, datasketch 2.0's ``"affine32"`` scheme (spec §6.2). Deterministic:
    the same texts and settings give the same result in any process.

    Args:
        texts: N documents (str).
        threshold: Jaccard similarity in (0, 1) at which two documents are near duplicates
            (with 128 permutations datasketch's banding needs it below about 0.95; exact
            duplicates are found by the exact pass at any threshold).
        num_perm: MinHash permutations K, >= 2.
        ngram: tokens per shingle, >= 1.
        min_tokens: documents with fewer tokens are never clustered; >= 1.
        verify: check each LSH candidate with the exact Jaccard (else accept every candidate).
        seed: MinHash seed.
        scheme: the datasketch permutation scheme (see ``minhashes``).
        max_examples: clusters described in the report, >= 0.

    Raises:
        ValueError: naming the argument: a non-string ``texts[i]``; ``threshold`` outside (0, 1);
            ``num_perm`` < 2, ``ngram`` < 1, ``min_tokens`` < 1, ``max_examples`` < 0 or a non-
            integer one; an unknown ``scheme``; or a ``threshold`` / ``num_perm`` pair for which
            datasketch's optimal banding has fewer than 2 bands.

    Returns:
        A ``DedupResult`` (keep mask bool [N], cluster ids int64 [N], ``DedupReport``).
    """
    limits = (("num_perm", num_perm, 2), ("ngram", ngram, 1), ("min_tokens", min_tokens, 1), ("max_examples", max_examples, 0))
    for name, value, minimum in limits:
        _check_int(name, value, minimum)
    if scheme not in _SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(_SCHEMES)}, got {scheme!r}")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"texts[{bad}] is not a string (got {type(texts[bad]).__name__})")
    lsh = _lsh_index(threshold, num_perm)
    tokens = [normalized_tokens(t) for t in texts]
    long_enough = [i for i, t in enumerate(tokens) if len(t) >= min_tokens]
    clusters = _UnionFind(len(texts))
    first_of: dict[str, int] = {}
    for i in long_enough:
        first = first_of.setdefault(hashlib.sha1(" ".join(tokens[i]).encode()).hexdigest(), i)
        clusters.union(first, i)
    sets = {i: shingles(texts[i], ngram=ngram) for i in sorted(first_of.values())}
    pairs, num_candidates = _near_pairs(sets, lsh, threshold=threshold, verify=verify, seed=seed, scheme=scheme)
    for i, j in pairs:
        clusters.union(i, j)
    cluster_ids = np.array([clusters.find(i) for i in range(len(texts))], np.int64)
    keep = cluster_ids == np.arange(len(texts))
    num_exact = len(long_enough) - len(first_of)
    report = _report(
        texts,
        cluster_ids,
        max_examples,
        num_short=len(texts) - len(long_enough),
        num_exact_duplicates=num_exact,
        num_near_duplicates=int(len(texts) - keep.sum()) - num_exact,
        candidate_pairs=num_candidates,
        accepted_pairs=len(pairs),
        threshold=float(threshold),
        num_perm=num_perm,
        bands=lsh.b,
        rows=lsh.r,
        ngram=ngram,
        min_tokens=min_tokens,
        verify=verify,
        seed=seed,
        scheme=scheme,
    )
    return DedupResult(keep=keep, cluster_ids=cluster_ids, report=report)


def _report(texts: Sequence[str], cluster_ids: np.ndarray, max_examples: int, **fields) -> DedupReport:
    """The report's cluster statistics and examples (largest first, ties by kept index)."""
    ids, sizes = np.unique(cluster_ids, return_counts=True)
    order = sorted((int(-n), int(c)) for c, n in zip(ids, sizes) if n > 1)
    examples = tuple(tuple(int(i) for i in np.flatnonzero(cluster_ids == c)) for _, c in order[:max_examples])
    return DedupReport(
        num_documents=len(texts),
        num_clusters=len(order),
        cluster_sizes=tuple(-n for n, _ in order),
        examples=examples,
        example_texts=tuple(tuple(texts[i][:_PREVIEW] for i in members) for members in examples),
        **fields,
    )
