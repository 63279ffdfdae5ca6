"""MoE in the preference and RL trainers: router losses in every step, routes recorded by the
rollouts, Routing Replay (arXiv 2510.11370) and the routing-change fraction.

The model is a 2-layer llama-tiny whose both layers are Mixtral MoE blocks (E = 4, k = 2), its
weights scaled ×4 so that routes are not near ties (as tests/models/test_moe_model.py does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxalign.data as jd
from jaxalign.decoding import SamplingConfig, prompt_positions
from jaxalign.losses.moe import routing_change_fraction
from jaxalign.metrics import compilations
from jaxalign.models.config import get_config
from jaxalign.models.heads import init_scalar_model
from jaxalign.models.moe import MoEConfig
from jaxalign.models.transformer import forward, init_params
from jaxalign.rollout.grpo import grpo_rollout
from jaxalign.rollout.ppo import ppo_rollout
from jaxalign.scoring import completion_logps, completion_routes, init_actor_critic, router_choices
from jaxalign.trainers.dpo import dpo_batch_loss, orpo_batch_loss, simpo_batch_loss
from jaxalign.trainers.grpo import grpo_batch_loss, make_grpo_step
from jaxalign.trainers.kto import kto_batch_loss
from jaxalign.trainers.ppo import make_ppo_step, ppo_batch_loss
from jaxalign.trainers.reward import reward_batch_loss
from jaxalign.trainers.sft import ROUTER_AUX_LOSS_COEF, sft_batch_loss, with_router_losses
from jaxalign.trainers.step import create_train_state
from tests._tolerance import F32_EPS, ulps

TOK = jd.byte_tokenizer()
MOE = MoEConfig.mixtral(num_experts=4, experts_per_token=2, moe_d_ff=32)
CONFIG = get_config("llama-tiny", vocab_size=TOK.vocab_size, max_seq_len=48, n_layers=2, moe=MOE)
E, K, L = 4, 2, 2
SAMPLING = SamplingConfig(max_new_tokens=6, eos_id=TOK.eos_id, pad_id=TOK.pad_id)


@pytest.fixture(scope="module")
def params():
    return jax.tree.map(lambda x: x * 4, init_params(CONFIG, jax.random.key(3)))


def router_kernel(p, layer):
    return p[f"layers_{layer}"]["moe"]["router"]["kernel"]


# ---------------------------------------------------------------------------------------------
# an independent NumPy transcription of the two MoE losses (HF Mixtral `load_balancing_loss_func`,
# ST-MoE Eq. 5), from `forward(..., return_router_stats=True)`


def numpy_router_losses(stats, real):
    """(L_aux, L_z) in float64 from the per-layer router logits / expert ids and a [B, S] mask."""
    real = np.asarray(real, bool)
    z = np.stack([np.asarray(s.router_logits, np.float64) for s in stats])[:, real]  # [L,n,E]
    ids = np.stack([np.asarray(s.expert_ids) for s in stats])[:, real]  # [L,n,k]
    n = z.shape[0] * z.shape[1]
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    f = np.array([(ids == e).sum() for e in range(E)]) / n
    p = probs.reshape(-1, E).sum(0) / n
    lse = np.log(np.exp(z).sum(-1))
    return E * float(np.sum(f * p)), float(np.mean(lse**2))


def real_through_last(mask):
    """Position t is real iff some mask[:, s >= t] is nonzero (a loop, not a cumsum)."""
    mask = np.asarray(mask)
    out = np.zeros(mask.shape, bool)
    for b in range(mask.shape[0]):
        nz = np.nonzero(mask[b])[0]
        if nz.size:
            out[b, : nz[-1] + 1] = True
    return out


def right_padded(rng, rows, length, lengths):
    tokens = rng.integers(3, TOK.vocab_size, size=(rows, length)).astype(np.int32)
    mask = np.zeros((rows, length), np.float32)
    for b, n in enumerate(lengths):
        mask[b, 2:n] = 1.0  # 2 prompt tokens, then the counted completion
        tokens[b, n:] = TOK.pad_id
    return tokens, mask


def rl_inputs(rollout):
    tokens = np.concatenate([np.asarray(rollout.prompt_tokens), np.asarray(rollout.completion_tokens)], 1)
    full = np.concatenate([np.asarray(rollout.prompt_mask), np.ones_like(np.asarray(rollout.completion_tokens))], 1)
    positions = prompt_positions(jnp.asarray(full))
    real = np.concatenate([np.asarray(rollout.prompt_mask) != 0, np.asarray(rollout.completion_mask)[:, :-1] != 0], 1)
    return jnp.asarray(tokens[:, :-1]), positions[:, :-1], real


@pytest.fixture(scope="module")
def grpo_data(params):
    tokens, mask = jd.collate_prompts(["ab", "hello"], TOK)
    out = grpo_rollout(
        params, CONFIG, tokens, mask, group_size=2, decode=TOK.decode, sampling=SAMPLING, rng=jax.random.key(5),
        reward_fn=lambda completions: np.array([len(c) % 3 for c in completions], np.float32), ref_params=params,
    )
    return out.batch


@pytest.fixture(scope="module")
def ppo_data(params):
    ac = init_actor_critic(params, config=CONFIG, rng=jax.random.key(8))
    tokens, mask = jd.collate_prompts(["ab", "hello", "x", "yz"], TOK)
    out = ppo_rollout(
        ac, CONFIG, tokens, mask, ref_params=params, sampling=SAMPLING, rng=jax.random.key(6),
        score_fn=lambda p, pm, c, cm: jnp.sum(cm, axis=1) / 3.0,
    )
    return ac, out.batch


def _cases(params, grpo_data, ppo_data):
    """(name, loss(coef_aux, coef_z) -> (loss, metrics) on params, (L_aux, L_z) by NumPy, router
    kernel getter of the loss's params)."""
    rng = np.random.default_rng(0)
    sft_tokens, sft_mask = right_padded(rng, 3, 12, [12, 7, 0])  # a filler row
    pref = dict(zip(("chosen_tokens", "chosen_mask"), right_padded(rng, 2, 10, [10, 6])))
    pref.update(zip(("rejected_tokens", "rejected_mask"), right_padded(rng, 2, 10, [8, 9])))
    kto = dict(pref)
    kto.update(zip(("kl_tokens", "kl_mask"), right_padded(rng, 2, 10, [5, 10])))
    rm = init_scalar_model(CONFIG, jax.random.key(4), backbone=params)
    ac, ppo_rollout_ = ppo_data

    def stats_of(p, tokens, positions=None):
        return forward(p, CONFIG, jnp.asarray(tokens), positions, return_router_stats=True)[1]

    pair_tokens = np.concatenate([pref["chosen_tokens"], pref["rejected_tokens"]])
    pair_mask = np.concatenate([pref["chosen_mask"], pref["rejected_mask"]])
    kto_tokens = np.concatenate([kto[f"{s}_tokens"] for s in ("chosen", "rejected", "kl")])
    kto_mask = np.concatenate([kto[f"{s}_mask"] for s in ("chosen", "rejected", "kl")])
    grpo_tokens, grpo_pos, grpo_real = rl_inputs(grpo_data)
    ppo_tokens, ppo_pos, ppo_real = rl_inputs(ppo_rollout_)
    sft_batch = {"tokens": jnp.asarray(sft_tokens), "mask": jnp.asarray(sft_mask)}
    jpref = jax.tree.map(jnp.asarray, pref)
    jkto = jax.tree.map(jnp.asarray, kto)
    grpo_where = np.asarray(grpo_data.where) != 0
    return [
        ("sft", params, lambda p, a, z: sft_batch_loss(p, CONFIG, sft_batch, router_aux_loss_coef=a, router_z_loss_coef=z),
         lambda: numpy_router_losses(stats_of(params, sft_tokens[:, :-1]), real_through_last(sft_mask[:, 1:])),
         lambda p: p),
        ("dpo", params, lambda p, a, z: dpo_batch_loss(p, CONFIG, jpref, None, params, router_aux_loss_coef=a,
                                                        router_z_loss_coef=z),
         lambda: numpy_router_losses(stats_of(params, pair_tokens[:, :-1]), real_through_last(pair_mask[:, 1:])),
         lambda p: p),
        ("simpo", params, lambda p, a, z: simpo_batch_loss(p, CONFIG, jpref, router_aux_loss_coef=a, router_z_loss_coef=z),
         lambda: numpy_router_losses(stats_of(params, pair_tokens[:, :-1]), real_through_last(pair_mask[:, 1:])),
         lambda p: p),
        ("orpo", params, lambda p, a, z: orpo_batch_loss(p, CONFIG, jpref, router_aux_loss_coef=a, router_z_loss_coef=z),
         lambda: numpy_router_losses(stats_of(params, pair_tokens[:, :-1]), real_through_last(pair_mask[:, 1:])),
         lambda p: p),
        ("kto", params, lambda p, a, z: kto_batch_loss(p, CONFIG, jkto, None, params, router_aux_loss_coef=a,
                                                        router_z_loss_coef=z),
         lambda: numpy_router_losses(stats_of(params, kto_tokens[:, :-1]), real_through_last(kto_mask[:, 1:])),
         lambda p: p),
        ("reward", rm, lambda p, a, z: reward_batch_loss(p, CONFIG, jpref, router_aux_loss_coef=a, router_z_loss_coef=z),
         lambda: numpy_router_losses(stats_of(params, pair_tokens), real_through_last(pair_mask)),
         lambda p: p["backbone"]),
        ("grpo", params, lambda p, a, z: grpo_batch_loss(p, CONFIG, grpo_data, router_aux_loss_coef=a, router_z_loss_coef=z),
         lambda: numpy_router_losses(stats_of(params, grpo_tokens, grpo_pos), grpo_real & grpo_where[:, None]),
         lambda p: p),
        ("ppo", ac, lambda p, a, z: ppo_batch_loss(p, CONFIG, ppo_rollout_, router_aux_loss_coef=a, router_z_loss_coef=z),
         lambda: numpy_router_losses(stats_of(params, ppo_tokens, ppo_pos), ppo_real),
         lambda p: p["policy"]),
    ]


def test_every_step_adds_router_losses(params, grpo_data, ppo_data):
    a, z = 0.5, 0.25  # large coefficients, so that the terms are well above the loss's rounding
    for name, p0, loss, reference, trunk in _cases(params, grpo_data, ppo_data):
        # one compilation for both coefficient pairs: values, metrics and gradients together
        both = jax.jit(lambda p, loss=loss: tuple(
            jax.value_and_grad(lambda q, c=coefs: loss(q, *c), has_aux=True)(p) for coefs in ((a, z), (0.0, 0.0))))
        ((total, metrics), grad), ((base, metrics0), grad0) = both(p0)
        aux_np, z_np = reference()
        assert 2.0 - 1e-5 <= aux_np <= 4.0, name  # between uniform (k) and collapsed (E) routing
        # L_aux: sums over at most L·N·E = 2·64·4 terms of size <= 1 (and one product): 512 ulps;
        # L_z: squared logsumexps of ~|z| <= 30 averaged over <= 128 tokens: 512 ulps of L_z
        np.testing.assert_allclose(float(metrics["aux_loss"]), aux_np, rtol=ulps(512), err_msg=name)
        np.testing.assert_allclose(float(metrics["z_loss"]), z_np, rtol=ulps(512), err_msg=name)
        assert float(metrics0["aux_loss"]) == float(metrics["aux_loss"]), name  # logged at coef 0 too
        expected = float(base) + a * aux_np + z * z_np
        # the penalty's own rounding (above) plus one addition's: 8 ulps of the total, 512 of the terms
        np.testing.assert_allclose(float(total), expected, rtol=0,
                                   atol=ulps(8, expected) + ulps(512, a * aux_np + z * z_np), err_msg=name)
        for layer in range(L):
            g, g0 = router_kernel(trunk(grad), layer), router_kernel(trunk(grad0), layer)
            assert np.all(np.isfinite(g)), name
            # the aux terms move the router by far more than rounding
            assert float(jnp.max(jnp.abs(g - g0))) > 1e-3 * float(jnp.max(jnp.abs(g0)) + 1e-6), (name, layer)


def test_dense_models_get_no_router_terms():
    dense = get_config("llama-tiny", vocab_size=TOK.vocab_size, max_seq_len=48, n_layers=2)
    p = init_params(dense, jax.random.key(0))
    tokens, mask = right_padded(np.random.default_rng(1), 2, 8, [8, 5])
    _, m = sft_batch_loss(p, dense, {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask)}, router_z_loss_coef=0.1)
    assert "aux_loss" not in m and "z_loss" not in m
    loss, metrics = with_router_losses(jnp.float32(1.5), {"x": 1}, (), jnp.ones((2, 3), bool))
    assert float(loss) == 1.5 and metrics == {"x": 1}
    with pytest.raises(ValueError, match="routing_replay"):
        make_grpo_step(dense, optax.sgd(1e-3), optax.constant_schedule(1e-3), routing_replay=True)
    with pytest.raises(ValueError, match="router_z_loss_coef"):
        make_ppo_step(dense, optax.sgd(1e-3), optax.constant_schedule(1e-3), router_z_loss_coef=-1.0)
    assert ROUTER_AUX_LOSS_COEF == 0.001


