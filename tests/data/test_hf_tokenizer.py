"""HFTokenizer against transformers' AutoTokenizer on small locally trained checkpoints.

Three checkpoints are built once per module with the `tokenizers` trainer (a few hundred lines,
vocab ~500): a Qwen-style byte-level BPE (no BOS, ChatML specials, the template in
tokenizer_config.json), a Llama-3-style one (BOS post-processor, the template in
chat_template.jinja, extra stop ids in generation_config.json) and a Gemma-style SentencePiece-like
BPE with byte fallback (legacy special_tokens_map.json, the template as a named list). The
builders are imported by test_chat.py too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import transformers
from huggingface_hub.errors import EntryNotFoundError
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

import jaxalign.data.tokenizers as jtok
from jaxalign.data import ChatTemplate, HFTokenizer, Tokenizer, hf_tokenizer, load_tokenizer

TEMPLATES = Path(__file__).resolve().parent / "chat_templates"
SHARED_SFT = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "sft" / "instruction-data.json").resolve()

TEXTS = [
    "Hello world",
    "",
    " leading and trailing spaces  ",
    "Héllo, wörld! 你好 🎉\n\ttabs  and   spaces\r\n' it's 3.14",
    "line one\n\n\nline two\n",
    "naïve café — “quotes” ½ ∑ 𝔘𝔫𝔦",
    "The spelling of the given phrase \"freind\" is incorrect.",
]

# Llama 3.2 renders today's date through strftime_now; most tests pin it.
DATE = {"date_string": "26 Jul 2024"}

_FALLBACK_CORPUS = """Below is an instruction that describes a task. Write a response that appropriately completes the request.
Convert 45 kilometers to meters. 45 kilometers is 45000 meters.
Edit the following sentence for grammar. He go to the park every day. He goes to the park every day.
What is the capital of France? The capital of France is Paris.
Rewrite the sentence in passive voice: The chef cooked the meal. The meal was cooked by the chef.
Name three primary colors. Red, blue and yellow.
"""


def corpus() -> list[str]:
    """A few hundred lines of instruction data (the shared SFT file if present), plus unicode."""
    if SHARED_SFT.is_file():
        rows = json.loads(SHARED_SFT.read_text())[:300]
        lines = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in rows]
    else:
        lines = _FALLBACK_CORPUS.splitlines() * 20
    return lines  # the test texts stay unseen, so they are tokenized by merges, not memorised


# Qwen2 / Llama 3 split pattern (a GPT-4-style regex), then byte-level BPE.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def byte_level_bpe(specials: list[str], bos: str | None = None) -> tokenizers.Tokenizer:
    """A Qwen2 / Llama 3 style tokenizer.json: NFC, regex split, byte-level BPE, specials added
    after the learned vocabulary; with ``bos`` the post-processor prepends it (Llama 3)."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(SPLIT_PATTERN), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in specials])
    if bos is None:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        bos_pair = (bos, tok.token_to_id(bos))
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=True),
                processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[bos_pair]),
            ]
        )
    return tok


GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]


