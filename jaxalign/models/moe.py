"""Mixture-of-Experts feed-forward layer (dropless, top-k routed SwiGLU experts + shared experts).

A self-contained layer that stands where the dense `MLP` stands (`x + moe(ln_2(x))`). Shapes:
B batch, T sequence, N = B·T tokens, D model width, E routed experts, k experts per token,
F expert width (`moe_d_ff`), Fs shared-expert width (`shared_d_ff`), G expert groups.

Token x ∈ ℝ^D, router logits z = x·W_r (float32, as every reference computes them), expert i a
SwiGLU FFN_i(x) = W2_i (silu(W1_i x) ⊙ W3_i x) (Shazeer 2020, arXiv 2002.05202), and

    y = Σ_{i ∈ I(x)} g_i(x) · FFN_i(x)  [+ σ(w_sg·x)] · FFN_shared(x)

with the selection I and weights g of the family (`route`):

  * Mixtral (arXiv 2401.04088; HF `MixtralTopKRouter`): I = topk(softmax(z), k), g = p_I / Σ_I p.
  * Qwen2-MoE / Qwen3-MoE (HF `Qwen2MoeTopKRouter`, `Qwen3MoeTopKRouter`): same I, g = p_I,
    renormalised only with `norm_topk_prob`; Qwen2-MoE adds a shared expert behind a sigmoid gate.
  * DeepSeek-V3 (arXiv 2412.19437 §2.1.2; HF `DeepseekV3TopkRouter`): s = σ(z); choose on s + b
    (b the aux-loss-free `e_score_correction_bias`), group-limited: group score = sum of the top 2
    of (s + b) in each of G groups, keep `topk_group` groups, then topk k; g from the UNBIASED s,
    s_I / (Σ_I s + 1e-20) with `norm_topk_prob`, times `routed_scaling_factor`; an ungated shared
    expert of width n_shared·moe_intermediate_size.

Softmax-then-topk-then-renormalise equals topk-on-logits-then-softmax; without renormalising it
does not (Qwen `norm_topk_prob=False`). With k = 1 and renormalisation g ≡ 1 and the router gets
no gradient from the task loss (only from an auxiliary loss).

Two expert implementations with the same outputs and gradients (up to float rounding):
  * `dense`: every expert on every token, combined with the dense gate matrix G [N, E]
    (G = Σ_j onehot(I_j)·g_j) folded in before the down projection, so no [N, E, D] tensor is
    formed. Executes E/k × the useful FLOPs; memory [N, E, F]. The exact, portable default.
  * `ragged`: sort the N·k (token, expert) assignments by expert, run grouped matmuls with
    `jax.lax.ragged_dot`, unsort with the inverse permutation and sum the k weighted rows. Both
    permutations have a custom VJP that gathers with the other permutation (MaxText's
    `_sort_activations_custom`) instead of XLA's scatter-add. Useful FLOPs only on TPU; on CPU
    (jax 0.10) ragged_dot lowers to a dense masked expansion and is slower than `dense`
    (benchmarks/moe.py, fwd+bwd, N=512, D=64, F=32 on 2 shared cores: E=8 k=2 ragged 1.1× dense
    time; E=64 k=8 5.1×, XLA counting 10.2 GFLOP against dense's 1.25 for 0.15 useful).
Both are dropless: no capacity, no token dropping, a token's output never depends on other tokens.

Rollout Routing Replay (R3, arXiv 2510.11370): `MoE(...)(x, routing=ids)` uses the given expert ids
and recomputes the weights from the live router scores gathered at those ids (`gate_weights`), so
the router still gets gradients; an RL trainer passes the ids the rollout chose so that the
teacher-forced forward cannot flip near-tie routes.

Parameters of `MoE` (logical axis names in brackets; "expert" needs a rule, e.g. ("expert", None)):
  router/kernel       [D, E]  float32 always    ("embed", None)
  gate/kernel         [E, D, F]                 ("expert", "embed", "mlp")     W1 (HF gate_proj)
  up/kernel           [E, D, F]                 ("expert", "embed", "mlp")     W3 (HF up_proj)
  down/kernel         [E, F, D]                 ("expert", "mlp", "embed")     W2 (HF down_proj)
  shared/{gate,up}/kernel [D, Fs], shared/down/kernel [Fs, D]  (shared_d_ff > 0)
  shared_gate/kernel  [D, 1]                    ("embed", None)                (shared_gate)
  bias                [E]     float32 always    ("expert",)                    (router_bias)
`bias` is DeepSeek-V3's e_score_correction_bias: it only changes which experts are chosen, and
its gradient is exactly zero (it enters only through integer top-k indices). Keep it out of the
optimizer all the same (`optax.multi_transform` / `optax.set_to_zero` on that leaf): with
jaxalign's optimizer (weight decay on "kernel" leaves only) a zero gradient leaves it unchanged,
but any optimizer that decays every leaf would shrink it. Update it between steps with
`jaxalign.losses.moe.expert_bias_update`. The expert kernels are
named "kernel" so `jaxalign.optim.weight_decay_mask` decays them; they are 3-D, so LoRA (which
views every kernel as a matrix) must not target them.

HF layouts (transformers 5.25, checked in tests/models/test_moe.py): in memory v5 fuses the
experts as `experts.gate_up_proj` [E, 2F, D] (= cat(W1, W3) on dim 1) and `experts.down_proj`
[E, D, F]; so gate/kernel = gate_up_proj[:, :F].transpose(0, 2, 1), up/kernel =
gate_up_proj[:, F:].transpose(0, 2, 1), down/kernel = down_proj.transpose(0, 2, 1), router/kernel
= gate.weight.T, bias = gate.e_score_correction_bias, shared_gate/kernel = shared_expert_gate.weight.T.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

Router = Literal["softmax", "sigmoid"]
Impl = Literal["dense", "ragged"]

# DeepSeek-V3's epsilon in the normalisation of the selected sigmoid scores (HF
# `DeepseekV3TopkRouter.forward`: `topk_weights.sum(dim=-1, keepdim=True) + 1e-20`).
_SIGMOID_NORM_EPS = 1e-20


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Hyperparameters of one MoE layer (frozen, hashable: a static argument of jit).

    Attributes:
      num_experts: E routed experts (HF `num_local_experts` / `num_experts` / `n_routed_experts`).
      experts_per_token: k active routed experts per token (HF `num_experts_per_tok`).
      moe_d_ff: F, width of each routed expert (HF `intermediate_size` for Mixtral,
        `moe_intermediate_size` for Qwen-MoE and DeepSeek).
      shared_d_ff: Fs, width of the always-active shared expert; 0 = none (Qwen2-MoE
        `shared_expert_intermediate_size`; DeepSeek `n_shared_experts · moe_intermediate_size`).
      shared_gate: multiply the shared expert's output by σ(x·w_sg), w_sg [D, 1] (Qwen2-MoE's
        `shared_expert_gate`); needs shared_d_ff > 0.
      router: "softmax" (Mixtral, Qwen) or "sigmoid" (DeepSeek-V3) scores of the router logits.
      norm_topk_prob: renormalise the k selected scores to sum to 1 (Mixtral: always; Qwen: the
        config flag; DeepSeek-V3: True, with +1e-20 in the denominator).
      routed_scale: multiplies the routed weights (DeepSeek `routed_scaling_factor`, 2.5 in V3).
      n_group: G expert groups for group-limited routing (DeepSeek-V3 `n_group`); 1 = none.
      topk_group: groups kept per token (DeepSeek-V3 `topk_group`); ignored when n_group == 1.
      router_bias: the layer has DeepSeek-V3's selection bias b [E] (`e_score_correction_bias`).
      impl: expert computation, "dense" (exact, any backend, E/k × the useful FLOPs) or "ragged"
        (`jax.lax.ragged_dot` grouped matmuls; useful FLOPs on TPU).

    Raises:
      ValueError: on construction, naming the field: a non-positive size, k > E, an unknown
        router or impl, shared_gate without a shared expert, E not divisible by n_group,
        topk_group outside [1, n_group], groups of fewer than 2 experts (the group score is a
        top-2 sum), k larger than the experts in the kept groups, or group-limited routing with
        the softmax router (DeepSeek-V2's max-score groups are not implemented).
    """

    num_experts: int
    experts_per_token: int
    moe_d_ff: int
    shared_d_ff: int = 0
    shared_gate: bool = False
    router: Router = "softmax"
    norm_topk_prob: bool = True
    routed_scale: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    router_bias: bool = False
    impl: Impl = "dense"

    def __post_init__(self) -> None:
        for name in ("num_experts", "experts_per_token", "moe_d_ff", "n_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MoEConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.shared_d_ff, int) or self.shared_d_ff < 0:
            raise ValueError(f"MoEConfig.shared_d_ff must be an int >= 0, got {self.shared_d_ff!r}")
        if self.experts_per_token > self.num_experts:
            raise ValueError(
                f"MoEConfig.experts_per_token={self.experts_per_token} exceeds "
                f"num_experts={self.num_experts}"
            )
        if self.router not in ("softmax", "sigmoid"):
            raise ValueError(f"MoEConfig.router must be 'softmax' or 'sigmoid', got {self.router!r}")
        if self.impl not in ("dense", "ragged"):
            raise ValueError(f"MoEConfig.impl must be 'dense' or 'ragged', got {self.impl!r}")
        if self.shared_gate and self.shared_d_ff == 0:
            raise ValueError("MoEConfig.shared_gate needs a shared expert (shared_d_ff > 0)")
        if not self.routed_scale > 0:
            raise ValueError(f"MoEConfig.routed_scale must be > 0, got {self.routed_scale!r}")
        if self.n_group > 1:
            if self.num_experts % self.n_group:
                raise ValueError(
                    f"MoEConfig.n_group={self.n_group} does not divide num_experts={self.num_experts}"
                )
            if self.router != "sigmoid":
                raise ValueError(
                    "MoEConfig.n_group > 1 (group-limited routing) is implemented for "
                    "router='sigmoid' (DeepSeek-V3's top-2-sum group score) only"
                )
            per_group = self.num_experts // self.n_group
            if per_group < 2:
                raise ValueError(
                    f"MoEConfig.n_group={self.n_group}: groups of {per_group} expert(s); the group "
                    "score sums the top 2 experts of a group"
                )
            if not isinstance(self.topk_group, int) or not 1 <= self.topk_group <= self.n_group:
                raise ValueError(
                    f"MoEConfig.topk_group must be in [1, n_group={self.n_group}], got {self.topk_group!r}"
                )
            if self.experts_per_token > self.topk_group * per_group:
                raise ValueError(
                    f"MoEConfig.experts_per_token={self.experts_per_token} exceeds the "
                    f"{self.topk_group * per_group} experts of the topk_group={self.topk_group} kept groups"
                )

    # Presets: the published models' routing, with every size overridable (keyword arguments are
    # dataclass fields). Sizes are those of the HF configuration classes / released config.json.

    @classmethod
    def mixtral(cls, **overrides) -> MoEConfig:
        """Mixtral-8x7B (HF `MixtralConfig` defaults, transformers 5.25): E=8, k=2, F=14336,
        softmax, always renormalised, no shared expert."""
        base = dict(num_experts=8, experts_per_token=2, moe_d_ff=14336, router="softmax", norm_topk_prob=True)
        return cls(**{**base, **overrides})

    @classmethod
    def qwen2_moe(cls, **overrides) -> MoEConfig:
        """Qwen1.5-MoE-A2.7B (HF `Qwen2MoeConfig` defaults): E=60, k=4, F=1408, softmax without
        renormalisation (`norm_topk_prob=False`), a 5632-wide shared expert behind a sigmoid gate."""
        base = dict(num_experts=60, experts_per_token=4, moe_d_ff=1408, shared_d_ff=5632,
                    shared_gate=True, router="softmax", norm_topk_prob=False)
        return cls(**{**base, **overrides})

    @classmethod
    def qwen3_moe(cls, **overrides) -> MoEConfig:
        """Qwen3-30B-A3B (config.json): E=128, k=8, F=768, softmax, `norm_topk_prob=True` (the HF
        `Qwen3MoeConfig` class default is False: read the checkpoint's value), no shared expert."""
        base = dict(num_experts=128, experts_per_token=8, moe_d_ff=768, router="softmax", norm_topk_prob=True)
        return cls(**{**base, **overrides})

    @classmethod
    def deepseek_v3(cls, **overrides) -> MoEConfig:
        """DeepSeek-V3 (HF `DeepseekV3Config` defaults, arXiv 2412.19437): E=256, k=8, F=2048,
        sigmoid scores, selection bias, G=8 groups keep 4, renormalised, ×2.5, one shared expert
        (Fs = 1 · 2048, ungated)."""
        base = dict(num_experts=256, experts_per_token=8, moe_d_ff=2048, shared_d_ff=2048,
                    router="sigmoid", norm_topk_prob=True, routed_scale=2.5, n_group=8,
                    topk_group=4, router_bias=True)
        return cls(**{**base, **overrides})


def router_scores(router_logits: jax.Array, cfg: MoEConfig) -> jax.Array:
    """The router's scores: softmax(z) over experts or σ(z), float32 [..., E].

    Source: HF `MixtralTopKRouter` / `Qwen2MoeTopKRouter` (softmax in float32),
    `DeepseekV3TopkRouter` (sigmoid), transformers 5.25.

    Args:
      router_logits: float [..., E] (computed in float32 by `MoE`).
      cfg: the layer's `MoEConfig` (its `router`).

    Raises:
      nothing (any shape with experts last).
    """
    z = router_logits.astype(jnp.float32)
    return jax.nn.softmax(z, axis=-1) if cfg.router == "softmax" else jax.nn.sigmoid(z)


def gate_weights(router_logits: jax.Array, expert_ids: jax.Array, cfg: MoEConfig) -> jax.Array:
    """Weights g of given experts from the live, unbiased scores: float32 [N, k].

    g_j = s[I_j] (s = `router_scores`), divided by Σ_j s[I_j] when `norm_topk_prob` (+1e-20 for the
    sigmoid router, as HF `DeepseekV3TopkRouter`), times `routed_scale`. `route` uses this for
    its own selection and `MoE(routing=...)` for replayed ids (R3, arXiv 2510.11370): the scores
    are gathered from the full softmax / sigmoid, never from post-top-k zeroed probabilities, and
    are differentiable in the logits.

    Args:
      router_logits: float [N, E].
      expert_ids: int [N, k], values in [0, E).
      cfg: the layer's `MoEConfig`.

    Raises:
      AssertionError: (chex) ranks are not 2 or the leading dimensions differ.
    """
    chex.assert_rank((router_logits, expert_ids), 2)
    chex.assert_equal_shape_prefix((router_logits, expert_ids), 1)
    scores = router_scores(router_logits, cfg)  # [N,E]
    ids = jnp.clip(expert_ids, 0, cfg.num_experts - 1)
    w = jnp.take_along_axis(scores, ids, axis=-1)  # [N,k]
    if cfg.norm_topk_prob:
        eps = _SIGMOID_NORM_EPS if cfg.router == "sigmoid" else 0.0
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + eps)
    return w * cfg.routed_scale


