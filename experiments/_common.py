"""Plumbing shared by the experiment scripts: the run-folder guard, resume bookkeeping, and what
more than one experiment does the same way.

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

The rest, written once: where the shared data lives (`SHARED_DATA`, `STORIES260K`), loading a
model for a tokenizer with one vocabulary and one context check (`load_model`,
`load_model_and_tokenizer`, `check_vocab`, `check_context`), continuing a stage from its
checkpoints (`resume_or_start`), training a Bradley-Terry reward model (`train_reward_model`),
decoding a sample with its prompt (`decode_with_prompt`), and the reported figures: first/last
trends (`trend`), before/after dictionaries (`before_after`) and printed tables (`format_table`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orbax.checkpoint as ocp

import jaxalign.data as jd
from jaxalign import (
    MetricsWriter,
    OptimConfig,
    TransformerConfig,
    create_train_state,
    load_pretrained,
    make_checkpoint_manager,
    make_optimizer,
    make_reward_step,
    read_metrics,
    restore_checkpoint,
    train_loop,
)
from jaxalign.metrics import to_strict_json, write_json
from jaxalign.trainers import evaluate_reward_model, make_reward_eval_step

log = logging.getLogger("experiments")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared/data"
"""`../shared/data` beside the repo root: the real data sets, tokenizers and models."""
STORIES260K = SHARED_DATA / "models/stories260K"
"""llama2.c's TinyStories model stories260K and its SentencePiece tokenizer tok512."""
STORIES260K_MODEL = str(STORIES260K / "stories260K.bin")
STORIES260K_TOKENIZER = str(STORIES260K / "tok512.model")

# Story openings in the style of TinyStories, written for the stories260K experiments
# (GRPO toward a word, distillation).
STORY_OPENINGS = (
    "Once upon a time",
    "Once upon a time, there was a little girl named Lily.",
    "One day, a boy named Tom",
    "Tom went to the park.",
    "There was a big red ball.",
    "Sue and her mom went to the store.",
    "Once upon a time, there was a little boy.",
    "One sunny day,",
    "Ben liked to play outside.",
    "Anna had a new toy.",
    "The sun was warm and bright.",
    "Once upon a time, in a small house,",
    "Max was very happy.",
    "One day, Lily found a box.",
    "There was a little bird in a tree.",
    "Mia and Sam were friends.",
)
HELD_OUT_STORY_OPENINGS = (
    "Once upon a time, there was a girl named Sara.",
    "One day, Tim went outside.",
    "Jack had a big blue car.",
    "It was a cold morning.",
    "Lucy wanted to go to the beach.",
    "Once upon a time, a little boy lived in a town.",
    "The children played in the garden.",
    "Kate saw a shiny rock.",
)

TREND_FRACTION = 0.2
"""A training figure's trend is its mean over this fraction of the first and of the last records
(one iteration's value is noisy)."""

State = TypeVar("State")

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


def check_vocab(
    tokenizer: jd.Tokenizer,
    config: TransformerConfig,
    *,
    tokenizer_spec: str,
    model: str,
    model_flag: str = "--model",
    tokenizer_flag: str = "--tokenizer",
) -> None:
    """Refuses a tokenizer with ids the model has no embedding for.

    Args:
      tokenizer: the loaded tokenizer.
      config: the loaded model's config.
      tokenizer_spec: what `tokenizer` was loaded from (the flag's value), named in the message.
      model: what `config` was loaded from (the flag's value), named in the message.
      model_flag, tokenizer_flag: the flags that chose them.

    Raises:
      ValueError: `tokenizer.vocab_size > config.vocab_size`, as "--tokenizer SPEC has N ids but
        --model PATH has a vocabulary of M ...".
    """
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"{tokenizer_flag} {tokenizer_spec} has {tokenizer.vocab_size} ids but {model_flag} {model} has a "
            f"vocabulary of {config.vocab_size} (ids from {config.vocab_size} on have no embedding): pass the "
            "tokenizer the model was trained with"
        )


def use_chat(chat: bool | None, tokenizer: jd.Tokenizer, tokenizer_spec: str) -> bool:
    """Whether prompts go through the tokenizer's chat template: `--chat` when given, else
    whether the tokenizer has one (an `HFTokenizer` from a directory with a template).

    Raises:
      ValueError: `--chat` True with a tokenizer that has no chat template.
    """
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if chat and not has_template:
        raise ValueError(f"--chat: --tokenizer {tokenizer_spec} has no chat template")
    return has_template if chat is None else chat


def check_context(
    config: TransformerConfig, length: int, *, flags: str, model: str, model_flag: str = "--model"
) -> None:
    """Refuses sequences longer than the model's context.

    Args:
      config: the loaded model's config.
      length: the longest sequence the run will feed the model, in tokens.
      flags: the flags that set `length`, as the message shows them (e.g. "--max-length 512").
      model, model_flag: what the model was loaded from, and the flag that chose it.

    Raises:
      ValueError: `length > config.max_seq_len`.
    """
    if length > config.max_seq_len:
        raise ValueError(
            f"{flags} = {length} tokens exceed the context of {model_flag} {model}, "
            f"{config.max_seq_len} tokens (config.max_seq_len)"
        )


