"""MambaFormer's generative setting (`experiments.generative_routing`): generation rows per split, the
quality table (l_e = 1 - q_e), the constant-text floor, and the pipeline's routing on that table."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from medmoe.data import load_dataset
from medmoe.data.record import Record
from medmoe.errors import MedmoeError
from medmoe.eval.textmetrics import BertScorer, rouge_l
from medmoe.mamba.transfer import build_hybrid
from medmoe.mambaformer.checkpoint import RouterCheckpoint
from medmoe.mambaformer.experiments.baselines import OracleRouter
from medmoe.mambaformer.experiments.generative import explained_records
from medmoe.mambaformer.experiments.generative_routing import (
    GenerativeConfig,
    constant_text_floor,
    generative_routing_run,
    quality_table,
    route_generations,
    text_quality,
)
from medmoe.mambaformer.experiments.targets import Floor, routing_targets
from medmoe.mambaformer.experts import Expert
from medmoe.mambaformer.metrics import evaluate
from medmoe.mambaformer.queries import encode_queries, query_features
from medmoe.mambaformer.results import ExpertOutcome, ExpertResults
from medmoe.mambaformer.train import gate_scores


def tiny_scorer(tiny_lm):
    model, tokenizer = tiny_lm
    return lambda language: BertScorer(model, tokenizer, layer=1, name=f"tiny-{language}")


@pytest.fixture()
def tiny_experts(tiny_lm):
    """{"transformer": a tiny random Llama, "mamba": its one-layer Mamba hybrid}, sharing the tokenizer."""
    teacher, tokenizer = tiny_lm
    student, _ = build_hybrid(teacher, layers=[1])
    return {"transformer": Expert("transformer", "tiny-llama", teacher, tokenizer),
            "mamba": Expert("mamba", "tiny-hybrid", student, tokenizer)}


def generation_row(record: Record, q: float, latency_ms: float, prompt_tokens: int = 10) -> dict:
    """A generation row as `generative.expert_rows` writes it, with both metrics set to q."""
    return {"id": record.id, "generation": f"text for {record.id}", "rouge_l": q, "bertscore_f1": q,
            "latency_ms": latency_ms, "prompt_tokens": prompt_tokens}


def test_run_writes_rows_per_split_resumes_and_reports_under_generative(tiny_experts, tiny_lm, tmp_path):
    cfg = GenerativeConfig(dataset="dental", train_limit=4, dev_limit=3, test_limit=3, max_new_tokens=4, epochs=3,
                           betas=(0.0, 0.1), out=str(tmp_path / "run"))
    report = generative_routing_run(cfg, tiny_experts, tiny_scorer(tiny_lm), log=lambda _: None)
    folder = tmp_path / "run" / "dental"
    explained = {s: explained_records(load_dataset("dental", s)) for s in ("train", "dev", "test")}
    for split, n in (("train", 4), ("dev", 3), ("test", 3)):
        for name in ("transformer", "mamba"):
            rows = [json.loads(line) for line in (folder / split / f"{name}.jsonl").read_text().splitlines()]
            assert [r["id"] for r in rows] == [r.id for r in explained[split][:n]]
    generative = report["generative"]
    assert generative["metric"] == "bertscore_f1" and "targets" not in report and "floor" not in report
    assert set(generative["targets"]["holds"]) == {"speedup_3x_within_1pt_of_et_above_floor", "deployed_mixes",
                                                   "deployed_beats_random_same_mix", "apgr_at_least_0.5"}
    floor = generative["floor"]
    assert floor["chosen_on"] == "dev" and floor["text"] in {r.explanation for r in explained["train"][:4]}
    assert generative["targets"]["floor_answer"] == floor["text"]
    assert generative["targets"]["floor_accuracy"] == pytest.approx(floor["test_quality"])
    # E_T's row of the table is its mean test BERTScore-F1, read from the rows
    test_t = [json.loads(line) for line in (folder / "test" / "transformer.jsonl").read_text().splitlines()]
    rows = {r["router"]: r for r in report["summary"]}
    assert rows["transformer-only"]["accuracy"] == pytest.approx(np.mean([r["bertscore_f1"] for r in test_t]))
    assert "preds" not in rows["transformer-only"]
    assert RouterCheckpoint.load(folder / "router").tau == pytest.approx(report["tau"])
    assert (folder / "pareto.png").stat().st_size > 0
    assert "| router | BERTScore-F1 |" in (folder / "pareto.md").read_text()

    def no_scorer(language):
        raise AssertionError("finished rows must not be generated or scored again")

    before = {p: p.read_text() for p in folder.glob("*/*.jsonl")}
    again = generative_routing_run(replace(cfg, metric="rouge_l"), tiny_experts, no_scorer, log=lambda _: None)
    assert {p: p.read_text() for p in folder.glob("*/*.jsonl")} == before
    rows_again = {r["router"]: r for r in again["summary"]}
    assert rows_again["transformer-only"]["accuracy"] == pytest.approx(np.mean([r["rouge_l"] for r in test_t]))


def test_quality_table_has_loss_one_minus_q_and_quality_as_correct():
    records = explained_records(load_dataset("dental", "dev"))[:3]
    q_t, q_m = [0.2, 0.5, 0.9], [0.4, 0.5, 0.1]
    rows = {"transformer": [generation_row(r, q, 300.0) for r, q in zip(records, q_t)],
            "mamba": [{**generation_row(r, q, 100.0), "rouge_l": 0.0} for r, q in zip(records, q_m)]}
    table = quality_table(records, rows, "bertscore_f1")
    assert table.transformer.correct.dtype == np.float64
    np.testing.assert_allclose(table.transformer.loss, 1 - np.array(q_t))
    np.testing.assert_allclose(table.mamba.loss, 1 - np.array(q_m))
    np.testing.assert_allclose(table.stacked("correct"), np.stack([q_t, q_m], axis=1))
    assert evaluate(table, np.array([False, True, False])).accuracy == pytest.approx((0.2 + 0.5 + 0.9) / 3)
    np.testing.assert_allclose(table.take([2, 0]).mamba.correct, [0.1, 0.4])  # a sub-table keeps q, not bool
    np.testing.assert_allclose(quality_table(records, rows, "rouge_l").mamba.loss, [1.0, 1.0, 1.0])
    with pytest.raises(MedmoeError, match="metric must be one of"):
        quality_table(records, rows, "bleu")
    with pytest.raises(MedmoeError, match="not those of the 3 records"):
        quality_table(records[::-1], rows, "rouge_l")


def test_accuracy_oracle_takes_the_higher_quality_per_query_and_the_cheaper_on_ties():
    q_t, q_m = np.array([0.3, 0.6, 0.5, 0.5]), np.array([0.4, 0.2, 0.5, 0.5])
    ms_t, ms_m = np.array([300.0, 300.0, 300.0, 100.0]), np.array([100.0, 100.0, 400.0, 300.0])
    table = ExpertResults(["a", "b", "c", "d"], np.full(4, 5),
                           {"transformer": ExpertOutcome(1 - q_t, q_t, [""] * 4, ms_t),
                            "mamba": ExpertOutcome(1 - q_m, q_m, [""] * 4, ms_m)})
    assert OracleRouter(objective="accuracy").route(table).tolist() == [True, False, False, False]


def test_constant_text_floor_is_chosen_on_dev_only(tiny_lm):
    def records(prefix: str, references: list[str]) -> list[Record]:
        return [Record(f"{prefix}{i}", "Which tissue?", "A", options=("x", "y"), explanation=text)
                for i, text in enumerate(references)]

    train = records("t", ["enamel is the hardest tissue", "the gingiva bleeds in gingivitis"])
    dev = records("d", ["enamel covers the crown", "enamel is hard"])
    test = records("s", ["gingivitis makes the gingiva bleed", "the gingiva is soft tissue"])
    floor = constant_text_floor(train, dev, test, "rouge_l")
    assert floor.text == "enamel is the hardest tissue" and floor.candidates == 2
    assert floor.dev_quality == pytest.approx(np.mean([rouge_l(floor.text, r.explanation) for r in dev]))
    np.testing.assert_allclose(floor.test.correct, [rouge_l(floor.text, r.explanation) for r in test])
    # the other reference scores higher on test, and test never moves the choice; dev does
    assert np.mean([rouge_l(train[1].explanation, r.explanation) for r in test]) > floor.test.correct.mean()
    assert constant_text_floor(train, dev, dev, "rouge_l").text == floor.text
    assert constant_text_floor(train, test, dev, "rouge_l").text == train[1].explanation

    # BERTScore through the embedding cache is the scorer's own F1
    scorer = tiny_scorer(tiny_lm)("en")
    q = text_quality("bertscore_f1", tiny_scorer(tiny_lm))
    for text in (train[0].explanation, train[1].explanation, train[0].explanation):
        assert q(text, dev[0]) == pytest.approx(scorer.score(text, dev[0].explanation)[2])


def test_routing_targets_take_a_given_floor():
    q = np.array([0.2, 0.4, 0.6, 0.8])
    table = ExpertResults(list("abcd"), np.full(4, 5), {"transformer": ExpertOutcome(1 - q, q, [""] * 4, np.full(4, 300.0)),
                                                         "mamba": ExpertOutcome(1 - q, q, [""] * 4, np.full(4, 100.0))})
    report = {"gate_points": [], "apgr": None}
    t = routing_targets(table, Floor("a text", np.array([0.1, 0.1, 0.2, 0.2])), np.zeros(4, dtype=bool), 0.0, report)
    assert t["floor_answer"] == "a text" and t["floor_accuracy"] == pytest.approx(0.15)
    with pytest.raises(MedmoeError, match="the floor scores 3 examples"):
        routing_targets(table, Floor("a text", np.zeros(3)), np.zeros(4, dtype=bool), 0.0, report)


def test_gate_learns_to_mix_where_each_expert_is_better_and_beats_random_at_its_mix(tiny_lm, tmp_path):
    """E_M (3x faster) writes better answers to short queries, E_T to long ones: the gate trained on the
    generative utility sends the short ones to E_M, and beats random routing at the mix it deploys."""
    model, tokenizer = tiny_lm
    splits = {s: explained_records(load_dataset("dental", s)) for s in ("train", "dev", "test")}
    lengths = {r.id: len(ids) for s in splits.values() for r, ids in zip(s, encode_queries(tokenizer, s))}
    median = float(np.median(list(lengths.values())))
    rng = np.random.default_rng(0)

    def expert_rows(records, name):
        out = []
        for r in records:
            short = lengths[r.id] <= median
            q = {("mamba", True): 0.8, ("mamba", False): 0.1, ("transformer", True): 0.5,
                 ("transformer", False): 0.6}[(name, short)] + rng.uniform(-0.05, 0.05)
            ms = (100.0 if name == "mamba" else 300.0) * rng.uniform(0.95, 1.05)
            out.append(generation_row(r, q, ms, lengths[r.id]))
        return out

    rows = {s: {e: expert_rows(recs, e) for e in ("transformer", "mamba")} for s, recs in splits.items()}
    cfg = GenerativeConfig(dataset="dental", metric="rouge_l", betas=(0.0, 0.1), beta=0.1, out=str(tmp_path))
    floor = constant_text_floor(splits["train"], splits["dev"], splits["test"], "rouge_l")
    report = route_generations(cfg, splits, rows, Expert("transformer", "tiny-llama", model, tokenizer), floor,
                               {"transformer": "tiny-llama", "mamba": "tiny-hybrid"}, log=lambda _: None)
    deployed = report["generative"]["targets"]["deployed"]
    assert 0.2 <= deployed["share_to_mamba"] <= 0.95
    assert deployed["accuracy"] > deployed["random_same_mix_accuracy"]
    assert deployed["diff_vs_random_same_mix_ci95"][0] > 0
    assert report["generative"]["targets"]["holds"]["deployed_beats_random_same_mix"]
    # what it learned: short queries go to E_M far more often than long ones
    checkpoint = RouterCheckpoint.load(tmp_path / "dental" / "router")
    to_mamba = gate_scores(checkpoint.gate, query_features(checkpoint.featurizer, tokenizer, splits["test"])) > checkpoint.tau
    short = np.array([lengths[r.id] <= median for r in splits["test"]])
    assert to_mamba[short].mean() > to_mamba[~short].mean() + 0.5
