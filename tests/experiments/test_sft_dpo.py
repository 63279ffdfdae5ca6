"""End-to-end runs of experiments/sft_dpo.py (tiny sizes) that assert the objectives moved."""

import json
import math

import jax
import orbax.checkpoint as ocp
import pytest

from experiments.sft_dpo import Config, main, run
from jaxalign.metrics import read_metrics
from tests.experiments._run import run_experiment

TINY = dict(model="gpt2-tiny", batch_size=8, eval_every=1000, log_every=5, progress=False)


@pytest.mark.slow
def test_real_data_sft_then_dpo(shared_data, tmp_path):
    """SFT train loss falls >= 30%, DPO train reward accuracy ends >= 0.9, val margin rises."""
    summary, printed = run_experiment("experiments.sft_dpo", [
        "--output-dir", str(tmp_path),
        "--sft-data", str(shared_data / "sft/instruction-data.json"),
        "--pref-data", str(shared_data / "preference/instruction-data-with-preference.json"),
        "--tokenizer", str(shared_data / "tokenizers/gpt2/gpt2.tiktoken"),
        "--model", "gpt2-tiny", "--max-length", "64", "--max-examples", "64", "--val-fraction", "0.25",
        "--sft-steps", "40", "--dpo-steps", "30", "--sft-lr", "3e-3", "--dpo-lr", "2e-3",
        "--eval-every", "1000", "--log-every", "5", "--no-progress",
    ])
    assert summary["sft_train_loss_last"] <= 0.7 * summary["sft_train_loss_first"]
    assert summary["sft_val_loss_after"] < summary["sft_val_loss_before"]
    assert summary["dpo_train_reward_accuracy_last"] >= 0.9
    assert summary["dpo_val_reward_margin_before"] == 0.0  # policy == reference at the start
    assert summary["dpo_val_reward_margin_after"] > summary["dpo_val_reward_margin_before"]
    assert summary["dpo_val_reward_accuracy_after"] > summary["dpo_val_reward_accuracy_before"]
    assert "SFT val loss" in printed and "DPO val reward accuracy" in printed
    for name in ("metrics.jsonl", "sft.png", "dpo.png"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.slow
def test_default_task_runs_and_refuses_to_overwrite_or_change(tmp_path):
    cfg = Config(output_dir=tmp_path, synthetic_examples=160, sft_steps=20, dpo_steps=10,
                 checkpoint_every=5, **TINY)
    first = run(cfg)
    assert first["sft_val_loss_after"] < first["sft_val_loss_before"]
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "dpo").iterdir() if p.name.isdigit()) == ["10", "5"]
    assert json.loads((tmp_path / "config.json").read_text())["dpo_steps"] == 10
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}

    # Re-running into the same directory without --resume must not touch anything.
    with pytest.raises(FileExistsError, match="already holds a run .*--resume"):
        run(cfg)
    # --resume with flags that change the run is refused, naming each one.
    with pytest.raises(ValueError, match=r"--dpo-steps: 10 in config.json, 16 now; --seed: 0 in config.json, 1 now"):
        run(Config(**{**cfg.__dict__, "dpo_steps": 16, "seed": 1, "resume": True}))
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    # --resume of the finished run changes no figure and writes nothing.
    again = run(Config(**{**cfg.__dict__, "resume": True, "log_every": 2}))  # operational flags may differ
    assert again == first
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


KILL_ARGS = ["--model", "gpt2-tiny", "--synthetic-examples", "80", "--sft-steps", "12", "--dpo-steps", "8",
             "--checkpoint-every", "4", "--eval-every", "6", "--log-every", "2", "--no-progress"]


