"""The targets object of a MambaFormer report (`experiments.targets`), the `medmoe run` table's floor row,
and the report benchmark's "## Targets" section, on synthetic expert results (no experts needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from medmoe.mambaformer.experiments.baselines import OracleRouter, RandomRouter
from medmoe.mambaformer.experiments.targets import TARGET_TEXT, random_same_mix, routing_targets
from medmoe.mambaformer.results import ExpertOutcome, ExpertResults

N = 200
GOLD = ["yes"] * 110 + ["no"] * 90  # best constant: 'yes', 0.55


def make_table(seed: int = 0) -> ExpertResults:
    """E_T right 80% of the time at ~300 ms, E_M right 70% at ~90 ms, independently."""
    rng = np.random.default_rng(seed)
    experts = {}
    for name, p, ms in (("transformer", 0.8, 300.0), ("mamba", 0.7, 90.0)):
        correct = rng.random(N) < p
        experts[name] = ExpertOutcome(np.where(correct, 0.2, 2.0), correct, ["yes"] * N, rng.uniform(0.95, 1.05, N) * ms)
    return ExpertResults([f"q{i}" for i in range(N)], rng.integers(10, 500, N), experts)


def make_report(table: ExpertResults, apgr: float | None = 0.6) -> dict:
    """A hand-made Pareto report: g1 is 3x faster than E_T within 1 point of it, g2 matches the big model."""
    et = float(table.transformer.correct.mean())
    points = [{"name": "g0", "accuracy": et, "latency_ms": 50.0, "pareto": False},  # not on the front: ignored
              {"name": "g1", "accuracy": et - 0.005, "latency_ms": 95.0, "pareto": True},
              {"name": "g2", "accuracy": et + 0.01, "latency_ms": 200.0, "pareto": True}]
    return {"gate_points": points, "apgr": apgr, "big": {"name": "big alone", "accuracy": et + 0.005, "latency_ms": 600.0}}


@pytest.fixture()
def table() -> ExpertResults:
    return make_table()


def oracle(table: ExpertResults) -> np.ndarray:
    return OracleRouter(objective="accuracy").route(table)


def test_targets_have_the_issue_layout_and_the_floor(table):
    t = routing_targets(table, GOLD, oracle(table), 1.0, make_report(table))
    assert {"floor_accuracy", "et", "em", "deployed", "apgr"} <= set(t)
    assert set(t["et"]) == set(t["em"]) == {"accuracy", "p50_ms", "diff_vs_floor_ci95"}
    assert {"accuracy", "p50_ms", "share_to_mamba", "speedup_vs_et", "diff_vs_random_same_mix_ci95",
            "random_same_mix_accuracy", "diff_vs_et_ci95"} == set(t["deployed"])
    assert set(t["holds"]) == set(TARGET_TEXT)
    assert (t["floor_answer"], t["floor_accuracy"]) == ("yes", 0.55)
    assert t["et"]["accuracy"] == pytest.approx(table.transformer.correct.mean())
    assert t["et"]["diff_vs_floor_ci95"][0] > 0  # E_T at ~0.8 is above a 0.55 floor
    d = t["deployed"]
    assert d["speedup_vs_et"] == pytest.approx(t["et"]["p50_ms"] / d["p50_ms"])
    assert d["p50_ms"] == pytest.approx(float(np.percentile(np.where(oracle(table), table.mamba.latency_ms,
                                                                     table.transformer.latency_ms) + 1.0, 50)))


def test_the_fastest_point_within_1pt_and_the_best_speedup_vs_big_come_from_the_front(table):
    t = routing_targets(table, GOLD, oracle(table), 0.0, make_report(table))
    fastest, vs_big = t["fastest_within_1pt"], t["best_speedup_vs_big"]
    assert fastest["name"] == "g1" and fastest["speedup_vs_et"] == pytest.approx(t["et"]["p50_ms"] / 95.0)
    assert vs_big == {"name": "g2", "accuracy": pytest.approx(t["et"]["accuracy"] + 0.01), "p50_ms": 200.0,
                      "speedup_vs_big": 3.0}
    report = make_report(table)
    report["gate_points"] = report["gate_points"][:1]
    report["big"] = None
    none = routing_targets(table, GOLD, oracle(table), 0.0, report)
    assert none["fastest_within_1pt"] is None and none["best_speedup_vs_big"] is None
    assert not none["holds"]["speedup_3x_within_1pt_of_et_above_floor"]


def test_random_same_mix_is_the_expected_correctness_of_random_routing(table):
    share = 0.3
    expected = random_same_mix(table, share)
    assert expected.shape == (N,)
    assert expected.mean() == pytest.approx(share * table.mamba.correct.mean() + (1 - share) * table.transformer.correct.mean())


def test_the_oracle_beats_random_at_its_mix_and_a_random_draw_does_not(table):
    best = routing_targets(table, GOLD, oracle(table), 0.0, make_report(table))
    d = best["deployed"]
    assert d["diff_vs_random_same_mix_ci95"][0] > 0 and best["holds"]["deployed_beats_random_same_mix"]
    assert d["random_same_mix_accuracy"] == pytest.approx(random_same_mix(table, d["share_to_mamba"]).mean())
    drawn = routing_targets(table, GOLD, RandomRouter(0.5, seed=3).route(table), 0.0, make_report(table))
    low, high = drawn["deployed"]["diff_vs_random_same_mix_ci95"]
    assert low < 0 < high and not drawn["holds"]["deployed_beats_random_same_mix"]
    alone = routing_targets(table, GOLD, np.zeros(N, dtype=bool), 0.0, make_report(table))  # s = 0: r_i = c_T,i
    assert alone["deployed"]["diff_vs_random_same_mix_ci95"] == [0.0, 0.0]


def test_holds_flags_follow_the_thresholds(table):
    t = routing_targets(table, GOLD, oracle(table), 0.0, make_report(table, apgr=0.6))
    assert 0.2 <= t["deployed"]["share_to_mamba"] <= 0.95
    assert t["holds"] == {"speedup_3x_within_1pt_of_et_above_floor": True, "deployed_mixes": True,
                          "deployed_beats_random_same_mix": True, "apgr_at_least_0.5": True}
    low_floor = routing_targets(table, ["yes"] * N, np.ones(N, dtype=bool), 0.0, make_report(table, apgr=None))
    assert low_floor["floor_accuracy"] == 1.0
    assert low_floor["holds"] == {"speedup_3x_within_1pt_of_et_above_floor": False, "deployed_mixes": False,
                                  "deployed_beats_random_same_mix": False, "apgr_at_least_0.5": False}


def test_gold_must_match_the_table(table):
    from medmoe.errors import MedmoeError

    with pytest.raises(MedmoeError, match="gold answers"):
        routing_targets(table, GOLD[:-1], oracle(table), 0.0, make_report(table))


def summary_report(table: ExpertResults) -> dict:
    targets = routing_targets(table, GOLD, oracle(table), 0.0, make_report(table))
    row = {"macro_f1": 0.5, "p50_ms": 100.0, "p95_ms": 150.0, "share_mamba": 0.5, "speedup_vs_big": None}
    return {"summary": [{**row, "router": "good", "accuracy": 0.8}, {**row, "router": "weak", "accuracy": 0.445}],
            "examples": {"test": N}, "tau": 0.5, "gate_ms": 1.0, "big": None, "targets": targets,
            "floor": {"answer": targets["floor_answer"], "accuracy": targets["floor_accuracy"]}}


def test_print_summary_prints_the_floor_row_marks_rows_below_it_and_the_targets(table, monkeypatch):
    from medmoe.cli import mambaformer

    recorder = Console(record=True, width=240)
    monkeypatch.setattr(mambaformer, "console", recorder)
    report = summary_report(table)
    report["targets"]["holds"]["apgr_at_least_0.5"] = False
    mambaformer.print_summary("pubmedqa", report)
    text = recorder.export_text()
    assert "best constant ('yes')" in text and "0.550" in text
    assert "0.445 (≤ floor)" in text and "0.800 (≤ floor)" not in text
    assert "rows marked ≤ floor answer no better than always answering 'yes'" in text
    assert f"{TARGET_TEXT['deployed_mixes']}: met" in text and f"{TARGET_TEXT['apgr_at_least_0.5']}: NOT met" in text


def test_the_report_benchmark_states_each_target_as_met_or_not(table, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import mambaformer_report

    report = summary_report(table)
    report["targets"]["holds"]["deployed_mixes"] = False
    text = mambaformer_report.targets({**report, "big": make_report(table)["big"],
                                       "gate_points": make_report(table)["gate_points"]})
    lines = [line for line in text.splitlines() if line.startswith("- (")]
    assert [line[:5] for line in lines] == ["- (a)", "- (b)", "- (c)", "- (d)"]
    assert "**met**" in lines[0] and "mixes, share to E_M" in lines[1] and "**NOT met**" in lines[1]
    assert "APGR >= 0.5: **met** (0.600)" in lines[2] and "**met**: 3.00x (g2" in lines[3]
