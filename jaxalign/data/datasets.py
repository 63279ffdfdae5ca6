"""Load SFT and preference data into Hugging Face ``datasets`` with one canonical schema.

SFT rows become ``{prompt, completion}``; preference rows become ``{prompt, chosen, rejected}``.
For plain-text formats these are strings, and the prompt carries the whole template up to and
including the response header, so a model's response starts right after it. TRL's conversational
formats keep their conversations: the same columns hold lists of ``{"role", "content"}`` turns
(``CONVERSATION``), rendered only at tokenisation, with the tokenizer's own chat template. The row format is detected from the column names;
rows are validated (no missing or blank required field) before any conversion, and errors name the
source, the 0-based row and the field. Conversions run in memory (``keep_in_memory=True``) so
nothing is written next to read-only data. ``dedup=`` removes exact and near-duplicate rows
(MinHash + LSH, ``jaxalign.data.dedup``) before conversion.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import gzip
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from jaxalign.data.chat import conversation_problem, messages_prompt
from jaxalign.data.dedup import DedupReport
from jaxalign.data.dedup import dedup as dedup_texts

__all__ = [
    "CONVERSATION",
    "load_records",
    "alpaca_prompt",
    "messages_prompt",
    "stack_exchange_prompt",
    "load_sft_dataset",
    "load_preference_dataset",
    "sft_view",
    "split_transcripts",
    "val_split_size",
    "train_val_split",
    "drop_duplicates",
    "row_text",
]

logger = logging.getLogger(__name__)

# Local file endings and the `datasets` builder that reads them (".gz" is decompressed by fsspec).
_FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".json.gz": "json",
    ".jsonl.gz": "json",
    ".parquet": "parquet",
}

# Raschka, LLMs-from-scratch ch07 `format_input`, plus the response header that opens the answer.
_ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
_ALPACA_RESPONSE_HEADER = "\n\n### Response:\n"

Batch = dict[str, list[Any]]

# The feature of a canonical conversational column: a list of {"role", "content"} turns.
CONVERSATION = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})


def load_records(source: str | os.PathLike, *, split: str = "train") -> datasets.Dataset:
    """Load raw rows from a local file or the Hugging Face Hub, columns as stored.

    Every loader of ``jaxalign.data`` reads through this function, so a file that ``datasets``
    cannot read is reported the same way everywhere: ``datasets.load_dataset`` runs first and,
    only if it fails, the file is examined to say where (``_explain_load_failure``).

    Args:
        source: a local file ending in ``.json`` (a JSON list or JSON Lines), ``.jsonl``,
            ``.json.gz``, ``.jsonl.gz`` or ``.parquet``; otherwise anything that
            ``datasets.load_dataset`` accepts as a path: a Hub dataset id such as
            ``"lvwerra/stack-exchange-paired"``, or a local dataset folder.
        split: the split to load for Hub datasets; a single local file is always its own split.

    Raises:
        FileNotFoundError: if ``source`` ends in a supported file suffix but is not a file.
        ValueError: if ``source`` is an existing file of an unsupported type; if it holds no rows
            (``"{source}: is empty ..."``: a 0-byte or blank file, ``[]``, a split with no rows);
            or if ``datasets`` cannot read it: ``"{source}: line {n}: not valid JSON (...)"``
            for a JSON Lines file (the first line, 1-based, that ``json.loads`` refuses) or a
            truncated / malformed JSON list, ``"{source}: not a readable gzip file (...)"``, or
            otherwise ``"{source}: datasets could not read it as {builder}: {cause}"``.
        Whatever ``datasets.load_dataset`` raises for an unknown or unreachable Hub id.

    Returns:
        A ``datasets.Dataset`` (cached by ``datasets`` under its own cache directory, never
        next to ``source``) with at least one row.
    """
    path = Path(source)
    builder = _file_builder(path)
    if builder is not None:
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {source}")
    elif path.is_file():
        raise ValueError(
            f"unsupported data file {source}: expected one of {', '.join(_FILE_BUILDERS)}"
        )
    # builder None: not a data file but a Hub id or a dataset folder. Hub ids may contain dots
    # ("org/name-2.5"), so any suffix other than the data-file ones above is not a file name.
    dataset = _load_dataset(source, builder, split)
    if len(dataset) == 0:
        raise ValueError(f"{os.fspath(source)}: is empty (no rows)")
    return dataset


# What `datasets.load_dataset` raises for data it cannot read: DatasetGenerationError (a
# DatasetBuildError) wrapping the parser's error, ValueError('Instruction "train" corresponds to
# no data!') for an empty list, StopIteration for a 0-byte JSON file, OSError / EOFError from a
# broken gzip stream. (DatasetNotFoundError, a FileNotFoundError, is not caught for Hub ids.)
_LOAD_ERRORS = (datasets.exceptions.DatasetBuildError, ValueError, StopIteration, EOFError)


def _load_dataset(source: str | os.PathLike, builder: str | None, split: str) -> datasets.Dataset:
    """``datasets.load_dataset`` for a data file (``builder`` given) or a Hub id / folder, its
    read errors re-raised as ``ValueError`` naming ``source`` (and the line, where one is to blame).
    """
    try:
        if builder is None:
            return datasets.load_dataset(os.fspath(source), split=split)
        return datasets.load_dataset(builder, data_files=os.fspath(source), split="train")
    except (*_LOAD_ERRORS, *(() if builder is None else (OSError,))) as err:  # noqa: B030 - a tuple of exception classes
        raise ValueError(_explain_load_failure(source, builder, err)) from err


def _error_cause(err: BaseException) -> str:
    """``"Type: message"`` of the parser error that ``datasets`` wrapped (or of ``err`` itself)."""
    if isinstance(err, datasets.exceptions.DatasetBuildError):
        err = err.__cause__ or err.__context__ or err
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _explain_load_failure(source: str | os.PathLike, builder: str | None, err: BaseException) -> str:
    """The message for a ``datasets.load_dataset`` failure: ``"{source}: ..."`` with what is wrong.

    Runs only after ``datasets`` has failed, so a readable file is never parsed twice.
    """
    label = os.fspath(source)
    if builder == "json" and (problem := _json_problem(Path(source))) is not None:
        return f"{label}: {problem}"
    if builder is not None and Path(source).stat().st_size == 0:
        return f"{label}: is empty (0 bytes)"
    if isinstance(err, ValueError) and "corresponds to no data" in str(err):
        return f"{label}: is empty (no rows)"
    return f"{label}: datasets could not read it as {builder or 'a dataset'}: {_error_cause(err)}"


def _json_problem(path: Path) -> str | None:
    """What makes a JSON / JSON Lines file unreadable (``None`` if nothing is found here).

    Mirrors how ``datasets``' json builder tells the two apart: a document starting with ``[``
    (after a UTF-8 BOM) is one JSON list, anything else JSON Lines. Line numbers are 1-based.
    """
    compressed = path.name.lower().endswith(".gz")
    try:
        if compressed:
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        return f"not a readable gzip file ({err})" if compressed else f"cannot be read ({err})"
    raw = raw.removeprefix(codecs.BOM_UTF8)
    if not raw.strip():
        return "is empty (no JSON rows)"
    if raw.startswith(b"["):
        try:
            text = raw.decode("utf-8")
            rows = json.loads(text)
        except UnicodeDecodeError as err:
            return f"not UTF-8 text ({err})"
        except json.JSONDecodeError as err:
            unclosed = err.msg.startswith("Unterminated") or err.pos >= len(text.rstrip())
            return (
                f"line {err.lineno}, column {err.colno}: not valid JSON "
                f"({err.msg.removesuffix(' starting at')})"
                + ("; the file ends inside the JSON list (truncated?)" if unclosed else "")
            )
        return "is empty (an empty JSON list)" if rows == [] else None
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as err:
            return f"line {number}: not UTF-8 text ({err})"
        except json.JSONDecodeError as err:
            return (
                f"line {number}: not valid JSON "
                f"({err.msg.removesuffix(' starting at')} at column {err.colno})"
            )
        if not isinstance(value, dict):
            return f"line {number}: a JSON {type(value).__name__}, not an object (one row per line)"
    return None


def _file_builder(path: Path) -> str | None:
    """The ``datasets`` builder name for a data-file path, or ``None`` if it has no such suffix."""
    name = path.name.lower()
    return next((b for suffix, b in _FILE_BUILDERS.items() if name.endswith(suffix)), None)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt of Raschka's *LLMs from Scratch* (ch07 ``format_input``) + response header.

    Args:
        instruction: the task description.
        input: optional context; the ``### Input:`` block is included only when it is non-empty.

    Returns:
        ``"Below is an instruction ...\\n\\n### Instruction:\\n{instruction}"``, then
        ``"\\n\\n### Input:\\n{input}"`` if ``input``, then ``"\\n\\n### Response:\\n"``.
    """
    prompt = f"{_ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}"
    if input:
        prompt += f"\n\n### Input:\n{input}"
    return prompt + _ALPACA_RESPONSE_HEADER


