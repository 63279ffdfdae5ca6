"""The issue-17 benchmarks run end to end on tiny CPU shapes: the device suite's JSON line has every
field benchmarks/README.md ("Device suite") documents, with finite values, and neither benchmark
compiles anything after its warm-up calls (both assert it; the report says 0)."""

from __future__ import annotations

import json
import math

from benchmarks import device_suite, moe, speed_cpu
from tests.test_memory import CASES

STEP = ("preset", "batch", "seq_len", "tokens_per_s", "step_s", "mfu", "compile_s", "compiled_bytes",
        "first_call_s", "model_flops_per_step", "recompiles", "compiled_programs")
# The fields of benchmarks/README.md's "Device suite" output format.
DEVICE_FIELDS = {
    None: ("suite", "backend", "device_kind", "cpu_shapes", "jax", "load_average_1m", "bf16_peak_flops_per_s",
           "bf16_peak_start_end", "gpt2_sft", "gpt2_dpo", "llama_sft", "grpo_rollout", "decode_b1",
           "memory_bf16", "recompiles_after_warmup", "wall_time_s"),
    "gpt2_sft": STEP,
    "gpt2_dpo": STEP,
    "llama_sft": (*STEP, "peak_memory_bytes", "peak_memory_source", "remat", "attention_impl"),
    "grpo_rollout": ("batch", "prompts", "group_size", "prompt_len", "new_tokens", "call_s", "first_call_s",
                     "tokens_per_s", "recompiles"),
    "decode_b1": ("preset", "prompt_len", "new_tokens", "tokens_per_s", "call_s", "recompiles"),
}
MEMORY_SUBSET = ("llama-tiny-lora",)  # one case (a LoRA step) keeps the test short; the GPU run has all


def numbers(tree, path=""):
    """(path, value) of every int/float leaf (bools excluded) of a JSON tree."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from numbers(v, f"{path}[{i}]")
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        yield path, tree


def test_memory_cases_are_test_memorys():
    assert device_suite.MEMORY_CASES == CASES


def test_device_suite_cpu_shapes_prints_one_json_line(capsys):
    report = device_suite.main(["--cpu-shapes", "--steps", "2", "--memory-cases", *MEMORY_SUBSET])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    parsed = json.loads(lines[0])
    assert parsed == json.loads(json.dumps(report))
    for section, fields in DEVICE_FIELDS.items():
        obj = parsed if section is None else parsed[section]
        assert set(fields) <= set(obj), (section, set(fields) - set(obj))
    assert parsed["cpu_shapes"] is True and parsed["llama_sft"]["remat"] == "full"
    assert parsed["llama_sft"]["attention_impl"] == "xla"
    assert parsed["grpo_rollout"]["batch"] == 64
    assert set(parsed["memory_bf16"]) == set(MEMORY_SUBSET)
    for case in parsed["memory_bf16"].values():
        assert set(case) == {"xla_bytes", "estimate_bytes", "ratio"}
    for path, value in numbers(parsed):
        assert math.isfinite(value), path
    assert parsed["recompiles_after_warmup"] == 0
    for section in ("gpt2_sft", "gpt2_dpo", "llama_sft"):
        assert parsed[section]["compiled_programs"] == 1 and parsed[section]["mfu"] > 0


def test_speed_cpu_quick_reports_every_figure(capsys):
    report = speed_cpu.main(["--quick"])
    out = capsys.readouterr().out
    figures = report["figures"]
    assert figures["recompiles_after_warmup"] == 0
    assert "recompilations after warm-up: 0" in out
    for key in ("sft_fused", "sft_unfused", "dpo"):
        assert figures["gpt16m"][key]["compiled_programs"] == 1
    # one verdict per figure line: 2 SFT MFU, gpt2 MFU, SFT/DPO, roofline, batch-32, recompiles,
    # and with torch the 2 train-step ratios and the decode ratio
    with_torch = "torch" in figures["gpt16m"]
    assert out.count("PASS") + out.count("BELOW") == 7 + 3 * with_torch
    for path, value in numbers(figures):
        assert math.isfinite(value), path
    assert 0 < figures["decode_b1"]["roofline_fraction"]
    assert 0 < figures["decode_b32"]["allowed_ratio"] <= 1


def test_moe_layer_and_whole_step_report(capsys):
    """benchmarks/moe.py on tiny shapes: both expert paths agree (asserted inside), the whole SFT
    step runs for dense, ragged and the dense-FFN model of equal active FLOPs, each compiled once,
    and the active parameter count is the dense-FFN model's (same attention, FFN k·F wide)."""
    out = moe.main(["--cases", "4:2", "--step-cases", "4:2", "--steps", "1", "--warmup", "0", "--tokens", "64",
                    "--step-layers", "1", "--step-batch", "2", "--step-seq", "17"])
    report = capsys.readouterr().out
    assert [r["impl"] for r in out["steps"]] == ["dense", "ragged", "dense-ffn"]
    dense, ragged, ffn = out["steps"]
    assert dense["active_params"] == ragged["active_params"]
    # the router's D·E weights are the only active parameters the dense-FFN model lacks
    assert dense["active_params"] - ffn["active_params"] == 64 * 4
    for r in out["steps"]:
        assert r["recompiles"] == 0 and math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
    assert out["agreement"]["4:2"] <= 64 * 2.0**-23
    assert "whole SFT step" in report and "x dense-ffn" in report
