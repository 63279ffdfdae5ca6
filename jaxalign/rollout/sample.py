"""The one sample-and-score path of every RL rollout and of policy evaluation.

`sample` draws R = B·repeats completions from the policy (prompt-major: the copies of prompt b
are rows b·repeats … b·repeats + repeats − 1), decodes them, and scores them under a frozen
reference by teacher forcing. The GRPO rollout, the PPO rollout and `evaluate_policy` all start
from its `Samples` and return a `RolloutOutput`.

Shapes: B prompts, R = B·repeats samples, P prompt length, N completion length.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.decoding import SamplingConfig, generate
from jaxalign.models.config import TransformerConfig
from jaxalign.ops import masked_sum, select
from jaxalign.rewards import RewardFn
from jaxalign.scoring import completion_logps_fn


@flax.struct.dataclass
class Samples:
    """Completions sampled from a policy (device arrays; every row is one sample).

    Attributes:
      prompt_tokens, prompt_mask: [R, P] the left-padded prompts, each repeated `repeats` times.
      completion_tokens: int32 [R, N] (`pad_id` after EOS); completion_mask: float32 [R, N], 1 up
        to and including EOS.
      logps: float32 [R, N] log-probs under the unmodified sampling policy (generation's
        `model_logps`: the `old_logps` of PPO and GRPO), 0 after EOS.
      ref_logps: float32 [R, N] under the reference by teacher forcing, 0 after EOS; None
        without a reference.
      lengths: int32 [R] completion lengths, EOS included.
    """

    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    completion_tokens: jax.Array
    completion_mask: jax.Array
    logps: jax.Array
    ref_logps: jax.Array | None
    lengths: jax.Array

    def kl(self) -> np.ndarray | None:
        """float32 [R]: Σ_t (log π − log π_ref) over each completion, the k1 estimate of
        KL(π‖π_ref) of the whole sequence in nats (unbiased only when sampled at temperature 1
        without top-k / top-p); None without a reference."""
        if self.ref_logps is None:
            return None
        return np.asarray(masked_sum(self.logps - self.ref_logps, self.completion_mask, axis=-1), np.float32)


class RolloutOutput(NamedTuple):
    """What the rollouts and `evaluate_policy` return.

    Attributes:
      batch: the device arrays: `Samples`, or the `Rollout` / `PPORollout` built from them.
      rewards: float32 [R] host array, one sequence-level reward per sample (the rule reward,
        or the reward-model score after any missing-EOS penalty).
      metrics: host floats describing the batch (names per rollout).
      completions: the R decoded completions (EOS dropped); empty when no `decode` was given.
    """

    batch: Any
    rewards: np.ndarray
    metrics: dict[str, float]
    completions: list[str]


def decode_completions(
    tokens: np.ndarray, lengths: np.ndarray, decode: Callable[[Sequence[int]], str], eos_id: int | None
) -> list[str]:
    """Text of each generated completion: `tokens` int [B, N] cut at `lengths` [B] (EOS included,
    as `generate` counts them), with the EOS id dropped."""
    rows, ns = np.asarray(tokens).tolist(), np.asarray(lengths).tolist()
    return [decode([t for t in row[:n] if t != eos_id]) for row, n in zip(rows, ns)]


def sample(
    params,
    config: TransformerConfig,
    prompt_tokens: np.ndarray | jax.Array,
    prompt_mask: np.ndarray | jax.Array,
    *,
    sampling: SamplingConfig,
    rng: jax.Array,
    repeats: int = 1,
    ref_params=None,
    decode: Callable[[Sequence[int]], str] | None = None,
) -> tuple[Samples, list[str]]:
    """Samples `repeats` completions of each prompt and scores them under the reference.

    Args:
      params, config: the policy (sampling happens with these parameters).
      prompt_tokens, prompt_mask: [B, P] left-padded prompts (`jaxalign.data.collate_prompts`).
      sampling: the `SamplingConfig`.
      rng: PRNG key for sampling.
      repeats: samples per prompt (GRPO's G, evaluation's S), >= 1.
      ref_params: the frozen reference (same config) for `ref_logps`; None skips it.
      decode: token ids -> text; None returns no texts.

    Returns:
      (samples, completions): the `Samples` and the R decoded completions ([] without decode).

    Raises:
      ValueError: repeats < 1 (and what `generate` raises).
    """
    if repeats < 1:
        raise ValueError(f"repeats (samples per prompt) must be >= 1, got {repeats}")
    prompts = jnp.asarray(np.repeat(np.asarray(prompt_tokens), repeats, axis=0))  # [R,P]
    masks = jnp.asarray(np.repeat(np.asarray(prompt_mask), repeats, axis=0))  # [R,P]
    gen = generate(params, config, prompts, masks, sampling=sampling, rng=rng)
    ref_logps = None
    if ref_params is not None:
        ref_logps = select(gen.mask, completion_logps_fn(config)(ref_params, prompts, masks, gen.tokens))
    samples = Samples(
        prompt_tokens=prompts,
        prompt_mask=masks,
        completion_tokens=gen.tokens,
        completion_mask=gen.mask,
        logps=gen.model_logps,
        ref_logps=ref_logps,
        lengths=gen.lengths,
    )
    completions = []
    if decode is not None:
        tokens, lengths = jax.device_get((gen.tokens, gen.lengths))
        completions = decode_completions(tokens, lengths, decode, sampling.eos_id)
    return samples, completions


def rule_rewards(
    reward_fn: RewardFn,
    completions: list[str],
    columns: Mapping[str, Sequence[Any]] | None = None,
    *,
    repeats: int = 1,
) -> np.ndarray:
    """`reward_fn(completions, **columns)` with each per-prompt column (length B) repeated
    `repeats` times to line up with the prompt-major samples.

    Returns:
      float32 [R] host array.

    Raises:
      ValueError: the reward function returned another shape than [R].
    """
    repeated = {k: [v for v in vals for _ in range(repeats)] for k, vals in (columns or {}).items()}
    rewards = np.asarray(reward_fn(completions, **repeated), np.float32)
    if rewards.shape != (len(completions),):
        raise ValueError(f"reward_fn returned shape {rewards.shape}, expected ({len(completions)},)")
    return rewards


def evaluate_policy(
    params,
    config: TransformerConfig,
    prompt_tokens: np.ndarray,
    prompt_mask: np.ndarray,
    *,
    reward_fn: RewardFn,
    decode: Callable[[Sequence[int]], str],
    sampling: SamplingConfig,
    rng: jax.Array,
    samples: int = 1,
    columns: Mapping[str, Sequence[Any]] | None = None,
    ref_params=None,
) -> RolloutOutput:
    """Samples S completions per prompt, scores them, and measures their KL to a reference.

    With greedy sampling use S = 1; at temperature > 0 the mean reward over S draws is the
    policy's expected reward (pass@1 for a 0/1 reward), what GRPO maximises. The KL is sampled
    from the policy itself, so it is an unbiased estimate of KL(π‖π_ref) only at temperature 1
    without top-k / top-p (otherwise it is the log-ratio under the truncated sampler).

    Args:
      params, config: the policy.
      prompt_tokens, prompt_mask: [B, P] left-padded prompts (`jaxalign.data.collate_prompts`).
      reward_fn: `reward_fn(completions, **columns) -> float32 [B·S]` (`jaxalign.rewards`).
      decode: token ids -> text.
      sampling: the `SamplingConfig` (e.g. temperature 0 for greedy evaluation).
      rng: PRNG key for sampling.
      samples: S >= 1.
      columns: per-prompt data (length B), repeated S times for the reward function.
      ref_params: the reference model (same config); None skips the KL.

    Returns:
      `RolloutOutput`: batch the `Samples` (`batch.kl()` per sample), rewards [B·S], metrics
      `reward_mean`, `completion_length` and, with a reference, `kl` (mean), and the completions.

    Raises:
      ValueError: S < 1, or a reward of the wrong shape (and what `generate` raises).
    """
    batch, completions = sample(
        params, config, prompt_tokens, prompt_mask, sampling=sampling, rng=rng, repeats=samples,
        ref_params=ref_params, decode=decode,
    )
    rewards = rule_rewards(reward_fn, completions, columns, repeats=samples)
    metrics = {
        "reward_mean": float(rewards.mean()),
        "completion_length": float(np.mean(jax.device_get(batch.lengths))),
    }
    kl = batch.kl()
    if kl is not None:
        metrics["kl"] = float(kl.mean())
    return RolloutOutput(batch, rewards, metrics, completions)


__all__ = ["RolloutOutput", "Samples", "decode_completions", "evaluate_policy", "rule_rewards", "sample"]
