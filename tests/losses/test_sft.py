import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxalign.losses import sft_loss
from jaxalign.metrics import compilations
from tests._tolerance import ulps


@pytest.fixture
def data():
    rng = np.random.RandomState(1)
    logits = rng.randn(2, 6, 9).astype(np.float32) * 2
    labels = rng.randint(0, 9, (2, 6))
    mask = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], np.float32)
    return logits, labels, mask


def test_hand_computed():
    # Two tokens counted: -log(3/4) and -log(1/4); the prompt token (mask 0) must not count.
    logits = jnp.array([[[0.0, np.log(3.0)], [0.0, np.log(3.0)], [5.0, 0.0]]])
    labels = jnp.array([[1, 0, 1]])
    mask = jnp.array([[1.0, 1.0, 0.0]])
    loss, m = sft_loss(logits, labels, mask)
    np.testing.assert_allclose(loss, (np.log(4 / 3) + np.log(4)) / 2, rtol=1e-6)  # a few float32 roundings (exp/log1p within ~1 ulp each): 8 ulps
    assert float(m["num_tokens"]) == 2.0
    np.testing.assert_allclose(m["token_accuracy"], 0.5)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_matches_torch_cross_entropy(data, smoothing):
    logits, labels, mask = data
    loss, _ = sft_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask), label_smoothing=smoothing)
    sel = mask.reshape(-1) > 0
    ref = torch.nn.functional.cross_entropy(
        torch.tensor(logits.reshape(-1, 9)[sel]), torch.tensor(labels.reshape(-1)[sel]), label_smoothing=smoothing
    )
    np.testing.assert_allclose(loss, ref.item(), rtol=1e-5)  # vs torch, a mean of 9-way lse: 84 ulps; measured 0.6


def test_masked_equals_sliced(data):
    logits, labels, mask = map(jnp.asarray, data)
    full, _ = sft_loss(logits, labels, mask)
    row0, m0 = sft_loss(logits[:1, 2:5], labels[:1, 2:5], jnp.ones((1, 3)))
    row1, m1 = sft_loss(logits[1:, 1:], labels[1:, 1:], jnp.ones((1, 5)))
    # a sum of 8 per-token losses regrouped as 3 + 5: up to 8 roundings, 32 ulps; measured equal
    np.testing.assert_allclose(full, (m0["loss_sum"] + m1["loss_sum"]) / 8, rtol=ulps(32))


def test_chunked_equals_unchunked(data):
    logits, labels, mask = map(jnp.asarray, data)
    a, _ = sft_loss(logits, labels, mask, label_smoothing=0.1)
    b, _ = sft_loss(logits, labels, mask, label_smoothing=0.1, chunk_size=4)
    np.testing.assert_allclose(a, b, rtol=ulps(32))  # chunks regroup the token sum (see above); measured equal


def test_gradient_finite_and_matches_closed_form(data):
    logits, labels, mask = map(jnp.asarray, data)
    grad = jax.grad(lambda z: sft_loss(z, labels, mask)[0])(logits)
    assert np.all(np.isfinite(grad))
    expected = (jax.nn.softmax(logits) - jax.nn.one_hot(labels, 9)) * mask[..., None] / mask.sum()
    np.testing.assert_allclose(grad, expected, atol=1e-6)  # |grad| <= 1/8: 67 ulps of it; measured equal


def test_empty_mask_gives_zero_not_nan(data):
    logits, labels, _ = map(jnp.asarray, data)
    loss, _ = sft_loss(logits, labels, jnp.zeros((2, 6)))
    assert float(loss) == 0.0


def test_no_recompile(data):
    logits, labels, mask = map(jnp.asarray, data)
    fn = jax.jit(lambda z, y, m: sft_loss(z, y, m)[0])
    doubled = logits * 2
    with compilations(fn) as compiled:
        fn(logits, labels, mask)
        fn(doubled, labels, mask)
    assert len(compiled) == 1


def test_bad_smoothing_raises(data):
    logits, labels, mask = map(jnp.asarray, data)
    with pytest.raises(ValueError, match="label_smoothing"):
        sft_loss(logits, labels, mask, label_smoothing=1.0)
