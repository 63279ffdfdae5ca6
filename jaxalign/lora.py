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

Stacked layers (`TransformerConfig.scan_layers`). A kernel under a "layers" subtree (the scanned
blocks, e.g. "layers/attn/wq/kernel" [L, D, N, H]) is L kernels: its adapter is stacked too,
"lora_a" [L, in, r], "lora_b" [L, r, out] (+ "magnitude" [L, out]), one independent adapter per
layer, and every function here works on either layout. The presets match both; a per-layer
pattern ("layers_3/attn/wq") needs the unrolled layout. `stack_layers` / `unstack_layers`
(`jaxalign.models.transformer`) convert an adapter tree covering every layer like params, with
`apply_lora(stack_layers(base), stack_layers(adapters))` = `stack_layers(apply_lora(base,
adapters))`. Under adapter dropout each scanned layer draws its masks from the model's own
"dropout" stream (`make_rng` inside the scan gives each layer its key).

Fully trained leaves (PEFT's `modules_to_save`). Some parameters cannot be trained through a
low-rank update: the freshly initialised scalar head of a reward model (`{"backbone", "head":
{"kernel": [D], "bias": []}}`, `jaxalign.models.heads`) or a PPO critic. As PEFT's
`modules_to_save` (and TRL's reward trainer, which trains the `score` head that way),
`LoraConfig.trainable` names such leaves by pattern; `init_lora` puts a copy of each into the
adapter tree at its own path, e.g. `adapters["head"] = {"kernel": [D], "bias": []}`, and
`apply_lora` (and the unmerged dropout path) substitute the copies for the base leaves, so they
are trained in full while the base keeps its original values. An adapter tree thus holds two kinds
of leaves, told apart by name: "lora_a"/"lora_b"/"magnitude" belong to the adapter of the module
above them; any other leaf is the full copy of the base leaf at the same path. A leaf can be one
or the other, never both (a targeted kernel is never also fully trained), though a module's bias
may be fully trained while its kernel gets an adapter. `merge_lora` returns the trained copies in
the base dtype; `unmerge_lora` cannot recover their base values (see there).

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
  tree it decays no LoRA leaf. `lora_weight_decay_mask` decays lora_a and lora_b (as PEFT under
  the HF Trainer, and the LoRA paper's GPT-2 runs: AdamW, weight decay 0.01, Table 11) but never
  the DoRA magnitude (a scale, like a norm gain, which decay would shrink towards zero); a fully
  trained leaf is decayed exactly when `jaxalign.optim.weight_decay_mask` would decay it in full
  fine-tuning (named "kernel": the scalar head's kernel yes, its bias no). `make_lora_optimizer`
  is `make_optimizer` with that mask.
* Precision: the update s·A·B is computed at HIGHEST matmul precision, added to W in the promoted
  dtype of (W, A): a bfloat16 base with float32 adapters gives float32 effective kernels, so small
  updates are not rounded away before the model casts to its compute dtype. A fully trained leaf
  is copied in the promoted dtype of (its own dtype, `param_dtype`): its own dtype, unless
  `param_dtype` is wider (a bfloat16 head gets a float32 copy; a float32 head stays float32 even
  with `param_dtype=bfloat16`), and `apply_lora` uses the copy in that dtype. `merge_lora` casts
  everything back to the base dtype for export.
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

from jaxalign.optim import OptimConfig, make_optimizer, weight_decay_mask

Params = Any
Adapters = dict

LORA_A, LORA_B, MAGNITUDE = "lora_a", "lora_b", "magnitude"
# The subtree name of stacked (scanned) blocks, `jaxalign.models.transformer.SCAN_NAME`: a
# kernel below it has a leading layer axis (not imported: this module sits below the models).
STACKED_LAYERS = "layers"
_LORA_KEYS = (LORA_A, LORA_B, MAGNITUDE)  # an adapter tree's other leaf names are full copies

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
        kernel of the params it is applied to. The routed experts of an MoE layer
        ("moe/gate|up|down/kernel", [E, D, F]) are never targets; its router and shared expert are.
      dropout: rate of dropout on the adapter input while training (PEFT's `lora_dropout`; the
        LoRA paper's GPT-2 runs use 0.1, Table 11). 0 keeps the weight-space path; see the module
        docstring for how a rate > 0 is applied.
      dora: weight-decomposed adaptation (DoRA): also learn a magnitude m [out] per kernel.
      dora_detach_norm: treat ‖W + s·A·B‖_c as a constant in the backward pass (DoRA §4.3, PEFT).
      param_dtype: dtype of the adapter leaves (float32 keeps Adam updates exact even when the
        frozen base is stored in bfloat16); fully trained copies get the promoted dtype of their
        own and this one.
      trainable: regular expressions, each `re.search`ed in the '/'-joined path of every leaf of
        the params (not only kernels); the matched leaves are trained in full, as PEFT's
        `modules_to_save`: "head" matches "head/kernel" and "head/bias" of a reward model,
        "^value/" everything under a critic's "value". Patterns are searched, not anchored:
        "head" would also match "backbone/lm_head/kernel" of an untied trunk, so anchor
        ("^head/") where that matters. Each must match at least one leaf, and none may match a
        kernel that `targets` adapts. Default (): LoRA only, exactly as before.

    `targets` stays required and non-empty even with `trainable`: a run that trains whole leaves
    only is plain fine-tuning of part of the model (`optax.masked` or a frozen-leaf optimizer on
    the params), not LoRA.

    Raises:
      ValueError: rank < 1, dropout outside [0, 1), targets a string or empty, trainable a
        string, a bad pattern in either.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("attention",)
    dropout: float = 0.0
    dora: bool = False
    dora_detach_norm: bool = True
    param_dtype: Any = jnp.float32
    trainable: tuple[str, ...] = ()

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
        if isinstance(self.trainable, str):
            raise ValueError(
                f"LoraConfig.trainable must be a tuple of patterns, got the string {self.trainable!r}"
            )
        for pattern in self.trainable:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(
                    f"LoraConfig.trainable: bad regular expression {pattern!r}: {err}"
                ) from err

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


def _n_stack_axes(module_path: tuple[str, ...]) -> int:
    """1 for a kernel of stacked layers (below a "layers" subtree: [L, ...]), else 0."""
    return int(STACKED_LAYERS in module_path)


def _matrix_shape(module_path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The kernel's shape as (stack..., in, out): [D, N, H] -> (D, N·H), wo [N, H, D] -> (N·H, D),
    a stacked wq [L, D, N, H] -> (L, D, N·H)."""
    s = _n_stack_axes(module_path)
    n_in = _n_in_axes(module_path, len(shape) - s)
    return (*shape[:s], math.prod(shape[s : s + n_in]), math.prod(shape[s + n_in :]))


def lora_targets(params: Params, config: LoraConfig) -> list[str]:
    """'/'-joined module paths (without "/kernel") of the kernels `config` targets, sorted.

    Raises:
      ValueError: a target pattern matches no kernel (a typo would otherwise train nothing).
    """
    return sorted(_path_str(path[:-1]) for path in _target_kernels(params, config))


# The routed experts of an MoE layer (`jaxalign.models.moe.MoE`): kernels [E, D, F] / [E, F, D]
# ([L, E, ...] stacked) that are E matrices, not one; LoRA's matrix view does not fit them, so
# no pattern selects them (the router and the shared expert, 2-D, stay targetable).
_EXPERT_KERNEL = re.compile(r"(^|/)moe/(gate|up|down)/kernel$")


def _target_kernels(params: Params, config: LoraConfig) -> set[tuple[str, ...]]:
    """Paths (ending in "kernel") of the kernels `config.targets` matches; see `lora_targets`.
    MoE expert kernels (`_EXPERT_KERNEL`) are never matched."""
    kernels = [
        path for path in traverse_util.flatten_dict(params)
        if path and path[-1] == "kernel" and not _EXPERT_KERNEL.search(_path_str(path))
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
    return chosen


def lora_trainable(params: Params, config: LoraConfig) -> list[str]:
    """'/'-joined paths of the leaves `config.trainable` trains in full (PEFT's `modules_to_save`),
    sorted; [] when `config.trainable` is empty.

    Raises:
      ValueError: a trainable pattern matches no leaf (with example paths); a matched leaf is also
        a kernel that `config.targets` adapts (a leaf gets an adapter or is trained in full, not
        both); a matched leaf is not floating point, or is named like an adapter leaf ("lora_a",
        "lora_b", "magnitude", which the adapter tree reserves). Also `lora_targets`' errors.
    """
    return [_path_str(path) for path in _trainable_paths(params, config)]


def _trainable_paths(params: Params, config: LoraConfig) -> list[tuple[str, ...]]:
    """The paths of `lora_trainable`, as key tuples, sorted by their '/'-joined names."""
    if not config.trainable:
        return []
    flat = traverse_util.flatten_dict(params)
    names = {path: _path_str(path) for path in flat}
    chosen: set[tuple[str, ...]] = set()
    for pattern in config.trainable:
        hits = [path for path, name in names.items() if re.search(pattern, name)]
        if not hits:
            raise ValueError(
                f"LoraConfig.trainable pattern {pattern!r} matches no parameter; parameter paths "
                f"are e.g. {sorted(names.values())[:4]}"
            )
        chosen.update(hits)
    targeted = _target_kernels(params, config)
    for path in sorted(chosen):
        if path in targeted:
            raise ValueError(
                f"{names[path]!r} is both a LoRA target kernel (LoraConfig.targets) and trained in "
                f"full (LoraConfig.trainable); narrow one of the patterns (anchor it, e.g. '^head/', or name "
                "the leaves exactly)"
            )
        if path[-1] in _LORA_KEYS:
            raise ValueError(
                f"trainable leaf {names[path]!r}: the names {_LORA_KEYS} are reserved for adapter leaves"
            )
        if not jnp.issubdtype(flat[path].dtype, jnp.inexact):
            raise ValueError(
                f"trainable leaf {names[path]!r} has dtype {flat[path].dtype}; only floating-point "
                "leaves can be trained"
            )
    return sorted(chosen, key=names.__getitem__)


def _full_copy_dtype(dtype: Any, param_dtype: Any) -> jnp.dtype:
    """The dtype of a fully trained copy: its own, or `param_dtype` where that is wider."""
    return jnp.promote_types(dtype, param_dtype)


def init_lora(params: Params, config: LoraConfig, rng: jax.Array) -> Adapters:
    """Adapters for every targeted kernel of `params`, initialised so that the model is unchanged.

    A ~ U(-1/√in, 1/√in) (PEFT's and loralib's `kaiming_uniform_(a=√5)`), B = 0 (LoRA §4.1), and
    with DoRA m = ‖W‖_c (the column norms of W over its input axis, DoRA Eq. 2).

    The leaves `config.trainable` matches (PEFT's `modules_to_save`) are copied as they are (no
    randomness is drawn for them, so the LoRA leaves are the same as without `trainable`).

    Args:
      params: the base parameter pytree (only shapes/dtypes are read, plus W for DoRA's m and the
        values of the fully trained leaves).
      config: the LoRA configuration.
      rng: a `jax.random.key`.

    Returns:
      Nested dict mirroring the targeted module paths, leaves "lora_a" [in, r], "lora_b" [r, out]
      and (DoRA) "magnitude" [out] ([L, in, r], [L, r, out], [L, out] for stacked layers), all
      in `config.param_dtype`; plus, at its own path, a copy of
      each fully trained leaf in its shape and `jnp.promote_types(its dtype, param_dtype)` (e.g.
      `adapters["head"] = {"kernel": [D], "bias": []}`). The copies are new buffers, never the
      base's arrays, so donating the adapters (the train step does) leaves the base intact.

    Raises:
      ValueError: see `lora_targets` and `lora_trainable`.
    """
    flat = traverse_util.flatten_dict(params)
    modules = lora_targets(params, config)
    full = _trainable_paths(params, config)
    keys = jax.random.split(rng, len(modules))
    adapters: dict[tuple[str, ...], jax.Array] = {}
    for key, module in zip(keys, modules):
        path = tuple(module.split("/"))
        w = flat[path + ("kernel",)]
        *stack, d_in, d_out = _matrix_shape(path, w.shape)
        bound = 1.0 / math.sqrt(d_in)
        adapters[path + (LORA_A,)] = jax.random.uniform(
            key, (*stack, d_in, config.rank), config.param_dtype, -bound, bound
        )
        adapters[path + (LORA_B,)] = jnp.zeros((*stack, config.rank, d_out), config.param_dtype)
        if config.dora:
            norm = _column_norm(jnp.reshape(w, (*stack, d_in, d_out)))
            adapters[path + (MAGNITUDE,)] = norm.astype(config.param_dtype)
    for path in full:
        leaf = flat[path]
        # jnp.array copies (astype to the same dtype would alias the base buffer)
        adapters[path] = jnp.array(leaf, _full_copy_dtype(leaf.dtype, config.param_dtype), copy=True)
    return traverse_util.unflatten_dict(adapters)


def _column_norm(v: jax.Array) -> jax.Array:
    """‖v‖_c: L2 norm of each output column of v [..., in, out] over the input axis, float32
    [..., out]."""
    v = v.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(v * v, axis=-2))


def _merged_matrix(w: jax.Array, adapter: Mapping[str, jax.Array], config: LoraConfig) -> jax.Array:
    """V = W + s·A·B as a matrix [in, out] ([L, in, out] stacked) in the promoted dtype of (W, A)."""
    a, b = adapter[LORA_A], adapter[LORA_B]  # [(L,) in, r], [(L,) r, out]
    dtype = jnp.result_type(w.dtype, a.dtype)
    v = jnp.reshape(w, (*a.shape[:-1], b.shape[-1])).astype(dtype)  # [(L,) in, out]
    delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)  # [(L,) in, out]
    return v + (config.scaling * delta).astype(dtype)


def _dora_scale(v: jax.Array, magnitude: jax.Array, config: LoraConfig) -> jax.Array:
    """m / ‖V‖_c, float32 [(L,) out] (the norm detached if `config.dora_detach_norm`)."""
    norm = _column_norm(v)  # [out]
    if config.dora_detach_norm:
        norm = jax.lax.stop_gradient(norm)
    return magnitude.astype(jnp.float32) / norm


def _effective_kernel(w: jax.Array, adapter: Mapping[str, jax.Array], config: LoraConfig) -> jax.Array:
    """W + s·A·B (or DoRA's m·V/‖V‖_c) in W's shape and the promoted dtype of (W, A)."""
    v = _merged_matrix(w, adapter, config)  # [(L,) in, out]
    if config.dora:
        v = v * _dora_scale(v, adapter[MAGNITUDE], config).astype(v.dtype)[..., None, :]
    return jnp.reshape(v, w.shape)


def _split_adapters(
    adapters: Adapters,
) -> tuple[dict[tuple[str, ...], dict[str, jax.Array]], dict[tuple[str, ...], jax.Array]]:
    """(LoRA adapters by module path {"lora_a", "lora_b"(, "magnitude")}, fully trained copies by
    leaf path): a leaf named "lora_a"/"lora_b"/"magnitude" belongs to the adapter of the module
    above it, any other leaf is the full copy of the base leaf at its path."""
    modules: dict[tuple[str, ...], dict[str, jax.Array]] = {}
    full: dict[tuple[str, ...], jax.Array] = {}
    for path, leaf in traverse_util.flatten_dict(adapters).items():
        if path[-1] in _LORA_KEYS:
            modules.setdefault(path[:-1], {})[path[-1]] = leaf
        else:
            full[path] = leaf
    return modules, full


def _adapter_modules(adapters: Adapters) -> dict[tuple[str, ...], dict[str, jax.Array]]:
    """The LoRA adapters by module path (fully trained copies left out; see `_split_adapters`)."""
    return _split_adapters(adapters)[0]


def _checked_adapters(
    flat_params: Mapping[tuple[str, ...], jax.Array], adapters: Adapters, config: LoraConfig
) -> tuple[dict[tuple[str, ...], dict[str, jax.Array]], dict[tuple[str, ...], jax.Array]]:
    """`_split_adapters`, after checking each part against the params and the config.

    Raises:
      KeyError: an adapter names a module without a kernel in the params, or a full copy a leaf
        the params lack.
      ValueError: DoRA config but an adapter without a magnitude (or the reverse); a kernel with
        both an adapter and a full copy; a full copy whose shape differs from its base leaf's, or
        whose dtype is not floating or narrower than the base's (`init_lora` makes it the base's
        dtype, or `param_dtype` where that is wider).
    """
    modules, full = _split_adapters(adapters)
    for module, adapter in modules.items():
        if module + ("kernel",) not in flat_params:
            raise KeyError(f"adapter for {_path_str(module)!r}: params have no such kernel")
        if (MAGNITUDE in adapter) != config.dora:
            raise ValueError(
                f"adapter {_path_str(module)!r}: LoraConfig.dora={config.dora} but the adapter "
                f"{'has' if MAGNITUDE in adapter else 'lacks'} a magnitude"
            )
        if module + ("kernel",) in full:
            raise ValueError(
                f"adapters hold both a LoRA adapter and a full copy of "
                f"{_path_str(module + ('kernel',))!r}; a kernel is adapted or trained in full, not both"
            )
    for path, copy in full.items():
        if path not in flat_params:
            raise KeyError(f"fully trained leaf {_path_str(path)!r} in the adapters: params have no such leaf")
        base = flat_params[path]
        if copy.shape != base.shape:
            raise ValueError(
                f"fully trained leaf {_path_str(path)!r}: shape {copy.shape} in the adapters, "
                f"{base.shape} in the params"
            )
        if not jnp.issubdtype(copy.dtype, jnp.inexact) or jnp.promote_types(base.dtype, copy.dtype) != copy.dtype:
            raise ValueError(
                f"fully trained leaf {_path_str(path)!r}: dtype {copy.dtype} in the adapters, "
                f"{base.dtype} in the params (the copy must be the base's dtype or a wider float)"
            )
    return modules, full


def _checked_modules(
    flat_params: Mapping[tuple[str, ...], jax.Array], adapters: Adapters, config: LoraConfig
) -> dict[tuple[str, ...], dict[str, jax.Array]]:
    """The LoRA adapters by module path, after checking the whole adapter tree against the params
    and the config (`_checked_adapters`)."""
    return _checked_adapters(flat_params, adapters, config)[0]


def apply_lora(params: Params, adapters: Adapters, config: LoraConfig) -> Params:
    """Effective parameters: every adapted kernel replaced by W + (α/r)·A·B (or the DoRA weight),
    every fully trained leaf by its copy in the adapters (PEFT's `modules_to_save`).

    Pure and jit-able; call it inside the loss so that gradients reach the adapters only:
    `forward(apply_lora(base, adapters, cfg), model_cfg, tokens)`. The full copies are used as
    they are (the same arrays, in their own dtype), so the gradient of a copy is the gradient the
    base leaf would get in full fine-tuning. Leaves with neither are passed through unchanged (the
    same arrays). `config.dropout` plays no part here (see `make_lora_loss_fn`).

    Args:
      params: base parameter pytree (nested dicts, as from `init_params` / `load_hf_checkpoint`).
      adapters: from `init_lora` (or a trained/restored copy).
      config: the `LoraConfig` the adapters were made with.

    Raises:
      KeyError: an adapter names a module without a kernel in `params`, or a full copy a leaf
        that `params` lacks.
      ValueError: DoRA config but adapters without magnitudes (or the reverse); a kernel with both
        an adapter and a full copy; a full copy of another shape than its base leaf, or of a
        non-float or narrower dtype.
    """
    flat = traverse_util.flatten_dict(params)
    modules, full = _checked_adapters(flat, adapters, config)
    for module, adapter in modules.items():
        key = module + ("kernel",)
        flat[key] = _effective_kernel(flat[key], adapter, config)
    flat.update(full)
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
        if STACKED_LAYERS in module.path:
            # a scanned body is traced once for all L layers: a key from the counter would give
            # every layer the same masks; the module's "dropout" stream is split per layer
            if not module.has_rng("dropout"):
                raise ValueError(
                    f"LoRA dropout in the stacked layers ({'/'.join(module.path)}) needs the model "
                    "applied with a dropout rng (forward(..., dropout_rng=key))"
                )
            key = jax.random.fold_in(module.make_rng("dropout"), 1)
        else:
            key = jax.random.fold_in(rng, next(calls))
        return y + _unmerged_delta(args[0], params, tuple(module.path), config, key).astype(y.dtype)

    return interceptor


def _adapters_beside_kernels(params: Params, adapters: Adapters, config: LoraConfig) -> Params:
    """The base params with each module's adapter leaves added next to its kernel, and each fully
    trained leaf replaced by its copy (which the model then reads, as in `apply_lora`)."""
    flat = traverse_util.flatten_dict(params)
    modules, full = _checked_adapters(flat, adapters, config)
    for module, adapter in modules.items():
        flat.update({module + (name,): leaf for name, leaf in adapter.items()})
    flat.update(full)
    return traverse_util.unflatten_dict(flat)


def merge_lora(params: Params, adapters: Adapters, config: LoraConfig) -> Params:
    """`apply_lora` materialised in the base dtypes: a plain parameter tree for inference/export.

    Adapted kernels become W' and fully trained leaves their trained copies, each cast to the
    dtype of the base leaf it replaces (a float32 copy of a bfloat16 head is rounded to bfloat16).
    """
    merged = apply_lora(params, adapters, config)
    return jax.tree.map(lambda new, old: new.astype(old.dtype), merged, params)


def unmerge_lora(
    merged: Params, adapters: Adapters, config: LoraConfig, *, strict: bool = False
) -> Params:
    """Recovers the base from LoRA-merged params: W = W' - (α/r)·A·B (up to float rounding).

    Fully trained leaves (`LoraConfig.trainable`) cannot be recovered: the merged tree holds their
    trained values and the adapters hold the same values, so nothing records the base's. By
    default they are returned as they are in `merged`, i.e. trained. That is what resuming needs
    (`apply_lora` replaces those leaves by the adapters' copies anyway, so `apply_lora(unmerged,
    adapters)` is the merged model again, up to rounding), and a typical trained-in-full leaf, a reward/value
    head, is a fresh initialisation nobody needs back. It is not the base there: do not use the
    result as a reference model for those leaves. `strict=True` raises instead.

    Args:
      merged: `merge_lora(base, adapters, config)` (or params merged the same way).
      adapters: the adapters that were merged.
      config: their `LoraConfig`.
      strict: raise ValueError if the adapters hold fully trained leaves, i.e. if the result would
        not be the base everywhere.

    Raises:
      ValueError: for DoRA, which cannot be undone from (W', adapters): W' fixes only the
        direction of each column of V = W + s·A·B, not its length ‖V‖_c, so W is not determined.
        Keep the base. With `strict`, adapters holding fully trained leaves (named in the message).
    """
    if config.dora:
        raise ValueError("unmerge_lora: DoRA merges are not invertible; keep the base params")
    modules, full = _split_adapters(adapters)
    if strict and full:
        names = sorted(_path_str(path) for path in full)
        raise ValueError(
            f"unmerge_lora(strict=True): the fully trained leaves {names[:4]}"
            f"{f' (and {len(names) - 4} more)' if len(names) > 4 else ''} keep no record of "
            "their base values; keep the base params"
        )
    flat = traverse_util.flatten_dict(merged)
    for module, adapter in modules.items():
        key = module + ("kernel",)
        w = flat[key]
        a, b = adapter[LORA_A], adapter[LORA_B]
        dtype = jnp.result_type(w.dtype, a.dtype)
        v = jnp.reshape(w, (*a.shape[:-1], b.shape[-1])).astype(dtype)
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
    from `fold_in(dropout_rng, 1)`, apart from the model's own dropout stream. Fully trained leaves
    (`LoraConfig.trainable`) are replaced by the adapters' copies on both paths. Params without
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
    """Pytree of bools over an adapter tree: True on lora_a / lora_b, False on DoRA magnitudes;
    on a fully trained copy, what `jaxalign.optim.weight_decay_mask` gives that leaf in full
    fine-tuning (True on a "kernel", e.g. a reward head's; False on biases, norm scales and
    embeddings).

    Use with optax directly, e.g. `optax.adamw(schedule, weight_decay=0.01,
    mask=lora_weight_decay_mask)`, or through `make_lora_optimizer`. (`jaxalign.optim`'s
    `weight_decay_mask` decays leaves named "kernel" only, i.e. no LoRA leaf.)
    """

    def decays(path, leaf) -> bool:
        del leaf
        return str(getattr(path[-1], "key", path[-1])) in (LORA_A, LORA_B)

    lora = jax.tree_util.tree_map_with_path(decays, adapters)
    return jax.tree.map(lambda a, b: a or b, lora, weight_decay_mask(adapters))


def make_lora_optimizer(config: OptimConfig) -> tuple[optax.GradientTransformation, Callable]:
    """`jaxalign.optim.make_optimizer` with `lora_weight_decay_mask` instead of the kernel mask:
    clip_by_global_norm -> adamw(warmup-cosine, decay on lora_a/lora_b and fully trained
    kernels), in MultiSteps if `config.grad_accum_steps > 1`. The optimizer state has exactly the
    same leaves.

    Args:
      config: the optimiser hyperparameters (`weight_decay` applies to lora_a, lora_b and fully
        trained leaves named "kernel").
    """
    return make_optimizer(config, decay_mask=lora_weight_decay_mask)


def num_lora_params(adapters: Adapters) -> int:
    """Number of trainable values in an adapter tree: the LoRA/DoRA leaves plus the fully
    trained copies (`LoraConfig.trainable`)."""
    return sum(x.size for x in jax.tree.leaves(adapters))