def route(
    router_logits: jax.Array, bias: jax.Array | None, cfg: MoEConfig
) -> tuple[jax.Array, jax.Array]:
    """Top-k expert selection and weights of N tokens: (expert_ids int32 [N, k], weights float32 [N, k]).

    Selection ranks the scores s (+ `bias` when given); with `n_group > 1` (DeepSeek-V3) it is
    group-limited: group score = sum of the top 2 of (s + b) in each group of E/G experts, the
    `topk_group` best groups are kept and the other experts' scores set to −inf before the top-k.
    Weights come from `gate_weights` (unbiased scores). Ids are in descending order of the
    selection score (HF Mixtral / Qwen sort too; DeepSeek's `sorted=False` order differs, which
    changes no output: the k contributions are summed). Equal scores go to the lower expert id
    (`jax.lax.top_k`). The selection passes no gradient (integer ids); the weights do.

    Sources (transformers 5.25): `MixtralTopKRouter`, `Qwen2MoeTopKRouter`, `Qwen3MoeTopKRouter`,
    `DeepseekV3TopkRouter`; DeepSeek-V3 report arXiv 2412.19437 §2.1.2.

    Args:
      router_logits: float32 [N, E] router logits z = x·W_r.
      bias: float32 [E] selection bias (DeepSeek's `e_score_correction_bias`), or None.
      cfg: the layer's `MoEConfig`.

    Raises:
      AssertionError: (chex) logits not rank 2 with E = cfg.num_experts, or bias not [E].
    """
    chex.assert_rank(router_logits, 2)
    chex.assert_axis_dimension(router_logits, 1, cfg.num_experts)
    n, e = router_logits.shape
    scores = router_scores(jax.lax.stop_gradient(router_logits), cfg)  # [N,E]
    choice = scores
    if bias is not None:
        chex.assert_shape(bias, (e,))
        choice = choice + jax.lax.stop_gradient(bias).astype(jnp.float32)
    if cfg.n_group > 1:
        grouped = choice.reshape(n, cfg.n_group, e // cfg.n_group)  # [N,G,E/G]
        group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [N,G]
        _, keep = jax.lax.top_k(group_scores, cfg.topk_group)  # [N,topk_group]
        kept = jnp.any(keep[:, :, None] == jnp.arange(cfg.n_group), axis=1)  # [N,G]
        choice = jnp.where(kept[:, :, None], grouped, -jnp.inf).reshape(n, e)
    _, expert_ids = jax.lax.top_k(choice, cfg.experts_per_token)  # [N,k]
    expert_ids = expert_ids.astype(jnp.int32)
    return expert_ids, gate_weights(router_logits, expert_ids, cfg)


def combine_matrix(expert_ids: jax.Array, weights: jax.Array, num_experts: int) -> jax.Array:
    """Dense gate matrix G [N, E] float32: G[n, e] = Σ_j [I_nj = e]·g_nj (0 for unchosen experts).

    Built with a select (`jnp.where`), so a non-finite weight of one assignment does not reach
    the other experts' entries. Ids outside [0, E) contribute nothing.

    Raises:
      AssertionError: (chex) ids and weights not of equal shape [N, k].
    """
    chex.assert_rank((expert_ids, weights), 2)
    chex.assert_equal_shape((expert_ids, weights))
    hit = expert_ids[:, :, None] == jnp.arange(num_experts)  # [N,k,E]
    return jnp.sum(jnp.where(hit, weights.astype(jnp.float32)[:, :, None], 0.0), axis=1)  # [N,E]


def experts_dense(
    x: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    expert_ids: jax.Array,
    weights: jax.Array,
) -> jax.Array:
    """Σ_j g_j·FFN_{I_j}(x) by running every expert on every token: [N, D] in x's dtype.

    h = silu(x·W1_e) ⊙ (x·W3_e) for all e ([N, E, F]); y = Σ_e (G[:, e]·h_e)·W2_e with the gate
    matrix G = `combine_matrix` folded in before the down projection (no [N, E, D] tensor).
    Cost: E/k × the useful FLOPs, memory N·E·F. The weighting is done in float32 and cast to
    x's dtype before the down projection. The same sum as HF's eager expert loop
    (`MixtralExperts.forward`, transformers 5.25: per hit expert, index_add of g·FFN(x)).

    Args:
      x: [N, D] tokens (compute dtype).
      gate, up: [E, D, F] W1, W3; down: [E, F, D] W2.
      expert_ids: int [N, k]; weights: float32 [N, k].

    Raises:
      AssertionError: (chex) shapes that do not match the above.
    """
    e, d, f = gate.shape
    chex.assert_rank(x, 2)
    chex.assert_axis_dimension(x, 1, d)
    chex.assert_shape((gate, up), (e, d, f))
    chex.assert_shape(down, (e, f, d))
    g = combine_matrix(expert_ids, weights, e)  # [N,E] f32
    h = jax.nn.silu(jnp.einsum("nd,edf->nef", x, gate)) * jnp.einsum("nd,edf->nef", x, up)  # [N,E,F]
    hg = (h.astype(jnp.float32) * g[:, :, None]).astype(x.dtype)  # [N,E,F]
    return jnp.einsum("nef,efd->nd", hg, down)  # [N,D]


@jax.custom_vjp
def _permute(x: jax.Array, order: jax.Array, inverse: jax.Array) -> jax.Array:
    """x[order] for a permutation `order` whose inverse is `inverse`; the VJP gathers with
    `inverse` instead of scattering (MaxText `_sort_activations_custom`)."""
    return x[order]


def _permute_fwd(x, order, inverse):
    return x[order], inverse


def _permute_bwd(inverse, g):
    return g[inverse], None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def experts_ragged(
    x: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    expert_ids: jax.Array,
    weights: jax.Array,
) -> jax.Array:
    """Σ_j g_j·FFN_{I_j}(x) with grouped matmuls over the N·k assignments: [N, D] in x's dtype.

    The assignments (token n, slot j) are flattened to n·k + j, stably sorted by expert
    (`order`), the token rows gathered in that order, the three projections run with
    `jax.lax.ragged_dot` over the E contiguous groups (`group_sizes` = per-expert counts), the rows
    put back with the inverse permutation, weighted by g in float32 and summed over j. Dropless;
    no scatter in forward or backward (both permutations have a gather VJP; the k-fold replication
    of x is a broadcast, whose VJP is a sum). Same numbers as `experts_dense` up to float32
    summation order.

    Args, Raises: as `experts_dense`.
    """
    e, d, f = gate.shape
    chex.assert_rank((x, expert_ids, weights), 2)
    chex.assert_axis_dimension(x, 1, d)
    chex.assert_shape((gate, up), (e, d, f))
    chex.assert_shape(down, (e, f, d))
    chex.assert_equal_shape((expert_ids, weights))
    n, k = expert_ids.shape
    flat = jnp.clip(expert_ids, 0, e - 1).reshape(-1)  # [N·k]
    order = jnp.argsort(flat, stable=True)  # [N·k] assignments sorted by expert
    inverse = jnp.argsort(order)  # [N·k]
    group_sizes = jnp.bincount(flat, length=e).astype(jnp.int32)  # [E]
    x_rep = jnp.broadcast_to(x[:, None, :], (n, k, d)).reshape(n * k, d)  # [N·k,D], row n·k+j
    xs = _permute(x_rep, order, inverse)  # [N·k,D] sorted by expert
    dot = lambda lhs, rhs: jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=x.dtype)  # noqa: E731
    h = jax.nn.silu(dot(xs, gate)) * dot(xs, up)  # [N·k,F]
    out = _permute(dot(h, down), inverse, order)  # [N·k,D] back in (n, j) order
    weighted = out.astype(jnp.float32) * weights.reshape(-1, 1).astype(jnp.float32)  # [N·k,D]
    return jnp.sum(weighted.reshape(n, k, d), axis=1).astype(x.dtype)  # [N,D]


