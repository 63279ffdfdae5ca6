import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.logprobs import entropy, sequence_logps, token_logps
from jaxalign.metrics import compilations
from tests._tolerance import ulps


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_token_logps(logits, labels):
    return np.take_along_axis(np_log_softmax(logits), labels[..., None], -1)[..., 0]


@pytest.fixture
def data():
    rng = np.random.RandomState(0)
    logits = rng.randn(3, 7, 11).astype(np.float32) * 3
    labels = rng.randint(0, 11, (3, 7))
    return logits, labels


def test_hand_computed_two_token_vocab():
    # softmax([0, ln 3]) = [1/4, 3/4]
    logits = jnp.array([[[0.0, np.log(3.0)]]])
    # a 2-way log-softmax: a few roundings, 8 ulps; measured 0.5
    np.testing.assert_allclose(token_logps(logits, jnp.array([[1]])), [[np.log(0.75)]], rtol=1e-6)
    np.testing.assert_allclose(token_logps(logits, jnp.array([[0]])), [[np.log(0.25)]], rtol=1e-6)


def test_matches_numpy_reference(data):
    logits, labels = data
    out = token_logps(jnp.asarray(logits), jnp.asarray(labels))
    assert out.dtype == jnp.float32 and out.shape == (3, 7)
    np.testing.assert_allclose(out, np_token_logps(logits, labels), atol=1e-5)  # 11-way lse: 9 ulps of |z| <= 10; measured 0.3


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 100])
def test_chunked_equals_unchunked(data, chunk):
    logits, labels = map(jnp.asarray, data)
    np.testing.assert_allclose(
        # per row the same 11-term logsumexp, which chunking may regroup: 16 ulps of max|logit| (was
        # 1e-6, under one ulp of |logp| ~ 10); measured equal
        token_logps(logits, labels, chunk_size=chunk), token_logps(logits, labels), rtol=0, atol=ulps(16, logits)
    )
    np.testing.assert_allclose(entropy(logits, chunk_size=chunk), entropy(logits), atol=1e-5)  # 9 ulps of |z| ~ 10; measured 0.4


def test_extreme_logits_are_finite_and_exact():
    logits = np.array([[[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]]], np.float32)
    labels = np.array([[0, 2]])
    out = np.asarray(token_logps(jnp.asarray(logits), jnp.asarray(labels)))
    assert np.all(np.isfinite(out))
    # float32 values near 1e4 are spaced ~1e-3 apart: that is the attainable accuracy.
    np.testing.assert_allclose(out, [[0.0, -np.log(3.0)]], atol=1e-3)
    np.testing.assert_allclose(token_logps(jnp.asarray(logits), jnp.array([[1, 0]]))[0, 0], -2e4, rtol=1e-6)  # 8 ulps


def test_bf16_logits_give_float32_logps(data):
    logits, labels = data
    bf16 = jnp.asarray(logits, jnp.bfloat16)
    out = token_logps(bf16, jnp.asarray(labels))
    assert out.dtype == jnp.float32
    # The reference sees the same bf16-rounded logits: only the upcast arithmetic differs.
    ref = np_token_logps(np.asarray(bf16.astype(jnp.float32)), labels)
    np.testing.assert_allclose(out, ref, atol=1e-5)  # 9 ulps of |z| <= 10 (see above); measured 0.4


def test_entropy_matches_numpy(data):
    logits, _ = data
    lp = np_log_softmax(logits)
    ref = -(np.exp(lp) * lp).sum(-1)
    # H = lse − Σ p·z cancels terms of size max|z| ~ 10: 32 ulps of it; measured 1.8
    np.testing.assert_allclose(entropy(jnp.asarray(logits)), ref, rtol=0, atol=ulps(32, logits))
    # uniform logits: entropy log V
    np.testing.assert_allclose(entropy(jnp.zeros((1, 2, 11))), np.full((1, 2), np.log(11)), rtol=1e-6)  # 8 ulps


