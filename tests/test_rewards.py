import json
from decimal import Decimal

import numpy as np
import pytest

from jaxalign.rewards import (
    cot_segments,
    exact_match_reward,
    extract_answer,
    format_reward,
    keyword_reward,
    language_consistency_reward,
    overlong_penalty,
    parse_number,
    reasoning_region,
    weighted_sum,
)


def test_parse_and_extract():
    assert parse_number("costs $1,234.50 in total") == Decimal("1234.50")
    assert parse_number("no digits") is None
    assert extract_answer("so 3 + 4 = 7 #### 7") == Decimal("7")
    assert extract_answer("<think>maybe 5</think><answer>The answer is -12</answer> then 99") == Decimal("-12")
    assert extract_answer("I think it is 18, not 20.") == Decimal("20")


def test_exact_match_reward():
    completions = ["<think>..</think><answer>72</answer>", "#### 72.0", "it is 71", "nothing"]
    answers = ["Natalia sold 48/2 = 24 clips... #### 72"] * 4
    np.testing.assert_array_equal(exact_match_reward(completions, answers=answers), [1, 1, 0, 0])
    with pytest.raises(ValueError, match=r"answers\[0\]"):
        exact_match_reward(["1"], answers=["no number here"])


def test_gsm8k_reference_answers_all_parse(shared_data):
    rows = [json.loads(line) for line in (shared_data / "gsm8k/test.jsonl").read_text().splitlines()]
    assert len(rows) == 1319
    for row in rows:
        final = row["answer"].split("####")[-1].strip().replace(",", "")
        assert extract_answer(row["answer"]) == Decimal(final)
    # a completion that restates the reference solution earns the reward
    np.testing.assert_array_equal(
        exact_match_reward([r["answer"] for r in rows[:50]], answers=[r["answer"] for r in rows[:50]]), np.ones(50)
    )


def test_format_reward():
    completions = [
        "<think>2+2 is 4</think>\n<answer>4</answer>",
        "<answer>4</answer>",
        "<think>x</think><answer>4</answer> trailing text",
        " <think>\nmulti\nline\n</think> <answer>\n4\n</answer>\n",
    ]
    np.testing.assert_array_equal(format_reward(completions), [1, 0, 0, 1])


def test_overlong_penalty_hand_computed():
    # L_max = 20, buffer = 4: no penalty up to 16, linear to -1 at 20, -1 beyond
    out = overlong_penalty(["x"] * 5, lengths=[10, 16, 18, 20, 25], max_length=20, buffer=4)
    np.testing.assert_allclose(out, [0.0, 0.0, -0.5, -1.0, -1.0])
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(["x"], lengths=[1], max_length=4, buffer=0)


def test_weighted_sum():
    reward = weighted_sum((exact_match_reward, 1.0), (format_reward, 0.5))
    completions = ["<think>a</think><answer>3</answer>", "3", "<think>a</think><answer>4</answer>"]
    np.testing.assert_allclose(reward(completions, answers=["3", "3", "3"]), [1.5, 1.0, 0.5])
    bad = weighted_sum((lambda c, **_: np.zeros(2), 1.0),)
    with pytest.raises(ValueError, match="shape"):
        bad(["a", "b", "c"])


def test_keyword_reward_whole_words_case_insensitive_capped():
    completions = [
        "The Dog ran. A dog's bone!",  # 2 matches
        "dogma and hotdogs",  # no whole-word match
        "Two dogs and a dog, dog, dog.",  # 1 "dogs" + 3 "dog"
        "",
    ]
    np.testing.assert_array_equal(keyword_reward(completions, keywords=["dog"]), [1, 0, 1, 0])
    np.testing.assert_allclose(keyword_reward(completions, keywords=["dog", "dogs"], cap=3), [2 / 3, 0, 1, 0])
    np.testing.assert_allclose(keyword_reward(completions, keywords=["dog"], cap=4), [0.5, 0, 0.75, 0])
    with pytest.raises(ValueError, match="keywords"):
        keyword_reward(["x"], keywords=["two words"])
    with pytest.raises(ValueError, match="cap"):
        keyword_reward(["x"], keywords=["dog"], cap=0)