def expert_load(expert_ids: jax.Array, mask: jax.Array | None, num_experts: int) -> jax.Array:
    """Tokens routed to each expert, c_e = Σ_{t real} Σ_j [I_tj = e]: int32 [E].

    Select semantics: a masked token counts nothing whatever its ids (an out-of-range id such as
    −1 is clamped, then deselected); an unmasked id outside [0, E) raises nothing and counts
    nothing. Sum the result over data shards (automatic under a GSPMD jit of the global batch)
    before `expert_bias_update`: DeepSeek-V3 balances over the whole global batch.

    Args:
      expert_ids: int [..., k] (e.g. [B, T, k] or [N, k]).
      mask: None (every token counts) or [...] (expert_ids.shape[:-1]), nonzero = real token.
      num_experts: E.

    Raises:
      AssertionError: (chex) the mask's shape is not expert_ids.shape[:-1].
    """
    ids = expert_ids.reshape(-1, expert_ids.shape[-1])  # [N,k]
    real = jnp.ones(ids.shape[0], bool)
    if mask is not None:
        chex.assert_shape(mask, expert_ids.shape[:-1])
        real = mask.reshape(-1) != 0
    valid = real[:, None] & (ids >= 0) & (ids < num_experts)  # [N,k]
    ones = jnp.where(valid, 1, 0).astype(jnp.int32)
    return jax.ops.segment_sum(ones.reshape(-1), jnp.clip(ids, 0, num_experts - 1).reshape(-1),
                               num_segments=num_experts)  # [E]


