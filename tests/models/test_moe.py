"""MoE layer (jaxalign/models/moe.py): parity with transformers 5.25's MoE blocks on identical
random float32 weights, dense == ragged (values and gradients), routing replay, select semantics,
no recompilation."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from jaxalign.metrics import compilations
from jaxalign.models.moe import (
    MoE,
    MoEConfig,
    combine_matrix,
    expert_load,
    experts_dense,
    experts_ragged,
    gate_weights,
    route,
)
from tests._tolerance import F32_EPS, ulps

B, T, D = 2, 8, 32  # N = 16 tokens

# ---------------------------------------------------------------------------------------------
# Hugging Face blocks and the weight mapping


def hf_case(name: str, **kw):
    """(HF block in eval mode, matching MoEConfig) for one family, small sizes."""
    eager = dict(hidden_size=D, experts_implementation="eager", hidden_act="silu")
    if name == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, **eager)
        block = MixtralSparseMoeBlock(cfg)
        moe = MoEConfig.mixtral(moe_d_ff=16)
    elif name.startswith("qwen2"):
        norm = name.endswith("norm")
        cfg = transformers.Qwen2MoeConfig(moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                          num_experts=8, num_experts_per_tok=3, norm_topk_prob=norm, **eager)
        block = Qwen2MoeSparseMoeBlock(cfg)
        moe = MoEConfig.qwen2_moe(num_experts=8, experts_per_token=3, moe_d_ff=16, shared_d_ff=24,
                                  norm_topk_prob=norm)
    elif name == "qwen3":
        cfg = transformers.Qwen3MoeConfig(moe_intermediate_size=16, num_experts=8, num_experts_per_tok=3,
                                          norm_topk_prob=True, **eager)
        block = Qwen3MoeSparseMoeBlock(cfg)
        moe = MoEConfig.qwen3_moe(num_experts=8, experts_per_token=3, moe_d_ff=16)
    elif name == "deepseek":
        cfg = transformers.DeepseekV3Config(moe_intermediate_size=8, n_routed_experts=16, num_experts_per_tok=4,
                                            n_group=4, topk_group=2, n_shared_experts=2, norm_topk_prob=True,
                                            routed_scaling_factor=2.5, **eager)
        block = DeepseekV3MoE(cfg)
        moe = MoEConfig.deepseek_v3(num_experts=16, experts_per_token=4, moe_d_ff=8, shared_d_ff=16,
                                    n_group=4, topk_group=2)
    else:
        raise ValueError(name)
    return block.eval(), dataclasses.replace(moe, **kw)


def randomise(block, seed: int) -> None:
    """Every weight N(0, 1/fan_in) so activations stay O(1): the router's logits then have std ~1
    (HF's 0.02 init gives logits ~0.1 whose near-ties would decide the routing); a DeepSeek
    selection bias ~U(-0.2, 0.2), the size of the sigmoid scores' spread, so it changes choices."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in block.state_dict(keep_vars=True).items():
            if name.endswith("e_score_correction_bias"):
                t.copy_(torch.rand(t.shape, generator=gen) * 0.4 - 0.2)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) / np.sqrt(t.shape[-1]))  # fan_in is last


