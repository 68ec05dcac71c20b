"""`medmoe eval --router`: the routed MambaFormer system through the evaluation harness, on a tiny
routed system (random Llama E_T, its one-layer Mamba hybrid E_M, a random gate) and 4 Dental records."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medmoe.cli import app
from medmoe.errors import MedmoeError, ModelError
from medmoe.eval.benchmarks import load_benchmark
from medmoe.eval.harness import evaluate
from medmoe.eval.model import HFEvalModel
from medmoe.eval.runner import run_benchmark
from medmoe.mamba.transfer import build_hybrid, save_hybrid
from medmoe.mambaformer.answerer import RoutedAnswerer
from medmoe.mambaformer.checkpoint import RouterCheckpoint
from medmoe.mambaformer.features import FeatureConfig, featurizer_for_tokenizer
from medmoe.mambaformer.gate import GateConfig, TokenGate
from medmoe.mambaformer.queries import query_text

LIMIT = 4


@pytest.fixture()
def gate_dir(tiny_lm, tiny_lm_dir, tmp_path):
    """A gate folder as `medmoe run` writes it (router.json's `experts` names both), with tau between the
    p_M of the 4 records so that both experts answer some of them."""
    teacher, tokenizer = tiny_lm
    student, spec = build_hybrid(teacher, layers=[1], teacher_name=str(tiny_lm_dir))
    hybrid = save_hybrid(student, spec, tmp_path / "tiny-mamba", tokenizer)
    records = load_benchmark("dental", LIMIT).records
    featurizer = featurizer_for_tokenizer(tokenizer, teacher.get_input_embeddings().weight.detach(),
                                          [query_text(r) for r in records], [], FeatureConfig(embed_dim=8))
    torch.manual_seed(1)
    checkpoint = RouterCheckpoint(TokenGate(GateConfig()).eval(), featurizer, tau=0.5,
                                  experts={"transformer": str(tiny_lm_dir), "mamba": str(hybrid)})
    folder = checkpoint.save(tmp_path / "router")
    p_mamba = sorted(p for _, p in RoutedAnswerer.load(folder).route(records))
    checkpoint.tau = (p_mamba[1] + p_mamba[2]) / 2  # two records to each expert
    return checkpoint.save(folder)


def run_eval(*args: str):
    return CliRunner().invoke(app, ["eval", "--benchmarks", "dental", "--limit", str(LIMIT), *args])


def read_rows(out):
    return [json.loads(line) for line in (out / "dental" / "predictions.jsonl").read_text().splitlines()]


def test_routed_eval_follows_the_gate_and_scores_as_the_experts(gate_dir, tmp_path):
    out = tmp_path / "eval"
    result = run_eval("--router", str(gate_dir), "--output", str(out))
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    records = load_benchmark("dental", LIMIT).records
    assert [r["id"] for r in rows] == [r.id for r in records]

    # the chosen expert and p_M are the gate's own decision on each record
    system = RoutedAnswerer.load(gate_dir)
    routes = system.route(records)
    assert [r["route"]["expert"] for r in rows] == [expert for expert, _ in routes]
    assert [r["route"]["gate_probability"] for r in rows] == pytest.approx([p for _, p in routes], abs=1e-6)
    assert all((r["route"]["gate_probability"] > system.checkpoint.tau) == (r["route"]["expert"] == "mamba") for r in rows)

    # each answer is what the chosen expert alone gives under the pipeline's scoring (letter rule, zero-shot)
    bench = load_benchmark("dental", LIMIT)
    alone = {name: run_benchmark(HFEvalModel(e.model, e.tokenizer, name), bench, tmp_path / f"{name}.jsonl", "letter")
             for name, e in system.experts.items()}
    for i, row in enumerate(rows):
        solo = alone[row["route"]["expert"]][i]
        assert row["prediction"] == solo["prediction"] and row["prompt_tokens"] == solo["prompt_tokens"]
        assert row["probs"] == pytest.approx(solo["probs"], abs=1e-5)
        assert row["latency_ms"] == pytest.approx(row["route"]["gate_ms"] + row["route"]["expert_ms"])

    summary = json.loads((out / "summary.json").read_text())["benchmarks"]["dental"]
    assert summary["accuracy"] == pytest.approx(np.mean([r["correct"] for r in rows]))
    shares = [r["route"]["expert"] == "mamba" for r in rows]
    assert summary["share_mamba"] == pytest.approx(np.mean(shares)) == 0.5
    assert summary["latency_p50_ms"] == pytest.approx(np.percentile([r["latency_ms"] for r in rows], 50))
    assert summary["gate_latency_p50_ms"] == pytest.approx(np.percentile([r["route"]["gate_ms"] for r in rows], 50))
    assert {name: s["examples"] for name, s in summary["per_expert"].items()} == {"mamba": 2, "transformer": 2}
    assert "to Mamba 50%" in (out / "report.md").read_text() and (out / "results.png").stat().st_size > 0
    settings = json.loads((out / "run.json").read_text())
    assert settings["router"] == str(gate_dir.resolve()) and settings["tau"] == pytest.approx(system.checkpoint.tau)


def test_rerunning_the_same_command_resumes(gate_dir, tmp_path):
    out = tmp_path / "eval"
    assert run_eval("--router", str(gate_dir), "--output", str(out)).exit_code == 0
    path = out / "dental" / "predictions.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])  # interrupted while writing the third row
    result = run_eval("--router", str(gate_dir), "--output", str(out))
    assert result.exit_code == 0, result.output
    again = path.read_text().splitlines()
    assert again[:2] == lines[:2] and len(read_rows(out)) == LIMIT  # kept rows untouched, the rest redone
    assert [json.loads(a)["prediction"] for a in again[-2:]] == [json.loads(b)["prediction"] for b in lines[2:]]


def flat(output: str) -> str:
    """CLI output without the error panel's borders and line breaks (long messages wrap)."""
    return re.sub(r"[\s│╭╮╰╯─]+", " ", output)


def test_router_and_model_are_exclusive(gate_dir):
    for extra in (["--model", "smollm2-135m"], ["--adapter", "somewhere"]):
        result = run_eval("--router", str(gate_dir), *extra)
        assert result.exit_code == 2 and "not both" in flat(result.output), result.output
    result = run_eval("--router", str(gate_dir), "--rule", "loglik")
    assert result.exit_code == 2 and "--rule letter, --shots 0 (got --rule loglik" in flat(result.output), result.output


def test_a_folder_that_is_not_a_gate_is_named(gate_dir, tmp_path):
    result = run_eval("--router", str(tmp_path / "nowhere"))
    assert isinstance(result.exception, ModelError) and str(tmp_path / "nowhere") in str(result.exception)

    broken = shutil.copytree(gate_dir, tmp_path / "broken")
    (broken / "gate.safetensors").write_bytes(b"not a safetensors file")
    result = run_eval("--router", str(broken))
    assert isinstance(result.exception, ModelError) and "corrupt" in str(result.exception) and str(broken) in str(result.exception)

    (broken / "gate.safetensors").write_bytes((gate_dir / "gate.safetensors").read_bytes())
    (broken / "router.json").write_text('{"tau": 0.5,')  # truncated JSON
    with pytest.raises(ModelError, match="corrupt"):
        RoutedAnswerer.load(broken)

    meta = json.loads((gate_dir / "router.json").read_text())
    mamba = meta["experts"]["mamba"]
    meta["experts"]["mamba"] = None  # as `medmoe router train` without --mamba writes it: E_T only
    (broken / "router.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"names no expert for mamba \(experts.mamba\)"):
        RoutedAnswerer.load(broken)
    assert RoutedAnswerer.load(broken, experts={"mamba": mamba}).experts["mamba"].source == mamba  # given instead
    del meta["experts"]
    (broken / "router.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="names no expert for transformer and mamba"):
        RoutedAnswerer.load(broken)


def test_open_questions_are_refused_before_anything_runs(gate_dir, tmp_path):
    with pytest.raises(MedmoeError, match="option questions only; open-ended benchmarks: cmb-clin"):
        evaluate(RoutedAnswerer.load(gate_dir), ["cmb-clin"], tmp_path / "open", limit=1)
    assert not (tmp_path / "open").exists()
