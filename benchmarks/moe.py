"""MoE layer forward + backward: `dense` (every expert on every token) against `ragged`
(sorted assignments, `jax.lax.ragged_dot` grouped matmuls), same process, same inputs.

For each case (E experts, k per token) the script builds one `jaxalign.models.moe.MoE` layer
(D = --d-model, F = --d-ff, no shared expert, Mixtral-style softmax router) and times
`jax.jit(jax.value_and_grad(loss, argnums=(params, x)))` with loss = Σ y·r for a fixed random r,
on N = --tokens tokens: one MoE forward and its full backward. Each step is compiled ahead of time
(`compile s`), run `--warmup` times untimed, then `--steps` times timed with
`jax.block_until_ready`; the figure is the median. Every call has the same shapes and one
compilation per implementation is asserted. Before timing, the two implementations' outputs are
checked to agree (64 float32 ulps of max|y|).

Counting (per step, forward + backward = 3 × the forward's matmul FLOPs):
  useful    18·N·k·D·F   the routed experts' three matmuls (2·3·D·F per assignment forward)
  dense     18·N·E·D·F   what `dense` executes by construction (E/k × useful)
  XLA       `compiled.cost_analysis()["flops"]`: what XLA's own cost model counts for the compiled
            program (it also counts the router, softmax, sort and elementwise work).
The router's 3·2·N·D·E FLOPs are left out of useful/dense (< 1% at these sizes).

Whole step (`--step-cases`, default the same two cases): a `make_sft_step` train step (clip +
AdamW, fused head) of a `--step-layers`-layer Llama-family model whose every FFN is the MoE layer
(Mixtral routing, D = --d-model, F = --d-ff, vocab --step-vocab, B = --step-batch rows of
T = --step-seq tokens), dense vs ragged, and beside them the dense-FFN model with the same active
FFN FLOPs (d_ff = k·F, `moe=None`): what the MoE's routing, dispatch and aux loss cost on top of
the FLOPs it uses. Model FLOPs per step = positions × `train_flops_per_token` (active parameters
only, the convention of `train_step.py`); one compilation per step is asserted.

    python benchmarks/moe.py                         # default: E=8 k=2 and E=64 k=8, < 3 minutes
    python benchmarks/moe.py --cases 8:2 --step-cases 8:2 --steps 3   # smoke test

On CPU (jax 0.10.2) `ragged_dot` lowers to a dense masked expansion (`_ragged_dot_general_impl`:
every group's matmul over all N·k rows, masked), so `ragged` executes about E × its useful FLOPs,
k × more than `dense`: it is the implementation for TPU (and GPU, measured), not for CPU.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.metrics import compilations
from jaxalign.models.config import get_config, num_params
from jaxalign.models.moe import MoE, MoEConfig
from jaxalign.models.transformer import init_params

try:  # run as a script (`python benchmarks/moe.py`): benchmarks/ itself is on sys.path
    from _common import RunClock, config_record, environment_lines, run_cli, time_call
    from speed_cpu import time_jax_step
    from train_step import Case
except ImportError:  # imported as `benchmarks.moe`
    from benchmarks._common import RunClock, config_record, environment_lines, run_cli, time_call
    from benchmarks.speed_cpu import time_jax_step
    from benchmarks.train_step import Case

IMPLS = ("dense", "ragged")


@dataclasses.dataclass
class Config:
    """MoE layer forward+backward: dense vs ragged expert computation per (E, k) case."""

    cases: tuple[str, ...] = ("8:2", "64:8")
    """Cases as E:K (experts, experts per token)."""
    tokens: int = 512
    """N tokens per step (one [1, N, D] batch)."""
    d_model: int = 64
    """D, the model width."""
    d_ff: int = 32
    """F, each expert's width."""
    steps: int = 5
    """Timed calls per implementation; the median is reported."""
    warmup: int = 1
    """Untimed calls after compilation."""
    step_cases: tuple[str, ...] = ("8:2", "64:8")
    """Whole-SFT-step cases as E:K (empty: skip the whole-step part)."""
    step_layers: int = 2
    """Layers of the whole-step model (every FFN an MoE)."""
    step_batch: int = 4
    """Rows B of the whole-step batch."""
    step_seq: int = 129
    """Tokens per row of the whole-step batch (T − 1 = 128 trained positions)."""
    step_vocab: int = 512
    """Vocabulary of the whole-step model."""
    seed: int = 0
    json: Path | None = None
    """Write the environment and per-case results here as JSON."""


@dataclasses.dataclass
class Result:
    """Timing of one implementation of one case (times in seconds, FLOPs per step)."""

    experts: int
    k: int
    impl: str
    tokens: int
    compile_s: float
    step_s: float
    step_times_s: list[float]
    tokens_per_s: float
    useful_flops: float
    dense_flops: float
    xla_flops: float | None
    temp_bytes: int


