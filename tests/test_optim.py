import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxalign.models import get_config, init_params
from jaxalign.optim import OptimConfig, make_optimizer, weight_decay_mask
from tests._tolerance import ulps


def test_schedule_warmup_peak_and_end():
    _, schedule = make_optimizer(
        OptimConfig(learning_rate=1e-3, init_learning_rate=1e-4, end_learning_rate=1e-5, warmup_steps=10, total_steps=110)
    )
    # optax interpolates in float32 between values up to the peak 1e-3: rounding in ulps of 1e-3, not
    # of the value (schedule(0) is 9 ulps of 1e-4 off, 0.6 of rtol=1e-6); 8 ulps of the peak
    np.testing.assert_allclose(schedule(0), 1e-4, rtol=0, atol=ulps(8, 1e-3))
    np.testing.assert_allclose(schedule(5), 1e-4 + 0.5 * (1e-3 - 1e-4), rtol=0, atol=ulps(8, 1e-3))
    np.testing.assert_allclose(schedule(10), 1e-3, rtol=0, atol=ulps(8, 1e-3))
    # halfway through the cosine: end + (peak - end) / 2
    np.testing.assert_allclose(schedule(60), 1e-5 + 0.5 * (1e-3 - 1e-5), rtol=0, atol=ulps(8, 1e-3))  # as above
    np.testing.assert_allclose(schedule(110), 1e-5, rtol=0, atol=ulps(8, 1e-3))  # (1 + cos π)·peak/2 + end


def test_weight_decay_mask_skips_biases_norms_embeddings():
    params = init_params(get_config("gpt2-tiny", vocab_size=50), jax.random.key(0))
    mask = weight_decay_mask(params)
    assert mask["layers_0"]["attn"]["wq"]["kernel"] and mask["layers_0"]["mlp"]["up"]["kernel"]
    assert not mask["layers_0"]["attn"]["wq"]["bias"]
    assert not mask["layers_0"]["ln_1"]["scale"]
    assert not mask["embed"]["embedding"] and not mask["pos_embed"]["embedding"]


def test_weight_decay_applies_only_to_kernels():
    params = {"w": {"kernel": jnp.ones((2, 2))}, "b": {"bias": jnp.ones((2,))}}
    tx, _ = make_optimizer(OptimConfig(learning_rate=0.1, weight_decay=0.5, total_steps=10, max_grad_norm=None))
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)  # zero gradient: only decay moves
    np.testing.assert_allclose(updates["w"]["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)  # 2 products: 8 ulps
    np.testing.assert_allclose(updates["b"]["bias"], 0.0)


def test_clipping_bounds_the_update_direction():
    params = {"w": jnp.zeros((3,))}
    tx, _ = make_optimizer(OptimConfig(learning_rate=1.0, total_steps=10, weight_decay=0.0, max_grad_norm=1.0, b1=0.0, b2=0.0, eps=0.0))
    g = {"w": jnp.array([30.0, 40.0, 0.0])}
    clipped, _ = optax.clip_by_global_norm(1.0).update(g, None)
    np.testing.assert_allclose(optax.global_norm(clipped), 1.0, rtol=1e-6)  # a 3-term norm and a scaling: 8 ulps
    updates, _ = tx.update(g, tx.init(params), params)  # Adam with b1=b2=0: sign of the gradient
    np.testing.assert_allclose(updates["w"][:2], [-1.0, -1.0], rtol=1e-5)  # g/sqrt(g²): 84 ulps; measured equal


def test_gradient_accumulation_equals_mean_gradient():
    params = {"w": jnp.array([1.0, -2.0])}
    g1, g2 = {"w": jnp.array([0.5, 1.0])}, {"w": jnp.array([1.5, -3.0])}
    base = OptimConfig(learning_rate=0.1, total_steps=10, weight_decay=0.0)
    tx1, _ = make_optimizer(base)
    u_ref, _ = tx1.update(jax.tree.map(lambda a, b: (a + b) / 2, g1, g2), tx1.init(params), params)
    tx2, _ = make_optimizer(OptimConfig(**{**base.__dict__, "grad_accum_steps": 2}))
    state = tx2.init(params)
    u_a, state = tx2.update(g1, state, params)
    np.testing.assert_allclose(u_a["w"], 0.0)  # no update on the first micro-step
    u_b, state = tx2.update(g2, state, params)
    np.testing.assert_allclose(u_b["w"], u_ref["w"], rtol=1e-6)  # dyadic gradients: equal means; 8 ulps of slack


def test_config_validation():
    with pytest.raises(ValueError, match="warmup_steps"):
        OptimConfig(warmup_steps=20, total_steps=10)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        OptimConfig(grad_accum_steps=0)


def test_warmup_must_leave_decay_steps():
    # optax.warmup_cosine_decay_schedule refuses total_steps - warmup_steps <= 0 only when the
    # schedule is built; OptimConfig refuses it at construction, naming both values
    for warmup in (10, 11):
        with pytest.raises(ValueError) as err:
            OptimConfig(warmup_steps=warmup, total_steps=10)
        assert str(err.value) == (
            f"OptimConfig.warmup_steps={warmup} must be < total_steps=10 "
            "(the cosine decay needs at least one step after warm-up)"
        )
    with pytest.raises(ValueError, match=r"^OptimConfig.warmup_steps must be >= 0, got -1$"):
        OptimConfig(warmup_steps=-1, total_steps=10)
    for config in (OptimConfig(warmup_steps=0, total_steps=1), OptimConfig(warmup_steps=9, total_steps=10)):
        make_optimizer(config)  # the schedule optax builds accepts both
