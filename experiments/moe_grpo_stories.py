"""RL on a Mixture-of-Experts model: GRPO vs GSPO vs GRPO with routing replay, on stories260K
upcycled to an MoE, toward the keyword reward of grpo_stories.

GSPO (arXiv 2507.18071) replaces GRPO's per-token importance ratio by one per sequence because
the token ratio is unstable on MoE models: after an update, a token may be routed to other
experts than under the sampling policy, and its ratio jumps. Rollout Routing Replay (R3, arXiv
2510.11370) is the other fix: the training forward reuses the experts the rollout chose (the
gate weights still come from the live router). This script compares the three on one MoE.

The model: the llama2.c TinyStories model stories260K (../shared/data/models/stories260K/)
sparsely upcycled (Komatsuzaki et al. 2022, arXiv 2212.05055; `jaxalign.models.upcycle`): every
layer's SwiGLU FFN copied into --num-experts experts with relative noise --noise-std, a fresh
router (std --router-std, so routing starts near uniform), Mixtral top-k routing. The reward,
prompts and held-out evaluation are grpo_stories' (1.0 when a continuation mentions "dog"/"dogs").
Each arm starts from the same upcycled model with the same seeds, prompts, sampling keys and
budget, and takes --inner-steps optimiser steps per rollout, so the later steps are off-policy
(that is where the token ratio and the routes drift):

  grpo    token-level ratio, clip ε = --clip-eps (0.2)
  gspo    sequence-level ratio exp(mean_t log ρ_t) (`importance_level="sequence"`), clip
          [1 − 3e-4, 1 + 4e-4] (GSPO §5.1's ranges: the sequence ratio is a geometric mean, so
          its spread is far smaller than a token's)
  replay  token-level ratio as grpo, with the rollout's routes replayed in the loss

Per arm and per iteration it logs the held-out reward and KL to the start model (--eval-every
1: `--eval-samples` draws per held-out opening, the same keys for every arm), the step's KL (k3,
training rollouts), clip fractions, and `routing_change_fraction`: the share of (completion
token, MoE layer) routes whose expert set under the params being updated differs from the one
the rollout recorded (a teacher-forced pass under the sampling params, veRL's "R2" replay). The
per-iteration record is the last inner step's, i.e. an off-policy step when μ > 1. On the first
inner step (ρ = 1) GRPO's and GSPO's gradients coincide (seq_mean_token_mean); the arms part
from the second step on. The trainer also adds the MoE load-balancing loss (coefficient 0.001,
`make_grpo_step`'s default) in every arm.

  python -m experiments.moe_grpo_stories            # defaults: 2 min 55 s on 2 CPU cores
  python -m experiments.moe_grpo_stories --arms grpo replay --num-experts 8

Measured here at the defaults (15 iterations × 8 prompts × G 8, μ = 2, lr 3e-4, β = 0.2, 32 new
tokens, 4 experts top-2, noise 0.1; held-out: 8 openings × 8 draws; dense stories260K's reward
0.031, the upcycled start's 0.000; clip and routing change are means over the iterations):

  arm      reward before -> after   held-out KL   train KL (k3, last)   clip low+high   routing change
  grpo         0.000 -> 0.766           9.01           0.269            0.030+0.024        0.0158
  gspo         0.000 -> 0.453           3.06           0.130            0.574+0.376        0.0139
  replay       0.000 -> 0.875           8.68           0.287            0.032+0.022        0.0156

At this scale GRPO's token ratio is not destabilised: after an update 1.6% of the routes change
(4% in the first iteration, when the fresh router moves most), the mean ratio stays 0.999 and 5%
of tokens are clipped. GSPO's 4e-4 range clips 95% of the off-policy tokens, so it learns mostly
from the on-policy step: slower reward, a third of the KL. Replay's edge over GRPO (0.875 vs
0.766, one seed) is within the seeds' spread of GRPO alone (tests: ±0.11 at a shorter budget).

Writes into --output-dir (a fresh folder; --resume continues a killed run): config.json,
metrics.jsonl (every arm's records, stages "<arm>" and "<arm>_eval"), summary.json (per-arm
figures), moe_grpo.png (held-out reward, held-out KL, clip fraction and routing change per
iteration, one line per arm), and per arm a folder <arm>/ with the arm's own metrics.jsonl and
checkpoints (the unit --resume continues).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import tyro

import jaxalign.data as jd
from experiments._common import (
    STORIES260K_MODEL,
    STORIES260K_TOKENIZER,
    RunDir,
    before_after,
    draw_at,
    format_table,
    load_model_and_tokenizer,
)
from experiments._grpo import GRPOConfig, grpo_before_after
from experiments.grpo_stories import HELD_OUT_OPENINGS, TRAIN_OPENINGS, make_evaluate, make_reward
from jaxalign import MetricsWriter, read_metrics
from jaxalign.metrics import setup_logging
from jaxalign.models.upcycle import upcycle_to_moe

log = logging.getLogger("moe_grpo_stories")

Arm = Literal["grpo", "gspo", "replay"]
ARMS: tuple[Arm, ...] = ("grpo", "gspo", "replay")

# GSPO §5.1 (arXiv 2507.18071): "we set the left and right clipping ranges ... to 3e-4 and 4e-4"
GSPO_CLIP_EPS, GSPO_CLIP_EPS_HIGH = 3e-4, 4e-4


@dataclasses.dataclass
class Config(GRPOConfig):
    """GRPO / GSPO / routing-replay GRPO of an upcycled stories260K MoE toward a target word."""

    output_dir: Path = Path("runs/moe_grpo_stories")
    model: str = STORIES260K_MODEL
    """llama2.c .bin file or Hugging Face checkpoint directory of the dense model to upcycle."""
    tokenizer: str = STORIES260K_TOKENIZER
    keywords: tuple[str, ...] = ("dog", "dogs")
    """The reward's target words (whole words, any case)."""
    cap: int = 1
    arms: tuple[Arm, ...] = ARMS
    """The variants to run, in this order, each from the same upcycled model."""
    num_experts: int = 4
    top_k: int = 2
    noise_std: float = 0.1
    """Relative noise of each expert's copy of the dense FFN (std of W_e − W over std(W))."""
    router_std: float = 0.02
    """Std of the fresh router kernel (near-uniform routing at the start)."""
    gspo_clip_eps: float = GSPO_CLIP_EPS
    gspo_clip_eps_high: float = GSPO_CLIP_EPS_HIGH
    max_new_tokens: int = 32
    grpo_iterations: int = 15
    prompts_per_iteration: int = 8
    group_size: int = 8
    inner_steps: int = 2
    """μ > 1: the later steps are off-policy, where routing drift shows in the token ratio."""
    grpo_lr: float = 3e-4
    beta: float = 0.2
    """As grpo_stories (0.2: GRPO's 0.04 barely restrains a 260K-parameter model)."""
    eval_samples: int = 8
    """Draws per held-out opening: 8 × 8 = 64 = the rollout's B·G rows, so evaluation and
    rollouts share one compiled sampler."""
    num_sample_texts: int = 2
    eval_every: int = 1
    eval_dense: bool = True
    """Also report the dense model's held-out reward (`dense_reward`; one more compile)."""


