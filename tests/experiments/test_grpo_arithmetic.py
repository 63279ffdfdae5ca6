"""A tiny end-to-end GRPO run: cold-start SFT, then GRPO raises held-out sampled accuracy."""

import pytest

from experiments.grpo_arithmetic import make_problems
from tests.experiments._run import run_experiment


@pytest.mark.slow
def test_grpo_raises_heldout_sampled_accuracy(tmp_path):
    summary, _ = run_experiment("experiments.grpo_arithmetic", ["--output-dir", str(tmp_path), "--no-progress",
                                                                "--eval-every", "1000"])
    # The cold-start SFT is chaotic in float rounding: a change of XLA's reduction order (e.g. the
    # optimizer's apply_if_finite wrapper) moved its held-out accuracy from 0.18 to 0.39 sampled
    # (0.39 -> 0.63 greedy) with the same seed. Measured: sampled pass@1 0.183 -> 0.226 then,
    # 0.389 -> 0.400 now (800 draws, s.e. of the gain ~0.02), train reward 0.179 -> 0.214 then,
    # 0.371 -> 0.410 now (60 iterations x 256 samples, s.e. ~0.01 each end).
    assert summary["heldout_accuracy_sampled_grpo"] > summary["heldout_accuracy_sampled_sft"]
    assert summary["train_reward_last"] > summary["train_reward_first"] + 0.02
    # inference-time scaling of the GRPO model, 16 samples per held-out problem
    scaling = summary["scaling"]
    assert all(len(curve) == 16 for curve in scaling.values())
    passes = scaling["pass"]
    assert all(a <= b for a, b in zip(passes, passes[1:]))  # the unbiased pass@k grows with k
    assert all(passes[-1] >= scaling[name][-1] for name in scaling)  # pass@n: any of the n correct
    # pass@1 and the 4-draw sampled accuracy estimate one number (200 problems: s.e. ~0.03 each)
    assert abs(passes[0] - summary["heldout_accuracy_sampled_grpo"]) < 0.1
    assert scaling["maj"][-1] > scaling["maj"][0]  # self-consistency helps (measured: see README)
    assert (tmp_path / "scaling.png").stat().st_size > 0


def test_problems_are_distinct_and_correct():
    problems = make_problems(500, digits=2, seed=1)
    assert len({p for p, _ in problems}) == 500
    for prompt, answer in problems:
        a, b = prompt.rstrip("=").split("+")
        assert int(a) + int(b) == int(answer)
    with pytest.raises(ValueError, match="distinct"):
        make_problems(10_001, digits=2, seed=0)
