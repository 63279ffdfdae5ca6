"""Tokenisation masks, truncation, buckets, static-shape collation and resumable batch streams."""

from __future__ import annotations

import dataclasses
import functools
import itertools

import datasets
import numpy as np
import pytest

from jaxalign.data import (
    BatchStream,
    Example,
    PreferenceExample,
    bucket_length,
    byte_tokenizer,
    collate_preference,
    collate_sft,
    default_buckets,
    eval_batches,
    load_sft_dataset,
    tokenize_preference,
    tokenize_prompt_completion,
    tokenize_sft,
)

EOS = 256  # byte tokenizer


def ids(text: str) -> list[int]:
    """Byte-tokenizer ids of ``text``."""
    return list(text.encode())


def assert_batches_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ---------------------------------------------------------------------------------- tokenise


def test_mask_exactly_on_completion_and_eos(byte_tok):
    tokens, mask = tokenize_prompt_completion(byte_tok, "ab", "cd", max_length=16)
    assert tokens.dtype == np.int32 and mask.dtype == np.float32
    np.testing.assert_array_equal(tokens, ids("abcd") + [EOS])
    np.testing.assert_array_equal(mask, [0, 0, 1, 1, 1])


def test_no_eos_when_not_appended(byte_tok):
    tokens, mask = tokenize_prompt_completion(
        byte_tok, "ab", "cd", max_length=16, append_eos=False
    )
    np.testing.assert_array_equal(tokens, ids("abcd"))
    np.testing.assert_array_equal(mask, [0, 0, 1, 1])


def test_bos_is_prepended_with_mask_zero(byte_tok):
    @dataclasses.dataclass(frozen=True)
    class WithBos:  # a byte tokenizer whose vocabulary has a BOS id
        bos_id: int = 300
        eos_id: int = EOS
        encode = staticmethod(byte_tok.encode)

    tokens, mask = tokenize_prompt_completion(WithBos(), "ab", "c", max_length=4)
    np.testing.assert_array_equal(tokens, [300, ord("b"), ord("c"), EOS])
    np.testing.assert_array_equal(mask, [0, 0, 1, 1])


def test_truncation_left_truncates_prompt_first(byte_tok):
    tokens, mask = tokenize_prompt_completion(byte_tok, "abcdef", "xyz", max_length=6)
    np.testing.assert_array_equal(tokens, ids("efxyz") + [EOS])
    np.testing.assert_array_equal(mask, [0, 0, 1, 1, 1, 1])


def test_truncation_keeps_one_prompt_token_then_cuts_completion(byte_tok):
    tokens, mask = tokenize_prompt_completion(byte_tok, "abc", "0123456789", max_length=5)
    np.testing.assert_array_equal(tokens, ids("c0123"))  # EOS cut with the completion's tail
    np.testing.assert_array_equal(mask, [0, 1, 1, 1, 1])


def test_too_small_max_length(byte_tok):
    with pytest.raises(ValueError, match="max_length=1"):
        tokenize_prompt_completion(byte_tok, "a", "b", max_length=1)


def test_tokenize_sft_matches_single_example_path(byte_tok):
    ds = datasets.Dataset.from_dict({"prompt": ["ab", "hello "], "completion": ["c", "world"]})
    examples = tokenize_sft(ds, byte_tok, max_length=8)
    for example, row in zip(examples, ds):
        expected = tokenize_prompt_completion(
            byte_tok, row["prompt"], row["completion"], max_length=8
        )
        np.testing.assert_array_equal(example.tokens, expected.tokens)
        np.testing.assert_array_equal(example.mask, expected.mask)


def test_tokenize_real_sft_file_with_gpt2(shared_file, gpt2):
    ds = load_sft_dataset(shared_file("sft/instruction-data.json"))
    examples = tokenize_sft(ds, gpt2, max_length=256)
    assert len(examples) == 1100
    assert max(len(e.tokens) for e in examples) <= 256
    for example, completion in zip(examples[:50], ds["completion"][:50]):
        if len(example.tokens) < 256:  # untruncated: the masked tokens are completion + EOS
            assert gpt2.decode(example.tokens[example.mask == 1]) == completion + "<|endoftext|>"


def test_tokenize_preference_pairs_share_prompt(byte_tok):
    ds = datasets.Dataset.from_dict({"prompt": ["q:"], "chosen": ["yes"], "rejected": ["no!!"]})
    [pair] = tokenize_preference(ds, byte_tok, max_length=32)
    np.testing.assert_array_equal(pair.chosen.tokens, ids("q:yes") + [EOS])
    np.testing.assert_array_equal(pair.rejected.tokens, ids("q:no!!") + [EOS])
    np.testing.assert_array_equal(pair.rejected.mask, [0, 0, 1, 1, 1, 1, 1])


# ---------------------------------------------------------------------------------- buckets


@pytest.mark.parametrize(("n", "expected"), [(1, 32), (32, 32), (33, 64), (128, 128), (500, 128)])
def test_bucket_length(n, expected):
    assert bucket_length(n, (64, 32, 128)) == expected


def test_bucket_length_needs_buckets():
    with pytest.raises(ValueError):
        bucket_length(3, ())


def test_default_buckets():
    assert default_buckets(256) == (32, 64, 128, 256)
    assert default_buckets(200) == (32, 64, 128, 200)
    assert default_buckets(16) == (16,)
    assert default_buckets(40, min_bucket=8) == (8, 16, 32, 40)


# ---------------------------------------------------------------------------------- collate


def example(prompt: str, completion: str) -> Example:
    return tokenize_prompt_completion(byte_tokenizer(), prompt, completion, max_length=64)


