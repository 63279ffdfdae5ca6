"""Sparse upcycling: a dense SwiGLU Transformer turned into a Mixture-of-Experts one.

Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints"
(arXiv 2212.05055) §3: in each chosen layer the dense FFN is replaced by an MoE layer whose E
experts all start as copies of that FFN, with a freshly initialised router; everything else
(attention, norms, embeddings) is kept. The routing here is Mixtral's (arXiv 2401.04088; HF
`MixtralTopKRouter`): p = softmax(x·W_r), I = topk(p, k), g = p_I / Σ_I p.

Why the copies keep the function: in an upcycled layer every expert is FFN_e = FFN (noise 0), so

    y(x) = Σ_{i ∈ I(x)} g_i(x) · FFN_i(x) = (Σ_{i ∈ I(x)} g_i(x)) · FFN(x) = FFN(x),

because the renormalised weights sum to 1, whatever the router's weights. The upcycled model
therefore computes the dense model's logits (up to float rounding) at any router init, and
training starts from the pretrained function.

Symmetry breaking. With exact copies the experts receive different gradients only through the
tokens the router sends them. `noise_std` > 0 adds independent Gaussian noise to each expert's
copy of each kernel, scaled to that kernel's spread:

    W_e = W + noise_std · std(W) · ε_e,   ε_e ~ N(0, 1) i.i.d. per entry, per expert,

where std(W) is the standard deviation of the dense kernel's entries (one scalar per kernel and
layer), so noise_std is relative and the same value means the same perturbation for the gate, up
and down kernels whatever their init scale. (The paper copies exactly; Drop-Upcycling, arXiv
2502.19261, breaks the symmetry instead by re-initialising a random part of each copy.) With
exact copies the router gets no task gradient at all (y = (Σ g)·FFN, so ∂y/∂router = 0) until
the experts' own updates, which differ by the tokens routed to each, have pulled them apart.

The router kernel W_r [D, E] is drawn from N(0, router_std²) in float32. A small std keeps the
router logits near 0 at the start, so the routing probabilities are near uniform and no expert
is starved before the router has learnt anything (the paper's and Mixtral's router init is a
standard small normal; HF's `initializer_range` is 0.02, the default here).

Parameter layout (`jaxalign.models.moe`): a dense layer's
  params["layers_i"]["mlp"] = {"gate": {"kernel": [D, F]}, "up": {"kernel": [D, F]}, "down": {"kernel": [F, D]}}
becomes in an upcycled layer
  params["layers_i"]["moe"] = {"router": {"kernel": float32 [D, E]}, "gate": {"kernel": [E, D, F]},
                               "up": {"kernel": [E, D, F]}, "down": {"kernel": [E, F, D]}}
with the expert kernels in the dense kernels' dtype. Scanned models (`scan_layers=True`,
params["layers"] with [L, ...] leaves) are supported when every layer is upcycled (a scan needs
identical layers): they are unstacked, upcycled and stacked again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxalign.models.config import TransformerConfig
from jaxalign.models.moe import MoEConfig
from jaxalign.models.transformer import stack_layers, unstack_layers

ROUTER_INIT_STD = 0.02
"""Default std of the fresh router kernel (HF Mixtral's `initializer_range`)."""

_KERNELS = ("gate", "up", "down")


def _check(config: TransformerConfig, num_experts: int, top_k: int, noise_std: float, router_std: float,
           layers: Sequence[int] | None) -> tuple[int, ...] | None:
    """Validates the arguments of `upcycle_to_moe`; returns `layers` as a sorted tuple (or None)."""
    if config.moe is not None:
        raise ValueError(
            f"upcycle_to_moe: the model is already MoE (config.moe={config.moe}, moe_layers="
            f"{config.moe_layers}); upcycling copies a dense FFN"
        )
    if config.mlp != "swiglu":
        raise ValueError(
            f"upcycle_to_moe: family {config.family!r} has a {config.mlp!r} MLP; the MoE experts are "
            "SwiGLU FFNs (family 'llama'), so only a SwiGLU MLP can be copied into them"
        )
    for name, value in (("num_experts", num_experts), ("top_k", top_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"upcycle_to_moe: {name} must be a positive int, got {value!r}")
    if top_k > num_experts:
        raise ValueError(f"upcycle_to_moe: top_k={top_k} exceeds num_experts={num_experts}")
    if not noise_std >= 0:
        raise ValueError(f"upcycle_to_moe: noise_std must be >= 0, got {noise_std!r}")
    if not router_std >= 0:
        raise ValueError(f"upcycle_to_moe: router_std must be >= 0, got {router_std!r}")
    if layers is None:
        return None
    chosen = tuple(int(i) for i in layers)
    if not chosen or list(chosen) != sorted(set(chosen)) or not all(0 <= i < config.n_layers for i in chosen):
        raise ValueError(
            f"upcycle_to_moe: layers={tuple(layers)} must be non-empty, sorted, distinct and in "
            f"[0, n_layers={config.n_layers})"
        )
    if config.scan_layers and len(chosen) != config.n_layers:
        raise ValueError(
            f"upcycle_to_moe: layers={chosen} upcycles {len(chosen)} of the {config.n_layers} layers of a "
            "scan_layers model, whose layers must stay identical; upcycle every layer (layers=None) or "
            "unstack_layers first and upcycle the unrolled model"
        )
    return None if len(chosen) == config.n_layers else chosen


def upcycle_ffn(mlp: dict, *, num_experts: int, noise_std: float, router_std: float, rng: jax.Array) -> dict:
    """One layer's dense SwiGLU FFN params as upcycled MoE params (see the module docstring).

    Args:
      mlp: {"gate": {"kernel": [D, F]}, "up": {"kernel": [D, F]}, "down": {"kernel": [F, D]}}.
      num_experts: E copies.
      noise_std: relative noise, W_e = W + noise_std · std(W) · ε_e.
      router_std: std of the fresh float32 router kernel [D, E].
      rng: PRNG key (4 streams: router, gate, up, down).

    Returns:
      {"router": {"kernel": float32 [D, E]}, "gate"/"up": {"kernel": [E, D, F]},
       "down": {"kernel": [E, F, D]}}, the expert kernels in the dense kernels' dtype.

    Raises:
      ValueError: `mlp` has other entries than the three bias-free kernels, or kernels whose
        shapes are not [D, F], [D, F], [F, D].
    """
    if set(mlp) != set(_KERNELS) or any(set(mlp[name]) != {"kernel"} for name in _KERNELS):
        raise ValueError(
            "upcycle_ffn: expected a bias-free SwiGLU MLP {gate, up, down}/kernel, got "
            f"{ {name: sorted(sub) if isinstance(sub, dict) else type(sub).__name__ for name, sub in mlp.items()} }"
        )
    gate, up, down = (mlp[name]["kernel"] for name in _KERNELS)
    d, f = gate.shape
    if up.shape != (d, f) or down.shape != (f, d):
        raise ValueError(
            f"upcycle_ffn: kernels gate {gate.shape}, up {up.shape}, down {down.shape} are not [D, F], [D, F], [F, D]"
        )
    k_router, *k_experts = jax.random.split(rng, 1 + len(_KERNELS))
    out = {"router": {"kernel": router_std * jax.random.normal(k_router, (d, num_experts), jnp.float32)}}
    for name, key in zip(_KERNELS, k_experts):
        w = mlp[name]["kernel"]  # [D,F] or [F,D]
        copies = jnp.broadcast_to(w.astype(jnp.float32), (num_experts, *w.shape))  # [E,...]
        spread = jnp.std(w.astype(jnp.float32))  # scalar: this kernel's own scale
        noise = jax.random.normal(key, copies.shape, jnp.float32)  # [E,...]
        # noise_std == 0 must give exact copies (the function-preserving case), not W + 0·ε
        experts = copies + noise_std * spread * noise if noise_std else copies
        out[name] = {"kernel": experts.astype(w.dtype)}
    return out


def upcycle_to_moe(
    params: dict,
    config: TransformerConfig,
    *,
    num_experts: int,
    top_k: int,
    noise_std: float = 0.0,
    rng: jax.Array,
    layers: Sequence[int] | None = None,
    router_std: float = ROUTER_INIT_STD,
) -> tuple[dict, TransformerConfig]:
    """Sparse upcycling (arXiv 2212.05055): the dense model's FFNs copied into Mixtral-style MoE layers.

    Each chosen layer's "mlp" becomes an "moe" of `num_experts` copies of that FFN (plus relative
    Gaussian noise `noise_std`) and a fresh router N(0, router_std²); the routing is softmax →
    top-k → renormalised (`MoEConfig.mixtral`), the expert width F the dense `d_ff`. Other
    parameters are the same arrays. With noise_std = 0 the upcycled model computes the dense
    model's function for any router (the weights of the k copies sum to 1). Pure: `params` is not
    changed. Per-layer keys are `fold_in(rng, layer)`, so a layer's draws do not depend on which
    other layers are upcycled.

    Args:
      params: the dense model's parameters, unrolled (params["layers_i"]) or scanned
        (params["layers"], `config.scan_layers`).
      config: its config: family "llama" (SwiGLU MLP, no biases), no MoE layer.
      num_experts: E experts per upcycled layer.
      top_k: k experts per token.
      noise_std: relative noise of each expert's copy (0: exact copies).
      rng: PRNG key of the router init and the noise.
      layers: indices of the layers to upcycle (sorted, distinct); None = every layer.
      router_std: std of the router kernel init (float32 [D, E]).

    Returns:
      (moe_params, moe_config): the same layout as `params` (unrolled or scanned), and `config`
      with `moe=MoEConfig.mixtral(num_experts=E, experts_per_token=k, moe_d_ff=d_ff)` and
      `moe_layers` (None when every layer is upcycled).

    Raises:
      ValueError: the model already has MoE layers; a non-SwiGLU MLP (GPT-2's GELU, Gemma's
        GeGLU); num_experts or top_k not a positive int, top_k > num_experts; negative noise_std
        or router_std; layers empty, unsorted, repeated or out of range; a subset of the layers
        of a scan_layers model; an "mlp" that is not the bias-free {gate, up, down} kernels.
      KeyError: a chosen layer missing from `params`.
    """
    chosen = _check(config, num_experts, top_k, noise_std, router_std, layers)
    moe = MoEConfig.mixtral(num_experts=num_experts, experts_per_token=top_k, moe_d_ff=config.ff_dim)
    moe_config = dataclasses.replace(config, moe=moe, moe_layers=chosen)
    unrolled = unstack_layers(params, config) if config.scan_layers else params
    out = dict(unrolled)
    for i in moe_config.moe_layer_indices:
        name = f"layers_{i}"
        if name not in unrolled:
            raise KeyError(f"upcycle_to_moe: params have no {name!r} (keys: {sorted(unrolled)})")
        layer = {k: v for k, v in unrolled[name].items() if k != "mlp"}
        if "mlp" not in unrolled[name]:
            raise KeyError(f"upcycle_to_moe: params[{name!r}] has no 'mlp' (keys: {sorted(unrolled[name])})")
        layer["moe"] = upcycle_ffn(unrolled[name]["mlp"], num_experts=num_experts, noise_std=noise_std,
                                   router_std=router_std, rng=jax.random.fold_in(rng, i))
        out[name] = layer
    return (stack_layers(out, moe_config) if config.scan_layers else out), moe_config


__all__ = ["ROUTER_INIT_STD", "upcycle_ffn", "upcycle_to_moe"]