# ---------------------------------------------------------------------------------------------
# rollouts record routes


def test_rollouts_record_the_sampling_routes(params, grpo_data, ppo_data):
    for rollout, policy in ((grpo_data, params), (ppo_data[1], params)):
        r, p = rollout.prompt_tokens.shape
        n = rollout.completion_tokens.shape[1]
        assert rollout.routes.shape == (r, p + n - 1, L, K) and rollout.routes.dtype == jnp.int32
        tokens, positions, _ = rl_inputs(rollout)
        stats = forward(policy, CONFIG, tokens, positions, return_router_stats=True)[1]
        expected = np.stack([np.asarray(s.expert_ids) for s in stats], axis=2)
        np.testing.assert_array_equal(np.asarray(rollout.routes), expected)  # same program: exact
        assert np.all((np.asarray(rollout.routes) >= 0) & (np.asarray(rollout.routes) < E))
    dense = get_config("llama-tiny", vocab_size=TOK.vocab_size, max_seq_len=48, n_layers=2)
    dp = init_params(dense, jax.random.key(0))
    tokens, mask = jd.collate_prompts(["ab"], TOK)
    out = grpo_rollout(dp, dense, tokens, mask, group_size=2, decode=TOK.decode, sampling=SAMPLING,
                       rng=jax.random.key(1), reward_fn=lambda c: np.zeros(len(c), np.float32))
    assert out.batch.routes is None
    assert completion_routes(dp, dense, out.batch.prompt_tokens, out.batch.prompt_mask,
                             out.batch.completion_tokens) is None


