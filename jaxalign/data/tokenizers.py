"""Tokenizers behind one small protocol: GPT-2 BPE and a byte-level vocabulary (both on tiktoken),
SentencePiece models (e.g. the Llama-style ``tok512.model`` of stories260K), and Hugging Face
checkpoints' ``tokenizer.json`` (on the ``tokenizers`` library, never ``transformers``).

Every tokenizer here encodes *ordinary* text: special-token strings such as ``"<|endoftext|>"`` or
``"<s>"`` that appear in user data are split into ordinary tokens, so data can never inject an EOS.
Special ids are added by the collation code (``jaxalign.data.collate``) through ``bos_id`` /
``eos_id``, or written by a model's chat template (``HFTokenizer.encode_rendered``, used only on
template output by ``jaxalign.data.chat``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import huggingface_hub
import sentencepiece
import tiktoken
import tokenizers
from huggingface_hub.errors import EntryNotFoundError
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

from jaxalign.data.chat import ChatTemplate

__all__ = [
    "Tokenizer",
    "TiktokenTokenizer",
    "SentencePieceTokenizer",
    "HFTokenizer",
    "gpt2_tokenizer",
    "byte_tokenizer",
    "sentencepiece_tokenizer",
    "hf_tokenizer",
    "load_tokenizer",
]

GPT2_EOS_ID = 50256  # "<|endoftext|>" in GPT-2 / r50k_base: right after the 50,256 BPE ranks


@runtime_checkable
class Tokenizer(Protocol):
    """What the data layer needs from a tokenizer (tiktoken, SentencePiece or Hugging Face).

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


# --- Hugging Face checkpoints: tokenizer.json on the `tokenizers` library --------------------------

