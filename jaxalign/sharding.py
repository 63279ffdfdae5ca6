"""Device meshes and logical-axis sharding: a thin layer over `jax.sharding` (no pmap, no manual
collectives; XLA's GSPMD partitioner inserts the communication).

The MaxText / Levanter pattern: every parameter carries logical axis names (`param_logical_axes`:
"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "pos"), activations name their batch
axis "batch", and ONE rules table (`DEFAULT_RULES`) maps logical names to the axes of a 3-axis
mesh:

  data    pure data parallelism: params replicated, batch split.
  fsdp    data parallelism with parameters and optimizer state split too (ZeRO-3 / FSDP,
          Rajbhandari et al. 2019, arXiv 1910.02054): the batch is split over data × fsdp and the
          "embed" dimension of every weight over fsdp; XLA all-gathers a weight before its use and
          reduce-scatters its gradient.
  tensor  Megatron tensor parallelism (Shoeybi et al. 2019, arXiv 1909.08053): attention heads,
          MLP width and vocabulary split; activations inside a block are split by head / width.

A dimension whose size is not divisible by its mesh axes keeps the longest prefix of them that
divides it, else is replicated; `sharding_fallbacks` lists every such case with its reason (e.g. a
257-token byte vocabulary on tensor=2).

The mesh uses `AxisType.Auto` axes (GSPMD sharding propagation, what `jax.jit` with in/out
shardings has always meant); jax 0.10's `jax.make_mesh` defaults to `Explicit` axes, under which
every op's sharding must be resolvable at trace time and `with_sharding_constraint` acts as an
assertion.

Activations: the model constrains its residual stream (after the embedding and after every block)
to the batch split of the "batch" rule while `activation_sharding(mesh, rules)` is active (sharded
train steps trace under it); outside it the hook returns x untouched, so single-device programs
are unchanged.

Multi-host (one process per host, e.g. a TPU pod slice or several 8-GPU hosts):

    jax.distributed.initialize()            # before any other jax call; TPU / SLURM auto-detect
    mesh = make_mesh(MeshConfig(data=..., fsdp=-1, tensor=...))   # spans every host's devices
    stream = BatchStream(..., batch_size=per_host, num_shards=jax.process_count(),
                         shard_index=jax.process_index())        # this host's rows only
    batch = shard_batch(stream.batch_at(step), mesh)             # global array, no host copies

`shard_batch` builds the global batch with `jax.make_array_from_process_local_data`: each host
passes its own rows, the global batch is the hosts' rows in process order. Orbax checkpoints are
written and read collectively by every process; a checkpoint restores onto any mesh (`restore_checkpoint`
with `abstract_state(...)` shardings of the new mesh).

Shapes: B batch (global), T sequence.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from jaxalign.memory import estimate_memory, peak_temporaries
from jaxalign.models.config import TransformerConfig
from jaxalign.models.transformer import ACTIVATION_BATCH_AXES, init_params, param_logical_axes
from jaxalign.optim import OptimConfig, make_optimizer
from jaxalign.trainers.state import create_train_state

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Logical name -> mesh axes (first rule of a name wins; a mesh axis is used at most once per
# array, so "embed" stays unsplit on an activation whose batch already uses fsdp).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("pos", None),
    ("length", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the (data, fsdp, tensor) mesh axes; one of them may be -1 to take the devices
    left over (default: everything on fsdp).

    Raises:
      ValueError: on construction, a size is 0 or below -1 or more than one is -1; from
        `axis_sizes`, the product does not match the device count (messages name the field).
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self) -> None:
        for name in MESH_AXES:
            size = getattr(self, name)
            if not isinstance(size, int) or size == 0 or size < -1:
                raise ValueError(f"MeshConfig.{name} must be a positive int or -1, got {size!r}")
        fill = [name for name in MESH_AXES if getattr(self, name) == -1]
        if len(fill) > 1:
            raise ValueError(f"MeshConfig: only one axis may be -1, got {', '.join(fill)}")

    def axis_sizes(self, num_devices: int) -> tuple[int, int, int]:
        """The three sizes for `num_devices` devices, -1 resolved."""
        sizes = {name: getattr(self, name) for name in MESH_AXES}
        fill = [name for name, size in sizes.items() if size == -1]
        fixed = math.prod(size for size in sizes.values() if size != -1)
        if fill:
            if num_devices % fixed:
                raise ValueError(
                    f"MeshConfig.{fill[0]}=-1: {num_devices} devices are not divisible by the "
                    f"other axes' product {fixed} ({self})"
                )
            sizes[fill[0]] = num_devices // fixed
        elif fixed != num_devices:
            raise ValueError(
                f"MeshConfig data×fsdp×tensor = {fixed} does not match the {num_devices} devices ({self})"
            )
        return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) `jax.sharding.Mesh` with Auto axes over `devices` (default: all
    devices of all processes, `jax.devices()`), laid out by `jax.make_mesh`.

    Raises:
      ValueError: the sizes do not fit the device count (see `MeshConfig`).
    """
    devices = jax.devices() if devices is None else list(devices)
    sizes = config.axis_sizes(len(devices))
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def abstract_mesh(config: MeshConfig, num_devices: int) -> AbstractMesh:
    """A device-less mesh of the same shape, for planning (e.g. `per_device_memory` of a pod)."""
    return AbstractMesh(config.axis_sizes(num_devices), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _rule_table(rules: LogicalRules, mesh_shape: dict[str, int]) -> dict[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = {}
    for name, target in rules:
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        for axis in axes:
            if axis not in mesh_shape:
                raise ValueError(f"rules: {name!r} maps to mesh axis {axis!r}, not in {tuple(mesh_shape)}")
        table.setdefault(name, axes)
    return table


def logical_to_spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh | AbstractMesh,
    rules: LogicalRules = DEFAULT_RULES,
) -> tuple[PartitionSpec, list[str]]:
    """PartitionSpec of one array from its logical axis names, and the reasons for any fallback.

    Each named dimension takes the mesh axes of its rule, minus axes of size 1 and axes an earlier
    dimension of the same array already uses; then the longest prefix of them whose size product
    divides the dimension (none: replicated).

    Args:
      names: one logical name (or None: replicated) per dimension; may be shorter than `shape`.
      shape: the array's global shape.
      mesh: a `Mesh` or `AbstractMesh` with the rules' axis names.
      rules: (logical name, mesh axis | tuple of axes | None) pairs.

    Returns:
      (spec, reasons): reasons are human-readable strings, empty when nothing fell back.

    Raises:
      ValueError: more names than dimensions, a name without a rule, or a rule naming an axis the
        mesh lacks.
    """
    mesh_shape = dict(mesh.shape)
    table = _rule_table(rules, mesh_shape)
    if len(names) > len(shape):
        raise ValueError(f"{len(names)} logical names {tuple(names)} for a rank-{len(shape)} array")
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    reasons: list[str] = []
    for dim, (name, size) in enumerate(zip(list(names) + [None] * (len(shape) - len(names)), shape)):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule in {[r[0] for r in rules]}")
        wanted = tuple(a for a in table[name] if mesh_shape[a] > 1)
        free = tuple(a for a in wanted if a not in used)
        if free != wanted:
            reasons.append(f"{name!r} (dim {dim}): mesh axes {sorted(set(wanted) - set(free))} already used")
        keep = free
        while keep and size % math.prod(mesh_shape[a] for a in keep):
            keep = keep[:-1]
        if keep != free:
            dropped = {a: mesh_shape[a] for a in free[len(keep):]}
            reasons.append(
                f"{name!r} (dim {dim}) size {size} not divisible by {dropped}: "
                + (f"split over {keep} only" if keep else "replicated")
            )
        used.update(keep)
        spec.append(None if not keep else keep[0] if len(keep) == 1 else keep)
    return PartitionSpec(*spec), reasons


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def _path_str(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _resolve_tree(logical_axes, shapes, mesh, rules) -> tuple[Any, list[str]]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(logical_axes, is_leaf=_is_spec)
    specs, reasons = [], []
    for (path, names), x in zip(leaves, treedef.flatten_up_to(shapes)):
        spec, why = logical_to_spec(tuple(names), x.shape, mesh, rules)
        specs.append(spec)
        reasons += [f"{_path_str(path)}: {r}" for r in why]
    return jax.tree.unflatten(treedef, specs), reasons


def partition_specs(logical_axes, shapes, mesh: Mesh | AbstractMesh, rules: LogicalRules = DEFAULT_RULES):
    """Tree of `PartitionSpec`s for a tree of arrays (or `ShapeDtypeStruct`s) `shapes` whose
    logical names are `logical_axes` (a same-structure tree of PartitionSpecs of names, as
    `param_logical_axes` returns). See `logical_to_spec` for the rules and errors."""
    return _resolve_tree(logical_axes, shapes, mesh, rules)[0]


def sharding_fallbacks(logical_axes, shapes, mesh: Mesh | AbstractMesh, rules: LogicalRules = DEFAULT_RULES) -> list[str]:
    """Every dimension that could not be split as its rule asks, as "path: reason" strings."""
    return _resolve_tree(logical_axes, shapes, mesh, rules)[1]


def abstract_params(config: TransformerConfig) -> Any:
    """`ShapeDtypeStruct` tree of the model's parameters (nothing allocated)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def param_specs(config: TransformerConfig, mesh: Mesh | AbstractMesh, rules: LogicalRules = DEFAULT_RULES):
    """`PartitionSpec` tree of the model's parameters under `rules` on `mesh`."""
    return partition_specs(param_logical_axes(config), abstract_params(config), mesh, rules)


def param_shardings(config: TransformerConfig, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
    """`NamedSharding` tree of the model's parameters (same structure as `init_params`)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(config, mesh, rules), is_leaf=_is_spec)


def opt_state_like_params(tx: optax.GradientTransformation, params, per_param, other):
    """The optimizer state tree of `tx` for `params` with each params-shaped subtree (Adam's
    moments, MultiSteps' accumulator) replaced by `per_param` (a tree like params: shardings or
    specs) and every other leaf (counts) by `other`. Uses `optax.tree_map_params` on
    `jax.eval_shape(tx.init, params)`, so nothing is allocated."""
    abstract = jax.eval_shape(tx.init, params)
    return optax.tree_map_params(
        tx, lambda _, s: s, abstract, per_param, transform_non_params=lambda _: other,
        is_leaf=lambda x: isinstance(x, (NamedSharding, PartitionSpec)),
    )


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


def shard_state(state, shardings):
    """`jax.device_put(state, shardings)`: moves (and splits) every leaf onto its sharding."""
    return jax.device_put(state, shardings)


def abstract_state(state_shapes, shardings):
    """`ShapeDtypeStruct` tree carrying `shardings`: the target of `restore_checkpoint` to restore
    a checkpoint (saved under any mesh) directly into this mesh's layout."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_shapes, shardings
    )


def batch_axes(mesh: Mesh | AbstractMesh, rules: LogicalRules = DEFAULT_RULES) -> tuple[str, ...]:
    """Mesh axes the "batch" logical axis is split over (size-1 axes dropped)."""
    return tuple(a for a in _rule_table(rules, dict(mesh.shape)).get("batch", ()) if mesh.shape[a] > 1)


def batch_sharding(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) dimension split over the "batch" rule's axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh, rules) or None))


def shard_batch(batch, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
    """Global arrays of a batch (dict, `Rollout` or any pytree of [B, ...] arrays), dimension 0
    split over the batch axes.

    Works on one or many hosts: each process passes its own rows (on one host: all of them) and
    `jax.make_array_from_process_local_data` assembles the global array, B = the rows of all
    processes in process order.

    Raises:
      ValueError: a leaf is a scalar, or its global leading dimension is not divisible by the
        number of batch shards (the message names the leaf).
    """
    sharding = batch_sharding(mesh, rules)
    shards = math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))

    def put(path, x):
        x = np.asarray(x)
        rows = x.shape[0] * jax.process_count() if x.ndim else 0
        if x.ndim == 0 or rows % shards:
            raise ValueError(
                f"batch leaf {_path_str(path) or '<root>'} with shape {x.shape} (global rows {rows}): "
                f"leading dimension must be divisible by the {shards} batch shards {batch_axes(mesh, rules)}"
            )
        return jax.make_array_from_process_local_data(sharding, x, (rows, *x.shape[1:]))

    return jax.tree_util.tree_map_with_path(put, batch)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | AbstractMesh, rules: LogicalRules = DEFAULT_RULES) -> Iterator[None]:
    """Context in which the model constrains its residual stream [B, T, D] to B split over the
    "batch" rule's mesh axes (`jaxalign.models.transformer.ACTIVATION_BATCH_AXES`), with `mesh`
    as the abstract mesh. Valid inside or outside `jax.jit`; it must be active while a function
    is traced (a program already compiled without it is reused as is)."""
    abstract = mesh if isinstance(mesh, AbstractMesh) else mesh.abstract_mesh
    token = ACTIVATION_BATCH_AXES.set(batch_axes(mesh, rules))
    try:
        with jax.sharding.use_abstract_mesh(abstract):
            yield
    finally:
        ACTIVATION_BATCH_AXES.reset(token)


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
      params_shardings: same-structure tree of `NamedSharding`s (`scalar_model_shardings`,
        `actor_critic_shardings`).
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


