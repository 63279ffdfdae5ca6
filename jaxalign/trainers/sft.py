"""Supervised fine-tuning: the loss of a model on a right-padded token batch, and its train step."""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

from jaxalign.lora import LoraConfig
from jaxalign.losses.sft import sft_loss
from jaxalign.models.config import TransformerConfig
from jaxalign.models.transformer import forward
from jaxalign.prefix import PrefixConfig
from jaxalign.trainers.step import Batch, Metrics, StepShardings, make_train_step


def sft_batch_loss(
    params,
    config: TransformerConfig,
    batch: Batch,
    dropout_rng: jax.Array | None = None,
    *,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
) -> tuple[jax.Array, Metrics]:
    """Next-token loss of the model on a collated SFT batch.

    Args:
      params: model parameters.
      config: the model config.
      batch: `tokens` int32 [B, T] (right-padded) and `mask` float32 [B, T], 1.0 on completion
        tokens. Position t predicts tokens[:, t+1], counted where mask[:, t+1] is 1.
      dropout_rng: key enabling dropout, or None.
      label_smoothing, chunk_size: passed to `sft_loss`.

    Returns:
      `sft_loss`'s (loss, metrics).
    """
    tokens = batch["tokens"]
    logits = forward(params, config, tokens[:, :-1], dropout_rng=dropout_rng)  # [B,T-1,V]
    return sft_loss(
        logits,
        tokens[:, 1:],
        batch["mask"][:, 1:],
        label_smoothing=label_smoothing,
        chunk_size=chunk_size,
    )


def make_sft_step(
    config: TransformerConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
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
            params, config, batch, dropout_rng, label_smoothing=label_smoothing, chunk_size=chunk_size
        )

    return make_train_step(
        loss_fn, tx, schedule, config=config, dropout=dropout, lora=lora, prefix=prefix, shardings=shardings
    )


def make_sft_eval_step(config: TransformerConfig, *, chunk_size: int | None = None) -> Callable:
    """jit-compiled `eval_step(params, batch) -> metrics` (no dropout).

    Sum `loss_sum` and `num_tokens` over batches and divide for the dataset's token-mean loss.
    `prefix` (`jaxalign.prefix.PrefixConfig`) trains a prefix-tuning prefix of the frozen params
    instead, the way `lora` trains adapters (`make_train_step`).
    """

    def eval_step(params, batch):
        return sft_batch_loss(params, config, batch, None, chunk_size=chunk_size)[1]

    return jax.jit(eval_step)
