"""Rule-based rewards as plain callables: `reward(completions, **columns) -> float32 [N]`.

They run on the host (strings in, NumPy out), between generation and the advantage computation,
with the same calling convention as TRL's GRPOTrainer reward functions: the decoded completions
plus any dataset columns of the batch as keyword arguments (e.g. `answers=...`). Compose them
with `weighted_sum`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation

import numpy as np

RewardFn = Callable[..., np.ndarray]

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_GSM8K_FINAL = re.compile(r"####\s*(.+)")
_NO_TAG = r"(?:(?!</?(?:think|answer)>).)*"  # any text (newlines too) holding none of the four tags
_THINK_ANSWER = re.compile(rf"\s*<think>{_NO_TAG}</think>\s*<answer>{_NO_TAG}</answer>\s*", re.DOTALL)


def parse_number(text: str) -> Decimal | None:
    """The last number in `text` ("1,234", "$5", "-3.50" forms), as an exact Decimal; else None."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    try:
        return Decimal(matches[-1].replace(",", "").replace("$", ""))
    except InvalidOperation:
        return None


def extract_answer(text: str) -> Decimal | None:
    """The final numeric answer of a completion or a GSM8K solution.

    Looks, in order, in the last `<answer>…</answer>` block (DeepSeek-R1's format), after the last
    `####` (GSM8K's reference format), then anywhere in the text; returns the last number found.
    """
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        return parse_number(tagged[-1])
    final = _GSM8K_FINAL.findall(text)
    if final:
        return parse_number(final[-1])
    return parse_number(text)


def exact_match_reward(completions: Sequence[str], *, answers: Sequence[str], **_) -> np.ndarray:
    """1.0 where the completion's final number equals the reference's, else 0.0.

    Args:
      completions: N decoded completions.
      answers: N references: a bare number, or a GSM8K solution ending in `#### <number>`.

    Returns:
      float32 [N].

    Raises:
      ValueError: the lengths differ, or a reference holds no number (names its index).
    """
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    rewards = np.zeros(len(completions), np.float32)
    for i, (completion, answer) in enumerate(zip(completions, answers)):
        target = extract_answer(answer)
        if target is None:
            raise ValueError(f"answers[{i}] holds no number: {answer[-80:]!r}")
        rewards[i] = float(extract_answer(completion) == target)
    return rewards


def format_reward(completions: Sequence[str], **_) -> np.ndarray:
    """DeepSeek-R1-Zero's format reward (arXiv 2501.12948 §2.2.2): 1.0 for a completion that is
    exactly one `<think>…</think>` block followed by one `<answer>…</answer>` block, else 0.0.

    Accepted, as a whole-string match: optional whitespace, `<think>`, any text, `</think>`,
    optional whitespace, `<answer>`, any text, `</answer>`, optional whitespace. "Any text" may
    be empty and span lines, but holds none of the four tags `<think>`, `</think>`, `<answer>`,
    `</answer>`; tags are case-sensitive; whitespace is `str.isspace` whitespace. So a second,
    nested or unclosed block, a missing block, answer before think, or text before, between or
    after the blocks scores 0. `jaxalign.data.gsm8k.r1_completion`'s form (the R1 template's
    `" <think>\n…\n</think>\n<answer> … </answer>"`) scores 1.

    Args:
      completions: N decoded completions (the text after the prompt, without EOS).

    Returns:
      float32 [N] of 0.0 / 1.0.
    """
    return np.array([float(_THINK_ANSWER.fullmatch(c) is not None) for c in completions], np.float32)


def overlong_penalty(
    completions: Sequence[str], *, lengths: Sequence[int], max_length: int, buffer: int, **_
) -> np.ndarray:
    """DAPO's soft overlong punishment (arXiv 2503.14476, Eq. 13), by completion length |y|:
    0 while |y| <= L_max − L_buffer, then falling linearly to −1 at L_max, and −1 beyond.

    Args:
      completions: N completions (unused beyond their count).
      lengths: N completion lengths in tokens.
      max_length: L_max.
      buffer: L_buffer (the punishment interval), 0 < buffer <= max_length.

    Returns:
      float32 [N] in [−1, 0].

    Raises:
      ValueError: bad buffer or a lengths count that differs from the completions'.
    """
    if not 0 < buffer <= max_length:
        raise ValueError(f"buffer must be in (0, max_length={max_length}], got {buffer}")
    if len(lengths) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(lengths)} lengths")
    excess = np.asarray(lengths, np.float32) - (max_length - buffer)
    return np.clip(-excess / buffer, -1.0, 0.0).astype(np.float32)


def keyword_reward(completions: Sequence[str], *, keywords: Sequence[str], cap: int = 1, **_) -> np.ndarray:
    """Mentions of target words, counted up to `cap`: min(#matches, cap) / cap.

    A word matches when it equals one of `keywords` as a whole word, ignoring case ("Dog," and
    "dog's" match "dog"; "dogma" and "hotdog" do not). With the default cap = 1 the reward is 1.0
    for any completion that mentions a keyword, so repeating it earns nothing more (a repeated
    word is the obvious hack of a count reward).

    Args:
      completions: N decoded completions.
      keywords: the target words (e.g. ("dog", "dogs")); non-empty, each free of whitespace.
      cap: matches that earn the full reward, >= 1.

    Returns:
      float32 [N] in [0, 1].

    Raises:
      ValueError: no keywords, a keyword that is empty or has whitespace, or cap < 1.
    """
    if not keywords or any(not k or any(ch.isspace() for ch in k) for k in keywords):
        raise ValueError(f"keywords must be non-empty words without whitespace, got {list(keywords)!r}")
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(k) for k in keywords) + r")\b", re.IGNORECASE)
    counts = np.array([len(pattern.findall(c)) for c in completions], np.float32)
    return np.minimum(counts, cap) / cap


def weighted_sum(*terms: tuple[RewardFn, float]) -> RewardFn:
    """Composes rewards: `fn(completions, **columns) = Σ_k w_k · reward_k(completions, **columns)`.

    Raises (when called):
      ValueError: a reward returns an array of the wrong shape (names it).
    """
    if not terms:
        raise ValueError("weighted_sum needs at least one (reward, weight) pair")

    def combined(completions: Sequence[str], **columns) -> np.ndarray:
        total = np.zeros(len(completions), np.float32)
        for fn, weight in terms:
            value = np.asarray(fn(completions, **columns), np.float32)
            if value.shape != total.shape:
                raise ValueError(f"{getattr(fn, '__name__', fn)} returned shape {value.shape}, expected {total.shape}")
            total += weight * value
        return total

    return combined
