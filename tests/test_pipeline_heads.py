"""`medmoe run --answers heads` on tiny random experts and real bundled data: the experts answer through
option heads cross-fitted on the run's train + dev records, the router checkpoint carries the heads,
and the routed answerer answers through them."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from medmoe.data import load_dataset
from medmoe.errors import MedmoeError, ModelError
from medmoe.mamba.transfer import build_hybrid, save_hybrid
from medmoe.mambaformer.answerer import RoutedAnswerer, load_routed_answerer
from medmoe.mambaformer.checkpoint import RouterCheckpoint
from medmoe.mambaformer.experiments.expert_heads import TIMING_FILE, check_pool
from medmoe.mambaformer.experiments.pipeline import PipelineConfig, cached_table, run_pipeline


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    """A tiny random Llama with a word-level tokenizer over the records' words (option letters are one
    token each, as a head's letter prompt needs), saved to a folder."""
    from tiny_lm import tiny_llama, tiny_tokenizer

    records = [r for s in ("train", "dev", "test") for r in load_dataset("pubmedqa", s)[:20]]
    tokenizer = tiny_tokenizer(extra_text=" ".join(f"{r.question} {r.context or ''}" for r in records))
    folder = tmp_path_factory.mktemp("experts") / "tiny-llama"
    tiny_llama(vocab=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def heads_run(tiny_lm_dir, tmp_path_factory):
    """One heads run shared by the module's tests (those that change files work on a copy: `own_copy`)."""
    from medmoe.models import load_causal_lm

    tmp_path = tmp_path_factory.mktemp("heads-run")
    teacher, tokenizer = load_causal_lm(str(tiny_lm_dir))
    student, spec = build_hybrid(teacher, layers=[1], teacher_name=str(tiny_lm_dir))
    hybrid = save_hybrid(student, spec, tmp_path / "tiny-mamba", tokenizer)
    cfg = PipelineConfig(dataset="pubmedqa", transformer=str(tiny_lm_dir), mamba=str(hybrid), big=None,
                         train_limit=20, dev_limit=10, test_limit=8, betas=(1.0,), epochs=2,
                         out=str(tmp_path / "run"), answers="heads")
    return cfg, run_pipeline(cfg, log=lambda _: None)


def test_a_heads_run_writes_cross_fitted_rows_and_a_checkpoint_with_both_heads(heads_run):
    cfg, report = heads_run
    folder = f"{cfg.out}/{cfg.dataset}"
    for split, n in (("train", 20), ("dev", 10), ("test", 8)):
        rows = [json.loads(line) for line in open(f"{folder}/{split}/heads/transformer.jsonl", encoding="utf-8")]
        assert len(rows) == n
        assert all(abs(sum(r["probs"].values()) - 1) < 1e-5 and r["lm_prediction"] in "ABC" for r in rows)
        assert all(r["latency_ms"] > 0 for r in rows)  # from the measured latency model
    checkpoint = RouterCheckpoint.load(f"{folder}/router")
    assert set(checkpoint.heads) == {"transformer", "mamba"}
    assert set(checkpoint.latency_models) == {"transformer", "mamba"}
    head, config = checkpoint.heads["transformer"]
    assert config.base == cfg.transformer and config.questions == "yesno/en" and config.selection["cross_fitted"]
    assert config.trained_on["records"] == 30  # train + dev, never a test question
    timing = json.loads(open(f"{folder}/{TIMING_FILE}", encoding="utf-8").read())
    assert len(timing["transformer"]["ms"]) == 10  # TIMED dev questions, capped by the dev split
    # the run's own tables are what `medmoe mambaformer calibrate` and the server's budgets read back
    saved = PipelineConfig(**checkpoint.info["config"])  # how calibrate and the server rebuild the run's settings
    assert saved.answers == "heads"
    records, table = cached_table(saved, "test")
    assert len(records) == 8 and np.isclose(report["summary"][0]["accuracy"], table.transformer.correct.mean())


def test_a_second_heads_run_reuses_the_features_and_the_timing(own_copy):
    cfg, report = own_copy
    folder = f"{cfg.out}/{cfg.dataset}"
    timing = open(f"{folder}/{TIMING_FILE}", encoding="utf-8").read()
    rows = open(f"{folder}/test/heads/mamba.jsonl", encoding="utf-8").read()
    again = run_pipeline(cfg, log=lambda _: None)
    assert open(f"{folder}/{TIMING_FILE}", encoding="utf-8").read() == timing
    assert open(f"{folder}/test/heads/mamba.jsonl", encoding="utf-8").read() == rows
    assert again["tau"] == pytest.approx(report["tau"])


def test_the_routed_answerer_answers_through_the_checkpoints_heads(heads_run):
    cfg, _ = heads_run
    router = f"{cfg.out}/{cfg.dataset}/router"
    answerer = load_routed_answerer(SimpleNamespace(answerer_options={"router": router}))
    records = load_dataset("pubmedqa", "test")[:4]
    rows = {json.loads(line)["id"]: json.loads(line) for role in ("transformer", "mamba")
            for line in open(f"{cfg.out}/{cfg.dataset}/test/heads/{role}.jsonl", encoding="utf-8")
            if role == "transformer"}
    outcomes = answerer.score_records(records)
    for record, outcome in zip(records, outcomes):
        assert outcome.route["head"] in ("zero-shot", "calibration", "head")
        assert sum(outcome.probs.values()) == pytest.approx(1.0, abs=1e-5)
        if outcome.route["expert"] == "transformer":  # the served head gives the run's test answer
            assert outcome.prediction == rows[record.id]["prediction"]
            assert outcome.probs == pytest.approx(rows[record.id]["probs"], abs=1e-4)
    answers = answerer.answer_batch(records)
    assert [a.answer for a in answers] == [o.prediction for o in outcomes]
    # a question of another format has no head here: the expert's own answer
    dental = load_dataset("dental", "test")[:2]
    assert all(o.route.get("head") is None for o in answerer.score_records(dental))


@pytest.fixture()
def own_copy(heads_run, tmp_path):
    """(config, report) of a copy of the shared run folder, for a test that changes its files."""
    import shutil
    from dataclasses import replace

    cfg, report = heads_run
    shutil.copytree(cfg.out, tmp_path / "run")
    return replace(cfg, out=str(tmp_path / "run")), report


def test_an_expert_swapped_under_a_head_is_refused(heads_run, tiny_lm_dir):
    cfg, _ = heads_run
    with pytest.raises(ModelError, match="option head trained on"):
        RoutedAnswerer.load(f"{cfg.out}/{cfg.dataset}/router", {"mamba": str(tiny_lm_dir)})


def test_a_broken_head_in_the_checkpoint_fails_loudly_naming_it(own_copy):
    cfg, _ = own_copy
    weights = f"{cfg.out}/{cfg.dataset}/router/heads/mamba/head.safetensors"
    open(weights, "wb").write(b"not a safetensors file")
    with pytest.raises(ModelError, match="head.safetensors"):
        RouterCheckpoint.load(f"{cfg.out}/{cfg.dataset}/router")


def test_a_hostile_head_path_in_router_json_is_refused(own_copy):
    cfg, _ = own_copy
    meta_file = f"{cfg.out}/{cfg.dataset}/router/router.json"
    meta = json.loads(open(meta_file, encoding="utf-8").read())
    meta["heads"]["mamba"] = "../../elsewhere"
    open(meta_file, "w", encoding="utf-8").write(json.dumps(meta))
    with pytest.raises(ModelError, match="not a head folder inside the checkpoint"):
        RouterCheckpoint.load(f"{cfg.out}/{cfg.dataset}/router")


def test_a_zero_shot_run_into_the_same_folder_drops_the_old_heads(own_copy):
    from dataclasses import replace

    cfg, _ = own_copy
    run_pipeline(replace(cfg, answers="zero-shot"), log=lambda _: None)
    checkpoint = RouterCheckpoint.load(f"{cfg.out}/{cfg.dataset}/router")
    assert checkpoint.heads == {} and checkpoint.info["config"]["answers"] == "zero-shot"


def test_multi_answer_pools_and_unknown_answer_modes_are_refused():
    from medmoe.data.record import Record

    multi = Record(id="q1", question="which?", answer="AB", options=("x", "y", "z"))
    with pytest.raises(MedmoeError, match="single-answer"):
        check_pool([multi], "cmexam")
    with pytest.raises(MedmoeError, match="answers must be one of"):
        PipelineConfig(answers="likelihood")