def load_model(
    model: str,
    tokenizer: jd.Tokenizer,
    *,
    tokenizer_spec: str,
    model_flag: str = "--model",
    loader: Callable[..., tuple[TransformerConfig, dict]] = load_pretrained,
    **overrides: Any,
) -> tuple[TransformerConfig, dict]:
    """A pretrained model for `tokenizer`: `loader(model, **overrides)`, then `check_vocab`.

    Args:
      model: llama2.c `.bin`, Hugging Face checkpoint directory or (online) hub id.
      tokenizer: the run's tokenizer; every one of its ids must have an embedding.
      tokenizer_spec: what the tokenizer was loaded from, for the error message.
      model_flag: the flag that named `model` ("--model", "--init").
      loader: `load_pretrained` (any of the three) or `load_hf_checkpoint` (Hugging Face only).
      **overrides: config overrides for the loader (dtype, dropout).

    Returns:
      (config, params).

    Raises:
      ValueError: the tokenizer has more ids than the model's vocabulary; FileNotFoundError,
        ValueError, KeyError: as the loader.
    """
    config, params = loader(model, **overrides)
    check_vocab(tokenizer, config, tokenizer_spec=tokenizer_spec, model=model, model_flag=model_flag)
    return config, params


def load_model_and_tokenizer(
    model: str, tokenizer: str, **overrides: Any
) -> tuple[TransformerConfig, dict, jd.Tokenizer]:
    """`--model` and `--tokenizer` of the experiments on a pretrained model (stories260K by default).

    Args:
      model: llama2.c `.bin`, Hugging Face checkpoint directory or (online) hub id.
      tokenizer: SentencePiece `.model`, `.tiktoken` ranks file, 'gpt2' (online) or 'bytes'.
      **overrides: config overrides for `load_pretrained`.

    Returns:
      (config, params, tokenizer).

    Raises:
      ValueError: the tokenizer has more ids than the model's vocabulary (`check_vocab`); the
        loaders' errors for a missing or malformed file.
    """
    tok = jd.load_tokenizer(tokenizer)
    config, params = load_model(model, tok, tokenizer_spec=tokenizer, **overrides)
    return config, params, tok


def resume_or_start(
    directory: Path, state: State, *, resume: bool, save_every: int, keep: int | None
) -> tuple[ocp.CheckpointManager, State]:
    """A stage's checkpoint manager, and the state the stage starts from.

    Args:
      directory: the stage's checkpoint folder (created if missing).
      state: the freshly initialised state, also the structure a checkpoint is restored into.
      resume: --resume: start from the latest checkpoint in `directory` when it holds one (the
        loops then drop the records a killed run logged after it).
      save_every, keep: as `make_checkpoint_manager`.

    Returns:
      (manager, the restored state, or `state` without --resume or without a checkpoint).

    Raises:
      ValueError: save_every < 1.
    """
    manager = make_checkpoint_manager(directory, save_every=save_every, keep=keep)
    if resume and (restored := restore_checkpoint(manager, state)) is not None:
        log.info("%s: resumed from step %d", directory, manager.latest_step())
        return manager, restored
    return manager, state


def train_reward_model(
    config: TransformerConfig,
    params: dict,
    train: Sequence,
    val: Sequence,
    *,
    optim: OptimConfig,
    collate: Callable,
    batch_size: int,
    seed: int,
    writer: MetricsWriter,
    checkpoint_dir: Path,
    checkpoint_every: int,
    keep_checkpoints: int | None,
    resume: bool,
    num_steps: int,
    log_every: int,
    eval_every: int = 0,
    progress: bool = True,
    pool: str = "last",
    center_coef: float = 0.0,
) -> tuple[Any, dict[str, float], dict[str, float], dict[str, Any]]:
    """The Bradley-Terry reward-model stage: held-out figures of the initial model, `train_loop`
    (stage "reward_model", resumable from `checkpoint_dir`), held-out figures at the end.

    Args:
      config, params: the scalar model (`init_scalar_model`) to train.
      train, val: PreferenceExamples; batches of `batch_size` made by `collate`, the training
        ones drawn by `BatchStream(train, batch_size, seed, collate)`.
      optim: the optimiser's settings (AdamW with its schedule).
      writer: the run's metrics; records of "reward_model" and "reward_model_eval".
      checkpoint_dir, checkpoint_every, keep_checkpoints, resume: as `resume_or_start`.
      num_steps, log_every, eval_every, progress: as `train_loop`.
      pool, center_coef: as `make_reward_step`.

    Returns:
      (final TrainState, held-out figures before, after, `train_loop`'s summary); the figures are
      `evaluate_reward_model`'s (accuracy, margin, loss, pairs).
    """
    tx, schedule = make_optimizer(optim)
    state = create_train_state(params, tx, seed)
    step = make_reward_step(config, tx, schedule, pool=pool, center_coef=center_coef)
    eval_step = make_reward_eval_step(config, pool=pool)

    def evaluate(p) -> dict[str, float]:
        return evaluate_reward_model(eval_step, p, jd.eval_batches(val, batch_size=batch_size, collate=collate))

    before = evaluate(state.params)  # the initial model: recomputed identically on --resume
    manager, state = resume_or_start(
        checkpoint_dir, state, resume=resume, save_every=checkpoint_every, keep=keep_checkpoints
    )
    log.info("reward model: %d train / %d held-out pairs; held-out accuracy at the start %.3f",
             len(train), len(val), before["accuracy"])
    state, loop = train_loop(
        step, state, jd.BatchStream(train, batch_size, seed, collate).batch_at, num_steps=num_steps,
        stage="reward_model", writer=writer, eval_fn=evaluate, eval_every=eval_every, log_every=log_every,
        progress=progress, checkpoints=manager, initial_eval=before,
    )
    after = loop["final_eval"] or evaluate(state.params)
    log.info("reward model: held-out pairwise accuracy %.3f -> %.3f", before["accuracy"], after["accuracy"])
    return state, before, after, loop