# ---------------------------------------------------------------------------------------------
# Routing Replay and the routing-change fraction


def test_routing_change_fraction_hand_count():
    rec = np.array([[[[0, 1], [2, 3]], [[1, 2], [0, 3]], [[0, 2], [1, 3]]]], np.int32)  # [1,3,L,k]
    new = np.array([[[[1, 0], [2, 3]], [[1, 3], [0, 3]], [[9, 9], [9, 9]]]], np.int32)
    mask = np.array([[1.0, 1.0, 0.0]])  # the third token (all changed) is padding
    # token 0: both layers the same set (layer 0 re-ordered); token 1: layer 0 differs -> 1 of 4
    assert float(routing_change_fraction(jnp.asarray(new), jnp.asarray(rec), jnp.asarray(mask))) == 0.25
    assert float(routing_change_fraction(jnp.asarray(new), jnp.asarray(rec), jnp.ones((1, 3)))) == 3 / 6
    assert float(routing_change_fraction(jnp.asarray(new), jnp.asarray(rec), jnp.zeros((1, 3)))) == 0.0


def _swap_experts(p, layer, a=0, b=1):
    """The router of `layer` with experts a and b's columns swapped: the new top-k set of a token
    is the old one with a and b exchanged (the logits are the same numbers, permuted)."""
    kernel = router_kernel(p, layer)
    swapped = kernel.at[:, [a, b]].set(kernel[:, [b, a]])
    new = jax.tree.map(lambda x: x, p)
    new[f"layers_{layer}"]["moe"]["router"]["kernel"] = swapped
    return new


