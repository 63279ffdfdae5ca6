"""Prefix-tuning as a pre-filled KV cache (Li & Liang 2021, arXiv 2101.00190).

A frozen language model gets P trainable "virtual tokens" in front of every input: at every
layer l, attention runs over keys [P^K_l; W_K·x] and values [P^V_l; W_V·x], where the prefix
keys and values P^K_l, P^V_l [P, K, H] are free parameters (the paper's Eq. 3: the activations
h_i at a prefix position are P_θ[i, :], not computed by the model). Real tokens attend to all P
prefix slots and causally to each other; the prefix slots attend to nothing (they are constants).
Optimising P_θ directly was unstable in the paper, so it is reparameterised (§4.3) as
P_θ[i, :] = MLP_θ(P'_θ[i, :]) with a smaller table P'_θ and a two-layer MLP; after training the
MLP is dropped and only P_θ kept (`merge_prefix`).

Layout: PEFT's (`peft 0.21.2`, `tuners/prefix_tuning/model.py:PrefixEncoder` and
`PeftModel.get_prompt`), against which the logits are tested. With d = K·H (the key/value width:
PEFT's `token_dim`, head_dim·num_key_value_heads for grouped-query models, peft#1901):

* direct (`PrefixConfig(projection=False)`, PEFT's default): {"embedding": [P, 2·L·d]};
* projection (PEFT's `prefix_projection=True`): {"embedding": [P, d], "transform_0": {"kernel":
  [d, E], "bias": [E]}, "transform_2": {"kernel": [E, 2·L·d], "bias": [2·L·d]}}, evaluated as
  tanh(embedding·W₀ + b₀)·W₂ + b₂ (PEFT's `transform` = Linear→Tanh→Linear; E =
  `encoder_hidden_size`, default d; kernels are torch's `weight.T`).

Row i of the [P, 2·L·d] result splits as [2L, K, H]: rows 2l and 2l+1 are layer l's key and
value of virtual token i (flat index ((2l + kv)·K + k)·H + h). The keys are used raw: the prefix
slots are never rotated by RoPE (PEFT writes them into HF's `DynamicCache` as they are).

How it runs. The prefix IS a pre-filled `KVCache`: `prefix_cache` fills slots 0..P-1 (positions
0..P-1, `length` = P) and leaves room for the real tokens, which the model's cached path then
writes after them and masks by position (key k visible to query q iff 0 <= pos_k <= pos_q), so
every real token sees the whole prefix, padding (position -1) is never seen and real tokens stay
causal. Real tokens sit at positions P, P+1, ... (`prefix_positions`): what PEFT and transformers
give them (HF derives positions from the cache length; PEFT adds P to explicit `position_ids`;
HF's `generate` counts the prefix's P ones in the attention mask). Left padding keeps the
counting of real tokens only, as everywhere in jaxalign. Teacher-forced passes (`prefix_forward`,
and every loss under `make_prefix_loss_fn`) go through that same cached path, so training, scoring
and cached decoding compute the same function; gradients reach the prefix through the cache
buffers.

Training. As with LoRA (`jaxalign.lora.make_lora_loss_fn`), the train state holds only the
prefix tree and the frozen base is an extra, non-donated step argument
(`make_train_step(..., prefix=PrefixConfig(...))`); the base *is* the reference model of
DPO/GRPO (prefix off), so no copy of the weights is made, and checkpoints of the state are
prefix-sized. `make_prefix_loss_fn` makes any loss that calls `jaxalign.models.forward` on its
params (SFT, DPO, GRPO, distillation) run with the prefix: the policy's params carry the prefix
tree under the key `PREFIX_PARAMS`, and a flax method interceptor (`flax.linen.intercept_methods`,
as LoRA's dropout path) turns each cache-less `Transformer` call on such params into a call with
the prefix cache. Params without that key (a reference passed in `extra`) run the plain model.

Not the identity at zero. Unlike LoRA's B = 0, no prefix leaves the model unchanged: zero prefix
values still take softmax weight e^(q·0) = 1 per slot from every query, diluting attention over
the real tokens. PEFT's `init_weights="zero"` ("activations will be a no-op") is therefore not a
no-op either; `PrefixConfig(init="zero")` reproduces it.

Limits: models with sliding-window layers are refused (a rolling buffer would evict the prefix
and a window would hide it from far tokens); the prefix applies to a plain `Transformer` policy
(a reward model's or critic's backbone under `jaxalign.models.heads` is not wrapped). Cached
decoding with the prefix is `prefix_cache` + `forward_with_cache` with `prefix_positions`
(`jaxalign.decoding.generate` allocates its own empty cache).

Shapes: B batch, T tokens, P virtual tokens, L layers, K key/value heads, H head size, d = K·H,
E projection width, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxalign.models.config import TransformerConfig
from jaxalign.models.transformer import KVCache, Transformer, forward_with_cache

Prefix = dict

# Key under which `make_prefix_loss_fn` puts the prefix tree beside the base params: the mark of
# the policy's params (a reference model's params lack it and run without the prefix).
PREFIX_PARAMS = "prefix_tuning"


@dataclasses.dataclass(frozen=True)
class PrefixConfig:
    """The prefix: its length and parameterisation (PEFT's `PrefixTuningConfig`).

    Attributes:
      num_virtual_tokens: P >= 1 (the paper: 10 for table-to-text, 200 for summarisation).
      projection: reparameterise through the two-layer tanh MLP (PEFT's `prefix_projection`,
        the paper's §4.3); False trains P_θ [P, 2·L·d] directly (PEFT's default).
      projection_hidden: E, the MLP's hidden width (PEFT's `encoder_hidden_size`); None means
        d = K·H, PEFT's default. Only with `projection`.
      init: "random" as PEFT (and torch) initialise: embedding N(0, 1), Linear weights and biases
        U(-1/√fan_in, 1/√fan_in); "zero" as PEFT's `init_weights="zero"`: the last layer (or,
        direct, the embedding) is zero, i.e. all prefix keys and values are 0, which is NOT the
        base model (see the module docstring).
      param_dtype: dtype of the prefix leaves (float32 keeps Adam updates exact).

    Raises:
      ValueError: num_virtual_tokens < 1, projection_hidden < 1 or set without projection, init
        not "random"/"zero".
    """

    num_virtual_tokens: int
    projection: bool = False
    projection_hidden: int | None = None
    init: Literal["random", "zero"] = "random"
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.num_virtual_tokens < 1:
            raise ValueError(f"PrefixConfig.num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        if self.projection_hidden is not None and not self.projection:
            raise ValueError("PrefixConfig.projection_hidden is set but projection=False")
        if self.projection_hidden is not None and self.projection_hidden < 1:
            raise ValueError(f"PrefixConfig.projection_hidden must be >= 1, got {self.projection_hidden}")
        if self.init not in ("random", "zero"):
            raise ValueError(f"PrefixConfig.init must be 'random' or 'zero', got {self.init!r}")

    def merged(self) -> PrefixConfig:
        """The config of `merge_prefix`'s output: the same prefix, stored directly."""
        return dataclasses.replace(self, projection=False, projection_hidden=None)


