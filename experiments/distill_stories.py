"""Knowledge distillation: stories260K teaches a student a quarter of its size, on its own samples.

The teacher is llama2.c's TinyStories model stories260K (../shared/data/models/stories260K/,
5 layers, d = 64, 260K parameters). It writes continuations of TinyStories-style openings
(`--samples-per-opening` draws at temperature 1 per training opening); a student with fewer
layers and half the width (`--student-layers`, `--student-dim`, random init) is trained on those
tokens twice, from the same init, on the same batches, with the same optimizer:

  kd:  Hinton logit distillation (`make_distill_step`, `kd_loss`): the teacher's full next-token
       distribution at every position (forward KL at --kd-temperature, τ² scaled);
  sft: the baseline, cross-entropy on the sampled tokens alone (sequence-level KD, `make_sft_step`).

Both are then scored on continuations the teacher wrote for held-out openings: the student's
token-mean NLL of those tokens (nats), and KL(teacher ‖ student) per token; the teacher's own NLL
of its samples is the floor. Sample texts from each student are kept in summary.json.

  python -m experiments.distill_stories        # defaults: about 70 s on 2 CPU cores
  python -m experiments.distill_stories --on-policy-fraction 0.5   # GKD: half the KD steps on-policy

Measured here at the defaults (256 teacher continuations, 12,288 tokens, 400 steps of 16; held-out:
64 continuations of the 8 held-out openings, 3,072 tokens; nats per token):
                      init     kd     sft
  student NLL        6.247   3.078   3.269     (the teacher's own NLL of them: 1.437)
  KL(teacher‖student) 4.841  1.636   1.826
The KD student's greedy text is TinyStories-shaped but repetitive ("He saw a big box. He was
very shiny. He wanted to play with her toys."); the SFT student's misspells more ("He was very
exccark."). Teacher 260,032 parameters, student 39,200. With --on-policy-fraction 0.5 (GKD, half
the KD steps on the student's own samples; 110 s): KD student NLL 3.040, KL 1.602.

Writes into --output-dir: config.json, metrics.jsonl, summary.json, checkpoints/.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tyro

import jaxalign.data as jd
from experiments._common import (
    HELD_OUT_STORY_OPENINGS,
    STORIES260K_MODEL,
    STORIES260K_TOKENIZER,
    STORY_OPENINGS,
    RunDir,
    decode_with_prompt,
    format_table,
    load_model_and_tokenizer,
    resume_or_start,
)
from jaxalign import SamplingConfig, create_train_state, generate, init_params, make_optimizer, make_sft_step
from jaxalign.metrics import setup_logging
from jaxalign.optim import OptimConfig
from jaxalign.trainers import make_sft_eval_step, train_loop
from jaxalign.trainers.distill import distill_batch_loss, make_distill_step, make_on_policy_distill_step

log = logging.getLogger("distill_stories")


@dataclasses.dataclass
class Config:
    """Distil stories260K into a smaller student; compare with SFT on the same teacher samples."""

    output_dir: Path = Path("runs/distill_stories")
    resume: bool = False
    """Continue the run in --output-dir (same flags), from its latest checkpoints."""
    seed: int = 0
    model: str = STORIES260K_MODEL
    """The teacher: llama2.c .bin file or Hugging Face checkpoint directory."""
    tokenizer: str = STORIES260K_TOKENIZER
    student_layers: int = 2
    student_dim: int = 32
    """Student width; heads and the MLP shrink with it (head size kept)."""
    samples_per_opening: int = 16
    """Teacher continuations per training opening (16 openings)."""
    held_out_samples: int = 8
    """Teacher continuations per held-out opening (8 openings) for the evaluation."""
    max_new_tokens: int = 48
    temperature: float = 1.0
    """The teacher's sampling temperature."""
    steps: int = 400
    batch_size: int = 16
    lr: float = 3e-3
    kd_temperature: float = 1.0
    """τ of the KD loss (both distributions divided by it, τ² scaling)."""
    kd_beta: float = 0.0
    """β of the divergence: 0 forward KL (Hinton), 1 reverse KL, between GKD's JSD."""
    on_policy_fraction: float = 0.0
    """GKD's λ: the share of the KD student's steps whose batch is its own continuations of
    --batch-size training openings (sampled at --temperature inside the step, scored by the
    teacher at every sampled position) instead of the teacher's samples. 0: off-policy KD on the
    SFT student's tokens. Each step's choice is a seeded function of the step (resumable)."""
    log_every: int = 10
    checkpoint_every: int = 50
    keep_checkpoints: int | None = 2
    num_sample_texts: int = 3
    progress: bool = True


