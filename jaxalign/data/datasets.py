"""Load SFT and preference data into Hugging Face ``datasets`` with one canonical schema.

SFT rows become ``{prompt, completion}``; preference rows become ``{prompt, chosen, rejected}``,
all plain strings. The prompt carries the whole template up to and including the response header,
so a model's response starts right after it. The row format is detected from the column names;
rows are validated (no missing or blank required field) before any conversion, and errors name the
source, the 0-based row and the field. Conversions run in memory (``keep_in_memory=True``) so
nothing is written next to read-only data.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

__all__ = [
    "load_records",
    "alpaca_prompt",
    "messages_prompt",
    "stack_exchange_prompt",
    "load_sft_dataset",
    "load_preference_dataset",
    "sft_view",
    "split_transcripts",
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

_ROLE_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}

Batch = dict[str, list[Any]]


def load_records(source: str | os.PathLike, *, split: str = "train") -> datasets.Dataset:
    """Load raw rows from a local file or the Hugging Face Hub, columns as stored.

    Args:
        source: a local file ending in ``.json`` (a JSON list or JSON Lines), ``.jsonl``,
            ``.json.gz``, ``.jsonl.gz`` or ``.parquet``; otherwise anything that
            ``datasets.load_dataset`` accepts as a path: a Hub dataset id such as
            ``"lvwerra/stack-exchange-paired"``, or a local dataset folder.
        split: the split to load for Hub datasets; a single local file is always its own split.

    Raises:
        FileNotFoundError: if ``source`` ends in a supported file suffix but is not a file.
        ValueError: if ``source`` is an existing file of an unsupported type.
        Whatever ``datasets.load_dataset`` raises for an unknown or unreachable Hub id.

    Returns:
        A ``datasets.Dataset`` (cached by ``datasets`` under its own cache directory, never
        next to ``source``).
    """
    path = Path(source)
    builder = _file_builder(path)
    if builder is not None:
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {source}")
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    if path.is_file():
        raise ValueError(
            f"unsupported data file {source}: expected one of {', '.join(_FILE_BUILDERS)}"
        )
    # Not a data file: a Hub id or a dataset folder. Hub ids may contain dots ("org/name-2.5"),
    # so any suffix other than the data-file ones above is not taken as a file name.
    return datasets.load_dataset(os.fspath(source), split=split)


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


def messages_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """Render chat turns as ``### Role:`` blocks, ending with an open assistant header.

    Args:
        messages: ``{"role": "system" | "user" | "assistant", "content": str}`` turns that come
            before the completion.

    Raises:
        KeyError: if a role is not one of the three above.

    Returns:
        ``"### User:\\n{content}\\n\\n"`` (etc.) per turn, followed by ``"### Assistant:\\n"``.
    """
    turns = "".join(f"{_ROLE_HEADERS[m['role']]}{m['content']}\n\n" for m in messages)
    return turns + _ROLE_HEADERS["assistant"]


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


def _text_problem(value: Any) -> str | None:
    """Why ``value`` is not a usable text field (``None`` if it is a non-blank string)."""
    if value is None:
        return "is missing"
    if not isinstance(value, str):
        return f"is not a string (got {type(value).__name__})"
    if not value.strip():
        return "is empty"
    return None


def _messages_problem(value: Any) -> str | None:
    """Why ``value`` is not a usable chat (``None`` if it is one ending in an assistant turn)."""
    if not value:
        return "is empty"
    for turn, message in enumerate(value):
        if not isinstance(message, Mapping) or message.get("role") not in _ROLE_HEADERS:
            return f"message {turn} needs a role among {sorted(_ROLE_HEADERS)}"
        if (problem := _text_problem(message.get("content"))) is not None:
            return f"message {turn} content {problem}"
    if value[-1]["role"] != "assistant":
        return f"must end with an 'assistant' message, not {value[-1]['role']!r}"
    return None


@dataclasses.dataclass(frozen=True)
class _Format:
    """A row format: its required columns (with their checks) and a batched conversion.

    ``convert`` maps a batch of input columns (lists) to the output columns (lists of str).
    """

    required: Mapping[str, Callable[[Any], str | None]]
    convert: Callable[[Batch], Batch]
    optional: tuple[str, ...] = ()

    @property
    def description(self) -> str:
        """Column names as shown in error messages, e.g. ``"instruction, input?, output"``."""
        return ", ".join([*self.required, *(f"{c}?" for c in self.optional)])


def _texts(*fields: str) -> dict[str, Callable[[Any], str | None]]:
    """Required text fields, all checked with ``_text_problem``."""
    return {field: _text_problem for field in fields}


def _alpaca_prompts(batch: Batch) -> list[str]:
    """Alpaca prompts for a batch with ``instruction`` and optional ``input`` (None -> "")."""
    inputs = batch.get("input") or [""] * len(batch["instruction"])
    return [alpaca_prompt(i, x or "") for i, x in zip(batch["instruction"], inputs)]


_HH_ASSISTANT = "\n\nAssistant:"


def split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Anthropic HH-RLHF rows hold two whole transcripts that share every turn but the last
    assistant reply: ``(prompt, chosen_reply, rejected_reply)``, the prompt running up to and
    including the last ``"\n\nAssistant:"`` header they share (TRL's hh-rlhf preprocessing).

    Raises:
        ValueError: the transcripts share no ``"\n\nAssistant:"`` turn.
    """
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(_HH_ASSISTANT, 0, n)  # the last header lying wholly in the shared prefix
    if cut < 0:
        raise ValueError(f"transcripts share no {_HH_ASSISTANT!r} turn: {chosen[:60]!r} / {rejected[:60]!r}")
    end = cut + len(_HH_ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def _split_transcripts(batch: Batch) -> Batch:
    rows = [split_transcripts(c, r) for c, r in zip(batch["chosen"], batch["rejected"])]
    return {key: [row[i] for row in rows] for i, key in enumerate(("prompt", "chosen", "rejected"))}


def _pair(batch: Batch, chosen: str, rejected: str) -> Batch:
    """``{chosen, rejected}`` output columns copied from columns ``chosen`` / ``rejected``."""
    return {"chosen": batch[chosen], "rejected": batch[rejected]}


_SFT_FORMATS = (
    _Format(
        required=_texts("instruction", "output"),
        optional=("input",),
        convert=lambda b: {"prompt": _alpaca_prompts(b), "completion": b["output"]},
    ),
    _Format(
        required=_texts("prompt", "completion"),
        convert=lambda b: {"prompt": b["prompt"], "completion": b["completion"]},
    ),
    _Format(
        required={"messages": _messages_problem},
        convert=lambda b: {
            "prompt": [messages_prompt(m[:-1]) for m in b["messages"]],
            "completion": [m[-1]["content"] for m in b["messages"]],
        },
    ),
)

_PREFERENCE_FORMATS = (
    _Format(
        required=_texts("prompt", "chosen", "rejected"),
        convert=lambda b: {"prompt": b["prompt"], **_pair(b, "chosen", "rejected")},
    ),
    _Format(
        required=_texts("instruction", "chosen", "rejected"),
        optional=("input",),
        convert=lambda b: {"prompt": _alpaca_prompts(b), **_pair(b, "chosen", "rejected")},
    ),
    _Format(  # lvwerra/stack-exchange-paired: response_j is the preferred answer
        required=_texts("question", "response_j", "response_k"),
        convert=lambda b: {
            "prompt": [stack_exchange_prompt(q) for q in b["question"]],
            **_pair(b, "response_j", "response_k"),
        },
    ),
    _Format(  # Anthropic/hh-rlhf: two whole transcripts, split at the last shared assistant turn
        required=_texts("chosen", "rejected"),
        convert=_split_transcripts,
    ),
)


def _detect_format(
    dataset: datasets.Dataset, formats: Sequence[_Format], label: str, kind: str
) -> _Format:
    """The first format whose required columns are all present.

    Raises:
        ValueError: listing the columns found and the accepted formats, if none matches.
    """
    columns = set(dataset.column_names)
    for fmt in formats:
        if columns.issuperset(fmt.required):
            return fmt
    accepted = "; ".join(f"({fmt.description})" for fmt in formats)
    raise ValueError(
        f"{label}: unrecognised {kind} format with columns {sorted(columns)}; "
        f"accepted column sets: {accepted} (? = optional)"
    )


def _validate(dataset: datasets.Dataset, fmt: _Format, label: str) -> None:
    """Check every required field of every row, reading each column once as a Python list.

    Raises:
        ValueError: ``"{label}: row {i}: field '{field}' {problem}"`` for the first bad row
            (lowest row index; ties broken by the format's field order).
    """
    columns = dataset.select_columns(list(fmt.required)).to_dict()
    problems = (
        (row, field, problem)
        for field, check in fmt.required.items()
        for row, value in enumerate(columns[field])
        if (problem := check(value)) is not None
    )
    first = min(problems, default=None, key=lambda p: p[0])
    if first is not None:
        row, field, problem = first
        raise ValueError(f"{label}: row {row}: field '{field}' {problem}")


def _canonical(
    source: str | os.PathLike,
    split: str,
    formats: Sequence[_Format],
    kind: str,
    columns: Sequence[str],
) -> datasets.Dataset:
    """Load ``source``, detect its format, validate it and convert it to string ``columns``."""
    label = os.fspath(source)
    dataset = load_records(source, split=split)
    fmt = _detect_format(dataset, formats, label, kind)
    _validate(dataset, fmt, label)
    return dataset.map(
        fmt.convert,
        batched=True,
        remove_columns=dataset.column_names,
        features=datasets.Features({c: datasets.Value("string") for c in columns}),
        keep_in_memory=True,
        desc=f"{kind} format",
    )


def load_sft_dataset(source: str | os.PathLike, *, split: str = "train") -> datasets.Dataset:
    """Load supervised fine-tuning data as ``{prompt, completion}`` strings.

    Accepted row formats, detected from the columns (first match wins):
      (a) ``instruction``, ``input`` (optional, may be empty), ``output`` -> Alpaca prompt
          (``alpaca_prompt``), completion = ``output``;
      (b) ``prompt``, ``completion`` -> as is;
      (c) ``messages``: a list of ``{role, content}`` whose last message is the assistant's
          completion; the earlier turns become the prompt (``messages_prompt``).
    Other columns are dropped.

    Args:
        source: see ``load_records``.
        split: the split for Hub datasets.

    Raises:
        FileNotFoundError: for a missing local data file.
        ValueError: for an unrecognised column set (names the columns found and the formats
            accepted), or a row whose required field is missing, not a string, empty or blank
            (``"{source}: row {i}: field '{field}' is empty"``).

    Returns:
        A ``datasets.Dataset`` with exactly the string columns ``prompt`` and ``completion``,
        in source order.
    """
    return _canonical(source, split, _SFT_FORMATS, "SFT", ("prompt", "completion"))


def load_preference_dataset(
    source: str | os.PathLike, *, split: str = "train"
) -> datasets.Dataset:
    """Load pairwise preference data as ``{prompt, chosen, rejected}`` strings.

    Accepted row formats, detected from the columns (first match wins):
      (a) ``prompt``, ``chosen``, ``rejected`` -> as is;
      (b) ``instruction``, ``input`` (optional), ``chosen``, ``rejected`` -> Alpaca prompt (e.g.
          LLMs-from-scratch ``instruction-data-with-preference.json``; its ``output`` is dropped);
      (c) ``question``, ``response_j``, ``response_k`` (stack-exchange-paired; ``response_j`` is
          preferred) -> prompt ``"Question: {question}\\n\\nAnswer: "`` as in TRL's stack-llama;
      (d) only ``chosen``, ``rejected`` as whole ``Human: … Assistant: …`` transcripts
          (Anthropic hh-rlhf) -> split by ``split_transcripts`` (prompt = the shared turns).
    Pairs with ``chosen == rejected`` carry no preference signal: they are dropped, and their
    count is logged as a warning.

    Args:
        source: see ``load_records``.
        split: the split for Hub datasets.

    Raises:
        FileNotFoundError: for a missing local data file.
        ValueError: for an unrecognised column set, or a missing / non-string / blank required
            field (message names the source, the 0-based row in the source and the field).

    Returns:
        A ``datasets.Dataset`` with exactly the string columns ``prompt``, ``chosen``,
        ``rejected``, in source order (minus the dropped pairs).
    """
    dataset = _canonical(
        source, split, _PREFERENCE_FORMATS, "preference", ("prompt", "chosen", "rejected")
    )
    distinct = dataset.filter(
        lambda chosen, rejected: [c != r for c, r in zip(chosen, rejected)],
        input_columns=["chosen", "rejected"],
        batched=True,
        keep_in_memory=True,
        desc="drop chosen == rejected",
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
        preference: a dataset with columns ``prompt`` and ``chosen`` (others are dropped).

    Raises:
        ValueError: if ``prompt`` or ``chosen`` is missing (raised by ``datasets``).

    Returns:
        A ``datasets.Dataset`` with columns ``prompt`` and ``completion`` (= ``chosen``).
    """
    return preference.select_columns(["prompt", "chosen"]).rename_column("chosen", "completion")