def scalar_head_shardings(config: TransformerConfig, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
    """Shardings of a scalar head `{"kernel": [D], "bias": []}`: the kernel's D as "embed"."""
    spec, _ = logical_to_spec(("embed",), (config.d_model,), mesh, rules)
    return {"kernel": NamedSharding(mesh, spec), "bias": NamedSharding(mesh, PartitionSpec())}


def scalar_model_shardings(config: TransformerConfig, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
    """Shardings of a reward / value model `{"backbone", "head"}` (`init_scalar_model`)."""
    return {"backbone": param_shardings(config, mesh, rules), "head": scalar_head_shardings(config, mesh, rules)}


def actor_critic_shardings(
    config: TransformerConfig,
    mesh: Mesh,
    *,
    critic: str = "shared",
    value_config: TransformerConfig | None = None,
    rules: LogicalRules = DEFAULT_RULES,
):
    """Shardings of PPO's `{"policy", "value"}` (`jaxalign.rollout.init_actor_critic`): a value
    head on the policy trunk (critic="shared") or a separate `{"backbone", "head"}` critic."""
    if critic == "shared":
        value = {"head": scalar_head_shardings(config, mesh, rules)}
    else:
        value = scalar_model_shardings(value_config or config, mesh, rules)
    return {"policy": param_shardings(config, mesh, rules), "value": value}


def _shard_bytes(shape: Sequence[int], dtype, spec: PartitionSpec, mesh_shape: dict[str, int]) -> int:
    """Bytes one device holds of an array of `shape` split by `spec` (spec entries divide)."""
    n = 1
    for dim, size in enumerate(shape):
        entry = spec[dim] if dim < len(spec) else None
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        n *= size // math.prod(mesh_shape[a] for a in axes)
    return n * np.dtype(dtype).itemsize


def per_device_memory(
    config: TransformerConfig,
    mesh: Mesh | AbstractMesh,
    *,
    batch: int,
    seq_len: int,
    tx: optax.GradientTransformation | None = None,
    rules: LogicalRules = DEFAULT_RULES,
    attention: str = "xla",
    remat: bool = False,
) -> dict[str, int]:
    """Bytes per device of one train step of `config` on `mesh`, from the shardings.

    params, grads (laid out like the params) and optimizer state are exact: each leaf's shard
    shape under `param_specs` / `opt_state_like_params`, summed (a replicated leaf counts in
    full on every device). Activations are `jaxalign.memory.estimate_memory`'s for the per-device
    batch B / (data × fsdp) — with tensor > 1 an upper bound, since the head- and width-split
    tensors inside a block shrink by the tensor size too.

    Args:
      config: the model (param_dtype for storage, dtype for compute).
      mesh: a `Mesh` or `AbstractMesh` (see `abstract_mesh`) with the (data, fsdp, tensor) axes.
      batch: global batch B; seq_len: T of the forward pass.
      tx: the optimizer (default: `make_optimizer(OptimConfig())`, clipped AdamW).
      rules: the logical-axis rules.
      attention, remat: passed to `estimate_memory` ("flash" and remat=True are planning
        figures: the model runs XLA attention and no rematerialisation today).

    Returns:
      dict of int bytes per device: params, grads, optimizer_state, activations, inputs,
      temporaries = max(activations, 2 × grads) and total = params + optimizer_state + inputs +
      temporaries (see `jaxalign.memory` for why gradients and activations do not add up).

    Raises:
      ValueError: `batch` not divisible by the batch shards.
    """
    if tx is None:
        tx = make_optimizer(OptimConfig())[0]
    mesh_shape = dict(mesh.shape)
    shards = math.prod(mesh_shape[a] for a in batch_axes(mesh, rules))
    if batch % shards:
        raise ValueError(f"batch {batch} is not divisible by the {shards} batch shards {batch_axes(mesh, rules)}")
    shapes = abstract_params(config)
    specs = param_specs(config, mesh, rules)
    params = sum(
        _shard_bytes(x.shape, x.dtype, s, mesh_shape)
        for x, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(specs, is_leaf=_is_spec))
    )
    opt_shapes = jax.eval_shape(tx.init, shapes)
    opt_specs = opt_state_like_params(tx, shapes, specs, PartitionSpec())
    optimizer_state = sum(
        _shard_bytes(x.shape, x.dtype, s, mesh_shape)
        for x, s in zip(jax.tree.leaves(opt_shapes), jax.tree.leaves(opt_specs, is_leaf=_is_spec))
    )
    local = estimate_memory(
        config, batch=batch // shards, seq_len=seq_len, param_dtype=config.param_dtype,
        compute_dtype=config.dtype, attention=attention, remat=remat,
    )
    out = {
        "params": params,
        "grads": params,
        "optimizer_state": optimizer_state,
        "activations": local["activations"],
        "inputs": local["inputs"],
        "temporaries": peak_temporaries(local["activations"], params),  # grads are laid out as params
    }
    out["total"] = params + optimizer_state + out["inputs"] + out["temporaries"]
    return {k: int(v) for k, v in out.items()}


__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "MeshConfig",
    "StepShardings",
    "abstract_mesh",
    "abstract_params",
    "abstract_state",
    "activation_sharding",
    "actor_critic_shardings",
    "batch_axes",
    "batch_sharding",
    "logical_to_spec",
    "make_mesh",
    "opt_state_like_params",
    "param_shardings",
    "param_specs",
    "params_step_shardings",
    "partition_specs",
    "per_device_memory",
    "scalar_head_shardings",
    "scalar_model_shardings",
    "shard_batch",
    "shard_state",
    "sharding_fallbacks",
    "step_shardings",
    "train_state_shardings",
]
