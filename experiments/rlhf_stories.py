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

  python experiments/rlhf_stories.py                 # default, a few minutes on 2 CPU cores

Writes into --output-dir: metrics.jsonl, summary.json (with sample texts), rlhf.png.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import tyro

import jaxalign.data as jd
from jaxalign.metrics import MetricsWriter, plot_metrics, setup_logging
from jaxalign.models import init_scalar_model, load_pretrained
from jaxalign.optim import OptimConfig, make_optimizer
from jaxalign.rewards import keyword_reward, weighted_sum
from jaxalign.rollout import decode_completions, init_actor_critic, ppo_rollout, reward_model_scorer
from jaxalign.trainers import (
    adaptive_kl_coef,
    create_train_state,
    evaluate_reward_model,
    make_ppo_step,
    make_reward_eval_step,
    make_reward_step,
    ppo_update,
)
from jaxalign.trainers.rl_loop import PolicySamples, evaluate_policy

log = logging.getLogger("rlhf_stories")

_STORIES = Path(__file__).resolve().parents[1].parent / "shared/data/models/stories260K"

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
    model: str = str(_STORIES / "stories260K.bin")
    """llama2.c .bin or Hugging Face Llama directory: the SFT policy and reference."""
    tokenizer: str = str(_STORIES / "tok512.model")
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
    critic: Literal["separate", "shared"] = "separate"
    """separate: a critic initialised from the reward model (InstructGPT); shared: a value head
    on the policy trunk."""
    temperature: float = 1.0
    progress: bool = True


def _examples(prompt_ids: list[int], tokens: np.ndarray, length: int) -> jd.Example:
    """[prompt ids; completion ids up to length] with the completion mask, as token ids were
    sampled (no decode/re-encode round trip, so the RM scores exactly what PPO will feed it)."""
    ids = np.asarray(list(prompt_ids) + tokens[:length].tolist(), np.int32)
    mask = np.zeros(len(ids), np.float32)
    mask[len(prompt_ids):] = 1.0
    return jd.Example(ids, mask)