# transformers 5.24 `SPECIAL_TOKENS_ATTRIBUTES`: the named special tokens a checkpoint may set.
HF_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# The files of a checkpoint that describe its tokenizer (only tokenizer.json is required).
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclasses.dataclass(frozen=True)
class HFTokenizer:
    """A ``Tokenizer`` over a Hugging Face ``tokenizers.Tokenizer`` (a checkpoint's ``tokenizer.json``).

    Args:
        tokenizer: the loaded ``tokenizers.Tokenizer``; it is copied, never modified.
        eos_ids: the ids that end a generation, the main one first (``eos_id``): the checkpoint's
            ``eos_token``, then any further ``generation_config.json`` ``eos_token_id`` values
            (Llama 3.1: ``<|eot_id|>``, ``<|end_of_text|>``, ``<|eom_id|>``).
        pad_id: the filler id (``hf_tokenizer`` falls back to ``eos_id``; padding is masked).
        bos_id: the BOS id, or ``None`` if the checkpoint defines no BOS token (Qwen).
        chat_template: the checkpoint's chat template, or ``None`` (then chats use the plain format,
            see ``jaxalign.data.chat.render_conversation``).
        source: where the tokenizer came from, for error messages.

    Raises:
        ValueError: if ``eos_ids`` is empty or an id is outside ``[0, vocab_size)``.

    ``encode`` / ``encode_batch`` add no BOS/EOS (``add_special_tokens=False``) and treat special
    token strings in the text as ordinary text (``tokenizers``' ``encode_special_tokens``), so
    ``"<|im_end|>"`` in data never becomes the EOS id. Added tokens that the checkpoint does not
    mark special (e.g. Qwen's ``<tool_call>``) are still matched, as ``transformers`` does.
    ``encode_rendered`` is for chat-template output only: there special tokens are recognised.
    Ids equal ``transformers`` 5.24 ``AutoTokenizer`` ``encode(text, add_special_tokens=False)`` with
    ``split_special_tokens=True``; ``decode`` keeps special tokens and applies no
    ``clean_up_tokenization_spaces``, so byte-level BPE round-trips exactly.
    """

    tokenizer: tokenizers.Tokenizer = dataclasses.field(repr=False)
    eos_ids: tuple[int, ...]
    pad_id: int
    bos_id: int | None = None
    chat_template: ChatTemplate | None = None
    source: str = "tokenizer.json"
    _text: tokenizers.Tokenizer = dataclasses.field(init=False, repr=False, compare=False)
    _rendered: tokenizers.Tokenizer = dataclasses.field(init=False, repr=False, compare=False)
    _vocab_size: int = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        text, rendered = (tokenizers.Tokenizer.from_str(self.tokenizer.to_str()) for _ in range(2))
        for copy in (text, rendered):
            copy.no_padding()  # a tokenizer.json may carry padding/truncation settings; ids stay whole
            copy.no_truncation()
        text.encode_special_tokens = True
        rendered.encode_special_tokens = False
        object.__setattr__(self, "_text", text)
        object.__setattr__(self, "_rendered", rendered)
        object.__setattr__(self, "_vocab_size", max(rendered.get_vocab(with_added_tokens=True).values()) + 1)
        if not self.eos_ids:
            raise ValueError(f"{self.source}: no EOS id")
        ids = {"eos_ids": self.eos_ids, "pad_id": (self.pad_id,), "bos_id": () if self.bos_id is None else (self.bos_id,)}
        for name, values in ids.items():
            if any(not 0 <= int(v) < self.vocab_size for v in values):
                raise ValueError(f"{self.source}: {name} {values} outside [0, {self.vocab_size})")

    def encode(self, text: str) -> list[int]:
        """Encode ordinary text: no BOS/EOS added, special-token strings split as plain text.

        Args:
            text: any Python string.

        Returns:
            list[int] of token ids, each in ``[0, vocab_size)``.
        """
        return self._text.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many strings with ``tokenizers``' parallel ``encode_batch``.

        Args:
            texts: sequence of strings.

        Returns:
            list of ``len(texts)`` id lists, equal to ``[encode(t) for t in texts]``.
        """
        return [e.ids for e in self._text.encode_batch(list(texts), add_special_tokens=False)]

    def encode_rendered(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Encode chat-template output, where special-token strings *are* the special ids.

        Only for text a chat template rendered from validated messages (``jaxalign.data.chat``
        refuses content containing special tokens); never for raw data.

        Args:
            text: rendered chat text.

        Returns:
            ``(ids, offsets)``: the ids (no BOS/EOS added beyond what the text spells, as
            transformers' ``apply_chat_template(tokenize=True)``) and each token's ``(start, end)``
            character offsets into ``text``.
        """
        encoding = self._rendered.encode(text, add_special_tokens=False)
        return encoding.ids, [tuple(o) for o in encoding.offsets]

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids with the checkpoint's decoder, special tokens kept as their text.

        Args:
            ids: sequence of Python or NumPy integers in ``[0, vocab_size)``.

        Returns:
            The decoded string; ``decode(encode(s)) == s`` for byte-level BPE (invalid UTF-8 byte
            runs become U+FFFD).
        """
        return self._rendered.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def eos_id(self) -> int:
        """The checkpoint's EOS id: ``eos_ids[0]``."""
        return self.eos_ids[0]

    @property
    def vocab_size(self) -> int:
        """``max id + 1`` over the whole vocabulary, added tokens included (``len(AutoTokenizer)``)."""
        return self._vocab_size

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """The strings of the added tokens marked special, in id order (what chat content may not
        contain)."""
        added = self._rendered.get_added_tokens_decoder()
        return tuple(added[i].content for i in sorted(added) if added[i].special)

    @property
    def add_bos(self) -> bool:
        """Whether the checkpoint's post-processor prepends ``bos_id`` (Llama 3 and Gemma: True;
        Qwen: False), so collation knows whether sequences start with BOS. ``encode`` itself never
        adds it."""
        if self.bos_id is None:
            return False
        plain = self._text.encode("a", add_special_tokens=False).ids
        processed = self._text.encode("a", add_special_tokens=True).ids
        return len(processed) > len(plain) and processed[0] == self.bos_id


