"""Supervised fine-tuning: the loss of a model on a right-padded token batch, and its train step."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxalign.logprobs import HEAD_CHUNK_TOKENS
from jaxalign.lora import LoraConfig
from jaxalign.losses.moe import load_balancing_loss, router_z_loss
from jaxalign.losses.sft import sft_token_loss
from jaxalign.models.config import TransformerConfig
from jaxalign.prefix import PrefixConfig
from jaxalign.scoring import next_token_stats
from jaxalign.trainers.step import Batch, Metrics, StepShardings, make_train_step

# Mixtral's and Qwen-MoE's `router_aux_loss_coef` (transformers 5.25 MixtralConfig / Qwen2MoeConfig).
ROUTER_AUX_LOSS_COEF = 0.001
# The router z-loss is off by default: no Mixtral / Qwen-MoE config has one (ST-MoE, arXiv
# 2202.08906, and HF's Switch config use 1e-3).
ROUTER_Z_LOSS_COEF = 0.0


def right_padded_real(target_mask: jax.Array) -> jax.Array:
    """bool [B, S]: the real tokens of right-padded rows, HF's `attention_mask`: position t
    counts iff some target_mask[:, s] with s >= t is nonzero (everything up to the row's last
    counted position; trailing padding and all-zero filler rows do not count)."""
    return jnp.cumsum((target_mask != 0)[:, ::-1].astype(jnp.int32), axis=1)[:, ::-1] > 0


def router_aux_loss(router_stats, target_mask: jax.Array) -> jax.Array:
    """The load-balancing loss (`jaxalign.losses.moe.load_balancing_loss`, HF's Mixtral form,
    pooled over the MoE layers) of one teacher-forced pass over right-padded rows.

    The tokens that count are those HF's `attention_mask` would mark real: every input position up
    to the row's last counted target, prompt included (position t counts iff some
    target_mask[:, s] with s >= t is nonzero); trailing padding and filler rows do not. The
    experts are the ones each token was actually routed to (`RouterStats.expert_ids`; for a
    softmax router without a selection bias these are HF's top-k of the probabilities; under
    Routing Replay, the replayed ones).

    Args:
      router_stats: non-empty tuple of `RouterStats` over [B, S] (e.g. S = T-1 from
        `next_token_stats`).
      target_mask: [B, S], nonzero where the position's target counts (see `router_losses` for
        a mask of real tokens that is not right-padded).

    Returns:
      float32 scalar (k at perfectly uniform routing); 0 when no token counts.
    """
    return router_losses(router_stats, right_padded_real(target_mask))[1]["aux_loss"]


def check_router_loss_coefs(router_aux_loss_coef: float, router_z_loss_coef: float) -> None:
    """Raises ValueError unless both MoE loss coefficients are >= 0 (every step builder calls it
    eagerly, before tracing)."""
    if router_aux_loss_coef < 0:
        raise ValueError(f"router_aux_loss_coef must be >= 0, got {router_aux_loss_coef}")
    if router_z_loss_coef < 0:
        raise ValueError(f"router_z_loss_coef must be >= 0, got {router_z_loss_coef}")


def router_losses(
    router_stats,
    real: jax.Array,
    *,
    router_aux_loss_coef: float = ROUTER_AUX_LOSS_COEF,
    router_z_loss_coef: float = ROUTER_Z_LOSS_COEF,
) -> tuple[jax.Array, Metrics]:
    """The MoE auxiliary terms every trainer adds to its loss: (penalty, metrics).

      penalty = router_aux_loss_coef · L_aux + router_z_loss_coef · L_z

    L_aux is `jaxalign.losses.moe.load_balancing_loss` (HF Mixtral's pooled form, experts =
    `RouterStats.expert_ids`, the ones actually used) and L_z `router_z_loss` (ST-MoE, arXiv
    2202.08906 Eq. 5), both over the MoE layers and the real tokens of one forward pass.
    transformers' MixtralForCausalLM adds `router_aux_loss_coef * aux_loss` the same way; a
    zero coefficient drops its term from the penalty (exactly: the product is not formed) but the
    metric is still logged. Both are batch statistics, not token sums: under gradient
    accumulation each micro-batch contributes its own.

    Args:
      router_stats: tuple of `RouterStats` over [B, S], one per MoE layer; () for a dense model.
      real: [B, S], nonzero on the input tokens that count (HF's `attention_mask`).
      router_aux_loss_coef, router_z_loss_coef: the weights (>= 0; see `check_router_loss_coefs`).

    Returns:
      (penalty float32 scalar, {"aux_loss": L_aux, "z_loss": L_z}); (0.0, {}) for a dense model.
    """
    if not router_stats:
        return jnp.zeros((), jnp.float32), {}
    logits = tuple(s.router_logits for s in router_stats)  # L × [B,S,E]
    ids = jnp.stack([s.expert_ids for s in router_stats])  # [L,B,S,k]
    aux = load_balancing_loss(logits, expert_ids=ids, mask=real)[0]
    z = router_z_loss(logits, mask=real)[0]
    penalty = jnp.zeros((), jnp.float32)
    if router_aux_loss_coef:
        penalty = penalty + router_aux_loss_coef * aux
    if router_z_loss_coef:
        penalty = penalty + router_z_loss_coef * z
    return penalty, {"aux_loss": aux, "z_loss": z}


def with_router_losses(
    loss: jax.Array,
    metrics: Metrics,
    router_stats,
    real: jax.Array,
    *,
    router_aux_loss_coef: float = ROUTER_AUX_LOSS_COEF,
    router_z_loss_coef: float = ROUTER_Z_LOSS_COEF,
) -> tuple[jax.Array, Metrics]:
    """(loss + `router_losses` penalty, metrics + `aux_loss`, `z_loss`) for an MoE pass; (loss,
    metrics) unchanged for a dense one (router_stats == ()). `real` [B, S] marks the pass's real
    input tokens (`right_padded_real` for right-padded rows)."""
    if not router_stats:
        return loss, metrics
    penalty, moe_metrics = router_losses(
        router_stats, real, router_aux_loss_coef=router_aux_loss_coef, router_z_loss_coef=router_z_loss_coef
    )
    return loss + penalty, {**metrics, **moe_metrics}


def sft_batch_loss(
    params,
    config: TransformerConfig,
    batch: Batch,
    dropout_rng: jax.Array | None = None,
    *,
    label_smoothing: float = 0.0,
    head_chunk: int | None = HEAD_CHUNK_TOKENS,
    router_aux_loss_coef: float = ROUTER_AUX_LOSS_COEF,
    router_z_loss_coef: float = ROUTER_Z_LOSS_COEF,
) -> tuple[jax.Array, Metrics]:
    """Next-token loss of the model on a collated SFT batch.

    The output head is fused with the loss (`jaxalign.scoring.next_token_stats`): log-probs,
    label smoothing's uniform term and the argmax for `token_accuracy` come out of one chunked
    pass, and no [B, T, V] logits are held; `head_chunk=None` runs the unfused reference
    (the full logits, then the same statistics), equal in value and gradient.

    For an MoE model (`config.moe`) the loss is CE + `router_aux_loss_coef`·L_aux +
    `router_z_loss_coef`·L_z, L_aux the load-balancing loss and L_z the router z-loss of the same
    pass over the tokens up to each row's last target (`router_losses`; transformers'
    MixtralForCausalLM: `loss + router_aux_loss_coef * aux_loss`); metrics["aux_loss"] and
    "z_loss" log them whatever the coefficients, and metrics["loss"] / "loss_sum" stay the CE. L_aux is a batch statistic, not a
    token sum: under gradient accumulation each micro-batch contributes its own.

    Args:
      params: model parameters.
      config: the model config.
      batch: `tokens` int32 [B, T] (right-padded) and `mask` float32 [B, T], 1.0 on completion
        tokens. Position t predicts tokens[:, t+1], counted where mask[:, t+1] is 1.
      dropout_rng: key enabling dropout, or None.
      label_smoothing: ε of `sft_loss`.
      head_chunk: tokens per chunk of the fused head (`jaxalign.logprobs.head_stats`).
      router_aux_loss_coef: weight of L_aux (Mixtral / Qwen-MoE default 0.001); 0 disables the
        term (still logged). Ignored for dense models.
      router_z_loss_coef: weight of L_z (default 0: off; ST-MoE uses 1e-3). Ignored for dense
        models.

    Returns:
      `sft_loss`'s (loss, metrics), plus `aux_loss` and `z_loss` for an MoE model.

    Raises:
      ValueError: a coefficient < 0.
    """
    check_router_loss_coefs(router_aux_loss_coef, router_z_loss_coef)
    tokens = batch["tokens"]
    stats, router = next_token_stats(
        params, config, tokens, dropout_rng=dropout_rng, head_chunk=head_chunk,
        uniform_ce=bool(label_smoothing), argmax=True, return_router_stats=True,
    )  # [B,T-1] each
    loss, metrics = sft_token_loss(
        stats.logps, batch["mask"][:, 1:], label_smoothing=label_smoothing,
        uniform_ce=stats.uniform_ce, correct=stats.argmax == tokens[:, 1:],
    )
    return with_router_losses(
        loss, metrics, router, right_padded_real(batch["mask"][:, 1:]),
        router_aux_loss_coef=router_aux_loss_coef, router_z_loss_coef=router_z_loss_coef,
    )


def make_sft_step(
    config: TransformerConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    label_smoothing: float = 0.0,
    head_chunk: int | None = HEAD_CHUNK_TOKENS,
    router_aux_loss_coef: float = ROUTER_AUX_LOSS_COEF,
    router_z_loss_coef: float = ROUTER_Z_LOSS_COEF,
    dropout: bool = True,
    lora: LoraConfig | None = None,
    prefix: PrefixConfig | None = None,
    shardings: StepShardings | None = None,
) -> Callable:
    """jit-compiled SFT step `step(state, batch) -> (state, metrics)`.

    Metrics: loss, loss_sum, num_tokens, token_accuracy, grad_norm, learning_rate (and
    `make_train_step`'s). `dropout=False` trains deterministically even when config.dropout > 0
    (or `lora.dropout` > 0). With `lora`, the state's params are the adapters
    (`jaxalign.lora.init_lora`) and the step is `step(state, batch, base_params)`. `shardings`
    (`jaxalign.trainers.step_shardings`) compiles the step for a device mesh. Gradient
    accumulation is the optimizer's (`OptimConfig.grad_accum_steps`).
    `prefix` (`jaxalign.prefix.PrefixConfig`) trains a prefix-tuning prefix of the frozen params
    instead, the way `lora` trains adapters (`make_train_step`).
    For an MoE config the loss adds `router_aux_loss_coef`·L_aux (0.001, Mixtral's default; 0
    disables) and `router_z_loss_coef`·L_z (default 0), and the metrics add `aux_loss` and
    `z_loss` (`sft_batch_loss`).

    Raises:
      ValueError: a coefficient < 0.
    """
    check_router_loss_coefs(router_aux_loss_coef, router_z_loss_coef)

    def loss_fn(params, batch, dropout_rng):
        return sft_batch_loss(
            params, config, batch, dropout_rng, label_smoothing=label_smoothing, head_chunk=head_chunk,
            router_aux_loss_coef=router_aux_loss_coef, router_z_loss_coef=router_z_loss_coef,
        )

    return make_train_step(
        loss_fn, tx, schedule, config=config, dropout=dropout, lora=lora, prefix=prefix, shardings=shardings
    )


def make_sft_eval_step(config: TransformerConfig, *, head_chunk: int | None = HEAD_CHUNK_TOKENS) -> Callable:
    """jit-compiled `eval_step(params, batch) -> metrics` (no dropout).

    Sum `loss_sum` and `num_tokens` over batches and divide for the dataset's token-mean loss.
    `head_chunk` as in `sft_batch_loss`.
    """

    def eval_step(params, batch):
        return sft_batch_loss(params, config, batch, None, head_chunk=head_chunk)[1]

    return jax.jit(eval_step)
