"""The device suite (issue 17 item 6): one command, one JSON line, on one H100/H200 in <= 8 minutes.

    python -m benchmarks.device_suite               # on a GPU: the shapes below
    python -m benchmarks.device_suite --cpu-shapes  # the same code on tiny CPU shapes (automatic on CPU)

It measures, in one process (progress on stderr, the JSON line alone on stdout):

* `bf16_peak_flops_per_s`: a jit-compiled bfloat16 `[n, n] @ [n, n]` matmul
  (`train_step.measure_matmul_peak`), best over sizes, at the start and the end (the higher).
* `llama_sft`: a Llama-3.2-1B-shaped SFT step (preset `llama-3.2-1b`, bfloat16 compute, float32
  params, `remat="full"`, `attention_impl="cudnn"`; CPU shapes: `llama-tiny`, `attention_impl=
  "xla"`): tokens/s, MFU and peak memory (`jax.devices()[0].memory_stats()["peak_bytes_in_use"]`
  where the backend reports it, else the compiled step's `memory_analysis()` argument + temp
  bytes). Run first, so that the process-wide peak is this step's.
* `gpt2_sft`, `gpt2_dpo`: bfloat16 GPT-2 124M SFT and DPO steps (DPO on B/2 pairs, reference
  log-probs precomputed), MFU against `bf16_peak_flops_per_s`.
* `grpo_rollout`: `jaxalign.rollout.grpo_rollout` of GPT-2 124M bfloat16 at batch 64 (8 prompts ×
  G = 8, temperature 1, no EOS, the reference scored by teacher forcing, a rule reward on the
  decoded ids): completion tokens/s.
* `decode_b1`: batch-1 greedy `generate` of GPT-2 124M bfloat16: tokens/s.
* `memory_bf16`: the cases of `tests/test_memory.py` (`CASES` there; B=8, T=128, V=512) with a
  bfloat16 compute dtype: XLA's `memory_analysis()` argument + temp bytes of the compiled SFT step
  against `jaxalign.memory.estimate_memory(..., compute_dtype=bfloat16)["total"]`.
* `recompiles_after_warmup`: programs compiled during the timed calls (`jaxalign.metrics.compilations`;
  0 expected, asserted).

Every figure is computed in the run; benchmarks/README.md ("Device suite") documents the fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.decoding import SamplingConfig
from jaxalign.lora import LoraConfig, init_lora, make_lora_loss_fn
from jaxalign.memory import estimate_memory
from jaxalign.models import TransformerConfig, get_config, init_params
from jaxalign.optim import OptimConfig, make_optimizer
from jaxalign.rollout import grpo_rollout
from jaxalign.trainers import create_train_state, make_sft_step, make_train_step
from jaxalign.trainers.sft import sft_batch_loss

try:  # run as a script (`python benchmarks/device_suite.py`): benchmarks/ itself is on sys.path
    from _common import environment
    from speed_cpu import time_jax_decode, time_jax_step, timed_calls
    from train_step import Case, measure_matmul_peak
except ImportError:  # imported as `benchmarks.device_suite`
    from benchmarks._common import environment
    from benchmarks.speed_cpu import time_jax_decode, time_jax_step, timed_calls
    from benchmarks.train_step import Case, measure_matmul_peak

# The cases of tests/test_memory.py (its CASES; tests/test_benchmarks.py asserts the names agree):
# name -> (preset, config overrides, LoRA config or None).
MEMORY_CASES: dict[str, tuple[str, dict[str, Any], LoraConfig | None]] = {
    "gpt2-tiny": ("gpt2-tiny", {}, None),
    "gpt2-mini": ("gpt2-mini", {}, None),
    "gpt2-mini-lora": ("gpt2-mini", {}, LoraConfig(rank=8, targets=("attention",))),
    "gpt2-mini-dora": ("gpt2-mini", {}, LoraConfig(rank=8, targets=("all",), dora=True)),
    "gpt2-mini-dora-dropout": ("gpt2-mini", {}, LoraConfig(rank=8, targets=("all",), dora=True, dropout=0.1)),
    "gpt2-mini-model-dropout": ("gpt2-mini", {"dropout": 0.1}, None),
    "llama-tiny": ("llama-tiny", {}, None),
    "llama-tiny-lora": ("llama-tiny", {}, LoraConfig(rank=8, targets=("attention",))),
}


@dataclasses.dataclass
class Config:
    """Device suite: bf16 train-step MFU, a remat + cuDNN 1B step, rollout and decode rates,
    bf16 memory estimates; one JSON line."""

    cpu_shapes: bool = False
    """Tiny shapes and attention_impl="xla" (automatic when the default backend is CPU)."""
    steps: int = 5
    """Timed calls per train step (median reported)."""
    warmup: int = 1
    """Untimed calls after compilation."""
    memory_cases: tuple[str, ...] | None = None
    """Names of MEMORY_CASES to run (default all)."""
    seed: int = 0
    json: Path | None = None
    """Also write the JSON object here."""


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Every size the suite uses, for the GPU and for --cpu-shapes."""

    peak_sizes: tuple[int, ...]
    peak_reps: int
    gpt2: tuple[str, int, int, int]  # preset, V, B, T
    llama: tuple[str, int, int, int]
    attention_impl: str
    n_layers: int | None  # overrides the presets' depth (CPU shapes: 1, quick to compile)
    rollout: tuple[int, int, int, int]  # prompts, G, P, N
    decode: tuple[int, int]  # P, N
    memory: tuple[int, int]  # B, T