def test_format_reward_exactly_one_think_then_one_answer():
    from jaxalign.data.gsm8k import r1_completion

    accepted = [
        r1_completion("Half of 48 is 24.\nSo 48 + 24 = 72.", "72"),  # the template's own form
        "<think>2+2 is 4</think><answer>4</answer>",
        "\n\t<think></think>\n\n<answer></answer>\n",  # empty blocks, whitespace around them
        "<think>a < b and c > d; 3 <4> 5</think> <answer>x</answer>",  # '<' and '>' that are no tags
    ]
    rejected = [
        "<think><think>nested</think></think><answer>4</answer>",
        "<think>outer <think>inner</think><answer>4</answer>",  # an unclosed nested think
        "<think>a</think><think>b</think><answer>4</answer>",  # repeated think
        "<think>a</think> <answer>1</answer> <answer>2</answer>",  # repeated answer
        "<think>a <answer>3</answer></think><answer>4</answer>",  # an answer inside the think
        "<answer>4</answer>",  # missing think
        "<think>a</think>",  # missing answer
        "<answer>4</answer><think>a</think>",  # reversed order
        "<think>a</think><answer>4</answer> trailing text",
        "Sure! <think>a</think><answer>4</answer>",  # leading text
        "<think>a</think> so <answer>4</answer>",  # text between the blocks
        "<think>a</think><answer>4",  # unclosed answer
        "<THINK>a</THINK><answer>4</answer>",  # tags are case-sensitive
    ]
    np.testing.assert_array_equal(format_reward(accepted + rejected), [1.0] * len(accepted) + [0.0] * len(rejected))
    assert format_reward(accepted).dtype == np.float32


# ----------------------------------------------------------------- language consistency (R1)


def think(cot: str) -> str:
    return f"<think>{cot}</think><answer>1</answer>"


def test_language_consistency_spec_cases():
    english = think("First we compute the total, then we divide it by two.")
    chinese = think("我们先计算总数，然后除以二。")
    mixed = think("我们 need to compute")  # 2 Han words + 3 Latin words
    np.testing.assert_array_equal(language_consistency_reward([english], target_language="en"), [1.0])
    np.testing.assert_array_equal(language_consistency_reward([chinese, english], target_language="zh"), [1.0, 0.0])
    np.testing.assert_array_equal(language_consistency_reward([chinese], target_language="en"), [0.0])
    out = language_consistency_reward([mixed], target_language="zh")
    assert out.dtype == np.float32 and out.shape == (1,)
    np.testing.assert_allclose(out, [2 / 5])
    np.testing.assert_allclose(language_consistency_reward([mixed], target_language="en"), [3 / 5])


def test_language_consistency_excludes_math_code_digits_and_latex():
    cot = (
        "设 $x^2 + y = 10$，则 \\(x = 3\\)。\n$$\\frac{a}{b} = \\sqrt{c}$$\n"
        "```python\nprint(total / count)\n```\n所以 `answer = x` 是 12，\\alpha 也是。"
    )
    words = [w for _, ws in cot_segments(cot) for w, _ in ws]
    assert words == ["设", "则", "所", "以", "是", "也", "是"]
    np.testing.assert_array_equal(language_consistency_reward([think(cot)], target_language="zh"), [1.0])
    # money is not math: "$5 and $10" keeps its words (Pandoc's rule for a closing $)
    assert [w for _, ws in cot_segments("pay $5 and $10 now") for w, _ in ws] == ["pay", "and", "now"]
    # an unclosed fence (a truncated completion) excludes the rest
    assert cot_segments("好的 ```python\nfor word in words") == [("好的", [("好", "han"), ("的", "han")])]