def jax_params(block) -> dict:
    """The HF block's weights in MoE's parameter tree (transformers 5.25 in-memory layout:
    experts.gate_up_proj [E, 2F, D] = cat(W1, W3), experts.down_proj [E, D, F])."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in block.state_dict().items()}
    gate_up = sd["experts.gate_up_proj"]
    f = gate_up.shape[1] // 2
    p = {
        "router": {"kernel": sd["gate.weight"].T},
        "gate": {"kernel": gate_up[:, :f].transpose(0, 2, 1)},
        "up": {"kernel": gate_up[:, f:].transpose(0, 2, 1)},
        "down": {"kernel": sd["experts.down_proj"].transpose(0, 2, 1)},
    }
    for prefix in ("shared_expert.", "shared_experts."):
        if f"{prefix}gate_proj.weight" in sd:
            p["shared"] = {n: {"kernel": sd[f"{prefix}{n}_proj.weight"].T} for n in ("gate", "up", "down")}
    if "shared_expert_gate.weight" in sd:
        p["shared_gate"] = {"kernel": sd["shared_expert_gate.weight"].T}
    if "gate.e_score_correction_bias" in sd:
        p["bias"] = sd["gate.e_score_correction_bias"]
    return jax.tree.map(jnp.asarray, p)


def selection_gaps(logits: np.ndarray, bias, cfg: MoEConfig) -> np.ndarray:
    """Per token, in float64: the gap between the k-th and (k+1)-th selection score (and, with
    groups, between the topk_group-th and next group score): the margin by which rounding would
    have to differ for the routes to differ."""
    z = logits.astype(np.float64)
    if cfg.router == "softmax":
        s = np.exp(z - z.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
    else:
        s = 1 / (1 + np.exp(-z))
    if bias is not None:
        s = s + np.asarray(bias, np.float64)
    gaps = []
    if cfg.n_group > 1:
        g = s.reshape(len(s), cfg.n_group, -1)  # [N,G,E/G]
        group_score = np.sort(g, -1)[..., -2:].sum(-1)  # [N,G] top-2 sums
        ranked = np.sort(group_score, -1)[:, ::-1]
        gaps.append(ranked[:, cfg.topk_group - 1] - ranked[:, cfg.topk_group])
        kept = np.zeros(group_score.shape, bool)
        np.put_along_axis(kept, np.argsort(-group_score, -1)[:, : cfg.topk_group], True, -1)
        s = np.where(kept[:, :, None], g, -np.inf).reshape(len(s), -1)
    top = np.sort(s, -1)[:, ::-1]
    gaps.append(top[:, cfg.experts_per_token - 1] - top[:, cfg.experts_per_token])
    return np.min(np.stack(gaps), axis=0)


def magnitude_bound(params, x: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> float:
    """max over outputs of Σ |terms| of y = Σ_j g_j W2_j h_j (+ W2_s h_s), in float64: the
    magnitude whose ulps a float32 sum in another order can move (the shared gate σ <= 1 dropped)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    xt = x.reshape(-1, x.shape[-1]).astype(np.float64)  # [N,D]
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    w1, w3, w2 = (p[n]["kernel"][ids] for n in ("gate", "up", "down"))  # [N,k,...]
    h = silu(np.einsum("nd,nkdf->nkf", xt, w1)) * np.einsum("nd,nkdf->nkf", xt, w3)  # [N,k,F]
    total = np.einsum("nk,nkf,nkfd->nd", np.abs(weights), np.abs(h), np.abs(w2))
    if "shared" in p:
        s = p["shared"]
        hs = silu(xt @ s["gate"]["kernel"]) * (xt @ s["up"]["kernel"])
        total = total + np.abs(hs) @ np.abs(s["down"]["kernel"])
    return float(total.max())


CASES = ["mixtral", "qwen2", "qwen2-norm", "qwen3", "deepseek"]


@pytest.mark.parametrize("impl", ["dense", "ragged"])
@pytest.mark.parametrize("name", CASES)
def test_block_parity_with_transformers(name, impl):
    block, cfg = hf_case(name, impl=impl)
    randomise(block, seed=3)  # smallest selection gap over the cases: 6e-4 (checked below)
    x = np.random.RandomState(1).randn(B, T, D).astype(np.float32)
    with torch.no_grad():
        want = block(torch.from_numpy(x)).numpy()
        hf_logits, hf_weights, hf_ids = (a.numpy() for a in block.gate(torch.from_numpy(x).view(-1, D)))
    params = jax_params(block)
    module = MoE(cfg)
    init = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), jnp.asarray(x))["params"])
    assert jax.tree.structure(init) == jax.tree.structure(params)  # the documented tree, no more, no less
    assert jax.tree.map(lambda a: a.shape, init) == jax.tree.map(lambda a: a.shape, params)

    bias = params.get("bias")
    gaps = selection_gaps(hf_logits, bias, cfg)
    assert gaps.min() > 1e-4, gaps.min()  # no near-tie: rounding cannot decide a route
    if bias is not None:  # the bias does change some choice (else this would not test it)
        unbiased, _ = route(jnp.asarray(hf_logits), None, cfg)
        assert not np.array_equal(np.sort(unbiased, -1), np.sort(hf_ids, -1))

    y, stats = jax.jit(module.apply)({"params": params}, jnp.asarray(x))
    # router logits: one D=32-term dot product per entry, torch vs XLA order: within 2·D ulps of
    # Σ|x_d w_d| (the classic n·u·Σ|terms| bound, twice: both sides round); measured 7e-7 of 4e-5
    terms = np.abs(x.reshape(-1, D)) @ np.abs(np.asarray(params["router"]["kernel"]))
    np.testing.assert_allclose(stats.router_logits.reshape(-1, cfg.num_experts), hf_logits, rtol=0,
                               atol=2 * D * F32_EPS * terms.max())
    np.testing.assert_array_equal(np.sort(stats.expert_ids.reshape(-1, cfg.experts_per_token), -1),
                                  np.sort(hf_ids, -1))
    order = lambda ids: np.argsort(ids, -1)  # noqa: E731  (DeepSeek's ids are unsorted)
    ours = np.take_along_axis(np.asarray(stats.weights).reshape(hf_weights.shape),
                              order(np.asarray(stats.expert_ids).reshape(hf_ids.shape)), -1)
    theirs = np.take_along_axis(hf_weights, order(hf_ids), -1)
    # weights: softmax / sigmoid of logits equal to ~1e-6 (above), a k-term normalisation, ×2.5:
    # 16 ulps of the scale; measured 1
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=ulps(16, cfg.routed_scale))
    # outputs: chained sums of D (into h), F or Fs (down projection) and k + 1 (combine) terms,
    # each side within (D + F + k + 1)·u·Σ|terms| of the exact value, plus the weights' few ulps:
    # 2·(D + F + k + 8) ulps of the Σ|terms| bound (2-4e-5 of max|y|); measured <= 0.011 of it (<= 7.2e-7)
    bound = magnitude_bound(params, x, hf_ids, hf_weights)
    n_terms = D + max(cfg.moe_d_ff, cfg.shared_d_ff) + cfg.experts_per_token + 8
    tol = ulps(2 * n_terms, bound)
    err = np.abs(np.asarray(y) - want).max()
    assert err <= tol, (err, tol)
    assert np.asarray(stats.expert_load).sum() == B * T * cfg.experts_per_token


