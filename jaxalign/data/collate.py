"""Tokenise prompt/completion pairs and collate them into static-shape, right-padded batches.

Conventions (training; generation will left-pad prompts separately):
  * ``tokens``: int32 ``[B, L]``: ``[bos?] prompt completion eos``, then ``pad_id`` to length ``L``.
    Conversational rows (TRL's formats, see ``tokenize_conversation``) are instead the chat
    template's rendering, BOS and end-of-turn tokens as the template writes them.
  * ``mask``: float32 ``[B, L]``: 1.0 exactly where ``tokens`` holds a completion token (including
    the appended EOS; for conversational rows the completion's assistant turns with their
    end-of-turn tokens), 0.0 on BOS, prompt and padding. A trainer takes logits from
    ``tokens[:, :-1]`` and scores labels ``tokens[:, 1:]`` weighted by ``mask[:, 1:]``.
  * ``L`` is chosen from a few buckets so that jit compiles once per bucket, and a short final
    batch is filled with all-padding rows (mask 0) so the batch dimension never changes.
  * Rows from ``tokenize_sft`` / ``tokenize_preference`` always keep at least one mask-1 token
    (the EOS is appended and truncation keeps one completion token), so the filler rows of a
    batch are exactly those with ``mask.sum(-1) == 0``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

import datasets
import jinja2
import numpy as np

from jaxalign.data.chat import conversation_problem, encode_chat, messages_prompt
from jaxalign.data.tokenizers import Tokenizer

__all__ = [
    "Example",
    "PreferenceExample",
    "tokenize_prompt_completion",
    "tokenize_conversation",
    "tokenize_sft",
    "tokenize_preference",
    "default_buckets",
    "bucket_length",
    "collate_sft",
    "collate_preference",
    "collate_kto",
    "BatchStream",
    "eval_batches",
]

Batch = dict[str, np.ndarray]
E = TypeVar("E")


class Example(NamedTuple):
    """One tokenised prompt + completion (unpacks as ``tokens, mask = example``).

    Attributes:
        tokens: int32 ``[n]``: ``[bos?] prompt completion [eos]``.
        mask: float32 ``[n]``: 1.0 on completion tokens (and EOS), 0.0 on BOS and prompt.
    """

    tokens: np.ndarray
    mask: np.ndarray


class PreferenceExample(NamedTuple):
    """One tokenised preference pair sharing a prompt (unpacks as ``chosen, rejected``).

    Attributes:
        chosen: the preferred completion as an ``Example``.
        rejected: the dispreferred completion as an ``Example``.
    """

    chosen: Example
    rejected: Example


def _truncate(
    head: list[int], prompt: list[int], tail: list[int], tail_mask: Sequence[bool], *, max_length: int
) -> Example:
    """``head + prompt + tail`` cut to ``max_length`` (the truncation policy of
    ``tokenize_prompt_completion``); mask 1.0 where ``tail_mask`` is True, 0.0 on head and prompt.

    Raises ``ValueError`` if ``max_length`` cannot hold the head, one prompt and one tail token.
    """
    if max_length < len(head) + 2:
        raise ValueError(
            f"max_length={max_length} leaves no room for a prompt and a completion token"
        )
    # Left-truncate the prompt to make room for the completion, but keep at least one prompt
    # token so the first completion token has a position to be predicted from.
    prompt_room = max(1, max_length - len(head) - len(tail))
    prompt = prompt[-prompt_room:]
    # Then right-truncate the completion (this drops the EOS of an over-long completion).
    keep = max_length - len(head) - len(prompt)
    trained = np.concatenate(
        [np.zeros(len(head) + len(prompt), dtype=bool), np.asarray(tail_mask[:keep], dtype=bool)]
    )
    tokens = np.asarray(head + prompt + tail[:keep], dtype=np.int32)
    return Example(tokens, np.where(trained, 1.0, 0.0).astype(np.float32))


def _assemble(
    prompt: Sequence[int],
    completion: Sequence[int],
    *,
    bos_id: int | None,
    eos_id: int | None,
    max_length: int,
) -> Example:
    """Join ids into an ``Example`` of at most ``max_length`` tokens (see the truncation policy).

    ``eos_id=None`` appends nothing. Raises ``ValueError`` if ``max_length`` cannot hold the BOS,
    one prompt token and one completion token.
    """
    head = [] if bos_id is None else [bos_id]
    tail = list(completion) + ([] if eos_id is None else [eos_id])
    return _truncate(head, list(prompt), tail, [True] * len(tail), max_length=max_length)


def tokenize_prompt_completion(
    tokenizer: Tokenizer,
    prompt: str,
    completion: str,
    *,
    max_length: int,
    append_eos: bool = True,
) -> Example:
    """Tokenise one prompt + completion into ids and a completion mask.

    Layout: ``[bos] + encode(prompt) + encode(completion) + [eos]`` (BOS only if
    ``tokenizer.bos_id`` is not None, EOS only if ``append_eos``). If longer than ``max_length``,
    the prompt is first truncated from the left (keeping its last tokens, at least one), then the
    completion (with its EOS) from the right.

    Args:
        tokenizer: any ``Tokenizer``.
        prompt: the prompt text (mask 0).
        completion: the completion text (mask 1).
        max_length: the most tokens to keep; at least 2 (+1 with a BOS).
        append_eos: whether to end the completion with ``tokenizer.eos_id``.

    Raises:
        ValueError: if ``max_length`` is too small to keep one prompt and one completion token.

    Returns:
        ``Example(tokens int32 [n], mask float32 [n])`` with ``n <= max_length``.
    """
    return _assemble(
        tokenizer.encode(prompt),
        tokenizer.encode(completion),
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id if append_eos else None,
        max_length=max_length,
    )


def _has_template(tokenizer: Tokenizer) -> bool:
    """Whether conversations are rendered with a chat template (``HFTokenizer`` with one)."""
    return getattr(tokenizer, "chat_template", None) is not None


def _parts_problem(
    tokenizer: Tokenizer, prompt: Any, completion: Any, *, fields: tuple[str, str] = ("prompt", "completion")
) -> str | None:
    """Why ``prompt`` + ``completion`` turns cannot be tokenised with ``tokenizer`` (``None`` if
    they can): ``"field '{name}' {problem}"`` from ``chat.conversation_problem`` on each part
    (named by ``fields``), content checked against the tokenizer's special-token strings when it
    renders a chat template (in the plain format they are ordinary text)."""
    special = tuple(getattr(tokenizer, "special_tokens", ())) if _has_template(tokenizer) else ()
    checks = ((fields[0], prompt, True, False), (fields[1], completion, False, True))
    for field, turns, opens, ends in checks:
        problem = conversation_problem(turns, special_tokens=special, opens=opens, ends_with_assistant=ends)
        if problem is not None:
            return f"field '{field}' {problem}"
    return None


def tokenize_conversation(
    tokenizer: Tokenizer,
    prompt: Sequence[Mapping[str, str]],
    completion: Sequence[Mapping[str, str]],
    *,
    max_length: int,
) -> Example:
    """Tokenise one conversation, ``prompt`` turns then ``completion`` turns, masking what to train.

    With a chat template (``HFTokenizer``): the ids are ``encode_chat(tokenizer, prompt +
    completion)``, i.e. transformers' ``apply_chat_template(prompt + completion, tokenize=True)``;
    nothing is added by collation (BOS only if the template writes it, the end-of-turn token as the
    template writes it). The mask is 1.0 exactly on the assistant turns of ``completion``, each turn
    being the text between the conversation rendered up to it with ``add_generation_prompt=True``
    and rendered through it (content + end-of-turn token): TRL ``SFTConfig(assistant_only_loss=
    True)`` on the completion of its prompt-completion format, and for a one-turn ``completion``
    exactly TRL's DPO split (``prompt`` rendered with the generation prompt, the completion = the
    rest). Assistant turns inside ``prompt`` are context (mask 0).

    Without one (byte, GPT-2, SentencePiece tokenizers, or an ``HFTokenizer`` whose checkpoint has
    no template): the library's plain format, ``tokenize_prompt_completion(messages_prompt(prompt +
    completion[:-1]), completion[-1]["content"])`` with BOS/EOS as there: only the last assistant
    turn is trained, the earlier turns being ``### Role:`` context.

    Truncation is that of ``tokenize_prompt_completion``, the prompt being everything before the
    first trained token: a template-written BOS stays first, the prompt is cut from the left
    (keeping at least one token), then the rest from the right.

    Args:
        tokenizer: any ``Tokenizer``.
        prompt: ``{"role", "content"}`` turns before the completion (not opening with the assistant).
        completion: turns ending with an assistant turn (see ``load_sft_dataset``).
        max_length: the most tokens to keep; at least 2 (+1 with a BOS first).

    Raises:
        ValueError: a malformed part, naming it (``"field 'completion' message 0 field 'content'
            contains the special token(s) ['<|im_end|>']"``; also an unknown role, non-string or
            blank content, a prompt opening with the assistant, a completion not ending with it:
            ``chat.conversation_problem``); what
            ``encode_chat`` refuses (a template that is not prefix-consistent, or renders an
            assistant turn as nothing); ``max_length`` too small.
        jinja2.TemplateError: whatever the template raises (e.g. Gemma on a system turn).

    Returns:
        ``Example(tokens int32 [n], mask float32 [n])`` with ``n <= max_length`` and at least one
        mask-1 token.
    """
    if (problem := _parts_problem(tokenizer, prompt, completion)) is not None:
        raise ValueError(problem)
    if not _has_template(tokenizer):
        text = messages_prompt([*prompt, *completion[:-1]])
        return tokenize_prompt_completion(tokenizer, text, completion[-1]["content"], max_length=max_length)
    ids, trained = encode_chat(tokenizer, [*prompt, *completion], mask_from=len(prompt))
    first = next((i for i, t in enumerate(trained) if t), None)
    if first is None:
        raise ValueError("the chat template renders the completion's assistant turns as no token")
    bos = tokenizer.bos_id
    head = 1 if bos is not None and first > 1 and ids[0] == bos else 0
    return _truncate(ids[:head], ids[head:first], ids[first:], trained[first:], max_length=max_length)


def _is_conversational(dataset: datasets.Dataset) -> bool:
    """Whether the ``prompt`` column holds turn lists (``CONVERSATION``) rather than strings."""
    return isinstance(dataset.features["prompt"], (list, datasets.List, datasets.LargeList))


def _tokenize_conversations(
    dataset: datasets.Dataset,
    tokenizer: Tokenizer,
    completion_columns: Sequence[str],
    max_length: int,
    source: str | os.PathLike | None,
) -> list[list[Example]]:
    """Per row, one ``tokenize_conversation`` ``Example`` per completion column. Every row is
    checked before any is encoded; errors gain ``"{source}: row {i}: "``."""
    columns = dataset.select_columns(["prompt", *completion_columns]).to_dict()
    label = "" if source is None else f"{os.fspath(source)}: "
    for row, prompt in enumerate(columns["prompt"]):
        for column in completion_columns:
            problem = _parts_problem(tokenizer, prompt, columns[column][row], fields=("prompt", column))
            if problem is not None:
                raise ValueError(f"{label}row {row}: {problem}")
    examples = []
    for row, prompt in enumerate(columns["prompt"]):
        sides = []
        for column in completion_columns:
            where = f"{label}row {row}: prompt + {column}"
            try:
                sides.append(tokenize_conversation(tokenizer, prompt, columns[column][row], max_length=max_length))
            except jinja2.TemplateError as err:
                err.add_note(f"while rendering {where}")
                raise
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from err
        examples.append(sides)
    return examples


def _tokenize_columns(
    dataset: datasets.Dataset,
    tokenizer: Tokenizer,
    completion_columns: Sequence[str],
    max_length: int,
) -> list[list[Example]]:
    """Per row, one ``Example`` per completion column, all sharing the row's ``prompt``.

    Encodes each column with one ``encode_batch`` call (the prompt column once).
    """
    encoded = {
        column: tokenizer.encode_batch(dataset[column])
        for column in ("prompt", *completion_columns)
    }
    return [
        [
            _assemble(
                prompt,
                encoded[column][row],
                bos_id=tokenizer.bos_id,
                eos_id=tokenizer.eos_id,
                max_length=max_length,
            )
            for column in completion_columns
        ]
        for row, prompt in enumerate(encoded["prompt"])
    ]


def tokenize_sft(
    dataset: datasets.Dataset,
    tokenizer: Tokenizer,
    *,
    max_length: int,
    source: str | os.PathLike | None = None,
) -> list[Example]:
    """Tokenise an SFT dataset row by row.

    String rows: ``tokenize_prompt_completion`` with EOS. Conversational rows (``CONVERSATION``
    columns, TRL's conversational formats): ``tokenize_conversation``, i.e. rendered with the
    tokenizer's chat template, every assistant turn of ``completion`` trained (TRL
    ``assistant_only_loss``), nothing appended; or, without a template, the plain format.

    Args:
        dataset: columns ``prompt`` and ``completion``, both strings or both turn lists (see
            ``load_sft_dataset``).
        tokenizer: any ``Tokenizer``; for string rows its ``encode_batch`` is used once per column.
        max_length: the most tokens per example.
        source: the data file, named in the errors of conversational rows (rows are numbered in
            ``dataset``, which after ``train_val_split`` is not the file's order).

    Raises:
        ValueError: if ``max_length`` is too small (see ``tokenize_prompt_completion``); for
            conversational rows, before anything is encoded, ``"{source}: row {i}: field
            '{field}' ..."`` for a malformed conversation (see ``tokenize_conversation``: e.g.
            content holding a special-token string of the template tokenizer), and
            ``"{source}: row {i}: prompt + completion: ..."`` for what ``encode_chat`` refuses.
        jinja2.TemplateError: whatever the template raises, with a note naming the row.

    Returns:
        One ``Example`` per row, in row order.
    """
    if _is_conversational(dataset):
        rows = _tokenize_conversations(dataset, tokenizer, ("completion",), max_length, source)
    else:
        rows = _tokenize_columns(dataset, tokenizer, ("completion",), max_length)
    return [completion for (completion,) in rows]


def tokenize_preference(
    dataset: datasets.Dataset,
    tokenizer: Tokenizer,
    *,
    max_length: int,
    source: str | os.PathLike | None = None,
) -> list[PreferenceExample]:
    """Tokenise a preference dataset; each side is truncated on its own to ``max_length``.

    String rows: ``tokenize_prompt_completion`` per side. Conversational rows: ``tokenize_conversation
    (prompt, chosen)`` and ``(prompt, rejected)``: with a chat template, each side is the rendered
    ``prompt + side`` and only the side's assistant turns are trained (TRL ``DPOTrainer``: the
    prompt rendered with ``add_generation_prompt=True``, the completion the rest); without one,
    the plain format.

    Args:
        dataset: columns ``prompt``, ``chosen``, ``rejected``, all strings or all turn lists
            (see ``load_preference_dataset``).
        tokenizer: any ``Tokenizer``; for string rows its ``encode_batch`` is used once per column.
        max_length: the most tokens per side.
        source: the data file, named in the errors of conversational rows (see ``tokenize_sft``).

    Raises:
        ValueError: if ``max_length`` is too small (see ``tokenize_prompt_completion``); for
            conversational rows, as ``tokenize_sft`` (the field being ``prompt``, ``chosen`` or
            ``rejected``).
        jinja2.TemplateError: whatever the template raises, with a note naming the row.

    Returns:
        One ``PreferenceExample(chosen, rejected)`` per row, in row order.
    """
    if _is_conversational(dataset):
        rows = _tokenize_conversations(dataset, tokenizer, ("chosen", "rejected"), max_length, source)
    else:
        rows = _tokenize_columns(dataset, tokenizer, ("chosen", "rejected"), max_length)
    return [PreferenceExample(chosen, rejected) for chosen, rejected in rows]


def default_buckets(max_length: int, min_bucket: int = 32) -> tuple[int, ...]:
    """Sequence-length buckets ``min_bucket * 2**k`` up to ``max_length``, ending at ``max_length``.

    Args:
        max_length: the longest sequence (the last bucket), >= 1.
        min_bucket: the smallest bucket (a power of two gives powers of two), >= 1.

    Raises:
        ValueError: if either argument is < 1.

    Returns:
        Ascending tuple, e.g. ``default_buckets(200) == (32, 64, 128, 200)``,
        ``default_buckets(256) == (32, 64, 128, 256)``, ``default_buckets(16) == (16,)``.
    """
    if max_length < 1 or min_bucket < 1:
        raise ValueError(
            f"need max_length >= 1 and min_bucket >= 1, got {max_length} and {min_bucket}"
        )
    doublings = (min_bucket * 2**k for k in itertools.count())
    return (*itertools.takewhile(lambda b: b < max_length, doublings), max_length)


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``n`` tokens, or the largest bucket if none does.

    Args:
        n: a sequence length.
        buckets: allowed lengths, any order, non-empty.

    Raises:
        ValueError: if ``buckets`` is empty.

    Returns:
        ``min(b for b in buckets if b >= n)``, else ``max(buckets)`` (callers truncate).
    """
    if not buckets:
        raise ValueError("buckets must be non-empty")
    return min((b for b in buckets if b >= n), default=max(buckets))