def test_collate_sft_static_shapes_and_filler_rows():
    examples = [example("ab", "c"), example("abcd", "efghij")]  # lengths 4 and 11
    batch = collate_sft(examples, batch_size=4, buckets=(8, 16, 32), pad_id=EOS)
    assert set(batch) == {"tokens", "mask"}
    assert batch["tokens"].shape == batch["mask"].shape == (4, 16)
    assert batch["tokens"].dtype == np.int32 and batch["mask"].dtype == np.float32
    np.testing.assert_array_equal(batch["tokens"][0, :4], examples[0].tokens)
    np.testing.assert_array_equal(batch["mask"][0], np.pad(examples[0].mask, (0, 12)))
    assert (batch["tokens"][0, 4:] == EOS).all()
    assert (batch["tokens"][2:] == EOS).all() and (batch["mask"][2:] == 0).all()
    assert (batch["mask"].sum(-1) > 0).tolist() == [True, True, False, False]


def test_collate_sft_truncates_beyond_largest_bucket():
    batch = collate_sft([example("abcdef", "ghij")], batch_size=1, buckets=(4,), pad_id=EOS)
    np.testing.assert_array_equal(batch["tokens"], [ids("abcd")])


def test_collate_rejects_bad_counts():
    with pytest.raises(ValueError, match="batch_size=1"):
        collate_sft([example("a", "b")] * 2, batch_size=1, buckets=(8,), pad_id=EOS)
    with pytest.raises(ValueError):
        collate_sft([], batch_size=1, buckets=(8,), pad_id=EOS)


def test_collate_preference_equal_lengths():
    pairs = [
        PreferenceExample(example("ab", "c"), example("ab", "a much longer rejected answer")),
        PreferenceExample(example("abc", "d"), example("abc", "e")),
    ]
    batch = collate_preference(pairs, batch_size=3, buckets=(8, 16, 32, 64), pad_id=EOS)
    assert set(batch) == {"chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask"}
    assert {v.shape for v in batch.values()} == {(3, 32)}
    np.testing.assert_array_equal(batch["rejected_tokens"][0, :32], pairs[0].rejected.tokens)
    assert (batch["chosen_mask"][2] == 0).all() and (batch["rejected_mask"][2] == 0).all()


# ---------------------------------------------------------------------------------- streams


def index_stream(n: int = 10, batch_size: int = 3, seed: int = 0, **kw) -> BatchStream:
    """A stream over the integers ``0..n-1`` whose batches are the chosen indices."""
    collate = lambda xs: {"ids": np.array(xs)}  # noqa: E731
    return BatchStream(list(range(n)), batch_size=batch_size, seed=seed, collate=collate, **kw)


def test_batch_at_is_reproducible_and_matches_iteration():
    stream = index_stream()
    iterated = list(itertools.islice(stream, 12))
    for step in (0, 4, 7, 11):
        assert_batches_equal(index_stream().batch_at(step), iterated[step])
        assert_batches_equal(stream.batch_at(step), iterated[step])


def test_iter_from_is_the_tail_of_full_iteration():
    full = list(itertools.islice(index_stream(), 12))
    resumed = list(itertools.islice(index_stream().iter_from(5), 7))
    for a, b in zip(resumed, full[5:], strict=True):
        assert_batches_equal(a, b)


def test_epochs_are_distinct_permutations():
    stream = index_stream(n=10, batch_size=3)
    assert stream.steps_per_epoch == 3  # drop_last: the 10th example waits for another epoch
    epochs = [
        np.concatenate([stream.batch_at(epoch * 3 + s)["ids"] for s in range(3)])
        for epoch in range(3)
    ]
    for order in epochs:
        assert len(set(order.tolist())) == 9
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(index_stream(seed=1).batch_at(0)["ids"], epochs[0][:3])


def test_keep_last_batch():
    stream = index_stream(n=10, batch_size=3, drop_last=False)
    assert stream.steps_per_epoch == 4
    epoch = [stream.batch_at(s)["ids"] for s in range(4)]
    assert [len(b) for b in epoch] == [3, 3, 3, 1]
    assert sorted(np.concatenate(epoch).tolist()) == list(range(10))


def test_stream_errors():
    with pytest.raises(ValueError, match="fewer than batch_size"):
        index_stream(n=2, batch_size=3)
    with pytest.raises(ValueError, match="step"):
        index_stream().batch_at(-1)


def test_stream_with_collate_sft_has_static_shapes():
    examples = [example("p" * k, "c" * (k % 5 + 1)) for k in range(1, 20)]
    collate = functools.partial(collate_sft, batch_size=4, buckets=(16, 32), pad_id=EOS)
    stream = BatchStream(examples, batch_size=4, seed=3, collate=collate)
    for batch in itertools.islice(stream, 10):
        assert batch["tokens"].shape[0] == 4 and batch["tokens"].shape[1] in (16, 32)


def test_eval_batches_cover_everything_in_order():
    examples = [example("p", "c" * k) for k in range(1, 8)]
    collate = functools.partial(collate_sft, batch_size=3, buckets=(16,), pad_id=EOS)
    batches = list(eval_batches(examples, batch_size=3, collate=collate))
    assert [b["tokens"].shape for b in batches] == [(3, 16)] * 3
    rows = np.concatenate([b["tokens"] for b in batches])
    for row, ex in zip(rows, examples):
        np.testing.assert_array_equal(row[: len(ex.tokens)], ex.tokens)
    assert (batches[-1]["mask"][1:] == 0).all()
