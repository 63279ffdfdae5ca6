import json

import pytest

import jaxalign.data as jd


def test_load_gsm8k_real_files(shared_data):
    train = jd.load_gsm8k(shared_data / "gsm8k/train.jsonl")
    test = jd.load_gsm8k(shared_data / "gsm8k/test.jsonl")
    assert (len(train), len(test)) == (7473, 1319)
    assert train.column_names == ["prompt", "question", "reasoning", "answer"]
    first = train[0]
    assert first["question"].startswith("Natalia sold clips to 48 of her friends")
    assert first["answer"] == "72"
    assert first["reasoning"] == "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May."
    assert first["prompt"] == jd.R1_TEMPLATE.format(question=first["question"])
    assert first["prompt"].endswith(f"User: {first['question']} Assistant:")
    # every final answer is a plain number, commas removed; no calculator annotation survives
    for row in test:
        float(row["answer"])
        assert "," not in row["answer"] and "<<" not in row["reasoning"] and "####" not in row["reasoning"]
    assert sum(float(r["answer"]) for r in test) == pytest.approx(
        sum(float(json.loads(line)["answer"].split("####")[-1].replace(",", ""))
            for line in (shared_data / "gsm8k/test.jsonl").read_text().splitlines())
    )


def test_final_answer_forms():
    assert jd.gsm8k_final_answer("so 3 x 5 = 15\n#### 1,500") == "1500"
    assert jd.gsm8k_final_answer("#### -3.5 ") == "-3.5"
    assert jd.gsm8k_final_answer("The answer is 4") is None
    assert jd.gsm8k_final_answer("#### four") is None


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question": "How many?"}, r"row 1: field 'answer' is missing"),
        ({"question": "  ", "answer": "#### 3"}, r"row 1: field 'question' is empty"),
        ({"question": "How many?", "answer": "It is 3."}, r"row 1: field 'answer' does not end in '#### <number>'"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    good = {"question": "What is 1+1?", "answer": "1+1=2\n#### 2"}
    path.write_text("\n".join(json.dumps(r) for r in (good, row)) + "\n")
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        jd.load_gsm8k(path)


def test_wrong_columns_are_refused(tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    with pytest.raises(ValueError, match="question, answer"):
        jd.load_gsm8k(path)


def test_r1_completion_has_the_template_format():
    from jaxalign.rewards import extract_answer, format_reward

    completion = jd.r1_completion("48/2 = 24, 48 + 24 = 72", "72")
    assert format_reward([completion])[0] == 1.0
    assert str(extract_answer(completion)) == "72"


# ------------------------------------------------------- unreadable files (issue 13, item 7)


def test_unreadable_gsm8k_file_names_file_and_line(tmp_path):
    # GSM8K goes through the same reader as the SFT / preference loaders (load_records)
    good = json.dumps({"question": "What is 1+1?", "answer": "1+1=2\n#### 2"})
    path = tmp_path / "train.jsonl"
    path.write_text(f"{good}\n{good}\n{good[:20]}\n")
    with pytest.raises(ValueError) as err:
        jd.load_gsm8k(path)
    assert str(err.value).startswith(f"{path}: line 3: not valid JSON (")
    path.write_text("")
    with pytest.raises(ValueError) as err:
        jd.load_gsm8k(path)
    assert str(err.value) == f"{path}: is empty (no JSON rows)"
