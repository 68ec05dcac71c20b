"""MambaFormer end to end on tiny random experts and real bundled data (a few examples per split)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from medmoe.errors import DataError, MedmoeError
from medmoe.mamba.transfer import build_hybrid, save_hybrid
from medmoe.mambaformer.checkpoint import RouterCheckpoint
from medmoe.mambaformer.experiments.pipeline import PipelineConfig, run_pipeline
from medmoe.mambaformer.experts import load_expert


@pytest.fixture()
def tiny_experts(tiny_lm, tiny_lm_dir, tmp_path):
    teacher, tokenizer = tiny_lm
    student, spec = build_hybrid(teacher, layers=[1], teacher_name=str(tiny_lm_dir))
    hybrid = save_hybrid(student, spec, tmp_path / "tiny-mamba", tokenizer)
    return str(tiny_lm_dir), str(hybrid)


def test_load_expert_reads_a_hybrid_folder(tiny_experts):
    _, hybrid = tiny_experts
    expert = load_expert("mamba", hybrid)
    assert expert.source == hybrid and expert.tokenizer is not None
    assert type(expert.model).__name__ == "MambaHybridForCausalLM"


def test_pipeline_runs_end_to_end_and_reports_every_baseline(tiny_experts, tmp_path):
    transformer, mamba = tiny_experts
    cfg = PipelineConfig(dataset="dental", transformer=transformer, mamba=mamba, big=transformer,
                         train_limit=24, dev_limit=12, test_limit=12, betas=(0.0, 1.0), epochs=3, out=str(tmp_path / "run"))
    report = run_pipeline(cfg, log=lambda _: None)
    names = [row["router"] for row in report["summary"]]
    assert names[:2] == ["transformer-only", "mamba-only"]
    assert {"length-threshold", "oracle-accuracy", "mambaformer (calibrated)"} <= set(names)
    rows = {row["router"]: row for row in report["summary"]}
    # the oracle picks a correct expert whenever one exists: no router can be more accurate
    assert rows["oracle-accuracy"]["accuracy"] >= max(r["accuracy"] for r in report["summary"])
    assert rows["transformer-only"]["share_mamba"] == 0 and rows["mamba-only"]["share_mamba"] == 1
    folder = tmp_path / "run" / "dental"
    assert (folder / "pareto.png").stat().st_size > 0
    assert json.loads((folder / "pareto.json").read_text())["tau"] == report["tau"]
    # the saved router reproduces the pipeline's routing threshold
    assert RouterCheckpoint.load(folder / "router").tau == pytest.approx(report["tau"])
    # per-example expert results are cached: a second run reads them instead of recomputing
    lines = (folder / "test" / "transformer.jsonl").read_text().splitlines()
    assert len(lines) == 12
    again = run_pipeline(cfg, log=lambda _: None)
    assert np.isclose(again["summary"][0]["accuracy"], report["summary"][0]["accuracy"])
    assert (folder / "test" / "transformer.jsonl").read_text().splitlines() == lines


def test_routed_answerer_follows_the_gate(tiny_experts, tmp_path):
    from medmoe.data import load_dataset

    transformer, mamba = tiny_experts
    cfg = PipelineConfig(dataset="dental", transformer=transformer, mamba=mamba, big=None,
                         train_limit=16, dev_limit=8, test_limit=8, betas=(1.0,), epochs=2, out=str(tmp_path / "run"))
    run_pipeline(cfg, log=lambda _: None)
    from types import SimpleNamespace

    from medmoe.mambaformer.answerer import load_routed_answerer

    answerer = load_routed_answerer(SimpleNamespace(answerer_options={"router": str(tmp_path / "run" / "dental" / "router")}))
    records = load_dataset("dental", "test")[:4]
    batched = answerer.answer_batch(records)
    for record, together in zip(records, batched):
        answer = answerer.answer(record)
        assert (answer.answer, answer.expert) == (together.answer, together.expert)
        assert answerer.batch_key(record) == f"{answer.expert}:options"
        assert answer.answer in record.letters
        assert answer.expert == ("mamba" if answer.gate_probability > answerer.checkpoint.tau else "transformer")
        assert sum(answer.label_scores.values()) == pytest.approx(1.0)
        assert set(answer.latency_ms) == {"gate", "expert", "total"} and answer.top_features


def test_run_saves_the_calibrated_tau_once_the_gate_cost_and_the_experts(tiny_experts, tmp_path):
    """`medmoe run`'s checkpoint: one tau (the calibrated one: the gate config's copy was 0.5), the gate's
    measured cost, both experts' sources; `medmoe mambaformer calibrate`'s core on the run's cached dev
    results picks the same tau by the same rule."""
    from medmoe.mambaformer.answerer import RoutedAnswerer
    from medmoe.mambaformer.calibrate import calibrate_tau
    from medmoe.mambaformer.experiments.pipeline import cached_table
    from medmoe.mambaformer.fit import recalibrate

    transformer, mamba = tiny_experts
    cfg = PipelineConfig(dataset="dental", transformer=transformer, mamba=mamba, big=None,
                         train_limit=16, dev_limit=12, test_limit=8, betas=(1.0,), epochs=2, out=str(tmp_path / "run"))
    report = run_pipeline(cfg, log=lambda _: None)
    folder = tmp_path / "run" / "dental" / "router"
    meta = json.loads((folder / "router.json").read_text())
    assert "tau" not in meta["gate_config"] and meta["tau"] == report["tau"] == meta["calibration"]["tau"]
    assert meta["gate_ms"] == report["gate_ms"] > 0 and meta["calibration"]["gate_ms"] == report["gate_ms"]
    assert meta["experts"] == {"transformer": transformer, "mamba": mamba}
    checkpoint = RouterCheckpoint.load(folder)
    assert checkpoint.tau == report["tau"] and checkpoint.gate_ms == report["gate_ms"]

    records, dev = cached_table(cfg, "dev")
    assert recalibrate(folder, dev, records, tolerance=cfg.tolerance).tau == pytest.approx(report["tau"])
    budget = float(np.median(dev.transformer.latency_ms)) + report["gate_ms"]  # all to E_T meets it
    cal = recalibrate(folder, dev, records, budget_ms=budget)
    scores = [p for _, p in RoutedAnswerer.load(folder).route(records)]
    assert cal.tau == pytest.approx(calibrate_tau(np.array(scores), dev, budget, gate_ms=report["gate_ms"]).tau)
    assert cal.metrics.p50_ms <= budget and RouterCheckpoint.load(folder).tau == cal.tau


def test_load_expert_takes_the_dtype_but_the_hybrid_stays_float32_on_cpu(tiny_experts):
    import torch

    transformer, mamba = tiny_experts
    e_t = load_expert("transformer", transformer, dtype="bfloat16", device="cpu")
    assert (e_t.dtype, e_t.device) == ("bfloat16", "cpu")
    assert {p.dtype for p in e_t.model.parameters()} == {torch.bfloat16}
    e_m = load_expert("mamba", mamba, dtype="bfloat16", device="cpu")  # its fused CPU kernels are float32-only
    assert e_m.dtype == "float32" and {p.dtype for p in e_m.model.parameters()} == {torch.float32}
    with pytest.raises(MedmoeError, match="dtype 'int8'"):
        load_expert("mamba", mamba, dtype="int8")


def test_a_changed_dtype_on_a_reused_run_folder_is_refused_naming_the_option(tiny_experts, tmp_path):
    """Rows are cached by question id: adding bfloat16 rows to float32 ones would mix two settings, so
    the run folder's experts.json pins each expert's dtype and device; the same settings reuse the rows."""
    transformer, mamba = tiny_experts
    cfg = PipelineConfig(dataset="dental", transformer=transformer, mamba=mamba, big=transformer, train_limit=8,
                         dev_limit=6, test_limit=6, betas=(1.0,), epochs=2, out=str(tmp_path / "run"), dtype="bfloat16")
    report = run_pipeline(cfg, log=lambda _: None)
    folder = tmp_path / "run" / "dental"
    assert report["placement"]["transformer"] == {"source": transformer, "dtype": "bfloat16", "device": "cpu"}
    assert report["placement"]["mamba"]["dtype"] == "float32" and report["placement"]["big"]["dtype"] == "bfloat16"
    assert RouterCheckpoint.load(folder / "router").info["placement"] == report["placement"]
    assert json.loads((folder / "experts.json").read_text()) == {
        name: {"dtype": p["dtype"], "device": "cpu"} for name, p in report["placement"].items()}
    rows = (folder / "test" / "transformer.jsonl").read_text()
    with pytest.raises(DataError, match=r"transformer results computed in bfloat16 on cpu, and this run loads "
                                        r"transformer in float32 on cpu; use another --output, or --dtype bfloat16"):
        run_pipeline(replace(cfg, dtype="float32"), log=lambda _: None)
    assert (folder / "test" / "transformer.jsonl").read_text() == rows  # nothing added
    run_pipeline(replace(cfg, dtype="bf16"), log=lambda _: None)  # the same setting, spelled otherwise: reused
    assert (folder / "test" / "transformer.jsonl").read_text() == rows


def test_rows_from_before_the_placement_file_count_as_float32_on_cpu(tiny_experts, tmp_path):
    transformer, mamba = tiny_experts
    cfg = PipelineConfig(dataset="dental", transformer=transformer, mamba=mamba, big=None, train_limit=8,
                         dev_limit=6, test_limit=6, betas=(1.0,), epochs=2, out=str(tmp_path / "run"))
    run_pipeline(cfg, log=lambda _: None)
    placement = tmp_path / "run" / "dental" / "experts.json"
    placement.unlink()  # a folder written by an older medmoe: rows, no experts.json
    with pytest.raises(DataError, match="computed in float32 on cpu.*--dtype float32"):
        run_pipeline(replace(cfg, dtype="bfloat16"), log=lambda _: None)
    run_pipeline(cfg, log=lambda _: None)
    assert json.loads(placement.read_text())["transformer"] == {"dtype": "float32", "device": "cpu"}
