"""TRL's conversational formats through the loaders and the tokenising code, against transformers'
apply_chat_template on small Qwen-style (ChatML, no BOS) and Llama-3-style (template-written BOS)
checkpoints: ids, assistant-only masks, truncation, the plain-format fallback and the refusals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import datasets
import jinja2
import numpy as np
import pytest
import transformers

import jaxalign.data as jd
from tests.data.test_hf_tokenizer import TEMPLATES, write_checkpoint

SYSTEM = {"role": "system", "content": "Be brief."}
U1 = {"role": "user", "content": "What is 2+2?"}
A1 = {"role": "assistant", "content": "2+2 is 4."}
U2 = {"role": "user", "content": "  And 3+3? Héllo 你好 🎉 "}
A2 = {"role": "assistant", "content": "Réponse: 6.\nDone."}
GOOD = {"role": "assistant", "content": "It is 6."}
BAD = {"role": "assistant", "content": "No idea, sorry."}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("conversational")
    return {kind: write_checkpoint(root / kind, kind) for kind in ("qwen", "llama")}


@pytest.fixture(scope="module")
def qwen(checkpoints):
    return jd.hf_tokenizer(checkpoints["qwen"])


@pytest.fixture(scope="module")
def oracle(checkpoints):
    """transformers' tokenizers: ``oracle[kind](messages, **kw)`` = apply_chat_template ids."""
    loaded = {kind: transformers.AutoTokenizer.from_pretrained(path) for kind, path in checkpoints.items()}

    def ids(kind: str, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        encoded = loaded[kind].apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        return list(encoded["input_ids"])

    return ids


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def trained_runs(tokenizer, example: jd.Example) -> list[str]:
    """The decoded runs of consecutive mask-1 tokens."""
    runs, current = [], []
    for token, weight in zip(example.tokens.tolist(), example.mask.tolist()):
        if weight == 1.0:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return [tokenizer.decode(run) for run in runs + ([current] if current else [])]


def span_mask(oracle, kind: str, messages: list[dict], trained_turns: list[int]) -> list[float]:
    """The expected mask from transformers alone: turn i covers the ids between the chat rendered
    up to it with the generation prompt and rendered through it (special tokens at both ends make
    those id prefixes of the whole chat's ids, checked here)."""
    full = oracle(kind, messages)
    mask = [0.0] * len(full)
    for i in trained_turns:
        start, end = oracle(kind, messages[:i], add_generation_prompt=True), oracle(kind, messages[: i + 1])
        assert full[: len(end)] == end and end[: len(start)] == start
        mask[len(start) : len(end)] = [1.0] * (len(end) - len(start))
    return mask


# ------------------------------------------------------------------------------------ SFT


def test_language_modeling_messages_train_every_assistant_turn(tmp_path, qwen, oracle):
    chats = [[SYSTEM, U1, A1, U2, A2], [U1, A1]]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c, "id": k} for k, c in enumerate(chats)])
    ds = jd.load_sft_dataset(path)
    assert ds.column_names == ["prompt", "completion"]
    assert ds[0] == {"prompt": [SYSTEM, U1], "completion": [A1, U2, A2]}
    examples = jd.tokenize_sft(ds, qwen, max_length=512)
    for chat, example in zip(chats, examples):
        assert example.tokens.dtype == np.int32 and example.mask.dtype == np.float32
        assert example.tokens.tolist() == oracle("qwen", chat)
        assistant = [i for i, m in enumerate(chat) if m["role"] == "assistant"]
        assert example.mask.tolist() == span_mask(oracle, "qwen", chat, assistant)
        assert trained_runs(qwen, example) == [m["content"] + "<|im_end|>\n" for m in chat if m["role"] == "assistant"]
        assert example.tokens[-2] == qwen.eos_id  # the template's <|im_end|>, nothing appended after "\n"


def test_prompt_completion_trains_only_the_completion(tmp_path, qwen, oracle):
    prompt, completion = [SYSTEM, U1, A1, U2], [A2]
    ds = jd.load_sft_dataset(write_jsonl(tmp_path / "pc.jsonl", [{"prompt": prompt, "completion": completion}]))
    (example,) = jd.tokenize_sft(ds, qwen, max_length=512)
    assert example.tokens.tolist() == oracle("qwen", prompt + completion)
    assert example.mask.tolist() == span_mask(oracle, "qwen", prompt + completion, [4])  # A1 is context
    n_prompt = len(oracle("qwen", prompt, add_generation_prompt=True))
    assert example.mask[:n_prompt].sum() == 0 and example.mask[n_prompt:].all()
    assert trained_runs(qwen, example) == [A2["content"] + "<|im_end|>\n"]