def gemma_like_bpe() -> tokenizers.Tokenizer:
    """A Gemma-style tokenizer.json (the pipeline transformers' GemmaTokenizer builds): spaces
    normalised to "▁", BPE with byte fallback (<0xNN> pieces), "<bos>" prepended."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=GEMMA_SPECIALS, show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    first = max(vocab.values()) + 1
    vocab |= {f"<0x{b:02X}>": first + b for b in range(256)}
    tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
    )
    return tok


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>", "<|eom_id|>", "<|python_tag|>",
]


def write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, ensure_ascii=False, indent=2), encoding="utf-8")


def write_checkpoint(directory: Path, kind: str, *, chat_template: str | None = None) -> Path:
    """Write a small checkpoint of ``kind`` ("qwen" | "llama" | "gemma") into ``directory``,
    laid out as the real ones (config keys of Qwen2.5-Instruct, Llama-3.x-Instruct, gemma-2-it).
    ``chat_template`` replaces the model's template text."""
    directory.mkdir(parents=True, exist_ok=True)
    if kind == "qwen":
        tok = byte_level_bpe(QWEN_SPECIALS)
        tok.save(str(directory / "tokenizer.json"))
        write_json(directory / "tokenizer_config.json", {
            "add_bos_token": False,
            "added_tokens_decoder": {
                str(tok.token_to_id(s)): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                         "single_word": False, "special": True}
                for s in QWEN_SPECIALS
            },
            "bos_token": None,
            "chat_template": chat_template or (TEMPLATES / "qwen2.5-instruct.jinja").read_text(),
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        })
        write_json(directory / "generation_config.json", {
            "bos_token_id": tok.token_to_id("<|endoftext|>"),
            "eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")],
        })
    elif kind == "llama":
        tok = byte_level_bpe(LLAMA_SPECIALS, bos="<|begin_of_text|>")
        tok.save(str(directory / "tokenizer.json"))
        write_json(directory / "tokenizer_config.json", {
            "bos_token": "<|begin_of_text|>",
            "clean_up_tokenization_spaces": True,
            "eos_token": "<|eot_id|>",
            "model_input_names": ["input_ids", "attention_mask"],
            "tokenizer_class": "PreTrainedTokenizerFast",
        })
        template = chat_template or (TEMPLATES / "llama-3.2-instruct.jinja").read_text()
        (directory / "chat_template.jinja").write_text(template, encoding="utf-8")
        write_json(directory / "generation_config.json", {
            "bos_token_id": tok.token_to_id("<|begin_of_text|>"),
            "eos_token_id": [tok.token_to_id(s) for s in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")],
        })
    elif kind == "gemma":
        tok = gemma_like_bpe()
        tok.save(str(directory / "tokenizer.json"))
        template = chat_template or (TEMPLATES / "gemma-2-it.jinja").read_text()
        # legacy layout: no added_tokens_decoder, so special_tokens_map.json is read and wins
        write_json(directory / "tokenizer_config.json", {
            "add_bos_token": True,
            "bos_token": "<bos>",
            "chat_template": [{"name": "default", "template": template}, {"name": "rag", "template": "{{ 'rag' }}"}],
            "clean_up_tokenization_spaces": False,
            "eos_token": "<eos>",
            "pad_token": "<eos>",
            "tokenizer_class": "GemmaTokenizer",
            "unk_token": "<unk>",
        })
        write_json(directory / "special_tokens_map.json", {
            "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
            "bos_token": {"content": "<bos>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
            "eos_token": "<eos>",
            "pad_token": {"content": "<pad>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
            "unk_token": "<unk>",
        })
    else:
        raise ValueError(kind)
    return directory


KINDS = ("qwen", "llama", "gemma")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_checkpoints")
    return {kind: write_checkpoint(root / kind, kind) for kind in KINDS}


@pytest.fixture(scope="module")
def ours(checkpoints) -> dict[str, HFTokenizer]:
    return {kind: hf_tokenizer(path) for kind, path in checkpoints.items()}


@pytest.fixture(scope="module")
def theirs(checkpoints) -> dict[str, transformers.PreTrainedTokenizerBase]:
    return {kind: transformers.AutoTokenizer.from_pretrained(path) for kind, path in checkpoints.items()}


@pytest.fixture(scope="module")
def theirs_split(checkpoints) -> dict[str, transformers.PreTrainedTokenizerBase]:
    """transformers with special-token text split as ordinary text (HFTokenizer.encode's rule)."""
    return {kind: transformers.AutoTokenizer.from_pretrained(path, split_special_tokens=True) for kind, path in checkpoints.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_encode_matches_transformers(kind, ours, theirs):
    for text in TEXTS:
        expected = theirs[kind].encode(text, add_special_tokens=False)
        assert ours[kind].encode(text) == expected, text
    assert len(ours[kind].encode(TEXTS[3])) > 10  # a real merge-level tokenization, not bytes only


@pytest.mark.parametrize("kind", KINDS)
def test_special_token_text_stays_ordinary(kind, ours, theirs, theirs_split):
    tok = ours[kind]
    specials = {tok.tokenizer.token_to_id(s) for s in tok.special_tokens}
    eos_text = tok.tokenizer.id_to_token(tok.eos_id)
    text = f"a {eos_text} b {tok.special_tokens[-1]}c"
    ids = tok.encode(text)
    assert not specials & set(ids)
    assert tok.eos_id in theirs[kind].encode(text, add_special_tokens=False)  # what the default would do
    assert ids == theirs_split[kind].encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_given_tokenizer_is_not_modified(checkpoints):
    raw = tokenizers.Tokenizer.from_file(str(checkpoints["qwen"] / "tokenizer.json"))
    raw.enable_truncation(max_length=3)
    tok = HFTokenizer(raw, eos_ids=(raw.token_to_id("<|im_end|>"),), pad_id=0)
    assert raw.encode_special_tokens is False
    assert raw.truncation is not None
    assert len(tok.encode(TEXTS[3])) > 3  # the copy ignores the file's truncation setting
    assert tok.encode_rendered("<|im_end|>")[0] == [tok.eos_id]


@pytest.mark.parametrize("kind", KINDS)
def test_encode_batch_equals_encode(kind, ours):
    assert ours[kind].encode_batch(TEXTS) == [ours[kind].encode(t) for t in TEXTS]


@pytest.mark.parametrize("kind", KINDS)
def test_decode_round_trip_and_matches_transformers(kind, ours, theirs):
    tok = ours[kind]
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode(np.array(ids, dtype=np.int32)) == text
        assert tok.decode(ids) == theirs[kind].decode(ids, clean_up_tokenization_spaces=False)
    with_specials = [tok.eos_id, *tok.encode(" hi"), tok.pad_id]
    assert tok.decode(with_specials) == theirs[kind].decode(with_specials, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("kind", KINDS)
def test_special_ids_and_vocab_size_match_transformers(kind, ours, theirs):
    tok, hf = ours[kind], theirs[kind]
    assert isinstance(tok, Tokenizer)
    assert tok.bos_id == hf.bos_token_id
    assert tok.eos_id == hf.eos_token_id
    assert tok.pad_id == (hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id)
    assert tok.vocab_size == len(hf)
    with_bos = hf("a").input_ids
    assert tok.add_bos == (len(with_bos) > len(hf("a", add_special_tokens=False).input_ids) and with_bos[0] == hf.bos_token_id)


def test_special_ids_as_the_checkpoints_define_them(ours):
    qwen, llama, gemma = ours["qwen"], ours["llama"], ours["gemma"]
    token = lambda tok, s: tok.tokenizer.token_to_id(s)
    assert (qwen.bos_id, qwen.add_bos) == (None, False)
    assert qwen.eos_ids == (token(qwen, "<|im_end|>"), token(qwen, "<|endoftext|>"))
    assert qwen.pad_id == token(qwen, "<|endoftext|>")
    assert (llama.bos_id, llama.add_bos) == (token(llama, "<|begin_of_text|>"), True)
    # the config's EOS first, then generation_config.json's other stop ids in their order
    assert llama.eos_ids == tuple(token(llama, s) for s in ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"))
    assert llama.pad_id == llama.eos_id  # no pad token: falls back to EOS
    assert (gemma.bos_id, gemma.add_bos) == (token(gemma, "<bos>"), True)
    assert gemma.pad_id == token(gemma, "<pad>")  # special_tokens_map.json's {"content": ...} wins (legacy)
    # the trained pieces (500 with the shared corpus, fewer with the fallback) + 256 byte pieces
    pieces = json.loads(gemma.tokenizer.to_str())["model"]["vocab"]
    assert gemma.vocab_size == max(pieces.values()) + 1 == len(pieces)
    assert len([p for p in pieces if p.startswith("<0x")]) == 256
    assert gemma.special_tokens == tuple(GEMMA_SPECIALS)
    assert qwen.special_tokens == tuple(QWEN_SPECIALS)


def test_chat_template_sources(ours, checkpoints):
    assert ours["qwen"].chat_template.source == (TEMPLATES / "qwen2.5-instruct.jinja").read_text()
    assert ours["llama"].chat_template.source == (checkpoints["llama"] / "chat_template.jinja").read_text()
    assert ours["gemma"].chat_template.source == (TEMPLATES / "gemma-2-it.jinja").read_text()  # the "default" entry
    assert ours["llama"].chat_template == ChatTemplate(
        ours["llama"].chat_template.source, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
    )
    assert ours["qwen"].chat_template.token_variables == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}


def test_chat_template_jinja_file_wins_over_config(tmp_path, checkpoints):
    directory = write_checkpoint(tmp_path / "qwen", "qwen")
    (directory / "chat_template.jinja").write_text("{{ 'from the file' }}")
    assert hf_tokenizer(directory).chat_template.render([{"role": "user", "content": "x"}]) == "from the file"
    assert transformers.AutoTokenizer.from_pretrained(directory).chat_template == "{{ 'from the file' }}"


def test_no_chat_template_is_none(tmp_path):
    directory = write_checkpoint(tmp_path / "qwen", "qwen")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    del config["chat_template"]
    write_json(directory / "tokenizer_config.json", config)
    assert hf_tokenizer(directory).chat_template is None


def test_eos_from_generation_config_int(tmp_path):
    directory = write_checkpoint(tmp_path / "llama", "llama")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    del config["eos_token"]
    write_json(directory / "tokenizer_config.json", config)
    tok = hf_tokenizer(directory)
    end_of_text = tok.tokenizer.token_to_id("<|end_of_text|>")
    write_json(directory / "generation_config.json", {"eos_token_id": end_of_text})
    assert hf_tokenizer(directory).eos_ids == (end_of_text,)
    (directory / "generation_config.json").unlink()
    with pytest.raises(ValueError, match="no EOS token.*eos_token.*eos_token_id"):
        hf_tokenizer(directory)


def test_malformed_checkpoints_name_file_and_field(tmp_path):
    directory = write_checkpoint(tmp_path / "qwen", "qwen")
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    write_json(config_path, {**config, "eos_token": "<|not_a_token|>"})
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: eos_token '<\|not_a_token\|>' is not in the vocabulary"):
        hf_tokenizer(directory)
    write_json(config_path, {**config, "pad_token": 7})
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: field 'pad_token' must be a string"):
        hf_tokenizer(directory)
    write_json(config_path, {**config, "chat_template": [{"name": "rag", "template": "x"}]})
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: field 'chat_template' lists templates \['rag'\]"):
        hf_tokenizer(directory)
    write_json(config_path, config)
    write_json(directory / "generation_config.json", {"eos_token_id": "2"})
    with pytest.raises(ValueError, match=r"generation_config\.json: field 'eos_token_id'"):
        hf_tokenizer(directory)
    (directory / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a valid tokenizers file"):
        hf_tokenizer(directory)


def test_legacy_special_tokens_map_errors_name_that_file(tmp_path):
    directory = write_checkpoint(tmp_path / "gemma", "gemma")
    special_map = json.loads((directory / "special_tokens_map.json").read_text())
    write_json(directory / "special_tokens_map.json", {**special_map, "pad_token": {"content": "<nope>"}})
    with pytest.raises(ValueError, match=r"special_tokens_map\.json: pad_token '<nope>' is not in the vocabulary"):
        hf_tokenizer(directory)


def test_missing_checkpoint_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        hf_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        hf_tokenizer(tmp_path / "nowhere")


def test_load_tokenizer_accepts_checkpoints(checkpoints, tmp_path):
    for spec in (checkpoints["qwen"], str(checkpoints["qwen"]), checkpoints["qwen"] / "tokenizer.json"):
        tok = load_tokenizer(spec)
        assert isinstance(tok, HFTokenizer)
        assert tok.encode("Hello world") == hf_tokenizer(checkpoints["qwen"]).encode("Hello world")
    with pytest.raises(ValueError, match="checkpoint directory holding 'tokenizer.json'.*Hub id"):
        load_tokenizer(tmp_path)


def test_hub_id_downloads_the_checkpoint_files(checkpoints, monkeypatch):
    """The Hub path, offline: hf_hub_download is replaced by a lookup in a local checkpoint."""
    requested = []

    def fake_download(repo_id, filename, *, revision=None):
        requested.append((repo_id, filename, revision))
        path = checkpoints["llama"] / filename
        if not path.is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)

    monkeypatch.setattr(jtok.huggingface_hub, "hf_hub_download", fake_download)
    tok = load_tokenizer("meta-llama/Llama-3.2-1B-Instruct")
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_ids == hf_tokenizer(checkpoints["llama"]).eos_ids
    assert tok.chat_template.source == (checkpoints["llama"] / "chat_template.jinja").read_text()
    assert {f for _, f, _ in requested} == set(jtok.HF_TOKENIZER_FILES)
    assert hf_tokenizer("org/name", revision="abc123").bos_id == tok.bos_id
    assert requested[-1] == ("org/name", jtok.HF_TOKENIZER_FILES[-1], "abc123")