GPU = Shapes((4096, 8192), 20, ("gpt2", 50257, 16, 1024), ("llama-3.2-1b", 128256, 8, 2048), "cudnn", None,
             (8, 8, 64, 256), (16, 256), (8, 128))
CPU = Shapes((128, 256), 3, ("gpt2-tiny", 512, 2, 32), ("llama-tiny", 512, 2, 32), "xla", 1,
             (8, 8, 8, 8), (8, 8), (2, 32))


def model_config(preset: str, vocab: int, seq_len: int, n_layers: int | None, **overrides) -> TransformerConfig:
    """The preset at `vocab` (and `n_layers` if set), bfloat16 compute (float32 params), long
    enough for `seq_len`."""
    if n_layers is not None:
        overrides["n_layers"] = n_layers
    config = get_config(preset, vocab_size=vocab, dtype=jnp.bfloat16, **overrides)
    return config.replace(max_seq_len=max(config.max_seq_len, seq_len))


def peak_memory(compiled_bytes: int) -> tuple[int, str]:
    """(bytes, source): the device's `peak_bytes_in_use` where reported, else `compiled_bytes`."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "memory_stats"
    return compiled_bytes, "memory_analysis"


def compiled_step_bytes(config: TransformerConfig, b: int, t: int, lora: LoraConfig | None = None) -> int:
    """XLA's argument + temp bytes of the SFT step of `config` on [B, T + 1] tokens (abstract
    shapes: compiled, not run), built as tests/test_memory.py's `sft_step` builds it."""
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    tx, schedule = make_optimizer(OptimConfig(total_steps=10))
    batch = {"tokens": jax.ShapeDtypeStruct((b, t + 1), jnp.int32),
             "mask": jax.ShapeDtypeStruct((b, t + 1), jnp.float32)}
    if lora is None:
        trainable, step, extra = params, make_sft_step(config, tx, schedule), ()
    else:
        trainable = jax.eval_shape(lambda p: init_lora(p, lora, jax.random.key(1)), params)
        loss = make_lora_loss_fn(lambda p, bt, r: sft_batch_loss(p, config, bt, r), lora)
        step, extra = make_train_step(loss, tx, schedule), (params,)
    state = jax.eval_shape(lambda tr: create_train_state(tr, tx, 0), trainable)
    analysis = step.lower(state, batch, *extra).compile().memory_analysis()
    return int(analysis.argument_size_in_bytes + analysis.temp_size_in_bytes)


