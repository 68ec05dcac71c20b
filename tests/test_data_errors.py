"""Bad input: each problem gives one clear error naming the file, the line or record, and the problem."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from medmoe.cli import app
from medmoe.data import load_dataset, load_file, parse_mapping
from medmoe.data.formats import load_medmcqa, load_pubmedqa
from medmoe.data.validate import validate
from medmoe.errors import DataError

GOOD = {"id": "q1", "question": "Which nerve?", "options": ["vagus", "facial"], "answer": "A"}


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def error_of(fn, *args):
    with pytest.raises(DataError) as info:
        fn(*args)
    return str(info.value), info.value.problems


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [GOOD, '{"id": "q2", "question": ', GOOD | {"id": "q3"}])
    message, problems = error_of(load_file, path)
    assert f"{path}:2: malformed JSON" in message
    assert len(problems) == 1


def test_missing_field_is_named_and_a_misspelt_one_is_suggested(tmp_path):
    row = {"id": "q1", "qestion": "Which nerve?", "options": ["vagus", "facial"], "answer": "A"}
    message, _ = error_of(load_file, write_jsonl(tmp_path / "qa.jsonl", [row]))
    assert ":1: missing field 'question' (did you mean 'qestion'?)" in message


def test_answer_letter_that_is_not_an_option(tmp_path):
    message, _ = error_of(load_file, write_jsonl(tmp_path / "qa.jsonl", [GOOD | {"answer": "D"}]))
    assert ":1: answer 'D' is not an option: options are A, B" in message


def test_medmcqa_cop_out_of_range_names_the_line(tmp_path):
    row = {"id": "x", "question": "q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 7}
    message, _ = error_of(load_medmcqa, write_jsonl(tmp_path / "dev.json", [row]))
    assert "dev.json:1: cop 7 is not an option number 1-4" in message


def test_empty_question(tmp_path):
    message, _ = error_of(load_file, write_jsonl(tmp_path / "qa.jsonl", [GOOD, GOOD | {"question": "   "}]))
    assert ":2: empty question" in message


def test_non_utf8_file_names_the_offset_and_line(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"question": "caf\xe9"}\n')
    message, _ = error_of(load_file, path)
    assert f"{path}:2: not valid UTF-8 (byte 0xe9" in message


def test_file_that_does_not_exist(tmp_path):
    message, _ = error_of(load_file, tmp_path / "nope.jsonl")
    assert f"{tmp_path / 'nope.jsonl'}: file does not exist" == message


def test_pubmedqa_bad_record_names_the_pmid(tmp_path):
    path = tmp_path / "ori_pqal.json"
    path.write_text(json.dumps({"123": {"QUESTION": "q?", "CONTEXTS": ["c"], "final_decision": "perhaps"}}))
    message, _ = error_of(load_pubmedqa, path)
    assert "(record 123): final_decision 'perhaps' is not one of yes/no/maybe" in message


def test_nothing_is_half_loaded_and_validate_lists_every_problem(tmp_path):
    rows = [GOOD, "not json", GOOD | {"answer": "Z"}, GOOD | {"question": ""}, {"id": "q5", "options": ["a"], "answer": "A"}]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(DataError):
        load_file(path)  # one valid row does not make a partial load
    count, problems = validate(path)
    assert count == 0
    assert [p.line for p in problems] == [2, 3, 4, 5]
    assert "missing field 'question'" in problems[-1].message


def test_validate_cli_lists_problems_and_fails(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [GOOD, GOOD | {"answer": "Q"}, "{"])
    result = CliRunner().invoke(app, ["data", "validate", str(path)])
    assert result.exit_code == 1
    assert "qa.jsonl:2: answer 'Q' is not an option" in result.output.replace("\n", "")
    assert "qa.jsonl:3: malformed JSON" in result.output.replace("\n", "")
    assert "2 problem(s)" in result.output


def test_validate_accepts_a_good_file(tmp_path):
    result = CliRunner().invoke(app, ["data", "validate", str(write_jsonl(tmp_path / "qa.jsonl", [GOOD]))])
    assert result.exit_code == 0 and "1 valid records" in result.output


def test_unknown_dataset_and_split_are_named():
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("pubmedq")
    with pytest.raises(DataError, match="no split 'train'; splits: validation, test"):
        load_dataset("medmcqa", "train")


def test_generic_loader_mapping_csv_and_answer_by_text(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("Q,opa,opb,label,why\nWhich nerve?,vagus,facial,facial,because\n", encoding="utf-8")
    mapping = parse_mapping("question=Q,options=opa|opb,answer=label,explanation=why")
    [record] = load_file(path, mapping)
    assert (record.question, record.options, record.answer, record.explanation) == ("Which nerve?", ("vagus", "facial"), "B", "because")


def test_generic_loader_round_trips_record_dicts(tmp_path):
    records = load_dataset("cmexam", "test")[:5]
    path = write_jsonl(tmp_path / "copy.jsonl", [r.to_dict() for r in records])
    assert load_file(path) == records


def test_bad_mapping_is_explained():
    with pytest.raises(DataError, match="unknown field 'questoin'"):
        parse_mapping("questoin=Q")
