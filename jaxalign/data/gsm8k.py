"""GSM8K (Cobbe et al. 2021, arXiv 2110.14168) as RL prompts with a verifiable final answer.

Rows of openai/grade-school-math (`{question, answer}`, the answer a worked solution whose last
line is `#### <number>`) become `{prompt, question, reasoning, answer}` strings: the question put
in a prompt template, the solution's reasoning (before `####`, calculator annotations
`<<48/2=24>>` removed) and the final number alone ("1,000" -> "1000"). Rows are validated like
the SFT and preference loaders (`jaxalign.data.datasets`): a missing, empty or unparsable field
raises an error naming the file, the 0-based row and the field.

Template: DeepSeek-R1-Zero's (arXiv 2501.12948, Table 1), which asks for
`<think> reasoning </think> <answer> answer </answer>`. Chosen over GSM8K's own `#### N` ending
because (a) the answer span is delimited on both sides, so the accuracy reward reads exactly what
the model marked as its answer (`jaxalign.rewards.extract_answer` looks in `<answer>` first);
(b) `jaxalign.rewards.format_reward` checks that form, giving a signal while answers are still
wrong; (c) it is plain text, so it works with any tokenizer and with base checkpoints, where
`####` would have to be taught by few-shot examples or SFT first.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import datasets

from jaxalign.data.datasets import RowFormat, load_canonical, text_problem

__all__ = [
    "R1_SYSTEM",
    "R1_TEMPLATE",
    "r1_prompt",
    "r1_messages",
    "r1_completion",
    "gsm8k_final_answer",
    "load_gsm8k",
]

R1_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think> <answer> answer here </answer>. User: {question} Assistant:"
)

# The template's instructions alone, as the system turn of a chat model (TRL's and Open-R1's GRPO
# recipes on instruct checkpoints put them there and the question in the user turn).
R1_SYSTEM = R1_TEMPLATE.split(" User: {question}")[0]

_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)\s*$")
_CALCULATOR = re.compile(r"<<[^>]*>>")


def r1_prompt(question: str) -> str:
    """`R1_TEMPLATE` with the question filled in; the completion starts after "Assistant:"."""
    return R1_TEMPLATE.format(question=question.strip())


def r1_messages(question: str) -> list[dict[str, str]]:
    """The R1-Zero prompt as a conversation for a chat template: ``[{"role": "system", "content":
    R1_SYSTEM}, {"role": "user", "content": question}]`` (render it with
    ``add_generation_prompt=True``; the completion is the assistant turn)."""
    return [{"role": "system", "content": R1_SYSTEM}, {"role": "user", "content": question.strip()}]


def r1_completion(reasoning: str, answer: str) -> str:
    """A completion in the template's format: `" <think>\\n{reasoning}\\n</think>\\n<answer>
    {answer} </answer>"` (what `format_reward` scores 1.0; a gold one for SFT or for tests)."""
    return f" <think>\n{reasoning.strip()}\n</think>\n<answer> {answer.strip()} </answer>"


def gsm8k_final_answer(solution: str) -> str | None:
    """The number after the final `####` of a GSM8K solution, commas removed ("1,000" -> "1000");
    None when the solution does not end in `#### <number>`."""
    match = _FINAL.search(solution.strip())
    return None if match is None else match.group(1).replace(",", "")


def _solution_problem(value: Any) -> str | None:
    """Why `value` is not a GSM8K solution (None if it is text ending in `#### <number>`)."""
    if (problem := text_problem(value)) is not None:
        return problem
    if gsm8k_final_answer(value) is None:
        return f"does not end in '#### <number>': {value.strip()[-60:]!r}"
    return None


def _gsm8k_format(template: Callable[[str], str]) -> RowFormat:
    def convert(batch):
        return {
            "prompt": [template(q) for q in batch["question"]],
            "question": batch["question"],
            "reasoning": [_CALCULATOR.sub("", s.split("####")[0]).strip() for s in batch["answer"]],
            "answer": [gsm8k_final_answer(s) for s in batch["answer"]],
        }

    return RowFormat(required={"question": text_problem, "answer": _solution_problem}, convert=convert)


def load_gsm8k(
    source: str | os.PathLike,
    *,
    split: str = "train",
    template: Callable[[str], str] = r1_prompt,
    dedup: float | None = None,
) -> datasets.Dataset:
    """Load GSM8K problems as RL prompts with their final answers.

    Args:
        source: a GSM8K file (`train.jsonl` / `test.jsonl` of openai/grade-school-math, or any
            `{question, answer}` file `load_records` reads), or a dataset folder / Hub dataset
            that `datasets.load_dataset(source, split=split)` loads without a config name.
        split: the split for Hub datasets.
        template: question -> prompt (default `r1_prompt`).
        dedup: a Jaccard threshold in (0, 1): drop exact and MinHash-LSH near duplicates of
            question + answer (`jaxalign.data.dedup`; the count removed is logged). None keeps all.

    Raises:
        FileNotFoundError: for a missing local data file.
        ValueError: an unreadable or empty `source` (`"{source}: line {n}: not valid JSON ..."`,
            `"{source}: is empty ..."`: see `load_records`), columns other than `question`,
            `answer`, or a row whose `question` or `answer` is missing, not a string or blank,
            or whose `answer` does not end in `#### <number>`
            (`"{source}: row {i}: field 'answer' does not end in ..."`); a `dedup` outside (0, 1).

    Returns:
        A `datasets.Dataset` with the string columns `prompt`, `question`, `reasoning`, `answer`
        (the final number), in source order.
    """
    return load_canonical(
        source, split, (_gsm8k_format(template),), "GSM8K", ("prompt", "question", "reasoning", "answer"),
        dedup=dedup,
    )
