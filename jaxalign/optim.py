"""Optimiser: a thin composition of optax transforms (clip -> AdamW on a warmup-cosine schedule).

Gradient accumulation is `optax.MultiSteps`, which averages the micro-batch gradients (each a
micro-batch mean); with unequal token counts per micro-batch that is a mean of means, the same
convention as TRL before its gradient-accumulation fix. No trainer here corrects for it: give
micro-batches equal token counts (fixed-length buckets) when the exact token mean matters.
`sft_loss` reports `loss_sum` and `num_tokens` so that evaluation (`make_sft_eval_step`) can form
the exact token mean over batches. Accumulation is configured here only
(`OptimConfig.grad_accum_steps`); the train step reads the update count from the optimizer state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

# apply_if_finite applies a non-finite update after this many consecutive skips; int32's largest
# value (its counter's dtype) means never: stopping a diverged run is the loop's decision.
_NEVER_APPLY = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Hyperparameters of the AdamW + warmup-cosine optimiser.

    Attributes:
      learning_rate: peak learning rate, reached at the end of warm-up.
      init_learning_rate: learning rate at step 0 (linear warm-up starts here).
      end_learning_rate: learning rate after `total_steps` (cosine decay ends here).
      warmup_steps: optimizer updates of linear warm-up (0, or fewer than `total_steps`).
      total_steps: optimizer updates of the whole schedule (warm-up included); positive.
      weight_decay: decoupled weight decay (Loshchilov & Hutter 2019, arXiv 1711.05101), applied
        to matmul kernels only: not to biases, norm scales or embeddings.
      b1, b2, eps: Adam moments and epsilon (Kingma & Ba 2015).
      max_grad_norm: clip the global gradient norm to this value (None: no clipping).
      grad_accum_steps: micro-batches per optimizer update (optax.MultiSteps).
      skip_nonfinite: wrap the optimizer in `optax.apply_if_finite`: an update whose gradients
        hold a NaN or inf is dropped (parameters and optimizer state unchanged) and counted
        (`nonfinite_metrics`). It never gives up and applies one; the loops stop the run after
        `max_skipped_steps` consecutive skips instead (`jaxalign.trainers.loop`).
      float32_state: keep the optimizer's state (Adam's two moments, the accumulator) in float32
        whatever the parameters' dtype (`with_float32_state`): bfloat16 parameters then cost
        2 + 2 + 8 bytes each (params, grads, moments) instead of 2 + 2 + 4, and the moments
        keep float32 precision. Without it optax keeps them in the parameters' dtype.
    """

    learning_rate: float = 1e-4
    init_learning_rate: float = 0.0
    end_learning_rate: float = 0.0
    warmup_steps: int = 0
    total_steps: int = 1000
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    grad_accum_steps: int = 1
    skip_nonfinite: bool = True
    float32_state: bool = False

    def __post_init__(self):
        if self.total_steps <= 0:
            raise ValueError(f"OptimConfig.total_steps must be positive, got {self.total_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.warmup_steps > 0 and self.warmup_steps >= self.total_steps:
            # optax.warmup_cosine_decay_schedule needs total_steps - warmup_steps > 0 decay steps
            raise ValueError(
                f"OptimConfig.warmup_steps={self.warmup_steps} must be < total_steps="
                f"{self.total_steps} (the cosine decay needs at least one step after warm-up)"
            )
        if self.grad_accum_steps < 1:
            raise ValueError(f"OptimConfig.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"OptimConfig.max_grad_norm must be positive, got {self.max_grad_norm}")


def learning_rate_schedule(config: OptimConfig) -> optax.Schedule:
    """Linear warm-up from init to peak, then cosine decay to end (optax.warmup_cosine_decay_schedule).

    The schedule's argument is the optimizer-update count (micro-steps // grad_accum_steps).
    """
    return optax.warmup_cosine_decay_schedule(
        init_value=config.init_learning_rate,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=config.total_steps,
        end_value=config.end_learning_rate,
    )


def weight_decay_mask(params) -> dict:
    """Pytree of bools: True on matmul kernels (leaves named "kernel"), False elsewhere.

    Biases (rank 2 for attention heads, so rank alone does not tell), LayerNorm/RMSNorm scales and
    the token / position embeddings are not decayed, as in GPT-2 / nanoGPT and most fine-tuning
    recipes.
    """

    def decays(path, leaf) -> bool:
        del leaf
        return str(getattr(path[-1], "key", path[-1])) == "kernel"

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    config: OptimConfig, decay_mask: Callable[[Any], Any] = weight_decay_mask
) -> tuple[optax.GradientTransformation, Callable]:
    """Builds `clip_by_global_norm -> adamw(schedule, mask)`, in `optax.MultiSteps` when
    accumulating, in `with_float32_state` with `config.float32_state`, in `optax.apply_if_finite`
    (outermost, so a non-finite micro-batch gradient never reaches the accumulator) unless
    `config.skip_nonfinite` is False.

    Args:
      config: the optimiser hyperparameters.
      decay_mask: params pytree -> pytree of bools, True where AdamW's weight decay applies
        (default `weight_decay_mask`: matmul kernels only; LoRA passes its adapter mask).

    Returns:
      (tx, schedule): the optax transformation and the learning-rate schedule (a function of the
      optimizer-update count) for logging.
    """
    schedule = learning_rate_schedule(config)
    parts = []
    if config.max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(config.max_grad_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=decay_mask,
        )
    )
    tx = optax.chain(*parts)
    if config.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
    if config.float32_state:
        tx = with_float32_state(tx)
    if config.skip_nonfinite:
        tx = optax.apply_if_finite(tx, max_consecutive_errors=_NEVER_APPLY)
    return tx, schedule


def with_float32_state(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` run on float32 copies of the gradients and parameters, so the state it builds (Adam's
    moments, which optax creates like the parameters) is float32 whatever the parameters' dtype;
    the updates are cast back to each parameter's dtype. For bfloat16 parameters with a float32
    optimizer state (the update's arithmetic is float32; the parameters still round to bf16 when
    the update is applied: keep float32 master parameters, `param_dtype=float32`, where that
    rounding matters).
    """

    def to_f32(tree):
        return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init(params):
        return tx.init(to_f32(params))

    def update(grads, state, params=None):
        updates, state = tx.update(to_f32(grads), state, None if params is None else to_f32(params))
        return jax.tree.map(lambda u, g: u.astype(g.dtype), updates, grads), state

    return optax.GradientTransformation(init, update)


def nonfinite_metrics(opt_state: Any) -> dict[str, jax.Array]:
    """The skip counters of the `optax.apply_if_finite` wrapper inside `opt_state`, as metrics.

    Returns:
      `{"nonfinite": 1.0 if this update was skipped else 0.0, "skipped_steps": int32 total
      skipped updates, "consecutive_skipped": int32 skips in a row}`; `{}` when `opt_state` holds
      no such wrapper (an optimizer built with `skip_nonfinite=False`, or the caller's own).
    """
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ApplyIfFiniteState))
        if isinstance(s, optax.ApplyIfFiniteState)
    ]
    if not found:
        return {}
    state = found[0]
    return {
        "nonfinite": 1.0 - state.last_finite.astype(jnp.float32),
        "skipped_steps": state.total_notfinite,
        "consecutive_skipped": state.notfinite_count,
    }
