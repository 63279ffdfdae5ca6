import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.models import forward, get_config, init_scalar_model, pool_scores, sequence_scores, token_scores
from tests._tolerance import ulps

CONFIG = get_config("gpt2-tiny", vocab_size=64, max_seq_len=16)


@pytest.fixture(scope="module")
def params():
    return init_scalar_model(CONFIG, jax.random.key(0))


def test_token_scores_are_hidden_dot_kernel(params):
    tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, 64)
    hidden = forward(params["backbone"], CONFIG, tokens, return_hidden=True)
    scores = token_scores(params, CONFIG, tokens)
    ref = np.asarray(hidden) @ np.asarray(params["head"]["kernel"]) + float(params["head"]["bias"])
    # a 64-term dot, float32 vs float64: 64 ulps of max|score|; measured <= 1.5
    np.testing.assert_allclose(scores, ref, rtol=0, atol=ulps(64, ref))
    assert scores.shape == (2, 7) and scores.dtype == jnp.float32


def test_last_pool_reads_last_response_token_and_ignores_right_padding(params):
    tokens = jnp.array([[5, 6, 7, 8, 9, 0, 0], [5, 6, 7, 8, 9, 10, 11]])
    mask = jnp.array([[0, 0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]], jnp.float32)
    s = sequence_scores(params, CONFIG, tokens, mask)
    # row 0's score is at index 4 and equals the score of the unpadded 5-token sequence
    alone = token_scores(params, CONFIG, tokens[:1, :5])[0, -1]
    # 7 vs 5 tokens: other reduction shapes through 2 layers: 128 ulps of the scores (measured <= 15
    # ulps of s[0] = 0.11 with SSE4.2, 0 here, so not relative to the score itself)
    np.testing.assert_allclose(s[0], alone, rtol=0, atol=ulps(128, s))
    full = token_scores(params, CONFIG, tokens)
    np.testing.assert_allclose(s[1], full[1, 6], rtol=0, atol=ulps(128, full))  # two programs; measured equal


def test_mean_pool_and_errors():
    scores = jnp.array([[1.0, 2.0, 3.0, 4.0], [9.0, 9.0, 9.0, 9.0]])
    mask = jnp.array([[0, 1, 1, 0], [0, 0, 0, 0]], jnp.float32)
    np.testing.assert_allclose(pool_scores(scores, mask, pool="mean"), [2.5, 0.0])
    np.testing.assert_allclose(pool_scores(scores, mask, pool="last"), [3.0, 9.0])
    with pytest.raises(ValueError, match="pool"):
        pool_scores(scores, mask, pool="max")


def test_left_padded_with_positions_equals_unpadded(params):
    tokens = jnp.array([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    positions = jnp.array([[-1, -1, 0, 1, 2], [0, 1, 2, 3, 4]])
    mask = jnp.array([[0, 0, 0, 1, 1], [0, 0, 0, 1, 1]], jnp.float32)
    s = sequence_scores(params, CONFIG, tokens, mask, positions)
    # padded vs unpadded: other shapes, 128 ulps of the scores (see above); measured equal
    np.testing.assert_allclose(s[0], token_scores(params, CONFIG, tokens[:1, 2:])[0, -1], rtol=0, atol=ulps(128, s))