def _read_json(path: Path | None) -> dict[str, Any]:
    """A checkpoint's JSON object file, ``{}`` if absent."""
    if path is None:
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _token_text(value: Any, path: Path, field: str) -> str | None:
    """A named token's text from its config form: a string, ``{"content": ...}`` or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{path}: field {field!r} must be a string, a {{'content': str}} object or null, got {value!r}")


def _named_tokens(files: Mapping[str, Path | None], config: Mapping[str, Any]) -> dict[str, tuple[str, Path]]:
    """The checkpoint's named special tokens with the file each came from, as transformers 5.24
    resolves them: from ``tokenizer_config.json``; ``special_tokens_map.json`` is read only for a
    config without ``added_tokens_decoder`` (the legacy layout), and then its values win."""
    config_path = files["tokenizer_config.json"] or Path("tokenizer_config.json")
    named = {name: (_token_text(config[name], config_path, name), config_path) for name in HF_NAMED_TOKENS if name in config}
    if (map_path := files["special_tokens_map.json"]) is not None and "added_tokens_decoder" not in config:
        special_map = _read_json(map_path)
        named |= {name: (_token_text(special_map[name], map_path, name), map_path) for name in HF_NAMED_TOKENS if name in special_map}
    return {name: (text, path) for name, (text, path) in named.items() if text is not None}


def _generation_eos_ids(path: Path | None) -> list[int]:
    """``generation_config.json``'s ``eos_token_id`` (an int or a list of ints) as a list."""
    value = _read_json(path).get("eos_token_id")
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{path}: field 'eos_token_id' must be an int or a list of ints, got {value!r}")
    return values


def _chat_template_source(files: Mapping[str, Path | None], config: Mapping[str, Any]) -> str | None:
    """The template as transformers 5.24 picks it: ``chat_template.jinja`` over the config's
    ``chat_template`` (a string, or a list of ``{"name", "template"}`` from which ``"default"``)."""
    if (jinja_path := files["chat_template.jinja"]) is not None:
        return jinja_path.read_text(encoding="utf-8")
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    path = files["tokenizer_config.json"]
    if isinstance(value, list) and all(isinstance(t, Mapping) and {"name", "template"} <= t.keys() for t in value):
        named = {t["name"]: t["template"] for t in value}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ValueError(f"{path}: field 'chat_template' lists templates {sorted(named)} but none named 'default'")
    raise ValueError(f"{path}: field 'chat_template' must be a string or a list of {{name, template}} objects")


