"""MinHash + LSH deduplication (jaxalign.data.dedup, datasketch 2.0) and the loaders' ``dedup=``."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import datasketch
import numpy as np
import pytest

from jaxalign.data.datasets import drop_duplicates, load_preference_dataset, load_sft_dataset, row_text
from jaxalign.data.dedup import dedup, minhashes, normalized_tokens, shingles, text_fingerprint
from jaxalign.data.gsm8k import load_gsm8k

DEDUP_FILE = Path(__file__).resolve().parents[2] / "jaxalign" / "data" / "dedup.py"
VOCAB = [f"w{i}" for i in range(5000)]


def random_docs(rng: np.random.Generator, n: int, words: int = 200) -> list[list[str]]:
    """``n`` documents of ``words`` words drawn from a 5,000-word vocabulary: two of them share a
    5-gram with probability ~ words^2 / 5000^5, so unrelated documents have shingle Jaccard 0."""
    return [list(rng.choice(VOCAB, words)) for _ in range(n)]


def edited(rng: np.random.Generator, words: list[str], n_edits: int) -> list[str]:
    """A copy of ``words`` with ``n_edits`` words at distinct random positions replaced."""
    copy = list(words)
    for position in rng.choice(len(copy), n_edits, replace=False):
        copy[position] = f"edit{rng.integers(10**6)}"
    return copy


def exact_jaccard(a: str, b: str, ngram: int = 5) -> float:
    x, y = shingles(a, ngram=ngram), shingles(b, ngram=ngram)
    return len(x & y) / len(x | y)


# ------------------------------------------------------------------------- banding (spec table)


# spec §6.1: (K, t) -> (b, r) and P(candidate | J = t) from datasketch's `_optimal_param`
# (weights 0.5 / 0.5), computed by the spec's author with that exact procedure
SPEC_BANDING = [
    (128, 0.7, 14, 9, 0.44),
    (128, 0.8, 9, 13, 0.40),
    (128, 0.9, 5, 25, 0.31),
    (256, 0.7, 25, 10, 0.51),
    (256, 0.8, 17, 15, 0.46),
    (256, 0.85, 13, 19, 0.46),
    (240, 0.7, 24, 10, 0.50),
]


@pytest.mark.parametrize(("num_perm", "threshold", "bands", "rows", "p_at_t"), SPEC_BANDING)
def test_banding_equals_the_spec_table(num_perm, threshold, bands, rows, p_at_t):
    lsh = datasketch.MinHashLSH(threshold=threshold, num_perm=num_perm)
    assert (lsh.b, lsh.r) == (bands, rows)
    # the table's 2 decimals, +-0.01: its 0.46 for (256, 0.85) is 0.4549
    assert 1 - (1 - threshold**rows) ** bands == pytest.approx(p_at_t, abs=0.01)
    report = dedup(["a b c d e f"], threshold=threshold, num_perm=num_perm).report
    assert (report.bands, report.rows) == (bands, rows)  # dedup bands with datasketch's choice


# ------------------------------------------------------------------------------ MinHash accuracy


@pytest.mark.parametrize("scheme", ["affine32", "legacy"])
@pytest.mark.parametrize("jaccard", [0.3, 0.5, 0.7, 0.9])
def test_jaccard_estimates_within_4_standard_errors(jaccard, scheme):
    # pairs A = C ∪ X, B = C ∪ Y with |A ∪ B| = 1000, |C| = 1000 J, |X| = |Y|: exact Jaccard J
    union, pairs, k = 1000, 20, 128
    common = round(union * jaccard)
    side = (union - common) // 2
    sets = []
    for p in range(pairs):
        c = {f"{p}c{i}".encode() for i in range(common)}
        sets += [c | {f"{p}x{i}".encode() for i in range(side)}, c | {f"{p}y{i}".encode() for i in range(side)}]
    exact = [len(a & b) / len(a | b) for a, b in zip(sets[::2], sets[1::2])]
    sketches = minhashes(sets, num_perm=k, seed=7, scheme=scheme)
    estimates = np.array([a.jaccard(b) for a, b in zip(sketches[::2], sketches[1::2])])
    # Ĵ is a mean of K Bernoulli(J) indicators: SE = sqrt(J (1 - J) / K), per pair and /sqrt(20)
    # for the mean of 20 independent pairs; 4 SE is exceeded with probability 6e-5 each
    se = math.sqrt(jaccard * (1 - jaccard) / k)
    assert np.all(np.abs(estimates - exact) <= 4 * se), (estimates, exact)
    assert abs(estimates.mean() - np.mean(exact)) <= 4 * se / math.sqrt(pairs)


# ------------------------------------------------------------------------ finding the duplicates


def test_planted_near_duplicates_with_5_percent_edits_are_all_found():
    rng = np.random.default_rng(0)
    base = random_docs(rng, 60)
    copies = [edited(rng, words, n_edits=10) for words in base[:20]]  # 10 of 200 words = 5%
    texts = [" ".join(w) for w in base + copies]
    # 10 scattered substitutions touch ~1 - 0.95^5 = 23% of the 5-grams: J ≈ 0.77 / 1.23 ≈ 0.63,
    # below the default threshold 0.7, so this is a threshold-0.3 test (the exact check at 0.3)
    planted = [exact_jaccard(texts[i], texts[60 + i]) for i in range(20)]
    assert 0.55 < min(planted) and max(planted) < 0.72
    result = dedup(texts, threshold=0.3, num_perm=128)
    report = result.report
    # the chance that LSH misses one of them: Σ (1 - s^r)^b over the planted J = s, ~1e-3 here
    assert sum((1 - s**report.rows) ** report.bands for s in planted) < 2e-3
    np.testing.assert_array_equal(result.cluster_ids, list(range(60)) + list(range(20)))
    np.testing.assert_array_equal(result.keep, [True] * 60 + [False] * 20)
    assert (report.num_near_duplicates, report.num_exact_duplicates, report.num_clusters) == (20, 0, 20)
    assert report.accepted_pairs == 20  # no unrelated pair survives the exact check
    assert report.cluster_sizes == (2,) * 20 and report.examples[0] == (0, 60)


def test_default_settings_find_light_edits_and_normalised_exact_copies():
    rng = np.random.default_rng(1)
    base = [" ".join(w) for w in random_docs(rng, 30)]
    one_word = [" ".join(edited(rng, b.split(), n_edits=1)) for b in base[:10]]  # J ≈ 0.95
    shouted = [b.upper().replace(" ", ",  ") + "!" for b in base[10:15]]  # same normalised text
    result = dedup(base + one_word + shouted)
    report = result.report
    np.testing.assert_array_equal(result.cluster_ids[30:], [*range(10), *range(10, 15)])
    assert result.keep[:30].all() and not result.keep[30:].any()
    assert (report.num_exact_duplicates, report.num_near_duplicates, report.num_removed) == (5, 10, 15)
    assert (report.threshold, report.num_perm, report.ngram, report.bands, report.rows) == (0.7, 128, 5, 14, 9)
    assert "15 of 45 removed (5 exact, 10 near" in report.summary()


def test_unrelated_documents_are_not_clustered():
    texts = [" ".join(w) for w in random_docs(np.random.default_rng(2), 300, words=60)]
    for verify in (True, False):
        result = dedup(texts, verify=verify)
        assert result.keep.all() and result.report.num_clusters == 0
        assert result.report.candidate_pairs == 0  # J = 0: no band of 9 rows can agree


def test_clusters_chain_through_a_middle_document():
    # A ~ B and B ~ C at J >= 0.7, A vs C below: union-find puts all three together
    words = random_docs(np.random.default_rng(3), 1, words=100)[0]
    a = " ".join(words)
    b = " ".join(words[:90] + ["x1", "x2", "x3", "x4", "x5", "x6", "x7", "x8", "x9", "x10"])
    c = " ".join(words[:80] + [f"y{i}" for i in range(10)] + ["x1", "x2", "x3", "x4", "x5", "x6", "x7", "x8", "x9", "x10"])
    assert exact_jaccard(a, b) >= 0.7 and exact_jaccard(b, c) >= 0.7 and exact_jaccard(a, c) < 0.7
    np.testing.assert_array_equal(dedup([a, b, c]).cluster_ids, [0, 0, 0])


def test_empty_and_short_documents_never_cluster():
    texts = ["", "", "   ", "?!", "yes", "yes", "one two three four", "one two three four"]
    long_doc = "the cat sat on the mat today"
    result = dedup([*texts, long_doc, long_doc.upper()])
    np.testing.assert_array_equal(result.cluster_ids, [*range(8), 8, 8])
    assert result.report.num_short == 8 and result.report.num_exact_duplicates == 1
    assert dedup(["", ""], min_tokens=1).keep.all()
    assert shingles("") == frozenset() and shingles(" ?! ") == frozenset()


def test_cjk_text_is_shingled_by_characters():
    assert normalized_tokens("我们需要计算 the Total，ＡＢＣ！") == ["我", "们", "需", "要", "计", "算", "the", "total", "abc"]
    assert shingles("我们需要计算", ngram=5) == {"我 们 需 要 计".encode(), "们 需 要 计 算".encode()}
    assert shingles("我们", ngram=5) == {"我 们".encode()}  # shorter than n: one shingle of all tokens
    a = (
        "小明有五个苹果，他给了小红两个苹果，然后又买了三个苹果。请问小明现在有几个苹果？"
        "小红把她的两个苹果分给了三个朋友，每个朋友分到的一样多。每个朋友分到几个苹果？"
    )
    b = a.replace("小明现在", "小明今天")  # 2 adjacent characters of 72 changed
    c = "今天天气很好，我们去公园散步，看到了很多美丽的花朵和高大的树木，心情非常愉快。"
    assert exact_jaccard(a, b) == 60 / 72  # 66 distinct character 5-grams each, 6 of them differ
    assert normalized_tokens(a)[:3] == ["小", "明", "有"]
    np.testing.assert_array_equal(dedup([a, b, c]).cluster_ids, [0, 0, 2])


def test_fingerprint_normalises_case_punctuation_and_width():
    assert text_fingerprint("Hello,   World!") == text_fingerprint("hello world") == text_fingerprint("ＨＥＬＬＯ world")
    assert text_fingerprint("hello world") != text_fingerprint("hello word")
    assert len(text_fingerprint("")) == 40  # a SHA-1 hex digest


_CHILD = """
import importlib.util, json, sys
# the module alone (stdlib, numpy, datasketch): no jax import, so the child starts in a second
spec = importlib.util.spec_from_file_location("dedup", sys.argv[1])
dedup = importlib.util.module_from_spec(spec)
sys.modules["dedup"] = dedup
spec.loader.exec_module(dedup)
texts = json.loads(sys.stdin.read())
result = dedup.dedup(texts, threshold=0.5)
sketches = dedup.minhashes([dedup.shingles(t) for t in texts])
print(json.dumps([result.cluster_ids.tolist(), result.report.candidate_pairs,
                  [m.digest().tolist() for m in sketches], [dedup.text_fingerprint(t) for t in texts]]))