def _pad(examples: Sequence[Example], *, batch_size: int, length: int, pad_id: int) -> Batch:
    """Right-pad (or right-truncate) each example to ``length`` and add filler rows.

    Returns ``{"tokens": int32 [batch_size, length], "mask": float32 [batch_size, length]}``.
    """
    tokens = np.full((batch_size, length), pad_id, dtype=np.int32)
    mask = np.zeros((batch_size, length), dtype=np.float32)
    for row, example in enumerate(examples):
        n = min(len(example.tokens), length)
        tokens[row, :n] = example.tokens[:n]
        mask[row, :n] = example.mask[:n]
    return {"tokens": tokens, "mask": mask}


def _check_count(examples: Sequence[object], batch_size: int) -> None:
    """Raise ``ValueError`` unless ``1 <= len(examples) <= batch_size``."""
    if not 1 <= len(examples) <= batch_size:
        raise ValueError(f"need 1 to batch_size={batch_size} examples, got {len(examples)}")


def collate_sft(
    examples: Sequence[Example], *, batch_size: int, buckets: Sequence[int], pad_id: int
) -> Batch:
    """Stack SFT examples into a right-padded batch of static shape.

    Args:
        examples: 1 to ``batch_size`` ``Example``s; fewer are completed with filler rows
            (all ``pad_id``, mask 0).
        batch_size: the batch dimension ``B``.
        buckets: allowed lengths; ``L = bucket_length(longest example, buckets)``. Examples longer
            than the largest bucket are truncated on the right.
        pad_id: the id written to padded positions.

    Raises:
        ValueError: if ``examples`` is empty or longer than ``batch_size``, or ``buckets`` is empty.

    Returns:
        ``{"tokens": int32 [B, L], "mask": float32 [B, L]}`` (NumPy; the trainer shards them).
    """
    _check_count(examples, batch_size)
    length = bucket_length(max(len(e.tokens) for e in examples), buckets)
    return _pad(examples, batch_size=batch_size, length=length, pad_id=pad_id)


