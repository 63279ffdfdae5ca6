"""Decoder-only transformer models: configs, the pure forward pass, checkpoint importers."""

from jaxalign.models.config import (
    PRESETS,
    RopeScaling,
    TransformerConfig,
    get_config,
    moe_layers_from_hf,
    num_params,
    train_flops_per_token,
)
from jaxalign.models.heads import (
    apply_scalar_head,
    init_scalar_head,
    init_scalar_model,
    pool_scores,
    sequence_scores,
    token_scores,
)
from jaxalign.models.hf import (
    deepseek_config_from_hf,
    load_hf_checkpoint,
    load_state_dict,
    mla_params_from_state_dict,
    moe_config_from_hf,
    moe_params_from_state_dict,
)
from jaxalign.models.llama2c import load_llama2c
from jaxalign.models.load import load_pretrained
from jaxalign.models.mla import (
    MLAConfig,
    MLAttention,
    YarnScaling,
    gqa_cache_bytes_per_token,
    mla_cache_bytes_per_token,
)
from jaxalign.models.moe import (
    MoE,
    MoEConfig,
    RouterStats,
)
from jaxalign.models.transformer import (
    KVCache,
    Transformer,
    forward,
    forward_with_cache,
    init_cache,
    init_params,
    logits_from_hidden,
    param_logical_axes,
    stack_cache,
    stack_layers,
    unstack_cache,
    unstack_layers,
)
from jaxalign.models.upcycle import upcycle_ffn, upcycle_to_moe

__all__ = [
    "KVCache",
    "MLAConfig",
    "MLAttention",
    "MoE",
    "MoEConfig",
    "PRESETS",
    "RopeScaling",
    "RouterStats",
    "Transformer",
    "TransformerConfig",
    "YarnScaling",
    "apply_scalar_head",
    "deepseek_config_from_hf",
    "forward",
    "forward_with_cache",
    "get_config",
    "gqa_cache_bytes_per_token",
    "init_cache",
    "init_params",
    "init_scalar_head",
    "init_scalar_model",
    "load_hf_checkpoint",
    "load_llama2c",
    "load_pretrained",
    "load_state_dict",
    "logits_from_hidden",
    "mla_cache_bytes_per_token",
    "mla_params_from_state_dict",
    "moe_config_from_hf",
    "moe_layers_from_hf",
    "moe_params_from_state_dict",
    "num_params",
    "param_logical_axes",
    "pool_scores",
    "sequence_scores",
    "stack_cache",
    "stack_layers",
    "token_scores",
    "train_flops_per_token",
    "unstack_cache",
    "unstack_layers",
    "upcycle_ffn",
    "upcycle_to_moe",
]
