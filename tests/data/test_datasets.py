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
    # The conversation is kept (split before the first assistant turn); the plain-format
    # flattening ("### Role:" blocks) now happens at tokenisation, for tokenizers without a
    # chat template (tests/data/test_conversational.py).
    assert ds[0] == {"prompt": messages[:2], "completion": messages[2:]}


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


# ------------------------------------------------------- unreadable files (issue 13, item 7)

SFT_ROW = {"instruction": "a", "input": "", "output": "b"}


@pytest.mark.parametrize("loader", [load_sft_dataset, load_preference_dataset, load_records])
@pytest.mark.parametrize(
    ("name", "content", "why"),
    [
        ("empty-list.json", "[]", "is empty (an empty JSON list)"),
        ("zero-bytes.json", "", "is empty (no JSON rows)"),
        ("blank.jsonl", "\n  \n", "is empty (no JSON rows)"),
    ],
)
def test_empty_file_is_refused_naming_it(tmp_path, loader, name, content, why):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError) as err:
        loader(path)
    assert str(err.value) == f"{path}: {why}"


def test_truncated_json_list_names_file_line_and_column(tmp_path):
    path = tmp_path / "instruction-data.json"
    text = json.dumps([SFT_ROW] * 3, indent=1)
    path.write_text(text[: text.rindex('"output"') + 5])  # cut inside the last row's key
    last_line = path.read_text().count("\n") + 1
    with pytest.raises(ValueError) as err:
        load_sft_dataset(path)
    message = str(err.value)
    assert message.startswith(f"{path}: line {last_line}, column 3: not valid JSON (")
    assert message.endswith("the file ends inside the JSON list (truncated?)")


def test_malformed_json_list_names_the_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[{"prompt": "p", "completion": "c"},\n {"prompt": "p" "completion": "c"}]')
    with pytest.raises(ValueError, match=rf"^{path}: line 2, column 17: not valid JSON \(Expecting ',' delimiter\)$"):
        load_sft_dataset(path)


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.jsonl.gz"])
def test_jsonl_with_one_broken_line_names_that_line(tmp_path, name):
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}] * 4
    lines = [json.dumps(r) for r in rows]
    lines[2] = lines[2][:-9]  # a line cut short: '{"prompt": "p", "chosen": "c", "rejected"'
    text = "\n".join(lines) + "\n"
    path = tmp_path / name
    path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    with pytest.raises(ValueError) as err:
        load_preference_dataset(path)
    assert str(err.value).startswith(f"{path}: line 3: not valid JSON (")


def test_jsonl_line_that_is_not_an_object_is_named(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps(SFT_ROW) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=rf"^{path}: line 2: a JSON list, not an object"):
        load_sft_dataset(path)


def test_truncated_gzip_is_named(tmp_path):
    path = tmp_path / "hh.jsonl.gz"
    path.write_bytes(gzip.compress((json.dumps({"chosen": "a", "rejected": "b"}) + "\n").encode() * 50)[:30])
    with pytest.raises(ValueError, match=rf"^{path}: not a readable gzip file \("):
        load_preference_dataset(path)


def test_unreadable_parquet_is_named(tmp_path):
    path = tmp_path / "sft.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=rf"^{path}: datasets could not read it as parquet: "):
        load_sft_dataset(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"^{path}: is empty \(0 bytes\)$"):
        load_sft_dataset(path)


def test_readable_files_take_datasets_path_only(tmp_path, monkeypatch):
    # the diagnosis runs only after datasets failed: a good file is never parsed by json here
    import jaxalign.data.datasets as module

    monkeypatch.setattr(module, "_json_problem", lambda path: pytest.fail("diagnosed a good file"))
    path = write_jsonl(tmp_path / "ok.jsonl", [SFT_ROW])
    assert len(load_sft_dataset(path)) == 1


# ------------------------------------------------------------ HH-RLHF and degenerate pairs


def test_hh_rows_sharing_no_assistant_turn_name_file_row_and_field(tmp_path):
    h = "\n\nHuman: Hi\n\nAssistant:"
    rows = [
        {"chosen": h + " Sure.", "rejected": h + " No."},
        {"chosen": h + " Sure.", "rejected": h + " No."},
        {"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: z\n\nAssistant: w"},
    ]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    with pytest.raises(ValueError, match=rf"^{path}: row 2: field 'rejected' differs from 'chosen' before their first '\\n\\nAssistant:' turn, so the transcripts share no turn to split at \(from character 9: "):
        load_preference_dataset(path)
    rows[1] = {"chosen": "\n\nHuman: no reply", "rejected": h + " No."}
    path = write_jsonl(tmp_path / "hh2.jsonl", rows)
    with pytest.raises(ValueError, match=rf"^{path}: row 1: field 'chosen' has no '\\n\\nAssistant:' turn"):
        load_preference_dataset(path)
    with pytest.raises(ValueError, match=r"^field 'chosen' has no"):
        split_transcripts("\n\nHuman: a", h + " b")


def test_all_pairs_identical_is_refused_naming_file_and_count(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "same", "rejected": "same"} for i in range(5)]
    path = write_json_list(tmp_path / "pref.json", rows)
    with pytest.raises(ValueError) as err:
        load_preference_dataset(path)
    assert str(err.value) == (
        f"{path}: all 5 pairs have chosen == rejected (no preference signal); nothing is left to train on"
    )


def test_val_split_needs_a_row_on_each_side(tmp_path):
    from jaxalign.data import train_val_split, val_split_size

    path = write_json_list(tmp_path / "one.json", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    ds = load_preference_dataset(path)
    with pytest.raises(ValueError) as err:
        train_val_split(ds, 0.1, seed=0, source=path)
    assert str(err.value) == (
        f"{path}: 1 row is too few to hold out --val-fraction 0.1 for validation (1 held out would "
        "leave 0 to train on); it needs at least 2 rows"
    )
    with pytest.raises(ValueError, match=rf"^{path}: --val-fraction 1.0 must be in \(0, 1\)$"):
        val_split_size(10, 1.0, source=path)
    with pytest.raises(ValueError, match=r"^synthetic: --rm-val 0 must be in"):
        val_split_size(10, 0, source="synthetic", flag="--rm-val")
    with pytest.raises(ValueError, match=rf"^{path}: 2 rows are too few to hold out --val-fraction 0.9 for validation \(2 held out would leave 0 to train on\); it needs at least 5 rows$"):
        val_split_size(2, 0.9, source=path)  # round(1.8) = 2 held out, none left
    assert val_split_size(2, 0.1, source=path) == 1 and val_split_size(400, 0.2, source=path) == 80
    ds2 = datasets.Dataset.from_dict({"x": list(range(10))})
    train, val = train_val_split(ds2, 0.2, seed=0, source="ten rows")
    assert (len(train), len(val)) == (8, 2) and sorted([*train["x"], *val["x"]]) == list(range(10))
