"""RL rollouts: generate G completions per prompt, score them, and turn scores into advantages.

No optimiser here (DESIGN.md): a trainer calls `grpo_rollout`, then optimises on the `Rollout`
it returns. Layout is prompt-major: the G samples of prompt p are rows p·G … p·G + G − 1.
Shapes: B prompts, G samples per prompt, P prompt length, N completion length.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.advantages import group_advantages
from jaxalign.decoding import generate, prompt_positions
from jaxalign.logprobs import token_logps
from jaxalign.models.config import TransformerConfig
from jaxalign.models.transformer import forward, logits_from_hidden


def completion_logps(
    params,
    config: TransformerConfig,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    completion_tokens: jax.Array,
    *,
    dropout_rng: jax.Array | None = None,
    chunk_size: int | None = None,
) -> jax.Array:
    """Teacher-forced log-probs of each completion token given its (left-padded) prompt.

    One forward pass over [prompt; completion] with the positions generation used; the output
    head runs only on the N positions that predict completion tokens, so the [B, P+N, V] logits
    of the prompt are never formed.

    Args:
      params, config: the model.
      prompt_tokens: int32 [B, P] left-padded; prompt_mask: [B, P], 1 on real tokens.
      completion_tokens: int32 [B, N] (tokens after EOS are ignored by the caller's mask).
      dropout_rng: enables dropout.
      chunk_size: sequence chunking of the log-prob gather.

    Returns:
      float32 [B, N] log-probs (nats); equal to `generate`'s `model_logps` on the same tokens.
    """
    p = prompt_tokens.shape[1]
    tokens = jnp.concatenate([prompt_tokens, completion_tokens], axis=1)  # [B,P+N]
    full_mask = jnp.concatenate([prompt_mask, jnp.ones_like(completion_tokens)], axis=1)
    positions = prompt_positions(full_mask)  # [B,P+N]
    hidden = forward(
        params, config, tokens[:, :-1], positions[:, :-1], dropout_rng=dropout_rng, return_hidden=True
    )  # [B,P+N-1,D]
    logits = logits_from_hidden(params, config, hidden[:, p - 1 :])  # [B,N,V]
    return token_logps(logits, completion_tokens, chunk_size=chunk_size)


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


@functools.lru_cache(maxsize=16)
def _jitted_completion_logps(config: TransformerConfig) -> Callable:
    return jax.jit(functools.partial(completion_logps, config=config))


def grpo_rollout(
    params,
    config: TransformerConfig,
    prompt_tokens: np.ndarray,
    prompt_mask: np.ndarray,
    *,
    group_size: int,
    reward_fn: Callable[..., np.ndarray],
    decode: Callable[[Sequence[int]], str],
    rng: jax.Array,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    ref_params=None,
    columns: Mapping[str, Sequence[Any]] | None = None,
    scale: str = "group",
    filter_zero_variance: bool = False,
) -> tuple[Rollout, dict[str, float], list[str]]:
    """Samples G completions for each of B prompts, scores them, and computes advantages.

    Args:
      params, config: the policy (sampling happens with these parameters).
      prompt_tokens, prompt_mask: [B, P] left-padded prompts.
      group_size: G.
      reward_fn: `reward_fn(completions, **columns) -> float32 [B·G]` (see `jaxalign.rewards`).
      decode: token ids -> text, for the reward function.
      rng: PRNG key for sampling.
      max_new_tokens, eos_id, pad_id, temperature, top_k, top_p: as `generate`.
      ref_params: reference model for `ref_logps` (None: zeros, for β = 0).
      columns: per-prompt data (e.g. {"answers": [...]}, length B), repeated G times for the
        reward function.
      scale: `group_advantages` scaling ("group", "batch", "none").
      filter_zero_variance: exclude groups whose rewards are all equal (DAPO dynamic sampling,
        arXiv 2503.14476 §3.2, as a mask instead of resampling so shapes stay static).

    Returns:
      (rollout, metrics, completions): metrics `reward_mean`, `reward_std`,
      `zero_variance_fraction`, `completion_length`; the decoded completions.
    """
    b = prompt_tokens.shape[0]
    prompts = jnp.asarray(np.repeat(prompt_tokens, group_size, axis=0))  # [B·G,P]
    masks = jnp.asarray(np.repeat(prompt_mask, group_size, axis=0))
    gen = generate(
        params, config, prompts, masks, max_new_tokens=max_new_tokens, rng=rng,
        temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id, pad_id=pad_id,
    )
    tokens, mask, lengths = jax.device_get((gen.tokens, gen.mask, gen.lengths))
    completions = [
        decode([t for t in row[:n].tolist() if t != eos_id]) for row, n in zip(tokens, lengths)
    ]
    repeated = {k: [v for v in vals for _ in range(group_size)] for k, vals in (columns or {}).items()}
    rewards = np.asarray(reward_fn(completions, **repeated), np.float32)
    if rewards.shape != (b * group_size,):
        raise ValueError(f"reward_fn returned shape {rewards.shape}, expected ({b * group_size},)")
    advantages = group_advantages(jnp.asarray(rewards), group_size=group_size, scale=scale)
    grouped = rewards.reshape(b, group_size)
    zero_var = np.all(grouped == grouped[:, :1], axis=1)  # [B]
    where = np.ones(b * group_size, np.float32)
    if filter_zero_variance:
        where = np.repeat((~zero_var).astype(np.float32), group_size)
    ref_logps = jnp.zeros_like(gen.model_logps)
    if ref_params is not None:
        ref_logps = _jitted_completion_logps(config)(ref_params, prompt_tokens=prompts, prompt_mask=masks, completion_tokens=gen.tokens)
    rollout = Rollout(
        prompt_tokens=prompts,
        prompt_mask=masks,
        completion_tokens=gen.tokens,
        completion_mask=gen.mask,
        old_logps=gen.model_logps,
        ref_logps=ref_logps * gen.mask,
        rewards=jnp.asarray(rewards),
        advantages=advantages,
        where=jnp.asarray(where),
    )
    metrics = {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "zero_variance_fraction": float(zero_var.mean()),
        "completion_length": float(lengths.mean()),
    }
    return rollout, metrics, completions
