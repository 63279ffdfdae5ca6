"""GRPO's rollout: G samples per prompt, rule rewards, group-relative advantages.

DeepSeekMath (arXiv 2402.03300) §4.1: each prompt's G completions are scored and their rewards
normalised within the group; the layout is prompt-major (the G samples of prompt p are rows
p·G … p·G + G − 1). Shapes: B prompts, G group size, P prompt length, N completion length.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.advantages import group_advantages
from jaxalign.decoding import SamplingConfig
from jaxalign.models.config import TransformerConfig
from jaxalign.rewards import RewardFn
from jaxalign.rollout.sample import RolloutOutput, rule_rewards, sample
from jaxalign.scoring import completion_routes_fn


@flax.struct.dataclass
class Rollout:
    """One batch of scored samples, ready for the policy loss (arrays are [B·G, ...]).

    Attributes:
      prompt_tokens, prompt_mask: [B·G, P] each prompt repeated G times (left-padded).
      completion_tokens: int32 [B·G, N]; completion_mask: float32 [B·G, N] (1 up to and
        including EOS).
      old_logps: float32 [B·G, N] log-probs under the sampling policy (from generation).
      ref_logps: float32 [B·G, N] under the reference model (zeros when no reference is used).
      rewards: float32 [B·G]; advantages: float32 [B·G] group-relative.
      where: float32 [B·G], 0 on samples excluded from the loss (DAPO dynamic sampling drops
        groups whose rewards are all equal: they carry no gradient signal).
      routes: MoE policies: int32 [B·G, P+N-1, L, k], the experts each input token of
        [prompt; completion] was routed to under the sampling params, by one teacher-forced
        forward pass (`jaxalign.scoring.completion_routes`, veRL's "R2" routing replay; L = the
        MoE layers in `config.moe_layer_indices` order). What `make_grpo_step(...,
        routing_replay=True)` replays and `routing_change_fraction` compares with. None for a
        dense policy (a pytree without the leaf, so jit signatures are unchanged).
    """

    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    completion_tokens: jax.Array
    completion_mask: jax.Array
    old_logps: jax.Array
    ref_logps: jax.Array
    rewards: jax.Array
    advantages: jax.Array
    where: jax.Array
    routes: jax.Array | None = None


def grpo_rollout(
    params,
    config: TransformerConfig,
    prompt_tokens: np.ndarray,
    prompt_mask: np.ndarray,
    *,
    group_size: int,
    reward_fn: RewardFn,
    decode: Callable[[Sequence[int]], str],
    sampling: SamplingConfig,
    rng: jax.Array,
    ref_params=None,
    columns: Mapping[str, Sequence[Any]] | None = None,
    scale: Literal["group", "batch", "none"] = "group",
    filter_zero_variance: bool = False,
) -> RolloutOutput:
    """Samples G completions for each of B prompts, scores them, and computes advantages.

    Args:
      params, config: the policy (sampling happens with these parameters).
      prompt_tokens, prompt_mask: [B, P] left-padded prompts.
      group_size: G.
      reward_fn: `reward_fn(completions, **columns) -> float32 [B·G]` (see `jaxalign.rewards`).
      decode: token ids -> text, for the reward function.
      sampling: the `SamplingConfig`.
      rng: PRNG key for sampling.
      ref_params: reference model for `ref_logps` (None: zeros, for β = 0).
      columns: per-prompt data (e.g. {"answers": [...]}, length B), repeated G times for the
        reward function.
      scale: `group_advantages` scaling ("group", "batch", "none").
      filter_zero_variance: exclude groups whose rewards are all equal (DAPO dynamic sampling,
        arXiv 2503.14476 §3.2, as a mask instead of resampling so shapes stay static).

    Returns:
      `RolloutOutput`: batch the `Rollout` (with `routes` for an MoE policy), rewards [B·G],
      metrics `reward_mean`, `reward_std`, `zero_variance_fraction`, `completion_length`, and
      the decoded completions.

    Raises:
      ValueError: a reward of the wrong shape (and what `generate` raises).
    """
    b = prompt_tokens.shape[0]
    samples, completions = sample(
        params, config, prompt_tokens, prompt_mask, sampling=sampling, rng=rng, repeats=group_size,
        ref_params=ref_params, decode=decode,
    )
    rewards = rule_rewards(reward_fn, completions, columns, repeats=group_size)
    advantages = group_advantages(jnp.asarray(rewards), group_size=group_size, scale=scale)
    grouped = rewards.reshape(b, group_size)
    zero_var = np.all(grouped == grouped[:, :1], axis=1)  # [B]
    where = np.ones(b * group_size, np.float32)
    if filter_zero_variance:
        where = np.repeat((~zero_var).astype(np.float32), group_size)
    ref_logps = samples.ref_logps if samples.ref_logps is not None else jnp.zeros_like(samples.logps)
    rollout = Rollout(
        prompt_tokens=samples.prompt_tokens,
        prompt_mask=samples.prompt_mask,
        completion_tokens=samples.completion_tokens,
        completion_mask=samples.completion_mask,
        old_logps=samples.logps,
        ref_logps=ref_logps,
        rewards=jnp.asarray(rewards),
        advantages=advantages,
        where=jnp.asarray(where),
        routes=completion_routes_fn(config)(
            params, samples.prompt_tokens, samples.prompt_mask, samples.completion_tokens
        ) if config.moe is not None else None,
    )
    metrics = {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "zero_variance_fraction": float(zero_var.mean()),
        "completion_length": float(np.mean(jax.device_get(samples.lengths))),
    }
    return RolloutOutput(rollout, rewards, metrics, completions)


__all__ = ["Rollout", "grpo_rollout"]
