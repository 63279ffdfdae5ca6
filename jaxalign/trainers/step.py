"""The train state and the one step builder every trainer composes.

`make_train_step(loss_fn, tx, schedule, ...)` owns what all trainers share, once:

* the dropout gate: the loss gets a dropout key only when the step trains with dropout and the
  model has some (`config.dropout > 0`), so `dropout=False` or a dropout-free model runs the
  deterministic program;
* the LoRA wrap: with `lora`, the state's params are the adapters (`jaxalign.lora.init_lora`)
  and the frozen base becomes the step's first extra argument (`make_lora_loss_fn`); adapter
  dropout follows the same `dropout` switch; `prefix` does the same for prefix-tuning
  (`jaxalign.prefix.make_prefix_loss_fn`: the state's params are the prefix tree);
* gradient accumulation: given once, in the optimizer (`OptimConfig.grad_accum_steps`, which
  wraps it in `optax.MultiSteps`); the logged learning rate is read from the optimizer's own
  update count, so the step needs no second copy of the setting;
* the non-finite guard's counters and the update ratio (see `make_train_step`);
* device meshes: `StepShardings` (built by `step_shardings` / `params_step_shardings`) compiles
  the step with input/output shardings and the logical-axis activation constraints.

Shapes: B batch; the batch is any pytree of [B, ...] arrays the loss understands.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxalign.lora import LoraConfig, make_lora_loss_fn
from jaxalign.models.config import TransformerConfig
from jaxalign.optim import nonfinite_metrics
from jaxalign.prefix import PrefixConfig, make_prefix_loss_fn
from jaxalign.sharding import (
    DEFAULT_RULES,
    LogicalRules,
    abstract_params,
    activation_sharding,
    batch_sharding,
    opt_state_like_params,
    param_shardings,
)

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# loss_fn(params, batch, dropout_rng, *extra) -> (loss, metrics); dropout_rng may be None
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


def create_train_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh `TrainState` at step 0 with `tx.init(params)` and a PRNG key from `seed`."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(seed),
    )


def _update_ratio(updates, params) -> jax.Array:
    """‖Δθ‖ / ‖θ‖ (global L2 norms): ~1e-3 in healthy training, ≥ 1 when an update replaces the
    weights; 0 while the parameters are all zero (nothing to compare against)."""
    p_norm = optax.global_norm(params)
    return jnp.where(p_norm > 0, optax.global_norm(updates) / jnp.where(p_norm > 0, p_norm, 1.0), 0.0)


def _is_count_state(x) -> bool:
    return isinstance(x, (optax.ScaleByScheduleState, optax.MultiStepsState))


def optimizer_updates(opt_state, step: jax.Array) -> jax.Array:
    """The number of optimizer updates applied so far, read from the optimizer state: the count
    of its learning-rate schedule (`optax.ScaleByScheduleState`, which neither a MultiSteps
    micro-step nor an update skipped as non-finite advances), else MultiSteps' `gradient_step`,
    else `step` (an optimizer without either).

    Args:
      opt_state: an optax state (e.g. `TrainState.opt_state`).
      step: int32 scalar micro-step count, the fallback.

    Returns:
      int32 scalar: the argument of the learning-rate schedule for the next update.
    """
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_count_state) if _is_count_state(s)]
    for state in found:
        if isinstance(state, optax.ScaleByScheduleState):
            return state.count
    for state in found:
        return state.gradient_step
    return step


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    config: TransformerConfig | None = None,
    dropout: bool = True,
    lora: LoraConfig | None = None,
    prefix: PrefixConfig | None = None,
    donate: bool = True,
    shardings: StepShardings | None = None,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """Wraps `loss_fn` into a jit-compiled `step(state, batch, *extra) -> (state, metrics)`.

    The step differentiates `loss_fn(params, batch, dropout_rng, *extra)` with respect to params,
    applies `tx`, and adds to the metrics `loss`, `grad_norm` (global L2 norm before clipping),
    `update_ratio` (‖update‖ / ‖params‖, global L2 norms, 0 for all-zero params: the loops stop
    a run whose update outgrows its weights), `learning_rate` (the schedule at the optimizer's
    update count, `optimizer_updates`) and, when `tx` skips non-finite updates
    (`make_optimizer`'s default), `nonfinite`, `skipped_steps` and `consecutive_skipped`
    (`jaxalign.optim.nonfinite_metrics`): a skipped step leaves params and optimizer state as
    they were and still advances `step` and `rng`. `extra` carries arrays the loss needs but
    does not train (e.g. frozen reference params); they are arguments, not closure constants, so
    they are not baked into the compiled program.

    Args:
      loss_fn: pure loss function, see `LossFn`.
      tx: optax transformation from `jaxalign.optim.make_optimizer` (gradient accumulation, if
        any, is inside it: `OptimConfig.grad_accum_steps`).
      schedule: its learning-rate schedule (for logging).
      config: the model, for the dropout gate: `loss_fn` gets a key only when `dropout` and
        `config.dropout > 0` (None: whenever `dropout`).
      dropout: train with dropout (model and, with `lora`, adapter dropout); False passes
        `dropout_rng=None`.
      lora: train LoRA adapters of the params instead (`jaxalign.lora.make_lora_loss_fn`): the
        state's params are the adapters and the step is `step(state, batch, base, *extra)`.
      prefix: train a prefix of the frozen params instead (`jaxalign.prefix.make_prefix_loss_fn`):
        the state's params are the prefix tree (`init_prefix`) and the step is `step(state,
        batch, base, *extra)`, as with `lora`.
      donate: donate the input state's buffers to the output (halves peak parameter memory).
        The state passed in is invalid afterwards, and so is any array it shares: a frozen
        reference built from the initial params must be a copy (`jax.tree.map(jnp.copy, p)`).
      shardings: compile for a device mesh (`step_shardings`): the state, batch and extra
        arguments get those input/output shardings and the model's activations are constrained
        by the logical-axis rules. None (default): a plain single-device `jax.jit`.

    Raises:
      ValueError: both `lora` and `prefix`.
    """
    if lora is not None and prefix is not None:
        raise ValueError("make_train_step: give lora or prefix, not both")
    model_dropout = dropout and (config is None or config.dropout > 0)

    def gated(params, batch, dropout_rng, *extra):
        return loss_fn(params, batch, dropout_rng if model_dropout else None, *extra)

    # LoRA / prefix: train adapters (a prefix) only; the base params become the first extra argument
    wrapped = gated
    if lora is not None:
        wrapped = make_lora_loss_fn(gated, lora, dropout=dropout)
    elif prefix is not None:
        wrapped = make_prefix_loss_fn(gated, prefix)
    grad_fn = jax.value_and_grad(wrapped, has_aux=True)

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
            "learning_rate": schedule(optimizer_updates(state.opt_state, state.step)),
            **nonfinite_metrics(opt_state),
        }
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new_state, metrics

    donate_argnums = (0,) if donate else ()
    if shardings is not None:
        return shardings.jit(step, donate_argnums=donate_argnums)
    return jax.jit(step, donate_argnums=donate_argnums)


# --------------------------------------------------------------------------------------------
# The step on a device mesh.


def train_state_shardings(abstract_state, tx: optax.GradientTransformation, params_shardings, mesh: Mesh):
    """Shardings of a `TrainState` (same structure): params as given, optimizer state following
    its params, step and rng replicated.

    Args:
      abstract_state: the state or `jax.eval_shape` of its creation (only structure is used).
      tx: the state's optax transformation.
      params_shardings: tree like `abstract_state.params` of `NamedSharding`s.
      mesh: the mesh of those shardings.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    return abstract_state.replace(
        step=replicated,
        rng=replicated,
        params=params_shardings,
        opt_state=opt_state_like_params(tx, abstract_state.params, params_shardings, replicated),
    )


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """How `make_train_step(..., shardings=...)` compiles a step on a mesh.

    Attributes:
      mesh: the device mesh.
      state: `TrainState` of `NamedSharding`s (see `train_state_shardings`); also the output's.
      batch: sharding (or tree prefix of shardings) of the batch; None = `batch_sharding(mesh)`.
      extra: one sharding tree per extra step argument (e.g. frozen reference params).
      rules: logical-axis rules (the "batch" rule also splits the activations).
    """

    mesh: Mesh
    state: Any
    batch: Any = None
    extra: tuple = ()
    rules: LogicalRules = DEFAULT_RULES

    def jit(self, fn, *, donate_argnums: tuple[int, ...] = ()):
        """`jax.jit(fn)` with in/out shardings; `fn(state, batch, *extra) -> (state, metrics)` is
        traced under `activation_sharding`. Metrics come back replicated."""
        batch = self.batch if self.batch is not None else batch_sharding(self.mesh, self.rules)
        replicated = NamedSharding(self.mesh, PartitionSpec())

        def traced(state, batch_, *extra):
            with activation_sharding(self.mesh, self.rules):
                return fn(state, batch_, *extra)

        return jax.jit(
            traced,
            in_shardings=(self.state, batch, *self.extra),
            out_shardings=(self.state, replicated),
            donate_argnums=donate_argnums,
        )


def step_shardings(
    config: TransformerConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    rules: LogicalRules = DEFAULT_RULES,
    num_extra_params: int = 0,
) -> StepShardings:
    """`StepShardings` of a full-parameter train step of `config` with optimizer `tx`:
    the state sharded by `rules`, the batch over the batch axes, and `num_extra_params` extra
    arguments (e.g. DPO's reference params) sharded like the params."""
    params = param_shardings(config, mesh, rules)
    return params_step_shardings(
        abstract_params(config), params, tx, mesh, rules=rules, extra=(params,) * num_extra_params
    )


def params_step_shardings(
    abstract_params_tree,
    params_shardings,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    rules: LogicalRules = DEFAULT_RULES,
    extra: tuple = (),
) -> StepShardings:
    """`StepShardings` of a train step over any params tree (a reward model, PPO's actor-critic).

    Args:
      abstract_params_tree: `ShapeDtypeStruct` tree of the trained params (`jax.eval_shape`).
      params_shardings: same-structure tree of `NamedSharding`s
        (`jaxalign.scoring.scalar_model_shardings`, `jaxalign.scoring.actor_critic_shardings`).
      tx: the optimizer; its state follows the params.
      mesh, rules: as `step_shardings`.
      extra: sharding trees of the step's extra arguments (e.g. `param_shardings` of a frozen
        reference).
    """
    state = jax.eval_shape(lambda p: create_train_state(p, tx, 0), abstract_params_tree)
    return StepShardings(
        mesh=mesh,
        state=train_state_shardings(state, tx, params_shardings, mesh),
        extra=tuple(extra),
        rules=tuple(rules),
    )


__all__ = [
    "Batch",
    "LossFn",
    "Metrics",
    "StepShardings",
    "TrainState",
    "create_train_state",
    "make_train_step",
    "optimizer_updates",
    "params_step_shardings",
    "step_shardings",
    "train_state_shardings",
]