def test_routing_change_fraction_in_the_steps(params, grpo_data, ppo_data):
    rollout = grpo_data
    p_len = rollout.prompt_tokens.shape[1]
    routes = np.asarray(rollout.routes)[:, p_len - 1 :]  # [R,N,L,k] at the completion positions
    counted = (np.asarray(rollout.completion_mask) != 0) & (np.asarray(rollout.where) != 0)[:, None]
    # swapping experts 0 and 1 of the LAST layer leaves layer 0's inputs and routes unchanged and
    # changes a last-layer set iff it holds exactly one of the two experts
    last = routes[:, :, L - 1]
    one_of = (np.isin(last, [0, 1]).sum(-1) == 1) & counted
    hand = one_of.sum() / (L * counted.sum())
    assert 0 < hand < 0.5  # the constructed case changes some routes, not all
    swapped = _swap_experts(params, L - 1)
    for replay in (False, True):
        fn = jax.jit(lambda p, replay=replay: grpo_batch_loss(p, CONFIG, rollout, routing_replay=replay)[1])
        assert float(fn(params)["routing_change_fraction"]) == 0.0  # the sampling params themselves
        # exact: both count integers and divide once
        assert float(fn(swapped)["routing_change_fraction"]) == pytest.approx(hand, rel=F32_EPS), replay
    ac, ppo_ro = ppo_data
    fn = jax.jit(lambda p: ppo_batch_loss(p, CONFIG, ppo_ro, routing_replay=True)[1])
    assert float(fn(ac)["routing_change_fraction"]) == 0.0
    assert float(fn({**ac, "policy": swapped})["routing_change_fraction"]) > 0.0