@pytest.mark.slow
@pytest.mark.parametrize("stage,step,how,extra", [
    ("sft", 2, "torn", []),  # before the first checkpoint commits, halfway through a metrics line
    ("dpo", 6, "sigint", ["--lora", "--sft-lr", "1e-2", "--dpo-lr", "2e-2"]),  # stage 2, adapters on a rebuilt base
])
def test_kill_and_resume_is_bit_identical(tmp_path, stage, step, how, extra):
    """SIGKILL / SIGINT at any point, then --resume: the same records (none duplicated or
    missing), the same summary and bit-identical final checkpoints as an uninterrupted run."""
    from tests.experiments._kill import (
        assert_same_checkpoints,
        deterministic_records,
        deterministic_summary,
        run_killed,
    )

    whole, broken = tmp_path / "whole", tmp_path / "broken"
    args = [*KILL_ARGS, *extra]
    main(["--output-dir", str(whole), *args])
    run_killed("experiments.sft_dpo", ["--output-dir", str(broken), *args], stage=stage, step=step, how=how)
    assert not (broken / "summary.json").exists()
    main(["--output-dir", str(broken), *args, "--resume"])
    assert deterministic_records(broken / "metrics.jsonl") == deterministic_records(whole / "metrics.jsonl")
    assert deterministic_summary(broken / "summary.json") == deterministic_summary(whole / "summary.json")
    for s in ("sft", "dpo"):
        assert_same_checkpoints(whole / "checkpoints" / s, broken / "checkpoints" / s)


@pytest.mark.slow
def test_divergence_stops_with_the_stage_step_and_metric(tmp_path):
    """--dpo-lr 1e6: the run stops at DPO's first step with an error naming stage, step and metric
    (the update dwarfs the weights), writes no summary and no DPO checkpoint; SFT's stay, finite."""
    from jaxalign.checkpoint import NonFiniteError, first_nonfinite
    from tests.experiments._kill import latest_checkpoint_arrays

    with pytest.raises(NonFiniteError, match=r"dpo: step 1: update_ratio=.* > max_update_ratio=1"):
        main(["--output-dir", str(tmp_path), *KILL_ARGS, "--dpo-lr", "1e6", "--checkpoint-every", "1"])
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["stage"] == "dpo"]
    assert [r["step"] for r in records] == [1] and records[0]["update_ratio"] > 1
    assert not (tmp_path / "checkpoints" / "dpo").exists() or not any(
        p.name.isdigit() for p in (tmp_path / "checkpoints" / "dpo").iterdir()
    )
    assert first_nonfinite(latest_checkpoint_arrays(tmp_path / "checkpoints" / "sft")) is None
    assert not (tmp_path / "summary.json").exists()


def _checkpoint_tree(stage_dir):
    """{path: shape} of the latest checkpoint in a stage's directory, from orbax's metadata."""
    step = max(int(p.name) for p in stage_dir.iterdir() if p.name.isdigit())
    meta = ocp.StandardCheckpointer().metadata(stage_dir / str(step) / "default").item_metadata
    return step, {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(meta.tree)[0]}


@pytest.mark.slow
def test_lora_sft_then_dpo_checkpoints_adapters_only_and_resumes(tmp_path):
    """--lora: SFT loss falls, DPO reward accuracy rises from the reference's 0, both stages
    checkpoint adapters (+ their Adam moments) only."""
    args = [
        "--output-dir", str(tmp_path), "--model", "gpt2-tiny", "--synthetic-examples", "160",
        "--sft-steps", "20", "--checkpoint-every", "5", "--sft-lr", "1e-2", "--dpo-lr", "2e-2",
        "--eval-every", "1000", "--log-every", "5", "--no-progress",
        "--lora", "--lora-rank", "8", "--lora-alpha", "16", "--lora-targets", "attention", "mlp/up",
    ]
    first = main([*args, "--dpo-steps", "10"])
    # rank 8 on wq wk wv wo ([64, 64]) and up ([64, 256]) of 2 layers: 2·(4·(64+64) + 64+256)·8
    assert first["trainable_params"] == 2 * (4 * 128 + 320) * 8 == 13_312
    assert first["trainable_params"] < 0.11 * first["model_params"]
    assert first["sft_train_loss_last"] < first["sft_train_loss_first"] - 0.1
    assert first["sft_val_loss_after"] < first["sft_val_loss_before"] - 0.1
    assert first["dpo_val_reward_margin_before"] == 0.0  # adapters at B = 0: policy == reference
    assert first["dpo_val_reward_accuracy_after"] > first["dpo_val_reward_accuracy_before"] + 0.5
    assert first["dpo_val_reward_margin_after"] > 0
    for stage in ("sft", "dpo"):
        step, tree = _checkpoint_tree(tmp_path / "checkpoints" / stage)
        params = {k: v for k, v in tree.items() if k.startswith("['params']")}
        assert {k.rsplit("[", 1)[1] for k in params} == {"'lora_a']", "'lora_b']"}
        assert len(params) == 2 * 2 * 5 and "['params']['layers_1']['mlp']['up']['lora_b']" in params
        assert sum(math.prod(s) for s in params.values()) == first["trainable_params"]
        # the whole checkpoint: adapters, two Adam moments of them, counters and the PRNG key
        assert sum(math.prod(s) for s in tree.values()) < 3 * first["trainable_params"] + 10

    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if r["stage"] == "sft"] == [5, 10, 15, 20]
    assert [r["step"] for r in records if r["stage"] == "dpo"] == [5, 10]