def trend(
    name: str, values: Sequence[float], *, fraction: float = TREND_FRACTION, round_up: bool = False
) -> dict[str, float]:
    """How a per-iteration training figure moved: its means over the first and over the last
    `fraction` of `values`, as `{name}_first` and `{name}_last`.

    Args:
      name: the figure's name in the summary.
      values: one figure per logged iteration or step, in order.
      fraction: the share of `values` averaged at each end, at least one value.
      round_up: k = ceil(len · fraction) values rather than floor: sft_dpo's `*_last` figures
        were published with ceil (the two agree where len · fraction is whole, as at its
        defaults: 60 of 300 SFT records, 40 of 200 DPO records).

    Returns:
      `{f"{name}_first": mean of the first k values, f"{name}_last": mean of the last k}`, both
      nan when `values` is empty.
    """
    if not len(values):
        return {f"{name}_first": float("nan"), f"{name}_last": float("nan")}
    k = max(1, (math.ceil if round_up else int)(len(values) * fraction))
    return {f"{name}_first": float(np.mean(values[:k])), f"{name}_last": float(np.mean(values[-k:]))}


def before_after(
    before: dict[str, Any], after: dict[str, Any], *, prefix: str = "", labels: tuple[str, str] = ("before", "after")
) -> dict[str, Any]:
    """Two evaluations as summary figures: `{prefix}{name}_{labels[0]}` for each of `before`,
    then `{prefix}{name}_{labels[1]}` for each of `after`."""
    return {
        **{f"{prefix}{name}_{labels[0]}": v for name, v in before.items()},
        **{f"{prefix}{name}_{labels[1]}": v for name, v in after.items()},
    }


def format_table(
    title: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    widths: Sequence[int],
    fmt: str = ".3f",
    rule: bool = False,
) -> str:
    """The figures table an experiment prints.

    Args:
      title: the top-left cell, left-aligned in `widths[0]`.
      columns: the column headings (e.g. "before", "after"), each right-aligned in its width.
      rows: `(label, value, ...)`, the label left-aligned in `widths[0]`, each value right-aligned
        in its column's width: a number formatted with `fmt`, None as "n/a" (a non-finite figure,
        null in summary.json), a str as it is. A row may have fewer values than there are columns;
        a str longer than its column is not cut.
      widths: the label width, then one width per column.
      fmt: the format spec of numbers.
      rule: a line of dashes under the headings, as wide as the table.

    Returns:
      The table's lines joined by newlines (no final newline).
    """
    def cell(value: Any) -> str:
        if value is None:
            return "n/a"
        return value if isinstance(value, str) else format(value, fmt)

    lines = [f"{title:<{widths[0]}}" + "".join(f"{c:>{w}}" for c, w in zip(columns, widths[1:]))]
    if rule:
        lines.append("-" * sum(widths))
    for label, *values in rows:
        lines.append(f"{label:<{widths[0]}}" + "".join(f"{cell(v):>{w}}" for v, w in zip(values, widths[1:])))
    return "\n".join(lines)


def decode_with_prompt(tokenizer: jd.Tokenizer, prompt_tokens, prompt_mask, completion, length: int) -> str:
    """The text of a left-padded prompt and its first `length` completion tokens (EOS dropped),
    decoded together: SentencePiece drops a leading space when a completion is decoded alone."""
    prompt_ids = np.asarray(prompt_tokens)[np.asarray(prompt_mask) > 0].tolist()
    ids = [t for t in np.asarray(completion[:length]).tolist() if t != tokenizer.eos_id]
    return tokenizer.decode(prompt_ids + ids)
