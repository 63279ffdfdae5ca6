"""Tokenizers: GPT-2 oracle values from the shared ranks file, byte-level round trips, and the
stories260K SentencePiece model checked against its llama2.c ``tok512.bin`` export."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe

from jaxalign.data import (
    SentencePieceTokenizer,
    Tokenizer,
    byte_tokenizer,
    gpt2_tokenizer,
    load_tokenizer,
    sentencepiece_tokenizer,
)

UNICODE_TEXT = "Héllo, wörld! 你好 🎉\n\ttabs  and   spaces\r\n' it's 3.14"
STORY_TEXT = "Once upon a time, there was a little girl."
TOK512_MODEL = "models/stories260K/tok512.model"
TOK512_BIN = "models/stories260K/tok512.bin"


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
    with pytest.raises(ValueError, match="bytes.*gpt2.*tiktoken.*SentencePiece"):
        load_tokenizer("llama.vocab")


# --- SentencePiece: stories260K's tok512.model ------------------------------------------------


@pytest.fixture(scope="module")
def tok512(shared_file: Callable[[str], Path]) -> SentencePieceTokenizer:
    """The 512-piece BPE SentencePiece tokenizer of stories260K (byte fallback, BOS=1, EOS=2)."""
    return sentencepiece_tokenizer(shared_file(TOK512_MODEL))


def read_llama2c_tokenizer(path: Path) -> tuple[int, list[bytes], list[float]]:
    """Parse a llama2.c ``tokenizer.bin``: int32 max_token_length, then per id
    {float32 score, int32 len, len bytes}. Returns (max_token_length, pieces, scores)."""
    data = path.read_bytes()
    (max_token_length,) = struct.unpack_from("<i", data, 0)
    offset, pieces, scores = 4, [], []
    while offset < len(data):
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        pieces.append(data[offset : offset + length])
        scores.append(score)
        offset += length
    assert offset == len(data)
    return max_token_length, pieces, scores


def test_sentencepiece_special_ids(tok512):
    assert tok512.vocab_size == 512
    assert (tok512.bos_id, tok512.eos_id) == (1, 2)
    assert tok512.pad_id == tok512.eos_id == 2  # tok512.model defines no pad piece
    assert isinstance(tok512, Tokenizer)


def test_sentencepiece_round_trip_without_bos_eos(tok512):
    ids = tok512.encode(STORY_TEXT)
    assert ids and tok512.bos_id not in ids and tok512.eos_id not in ids
    assert tok512.decode(ids) == STORY_TEXT
    # collation prepends BOS / appends EOS; control pieces decode to nothing
    assert tok512.decode([tok512.bos_id, *ids, tok512.eos_id]) == STORY_TEXT


@pytest.mark.parametrize("text", ["日本", "🎉", "Tom said: 日本 🎉 ok."])
def test_sentencepiece_byte_fallback_round_trip(tok512, text):
    ids = tok512.encode(text)
    assert tok512.decode(ids) == text
    byte_pieces = [i for i in ids if tok512.processor.is_byte(i)]
    assert byte_pieces, "characters outside the 512-piece vocabulary should use <0xNN> pieces"
    assert tok512.processor.unk_id() not in ids


def test_sentencepiece_special_token_text_stays_ordinary(tok512):
    ids = tok512.encode("a <s> b </s> c")
    assert tok512.bos_id not in ids and tok512.eos_id not in ids
    assert tok512.decode(ids) == "a <s> b </s> c"


def test_sentencepiece_encode_batch_equals_encode(tok512):
    texts = [STORY_TEXT, "", "日本 🎉", "The cat sat.", UNICODE_TEXT]
    assert tok512.encode_batch(texts) == [tok512.encode(t) for t in texts]
    assert tok512.encode_batch(tuple(texts)) == tok512.encode_batch(texts)


def test_sentencepiece_decode_accepts_numpy(tok512):
    ids = tok512.encode(STORY_TEXT)
    assert tok512.decode(np.array(ids, dtype=np.int32)) == STORY_TEXT


def test_sentencepiece_pieces_and_scores_equal_llama2c_export(tok512, shared_file):
    """tok512.bin was written by llama2.c's ``Tokenizer.export`` from the same model. That export
    stores BOS as ``"\\n<s>\\n"`` and EOS as ``"\\n</s>\\n"``, replaces every "▁" (U+2581, the
    SentencePiece word-boundary mark) with a plain space, keeps byte pieces as the text
    ``"<0xNN>"``, and writes UTF-8. We invert exactly that; the inversion is unambiguous because no
    SentencePiece piece contains a plain space."""
    max_token_length, raw_pieces, scores = read_llama2c_tokenizer(shared_file(TOK512_BIN))
    sp = tok512.processor
    assert len(raw_pieces) == tok512.vocab_size == 512

    model_pieces = [sp.id_to_piece(i) for i in range(512)]
    assert not any(" " in p for p in model_pieces)
    assert raw_pieces[tok512.bos_id] == b"\n<s>\n" and raw_pieces[tok512.eos_id] == b"\n</s>\n"
    bin_pieces = [p.decode("utf-8").replace(" ", "\u2581") for p in raw_pieces]
    bin_pieces[tok512.bos_id] = "<s>"
    bin_pieces[tok512.eos_id] = "</s>"
    assert bin_pieces == model_pieces
    assert sum("\u2581" in p for p in model_pieces) == 91  # the "▁" mapping is really exercised

    assert scores == [sp.get_score(i) for i in range(512)]  # both are float32 values
    assert max_token_length == max(len(p) for p in raw_pieces)


def test_load_tokenizer_sentencepiece(shared_file):
    path = shared_file(TOK512_MODEL)
    for spec in (str(path), path):
        tok = load_tokenizer(spec)
        assert isinstance(tok, SentencePieceTokenizer)
        assert tok.vocab_size == 512
        assert tok.decode(tok.encode(STORY_TEXT)) == STORY_TEXT


def test_sentencepiece_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        sentencepiece_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(str(missing))