def test_sequence_logps_hand_computed():
    lp = jnp.array([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    mask = jnp.array([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    np.testing.assert_allclose(sequence_logps(lp, mask), [-5.0, -1.0])
    np.testing.assert_allclose(sequence_logps(lp, mask, average=True), [-2.5, -0.5])
    np.testing.assert_allclose(sequence_logps(lp, jnp.zeros_like(mask), average=True), [0.0, 0.0])


def test_masked_equals_sliced(data):
    logits, labels = map(jnp.asarray, data)
    mask = jnp.zeros((3, 7)).at[:, 2:5].set(1.0)
    full = sequence_logps(token_logps(logits, labels), mask)
    sliced = token_logps(logits[:, 2:5], labels[:, 2:5]).sum(-1)
    # 3-term sums of logps (|sum| <= 17) in other shapes: 32 ulps of the sums; measured equal
    np.testing.assert_allclose(full, sliced, rtol=0, atol=ulps(32, sliced))


def test_gradient_is_softmax_minus_onehot(data):
    logits, labels = map(jnp.asarray, data)
    grad = jax.grad(lambda z: token_logps(z, labels, chunk_size=3).sum())(logits)
    expected = jax.nn.one_hot(labels, 11) - jax.nn.softmax(logits)
    np.testing.assert_allclose(grad, expected, atol=1e-5)  # |p − onehot| <= 1: 84 ulps; measured equal


def test_no_recompile_on_second_call(data):
    logits, labels = map(jnp.asarray, data)
    fn = jax.jit(lambda z, y: token_logps(z, y, chunk_size=2))
    shifted = logits + 1.0
    with compilations(fn) as compiled:
        fn(logits, labels)
        fn(shifted, labels)
    assert len(compiled) == 1


def test_shape_errors():
    with pytest.raises(AssertionError):
        token_logps(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="chunk_size"):
        token_logps(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), jnp.int32), chunk_size=0)


def np_entropy(logits):
    """float64 reference −Σ p·log p over the last axis (0·log 0 = 0)."""
    lp = np_log_softmax(logits)
    p = np.exp(lp)
    return -np.where(p > 0, p * np.where(p > 0, lp, 0.0), 0.0).sum(-1)


def peaked_logits():
    """[2, 3, 32768] rows with one logit far above the rest (a confident LM's next-token rows)."""
    rng = np.random.RandomState(4)
    v = 32768
    rest = np.concatenate([rng.randn(1, 3, v - 1), 2.0 * rng.randn(1, 3, v - 1)])  # N(0,1), N(0,4)
    peak = np.array([[30.0, 25.0, 20.0], [30.0, 25.0, 20.0]])[..., None] + np.array([0.0, 7.3])[:, None, None]
    return np.concatenate([peak, rest + np.array([0.0, 7.3])[:, None, None]], -1).astype(np.float32)


@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_entropy_exact_on_peaked_rows(chunk):
    logits = peaked_logits()
    ref = np_entropy(logits)  # float64 on the same float32 logits; 1.5e-7 to 8.3e-3 nats
    out = np.asarray(entropy(jnp.asarray(logits), chunk_size=chunk), np.float64)
    # measured max error 1.4e-7, every chunking (the lse - Σ p·z form: 1.9e-5 on the +25 row);
    # the 1e-6 bound is 7x above it.
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


def test_entropy_relative_accuracy_on_wide_rows():
    rng = np.random.RandomState(5)
    logits = np.concatenate([8 * rng.randn(1, 2, 32768), 3 * rng.randn(1, 2, 32768) + 25]).astype(np.float32)
    ref = np_entropy(logits)  # 2 to 7 nats
    # measured 1.0e-7 relative, chunked or not (without the two-level sum the chunk_size=1 path
    # was 1.8e-5; the lse - Σ p·z form is off by 6e-5 absolute, 1e-5 relative); 2e-6 is 16
    # float32 ulps, 20x the measured error
    np.testing.assert_allclose(entropy(jnp.asarray(logits)), ref, rtol=2e-6)
    np.testing.assert_allclose(entropy(jnp.asarray(logits), chunk_size=1), ref, rtol=2e-6)


def test_entropy_with_minus_inf_logits_is_that_of_the_kept_tokens():
    # top-k filtered logits: -inf entries carry p = 0 and add 0 (not NaN) to value and gradient
    logits = jnp.array([[[0.0, -jnp.inf, np.log(3.0), -jnp.inf]]])  # p = [1/4, 0, 3/4, 0]
    expected = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))  # 0.5623 nats
    np.testing.assert_allclose(entropy(logits), [[expected]], rtol=1e-6)  # ~8 float32 ulps
    grad = np.asarray(jax.grad(lambda z: entropy(z).sum())(logits))
    # dH/dz_v = -p_v (log p_v + H): -1/4 (log 1/4 + H), 0, -3/4 (log 3/4 + H), 0
    p = np.array([0.25, 0.0, 0.75, 0.0])
    np.testing.assert_allclose(grad[0, 0], -p * (np.log(np.where(p > 0, p, 1.0)) + expected), atol=1e-6)
