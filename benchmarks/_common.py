"""What every benchmark shares: timing a call, the machine it runs on, and how busy it was.

Figures from a shared CPU are only as good as the machine was idle: every report states the load
average and the CPU-seconds other processes and the hypervisor took while it ran.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import tyro


def time_call(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of `fn()`, blocking until every array it returns is computed."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


class CpuTimes(NamedTuple):
    """Cumulative CPU-seconds: all processes' busy time, hypervisor steal, this process's own."""

    busy: float
    steal: float
    own: float


def cpu_times() -> CpuTimes | None:
    """Cumulative CPU times from Linux's /proc/stat (busy = user + nice + system + irq + softirq),
    or None where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    busy = (user + nice + system + irq + softirq) / tick
    return CpuTimes(busy, steal / tick, time.process_time())


def contention(start: CpuTimes | None, end: CpuTimes | None) -> dict[str, float | None]:
    """CPU-seconds other processes and the hypervisor took between two `cpu_times()` readings."""
    if start is None or end is None:
        return {"other_processes_cpu_s": None, "steal_cpu_s": None}
    return {
        "other_processes_cpu_s": (end.busy - start.busy) - (end.own - start.own),
        "steal_cpu_s": end.steal - start.steal,
    }


def environment() -> dict[str, Any]:
    """The machine and software the figures come from."""
    return {
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "load_average_1m": os.getloadavg()[0],
    }


class RunClock:
    """One benchmark run's span: `env` (the `environment()` at the start), the wall clock and the
    CPU times, read again by `stop`."""

    def __init__(self):
        self.start, self.cpu_start = time.perf_counter(), cpu_times()
        self.env = environment()

    def stop(self) -> float:
        """Adds the end load average and the run's contention to `env`; returns the run's seconds."""
        self.env["load_average_1m_end"] = os.getloadavg()[0]
        seconds = time.perf_counter() - self.start
        self.env.update(contention(self.cpu_start, cpu_times()))
        return seconds


def config_record(cfg: Any) -> dict[str, Any]:
    """A benchmark's flags (a dataclass) as JSON-ready values, for its --json report."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()}


def environment_lines(env: dict[str, Any], seconds: float) -> list[str]:
    """The environment and contention lines every benchmark report starts with; `seconds` is the
    run's wall-clock span, against which the contention share is computed."""
    lines = [
        f"jax {env['jax']}  devices {env['devices']}  os.cpu_count() {env['cpu_count']}  "
        f"({env['processor']}, python {env['python']})",
        f"1-min load average: {env['load_average_1m']:.2f} at start, "
        f"{env['load_average_1m_end']:.2f} at end",
    ]
    if env["other_processes_cpu_s"] is not None:
        span = seconds * env["cpu_count"]
        taken = env["other_processes_cpu_s"] + env["steal_cpu_s"]
        lines.append(
            f"during the run other processes used {env['other_processes_cpu_s']:.0f} CPU-s and "
            f"the hypervisor stole {env['steal_cpu_s']:.0f} CPU-s of the {span:.0f} CPU-s it "
            f"spanned ({taken / span * 100:.0f}%; above a few % the figures are lower bounds)"
        )
    return lines


def run_cli(config_cls: type, run: Callable[[Any], dict[str, Any]], argv: list[str] | None) -> dict[str, Any]:
    """Parses `argv` into `config_cls` with tyro, calls `run(cfg)` (which prints its report) and
    writes the returned report to `cfg.json` when that flag is set."""
    cfg = tyro.cli(config_cls, args=argv)
    report = run(cfg)
    if cfg.json is not None:
        cfg.json.parent.mkdir(parents=True, exist_ok=True)
        cfg.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {cfg.json}")
    return report