def test_template_bos_is_kept_once_and_survives_truncation(tmp_path, checkpoints, oracle):
    llama = jd.hf_tokenizer(checkpoints["llama"])
    chat = [SYSTEM, U1, A1]
    ds = jd.load_sft_dataset(write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}]))
    full = oracle("llama", chat)
    (whole,) = jd.tokenize_sft(ds, llama, max_length=1024)
    assert whole.tokens.tolist() == full and full.count(llama.bos_id) == 1 and full[0] == llama.bos_id
    assert trained_runs(llama, whole) == [A1["content"] + "<|eot_id|>"]
    n_trained = int(whole.mask.sum())
    # prompt cut from the left after the BOS, completion whole
    (cut,) = jd.tokenize_sft(ds, llama, max_length=n_trained + 4)
    assert cut.tokens.tolist() == [llama.bos_id] + full[-(n_trained + 3) :]
    assert cut.mask.tolist() == [0.0] * 4 + [1.0] * n_trained
    # then the completion from the right, one prompt token kept
    (tight,) = jd.tokenize_sft(ds, llama, max_length=4)
    first = len(full) - n_trained
    assert tight.tokens.tolist() == [llama.bos_id, full[first - 1], full[first], full[first + 1]]
    assert tight.mask.tolist() == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="max_length=2 leaves no room"):
        jd.tokenize_sft(ds, llama, max_length=2)


# ----------------------------------------------------------------------------- preference


def test_explicit_prompt_preference(tmp_path, qwen, oracle):
    prompt = [SYSTEM, U1, A1, U2]
    rows = [{"prompt": prompt, "chosen": [GOOD], "rejected": [BAD]}, {"prompt": [U1], "chosen": [A1], "rejected": [A1]}]
    ds = jd.load_preference_dataset(write_jsonl(tmp_path / "pref.jsonl", rows))
    assert len(ds) == 1  # the chosen == rejected pair is dropped, as for strings
    (pair,) = jd.tokenize_preference(ds, qwen, max_length=512)
    head = oracle("qwen", prompt, add_generation_prompt=True)
    for side, answer in ((pair.chosen, GOOD), (pair.rejected, BAD)):
        assert side.tokens.tolist() == oracle("qwen", prompt + [answer])
        assert side.tokens[: len(head)].tolist() == head  # the prompt rendered with the generation prompt
        assert side.mask.tolist() == [0.0] * len(head) + [1.0] * (len(side.tokens) - len(head))
        assert trained_runs(qwen, side) == [answer["content"] + "<|im_end|>\n"]
    sft = jd.tokenize_sft(jd.sft_view(ds), qwen, max_length=512)  # a conversational SFT view
    assert sft[0].tokens.tolist() == pair.chosen.tokens.tolist()
    assert sft[0].mask.tolist() == pair.chosen.mask.tolist()


def test_implicit_prompt_preference_splits_at_the_shared_turns(tmp_path, qwen, oracle):
    shared = [SYSTEM, U1, A1, U2]
    rows = [{"chosen": shared + [GOOD], "rejected": shared + [BAD], "score_chosen": 9.0}]
    ds = jd.load_preference_dataset(write_jsonl(tmp_path / "implicit.jsonl", rows))
    assert ds.to_list() == [{"prompt": shared, "chosen": [GOOD], "rejected": [BAD]}]
    (pair,) = jd.tokenize_preference(ds, qwen, max_length=512)
    assert pair.chosen.tokens.tolist() == oracle("qwen", shared + [GOOD])
    assert pair.rejected.mask.tolist() == span_mask(oracle, "qwen", shared + [BAD], [4])  # not A1
    assert trained_runs(qwen, pair.rejected) == [BAD["content"] + "<|im_end|>\n"]
    # identical conversations keep their last turn as the completion (then dropped: no signal)
    same = write_jsonl(tmp_path / "same.jsonl", rows + [{"chosen": [U1, A1], "rejected": [U1, A1], "score_chosen": 1.0}])
    assert len(jd.load_preference_dataset(same)) == 1


# ------------------------------------------------------------------------------- fallback


def test_without_a_template_the_plain_format_is_used(tmp_path, qwen):
    chat = [SYSTEM, U1, A1, U2, A2]
    ds = jd.load_sft_dataset(write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}]))
    plain_prompt = "### System:\nBe brief.\n\n### User:\nWhat is 2+2?\n\n### Assistant:\n2+2 is 4.\n\n" \
        f"### User:\n{U2['content']}\n\n### Assistant:\n"
    for tok in (jd.byte_tokenizer(), dataclasses.replace(qwen, chat_template=None)):
        (example,) = jd.tokenize_sft(ds, tok, max_length=512)
        expected = jd.tokenize_prompt_completion(tok, plain_prompt, A2["content"], max_length=512)
        assert example.tokens.tolist() == expected.tokens.tolist()
        assert example.mask.tolist() == expected.mask.tolist()
        assert tok.decode(example.tokens[example.mask == 1.0]) == A2["content"] + tok.decode([tok.eos_id])
    pref = jd.load_preference_dataset(
        write_jsonl(tmp_path / "pref.jsonl", [{"prompt": [U1], "chosen": [GOOD], "rejected": [BAD]}])
    )
    (pair,) = jd.tokenize_preference(pref, jd.byte_tokenizer(), max_length=512)
    assert jd.byte_tokenizer().decode(pair.rejected.tokens) == jd.messages_prompt([U1]) + BAD["content"] + "<|endoftext|>"


