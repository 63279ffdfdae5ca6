"""Dataset loaders: the real LLMs-from-scratch files, each row format, and the error messages."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import datasets
import pytest

from jaxalign.data import (
    alpaca_prompt,
    load_preference_dataset,
    load_records,
    load_sft_dataset,
    sft_view,
    split_transcripts,
)

PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` as JSON Lines (gzip-compressed if the name ends in .gz); return ``path``."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def write_json_list(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` as one JSON list; return ``path``."""
    path.write_text(json.dumps(rows, indent=2))
    return path


# ---------------------------------------------------------------------------------- real files


def test_real_sft_file(shared_file):
    path = shared_file("sft/instruction-data.json")
    raw = json.loads(path.read_text())
    ds = load_sft_dataset(path)
    assert ds.column_names == ["prompt", "completion"]
    assert len(ds) == 1100
    first = raw[0]
    assert first["input"]  # the first row has an input block
    assert ds[0]["prompt"] == (
        f"{PREAMBLE}\n\n### Instruction:\n{first['instruction']}"
        f"\n\n### Input:\n{first['input']}\n\n### Response:\n"
    )
    assert ds[0]["completion"] == first["output"]
    no_input = next(i for i, row in enumerate(raw) if not row["input"])
    assert ds[no_input]["prompt"] == (
        f"{PREAMBLE}\n\n### Instruction:\n{raw[no_input]['instruction']}\n\n### Response:\n"
    )


def test_real_preference_file_drops_identical_pairs(shared_file, caplog):
    path = shared_file("preference/instruction-data-with-preference.json")
    with caplog.at_level(logging.WARNING, logger="jaxalign.data.datasets"):
        ds = load_preference_dataset(path)
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    assert len(ds) == 1094
    assert any("dropped 6 of 1100" in r.getMessage() for r in caplog.records)
    assert all(c != r for c, r in zip(ds["chosen"], ds["rejected"]))
    first = json.loads(path.read_text())[0]
    assert ds[0]["prompt"] == alpaca_prompt(first["instruction"], first["input"])
    assert ds[0]["chosen"] == first["chosen"]


# ---------------------------------------------------------------------------------- formats


def test_alpaca_prompt_input_block_only_when_nonempty():
    assert alpaca_prompt("Do it.") == f"{PREAMBLE}\n\n### Instruction:\nDo it.\n\n### Response:\n"
    assert alpaca_prompt("Do it.", "x").endswith("Do it.\n\n### Input:\nx\n\n### Response:\n")


def test_sft_prompt_completion_jsonl(tmp_path):
    path = write_jsonl(
        tmp_path / "pc.jsonl", [{"prompt": "p1", "completion": "c1", "extra": 1}] * 3
    )
    ds = load_sft_dataset(path)
    assert ds.column_names == ["prompt", "completion"]
    assert ds[2] == {"prompt": "p1", "completion": "c1"}


def test_sft_alpaca_without_input_column(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl.gz", [{"instruction": "Say hi.", "output": "hi"}])
    assert load_sft_dataset(path)[0] == {"prompt": alpaca_prompt("Say hi."), "completion": "hi"}


def test_sft_messages(tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    ds = load_sft_dataset(write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}]))
    assert ds[0] == {
        "prompt": "### System:\nBe brief.\n\n### User:\n2+2?\n\n### Assistant:\n4\n\n"
        "### User:\n3+3?\n\n### Assistant:\n",
        "completion": "6",
    }


def test_preference_prompt_chosen_rejected_json_list(tmp_path):
    rows = [{"prompt": "p", "chosen": "good", "rejected": "bad"}]
    ds = load_preference_dataset(write_json_list(tmp_path / "pref.json", rows))
    assert ds.to_list() == rows


def test_preference_stack_exchange_paired(tmp_path):
    rows = [{"question": "Why?", "response_j": "Because.", "response_k": "No.", "qid": 7}]
    ds = load_preference_dataset(write_jsonl(tmp_path / "se.jsonl", rows))
    assert ds.to_list() == [
        {"prompt": "Question: Why?\n\nAnswer: ", "chosen": "Because.", "rejected": "No."}
    ]


def test_preference_hh_rlhf_transcripts(tmp_path):
    h = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Help me?\n\nAssistant:"
    rows = [{"chosen": h + " Sure.", "rejected": h + " Sorry, no."}]
    ds = load_preference_dataset(write_jsonl(tmp_path / "hh.jsonl.gz", rows))
    assert ds.to_list() == [{"prompt": h, "chosen": " Sure.", "rejected": " Sorry, no."}]
    # replies sharing their first words still split at the last shared assistant header
    assert split_transcripts(h + " I can.", h + " I cannot.") == (h, " I can.", " I cannot.")
    with pytest.raises(ValueError, match="share no"):
        split_transcripts("\n\nHuman: a", "\n\nHuman: b")


def test_real_hh_rlhf_file(shared_file):
    path = shared_file("hh-rlhf/harmless-base-test.jsonl.gz")
    ds = load_preference_dataset(path)
    assert len(ds) == 2312
    with gzip.open(path, "rt") as f:
        first = json.loads(f.readline())
    row = ds[0]
    assert row["prompt"].endswith("\n\nAssistant:") and row["prompt"].startswith("\n\nHuman:")
    assert row["prompt"] + row["chosen"] == first["chosen"]
    assert row["prompt"] + row["rejected"] == first["rejected"]


def test_parquet_round_trip(tmp_path):
    rows = [{"instruction": f"i{k}", "input": "", "output": f"o{k}"} for k in range(4)]
    path = tmp_path / "sft.parquet"
    datasets.Dataset.from_list(rows).to_parquet(path)
    ds = load_sft_dataset(path)
    assert ds["completion"] == ["o0", "o1", "o2", "o3"]
    assert ds[3]["prompt"] == alpaca_prompt("i3")


def test_sft_view():
    pref = datasets.Dataset.from_dict({"prompt": ["p"], "chosen": ["c"], "rejected": ["r"]})
    assert sft_view(pref).to_list() == [{"prompt": "p", "completion": "c"}]


# ---------------------------------------------------------------------------------- errors


def test_empty_field_error_names_file_row_and_field(tmp_path):
    rows = [{"instruction": "a", "input": "", "output": "b"}] * 17
    rows.append({"instruction": "a", "input": "", "output": "  \n"})
    path = write_json_list(tmp_path / "instruction-data.json", rows)
    expected = r"instruction-data\.json: row 17: field 'output' is empty"
    with pytest.raises(ValueError, match=expected):
        load_sft_dataset(path)


def test_missing_field_error(tmp_path):
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c"}]
    path = write_jsonl(tmp_path / "pref.jsonl", rows)
    with pytest.raises(ValueError, match=r"pref\.jsonl: row 1: field 'rejected' is missing"):
        load_preference_dataset(path)


def test_messages_must_end_with_assistant(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(ValueError, match=r"row 0: field 'messages' must end with an 'assistant'"):
        load_sft_dataset(path)


def test_unknown_format_lists_columns(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"text": "x", "label": 1}])
    with pytest.raises(ValueError, match=r"\['label', 'text'\].*instruction, output, input\?"):
        load_sft_dataset(path)
    with pytest.raises(ValueError, match=r"\['label', 'text'\].*prompt, chosen, rejected"):
        load_preference_dataset(path)


def test_missing_local_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        load_records(tmp_path / "absent.jsonl")


def test_unsupported_existing_file(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("prompt,completion\np,c\n")
    with pytest.raises(ValueError, match="unsupported data file"):
        load_records(path)