def test_bad_row_is_reported_before_any_compute(tmp_path):
    bad = tmp_path / "prefs.json"
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3 + [{"prompt": "p", "chosen": " ", "rejected": "b"}]
    bad.write_text(json.dumps(rows))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"prefs.json.*row 3.*chosen"):
        run(Config(output_dir=out, pref_data=str(bad), **TINY))
    assert not (out / "checkpoints").exists()


def test_bad_lora_flags_fail_before_any_training(tmp_path):
    with pytest.raises(ValueError, match="--dora needs --lora"):
        run(Config(output_dir=tmp_path, dora=True, **TINY))
    with pytest.raises(ValueError, match="--lora-\\* flags: LoraConfig.dropout"):
        run(Config(output_dir=tmp_path, lora=True, lora_dropout=1.0, **TINY))
    with pytest.raises(ValueError, match="--lora-targets: LoRA target 'attn/w_q' matches no kernel"):
        run(Config(output_dir=tmp_path, lora=True, lora_targets=("attn/w_q",), synthetic_examples=20, **TINY))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_init_from_a_qwen_checkpoint_with_its_chat_template_trains_that_model(tmp_path):
    """--init on a Qwen2.5-Instruct-shaped directory (random weights,
    tokenizer.json, Qwen's chat template): TRL-style conversational data (`messages` for SFT;
    prompt/chosen/rejected message lists for DPO) is rendered by the template with the loss on the
    assistant tokens, both objectives move, and a tokenizer larger than the checkpoint's
    vocabulary is refused first."""
    transformers = pytest.importorskip("transformers")
    import jaxalign.data as jd
    from tests.experiments._qwen import qwen_checkpoint

    directory = qwen_checkpoint(tmp_path / "qwen", hidden=48)
    pairs = jd.sorting_task(160, seed=0)
    user = lambda r: [{"role": "user", "content": r["prompt"].strip()}]  # noqa: E731
    answer = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    (tmp_path / "sft.jsonl").write_text("".join(
        json.dumps({"messages": user(r) + answer(r["chosen"])}) + "\n" for r in pairs))
    (tmp_path / "pref.jsonl").write_text("".join(
        json.dumps({"prompt": user(r), "chosen": answer(r["chosen"]), "rejected": answer(r["rejected"])}) + "\n"
        for r in pairs))
    hf_params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(directory).parameters())
    # no --tokenizer: the --init directory's own tokenizer.json and chat template are used
    cfg = Config(output_dir=tmp_path / "run", init=str(directory),
                 sft_data=str(tmp_path / "sft.jsonl"), pref_data=str(tmp_path / "pref.jsonl"),
                 max_length=128, sft_steps=20, dpo_steps=10, checkpoint_every=10, sft_lr=3e-3,
                 dpo_lr=1e-3, **{**TINY, "model": "gpt2-mini"})
    summary = run(cfg)
    assert summary["model_params"] == hf_params  # not the --model preset's size
    vocab = jd.load_tokenizer(directory).vocab_size
    assert summary["sft_val_loss_before"] == pytest.approx(math.log(vocab), abs=0.3)  # HF's N(0, 0.02) init
    assert summary["sft_val_loss_after"] < summary["sft_val_loss_before"] - 0.5
    assert summary["dpo_val_reward_margin_after"] > summary["dpo_val_reward_margin_before"] == 0.0

    small = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=200, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128))
    small.save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match=f"{vocab} ids but --init"):
        run(Config(**{**cfg.__dict__, "init": str(tmp_path / "small"), "tokenizer": str(directory),
                      "output_dir": tmp_path / "run2"}))