def test_presets_match_transformers_defaults():
    mix, q2, dsv3 = transformers.MixtralConfig(), transformers.Qwen2MoeConfig(), transformers.DeepseekV3Config()
    assert (MoEConfig.mixtral().num_experts, MoEConfig.mixtral().experts_per_token,
            MoEConfig.mixtral().moe_d_ff) == (mix.num_local_experts, mix.num_experts_per_tok, mix.intermediate_size)
    qc = MoEConfig.qwen2_moe()
    assert (qc.num_experts, qc.experts_per_token, qc.moe_d_ff, qc.shared_d_ff, qc.norm_topk_prob) == (
        q2.num_experts, q2.num_experts_per_tok, q2.moe_intermediate_size,
        q2.shared_expert_intermediate_size, q2.norm_topk_prob)
    dc = MoEConfig.deepseek_v3()
    assert (dc.num_experts, dc.experts_per_token, dc.moe_d_ff, dc.shared_d_ff, dc.n_group, dc.topk_group,
            dc.routed_scale, dc.norm_topk_prob) == (
        dsv3.n_routed_experts, dsv3.num_experts_per_tok, dsv3.moe_intermediate_size,
        dsv3.n_shared_experts * dsv3.moe_intermediate_size, dsv3.n_group, dsv3.topk_group,
        dsv3.routed_scaling_factor, dsv3.norm_topk_prob)
    assert MoEConfig.qwen3_moe().num_experts == transformers.Qwen3MoeConfig().num_experts
    hash(dc)  # a static jit argument


@pytest.mark.parametrize("kw, field", [
    (dict(num_experts=0), "num_experts"),
    (dict(experts_per_token=9), "experts_per_token"),
    (dict(moe_d_ff=-1), "moe_d_ff"),
    (dict(shared_d_ff=-2), "shared_d_ff"),
    (dict(router="relu"), "router"),
    (dict(impl="capacity"), "impl"),
    (dict(shared_gate=True), "shared_gate"),
    (dict(routed_scale=0.0), "routed_scale"),
    (dict(router="sigmoid", n_group=3), "n_group"),
    (dict(n_group=2), "n_group"),  # softmax router
    (dict(router="sigmoid", n_group=8), "n_group"),  # groups of 1
    (dict(router="sigmoid", n_group=4, topk_group=5), "topk_group"),
    (dict(router="sigmoid", n_group=4, topk_group=1, experts_per_token=3), "experts_per_token"),
])
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=f"MoEConfig.{field}"):
        MoEConfig(**{**dict(num_experts=8, experts_per_token=2, moe_d_ff=4), **kw})


