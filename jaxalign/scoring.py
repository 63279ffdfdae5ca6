"""Teacher-forced scoring of completions: log-probs, hidden states, values and reward scores.

Everything a trainer or a rollout needs from a forward pass over [prompt; completion] that was
already sampled: `completion_logps` (the policy and the reference), `completion_hidden` (the
states a value head reads), `policy_and_values` (PPO's actor-critic, one parameter tree) and
`reward_model_scorer` (a trained reward model as a score function). The parameter layouts they
read are defined here too: `init_actor_critic`, its `critic_kind` and its shardings.

Shapes: B rows, P prompt length (left-padded), N completion length, D d_model, V vocab,
S = P+N-1 the teacher-forced input positions of [prompt; completion] (the last completion token
is not fed), L MoE layers, k experts per token, E experts.

MoE routes (Routing Replay, "Stabilizing MoE RL by aligning training and inference routers",
arXiv 2510.11370; GSPO arXiv 2507.18071 §5 on MoE instability) travel as one int32 array
`routes` [B, S, L, k]: routes[b, s, l] are the k experts the l-th MoE layer
(`config.moe_layer_indices[l]`) used for input position s (`completion_routes`); `as_routing`
turns it into the per-layer tuple `forward(..., routing=)` takes. Dense models have no routes
(None), so a step's signature and pytrees are the same with and without MoE.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Literal

import chex
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxalign.decoding import prompt_positions
from jaxalign.logprobs import HEAD_CHUNK_TOKENS, HeadStats, head_stats, sequence_logps
from jaxalign.models.config import TransformerConfig
from jaxalign.models.heads import (
    apply_scalar_head,
    init_scalar_head,
    init_scalar_model,
    scalar_head_logical_axes,
    scalar_model_logical_axes,
    sequence_scores,
)
from jaxalign.models.moe import route
from jaxalign.models.transformer import forward, init_params, logits_from_hidden, param_logical_axes
from jaxalign.sharding import DEFAULT_RULES, LogicalRules, named_shardings

Critic = Literal["shared", "separate"]


def as_routing(routes: jax.Array | None, config: TransformerConfig) -> tuple[jax.Array, ...] | None:
    """`routes` int [B, S, L, k] as `forward`'s `routing=`: a tuple of L int32 [B, S, k] (None
    passes through).

    Raises:
      ValueError: routes for a dense model.
      AssertionError: (chex) routes not [B, S, L, k] with L = the config's MoE layers and k its
        experts per token.
    """
    if routes is None:
        return None
    if config.moe is None:
        raise ValueError("routes given for a dense model (config.moe is None)")
    chex.assert_rank(routes, 4)
    chex.assert_axis_dimension(routes, 2, len(config.moe_layer_indices))
    chex.assert_axis_dimension(routes, 3, config.moe.experts_per_token)
    return tuple(routes[:, :, i, :].astype(jnp.int32) for i in range(routes.shape[2]))


def routes_of(router_stats) -> jax.Array | None:
    """The experts each token was routed to in a forward pass: int32 [B, S, L, k] from a tuple of
    L `RouterStats` over [B, S] (`RouterStats.expert_ids`; the replayed ones under `routing=`);
    None for () (a dense model)."""
    if not router_stats:
        return None
    return jnp.stack([s.expert_ids for s in router_stats], axis=2).astype(jnp.int32)  # [B,S,L,k]


def _moe_bias(params, config: TransformerConfig, layer: int) -> jax.Array | None:
    """The selection bias [E] of the MoE block of transformer layer `layer`, or None without one."""
    if not config.moe.router_bias:
        return None
    if config.scan_layers:  # every layer MoE, stacked [L, E]
        return params["layers"]["moe"]["bias"][layer]
    return params[f"layers_{layer}"]["moe"]["bias"]


def router_choices(params, config: TransformerConfig, router_stats) -> jax.Array | None:
    """The experts the routers of `params` choose from the live router logits of a forward pass:
    int32 [B, S, L, k] (`jaxalign.models.moe.route`, with each layer's selection bias). Without
    replay these are the forward's own `expert_ids`; under Routing Replay (`routing=`) they are
    what each layer's router would have chosen for the hidden state it saw, the quantity a
    routing-change fraction compares with the replayed routes. None for a dense model.

    Args:
      params: the transformer params the pass ran with.
      config: its config.
      router_stats: the pass's tuple of L `RouterStats` over [B, S].
    """
    if not router_stats:
        return None
    chosen = []
    for layer, stats in zip(config.moe_layer_indices, router_stats):
        b, t, e = stats.router_logits.shape
        ids, _ = route(stats.router_logits.reshape(b * t, e), _moe_bias(params, config, layer), config.moe)
        chosen.append(ids.reshape(b, t, -1))
    return jnp.stack(chosen, axis=2)  # [B,S,L,k]


def completion_hidden(
    params,
    config: TransformerConfig,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    completion_tokens: jax.Array,
    *,
    dropout_rng: jax.Array | None = None,
    routes: jax.Array | None = None,
    return_router_stats: bool = False,
) -> jax.Array | tuple[jax.Array, tuple]:
    """Final hidden states at the N positions that predict the completion tokens: [B, N, D].

    One teacher-forced forward pass over [prompt; completion] (the last completion token is not
    fed: S = P+N-1 input positions) with the positions generation used. Row t is the state after
    the prompt and completion tokens < t: the input of the LM head for token t, and the state s_t
    a value head scores.

    Args:
      params, config: the model (a transformer params pytree).
      prompt_tokens: int32 [B, P] left-padded; prompt_mask: [B, P], 1 on real tokens.
      completion_tokens: int32 [B, N] (tokens after EOS are ignored by the caller's mask).
      dropout_rng: enables dropout.
      routes: MoE Routing Replay: int [B, S, L, k] experts to use (`completion_routes`; the
        gate weights are recomputed from the live router at those experts, so the router still
        gets gradients); None: the routers choose.
      return_router_stats: also return the MoE layers' `RouterStats` over all S positions (a
        tuple, () for a dense model).

    Returns:
      hidden float32/compute-dtype [B, N, D]; with `return_router_stats`, (hidden, router stats).

    Raises:
      ValueError: routes for a dense model. AssertionError (chex): routes of the wrong shape.
    """
    p = prompt_tokens.shape[1]
    tokens = jnp.concatenate([prompt_tokens, completion_tokens], axis=1)  # [B,P+N]
    full_mask = jnp.concatenate([prompt_mask, jnp.ones_like(completion_tokens)], axis=1)
    positions = prompt_positions(full_mask)  # [B,P+N]
    if routes is not None:
        chex.assert_shape(routes, (tokens.shape[0], tokens.shape[1] - 1, None, None))
    hidden, router = forward(
        params, config, tokens[:, :-1], positions[:, :-1], dropout_rng=dropout_rng, return_hidden=True,
        return_router_stats=True, routing=as_routing(routes, config),
    )  # [B,P+N-1,D]
    hidden = hidden[:, p - 1 :]  # [B,N,D]
    return (hidden, router) if return_router_stats else hidden


def completion_input_mask(prompt_mask: jax.Array, completion_mask: jax.Array) -> jax.Array:
    """bool [B, S = P+N-1]: the real input tokens of `completion_hidden`'s pass (the prompt's
    real tokens and the fed completion tokens up to EOS), HF's `attention_mask` for its MoE
    losses."""
    return jnp.concatenate([prompt_mask != 0, completion_mask[:, :-1] != 0], axis=1)


def completion_routes(
    params,
    config: TransformerConfig,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    completion_tokens: jax.Array,
) -> jax.Array | None:
    """The experts every input token of [prompt; completion] is routed to under `params`, by one
    teacher-forced forward pass (no dropout): int32 [B, S = P+N-1, L, k], the layout
    `completion_hidden(..., routes=)` replays. None for a dense model (no pass is run).

    A rollout records these with the sampling parameters: veRL's "R2" routing replay (routes
    of the old policy's training-engine forward; arXiv 2510.11370's R3 records the inference
    engine's own routes, which jaxalign's `generate` does not return). Padding positions hold
    the routes of their (unattended) inputs; they enter no loss.

    Args:
      params, config: the policy.
      prompt_tokens: int32 [B, P] left-padded; prompt_mask: [B, P].
      completion_tokens: int32 [B, N].
    """
    if config.moe is None:
        return None
    _, router = completion_hidden(
        params, config, prompt_tokens, prompt_mask, completion_tokens, return_router_stats=True
    )
    return routes_of(router)


@functools.lru_cache(maxsize=16)
def completion_routes_fn(config: TransformerConfig) -> Callable[..., jax.Array | None]:
    """jit-compiled `fn(params, prompt_tokens, prompt_mask, completion_tokens) -> routes`
    (`completion_routes`), memoised per config."""
    return jax.jit(lambda params, prompts, masks, completions: completion_routes(params, config, prompts, masks, completions))


def label_stats(
    params,
    config: TransformerConfig,
    hidden: jax.Array,
    labels: jax.Array,
    *,
    head_chunk: int | None = HEAD_CHUNK_TOKENS,
    uniform_ce: bool = False,
    entropy: bool = False,
    argmax: bool = False,
) -> HeadStats:
    """The model's output head on final hidden states [B, T, D], reduced at once to per-token
    statistics of `labels` [B, T] (`jaxalign.logprobs.head_stats`: chunks of about `head_chunk`
    tokens, rematerialised, so no [B, T, V] logits are held; None: the unfused reference).

    Returns:
      `HeadStats`: float32 [B, T] logps (and uniform_ce / entropy / int32 argmax when asked).

    Raises:
      ValueError: head_chunk <= 0.
    """
    return head_stats(
        hidden, labels, functools.partial(logits_from_hidden, params, config), chunk_tokens=head_chunk,
        uniform_ce=uniform_ce, entropy=entropy, argmax=argmax,
    )


def next_token_stats(
    params,
    config: TransformerConfig,
    tokens: jax.Array,
    *,
    dropout_rng: jax.Array | None = None,
    head_chunk: int | None = HEAD_CHUNK_TOKENS,
    uniform_ce: bool = False,
    entropy: bool = False,
    argmax: bool = False,
    return_router_stats: bool = False,
) -> HeadStats | tuple[HeadStats, tuple]:
    """Teacher-forced statistics of tokens[:, 1:] given tokens[:, :-1] (the SFT, DPO and KTO
    objective's pass over right-padded [B, T] rows): one forward pass to hidden states, then
    `label_stats`.

    Args:
      params, config: the model.
      tokens: int32 [B, T].
      dropout_rng: enables dropout.
      head_chunk, uniform_ce, entropy, argmax: as in `label_stats`.
      return_router_stats: also return the MoE layers' router statistics of the same pass (a
        tuple of `jaxalign.models.moe.RouterStats` over [B, T-1], one per MoE layer; () for a
        dense model), for the auxiliary losses.

    Returns:
      `HeadStats` of [B, T-1]: entry t is about token t+1; with `return_router_stats`,
      (HeadStats, router stats).
    """
    hidden, router = forward(params, config, tokens[:, :-1], dropout_rng=dropout_rng, return_hidden=True,
                             return_router_stats=True)  # [B,T-1,D]
    stats = label_stats(
        params, config, hidden, tokens[:, 1:], head_chunk=head_chunk, uniform_ce=uniform_ce,
        entropy=entropy, argmax=argmax,
    )
    return (stats, router) if return_router_stats else stats


def row_logps(
    params,
    config: TransformerConfig,
    tokens: jax.Array,
    mask: jax.Array,
    *,
    average: bool = False,
    dropout_rng: jax.Array | None = None,
    head_chunk: int | None = HEAD_CHUNK_TOKENS,
    return_router_stats: bool = False,
) -> jax.Array | tuple[jax.Array, tuple]:
    """Log-probability of each right-padded row's counted tokens (the preference and KTO
    objectives' sequence scores): Σ_t mask[:, t]·log p(tokens[:, t] | tokens[:, <t]), t ≥ 1, or
    its mean over the counted tokens with `average` (IPO, SimPO).

    Args:
      params, config: the model.
      tokens: int32 [B, T]; mask: [B, T], 1.0 on the tokens that count (the completion).
      average: length-normalised log-probs instead of sums (rows with no counted token: 0).
      dropout_rng: enables dropout.
      head_chunk: tokens per chunk of the fused head (`label_stats`); None: unfused reference.
      return_router_stats: also return the pass's MoE `RouterStats` over [B, T-1] (a tuple, ()
        for a dense model; `next_token_stats`).

    Returns:
      float32 [B], nats; with `return_router_stats`, (logps, router stats).
    """
    stats, router = next_token_stats(
        params, config, tokens, dropout_rng=dropout_rng, head_chunk=head_chunk, return_router_stats=True
    )
    seq = sequence_logps(stats.logps, mask[:, 1:], average=average)  # [B]
    return (seq, router) if return_router_stats else seq


def completion_logps(
    params,
    config: TransformerConfig,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    completion_tokens: jax.Array,
    *,
    dropout_rng: jax.Array | None = None,
    head_chunk: int | None = HEAD_CHUNK_TOKENS,
    routes: jax.Array | None = None,
    return_router_stats: bool = False,
) -> jax.Array | tuple[jax.Array, tuple]:
    """Teacher-forced log-probs of each completion token given its (left-padded) prompt.

    The output head runs only on the N positions that predict completion tokens
    (`completion_hidden`), fused with the log-prob gather in chunks (`label_stats`), so neither
    the [B, P+N, V] logits of the prompt nor the [B, N, V] ones of the completion are held.

    Args:
      params, config: the model.
      prompt_tokens: int32 [B, P] left-padded; prompt_mask: [B, P], 1 on real tokens.
      completion_tokens: int32 [B, N] (tokens after EOS are ignored by the caller's mask).
      dropout_rng: enables dropout.
      head_chunk: tokens per chunk of the fused head; None: the unfused reference.
      routes, return_router_stats: MoE Routing Replay and router statistics, as in
        `completion_hidden`.

    Returns:
      float32 [B, N] log-probs (nats); equal to `generate`'s `model_logps` on the same tokens.
      With `return_router_stats`, (logps, router stats over [B, P+N-1]).
    """
    hidden, router = completion_hidden(
        params, config, prompt_tokens, prompt_mask, completion_tokens, dropout_rng=dropout_rng,
        routes=routes, return_router_stats=True,
    )  # [B,N,D]
    logps = label_stats(params, config, hidden, completion_tokens, head_chunk=head_chunk).logps
    return (logps, router) if return_router_stats else logps


@functools.lru_cache(maxsize=16)
def completion_logps_fn(config: TransformerConfig) -> Callable[..., jax.Array]:
    """jit-compiled `fn(params, prompt_tokens, prompt_mask, completion_tokens) -> [B, N]`
    (`completion_logps` without dropout), memoised per config so every caller shares one
    compilation per shape."""
    return jax.jit(lambda params, prompts, masks, completions: completion_logps(params, config, prompts, masks, completions))


# --------------------------------------------------------------------------------------------
# PPO's actor-critic: one parameter tree {"policy", "value"}.


def critic_kind(params) -> Critic:
    """Which critic an actor-critic tree holds, read from its layout: "separate" when
    `params["value"]` has its own trunk (`{"backbone", "head"}`), "shared" for a value head on the
    policy's trunk (`{"head"}`).

    Raises:
      ValueError: params that are not `{"policy": ..., "value": {"head", ["backbone"]}}` (see
        `init_actor_critic`).
    """
    value = params.get("value") if isinstance(params, Mapping) else None
    if not isinstance(params, Mapping) or "policy" not in params or not isinstance(value, Mapping):
        raise ValueError("PPO params must be {'policy': <transformer params>, 'value': {...}} (see init_actor_critic)")
    if "head" not in value or set(value) - {"head", "backbone"}:
        raise ValueError(
            f"params['value'] must be {{'head'}} (shared critic) or {{'backbone', 'head'}} "
            f"(separate critic), got keys {sorted(value)}"
        )
    return "separate" if "backbone" in value else "shared"


def init_actor_critic(policy_params, value_params=None, *, config: TransformerConfig, rng: jax.Array):
    """PPO's trainable params `{"policy": ..., "value": ...}` (one pytree, one optimizer, as TRL's
    `PolicyAndValueWrapper`).

    Args:
      policy_params: transformer params of the policy (e.g. the SFT model; copy them first if the
        same arrays are also the reference and the train step donates its state).
      value_params: a separate critic `{"backbone", "head"}` (`init_scalar_model`, e.g. from the
        trained reward model as InstructGPT does, §3.5); None: a fresh value head on the
        policy's own trunk (the "shared" critic).
      config: the policy's config (for the head's width).
      rng: key of the fresh head.
    """
    if value_params is None:
        value_params = {"head": init_scalar_head(config, rng)}
    return {"policy": policy_params, "value": value_params}


def actor_critic_logical_axes(
    config: TransformerConfig, *, critic: Critic = "shared", value_config: TransformerConfig | None = None
):
    """Logical axis names of `init_actor_critic`'s tree (for `jaxalign.sharding.partition_specs`)."""
    if critic == "shared":
        value = {"head": scalar_head_logical_axes()}
    else:
        value = scalar_model_logical_axes(value_config or config)
    return {"policy": param_logical_axes(config), "value": value}