def step_figures(kind: str, config: TransformerConfig, params, case: Case, cfg: Config, peak: float) -> dict[str, Any]:
    """`time_jax_step` plus MFU against `peak` and the case's shape."""
    r = time_jax_step(kind, config, params, case, cfg.steps, cfg.warmup, seed=cfg.seed)
    return {
        "preset": case.preset, "batch": case.batch_size, "seq_len": case.seq_len,
        "tokens_per_s": r["tokens_per_s"], "step_s": r["step_s"], "first_call_s": r["first_call_s"],
        "compile_s": r["compile_s"], "compiled_bytes": r["compiled_bytes"],
        "mfu": r["model_flops_per_step"] / r["step_s"] / peak, "model_flops_per_step": r["model_flops_per_step"],
        "recompiles": r["recompiles"], "compiled_programs": r["compiled_programs"],
    }


def run_rollout(config: TransformerConfig, params, shapes: Shapes, seed: int) -> dict[str, Any]:
    """GRPO rollout tokens/s: 8 prompts × G, temperature 1, no EOS, reference = the policy."""
    prompts, group, p, n = shapes.rollout
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (prompts, p)).astype(np.int32)
    mask = np.ones((prompts, p), np.int32)
    sampling = SamplingConfig(max_new_tokens=n, temperature=1.0)

    def reward_fn(completions, **_):  # a rule reward on the decoded text: work, not a signal
        return np.asarray([len(c) % 7 for c in completions], np.float32)

    out = {}

    def call():
        out["r"] = grpo_rollout(
            params, config, tokens, mask, group_size=group, reward_fn=reward_fn,
            decode=lambda ids: " ".join(map(str, ids)), sampling=sampling, rng=jax.random.key(seed),
            ref_params=params,
        )
        return out["r"].batch

    t = timed_calls(call, 3, 0)
    generated = float(np.sum(np.asarray(out["r"].batch.completion_mask)))
    return {"batch": prompts * group, "prompts": prompts, "group_size": group, "prompt_len": p,
            "new_tokens": n, "call_s": t.median_s, "first_call_s": t.first_s,
            "tokens_per_s": generated / t.median_s, "recompiles": t.recompiles}


def run_memory_cases(names: tuple[str, ...], shapes: Shapes) -> dict[str, dict[str, float]]:
    """Each case's XLA bytes against estimate_memory's total, bfloat16 compute."""
    b, t = shapes.memory
    result = {}
    for name in names:
        preset, overrides, lora = MEMORY_CASES[name]
        config = get_config(preset, vocab_size=512, dtype=jnp.bfloat16, **overrides)
        xla = compiled_step_bytes(config, b, t, lora)
        est = estimate_memory(config, batch=b, seq_len=t, lora=lora, compute_dtype=jnp.bfloat16)["total"]
        result[name] = {"xla_bytes": xla, "estimate_bytes": est, "ratio": xla / est}
    return result


