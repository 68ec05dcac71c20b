"""A gate fitted on cached expert results (`medmoe mambaformer gate train`'s core, `fit.train_router`) is a
whole routed system: its checkpoint names both experts, stores tau once and the gate's measured cost,
and can be asked, served and evaluated; re-calibrating it (`gate calibrate`'s core, `fit.recalibrate`)
gives the tau training gave. Tiny random Llama E_T, its one-layer Mamba hybrid E_M, real Dental ids."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medmoe.data import load_dataset
from medmoe.eval.rules import apply_rule
from medmoe.mamba.transfer import build_hybrid, save_hybrid
from medmoe.mambaformer.answerer import RULE, RoutedAnswerer, load_routed_answerer
from medmoe.mambaformer.calibrate import calibrate_tau
from medmoe.mambaformer.checkpoint import RouterCheckpoint
from medmoe.mambaformer.features import pad_batch
from medmoe.mambaformer.fit import recalibrate, train_router
from medmoe.mambaformer.queries import encode_queries, query_features
from medmoe.mambaformer.results import ExpertResults
from medmoe.mambaformer.train import TrainConfig, gate_scores
from router_helpers import query_results

MAX_TOKENS = 32  # below the length of most Dental queries in the tiny tokenizer: truncation matters


def synthetic_results(records, tokenizer, seed: int) -> ExpertResults:
    return query_results(records, tokenizer, seed, prediction="A")


@pytest.fixture()
def trained(tiny_lm, tiny_lm_dir, tmp_path):
    """(router folder, E_T source, E_M source, splits, tables, fitted) of one `train_router` run."""
    teacher, tokenizer = tiny_lm
    student, spec = build_hybrid(teacher, layers=[1], teacher_name=str(tiny_lm_dir))
    hybrid = str(save_hybrid(student, spec, tmp_path / "tiny-mamba", tokenizer))
    splits = {s: load_dataset("dental", s) for s in ("train", "dev")}
    tables = {"train": synthetic_results(splits["train"][:30], tokenizer, 0),
              "dev": synthetic_results(splits["dev"][:16], tokenizer, 1)}
    out = tmp_path / "router"
    torch.manual_seed(0)
    _, fitted = train_router(tables["train"], tables["dev"], splits["train"], splits["dev"], out, str(tiny_lm_dir), hybrid,
                             train_config=TrainConfig(epochs=3), max_tokens=MAX_TOKENS, info={"dataset": "dental"})
    return out, str(tiny_lm_dir), hybrid, splits, tables, fitted


def test_a_trained_gate_names_its_experts_and_stores_tau_once_with_the_gate_cost(trained):
    out, transformer, mamba, _, _, fitted = trained
    meta = json.loads((out / "router.json").read_text())
    assert meta["format_version"] == 2
    assert meta["experts"] == {"transformer": transformer, "mamba": mamba}
    assert "tau" not in meta["gate_config"] and meta["tau"] == fitted.tau == meta["calibration"]["tau"]
    assert meta["gate_ms"] > 0 and meta["calibration"]["gate_ms"] == meta["gate_ms"]
    assert meta["calibration"]["rule"] == "tolerance"  # no budget: fastest within 1 point of E_T on dev
    assert meta["feature_config"]["max_tokens"] == MAX_TOKENS
    assert (out / "history.json").is_file() and (out / "lexicon.json").is_file()
    checkpoint = RouterCheckpoint.load(out)
    assert checkpoint.gate_ms == meta["gate_ms"] and checkpoint.experts == meta["experts"]
    with pytest.raises(AttributeError, match="tau"):
        checkpoint.gate.config.tau  # noqa: B018  # the gate has no second copy


def test_a_trained_gate_can_be_asked_served_and_evaluated(trained):
    out, transformer, mamba, splits, _, _ = trained
    answerer = RoutedAnswerer.load(out)  # `medmoe ask` and `medmoe eval --router` load it so
    assert {n: e.source for n, e in answerer.experts.items()} == {"transformer": transformer, "mamba": mamba}
    records = splits["dev"][:4]
    answers = answerer.answer_batch(records)
    assert all(a.answer in r.letters and a.expert in ("transformer", "mamba") for a, r in zip(answers, records))
    outcomes = apply_rule(answerer, records, RULE, [[] for _ in records])  # the harness's hook
    assert [o.route["expert"] for o in outcomes] == [a.expert for a in answers]
    served = load_routed_answerer(SimpleNamespace(answerer_options={"router": str(out)}, max_new_tokens=8))
    assert served.batch_key(records[0]) == f"{answers[0].expert}:options"


def test_every_path_reads_the_same_truncated_query(trained):
    """Training, calibration, `route` and `answer_batch` all see the first max_tokens of the query."""
    out, _, _, splits, _, _ = trained
    answerer = RoutedAnswerer.load(out)
    tokenizer, checkpoint = answerer.tokenizer, answerer.checkpoint
    records = [r for r in splits["dev"] if len(encode_queries(tokenizer, [r])[0]) > MAX_TOKENS][:3]
    assert records, "needs queries longer than MAX_TOKENS"
    features = query_features(checkpoint.featurizer, tokenizer, records)
    assert int(features.n_tokens.max()) == MAX_TOKENS
    expected = gate_scores(checkpoint.gate, features)
    direct, _ = checkpoint.route(*pad_batch(encode_queries(tokenizer, records, MAX_TOKENS)))
    np.testing.assert_allclose(direct.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose([p for _, p in answerer.route(records)], expected, atol=1e-6)
    np.testing.assert_allclose([a.gate_probability for a in answerer.answer_batch(records)], expected, atol=1e-6)


def test_recalibrating_gives_the_tau_training_gave_and_counts_the_gate_cost(trained):
    out, _, _, splits, tables, fitted = trained
    before = RouterCheckpoint.load(out)
    again = recalibrate(out, tables["dev"], splits["dev"])  # same rule (no budget), same cached results
    assert again.tau == pytest.approx(fitted.tau) and again.gate_ms == before.gate_ms
    # with a budget: the one rule, with the checkpoint's gate cost added to every routed latency
    budget = float(np.median(tables["dev"].transformer.latency_ms))
    cal = recalibrate(out, tables["dev"], splits["dev"], budget_ms=budget)
    assert cal == calibrate_tau(fitted.dev_scores, tables["dev"], budget, gate_ms=before.gate_ms)
    assert cal.metrics.p50_ms <= budget and cal.rule == "budget"
    saved = RouterCheckpoint.load(out)
    assert saved.tau == cal.tau and saved.info["calibration"] == json.loads(json.dumps(cal.to_dict()))


def test_a_format_1_gate_train_checkpoint_loads_with_its_missing_expert_given(trained):
    """Before issue 18, `router train` wrote format 1: E_T as info.model, no E_M, no gate cost, tau twice."""
    out, transformer, mamba, splits, tables, _ = trained
    meta = json.loads((out / "router.json").read_text())
    for key in ("experts", "gate_ms"):
        del meta[key]
    meta.update(format_version=1, model=transformer)
    meta["gate_config"]["tau"] = 0.5  # the stale second copy: ignored
    (out / "router.json").write_text(json.dumps(meta))
    legacy = RouterCheckpoint.load(out)
    assert legacy.experts == {"transformer": transformer, "mamba": None} and legacy.gate_ms is None
    assert legacy.tau == meta["tau"]
    answerer = RoutedAnswerer.load(out, experts={"mamba": mamba})
    assert answerer.experts["mamba"].source == mamba
    served = load_routed_answerer(SimpleNamespace(answerer_options={"router": str(out), "mamba": mamba}))
    assert served.experts["transformer"].source == transformer
    cal = recalibrate(out, tables["dev"], splits["dev"])  # measures the gate cost it lacked, and saves it
    resaved = RouterCheckpoint.load(out)
    assert resaved.gate_ms is not None and resaved.gate_ms > 0 and cal.gate_ms == resaved.gate_ms