def collate_preference(
    examples: Sequence[PreferenceExample],
    *,
    batch_size: int,
    buckets: Sequence[int],
    pad_id: int,
) -> Batch:
    """Stack preference pairs into right-padded chosen and rejected batches of one length ``L``.

    Args:
        examples: 1 to ``batch_size`` ``PreferenceExample``s; fewer are completed with filler
            rows (all ``pad_id``, mask 0) on both sides.
        batch_size: the batch dimension ``B``.
        buckets: allowed lengths; ``L`` is the bucket of the longest chosen *or* rejected
            sequence, so both sides can be concatenated into one ``[2B, L]`` forward pass.
            Longer sequences are truncated on the right.
        pad_id: the id written to padded positions.

    Raises:
        ValueError: if ``examples`` is empty or longer than ``batch_size``, or ``buckets`` is empty.

    Returns:
        ``{"chosen_tokens": int32 [B, L], "chosen_mask": float32 [B, L],
        "rejected_tokens": int32 [B, L], "rejected_mask": float32 [B, L]}`` (NumPy).
    """
    _check_count(examples, batch_size)
    length = bucket_length(max(len(side.tokens) for pair in examples for side in pair), buckets)
    pad = functools.partial(_pad, batch_size=batch_size, length=length, pad_id=pad_id)
    chosen = pad([pair.chosen for pair in examples])
    rejected = pad([pair.rejected for pair in examples])
    return {
        "chosen_tokens": chosen["tokens"],
        "chosen_mask": chosen["mask"],
        "rejected_tokens": rejected["tokens"],
        "rejected_mask": rejected["mask"],
    }


