"""Decoding throughput: KV-cache `generate` against a full-recompute greedy loop; prefill; compiles.

For each case (a model, batch size B, new tokens N; prompt length P from --prompt-len) the script
times, on one random prompt batch `[B, P]` (every token real, `prompt_mask` all ones):

* **cache**: `jaxalign.decoding.generate`, greedy (`temperature=0.0`), no `eos_id`, so every row
  generates exactly N tokens: one prefill call, then N steps of a `lax.while_loop` over a
  pre-allocated KV cache of P + N slots.
* **recompute**: `recompute_greedy` below, the same greedy loop without a cache: one jitted
  `lax.fori_loop` whose every step runs `forward` over the whole fixed-size buffer `[B, P + N]`
  (prompt, then the tokens generated so far written in place, zeros after them), reads the hidden
  state at the current index, applies the output head to that one position and writes the argmax
  into the next slot. Causal attention keeps the zeros ahead of the current index invisible, and
  every step does the same work, whatever its index.
* **prefill**: `prefill` below, the first part of `generate` on its own: an empty cache of P + N
  slots, then `forward_with_cache` over the prompt.

Both decoders are timed end to end (prompt in, N tokens out; the cache's prefill is inside its
call, the recompute loop's first step does the prompt's work), so decode tokens/s = B·N ÷ call
time and the speed-up is recompute time ÷ cache time. Compilation is excluded: `generate` and
`prefill` get a warm-up call with the same shapes, the recompute loop is compiled ahead of time and
run once for one step. Every timed call ends with `jax.block_until_ready`; the figure is the
median of up to --reps calls (fewer once the timed calls of a case pass --time-budget-s).

The number of recompute steps is an argument of the compiled loop (a traced trip count), so one
executable runs 1, k or N steps. It first runs k steps (k chosen so that the call takes about
--probe-s); when N × (that time ÷ k) is at most --recompute-full-s the full N-step loop is timed,
otherwise the N-step time is **extrapolated** as N × (k-step time ÷ k) and marked so in every
output (`--no-extrapolate` reports such cases as not measured instead). Cases timed in full also
print the k-step prediction against the measurement, which checks the extrapolation.

Greedy tokens of the two decoders are asserted identical, all N per row: against the full loop
when it ran in full; otherwise against its first k steps and, for all N, against
`teacher_forced_greedy` (one forward pass over the same buffer holding the cache's tokens, whose
argmaxes equal the loop's tokens exactly when the loop would reproduce them).

Finally the programs `generate` compiles (`jaxalign.metrics.compilations`) are counted around repeated calls (same shapes with other rngs and
prompts, other sampling settings, another max_new_tokens, batch or prompt length) to count
compilations.

    python benchmarks/decode.py                          # default: about 7.5 minutes on 2 CPU cores
    python benchmarks/decode.py --cases stories260K:1:128 gpt2:1:128     # about 1 minute
    python benchmarks/decode.py --cases gpt2:32:512 --no-compile-check   # about 8 minutes
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.decoding import SamplingConfig, generate, prompt_positions
from jaxalign.metrics import compilations
from jaxalign.models import (
    TransformerConfig,
    forward,
    forward_with_cache,
    get_config,
    init_cache,
    init_params,
    load_llama2c,
    logits_from_hidden,
    num_params,
)

try:  # run as a script (`python benchmarks/decode.py`): benchmarks/ itself is on sys.path
    from _common import RunClock, config_record, environment_lines, run_cli, time_call
except ImportError:  # imported as `benchmarks.decode`
    from benchmarks._common import RunClock, config_record, environment_lines, run_cli, time_call

STORIES = "stories260K"
DEFAULT_STORIES_PATH = (
    Path(__file__).resolve().parents[2] / "shared/data/models/stories260K/stories260K.bin"
)


@dataclasses.dataclass
class Config:
    """Decoding benchmark: KV-cache generate vs a full-recompute greedy loop, prefill, compiles."""

    cases: tuple[str, ...] = (
        "stories260K:1:128", "stories260K:1:256", "stories260K:1:512",
        "stories260K:32:128", "stories260K:32:256", "stories260K:32:512",
        "gpt2:1:128", "gpt2:1:256", "gpt2:1:512",
        "gpt2:32:128", "gpt2:32:256",
    )
    """Cases as MODEL:BATCH:NEW_TOKENS. MODEL is `stories260K` (the llama2.c checkpoint at
    --stories-path) or a preset of jaxalign.models.PRESETS, randomly initialised (e.g. gpt2, the
    124M GPT-2 shape). gpt2:32:512 is left out of the default to keep it under 8 minutes: that case
    alone takes about 8 (its generate call takes nearly 3)."""
    prompt_len: int = 16
    """P, prompt tokens per row."""
    reps: int = 5
    """At most this many timed calls per measurement; the median is reported."""
    time_budget_s: float = 5.0
    """Stop repeating a measurement once its timed calls total this many seconds (>= 1 call)."""
    probe_s: float = 2.0
    """The recompute loop's first timed call runs k steps, k chosen to take about this long."""
    recompute_full_s: float = 60.0
    """Time the full N-step recompute loop when the k-step call predicts at most this many
    seconds; otherwise extrapolate (or, with --no-extrapolate, report it as not measured)."""
    extrapolate: bool = True
    """Report N × (k-step time ÷ k) for recompute loops too long to run in full."""
    compile_check: bool = True
    """Count generate's compilations over repeated calls (on the first model of --cases)."""
    stories_path: Path = DEFAULT_STORIES_PATH
    """The llama2.c stories260K checkpoint; its cases are skipped with a message if it is absent."""
    seed: int = 0
    json: Path | None = None
    """Write the environment, per-case results and compile counts here as JSON."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One decoding shape."""

    model: str
    batch_size: int
    new_tokens: int


