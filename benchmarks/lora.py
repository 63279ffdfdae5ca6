"""LoRA / DoRA against full fine-tuning: optimizer-state bytes, step memory and train-step time.

For each case (a model preset at a vocabulary size, batch size B and sequence length T) the script
builds one set of base params and times the SFT train step (`jaxalign.trainers.make_sft_step`, or
`make_dpo_step` with `--trainers dpo`) three ways on the same random batch:

* full: every parameter trained, `make_optimizer(OptimConfig())` (clip + AdamW);
* lora: adapters of `--rank` on `--targets` (`jaxalign.lora`), `make_lora_optimizer`, the base a
  non-donated step argument;
* dora: the same adapters with DoRA magnitudes.

Each step is compiled ahead of time (`step.lower(...).compile()`, the `compile s` column), then
called `--warmup` times untimed and `--steps` times timed; the figure is the median. Every call
has the same shapes and the script asserts one compiled program per step (`jaxalign.metrics.compilations`).
Optimizer-state bytes are the live buffers of the state after the timed steps (and must equal
`jaxalign.memory.estimate_memory`'s figure, asserted); `temp MB` is XLA's own
`compiled.memory_analysis().temp_size_in_bytes` (gradients, activations, work space). Ratios are
against the full fine-tune of the same case measured in the same run.

    python benchmarks/lora.py                                   # default: gpt2-mini and GPT-2 124M
    python benchmarks/lora.py --cases gpt2-mini:512:8:128 --steps 3    # quick run, ~30 s
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.lora import LoraConfig, init_lora, make_lora_optimizer
from jaxalign.memory import estimate_memory
from jaxalign.metrics import compilations
from jaxalign.models import TransformerConfig, init_params, num_params
from jaxalign.optim import OptimConfig, make_optimizer
from jaxalign.trainers import create_train_state, make_dpo_step, make_sft_step

try:  # run as a script (`python benchmarks/lora.py`): benchmarks/ itself is on sys.path
    from _common import RunClock, config_record, environment_lines, run_cli, time_call
    from train_step import Case, model_config, parse_case, random_batch
except ImportError:  # imported as `benchmarks.lora`
    from benchmarks._common import RunClock, config_record, environment_lines, run_cli, time_call
    from benchmarks.train_step import Case, model_config, parse_case, random_batch

Variant = Literal["full", "lora", "dora"]
Trainer = Literal["sft", "dpo"]


@dataclasses.dataclass
class Config:
    """LoRA / DoRA vs full fine-tuning: optimizer-state bytes and train-step time per case."""

    cases: tuple[str, ...] = ("gpt2-mini:512:8:128", "gpt2:50257:4:128")
    """Benchmark cases as PRESET:VOCAB:BATCH:SEQ (as benchmarks/train_step.py). The default's
    gpt2-mini at V=512 is the small, quick case; gpt2 at V=50257 is GPT-2 124M."""
    variants: tuple[Variant, ...] = ("full", "lora", "dora")
    """What to train: every parameter, LoRA adapters, or DoRA adapters."""
    trainers: tuple[Trainer, ...] = ("sft",)
    """Train steps to time (dpo: random pairs with precomputed reference log-probs)."""
    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA α (the update is scaled by α / r)."""
    targets: tuple[str, ...] = ("attention",)
    """LoraConfig.targets: presets (attention, mlp, all, qv) or regular expressions."""
    dropout: float = 0.0
    """LoraConfig.dropout: > 0 trains through the unmerged adapter branch."""
    steps: int = 10
    """Timed calls per step; the median is reported."""
    warmup: int = 1
    """Untimed calls after compilation."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of the models (parameters stay float32)."""
    seed: int = 0
    json: Path | None = None
    """Write the environment and per-case results here as JSON."""


@dataclasses.dataclass
class VariantResult:
    """One train step of one case and variant (times in seconds, sizes in bytes)."""

    preset: str
    vocab_size: int
    trainer: str
    variant: str
    batch_size: int
    seq_len: int
    model_params: int
    trainable_params: int
    optimizer_state_bytes: int
    estimated_optimizer_state_bytes: int
    temp_bytes: int
    argument_bytes: int
    compile_s: float
    step_s: float
    warmup_times_s: list[float]
    step_times_s: list[float]
    loss: float

    @property
    def model(self) -> str:
        return f"{self.preset}/V={self.vocab_size}"


def _nbytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def lora_config(variant: Variant, cfg: Config) -> LoraConfig | None:
    """None for full fine-tuning, else the LoRA/DoRA config of the flags."""
    if variant == "full":
        return None
    return LoraConfig(
        rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets, dropout=cfg.dropout,
        dora=variant == "dora",
    )


