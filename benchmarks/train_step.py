"""Training throughput and MFU of the SFT and DPO train steps, against a matmul peak measured here.

For each benchmark case (a model preset at a vocabulary size, batch size B and sequence length T)
the script times `jaxalign.trainers.make_sft_step` on a random `tokens [B, T]` batch and
`make_dpo_step` on a random preference batch of B pairs with precomputed reference log-probs,
both with the optimiser of `jaxalign.optim.make_optimizer`. Compilation and warm-up calls are
excluded; the figure is the median of `--steps` timed calls, each blocked on with
`jax.block_until_ready`, all with the same shapes (one compilation per step, asserted).

    MFU = model FLOPs per step / step time / peak FLOP/s

with model FLOPs from `jaxalign.models.train_flops_per_token` (PaLM, arXiv 2204.02311, App. B:
6·N + 12·L·T·D per token) and the peak from a jit-compiled square matmul timed in the same run.
See benchmarks/README.md for the counting conventions and measured figures.

    python benchmarks/train_step.py                       # default: < 8 minutes on 2 CPU cores
    python benchmarks/train_step.py --cases gpt2-tiny:512:4:64 --steps 3   # smoke test
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxalign.metrics import compilations
from jaxalign.models import (
    TransformerConfig,
    get_config,
    init_params,
    num_params,
    train_flops_per_token,
)
from jaxalign.optim import OptimConfig, make_optimizer
from jaxalign.trainers import (
    count_tokens,
    create_train_state,
    make_dpo_step,
    make_pair_logps_fn,
    make_sft_step,
)

try:  # run as a script (`python benchmarks/train_step.py`): benchmarks/ itself is on sys.path
    from _common import RunClock, config_record, environment_lines, run_cli, time_call
except ImportError:  # imported as `benchmarks.train_step`
    from benchmarks._common import RunClock, config_record, environment_lines, run_cli, time_call

Batch = dict[str, jax.Array]
Trainer = Literal["sft", "dpo"]
DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Config:
    """Train-step throughput benchmark: SFT and DPO steps per case, MFU against a matmul peak."""

    cases: tuple[str, ...] = ("gpt2-mini:50257:8:128", "gpt2-mini:512:8:128", "gpt2:50257:4:128")
    """Benchmark cases as PRESET:VOCAB:BATCH:SEQ (see jaxalign.models.PRESETS). BATCH is B, the
    SFT rows and the DPO pairs (a DPO step runs 2·B rows); SEQ is T, tokens per row. The default's
    gpt2-mini at V=512 isolates the cost of the 50257-wide output head and softmax."""
    trainers: tuple[Trainer, ...] = ("sft", "dpo")
    """Train steps to time for every case."""
    steps: int = 10
    """Timed calls per step; the median is reported."""
    warmup: int = 1
    """Untimed calls after compilation (first-execution effects)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of the models (parameters stay float32)."""
    peak_sizes: tuple[int, ...] = (1024, 2048)
    """Square matmul sizes n for the peak; the best median over sizes is the peak."""
    peak_reps: int = 10
    """Timed matmuls per size."""
    bf16_peak: bool = False
    """Also measure the bfloat16 matmul peak (always measured when --dtype bfloat16)."""
    seed: int = 0
    json: Path | None = None
    """Write the environment, peaks and per-case results here as JSON."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One model shape to benchmark."""

    preset: str
    vocab_size: int
    batch_size: int
    seq_len: int


@dataclasses.dataclass
class StepResult:
    """Timing of one train step of one case (times in seconds).

    `optimizer_s` (the optimizer update alone, see `time_optimizer_update`) and `mfu` are filled
    in by `run`.
    """

    preset: str
    vocab_size: int
    trainer: str
    params_m: float
    batch_size: int
    seq_len: int
    rows: int
    tokens_per_step: int
    compile_s: float
    step_s: float
    warmup_times_s: list[float]
    step_times_s: list[float]
    tokens_per_s: float
    model_flops_per_step: float
    xla_flops_per_step: float | None
    loss: float
    optimizer_s: float = float("nan")
    mfu: float = float("nan")

    @property
    def model(self) -> str:
        """Preset name with the vocabulary size, e.g. `gpt2-mini/V=512`."""
        return f"{self.preset}/V={self.vocab_size}"