@dataclasses.dataclass
class CaseResult:
    """Timings of one case, in seconds. `recompute_s` is None when not measured; `speedup` is
    recompute time ÷ cache time."""

    model: str
    params_m: float
    batch_size: int
    prompt_len: int
    new_tokens: int
    generate_compiles: int
    cache_first_call_s: float
    cache_s: float
    cache_times_s: list[float]
    cache_tokens_per_s: float
    prefill_s: float
    prefill_times_s: list[float]
    prefill_tokens_per_s: float
    recompute_compile_s: float
    recompute_probe_steps: int
    recompute_probe_s: float
    recompute_mode: str  # "measured", "extrapolated" or "not measured"
    recompute_s: float | None
    recompute_times_s: list[float]
    recompute_tokens_per_s: float | None
    speedup: float | None
    tokens_checked_per_row: int  # all N: the full loop, or the k-step loop + a teacher-forced pass
    extrapolation_check: float | None  # k-step prediction ÷ full measurement, when both exist

    @property
    def recompute_label(self) -> str:
        if self.recompute_mode == "extrapolated":
            return f"extrap. {self.recompute_probe_steps}/{self.new_tokens}"
        return self.recompute_mode


def parse_case(spec: str) -> Case:
    """Parses `MODEL:BATCH:NEW_TOKENS` (e.g. `gpt2:32:128`).

    Raises:
      ValueError: not three fields, a non-positive size, or an unknown model.
    """
    fields = spec.split(":")
    try:
        model, batch, new = fields[0], *map(int, fields[1:])
    except ValueError:
        raise ValueError(f"--cases {spec!r}: expected MODEL:BATCH:NEW_TOKENS, e.g. gpt2:32:128") from None
    if min(batch, new) < 1:
        raise ValueError(f"--cases {spec!r}: BATCH and NEW_TOKENS must be >= 1")
    if model != STORIES:
        get_config(model)  # unknown preset: ValueError listing the known ones
    return Case(model, batch, new)


def load_model(name: str, cfg: Config, max_len: int) -> tuple[TransformerConfig, Any] | None:
    """(config, params) of `name`, long enough for `max_len` tokens; None if its file is absent.

    stories260K is trained on 512 positions; its RoPE model accepts longer sequences, so
    max_seq_len is raised to `max_len` where P + N needs it (cost is unaffected; the text past
    position 512 is outside the training context). A preset is randomly initialised.
    """
    if name == STORIES:
        if not cfg.stories_path.is_file():
            print(f"skipping {STORIES}: no checkpoint at {cfg.stories_path}", file=sys.stderr)
            return None
        config, params = load_llama2c(cfg.stories_path)
    else:
        config = get_config(name)
        params = init_params(config, jax.random.key(cfg.seed))
    if max_len > config.max_seq_len:
        if config.learned_positions:
            raise ValueError(f"{name}: P + N = {max_len} exceeds its {config.max_seq_len} positions")
        config = config.replace(max_seq_len=max_len)
    return config, params


