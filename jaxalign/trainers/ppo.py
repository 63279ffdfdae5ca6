"""PPO training step (actor + critic in one pytree), PPO epochs over minibatches, adaptive KL.

A PPO iteration is: `jaxalign.rollout.ppo_rollout` with the current params, then `ppo_update`:
`epochs` passes over the rollout, each in `num_minibatches` shuffled minibatches, one optimizer
step per minibatch (Schulman et al. 2017, arXiv 1707.06347, Alg. 1; TRL's PPOTrainer loop);
then `adaptive_kl_coef` moves β towards a target KL (Ziegler et al. 2019, arXiv 1909.08593 §2.2).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxalign.advantages import explained_variance
from jaxalign.logprobs import entropy, token_logps
from jaxalign.lora import LoraConfig
from jaxalign.losses.ppo import ppo_policy_loss, ppo_value_loss
from jaxalign.models.config import TransformerConfig
from jaxalign.ops import masked_mean
from jaxalign.rollout.ppo import PPORollout
from jaxalign.scoring import policy_and_values
from jaxalign.trainers.step import Metrics, StepShardings, TrainState, make_train_step


def ppo_batch_loss(
    params,
    config: TransformerConfig,
    rollout: PPORollout,
    dropout_rng: jax.Array | None = None,
    *,
    value_config: TransformerConfig | None = None,
    clip_eps: float = 0.2,
    value_clip_eps: float = 0.2,
    vf_coef: float = 0.1,
    ent_coef: float = 0.0,
) -> tuple[jax.Array, Metrics]:
    """L = L_clip(policy) + c_v · L_value − c_ent · entropy, token means over response tokens
    (PPO paper Eq. 9 with the signs of a loss to minimise; TRL defaults c_v = 0.1, c_ent = 0).

    Args:
      params: `{"policy", "value"}` (`jaxalign.scoring.init_actor_critic`; the critic kind is
        read from the tree).
      config, value_config: see `jaxalign.scoring.policy_and_values`.
      rollout: a `PPORollout` (or a minibatch of one).
      dropout_rng: enables dropout.
      clip_eps: ε of the policy ratio clip; value_clip_eps: ε of the value clip.
      vf_coef: c_v; ent_coef: c_ent (entropy bonus).

    Returns:
      (loss, metrics): `policy_loss`, `value_loss`, `entropy`, `clip_fraction`,
      `value_clip_fraction`, `approx_kl`, `ratio`, `explained_variance`, `values`, `returns`
      (means).
    """
    mask = rollout.completion_mask
    logits, values = policy_and_values(
        params, config, rollout.prompt_tokens, rollout.prompt_mask, rollout.completion_tokens,
        value_config=value_config, dropout_rng=dropout_rng,
    )  # [B,N,V], [B,N]
    logps = token_logps(logits, rollout.completion_tokens)  # [B,N]
    pg_loss, pg = ppo_policy_loss(logps, rollout.old_logps, rollout.advantages, mask, clip_eps=clip_eps)
    vf_loss, vf = ppo_value_loss(values, rollout.old_values, rollout.returns, mask, clip_eps=value_clip_eps)
    ent = masked_mean(entropy(logits), mask)
    loss = pg_loss + vf_coef * vf_loss - ent_coef * ent
    return loss, {
        "policy_loss": pg_loss,
        "value_loss": vf_loss,
        "entropy": ent,
        "clip_fraction": pg["clip_fraction"],
        "value_clip_fraction": vf["clip_fraction"],
        "approx_kl": pg["approx_kl"],
        "ratio": pg["ratio"],
        "explained_variance": explained_variance(values, rollout.returns, mask),
        "values": masked_mean(values, mask),
        "returns": masked_mean(rollout.returns, mask),
    }


def make_ppo_step(
    config: TransformerConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    dropout: bool = False,
    lora: LoraConfig | None = None,
    shardings: StepShardings | None = None,
    **loss_kwargs,
) -> Callable:
    """jit-compiled `step(state, rollout) -> (state, metrics)` minimising `ppo_batch_loss`.

    `loss_kwargs` are `ppo_batch_loss`'s options (value_config, clip_eps, value_clip_eps,
    vf_coef, ent_coef). Dropout is off by default so that the first minibatch's ratio is exactly
    1 (TRL sets dropout to 0 for PPO for the same reason). With `lora`, the state's params are
    adapters of the `{"policy", "value"}` tree and the step is `step(state, rollout,
    base_params)`; train the critic in full with e.g. `LoraConfig(trainable=("value",))`, and
    sample with `merge_lora(base_params, adapters, lora)` (`ppo_loop`'s `policy_fn`).
    `shardings`: `params_step_shardings(..., jaxalign.scoring.actor_critic_shardings(...))`.
    """

    def loss_fn(params, rollout, dropout_rng):
        return ppo_batch_loss(params, config, rollout, dropout_rng, **loss_kwargs)

    return make_train_step(
        loss_fn, tx, schedule, config=config, dropout=dropout, lora=lora, shardings=shardings
    )


def ppo_update(
    step: Callable,
    state: TrainState,
    rollout: PPORollout,
    *,
    epochs: int,
    num_minibatches: int,
    seed: int,
    step_args: tuple = (),
) -> tuple[TrainState, dict[str, float]]:
    """`epochs` passes over `rollout` in `num_minibatches` shuffled minibatches of equal size.

    Args:
      step: from `make_ppo_step`.
      state: the train state (params `{"policy", "value"}`).
      rollout: experience from `ppo_rollout`; its batch must divide into the minibatches.
      epochs: PPO epochs K (TRL `num_ppo_epochs`, default 4).
      num_minibatches: minibatches per epoch (TRL `num_mini_batches`).
      seed: shuffling seed (pass e.g. the iteration number for reproducible runs).
      step_args: extra arguments of every step call (a LoRA step's base params).

    Returns:
      (state, metrics): metrics averaged over every minibatch step, plus the last step's values
      under `final_*` for `approx_kl` and `clip_fraction`, the last step's `skipped_steps` and
      `consecutive_skipped` counters as they are, and the largest `update_ratio`.

    Raises:
      ValueError: a batch that does not split into `num_minibatches` equal parts, or epochs < 1.
    """
    b = rollout.completion_tokens.shape[0]
    if epochs < 1 or num_minibatches < 1 or b % num_minibatches:
        raise ValueError(
            f"rollout batch {b} must split into num_minibatches={num_minibatches} equal parts "
            f"over epochs={epochs} >= 1"
        )
    size = b // num_minibatches
    order = np.random.default_rng(seed)
    history = []
    for _ in range(epochs):
        perm = order.permutation(b)
        for k in range(num_minibatches):
            idx = jnp.asarray(perm[k * size : (k + 1) * size])
            minibatch = jax.tree.map(lambda x, idx=idx: x[idx], rollout)
            state, metrics = step(state, minibatch, *step_args)
            history.append(metrics)
    history = jax.device_get(history)
    mean = {k: float(np.mean([m[k] for m in history])) for k in history[0]}
    counters = {k: int(history[-1][k]) for k in ("skipped_steps", "consecutive_skipped") if k in history[-1]}
    if "update_ratio" in history[0]:  # the largest, so one diverging minibatch step is seen
        counters["update_ratio"] = float(np.max([m["update_ratio"] for m in history]))
    return state, {
        **mean,
        **counters,  # the skip counters as the last step left them, not averaged
        "final_approx_kl": float(history[-1]["approx_kl"]),
        "final_clip_fraction": float(history[-1]["clip_fraction"]),
    }


def adaptive_kl_coef(
    kl_coef: float, kl: float, n_steps: int, *, target: float, horizon: float
) -> float:
    """Ziegler et al. 2019 (arXiv 1909.08593, §2.2) proportional controller for β:

      e = clip(KL / KL_target − 1, −0.2, 0.2),    β ← β · (1 + e · n_steps / horizon)

    as TRL's `AdaptiveKLController` (n_steps = samples in the batch, horizon 10,000 in the paper).

    Args:
      kl_coef: current β > 0.
      kl: observed KL(π ‖ π_ref) per response (nats), e.g. `ppo_rollout`'s `kl` metric.
      n_steps: samples since the last update.
      target: KL_target > 0; horizon: H > 0.

    Returns:
      The new β.

    Raises:
      ValueError: non-positive target or horizon.
    """
    if target <= 0 or horizon <= 0:
        raise ValueError(f"target and horizon must be positive, got {target}, {horizon}")
    error = float(np.clip(kl / target - 1.0, -0.2, 0.2))
    return kl_coef * (1.0 + error * n_steps / horizon)