def _kv_width(config: TransformerConfig) -> int:
    """d = K·H, the width of one layer's keys (or values) per virtual token."""
    return config.kv_heads * config.head_dim


def _check_model(config: TransformerConfig) -> None:
    """Raises ValueError for models whose attention cannot keep a prefix in view."""
    windows = [i for i in range(config.n_layers) if config.layer_window(i) is not None]
    if windows:
        raise ValueError(
            f"prefix-tuning needs global attention in every layer; layers {windows} slide over a "
            f"window of {config.sliding_window} (a rolling cache would evict the prefix)"
        )


def prefix_shapes(config: TransformerConfig, prefix_config: PrefixConfig) -> Prefix:
    """The prefix tree's leaf shapes (tuples), as `init_prefix` builds it (see the module
    docstring for the layout).

    Raises:
      ValueError: the model has sliding-window layers.
    """
    _check_model(config)
    p, d = prefix_config.num_virtual_tokens, _kv_width(config)
    out = 2 * config.n_layers * d
    if not prefix_config.projection:
        return {"embedding": (p, out)}
    e = prefix_config.projection_hidden or d
    return {
        "embedding": (p, d),
        "transform_0": {"kernel": (d, e), "bias": (e,)},
        "transform_2": {"kernel": (e, out), "bias": (out,)},
    }


