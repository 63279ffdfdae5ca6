"""PPO training step (actor + critic in one pytree), PPO epochs over minibatches, adaptive KL.

A PPO iteration is: `jaxalign.rollout.ppo_rollout` with the current params, then `ppo_update`:
`epochs` passes over the rollout, each in `num_minibatches` shuffled minibatches, one optimizer
step per minibatch (Schulman et al. 2017, arXiv 1707.06347, Alg. 1; TRL's PPOTrainer loop);
then `adaptive_kl_coef` moves β towards a target KL (Ziegler et al. 2019, arXiv 1909.08593 §2.2).
PPO-ptx (InstructGPT, arXiv 2203.02155 Eq. 2) adds a language-modelling loss on an SFT or
pretraining batch to every step: `make_ppo_step(..., ptx_coef=γ)` takes `PPOPtxBatch(rollout,
sft)` batches, which `ppo_update(..., ptx_batch_at=...)` assembles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxalign.advantages import explained_variance
from jaxalign.logprobs import HEAD_CHUNK_TOKENS
from jaxalign.lora import LoraConfig
from jaxalign.losses.ppo import ppo_policy_loss, ppo_value_loss
from jaxalign.models.config import TransformerConfig
from jaxalign.ops import masked_mean
from jaxalign.rollout.ppo import PPORollout
from jaxalign.scoring import policy_and_values
from jaxalign.trainers.grpo import check_routing_replay, policy_router_terms, replay_routes
from jaxalign.trainers.sft import ROUTER_AUX_LOSS_COEF, ROUTER_Z_LOSS_COEF, check_router_loss_coefs, sft_batch_loss
from jaxalign.trainers.step import Batch, Metrics, StepShardings, TrainState, make_train_step

# ptx_batch_at(n) -> the SFT batch of the run's n-th optimizer step (n = state.step before it)
PtxBatchAt = Callable[[int], Batch]


class PPOPtxBatch(NamedTuple):
    """The batch of a PPO-ptx step: a rollout minibatch and an SFT (or pretraining) batch.

    Attributes:
      rollout: a `PPORollout` minibatch.
      sft: `{"tokens": int32 [B', T'] right-padded, "mask": float32 [B', T']}` as
        `jaxalign.data.collate_sft` makes it (position t predicts tokens[:, t+1], counted where
        mask[:, t+1] is 1; `sft_batch_loss`).
    """

    rollout: PPORollout
    sft: Batch


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
    dual_clip: float | None = None,
    log_ratio_clip: float | None = None,
    sft_batch: Batch | None = None,
    ptx_coef: float = 0.0,
    head_chunk: int | None = HEAD_CHUNK_TOKENS,
    routing_replay: bool = False,
    router_aux_loss_coef: float = ROUTER_AUX_LOSS_COEF,
    router_z_loss_coef: float = ROUTER_Z_LOSS_COEF,
) -> tuple[jax.Array, Metrics]:
    """L = L_clip(policy) + c_v · L_value − c_ent · entropy [+ γ · L_ptx], token means over response
    tokens (PPO paper Eq. 9 with the signs of a loss to minimise; TRL defaults c_v = 0.1,
    c_ent = 0).

    PPO-ptx (InstructGPT, Ouyang et al. 2022, arXiv 2203.02155 Eq. 2: objective + γ·E_{x~D_pretrain}
    [log π(x)]) as a loss: L_ptx = `sft_batch_loss(params["policy"], config, sft_batch)`, the
    token-mean negative log-likelihood (nats per token) of the SFT batch's counted tokens, so
    γ = `ptx_coef` weighs one nat per SFT token against the PPO terms' per-response-token means:
    each SFT token gets γ·(response tokens / SFT tokens) times the weight of a response token
    in the gradient. InstructGPT's γ = 27.8 is relative to their own (unpublished) scaling of the
    two terms and does not transfer as a number; read `ptx_loss` against `policy_loss`.

    Args:
      params: `{"policy", "value"}` (`jaxalign.scoring.init_actor_critic`; the critic kind is
        read from the tree).
      config, value_config: see `jaxalign.scoring.policy_and_values`.
      rollout: a `PPORollout` (or a minibatch of one).
      dropout_rng: enables dropout.
      clip_eps: ε of the policy ratio clip; value_clip_eps: ε of the value clip.
      vf_coef: c_v; ent_coef: c_ent (entropy bonus).
      dual_clip, log_ratio_clip: `ppo_policy_loss`'s veRL options (None: off).
      sft_batch: the PPO-ptx batch (`PPOPtxBatch.sft`); given exactly when ptx_coef > 0. Its
        forward pass gets the dropout key `fold_in(dropout_rng, 2)`.
      ptx_coef: γ ≥ 0.
      head_chunk: tokens per chunk of the fused output head (log-probs and entropy in one
        chunked pass, `jaxalign.scoring.policy_and_values`; None: the unfused reference).
      routing_replay: MoE policies: score the policy with `rollout.routes` (int32 [B, P+N-1,
        L, k], recorded under the sampling policy; Routing Replay, arXiv 2510.11370); the gate
        weights still come from the live router. A shared critic reads the same replayed pass.
      router_aux_loss_coef, router_z_loss_coef: MoE policies: the loss adds
        `router_aux_loss_coef`·L_aux + `router_z_loss_coef`·L_z of the policy's pass
        (`jaxalign.trainers.sft.router_losses`; a separate MoE critic's routers get no
        auxiliary loss). The ptx term's SFT pass adds its own (`sft_batch_loss`, same weights).

    Returns:
      (loss, metrics): `policy_loss`, `value_loss`, `entropy`, `clip_fraction`,
      `value_clip_fraction`, `approx_kl`, `ratio`, `explained_variance`, `values`, `returns`
      (means), `dual_clip_fraction` with dual_clip, `ptx_loss` (L_ptx) with an SFT batch; for
      an MoE policy `aux_loss`, `z_loss` and `routing_change_fraction`
      (`jaxalign.trainers.grpo.policy_router_terms`).

    Raises:
      ValueError: an SFT batch without ptx_coef > 0, or ptx_coef > 0 (or < 0) without one;
        routing_replay with a rollout without routes; a negative router loss coefficient.
    """
    check_router_loss_coefs(router_aux_loss_coef, router_z_loss_coef)
    if ptx_coef < 0 or (sft_batch is None) != (ptx_coef == 0):
        raise ValueError(
            f"PPO-ptx takes an SFT batch exactly when ptx_coef > 0; got ptx_coef={ptx_coef} and "
            f"{'no' if sft_batch is None else 'an'} SFT batch"
        )
    mask = rollout.completion_mask
    stats, values, router = policy_and_values(
        params, config, rollout.prompt_tokens, rollout.prompt_mask, rollout.completion_tokens,
        value_config=value_config, dropout_rng=dropout_rng, head_chunk=head_chunk,
        routes=replay_routes(rollout, routing_replay), return_router_stats=True,
    )  # [B,N] each
    logps = stats.logps  # [B,N]
    pg_loss, pg = ppo_policy_loss(
        logps, rollout.old_logps, rollout.advantages, mask, clip_eps=clip_eps, dual_clip=dual_clip,
        log_ratio_clip=log_ratio_clip,
    )
    vf_loss, vf = ppo_value_loss(values, rollout.old_values, rollout.returns, mask, clip_eps=value_clip_eps)
    ent = masked_mean(stats.entropy, mask)
    loss = pg_loss + vf_coef * vf_loss - ent_coef * ent
    metrics = {
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
    if dual_clip is not None:
        metrics["dual_clip_fraction"] = pg["dual_clip_fraction"]
    if router:
        penalty, moe_metrics = policy_router_terms(
            params["policy"], config, router, rollout, routing_replay=routing_replay,
            router_aux_loss_coef=router_aux_loss_coef, router_z_loss_coef=router_z_loss_coef,
        )
        loss = loss + penalty
        metrics.update(moe_metrics)
    if sft_batch is not None:
        ptx_rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, 2)
        ptx_loss, _ = sft_batch_loss(
            params["policy"], config, sft_batch, ptx_rng, head_chunk=head_chunk,
            router_aux_loss_coef=router_aux_loss_coef, router_z_loss_coef=router_z_loss_coef,
        )
        loss = loss + ptx_coef * ptx_loss
        metrics["ptx_loss"] = ptx_loss
    return loss, metrics


def make_ppo_step(
    config: TransformerConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    dropout: bool = False,
    lora: LoraConfig | None = None,
    shardings: StepShardings | None = None,
    routing_replay: bool = False,
    router_aux_loss_coef: float = ROUTER_AUX_LOSS_COEF,
    router_z_loss_coef: float = ROUTER_Z_LOSS_COEF,
    **loss_kwargs,
) -> Callable:
    """jit-compiled `step(state, rollout) -> (state, metrics)` minimising `ppo_batch_loss`.

    MoE policies: `routing_replay=True` scores the policy with `PPORollout.routes` (the
    experts of the sampling policy, arXiv 2510.11370); `router_aux_loss_coef` (0.001) and
    `router_z_loss_coef` (0) weigh the router losses; metrics add `aux_loss`, `z_loss`,
    `routing_change_fraction` (`ppo_batch_loss`). Replay changes neither the signature nor the
    jit cache (routes are a fixed-shape leaf of the rollout, minibatched with it).

    `loss_kwargs` are `ppo_batch_loss`'s options (value_config, clip_eps, value_clip_eps,
    vf_coef, ent_coef, dual_clip, log_ratio_clip, ptx_coef, head_chunk). With ptx_coef > 0 (PPO-ptx) the
    step's batch is a `PPOPtxBatch(rollout, sft)` (`ppo_update(..., ptx_batch_at=...)` builds
    them); with ptx_coef = 0 (default) it is the rollout and the step is plain PPO. Dropout is off by default so that the first minibatch's ratio is exactly
    1 (TRL sets dropout to 0 for PPO for the same reason). With `lora`, the state's params are
    adapters of the `{"policy", "value"}` tree and the step is `step(state, rollout,
    base_params)`; train the critic in full with e.g. `LoraConfig(trainable=("value",))`, and
    sample with `merge_lora(base_params, adapters, lora)` (`ppo_loop`'s `policy_fn`).
    `shardings`: `params_step_shardings(..., jaxalign.scoring.actor_critic_shardings(...))`.

    Raises:
      ValueError: routing_replay for a dense config; a negative router loss coefficient.
    """
    check_routing_replay(config, routing_replay)
    check_router_loss_coefs(router_aux_loss_coef, router_z_loss_coef)
    loss_kwargs = dict(loss_kwargs, routing_replay=routing_replay, router_aux_loss_coef=router_aux_loss_coef,
                       router_z_loss_coef=router_z_loss_coef)

    def loss_fn(params, batch, dropout_rng):
        if isinstance(batch, PPOPtxBatch):
            return ppo_batch_loss(params, config, batch.rollout, dropout_rng, sft_batch=batch.sft, **loss_kwargs)
        return ppo_batch_loss(params, config, batch, dropout_rng, **loss_kwargs)

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
    ptx_batch_at: PtxBatchAt | None = None,
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
      ptx_batch_at: PPO-ptx (a step made with ptx_coef > 0): `ptx_batch_at(n)` is the SFT batch
        of the optimizer step that starts at `state.step` = n, so it must be a pure function of
        n for a resumed run to draw the same batches; each step then gets
        `PPOPtxBatch(minibatch, ptx_batch_at(n))`. None: plain PPO steps.

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
    first = int(state.step) if ptx_batch_at is not None else 0  # read before the step donates it
    history = []
    for _ in range(epochs):
        perm = order.permutation(b)
        for k in range(num_minibatches):
            idx = jnp.asarray(perm[k * size : (k + 1) * size])
            minibatch = jax.tree.map(lambda x, idx=idx: x[idx], rollout)
            if ptx_batch_at is not None:
                minibatch = PPOPtxBatch(minibatch, ptx_batch_at(first + len(history)))
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