def recompute_greedy(
    params, prompt: jax.Array, prompt_mask: jax.Array, steps: jax.Array, *,
    config: TransformerConfig, new_tokens: int,
) -> jax.Array:
    """Greedy decoding without a cache: `steps` iterations of a full forward pass over [B, P+N].

    Args:
      prompt: int32 [B, P], left-padded; prompt_mask [B, P] 1 on real tokens.
      steps: int32 scalar <= N, tokens to generate (a traced trip count: one compiled program
        for any number of steps, each step the same work).
      config, new_tokens: static; N = new_tokens fixes the buffer length P + N.

    Returns:
      int32 [B, N]: the generated tokens in the first `steps` columns, zeros after.
    """
    b, p = prompt.shape
    prompt_pos = prompt_positions(prompt_mask)  # [B,P], -1 on padding
    new_pos = prompt_pos[:, -1:] + 1 + jnp.arange(new_tokens, dtype=jnp.int32)[None]  # [B,N]
    positions = jnp.concatenate([prompt_pos, new_pos], axis=1)  # [B,P+N]
    buffer = jnp.concatenate(
        [prompt.astype(jnp.int32), jnp.zeros((b, new_tokens), jnp.int32)], axis=1
    )  # [B,P+N]

    def step(i, buffer):
        hidden = forward(params, config, buffer, positions, return_hidden=True)  # [B,P+N,D]
        current = jax.lax.dynamic_index_in_dim(hidden, p - 1 + i, axis=1, keepdims=False)  # [B,D]
        logits = logits_from_hidden(params, config, current).astype(jnp.float32)  # [B,V]
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]
        return jax.lax.dynamic_update_index_in_dim(buffer, token, p + i, axis=1)

    return jax.lax.fori_loop(0, steps, step, buffer)[:, p:]


@functools.partial(jax.jit, static_argnames=("config",))
def teacher_forced_greedy(params, config: TransformerConfig, prompt, prompt_mask, tokens) -> jax.Array:
    """The greedy tokens a full recompute loop would produce, if they are `tokens`, in one pass.

    One `forward` over the buffer [prompt, tokens] ([B, P+N], the recompute loop's buffer and
    positions), then the argmax of the logits at positions P-1 .. P+N-2. Causal attention makes
    position P-1+i see exactly what step i of `recompute_greedy` sees when the first i tokens agree,
    so `result == tokens` everywhere iff the loop, run in full, would generate `tokens`. The
    output head runs over 8 positions at a time (bounded memory at V = 50257).

    Returns:
      int32 [B, N].
    """
    b, p = prompt.shape
    n = tokens.shape[1]
    prompt_pos = prompt_positions(prompt_mask)
    positions = jnp.concatenate(
        [prompt_pos, prompt_pos[:, -1:] + 1 + jnp.arange(n, dtype=jnp.int32)[None]], axis=1
    )
    buffer = jnp.concatenate([prompt.astype(jnp.int32), tokens.astype(jnp.int32)], axis=1)
    hidden = forward(params, config, buffer, positions, return_hidden=True)[:, p - 1 : p + n - 1]
    head = lambda h: jnp.argmax(  # noqa: E731
        logits_from_hidden(params, config, h).astype(jnp.float32), axis=-1
    ).astype(jnp.int32)
    return jax.lax.map(head, jnp.swapaxes(hidden, 0, 1), batch_size=8).T  # [N,B] -> [B,N]


@functools.partial(jax.jit, static_argnames=("config", "cache_len"))
def prefill(params, config: TransformerConfig, prompt, prompt_mask, *, cache_len: int):
    """`generate`'s prefill alone: an empty cache of `cache_len` slots, then `forward_with_cache`
    over the prompt. Returns (last-position logits [B, V], the filled cache)."""
    cache = init_cache(config, prompt.shape[0], cache_len)
    logits, cache = forward_with_cache(params, config, prompt, cache, prompt_positions(prompt_mask))
    return logits[:, -1], cache


def timed(fn: Callable[[], Any], reps: int, budget_s: float) -> list[float]:
    """Times up to `reps` calls of `fn` (each blocked on), stopping once they total `budget_s`."""
    times: list[float] = []
    while len(times) < reps and (not times or sum(times) < budget_s):
        times.append(time_call(fn))
    return times


