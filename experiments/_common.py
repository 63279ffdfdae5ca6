"""Plumbing shared by the experiment scripts: the run-folder guard and resume bookkeeping.

One run, one folder. `RunDir.open(cfg)` is called before any data is read or compute is spent:

* without `--resume`, a folder that already holds anything is refused (`FileExistsError`
  naming what it holds): an earlier run is never overwritten, appended to or renamed;
* with `--resume`, the folder's `config.json` (the resolved config written when the run began)
  must equal this invocation's config in every field that changes the run (seed, data, model,
  steps, schedule, loss settings...): otherwise `ValueError` names each differing flag. Flags in
  `OPERATIONAL` (where to write, progress bars, checkpoint cadence, logging cadence) may differ;
  `--resume` into a folder with nothing in it starts the run afresh.

`RunDir.begin()` writes `config.json` once validation has passed (a run refused for bad data
leaves no folder behind); `write_summary` writes strict JSON atomically. A finished run resumed
again returns its `summary.json` unchanged (`finished_summary`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from jaxalign.metrics import MetricsWriter, read_metrics, to_strict_json, write_json

log = logging.getLogger("experiments")

OPERATIONAL = frozenset(
    {"output_dir", "resume", "progress", "checkpoint_every", "keep_checkpoints", "log_every", "eval_every"}
)
"""Config fields that change where and how often a run reports, not what it computes."""


def config_record(cfg: Any) -> dict[str, Any]:
    """A dataclass config as the JSON object saved in `config.json` (Paths and tuples as JSON)."""

    def plain(value):
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return to_strict_json(plain(dataclasses.asdict(cfg)))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclasses.dataclass
class RunDir:
    """The output folder of one run.

    Attributes:
      path: the folder.
      resumed: True when continuing a run begun earlier (its `config.json` exists).
      config: this run's config record.
    """

    path: Path
    resumed: bool
    config: dict[str, Any]

    @classmethod
    def open(cls, cfg: Any, *, operational: frozenset[str] = OPERATIONAL) -> RunDir:
        """Checks `cfg.output_dir` against `cfg.resume`; creates nothing.

        Raises:
          FileExistsError: no --resume and the folder holds files; or --resume into a folder that
            holds files but no config.json (not a run of these scripts).
          ValueError: --resume with a config that changes the run, naming each differing flag
            with its saved and new value.
        """
        path = Path(cfg.output_dir)
        record = config_record(cfg)
        held = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        saved_file = path / "config.json"
        if not cfg.resume:
            if held:
                raise FileExistsError(
                    f"--output-dir {path} already holds a run ({', '.join(held[:6])}"
                    f"{', ...' if len(held) > 6 else ''}): pass --resume to continue it, or choose "
                    "another --output-dir (nothing in it was changed)"
                )
            return cls(path, False, record)
        if not saved_file.exists():
            if held:
                raise FileExistsError(
                    f"--resume: {path} holds {', '.join(held[:6])} but no config.json, so it is not a "
                    "run that can be continued (nothing in it was changed)"
                )
            log.info("--resume: %s holds no run yet; starting one", path)
            return cls(path, False, record)
        try:
            saved = json.loads(saved_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{saved_file}: line {e.lineno}: not JSON ({e.msg})") from e
        differing = [
            f"{_flag(k)}: {saved.get(k, '<absent>')!r} in {saved_file.name}, {record.get(k, '<absent>')!r} now"
            for k in sorted(set(saved) | set(record))
            if k not in operational and saved.get(k, "<absent>") != record.get(k, "<absent>")
        ]
        if differing:
            raise ValueError(
                f"--resume of {path} with a config that changes the run: " + "; ".join(differing)
                + ". Resume with the original flags, or start a new run in another --output-dir."
            )
        return cls(path, True, record)

    def begin(self) -> MetricsWriter:
        """Creates the folder, writes `config.json` for a new run, and opens `metrics.jsonl`."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.resumed:
            write_json(self.path / "config.json", self.config)
        return MetricsWriter(self.path)

    def finished_summary(self) -> dict[str, Any] | None:
        """The saved `summary.json` when resuming a run that already finished, else None."""
        summary = self.path / "summary.json"
        if self.resumed and summary.exists():
            log.info("--resume: %s already finished; its summary is unchanged", self.path)
            return json.loads(summary.read_text())
        return None

    def write_summary(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Writes `summary.json` (strict JSON: non-finite figures as null) and returns what was
        written, read back, so a run and a `--resume` of the finished run return equal dicts."""
        return json.loads(write_json(self.path / "summary.json", summary).read_text())


def log_once(writer: MetricsWriter, step: int, record: dict, *, stage: str) -> None:
    """Writes the record unless `metrics.jsonl` already holds one of `stage` at `step`: a resumed
    run recomputes its before/after evaluations (identically) and logs them once."""
    if not any(r["stage"] == stage and r["step"] == step for r in read_metrics(writer.path)):
        writer.write(step, record, stage=stage)


def draw_at(seed: int, iteration: int, population: int, size: int) -> np.ndarray:
    """The indices iteration `iteration` (1-based) draws: the `iteration`-th call of
    `np.random.default_rng(seed).choice(population, size, replace=size > population)`.

    A pure function of (seed, iteration), so a resumed run draws what an uninterrupted one did,
    and the same sequence the scripts drew from one stateful generator before they could resume
    (so their published figures still hold). Replaying costs O(iteration) small draws: 3 s over
    a whole 500-iteration run.
    """
    rng = np.random.default_rng(seed)
    for _ in range(iteration - 1):
        rng.choice(population, size, replace=size > population)
    return rng.choice(population, size, replace=size > population)