def actor_critic_shardings(
    config: TransformerConfig,
    mesh: Mesh,
    *,
    critic: Critic = "shared",
    value_config: TransformerConfig | None = None,
    rules: LogicalRules = DEFAULT_RULES,
):
    """`NamedSharding` tree of PPO's `{"policy", "value"}` on `mesh` (a value head on the policy
    trunk for critic="shared", a `{"backbone", "head"}` critic of `value_config` otherwise)."""
    logical = actor_critic_logical_axes(config, critic=critic, value_config=value_config)
    return named_shardings(logical, _actor_critic_shapes(config, critic, value_config), mesh, rules)


def _actor_critic_shapes(config, critic, value_config):
    def build():
        key = jax.random.key(0)
        value = None if critic == "shared" else init_scalar_model(value_config or config, key)
        return init_actor_critic(init_params(config, key), value, config=config, rng=key)

    return jax.eval_shape(build)


def scalar_model_shardings(config: TransformerConfig, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
    """`NamedSharding` tree of a reward / value model `{"backbone", "head"}` (`init_scalar_model`)."""
    shapes = jax.eval_shape(lambda: init_scalar_model(config, jax.random.key(0)))
    return named_shardings(scalar_model_logical_axes(config), shapes, mesh, rules)


def policy_and_values(
    params,
    config: TransformerConfig,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    completion_tokens: jax.Array,
    *,
    value_config: TransformerConfig | None = None,
    dropout_rng: jax.Array | None = None,
    head_chunk: int | None = HEAD_CHUNK_TOKENS,
    entropy: bool = True,
    routes: jax.Array | None = None,
    return_router_stats: bool = False,
) -> tuple[HeadStats, jax.Array] | tuple[HeadStats, jax.Array, tuple]:
    """The policy's completion statistics (log-probs, entropy) and the critic's values at the N
    completion positions.

    values[b, t] = V(s_t), the state before completion token t (the same hidden state the LM head
    reads to predict token t; TRL's PPOTrainer aligns values and log-probs this way). The critic
    is the one the tree holds (`critic_kind`): a value head on the policy trunk (one forward pass;
    the value loss also trains the trunk) or its own trunk and forward pass. The policy head is
    fused with its reductions (`label_stats`): no [B, N, V] logits are held.

    Args:
      params: `{"policy", "value"}` from `init_actor_critic`.
      config: the policy's config; value_config: the separate critic's (default: config).
      prompt_tokens, prompt_mask: [B, P] left-padded; completion_tokens: int32 [B, N].
      dropout_rng: enables dropout in both.
      head_chunk: tokens per chunk of the fused head; None: the unfused reference.
      entropy: also compute the policy's per-token entropy.
      routes: MoE Routing Replay of the policy's pass (`completion_hidden`); a separate critic
        routes by itself.
      return_router_stats: also return the policy pass's MoE `RouterStats` over [B, P+N-1].

    Returns:
      (`HeadStats` with float32 [B, N] logps (and entropy), values float32 [B, N]); with
      `return_router_stats`, (stats, values, router stats).

    Raises:
      ValueError: params that are not an actor-critic tree (`critic_kind`).
    """
    critic = critic_kind(params)
    hidden, router = completion_hidden(
        params["policy"], config, prompt_tokens, prompt_mask, completion_tokens, dropout_rng=dropout_rng,
        routes=routes, return_router_stats=True,
    )  # [B,N,D]
    stats = label_stats(params["policy"], config, hidden, completion_tokens, head_chunk=head_chunk, entropy=entropy)
    if critic == "separate":
        hidden = completion_hidden(
            params["value"]["backbone"], value_config or config, prompt_tokens, prompt_mask,
            completion_tokens, dropout_rng=dropout_rng,
        )  # [B,N,D_critic]
    values = apply_scalar_head(params["value"]["head"], hidden)
    return (stats, values, router) if return_router_stats else (stats, values)


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


__all__ = [
    "Critic",
    "actor_critic_logical_axes",
    "actor_critic_shardings",
    "as_routing",
    "completion_hidden",
    "completion_input_mask",
    "completion_logps",
    "completion_logps_fn",
    "completion_routes",
    "completion_routes_fn",
    "critic_kind",
    "init_actor_critic",
    "label_stats",
    "next_token_stats",
    "policy_and_values",
    "reward_model_scorer",
    "router_choices",
    "routes_of",
    "row_logps",
    "scalar_model_shardings",
]
