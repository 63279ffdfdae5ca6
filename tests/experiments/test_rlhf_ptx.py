"""rlhf_stories' PPO-ptx data: batches that are a pure function of the optimizer step."""

import numpy as np
import pytest

import jaxalign.data as jd
from experiments import rlhf_stories


def test_ptx_batches_are_a_function_of_the_step_with_one_shape():
    rng = np.random.default_rng(0)
    samples = [jd.Example(rng.integers(1, 50, n).astype(np.int32), np.r_[np.zeros(3), np.ones(n - 3)].astype(np.float32))
               for n in rng.integers(5, 30, 20)]
    at = rlhf_stories.ptx_batches(samples, batch_size=4, seed=7, pad_id=0)
    again = rlhf_stories.ptx_batches(samples, batch_size=4, seed=7, pad_id=0)  # a resumed run rebuilds it
    for n in (0, 1, 5):
        for k in ("tokens", "mask"):
            np.testing.assert_array_equal(at(n)[k], again(n)[k])
    assert not np.array_equal(at(0)["tokens"], at(1)["tokens"])
    assert {at(n)["tokens"].shape for n in range(10)} == {(4, 32)}  # longest 29, rounded up to 8
    batch = at(3)
    lengths = (batch["tokens"] != 0).sum(1)
    # every token after the first counts (prompt included: it is story text too); padding does not
    np.testing.assert_array_equal(batch["mask"], (np.arange(32)[None] >= 1) & (np.arange(32)[None] < lengths[:, None]))
    with pytest.raises(ValueError, match="ptx_batch=40"):
        rlhf_stories.ptx_batches(samples, batch_size=40, seed=7, pad_id=0)


def test_negative_ptx_coef_is_refused_before_any_compute(tmp_path):
    with pytest.raises(ValueError, match="--ptx-coef"):
        rlhf_stories.main(["--output-dir", str(tmp_path), "--no-progress", "--ptx-coef", "-1"])
    assert not any(tmp_path.iterdir())
