"""RLHF in three stages on a real pretrained model (InstructGPT, arXiv 2203.02155):
policy -> reward model from ranked samples -> PPO against the reward model.

* Stage 1 (the SFT policy) is the real llama2.c TinyStories model stories260K
  (`../shared/data/models/stories260K/`): it already writes the kind of text we want, so it plays
  the role of InstructGPT's SFT model and is also the frozen reference.
* The "gold" preference stands in for human labelers and is measurable: a sentiment lexicon.
  gold(text) = min(#positive words, 3) − min(#negative words, 3) (`jaxalign.rewards.keyword_reward`;
  the cap makes repeating one word worthless).
* Stage 2: K samples per prompt from the policy, ranked by gold, expanded to at most
  `max_pairs` pairs per prompt (`jaxalign.data.ranked_pairs`; ties dropped), a reward model
  (stories260K's trunk + a scalar head) trained with the Bradley–Terry loss; held-out pairwise
  accuracy is measured against gold on prompts it never saw.
* Stage 3: PPO (clipped policy and value losses, GAE, per-token k1 KL penalty with the adaptive
  controller of Ziegler et al. 2019, a critic initialised from the reward model as InstructGPT
  does, 4 epochs over 2 minibatches per rollout). The policy never sees gold; it is measured on
  held-out prompts before and after, with the RM score and the KL to the reference.
* PPO-ptx (InstructGPT Eq. 2, `--ptx-coef γ` > 0): every PPO step also minimises γ·(token-mean
  NLL) of `--ptx-batch` stories. InstructGPT draws them from the pretraining distribution;
  stories260K's (TinyStories) is not in ../shared/data, so D_pretrain here is the SFT model's own
  stage-2 samples (opening + completion, every token after the first counted), which it
  generated from that distribution: the term pulls the policy back towards π_SFT (a forward-KL
  regulariser, on top of the reward's reverse KL). Batch n of the run is drawn with
  `default_rng([seed, n])`, a function of the optimizer step, so a resumed run draws the same.

  python -m experiments.rlhf_stories                 # default, a few minutes on 2 CPU cores
  python -m experiments.rlhf_stories --ptx-coef 1.0  # PPO-ptx

Writes into --output-dir: config.json, metrics.jsonl, summary.json (with sample texts), rlhf.png,
checkpoints/{reward_model,ppo}/. `--resume` continues a killed run exactly (the RM's pairs are
re-sampled with the same keys, so they are the same pairs).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

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
    format_table,
    load_model_and_tokenizer,
    log_once,
    resume_or_start,
    train_reward_model,
    trend,
)
from jaxalign import (
    OptimConfig,
    SamplingConfig,
    create_train_state,
    evaluate_policy,
    init_actor_critic,
    init_scalar_model,
    keyword_reward,
    make_optimizer,
    make_ppo_step,
    plot_metrics,
    read_metrics,
    reward_model_scorer,
    weighted_sum,
)
from jaxalign.metrics import setup_logging
from jaxalign.rollout import decode_completions
from jaxalign.trainers.ppo import PtxBatchAt
from jaxalign.trainers.rl_loop import PPOState, ppo_loop

log = logging.getLogger("rlhf_stories")

POSITIVE = ("happy", "happily", "love", "loved", "loves", "fun", "smile", "smiled", "smiles", "nice",
            "kind", "friend", "friends", "laugh", "laughed", "beautiful", "great", "best", "glad",
            "proud", "excited", "yummy", "pretty", "safe", "hug", "hugged", "thank", "thanked")
NEGATIVE = ("sad", "cry", "cried", "crying", "angry", "scared", "afraid", "hurt", "bad", "mad",
            "upset", "sorry", "lost", "broke", "broken", "mean", "ouch", "fell", "sick", "alone",
            "worried", "tears", "frown", "frowned", "shout", "shouted")
CAP = 3
PROMPT_WIDTH = 32
"""Prompt tokens, left-padded, so that every batch has one shape (BOS + the longest opening is 26
tok512 tokens; a longer prompt would keep its last 32)."""

gold_score = weighted_sum(
    (functools.partial(keyword_reward, keywords=POSITIVE, cap=CAP), float(CAP)),
    (functools.partial(keyword_reward, keywords=NEGATIVE, cap=CAP), -float(CAP)),
)
gold_score.__doc__ = "Sentiment gold: min(#positive, 3) − min(#negative, 3) lexicon words."

NAMES = ("Lily", "Tom", "Sue", "Ben", "Mia", "Max", "Anna", "Sam", "Lucy", "Tim", "Kate", "Jack",
         "Emma", "Bob", "Zoe", "Leo")
OPENINGS = ("Once upon a time, there was a little girl named {}.",
            "Once upon a time, there was a boy named {}.",
            "One day, {} went to the park.",
            "{} had a big red ball.",
            "{} and his mom went to the store.",
            "It was a sunny day. {} wanted to play outside.",
            "{} saw a cat in the garden.",
            "{} found a box under the bed.")


def make_prompts() -> list[str]:
    """The 128 story openings (8 templates × 16 names), in a fixed shuffled order."""
    prompts = [o.format(n) for o in OPENINGS for n in NAMES]
    return [prompts[i] for i in np.random.default_rng(0).permutation(len(prompts))]


@dataclasses.dataclass
class Config:
    """Policy (stories260K) -> reward model on gold-ranked samples -> PPO."""

    output_dir: Path = Path("runs/rlhf_stories")
    model: str = STORIES260K_MODEL
    """llama2.c .bin or Hugging Face Llama directory: the SFT policy and reference."""
    tokenizer: str = STORIES260K_TOKENIZER
    seed: int = 0
    max_new_tokens: int = 48
    eval_prompts: int = 32
    """Held out from both the reward model and PPO (the first N of `make_prompts`)."""
    eval_samples: int = 4
    # --- stage 2: reward model
    rm_samples: int = 4
    """K answers sampled per prompt for ranking."""
    max_pairs: int = 10
    """Cap on the C(K, 2) pairs of one prompt."""
    rm_rounds: int = 3
    """Passes of sampling over the training prompts (more pairs)."""
    rm_steps: int = 300
    rm_batch: int = 32
    rm_lr: float = 1e-3
    rm_val_fraction: float = 0.2
    """Training prompts whose pairs are held out to measure the reward model."""
    # --- stage 3: PPO
    ppo_iterations: int = 30
    ppo_batch: int = 32
    """Prompts (= samples) per rollout."""
    epochs: int = 4
    num_minibatches: int = 2
    ppo_lr: float = 1e-4
    kl_coef: float = 0.1
    kl_target: float | None = 4.0
    """Adaptive KL target in nats per response (None: fixed kl_coef)."""
    kl_horizon: float = 200.0
    """Samples over which the controller closes most of the gap (Ziegler: 10,000 at batch 512;
    shorter here because the whole run is ~1,000 samples)."""
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    ptx_coef: float = 0.0
    """PPO-ptx γ (InstructGPT Eq. 2): the weight of the token-mean NLL of stage-2 SFT samples added
    to every PPO step's loss (0: plain PPO). See `jaxalign.trainers.ppo_batch_loss` for its scale."""
    ptx_batch: int = 8
    """Stories per PPO-ptx batch."""
    critic: Literal["separate", "shared"] = "separate"
    """separate: a critic initialised from the reward model (InstructGPT); shared: a value head
    on the policy trunk."""
    temperature: float = 1.0
    checkpoint_every: int = 50
    """Steps (RM) / iterations (PPO) between checkpoints; each stage also saves at its end."""
    resume: bool = False
    """Continue the run in --output-dir from its latest checkpoints (same samples, keys, records)."""
    progress: bool = True