def parse_case(spec: str) -> tuple[int, int]:
    """`E:K` -> (E, k).

    Raises:
      ValueError: not two positive integers with k <= E.
    """
    try:
        e, k = map(int, spec.split(":"))
    except ValueError:
        raise ValueError(f"--cases {spec!r}: expected E:K, e.g. 64:8") from None
    if not 1 <= k <= e:
        raise ValueError(f"--cases {spec!r}: need 1 <= K <= E")
    return e, k


def _step(config: MoEConfig, r: jax.Array):
    module = MoE(config)

    def loss(params, x):
        y, _ = module.apply({"params": params}, x)
        return jnp.sum(y * r)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def benchmark(e: int, k: int, impl: str, params, x, r, cfg: Config) -> Result:
    """Compiles, warms up and times one implementation's forward + backward step."""
    config = MoEConfig(num_experts=e, experts_per_token=k, moe_d_ff=cfg.d_ff, impl=impl)
    step = _step(config, r)
    with compilations(step) as programs:
        start = time.perf_counter()
        compiled = step.lower(params, x).compile()
        compile_s = time.perf_counter() - start
        for _ in range(cfg.warmup):
            time_call(lambda: step(params, x))
        times = [time_call(lambda: step(params, x)) for _ in range(cfg.steps)]
    assert len(programs) == 1, f"{impl} step compiled {len(programs)} programs"
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    memory = compiled.memory_analysis()
    n, d, f = cfg.tokens, cfg.d_model, cfg.d_ff
    median = statistics.median(times)
    return Result(
        experts=e, k=k, impl=impl, tokens=n, compile_s=compile_s, step_s=median, step_times_s=times,
        tokens_per_s=n / median, useful_flops=18.0 * n * k * d * f, dense_flops=18.0 * n * e * d * f,
        xla_flops=None if not cost or "flops" not in cost else float(cost["flops"]),
        temp_bytes=int(memory.temp_size_in_bytes) if memory is not None else -1,
    )


def check_agreement(e: int, k: int, params, x, cfg: Config) -> float:
    """max |y_ragged − y_dense| / max |y_dense|; asserted within 64 float32 ulps (the same sums
    of <= D + F + k terms in another order)."""
    ys = [MoE(MoEConfig(num_experts=e, experts_per_token=k, moe_d_ff=cfg.d_ff, impl=impl)).apply(
        {"params": params}, x)[0] for impl in IMPLS]
    scale = float(jnp.abs(ys[0]).max())
    rel = float(jnp.abs(ys[1] - ys[0]).max()) / scale
    assert rel <= 64 * float(np.finfo(np.float32).eps), f"E={e} k={k}: ragged differs from dense by {rel:.2e}"
    return rel


def step_config(cfg: Config, e: int, k: int, impl: str):
    """The whole-step model: "dense"/"ragged" MoE in every layer, or "dense-ffn" (the dense
    SwiGLU of width k·F: the same active FFN FLOPs, no routing)."""
    base = dict(vocab_size=cfg.step_vocab, n_layers=cfg.step_layers, d_model=cfg.d_model, max_seq_len=cfg.step_seq)
    if impl == "dense-ffn":
        return get_config("mixtral-tiny", d_ff=k * cfg.d_ff, moe=None, **base)
    moe = MoEConfig.mixtral(num_experts=e, experts_per_token=k, moe_d_ff=cfg.d_ff, impl=impl)
    return get_config("mixtral-tiny", moe=moe, **base)


def benchmark_step(e: int, k: int, cfg: Config) -> list[dict[str, Any]]:
    """Times the whole SFT step of `step_config` for dense, ragged and the dense-FFN model."""
    case = Case("mixtral-tiny", cfg.step_vocab, cfg.step_batch, cfg.step_seq)
    out = []
    for impl in (*IMPLS, "dense-ffn"):
        config = step_config(cfg, e, k, impl)
        params = init_params(config, jax.random.key(cfg.seed))
        print(f"timing SFT step E={e} k={k} {impl} ...", file=sys.stderr, flush=True)
        r = time_jax_step("sft", config, params, case, cfg.steps, cfg.warmup, seed=cfg.seed)
        assert r["recompiles"] == 0 and r["compiled_programs"] == 1, f"{impl} SFT step recompiled: {r}"
        out.append({"experts": e, "k": k, "impl": impl, "params": num_params(config),
                    "active_params": num_params(config, active=True), **r})
    return out


