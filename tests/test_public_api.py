"""The public contract: every name DESIGN.md promises imports from the top level, and
`jaxalign.__all__` is sorted, unique and importable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import jaxalign

DESIGN = Path(__file__).resolve().parents[1].parent / "shared" / "DESIGN.md"

# The names of DESIGN.md's "Public contract" (kept here too, so the check runs where ../shared
# is absent), plus the masked ops its "Masks mean select" paragraph names.
CONTRACT = (
    "token_logps", "sequence_logps", "entropy",
    "sft_loss", "pairwise_reward_loss", "dpo_loss", "ppo_policy_loss", "ppo_value_loss", "grpo_loss",
    "gae", "group_advantages", "kl_penalty",
    "Transformer", "forward", "load_hf_checkpoint", "export_hf", "load_llama2c",
    "SamplingConfig", "generate", "Generation",
    "masked_sum", "masked_mean", "masked_whiten", "last_token_index",
)


def design_names() -> list[str]:
    """Identifiers that open a line of DESIGN.md's public-contract code block (`name(`)."""
    text = DESIGN.read_text()
    block = text.split("## Public contract", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    return sorted({m.group(1) for m in re.finditer(r"^(\w+)(?:\(|\.apply)", block, re.M)})


def test_contract_names_import_from_the_top_level():
    missing = [n for n in CONTRACT if not hasattr(jaxalign, n)]
    assert not missing
    assert set(CONTRACT) <= set(jaxalign.__all__)


@pytest.mark.skipif(not DESIGN.exists(), reason="../shared/DESIGN.md is absent")
def test_every_name_in_design_md_imports_from_the_top_level():
    names = design_names()
    assert len(names) >= 18, names  # the parser found the block (19 names today)
    assert set(names) <= set(CONTRACT), sorted(set(names) - set(CONTRACT))
    assert [n for n in names if not hasattr(jaxalign, n)] == []


def test_all_is_sorted_unique_and_importable():
    names = jaxalign.__all__
    assert names == sorted(names)
    assert len(names) == len(set(names))
    for name in names:
        assert getattr(jaxalign, name) is not None, name
    namespace = {}
    exec("from jaxalign import *", namespace)  # noqa: S102 - the star import researchers may write
    assert set(names) <= set(namespace)


def test_moved_names_still_import_from_their_old_modules():
    """One release of grace for the restructuring's moves (with a DeprecationWarning)."""
    import jaxalign.rollout
    import jaxalign.scoring
    import jaxalign.sharding
    import jaxalign.trainers.state
    import jaxalign.trainers.step

    with pytest.warns(DeprecationWarning, match="moved to jaxalign.trainers.step.step_shardings"):
        assert jaxalign.sharding.step_shardings is jaxalign.trainers.step.step_shardings
    with pytest.warns(DeprecationWarning, match="moved to jaxalign.scoring.completion_logps"):
        assert jaxalign.rollout.completion_logps is jaxalign.scoring.completion_logps
    assert jaxalign.trainers.state.make_train_step is jaxalign.trainers.step.make_train_step
    with pytest.raises(AttributeError):
        jaxalign.sharding.not_a_name  # noqa: B018
