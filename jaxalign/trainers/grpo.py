"""GRPO training step: the policy's completion log-probs on a `Rollout`, under `grpo_loss`.

A GRPO iteration is: `grpo_rollout` with the current params (old-policy log-probs come from the
generation itself), then μ calls of this step on the same rollout (DeepSeekMath's inner
iterations; with μ = 1 the ratio is 1 and the clip is inactive on the first and only update).

MoE policies (`config.moe`): the loss adds the router losses of the policy's pass
(`jaxalign.trainers.sft.router_losses`: `router_aux_loss_coef`·L_aux + `router_z_loss_coef`·L_z),
and with `routing_replay=True` the policy is scored with the experts the rollout recorded under
the sampling params (`Rollout.routes`; Routing Replay, "Stabilizing MoE RL by aligning training
and inference routers", arXiv 2510.11370; GSPO, arXiv 2507.18071, names the same expert-volatility
problem of GRPO on MoE models). The metric `routing_change_fraction` reports how many of the
(completion token, MoE layer) routes the params being updated would choose differently.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxalign.logprobs import HEAD_CHUNK_TOKENS
from jaxalign.lora import LoraConfig
from jaxalign.losses.grpo import grpo_loss
from jaxalign.losses.moe import routing_change_fraction
from jaxalign.models.config import TransformerConfig
from jaxalign.prefix import PrefixConfig
from jaxalign.rollout.grpo import Rollout
from jaxalign.scoring import completion_input_mask, completion_logps, router_choices, routes_of
from jaxalign.trainers.sft import (
    ROUTER_AUX_LOSS_COEF,
    ROUTER_Z_LOSS_COEF,
    check_router_loss_coefs,
    router_losses,
)
from jaxalign.trainers.step import Metrics, StepShardings, make_train_step


def check_routing_replay(config: TransformerConfig, routing_replay: bool) -> None:
    """Raises ValueError for `routing_replay=True` on a dense model (nothing to replay)."""
    if routing_replay and config.moe is None:
        raise ValueError("routing_replay=True needs an MoE policy (config.moe is None)")


def replay_routes(rollout, routing_replay: bool) -> jax.Array | None:
    """The routes a policy pass replays: `rollout.routes` with `routing_replay`, else None.

    Raises:
      ValueError: routing_replay with a rollout that recorded no routes (a dense sampling policy).
    """
    if not routing_replay:
        return None
    if rollout.routes is None:
        raise ValueError("routing_replay=True but the rollout has no routes (sampled from a dense policy?)")
    return rollout.routes


def policy_router_terms(
    params,
    config: TransformerConfig,
    router_stats,
    rollout,
    *,
    routing_replay: bool,
    router_aux_loss_coef: float,
    router_z_loss_coef: float,
    where: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """The MoE terms of an RL policy pass over [prompt; completion]: (penalty, metrics).

    penalty and the metrics `aux_loss`, `z_loss` are `router_losses` over the pass's real input
    tokens (`completion_input_mask`: prompt and completion up to EOS; rows with `where` = 0
    left out). `routing_change_fraction` (when the rollout has routes) is the fraction of
    (counted completion token, MoE layer) pairs whose expert set under `params` differs from
    `rollout.routes` (`jaxalign.losses.moe.routing_change_fraction`), at the N positions whose
    states predict the completion tokens (P−1+t for token t: the last prompt token for t = 0).
    "Under `params`" is the pass's own routing without replay and, under replay, the set each
    layer's router would choose from its live logits (`router_choices`).

    Args:
      params: the policy's transformer params (the pass's).
      config: its config.
      router_stats: the pass's `RouterStats` tuple over [B, P+N-1] (() for a dense model).
      rollout: a `Rollout` or `PPORollout` (prompt_mask [B, P], completion_mask [B, N], routes).
      routing_replay: whether the pass replayed `rollout.routes`.
      router_aux_loss_coef, router_z_loss_coef: `router_losses`' weights.
      where: optional [B], 0 on rows excluded from the loss.

    Returns:
      (penalty float32 scalar, metrics); (0.0, {}) for a dense model.
    """
    if not router_stats:
        return jnp.zeros((), jnp.float32), {}
    real = completion_input_mask(rollout.prompt_mask, rollout.completion_mask)  # [B,P+N-1]
    counted = rollout.completion_mask != 0  # [B,N]
    if where is not None:
        real = real & (where != 0)[:, None]
        counted = counted & (where != 0)[:, None]
    penalty, metrics = router_losses(
        router_stats, real, router_aux_loss_coef=router_aux_loss_coef, router_z_loss_coef=router_z_loss_coef
    )
    if rollout.routes is not None:
        chosen = router_choices(params, config, router_stats) if routing_replay else routes_of(router_stats)
        p = rollout.prompt_mask.shape[1]
        metrics = {**metrics, "routing_change_fraction": routing_change_fraction(
            chosen[:, p - 1 :], rollout.routes[:, p - 1 :], counted
        )}
    return penalty, metrics


def grpo_batch_loss(
    params,
    config: TransformerConfig,
    rollout: Rollout,
    dropout_rng: jax.Array | None = None,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    beta: float = 0.04,
    kl_kind: str = "k3",
    loss_agg: str = "seq_mean_token_mean",
    importance_level: str = "token",
    max_length: int | None = None,
    denominator: jax.Array | None = None,
    head_chunk: int | None = HEAD_CHUNK_TOKENS,
    routing_replay: bool = False,
    router_aux_loss_coef: float = ROUTER_AUX_LOSS_COEF,
    router_z_loss_coef: float = ROUTER_Z_LOSS_COEF,
) -> tuple[jax.Array, Metrics]:
    """`grpo_loss` of the policy on a rollout (see `jaxalign.losses.grpo_loss` for the options).

    `denominator` (the whole rollout's `grpo_denominator`) makes a minibatch of a rollout
    contribute its exact share of the whole-batch loss. `head_chunk`: tokens per chunk of the
    fused output head (`jaxalign.scoring.completion_logps`; None: the unfused reference).

    MoE policies: `routing_replay` scores the policy with `rollout.routes` (int32 [B·G, P+N-1,
    L, k]) instead of its routers' choice; the gate weights are recomputed from the live router
    logits at those experts (`jaxalign.models.moe.gate_weights`), so the router still learns.
    The loss adds `router_aux_loss_coef`·L_aux + `router_z_loss_coef`·L_z and the metrics add
    `aux_loss`, `z_loss` and, with routes, `routing_change_fraction` (`policy_router_terms`).
    All three are absent for a dense model.

    Raises:
      ValueError: routing_replay with a rollout without routes; a negative coefficient.
    """
    check_router_loss_coefs(router_aux_loss_coef, router_z_loss_coef)
    logps, router = completion_logps(
        params, config, rollout.prompt_tokens, rollout.prompt_mask, rollout.completion_tokens,
        dropout_rng=dropout_rng, head_chunk=head_chunk, routes=replay_routes(rollout, routing_replay),
        return_router_stats=True,
    )  # [B·G,N]
    loss, metrics = grpo_loss(
        logps,
        rollout.old_logps,
        rollout.ref_logps if beta else None,
        rollout.advantages,
        rollout.completion_mask,
        clip_eps=clip_eps,
        clip_eps_high=clip_eps_high,
        beta=beta,
        kl_kind=kl_kind,
        loss_agg=loss_agg,
        importance_level=importance_level,
        max_length=max_length if max_length is not None else rollout.completion_tokens.shape[1],
        denominator=denominator,
        where=rollout.where,
    )
    penalty, moe_metrics = policy_router_terms(
        params, config, router, rollout, routing_replay=routing_replay,
        router_aux_loss_coef=router_aux_loss_coef, router_z_loss_coef=router_z_loss_coef, where=rollout.where,
    )
    if router:
        loss = loss + penalty
    return loss, {**metrics, **moe_metrics}


def make_grpo_step(
    config: TransformerConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    dropout: bool = False,
    lora: LoraConfig | None = None,
    prefix: PrefixConfig | None = None,
    shardings: StepShardings | None = None,
    routing_replay: bool = False,
    router_aux_loss_coef: float = ROUTER_AUX_LOSS_COEF,
    router_z_loss_coef: float = ROUTER_Z_LOSS_COEF,
    **loss_kwargs,
) -> Callable:
    """jit-compiled `step(state, rollout) -> (state, metrics)` minimising `grpo_batch_loss`.

    MoE policies: `routing_replay=True` scores the policy with the routes the rollout recorded
    under the sampling params (`Rollout.routes`, arXiv 2510.11370), so that the old-policy and
    current-policy log-probs of the ratio come from the same experts; off (default) the routers
    choose anew at every step, as before. The loss adds `router_aux_loss_coef` (0.001, Mixtral's
    default; 0 disables) × L_aux and `router_z_loss_coef` (default 0) × L_z; the metrics add
    `aux_loss`, `z_loss` and `routing_change_fraction` (`grpo_batch_loss`). The step's
    signature and jit cache are the same with replay on or off (the routes are an array leaf of
    the rollout, static in shape).

    `loss_kwargs` are `grpo_batch_loss`'s options (clip_eps, clip_eps_high, beta, kl_kind,
    loss_agg, importance_level, max_length, head_chunk). Dropout is off by default: it would make the first
    inner iteration's ratio differ from 1 (TRL disables it for the same reason). `shardings`
    (`jaxalign.trainers.step_shardings(config, tx, mesh)`) compiles the step for a device mesh:
    the rollout's rows are split over the batch axes and the loss stays the whole batch's.

    With `lora`, the state's params are the adapters (`jaxalign.lora.init_lora`) and the step is
    `step(state, rollout, base_params)`. Sample the rollout with the policy
    `merge_lora(base_params, adapters, lora)` and `ref_params=base_params`: the base with the
    adapters off is the reference, so there is no second copy of the weights. (`shardings` then
    needs `num_extra_params=1` for the base.) Adapter dropout follows `dropout`.
    `prefix` (`jaxalign.prefix.PrefixConfig`) trains a prefix-tuning prefix of the frozen params
    instead, the way `lora` trains adapters (`make_train_step`).

    Raises:
      ValueError: routing_replay for a dense config; a negative router loss coefficient.
    """
    check_routing_replay(config, routing_replay)
    check_router_loss_coefs(router_aux_loss_coef, router_z_loss_coef)

    def loss_fn(params, rollout, dropout_rng):
        return grpo_batch_loss(
            params, config, rollout, dropout_rng, routing_replay=routing_replay,
            router_aux_loss_coef=router_aux_loss_coef, router_z_loss_coef=router_z_loss_coef, **loss_kwargs,
        )

    return make_train_step(
        loss_fn, tx, schedule, config=config, dropout=dropout, lora=lora, prefix=prefix, shardings=shardings
    )
