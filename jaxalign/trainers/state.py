"""Train state and the generic jit-compiled optimisation step that every trainer composes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxalign.optim import nonfinite_metrics

if TYPE_CHECKING:  # jaxalign.sharding builds train states, so it imports this module
    from jaxalign.sharding import StepShardings

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# loss_fn(params, batch, dropout_rng, *extra) -> (loss, metrics)
LossFn = Callable[..., tuple[jax.Array, Metrics]]


@flax.struct.dataclass
class TrainState:
    """Everything a training run needs to continue exactly: a pytree that orbax saves as is.

    Attributes:
      step: int32 scalar, micro-steps (calls of the train step) taken so far.
      params: the trainable parameter pytree.
      opt_state: the optax state of `tx` (includes MultiSteps' accumulator when used).
      rng: uint32 [2] raw PRNG key; each step splits a dropout key from it.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def _update_ratio(updates, params) -> jax.Array:
    """‖Δθ‖ / ‖θ‖ (global L2 norms): ~1e-3 in healthy training, ≥ 1 when an update replaces the
    weights; 0 while the parameters are all zero (nothing to compare against)."""
    p_norm = optax.global_norm(params)
    return jnp.where(p_norm > 0, optax.global_norm(updates) / jnp.where(p_norm > 0, p_norm, 1.0), 0.0)


def create_train_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh `TrainState` at step 0 with `tx.init(params)` and a PRNG key from `seed`."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(seed),
    )


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    grad_accum_steps: int = 1,
    donate: bool = True,
    shardings: StepShardings | None = None,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """Wraps `loss_fn` into a jit-compiled `step(state, batch, *extra) -> (state, metrics)`.

    The step differentiates `loss_fn(params, batch, dropout_rng, *extra)` with respect to params,
    applies `tx`, and adds `grad_norm` (global L2 norm before clipping), `update_ratio`
    (‖update‖ / ‖params‖, global L2 norms, 0 for all-zero params: the loops stop a run
    whose update outgrows its weights) and `learning_rate` (the schedule at the current optimizer update, micro-steps //
    grad_accum_steps) to the metrics,
    and, when `tx` skips non-finite updates (`make_optimizer`'s default), `nonfinite`,
    `skipped_steps` and `consecutive_skipped` (`jaxalign.optim.nonfinite_metrics`): a skipped
    step leaves params and optimizer state as they were and still advances `step` and `rng`.
    `extra` carries arrays the loss needs but does not train (e.g. frozen reference params); they
    are arguments, not closure constants, so they are not baked into the compiled program.

    Args:
      loss_fn: pure loss function, see `LossFn`.
      tx: optax transformation from `jaxalign.optim.make_optimizer`.
      schedule: its learning-rate schedule (for logging).
      grad_accum_steps: micro-steps per optimizer update (must match the MultiSteps wrapper).
      donate: donate the input state's buffers to the output (halves peak parameter memory).
        The state passed in is invalid afterwards, and so is any array it shares: a frozen
        reference built from the initial params must be a copy (`jax.tree.map(jnp.copy, p)`).
      shardings: compile for a device mesh (`jaxalign.sharding.step_shardings`): the state,
        batch and extra arguments get those input/output shardings and the model's activations
        are constrained by the logical-axis rules. None (default): a plain single-device `jax.jit`.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: Batch, *extra) -> tuple[TrainState, Metrics]:
        rng, dropout_rng = jax.random.split(state.rng)
        (loss, metrics), grads = grad_fn(state.params, batch, dropout_rng, *extra)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "update_ratio": _update_ratio(updates, state.params),
            "learning_rate": schedule(state.step // grad_accum_steps),
            **nonfinite_metrics(opt_state),
        }
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new_state, metrics

    donate_argnums = (0,) if donate else ()
    if shardings is not None:
        return shardings.jit(step, donate_argnums=donate_argnums)
    return jax.jit(step, donate_argnums=donate_argnums)