def _examples(prompt_ids: list[int], tokens: np.ndarray, length: int) -> jd.Example:
    """[prompt ids; completion ids up to length] with the completion mask, as token ids were
    sampled (no decode/re-encode round trip, so the RM scores exactly what PPO will feed it)."""
    ids = np.asarray(list(prompt_ids) + tokens[:length].tolist(), np.int32)
    mask = np.zeros(len(ids), np.float32)
    mask[len(prompt_ids):] = 1.0
    return jd.Example(ids, mask)


class Drawn(NamedTuple):
    """Host arrays of samples drawn over several `evaluate_policy` chunks, joined."""

    completions: list[str]
    rewards: np.ndarray
    kl: np.ndarray | None
    tokens: np.ndarray
    lengths: np.ndarray


def sample(params, config, tok, prompts, *, samples: int, cfg: Config, rng: jax.Array, ref_params=None):
    """`evaluate_policy` (gold rewards) over `prompts` in chunks of exactly `cfg.ppo_batch` rows,
    prompts padded to one width: every generation of the run then has one shape and compiles
    once. Returns (`Drawn` of all rows, prompt tokens [rows, P], prompt mask [rows, P]).

    Raises:
      ValueError: the prompts do not fill whole chunks of ppo_batch // samples prompts.
    """
    per_chunk = cfg.ppo_batch // samples
    if cfg.ppo_batch % samples or len(prompts) % per_chunk:
        raise ValueError(f"{len(prompts)} prompts × {samples} samples do not fill chunks of ppo_batch={cfg.ppo_batch} rows")
    tokens, mask = jd.collate_prompts(prompts, tok, length=PROMPT_WIDTH)
    parts = []
    for start in range(0, len(prompts), per_chunk):
        rng, key = jax.random.split(rng)
        parts.append(evaluate_policy(
            params, config, tokens[start:start + per_chunk], mask[start:start + per_chunk],
            reward_fn=gold_score, decode=tok.decode, rng=key, samples=samples,
            ref_params=ref_params, sampling=SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, eos_id=tok.eos_id, pad_id=tok.pad_id),))
    joined = Drawn(
        completions=[c for part in parts for c in part.completions],
        rewards=np.concatenate([part.rewards for part in parts]),
        kl=None if ref_params is None else np.concatenate([part.batch.kl() for part in parts]),
        tokens=np.concatenate([np.asarray(part.batch.completion_tokens) for part in parts]),
        lengths=np.concatenate([np.asarray(part.batch.lengths) for part in parts]),
    )
    return joined, np.repeat(tokens, samples, axis=0), np.repeat(mask, samples, axis=0)


