"""Decoder-only transformer models: configs, the pure forward pass, checkpoint importers."""

from jaxalign.models.config import (
    PRESETS,
    TransformerConfig,
    get_config,
    num_params,
    train_flops_per_token,
)
from jaxalign.models.hf import load_hf_checkpoint, load_state_dict
from jaxalign.models.transformer import (
    Transformer,
    forward,
    init_params,
    logits_from_hidden,
    param_logical_axes,
)

__all__ = [
    "PRESETS",
    "Transformer",
    "TransformerConfig",
    "forward",
    "get_config",
    "init_params",
    "load_hf_checkpoint",
    "load_state_dict",
    "logits_from_hidden",
    "num_params",
    "param_logical_axes",
    "train_flops_per_token",
]