def init_prefix(config: TransformerConfig, prefix_config: PrefixConfig, rng: jax.Array) -> Prefix:
    """A fresh prefix tree for `config` (PEFT's `PrefixEncoder` initialisation).

    Args:
      config: the (frozen) model the prefix is for.
      prefix_config: length, parameterisation and initialisation.
      rng: a `jax.random.key`.

    Returns:
      direct: {"embedding": [P, 2·L·d]}; projection: {"embedding": [P, d], "transform_0":
      {"kernel": [d, E], "bias": [E]}, "transform_2": {"kernel": [E, 2·L·d], "bias": [2·L·d]}}; in
      `prefix_config.param_dtype`. Embedding N(0, 1), Linear leaves U(-1/√fan_in, 1/√fan_in)
      (torch's defaults, which PEFT keeps); with init="zero" the last layer is zero.

    Raises:
      ValueError: the model has sliding-window layers.
    """
    shapes = prefix_shapes(config, prefix_config)
    dtype = prefix_config.param_dtype
    k_emb, k0w, k0b, k2w, k2b = jax.random.split(rng, 5)
    zero_last = prefix_config.init == "zero"
    if not prefix_config.projection:
        shape = shapes["embedding"]
        emb = jnp.zeros(shape, dtype) if zero_last else jax.random.normal(k_emb, shape, dtype)
        return {"embedding": emb}

    def linear(kw, kb, kernel_shape, zero):
        if zero:
            return {"kernel": jnp.zeros(kernel_shape, dtype), "bias": jnp.zeros(kernel_shape[1:], dtype)}
        bound = 1.0 / math.sqrt(kernel_shape[0])
        return {
            "kernel": jax.random.uniform(kw, kernel_shape, dtype, -bound, bound),
            "bias": jax.random.uniform(kb, kernel_shape[1:], dtype, -bound, bound),
        }

    return {
        "embedding": jax.random.normal(k_emb, shapes["embedding"], dtype),
        "transform_0": linear(k0w, k0b, shapes["transform_0"]["kernel"], False),
        "transform_2": linear(k2w, k2b, shapes["transform_2"]["kernel"], zero_last),
    }


def _check_prefix(prefix: Mapping, config: TransformerConfig, prefix_config: PrefixConfig) -> None:
    """Raises ValueError when the tree does not have `prefix_shapes`' structure and shapes."""
    want = prefix_shapes(config, prefix_config)
    got = jax.tree.map(lambda x: tuple(x.shape), dict(prefix))
    if got != want:
        merged = prefix_config.projection and "transform_0" not in prefix
        hint = " (after merge_prefix, use prefix_config.merged())" if merged else ""
        raise ValueError(
            f"prefix tree {got} does not match PrefixConfig(num_virtual_tokens="
            f"{prefix_config.num_virtual_tokens}, projection={prefix_config.projection}) for this "
            f"model, which needs {want}{hint}"
        )


def reparameterise(prefix: Prefix, config: TransformerConfig, prefix_config: PrefixConfig) -> jax.Array:
    """P_θ [P, 2·L·d]: every layer's prefix keys and values, flat (PEFT's `PrefixEncoder`
    output for one row; the paper's P_θ[i, :] = MLP_θ(P'_θ[i, :]), §4.3).

    Direct: the embedding itself. Projection: tanh(P'·W₀ + b₀)·W₂ + b₂, matmuls at HIGHEST
    precision, in the prefix dtype.

    Raises:
      ValueError: the tree does not match `prefix_config` and `config`; sliding-window layers.
    """
    _check_prefix(prefix, config, prefix_config)
    if not prefix_config.projection:
        return prefix["embedding"]
    highest = jax.lax.Precision.HIGHEST
    first, last = prefix["transform_0"], prefix["transform_2"]
    hidden = jnp.tanh(jnp.matmul(prefix["embedding"], first["kernel"], precision=highest) + first["bias"])  # [P,E]
    return jnp.matmul(hidden, last["kernel"], precision=highest) + last["bias"]  # [P,2Ld]


def merge_prefix(prefix: Prefix, config: TransformerConfig, prefix_config: PrefixConfig) -> Prefix:
    """The trained prefix for inference, the MLP dropped (the paper's §4.3): {"embedding": P_θ
    [P, 2·L·d]}, the direct layout, to use with `prefix_config.merged()`. It gives the same
    keys and values as `prefix` (evaluated once here instead of in every call). A direct prefix is
    returned as it is."""
    return {"embedding": reparameterise(prefix, config, prefix_config)}


