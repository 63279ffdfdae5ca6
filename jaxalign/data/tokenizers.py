"""Tokenizers behind one small protocol: GPT-2 BPE and a byte-level vocabulary (both on tiktoken),
and SentencePiece models (e.g. the Llama-style ``tok512.model`` of stories260K).

Every tokenizer here encodes *ordinary* text: special-token strings such as ``"<|endoftext|>"`` or
``"<s>"`` that appear in user data are split into ordinary tokens, so data can never inject an EOS.
Special ids are added by the collation code (``jaxalign.data.collate``) through ``bos_id`` /
``eos_id``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import sentencepiece
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

__all__ = [
    "Tokenizer",
    "TiktokenTokenizer",
    "SentencePieceTokenizer",
    "gpt2_tokenizer",
    "byte_tokenizer",
    "sentencepiece_tokenizer",
    "load_tokenizer",
]

GPT2_EOS_ID = 50256  # "<|endoftext|>" in GPT-2 / r50k_base: right after the 50,256 BPE ranks


@runtime_checkable
class Tokenizer(Protocol):
    """What the data layer needs from a tokenizer (tiktoken or SentencePiece).

    ``encode`` / ``encode_batch`` never produce special tokens from text; ``bos_id`` is ``None``
    when the vocabulary has no beginning-of-sequence token (GPT-2). ``pad_id`` is only a filler:
    padded positions always carry mask 0.
    """

    def encode(self, text: str) -> list[int]:
        """Encode one string to token ids (special-token text stays ordinary text)."""
        ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many strings; equal to ``[encode(t) for t in texts]``, possibly faster."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Decode token ids (Python or NumPy integers) back to text."""
        ...

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or ``None`` if the vocabulary has none."""
        ...

    @property
    def eos_id(self) -> int:
        """End-of-sequence id appended after each completion."""
        ...

    @property
    def pad_id(self) -> int:
        """Id used to fill padded positions (always masked out)."""
        ...

    @property
    def vocab_size(self) -> int:
        """Number of ids, i.e. ``max id + 1``; the model's embedding rows."""
        ...


@dataclasses.dataclass(frozen=True)
class TiktokenTokenizer:
    """A ``Tokenizer`` over a ``tiktoken.Encoding`` whose end-of-text token is ``<|endoftext|>``.

    Args:
        encoding: a ``tiktoken.Encoding`` with ``"<|endoftext|>"`` among its special tokens.

    Raises:
        ValueError: if the encoding has no ``"<|endoftext|>"`` special token.

    Follows the GPT-2 convention: no BOS token, ``pad_id == eos_id`` (padding is masked anyway).
    """

    encoding: tiktoken.Encoding

    def __post_init__(self) -> None:
        if ENDOFTEXT not in self.encoding.special_tokens_set:
            raise ValueError(
                f"tiktoken encoding {self.encoding.name!r} has no {ENDOFTEXT!r} special token"
            )

    def encode(self, text: str) -> list[int]:
        """Encode ``text`` with ``encode_ordinary``: special-token text becomes ordinary tokens.

        Args:
            text: any Python string.

        Returns:
            list[int] of token ids, each in ``[0, vocab_size)``.
        """
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many strings in parallel (``encode_ordinary_batch``, tiktoken's thread pool).

        Args:
            texts: sequence of strings.

        Returns:
            list of ``len(texts)`` token-id lists, equal to ``[encode(t) for t in texts]``.
        """
        return self.encoding.encode_ordinary_batch(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text; invalid UTF-8 byte sequences become U+FFFD.

        Args:
            ids: sequence of Python or NumPy integers in ``[0, vocab_size)``.

        Returns:
            The decoded string.
        """
        return self.encoding.decode([int(i) for i in ids])

    @property
    def bos_id(self) -> None:
        """Always ``None``: GPT-2-style vocabularies have no BOS token."""
        return None

    @property
    def eos_id(self) -> int:
        """The id of ``"<|endoftext|>"``."""
        return self.encoding.eot_token

    @property
    def pad_id(self) -> int:
        """Equal to ``eos_id`` (GPT-2 convention; padded positions are always masked)."""
        return self.eos_id

    @property
    def vocab_size(self) -> int:
        """``encoding.n_vocab``: number of ranks plus special tokens."""
        return self.encoding.n_vocab


def gpt2_tokenizer(path: str | os.PathLike | None = None) -> TiktokenTokenizer:
    """The GPT-2 BPE tokenizer (50,257 ids, ``<|endoftext|>`` = 50256).

    Args:
        path: a local tiktoken ranks file (``gpt2.tiktoken`` / ``r50k_base.tiktoken``: one
            ``base64token rank`` per line). ``None`` loads tiktoken's ``"gpt2"`` encoding, which
            downloads its files on first use (needs network or a warm ``TIKTOKEN_CACHE_DIR``).

    Raises:
        FileNotFoundError: if ``path`` is given and is not a file.
        ValueError: if the file is not a valid ranks file (raised by tiktoken).

    Returns:
        A ``TiktokenTokenizer`` using tiktoken's own GPT-2 split pattern (``r50k_pat_str``).
    """
    if path is None:
        return TiktokenTokenizer(tiktoken.get_encoding("gpt2"))
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tiktoken ranks file not found: {path}")
    # tiktoken caches file contents under a key derived from the path string only; passing the
    # current content hash makes it re-read a file that was replaced in place.
    ranks = load_tiktoken_bpe(
        str(path), expected_hash=hashlib.sha256(path.read_bytes()).hexdigest()
    )
    encoding = tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: GPT2_EOS_ID},
    )
    return TiktokenTokenizer(encoding)


