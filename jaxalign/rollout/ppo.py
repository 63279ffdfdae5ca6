"""PPO's rollout (InstructGPT-style RLHF): one sample per prompt, a critic, per-token
KL-penalised rewards and GAE.

Shapes: B prompts, P prompt length, N completion length.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.advantages import KLKind, gae, ppo_token_rewards
from jaxalign.decoding import SamplingConfig
from jaxalign.models.config import TransformerConfig
from jaxalign.ops import masked_whiten, select
from jaxalign.rollout.sample import RolloutOutput, sample
from jaxalign.scoring import completion_routes_fn, critic_kind, policy_and_values

# score_fn(prompt_tokens [B,P], prompt_mask [B,P], completion_tokens [B,N], completion_mask [B,N]) -> [B]
ScoreFn = Callable[..., jax.Array | np.ndarray]


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
      routes: MoE policies: int32 [B, P+N-1, L, k], the experts each input token was routed to
        under the sampling policy (teacher-forced, `jaxalign.scoring.completion_routes`; see
        `jaxalign.rollout.Rollout.routes`), replayed by `make_ppo_step(...,
        routing_replay=True)`. None for a dense policy.
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
    routes: jax.Array | None = None


@functools.partial(jax.jit, static_argnames=("config", "value_config"))
def _values(params, config, value_config, prompts, masks, completions):
    return policy_and_values(params, config, prompts, masks, completions, value_config=value_config, entropy=False)[1]


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
    score_fn: ScoreFn,
    sampling: SamplingConfig,
    rng: jax.Array,
    decode: Callable[[Sequence[int]], str] | None = None,
    kl_coef: float = 0.05,
    kl_kind: KLKind = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_advantages: bool = True,
    missing_eos_penalty: float | None = None,
    value_config: TransformerConfig | None = None,
) -> RolloutOutput:
    """Samples one completion per prompt and turns it into PPO experience.

    Steps (InstructGPT arXiv 2203.02155 §3.5; Ziegler et al. 2019; TRL PPOTrainer): generate with
    the policy (`old_logps` come from generation itself, reference log-probs by teacher forcing:
    `jaxalign.rollout.sample`); critic values by teacher forcing; `score_fn` scores each
    response; per-token rewards −β·KL_t with the score added at the last token
    (`ppo_token_rewards`); `gae`; advantage whitening.

    Args:
      params: `{"policy", "value"}` (`jaxalign.scoring.init_actor_critic`; the critic kind is
        read from the tree); config: the policy's config.
      prompt_tokens, prompt_mask: [B, P] left-padded prompts (`jaxalign.data.collate_prompts`).
      ref_params: frozen reference transformer params (same config as the policy).
      score_fn: `score_fn(prompt_tokens, prompt_mask, completion_tokens, completion_mask) -> [B]`,
        e.g. `jaxalign.scoring.reward_model_scorer(rm_params, rm_config)`.
      sampling: the `SamplingConfig`; rng: PRNG key for sampling.
      decode: token ids -> text, to return the completions (None: no texts).
      kl_coef: β (the adaptive controller's current value, see `adaptive_kl_coef`).
      kl_kind: KL estimator for the penalty (`jaxalign.advantages.kl_penalty`; "low_var_kl" is
        veRL's clamped k3).
      gamma, lam: GAE's γ and λ (TRL: 1.0, 0.95).
      whiten_advantages: whiten advantages over the batch's response tokens (TRL always does).
      missing_eos_penalty: subtracted from the score of responses that hit max_new_tokens without
        EOS (TRL's `missing_eos_penalty`); None: no penalty.
      value_config: a separate critic's config (default: config).

    Returns:
      `RolloutOutput`: batch the `PPORollout` (with `routes` for an MoE policy), rewards the
      scores [B], metrics `score` (mean),
      `kl` (mean over responses of the summed per-token KL), `non_score_reward` (mean summed
      −β·KL), `completion_length`, `eos_fraction`, `kl_coef`, and the completions.

    Raises:
      ValueError: params that are not an actor-critic tree, or a score_fn returning a shape
        other than [B].
    """
    critic_kind(params)  # refuse a malformed tree before sampling
    eos_id = sampling.eos_id
    samples, completions = sample(
        params["policy"], config, prompt_tokens, prompt_mask, sampling=sampling, rng=rng,
        ref_params=ref_params, decode=decode,
    )
    prompts, masks, tokens, mask = (
        samples.prompt_tokens, samples.prompt_mask, samples.completion_tokens, samples.completion_mask
    )
    b = prompts.shape[0]
    values = _values(params, config, value_config, prompts, masks, tokens)
    scores = jnp.asarray(score_fn(prompts, masks, tokens, mask), jnp.float32)
    if scores.shape != (b,):
        raise ValueError(f"score_fn returned shape {scores.shape}, expected ({b},)")
    lengths = samples.lengths
    last = jnp.take_along_axis(tokens, jnp.maximum(lengths - 1, 0)[:, None], axis=1)[:, 0]
    has_eos = (last == eos_id) & (lengths > 0) if eos_id is not None else jnp.zeros(b, bool)
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~has_eos)
    rewards, kl, advantages, returns = _ppo_targets(
        scores, samples.logps, samples.ref_logps, values, mask, jnp.float32(kl_coef),
        kind=kl_kind, gamma=gamma, lam=lam, whiten=whiten_advantages,
    )
    rollout = PPORollout(
        prompt_tokens=prompts,
        prompt_mask=masks,
        completion_tokens=tokens,
        completion_mask=mask,
        old_logps=select(mask, samples.logps),
        ref_logps=samples.ref_logps,
        old_values=select(mask, values),
        scores=scores,
        rewards=rewards,
        advantages=advantages,
        returns=returns,
        routes=completion_routes_fn(config)(params["policy"], prompts, masks, tokens)
        if config.moe is not None else None,
    )
    kl_seq = jnp.sum(kl, axis=1)
    metrics = jax.device_get({
        "score": jnp.mean(scores),
        "kl": jnp.mean(kl_seq),
        "non_score_reward": -kl_coef * jnp.mean(kl_seq),
        "completion_length": jnp.mean(lengths.astype(jnp.float32)),
        "eos_fraction": jnp.mean(has_eos.astype(jnp.float32)),
    })
    metrics = {**{k: float(v) for k, v in metrics.items()}, "kl_coef": float(kl_coef)}
    return RolloutOutput(rollout, np.asarray(jax.device_get(scores), np.float32), metrics, completions)


__all__ = ["PPORollout", "ScoreFn", "ppo_rollout"]
