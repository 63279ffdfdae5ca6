"""Pure alignment losses: arrays in, `(loss, metrics)` out; no model calls."""

from jaxalign.losses.dpo import DPO_LOSSES, dpo_loss
from jaxalign.losses.sft import sft_loss

__all__ = ["DPO_LOSSES", "dpo_loss", "sft_loss"]
