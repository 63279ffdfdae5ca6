"""Generate from a pretrained model with the KV-cache decoder, and score text by its NLL.

Default: the real llama2.c TinyStories model stories260K and its SentencePiece tokenizer from
../shared/data/models/stories260K/:

  python -m experiments.generate                                   # greedy from BOS + NLL table
  python -m experiments.generate --prompt "Once upon a time" "Tom had a dog" \
      --temperature 0.8 --top-p 0.9 --max-new-tokens 120

With a tokenizer that has a chat template (a Hugging Face checkpoint directory with
`tokenizer.json`), each --prompt is sent as a user turn rendered by that template with the
assistant header (`--chat`, on by default there; `--no-chat` feeds the raw text):

  python -m experiments.generate --model /ckpt/Qwen2.5-0.5B-Instruct \\
      --tokenizer /ckpt/Qwen2.5-0.5B-Instruct --prompt "What is 17 * 3?" --max-new-tokens 64

The NLL table compares the model's mean negative log-likelihood per token of a few story
sentences with the same words shuffled: a model that learned English story structure assigns the
shuffled words a clearly higher NLL.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tyro

import jaxalign.data as jd
from experiments._common import (
    STORIES260K_MODEL,
    STORIES260K_TOKENIZER,
    decode_with_prompt,
    format_table,
    load_model_and_tokenizer,
    use_chat,
)
from jaxalign import SamplingConfig, TransformerConfig, forward, generate, token_logps

# Written for this check in the style of TinyStories (not taken from the training set).
DEFAULT_SENTENCES = (
    "Once upon a time, there was a little girl named Lily. She liked to play with her red ball.",
    "One day, a small dog found a big stick in the park. He was very happy and ran to his mom.",
    "Tom wanted to help his friend. They worked together and built a tall tower of blocks.",
    "The sun was warm and the birds were singing. Sue smiled and said, \"What a nice day!\"",
)


@dataclasses.dataclass
class Config:
    """Generate text and report NLL of sentences vs. shuffled words."""

    model: str = STORIES260K_MODEL
    """llama2.c .bin file, Hugging Face checkpoint directory, or (online) hub id."""
    tokenizer: str = STORIES260K_TOKENIZER
    """SentencePiece .model, .tiktoken ranks file, a Hugging Face directory with tokenizer.json,
    'gpt2' (online) or 'bytes'."""
    prompt: tuple[str, ...] = ("",)
    """Prompts (batched, left-padded); "" starts from BOS alone (not with --chat)."""
    chat: bool | None = None
    """Send each prompt as a user turn through the tokenizer's chat template (None: when it has
    one)."""
    max_new_tokens: int = 100
    temperature: float = 0.0
    """0 for greedy decoding."""
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    sentences: tuple[str, ...] = DEFAULT_SENTENCES
    """Text to score; each is also scored with its words shuffled."""
    json_out: Path | None = None
    """Write generations and NLL figures as JSON here."""


def mean_nll(params, config: TransformerConfig, tokenizer: jd.Tokenizer, text: str) -> float:
    """Mean negative log-likelihood (nats per token) of `text` after BOS (or its first token)."""
    ids = ([] if tokenizer.bos_id is None else [tokenizer.bos_id]) + tokenizer.encode(text)
    tokens = jnp.asarray([ids], jnp.int32)
    logits = forward(params, config, tokens[:, :-1])
    return float(-jnp.mean(token_logps(logits, tokens[:, 1:])))


def shuffle_words(text: str, seed: int) -> str:
    """The same words in a random order (fixed by `seed`)."""
    words = text.split()
    order = np.random.default_rng(seed).permutation(len(words))
    return " ".join(words[i] for i in order)


def prompt_batch(cfg: Config, tokenizer: jd.Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded --prompt tokens and mask: chat-rendered user turns (`jd.encode_chat` with
    the assistant header) or BOS + the raw text.

    Raises:
      ValueError: --chat with a tokenizer that has no chat template; an empty prompt under
        --chat (`encode_chat` names the turn and field).
    """
    if not use_chat(cfg.chat, tokenizer, cfg.tokenizer):
        return jd.collate_prompts(cfg.prompt, tokenizer)
    rows = []
    for i, text in enumerate(cfg.prompt):
        try:
            rows.append(jd.encode_chat(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)[0])
        except ValueError as err:
            raise ValueError(f"--prompt[{i}]: {err}") from err
    return jd.pad_prompts(rows, pad_id=tokenizer.pad_id)


def main(argv: list[str] | None = None) -> dict:
    """Runs generation and the NLL comparison; prints both; returns them.

    Generates min(--max-new-tokens, context − prompt width) tokens.

    Raises:
      ValueError: a tokenizer with more ids than the model's vocabulary, or a --prompt that
        leaves no room in the model's context ("--prompt[i] is N tokens (with BOS), the model's
        context is M (config.max_seq_len of --model) ...", before any generation).
    """
    cfg = tyro.cli(Config, args=argv)
    config, params, tokenizer = load_model_and_tokenizer(cfg.model, cfg.tokenizer)

    tokens, mask = prompt_batch(cfg, tokenizer)
    if tokens.shape[1] >= config.max_seq_len:  # else max_new below would be <= 0
        longest = int(np.argmax(mask.sum(axis=1)))
        raise ValueError(
            f"--prompt[{longest}] is {tokens.shape[1]} tokens (with BOS), the model's context is "
            f"{config.max_seq_len} (config.max_seq_len of --model): shorten it to at most "
            f"{config.max_seq_len - 1} tokens to leave room for a new one"
        )
    max_new = min(cfg.max_new_tokens, config.max_seq_len - tokens.shape[1])
    gen = generate(
        params, config, jnp.asarray(tokens), jnp.asarray(mask),
        rng=jax.random.key(cfg.seed), sampling=SamplingConfig(max_new_tokens=max_new, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id),)
    texts = []
    for i in range(len(cfg.prompt)):
        n = int(gen.lengths[i])
        texts.append(decode_with_prompt(tokenizer, tokens[i], mask[i], gen.tokens[i], n))
        print(f"--- sample {i} ({n} tokens, mean model log-prob {float(gen.model_logps[i, :n].mean()):.3f})")
        print(texts[-1])

    rows = []
    for j, sentence in enumerate(cfg.sentences):
        shuffled = shuffle_words(sentence, cfg.seed + j)
        rows.append((mean_nll(params, config, tokenizer, sentence), mean_nll(params, config, tokenizer, shuffled)))
    nll = np.array(rows)
    table = [(j, a, b) for j, (a, b) in enumerate(rows)] + [("mean", nll[:, 0].mean(), nll[:, 1].mean())]
    print("\n" + format_table("sentence", ("NLL (nats/token)", "shuffled words"), table, widths=(10, 18, 18)))
    result = {
        "samples": texts,
        "nll": nll[:, 0].tolist(),
        "nll_shuffled": nll[:, 1].tolist(),
        "mean_nll": float(nll[:, 0].mean()),
        "mean_nll_shuffled": float(nll[:, 1].mean()),
    }
    if cfg.json_out is not None:
        cfg.json_out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
