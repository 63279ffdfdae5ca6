"""Knowledge distillation: a student trained on a frozen teacher's next-token distributions.

The teacher is any model (its own config: bigger, deeper, another width) sharing the student's
tokenizer; its parameters are an extra, non-donated argument of the step, like DPO's reference.
Sequence-level KD (Kim & Rush 2016) and DeepSeek-R1's distilled models are SFT on teacher
samples (`make_sft_step` on `generate`'s output); on-policy distillation uses
`jaxalign.losses.distill.on_policy_distill_advantages` with the PPO policy loss.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

from jaxalign.lora import LoraConfig
from jaxalign.losses.distill import align_vocab, kd_loss
from jaxalign.models.config import TransformerConfig
from jaxalign.models.transformer import forward
from jaxalign.trainers.step import Batch, Metrics, StepShardings, make_train_step


def distill_batch_loss(
    params,
    config: TransformerConfig,
    batch: Batch,
    dropout_rng: jax.Array | None,
    teacher_params,
    *,
    teacher_config: TransformerConfig,
    temperature: float = 1.0,
    beta: float = 0.0,
    alpha: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> tuple[jax.Array, Metrics]:
    """`kd_loss` of the student on a collated SFT batch, the teacher scoring the same tokens.

    Args:
      params: student parameters (differentiated).
      config: the student's config.
      batch: `tokens` int32 [B, T] (right-padded) and `mask` float32 [B, T], 1.0 on the tokens
        whose predictions count (completion tokens; for plain text every real token). Position t
        predicts tokens[:, t+1], counted where mask[:, t+1] is 1.
      dropout_rng: key enabling the student's dropout, or None. The teacher runs without.
      teacher_params: the frozen teacher's parameters (under `stop_gradient`).
      teacher_config: the teacher's config.
      temperature, beta, alpha, chunk_size: `kd_loss`'s (α < 1 mixes in the cross-entropy on the
        batch's own next tokens).
      vocab_size: shared vocabulary when the two embedding tables differ (`align_vocab`).

    Returns:
      `kd_loss`'s (loss, metrics).

    Raises:
      ValueError: the vocabularies differ without `vocab_size`; `kd_loss`'s.
    """
    tokens = batch["tokens"]
    inputs, labels, mask = tokens[:, :-1], tokens[:, 1:], batch["mask"][:, 1:]
    student_logits = forward(params, config, inputs, dropout_rng=dropout_rng)  # [B,T-1,V_S]
    teacher_logits = jax.lax.stop_gradient(forward(teacher_params, teacher_config, inputs))  # [B,T-1,V_T]
    student_logits, teacher_logits = align_vocab(student_logits, teacher_logits, vocab_size)
    return kd_loss(
        student_logits,
        teacher_logits,
        mask,
        temperature=temperature,
        beta=beta,
        alpha=alpha,
        labels=labels if alpha < 1.0 else None,
        chunk_size=chunk_size,
    )


def make_distill_step(
    config: TransformerConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    teacher_config: TransformerConfig,
    temperature: float = 1.0,
    beta: float = 0.0,
    alpha: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    dropout: bool = True,
    lora: LoraConfig | None = None,
    shardings: StepShardings | None = None,
) -> Callable:
    """jit-compiled distillation step `step(state, batch, teacher_params) -> (state, metrics)`.

    The loss is `distill_batch_loss` (Hinton KD at β = 0, GKD's JSD_β between, reverse KL at
    β = 1). Metrics: loss, divergence, num_tokens, ce (α < 1), grad_norm, learning_rate (and
    `make_train_step`'s). With `lora` the state's params are the student's adapters and the step
    is `step(state, batch, base_params, teacher_params)`. `shardings`
    (`step_shardings(..., num_extra_params=1)`) compiles it for a mesh; teacher params are not
    donated.
    """

    def loss_fn(params, batch, dropout_rng, teacher_params):
        return distill_batch_loss(
            params,
            config,
            batch,
            dropout_rng,
            teacher_params,
            teacher_config=teacher_config,
            temperature=temperature,
            beta=beta,
            alpha=alpha,
            vocab_size=vocab_size,
            chunk_size=chunk_size,
        )

    return make_train_step(
        loss_fn, tx, schedule, config=config, dropout=dropout, lora=lora, shardings=shardings
    )