def test_route_hand_example_group_limited_with_bias():
    # E=8 in G=4 groups of 2, keep 2 groups, k=2. Sigmoid scores chosen directly via logit(s).
    s = np.array([[0.9, 0.1, 0.6, 0.5, 0.8, 0.05, 0.3, 0.3]], np.float32)
    logits = jnp.asarray(np.log(s / (1 - s)))
    cfg = MoEConfig(num_experts=8, experts_per_token=2, moe_d_ff=4, router="sigmoid", n_group=4,
                    topk_group=2, norm_topk_prob=True, routed_scale=2.5)
    # group scores (top-2 sums): 1.0, 1.1, 0.85, 0.6 -> keep groups 1 and 0; experts 0 (0.9) and
    # 2 (0.6) win although expert 4 (0.8, group 2) beats expert 2
    ids, w = route(logits, None, cfg)
    assert sorted(np.asarray(ids)[0].tolist()) == [0, 2]
    np.testing.assert_allclose(np.sort(np.asarray(w)[0]), 2.5 * np.array([0.6, 0.9]) / 1.5, rtol=1e-6)
    # bias +0.5 on expert 4: group 2 scores 1.3 + 0.05 = 1.35, so groups 2 and 1 are kept (group 0
    # with the best expert is dropped) and experts 4 (1.3 biased) and 2 (0.6) win
    bias = jnp.asarray([0, 0, 0, 0, 0.5, 0, 0, 0], jnp.float32)
    ids, w = route(logits, bias, cfg)
    assert sorted(np.asarray(ids)[0].tolist()) == [2, 4]
    # weights from the UNBIASED scores: 2.5·(0.6, 0.8)/1.4, not 2.5·(0.6, 1.3)/1.9
    np.testing.assert_allclose(np.sort(np.asarray(w)[0]), 2.5 * np.array([0.6, 0.8]) / 1.4, rtol=1e-6)


def test_route_softmax_variants_hand_example():
    logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.2, 0.1]], jnp.float32) + 0)  # softmax = these
    logits = logits.at[0, 2].add(-0.01)  # break the 0.2 tie: expert 1 is second
    mixtral = MoEConfig(num_experts=4, experts_per_token=2, moe_d_ff=4)
    ids, w = route(logits, None, mixtral)
    p1 = 0.2 / (0.5 + 0.2 + 0.2 * np.exp(-0.01) + 0.1)
    p0 = 0.5 / (0.5 + 0.2 + 0.2 * np.exp(-0.01) + 0.1)
    assert np.asarray(ids).tolist() == [[0, 1]]
    np.testing.assert_allclose(w, [[p0 / (p0 + p1), p1 / (p0 + p1)]], rtol=1e-6)
    raw = dataclasses.replace(mixtral, norm_topk_prob=False)
    np.testing.assert_allclose(route(logits, None, raw)[1], [[p0, p1]], rtol=1e-6)
    # k = 1 with renormalisation: g == 1 exactly, so the router gets no gradient from the output
    top1 = dataclasses.replace(mixtral, experts_per_token=1)
    g = jax.grad(lambda z: route(z, None, top1)[1].sum())(logits)
    np.testing.assert_array_equal(route(logits, None, top1)[1], [[1.0]])
    np.testing.assert_array_equal(g, np.zeros_like(g))


# ---------------------------------------------------------------------------------------------
# dense == ragged


def tiny(impl="dense", **kw):
    base = dict(num_experts=6, experts_per_token=2, moe_d_ff=5, shared_d_ff=7, shared_gate=True)
    return MoEConfig(**{**base, **kw, "impl": impl})


@pytest.mark.parametrize("kw", [
    dict(),
    dict(router="sigmoid", router_bias=True, n_group=3, topk_group=2, routed_scale=2.5, shared_gate=False),
    dict(norm_topk_prob=False, experts_per_token=3, shared_d_ff=0, shared_gate=False),
])
def test_dense_equals_ragged_values_and_gradients(kw):
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    params = nn.unbox(MoE(tiny(**kw), init_std=0.5).init(jax.random.key(1), x))["params"]
    if "bias" in params:
        params["bias"] = jax.random.uniform(jax.random.key(2), (6,), minval=-0.2, maxval=0.2)
    r = jax.random.normal(jax.random.key(3), (2, 5, 8))

    def objective(impl):
        def f(p, x):
            y, stats = MoE(tiny(impl, **kw)).apply({"params": p}, x)
            return jnp.sum(y * r), (y, stats)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

    (_, (y_d, s_d)), (gp_d, gx_d) = objective("dense")(params, x)
    (_, (y_r, s_r)), (gp_r, gx_r) = objective("ragged")(params, x)
    np.testing.assert_array_equal(s_d.expert_ids, s_r.expert_ids)  # same router program
    # the same sums of <= F + E·F = 35 terms in another order: 64 ulps of the largest |value|
    np.testing.assert_allclose(y_r, y_d, rtol=0, atol=ulps(64, y_d))
    for a, b in zip(jax.tree.leaves((gp_r, gx_r)), jax.tree.leaves((gp_d, gx_d))):
        np.testing.assert_allclose(a, b, rtol=0, atol=ulps(64, b))
    assert float(jnp.abs(gp_d["router"]["kernel"]).max()) > 0  # the router learns through g
    if "bias" in params:  # selection only: exactly no gradient, in either implementation
        np.testing.assert_array_equal(gp_d["bias"], 0.0)
        np.testing.assert_array_equal(gp_r["bias"], 0.0)


