"""LoRA and DoRA as pure transformations of the parameter pytree (no second model class).

LoRA (Hu et al. 2021, arXiv 2106.09685, Eq. 3) freezes a kernel W and learns a low-rank update:

    W' = W + s · A · B,      A [in, r],  B [r, out],  s = α / r

with B = 0 at initialisation, so training starts exactly at the base model. DoRA (Liu et al. 2024,
arXiv 2402.09353, Eq. 2-5) further splits the weight into a magnitude and a direction:

    W' = m · V / ‖V‖_c,      V = W + s · A · B,   m [out] initialised to ‖W‖_c

where ‖·‖_c is the L2 norm of each output column over the input axis (the norm of each row of
torch's [out, in] `nn.Linear` weight, as in PEFT). At initialisation m = ‖W‖_c and B = 0, so W' = W
up to one rounding of m / ‖W‖_c.

How it is used. The adapters are a separate, small pytree; `apply_lora(base, adapters, cfg)` returns
effective parameters with the targeted kernels replaced by W', and is pure and jit-able, so it runs
inside the loss, where gradients flow only to the adapters:

    logits = forward(apply_lora(base, adapters, lora_cfg), model_cfg, tokens)   # the policy
    ref    = forward(base, model_cfg, tokens)                                   # the reference

The base params *are* the frozen reference model (adapters off): DPO/GRPO need no copy of the
weights. For training, the train state's params are the adapters and the base is an extra,
non-donated step argument (see `make_lora_loss_fn`), so optimizer state and checkpoints are
adapter-sized.

Adapter pytree. It mirrors the module paths of the targeted kernels, e.g.
`adapters["layers_0"]["attn"]["wq"] = {"lora_a": [D, r], "lora_b": [r, N·H]}` (+ `"magnitude":
[N·H]` with DoRA). Every kernel is viewed as a matrix [in, out]: the kernels here contract their
leading axis, except the attention output `wo` [N, H, D], which contracts (heads, head_dim), so
wq [D, N, H] -> [D, N·H] and wo [N, H, D] -> [N·H, D]; `apply_lora` infers the split from
lora_a's first dimension. Biases, norms and embeddings are never adapted.

Design decisions:
* Dropout on the adapter input (PEFT's `lora_dropout`, `LoraConfig.dropout`) acts on activations,
  y = x·W + b + s·dropout(x)·A·B with a fresh mask per token, which no single W' can express. So
  while training with `dropout > 0` (and a dropout key), `make_lora_loss_fn` switches to PEFT's
  unmerged form: the adapters ride in the params beside their kernels and a flax method
  interceptor (`flax.linen.intercept_methods`, no change to the model) adds the adapter branch to
  the output of every adapted `Dense`/`DenseGeneral`. For DoRA it adds PEFT's
  (m/‖V‖_c − 1)·dropout(x)·W + (m/‖V‖_c)·s·dropout(x)·A·B (`peft.tuners.lora.dora`). A module
  without adapter leaves, such as the reference model inside a DPO loss, is untouched. Without
  dropout (and always in evaluation) the weight-space `apply_lora` is used. The model's own
  dropout (`TransformerConfig.dropout`) applies either way.
* DoRA's column norm ‖V‖_c is detached by default, i.e. treated as a constant in the backward
  pass, as DoRA §4.3 proposes and PEFT does (it saves the backward through the norm at a small
  cost in gradient fidelity; the magnitude's gradient is unaffected at B = 0); set
  `dora_detach_norm=False` for the exact gradient of Eq. 5.
* Weight decay: `jaxalign.optim.make_optimizer` decays only leaves named "kernel", so on an adapter
  tree it decays nothing. `lora_weight_decay_mask` decays lora_a and lora_b (as PEFT under the HF
  Trainer, and the LoRA paper's GPT-2 runs: AdamW, weight decay 0.01, Table 11) but never the DoRA
  magnitude (a scale, like a norm gain, which decay would shrink towards zero);
  `make_lora_optimizer` is `make_optimizer` with that mask.
* Precision: the update s·A·B is computed at HIGHEST matmul precision, added to W in the promoted
  dtype of (W, A): a bfloat16 base with float32 adapters gives float32 effective kernels, so small
  updates are not rounded away before the model casts to its compute dtype. `merge_lora` casts
  back to the base dtype for export.
* Memory: because the merged kernel W' is an operand of the model's matmul, autodiff keeps W' of
  every targeted kernel alive for the backward pass (a transient copy of the targeted weights);
  the unmerged form used with dropout keeps dropout(x) [B, T, in] and (x·A) [B, T, r] instead.
  See `jaxalign.memory.estimate_memory`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import traverse_util

from jaxalign.optim import OptimConfig, make_optimizer

Params = Any
Adapters = dict

LORA_A, LORA_B, MAGNITUDE = "lora_a", "lora_b", "magnitude"

# Presets of `LoraConfig.targets`, as regular expressions over '/'-joined kernel paths such as
# "layers_3/attn/wq/kernel". The embedding and the output head are never in a preset (as in PEFT);
# target them by pattern ("lm_head") if wanted.
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": (r"(^|/)attn/(wq|wk|wv|wo)/kernel$",),
    "mlp": (r"(^|/)mlp/(up|gate|down)/kernel$",),
    "all": (r"(^|/)attn/(wq|wk|wv|wo)/kernel$", r"(^|/)mlp/(up|gate|down)/kernel$"),
    "qv": (r"(^|/)attn/(wq|wv)/kernel$",),  # the LoRA paper's main setting (§7.1)
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which kernels get adapters, and of what kind.

    Attributes:
      rank: r, the inner dimension of A [in, r] and B [r, out].
      alpha: α; the update is scaled by s = α / r (LoRA §4.1: tuning α is roughly tuning the
        learning rate, so α is kept fixed when r changes).
      targets: presets ("attention" = wq/wk/wv/wo, "mlp" = up/gate/down, "all" = both, "qv")
        and/or regular expressions, each `re.search`ed in the '/'-joined path of every leaf named
        "kernel" (e.g. "attn/wq" matches "layers_0/attn/wq/kernel"). Each must match at least one
        kernel of the params it is applied to.
      dropout: rate of dropout on the adapter input while training (PEFT's `lora_dropout`; the
        LoRA paper's GPT-2 runs use 0.1, Table 11). 0 keeps the weight-space path; see the module
        docstring for how a rate > 0 is applied.
      dora: weight-decomposed adaptation (DoRA): also learn a magnitude m [out] per kernel.
      dora_detach_norm: treat ‖W + s·A·B‖_c as a constant in the backward pass (DoRA §4.3, PEFT).
      param_dtype: dtype of the adapter leaves (float32 keeps Adam updates exact even when the
        frozen base is stored in bfloat16).

    Raises:
      ValueError: rank < 1, dropout outside [0, 1), targets a string or empty, a bad pattern.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("attention",)
    dropout: float = 0.0
    dora: bool = False
    dora_detach_norm: bool = True
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.targets, str):
            raise ValueError(
                f"LoraConfig.targets must be a tuple of patterns, got the string {self.targets!r}"
            )
        if not self.targets:
            raise ValueError("LoraConfig.targets is empty")
        for pattern in self.patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"LoraConfig.targets: bad regular expression {pattern!r}: {err}") from err

    @property
    def scaling(self) -> float:
        """s = α / r."""
        return self.alpha / self.rank

    @property
    def patterns(self) -> tuple[str, ...]:
        """`targets` with presets expanded to their regular expressions."""
        out: list[str] = []
        for target in self.targets:
            out.extend(TARGET_PRESETS.get(target, (target,)))
        return tuple(out)


def _path_str(path: tuple[str, ...]) -> str:
    return "/".join(str(p) for p in path)


def _n_in_axes(module_path: tuple[str, ...], ndim: int) -> int:
    """Leading axes a kernel contracts: (heads, head_dim) for the attention output `wo`, else one."""
    if module_path and module_path[-1] == "wo" and ndim == 3:
        return 2
    return 1


def lora_targets(params: Params, config: LoraConfig) -> list[str]:
    """'/'-joined module paths (without "/kernel") of the kernels `config` targets, sorted.

    Raises:
      ValueError: a target pattern matches no kernel (a typo would otherwise train nothing).
    """
    kernels = [
        path for path in traverse_util.flatten_dict(params) if path and path[-1] == "kernel"
    ]
    names = {path: _path_str(path) for path in kernels}
    chosen = set()
    for pattern in config.patterns:
        hits = [path for path, name in names.items() if re.search(pattern, name)]
        if not hits:
            raise ValueError(
                f"LoRA target {pattern!r} matches no kernel; kernels are e.g. "
                f"{sorted(names.values())[:4]}"
            )
        chosen.update(hits)
    return sorted(_path_str(path[:-1]) for path in chosen)


def init_lora(params: Params, config: LoraConfig, rng: jax.Array) -> Adapters:
    """Adapters for every targeted kernel of `params`, initialised so that the model is unchanged.

    A ~ U(-1/√in, 1/√in) (PEFT's and loralib's `kaiming_uniform_(a=√5)`), B = 0 (LoRA §4.1), and
    with DoRA m = ‖W‖_c (the column norms of W over its input axis, DoRA Eq. 2).

    Args:
      params: the base parameter pytree (only shapes/dtypes are read, plus W for DoRA's m).
      config: the LoRA configuration.
      rng: a `jax.random.key`.

    Returns:
      Nested dict mirroring the targeted module paths, leaves "lora_a" [in, r], "lora_b" [r, out]
      and (DoRA) "magnitude" [out], all in `config.param_dtype`.
    """
    flat = traverse_util.flatten_dict(params)
    modules = lora_targets(params, config)
    keys = jax.random.split(rng, len(modules))
    adapters: dict[tuple[str, ...], jax.Array] = {}
    for key, module in zip(keys, modules):
        path = tuple(module.split("/"))
        w = flat[path + ("kernel",)]
        n_in = _n_in_axes(path, w.ndim)
        d_in = math.prod(w.shape[:n_in])
        d_out = math.prod(w.shape[n_in:])
        bound = 1.0 / math.sqrt(d_in)
        adapters[path + (LORA_A,)] = jax.random.uniform(
            key, (d_in, config.rank), config.param_dtype, -bound, bound
        )
        adapters[path + (LORA_B,)] = jnp.zeros((config.rank, d_out), config.param_dtype)
        if config.dora:
            norm = _column_norm(jnp.reshape(w, (d_in, d_out)))
            adapters[path + (MAGNITUDE,)] = norm.astype(config.param_dtype)
    return traverse_util.unflatten_dict(adapters)


def _column_norm(v: jax.Array) -> jax.Array:
    """‖v‖_c: L2 norm of each output column of v [in, out] over the input axis, float32 [out]."""
    v = v.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(v * v, axis=0))


def _merged_matrix(w: jax.Array, adapter: Mapping[str, jax.Array], config: LoraConfig) -> jax.Array:
    """V = W + s·A·B as a matrix [in, out] in the promoted dtype of (W, A)."""
    a, b = adapter[LORA_A], adapter[LORA_B]  # [in, r], [r, out]
    dtype = jnp.result_type(w.dtype, a.dtype)
    v = jnp.reshape(w, (a.shape[0], b.shape[1])).astype(dtype)  # [in, out]
    delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)  # [in, out]
    return v + (config.scaling * delta).astype(dtype)


def _dora_scale(v: jax.Array, magnitude: jax.Array, config: LoraConfig) -> jax.Array:
    """m / ‖V‖_c, float32 [out] (the norm detached if `config.dora_detach_norm`)."""
    norm = _column_norm(v)  # [out]
    if config.dora_detach_norm:
        norm = jax.lax.stop_gradient(norm)
    return magnitude.astype(jnp.float32) / norm


def _effective_kernel(w: jax.Array, adapter: Mapping[str, jax.Array], config: LoraConfig) -> jax.Array:
    """W + s·A·B (or DoRA's m·V/‖V‖_c) in W's shape and the promoted dtype of (W, A)."""
    v = _merged_matrix(w, adapter, config)  # [in, out]
    if config.dora:
        v = v * _dora_scale(v, adapter[MAGNITUDE], config).astype(v.dtype)  # [in, out]
    return jnp.reshape(v, w.shape)


def _adapter_modules(adapters: Adapters) -> dict[tuple[str, ...], dict[str, jax.Array]]:
    modules: dict[tuple[str, ...], dict[str, jax.Array]] = {}
    for path, leaf in traverse_util.flatten_dict(adapters).items():
        modules.setdefault(path[:-1], {})[path[-1]] = leaf
    return modules


def _checked_modules(
    flat_params: Mapping[tuple[str, ...], jax.Array], adapters: Adapters, config: LoraConfig
) -> dict[tuple[str, ...], dict[str, jax.Array]]:
    """The adapters by module path, after checking each against the params and the config."""
    modules = _adapter_modules(adapters)
    for module, adapter in modules.items():
        if module + ("kernel",) not in flat_params:
            raise KeyError(f"adapter for {_path_str(module)!r}: params have no such kernel")
        if (MAGNITUDE in adapter) != config.dora:
            raise ValueError(
                f"adapter {_path_str(module)!r}: LoraConfig.dora={config.dora} but the adapter "
                f"{'has' if MAGNITUDE in adapter else 'lacks'} a magnitude"
            )
    return modules


def apply_lora(params: Params, adapters: Adapters, config: LoraConfig) -> Params:
    """Effective parameters: every adapted kernel replaced by W + (α/r)·A·B (or the DoRA weight).

    Pure and jit-able; call it inside the loss so that gradients reach the adapters only:
    `forward(apply_lora(base, adapters, cfg), model_cfg, tokens)`. Leaves without adapters are
    passed through unchanged (the same arrays). `config.dropout` plays no part here (see
    `make_lora_loss_fn`).

    Args:
      params: base parameter pytree (nested dicts, as from `init_params` / `load_hf_checkpoint`).
      adapters: from `init_lora` (or a trained/restored copy).
      config: the `LoraConfig` the adapters were made with.

    Raises:
      KeyError: an adapter names a module without a kernel in `params`.
      ValueError: DoRA config but adapters without magnitudes (or the reverse).
    """
    flat = traverse_util.flatten_dict(params)
    for module, adapter in _checked_modules(flat, adapters, config).items():
        key = module + ("kernel",)
        flat[key] = _effective_kernel(flat[key], adapter, config)
    return traverse_util.unflatten_dict(flat)


def _unmerged_delta(
    x: jax.Array,
    module: Mapping[str, jax.Array],
    path: tuple[str, ...],
    config: LoraConfig,
    rng: jax.Array,
) -> jax.Array:
    """The adapter branch of one adapted projection under adapter-input dropout (PEFT's forward).

    Args:
      x: the projection's input [..., in axes] (e.g. [B, T, D], or [B, T, N, H] for `wo`).
      module: its params: "kernel" [in axes..., out axes...], "lora_a" [in, r], "lora_b" [r, out]
        (+ "magnitude" [out] with DoRA).
      path: its module path (which decides how many leading kernel axes are inputs).
      config: the LoRA configuration (rate `config.dropout`).
      rng: key of this call's dropout mask.

    Returns:
      [..., out axes] in the promoted dtype of (x, A), to add to x·W + b: s·x̃·A·B with x̃ =
      dropout(x); with DoRA (m/‖V‖_c − 1)·x̃·W + (m/‖V‖_c)·s·x̃·A·B.
    """
    w, a, b = module["kernel"], module[LORA_A], module[LORA_B]
    d_in, d_out = a.shape[0], b.shape[1]
    n_in = _n_in_axes(path, w.ndim)
    lead = x.shape[: x.ndim - n_in]
    dtype = jnp.result_type(x.dtype, a.dtype)
    x = jnp.reshape(x, (*lead, d_in)).astype(dtype)  # [..., in]
    keep = 1.0 - config.dropout
    x = jnp.where(jax.random.bernoulli(rng, keep, x.shape), x / keep, 0)  # dropout(x) [..., in]
    out = config.scaling * ((x @ a.astype(dtype)) @ b.astype(dtype))  # [..., out]
    if config.dora:
        scale = _dora_scale(_merged_matrix(w, module, config), module[MAGNITUDE], config)  # [out]
        scale = scale.astype(dtype)
        base = x @ jnp.reshape(w, (d_in, d_out)).astype(dtype)  # [..., out]
        out = (scale - 1) * base + scale * out
    return jnp.reshape(out, (*lead, *w.shape[n_in:]))


def _dropout_interceptor(config: LoraConfig, rng: jax.Array) -> Callable:
    """A `flax.linen.intercept_methods` interceptor adding `_unmerged_delta` to the output of every
    `Dense`/`DenseGeneral` whose params hold adapter leaves; each call draws its own mask."""
    calls = itertools.count()

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral)):
            return next_fun(*args, **kwargs)
        params = module.variables.get("params", {})
        if LORA_A not in params:
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)  # x·W + b with the frozen kernel
        key = jax.random.fold_in(rng, next(calls))
        return y + _unmerged_delta(args[0], params, tuple(module.path), config, key).astype(y.dtype)

    return interceptor


def _adapters_beside_kernels(params: Params, adapters: Adapters, config: LoraConfig) -> Params:
    """The base params with each module's adapter leaves added next to its kernel."""
    flat = traverse_util.flatten_dict(params)
    for module, adapter in _checked_modules(flat, adapters, config).items():
        flat.update({module + (name,): leaf for name, leaf in adapter.items()})
    return traverse_util.unflatten_dict(flat)


def merge_lora(params: Params, adapters: Adapters, config: LoraConfig) -> Params:
    """`apply_lora` materialised in the base dtypes: a plain parameter tree for inference/export."""
    merged = apply_lora(params, adapters, config)
    return jax.tree.map(lambda new, old: new.astype(old.dtype), merged, params)


def unmerge_lora(merged: Params, adapters: Adapters, config: LoraConfig) -> Params:
    """Recovers the base from LoRA-merged params: W = W' - (α/r)·A·B (up to float rounding).

    Raises:
      ValueError: for DoRA, which cannot be undone from (W', adapters): W' fixes only the
        direction of each column of V = W + s·A·B, not its length ‖V‖_c, so W is not determined.
        Keep the base.
    """
    if config.dora:
        raise ValueError("unmerge_lora: DoRA merges are not invertible; keep the base params")
    flat = traverse_util.flatten_dict(merged)
    for module, adapter in _adapter_modules(adapters).items():
        key = module + ("kernel",)
        w = flat[key]
        a, b = adapter[LORA_A], adapter[LORA_B]
        dtype = jnp.result_type(w.dtype, a.dtype)
        v = jnp.reshape(w, (a.shape[0], b.shape[1])).astype(dtype)
        v = v - (config.scaling * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)).astype(dtype)
        flat[key] = jnp.reshape(v, w.shape).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def make_lora_loss_fn(loss_fn: Callable, config: LoraConfig, *, dropout: bool = True) -> Callable:
    """Turns `loss_fn(params, batch, dropout_rng, *extra)` into
    `lora_loss_fn(adapters, batch, dropout_rng, base, *extra)`.

    The new loss calls `loss_fn(apply_lora(base, adapters, config), batch, dropout_rng, *extra)`,
    so `jaxalign.trainers.make_train_step(lora_loss_fn, tx, schedule)` trains the adapters only:
    build the state with `create_train_state(adapters, tx, seed)` and call `step(state, batch,
    base)` (or `step(state, batch, base, base)` for a DPO loss whose extra argument is the
    reference params: the base is the reference). The base is an ordinary, non-donated argument,
    so it is not baked into the compiled program and survives the step.

    With `config.dropout > 0`, `dropout` and a `dropout_rng`, the loss instead runs
    `loss_fn(base with the adapters beside its kernels, ...)` under a flax method interceptor
    that adds the adapter branch on dropped-out inputs (see the module docstring); the masks come
    from `fold_in(dropout_rng, 1)`, apart from the model's own dropout stream. Params without
    adapter leaves (a reference passed in `extra`) run the plain model either way.

    Args:
      loss_fn: the full-model loss.
      config: the LoRA configuration.
      dropout: allow adapter dropout (trainers pass their own `dropout` switch; GRPO keeps it off).
    """

    def lora_loss_fn(adapters, batch, dropout_rng, base, *extra):
        if config.dropout > 0 and dropout and dropout_rng is not None:
            interceptor = _dropout_interceptor(config, jax.random.fold_in(dropout_rng, 1))
            with nn.intercept_methods(interceptor):
                return loss_fn(
                    _adapters_beside_kernels(base, adapters, config), batch, dropout_rng, *extra
                )
        return loss_fn(apply_lora(base, adapters, config), batch, dropout_rng, *extra)

    return lora_loss_fn


def lora_weight_decay_mask(adapters: Adapters) -> Adapters:
    """Pytree of bools over an adapter tree: True on lora_a / lora_b, False on DoRA magnitudes.

    Use with optax directly, e.g. `optax.adamw(schedule, weight_decay=0.01,
    mask=lora_weight_decay_mask)`, or through `make_lora_optimizer`. (`jaxalign.optim`'s
    `weight_decay_mask` decays leaves named "kernel" only, i.e. no adapter leaf.)
    """

    def decays(path, leaf) -> bool:
        del leaf
        return str(getattr(path[-1], "key", path[-1])) in (LORA_A, LORA_B)

    return jax.tree_util.tree_map_with_path(decays, adapters)


def make_lora_optimizer(config: OptimConfig) -> tuple[optax.GradientTransformation, Callable]:
    """`jaxalign.optim.make_optimizer` with `lora_weight_decay_mask` instead of the kernel mask:
    clip_by_global_norm -> adamw(warmup-cosine, decay on lora_a/lora_b), in MultiSteps if
    `config.grad_accum_steps > 1`. The optimizer state has exactly the same leaves.

    Args:
      config: the optimiser hyperparameters (`weight_decay` applies to lora_a and lora_b).
    """
    return make_optimizer(config, decay_mask=lora_weight_decay_mask)


def num_lora_params(adapters: Adapters) -> int:
    """Number of trainable adapter values."""
    return sum(x.size for x in jax.tree.leaves(adapters))
