"""Training pools: the documented sizes, unique ids, and no bundled test question inside."""

from __future__ import annotations

import pytest

from medmoe.data import DATASETS, load_splits
from medmoe.data.pools import POOLS, SHARES_TEST_WITH, pool_sources, training_pool
from medmoe.data.splits import question_key
from medmoe.errors import DataError

SIZES = {"pubmedqa": 500, "dental": 3683, "medmcqa": 818, "cmexam": 5299, "cmmlu-med": 5629}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_pool_size_and_unique_ids(name):
    pool = training_pool(name)
    assert len(pool) == SIZES[name]
    assert len({r.id for r in pool}) == len(pool)
    assert sum(kept for _, kept, _ in pool_sources(name)) == len(pool)


@pytest.mark.parametrize("name", sorted(POOLS))
def test_no_test_question_in_any_pool(name):
    pool_keys = {question_key(r) for r in training_pool(name)}
    for other in DATASETS:
        if other in SHARES_TEST_WITH.get(name, ()):
            continue
        leaked = pool_keys & {question_key(r) for r in load_splits(other).get("test", [])}
        assert not leaked, f"{name} pool holds {len(leaked)} {other} test questions"
    # its own benchmark's test questions never, whatever SHARES_TEST_WITH says
    assert not pool_keys & {question_key(r) for r in load_splits(name)["test"]}


def test_dental_pool_has_other_medmcqa_subjects_and_only_those_shared_with_medmcqa_test():
    pool = training_pool("dental")
    subjects = {r.metadata["subject"] for r in pool}
    assert {"Dental", "Surgery", "Pathology", "Pharmacology"} <= subjects
    assert sum(r.metadata["subject"] != "Dental" for r in pool) == 2865
    medmcqa_test = {question_key(r) for r in load_splits("medmcqa")["test"]}
    shared = [r for r in pool if question_key(r) in medmcqa_test]
    assert shared and all(r.metadata["subject"] != "Dental" for r in shared)


def test_medmcqa_pool_is_what_its_test_split_leaves_out():
    pool_ids = {r.id for r in training_pool("medmcqa")}
    test_ids = {r.id for r in load_splits("medmcqa")["test"]}
    assert not pool_ids & test_ids
    assert pool_ids | test_ids == {r.id for r in load_splits("medmcqa")["validation"]}


def test_cmmlu_med_pool_adds_cmexam_and_all_cmmlu_dev():
    pool = training_pool("cmmlu-med")
    assert sum(r.id.startswith("cmmlu/") for r in pool) == 330
    assert sum(r.id.startswith("cmexam/") for r in pool) == 5299


def test_unknown_pool_is_refused():
    with pytest.raises(DataError, match="no training pool"):
        training_pool("cmb-clin")
