import json
from decimal import Decimal

import numpy as np
import pytest

from jaxalign.rewards import (
    exact_match_reward,
    extract_answer,
    format_reward,
    keyword_reward,
    overlong_penalty,
    parse_number,
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