def preference_pairs(params, config, tok, prompts, *, cfg: Config, rng: jax.Array, seed: int):
    """Samples K answers per prompt, ranks them by gold and returns PreferenceExamples, the
    number of tied pairs, the mean gold of the samples, and every sample as an `Example`."""
    examples, ties, golds, drawn = [], 0, [], []
    order = np.random.default_rng(seed)
    samples, _, _ = sample(params, config, tok, prompts, samples=cfg.rm_samples, cfg=cfg, rng=rng)
    k = cfg.rm_samples
    for b, prompt in enumerate(prompts):
        prompt_ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(prompt)
        rows = range(b * k, (b + 1) * k)
        scores = samples.rewards[b * k:(b + 1) * k]
        golds.extend(scores.tolist())
        pairs = jd.ranked_pairs(scores, max_pairs=cfg.max_pairs, rng=order)
        ties += int(np.sum(np.triu(scores[:, None] == scores[None, :], 1)))
        side = {r: _examples(prompt_ids, samples.tokens[r], int(samples.lengths[r])) for r in rows}
        examples.extend(jd.PreferenceExample(side[b * k + c], side[b * k + r]) for c, r in pairs)
        drawn.extend(side[r] for r in rows)
    return examples, ties, float(np.mean(golds)), drawn


def ptx_batches(samples: Sequence[jd.Example], *, batch_size: int, seed: int, pad_id: int) -> PtxBatchAt:
    """PPO-ptx's `ptx_batch_at(n)`: `batch_size` distinct stories of `samples` (opening and
    completion as language-model text: every token after the first counted) drawn with
    `default_rng([seed, n])`, right-padded to one width (one compiled shape), so batch n is a
    pure function of n and a resumed run draws what the killed one would have.

    Raises:
      ValueError: fewer samples than batch_size.
    """
    if len(samples) < batch_size:
        raise ValueError(f"PPO-ptx needs >= ptx_batch={batch_size} samples, got {len(samples)}")
    texts = [jd.Example(e.tokens, (np.arange(len(e.tokens)) > 0).astype(np.float32)) for e in samples]
    width = 8 * -(-max(len(e.tokens) for e in texts) // 8)

    def ptx_batch_at(n: int) -> dict[str, np.ndarray]:
        idx = np.random.default_rng([seed, n]).choice(len(texts), batch_size, replace=False)
        return jd.collate_sft([texts[i] for i in idx], batch_size=batch_size, buckets=(width,), pad_id=pad_id)

    return ptx_batch_at


def _prompt_split(cfg: Config) -> tuple[list[str], list[str], list[str], list[str]]:
    """(held_out, train_prompts, rm_val_prompts, rm_train_prompts) of `make_prompts`."""
    prompts = make_prompts()
    held_out, train_prompts = prompts[: cfg.eval_prompts], prompts[cfg.eval_prompts:]
    per_chunk = cfg.ppo_batch // cfg.rm_samples  # whole sampling chunks on both sides of the split
    n_val = max(1, round(len(train_prompts) * cfg.rm_val_fraction / per_chunk)) * per_chunk
    return held_out, train_prompts, train_prompts[:n_val], train_prompts[n_val:]


def _optim_configs(cfg: Config) -> tuple[OptimConfig, OptimConfig]:
    """The reward model's and PPO's optimiser settings, built (and validated) before any compute.
    The RM warms up over a tenth of its steps, at most 10 (the figures in README used 10 of 300)."""
    rm = OptimConfig(learning_rate=cfg.rm_lr, warmup_steps=min(10, cfg.rm_steps // 10), total_steps=cfg.rm_steps)
    ppo = OptimConfig(
        learning_rate=cfg.ppo_lr, warmup_steps=0, total_steps=cfg.ppo_iterations * cfg.epochs * cfg.num_minibatches,
        end_learning_rate=cfg.ppo_lr, weight_decay=0.0,
    )
    return rm, ppo


def reward_model_stage(cfg, config, tok, sft_params, prompts, optim, writer, rng) -> tuple[dict, jax.Array, dict, list]:
    """Stage 2: gold-ranked pairs of the policy's samples -> a Bradley-Terry RM (stories260K's
    trunk + a fresh head). Returns (rm_params, rng advanced past the stage's keys, figures, the
    SFT model's samples on the RM's training prompts as `Example`s, PPO-ptx's data); resumable
    from checkpoints/reward_model (the samples are re-drawn with the same keys)."""
    _, _, rm_val_prompts, rm_train_prompts = prompts
    train_pairs, ties, gold_means, drawn = [], 0, [], []
    for r in range(cfg.rm_rounds):
        rng, key = jax.random.split(rng)
        ex, t, g, d = preference_pairs(sft_params, config, tok, rm_train_prompts, cfg=cfg, rng=key, seed=cfg.seed + r)
        train_pairs += ex
        ties += t
        gold_means.append(g)
        drawn += d
    rng, key = jax.random.split(rng)
    val_pairs, _, _, _ = preference_pairs(sft_params, config, tok, rm_val_prompts, cfg=cfg, rng=key, seed=cfg.seed + 99)
    log.info("reward model: %d train pairs (%d tied pairs dropped), %d held-out pairs", len(train_pairs), ties, len(val_pairs))
    width = 8 * -(-max(len(s.tokens) for p in train_pairs + val_pairs for s in p) // 8)
    collate = functools.partial(jd.collate_preference, batch_size=cfg.rm_batch, buckets=(width,), pad_id=tok.pad_id)
    rng, key = jax.random.split(rng)
    state, before, after, _ = train_reward_model(
        config, init_scalar_model(config, key, jax.tree.map(jnp.copy, sft_params)), train_pairs, val_pairs,
        optim=optim, collate=collate, batch_size=cfg.rm_batch, seed=cfg.seed, writer=writer,
        checkpoint_dir=cfg.output_dir / "checkpoints" / "reward_model", checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=2, resume=cfg.resume, num_steps=cfg.rm_steps, log_every=25, progress=cfg.progress,
    )
    return state.params, rng, {
        "rm_train_pairs": len(train_pairs),
        "rm_heldout_pairs": int(after["pairs"]),
        "rm_heldout_accuracy_before": before["accuracy"],
        "rm_heldout_accuracy": after["accuracy"],
        "policy_gold_mean_of_samples": float(np.mean(gold_means)),
    }, drawn


def make_policy_eval(cfg: Config, config, tok, held_out: list[str], sft_params, score_fn):
    """`policy_eval(policy) -> (figures, texts)` on the held-out prompts: the mean gold, RM score,
    KL to the SFT model and length of --eval-samples samples per prompt, and 3 sample texts."""

    def policy_eval(policy) -> tuple[dict, list[str]]:
        s, prompt_tokens, prompt_mask = sample(
            policy, config, tok, held_out, samples=cfg.eval_samples, cfg=cfg,
            rng=jax.random.key(cfg.seed + 7), ref_params=sft_params,
        )
        reps = cfg.eval_samples
        cmask = (np.arange(s.tokens.shape[1])[None] < s.lengths[:, None]).astype(np.float32)
        rm = np.concatenate([  # the RM in ppo_batch-row chunks too (one compiled shape)
            score_fn(*(jnp.asarray(x[i:i + cfg.ppo_batch]) for x in (prompt_tokens, prompt_mask, s.tokens, cmask)))
            for i in range(0, len(cmask), cfg.ppo_batch)
        ])
        texts = [f"{held_out[i // reps]} {s.completions[i]}" for i in range(0, 3 * reps, reps)]
        return {"gold": float(s.rewards.mean()), "rm_score": float(np.mean(rm)), "kl": float(s.kl.mean()),
                "length": float(s.lengths.mean())}, texts

    return policy_eval


def ppo_setup(cfg: Config, config, sft_params, rm_params, optim: OptimConfig, key: jax.Array):
    """PPO's (step, manager, initial or restored PPOState): the policy from the SFT model, the
    critic from the RM (InstructGPT §3.5) or a value head on the policy trunk, β = --kl-coef."""
    critic = jax.tree.map(jnp.copy, rm_params) if cfg.critic == "separate" else None  # InstructGPT: V from the RM
    params = init_actor_critic(jax.tree.map(jnp.copy, sft_params), critic, config=config, rng=key)
    tx, schedule = make_optimizer(optim)
    step = make_ppo_step(  # critic: from the tree; ptx_coef = 0 is plain PPO
        config, tx, schedule, vf_coef=cfg.vf_coef, ent_coef=cfg.ent_coef, ptx_coef=cfg.ptx_coef
    )
    state = PPOState(create_train_state(params, tx, cfg.seed + 1), jnp.float32(cfg.kl_coef))
    manager, state = resume_or_start(
        cfg.output_dir / "checkpoints" / "ppo", state, resume=cfg.resume, save_every=cfg.checkpoint_every, keep=2
    )
    return step, manager, state


def ppo_stage(cfg, config, tok, sft_params, rm_params, prompts, optim, writer, rng, ptx_samples) -> tuple[dict, dict]:
    """Stage 3: PPO against the RM (critic from the RM, InstructGPT §3.5), adaptive β, PPO-ptx on
    `ptx_samples` when --ptx-coef > 0, measured on held-out prompts with gold, RM score and KL.
    Returns (figures, sample texts); resumable from checkpoints/ppo."""
    held_out, train_prompts, _, _ = prompts
    score_fn = reward_model_scorer(rm_params, config)
    policy_eval = make_policy_eval(cfg, config, tok, held_out, sft_params, score_fn)
    before, samples_before = policy_eval(sft_params)
    log.info("before PPO: %s", before)
    log_once(writer, 0, before, stage="ppo_eval")
    rng, key = jax.random.split(rng)
    step, manager, state = ppo_setup(cfg, config, sft_params, rm_params, optim, key)

    def prompts_at(it):  # a pure function of (seed, iteration)
        idx = np.random.default_rng(cfg.seed + it).choice(len(train_prompts), cfg.ppo_batch, replace=False)
        return jd.collate_prompts([train_prompts[i] for i in idx], tok, length=PROMPT_WIDTH)

    def gold_of(output) -> dict[str, float]:
        rollout = output.batch
        texts = decode_completions(
            rollout.completion_tokens, rollout.completion_mask.sum(1).astype(jnp.int32), tok.decode, tok.eos_id
        )
        return {"gold": float(gold_score(texts).mean())}

    ptx_batch_at = None if cfg.ptx_coef == 0 else ptx_batches(
        ptx_samples, batch_size=cfg.ptx_batch, seed=cfg.seed, pad_id=tok.pad_id
    )
    state, loop = ppo_loop(
        step, state, prompts_at, config=config, num_iterations=cfg.ppo_iterations, rng=rng, writer=writer,
        ref_params=sft_params, score_fn=score_fn, epochs=cfg.epochs, num_minibatches=cfg.num_minibatches,
        kl_target=cfg.kl_target, kl_horizon=cfg.kl_horizon, rollout_metrics=gold_of, checkpoints=manager,
        progress=cfg.progress, ptx_batch_at=ptx_batch_at,
        sampling=SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, eos_id=tok.eos_id, pad_id=tok.pad_id),
    )
    after, samples_after = policy_eval(state.train.params["policy"])
    log_once(writer, cfg.ppo_iterations, after, stage="ppo_eval")
    golds = [r["gold"] for r in read_metrics(writer.path) if r["stage"] == "ppo"]
    return {
        **before_after(before, after),
        **trend("train_rm_score", loop["score"]),
        **trend("train_gold", golds),
        "final_kl_coef": float(state.kl_coef),
        "ppo_seconds": loop["rollout_seconds"] + loop["update_seconds"],
    }, {"samples_before": samples_before, "samples_after": samples_after}


def run(cfg: Config) -> dict:
    """Runs the three stages; returns (and writes) the summary."""
    t_start = time.perf_counter()
    run_dir = RunDir.open(cfg)
    if (done := run_dir.finished_summary()) is not None:
        return done
    rm_optim, ppo_optim = _optim_configs(cfg)  # bad step counts are refused before any sampling
    if cfg.ptx_coef < 0 or cfg.ptx_batch < 1:
        raise ValueError(f"--ptx-coef must be >= 0 and --ptx-batch >= 1, got {cfg.ptx_coef}, {cfg.ptx_batch}")
    config, sft_params, tok = load_model_and_tokenizer(cfg.model, cfg.tokenizer)
    prompts = _prompt_split(cfg)
    writer = run_dir.begin()
    rng = jax.random.key(cfg.seed)  # one key chain through both stages
    rm_params, rng, rm_figures, samples = reward_model_stage(cfg, config, tok, sft_params, prompts, rm_optim, writer, rng)
    ppo_figures, texts = ppo_stage(cfg, config, tok, sft_params, rm_params, prompts, ppo_optim, writer, rng, samples)
    writer.close()
    plot_metrics(
        writer.path, cfg.output_dir / "rlhf.png",
        [("ppo", "score"), ("ppo", "gold"), ("ppo", "kl"), ("ppo", "kl_coef"), ("ppo", "explained_variance"),
         ("reward_model", "accuracy"), *([("ppo", "ptx_loss")] if cfg.ptx_coef > 0 else [])],
        title="RLHF on stories260K",
    )
    return run_dir.write_summary(
        {**rm_figures, **ppo_figures, "total_seconds": time.perf_counter() - t_start, **texts}
    )


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point: prints the before/after table."""
    setup_logging()
    s = run(tyro.cli(Config, args=argv))
    print(f"reward model: {s['rm_train_pairs']} train pairs, held-out pairwise accuracy vs gold "
          f"{s['rm_heldout_accuracy_before']:.3f} -> {s['rm_heldout_accuracy']:.3f} ({s['rm_heldout_pairs']} pairs)")
    print(format_table("held-out prompts", ("before PPO", "after PPO"),
                       [("  " + key, s[key + "_before"], s[key + "_after"]) for key in ("gold", "rm_score", "kl", "length")],
                       widths=(24, 12, 12)))
    for label in ("before", "after"):
        print(f"samples {label}:")
        for text in s[f"samples_{label}"]:
            print("  " + text.replace("\n", " "))
    return s


if __name__ == "__main__":
    main(sys.argv[1:])