def sample(params, config, tok, prompts, *, samples: int, cfg: Config, rng: jax.Array, ref_params=None):
    """`evaluate_policy` (gold rewards) over `prompts` in chunks of exactly `cfg.ppo_batch` rows,
    prompts padded to one width: every generation of the run then has one shape and compiles
    once. Returns (PolicySamples of all rows, prompt tokens [rows, P], prompt mask [rows, P]).

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
            reward_fn=gold_score, decode=tok.decode, rng=key, max_new_tokens=cfg.max_new_tokens,
            eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=cfg.temperature, samples=samples,
            ref_params=ref_params,
        ))
    joined = PolicySamples(
        completions=[c for part in parts for c in part.completions],
        rewards=np.concatenate([part.rewards for part in parts]),
        kl=None if ref_params is None else np.concatenate([part.kl for part in parts]),
        tokens=np.concatenate([part.tokens for part in parts]),
        lengths=np.concatenate([part.lengths for part in parts]),
    )
    return joined, np.repeat(tokens, samples, axis=0), np.repeat(mask, samples, axis=0)


def preference_pairs(params, config, tok, prompts, *, cfg: Config, rng: jax.Array, seed: int):
    """Samples K answers per prompt, ranks them by gold and returns PreferenceExamples, with the
    share of tied pairs and the mean gold of the samples."""
    examples, ties, golds = [], 0, []
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
    return examples, ties, float(np.mean(golds))


def run(cfg: Config) -> dict:
    """Runs the three stages; returns (and writes) the summary."""
    t_start = time.perf_counter()
    tok = jd.load_tokenizer(cfg.tokenizer)
    config, sft_params = load_pretrained(cfg.model)
    writer = MetricsWriter(cfg.output_dir)
    prompts = make_prompts()
    held_out, train_prompts = prompts[: cfg.eval_prompts], prompts[cfg.eval_prompts:]
    per_chunk = cfg.ppo_batch // cfg.rm_samples  # whole sampling chunks on both sides of the split
    n_val = max(1, round(len(train_prompts) * cfg.rm_val_fraction / per_chunk)) * per_chunk
    rm_val_prompts, rm_train_prompts = train_prompts[:n_val], train_prompts[n_val:]
    rng = jax.random.key(cfg.seed)

    # --- stage 2: reward model on gold-ranked samples of the policy
    train_pairs, ties, gold_means = [], 0, []
    for r in range(cfg.rm_rounds):
        rng, key = jax.random.split(rng)
        ex, t, g = preference_pairs(sft_params, config, tok, rm_train_prompts, cfg=cfg, rng=key, seed=cfg.seed + r)
        train_pairs += ex
        ties += t
        gold_means.append(g)
    rng, key = jax.random.split(rng)
    val_pairs, _, _ = preference_pairs(sft_params, config, tok, rm_val_prompts, cfg=cfg, rng=key, seed=cfg.seed + 99)
    log.info("reward model: %d train pairs (%d tied pairs dropped), %d held-out pairs", len(train_pairs), ties, len(val_pairs))
    width = 8 * -(-max(len(s.tokens) for p in train_pairs + val_pairs for s in p) // 8)
    collate = functools.partial(jd.collate_preference, batch_size=cfg.rm_batch, buckets=(width,), pad_id=tok.pad_id)
    rng, key = jax.random.split(rng)
    rm_params = init_scalar_model(config, key, jax.tree.map(jnp.copy, sft_params))
    tx, schedule = make_optimizer(OptimConfig(learning_rate=cfg.rm_lr, warmup_steps=10, total_steps=cfg.rm_steps))
    state = create_train_state(rm_params, tx, cfg.seed)
    step = make_reward_step(config, tx, schedule)
    eval_step = make_reward_eval_step(config)

    def rm_eval(p) -> dict:
        return evaluate_reward_model(eval_step, p, jd.eval_batches(val_pairs, batch_size=cfg.rm_batch, collate=collate))

    rm_before = rm_eval(state.params)
    stream = jd.BatchStream(train_pairs, cfg.rm_batch, cfg.seed, collate)
    for i in range(cfg.rm_steps):
        state, metrics = step(state, stream.batch_at(i))
        if (i + 1) % 25 == 0 or i + 1 == cfg.rm_steps:
            writer.write(i + 1, jax.device_get(metrics), stage="reward_model")
    rm_params = state.params
    rm_after = rm_eval(rm_params)
    writer.write(cfg.rm_steps, rm_after, stage="reward_model_eval")
    log.info("reward model held-out pairwise accuracy %.3f -> %.3f", rm_before["accuracy"], rm_after["accuracy"])
    score_fn = reward_model_scorer(rm_params, config)

    # --- evaluation on held-out prompts: gold, RM score, KL to the reference
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

    before, samples_before = policy_eval(sft_params)
    log.info("before PPO: %s", before)
    writer.write(0, before, stage="ppo_eval")

    # --- stage 3: PPO against the reward model
    rng, key = jax.random.split(rng)
    critic = None
    if cfg.critic == "separate":
        critic = jax.tree.map(jnp.copy, rm_params)  # InstructGPT: value function from the RM
    params = init_actor_critic(jax.tree.map(jnp.copy, sft_params), critic, config=config, rng=key)
    updates = cfg.ppo_iterations * cfg.epochs * cfg.num_minibatches
    tx, schedule = make_optimizer(OptimConfig(
        learning_rate=cfg.ppo_lr, warmup_steps=0, total_steps=updates, end_learning_rate=cfg.ppo_lr, weight_decay=0.0,
    ))
    step = make_ppo_step(config, tx, schedule, critic=cfg.critic, vf_coef=cfg.vf_coef, ent_coef=cfg.ent_coef)
    state = create_train_state(params, tx, cfg.seed + 1)
    kl_coef, scores, golds = cfg.kl_coef, [], []
    t0 = time.perf_counter()
    for it in range(1, cfg.ppo_iterations + 1):
        idx = np.random.default_rng(cfg.seed + it).choice(len(train_prompts), cfg.ppo_batch, replace=False)
        tokens, mask = jd.collate_prompts([train_prompts[i] for i in idx], tok, length=PROMPT_WIDTH)
        rng, key = jax.random.split(rng)
        rollout, roll = ppo_rollout(
            state.params, config, tokens, mask, ref_params=sft_params, score_fn=score_fn, rng=key,
            max_new_tokens=cfg.max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id,
            temperature=cfg.temperature, kl_coef=kl_coef, critic=cfg.critic,
        )
        texts = decode_completions(
            rollout.completion_tokens, rollout.completion_mask.sum(1).astype(jnp.int32), tok.decode, tok.eos_id
        )
        gold = float(gold_score(texts).mean())
        state, upd = ppo_update(step, state, rollout, epochs=cfg.epochs, num_minibatches=cfg.num_minibatches, seed=it)
        scores.append(roll["score"])
        golds.append(gold)
        writer.write(it, {**roll, **upd, "gold": gold}, stage="ppo")
        if cfg.kl_target is not None:
            kl_coef = adaptive_kl_coef(kl_coef, roll["kl"], cfg.ppo_batch, target=cfg.kl_target, horizon=cfg.kl_horizon)
        log.info("iteration %d: RM score %.3f, gold %.3f, KL %.3f, beta %.4f", it, roll["score"], gold, roll["kl"], kl_coef)
    ppo_seconds = time.perf_counter() - t0
    after, samples_after = policy_eval(state.params["policy"])
    writer.write(cfg.ppo_iterations, after, stage="ppo_eval")
    writer.close()
    k = max(1, len(scores) // 5)
    summary = {
        "rm_train_pairs": len(train_pairs),
        "rm_heldout_pairs": int(rm_after["pairs"]),
        "rm_heldout_accuracy_before": rm_before["accuracy"],
        "rm_heldout_accuracy": rm_after["accuracy"],
        "policy_gold_mean_of_samples": float(np.mean(gold_means)),
        **{f"{key}_before": v for key, v in before.items()},
        **{f"{key}_after": v for key, v in after.items()},
        "train_rm_score_first": float(np.mean(scores[:k])),
        "train_rm_score_last": float(np.mean(scores[-k:])),
        "train_gold_first": float(np.mean(golds[:k])),
        "train_gold_last": float(np.mean(golds[-k:])),
        "final_kl_coef": kl_coef,
        "ppo_seconds": ppo_seconds,
        "total_seconds": time.perf_counter() - t_start,
        "samples_before": samples_before,
        "samples_after": samples_after,
    }
    (cfg.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_metrics(
        writer.path, cfg.output_dir / "rlhf.png",
        [("ppo", "score"), ("ppo", "gold"), ("ppo", "kl"), ("ppo", "kl_coef"), ("ppo", "explained_variance"),
         ("reward_model", "accuracy")],
        title="RLHF on stories260K",
    )
    return summary


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point: prints the before/after table."""
    setup_logging()
    s = run(tyro.cli(Config, args=argv))
    print(f"reward model: {s['rm_train_pairs']} train pairs, held-out pairwise accuracy vs gold "
          f"{s['rm_heldout_accuracy_before']:.3f} -> {s['rm_heldout_accuracy']:.3f} ({s['rm_heldout_pairs']} pairs)")
    print(f"{'held-out prompts':<24}{'before PPO':>12}{'after PPO':>12}")
    for key in ("gold", "rm_score", "kl", "length"):
        print(f"{'  ' + key:<24}{s[key + '_before']:>12.3f}{s[key + '_after']:>12.3f}")
    for label in ("before", "after"):
        print(f"samples {label}:")
        for text in s[f"samples_{label}"]:
            print("  " + text.replace("\n", " "))
    return s


if __name__ == "__main__":
    main(sys.argv[1:])