def test_replay_uses_the_recorded_routes_after_params_change(params, grpo_data):
    rollout = grpo_data
    moved = _swap_experts(_swap_experts(params, 0, 1, 2), 1, 0, 3)  # both layers' routers change
    args = (rollout.prompt_tokens, rollout.prompt_mask, rollout.completion_tokens)
    score = jax.jit(lambda p, routes: completion_logps(p, CONFIG, *args, routes=routes, return_router_stats=True))
    free_logps, free_stats = score(moved, None)
    replay_logps, replay_stats = score(moved, rollout.routes)
    ids = np.stack([np.asarray(s.expert_ids) for s in replay_stats], axis=2)
    np.testing.assert_array_equal(ids, np.asarray(rollout.routes))  # replayed top-k sets = recorded
    free_ids = np.stack([np.asarray(s.expert_ids) for s in free_stats], axis=2)
    assert np.any(free_ids != np.asarray(rollout.routes))  # without replay the routers moved
    mask = np.asarray(rollout.completion_mask) != 0
    assert np.max(np.abs(np.asarray(free_logps - replay_logps))[mask]) > 1e-3
    # the routers still learn under replay: gradient through the replayed experts' gate weights
    grad = jax.jit(jax.grad(lambda p: grpo_batch_loss(p, CONFIG, rollout, routing_replay=True,
                                                      router_aux_loss_coef=0.0)[0]))(moved)
    for layer in range(L):
        assert float(jnp.max(jnp.abs(router_kernel(grad, layer)))) > 0.0
    # the router choice of the moved params differs from the replayed one where a route moved
    chosen = np.asarray(router_choices(moved, CONFIG, replay_stats))
    assert np.any(chosen != np.asarray(rollout.routes))


