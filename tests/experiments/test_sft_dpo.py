"""End-to-end runs of experiments/sft_dpo.py (tiny sizes) that assert the objectives moved."""

import json

import pytest

from experiments.sft_dpo import Config, main, run
from jaxalign.metrics import read_metrics

TINY = dict(model="gpt2-tiny", batch_size=8, eval_every=1000, log_every=5, progress=False)


@pytest.mark.slow
def test_real_data_sft_then_dpo(shared_data, tmp_path, capsys):
    """SFT train loss falls >= 30%, DPO train reward accuracy ends >= 0.9, val margin rises."""
    summary = main([
        "--output-dir", str(tmp_path),
        "--sft-data", str(shared_data / "sft/instruction-data.json"),
        "--pref-data", str(shared_data / "preference/instruction-data-with-preference.json"),
        "--tokenizer", str(shared_data / "tokenizers/gpt2/gpt2.tiktoken"),
        "--model", "gpt2-tiny", "--max-length", "128", "--max-examples", "64", "--val-fraction", "0.25",
        "--sft-steps", "50", "--dpo-steps", "50", "--sft-lr", "3e-3", "--dpo-lr", "2e-3",
        "--eval-every", "1000", "--log-every", "5", "--no-progress",
    ])
    assert summary["sft_train_loss_last"] <= 0.7 * summary["sft_train_loss_first"]
    assert summary["sft_val_loss_after"] < summary["sft_val_loss_before"]
    assert summary["dpo_train_reward_accuracy_last"] >= 0.9
    assert summary["dpo_val_reward_margin_before"] == 0.0  # policy == reference at the start
    assert summary["dpo_val_reward_margin_after"] > summary["dpo_val_reward_margin_before"]
    assert summary["dpo_val_reward_accuracy_after"] > summary["dpo_val_reward_accuracy_before"]
    printed = capsys.readouterr().out
    assert "SFT val loss" in printed and "DPO val reward accuracy" in printed
    assert json.loads((tmp_path / "summary.json").read_text()) == pytest.approx(summary, nan_ok=True)
    for name in ("metrics.jsonl", "sft.png", "dpo.png"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.slow
def test_default_task_runs_and_resumes(tmp_path):
    cfg = Config(output_dir=tmp_path, synthetic_examples=160, sft_steps=20, dpo_steps=10,
                 checkpoint_every=5, **TINY)
    first = run(cfg)
    assert first["sft_val_loss_after"] < first["sft_val_loss_before"]
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "dpo").iterdir() if p.name.isdigit()) == ["10", "5"]

    # Re-running into the same directory without --resume must not overwrite anything.
    with pytest.raises(FileExistsError, match="--resume"):
        run(cfg)

    # Resume with a longer DPO stage: SFT is complete (restored, not retrained); DPO goes 10 -> 16.
    resumed = run(Config(**{**cfg.__dict__, "dpo_steps": 16, "resume": True}))
    records = read_metrics(tmp_path / "metrics.jsonl")
    sft_steps = [r["step"] for r in records if r["stage"] == "sft"]
    dpo_steps = [r["step"] for r in records if r["stage"] == "dpo"]
    assert sft_steps == [5, 10, 15, 20]  # logged once: no duplicate records after the resume
    assert dpo_steps == [5, 10, 15, 16]
    assert resumed["sft_val_loss_after"] == pytest.approx(first["sft_val_loss_after"], rel=1e-6)


def test_bad_row_is_reported_before_any_compute(tmp_path):
    bad = tmp_path / "prefs.json"
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3 + [{"prompt": "p", "chosen": " ", "rejected": "b"}]
    bad.write_text(json.dumps(rows))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"prefs.json.*row 3.*chosen"):
        run(Config(output_dir=out, pref_data=str(bad), **TINY))
    assert not (out / "checkpoints").exists()