def test_language_consistency_empty_or_missing_cot_scores_zero():
    completions = ["", "<think></think><answer>4</answer>", "no tags at all, just prose", "<think>123 + 456 = 579</think>"]
    np.testing.assert_array_equal(language_consistency_reward(completions, target_language="en"), [0, 0, 0, 0])
    long_enough = think("one two three")
    np.testing.assert_array_equal(language_consistency_reward([long_enough], target_language="en", min_words=4), [0])
    np.testing.assert_array_equal(language_consistency_reward([long_enough], target_language="en", min_words=3), [1])


def test_reasoning_region():
    assert reasoning_region("<think>a</think> x <think>b</think><answer>c</answer>") == "b"  # the last block
    assert reasoning_region("reasoning here</think><answer>4</answer>") == "reasoning here"  # <think> in the prompt
    assert reasoning_region("<think>cut off mid") == "cut off mid"  # truncated
    assert reasoning_region("Let me see. <answer>4</answer>") == "Let me see. "  # no think tags
    assert reasoning_region("plain text") == ""
    # region="all" scores the whole completion, answer included
    out = language_consistency_reward(["<think>我们</think><answer>four</answer>"], target_language="zh", region="all")
    np.testing.assert_allclose(out, [2 / 3])


def test_language_consistency_per_row_targets_and_scripts():
    completions = [
        think("我们需要 compute"),
        think("まず合計を計算します"),  # kana + Han: all Japanese
        think("먼저 합계를 계산합니다"),
        think("Сначала считаем сумму, then divide"),
        think("ＦＵＬＬ width letters"),  # NFKC: full-width Latin is Latin
    ]
    targets = ["zh-CN", "ja", "ko", "ru", "en"]
    np.testing.assert_allclose(language_consistency_reward(completions, target_languages=targets), [4 / 5, 1, 1, 3 / 5, 1])
    np.testing.assert_allclose(language_consistency_reward(completions[1:2], target_language="zh"), [4 / 7])  # まず 合 計 を 計 算 します: 4 Han of 7


def test_language_consistency_classify_weights_sentences_by_words():
    cot = think("Nous calculons la somme. Then we divide it by two. 好")
    calls = []

    def classify(sentence: str) -> str:
        calls.append(sentence)
        return "fr" if "Nous" in sentence else "en"

    out = language_consistency_reward([cot], target_language="fr", classify=classify)
    np.testing.assert_allclose(out, [4 / 11])  # 4 French words of 4 + 6 + 1
    assert calls == ["Nous calculons la somme.", "Then we divide it by two.", "好"]


def test_language_consistency_composes_with_weighted_sum():
    reward = weighted_sum((exact_match_reward, 1.0), (format_reward, 0.5), (language_consistency_reward, 0.1))
    completions = ["<think>我们 need to compute</think><answer>3</answer>", "<think>先算</think><answer>4</answer>"]
    out = reward(completions, answers=["3", "3"], target_languages=["zh", "zh"])
    np.testing.assert_allclose(out, [1.0 + 0.5 + 0.1 * 0.4, 0.5 + 0.1], rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(), "exactly one of target_language"),
        (dict(target_language="en", target_languages=["en"]), "got both"),
        (dict(target_languages=["en", "zh"]), r"one code per completion \(1\), got 2 codes"),
        (dict(target_languages="en"), "one code per completion"),
        (dict(target_languages=[None]), r"target_languages\[0\] must be a language code"),
        (dict(target_language="fr"), "target_language 'fr' is written in Latin script"),
        (dict(target_language="xx"), "target_language 'xx': unknown language"),
        (dict(target_language="en", region="answer"), "region must be"),
        (dict(target_language="en", min_words=0), "min_words must be"),
        (dict(target_language="en", classify="fasttext"), "classify must be a callable"),
    ],
)
def test_language_consistency_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        language_consistency_reward([think("hello there")], **kwargs)