def arm_config(cfg: Config, arm: Arm, directory: Path) -> tuple[Config, dict]:
    """The GRPOConfig of one arm (its folder, ratio level and clip range) and its extra step
    options (routing replay)."""
    if arm == "gspo":
        arm_cfg = dataclasses.replace(cfg, output_dir=directory, importance_level="sequence",
                                      clip_eps=cfg.gspo_clip_eps, clip_eps_high=cfg.gspo_clip_eps_high)
    else:
        arm_cfg = dataclasses.replace(cfg, output_dir=directory, importance_level="token")
    return arm_cfg, ({"routing_replay": True} if arm == "replay" else {})


def _mean(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return float(np.mean(values)) if values else None


def arm_figures(arm_dir: Path) -> dict[str, float | None]:
    """An arm's training records summarised: the means over its iterations of the clip
    fractions (low: A < 0 and ρ < 1 − ε_low; high: A > 0 and ρ > 1 + ε_high; their sum), of the
    routing-change fraction and of the mean ratio, and the last iteration's train KL (k3). Each
    iteration's record holds its last inner step's metrics (`grpo_loop`), i.e. with μ > 1 an
    off-policy step. None where a metric was not logged."""
    records = [r for r in read_metrics(arm_dir / "metrics.jsonl") if r["stage"] == "grpo"]
    last = records[-1] if records else {}
    low, high = _mean(records, "clip_fraction_low"), _mean(records, "clip_fraction_high")
    return {
        "clip_fraction_low_mean": low,
        "clip_fraction_high_mean": high,
        "clip_fraction_mean": None if low is None or high is None else low + high,
        "routing_change_fraction_mean": _mean(records, "routing_change_fraction"),
        "train_kl_last": last.get("kl"),
        "ratio_mean": _mean(records, "ratio"),
    }


def copy_records(writer: MetricsWriter, arm_dir: Path, arm: str) -> None:
    """Puts the arm's records into the run's metrics.jsonl as stages `arm` ("grpo" records) and
    f"{arm}_eval" ("grpo_eval"), replacing any copied before (so a resumed run copies once)."""
    for stage in (arm, f"{arm}_eval"):
        writer.truncate_after(-1, stage=stage)
    for r in read_metrics(arm_dir / "metrics.jsonl"):
        if r["stage"] in ("grpo", "grpo_eval"):
            stage = arm if r["stage"] == "grpo" else f"{arm}_eval"
            writer.write(r["step"], {k: v for k, v in r.items() if k not in ("step", "stage")}, stage=stage)


def plot_arms(metrics_path: Path, out_png: Path, arms, *, title: str) -> Path:
    """moe_grpo.png: held-out reward, held-out KL, clip fraction (low + high) and routing change
    per iteration, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    panels = (("held-out reward", "_eval", "reward"), ("held-out KL to start, nats", "_eval", "kl"),
              ("clip fraction", "", "clip"), ("routing change fraction", "", "routing_change_fraction"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3), squeeze=False)
    for ax, (label, suffix, key) in zip(axes[0], panels):
        for arm in arms:
            pts = []
            for r in records:
                if r["stage"] != arm + suffix:
                    continue
                if key == "clip":
                    low, high = r.get("clip_fraction_low"), r.get("clip_fraction_high")
                    value = None if low is None or high is None else low + high
                else:
                    value = r.get(key)
                if isinstance(value, (int, float)) and np.isfinite(value):
                    pts.append((r["step"], value))
            if pts:
                ax.plot(*zip(*sorted(pts)), marker=".", label=arm)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def run(cfg: Config) -> dict:
    """Upcycles the model, runs the arms; returns (and writes) the per-arm summary."""
    if not cfg.arms or len(set(cfg.arms)) != len(cfg.arms):
        raise ValueError(f"--arms {' '.join(cfg.arms)}: name each arm once (of {', '.join(ARMS)})")
    run_dir = RunDir.open(cfg)
    if (done := run_dir.finished_summary()) is not None:
        return done
    dense_config, dense_params, tokenizer = load_model_and_tokenizer(cfg.model, cfg.tokenizer)
    params, config = upcycle_to_moe(
        dense_params, dense_config, num_experts=cfg.num_experts, top_k=cfg.top_k, noise_std=cfg.noise_std,
        router_std=cfg.router_std, rng=jax.random.key(cfg.seed + 5),
    )
    width = jd.collate_prompts(TRAIN_OPENINGS + HELD_OUT_OPENINGS, tokenizer)[0].shape[1]
    reward_fn = make_reward(cfg)
    # the reported KL is to the upcycled start model, the arms' common reference
    evaluate = make_evaluate(cfg, config, tokenizer, reward_fn, width=width, ref_params=jax.tree.map(jnp.copy, params))
    writer = run_dir.begin()

    def prompts_at(it):  # a pure function of (seed, iteration): every arm and a resumed run draw the same
        chosen = draw_at(cfg.seed + 3, it, len(TRAIN_OPENINGS), cfg.prompts_per_iteration)
        tokens, mask = jd.collate_prompts([TRAIN_OPENINGS[i] for i in chosen], tokenizer, length=width)
        return tokens, mask, {}

    summary: dict = {"arms": list(cfg.arms)}
    if cfg.eval_dense:
        dense_eval = make_evaluate(cfg, dense_config, tokenizer, reward_fn, width=width, ref_params=dense_params)
        summary["dense_reward"] = dense_eval(dense_params)[0]["reward"]
    for arm in cfg.arms:
        arm_dir = run_dir.path / arm
        arm_cfg, step_kwargs = arm_config(cfg, arm, arm_dir)
        arm_writer = MetricsWriter(arm_dir, tensorboard=False)
        log.info("arm %s: %s", arm, {"importance_level": arm_cfg.importance_level, "clip_eps": arm_cfg.clip_eps,
                                     "clip_eps_high": arm_cfg.clip_eps_high, **step_kwargs})
        result = grpo_before_after(
            arm_cfg, config, params, prompts_at, evaluate=evaluate, reward_fn=reward_fn, tokenizer=tokenizer,
            max_new_tokens=cfg.max_new_tokens, writer=arm_writer, eval_during=bool(cfg.eval_every),
            step_kwargs=step_kwargs,
        )
        arm_writer.close()
        copy_records(writer, arm_dir, arm)
        summary.update(before_after(result.before, result.after, prefix=f"{arm}_"))
        summary.update({f"{arm}_{k}": v for k, v in {**result.training, **arm_figures(arm_dir)}.items()})
        summary[f"{arm}_samples_after"] = result.after_extra
    writer.close()
    plot_arms(writer.path, run_dir.path / "moe_grpo.png", cfg.arms,
              title=f"stories260K upcycled to {cfg.num_experts} experts (top-{cfg.top_k}): GRPO toward "
                    f"{'/'.join(cfg.keywords)!r}")
    return run_dir.write_summary(summary)


def print_summary(summary: dict) -> None:
    arms = summary["arms"]
    rows = []
    for label, key in (("held-out reward, before", "reward_before"), ("held-out reward, after", "reward_after"),
                       ("held-out KL to start, after", "kl_after"), ("train KL (k3), last iteration", "train_kl_last"),
                       ("clip fraction, mean over iterations", "clip_fraction_mean"),
                       ("routing change fraction, mean", "routing_change_fraction_mean"),
                       ("train reward, first 20% iters", "train_reward_first"),
                       ("train reward, last 20% iters", "train_reward_last"), ("seconds", "grpo_seconds")):
        rows.append((f"  {label}", *(summary.get(f"{arm}_{key}") for arm in arms)))
    if "dense_reward" in summary:
        print(f"dense stories260K held-out reward: {summary['dense_reward']:.3f}")
    print(format_table("upcycled MoE", arms, rows, widths=(40, *(10,) * len(arms))))
    for arm in arms:
        for text in summary.get(f"{arm}_samples_after") or []:
            print(f"  [{arm}]", text.replace("\n", " "))


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point: runs, prints the per-arm table and sample texts."""
    setup_logging()
    summary = run(tyro.cli(Config, args=argv))
    print_summary(summary)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