def parse_case(spec: str) -> Case:
    """Parses `PRESET:VOCAB:BATCH:SEQ` (e.g. `gpt2-mini:512:8:128`) into a `Case`.

    Raises:
      ValueError: not four fields, a non-integer or non-positive size, or an unknown preset.
    """
    fields = spec.split(":")
    try:
        preset, vocab, batch, seq = fields[0], *map(int, fields[1:])
    except ValueError:
        raise ValueError(
            f"--cases {spec!r}: expected PRESET:VOCAB:BATCH:SEQ, e.g. gpt2:50257:4:128"
        ) from None
    if min(vocab, batch) < 1 or seq < 2:  # a step trains on SEQ-1 next-token positions
        raise ValueError(f"--cases {spec!r}: VOCAB and BATCH must be >= 1 and SEQ >= 2")
    get_config(preset)  # unknown preset: ValueError listing the known ones
    return Case(preset, vocab, batch, seq)


def measure_matmul_peak(sizes: Sequence[int], dtype: Any, reps: int) -> dict[str, Any]:
    """Peak FLOP/s of a jit-compiled `[n, n] @ [n, n]` matmul (2·n³ FLOPs), best over `sizes`.

    Each size is compiled and run once untimed, then timed `reps` times; a size's rate is its
    median time's, and the peak is the best size's rate.

    Returns:
      {"dtype", "flops_per_s" (the peak), "size" (its n), "by_size": {n: FLOP/s}}.
    """
    matmul = jax.jit(jnp.matmul)
    by_size = {}
    for n in sizes:
        a, b = jax.random.normal(jax.random.key(n), (2, n, n), dtype)
        time_call(lambda a=a, b=b: matmul(a, b))  # compile + first run
        median = statistics.median(time_call(lambda a=a, b=b: matmul(a, b)) for _ in range(reps))
        by_size[n] = 2.0 * n**3 / median
    best = max(by_size, key=by_size.get)
    return {
        "dtype": jnp.dtype(dtype).name,
        "flops_per_s": by_size[best],
        "size": best,
        "by_size": by_size,
    }


def model_config(case: Case, dtype: str) -> TransformerConfig:
    """The preset at the case's vocabulary, long enough for its T, in the compute `dtype`."""
    preset = get_config(case.preset)
    return preset.replace(
        vocab_size=case.vocab_size,
        max_seq_len=max(preset.max_seq_len, case.seq_len),
        dtype=DTYPES[dtype],
    )


def random_batch(
    trainer: Trainer, case: Case, config: TransformerConfig, params, rng: np.random.Generator
) -> Batch:
    """A random batch of the trainer's layout, every token counted (masks all ones).

    SFT: `tokens` int32 [B, T], `mask` float32 [B, T]. DPO: `chosen_tokens`, `rejected_tokens`,
    `chosen_mask`, `rejected_mask` [B, T] and `ref_chosen_logps`, `ref_rejected_logps` float32 [B],
    precomputed with `params` as the reference (as at the start of DPO: the loss is log 2, not a
    saturated sigmoid); the reference model does not run inside the timed step.
    """
    b, t = case.batch_size, case.seq_len

    def tokens() -> jax.Array:
        return jnp.asarray(rng.integers(0, case.vocab_size, (b, t)), jnp.int32)

    mask = jnp.ones((b, t), jnp.float32)
    if trainer == "sft":
        return {"tokens": tokens(), "mask": mask}
    batch = {
        "chosen_tokens": tokens(),
        "rejected_tokens": tokens(),
        "chosen_mask": mask,
        "rejected_mask": mask,
    }
    ref_chosen, ref_rejected = make_pair_logps_fn(config)(params, batch)
    return {**batch, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}


def model_flops_per_step(config: TransformerConfig, batch: Batch) -> float:
    """Training FLOPs of one step on `batch`: positions × `train_flops_per_token` at their context.

    Both trainers run the model on `tokens[:, :-1]` (position t predicts token t+1), so a step
    trains rows·(T-1) positions with context T-1.
    """
    rows, t = 0, None
    for key, value in batch.items():
        if key.endswith("tokens"):
            rows += value.shape[0]
            t = value.shape[1]
    return rows * (t - 1) * train_flops_per_token(config, t - 1)