def stack_exchange_prompt(question: str) -> str:
    """The prompt of TRL's stack-llama example: ``"Question: {question}\\n\\nAnswer: "``.

    Args:
        question: the question text.

    Returns:
        The prompt string.
    """
    return f"Question: {question}\n\nAnswer: "


# --------------------------------------------------------------------------------------------
# Validation: each required field has a checker returning a problem description or None.


def text_problem(value: Any) -> str | None:
    """Why ``value`` is not a usable text field (``None`` if it is a non-blank string)."""
    if value is None:
        return "is missing"
    if not isinstance(value, str):
        return f"is not a string (got {type(value).__name__})"
    if not value.strip():
        return "is empty"
    return None


def _turns(*, opens: bool = False, ends_with_assistant: bool = False) -> Callable[[Any], str | None]:
    """A required conversational field, checked with ``chat.conversation_problem``."""
    return functools.partial(conversation_problem, opens=opens, ends_with_assistant=ends_with_assistant)


def _canonical_turns(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """The turns as ``{"role", "content"}`` dicts (other keys, e.g. ``name``, are dropped)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _split_messages(batch: Batch) -> Batch:
    """TRL language-modeling ``messages`` -> ``{prompt, completion}`` turn lists, split before the
    first assistant turn (so every assistant turn is in the completion and trained)."""
    prompts, completions = [], []
    for messages in batch["messages"]:
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompts.append(_canonical_turns(messages[:first]))
        completions.append(_canonical_turns(messages[first:]))
    return {"prompt": prompts, "completion": completions}


def _conversations(batch: Batch, *columns: tuple[str, str]) -> Batch:
    """Output column ``out`` = canonical turns of input column ``src``, for each ``(out, src)``."""
    return {out: [_canonical_turns(m) for m in batch[src]] for out, src in columns}


def _same_turn(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return a["role"] == b["role"] and a["content"] == b["content"]


def _shared_turns(chosen: Sequence[Mapping[str, Any]], rejected: Sequence[Mapping[str, Any]]) -> int:
    """How many leading turns two conversations share, at most ``min(len) - 1`` so that both keep a
    turn after the prompt (TRL ``extract_prompt``'s longest common prefix of the message lists)."""
    n, limit = 0, min(len(chosen), len(rejected)) - 1
    while n < limit and _same_turn(chosen[n], rejected[n]):
        n += 1
    return n


def _split_conversations(batch: Batch) -> Batch:
    """TRL implicit-prompt preference rows -> ``{prompt, chosen, rejected}`` turn lists."""
    out: Batch = {"prompt": [], "chosen": [], "rejected": []}
    for chosen, rejected in zip(batch["chosen"], batch["rejected"]):
        n = _shared_turns(chosen, rejected)
        for key, turns in (("prompt", chosen[:n]), ("chosen", chosen[n:]), ("rejected", rejected[n:])):
            out[key].append(_canonical_turns(turns))
    return out


def _conversation_row_problems(columns: Batch) -> Iterable[tuple[int, str, str]]:
    """``(row, field, problem)`` for implicit-prompt rows whose chosen and rejected conversations
    (each valid on its own) share no leading turn, so no prompt can be split off."""
    check = _turns(opens=True, ends_with_assistant=True)
    for row, (chosen, rejected) in enumerate(zip(columns["chosen"], columns["rejected"])):
        if check(chosen) is None and check(rejected) is None and _shared_turns(chosen, rejected) == 0:
            yield row, "rejected", (
                "shares no leading turn with 'chosen' (message 0 differs), so there is no prompt to "
                "split off (implicit-prompt preference: the shared leading turns are the prompt)"
            )


@dataclasses.dataclass(frozen=True)
class RowFormat:
    """A row format: its required columns (with their checks) and a batched conversion.

    ``convert`` maps a batch of input columns (lists) to the output columns: lists of str, or for
    a ``conversational`` format lists of ``{"role", "content"}`` turn lists. ``row_problems``, if
    set, checks what involves several fields of a row: given the required columns (lists), it
    yields ``(row, field, problem)`` for rows whose fields each passed their own check but that
    ``convert`` could not convert. Formats with the same columns are told apart by
    ``conversational``: whether the first required column holds lists (see ``_detect_format``).
    """

    required: Mapping[str, Callable[[Any], str | None]]
    convert: Callable[[Batch], Batch]
    optional: tuple[str, ...] = ()
    row_problems: Callable[[Batch], Iterable[tuple[int, str, str]]] | None = None
    conversational: bool = False

    @property
    def description(self) -> str:
        """Column names as shown in error messages, e.g. ``"instruction, input?, output"``."""
        return ", ".join([*self.required, *(f"{c}?" for c in self.optional)])


def _texts(*fields: str) -> dict[str, Callable[[Any], str | None]]:
    """Required text fields, all checked with ``text_problem``."""
    return dict.fromkeys(fields, text_problem)


def _alpaca_prompts(batch: Batch) -> list[str]:
    """Alpaca prompts for a batch with ``instruction`` and optional ``input`` (None -> "")."""
    inputs = batch.get("input") or [""] * len(batch["instruction"])
    return [alpaca_prompt(i, x or "") for i, x in zip(batch["instruction"], inputs)]


_HH_ASSISTANT = "\n\nAssistant:"


def _transcript_cut(chosen: str, rejected: str) -> int:
    """Where the last ``"\n\nAssistant:"`` header lying wholly in the shared prefix ends; -1 if none."""
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(_HH_ASSISTANT, 0, n)
    return -1 if cut < 0 else cut + len(_HH_ASSISTANT)


def _transcript_problem(chosen: str, rejected: str) -> tuple[str, str]:
    """``(field, problem)`` saying why two transcripts share no assistant turn."""
    for field, text in (("chosen", chosen), ("rejected", rejected)):
        if _HH_ASSISTANT not in text:
            return field, (
                f"has no {_HH_ASSISTANT!r} turn, so the transcripts share no turn to split at: "
                f"{text[:60]!r}"
            )
    n = next((i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r), min(len(chosen), len(rejected)))
    return "rejected", (
        f"differs from 'chosen' before their first {_HH_ASSISTANT!r} turn, so the transcripts "
        f"share no turn to split at (from character {n}: {chosen[n:n + 30]!r} / "
        f"{rejected[n:n + 30]!r})"
    )


def split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Anthropic HH-RLHF rows hold two whole transcripts that share every turn but the last
    assistant reply: ``(prompt, chosen_reply, rejected_reply)``, the prompt running up to and
    including the last ``"\n\nAssistant:"`` header they share (TRL's hh-rlhf preprocessing).

    Raises:
        ValueError: the transcripts share no ``"\n\nAssistant:"`` turn (``"field 'chosen' has no
            ... turn, ..."``, or ``"field 'rejected' differs from 'chosen' before ..."``).
    """
    end = _transcript_cut(chosen, rejected)
    if end < 0:
        field, problem = _transcript_problem(chosen, rejected)
        raise ValueError(f"field {field!r} {problem}")
    return chosen[:end], chosen[end:], rejected[end:]


def _transcript_row_problems(columns: Batch) -> Iterable[tuple[int, str, str]]:
    """``(row, field, problem)`` for each HH-RLHF row whose transcripts share no assistant turn."""
    for row, (chosen, rejected) in enumerate(zip(columns["chosen"], columns["rejected"])):
        if isinstance(chosen, str) and isinstance(rejected, str) and _transcript_cut(chosen, rejected) < 0:
            yield (row, *_transcript_problem(chosen, rejected))


def _split_transcripts(batch: Batch) -> Batch:
    rows = [split_transcripts(c, r) for c, r in zip(batch["chosen"], batch["rejected"])]
    return {key: [row[i] for row in rows] for i, key in enumerate(("prompt", "chosen", "rejected"))}


def _pair(batch: Batch, chosen: str, rejected: str) -> Batch:
    """``{chosen, rejected}`` output columns copied from columns ``chosen`` / ``rejected``."""
    return {"chosen": batch[chosen], "rejected": batch[rejected]}


_SFT_FORMATS = (
    RowFormat(
        required=_texts("instruction", "output"),
        optional=("input",),
        convert=lambda b: {"prompt": _alpaca_prompts(b), "completion": b["output"]},
    ),
    RowFormat(
        required=_texts("prompt", "completion"),
        convert=lambda b: {"prompt": b["prompt"], "completion": b["completion"]},
    ),
    RowFormat(  # TRL conversational prompt-completion
        required={"prompt": _turns(opens=True), "completion": _turns(ends_with_assistant=True)},
        convert=lambda b: _conversations(b, ("prompt", "prompt"), ("completion", "completion")),
        conversational=True,
    ),
    RowFormat(  # TRL conversational language modeling
        required={"messages": _turns(opens=True, ends_with_assistant=True)},
        convert=_split_messages,
        conversational=True,
    ),
)

_CHOSEN_REJECTED = (("chosen", "chosen"), ("rejected", "rejected"))

_PREFERENCE_FORMATS = (
    RowFormat(
        required=_texts("prompt", "chosen", "rejected"),
        convert=lambda b: {"prompt": b["prompt"], **_pair(b, "chosen", "rejected")},
    ),
    RowFormat(  # TRL conversational preference (explicit prompt)
        required={
            "prompt": _turns(opens=True),
            "chosen": _turns(ends_with_assistant=True),
            "rejected": _turns(ends_with_assistant=True),
        },
        convert=lambda b: _conversations(b, ("prompt", "prompt"), *_CHOSEN_REJECTED),
        conversational=True,
    ),
    RowFormat(
        required=_texts("instruction", "chosen", "rejected"),
        optional=("input",),
        convert=lambda b: {"prompt": _alpaca_prompts(b), **_pair(b, "chosen", "rejected")},
    ),
    RowFormat(  # lvwerra/stack-exchange-paired: response_j is the preferred answer
        required=_texts("question", "response_j", "response_k"),
        convert=lambda b: {
            "prompt": [stack_exchange_prompt(q) for q in b["question"]],
            **_pair(b, "response_j", "response_k"),
        },
    ),
    RowFormat(  # Anthropic/hh-rlhf: two whole transcripts, split at the last shared assistant turn
        required=_texts("chosen", "rejected"),
        convert=_split_transcripts,
        row_problems=_transcript_row_problems,
    ),
    RowFormat(  # TRL conversational implicit-prompt preference (e.g. trl-lib/ultrafeedback_binarized)
        required=dict.fromkeys(("chosen", "rejected"), _turns(opens=True, ends_with_assistant=True)),
        convert=_split_conversations,
        row_problems=_conversation_row_problems,
        conversational=True,
    ),
)


def _holds_lists(dataset: datasets.Dataset, column: str) -> bool:
    """Whether ``column``'s feature is a list (a JSON array per row), i.e. conversational."""
    return isinstance(dataset.features[column], (list, datasets.List, datasets.LargeList))


def _detect_format(
    dataset: datasets.Dataset, formats: Sequence[RowFormat], label: str, kind: str
) -> RowFormat:
    """The first format whose required columns are all present and whose ``conversational`` flag
    matches whether its first required column holds lists; failing that, the first format whose
    columns are present (its checks then say which field has the wrong type).

    Raises:
        ValueError: listing the columns found and the accepted formats, if none matches.
    """
    columns = set(dataset.column_names)
    candidates = [fmt for fmt in formats if columns.issuperset(fmt.required)]
    for fmt in candidates:
        if _holds_lists(dataset, next(iter(fmt.required))) == fmt.conversational:
            return fmt
    if candidates:
        return candidates[0]
    accepted = "; ".join(
        f"({fmt.description}{' as message lists' if fmt.conversational else ''})" for fmt in formats
    )
    raise ValueError(
        f"{label}: unrecognised {kind} format with columns {sorted(columns)}; "
        f"accepted column sets: {accepted} (? = optional)"
    )


def _validate(dataset: datasets.Dataset, fmt: RowFormat, label: str) -> None:
    """Check every required field of every row, reading each column once as a Python list.

    Raises:
        ValueError: ``"{label}: row {i}: field '{field}' {problem}"`` for the first bad row
            (lowest row index; ties broken by the format's field order, then ``row_problems``).
    """
    columns = dataset.select_columns(list(fmt.required)).to_dict()
    problems = itertools.chain(
        (
            (row, field, problem)
            for field, check in fmt.required.items()
            for row, value in enumerate(columns[field])
            if (problem := check(value)) is not None
        ),
        fmt.row_problems(columns) if fmt.row_problems is not None else (),
    )
    first = min(problems, default=None, key=lambda p: p[0])
    if first is not None:
        row, field, problem = first
        raise ValueError(f"{label}: row {row}: field '{field}' {problem}")


def row_text(*fields: Any) -> str:
    """The text of one row for deduplication: its fields joined by newlines, a conversation
    (a list of ``{"role", "content"}`` turns) as its contents joined by newlines, ``None`` as "".

    Args:
        *fields: strings, turn lists or ``None``.

    Returns:
        One string.
    """
    def text(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        return "\n".join(turn["content"] for turn in value)

    return "\n".join(text(v) for v in fields)


def _dedup_threshold(value: Any, label: str, flag: str) -> float:
    """``value`` checked as a Jaccard threshold in (0, 1); errors name ``label`` and ``flag``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(
            f"{label}: {flag} must be a Jaccard similarity threshold in (0, 1) (e.g. 0.7) or None for no "
            f"deduplication, got {value!r}"
        )
    return float(value)


def drop_duplicates(
    dataset: datasets.Dataset,
    *,
    columns: Sequence[str],
    threshold: float = 0.7,
    source: str | os.PathLike = "dataset",
    flag: str = "threshold",
) -> tuple[datasets.Dataset, DedupReport]:
    """Remove exact and near-duplicate rows, keeping the first of each cluster
    (``jaxalign.data.dedup.dedup`` with its defaults: word 5-grams, 128 MinHash permutations,
    datasketch LSH banding, exact-Jaccard verification).

    A row's text is ``row_text`` of ``columns`` (e.g. prompt and response fields). The count
    removed is logged as a warning when it is not 0.

    Args:
        dataset: any ``datasets.Dataset``.
        columns: the columns whose text is compared (strings or ``CONVERSATION`` turn lists).
        threshold: the Jaccard similarity in (0, 1) at which rows are near duplicates.
        source: the data's name in messages.
        flag: the argument or command-line flag that set ``threshold``, named in messages.

    Raises:
        ValueError: ``threshold`` not a number in (0, 1) (``"{source}: {flag} must be ..."``), or
            ``columns`` empty or naming a column missing from ``dataset`` (``"{source}: {flag}: no
            column 'x' to compare ..."``).

    Returns:
        ``(dataset without the removed rows, in order, the report)``.
    """
    label = os.fspath(source)
    threshold = _dedup_threshold(threshold, label, flag)
    if not columns:
        raise ValueError(f"{label}: {flag}: no columns to compare")
    if missing := [c for c in columns if c not in dataset.column_names]:
        raise ValueError(f"{label}: {flag}: no column {missing[0]!r} to compare (columns: {dataset.column_names})")
    values = dataset.select_columns(list(columns)).to_dict()
    texts = [row_text(*row) for row in zip(*(values[c] for c in columns))]
    result = dedup_texts(texts, threshold=threshold)
    report = result.report
    if report.num_removed:
        logger.warning("%s: %s: %s", label, flag, report.summary())
    return dataset.select(np.flatnonzero(result.keep), keep_in_memory=True), report


def load_canonical(
    source: str | os.PathLike,
    split: str,
    formats: Sequence[RowFormat],
    kind: str,
    columns: Sequence[str],
    *,
    dedup: float | None = None,
) -> datasets.Dataset:
    """Load ``source``, detect its format, validate it and convert it to ``columns``: strings, or
    ``CONVERSATION`` turn lists for a conversational format.

    With ``dedup`` (a Jaccard threshold), duplicate rows are removed after validation and before
    conversion (``drop_duplicates``), comparing the format's source fields, so that a prompt
    template shared by every row does not count as overlap.
    """
    label = os.fspath(source)
    if dedup is not None:
        _dedup_threshold(dedup, label, "dedup")  # refused before anything is read
    dataset = load_records(source, split=split)
    fmt = _detect_format(dataset, formats, label, kind)
    _validate(dataset, fmt, label)
    if dedup is not None:
        fields = [c for c in (*fmt.required, *fmt.optional) if c in dataset.column_names]
        dataset, _ = drop_duplicates(dataset, columns=fields, threshold=dedup, source=label, flag="dedup")
    feature = CONVERSATION if fmt.conversational else datasets.Value("string")
    return dataset.map(
        fmt.convert,
        batched=True,
        remove_columns=dataset.column_names,
        features=datasets.Features(dict.fromkeys(columns, feature)),
        keep_in_memory=True,
        desc=f"{kind} format",
    )


def load_sft_dataset(
    source: str | os.PathLike, *, split: str = "train", dedup: float | None = None
) -> datasets.Dataset:
    """Load supervised fine-tuning data as ``{prompt, completion}``: strings, or turn lists.

    Accepted row formats, detected from the columns (and, where two formats share their columns,
    from whether the first one holds JSON arrays; first match wins):
      (a) ``instruction``, ``input`` (optional, may be empty), ``output`` -> Alpaca prompt
          (``alpaca_prompt``), completion = ``output``;
      (b) ``prompt``, ``completion`` strings -> as is;
      (c) ``prompt``, ``completion`` as message lists (TRL conversational prompt-completion) ->
          as is;
      (d) ``messages``: a message list (TRL conversational language modeling) -> split before
          its first assistant turn: ``prompt`` = the system/user turns before it, ``completion``
          = that turn and everything after (later user turns included).
    Formats (c) and (d) follow TRL 0.19+ "Dataset formats and types": a message is
    ``{"role": "system" | "user" | "assistant", "content": str}`` (other keys are dropped; the
    roles ``tool`` etc. are refused). Other columns are dropped.

    Canonical schema: (a), (b) give string columns; (c), (d) give ``CONVERSATION`` columns (lists
    of ``{"role", "content"}``), the whole conversation being ``prompt + completion``. Tokenising
    (``jaxalign.data.collate.tokenize_sft``) renders those with the tokenizer's chat template and
    trains every assistant turn of ``completion`` (TRL ``SFTConfig(assistant_only_loss=True)``).

    Args:
        source: see ``load_records``.
        split: the split for Hub datasets.
        dedup: ``None`` (the default) keeps every row; a Jaccard threshold in (0, 1), e.g. 0.7,
            removes exact and near-duplicate rows (prompt + response text, compared on the
            source fields before the prompt template: ``drop_duplicates``), keeping the first of
            each cluster and logging the number removed.

    Raises:
        FileNotFoundError: for a missing local data file.
        ValueError: ``dedup`` not ``None`` or a number in (0, 1) (``"{source}: dedup must be
            ..."``, raised before reading); an unreadable or empty ``source`` (see
            ``load_records``); an unrecognised
            column set (names the columns found and the formats accepted); or a row whose
            required field is missing, not a string, empty or blank
            (``"{source}: row {i}: field '{field}' is empty"``); for (c), (d), a field that is not
            a non-empty message list, a message with an unknown role or a non-string / blank
            content (``"{source}: row {i}: field 'messages' message 2 field 'role' is 'tool', ..."``),
            a conversation opening with an assistant turn, or a ``completion`` / ``messages``
            whose last turn is not the assistant's (``"... must end with an 'assistant'
            message, not 'user'"``).

    Returns:
        A ``datasets.Dataset`` with exactly the columns ``prompt`` and ``completion`` (both
        strings, or both ``CONVERSATION``), in source order.
    """
    return load_canonical(source, split, _SFT_FORMATS, "SFT", ("prompt", "completion"), dedup=dedup)


def load_preference_dataset(
    source: str | os.PathLike, *, split: str = "train", dedup: float | None = None
) -> datasets.Dataset:
    """Load pairwise preference data as ``{prompt, chosen, rejected}``: strings, or turn lists.

    Accepted row formats, detected from the columns (and, where two formats share their columns,
    from whether the first one holds JSON arrays; first match wins):
      (a) ``prompt``, ``chosen``, ``rejected`` strings -> as is;
      (a') ``prompt``, ``chosen``, ``rejected`` as message lists (TRL conversational preference)
          -> as is (``chosen`` / ``rejected`` usually one assistant turn each);
      (b) ``instruction``, ``input`` (optional), ``chosen``, ``rejected`` -> Alpaca prompt (e.g.
          LLMs-from-scratch ``instruction-data-with-preference.json``; its ``output`` is dropped);
      (c) ``question``, ``response_j``, ``response_k`` (stack-exchange-paired; ``response_j`` is
          preferred) -> prompt ``"Question: {question}\\n\\nAnswer: "`` as in TRL's stack-llama;
      (d) only ``chosen``, ``rejected`` as whole ``Human: … Assistant: …`` transcripts
          (Anthropic hh-rlhf) -> split by ``split_transcripts`` (prompt = the shared turns);
      (e) only ``chosen``, ``rejected`` as message lists (TRL conversational implicit-prompt
          preference, e.g. ``trl-lib/ultrafeedback_binarized``) -> ``prompt`` = their longest
          shared run of leading turns (TRL ``extract_prompt``), kept short enough that each side
          keeps at least its last turn; ``chosen`` / ``rejected`` = the rest.
    Messages follow TRL 0.19+ "Dataset formats and types" (see ``load_sft_dataset``).
    Canonical schema: (a)-(d) give string columns, (a') and (e) ``CONVERSATION`` columns
    (lists of ``{"role", "content"}``), each side's conversation being ``prompt + chosen`` /
    ``prompt + rejected``. ``jaxalign.data.collate.tokenize_preference`` renders them with the
    chat template and trains the assistant turns of ``chosen`` / ``rejected`` only.
    Pairs with ``chosen == rejected`` carry no preference signal: they are dropped, and their
    count is logged as a warning.

    Args:
        source: see ``load_records``.
        split: the split for Hub datasets.
        dedup: ``None`` (the default) keeps every pair; a Jaccard threshold in (0, 1), e.g. 0.7,
            removes exact and near-duplicate pairs (prompt + chosen + rejected text, compared on
            the source fields before any prompt template: ``drop_duplicates``), keeping the first
            of each cluster and logging the number removed; this runs before the ``chosen ==
            rejected`` pairs are dropped.

    Raises:
        FileNotFoundError: for a missing local data file.
        ValueError: ``dedup`` not ``None`` or a number in (0, 1) (raised before reading); an
            unreadable or empty ``source`` (see ``load_records``); an unrecognised
            column set; a missing / non-string / blank required field, or hh-rlhf transcripts
            that share no ``"\n\nAssistant:"`` turn (the message names the source, the 0-based
            row in the source and the field); for (a') and (e), a malformed message list (as
            ``load_sft_dataset``), a ``prompt`` (or, for (e), a side) opening with an assistant
            turn, a side whose last turn is not the assistant's, or (e) sides sharing no leading
            turn (``"{source}: row {i}: field 'rejected' shares no leading turn with 'chosen'
            ..."``); or every pair having ``chosen == rejected``
            (``"{source}: all {n} pairs have chosen == rejected ..."``).

    Returns:
        A ``datasets.Dataset`` with exactly the columns ``prompt``, ``chosen``, ``rejected`` (all
        strings, or all ``CONVERSATION``), in source order (minus the dropped pairs).
    """
    dataset = load_canonical(
        source, split, _PREFERENCE_FORMATS, "preference", ("prompt", "chosen", "rejected"), dedup=dedup
    )
    distinct = dataset.filter(
        lambda chosen, rejected: [c != r for c, r in zip(chosen, rejected)],
        input_columns=["chosen", "rejected"],
        batched=True,
        keep_in_memory=True,
        desc="drop chosen == rejected",
    )
    if len(distinct) == 0:
        raise ValueError(
            f"{os.fspath(source)}: all {len(dataset)} pairs have chosen == rejected (no preference "
            "signal); nothing is left to train on"
        )
    if (dropped := len(dataset) - len(distinct)) > 0:
        logger.warning(
            "%s: dropped %d of %d pairs whose chosen == rejected (no preference signal)",
            os.fspath(source),
            dropped,
            len(dataset),
        )
    return distinct


def sft_view(preference: datasets.Dataset) -> datasets.Dataset:
    """The SFT dataset implied by a preference dataset: train on the chosen responses.

    Args:
        preference: a dataset with columns ``prompt`` and ``chosen`` (others are dropped), strings
            or ``CONVERSATION`` turn lists (see ``load_preference_dataset``).

    Raises:
        ValueError: if ``prompt`` or ``chosen`` is missing (raised by ``datasets``).

    Returns:
        A ``datasets.Dataset`` with columns ``prompt`` and ``completion`` (= ``chosen``), of the
        same types: a conversational preference set gives a conversational SFT set.
    """
    return preference.select_columns(["prompt", "chosen"]).rename_column("chosen", "completion")


def val_split_size(
    num_rows: int, val_fraction: float, *, source: str | os.PathLike, flag: str = "--val-fraction"
) -> int:
    """Rows to hold out for validation: ``max(1, round(num_rows * val_fraction))``, checked so
    that both the training and the validation part keep at least one row.

    Call it before any model is built; pass the result to ``Dataset.train_test_split`` as an
    integer ``test_size`` (a float one rounds differently: ``ceil`` for the test part).

    Args:
        num_rows: rows in the data set being split (after any ``--max-examples`` cut).
        val_fraction: the held-out share, in (0, 1).
        source: the data file (or a description of the data), named in the message.
        flag: the command-line flag that set ``val_fraction``, named in the message.

    Raises:
        ValueError: ``val_fraction`` outside (0, 1), or too few rows to keep one on each side
            (``"{source}: 1 row is too few to hold out --val-fraction 0.1 for validation ..."``).

    Returns:
        The number of validation rows, in ``[1, num_rows - 1]``.
    """
    label = os.fspath(source)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"{label}: {flag} {val_fraction} must be in (0, 1)")
    def held_out(n: int) -> int:
        return max(1, round(n * val_fraction))

    n_val = held_out(num_rows)
    if num_rows - n_val < 1:
        # the smallest row count leaving one to train on: n (1 - fraction) reaches about 1/2
        start = max(2, int(0.5 / (1.0 - val_fraction)) - 2)
        need = next(n for n in itertools.count(start) if n - held_out(n) >= 1)
        rows = f"{num_rows} row" + ("" if num_rows == 1 else "s")
        raise ValueError(
            f"{label}: {rows} {'is' if num_rows == 1 else 'are'} too few to hold out {flag} "
            f"{val_fraction} for validation ({n_val} held out would leave {num_rows - n_val} to "
            f"train on); it needs at least {need} rows"
        )
    return n_val


def train_val_split(
    dataset: datasets.Dataset,
    val_fraction: float,
    *,
    seed: int,
    source: str | os.PathLike,
    flag: str = "--val-fraction",
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Shuffle and split ``dataset`` into ``(train, val)``, ``val_split_size`` rows held out.

    Args:
        dataset: the rows to split.
        val_fraction: the held-out share, in (0, 1).
        seed: the shuffle seed.
        source: the data file (or a description of the data), named in error messages.
        flag: the command-line flag that set ``val_fraction``, named in error messages.

    Raises:
        ValueError: as ``val_split_size`` (before anything is split).

    Returns:
        ``(train, val)``, each with at least one row.
    """
    n_val = val_split_size(len(dataset), val_fraction, source=source, flag=flag)
    parts = dataset.train_test_split(test_size=n_val, seed=seed, shuffle=True)
    return parts["train"], parts["test"]
