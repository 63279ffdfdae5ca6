"""Data layer: tokenizers, dataset loaders, and collation into static-shape batches."""

from jaxalign.data.collate import (
    BatchStream,
    Example,
    PreferenceExample,
    bucket_length,
    collate_preference,
    collate_sft,
    default_buckets,
    eval_batches,
    tokenize_preference,
    tokenize_prompt_completion,
    tokenize_sft,
)
from jaxalign.data.datasets import (
    alpaca_prompt,
    load_preference_dataset,
    load_records,
    load_sft_dataset,
    messages_prompt,
    sft_view,
    stack_exchange_prompt,
)
from jaxalign.data.synthetic import sorting_task
from jaxalign.data.tokenizers import (
    TiktokenTokenizer,
    Tokenizer,
    byte_tokenizer,
    gpt2_tokenizer,
    load_tokenizer,
)

__all__ = [
    "BatchStream",
    "Example",
    "PreferenceExample",
    "TiktokenTokenizer",
    "Tokenizer",
    "alpaca_prompt",
    "bucket_length",
    "byte_tokenizer",
    "collate_preference",
    "collate_sft",
    "default_buckets",
    "eval_batches",
    "gpt2_tokenizer",
    "load_preference_dataset",
    "load_records",
    "load_sft_dataset",
    "load_tokenizer",
    "messages_prompt",
    "sft_view",
    "sorting_task",
    "stack_exchange_prompt",
    "tokenize_preference",
    "tokenize_prompt_completion",
    "tokenize_sft",
]
