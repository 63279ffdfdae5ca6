"""Tiny end-to-end RLHF runs: a reward model on real human pairs, and RM -> PPO on stories260K."""


import numpy as np
import pytest

from experiments import reward_model, rlhf_stories
from tests.experiments._run import run_experiment


def test_gold_score_counts_capped_lexicon_words():
    texts = ["She was happy and smiled. Her friend was happy too.", "He was sad and cried.",
             "happy happy happy happy happy", "The box was red."]
    np.testing.assert_allclose(rlhf_stories.gold_score(texts), [3.0, -2.0, 3.0, 0.0])


@pytest.mark.slow
def test_ppo_raises_gold_score_with_bounded_kl(shared_data, tmp_path):
    summary, _ = run_experiment("experiments.rlhf_stories", [
        "--output-dir", str(tmp_path), "--no-progress", "--rm-rounds", "2", "--rm-steps", "100",
        "--ppo-iterations", "6", "--max-new-tokens", "32",
    ])
    # measured at these settings: 34 held-out pairs, RM accuracy 0.824, gold 0.30 -> 1.25, KL 4.4
    # (150 RM steps and 10 iterations: the same accuracy, gold 0.30 -> 2.31, KL 9.9, 1.5x the time)
    assert summary["rm_heldout_pairs"] > 25
    assert summary["rm_heldout_accuracy"] > 0.6  # better than chance against gold on unseen openings
    assert summary["gold_after"] > summary["gold_before"] + 0.3  # 128 held-out samples: s.e. ~0.1
    assert summary["rm_score_after"] > summary["rm_score_before"]
    assert 0 < summary["kl_after"] < 20  # nats per 32-token response
    assert (tmp_path / "rlhf.png").is_file()


@pytest.mark.slow
def test_reward_model_on_hh_rlhf_runs_and_learns(shared_data, tmp_path):
    summary = reward_model.main([
        "--output-dir", str(tmp_path), "--no-progress", "--model", "gpt2-tiny", "--max-examples", "400",
        "--max-length", "96", "--steps", "40", "--eval-every", "0",
    ])
    assert summary["heldout_pairs"] == 80 and summary["train_pairs"] == 320
    assert summary["heldout_loss_after"] < summary["heldout_loss_before"] + 0.05
    assert 0.0 <= summary["shorter_reply_wins_accuracy"] <= 1.0
    assert (tmp_path / "checkpoints").is_dir()


@pytest.mark.slow
def test_reward_model_kill_and_resume_and_refusals(shared_data, tmp_path):
    from tests.experiments._kill import (
        assert_same_checkpoints,
        deterministic_records,
        deterministic_summary,
        run_killed,
    )

    args = ["--no-progress", "--model", "gpt2-tiny", "--max-examples", "200", "--max-length", "64",
            "--steps", "20", "--warmup-steps", "2", "--eval-every", "10", "--checkpoint-every", "10"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    reward_model.main(["--output-dir", str(whole), *args])
    # killed at its step-0 evaluation record, before any checkpoint
    run_killed("experiments.reward_model", ["--output-dir", str(broken), *args], stage="reward_model_eval", step=0)
    reward_model.main(["--output-dir", str(broken), *args, "--resume"])
    assert deterministic_records(broken / "metrics.jsonl") == deterministic_records(whole / "metrics.jsonl")
    assert deterministic_summary(broken / "summary.json") == deterministic_summary(whole / "summary.json")
    assert_same_checkpoints(whole / "checkpoints", broken / "checkpoints")
    with pytest.raises(FileExistsError, match="already holds a run"):  # was: StepAlreadyExistsError after training
        reward_model.main(["--output-dir", str(whole), *args])
    with pytest.raises(ValueError, match=r"OptimConfig.warmup_steps=20 must be < total_steps=20"):
        reward_model.main(["--output-dir", str(tmp_path / "bad"), *args, "--warmup-steps", "20"])
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    from jaxalign.checkpoint import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"reward_model: step \d+: update_ratio=.* > max_update_ratio=1"):
        reward_model.main(["--output-dir", str(tmp_path / "diverged"), *args, "--lr", "1e6"])