def prefix_kv(
    prefix: Prefix, config: TransformerConfig, prefix_config: PrefixConfig
) -> tuple[jax.Array, jax.Array]:
    """Per-layer prefix keys and values, each [L, P, K, H] in the prefix dtype: row 2l of
    `reparameterise`'s [P, 2L, K, H] view is layer l's key, row 2l + 1 its value (PEFT's
    `get_prompt`: view [B, P, 2L, K, H], permute to [2L, B, K, P, H], split in pairs).

    Raises:
      ValueError: as `reparameterise`.
    """
    flat = reparameterise(prefix, config, prefix_config)  # [P,2Ld]
    p = prefix_config.num_virtual_tokens
    kv = flat.reshape(p, config.n_layers, 2, config.kv_heads, config.head_dim)  # [P,L,2,K,H]
    kv = jnp.transpose(kv, (2, 1, 0, 3, 4))  # [2,L,P,K,H]
    return kv[0], kv[1]


def prefix_cache(
    prefix: Prefix, config: TransformerConfig, prefix_config: PrefixConfig, batch: int, max_len: int
) -> KVCache:
    """A `KVCache` of P + max_len slots whose first P hold the prefix, ready for `max_len` real
    tokens (`forward_with_cache` with `prefix_positions`).

    Args:
      prefix: the prefix tree (`init_prefix`, trained, or `merge_prefix`).
      config: the model.
      prefix_config: the prefix's config.
      batch: B, rows (every row gets the same prefix).
      max_len: real tokens the cache must hold (prompt + new tokens for decoding).

    Returns:
      `KVCache`: keys/values per layer [B, P + max_len, K, H] in `config.dtype`, slots 0..P-1
      holding the prefix (differentiable in it), the rest zero; positions int32 [B, P + max_len],
      0..P-1 then -1 (empty); length P.

    Raises:
      ValueError: P + max_len > config.max_seq_len; as `reparameterise`.
    """
    p = prefix_config.num_virtual_tokens
    if p + max_len > config.max_seq_len:
        raise ValueError(
            f"{p} virtual tokens + {max_len} tokens exceed the model's context of {config.max_seq_len} "
            "(config.max_seq_len): real tokens sit at positions P, P+1, ..."
        )
    keys, values = prefix_kv(prefix, config, prefix_config)  # [L,P,K,H]
    shape = (batch, p, config.kv_heads, config.head_dim)
    empty = jnp.zeros((batch, max_len, config.kv_heads, config.head_dim), config.dtype)

    def fill(x):  # [P,K,H] -> [B,P+max_len,K,H]
        return jnp.concatenate([jnp.broadcast_to(x.astype(config.dtype), shape), empty], axis=1)

    positions = jnp.concatenate([jnp.arange(p, dtype=jnp.int32), jnp.full((max_len,), -1, jnp.int32)])
    return KVCache(
        keys=tuple(fill(k) for k in keys),
        values=tuple(fill(v) for v in values),
        positions=jnp.broadcast_to(positions, (batch, p + max_len)),
        length=jnp.asarray(p, jnp.int32),
    )


def prefix_positions(positions: jax.Array, prefix_config: PrefixConfig) -> jax.Array:
    """Positions of real tokens behind the prefix: pos + P, and -1 (padding) kept.

    Args:
      positions: int [B, T], 0, 1, ... over real tokens, -1 on padding (`prompt_positions`).
      prefix_config: the prefix (P = `num_virtual_tokens`).

    Returns:
      int32 [B, T].
    """
    positions = positions.astype(jnp.int32)
    return jnp.where(positions >= 0, positions + prefix_config.num_virtual_tokens, -1)


def _cached_call(module, next_fun, args, kwargs, prefix, prefix_config):
    """`Transformer.__call__(tokens, positions, ...)` run over the prefix cache (see
    `make_prefix_loss_fn`); returns (output, None[, router stats]) as a cache-less call does."""
    tokens, *rest = args
    positions = rest[0] if rest else kwargs.pop("positions", None)
    if kwargs.pop("cache", None) is not None:
        raise ValueError(
            "a cached Transformer call on prefix-tuned params inside a prefix loss: decode with "
            "prefix_cache(...) and the base params instead"
        )
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = prefix_cache(prefix, module.config, prefix_config, b, t)
    out, _, *router_stats = next_fun(tokens, prefix_positions(positions, prefix_config), cache=cache, **kwargs)
    return (out, None, *router_stats)


