"""Supervised fine-tuning: the loss of a model on a right-padded token batch, and its train step."""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

from jaxalign.logprobs import HEAD_CHUNK_TOKENS
from jaxalign.lora import LoraConfig
from jaxalign.losses.sft import sft_token_loss
from jaxalign.models.config import TransformerConfig
from jaxalign.prefix import PrefixConfig
from jaxalign.scoring import next_token_stats
from jaxalign.trainers.step import Batch, Metrics, StepShardings, make_train_step


def sft_batch_loss(
    params,
    config: TransformerConfig,
    batch: Batch,
    dropout_rng: jax.Array | None = None,
    *,
    label_smoothing: float = 0.0,
    head_chunk: int | None = HEAD_CHUNK_TOKENS,
) -> tuple[jax.Array, Metrics]:
    """Next-token loss of the model on a collated SFT batch.

    The output head is fused with the loss (`jaxalign.scoring.next_token_stats`): log-probs,
    label smoothing's uniform term and the argmax for `token_accuracy` come out of one chunked
    pass, and no [B, T, V] logits are held; `head_chunk=None` runs the unfused reference
    (the full logits, then the same statistics), equal in value and gradient.

    Args:
      params: model parameters.
      config: the model config.
      batch: `tokens` int32 [B, T] (right-padded) and `mask` float32 [B, T], 1.0 on completion
        tokens. Position t predicts tokens[:, t+1], counted where mask[:, t+1] is 1.
      dropout_rng: key enabling dropout, or None.
      label_smoothing: ε of `sft_loss`.
      head_chunk: tokens per chunk of the fused head (`jaxalign.logprobs.head_stats`).

    Returns:
      `sft_loss`'s (loss, metrics).
    """
    tokens = batch["tokens"]
    stats = next_token_stats(
        params, config, tokens, dropout_rng=dropout_rng, head_chunk=head_chunk,
        uniform_ce=bool(label_smoothing), argmax=True,
    )  # [B,T-1] each
    return sft_token_loss(
        stats.logps, batch["mask"][:, 1:], label_smoothing=label_smoothing,
        uniform_ce=stats.uniform_ce, correct=stats.argmax == tokens[:, 1:],
    )


def make_sft_step(
    config: TransformerConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    label_smoothing: float = 0.0,
    head_chunk: int | None = HEAD_CHUNK_TOKENS,
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
    """

    def loss_fn(params, batch, dropout_rng):
        return sft_batch_loss(
            params, config, batch, dropout_rng, label_smoothing=label_smoothing, head_chunk=head_chunk
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
