"""Accuracy-vs-latency sweeps, Pareto fronts, the normalised area between the two experts, reports.

Operating points are (latency, accuracy) with latency the p50 per-query latency in ms (or another
statistic). A point is Pareto-optimal when no other point is at least as accurate and at least as
fast, and strictly better in one of the two.

Normalised area (APGR, after RouteLLM's "average performance gap recovered"): let the faster single
expert be (L_w, A_w) and the slower one (L_s, A_s). The router's envelope A(x) is the best accuracy
among its points with latency <= x (a step function; the faster expert itself is always available,
so A(x) >= A_w). Then
    APGR = 1 / (L_s - L_w) * integral_{L_w}^{L_s} (A(x) - A_w) / (A_s - A_w) dx,
1 when the router matches the slower expert's accuracy at the faster expert's latency, 0 when it never
beats the faster expert. It is undefined (None) when the slower expert is not more accurate (nothing
to recover). `mean_accuracy` is the same integral of A(x) without normalisation.

`pareto_run` is the whole report on one test table (what `medmoe mambaformer gate pareto` and the pipeline write).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from medmoe.errors import MedmoeError, MissingExtra, require
from medmoe.mambaformer.calibrate import candidate_thresholds
from medmoe.mambaformer.experiments.baselines import LengthThreshold, Router, baseline_routers
from medmoe.mambaformer.metrics import evaluate
from medmoe.mambaformer.results import ExpertResults
from medmoe.paths import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class OperatingPoint:
    """One routing's accuracy and latency. kind: "gate" (a sweep point) or "baseline"."""

    name: str
    accuracy: float
    latency_ms: float
    mean_ms: float = float("nan")
    share_mamba: float = float("nan")
    kind: str = "gate"
    tau: float | None = None
    beta: float | None = None
    pareto: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def pareto_mask(accuracy: Sequence[float], latency: Sequence[float]) -> np.ndarray:
    """(N,) bool: True where no other point dominates (acc >= and lat <=, one strictly)."""
    a, l = np.asarray(accuracy, dtype=np.float64), np.asarray(latency, dtype=np.float64)
    ge_a, le_l = a[None, :] >= a[:, None], l[None, :] <= l[:, None]             # [i, j]: j vs i
    strictly = (a[None, :] > a[:, None]) | (l[None, :] < l[:, None])
    return ~(ge_a & le_l & strictly).any(axis=1)  # type: ignore[return-value]  # numpy's stubs allow a scalar here


def mark_pareto(points: list[OperatingPoint]) -> list[OperatingPoint]:
    mask: np.ndarray | list[bool] = pareto_mask([p.accuracy for p in points], [p.latency_ms for p in points]) if points else []
    for point, optimal in zip(points, mask):
        point.pareto = bool(optimal)
    return points


def envelope_area(points: Sequence[OperatingPoint], weak: OperatingPoint, strong: OperatingPoint) -> dict:
    """{"apgr": float | None, "mean_accuracy": float} of the router's step envelope on [L_w, L_s]."""
    lo, hi = weak.latency_ms, strong.latency_ms
    if hi <= lo:
        raise MedmoeError("normalised area: 'strong' must be the slower expert (larger latency)")
    lat = np.array([p.latency_ms for p in points] + [lo])
    acc = np.array([p.accuracy for p in points] + [weak.accuracy])
    breaks = np.unique(np.clip(np.concatenate([lat, [lo, hi]]), lo, hi))       # step changes in [lo, hi]
    area = 0.0
    for left, right in zip(breaks[:-1], breaks[1:]):
        area += (right - left) * acc[lat <= left + 1e-12].max()                 # A(x) on [left, right)
    mean_accuracy = area / (hi - lo)
    gap = strong.accuracy - weak.accuracy
    apgr = (mean_accuracy - weak.accuracy) / gap if gap > 0 else None
    return {"apgr": apgr, "mean_accuracy": mean_accuracy}


def sweep_points(table: ExpertResults, scores_by_beta: Mapping[float, np.ndarray], costs: np.ndarray | None = None,
                 gate_ms: float = 0.0, statistic: str = "p50") -> list[OperatingPoint]:
    """Gate operating points for every beta (one gate trained per beta) and every distinct tau."""
    points = []
    for beta, scores in scores_by_beta.items():
        scores = np.asarray(scores, dtype=np.float64)
        for tau in candidate_thresholds(scores):
            m = evaluate(table, scores > tau, costs, gate_ms)
            points.append(OperatingPoint(f"gate(beta={beta:g}, tau={tau:.4f})", m.accuracy,
                                         _stat(m, statistic), m.mean_ms, m.share_mamba, "gate", float(tau), float(beta)))
    return points


def baseline_points(table: ExpertResults, routers: Sequence[Router], costs: np.ndarray | None = None,
                    statistic: str = "p50") -> list[OperatingPoint]:
    points = []
    for router in routers:
        m = evaluate(table, router.route(table), costs)
        points.append(OperatingPoint(router.name, m.accuracy, _stat(m, statistic), m.mean_ms, m.share_mamba, "baseline"))
    return points


def _stat(metrics, statistic: str) -> float:
    return {"p50": metrics.p50_ms, "mean": metrics.mean_ms, "p95": metrics.p95_ms}[statistic]


