"""The bundled datasets load with the documented splits, and no test example leaks into training."""

from __future__ import annotations

import json

import pytest

from medmoe.data import CMMLU_MEDICAL, DATASETS, load_dataset, load_splits
from medmoe.data.datasets import CMEXAM_DEFECT_LINES, bundled_dir
from medmoe.data.formats import load_cmexam
from medmoe.data.splits import hashed_split, question_key


def test_pubmedqa_test_split_is_the_official_500_pmids():
    official = json.loads((bundled_dir() / "pubmedqa" / "test_ground_truth.json").read_text())
    test = load_dataset("pubmedqa", "test")
    assert {r.metadata["pmid"] for r in test} == set(official)
    # gold labels agree with the official ground-truth file
    assert all(r.options[r.gold_indices[0]] == official[r.metadata["pmid"]] for r in test)
    splits = load_splits("pubmedqa")
    assert (len(splits["train"]), len(splits["dev"]), len(test)) == (400, 100, 500)


@pytest.mark.parametrize(
    "name, sizes",
    [
        ("dental", {"train": 718, "dev": 100, "test": 500}),
        ("medmcqa", {"validation": 4183, "test": 3365}),
        ("cmmlu", {"dev": 330, "test": 11582}),  # 5 dev questions equal test questions: left out
        ("cmmlu-med", {"dev": 45, "test": 1815}),
        ("cmb-clin", {"test": 208}),
    ],
)
def test_split_sizes(name, sizes):
    assert {k: len(v) for k, v in load_splits(name).items()} == sizes


def test_cmexam_keeps_and_flags_multi_answer_questions():
    records = load_cmexam(bundled_dir() / "cmexam" / "val_from_xlsx.jsonl", CMEXAM_DEFECT_LINES)
    assert len(records) == 6811 - 4  # four upstream rows with defects are left out (docs/data.md)
    multi = [r for r in records if r.is_multi_answer]
    # 211 rows have a multi-letter answer upstream; one of them is the defect "nan"
    assert len(multi) == 210 and all(r.metadata["multi_answer"] for r in multi)
    assert {len(r.options) for r in records} == {4, 5}  # 202 questions have four options upstream


def test_cmmlu_med_is_the_nine_medical_subjects():
    subjects = {r.metadata["subject"] for r in load_dataset("cmmlu-med", "test")}
    assert subjects == set(CMMLU_MEDICAL)


def test_no_test_example_appears_in_any_train_split():
    """Across every bundled dataset: no train question equals a test question (ids or text).

    This caught CMExam questions that reappear in CMMLU's test split (now decontaminated)."""
    test_keys, test_ids, train_keys, train_ids = set(), set(), set(), set()
    for name in DATASETS:
        for split, records in load_splits(name).items():
            keys = {question_key(r) for r in records}
            ids = {r.id for r in records}
            if split == "test":
                test_keys |= keys
                test_ids |= ids
            elif split == "train":
                train_keys |= keys
                train_ids |= ids
    assert not train_ids & test_ids
    assert not train_keys & test_keys


def test_hashed_split_is_deterministic_and_keeps_duplicates_together():
    records = load_dataset("cmexam", "train")[:200]
    twin = records[0].__class__(id="twin", question=records[0].question.upper(), answer="A", options=records[0].options)
    a = hashed_split(records + [twin], test=50, dev=20)
    b = hashed_split(records + [twin], test=50, dev=20)
    assert [r.id for r in a["test"]] == [r.id for r in b["test"]]
    side = next(s for s, rs in a.items() if any(r.id == records[0].id for r in rs))
    assert any(r.id == "twin" for r in a[side])


def test_every_bundled_folder_has_source_and_licence():
    for name in ("pubmedqa", "medmcqa", "dental", "cmmlu", "cmexam", "cmb"):
        folder = bundled_dir() / name
        assert (folder / "SOURCE.md").exists()
        if name != "cmmlu":  # CMMLU states its licence in SOURCE.md (upstream has no LICENSE file)
            assert any(folder.glob("LICENSE*")), name