def test_experts_functions_against_a_per_token_loop():
    rng = np.random.RandomState(0)
    n, e, d, f, k = 7, 4, 3, 5, 2
    x, w1, w3, w2 = (rng.randn(*s).astype(np.float32) for s in [(n, d), (e, d, f), (e, d, f), (e, f, d)])
    ids = np.stack([rng.permutation(e)[:k] for _ in range(n)]).astype(np.int32)
    g = rng.rand(n, k).astype(np.float32)
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    want = np.zeros((n, d))
    for t in range(n):
        for j in range(k):
            i = ids[t, j]
            want[t] += g[t, j] * (silu(x[t] @ w1[i]) * (x[t] @ w3[i])) @ w2[i]
    for fn in (experts_dense, experts_ragged):
        got = fn(*map(jnp.asarray, (x, w1, w3, w2, ids, g)))
        # float32 vs float64, sums of <= d + f·E terms: 64 ulps of max|want|
        np.testing.assert_allclose(got, want, rtol=0, atol=ulps(64, want))
    G = combine_matrix(jnp.asarray(ids), jnp.asarray(g), e)  # noqa: N806
    np.testing.assert_allclose(G.sum(-1), g.sum(-1), rtol=1e-6)
    assert int((np.asarray(G) != 0).sum()) == n * k


# ---------------------------------------------------------------------------------------------
# routing replay


def tie_setup():
    """Tokens whose feature 0 is 3, a router whose row 0 is [1, 0, 0, -1] (expert 0 always first,
    expert 3 always last) and whose columns 1 and 2 are identical: every token ties between
    experts 1 and 2 for the second slot, which goes to the lower id; a 1e-6 nudge of column 2
    flips the free route of some tokens."""
    cfg = MoEConfig(num_experts=4, experts_per_token=2, moe_d_ff=6)
    x = jax.random.normal(jax.random.key(0), (2, 4, 8)).at[..., 0].set(3.0)
    params = nn.unbox(MoE(cfg, init_std=0.5).init(jax.random.key(1), x))["params"]
    w = 0.1 * np.asarray(jax.random.normal(jax.random.key(2), (8, 4)))
    w[0] = [1.0, 0.0, 0.0, -1.0]
    w[:, 2] = w[:, 1]
    params["router"]["kernel"] = jnp.asarray(w, jnp.float32)
    return cfg, x, params


@pytest.mark.parametrize("impl", ["dense", "ragged"])
def test_routing_replay(impl):
    cfg, x, params = tie_setup()
    cfg = dataclasses.replace(cfg, impl=impl)
    apply = jax.jit(lambda p, x, routing=None: MoE(cfg).apply({"params": p}, x, routing=routing))
    y, stats = apply(params, x)
    ids = np.asarray(stats.expert_ids)
    np.testing.assert_array_equal(np.sort(ids, -1), np.broadcast_to([0, 1], ids.shape))  # the tie -> 1
    # replaying the module's own ids: the same weights and output, bit for bit
    y_r, stats_r = apply(params, x, stats.expert_ids)
    np.testing.assert_array_equal(y_r, y)
    np.testing.assert_array_equal(stats_r.weights, stats.weights)

    nudged = {**params, "router": {"kernel": params["router"]["kernel"].at[:, 2].add(
        1e-6 * jnp.sign(x.reshape(-1, 8)[0]))}}  # raises token 0's logit 2 by 1e-6·Σ|x_0| > 0
    y_free, free = apply(nudged, x)
    flipped = np.any(np.asarray(free.expert_ids) != ids, axis=-1)  # [B,T]
    assert flipped.any()  # the free route changed expert for some token
    y_n, replay = apply(nudged, x, stats.expert_ids)
    np.testing.assert_array_equal(replay.expert_ids, ids)  # replay kept the rollout's experts
    # same experts, logits moved by <= 1e-6·Σ|x| ~ 1e-5: the output moves by about that much
    # relative (1e-4 leaves 10x), while the flipped free route moves by O(1) of it
    scale = float(jnp.abs(y).max())
    assert float(jnp.abs(y_n - y).max()) <= 1e-4 * scale
    assert float(jnp.abs(y_free - y)[flipped].max()) > 1e-2 * scale

    def loss(p):
        out, _ = MoE(cfg).apply({"params": p}, x, routing=stats.expert_ids)
        return jnp.sum(out * jnp.arange(out.size).reshape(out.shape) / out.size)

    g = jax.grad(loss)(params)
    assert float(jnp.abs(g["router"]["kernel"]).max()) > 1e-6  # gradient reaches the router


