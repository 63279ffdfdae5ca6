"""Tokenizers: GPT-2 oracle values from the shared ranks file, byte-level round trips."""

from __future__ import annotations

import numpy as np
import pytest
from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe

from jaxalign.data import Tokenizer, byte_tokenizer, gpt2_tokenizer, load_tokenizer

UNICODE_TEXT = "Héllo, wörld! 你好 🎉\n\ttabs  and   spaces\r\n' it's 3.14"


def test_gpt2_known_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" the") == [262]


def test_gpt2_special_ids(gpt2):
    assert gpt2.vocab_size == 50257
    assert gpt2.eos_id == 50256
    assert gpt2.pad_id == 50256
    assert gpt2.bos_id is None
    assert isinstance(gpt2, Tokenizer)


def test_gpt2_round_trip_unicode(gpt2):
    assert gpt2.decode(gpt2.encode(UNICODE_TEXT)) == UNICODE_TEXT


def test_special_token_text_stays_ordinary(gpt2):
    ids = gpt2.encode("a <|endoftext|> b")
    assert gpt2.eos_id not in ids
    assert gpt2.decode(ids) == "a <|endoftext|> b"


def test_encode_batch_equals_encode(gpt2):
    texts = ["Hello world", "", UNICODE_TEXT, " the"]
    assert gpt2.encode_batch(texts) == [gpt2.encode(t) for t in texts]


def test_decode_accepts_numpy(gpt2):
    assert gpt2.decode(np.array([15496, 995], dtype=np.int32)) == "Hello world"


def test_gpt2_ranks_equal_data_gym_files(shared_file, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the files directly, write no cache copies
    ranks = load_tiktoken_bpe(str(shared_file("tokenizers/gpt2/gpt2.tiktoken")))
    data_gym = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(shared_file("tokenizers/gpt2/vocab.bpe")),
        encoder_json_file=str(shared_file("tokenizers/gpt2/encoder.json")),
    )
    assert len(ranks) == 50256
    assert ranks == data_gym


def test_gpt2_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.tiktoken"
    with pytest.raises(FileNotFoundError, match="nope.tiktoken"):
        gpt2_tokenizer(missing)


def test_byte_tokenizer_round_trip():
    tok = byte_tokenizer()
    ids = tok.encode(UNICODE_TEXT)
    assert ids == list(UNICODE_TEXT.encode("utf-8"))
    assert tok.decode(ids) == UNICODE_TEXT
    assert (tok.vocab_size, tok.eos_id, tok.pad_id, tok.bos_id) == (257, 256, 256, None)
    assert tok.eos_id not in tok.encode("<|endoftext|>")


def test_load_tokenizer_specs(shared_file):
    assert load_tokenizer(None).vocab_size == 257
    assert load_tokenizer("bytes").vocab_size == 257
    path = shared_file("tokenizers/gpt2/gpt2.tiktoken")
    assert load_tokenizer(str(path)).encode("Hello world") == [15496, 995]


def test_load_tokenizer_rejects_unknown_spec():
    with pytest.raises(ValueError, match="bytes.*gpt2.*tiktoken"):
        load_tokenizer("llama.vocab")