def format_step_report(cfg: Config, steps: list[dict[str, Any]]) -> list[str]:
    """One line per whole-step run, with its time against dense experts and the dense-FFN model."""
    lines = [f"whole SFT step (clip + AdamW, fused head), {cfg.step_layers} layers, D={cfg.d_model}, "
             f"F={cfg.d_ff}, V={cfg.step_vocab}, B={cfg.step_batch}, T={cfg.step_seq}, float32; "
             f"median of {cfg.steps} steps"]
    by = {(r["experts"], r["k"], r["impl"]): r for r in steps}
    for r in steps:
        dense, ffn = by[(r["experts"], r["k"], "dense")], by[(r["experts"], r["k"], "dense-ffn")]
        lines.append(
            f"E={r['experts']:<3d} k={r['k']}  {r['impl']:<9s}  {r['step_s'] * 1e3:8.2f} ms  "
            f"{r['tokens_per_s']:9,.0f} tok/s  params {r['params'] / 1e6:.2f}M (active {r['active_params'] / 1e6:.2f}M)  "
            f"model GFLOP/s {r['model_flops_per_step'] / r['step_s'] / 1e9:6.2f}  "
            f"compiled {r['compiled_bytes'] / 2**20:.0f} MB  compile {r['compile_s']:.1f} s  "
            f"time x dense {r['step_s'] / dense['step_s']:.2f}  x dense-ffn {r['step_s'] / ffn['step_s']:.2f}"
        )
    return lines


def format_report(env: dict[str, Any], cfg: Config, results: list[Result], agreement: dict, seconds: float,
                  steps: list[dict[str, Any]] = ()) -> str:
    """The printed report: environment, one line per implementation, the ratio to dense."""
    lines = environment_lines(env, seconds)
    lines.append(f"MoE layer fwd+bwd, N={cfg.tokens} tokens, D={cfg.d_model}, F={cfg.d_ff}, float32; "
                 f"median of {cfg.steps} steps; ratios against dense of the same case in this run")
    dense = {(r.experts, r.k): r for r in results if r.impl == "dense"}
    for r in results:
        ref = dense[(r.experts, r.k)]
        xla = "n/a" if r.xla_flops is None else f"{r.xla_flops / 1e9:.3f}"
        lines.append(
            f"E={r.experts:<3d} k={r.k}  {r.impl:<6s}  {r.step_s * 1e3:8.2f} ms  {r.tokens_per_s:10,.0f} tok/s  "
            f"GFLOP useful {r.useful_flops / 1e9:.3f}  dense-executed {r.dense_flops / 1e9:.3f}  XLA {xla}  "
            f"useful GFLOP/s {r.useful_flops / r.step_s / 1e9:6.2f}  temp {r.temp_bytes / 2**20:.1f} MB  "
            f"compile {r.compile_s:.1f} s  time x dense {r.step_s / ref.step_s:.2f}"
        )
    for (e, k), rel in agreement.items():
        lines.append(f"E={e} k={k}: max|y_ragged - y_dense| / max|y_dense| = {rel:.1e} (<= 64 ulps, asserted); "
                     f"each step compiled once (asserted)")
    if steps:
        lines.extend(format_step_report(cfg, steps))
    lines.append(f"total wall time: {seconds:.0f} s")
    return "\n".join(lines)


def run(cfg: Config) -> dict[str, Any]:
    """Times both implementations for every case; prints and returns the results."""
    if cfg.steps < 1 or cfg.warmup < 0 or min(cfg.tokens, cfg.d_model, cfg.d_ff) < 1:
        raise ValueError("--steps, --tokens, --d-model, --d-ff must be >= 1 and --warmup >= 0")
    cases = [parse_case(spec) for spec in cfg.cases]
    step_cases = [parse_case(spec) for spec in cfg.step_cases]
    clock = RunClock()
    results, agreement = [], {}
    for e, k in cases:
        key = jax.random.key(cfg.seed)
        x = jax.random.normal(key, (1, cfg.tokens, cfg.d_model), jnp.float32)  # [1,N,D]
        r = jax.random.normal(jax.random.fold_in(key, 1), x.shape, jnp.float32)
        config = MoEConfig(num_experts=e, experts_per_token=k, moe_d_ff=cfg.d_ff)
        # every kernel N(0, 1/fan_in): router logits and expert activations O(1)
        params = nn.unbox(MoE(config, init_std=cfg.d_model**-0.5, out_init_std=cfg.d_ff**-0.5).init(
            jax.random.fold_in(key, 2), x))["params"]
        agreement[(e, k)] = check_agreement(e, k, params, x, cfg)
        for impl in IMPLS:
            print(f"timing E={e} k={k} {impl} ...", file=sys.stderr, flush=True)
            results.append(benchmark(e, k, impl, params, x, r, cfg))
    steps = [r for e, k in step_cases for r in benchmark_step(e, k, cfg)]
    seconds, env = clock.stop(), clock.env
    print(format_report(env, cfg, results, agreement, seconds, steps))
    return {
        "config": config_record(cfg),
        "environment": env,
        "results": [dataclasses.asdict(r) for r in results],
        "agreement": {f"{e}:{k}": rel for (e, k), rel in agreement.items()},
        "steps": steps,
        "wall_time_s": seconds,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point: parses flags into `Config`, runs, prints, optionally writes --json."""
    return run_cli(Config, run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