def run(cfg: Config) -> dict[str, Any]:
    """Runs the suite; prints the JSON line to stdout and returns it as a dict."""
    cpu = cfg.cpu_shapes or jax.default_backend() == "cpu"
    shapes = CPU if cpu else GPU
    names = cfg.memory_cases if cfg.memory_cases is not None else tuple(MEMORY_CASES)
    for name in names:
        if name not in MEMORY_CASES:
            raise ValueError(f"--memory-cases: unknown case {name!r}; known: {', '.join(MEMORY_CASES)}")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    start = time.perf_counter()
    env = environment()
    log("bf16 matmul peak ...")
    peaks = [measure_matmul_peak(shapes.peak_sizes, jnp.bfloat16, shapes.peak_reps)["flops_per_s"]]
    peak_now = peaks[0]

    preset, vocab, b, t = shapes.llama
    log(f"{preset} SFT, remat=full, attention_impl={shapes.attention_impl} ...")
    llama_config = model_config(preset, vocab, t, shapes.n_layers, remat="full", attention_impl=shapes.attention_impl)
    llama_params = init_params(llama_config, jax.random.key(cfg.seed))
    llama_case = Case(preset, vocab, b, t)
    llama = step_figures("sft", llama_config, llama_params, llama_case, cfg, peak_now)
    del llama_params
    llama["peak_memory_bytes"], llama["peak_memory_source"] = peak_memory(llama["compiled_bytes"])
    llama.update(remat="full", attention_impl=shapes.attention_impl)

    preset, vocab, b, t = shapes.gpt2
    gpt2_config = model_config(preset, vocab, max(t, sum(shapes.rollout[2:]), sum(shapes.decode)), shapes.n_layers)
    gpt2_params = init_params(gpt2_config, jax.random.key(cfg.seed))
    log(f"{preset} bf16 SFT and DPO ...")
    gpt2_sft = step_figures("sft", gpt2_config, gpt2_params, Case(preset, vocab, b, t), cfg, peak_now)
    gpt2_dpo = step_figures("dpo", gpt2_config, gpt2_params, Case(preset, vocab, max(1, b // 2), t), cfg, peak_now)
    log("GRPO rollout, batch 64 ...")
    rollout = run_rollout(gpt2_config, gpt2_params, shapes, cfg.seed)
    log("batch-1 decode ...")
    p, n = shapes.decode
    d = time_jax_decode(gpt2_config, gpt2_params, 1, p, n, 3, cfg.seed)
    decode = {"preset": preset, "prompt_len": p, "new_tokens": n, "tokens_per_s": d["tokens_per_s"],
              "call_s": d["call_s"], "recompiles": d["recompiles"]}
    del gpt2_params
    log("memory cases, bfloat16 ...")
    memory = run_memory_cases(names, shapes)

    peaks.append(measure_matmul_peak(shapes.peak_sizes, jnp.bfloat16, shapes.peak_reps)["flops_per_s"])
    peak = max(peaks)
    for fig in (llama, gpt2_sft, gpt2_dpo):  # MFU against the better of the two peaks
        fig["mfu"] = fig["model_flops_per_step"] / fig["step_s"] / peak
    recompiles = sum(f["recompiles"] for f in (llama, gpt2_sft, gpt2_dpo, rollout, decode))
    report = {
        "suite": "jaxalign-device-suite/1",
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "cpu_shapes": cpu,
        "jax": env["jax"],
        "load_average_1m": env["load_average_1m"],
        "bf16_peak_flops_per_s": peak,
        "bf16_peak_start_end": peaks,
        "gpt2_sft": gpt2_sft,
        "gpt2_dpo": gpt2_dpo,
        "llama_sft": llama,
        "grpo_rollout": rollout,
        "decode_b1": decode,
        "memory_bf16": memory,
        "recompiles_after_warmup": recompiles,
        "wall_time_s": time.perf_counter() - start,
    }
    line = json.dumps(report, sort_keys=True)
    print(line, flush=True)
    if cfg.json is not None:
        cfg.json.parent.mkdir(parents=True, exist_ok=True)
        cfg.json.write_text(line + "\n")
    assert recompiles == 0, f"{recompiles} compilations after warm-up"
    # compile events, not the jit's C++ cache size (seen empty late in a long pytest worker)
    assert all(f["recompiles"] == 0 for f in (llama, gpt2_sft, gpt2_dpo)), "a train step compiled twice"
    assert all(math.isfinite(v) for v in peaks)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point: parses flags into `Config` (tyro) and runs the suite."""
    import tyro

    return run(tyro.cli(Config, args=argv))


if __name__ == "__main__":
    main(sys.argv[1:])
