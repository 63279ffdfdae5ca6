"""Device meshes and logical-axis sharding: a thin layer over `jax.sharding` (no pmap, no manual
collectives; XLA's GSPMD partitioner inserts the communication).

The MaxText / Levanter pattern: every parameter carries logical axis names (`param_logical_axes`:
"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "pos"; "layers" for the leading axis of
`scan_layers=True` params, replicated: each device holds its split of every layer), activations name their batch
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

Where the rest lives: a train step's shardings (`StepShardings`, `step_shardings`) beside the
step builder in `jaxalign.trainers.step`; the reward-model and actor-critic shardings beside
their parameter layouts (`jaxalign.scoring`); per-device memory planning in `jaxalign.memory`.
This module imports nothing above `jaxalign.models`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from jaxalign.models.config import TransformerConfig
from jaxalign.models.transformer import ACTIVATION_BATCH_AXES, init_params, param_logical_axes

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
    ("layers", None),  # the stacked layer axis of `scan_layers=True` params: never split
    ("expert", None),  # MoE experts replicated (D over fsdp, F over tensor as in dense MLPs); no EP yet
    ("q_lora", None),  # MLA's compressed query and key/value widths
    ("kv_lora", None),
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


def named_shardings(logical_axes, shapes, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
    """`NamedSharding` tree of a tree of arrays (or `ShapeDtypeStruct`s) `shapes` whose logical
    names are `logical_axes` (see `partition_specs`): the shardings of any parameter layout that
    names its axes (the transformer, a reward model, an actor-critic)."""
    specs = partition_specs(logical_axes, shapes, mesh, rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


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


# Names that moved out of this module in the restructuring; importing them from here still works
# for one release (with a DeprecationWarning), resolved lazily so this module imports nothing
# above `jaxalign.models`.
_MOVED = {
    "StepShardings": "jaxalign.trainers.step",
    "step_shardings": "jaxalign.trainers.step",
    "params_step_shardings": "jaxalign.trainers.step",
    "train_state_shardings": "jaxalign.trainers.step",
    "scalar_model_shardings": "jaxalign.scoring",
    "actor_critic_shardings": "jaxalign.scoring",
    "per_device_memory": "jaxalign.memory",
}


def __getattr__(name: str):
    if name in _MOVED:
        warnings.warn(
            f"jaxalign.sharding.{name} moved to {_MOVED[name]}.{name}", DeprecationWarning, stacklevel=2
        )
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'jaxalign.sharding' has no attribute {name!r}")


__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "LogicalRules",
    "MeshConfig",
    "abstract_mesh",
    "abstract_params",
    "abstract_state",
    "activation_sharding",
    "batch_axes",
    "batch_sharding",
    "logical_to_spec",
    "make_mesh",
    "named_shardings",
    "opt_state_like_params",
    "param_shardings",
    "param_specs",
    "partition_specs",
    "shard_batch",
    "shard_state",
    "sharding_fallbacks",
]