def _prefix_interceptor(prefix_config: PrefixConfig) -> Callable:
    """A `flax.linen.intercept_methods` interceptor running every cache-less `Transformer` call
    whose params hold `PREFIX_PARAMS` over the prefix cache."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, Transformer):
            return next_fun(*args, **kwargs)
        params = module.variables.get("params", {})
        if PREFIX_PARAMS not in params:
            return next_fun(*args, **kwargs)
        return _cached_call(module, next_fun, args, dict(kwargs), params[PREFIX_PARAMS], prefix_config)

    return interceptor


def prefix_forward(
    params,
    prefix: Prefix,
    config: TransformerConfig,
    prefix_config: PrefixConfig,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    *,
    dropout_rng: jax.Array | None = None,
    return_hidden: bool = False,
) -> jax.Array:
    """Teacher-forced pass of the prefix-tuned model: `forward_with_cache` of the base over the
    prefix cache (`prefix_cache(..., max_len=T)`), real tokens at `prefix_positions`.

    Args:
      params: the frozen base.
      prefix: the prefix tree.
      config, prefix_config: the model and the prefix.
      tokens: int32 [B, T].
      positions: optional int32 [B, T], 0.. over real tokens, -1 on (left) padding (default
        0..T-1 in every row).
      dropout_rng: a key enables the model's dropout; None is deterministic.
      return_hidden: return the final hidden states [B, T, D] instead of logits.

    Returns:
      logits [B, T, V] in `config.dtype` (or hidden states [B, T, D]).

    Raises:
      ValueError: P + T > config.max_seq_len; as `reparameterise`.
    """
    chex.assert_rank(tokens, 2)
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = prefix_cache(prefix, config, prefix_config, b, t)
    out, _ = forward_with_cache(
        params, config, tokens, cache, prefix_positions(positions, prefix_config),
        dropout_rng=dropout_rng, return_hidden=return_hidden,
    )
    return out


def make_prefix_loss_fn(loss_fn: Callable, prefix_config: PrefixConfig) -> Callable:
    """Turns `loss_fn(params, batch, dropout_rng, *extra)` into
    `prefix_loss_fn(prefix, batch, dropout_rng, base, *extra)`, which trains the prefix only.

    The new loss calls `loss_fn({**base, PREFIX_PARAMS: prefix}, batch, dropout_rng, *extra)`
    under a flax method interceptor: every cache-less `Transformer` call on params holding
    `PREFIX_PARAMS` (each `jaxalign.models.forward` of the policy) runs over
    `prefix_cache(prefix, ...)` with its positions shifted by P, i.e. it computes
    `prefix_forward(base, prefix, ...)`. Params without the key (e.g. a DPO reference passed in
    `extra`; pass the base: it is the reference) run the plain model. With
    `jaxalign.trainers.make_train_step(prefix_loss_fn, tx, schedule)` (or `make_train_step(loss_fn,
    ..., prefix=prefix_config)`), build the state with `create_train_state(prefix, tx, seed)` and
    call `step(state, batch, base)` (`step(state, batch, base, base)` for DPO). The base is an
    ordinary, non-donated argument: not baked into the program, and unchanged by the step.

    Args:
      loss_fn: the full-model loss (it must reach the model through `forward` on its params).
      prefix_config: the prefix's config (the model's comes from the `Transformer` called).
    """

    def prefix_loss_fn(prefix, batch, dropout_rng, base, *extra):
        with nn.intercept_methods(_prefix_interceptor(prefix_config)):
            return loss_fn({**base, PREFIX_PARAMS: prefix}, batch, dropout_rng, *extra)

    return prefix_loss_fn


def num_prefix_params(prefix: Prefix) -> int:
    """Number of trainable values in a prefix tree."""
    return sum(x.size for x in jax.tree.leaves(prefix))


__all__ = [
    "PREFIX_PARAMS",
    "PrefixConfig",
    "init_prefix",
    "make_prefix_loss_fn",
    "merge_prefix",
    "num_prefix_params",
    "prefix_cache",
    "prefix_forward",
    "prefix_kv",
    "prefix_positions",
    "prefix_shapes",
    "reparameterise",
]
