"""Supervised fine-tuning: the loss of a model on a right-padded token batch, and its train step."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import optax

from jaxalign.losses.sft import sft_loss
from jaxalign.models.config import TransformerConfig
from jaxalign.models.transformer import forward
from jaxalign.lora import LoraConfig, make_lora_loss_fn
from jaxalign.trainers.state import Batch, Metrics, make_train_step

if TYPE_CHECKING:  # jaxalign.sharding imports the trainers
    from jaxalign.sharding import StepShardings


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
    grad_accum_steps: int = 1,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
    dropout: bool = True,
    lora: LoraConfig | None = None,
    shardings: StepShardings | None = None,
) -> Callable:
    """jit-compiled SFT step `step(state, batch) -> (state, metrics)`.

    Metrics: loss, loss_sum, num_tokens, token_accuracy, grad_norm, learning_rate.
    `dropout=False` trains deterministically even when config.dropout > 0 (or
    `lora.dropout` > 0). With `lora`, the state's params are the adapters
    (`jaxalign.lora.init_lora`) and the step is `step(state, batch, base_params)`. `shardings`
    (`jaxalign.sharding.step_shardings`) compiles the step for a device mesh.
    """

    def loss_fn(params, batch, dropout_rng):
        return sft_batch_loss(
            params,
            config,
            batch,
            dropout_rng if dropout and config.dropout > 0 else None,
            label_smoothing=label_smoothing,
            chunk_size=chunk_size,
        )

    if lora is not None:  # train adapters only; the base params become an extra argument
        loss_fn = make_lora_loss_fn(loss_fn, lora, dropout=dropout)
    return make_train_step(
        loss_fn, tx, schedule, grad_accum_steps=grad_accum_steps, shardings=shardings
    )


def make_sft_eval_step(config: TransformerConfig, *, chunk_size: int | None = None) -> Callable:
    """jit-compiled `eval_step(params, batch) -> metrics` (no dropout).

    Sum `loss_sum` and `num_tokens` over batches and divide for the dataset's token-mean loss.
    """

    def eval_step(params, batch):
        return sft_batch_loss(params, config, batch, None, chunk_size=chunk_size)[1]

    return jax.jit(eval_step)