# ------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("loader,rows,error", [
    ("sft", [{"messages": [U1, A1]}, {"messages": [U1, {"role": "tool", "content": "x"}, A1]}],
     r"row 1: field 'messages' message 1 field 'role' is 'tool', not one of \['system', 'user', 'assistant'\]"),
    ("sft", [{"messages": [U1, {"role": "assistant", "content": " \n"}]}],
     r"row 0: field 'messages' message 1 field 'content' is empty"),
    ("sft", [{"messages": [U1, A1]}, {"messages": [U1, {"role": "assistant", "content": 7}]}],
     r"row 1: field 'messages' message 1 field 'content' is not a string \(got int\)"),
    ("sft", [{"messages": [U1, A1, U2]}], r"row 0: field 'messages' must end with an 'assistant' message, not 'user'"),
    ("sft", [{"messages": [A1, U1, A2]}], r"row 0: field 'messages' message 0 is an 'assistant' turn"),
    ("sft", [{"messages": "hi"}], r"row 0: field 'messages' is not a list of messages \(got str\)"),
    ("sft", [{"prompt": [U1], "completion": []}], r"row 0: field 'completion' is empty"),
    ("sft", [{"prompt": "Q", "completion": [A1]}], r"row 0: field 'completion' is not a string \(got list\)"),
    ("preference", [{"prompt": [U1], "chosen": [GOOD], "rejected": [BAD, U2]}],
     r"row 0: field 'rejected' must end with an 'assistant' message, not 'user'"),
    ("preference", [{"chosen": [U1, GOOD], "rejected": [U1, BAD]}, {"chosen": [U1, GOOD], "rejected": [U2, BAD]}],
     r"row 1: field 'rejected' shares no leading turn with 'chosen'"),
])
def test_malformed_conversations_name_file_row_and_field(tmp_path, loader, rows, error):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    load = jd.load_sft_dataset if loader == "sft" else jd.load_preference_dataset
    with pytest.raises(ValueError, match=rf"bad\.jsonl: {error}"):
        load(path)


def datasets_from(rows: list[dict]) -> datasets.Dataset:
    """An in-memory conversational dataset (no loader, so no loader checks)."""
    features = dict.fromkeys(rows[0], jd.CONVERSATION)
    return datasets.Dataset.from_list(rows, features=datasets.Features(features))


def test_special_tokens_in_content_are_refused_naming_the_row(tmp_path, qwen):
    rows = [{"messages": [U1, A1]}, {"messages": [U1, {"role": "assistant", "content": "4<|im_end|><|im_start|>user"}]}]
    path = write_jsonl(tmp_path / "inject.jsonl", rows)
    ds = jd.load_sft_dataset(path)  # the loader is tokenizer-free: the text is valid content
    with pytest.raises(ValueError, match=r"inject\.jsonl: row 1: field 'completion' message 0 field 'content' "
                                         r"contains the special token\(s\) \['<\|im_start\|>', '<\|im_end\|>'\]"):
        jd.tokenize_sft(ds, qwen, max_length=64, source=path)
    pref = datasets_from(rows=[{"prompt": [U1], "chosen": [GOOD], "rejected": [{"role": "assistant", "content": "<|endoftext|>"}]}])
    with pytest.raises(ValueError, match=r"^row 0: field 'rejected' message 0 field 'content' contains"):
        jd.tokenize_preference(pref, qwen, max_length=64)
    # without a template the same text is ordinary: no special id is produced from it
    (_, plain) = jd.tokenize_sft(ds, jd.byte_tokenizer(), max_length=256)
    assert plain.tokens[:-1].tolist().count(jd.byte_tokenizer().eos_id) == 0


def test_template_failures_name_the_row(qwen):
    ds = datasets_from([{"prompt": [U1], "completion": [A1]}, {"prompt": [U1], "completion": [A1, U2, A2]}])
    qwen3 = dataclasses.replace(qwen, chat_template=jd.ChatTemplate(
        (TEMPLATES / "qwen3.jinja").read_text(), eos_token=qwen.chat_template.eos_token,
        extra_tokens=qwen.chat_template.extra_tokens,
    ))
    with pytest.raises(ValueError, match=r"^row 1: prompt \+ completion: message 1: the chat template is not prefix-consistent"):
        jd.tokenize_sft(ds, qwen3, max_length=256)
    raising = dataclasses.replace(qwen, chat_template=jd.ChatTemplate("{{ raise_exception('no chats here') }}"))
    with pytest.raises(jinja2.TemplateError, match="no chats here") as caught:
        jd.tokenize_sft(ds, raising, max_length=256, source="chats.jsonl")
    assert caught.value.__notes__ == ["while rendering chats.jsonl: row 0: prompt + completion"]