def _checkpoint_files(path_or_hub_id: str | os.PathLike, revision: str | None) -> dict[str, Path | None]:
    """Local paths of ``HF_TOKENIZER_FILES`` (``None`` for absent optional ones), downloading them
    with ``huggingface_hub.hf_hub_download`` for a Hub id."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json (a Hugging Face checkpoint's tokenizer file)")
        return {name: path / name if (path / name).is_file() else None for name in HF_TOKENIZER_FILES}
    if path.exists() or not (isinstance(path_or_hub_id, str) and _HUB_ID.fullmatch(path_or_hub_id)):
        raise FileNotFoundError(f"not a checkpoint directory with a tokenizer.json, nor a Hub id 'org/name': {path}")
    files: dict[str, Path | None] = {}
    for name in HF_TOKENIZER_FILES:
        try:
            files[name] = Path(huggingface_hub.hf_hub_download(path_or_hub_id, name, revision=revision))
        except EntryNotFoundError:
            if name == "tokenizer.json":
                raise
            files[name] = None
    return files


def _token_id(tokenizer: tokenizers.Tokenizer, text: str, source: Path, field: str) -> int:
    token_id = tokenizer.token_to_id(text)
    if token_id is None:
        raise ValueError(f"{source}: {field} {text!r} is not in the vocabulary of tokenizer.json")
    return token_id


def hf_tokenizer(path_or_hub_id: str | os.PathLike, *, revision: str | None = None) -> HFTokenizer:
    """Load a Hugging Face checkpoint's tokenizer without ``transformers``.

    Reads ``tokenizer.json`` (required), and if present ``tokenizer_config.json`` (named special
    tokens as strings or ``{"content": ...}`` objects; ``chat_template``),
    ``special_tokens_map.json`` (legacy configs only, as transformers 5.24), ``chat_template.jinja``
    (wins over the config's template) and ``generation_config.json`` (``eos_token_id``, an int or a
    list: extra stop ids).

    Args:
        path_or_hub_id: a checkpoint directory, or a Hub id ``"org/name"`` that is not a local path
            (downloaded with ``huggingface_hub.hf_hub_download``; needs network or a warm cache).
        revision: the Hub revision (branch, tag or commit); ignored for a directory.

    Raises:
        FileNotFoundError: if the directory has no ``tokenizer.json``, or the spec is neither a
            directory nor a Hub id.
        ValueError: naming the file and field, for a malformed config, a named token that is not in
            the vocabulary, no EOS at all (neither ``eos_token`` nor ``eos_token_id``), or a list of
            chat templates without ``"default"``; or if ``tokenizer.json`` does not parse.
        jinja2.TemplateSyntaxError: if the chat template does not parse.
        huggingface_hub.errors.HfHubHTTPError: for download failures of a Hub id.

    Returns:
        An ``HFTokenizer``: ``eos_id`` from ``eos_token`` (else the first generation-config id),
        ``bos_id`` from ``bos_token`` (``None`` without one), ``pad_id`` from ``pad_token`` (else
        ``eos_id``), and the chat template with the named tokens as its variables.
    """
    files = _checkpoint_files(path_or_hub_id, revision)
    tokenizer_path = files["tokenizer.json"]
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_path))
    except Exception as error:  # tokenizers raises a bare Exception for a malformed file
        raise ValueError(f"{tokenizer_path}: not a valid tokenizers file ({error})") from error
    config = _read_json(files["tokenizer_config.json"])
    named_with_sources = _named_tokens(files, config)
    named = {name: text for name, (text, _) in named_with_sources.items()}
    ids = {name: _token_id(tokenizer, text, where, name) for name, (text, where) in named_with_sources.items()}
    eos_ids = list(dict.fromkeys(([ids["eos_token"]] if "eos_token" in ids else []) + _generation_eos_ids(files["generation_config.json"])))
    if not eos_ids:
        raise ValueError(
            f"{tokenizer_path.parent}: no EOS token: tokenizer_config.json has no 'eos_token' and "
            "generation_config.json no 'eos_token_id'"
        )
    source = _chat_template_source(files, config)
    template = None
    if source is not None:
        others = {name: text for name, text in named.items() if name not in ("bos_token", "eos_token")}
        template = ChatTemplate(source, bos_token=named.get("bos_token"), eos_token=named.get("eos_token"), extra_tokens=others)
    return HFTokenizer(
        tokenizer,
        eos_ids=tuple(eos_ids),
        pad_id=ids.get("pad_token", eos_ids[0]),
        bos_id=ids.get("bos_token"),
        chat_template=template,
        source=str(tokenizer_path.parent),
    )


def load_tokenizer(spec: str | os.PathLike | None) -> Tokenizer:
    """Build a tokenizer from a config string.

    Args:
        spec: ``None`` or ``"bytes"`` -> ``byte_tokenizer()``; ``"gpt2"`` -> ``gpt2_tokenizer()``
            (online); a path ending in ``.tiktoken`` -> ``gpt2_tokenizer(path)`` (GPT-2 pattern
            and ``<|endoftext|>`` = 50256); a path ending in ``.model`` ->
            ``sentencepiece_tokenizer(path)``; a directory holding ``tokenizer.json`` (a Hugging
            Face checkpoint), or a ``tokenizer.json`` file, -> ``hf_tokenizer(directory)``; a Hub id
            ``"org/name"`` that is not a local path -> ``hf_tokenizer(spec)`` (online).

    Raises:
        ValueError: for any other spec (e.g. a directory without ``tokenizer.json``), and as
            ``hf_tokenizer`` for a malformed checkpoint.
        FileNotFoundError: if a ``.tiktoken`` or ``.model`` path does not exist.

    Returns:
        An object satisfying the ``Tokenizer`` protocol.
    """
    if spec is None or spec == "bytes":
        return byte_tokenizer()
    if spec == "gpt2":
        return gpt2_tokenizer()
    path = Path(spec)
    if path.suffix == ".tiktoken":
        return gpt2_tokenizer(spec)
    if path.suffix == ".model":
        return sentencepiece_tokenizer(spec)
    if (path / "tokenizer.json").is_file():
        return hf_tokenizer(path)
    if path.name == "tokenizer.json" and path.is_file():
        return hf_tokenizer(path.parent)
    if isinstance(spec, str) and not path.exists() and _HUB_ID.fullmatch(spec):
        return hf_tokenizer(spec)
    raise ValueError(
        f"unknown tokenizer {spec!r}: expected None or 'bytes' (byte-level), 'gpt2' (download), "
        "a path to a GPT-2 '.tiktoken' ranks file, a path to a SentencePiece '.model' file, "
        "a Hugging Face checkpoint directory holding 'tokenizer.json', or a Hub id 'org/name'"
    )
