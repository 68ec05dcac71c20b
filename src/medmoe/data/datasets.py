"""The bundled datasets by name, with their splits. `load_dataset(name, split)` is the one entry point.

Splits (docs/data.md has the reasons):
  pubmedqa   test = the official 500 PMIDs; the other 500 -> dev 100 / train 400 (hashed_split)
  medmcqa    validation = all 4,183 published dev rows (compare with the literature);
             test = those minus the Dental train/dev rows (what medmoe evaluates; disjoint from train)
  dental     MedMCQA dev rows of subject Dental: test 500 / dev 100 / train 718 (hashed_split)
  cmmlu      dev (5 per subject, few-shot exemplars) / test, all 67 subjects
  cmmlu-med  the same, nine medical subjects
  cmexam     the public validation file: test 1,500 / dev 300 / train the rest (hashed_split)
  cmb-clin   test = all 208 open-ended QA pairs of the 74 cases

Decontamination: a train or dev record whose question text equals a question in any bundled test
split (of any dataset: CMExam shares some questions with CMMLU's test) is left out of train/dev.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib.resources import files
from pathlib import Path

from medmoe.data import formats
from medmoe.data.generic import load_file
from medmoe.data.readers import read_json
from medmoe.data.record import Record
from medmoe.data.splits import hashed_split, question_key
from medmoe.errors import DataError

CMMLU_MEDICAL = (
    "anatomy", "clinical_knowledge", "college_medical_statistics", "college_medicine", "genetics",
    "nutrition", "professional_medicine", "traditional_chinese_medicine", "virology",
)


def bundled_dir() -> Path:
    return Path(str(files("medmoe.data").joinpath("bundled")))


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    description: str
    language: str
    task: str  # "choice" (pick option letters) or "open" (free-text answer)
    folder: str  # under bundled_dir(), holding SOURCE.md and LICENSE
    license: str


def _pubmedqa() -> dict[str, list[Record]]:
    folder = bundled_dir() / "pubmedqa"
    records = formats.load_pubmedqa(folder / "ori_pqal.json")
    test_ids = set(read_json(folder / "test_ground_truth.json"))
    test = [r for r in records if r.metadata["pmid"] in test_ids]
    rest = hashed_split([r for r in records if r.metadata["pmid"] not in test_ids], test=0, dev=100)
    return {"train": rest["train"], "dev": rest["dev"], "test": test}


def _dental() -> dict[str, list[Record]]:
    records = formats.load_medmcqa(bundled_dir() / "dental" / "medmcqa_dev_dental.jsonl")
    return hashed_split(records, test=500, dev=100)


def _medmcqa() -> dict[str, list[Record]]:
    records = formats.load_medmcqa(bundled_dir() / "medmcqa" / "dev.json")
    dental = _raw_splits("dental")
    used = {r.id for r in dental["train"] + dental["dev"]}
    return {"validation": records, "test": [r for r in records if r.id not in used]}


def _cmmlu(subjects: tuple[str, ...] | None) -> Callable[[], dict[str, list[Record]]]:
    def load() -> dict[str, list[Record]]:
        folder = bundled_dir() / "cmmlu"
        chosen = list(subjects) if subjects else None
        return {split: formats.load_cmmlu(folder / split, chosen) for split in ("dev", "test")}

    return load


# Upstream rows with defects, left out (docs/data.md): 5357 has answer "nan"; 5590, 5597 and 6028
# lost one option in the xlsx export (their options start at B or skip C).
CMEXAM_DEFECT_LINES = frozenset({5357, 5590, 5597, 6028})


def _cmexam() -> dict[str, list[Record]]:
    records = formats.load_cmexam(bundled_dir() / "cmexam" / "val_from_xlsx.jsonl", CMEXAM_DEFECT_LINES)
    return hashed_split(records, test=1500, dev=300)


def _cmb_clin() -> dict[str, list[Record]]:
    return {"test": formats.load_cmb_clin(bundled_dir() / "cmb" / "CMB-test-qa.json")}


DATASETS: dict[str, tuple[DatasetInfo, Callable[[], dict[str, list[Record]]]]] = {
    "pubmedqa": (DatasetInfo("pubmedqa", "PubMedQA PQA-L: yes/no/maybe from a question and its abstract", "en", "choice", "pubmedqa", "MIT"), _pubmedqa),
    "medmcqa": (DatasetInfo("medmcqa", "MedMCQA dev: 4-option medical entrance-exam questions, 21 subjects", "en", "choice", "medmcqa", "MIT"), _medmcqa),
    "dental": (DatasetInfo("dental", "MedMCQA dev, subject Dental: 4-option questions with explanations", "en", "choice", "dental", "MIT"), _dental),
    "cmmlu": (DatasetInfo("cmmlu", "CMMLU: 4-option Chinese exam questions, 67 subjects", "zh", "choice", "cmmlu", "CC BY-NC-SA 4.0"), _cmmlu(None)),
    "cmmlu-med": (DatasetInfo("cmmlu-med", "CMMLU's nine medical subjects", "zh", "choice", "cmmlu", "CC BY-NC-SA 4.0"), _cmmlu(CMMLU_MEDICAL)),
    "cmexam": (DatasetInfo("cmexam", "CMExam validation file: 5-option Chinese medical licensing exam, some multi-answer", "zh", "choice", "cmexam", "Apache-2.0, research use only"), _cmexam),
    "cmb-clin": (DatasetInfo("cmb-clin", "CMB-Clin: open-ended questions on 74 Chinese clinical cases", "zh", "open", "cmb", "Apache-2.0"), _cmb_clin),
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise DataError.single(name, f"unknown dataset; bundled datasets: {', '.join(DATASETS)} (or give a file path)")
    return DATASETS[name][0]


@cache
def _raw_splits(name: str) -> dict[str, list[Record]]:
    dataset_info(name)
    return DATASETS[name][1]()


@lru_cache(maxsize=1)
def _all_test_questions() -> frozenset[str]:
    return frozenset(question_key(r) for name in DATASETS for r in _raw_splits(name).get("test", []))


@cache
def load_splits(name: str) -> dict[str, list[Record]]:
    """Every split of a bundled dataset, decontaminated (cached per process; Records are immutable)."""
    splits = dict(_raw_splits(name))
    test_questions = _all_test_questions()
    for split in ("train", "dev"):
        if split in splits:
            splits[split] = [r for r in splits[split] if question_key(r) not in test_questions]
    return splits


def load_dataset(name_or_path: str, split: str = "test", mapping: dict[str, str] | None = None) -> list[Record]:
    """Records of a bundled dataset's split, or of a user's file (JSONL/JSON/CSV; split ignored).

    A file whose name ends in .json and holds CMB-Exam's format loads with `cmb-exam:PATH`.
    """
    if name_or_path.startswith("cmb-exam:"):
        return formats.load_cmb_exam(name_or_path.split(":", 1)[1])
    if name_or_path not in DATASETS and (Path(name_or_path).suffix or Path(name_or_path).exists()):
        return load_file(name_or_path, mapping)
    splits = load_splits(name_or_path)
    if split not in splits:
        raise DataError.single(name_or_path, f"no split '{split}'; splits: {', '.join(splits)}")
    return list(splits[split])
