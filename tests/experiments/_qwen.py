"""A Qwen2.5-Instruct-shaped checkpoint directory, built offline for the end-to-end tests.

`transformers`' `Qwen2ForCausalLM` with random weights (saved with `save_pretrained`), plus the
tokenizer files of tests/data/test_hf_tokenizer.py's "qwen" kind: a byte-level BPE
`tokenizer.json` trained with `tokenizers` on local text, `<|im_start|>` / `<|im_end|>` /
`<|endoftext|>` as special tokens, Qwen2.5-Instruct's own chat template in
`tokenizer_config.json`, and `generation_config.json` with its two stop ids. This is the layout
of a real `Qwen/Qwen2.5-0.5B-Instruct` download, at a size that trains in seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

from tests.data.test_hf_tokenizer import write_checkpoint


def qwen_checkpoint(directory: Path, *, hidden: int = 64, layers: int = 2, context: int = 512) -> Path:
    """Writes the checkpoint into `directory` (created) and returns it.

    The model's vocabulary is the tokenizer's (max id + 1), q/k/v biases on as in Qwen2, tied
    embeddings as in Qwen2.5-0.5B; weights are `transformers`' N(0, 0.02) init under seed 0.
    """
    import tokenizers
    import torch
    import transformers

    write_checkpoint(directory, "qwen")
    vocab = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab_size(True)
    config = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
        tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    generation = (directory / "generation_config.json").read_text()
    model.save_pretrained(directory)  # config.json, model.safetensors, generation_config.json
    (directory / "generation_config.json").write_text(generation)  # Qwen's stop ids, not HF's
    return directory