def test_replay_first_update_ratio_and_default_off(params, grpo_data):
    rollout = grpo_data
    args = (rollout.prompt_tokens, rollout.prompt_mask, rollout.completion_tokens)
    # old log-probs from the replayed teacher-forced pass of the sampling params ("where logps match")
    old = jax.jit(lambda p: completion_logps(p, CONFIG, *args, routes=rollout.routes))(params)
    matched = rollout.replace(old_logps=jnp.where(rollout.completion_mask != 0, old, 0.0))
    tx = optax.sgd(1e-2)
    sched = optax.constant_schedule(1e-2)
    kw = dict(beta=0.0, router_aux_loss_coef=0.0)
    step = make_grpo_step(CONFIG, tx, sched, routing_replay=True, **kw)
    copy = lambda: jax.tree.map(jnp.copy, params)  # noqa: E731 - the step donates its state
    with compilations(step) as compiled:
        state, metrics = step(create_train_state(copy(), tx, 0), matched)
        state, metrics2 = step(state, matched)  # params changed: the replayed routes stay the recorded ones
    assert len(compiled) == 1  # replay on: one compilation for every call
    loss_fn = jax.jit(lambda p: grpo_batch_loss(p, CONFIG, matched, routing_replay=True, **kw)[1])
    m = loss_fn(params)
    # same routes, same params: the logps are those of `old` up to XLA fusion in the loss's jit;
    # the ratio exp(logp - old) is 1 within 16 ulps of the largest |logp|, clip inactive
    # (measured: exactly 1.0 in both)
    tol = ulps(16, np.asarray(old)[np.asarray(rollout.completion_mask) != 0])
    assert abs(float(m["ratio"]) - 1.0) <= tol and abs(float(metrics["ratio"]) - 1.0) <= tol
    assert float(metrics["clip_fraction_low"]) == 0.0 and float(metrics["clip_fraction_high"]) == 0.0
    assert float(metrics["routing_change_fraction"]) == 0.0
    assert np.isfinite(float(metrics2["loss"]))
    # off by default: the same program as an explicit False, and recorded routes do not matter
    off = make_grpo_step(CONFIG, tx, sched, **kw)
    explicit = make_grpo_step(CONFIG, tx, sched, routing_replay=False, **kw)
    _, m_off = off(create_train_state(copy(), tx, 0), matched)
    _, m_explicit = explicit(create_train_state(copy(), tx, 0), matched)
    assert float(m_off["loss"]) == float(m_explicit["loss"])
    no_routes = jax.jit(lambda p: grpo_batch_loss(p, CONFIG, matched.replace(routes=None), **kw))(params)
    with_routes = jax.jit(lambda p: grpo_batch_loss(p, CONFIG, matched, **kw))(params)
    assert float(no_routes[0]) == float(with_routes[0])  # the routes enter only the metric when off
    assert "routing_change_fraction" not in no_routes[1]
    with pytest.raises(ValueError, match="no routes"):
        grpo_batch_loss(params, CONFIG, matched.replace(routes=None), routing_replay=True)


def test_ppo_replay_minibatches_one_compilation(ppo_data):
    from jaxalign.trainers.ppo import ppo_update

    ac, rollout = ppo_data
    tx = optax.sgd(1e-2)
    step = make_ppo_step(CONFIG, tx, optax.constant_schedule(1e-2), routing_replay=True)
    state = create_train_state(jax.tree.map(jnp.copy, ac), tx, 0)
    with compilations(step) as compiled:
        state, metrics = ppo_update(step, state, rollout, epochs=2, num_minibatches=2, seed=0)
    assert len(compiled) == 1  # 4 minibatch steps, routes sliced with the rollout, one program
    for name in ("aux_loss", "z_loss", "routing_change_fraction"):
        assert np.isfinite(metrics[name]), name
    assert 0.0 <= metrics["routing_change_fraction"] <= 1.0
    assert metrics["aux_loss"] >= 2.0 - 1e-5  # >= k
