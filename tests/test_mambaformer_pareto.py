"""Pareto front on a hand-made set, the normalised area (APGR) by hand, sweep and report files."""

import json

import numpy as np
import pytest

from medmoe.mambaformer.experiments.baselines import AlwaysMamba, AlwaysTransformer, OracleRouter, RandomRouter
from medmoe.mambaformer.experiments.pareto import (
    OperatingPoint,
    baseline_points,
    envelope_area,
    pareto_mask,
    pareto_report,
    sweep_points,
    write_report,
)
from router_helpers import length_table


def test_pareto_mask_hand_made():
    #            A     B     C     D     E     F (duplicate of B)
    accuracy = [0.60, 0.70, 0.65, 0.80, 0.55, 0.70]
    latency = [10.0, 20.0, 25.0, 40.0, 30.0, 20.0]
    # C is dominated by B (less accurate, slower); E by A, B; duplicates B/F both stay optimal.
    assert pareto_mask(accuracy, latency).tolist() == [True, True, False, True, False, True]


def test_apgr_by_hand():
    weak = OperatingPoint("fast", 0.60, 10.0)
    strong = OperatingPoint("slow", 0.80, 50.0)
    points = [OperatingPoint("g1", 0.70, 20.0), OperatingPoint("g2", 0.80, 30.0), OperatingPoint("g3", 0.50, 12.0)]
    # A(x): 0.60 on [10, 20), 0.70 on [20, 30), 0.80 on [30, 50] -> mean = (6 + 7 + 16) / 40 = 0.725
    area = envelope_area(points, weak, strong)
    assert area["mean_accuracy"] == pytest.approx(0.725)
    assert area["apgr"] == pytest.approx((0.725 - 0.60) / 0.20)
    assert envelope_area([], weak, strong)["apgr"] == pytest.approx(0.0)
    assert envelope_area([OperatingPoint("x", 0.8, 10.0)], weak, strong)["apgr"] == pytest.approx(1.0)
    assert envelope_area(points, weak, OperatingPoint("slow-bad", 0.5, 50.0))["apgr"] is None


def test_sweep_report_and_files(tmp_path):
    table = length_table(300, seed=4)
    rng = np.random.default_rng(0)
    scores = {b: 1 / (1 + np.exp(-((table.n_tokens - 500) / 150 * b + rng.normal(0, 0.5, len(table)))))
              for b in (0.5, 2.0)}
    gate = sweep_points(table, scores)
    assert {p.beta for p in gate} == {0.5, 2.0}
    routers = [AlwaysTransformer(), AlwaysMamba(), RandomRouter(0.5), OracleRouter(objective="accuracy")]
    baselines = baseline_points(table, routers)
    report = pareto_report(gate, baselines, baselines[0], baselines[1])
    front = [p for p in report["gate_points"] if p["pareto"]]
    assert front and all(not any(q["accuracy"] >= p["accuracy"] and q["latency_ms"] <= p["latency_ms"]
                                 and (q["accuracy"] > p["accuracy"] or q["latency_ms"] < p["latency_ms"])
                                 for q in report["gate_points"]) for p in front)
    paths = write_report(report, tmp_path, "pareto", header="# test")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths["json"].read_text())["faster_expert"] == report["faster_expert"]
    text = paths["md"].read_text()
    assert "oracle-accuracy" in text and "APGR" in text