def byte_tokenizer() -> TiktokenTokenizer:
    """A byte-level vocabulary for models trained from scratch: ids 0..255 are bytes, 256 is EOS.

    No merges, so any UTF-8 string round-trips exactly and ``len(encode(s)) == len(s.encode())``.

    Returns:
        A ``TiktokenTokenizer`` with ``vocab_size == 257`` and ``eos_id == pad_id == 256``.
    """
    encoding = tiktoken.Encoding(
        name="bytes",
        pat_str=r50k_pat_str,  # only chunks the text; without merges every byte is one token
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={ENDOFTEXT: 256},
    )
    return TiktokenTokenizer(encoding)


@dataclasses.dataclass(frozen=True)
class SentencePieceTokenizer:
    """A ``Tokenizer`` over a loaded ``sentencepiece.SentencePieceProcessor``.

    Args:
        processor: a ``SentencePieceProcessor`` with a model loaded and an EOS piece
            (``processor.eos_id() >= 0``).

    Raises:
        ValueError: if the model has no EOS piece.

    ``encode`` adds no BOS/EOS (collation adds them). Control pieces (``<s>``, ``</s>``, ``<pad>``)
    are never produced from text, so ``"<s>"`` in data is ordinary text; SentencePiece does match
    *user-defined* pieces in text, so models meant for this library should not define special
    tokens as user-defined pieces. ``bos_id`` is ``None`` if the model has no BOS piece; ``pad_id``
    is the model's pad piece if it has one, else ``eos_id`` (padding is masked anyway).
    """

    processor: sentencepiece.SentencePieceProcessor

    def __post_init__(self) -> None:
        if self.processor.eos_id() < 0:
            raise ValueError("SentencePiece model has no EOS piece (eos_id is -1)")

    def encode(self, text: str) -> list[int]:
        """Encode ``text`` to piece ids, without BOS/EOS.

        The model's normalizer runs first: with SentencePiece's defaults (as in ``tok512.model``)
        leading, trailing and repeated whitespace is collapsed, so only normalised text round-trips
        exactly. With byte fallback, characters outside the vocabulary become ``<0xNN>`` pieces.

        Args:
            text: any Python string.

        Returns:
            list[int] of piece ids, each in ``[0, vocab_size)``.
        """
        return self.processor.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many strings with the processor's batch ``encode`` (its own thread pool).

        Args:
            texts: sequence of strings.

        Returns:
            list of ``len(texts)`` piece-id lists, equal to ``[encode(t) for t in texts]``.
        """
        return self.processor.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text; control pieces (BOS/EOS/pad) decode to nothing, and byte pieces that
        do not form valid UTF-8 become U+FFFD.

        Args:
            ids: sequence of Python or NumPy integers in ``[0, vocab_size)``.

        Raises:
            IndexError: if an id is outside ``[0, vocab_size)`` (raised by SentencePiece).

        Returns:
            The decoded string (the leading word-boundary space is dropped).
        """
        return self.processor.decode([int(i) for i in ids])

    @property
    def bos_id(self) -> int | None:
        """The model's BOS id (``<s>``, 1 for Llama-style models), or ``None`` if it has none."""
        bos = self.processor.bos_id()
        return None if bos < 0 else bos

    @property
    def eos_id(self) -> int:
        """The model's EOS id (``</s>``, 2 for Llama-style models)."""
        return self.processor.eos_id()

    @property
    def pad_id(self) -> int:
        """The model's pad id if it defines one, else ``eos_id`` (padded positions are masked)."""
        pad = self.processor.pad_id()
        return self.eos_id if pad < 0 else pad

    @property
    def vocab_size(self) -> int:
        """``processor.get_piece_size()``: number of pieces, control and byte pieces included."""
        return self.processor.get_piece_size()


def sentencepiece_tokenizer(path: str | os.PathLike) -> SentencePieceTokenizer:
    """Load a SentencePiece model file (e.g. Llama's ``tokenizer.model``, stories260K's
    ``tok512.model``).

    Args:
        path: a serialized SentencePiece ``ModelProto`` (``.model`` file).

    Raises:
        FileNotFoundError: if ``path`` is not a file.
        RuntimeError: if the file is not a valid SentencePiece model (raised by SentencePiece).
        ValueError: if the model has no EOS piece.

    Returns:
        A ``SentencePieceTokenizer`` for the model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SentencePiece model file not found: {path}")
    return SentencePieceTokenizer(sentencepiece.SentencePieceProcessor(model_file=str(path)))


def load_tokenizer(spec: str | os.PathLike | None) -> Tokenizer:
    """Build a tokenizer from a config string.

    Args:
        spec: ``None`` or ``"bytes"`` -> ``byte_tokenizer()``; ``"gpt2"`` -> ``gpt2_tokenizer()``
            (online); a path ending in ``.tiktoken`` -> ``gpt2_tokenizer(path)`` (GPT-2 pattern
            and ``<|endoftext|>`` = 50256); a path ending in ``.model`` ->
            ``sentencepiece_tokenizer(path)``.

    Raises:
        ValueError: for any other spec.
        FileNotFoundError: if a ``.tiktoken`` or ``.model`` path does not exist.

    Returns:
        An object satisfying the ``Tokenizer`` protocol.
    """
    if spec is None or spec == "bytes":
        return byte_tokenizer()
    if spec == "gpt2":
        return gpt2_tokenizer()
    suffix = Path(spec).suffix
    if suffix == ".tiktoken":
        return gpt2_tokenizer(spec)
    if suffix == ".model":
        return sentencepiece_tokenizer(spec)
    raise ValueError(
        f"unknown tokenizer {spec!r}: expected None or 'bytes' (byte-level), 'gpt2' (download), "
        "a path to a GPT-2 '.tiktoken' ranks file, or a path to a SentencePiece '.model' file"
    )
