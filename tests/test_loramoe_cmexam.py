"""benchmarks/loramoe_cmexam.py end to end on a tiny random Qwen2 (4 blocks, top 2): cache, score the base
and a throwaway LoRA-MoE adapter trained with --top-blocks, check against the full model, resume, report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from medmoe.errors import MedmoeError
from medmoe.train.finetune import FinetuneConfig, finetune
from test_top_blocks import MOE
from test_top_blocks_scoring import tiny_qwen


@pytest.fixture()
def base_and_adapter(tmp_path, tiny_tokenizer):
    """A saved tiny base, and a LoRA-MoE adapter trained on its top 2 blocks (3 steps, CMExam records)."""
    from medmoe.models import load_causal_lm
    from medmoe.train.data import load_examples

    base = tmp_path / "base"
    tiny_qwen(len(tiny_tokenizer)).save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    model, tokenizer = load_causal_lm(str(base))
    cfg = FinetuneConfig(method="loramoe", output=str(tmp_path / "run"), steps=3, batch_size=2, lr=5e-3, warmup_steps=1,
                         eval_every=3, eval_examples=2, save_every=3, progress=False, loramoe=MOE, top_blocks=2, max_length=96,
                         base=str(base), data="cmexam", limit=8)
    examples = load_examples("cmexam", tokenizer)[:8]
    result = finetune(cfg, model, tokenizer, train_examples=examples)
    return base, result["adapter"]


def test_cache_score_check_and_report_on_a_tiny_model(tmp_path, base_and_adapter, monkeypatch):
    import common
    import loramoe_cmexam

    monkeypatch.setattr(common, "REPORTS", common.REPORTS)  # --report-dir sets it: restored after the test

    base, adapter = base_and_adapter
    work = tmp_path / "work"
    common = ["--model", str(base), "--workdir", str(work), "--limit", "6", "--top-blocks", "2", "--threads", "1"]
    loramoe_cmexam.main(["cache", *common, "--batch-size", "3"])
    manifest = json.loads((work / "test_cache" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["key"]["examples"] == 6 and manifest["key"]["model_dtype"] == "float32"
    assert json.loads((work / "top_blocks_cache.json").read_text())["builds"][0]["computed_examples"] == 6

    loramoe_cmexam.main(["score", *common, "--system", "zero-shot"])
    loramoe_cmexam.main(["score", *common, "--system", "tiny-moe", "--adapter", str(adapter)])
    rows = [json.loads(line) for line in (work / "tiny-moe.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and set(rows[0]) >= {"id", "gold", "prediction", "correct", "scores", "probs"}
    assert rows[0]["id"] == "cmexam/1" and sum(rows[0]["probs"].values()) == pytest.approx(1.0)
    base_rows = [json.loads(line) for line in (work / "zero-shot.jsonl").read_text().splitlines()]
    assert [r["scores"] for r in rows] != [r["scores"] for r in base_rows]  # the adapter changes the scores

    loramoe_cmexam.main(["score", *common, "--system", "tiny-moe", "--adapter", str(adapter)])  # resumed: nothing to do
    info = json.loads((work / "tiny-moe.json").read_text())
    assert [r["scored"] for r in info["runs"]] == [6, 0] and info["settings"]["adapter"] == str(adapter)
    with pytest.raises(SystemExit, match=r"tiny-moe's rows were scored with other settings \(adapter: "):
        loramoe_cmexam.main(["score", *common, "--system", "tiny-moe", "--adapter", str(base)])
    with pytest.raises(MedmoeError, match=r"made with other settings, model or data \(model_dtype: 'float32' -> 'bfloat16'"):
        loramoe_cmexam.main(["score", *common, "--system", "zero-shot", "--dtype", "bfloat16"])

    for system, extra in (("zero-shot", []), ("tiny-moe", ["--adapter", str(adapter)])):
        assert loramoe_cmexam.main(["check", *common, "--system", system, *extra, "--n", "3"]) is True
        checked = json.loads((work / f"check-{system}.json").read_text())
        assert checked["n"] == 3 and checked["same_predictions"] and checked["max_abs_logprob_diff"] < 1e-4
        assert checked["cache"] == str(work / "test_cache")

    report = loramoe_cmexam.main(["report", "--workdir", str(work), "--report-dir", str(tmp_path / "reports")])
    data = json.loads(report.with_suffix(".json").read_text())
    cmexam = data["benchmarks"]["cmexam"]
    assert cmexam["n"] == 6 and set(cmexam["systems"]) == {"zero-shot", "tiny-moe"}
    moe = cmexam["systems"]["tiny-moe"]
    assert moe["accuracy"] == sum(r["correct"] for r in rows) / 6 and "diff_vs_zero_shot_ci95" in moe
    assert "diff_vs_zero_shot" not in cmexam["systems"]["zero-shot"]
    training = data["systems"]["tiny-moe"]["training"]
    assert training["steps"] == 3 and training["trained_on"] == 6 and training["held_out"] == 2 and training["train_seconds"] > 0
    assert training["cache_build"]["builds"][0]["computed_examples"] == 8
    text = report.read_text()
    assert "## cmexam (n = 6)" in text and "## cmexam-single (n = 6; the single-answer questions)" in text
    assert "| tiny-moe | " in text and "several correct letters" in text


def test_the_quality_report_lists_the_scored_adapters_on_cmexam(tmp_path, monkeypatch):
    """benchmarks/quality.py report: rows of runs/loramoe_cmexam/loramoe.jsonl covering the cmexam questions
    become a system of cmexam and cmexam-single (no CV column); rows of other questions are left out."""
    import argparse

    import common
    import quality

    runs, top = tmp_path / "quality", tmp_path / "loramoe_cmexam"
    gold = ["A", "B", "AB", "C"]
    folder = runs / "cmexam" / "qwen2.5-coder-1.5b"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"expert": "qwen2.5-coder-1.5b", "test": 4, "test_split": 4, "dtype": "bfloat16",
                                                 "pool": 10, "systems": {"zero-shot": {"chosen": "zero-shot", "cv_accuracy": 0.3}}}))
    (folder / "predictions.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "gold": g, "multi_answer": len(g) > 1,
                                                                  "zero-shot": "A"}) + "\n" for i, g in enumerate(gold)))
    top.mkdir()
    (top / "loramoe.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "prediction": p}) + "\n" for i, p in enumerate("ABAC")))
    (top / "loramoe.json").write_text(json.dumps({"settings": {"model": "qwen2.5-coder-1.5b", "adapter": "runs/x/adapter", "dtype": "float32"}}))
    (top / "lora.jsonl").write_text(json.dumps({"id": "q0", "prediction": "A"}) + "\n")  # partial: left out
    monkeypatch.setattr(quality, "RUNS", runs)
    monkeypatch.setattr(quality, "TOP_BLOCK_RUNS", top)
    monkeypatch.setattr(common, "REPORTS", tmp_path / "reports")
    quality.report(argparse.Namespace())
    data = json.loads((tmp_path / "reports" / "quality.json").read_text())
    name = "qwen2.5-coder-1.5b LoRA-MoE (top 4 blocks)"
    assert set(data["benchmarks"]["cmexam"]["systems"]) == {"qwen2.5-coder-1.5b zero-shot", name}
    assert data["benchmarks"]["cmexam"]["systems"][name]["accuracy"] == 0.75  # the multi-answer one wrong
    assert data["benchmarks"]["cmexam-single"]["systems"][name]["accuracy"] == 1.0
    assert data["benchmarks"]["cmexam"]["systems"][name]["family"] == "LoRA-MoE (top 4 blocks)"
    assert f"| {name} | adapter runs/x/adapter (float32) |  | 0.750 " in (tmp_path / "reports" / "quality.md").read_text()