def benchmark_step(
    trainer: Trainer,
    case: Case,
    config: TransformerConfig,
    params,
    cfg: Config,
) -> StepResult:
    """Compiles and times one train step of one case (see the module docstring).

    The step donates its state, so the state is threaded from call to call; `params` itself is
    copied first and stays valid.

    Raises:
      AssertionError: the step compiled more than once, or the loss is not finite.
    """
    tx, schedule = make_optimizer(OptimConfig())
    make_step = make_sft_step if trainer == "sft" else make_dpo_step
    step = make_step(config, tx, schedule)
    state = create_train_state(jax.tree.map(jnp.copy, params), tx, cfg.seed)
    batch = random_batch(trainer, case, config, params, np.random.default_rng(cfg.seed))
    jax.block_until_ready((state, batch))

    metrics = {}

    def call():
        nonlocal state, metrics
        state, metrics = step(state, batch)
        return state, metrics

    with compilations(step) as programs:
        start = time.perf_counter()
        compiled = step.lower(state, batch).compile()  # trace + lower + XLA compile, no execution
        compile_s = time.perf_counter() - start
        warmup_times = [time_call(call) for _ in range(cfg.warmup)]
        times = [time_call(call) for _ in range(cfg.steps)]
    assert len(programs) == 1, f"{trainer} step compiled {len(programs)} programs"
    cost = compiled.cost_analysis() or {}
    xla_flops = cost.get("flops")
    loss = float(metrics["loss"])
    assert np.isfinite(loss), f"{trainer} loss is {loss}"

    step_s = statistics.median(times)
    tokens = count_tokens(batch)
    flops = model_flops_per_step(config, batch)
    return StepResult(
        preset=case.preset,
        vocab_size=case.vocab_size,
        trainer=trainer,
        params_m=num_params(config) / 1e6,
        batch_size=case.batch_size,
        seq_len=case.seq_len,
        rows=tokens // case.seq_len,
        tokens_per_step=tokens,
        compile_s=compile_s,
        step_s=step_s,
        warmup_times_s=warmup_times,
        step_times_s=times,
        tokens_per_s=tokens / step_s,
        model_flops_per_step=flops,
        xla_flops_per_step=None if xla_flops is None else float(xla_flops),
        loss=loss,
    )


def time_optimizer_update(params, cfg: Config) -> float:
    """Median seconds of the optimizer update alone on gradients shaped like `params`.

    Times the part of a train step whose cost does not grow with the batch: `tx.update` (global
    norm clipping, AdamW) and `optax.apply_updates`, jit-compiled, warmed up like the steps.
    """
    tx, _ = make_optimizer(OptimConfig())
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: 1e-3 * p, params)

    @jax.jit
    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for _ in range(1 + cfg.warmup):  # compile + warm-up
        time_call(lambda: update(params, opt_state, grads))
    return statistics.median(
        time_call(lambda: update(params, opt_state, grads)) for _ in range(cfg.steps)
    )