def benchmark_variant(
    trainer: Trainer,
    variant: Variant,
    case: Case,
    config: TransformerConfig,
    params,
    batch,
    cfg: Config,
) -> VariantResult:
    """Compiles and times one train step (see the module docstring); `params` stays valid.

    Raises:
      AssertionError: the step compiled more than once, the loss is not finite, or the
        optimizer state's bytes differ from `estimate_memory`'s.
    """
    lora = lora_config(variant, cfg)
    make_step = make_sft_step if trainer == "sft" else make_dpo_step
    if lora is None:
        tx, schedule = make_optimizer(OptimConfig())
        trainable, extra = jax.tree.map(jnp.copy, params), ()  # the step donates its state
    else:
        tx, schedule = make_lora_optimizer(OptimConfig())
        trainable, extra = init_lora(params, lora, jax.random.key(cfg.seed)), (params,)
    step = make_step(config, tx, schedule, lora=lora)
    state = create_train_state(trainable, tx, cfg.seed)
    jax.block_until_ready(state)

    metrics = {}

    def call():
        nonlocal state, metrics
        state, metrics = step(state, batch, *extra)
        return state, metrics

    with compilations(step) as programs:
        start = time.perf_counter()
        compiled = step.lower(state, batch, *extra).compile()  # trace + lower + XLA compile
        compile_s = time.perf_counter() - start
        warmup_times = [time_call(call) for _ in range(cfg.warmup)]
        times = [time_call(call) for _ in range(cfg.steps)]
    assert len(programs) == 1, f"{variant} {trainer} step compiled {len(programs)} programs"
    memory = compiled.memory_analysis()
    loss = float(metrics["loss"])
    assert np.isfinite(loss), f"{variant} {trainer} loss is {loss}"

    opt_bytes = _nbytes(state.opt_state)
    estimate = estimate_memory(config, batch=case.batch_size, seq_len=case.seq_len - 1, lora=lora)
    assert opt_bytes == estimate["optimizer_state"], (variant, opt_bytes, estimate)
    return VariantResult(
        preset=case.preset,
        vocab_size=case.vocab_size,
        trainer=trainer,
        variant=variant,
        batch_size=case.batch_size,
        seq_len=case.seq_len,
        model_params=num_params(config),
        trainable_params=sum(x.size for x in jax.tree.leaves(state.params)),
        optimizer_state_bytes=opt_bytes,
        estimated_optimizer_state_bytes=estimate["optimizer_state"],
        temp_bytes=int(memory.temp_size_in_bytes) if memory is not None else -1,
        argument_bytes=int(memory.argument_size_in_bytes) if memory is not None else -1,
        compile_s=compile_s,
        step_s=statistics.median(times),
        warmup_times_s=warmup_times,
        step_times_s=times,
        loss=loss,
    )


def format_report(env: dict[str, Any], cfg: Config, results: list[VariantResult], seconds: float) -> str:
    """The printed report: environment, the per-variant table, and the ratios to full."""
    lines = environment_lines(env, seconds)
    lines.append(
        f"adapters: rank {cfg.rank}, alpha {cfg.alpha}, targets {' '.join(cfg.targets)}"
        f"{f', dropout {cfg.dropout}' if cfg.dropout else ''}; "
        f"ratios are against the full fine-tune of the same case in this run"
    )
    header = ("model", "trainer", "variant", "B", "T", "trainable", "% of model", "opt state MB",
              "temp MB", "step ms", "compile s", "step ×full", "opt state ×full")
    widths = (18, 7, 7, 3, 5, 12, 10, 12, 9, 9, 9, 10, 15)

    def row(cells) -> str:
        return "  ".join(
            f"{c:<{w}}" if i < 3 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths))
        )

    full = {(r.model, r.trainer, r.batch_size, r.seq_len): r for r in results if r.variant == "full"}
    lines += ["", row(header), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    for r in results:
        ref = full.get((r.model, r.trainer, r.batch_size, r.seq_len))
        lines.append(row((
            r.model, r.trainer, r.variant, r.batch_size, r.seq_len, f"{r.trainable_params:,}",
            f"{r.trainable_params / r.model_params * 100:.2f}",
            f"{r.optimizer_state_bytes / 2**20:.2f}", f"{r.temp_bytes / 2**20:.0f}",
            f"{r.step_s * 1e3:.0f}", f"{r.compile_s:.1f}",
            "-" if ref is None else f"{r.step_s / ref.step_s:.2f}",
            "-" if ref is None else f"{r.optimizer_state_bytes / ref.optimizer_state_bytes:.5f}",
        )))
    lines.append("")
    for r in results:
        spread = f"{min(r.step_times_s) * 1e3:.0f}-{max(r.step_times_s) * 1e3:.0f}"
        lines.append(
            f"{r.model} {r.trainer} {r.variant}: step times {spread} ms over {len(r.step_times_s)} "
            f"calls; optimizer state {r.optimizer_state_bytes:,} B = estimate_memory's (asserted); "
            f"compiled once (asserted)"
        )
    lines.append(f"total wall time: {seconds:.0f} s")
    return "\n".join(lines)


def run(cfg: Config) -> dict[str, Any]:
    """Times every case, trainer and variant; prints and returns the results."""
    if cfg.steps < 1 or cfg.warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {cfg.steps}, {cfg.warmup}")
    if "full" not in cfg.variants:
        raise ValueError("--variants must include full: the ratios are against it")
    for variant in cfg.variants:
        lora_config(variant, cfg)  # a bad --rank or --targets pattern fails before any compute
    cases = [parse_case(spec) for spec in cfg.cases]
    configs = [model_config(case, cfg.dtype) for case in cases]
    clock = RunClock()
    results = []
    for case, config in zip(cases, configs):
        params = init_params(config, jax.random.key(cfg.seed))
        for trainer in cfg.trainers:
            batch = random_batch(trainer, case, config, params, np.random.default_rng(cfg.seed))
            for variant in ("full", *(v for v in cfg.variants if v != "full")):
                print(f"timing {case.preset}/V={case.vocab_size} {trainer} {variant} "
                      f"B={case.batch_size} T={case.seq_len} ...", file=sys.stderr, flush=True)
                results.append(benchmark_variant(trainer, variant, case, config, params, batch, cfg))
        del params
    seconds, env = clock.stop(), clock.env
    print(format_report(env, cfg, results, seconds))
    return {
        "config": config_record(cfg),
        "environment": env,
        "results": [{"model": r.model, **dataclasses.asdict(r)} for r in results],
        "wall_time_s": seconds,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point: parses flags into `Config`, runs, prints, optionally writes --json."""
    return run_cli(Config, run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
