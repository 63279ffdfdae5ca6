"""jaxalign: the LLM alignment stack as pure, jit-compiled JAX functions."""

from jaxalign.decoding import Generation, generate, sampling_logits
from jaxalign.advantages import gae, group_advantages, kl_penalty, masked_whiten, rloo_advantages
from jaxalign.checkpoint import make_checkpoint_manager, restore_checkpoint, save_checkpoint
from jaxalign.lora import (
    LoraConfig,
    apply_lora,
    init_lora,
    lora_weight_decay_mask,
    make_lora_loss_fn,
    make_lora_optimizer,
    merge_lora,
    unmerge_lora,
)
from jaxalign.memory import estimate_memory
from jaxalign.models.hf_export import export_hf
from jaxalign.logprobs import entropy, sequence_logps, token_logps
from jaxalign.losses import (
    dpo_loss,
    grpo_denominator,
    grpo_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sft_loss,
)
from jaxalign.metrics import MetricsWriter, plot_metrics, read_metrics
from jaxalign.models import (
    KVCache,
    Transformer,
    TransformerConfig,
    forward,
    get_config,
    init_cache,
    init_params,
    load_hf_checkpoint,
    load_llama2c,
    load_pretrained,
    num_params,
    param_logical_axes,
)
from jaxalign.optim import OptimConfig, make_optimizer
from jaxalign.trainers import (
    TrainState,
    create_train_state,
    make_dpo_step,
    make_sft_eval_step,
    make_sft_step,
    make_train_step,
    reference_logps,
    train_loop,
)

__version__ = "0.1.0"

__all__ = [
    "Generation",
    "LoraConfig",
    "apply_lora",
    "estimate_memory",
    "export_hf",
    "init_lora",
    "lora_weight_decay_mask",
    "make_lora_loss_fn",
    "make_lora_optimizer",
    "merge_lora",
    "unmerge_lora",
    "KVCache",
    "MetricsWriter",
    "OptimConfig",
    "TrainState",
    "Transformer",
    "TransformerConfig",
    "create_train_state",
    "dpo_loss",
    "entropy",
    "forward",
    "gae",
    "generate",
    "get_config",
    "group_advantages",
    "grpo_denominator",
    "grpo_loss",
    "init_cache",
    "kl_penalty",
    "init_params",
    "load_hf_checkpoint",
    "load_llama2c",
    "load_pretrained",
    "make_checkpoint_manager",
    "make_dpo_step",
    "make_optimizer",
    "make_sft_eval_step",
    "make_sft_step",
    "make_train_step",
    "masked_whiten",
    "num_params",
    "param_logical_axes",
    "plot_metrics",
    "ppo_policy_loss",
    "ppo_value_loss",
    "read_metrics",
    "reference_logps",
    "restore_checkpoint",
    "rloo_advantages",
    "sampling_logits",
    "save_checkpoint",
    "sft_loss",
    "sequence_logps",
    "token_logps",
    "train_loop",
]
