"""Run logging: one JSON object per logged step in `metrics.jsonl`, TensorBoard when installed,
and PNG plots drawn with matplotlib from the JSONL file.

Every file written here is strict JSON (RFC 8259): a non-finite float (NaN, ±inf: a diverged
loss, an empty mean) is written as `null`, never as the bare `NaN` Python's `json` emits by
default, so any JSON reader can load the metrics of a run that went wrong.

Also `compilations`, which names the programs jax compiled inside a `with` block: the check
behind "no recompilation" in tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)


# Every lowering to MLIR, by program name ("jit(step)"), in this process, from the first
# `compilations` call on: jax lowers once per new specialisation of a jit function (before XLA
# compiles it or the persistent compilation cache supplies the executable), never on a hit.
_LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_LOWERED: list[str] = []
_LISTENING = [False]


def _record_lowering(event: str, duration: float, *, fun_name: str = "", **kwargs) -> None:
    if event == _LOWERING_EVENT:
        _LOWERED.append(fun_name)


@contextlib.contextmanager
def compilations(jitted=None) -> Iterator[list[str]]:
    """Names the programs jax compiled (lowered) inside the `with` block.

        with compilations(step) as compiled:
            for batch in batches:
                state, metrics = step(state, batch)
        assert len(compiled) == 1  # one specialisation, never a recompile

    Yields a list, filled when the block ends, of each program's `"jit(<function name>)"`, in
    order; with `jitted` (a `jax.jit` function) only the programs carrying its name. A jit
    function lowers once per new specialisation (shapes, dtypes, shardings, static arguments) and
    never on a cache hit, so for a function first called inside the block `len(...)` is the
    number of specialisations its calls made. Eager operations count too (as `jit(add)` and so
    on, once per new shape) unless `jitted` filters them out. A new function object is traced and
    lowered anew even for a program seen before (a persistent compilation cache may then supply
    the executable). Counted from `jax.monitoring`'s lowering event, not from
    `jitted._cache_size()`, the size of the C++ dispatch cache, which late in long pytest workers
    was seen reading 0 for a function that had just run (CI at stops 23-25).
    """
    if not _LISTENING[0]:
        jax.monitoring.register_event_duration_secs_listener(_record_lowering)
        _LISTENING[0] = True
    start = len(_LOWERED)
    compiled: list[str] = []
    try:
        yield compiled
    finally:
        names = _LOWERED[start:]
        if jitted is not None:
            names = [n for n in names if n == f"jit({jitted.__name__})"]
        compiled.extend(names)


def _to_python(value: Any) -> Any:
    if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "__array__"):
        value = np.asarray(value)
        value = value.item() if value.size == 1 else value.tolist()
    return value


def to_strict_json(value: Any) -> Any:
    """`value` (numbers, arrays, nested dicts/lists) as JSON-ready Python, non-finite floats -> None."""
    value = _to_python(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): to_strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_strict_json(v) for v in value]
    return value


def dumps(value: Any, **kwargs) -> str:
    """`json.dumps` of `to_strict_json(value)` with `allow_nan=False` (strict JSON)."""
    return json.dumps(to_strict_json(value), allow_nan=False, **kwargs)


def write_json(path: str | os.PathLike, value: Any) -> Path:
    """Writes `value` as strict, indented JSON (non-finite floats as null) atomically: to a
    temporary file in the same folder, then `os.replace`, so a kill never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dumps(value, indent=2) + "\n")
    os.replace(tmp, path)
    return path


class MetricsWriter:
    """Appends `{"step": s, "stage": ..., **metrics}` records to `<dir>/metrics.jsonl`.

    When `tensorboardX` is importable, scalars also go to `<dir>/tensorboard/` (tag
    "stage/name"). The JSONL file is flushed after every record, so a killed run keeps what it
    logged. Records are strict JSON: non-finite values are written as `null`. Opening a file
    whose last line was torn by a kill drops that line first (with a warning), so new records
    never run into it.
    """

    def __init__(self, directory: str | os.PathLike, *, tensorboard: bool = True):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "metrics.jsonl"
        if self.path.exists() and not self.path.read_bytes().endswith(b"\n") and self.path.stat().st_size:
            # a kill mid-write left a torn last line: drop it (read_metrics warns) before appending
            self.path.write_text("".join(dumps(r) + "\n" for r in read_metrics(self.path)))
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                pass
            else:
                self._tb = SummaryWriter(str(self.directory / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, Any], *, stage: str = "train") -> dict:
        """Writes one record; array values become Python numbers. Returns the record."""
        record = {"step": int(step), "stage": stage, **{k: _to_python(v) for k, v in metrics.items()}}
        self._file.write(dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "stage") and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{stage}/{k}", v, int(step))
        return record

    def truncate_after(self, step: int, *, stage: str) -> None:
        """Drops records of `stage` with step > `step` (a resumed run re-logs those steps)."""
        self._file.close()
        kept = [r for r in read_metrics(self.path) if r["stage"] != stage or r["step"] <= step]
        self.path.write_text("".join(dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")

    def close(self) -> None:
        """Closes the JSONL file (and TensorBoard writer)."""
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def setup_logging(
    level: int = logging.INFO, fmt: str = "%(name)s: %(message)s", quiet: tuple[str, ...] = ("absl",)
) -> None:
    """For scripts: the root logger at `level` with one stderr handler in `fmt`; the loggers in
    `quiet` (default: absl, through which orbax reports every checkpoint step) at WARNING.

    A plain `logging.basicConfig(level=INFO)` is a no-op once any handler exists, and one always
    does after `import orbax.checkpoint`: orbax logs through absl at import, and Python's
    `logging.log` then installs a WARNING-level root handler itself, so the scripts' `log.info`
    progress lines never printed. `force=True` replaces it. The library never calls this.
    """
    logging.basicConfig(level=level, format=fmt, force=True)
    for name in quiet:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a `metrics.jsonl` file (missing file: empty list).

    A torn last line (the run was killed while writing it) is dropped with a warning naming the
    file and line; `MetricsWriter.truncate_after` then rewrites the file without it.

    Raises:
      ValueError: a line other than the last is not JSON (naming file and line): the file was
        edited or corrupted, not torn by a kill.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):
                log.warning("%s: line %d is torn (%s); dropped it", path, number, e.msg)
                continue
            raise ValueError(f"{path}: line {number} is not JSON ({e.msg}); the file is corrupted") from e
    return records


def plot_metrics(
    path: str | os.PathLike,
    out_png: str | os.PathLike,
    panels: Sequence[tuple[str, str]],
    *,
    title: str | None = None,
) -> Path | None:
    """Draws one panel per `(stage, metric)` against step from a `metrics.jsonl` into a PNG.

    Panels with no data are skipped; returns the PNG path, or None when nothing was plotted.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(path)
    series = []
    for stage, key in panels:
        pts = [
            (r["step"], r[key])
            for r in records
            if r["stage"] == stage and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
        ]
        if pts:
            series.append((stage, key, pts))
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3.2), squeeze=False)
    for ax, (stage, key, pts) in zip(axes[0], series):
        steps, values = zip(*pts)
        ax.plot(steps, values, marker="." if len(pts) < 30 else None)
        ax.set_title(f"{stage}: {key}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
