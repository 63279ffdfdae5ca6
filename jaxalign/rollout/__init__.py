"""RL sampling: one sample-and-score path (`sample`) under the GRPO rollout, the PPO rollout
and policy evaluation, each returning a `RolloutOutput`.

No optimiser here (DESIGN.md): a trainer calls `grpo_rollout` (G samples per prompt,
group-relative advantages) or `ppo_rollout` (one sample per prompt, a critic, per-token
KL-penalised rewards and GAE), then optimises on the `Rollout` / `PPORollout` it returns.
The teacher-forced scoring they use is `jaxalign.scoring`.
"""

from jaxalign.rollout.grpo import Rollout, grpo_rollout
from jaxalign.rollout.ppo import PPORollout, ScoreFn, ppo_rollout
from jaxalign.rollout.sample import (
    RolloutOutput,
    Samples,
    decode_completions,
    evaluate_policy,
    rule_rewards,
    sample,
)

__all__ = [
    "PPORollout",
    "RolloutOutput",
    "Rollout",
    "Samples",
    "ScoreFn",
    "decode_completions",
    "evaluate_policy",
    "grpo_rollout",
    "ppo_rollout",
    "rule_rewards",
    "sample",
]

# Teacher-forced scoring moved to `jaxalign.scoring`; importing it from here still works for
# one release (with a DeprecationWarning).
_MOVED_TO_SCORING = {
    "Critic", "completion_hidden", "completion_logps", "init_actor_critic", "policy_and_values",
    "reward_model_scorer",
}


def __getattr__(name: str):
    if name in _MOVED_TO_SCORING:
        import importlib
        import warnings

        scoring = importlib.import_module("jaxalign.scoring")
        warnings.warn(f"jaxalign.rollout.{name} moved to jaxalign.scoring.{name}", DeprecationWarning, stacklevel=2)
        return getattr(scoring, name)
    raise AttributeError(f"module 'jaxalign.rollout' has no attribute {name!r}")