def pareto_report(gate_points: list[OperatingPoint], baselines: list[OperatingPoint], transformer: OperatingPoint,
                  mamba: OperatingPoint) -> dict:
    """Mark the gate's Pareto front and compute the normalised area between the two single experts."""
    mark_pareto(gate_points)
    weak, strong = sorted([transformer, mamba], key=lambda p: p.latency_ms)
    area = (envelope_area(gate_points, weak, strong) if strong.latency_ms > weak.latency_ms
            else {"apgr": None, "mean_accuracy": None})
    return {"faster_expert": weak.name, "slower_expert": strong.name, **area,
            "gate_points": [p.to_dict() for p in gate_points], "baselines": [p.to_dict() for p in baselines]}


def markdown_table(report: dict, statistic: str = "p50", quality: str = "accuracy") -> str:
    """The baselines and the gate's Pareto front; `quality`: what the "accuracy" column measures (its header)."""
    lines = [f"| router | {quality} | {statistic} latency (ms) | mean latency (ms) | share to E_M | Pareto |",
             "| --- | ---: | ---: | ---: | ---: | :---: |"]
    rows = report["baselines"] + [p for p in report["gate_points"] if p["pareto"]]
    for p in rows:
        lines.append(f"| {p['name']} | {p['accuracy']:.4f} | {p['latency_ms']:.2f} | {p['mean_ms']:.2f} | "
                     f"{p['share_mamba']:.3f} | {'*' if p.get('pareto') else ''} |")
    apgr = report["apgr"]
    lines.append("")
    lines.append(f"Normalised area (APGR) between {report['faster_expert']} and {report['slower_expert']}: "
                 + ("undefined (the slower expert is not more accurate)" if apgr is None else f"{apgr:.4f}"))
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str | Path, statistic: str = "p50", title: str = "Accuracy vs latency",
         quality: str = "accuracy") -> bool:
    """PNG: all gate sweep points, the Pareto front joined, every baseline labelled, on one pair of axes
    (y: `quality`, what the points' "accuracy" measures). False (and a warning) without matplotlib, the
    `plots` extra: the table and JSON are the report."""
    import io

    try:
        matplotlib = require("matplotlib", "plots", f"the chart {Path(path).name}")
    except MissingExtra as exc:
        log.warning("medmoe: %s; skipped", exc)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    gate = report["gate_points"]
    if gate:
        ax.scatter([p["latency_ms"] for p in gate], [p["accuracy"] for p in gate], s=10, c="0.7", label="gate sweep")
        front = sorted((p for p in gate if p["pareto"]), key=lambda p: p["latency_ms"])
        ax.plot([p["latency_ms"] for p in front], [p["accuracy"] for p in front], "o-", c="C0", ms=5,
                drawstyle="steps-post", label="gate Pareto front")
    markers = "s^vDPX*hp<>"
    for i, p in enumerate(report["baselines"]):
        ax.scatter([p["latency_ms"]], [p["accuracy"]], marker=markers[i % len(markers)], s=60, c=f"C{i + 1}",
                   label=p["name"], zorder=3)
    ax.set_xlabel(f"{statistic} latency per query (ms)")
    ax.set_ylabel(quality)
    apgr = report.get("apgr")
    ax.set_title(title + ("" if apgr is None else f"  (APGR {apgr:.3f})"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return True


def write_report(report: dict, out_dir: str | Path, name: str = "pareto", statistic: str = "p50",
                 header: str = "", quality: str = "accuracy") -> dict[str, Path]:
    """Write <name>.md, <name>.json and <name>.png (with matplotlib) into out_dir; return their paths.
    `quality`: what the points' "accuracy" measures (a generation metric in the generative setting)."""
    out = Path(out_dir)
    paths = {"md": out / f"{name}.md", "json": out / f"{name}.json", "png": out / f"{name}.png"}
    atomic_write_text(paths["md"], (header + "\n" if header else "") + markdown_table(report, statistic, quality))
    atomic_write_text(paths["json"], json.dumps(report, indent=1) + "\n")
    if not plot(report, paths["png"], statistic, f"{quality[:1].upper()}{quality[1:]} vs latency", quality):
        del paths["png"]
    return paths


def pareto_run(test: ExpertResults, scores_by_beta: Mapping[float, np.ndarray], tau: float, dev: ExpertResults | None = None,
               extra_points: Sequence[OperatingPoint] = (), seed: int = 0, gate_ms: float = 0.0,
               statistic: str = "p50", oracle_beta: float = 1.0, routers: Sequence[Router] | None = None) -> dict:
    """Sweep the gate(s) over tau on `test`; baselines: E_T only, E_M only, random at the mix of the first
    gate at its tau, the length threshold fitted on `dev` (on `test` when no dev is given, marked so), the
    utility oracle (argmax_e U_e with `oracle_beta`, C_ref = E_T's mean test latency), the accuracy oracle,
    and any extra points (e.g. the largest Transformer alone). `routers`: those baselines, already built
    by `baseline_routers` (a caller that also tabulates them passes its own). `gate_ms`: the gate's cost
    per query (RouterCheckpoint.gate_ms), added to every gate point."""
    first = np.asarray(next(iter(scores_by_beta.values())))
    if routers is None:
        routers = baseline_routers(test, float((first > tau).mean()), dev, seed, oracle_beta)
    length = routers[3]
    baselines = baseline_points(test, routers, statistic=statistic) + list(extra_points)
    gate_points = sweep_points(test, scores_by_beta, gate_ms=gate_ms, statistic=statistic)
    report = pareto_report(gate_points, baselines, baselines[0], baselines[1])
    at_tau = evaluate(test, first > tau, gate_ms=gate_ms)
    report["gate_at_tau"] = {"tau": tau, **at_tau.to_dict()}
    if isinstance(length, LengthThreshold):
        report["length_threshold"] = {"threshold": float(length.threshold), "long_to_mamba": bool(length.long_to_mamba)}
    return report
