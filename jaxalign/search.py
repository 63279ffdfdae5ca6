"""Inference-time scaling: beam search with a KV cache, and selection among N samples.

* `beam_search`: K beams per prompt in one `jax.lax.while_loop`, with Hugging Face's v5
  semantics (transformers 5.24 `GenerationMixin._beam_search`): 2K candidates per step, EOS
  candidates ranked within the first K finalised with score Σ log p / gen_len^length_penalty,
  the cache gathered by source beam, and HF's `early_stopping` rules (True / False heuristic /
  "never"). Checked token for token and score for score against `model.generate(num_beams=K)`
  on random GPT-2s (tests/test_search.py).
* N samples per prompt come from `generate(..., num_samples=n)` (one prefill); the selections
  below are host-side functions of their answers and scores: self-consistency majority vote
  (Wang et al. 2022, arXiv 2203.11171), weighted vote and best-of-N by a reward model or verifier,
  and the unbiased pass@k estimator (Chen et al. 2021, arXiv 2107.03374, Eq. 1).

Shapes: B prompts, K beams, N max_new_tokens, V vocab, n samples per prompt.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.decoding import prompt_positions, repeat_rows
from jaxalign.models.config import TransformerConfig
from jaxalign.models.transformer import KVCache, forward_with_cache, init_cache

_NEG = -1.0e9  # HF's "never chosen" score, added (not assigned) exactly as transformers does


@flax.struct.dataclass
class BeamSearchOutput:
    """What `beam_search` returns, best hypothesis first.

    Attributes:
      tokens: int32 [B, R, N] generated tokens of the R returned hypotheses (EOS included when
        one was emitted); `pad_id` after each hypothesis ends.
      scores: float32 [B, R] HF's `sequences_scores`: Σ log p / length^length_penalty.
      lengths: int32 [B, R] generated tokens of each hypothesis (EOS counted).
      mask: float32 [B, R, N] 1.0 on the generated tokens.
    """

    tokens: jax.Array
    scores: jax.Array
    lengths: jax.Array
    mask: jax.Array


@flax.struct.dataclass
class _BeamState:
    step: jax.Array  # int32 scalar t: tokens generated so far
    cache: KVCache  # B·K rows
    logits: jax.Array  # float32 [B·K, V] next-token logits of each running beam
    positions: jax.Array  # int32 [B·K] position of each beam's next token
    running: jax.Array  # int32 [B, K, N]
    running_scores: jax.Array  # float32 [B, K] summed log-probs (−1e9-offset when dead)
    finished: jax.Array  # int32 [B, K, N]
    finished_scores: jax.Array  # float32 [B, K]
    finished_lengths: jax.Array  # int32 [B, K]
    is_finished: jax.Array  # bool [B, K]
    improvable: jax.Array  # bool [B] HF's is_early_stop_heuristic_unsatisfied
    all_hit: jax.Array  # bool scalar: every candidate of the last step hit a stopping criterion


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
    """x[b, index[b, j]] along axis 1 (HF's `_gather_beams`)."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _top(scores: jax.Array, k: int) -> jax.Array:
    return jax.lax.top_k(scores, k)[1]


def _beam_step(s: _BeamState, params, config, *, k, n, eos_id, length_penalty, early_stopping) -> _BeamState:
    b, v = s.running.shape[0], s.logits.shape[-1]
    logps = jax.nn.log_softmax(s.logits, axis=-1).reshape(b, k, v) + s.running_scores[:, :, None]
    cand_scores, flat = jax.lax.top_k(logps.reshape(b, k * v), 2 * k)  # [B,2K], sorted
    src, token = flat // v, (flat % v).astype(jnp.int32)
    cand = _gather(s.running, src).at[:, :, s.step].set(token)  # [B,2K,N]
    hits = jnp.full(token.shape, s.step + 1 >= n)  # max length reached: every candidate stops
    if eos_id is not None:
        hits = hits | (token == eos_id)
    # running beams: the best K candidates that did not stop
    alive_scores = cand_scores + hits.astype(jnp.float32) * _NEG
    keep = _top(alive_scores, k)  # [B,K]
    running, running_scores, running_src = _gather(cand, keep), _gather(alive_scores, keep), _gather(src, keep)
    # finished pool: stopped candidates ranked within the first K, length-penalised
    just_finished = hits & (jnp.arange(2 * k) < k)[None, :]
    gen_len = (s.step + 1).astype(jnp.float32)
    final_scores = cand_scores / gen_len**length_penalty  # HF: Σ log p / (cur_len + 1 − P)^lp
    if early_stopping is True:
        final_scores += (jnp.all(s.is_finished, axis=1, keepdims=True)).astype(jnp.float32) * _NEG
    final_scores += (~s.improvable[:, None]).astype(jnp.float32) * _NEG
    final_scores += (~just_finished).astype(jnp.float32) * _NEG
    merged_scores = jnp.concatenate([s.finished_scores, final_scores], axis=1)  # [B,3K]
    best = _top(merged_scores, k)
    finished = _gather(jnp.concatenate([s.finished, cand], axis=1), best)
    lengths = jnp.concatenate([s.finished_lengths, jnp.full(token.shape, s.step + 1, jnp.int32)], axis=1)
    is_finished = _gather(jnp.concatenate([s.is_finished, just_finished], axis=1), best)
    finished_scores = _gather(merged_scores, best)
    # HF's early-stop heuristic, after cur_len += 1
    horizon = jnp.where((early_stopping == "never") & (length_penalty > 0.0), jnp.float32(n), gen_len)
    best_running = running_scores[:, :1] / horizon**length_penalty  # [B,1]
    worst = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), _NEG)  # [B,K]
    improvable = s.improvable & jnp.any(best_running > worst, axis=-1)
    # the cache follows the beams; then the running beams' new tokens are fed
    rows = (running_src + jnp.arange(b)[:, None] * k).reshape(-1)  # [B·K] flat source rows
    cache = s.cache.replace(
        keys=tuple(x[rows] for x in s.cache.keys),
        values=tuple(x[rows] for x in s.cache.values),
        positions=s.cache.positions[rows],
    )
    logits, cache = forward_with_cache(
        params, config, running[:, :, s.step].reshape(-1, 1), cache, s.positions[:, None]
    )
    return _BeamState(
        step=s.step + 1, cache=cache, logits=logits[:, 0].astype(jnp.float32), positions=s.positions + 1,
        running=running, running_scores=running_scores, finished=finished, finished_scores=finished_scores,
        finished_lengths=_gather(lengths, best), is_finished=is_finished, improvable=improvable,
        all_hit=jnp.all(hits),
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "config", "num_beams", "max_new_tokens", "early_stopping", "eos_id", "pad_id",
        "num_return_sequences",
    ),
)
def beam_search(
    params,
    config: TransformerConfig,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    *,
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float | jax.Array = 1.0,
    early_stopping: bool | str = False,
    eos_id: int | None = None,
    pad_id: int = 0,
    num_return_sequences: int = 1,
) -> BeamSearchOutput:
    """Beam search decoding with a KV cache, Hugging Face v5 semantics.

    Each prompt is prefilled once; its cache and last logits are repeated to K rows, with beam
    scores [0, −1e9, …] so that only one beam is live at the first step (HF's initialisation).
    Each step scores the K·V extensions Σ log p (float32 log-softmax of the raw logits), keeps
    the best 2K, finalises those of the first K that end (EOS, or the N-th token) with score
    Σ log p / (generated length)^length_penalty into a pool of the best K, continues with the best
    K that did not end, and gathers every cache row by its source beam. The search of a prompt
    stops being updated when (HF's `early_stopping`) True: K hypotheses are finished; False: the
    best running beam, length-penalised at its current length, cannot beat the worst finished
    one; "never": the same bound at the longest possible length when length_penalty > 0 (with
    length_penalty = 0, canonical beam search). Equals `transformers` 5.24
    `model.generate(num_beams=K, do_sample=False, max_new_tokens=N, length_penalty=...,
    early_stopping=..., num_return_sequences=R)` (`.sequences` and `.sequences_scores`), left
    padding included (positions count real tokens, as HF's attention-mask position ids do).

    Cost per step: one forward of B·K tokens and one copy of the cache (a gather by source beam).

    Args:
      params, config: the model.
      prompt_tokens: int32 [B, P], left-padded; every row needs a real token.
      prompt_mask: [B, P], 1 on real prompt tokens.
      num_beams: K >= 1.
      max_new_tokens: N >= 1; P + N <= config.max_seq_len.
      length_penalty: exponent of the length normalisation (> 0 favours longer hypotheses, as in
        HF, whose name reads backwards). A traced argument: changing it does not recompile.
      early_stopping: True, False or "never", as above.
      eos_id: ends a hypothesis (None: every hypothesis has N tokens).
      pad_id: written after a hypothesis ends.
      num_return_sequences: R <= K hypotheses returned per prompt.

    Returns:
      `BeamSearchOutput` (tokens [B, R, N], scores [B, R], lengths [B, R], mask).

    Raises:
      AssertionError: (chex) prompt_tokens not rank 2, or prompt_mask of another shape.
      ValueError: K < 1, N < 1, R outside [1, K], early_stopping not True/False/"never",
        P + N > config.max_seq_len, V < 2 (2K candidates are drawn from K·V).
    """
    chex.assert_rank(prompt_tokens, 2)
    chex.assert_equal_shape((prompt_tokens, prompt_mask))
    b, p = prompt_tokens.shape
    k, n = num_beams, max_new_tokens
    if k < 1 or n < 1:
        raise ValueError(f"num_beams and max_new_tokens must be >= 1, got {k} and {n}")
    if not 1 <= num_return_sequences <= k:
        raise ValueError(f"num_return_sequences must be in [1, num_beams={k}], got {num_return_sequences}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if p + n > config.max_seq_len:
        raise ValueError(f"prompt length {p} + max_new_tokens {n} exceeds max_seq_len {config.max_seq_len}")
    if config.vocab_size < 2:
        raise ValueError(f"beam search keeps 2·num_beams of num_beams·V candidates: needs V >= 2, got {config.vocab_size}")

    positions = prompt_positions(prompt_mask)  # [B,P]
    logits, cache = forward_with_cache(params, config, prompt_tokens, init_cache(config, b, p + n), positions)
    cache, logits, next_positions = repeat_rows((cache, logits[:, -1].astype(jnp.float32), positions[:, -1] + 1), k)
    start = _BeamState(
        step=jnp.zeros((), jnp.int32), cache=cache, logits=logits, positions=next_positions,
        running=jnp.full((b, k, n), pad_id, jnp.int32),
        running_scores=jnp.zeros((b, k), jnp.float32).at[:, 1:].set(_NEG),
        finished=jnp.full((b, k, n), pad_id, jnp.int32),
        finished_scores=jnp.full((b, k), _NEG, jnp.float32),
        finished_lengths=jnp.zeros((b, k), jnp.int32),
        is_finished=jnp.zeros((b, k), bool),
        improvable=jnp.ones((b,), bool),
        all_hit=jnp.zeros((), bool),
    )

    def cond(s: _BeamState) -> jax.Array:  # HF's _beam_search_has_unfinished_sequences
        open_beam = ~(jnp.all(s.is_finished) & (early_stopping is True))
        return jnp.any(s.improvable) & open_beam & ~s.all_hit

    body = functools.partial(
        _beam_step, params=params, config=config, k=k, n=n, eos_id=eos_id,
        length_penalty=jnp.asarray(length_penalty, jnp.float32), early_stopping=early_stopping,
    )
    final = jax.lax.while_loop(cond, body, start)
    r = num_return_sequences
    lengths = final.finished_lengths[:, :r]  # [B,R]
    mask = jnp.arange(n)[None, None, :] < lengths[:, :, None]  # [B,R,N]
    return BeamSearchOutput(
        tokens=jnp.where(mask, final.finished[:, :r], pad_id),
        scores=final.finished_scores[:, :r],
        lengths=lengths,
        mask=mask.astype(jnp.float32),
    )


def majority_vote(
    answers: Sequence[Sequence[Hashable | None]], *, weights: Sequence[Sequence[float]] | None = None
) -> list[Hashable | None]:
    """Self-consistency: the most frequent (or most weighted) answer among each prompt's samples.

    `â = argmax_a Σ_{i: a_i = a} w_i` with w_i = 1 (Wang et al. 2022, arXiv 2203.11171, §2) or
    a bounded score per sample (weighted majority: a PRM/ORM probability, σ of a Bradley–Terry
    reward; unbounded scores make the weighted vote meaningless). Samples whose answer is None
    (nothing extracted) do not vote. Ties go to the answer that occurs first, as in
    search-and-learn's `find_majority_answer` / `find_answer_with_largest_sum`. Canonicalise the
    answers first (e.g. `jaxalign.rewards.extract_answer`: Decimal("5.0") == Decimal("5")).

    Args:
      answers: B lists of n answers (any hashable; None = no answer).
      weights: optional B lists of n finite weights >= 0.

    Returns:
      B answers (None where no sample had one).

    Raises:
      ValueError: weights of another shape than answers, or negative or non-finite weights.
    """
    if weights is not None:
        if len(weights) != len(answers) or any(len(w) != len(a) for w, a in zip(weights, answers)):
            raise ValueError("majority_vote: weights must have the shape of answers (B lists of n)")
        flat = np.asarray([x for w in weights for x in w], np.float64)
        if flat.size and (not np.all(np.isfinite(flat)) or np.any(flat < 0)):
            raise ValueError("majority_vote: weights must be finite and >= 0 (bounded scores, e.g. σ(reward))")
    votes = []
    for i, row in enumerate(answers):
        tally: dict[Hashable, float] = {}
        for j, answer in enumerate(row):
            if answer is not None:
                tally[answer] = tally.get(answer, 0.0) + (1.0 if weights is None else float(weights[i][j]))
        # max over insertion order keeps the first of equal tallies
        votes.append(max(tally, key=tally.__getitem__) if tally else None)
    return votes


def best_of_n(scores: jax.Array | np.ndarray) -> np.ndarray:
    """Best-of-N: the index of each prompt's highest-scoring sample (first on ties).

    Args:
      scores: float [B, n] reward-model or verifier scores; NaN never wins.

    Returns:
      int64 [B] indices into the n samples.

    Raises:
      ValueError: scores not rank 2, or a row with no finite score.
    """
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2:
        raise ValueError(f"best_of_n: scores must be [B, n], got shape {scores.shape}")
    if not np.all(np.any(np.isfinite(scores), axis=1)):
        raise ValueError("best_of_n: a row has no finite score")
    return np.argmax(np.where(np.isnan(scores), -np.inf, scores), axis=1)


def pass_at_k(num_samples: int | np.ndarray, num_correct: int | np.ndarray, k: int) -> np.ndarray:
    """Unbiased pass@k: 1 − C(n − c, k) / C(n, k), the chance that k of the n samples drawn
    without replacement include a correct one (Chen et al. 2021, arXiv 2107.03374, Eq. 1; their
    numerically stable product 1 − Π_{i=n−c+1}^{n} (1 − k/i)).

    Args:
      num_samples: n per problem (int or int array).
      num_correct: c per problem, 0 <= c <= n.
      k: 1 <= k <= n.

    Returns:
      float64 array of pass@k per problem (average it for the benchmark figure).

    Raises:
      ValueError: k outside [1, n] or c outside [0, n].
    """
    n, c = np.broadcast_arrays(np.asarray(num_samples, np.int64), np.asarray(num_correct, np.int64))
    if np.any(k < 1) or np.any(k > n):
        raise ValueError(f"pass_at_k: k must be in [1, n], got k={k}, n={n.tolist()}")
    if np.any(c < 0) or np.any(c > n):
        raise ValueError(f"pass_at_k: num_correct must be in [0, n], got {c.tolist()}")
    out = np.empty(n.shape, np.float64)
    for idx in np.ndindex(n.shape):
        ni, ci = int(n[idx]), int(c[idx])
        out[idx] = 1.0 if ni - ci < k else 1.0 - float(np.prod(1.0 - k / np.arange(ni - ci + 1, ni + 1)))
    return out