def student_config(cfg: Config, teacher):
    """The teacher's architecture with --student-layers layers and --student-dim width."""
    scale = cfg.student_dim / teacher.d_model
    heads = max(1, round(teacher.n_heads * scale))
    kv = max(1, round(teacher.n_kv_heads * scale))
    if cfg.student_dim % heads or heads % kv:
        raise ValueError(f"--student-dim {cfg.student_dim} does not split into {heads} heads ({kv} key/value heads)")
    return dataclasses.replace(
        teacher, n_layers=cfg.student_layers, d_model=cfg.student_dim, n_heads=heads, n_kv_heads=kv,
        d_ff=max(1, round(teacher.d_ff * scale)),
    )


def teacher_samples(cfg: Config, config, params, tokenizer, openings, n: int, seed: int) -> list[jd.Example]:
    """`n` teacher continuations of each opening as SFT examples: mask 1 on the continuation."""
    prompts, prompt_mask = jd.collate_prompts(openings, tokenizer)
    prompts, prompt_mask = np.repeat(prompts, n, 0), np.repeat(prompt_mask, n, 0)
    sampling = SamplingConfig(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
    )
    gen = jax.device_get(generate(params, config, prompts, prompt_mask, sampling=sampling, rng=jax.random.key(seed)))
    examples = []
    for row in range(len(prompts)):
        prompt = prompts[row][prompt_mask[row] > 0]
        completion = gen.tokens[row][: int(gen.lengths[row])]
        tokens = np.concatenate([prompt, completion]).astype(np.int32)
        mask = np.concatenate([np.zeros(len(prompt)), np.ones(len(completion))]).astype(np.float32)
        examples.append(jd.Example(tokens, mask))
    return examples


def make_evaluate(config, teacher_config, teacher_params, batches):
    """`evaluate(params) -> {"nll", "kl"}`: token means over the held-out teacher samples."""
    nll_step = make_sft_eval_step(config)
    kl_step = jax.jit(
        lambda p, b: distill_batch_loss(p, config, b, None, teacher_params, teacher_config=teacher_config)[1]
    )

    def evaluate(p) -> dict[str, float]:
        nll = [jax.device_get(nll_step(p, b)) for b in batches]
        kl = [jax.device_get(kl_step(p, b)) for b in batches]
        count = sum(float(m["num_tokens"]) for m in nll)
        return {
            "nll": sum(float(m["loss_sum"]) for m in nll) / count,
            "kl": sum(float(m["divergence"]) * float(m["num_tokens"]) for m in kl) / count,
        }

    return evaluate


def sample_texts(cfg: Config, config, params, tokenizer) -> list[str]:
    """The student's greedy continuations of the first --num-sample-texts held-out openings."""
    openings = HELD_OUT_STORY_OPENINGS[: cfg.num_sample_texts]
    prompts, mask = jd.collate_prompts(openings, tokenizer)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    gen = jax.device_get(generate(params, config, prompts, mask, sampling=sampling, rng=jax.random.key(0)))
    return [decode_with_prompt(tokenizer, prompts[i], mask[i], gen.tokens[i], int(gen.lengths[i])) for i in range(len(openings))]


def train_student(cfg: Config, stage: str, step, tx, init, batch_at, writer, ckpt_dir: Path, extra_args=()) -> tuple:
    """One stage (`kd` or `sft`) from the shared init, with the optimizer `tx` its `step` was
    built with; returns (params, tokens/s)."""
    manager, state = resume_or_start(
        ckpt_dir / stage, create_train_state(jax.tree.map(jnp.copy, init), tx, cfg.seed),
        resume=cfg.resume, save_every=cfg.checkpoint_every, keep=cfg.keep_checkpoints,
    )
    state, loop = train_loop(
        step, state, batch_at, num_steps=cfg.steps, stage=stage, writer=writer, extra_args=extra_args,
        log_every=cfg.log_every, checkpoints=manager, progress=cfg.progress,
    )
    return state.params, loop["tokens_per_s"]


def gkd_step_and_batches(cfg: Config, config, teacher_config, tokenizer, stream, tx, schedule):
    """The KD student's (step, batch_at): off-policy KD on the teacher's samples, and with
    --on-policy-fraction λ > 0, GKD's mix: a step's batch is, with probability λ (drawn from
    `default_rng([seed, step])`), prompts the student continues itself inside the step."""
    offline = make_distill_step(
        config, tx, schedule, teacher_config=teacher_config, temperature=cfg.kd_temperature, beta=cfg.kd_beta
    )
    if not cfg.on_policy_fraction:
        return offline, stream.batch_at
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    on_policy = make_on_policy_distill_step(
        config, tx, schedule, teacher_config=teacher_config, sampling=sampling, temperature=cfg.kd_temperature,
        beta=cfg.kd_beta,
    )
    prompts, prompt_mask = jd.collate_prompts(STORY_OPENINGS, tokenizer)

    def batch_at(step: int):
        rng = np.random.default_rng([cfg.seed, step])
        if rng.random() >= cfg.on_policy_fraction:
            return stream.batch_at(step)
        rows = rng.choice(len(STORY_OPENINGS), cfg.batch_size)
        key = jax.random.key_data(jax.random.fold_in(jax.random.key(cfg.seed + 3), step))
        return {"prompt_tokens": prompts[rows], "prompt_mask": prompt_mask[rows], "rng": np.asarray(key)}

    def step(state, batch, teacher_params):
        return (on_policy if "prompt_tokens" in batch else offline)(state, batch, teacher_params)

    return step, batch_at


