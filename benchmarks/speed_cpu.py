"""CPU speed side by side (issue 17 item 7): jaxalign against PyTorch eager, in one process.

Every figure is measured in this run and every ratio is against a baseline measured in this run:

* **fp32 matmul peak** (`train_step.measure_matmul_peak`, at the start and the end; MFU divides by
  the higher) and **copy bandwidth** (`measure_copy_bandwidth`: a jit-compiled, donated `x + 1`,
  counted as one read and one write, STREAM's "copy" convention; best of `--copy-reps` calls, at
  the start and the end, the higher used) at two sizes: an array of the decoded model's weight
  bytes (the working set a decode step streams; on a CPU whose last-level cache holds it, cache
  bandwidth) and one of `--copy-mib` MiB (main memory).
* **16M GPT SFT step** (4 layers, D=256, 8 heads, V=50,257, B=8, T=256; AdamW + global-norm
  clipping both sides): jaxalign `make_sft_step` with the fused chunked output head (default
  `head_chunk`) and unfused (`head_chunk=None`), and PyTorch eager (`transformers`'
  `GPT2LMHeadModel` of the same shape on random weights, `torch.optim.AdamW` +
  `clip_grad_norm_`). tokens/s = B·T / median step; MFU = rows·(T−1)·`train_flops_per_token`
  / step / peak (the convention of `train_step.py`), the same count for both frameworks.
* **gpt2 124M SFT** MFU (jaxalign only, `--gpt2-steps` timed steps).
* **SFT vs DPO per-token cost** on the 16M GPT: SFT seconds per token ÷ DPO seconds per token,
  DPO on B/2 pairs of T tokens (the same number of tokens; reference log-probs precomputed).
* **batch-1 greedy decode** of the 16M GPT (`generate`, P=16 prompt tokens, N new tokens):
  tokens/s = N / call, against the weight-streaming roofline (copy bandwidth at the weights'
  size ÷ bytes of matmul weights read per token, the tied V·D head counted once; the roofline
  at the `--copy-mib` bandwidth is printed beside it) and against a PyTorch KV-cache loop
  (`GPT2LMHeadModel` with `past_key_values`, greedy, `torch.inference_mode`).
* **batch-32 decode** of `--b32-preset` (default the 16M GPT; `gpt2` is the issue's 124M, about
  6 minutes more) at N=128 and N=256: the ratio of tokens/s is
  compared with the slowdown that the growing attention alone explains (see `attention_allowance`).
* **recompilations after warm-up**: every program jax compiles (`jaxalign.metrics.compilations`:
  lowerings, seen also when a persistent compilation cache supplies the executable) during the
  timed calls is counted; the script asserts the count is zero (and that each train step compiled
  exactly one program, `compiled_programs`) after printing.

One line per figure with its target from issue 17 and PASS/BELOW. `--quick` runs the same code on
tiny shapes in seconds (the targets then mean nothing; the test suite uses it).

    python -m benchmarks.speed_cpu            # about 2.5-3 minutes on 2 CPU cores (lightly loaded)
    python -m benchmarks.speed_cpu --quick    # smoke run, seconds
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.decoding import SamplingConfig, generate
from jaxalign.metrics import compilations
from jaxalign.models import TransformerConfig, get_config, init_params, num_params, train_flops_per_token
from jaxalign.optim import OptimConfig, make_optimizer
from jaxalign.trainers import count_tokens, create_train_state, make_dpo_step, make_sft_step

try:  # run as a script (`python benchmarks/speed_cpu.py`): benchmarks/ itself is on sys.path
    from _common import RunClock, config_record, environment_lines, run_cli, time_call
    from train_step import Case, measure_matmul_peak, model_flops_per_step, random_batch
except ImportError:  # imported as `benchmarks.speed_cpu`
    from benchmarks._common import RunClock, config_record, environment_lines, run_cli, time_call
    from benchmarks.train_step import Case, measure_matmul_peak, model_flops_per_step, random_batch


@dataclasses.dataclass
class Config:
    """jaxalign vs PyTorch eager on the CPU: train-step MFU, decode rooflines, recompilations."""

    quick: bool = False
    """Tiny shapes, 2 timed steps, short decodes: a smoke run of the same code (seconds)."""
    steps: int = 5
    """Timed calls per 16M-GPT train step (median reported)."""
    gpt2_steps: int = 2
    """Timed calls of the gpt2 124M SFT step."""
    warmup: int = 1
    """Untimed calls after compilation."""
    decode_new_tokens: int = 128
    """N of the batch-1 decode."""
    prompt_len: int = 16
    """P of every decode."""
    b32_preset: str = "gpt16m"
    """Model of the batch-32 decode: "gpt16m" (the 16M GPT) or a jaxalign preset (random weights;
    "gpt2" is issue 17's figure, but its two decodes take about 6 minutes on 2 cores)."""
    b32_new_tokens: tuple[int, int] = (128, 256)
    """The two N of the batch-32 decode."""
    torch: bool = True
    """Time the PyTorch eager half (skipped with a message when torch is not importable)."""
    peak_sizes: tuple[int, ...] = (1024, 2048)
    peak_reps: int = 10
    copy_mib: int = 1024
    """Size of the main-memory copy (larger than the last-level cache)."""
    copy_reps: int = 10
    seed: int = 0
    json: Path | None = None
    """Write every figure (raw times included) here as JSON."""


@dataclasses.dataclass
class Timed:
    """Median seconds of repeated calls, the raw times, the warm-up (compile included) and the
    programs compiled during the timed calls (0 when nothing recompiled)."""

    median_s: float
    times_s: list[float]
    first_s: float
    recompiles: int


def timed_calls(fn: Callable[[], Any], steps: int, warmup: int) -> Timed:
    """Calls `fn` once (compile) plus `warmup` times untimed, then `steps` times timed."""
    first_s = time_call(fn)
    for _ in range(warmup):
        time_call(fn)
    with compilations() as compiled:
        times = [time_call(fn) for _ in range(steps)]
    return Timed(statistics.median(times), times, first_s, len(compiled))


def measure_copy_bandwidth(nbytes: int, reps: int) -> float:
    """Bytes/s of a jit-compiled `x + 1` over `nbytes` of float32, the input donated (so the output
    reuses its buffer and no call pays fresh-page faults): 2·bytes (one read, one write, STREAM's
    "copy" count) over the best of `reps` calls."""
    n = max(1, nbytes // 4)
    add = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    x = jax.block_until_ready(add(jnp.zeros((n,), jnp.float32)))  # compile + first touch
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        x = jax.block_until_ready(add(x))
        best = min(best, time.perf_counter() - start)
    return 2.0 * n * 4 / best


def gpt_config(quick: bool) -> TransformerConfig:
    """The 16M GPT of issue 17 (GPT-2 family, 4 layers, D=256, 8 heads, V=50,257) or, --quick,
    a 1-layer D=64 V=512 one (quick to compile)."""
    if quick:
        return get_config("gpt2", d_model=64, n_layers=1, n_heads=4, vocab_size=512, max_seq_len=512)
    return get_config("gpt2", d_model=256, n_layers=4, n_heads=8, vocab_size=50257, max_seq_len=512)


def matmul_weight_bytes(config: TransformerConfig) -> int:
    """Bytes of the weights one decode step reads: every layer parameter, the final norm and the
    V·D head (tied to the embedding: counted once), in `param_dtype`."""
    n = num_params(config, embeddings=False) + config.vocab_size * config.d_model
    return n * jnp.dtype(config.param_dtype).itemsize


# ---------------------------------------------------------------------------------------------
# jaxalign


def time_jax_step(kind: str, config: TransformerConfig, params, case: Case, steps: int, warmup: int,
                  head_chunk: Any = "default", seed: int = 0) -> dict[str, Any]:
    """Times `make_sft_step` / `make_dpo_step` (clip + AdamW) on a random batch of `case`.

    `head_chunk` "default" leaves the trainer's default (the fused chunked head); None is the
    unfused path. The step is compiled ahead of time (`compile_s`, and `compiled_bytes`: XLA's
    argument + temp bytes); the calls reuse that executable. Returns tokens, model FLOPs,
    timings, programs compiled after warm-up (`recompiles`) and `compiled_programs` (of the
    step, over the ahead-of-time compile and every call: 1 unless a call recompiled).
    """
    tx, schedule = make_optimizer(OptimConfig())
    kw = {} if head_chunk == "default" else {"head_chunk": head_chunk}
    step = (make_sft_step if kind == "sft" else make_dpo_step)(config, tx, schedule, **kw)
    state = create_train_state(jax.tree.map(jnp.copy, params), tx, seed)
    batch = random_batch(kind, case, config, params, np.random.default_rng(seed))
    jax.block_until_ready((state, batch))
    holder = {"state": state}

    def call():
        holder["state"], metrics = step(holder["state"], batch)
        return holder["state"], metrics

    with compilations(step) as programs:
        start = time.perf_counter()
        compiled = step.lower(state, batch).compile()  # the jitted calls below reuse this executable
        compile_s = time.perf_counter() - start
        t = timed_calls(call, steps, warmup)
    analysis = compiled.memory_analysis()
    tokens = count_tokens(batch)
    return {
        "tokens_per_step": tokens,
        "model_flops_per_step": model_flops_per_step(config, batch),
        "step_s": t.median_s,
        "step_times_s": t.times_s,
        "first_call_s": t.first_s,
        "compile_s": compile_s,
        "compiled_bytes": None if analysis is None else int(analysis.argument_size_in_bytes + analysis.temp_size_in_bytes),
        "recompiles": t.recompiles,
        "compiled_programs": len(programs),
        "tokens_per_s": tokens / t.median_s,
    }


def time_jax_decode(config: TransformerConfig, params, batch: int, prompt_len: int, new_tokens: int,
                    reps: int, seed: int = 0) -> dict[str, Any]:
    """Greedy `generate` (no EOS: every row makes N tokens): tokens/s = B·N / call."""
    rng = np.random.default_rng(seed)
    prompt = jnp.asarray(rng.integers(0, config.vocab_size, (batch, prompt_len)), jnp.int32)
    mask = jnp.ones((batch, prompt_len), jnp.int32)
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
    key = jax.random.key(seed)
    with compilations(generate) as programs:
        t = timed_calls(lambda: generate(params, config, prompt, mask, sampling=sampling, rng=key), reps, 0)
    return {
        "batch": batch,
        "new_tokens": new_tokens,
        "call_s": t.median_s,
        "call_times_s": t.times_s,
        "first_call_s": t.first_s,
        "recompiles": t.recompiles,
        "new_specialisations": len(programs),
        "tokens_per_s": batch * new_tokens / t.median_s,
    }


# ---------------------------------------------------------------------------------------------
# PyTorch eager


def torch_model(config: TransformerConfig, seed: int):
    """`transformers.GPT2LMHeadModel` of `config`'s shape on random weights, no dropout."""
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()  # deprecation notices of past_key_values
    torch.manual_seed(seed)
    hf = GPT2Config(
        bos_token_id=0, eos_token_id=0,
        vocab_size=config.vocab_size, n_positions=config.max_seq_len, n_embd=config.d_model,
        n_layer=config.n_layers, n_head=config.n_heads, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, layer_norm_epsilon=config.norm_eps,
    )
    return GPT2LMHeadModel(hf)


def time_torch_sft(config: TransformerConfig, case: Case, steps: int, warmup: int, seed: int) -> dict[str, Any]:
    """PyTorch eager SFT step: forward on tokens[:, :-1], mean cross-entropy on tokens[:, 1:],
    backward, `clip_grad_norm_(1.0)`, AdamW (lr 1e-4, weight decay 0.01), `zero_grad`."""
    import torch
    import torch.nn.functional as F

    model = torch_model(config, seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (case.batch_size, case.seq_len), generator=gen)
    losses = []

    def call():
        logits = model(input_ids=tokens[:, :-1]).logits  # [B,T-1,V]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    t = timed_calls(call, steps, warmup)
    tokens_per_step = case.batch_size * case.seq_len
    rows_flops = case.batch_size * (case.seq_len - 1) * train_flops_per_token(config, case.seq_len - 1)
    return {
        "tokens_per_step": tokens_per_step,
        "model_flops_per_step": rows_flops,
        "step_s": t.median_s,
        "step_times_s": t.times_s,
        "tokens_per_s": tokens_per_step / t.median_s,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "torch_threads": torch.get_num_threads(),
    }


def time_torch_decode(config: TransformerConfig, prompt_len: int, new_tokens: int, reps: int, seed: int) -> dict[str, Any]:
    """PyTorch KV-cache greedy loop at batch 1: a prefill call, then N−1 calls of one token
    each with `past_key_values` (N tokens out, as `generate`), under `torch.inference_mode`."""
    import torch

    model = torch_model(config, seed).eval()
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len), generator=gen)

    def call():
        with torch.inference_mode():
            out = model(input_ids=prompt, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)  # [1,1]
            produced = [token]
            for _ in range(new_tokens - 1):
                out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                produced.append(token)
        return torch.cat(produced, 1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # `past_key_values` -> `cache` (transformers 5)
        t = timed_calls(call, reps, 0)
    return {"new_tokens": new_tokens, "call_s": t.median_s, "call_times_s": t.times_s,
            "tokens_per_s": new_tokens / t.median_s}


# ---------------------------------------------------------------------------------------------
# Targets


def attention_allowance(config: TransformerConfig, batch: int, prompt_len: int, n_short: int, n_long: int) -> dict[str, float]:
    """The lowest tokens/s(N=n_long) ÷ tokens/s(N=n_short) that the growing attention explains.

    A decode step at context c costs the weights (2·N_w FLOPs per row, W bytes per step) plus the
    attention over the c tokens that exist (4·L·c·K·H FLOPs per row, 2·L·B·c·K·H·itemsize bytes
    of KV cache); over a decode of N tokens the mean context is P + N/2. The allowance is the
    smaller (more lenient) of the FLOP model's and the byte model's ratio of per-token costs.
    An implementation whose every step attends over all P + N pre-allocated slots pays
    context P + N throughout and falls further.
    """
    n_w = num_params(config, embeddings=False) + config.vocab_size * config.d_model
    l, kh = config.n_layers, config.kv_heads * config.head_dim
    item = jnp.dtype(config.dtype).itemsize
    w_bytes = matmul_weight_bytes(config)

    def flops(c: float) -> float:
        return batch * (2 * n_w + 4 * l * c * kh)

    def bytes_(c: float) -> float:
        return w_bytes + 2 * l * batch * c * kh * item

    c_short, c_long = prompt_len + n_short / 2, prompt_len + n_long / 2
    by_flops = flops(c_short) / flops(c_long)
    by_bytes = bytes_(c_short) / bytes_(c_long)
    return {"by_flops": by_flops, "by_bytes": by_bytes, "allowed_ratio": min(by_flops, by_bytes)}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "BELOW"


def figure_lines(r: dict[str, Any]) -> list[str]:
    """One line per figure: value, target from issue 17, PASS/BELOW."""
    lines = []
    f = r["figures"]
    for name, label in (("sft_fused", "fused head"), ("sft_unfused", "unfused head")):
        s = f["gpt16m"][name]
        lines.append(
            f"16M GPT SFT, jaxalign {label}: {s['tokens_per_s']:.0f} tokens/s, {s['mfu'] * 100:.1f}% MFU"
            f"   target >= 55% MFU: {verdict(s['mfu'] >= 0.55)}"
        )
    t = f["gpt16m"].get("torch")
    if t is None:
        lines.append(f"16M GPT SFT, PyTorch eager: skipped ({f['gpt16m']['torch_skipped']})")
    else:
        lines.append(
            f"16M GPT SFT, PyTorch eager: {t['tokens_per_s']:.0f} tokens/s, {t['mfu'] * 100:.1f}% MFU "
            f"({t['torch_threads']} threads)"
        )
        for name, label in (("sft_fused", "fused"), ("sft_unfused", "unfused")):
            ratio = f["gpt16m"][f"ratio_{name}_vs_torch"]
            lines.append(f"16M GPT SFT, jaxalign {label} / PyTorch tokens/s: {ratio:.2f}x   target >= 2.5x: {verdict(ratio >= 2.5)}")
    g = f["gpt2_124m_sft"]
    lines.append(
        f"gpt2 124M SFT (B={g['batch']}, T={g['seq_len']}), jaxalign fused: {g['tokens_per_s']:.0f} tokens/s, "
        f"{g['mfu'] * 100:.1f}% MFU   target >= 65% MFU: {verdict(g['mfu'] >= 0.65)}"
    )
    d = f["sft_vs_dpo"]
    lines.append(
        f"16M GPT SFT / DPO seconds per token: {d['ratio']:.2f} (SFT {d['sft_us_per_token']:.1f} us, DPO "
        f"{d['dpo_us_per_token']:.1f} us)   target <= 1.00: {verdict(d['ratio'] <= 1.0)}"
    )
    b1 = f["decode_b1"]
    lines.append(
        f"16M GPT batch-1 greedy decode (N={b1['new_tokens']}): {b1['tokens_per_s']:.0f} tokens/s = "
        f"{b1['roofline_fraction'] * 100:.0f}% of the weight-streaming roofline {b1['roofline_tokens_per_s']:.0f} tokens/s "
        f"({b1['weight_bytes'] / 1e6:.1f} MB/token; at the large-copy bandwidth {b1['roofline_large_copy_tokens_per_s']:.0f})"
        f"   target >= 80%: {verdict(b1['roofline_fraction'] >= 0.8)}"
    )
    if "torch_tokens_per_s" in b1:
        lines.append(
            f"16M GPT batch-1 decode, PyTorch KV-cache loop: {b1['torch_tokens_per_s']:.0f} tokens/s; jaxalign / "
            f"PyTorch {b1['ratio_vs_torch']:.2f}x   target >= 4x: {verdict(b1['ratio_vs_torch'] >= 4.0)}"
        )
    b32 = f["decode_b32"]
    (ns, nl) = b32["new_tokens"]
    lines.append(
        f"{b32['preset']} batch-{b32['batch']} decode: {b32['tokens_per_s'][0]:.0f} tokens/s at N={ns}, "
        f"{b32['tokens_per_s'][1]:.0f} at N={nl}: ratio {b32['ratio']:.2f}   target >= {b32['allowed_ratio']:.2f} "
        f"(the growing attention alone): {verdict(b32['ratio'] >= b32['allowed_ratio'])}"
    )
    rc = f["recompiles_after_warmup"]
    lines.append(f"recompilations after warm-up: {rc}   target 0 (asserted): {verdict(rc == 0)}")
    return lines


# ---------------------------------------------------------------------------------------------


def run(cfg: Config) -> dict[str, Any]:
    """Measures everything in one process; prints the figure lines; returns the report."""
    quick = cfg.quick
    steps, gpt2_steps = (2, 1) if quick else (cfg.steps, cfg.gpt2_steps)
    peak_sizes, peak_reps = ((128, 256), 3) if quick else (cfg.peak_sizes, cfg.peak_reps)
    copy_mib, copy_reps = (16, 3) if quick else (cfg.copy_mib, cfg.copy_reps)
    weight_bytes = matmul_weight_bytes(gpt_config(quick))
    n_b1 = 8 if quick else cfg.decode_new_tokens
    n_b32 = (8, 16) if quick else cfg.b32_new_tokens
    b32_batch = 4 if quick else 32
    reps = 2 if quick else 3
    config = gpt_config(quick)
    case = Case("gpt16m", config.vocab_size, *((2, 32) if quick else (8, 256)))
    clock = RunClock()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    log("peaks ...")
    peaks = [measure_matmul_peak(peak_sizes, jnp.float32, peak_reps)]
    copies = {"weights": [measure_copy_bandwidth(weight_bytes, copy_reps)],
              "large": [measure_copy_bandwidth(copy_mib * 2**20, copy_reps)]}

    params = init_params(config, jax.random.key(cfg.seed))
    g16: dict[str, Any] = {"config": f"gpt2 family L={config.n_layers} D={config.d_model} H={config.n_heads} "
                                     f"V={config.vocab_size}", "params": num_params(config),
                           "batch": case.batch_size, "seq_len": case.seq_len}
    for name, chunk in (("sft_fused", "default"), ("sft_unfused", None)):
        log(f"jaxalign 16M {name} ...")
        g16[name] = time_jax_step("sft", config, params, case, steps, cfg.warmup, head_chunk=chunk, seed=cfg.seed)
    log("jaxalign 16M dpo ...")
    dpo_case = dataclasses.replace(case, batch_size=max(1, case.batch_size // 2))
    g16["dpo"] = time_jax_step("dpo", config, params, dpo_case, steps, cfg.warmup, seed=cfg.seed)

    torch_ok, torch_msg = cfg.torch, "--no-torch"
    if torch_ok:
        try:
            import torch

            torch.set_num_threads(os.cpu_count() or 1)
        except ImportError as e:
            torch_ok, torch_msg = False, f"torch not importable: {e}"
    if torch_ok:
        log("torch 16M sft ...")
        g16["torch"] = time_torch_sft(config, case, steps, cfg.warmup, cfg.seed)
    else:
        g16["torch_skipped"] = torch_msg
        log(f"skipping the PyTorch half: {torch_msg}")

    log("jaxalign 16M decode B=1 ...")
    b1 = time_jax_decode(config, params, 1, cfg.prompt_len, n_b1, reps, cfg.seed)
    if torch_ok:
        log("torch 16M decode B=1 ...")
        b1["torch"] = time_torch_decode(config, cfg.prompt_len, n_b1, reps, cfg.seed)
    del params

    log("jaxalign gpt2 124M sft ...")
    # --quick: the 16M slot's tiny model stands in for gpt2 (a persistent compilation cache, as
    # the test suite's, then serves its compile).
    g2_config = config if quick else get_config("gpt2")
    g2_case = dataclasses.replace(case, preset="gpt2") if quick else Case("gpt2", 50257, 4, 128)
    g2_params = init_params(g2_config, jax.random.key(cfg.seed))
    g2 = time_jax_step("sft", g2_config, g2_params, g2_case, gpt2_steps, cfg.warmup, seed=cfg.seed)
    g2.update(batch=g2_case.batch_size, seq_len=g2_case.seq_len, preset="quick" if quick else "gpt2")

    b32_preset = "quick" if quick else cfg.b32_preset
    b32_config = config if quick or b32_preset == "gpt16m" else get_config(b32_preset)
    b32_config = b32_config.replace(max_seq_len=max(b32_config.max_seq_len, cfg.prompt_len + max(n_b32)))
    if b32_config != g2_config:
        del g2_params
        g2_params = init_params(b32_config, jax.random.key(cfg.seed))
    b32 = []
    for n in n_b32:
        log(f"jaxalign {b32_preset} decode B={b32_batch} N={n} ...")
        b32.append(time_jax_decode(b32_config, g2_params, b32_batch, cfg.prompt_len, n, 2, cfg.seed))
    del g2_params

    log("peaks again ...")
    peaks.append(measure_matmul_peak(peak_sizes, jnp.float32, peak_reps))
    copies["weights"].append(measure_copy_bandwidth(weight_bytes, copy_reps))
    copies["large"].append(measure_copy_bandwidth(copy_mib * 2**20, copy_reps))
    peak = max(p["flops_per_s"] for p in peaks)
    bandwidth, bandwidth_large = max(copies["weights"]), max(copies["large"])

    for name in ("sft_fused", "sft_unfused", "dpo", "torch"):
        if name in g16:
            g16[name]["mfu"] = g16[name]["model_flops_per_step"] / g16[name]["step_s"] / peak
    g2["mfu"] = g2["model_flops_per_step"] / g2["step_s"] / peak
    if "torch" in g16:
        for name in ("sft_fused", "sft_unfused"):
            g16[f"ratio_{name}_vs_torch"] = g16[name]["tokens_per_s"] / g16["torch"]["tokens_per_s"]
    sft_tok = g16["sft_fused"]["step_s"] / g16["sft_fused"]["tokens_per_step"]
    dpo_tok = g16["dpo"]["step_s"] / g16["dpo"]["tokens_per_step"]
    roofline = bandwidth / weight_bytes
    decode_b1 = {**{k: v for k, v in b1.items() if k != "torch"}, "weight_bytes": weight_bytes,
                 "roofline_tokens_per_s": roofline, "roofline_fraction": b1["tokens_per_s"] / roofline,
                 "roofline_large_copy_tokens_per_s": bandwidth_large / weight_bytes}
    if "torch" in b1:
        decode_b1["torch_tokens_per_s"] = b1["torch"]["tokens_per_s"]
        decode_b1["torch_call_times_s"] = b1["torch"]["call_times_s"]
        decode_b1["ratio_vs_torch"] = b1["tokens_per_s"] / b1["torch"]["tokens_per_s"]
    allowance = attention_allowance(b32_config, b32_batch, cfg.prompt_len, *n_b32)
    decode_b32 = {
        "preset": b32_preset, "batch": b32_batch, "new_tokens": list(n_b32),
        "tokens_per_s": [d["tokens_per_s"] for d in b32], "call_s": [d["call_s"] for d in b32],
        "ratio": b32[1]["tokens_per_s"] / b32[0]["tokens_per_s"], **allowance,
    }
    timed = [g16["sft_fused"], g16["sft_unfused"], g16["dpo"], g2, b1, *b32]
    recompiles = sum(t["recompiles"] for t in timed)
    seconds, env = clock.stop(), clock.env
    report = {
        "config": config_record(cfg),
        "environment": env,
        "peaks": peaks,
        "copy_bandwidth_bytes_per_s": copies,  # {"weights": [start, end], "large": [start, end]}
        "copy_large_mib": copy_mib,
        "mfu_peak_flops_per_s": peak,
        "roofline_bandwidth_bytes_per_s": bandwidth,
        "large_copy_bandwidth_bytes_per_s": bandwidth_large,
        "figures": {
            "gpt16m": g16,
            "gpt2_124m_sft": g2,
            "sft_vs_dpo": {"ratio": sft_tok / dpo_tok, "sft_us_per_token": sft_tok * 1e6,
                           "dpo_us_per_token": dpo_tok * 1e6},
            "decode_b1": decode_b1,
            "decode_b32": decode_b32,
            "recompiles_after_warmup": recompiles,
        },
        "wall_time_s": seconds,
    }
    lines = environment_lines(env, seconds)
    lines.append(
        "fp32 matmul peak: " + ", ".join(f"{p['flops_per_s'] / 1e9:.1f}" for p in peaks)
        + f" GFLOP/s (start, end; MFU uses {peak / 1e9:.1f})"
    )
    lines.append(
        f"copy bandwidth (read + write), {weight_bytes / 2**20:.0f} MiB (the decode weights): "
        + ", ".join(f"{c / 1e9:.1f}" for c in copies["weights"]) + f" GB/s; {copy_mib} MiB: "
        + ", ".join(f"{c / 1e9:.1f}" for c in copies["large"]) + " GB/s (start, end; the higher used)"
    )
    if quick:
        lines.append("--quick: tiny shapes; the targets below are stated for the full run only")
    lines += figure_lines(report)
    lines.append(f"total wall time: {seconds:.0f} s")
    print("\n".join(lines))
    # Asserted after the report is printed, so a failing run still shows its figures.
    assert recompiles == 0, f"{recompiles} compilations after warm-up"
    for name in ("sft_fused", "sft_unfused", "dpo"):
        assert g16[name]["compiled_programs"] == 1, f"16M {name} step compiled {g16[name]['compiled_programs']} programs"
    assert g2["compiled_programs"] == 1, f"gpt2 SFT step compiled {g2['compiled_programs']} programs"
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point: parses flags into `Config`, runs, prints, optionally writes --json."""
    return run_cli(Config, run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