def assert_same_tokens(cache: np.ndarray, recompute: np.ndarray, what: str) -> None:
    """Raises AssertionError naming the first differing (row, step) if the tokens differ."""
    if not np.array_equal(cache, recompute):
        rows, cols = np.nonzero(cache != recompute)
        raise AssertionError(
            f"{what}: greedy tokens differ at {len(rows)} of {cache.size} places, first at row "
            f"{rows[0]} step {cols[0]} (cache {cache[rows[0], cols[0]]}, recompute "
            f"{recompute[rows[0], cols[0]]})"
        )


def benchmark_case(case: Case, config: TransformerConfig, params, cfg: Config) -> CaseResult:
    """Times generate, prefill and the recompute loop on one case (see the module docstring).

    Raises:
      AssertionError: the two decoders' greedy tokens differ, a row stopped early, or generate
        compiled again during the timed calls.
    """
    b, p, n = case.batch_size, cfg.prompt_len, case.new_tokens
    what = f"{case.model} B={b} N={n}"
    rng = np.random.default_rng(cfg.seed)
    prompt = jnp.asarray(rng.integers(0, config.vocab_size, (b, p)), jnp.int32)
    mask = jnp.ones((b, p), jnp.int32)
    key = jax.random.key(cfg.seed)
    jax.block_until_ready((prompt, mask))

    # KV cache: a warm-up call (compile + first run), then timed calls with the same shapes.
    def cache_call():
        return generate(params, config, prompt, mask, rng=key, sampling=SamplingConfig(max_new_tokens=n, temperature=0.0))

    with compilations(generate) as first_programs:
        start = time.perf_counter()
        gen = jax.block_until_ready(cache_call())
        first_s = time.perf_counter() - start
    assert np.all(np.asarray(gen.lengths) == n), f"{what}: a row generated fewer than {n} tokens"
    cache_tokens = np.asarray(gen.tokens)
    with compilations(generate) as programs:
        cache_times = timed(cache_call, cfg.reps, cfg.time_budget_s)
    assert not programs, f"{what}: generate recompiled"
    cache_s = statistics.median(cache_times)

    prefill_call = lambda: prefill(params, config, prompt, mask, cache_len=p + n)  # noqa: E731
    time_call(prefill_call)  # compile + first run
    prefill_times = timed(prefill_call, cfg.reps, cfg.time_budget_s)
    prefill_s = statistics.median(prefill_times)

    # Recompute: compile ahead of time, one step untimed, a k-step probe, then all N or extrapolate.
    loop = jax.jit(functools.partial(recompute_greedy, config=config, new_tokens=n))
    start = time.perf_counter()
    compiled = loop.lower(params, prompt, mask, np.int32(1)).compile()
    compile_s = time.perf_counter() - start
    one_step_s = time_call(lambda: compiled(params, prompt, mask, np.int32(1)))
    k = max(1, min(n, math.ceil(cfg.probe_s / one_step_s)))
    out = None

    def recompute_call(steps: int):
        nonlocal out
        out = compiled(params, prompt, mask, np.int32(steps))
        return out

    probe_s = time_call(lambda: recompute_call(k))
    assert_same_tokens(cache_tokens[:, :k], np.asarray(out)[:, :k], what)
    predicted_s = n * probe_s / k
    check = None
    if k == n:  # the probe already was the whole loop
        mode, times, checked = "measured", [probe_s], n
    elif predicted_s <= cfg.recompute_full_s:
        mode, checked = "measured", n
        print(f"  recompute {what}: {k}-step probe predicts {predicted_s:.1f} s; running all {n} "
              f"steps", file=sys.stderr, flush=True)
        times = timed(lambda: recompute_call(n), cfg.reps, cfg.time_budget_s)
        assert_same_tokens(cache_tokens, np.asarray(out), what)
        check = predicted_s / statistics.median(times)
    else:
        mode, times = ("extrapolated" if cfg.extrapolate else "not measured"), []
        # All N tokens checked without running the N-step loop (see teacher_forced_greedy).
        forced = teacher_forced_greedy(params, config, prompt, mask, jnp.asarray(cache_tokens))
        assert_same_tokens(cache_tokens, np.asarray(forced), f"{what} (teacher-forced)")
        checked = n
    recompute_s = statistics.median(times) if times else predicted_s if mode == "extrapolated" else None

    tokens = b * n
    return CaseResult(
        model=case.model,
        params_m=num_params(config) / 1e6,
        batch_size=b,
        prompt_len=p,
        new_tokens=n,
        generate_compiles=len(first_programs),
        cache_first_call_s=first_s,
        cache_s=cache_s,
        cache_times_s=cache_times,
        cache_tokens_per_s=tokens / cache_s,
        prefill_s=prefill_s,
        prefill_times_s=prefill_times,
        prefill_tokens_per_s=b * p / prefill_s,
        recompute_compile_s=compile_s,
        recompute_probe_steps=k,
        recompute_probe_s=probe_s,
        recompute_mode=mode,
        recompute_s=recompute_s,
        recompute_times_s=times,
        recompute_tokens_per_s=None if recompute_s is None else tokens / recompute_s,
        speedup=None if recompute_s is None else recompute_s / cache_s,
        tokens_checked_per_row=checked,
        extrapolation_check=check,
    )


