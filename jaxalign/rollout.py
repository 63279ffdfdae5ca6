"""RL rollouts: sample completions, score them, and turn scores into advantages.

No optimiser here (DESIGN.md): a trainer calls `grpo_rollout` (G samples per prompt,
group-relative advantages; layout prompt-major: the G samples of prompt p are rows
p·G … p·G + G − 1) or `ppo_rollout` (one sample per prompt, a critic, per-token KL-penalised
rewards and GAE), then optimises on the `Rollout` / `PPORollout` it returns.
Shapes: B prompts, G samples per prompt, P prompt length, N completion length.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.advantages import gae, group_advantages, ppo_token_rewards
from jaxalign.ops import masked_whiten, select
from jaxalign.decoding import generate, prompt_positions
from jaxalign.logprobs import token_logps
from jaxalign.models.config import TransformerConfig
from jaxalign.models.heads import apply_scalar_head, init_scalar_head, sequence_scores
from jaxalign.models.transformer import forward, logits_from_hidden


def completion_hidden(
    params,
    config: TransformerConfig,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    completion_tokens: jax.Array,
    *,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """Final hidden states at the N positions that predict the completion tokens: [B, N, D].

    One teacher-forced forward pass over [prompt; completion] (the last completion token is not
    fed) with the positions generation used. Row t is the state after the prompt and completion
    tokens < t: the input of the LM head for token t, and the state s_t a value head scores.

    Args:
      params, config: the model (a transformer params pytree).
      prompt_tokens: int32 [B, P] left-padded; prompt_mask: [B, P], 1 on real tokens.
      completion_tokens: int32 [B, N] (tokens after EOS are ignored by the caller's mask).
      dropout_rng: enables dropout.
    """
    p = prompt_tokens.shape[1]
    tokens = jnp.concatenate([prompt_tokens, completion_tokens], axis=1)  # [B,P+N]
    full_mask = jnp.concatenate([prompt_mask, jnp.ones_like(completion_tokens)], axis=1)
    positions = prompt_positions(full_mask)  # [B,P+N]
    hidden = forward(
        params, config, tokens[:, :-1], positions[:, :-1], dropout_rng=dropout_rng, return_hidden=True
    )  # [B,P+N-1,D]
    return hidden[:, p - 1 :]  # [B,N,D]


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

    The output head runs only on the N positions that predict completion tokens
    (`completion_hidden`), so the [B, P+N, V] logits of the prompt are never formed.

    Args:
      params, config: the model.
      prompt_tokens: int32 [B, P] left-padded; prompt_mask: [B, P], 1 on real tokens.
      completion_tokens: int32 [B, N] (tokens after EOS are ignored by the caller's mask).
      dropout_rng: enables dropout.
      chunk_size: sequence chunking of the log-prob gather.

    Returns:
      float32 [B, N] log-probs (nats); equal to `generate`'s `model_logps` on the same tokens.
    """
    hidden = completion_hidden(
        params, config, prompt_tokens, prompt_mask, completion_tokens, dropout_rng=dropout_rng
    )  # [B,N,D]
    logits = logits_from_hidden(params, config, hidden)  # [B,N,V]
    return token_logps(logits, completion_tokens, chunk_size=chunk_size)


def decode_completions(
    tokens: np.ndarray, lengths: np.ndarray, decode: Callable[[Sequence[int]], str], eos_id: int | None
) -> list[str]:
    """Text of each generated completion: `tokens` int [B, N] cut at `lengths` [B] (EOS included,
    as `generate` counts them), with the EOS id dropped."""
    rows, ns = np.asarray(tokens).tolist(), np.asarray(lengths).tolist()
    return [decode([t for t in row[:n] if t != eos_id]) for row, n in zip(rows, ns)]


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
    completions = decode_completions(tokens, lengths, decode, eos_id)
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
        ref_logps=select(gen.mask, ref_logps),
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


# --------------------------------------------------------------------------------------------
# PPO (InstructGPT-style RLHF): one sample per prompt, a critic, per-token KL-penalised rewards.

Critic = Literal["shared", "separate"]


def _check_critic(params, critic: str) -> None:
    value = params.get("value") if isinstance(params, Mapping) else None
    if critic not in ("shared", "separate"):
        raise ValueError(f"critic must be 'shared' or 'separate', got {critic!r}")
    if not isinstance(params, Mapping) or "policy" not in params or not isinstance(value, Mapping):
        raise ValueError("PPO params must be {'policy': <transformer params>, 'value': {...}} (see init_actor_critic)")
    if "head" not in value or (critic == "separate") != ("backbone" in value):
        want = "{'backbone', 'head'}" if critic == "separate" else "{'head'}"
        raise ValueError(f"critic={critic!r} needs params['value'] = {want}, got keys {sorted(value)}")


def init_actor_critic(policy_params, value_params=None, *, config: TransformerConfig, rng: jax.Array):
    """PPO's trainable params `{"policy": ..., "value": ...}` (one pytree, one optimizer, as TRL's
    `PolicyAndValueWrapper`).

    Args:
      policy_params: transformer params of the policy (e.g. the SFT model; copy them first if the
        same arrays are also the reference and the train step donates its state).
      value_params: a separate critic `{"backbone", "head"}` (`init_scalar_model`, e.g. from the
        trained reward model as InstructGPT does, §3.5); None: a fresh value head on the
        policy's own trunk (critic="shared").
      config: the policy's config (for the head's width).
      rng: key of the fresh head.
    """
    if value_params is None:
        value_params = {"head": init_scalar_head(config, rng)}
    return {"policy": policy_params, "value": value_params}


def policy_and_values(
    params,
    config: TransformerConfig,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    completion_tokens: jax.Array,
    *,
    critic: Critic,
    value_config: TransformerConfig | None = None,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Policy logits and critic values at the N completion positions.

    values[b, t] = V(s_t), the state before completion token t (the same hidden state the LM head
    reads to predict token t; TRL's PPOTrainer aligns values and log-probs this way).

    Args:
      params: `{"policy", "value"}` from `init_actor_critic`.
      config: the policy's config; value_config: the separate critic's (default: config).
      prompt_tokens, prompt_mask: [B, P] left-padded; completion_tokens: int32 [B, N].
      critic: "shared" (value head on the policy trunk: one forward pass, the value loss also
        trains the trunk) or "separate" (its own trunk and forward pass).
      dropout_rng: enables dropout in both.

    Returns:
      (logits [B, N, V] in config.dtype, values float32 [B, N]).

    Raises:
      ValueError: params do not match `critic`.
    """
    _check_critic(params, critic)
    hidden = completion_hidden(
        params["policy"], config, prompt_tokens, prompt_mask, completion_tokens, dropout_rng=dropout_rng
    )  # [B,N,D]
    logits = logits_from_hidden(params["policy"], config, hidden)  # [B,N,V]
    if critic == "separate":
        hidden = completion_hidden(
            params["value"]["backbone"], value_config or config, prompt_tokens, prompt_mask,
            completion_tokens, dropout_rng=dropout_rng,
        )  # [B,N,D_critic]
    return logits, apply_scalar_head(params["value"]["head"], hidden)


def reward_model_scorer(
    reward_params, reward_config: TransformerConfig, *, pool: Literal["last", "mean"] = "last"
) -> Callable[..., jax.Array]:
    """A jit-compiled `score_fn(prompt_tokens, prompt_mask, completion_tokens, completion_mask)
    -> float32 [B]`: the reward model's score of [prompt; completion] (at the last completion
    token, EOS included, for pool="last"). Tokens after EOS (mask 0) are not attended to."""

    @jax.jit
    def score_fn(prompt_tokens, prompt_mask, completion_tokens, completion_mask):
        tokens = jnp.concatenate([prompt_tokens, completion_tokens], axis=1)  # [B,P+N]
        real = jnp.concatenate([prompt_mask, completion_mask], axis=1)  # [B,P+N]
        pool_mask = jnp.concatenate([jnp.zeros_like(prompt_mask), completion_mask], axis=1)
        return sequence_scores(
            reward_params, reward_config, tokens, pool_mask, prompt_positions(real), pool=pool
        )  # [B]

    return score_fn


@flax.struct.dataclass
class PPORollout:
    """One batch of PPO experience (one sample per prompt; every array is [B, ...]).

    Attributes:
      prompt_tokens, prompt_mask: [B, P] left-padded prompts.
      completion_tokens: int32 [B, N]; completion_mask: float32 [B, N] (1 up to and incl. EOS).
      old_logps: float32 [B, N] log-probs under the sampling policy (the model's own
        distribution, as the loss recomputes it).
      ref_logps: float32 [B, N] under the frozen reference.
      old_values: float32 [B, N] critic values at rollout time.
      scores: float32 [B] reward-model (or rule) score, after any missing-EOS penalty.
      rewards: float32 [B, N] per-token −β·KL + score at the last token.
      advantages: float32 [B, N] GAE advantages (whitened over the batch when asked).
      returns: float32 [B, N] GAE returns (value targets; never whitened).
    """

    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    completion_tokens: jax.Array
    completion_mask: jax.Array
    old_logps: jax.Array
    ref_logps: jax.Array
    old_values: jax.Array
    scores: jax.Array
    rewards: jax.Array
    advantages: jax.Array
    returns: jax.Array


@functools.partial(jax.jit, static_argnames=("config", "value_config", "critic"))
def _values_and_ref(params, ref_params, config, value_config, critic, prompts, masks, completions):
    _, values = policy_and_values(
        params, config, prompts, masks, completions, critic=critic, value_config=value_config
    )
    ref = completion_logps(ref_params, config, prompts, masks, completions)
    return values, ref


@functools.partial(jax.jit, static_argnames=("kind", "gamma", "lam", "whiten"))
def _ppo_targets(scores, logps, ref_logps, values, mask, kl_coef, *, kind, gamma, lam, whiten):
    rewards, kl = ppo_token_rewards(scores, logps, ref_logps, mask, kl_coef=kl_coef, kind=kind)
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return rewards, kl, advantages, returns


def ppo_rollout(
    params,
    config: TransformerConfig,
    prompt_tokens: jax.Array | np.ndarray,
    prompt_mask: jax.Array | np.ndarray,
    *,
    ref_params,
    score_fn: Callable[..., jax.Array | np.ndarray],
    rng: jax.Array,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    kl_coef: float = 0.05,
    kl_kind: Literal["k1", "k2", "k3"] = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_advantages: bool = True,
    missing_eos_penalty: float | None = None,
    critic: Critic = "shared",
    value_config: TransformerConfig | None = None,
) -> tuple[PPORollout, dict[str, float]]:
    """Samples one completion per prompt and turns it into PPO experience.

    Steps (InstructGPT arXiv 2203.02155 §3.5; Ziegler et al. 2019; TRL PPOTrainer): generate with
    the policy (`old_logps` come from generation itself); critic values and reference log-probs
    by teacher forcing; `score_fn` scores each response; per-token rewards −β·KL_t with the score
    added at the last token (`ppo_token_rewards`); `gae`; advantage whitening.

    Args:
      params: `{"policy", "value"}` (`init_actor_critic`); config: the policy's config.
      prompt_tokens, prompt_mask: [B, P] left-padded prompts (`jaxalign.data.collate_prompts`).
      ref_params: frozen reference transformer params (same config as the policy).
      score_fn: `score_fn(prompt_tokens, prompt_mask, completion_tokens, completion_mask) -> [B]`,
        e.g. `reward_model_scorer(rm_params, rm_config)`.
      rng, max_new_tokens, eos_id, pad_id, temperature, top_k, top_p: as `generate`.
      kl_coef: β (the adaptive controller's current value, see `adaptive_kl_coef`).
      kl_kind: KL estimator for the penalty.
      gamma, lam: GAE's γ and λ (TRL: 1.0, 0.95).
      whiten_advantages: whiten advantages over the batch's response tokens (TRL always does).
      missing_eos_penalty: subtracted from the score of responses that hit max_new_tokens without
        EOS (TRL's `missing_eos_penalty`); None: no penalty.
      critic, value_config: see `policy_and_values`.

    Returns:
      (rollout, metrics): metrics `score` (mean), `kl` (mean over responses of the summed
      per-token KL), `non_score_reward` (mean summed −β·KL), `completion_length`, `eos_fraction`,
      `kl_coef`.

    Raises:
      ValueError: params that do not match `critic`, or a score_fn returning a shape other
        than [B].
    """
    _check_critic(params, critic)
    prompts, masks = jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask)
    b = prompts.shape[0]
    gen = generate(
        params["policy"], config, prompts, masks, max_new_tokens=max_new_tokens, rng=rng,
        temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id, pad_id=pad_id,
    )
    values, ref_logps = _values_and_ref(
        params, ref_params, config, value_config, critic, prompts, masks, gen.tokens
    )
    scores = jnp.asarray(score_fn(prompts, masks, gen.tokens, gen.mask), jnp.float32)
    if scores.shape != (b,):
        raise ValueError(f"score_fn returned shape {scores.shape}, expected ({b},)")
    last = jnp.take_along_axis(gen.tokens, jnp.maximum(gen.lengths - 1, 0)[:, None], axis=1)[:, 0]
    has_eos = (last == eos_id) & (gen.lengths > 0) if eos_id is not None else jnp.zeros(b, bool)
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~has_eos)
    mask = gen.mask
    rewards, kl, advantages, returns = _ppo_targets(
        scores, gen.model_logps, ref_logps, values, mask, jnp.float32(kl_coef),
        kind=kl_kind, gamma=gamma, lam=lam, whiten=whiten_advantages,
    )
    rollout = PPORollout(
        prompt_tokens=prompts,
        prompt_mask=masks,
        completion_tokens=gen.tokens,
        completion_mask=mask,
        old_logps=select(mask, gen.model_logps),
        ref_logps=select(mask, ref_logps),
        old_values=select(mask, values),
        scores=scores,
        rewards=rewards,
        advantages=advantages,
        returns=returns,
    )
    kl_seq = jnp.sum(kl, axis=1)
    metrics = jax.device_get({
        "score": jnp.mean(scores),
        "kl": jnp.mean(kl_seq),
        "non_score_reward": -kl_coef * jnp.mean(kl_seq),
        "completion_length": jnp.mean(gen.lengths.astype(jnp.float32)),
        "eos_fraction": jnp.mean(has_eos.astype(jnp.float32)),
    })
    return rollout, {**{k: float(v) for k, v in metrics.items()}, "kl_coef": float(kl_coef)}
