"""GSM8K through the GRPO pipeline: the reward on the real test set, and one GRPO iteration end
to end (a tiny model cannot learn GSM8K, so this checks the pipeline, not learning)."""

import json

import numpy as np
import pytest

import jaxalign.data as jd
from experiments.grpo_gsm8k import gsm8k_reward, main


def test_reward_scores_gold_completions_in_the_template(shared_data):
    test = jd.load_gsm8k(shared_data / "gsm8k/test.jsonl")
    answers = test["answer"]
    gold = [jd.r1_completion(r, a) for r, a in zip(test["reasoning"], answers)]
    wrong = [jd.r1_completion(r, str(float(a) + 1)) for r, a in zip(test["reasoning"], answers)]
    reward = gsm8k_reward(accuracy_weight=1.0, format_weight=0.2)
    accuracy_only = gsm8k_reward(accuracy_weight=1.0, format_weight=0.0)
    np.testing.assert_array_equal(accuracy_only(gold, answers=answers), np.ones(1319))
    np.testing.assert_array_equal(accuracy_only(wrong, answers=answers), np.zeros(1319))
    # default rtol 1e-7: float32 1.0 + 0.2 is one correctly rounded sum, 4.8e-8 from 1.2 on any CPU
    np.testing.assert_allclose(reward(gold, answers=answers), np.full(1319, 1.2))
    np.testing.assert_allclose(reward(wrong, answers=answers), np.full(1319, 0.2))  # format only
    # right number outside the template: accuracy but no format; wrong number, no template: 0
    bare = [f"The answer is {a}." for a in answers[:5]]
    np.testing.assert_allclose(reward(bare, answers=answers[:5]), np.ones(5))
    np.testing.assert_allclose(reward(["I do not know."] * 5, answers=answers[:5]), np.zeros(5))


@pytest.mark.slow
def test_one_grpo_iteration_end_to_end_writes_outputs(shared_data, tmp_path):
    summary = main(["--output-dir", str(tmp_path), "--no-progress", "--grpo-iterations", "1",
                    "--eval-problems", "4", "--max-new-tokens", "16", "--scaling-samples", "3"])
    assert summary["test_problems"] == 4 and summary["train_problems"] == 6117  # of 7473 fit 448 tokens
    assert all(len(curve) == 3 for curve in summary["scaling"].values())  # k = 1, 2, 3
    assert (tmp_path / "scaling.png").stat().st_size > 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    grpo = [r for r in records if r["stage"] == "grpo"]
    assert len(grpo) == 1 and [r["step"] for r in records if r["stage"] == "grpo_eval"] == [0, 1]
    assert 0 < grpo[0]["completion_length"] <= 16 and np.isfinite(grpo[0]["loss"])
    # stories260K earns no reward on GSM8K: every group has zero variance and is filtered out
    assert grpo[0]["reward_mean"] == 0.0 and grpo[0]["zero_variance_fraction"] == 1.0
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["answer"] for s in samples] == ["18", "3", "70000", "540"]  # the first test problems
    assert json.loads((tmp_path / "summary.json").read_text())["test_accuracy_after"] == summary["test_accuracy_after"]
    assert (tmp_path / "checkpoints" / "grpo" / "1").is_dir() and (tmp_path / "grpo.png").stat().st_size > 0


@pytest.mark.slow
def test_qwen_checkpoint_with_its_chat_template_end_to_end(shared_data, tmp_path):
    """A Qwen2.5-Instruct-shaped directory (random weights, tokenizer.json, Qwen's template):
    prompts are the template's rendering of the R1 system turn + question, token for token what
    `transformers` renders, and one GRPO iteration runs end to end offline."""
    transformers = pytest.importorskip("transformers")
    from experiments.grpo_gsm8k import fitting_rows
    from tests.experiments._qwen import qwen_checkpoint

    directory = qwen_checkpoint(tmp_path / "qwen")
    tok = jd.load_tokenizer(directory)
    rows = fitting_rows(jd.load_gsm8k(shared_data / "gsm8k/test.jsonl"), tok, 448, 2, chat=True)
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    expected = hf.apply_chat_template(jd.r1_messages(rows[0]["question"]), add_generation_prompt=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert rows[0]["ids"] == list(expected)
    assert tok.decode(rows[0]["ids"]).endswith("<|im_start|>assistant\n")

    summary = main(["--output-dir", str(tmp_path / "run"), "--model", str(directory),
                    "--tokenizer", str(directory), "--no-progress", "--grpo-iterations", "1",
                    "--train-problems", "8", "--eval-problems", "2", "--max-new-tokens", "8"])
    assert summary["test_problems"] == 2 and summary["train_problems"] == 8
    samples = [json.loads(line) for line in (tmp_path / "run/samples.jsonl").read_text().splitlines()]
    assert [s["answer"] for s in samples] == ["18", "3"]
    assert (tmp_path / "run/checkpoints/grpo/1").is_dir()
