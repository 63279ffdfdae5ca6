"""jaxalign.ops: masked reductions with select semantics (hand-computed values, NaN padding)."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.ops import (
    last_token_index,
    masked_count,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    select,
)

X = jnp.array([[1.0, 2.0, jnp.nan, 4.0], [jnp.inf, 3.0, -jnp.inf, 5.0]])
MASK = jnp.array([[1, 0, 0, 1], [0, 1, 0, 1]], jnp.float32)


def test_select_and_sums_ignore_nan_and_inf_at_masked_positions():
    np.testing.assert_array_equal(select(MASK, X), [[1, 0, 0, 4], [0, 3, 0, 5]])
    np.testing.assert_array_equal(select(MASK, X, fill=-1.0)[0], [1, -1, -1, 4])
    # Exact: small integers are exact in float32.
    assert float(masked_sum(X, MASK)) == 13.0
    np.testing.assert_array_equal(masked_sum(X, MASK, axis=-1), [5.0, 8.0])
    np.testing.assert_array_equal(masked_mean(X, MASK, axis=-1), [2.5, 4.0])
    assert float(masked_count(MASK)) == 4.0
    assert float(masked_mean(X, MASK)) == 13.0 / 4
    # A bool mask and a {0,1} float mask select the same entries.
    assert float(masked_sum(X, MASK.astype(bool))) == 13.0


def test_empty_mask_gives_zero_not_nan():
    empty = jnp.zeros_like(MASK)
    assert float(masked_mean(X, empty)) == 0.0
    np.testing.assert_array_equal(masked_mean(X, empty, axis=-1), [0.0, 0.0])
    np.testing.assert_array_equal(last_token_index(jnp.array([[0, 0, 0], [1, 1, 0], [0, 1, 1]])), [-1, 1, 2])


def test_masked_var_and_whiten_hand_computed():
    # Counted entries 1, 4, 3, 5: mean 13/4, unbiased variance (sum of squares 2.25²+.75²+.25²+1.75²)/3.
    var = (2.25**2 + 0.75**2 + 0.25**2 + 1.75**2) / 3
    np.testing.assert_allclose(masked_var(X, MASK), var, rtol=4 * np.finfo(np.float32).eps)  # 4 terms
    np.testing.assert_allclose(masked_var(X, MASK, unbiased=False), var * 3 / 4, rtol=4 * np.finfo(np.float32).eps)
    out = masked_whiten(X, MASK, eps=0.0)
    expected = np.where(MASK, (np.array([[1, 0, 0, 4], [0, 3, 0, 5.0]]) - 3.25) / np.sqrt(var), 0.0)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)  # O(1) values, a handful of ulps
    kept = masked_whiten(X, MASK, shift_mean=False, eps=0.0)
    np.testing.assert_allclose(kept, np.where(MASK, expected + 3.25, 0.0), rtol=1e-6, atol=1e-6)


def test_gradients_are_zero_at_masked_positions_and_finite():
    x = X.at[1, 0].set(7.0)  # keep one inf and one nan at masked positions
    g = jax.grad(lambda v: masked_mean(v, MASK))(x)
    np.testing.assert_array_equal(g, MASK / 4)
    g = jax.grad(lambda v: jnp.sum(masked_whiten(v, MASK)))(x)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[np.asarray(MASK) == 0] == 0)