def compile_count_check(config: TransformerConfig, params, prompt_len: int) -> list[dict[str, Any]]:
    """Calls `generate` repeatedly and records how many new compilations each call added.

    Returns:
      One dict per call: {"call": description, "new_compiles": observed, "expected": expected}.
    """
    rng = np.random.default_rng(1)
    v = config.vocab_size

    def prompt(b: int, p: int) -> tuple[jax.Array, jax.Array]:
        return jnp.asarray(rng.integers(0, v, (b, p)), jnp.int32), jnp.ones((b, p), jnp.int32)

    b, p, n = 2, prompt_len, 8
    calls = [
        ("greedy, B=2, N=8 (first call)", dict(temperature=0.0), b, p, n, 1),
        ("same shapes, other rng and prompt", dict(temperature=0.0), b, p, n, 0),
        ("same shapes, other rng and prompt", dict(temperature=0.0), b, p, n, 0),
        ("temperature=1.0", dict(temperature=1.0), b, p, n, 1),
        ("temperature=1.0 again, other rng and prompt", dict(temperature=1.0), b, p, n, 0),
        ("temperature=0.7", dict(temperature=0.7), b, p, n, 1),
        ("temperature=1.0, top_k=10", dict(temperature=1.0, top_k=10), b, p, n, 1),
        ("temperature=1.0, top_p=0.9", dict(temperature=1.0, top_p=0.9), b, p, n, 1),
        ("greedy, eos_id=1", dict(temperature=0.0, eos_id=1), b, p, n, 1),
        ("greedy, max_new_tokens=16", dict(temperature=0.0), b, p, 16, 1),
        ("greedy, max_new_tokens=16 again", dict(temperature=0.0), b, p, 16, 0),
        ("greedy, B=4", dict(temperature=0.0), 4, p, n, 1),
        (f"greedy, prompt length {p + 1}", dict(temperature=0.0), b, p + 1, n, 1),
        ("greedy, B=2, N=8 again (first shapes)", dict(temperature=0.0), b, p, n, 0),
    ]
    rows = []
    for i, (desc, sampling, bb, pp, nn, expected) in enumerate(calls):
        tokens, mask = prompt(bb, pp)
        with compilations(generate) as programs:
            jax.block_until_ready(generate(params, config, tokens, mask, rng=jax.random.key(100 + i),
                                           sampling=SamplingConfig(max_new_tokens=nn, **sampling)))
        rows.append({"call": desc, "new_compiles": len(programs), "expected": expected})
    return rows


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def format_report(
    env: dict[str, Any], prompt_len: int, results: list[CaseResult],
    compiles: list[dict[str, Any]], skipped: list[str], seconds: float,
) -> str:
    """The printed report: environment, the results table, checks, goal lines, compile counts."""
    lines = environment_lines(env, seconds)
    lines.append(
        f"prompt length P={prompt_len}; greedy, no EOS: every row generates N tokens; decode "
        f"tok/s = B·N ÷ the whole call (prompt in, N tokens out); speed-up = recompute ÷ cache time"
    )
    header = ("model", "params M", "B", "N", "cache ms", "cache tok/s", "recomp. s",
              "recomp. tok/s", "speed-up", "recompute timing", "prefill ms", "prefill tok/s")
    widths = (11, 8, 3, 4, 9, 11, 9, 13, 8, 16, 10, 13)

    def row(cells) -> str:
        return "  ".join(
            f"{c:<{w}}" if i in (0, 9) else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths))
        )

    lines += ["", row(header), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    for r in results:
        lines.append(row((
            r.model, f"{r.params_m:.1f}", r.batch_size, r.new_tokens, f"{r.cache_s * 1e3:.0f}",
            f"{r.cache_tokens_per_s:.1f}", _fmt(r.recompute_s, ".2f"),
            _fmt(r.recompute_tokens_per_s, ".2f"), _fmt(r.speedup, ".1f"), r.recompute_label,
            f"{r.prefill_s * 1e3:.1f}", f"{r.prefill_tokens_per_s:.0f}",
        )))
    lines.append("")
    if any(r.recompute_mode == "extrapolated" for r in results):
        lines.append(
            "extrap. k/N: the recompute loop ran k of its N steps (same compiled program, every step "
            "the same work) and its N-step time is N × (k-step time ÷ k): extrapolated, not measured"
        )
    for r in results:
        if r.extrapolation_check is not None:
            lines.append(
                f"extrapolation check, {r.model} B={r.batch_size} N={r.new_tokens}: the "
                f"{r.recompute_probe_steps}-step call predicted {r.extrapolation_check:.2f}× the "
                f"measured {r.recompute_s:.2f} s"
            )
    for r in results:
        how = (
            f"all {r.new_tokens} per row by the full loop" if r.recompute_times_s
            else f"first {r.recompute_probe_steps} per row by the loop, all {r.new_tokens} by a "
            f"teacher-forced pass"
        )
        lines.append(
            f"greedy tokens identical (asserted), {r.model} B={r.batch_size} N={r.new_tokens}: "
            f"{how}; generate compiled "
            f"{r.generate_compiles}× (first call {r.cache_first_call_s:.1f} s), recompute loop "
            f"compile {r.recompute_compile_s:.1f} s; prefill is {r.prefill_s / r.cache_s * 100:.1f}% "
            f"of the cache call"
        )
    for r in results:
        if r.new_tokens == 512:
            verdict = (
                "not measured" if r.speedup is None
                else f"{r.speedup:.1f}× ({'met' if r.speedup >= 10 else 'NOT met'}"
                + (", recompute extrapolated)" if r.recompute_mode == "extrapolated" else ")")
            )
            lines.append(f"goal ≥ 10× over recompute at N=512, {r.model} B={r.batch_size}: {verdict}")
    for s in skipped:
        lines.append(f"skipped: {s}")
    if compiles:
        lines += ["", "programs generate compiled, per call (jaxalign.metrics.compilations):"]
        for c in compiles:
            flag = "" if c["new_compiles"] == c["expected"] else "   <-- UNEXPECTED"
            lines.append(f"  {c['call']:<45} +{c['new_compiles']} (expected +{c['expected']}){flag}")
    lines.append(f"total wall time: {seconds:.0f} s")
    return "\n".join(lines)


def run(cfg: Config) -> dict[str, Any]:
    """Benchmarks every case (grouped by model, loaded once each); prints and returns results."""
    if cfg.reps < 1 or cfg.prompt_len < 1:
        raise ValueError(f"--reps and --prompt-len must be >= 1, got {cfg.reps}, {cfg.prompt_len}")
    cases = [parse_case(spec) for spec in cfg.cases]  # bad flags fail before compute
    models = list(dict.fromkeys(c.model for c in cases))
    clock = RunClock()
    results, skipped, compiles = [], [], []
    for name in models:
        mine = [c for c in cases if c.model == name]
        loaded = load_model(name, cfg, cfg.prompt_len + max(c.new_tokens for c in mine))
        if loaded is None:
            skipped += [f"{c.model}:{c.batch_size}:{c.new_tokens} (no checkpoint)" for c in mine]
            continue
        config, params = loaded
        for case in mine:
            print(f"timing {name} B={case.batch_size} N={case.new_tokens} P={cfg.prompt_len} ...",
                  file=sys.stderr, flush=True)
            results.append(benchmark_case(case, config, params, cfg))
        if cfg.compile_check and not compiles:
            compiles = compile_count_check(config, params, cfg.prompt_len)
        del params
    seconds, env = clock.stop(), clock.env
    print(format_report(env, cfg.prompt_len, results, compiles, skipped, seconds))
    return {
        "config": config_record(cfg),
        "environment": env,
        "results": [dataclasses.asdict(r) for r in results],
        "compile_counts": compiles,
        "skipped": skipped,
        "wall_time_s": seconds,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point: parses flags into `Config`, runs, prints, optionally writes --json."""
    return run_cli(Config, run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