def _optim(cfg: Config) -> OptimConfig:
    return OptimConfig(
        learning_rate=cfg.lr, warmup_steps=cfg.steps // 10, total_steps=cfg.steps, end_learning_rate=cfg.lr * 0.1
    )


def run(cfg: Config) -> dict:
    """Samples from the teacher, trains both students, evaluates; returns (and writes) the summary."""
    if not 0.0 <= cfg.on_policy_fraction <= 1.0:  # refused before anything is computed or written
        raise ValueError(f"--on-policy-fraction must be in [0, 1], got {cfg.on_policy_fraction}")
    run_dir = RunDir.open(cfg)
    if (done := run_dir.finished_summary()) is not None:
        return done
    teacher_config, teacher_params, tokenizer = load_model_and_tokenizer(cfg.model, cfg.tokenizer)
    config = student_config(cfg, teacher_config)
    train = teacher_samples(cfg, teacher_config, teacher_params, tokenizer, STORY_OPENINGS, cfg.samples_per_opening, cfg.seed + 1)
    held = teacher_samples(cfg, teacher_config, teacher_params, tokenizer, HELD_OUT_STORY_OPENINGS, cfg.held_out_samples, cfg.seed + 2)
    longest = max(len(e.tokens) for e in train + held)
    collate = functools.partial(jd.collate_sft, batch_size=cfg.batch_size, buckets=(longest,), pad_id=tokenizer.pad_id)
    stream = jd.BatchStream(train, cfg.batch_size, cfg.seed, collate, drop_last=True)  # one static shape
    held_batches = list(jd.eval_batches(held, batch_size=cfg.batch_size, collate=collate))
    evaluate = make_evaluate(config, teacher_config, teacher_params, held_batches)
    teacher_nll = make_evaluate(teacher_config, teacher_config, teacher_params, held_batches)(teacher_params)["nll"]
    init = init_params(config, jax.random.key(cfg.seed))
    writer = run_dir.begin()
    tx, schedule = make_optimizer(_optim(cfg))
    kd_step, kd_batch_at = gkd_step_and_batches(cfg, config, teacher_config, tokenizer, stream, tx, schedule)
    kd_params, kd_speed = train_student(
        cfg, "kd", kd_step, tx, init, kd_batch_at, writer, run_dir.path / "checkpoints", (teacher_params,)
    )
    sft_params, sft_speed = train_student(
        cfg, "sft", make_sft_step(config, tx, schedule), tx, init, stream.batch_at, writer, run_dir.path / "checkpoints"
    )
    writer.close()
    figures = {"init": evaluate(init), "kd": evaluate(kd_params), "sft": evaluate(sft_params)}
    summary = {
        **{f"{k}_{name}": v for name, f in figures.items() for k, v in f.items()},
        "teacher_nll": teacher_nll,
        "teacher_params": int(sum(x.size for x in jax.tree.leaves(teacher_params))),
        "student_params": int(sum(x.size for x in jax.tree.leaves(init))),
        "train_sequences": len(train),
        "train_tokens": int(sum(e.mask.sum() for e in train)),
        "held_out_tokens": int(sum(e.mask.sum() for e in held)),
        "kd_tokens_per_s": kd_speed,
        "sft_tokens_per_s": sft_speed,
        "samples_kd": sample_texts(cfg, config, kd_params, tokenizer),
        "samples_sft": sample_texts(cfg, config, sft_params, tokenizer),
    }
    return run_dir.write_summary(summary)


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point: runs, prints the figures table and sample texts."""
    setup_logging()
    s = run(tyro.cli(Config, args=argv))
    print(format_table("held-out teacher samples", ("init", "kd", "sft"), [
        ("  student NLL, nats/token", s["nll_init"], s["nll_kd"], s["nll_sft"]),
        ("  KL(teacher || student), nats/token", s["kl_init"], s["kl_kd"], s["kl_sft"]),
    ], widths=(40, 10, 10, 10)))
    print(f"teacher NLL of its own samples: {s['teacher_nll']:.3f} nats/token; "
          f"teacher {s['teacher_params']:,} params, student {s['student_params']:,}")
    for name in ("kd", "sft"):
        print(f"\n--- {name} student, greedy")
        for text in s[f"samples_{name}"]:
            print(" ", text.replace("\n", " "))
    return s


if __name__ == "__main__":
    main(sys.argv[1:])
