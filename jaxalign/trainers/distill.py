"""Knowledge distillation: a student trained on a frozen teacher's next-token distributions.

The teacher is any model (its own config: bigger, deeper, another width) sharing the student's
tokenizer; its parameters are an extra, non-donated argument of the step, like DPO's reference.
Sequence-level KD (Kim & Rush 2016) and DeepSeek-R1's distilled models are SFT on teacher
samples (`make_sft_step` on `generate`'s output). On-policy distillation (GKD, Agarwal et al.
2023, arXiv 2306.13649: the student's own samples, scored token by token by the teacher) is
`make_on_policy_distill_step`; GKD's λ mixes it with `make_distill_step` batch by batch. The
one-sample reverse-KL policy-gradient form is `jaxalign.losses.distill.on_policy_distill_advantages`
with the PPO policy loss.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxalign.decoding import SamplingConfig, generate
from jaxalign.lora import LoraConfig
from jaxalign.losses.distill import align_vocab, kd_loss
from jaxalign.models.config import TransformerConfig
from jaxalign.models.transformer import forward, logits_from_hidden
from jaxalign.prefix import PrefixConfig
from jaxalign.scoring import completion_hidden
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
    prefix: PrefixConfig | None = None,
    shardings: StepShardings | None = None,
) -> Callable:
    """jit-compiled distillation step `step(state, batch, teacher_params) -> (state, metrics)`.

    The loss is `distill_batch_loss` (Hinton KD at β = 0, GKD's JSD_β between, reverse KL at
    β = 1). Metrics: loss, divergence, num_tokens, ce (α < 1), grad_norm, learning_rate (and
    `make_train_step`'s). With `lora` the state's params are the student's adapters and the step
    is `step(state, batch, base_params, teacher_params)`. `shardings`
    (`step_shardings(..., num_extra_params=1)`) compiles it for a mesh; teacher params are not
    donated.
    `prefix` (`jaxalign.prefix.PrefixConfig`) trains a prefix-tuning prefix of the frozen params
    instead, the way `lora` trains adapters (`make_train_step`).
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
        loss_fn, tx, schedule, config=config, dropout=dropout, lora=lora, prefix=prefix, shardings=shardings
    )


def on_policy_distill_batch_loss(
    params,
    config: TransformerConfig,
    batch: Batch,
    dropout_rng: jax.Array | None,
    teacher_params,
    *,
    teacher_config: TransformerConfig,
    sampling: SamplingConfig,
    temperature: float = 1.0,
    beta: float = 0.0,
    vocab_size: int | None = None,
) -> tuple[jax.Array, Metrics]:
    """GKD's on-policy term: the student samples continuations of the batch's prompts (under
    `stop_gradient`: the samples are data), then `kd_loss` between the teacher's and the
    student's next-token distributions at every sampled position (up to and including EOS).

    Args:
      params, config: the student (differentiated).
      batch: `prompt_tokens` int32 [B, P] left-padded, `prompt_mask` [B, P], and `rng` uint32 [2]
        (raw key data, e.g. `jax.random.key_data(jax.random.fold_in(key, step))`: a pure function
        of the step, so a resumed run samples what an uninterrupted one did).
      dropout_rng: the student's dropout key, or None (sampling never uses dropout).
      teacher_params, teacher_config: the frozen teacher.
      sampling: how the student samples (`SamplingConfig`; TRL's GKD samples at temperature 0.9
        and scores at τ = 1: the two temperatures are separate).
      temperature, beta, vocab_size: as `distill_batch_loss` (the divergence's τ and β).

    Returns:
      `kd_loss`'s (loss, metrics) plus `completion_length` (mean sampled tokens).
    """
    prompts, prompt_mask = batch["prompt_tokens"], batch["prompt_mask"]
    rng = jax.random.wrap_key_data(batch["rng"])
    gen = generate(jax.lax.stop_gradient(params), config, prompts, prompt_mask, sampling=sampling, rng=rng)
    hidden = completion_hidden(params, config, prompts, prompt_mask, gen.tokens, dropout_rng=dropout_rng)
    student_logits = logits_from_hidden(params, config, hidden)  # [B,N,V_S]
    teacher_hidden = completion_hidden(teacher_params, teacher_config, prompts, prompt_mask, gen.tokens)
    teacher_logits = jax.lax.stop_gradient(logits_from_hidden(teacher_params, teacher_config, teacher_hidden))
    student_logits, teacher_logits = align_vocab(student_logits, teacher_logits, vocab_size)
    loss, metrics = kd_loss(student_logits, teacher_logits, gen.mask, temperature=temperature, beta=beta)
    return loss, {**metrics, "completion_length": jnp.mean(gen.lengths.astype(jnp.float32))}


def make_on_policy_distill_step(
    config: TransformerConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    teacher_config: TransformerConfig,
    sampling: SamplingConfig,
    temperature: float = 1.0,
    beta: float = 0.0,
    vocab_size: int | None = None,
    dropout: bool = True,
    lora: LoraConfig | None = None,
    prefix: PrefixConfig | None = None,
    shardings: StepShardings | None = None,
) -> Callable:
    """jit-compiled on-policy distillation step `step(state, batch, teacher_params)` on batches
    of prompts (`on_policy_distill_batch_loss`): sampling, both teacher-forced passes and the
    update in one program. Metrics: `make_distill_step`'s plus completion_length.
    `prefix` (`jaxalign.prefix.PrefixConfig`) trains a prefix-tuning prefix of the frozen params
    instead, the way `lora` trains adapters (`make_train_step`).
    """

    def loss_fn(params, batch, dropout_rng, teacher_params):
        return on_policy_distill_batch_loss(
            params, config, batch, dropout_rng, teacher_params, teacher_config=teacher_config,
            sampling=sampling, temperature=temperature, beta=beta, vocab_size=vocab_size,
        )

    return make_train_step(loss_fn, tx, schedule, config=config, dropout=dropout, lora=lora, prefix=prefix, shardings=shardings)