def test_routing_shape_is_checked():
    cfg, x, params = tie_setup()
    with pytest.raises(AssertionError):
        MoE(cfg).apply({"params": params}, x, routing=jnp.zeros((2, 4, 3), jnp.int32))


def test_gate_weights_gather_from_the_full_scores():
    logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0]])
    cfg = MoEConfig(num_experts=4, experts_per_token=2, moe_d_ff=2, norm_topk_prob=False)
    p = jax.nn.softmax(logits)
    # replayed ids that the router would not choose still get their (small) live probabilities
    np.testing.assert_allclose(gate_weights(logits, jnp.asarray([[3, 2]]), cfg), p[:, [3, 2]], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# select semantics, counts, dtypes, compilation


@pytest.mark.parametrize("impl", ["dense", "ragged"])
def test_nan_padding_rows_do_not_change_real_rows(impl):
    cfg = tiny(impl)
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    params = MoE(cfg).init(jax.random.key(1), x)
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    poisoned = jnp.where(mask[..., None], x, jnp.nan)
    y, stats = MoE(cfg).apply(params, x, mask=mask)
    y_p, stats_p = MoE(cfg).apply(params, poisoned, mask=mask)
    np.testing.assert_array_equal(np.asarray(y_p)[np.asarray(mask)], np.asarray(y)[np.asarray(mask)])
    np.testing.assert_array_equal(stats_p.expert_load, stats.expert_load)  # padding is not counted
    assert int(stats.expert_load.sum()) == 8 * cfg.experts_per_token


def test_expert_load_counts_real_tokens_with_clamped_ids():
    ids = jnp.asarray([[[0, 1], [1, 3]], [[3, 1], [-1, 7]]], jnp.int32)  # [B=2,T=2,k=2]
    mask = jnp.asarray([[1, 1], [1, 0]])
    np.testing.assert_array_equal(expert_load(ids, mask, 4), [1, 3, 0, 2])  # padding's -1, 7 ignored
    np.testing.assert_array_equal(expert_load(ids[:1], None, 4), [1, 2, 0, 1])


def test_bfloat16_compute_keeps_a_float32_router():
    cfg = tiny("dense", router="sigmoid", router_bias=True, shared_gate=False)
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    module = MoE(cfg, dtype=jnp.bfloat16)
    params = module.init(jax.random.key(1), x)
    assert nn.unbox(params)["params"]["router"]["kernel"].dtype == jnp.float32
    assert nn.unbox(params)["params"]["bias"].dtype == jnp.float32
    y, stats = module.apply(params, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and stats.router_logits.dtype == jnp.float32
    assert stats.weights.dtype == jnp.float32 and stats.expert_ids.dtype == jnp.int32
    y32, _ = MoE(cfg).apply(params, x.astype(jnp.bfloat16).astype(jnp.float32))
    # bfloat16 experts (8 significant bits): a few bf16 ulps of the output's magnitude
    np.testing.assert_allclose(np.asarray(y, np.float32), y32, rtol=0, atol=16 * 2**-8 * float(jnp.abs(y32).max()))


@pytest.mark.parametrize("impl", ["dense", "ragged"])
def test_jit_compiles_once(impl):
    cfg = tiny(impl)
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    params = MoE(cfg).init(jax.random.key(1), x)
    apply = jax.jit(MoE(cfg).apply)
    x1 = x + 1.0
    with compilations(apply) as compiled:
        y1, _ = apply(params, x)
        y2, _ = apply(params, x1)
    assert len(compiled) == 1
    assert not np.array_equal(y1, y2)
