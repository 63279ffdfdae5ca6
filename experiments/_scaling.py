"""Inference-time scaling figures for the experiments with a verifiable answer (arithmetic, GSM8K).

n samples per held-out prompt come from one prefill (`generate(..., num_samples=n)`); from them,
for k = 1 … n:

* pass@k: the unbiased estimator over all n samples (`jaxalign.search.pass_at_k`); equal to
  best-of-k under a perfect verifier, the ceiling of every selection below;
* maj@k: self-consistency, the majority answer of the first k samples (`majority_vote`);
* weighted maj@k: the vote weighted by each sample's confidence, exp(mean token log-prob) ∈ (0, 1];
* best-of-k (confidence): the first k samples' most confident one (`best_of_n`), a verifier-free
  best-of-N. A reward model or a learned verifier would take its place where one is trained.

Answers are compared as `jaxalign.rewards.extract_answer` reads them (exact Decimals).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import jax
import numpy as np

import jaxalign.data as jd
from jaxalign import SamplingConfig, generate
from jaxalign.rewards import extract_answer
from jaxalign.rollout import decode_completions
from jaxalign.search import best_of_n, majority_vote, pass_at_k

CURVES = ("pass", "maj", "weighted_maj", "best_of_confidence")


def _sample_answers(params, config, tokenizer, tokens, mask, *, samples, sampling, seed):
    """(predicted answers [b][n], confidence [b, n]) of n samples per prompt of one batch."""
    gen = jax.device_get(generate(params, config, tokens, mask, sampling=sampling, rng=jax.random.key(seed),
                                  num_samples=samples))
    texts = decode_completions(gen.tokens, gen.lengths, tokenizer.decode, sampling.eos_id)
    b, n = len(tokens), samples
    predicted = [[extract_answer(texts[i * n + j]) for j in range(n)] for i in range(b)]
    lengths = np.maximum(gen.lengths, 1).reshape(b, n)
    confidence = np.exp(np.where(gen.mask > 0, gen.model_logps, 0.0).sum(-1).reshape(b, n) / lengths)  # (0, 1]
    return predicted, confidence


def scaling_figures(
    params, config, tokenizer: jd.Tokenizer, batches: Iterable[tuple[np.ndarray, np.ndarray, Sequence[str]]], *,
    samples: int, sampling: SamplingConfig, seed: int,
) -> dict[str, list[float]]:
    """`{curve: [accuracy at k = 1 … samples]}` for the CURVES over held-out prompts, given as
    batches of (left-padded prompt tokens [b, P], their mask, the b reference answers)."""
    predicted, confidence, gold = [], [], []
    for index, (tokens, mask, answers) in enumerate(batches):
        rows, conf = _sample_answers(params, config, tokenizer, tokens, mask, samples=samples, sampling=sampling,
                                     seed=seed + index)
        predicted += rows
        confidence.append(conf)
        gold += [extract_answer(a) for a in answers]
    confidence = np.concatenate(confidence)  # [B,n]
    correct = np.array([[p is not None and p == g for p in row] for row, g in zip(predicted, gold)])  # [B,n]
    b, n = correct.shape
    figures: dict[str, list[float]] = {name: [] for name in CURVES}
    for k in range(1, n + 1):
        figures["pass"].append(float(pass_at_k(np.full(b, n), correct.sum(1), k).mean()))
        votes = majority_vote([row[:k] for row in predicted])
        weighted = majority_vote([row[:k] for row in predicted], weights=[list(c[:k]) for c in confidence])
        figures["maj"].append(float(np.mean([v is not None and v == g for v, g in zip(votes, gold)])))
        figures["weighted_maj"].append(float(np.mean([v is not None and v == g for v, g in zip(weighted, gold)])))
        best = best_of_n(confidence[:, :k])
        figures["best_of_confidence"].append(float(correct[np.arange(b), best].mean()))
    return figures


def scaling_table(figures: dict[str, list[float]]) -> str:
    """The figures as a text table, one row per k."""
    lines = ["  k  " + "".join(f"{name:>20}" for name in CURVES)]
    for k in range(len(figures["pass"])):
        lines.append(f"{k + 1:>3}  " + "".join(f"{figures[name][k]:>20.3f}" for name in CURVES))
    return "\n".join(lines)


def plot_scaling(figures: dict[str, list[float]], out_png: Path, *, title: str) -> None:
    """Accuracy against k for each curve, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ks = np.arange(1, len(figures["pass"]) + 1)
    for name in CURVES:
        ax.plot(ks, figures[name], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