@flax.struct.dataclass
class RouterStats:
    """Router statistics of one MoE call (no hidden state: everything is an output).

    Attributes:
      router_logits: float32 [B, T, E], the inputs of the balancing / z losses.
      expert_ids: int32 [B, T, k], the experts used (the replayed ones under `routing=`): what a
        rollout stores for Routing Replay.
      weights: float32 [B, T, k], the gate weights g of those experts.
      expert_load: int32 [E], tokens routed to each expert (real tokens only when the call had a
        `mask`): the counts c of the aux-loss-free bias update.
    """

    router_logits: jax.Array
    expert_ids: jax.Array
    weights: jax.Array
    expert_load: jax.Array


def _kernel_init(std: float, axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


class _Kernel(nn.Module):
    """One weight as `<name>/kernel` (so `jaxalign.optim.weight_decay_mask` decays it), N(0, std)."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    std: float
    param_dtype: object

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("kernel", _kernel_init(self.std, self.axes), self.shape, self.param_dtype)


class _SwiGLU(nn.Module):
    """The shared expert: down(silu(gate(x)) ⊙ up(x)), kernels [D, Fs], [D, Fs], [Fs, D]."""

    features: int
    dtype: object
    param_dtype: object
    init_std: float
    out_init_std: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def dense(features, axes, std, name):
            return nn.Dense(features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                            kernel_init=_kernel_init(std, axes), name=name)

        gate = dense(self.features, ("embed", "mlp"), self.init_std, "gate")(x)  # [B,T,Fs]
        up = dense(self.features, ("embed", "mlp"), self.init_std, "up")(x)  # [B,T,Fs]
        return dense(x.shape[-1], ("mlp", "embed"), self.out_init_std, "down")(jax.nn.silu(gate) * up)


class MoE(nn.Module):
    """Top-k routed SwiGLU experts (+ optional shared expert): x [B, T, D] -> (y [B, T, D], RouterStats).

    See the module docstring for the maths, the parameter tree and its logical axes, and the HF
    layouts. Router logits are computed in float32 from a float32 kernel whatever `dtype` (as
    DeepSeek-V3's HF router; Mixtral / Qwen compute them in the activation dtype, identical in
    float32); the experts run in `dtype` with `param_dtype` kernels. No router jitter, no capacity
    (dropless), no dropout.

    Attributes:
      config: the layer's `MoEConfig`.
      dtype: compute dtype of the experts and of y.
      param_dtype: dtype of the expert, shared-expert and shared-gate kernels.
      init_std: N(0, init_std) init of the router and of the gate / up kernels.
      out_init_std: init std of the down kernels (None: init_std); a Transformer passes its
        residual-stream std here.

    Call args:
      x: [B, T, D] tokens.
      routing: optional int [B, T, k] expert ids to use instead of the router's own choice
        (Routing Replay); weights are then `gate_weights` of the live logits at those ids.
      mask: optional [B, T] (nonzero = real token); only restricts `RouterStats.expert_load`
        (every token is still computed: dropless routing never mixes tokens).

    Raises:
      AssertionError: (chex) x not rank 3, routing not [B, T, k], mask not [B, T].
    """

    config: MoEConfig
    dtype: object = jnp.float32
    param_dtype: object = jnp.float32
    init_std: float = 0.02
    out_init_std: float | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, *, routing: jax.Array | None = None, mask: jax.Array | None = None
    ) -> tuple[jax.Array, RouterStats]:
        cfg = self.config
        chex.assert_rank(x, 3)
        b, t, d = x.shape
        e, k, f = cfg.num_experts, cfg.experts_per_token, cfg.moe_d_ff
        out_std = self.init_std if self.out_init_std is None else self.out_init_std
        edf = ("expert", "embed", "mlp")
        router_kernel = _Kernel((d, e), ("embed", None), self.init_std, jnp.float32, name="router")()
        w_gate = _Kernel((e, d, f), edf, self.init_std, self.param_dtype, name="gate")()  # [E,D,F]
        w_up = _Kernel((e, d, f), edf, self.init_std, self.param_dtype, name="up")()  # [E,D,F]
        w_down = _Kernel((e, f, d), ("expert", "mlp", "embed"), out_std, self.param_dtype, name="down")()
        bias = None
        if cfg.router_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("expert",)),
                              (e,), jnp.float32)

        tokens = x.reshape(b * t, d)  # [N,D]
        logits = jnp.einsum("nd,de->ne", tokens.astype(jnp.float32), router_kernel)  # [N,E] f32
        if routing is None:
            expert_ids, weights = route(logits, bias, cfg)  # [N,k], [N,k]
        else:
            chex.assert_shape(routing, (b, t, k))
            expert_ids = routing.reshape(b * t, k).astype(jnp.int32)
            weights = gate_weights(logits, expert_ids, cfg)
        experts = experts_dense if cfg.impl == "dense" else experts_ragged
        xc = tokens.astype(self.dtype)
        y = experts(xc, w_gate.astype(self.dtype), w_up.astype(self.dtype), w_down.astype(self.dtype),
                    expert_ids, weights)  # [N,D]
        y = y.reshape(b, t, d)
        if cfg.shared_d_ff:
            xs = x.astype(self.dtype)
            shared = _SwiGLU(cfg.shared_d_ff, self.dtype, self.param_dtype, self.init_std, out_std,
                             name="shared")(xs)  # [B,T,D]
            if cfg.shared_gate:
                gate_logit = nn.Dense(1, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                                      kernel_init=_kernel_init(self.init_std, ("embed", None)),
                                      name="shared_gate")(xs)  # [B,T,1]
                shared = jax.nn.sigmoid(gate_logit) * shared
            y = y + shared
        stats = RouterStats(
            router_logits=logits.reshape(b, t, e),
            expert_ids=expert_ids.reshape(b, t, k),
            weights=weights.reshape(b, t, k),
            expert_load=expert_load(expert_ids.reshape(b, t, k), mask, e),
        )
        return y.astype(self.dtype), stats