"""


def test_deterministic_across_processes_with_different_hash_seeds():
    rng = np.random.default_rng(4)
    base = random_docs(rng, 20, words=80)
    texts = [" ".join(w) for w in base + [edited(rng, w, 6) for w in base[:8]]]
    outputs = []
    for hash_seed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        command = [sys.executable, "-c", _CHILD, str(DEDUP_FILE)]
        run = subprocess.run(command, input=json.dumps(texts), env=env, capture_output=True, text=True, check=True)
        outputs.append(json.loads(run.stdout))
    here = dedup(texts, threshold=0.5)
    assert outputs[0] == outputs[1]
    assert outputs[0][0] == here.cluster_ids.tolist() and outputs[0][1] == here.report.candidate_pairs
    assert outputs[0][2] == [m.digest().tolist() for m in minhashes([shingles(t) for t in texts])]
    assert here.report.num_clusters > 0  # the comparison covers a run that found something


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(threshold=0.0), "threshold must be"),
        (dict(threshold=1.0), "threshold must be"),
        (dict(threshold=True), "threshold must be"),
        (dict(threshold=0.99), "threshold 0.99 with num_perm 128"),  # datasketch: fewer than 2 bands
        (dict(num_perm=1), "num_perm must be an integer >= 2"),
        (dict(ngram=0), "ngram must be"),
        (dict(min_tokens=0), "min_tokens must be"),
        (dict(scheme="murmur"), "scheme must be one of"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dedup(["some text here and there"], **kwargs)


def test_non_string_text_is_refused_by_index():
    with pytest.raises(ValueError, match=r"texts\[1\] is not a string \(got NoneType\)"):
        dedup(["a", None])


# ------------------------------------------------------------------------------------- loaders


def sentences(rng: np.random.Generator, n: int) -> list[str]:
    return [" ".join(w) for w in random_docs(rng, n, words=30)]


def test_sft_loader_dedup_removes_planted_duplicates(tmp_path, caplog):
    rng = np.random.default_rng(5)
    instructions, outputs = sentences(rng, 12), sentences(rng, 12)
    rows = [{"instruction": i, "input": "", "output": o} for i, o in zip(instructions, outputs)]
    rows += [
        dict(rows[0]),  # an exact copy
        {"instruction": instructions[1].upper() + "!", "input": "", "output": outputs[1]},  # same normalised text
        {"instruction": instructions[2], "input": "", "output": outputs[2].replace(outputs[2].split()[-1], "changed")},
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_sft_dataset(path)) == 15
    with caplog.at_level(logging.WARNING, logger="jaxalign.data.datasets"):
        deduped = load_sft_dataset(path, dedup=0.7)
    assert deduped["completion"] == outputs  # the first of each cluster, in order
    assert "dedup: 3 of 15 removed (2 exact, 1 near" in caplog.text and str(path) in caplog.text


def test_preference_loader_dedup_compares_prompt_and_both_responses(tmp_path):
    rng = np.random.default_rng(6)
    prompts, chosen, rejected = sentences(rng, 8), sentences(rng, 8), sentences(rng, 8)
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(prompts, chosen, rejected)]
    rows += [dict(rows[3]), {"prompt": prompts[4], "chosen": chosen[4], "rejected": rejected[5]}]
    path = tmp_path / "pref.json"
    path.write_text(json.dumps(rows))
    deduped = load_preference_dataset(path, dedup=0.7)
    # the copy goes; the pair sharing the prompt and chosen but not the rejected one stays (J ≈ 0.5)
    assert len(deduped) == 9 and deduped["rejected"][-1] == rejected[5]


def test_dedup_compares_source_fields_not_the_shared_prompt_template(tmp_path):
    # 1-word instructions and outputs: with the Alpaca preamble (~20 shared words) each row would
    # look alike; on the source fields every row is short and none is clustered
    rows = [{"instruction": f"Translate word{i} please now", "input": "", "output": f"out{i}"} for i in range(6)]
    path = tmp_path / "short.json"
    path.write_text(json.dumps(rows))
    assert len(load_sft_dataset(path, dedup=0.5)) == 6


@pytest.mark.parametrize("bad", [1.5, 0, True, "0.7"])
def test_loaders_refuse_a_bad_dedup_value_naming_the_flag(tmp_path, bad):
    path = tmp_path / "missing.json"  # refused before the file is read
    for load in (load_sft_dataset, load_preference_dataset, load_gsm8k):
        with pytest.raises(ValueError, match=r"missing\.json: dedup must be a Jaccard similarity threshold in \(0, 1\)"):
            load(path, dedup=bad)


def test_gsm8k_loader_dedup_drops_a_repeated_problem(tmp_path):
    rng = np.random.default_rng(8)
    questions = sentences(rng, 4)
    rows = [{"question": q, "answer": f"{q} so\n#### {i}"} for i, q in enumerate(questions)]
    rows.append(dict(rows[1]))
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_gsm8k(path)["answer"] == ["0", "1", "2", "3", "1"]
    assert load_gsm8k(path, dedup=0.7)["answer"] == ["0", "1", "2", "3"]


def test_drop_duplicates_on_a_loaded_dataset():
    rng = np.random.default_rng(7)
    questions = sentences(rng, 5)
    ds = datasets.Dataset.from_dict({"question": questions + [questions[2]], "answer": list("123453")})
    kept, report = drop_duplicates(ds, columns=["question", "answer"], threshold=0.8, source="gsm8k")
    assert kept["answer"] == list("12345") and report.num_exact_duplicates == 1
    with pytest.raises(ValueError, match="gsm8k: threshold: no column 'solution'"):
        drop_duplicates(ds, columns=["solution"], source="gsm8k")
    with pytest.raises(ValueError, match="gsm8k: --dedup must be"):
        drop_duplicates(ds, columns=["question"], threshold=2, source="gsm8k", flag="--dedup")


def test_row_text_flattens_conversations():
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert row_text("a", None, turns) == "a\n\nhi\nhello"
