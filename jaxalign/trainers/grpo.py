"""GRPO training step: the policy's completion log-probs on a `Rollout`, under `grpo_loss`.

A GRPO iteration is: `grpo_rollout` with the current params (old-policy log-probs come from the
generation itself), then μ calls of this step on the same rollout (DeepSeekMath's inner
iterations; with μ = 1 the ratio is 1 and the clip is inactive on the first and only update).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

from jaxalign.logprobs import HEAD_CHUNK_TOKENS
from jaxalign.lora import LoraConfig
from jaxalign.losses.grpo import grpo_loss
from jaxalign.models.config import TransformerConfig
from jaxalign.prefix import PrefixConfig
from jaxalign.rollout.grpo import Rollout
from jaxalign.scoring import completion_logps
from jaxalign.trainers.step import Metrics, StepShardings, make_train_step


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
) -> tuple[jax.Array, Metrics]:
    """`grpo_loss` of the policy on a rollout (see `jaxalign.losses.grpo_loss` for the options).

    `denominator` (the whole rollout's `grpo_denominator`) makes a minibatch of a rollout
    contribute its exact share of the whole-batch loss. `head_chunk`: tokens per chunk of the
    fused output head (`jaxalign.scoring.completion_logps`; None: the unfused reference).
    """
    logps = completion_logps(
        params, config, rollout.prompt_tokens, rollout.prompt_mask, rollout.completion_tokens,
        dropout_rng=dropout_rng, head_chunk=head_chunk,
    )  # [B·G,N]
    return grpo_loss(
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


def make_grpo_step(
    config: TransformerConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    dropout: bool = False,
    lora: LoraConfig | None = None,
    prefix: PrefixConfig | None = None,
    shardings: StepShardings | None = None,
    **loss_kwargs,
) -> Callable:
    """jit-compiled `step(state, rollout) -> (state, metrics)` minimising `grpo_batch_loss`.

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
    """

    def loss_fn(params, rollout, dropout_rng):
        return grpo_batch_loss(params, config, rollout, dropout_rng, **loss_kwargs)

    return make_train_step(
        loss_fn, tx, schedule, config=config, dropout=dropout, lora=lora, prefix=prefix, shardings=shardings
    )
