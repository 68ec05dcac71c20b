"""Generative MambaFormer (explanations) end to end on tiny random experts and 3 real Dental records."""

from __future__ import annotations

import json

import pytest
import torch

from medmoe.data import load_dataset
from medmoe.errors import DataError
from medmoe.eval.prompts import build_prompt
from medmoe.eval.textmetrics import BertScorer, rouge_l
from medmoe.mamba.transfer import build_hybrid
from medmoe.mambaformer.answerer import RoutedAnswerer
from medmoe.mambaformer.checkpoint import RouterCheckpoint
from medmoe.mambaformer.experiments.generative import SYSTEMS, explained_records, generative_run
from medmoe.mambaformer.experts import Expert
from medmoe.mambaformer.features import FeatureConfig, featurizer_for_tokenizer, pad_batch
from medmoe.mambaformer.gate import GateConfig, TokenGate
from medmoe.mambaformer.queries import query_text


@pytest.fixture()
def setup(tiny_lm):
    """(router over a tiny Llama E_T and its one-layer Mamba hybrid E_M, 3 explained Dental records)."""
    teacher, tokenizer = tiny_lm
    student, _ = build_hybrid(teacher, layers=[1])
    records = explained_records(load_dataset("dental", "test"))[:3]
    texts = [query_text(r) for r in records]
    featurizer = featurizer_for_tokenizer(tokenizer, teacher.get_input_embeddings().weight.detach(), texts, [],
                                          FeatureConfig(embed_dim=8))
    torch.manual_seed(1)
    checkpoint = RouterCheckpoint(TokenGate(GateConfig()).eval(), featurizer, tau=0.5)
    # tau between the queries' p_M: the highest goes to E_M, the others to E_T (both experts are used)
    p_mamba = sorted(gate_decision(checkpoint, tokenizer, r)[0] for r in records)
    checkpoint.tau = (p_mamba[1] + p_mamba[2]) / 2
    experts = {"transformer": Expert("transformer", "tiny-llama", teacher, tokenizer),
               "mamba": Expert("mamba", "tiny-hybrid", student, tokenizer)}
    return RoutedAnswerer(checkpoint, experts), records


def gate_decision(checkpoint, tokenizer, record):
    """(p_M, expert) of the checkpoint's gate for one query, computed directly from the checkpoint."""
    ids = tokenizer([query_text(record)], add_special_tokens=False)["input_ids"]
    p, to_mamba = checkpoint.route(*pad_batch(ids))
    return float(p[0]), "mamba" if bool(to_mamba[0]) else "transformer"


def tiny_scorer(tiny_lm):
    model, tokenizer = tiny_lm
    return lambda language: BertScorer(model, tokenizer, layer=1, name=f"tiny-{language}")


def test_generative_run_reports_every_system_and_follows_the_gate(setup, tiny_lm, tmp_path):
    router, records = setup
    assert len(records) == 3 and all(r.explanation for r in records)
    report = generative_run(router, records, tmp_path / "run", max_new_tokens=6, bertscorer=tiny_scorer(tiny_lm))
    systems = report["systems"]
    assert tuple(systems) == SYSTEMS and report["examples"] == 3 and report["bertscore_encoders"] == ["tiny-en"]
    for summary in systems.values():
        assert summary["examples"] == 3
        low, high = summary["rouge_l_ci"]
        assert low <= summary["rouge_l"] <= high
        assert summary["latency_p50_ms"] > 0 and summary["new_tokens_per_s"] > 0
        assert 0.0 <= summary["bertscore_f1"] <= 1.0 + 1e-6 and 0.0 <= summary["answer_accuracy"] <= 1.0
    assert systems["transformer"]["share_mamba"] == 0 and systems["mamba"]["share_mamba"] == 1
    assert systems["transformer"]["rouge_l_minus_transformer"] == 0.0

    # the routed system's expert is the checkpoint's gate decision, query by query
    by_id = {q["id"]: q for q in report["per_query"]}
    decisions = [gate_decision(router.checkpoint, router.tokenizer, r) for r in records]
    assert [by_id[r.id]["routed"] for r in records] == [e for _, e in decisions]
    assert [by_id[r.id]["p_mamba"] for r in records] == pytest.approx([p for p, _ in decisions])
    assert systems["mambaformer"]["share_mamba"] == pytest.approx(1 / 3)
    routed_rouge = [by_id[r.id][f"rouge_l_{by_id[r.id]['routed']}"] for r in records]
    assert systems["mambaformer"]["rouge_l"] == pytest.approx(sum(routed_rouge) / 3)

    # the oracle takes the better ROUGE-L per query: never below either expert
    assert systems["oracle-rouge"]["rouge_l"] >= systems["transformer"]["rouge_l"]
    assert systems["oracle-rouge"]["rouge_l"] >= systems["mamba"]["rouge_l"]

    # rows are scored against the reference explanation, and generated from the explanation prompt
    rows = [json.loads(line) for line in (tmp_path / "run" / "mamba.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == [r.id for r in records]
    for row, record in zip(rows, records):
        assert row["reference"] == record.explanation and row["new_tokens"] <= 6
        assert row["rouge_l"] == pytest.approx(rouge_l(row["generation"], record.explanation))


def test_generative_run_resumes_without_regenerating(setup, tiny_lm, tmp_path):
    router, records = setup
    first = generative_run(router, records, tmp_path / "run", max_new_tokens=4, bertscorer=tiny_scorer(tiny_lm))

    def no_scorer(language):
        raise AssertionError("a finished run must not be generated or scored again")

    again = generative_run(router, records, tmp_path / "run", max_new_tokens=4, bertscorer=no_scorer)
    for name in ("transformer", "mamba", "oracle-rouge"):
        assert again["systems"][name]["rouge_l"] == first["systems"][name]["rouge_l"]
    with pytest.raises(DataError, match="max_new_tokens"):
        generative_run(router, records, tmp_path / "run", max_new_tokens=8, bertscorer=no_scorer)


def test_explanation_prompt_asks_to_answer_and_explain(tiny_lm):
    _, tokenizer = tiny_lm
    record = explained_records(load_dataset("dental", "test"))[0]
    prompt = build_prompt(record, tokenizer, (), "none", explain=True)
    assert prompt.context.startswith("Answer with the letter of the correct option. Then explain your answer briefly.")
    assert prompt.context.endswith("\nAnswer:") and record.explanation not in prompt.context
    plain = build_prompt(record, tokenizer, (), "none").context
    assert prompt.context.replace(" Then explain your answer briefly.", "") == plain
    with pytest.raises(ValueError, match="kind 'none'"):
        build_prompt(record, tokenizer, (), "letter", explain=True)