def format_report(env: dict, peaks: list[dict], results: list[StepResult], seconds: float) -> str:
    """The printed report: environment, contention, peaks, the results table, then DPO/SFT
    ratios, the XLA FLOP cross-check, the optimizer's and the vocabulary's share of the step."""
    lines = environment_lines(env, seconds)
    for peak in peaks:
        sizes = ", ".join(f"n={n}: {f / 1e9:.1f}" for n, f in peak["by_size"].items())
        lines.append(
            f"matmul peak {peak['dtype']} ({peak['when']}): {peak['flops_per_s'] / 1e9:.1f} "
            f"GFLOP/s at n={peak['size']}  [by size, GFLOP/s: {sizes}]"
        )
    header = (
        "model", "trainer", "params (M)", "B", "T", "step ms", "tokens/s", "MFU %", "compile s"
    )
    widths = (17, 7, 10, 3, 5, 8, 8, 6, 9)

    def row(cells: Sequence[Any]) -> str:
        return "  ".join(
            f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths))
        )

    lines += ["", row(header), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    for r in results:
        lines.append(
            row((r.model, r.trainer, f"{r.params_m:.1f}", r.batch_size, r.seq_len,
                 f"{r.step_s * 1e3:.0f}", f"{r.tokens_per_s:.0f}", f"{r.mfu * 100:.1f}",
                 f"{r.compile_s:.1f}"))
        )
    lines.append("")
    sft = {(r.model, r.batch_size, r.seq_len): r for r in results if r.trainer == "sft"}
    for r in results:
        base = sft.get((r.model, r.batch_size, r.seq_len))
        if r.trainer == "dpo" and base is not None:
            lines.append(
                f"DPO/SFT tokens/s, {r.model} B={r.batch_size} T={r.seq_len}: "
                f"{r.tokens_per_s / base.tokens_per_s:.2f}"
            )
    for r in results:
        if r.xla_flops_per_step:
            lines.append(
                f"XLA cost-analysis FLOPs / model FLOPs, {r.model} {r.trainer}: "
                f"{r.xla_flops_per_step / r.model_flops_per_step:.3f}"
            )
    by_model: dict[str, list[StepResult]] = {}
    for r in results:
        by_model.setdefault(r.model, []).append(r)
    for model, rs in by_model.items():
        shares = ", ".join(
            f"{r.optimizer_s / r.step_s * 100:.0f}% of the {r.trainer} step" for r in rs
        )
        lines.append(
            f"optimizer update alone (clip + AdamW + apply), {model}: "
            f"{rs[0].optimizer_s * 1e3:.0f} ms = {shares}"
        )
    lines += head_share_lines(results)
    lines.append(f"total wall time: {seconds:.0f} s")
    return "\n".join(lines)


def head_share_lines(results: list[StepResult]) -> list[str]:
    """For results differing only in vocabulary size: the share of the step the larger V adds."""
    lines = []
    for big in results:
        for small in results:
            same = (big.preset, big.trainer, big.batch_size, big.seq_len) == (
                small.preset, small.trainer, small.batch_size, small.seq_len
            )
            if same and big.vocab_size > small.vocab_size:
                lines.append(
                    f"{big.preset} {big.trainer}: {big.step_s * 1e3:.0f} ms/step at "
                    f"V={big.vocab_size} vs {small.step_s * 1e3:.0f} ms at V={small.vocab_size}: "
                    f"the wider vocabulary (output head, softmax, embedding update) is "
                    f"{(1 - small.step_s / big.step_s) * 100:.0f}% of the step, "
                    f"{(1 - small.model_flops_per_step / big.model_flops_per_step) * 100:.0f}% "
                    f"of its model FLOPs"
                )
    return lines


def measure_peaks(cfg: Config, when: str) -> list[dict[str, Any]]:
    """The matmul peak of float32, of the compute dtype and (--bf16-peak) of bfloat16."""
    dtypes = dict.fromkeys(["float32", cfg.dtype] + (["bfloat16"] if cfg.bf16_peak else []))
    return [
        {"when": when, **measure_matmul_peak(cfg.peak_sizes, DTYPES[d], cfg.peak_reps)}
        for d in dtypes
    ]


def run(cfg: Config) -> dict[str, Any]:
    """Measures the peaks, then every case and trainer; prints and returns the results."""
    if cfg.steps < 1 or cfg.warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {cfg.steps}, {cfg.warmup}")
    cases = [parse_case(spec) for spec in cfg.cases]
    configs = [model_config(case, cfg.dtype) for case in cases]  # bad flags fail before compute
    clock = RunClock()
    peaks = measure_peaks(cfg, "start")
    results = []
    for case, config in zip(cases, configs):
        params = init_params(config, jax.random.key(cfg.seed))
        optimizer_s = time_optimizer_update(params, cfg)
        for trainer in cfg.trainers:
            print(f"timing {case.preset}/V={case.vocab_size} {trainer} B={case.batch_size} "
                  f"T={case.seq_len} ...", file=sys.stderr, flush=True)
            result = benchmark_step(trainer, case, config, params, cfg)
            results.append(dataclasses.replace(result, optimizer_s=optimizer_s))
        del params
    # The peak is measured again after the models and MFU divides by the better of the two, so
    # a machine busier at one end does not inflate MFU; the spread of the two shows the noise.
    peaks += measure_peaks(cfg, "end")
    peak = max(p["flops_per_s"] for p in peaks if p["dtype"] == cfg.dtype)
    results = [
        dataclasses.replace(r, mfu=r.model_flops_per_step / r.step_s / peak) for r in results
    ]
    seconds, env = clock.stop(), clock.env
    print(format_report(env, peaks, results, seconds))
    return {
        "config": config_record(cfg),
        "environment": env,
        "peaks": peaks,
        "mfu_peak_flops_per_s": peak,
        "results": [{"model": r.model, **dataclasses.asdict(r)} for r in results],
        "wall_time_s": seconds,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point: parses flags into `Config`, runs, prints, optionally writes --json."""
    return run_cli(Config, run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