def _prompt_and_completion(example: Example) -> tuple[np.ndarray, np.ndarray]:
    """(prompt tokens, completion tokens) of an example: split where its mask first turns 1."""
    start = int(np.argmax(example.mask > 0)) if np.any(example.mask > 0) else len(example.tokens)
    return example.tokens[:start], example.tokens[start:]


def collate_kto(
    examples: Sequence[PreferenceExample],
    *,
    batch_size: int,
    buckets: Sequence[int],
    pad_id: int,
) -> Batch:
    """Preference pairs as KTO's unpaired batch: chosen = desirable, rejected = undesirable, and
    the mismatched pairs of KTO's reference point z₀.

    KL pair i is the prompt of pair i with the chosen completion of pair i − 1 (cyclically),
    TRL's rotation of completions within a batch (KTOTrainer, trl 1.16.0 kto_trainer.py
    L1141–1156; a batch of one pair gets its own completion). Every side is padded to one length
    ``L``, the bucket of the longest of the three, so the trainer scores all in one [3B, L] pass.

    Args:
        examples: 1 to ``batch_size`` ``PreferenceExample``s (filler rows complete the batch).
        batch_size, buckets, pad_id: as in ``collate_preference``.

    Raises:
        ValueError: as ``collate_preference``.

    Returns:
        ``collate_preference``'s four arrays plus ``kl_tokens`` int32 [B, L] and ``kl_mask``
        float32 [B, L] (1.0 on the borrowed completion).
    """
    _check_count(examples, batch_size)
    kl = []
    for i, pair in enumerate(examples):
        prompt, _ = _prompt_and_completion(pair.chosen)
        _, completion = _prompt_and_completion(examples[i - 1].chosen)
        kl.append(Example(
            np.concatenate([prompt, completion]).astype(np.int32),
            np.concatenate([np.zeros(len(prompt)), np.ones(len(completion))]).astype(np.float32),
        ))
    length = bucket_length(max(len(e.tokens) for e in (*kl, *(s for pair in examples for s in pair))), buckets)
    pad = functools.partial(_pad, batch_size=batch_size, length=length, pad_id=pad_id)
    chosen, rejected, mismatched = pad([p.chosen for p in examples]), pad([p.rejected for p in examples]), pad(kl)
    return {
        "chosen_tokens": chosen["tokens"],
        "chosen_mask": chosen["mask"],
        "rejected_tokens": rejected["tokens"],
        "rejected_mask": rejected["mask"],
        "kl_tokens": mismatched["tokens"],
        "kl_mask": mismatched["mask"],
    }


def collate_prompts(
    prompts: Sequence[str],
    tokenizer,
    *,
    length: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise prompts for generation: LEFT-padded, BOS first when the tokenizer has one.

    Args:
        prompts: B prompt strings ("" is allowed when the tokenizer has a BOS token).
        tokenizer: a `Tokenizer`.
        length: pad to this width P (default: the longest prompt); longer prompts keep their last
            P tokens, so the text nearest the completion survives.

    Raises:
        ValueError: a prompt encodes to no tokens at all.

    Returns:
        (tokens int32 [B, P] with ``pad_id`` on the left, mask float32 [B, P], 1 on real tokens).
    """
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    rows = [bos + ids for ids in tokenizer.encode_batch(list(prompts))]
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {i} is empty and the tokenizer has no BOS token to start from")
    return pad_prompts(rows, pad_id=tokenizer.pad_id, length=length)


def pad_prompts(
    rows: Sequence[Sequence[int]], *, pad_id: int, length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """LEFT-pad prompts that are already token ids (e.g. chat-template renderings from
    ``encode_chat(..., add_generation_prompt=True)``) for generation.

    Args:
        rows: B non-empty lists of token ids, each complete (BOS included where wanted).
        pad_id: filler id of the padded positions (their mask is 0).
        length: pad to this width P (default: the longest row); longer rows keep their last P
            tokens, so the text nearest the completion survives.

    Raises:
        ValueError: no rows, or an empty row (named by index).

    Returns:
        (tokens int32 [B, P] with ``pad_id`` on the left, mask float32 [B, P], 1 on real tokens).
    """
    if not rows:
        raise ValueError("pad_prompts: no prompts")
    for i, row in enumerate(rows):
        if not len(row):
            raise ValueError(f"prompt {i} has no tokens")
    width = length or max(len(r) for r in rows)
    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.float32)
    for i, row in enumerate(rows):
        row = list(row)[-width:]
        tokens[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1.0
    return tokens, mask


class ReferencedPair(NamedTuple):
    """A preference pair with its reference model's completion log-probs, precomputed once."""

    pair: PreferenceExample
    ref_chosen_logps: float
    ref_rejected_logps: float


def with_reference_logps(
    pairs: Sequence[PreferenceExample], ref_chosen_logps: np.ndarray, ref_rejected_logps: np.ndarray
) -> list[ReferencedPair]:
    """Attaches precomputed reference log-probs ([n] float, nats) to the pairs they belong to.

    Raises:
        ValueError: the arrays' lengths differ from the number of pairs.
    """
    if not len(pairs) == len(ref_chosen_logps) == len(ref_rejected_logps):
        raise ValueError(
            f"{len(pairs)} pairs but {len(ref_chosen_logps)} / {len(ref_rejected_logps)} "
            "reference log-probs"
        )
    return [
        ReferencedPair(p, float(c), float(r))
        for p, c, r in zip(pairs, ref_chosen_logps, ref_rejected_logps)
    ]


def collate_referenced(
    items: Sequence[ReferencedPair], *, batch_size: int, buckets: Sequence[int], pad_id: int
) -> Batch:
    """`collate_preference` plus ``ref_chosen_logps`` and ``ref_rejected_logps`` float32 ``[B]``
    (0.0 on filler rows), the batch keys DPO reads instead of running a reference model.

    Raises:
        ValueError: as `collate_preference`.
    """
    batch = collate_preference(
        [item.pair for item in items], batch_size=batch_size, buckets=buckets, pad_id=pad_id
    )
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        values = np.zeros((batch_size,), np.float32)
        values[: len(items)] = [getattr(item, key) for item in items]
        batch[key] = values
    return batch


@dataclasses.dataclass(frozen=True)
class BatchStream(Generic[E]):
    """Deterministic, resumable shuffled batches: batch ``step`` is a pure function of ``step``.

    Epoch ``e = step // steps_per_epoch`` visits the examples in the order
    ``np.random.default_rng((seed, e)).permutation(n)``, so a run resumed at step ``k`` sees
    exactly the batches it would have seen, with no iterator state to checkpoint.

    Attributes:
        examples: the tokenised examples (``Example`` or ``PreferenceExample``).
        batch_size: examples per batch.
        seed: shuffling seed.
        collate: turns 1 to ``batch_size`` examples into a batch dict, e.g.
            ``functools.partial(collate_sft, batch_size=8, buckets=(64, 128), pad_id=tok.pad_id)``.
        drop_last: ``True`` drops each epoch's incomplete final batch (``n // batch_size`` steps
            per epoch); ``False`` keeps it (``ceil(n / batch_size)`` steps; ``collate`` pads it).
        num_shards, shard_index: multi-host data loading (``jax.process_count()``,
            ``jax.process_index()``): a step's global batch is ``batch_size * num_shards``
            examples drawn as above, and this stream yields rows ``shard_index * batch_size`` to
            ``(shard_index + 1) * batch_size - 1`` of it; every host shuffles identically, so the
            shards are disjoint and together form the one-host stream's batch of the global size.
            ``jaxalign.sharding.shard_batch`` assembles the global array. Needs ``drop_last``.

    Raises:
        ValueError: on construction, if ``batch_size < 1``, there are no examples,
            ``drop_last`` and fewer examples than a global batch, ``shard_index`` is not in
            ``[0, num_shards)``, or ``num_shards > 1`` without ``drop_last``.
    """

    examples: Sequence[E]
    batch_size: int
    seed: int
    collate: Callable[[Sequence[E]], Batch]
    drop_last: bool = True
    num_shards: int = 1
    shard_index: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.examples:
            raise ValueError("BatchStream needs at least one example")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard_index must be in [0, num_shards={self.num_shards}), got {self.shard_index}")
        if self.num_shards > 1 and not self.drop_last:
            raise ValueError("num_shards > 1 needs drop_last=True (every shard gets a full batch)")
        if self.drop_last and len(self.examples) < self.batch_size * self.num_shards:
            raise ValueError(
                f"{len(self.examples)} examples are fewer than batch_size={self.batch_size} "
                f"× num_shards={self.num_shards} with drop_last=True: no complete batch"
            )

    @property
    def steps_per_epoch(self) -> int:
        """Number of batches per pass over the data."""
        full, rest = divmod(len(self.examples), self.batch_size * self.num_shards)
        return full + int(rest > 0 and not self.drop_last)

    def indices_at(self, step: int) -> np.ndarray:
        """Example indices of batch ``step``.

        Args:
            step: global step, >= 0.

        Raises:
            ValueError: if ``step < 0``.

        Returns:
            int64 ``[batch_size]`` (fewer for a kept incomplete final batch).
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, within = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng((self.seed, epoch)).permutation(len(self.examples))
        start = (within * self.num_shards + self.shard_index) * self.batch_size
        return order[start : start + self.batch_size]

    def batch_at(self, step: int) -> Batch:
        """The collated batch for global step ``step`` (>= 0; raises ``ValueError`` if < 0)."""
        return self.collate([self.examples[i] for i in self.indices_at(step)])

    def iter_from(self, start_step: int = 0) -> Iterator[Batch]:
        """Endless batches ``batch_at(start_step), batch_at(start_step + 1), ...``.

        Args:
            start_step: the first global step (e.g. the step of a restored checkpoint).

        Returns:
            An infinite iterator; bound it with ``itertools.islice``.
        """
        return map(self.batch_at, itertools.count(start_step))

    def __iter__(self) -> Iterator[Batch]:
        """Endless batches from step 0 (``iter_from(0)``)."""
        return self.iter_from(0)


def eval_batches(
    examples: Sequence[E], *, batch_size: int, collate: Callable[[Sequence[E]], Batch]
) -> Iterator[Batch]:
    """Every example exactly once, in order; ``collate`` pads the last, short batch.

    Args:
        examples: the tokenised examples.
        batch_size: examples per batch.
        collate: as for ``BatchStream`` (use the same ``batch_size`` in both).

    Raises:
        ValueError: if ``batch_size < 1``.

    Returns:
        An iterator of ``ceil(len(examples) / batch_size)`` batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return (
        collate(examples[start : start + batch_size])
        for start in range(0, len(examples), batch_size)
    )
