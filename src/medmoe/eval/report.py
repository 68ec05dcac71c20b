"""Summaries of per-example rows: a summary dict per benchmark, a markdown table and a plot.

Option questions: accuracy (exact match of the letter set) with a 95% bootstrap interval; grouped
benchmarks (CMMLU subjects) add per-group accuracy, micro (= overall accuracy) and macro (mean of
group accuracies, stratified bootstrap); PubMedQA adds macro-F1; generated answers add how often the
extractor found no answer. Open questions: mean ROUGE-L and BERTScore-F1 with bootstrap intervals.
Latency p50/p95 and mean prompt tokens for all. A routed system's rows (`route` with an expert) add the
share sent to the Mamba expert, the gate's latency p50/p95 (included in latency_ms) and per-expert accuracy.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medmoe.errors import MissingExtra, require
from medmoe.eval.metrics import (
    best_constant,
    bootstrap_interval,
    bootstrap_macro,
    bootstrap_mean,
    macro_f1,
    paired_difference,
    percentile,
)

log = logging.getLogger(__name__)


def summarize_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The summary of one benchmark's rows (see the module docstring)."""
    if not rows:
        return {"examples": 0}
    latency = [r["latency_ms"] for r in rows]
    out: dict[str, Any] = {
        "examples": len(rows),
        "latency_p50_ms": percentile(latency, 50),
        "latency_p95_ms": percentile(latency, 95),
        "prompt_tokens_mean": sum(r["prompt_tokens"] for r in rows) / len(rows),
    }
    if all((r.get("route") or {}).get("expert") for r in rows):
        out.update(routing_summary(rows))
    if "rouge_l" in rows[0]:
        for key in ("rouge_l", "bertscore_f1"):
            values = [r[key] for r in rows]
            out[key] = sum(values) / len(values)
            out[f"{key}_ci"] = bootstrap_mean(values)
        out["bertscore_encoder"] = rows[0]["bertscore_encoder"]
        return out
    correct = [float(r["correct"]) for r in rows]
    out["accuracy"] = sum(correct) / len(correct)
    out["accuracy_ci"] = bootstrap_mean(correct)
    out.update(constant_comparison(rows, correct))
    if rows[0].get("extraction") is not None:
        out["no_answer_rate"] = sum(r["prediction"] == "" for r in rows) / len(rows)
    groups: list[Any] = [r.get("group") for r in rows]
    if all(g is not None for g in groups):
        by_group: dict[str, list[float]] = defaultdict(list)
        for g, c in zip(groups, correct):
            by_group[g].append(c)
        out["per_group"] = {g: {"examples": len(v), "accuracy": sum(v) / len(v)} for g, v in sorted(by_group.items())}
        out["macro_accuracy"] = sum(v["accuracy"] for v in out["per_group"].values()) / len(by_group)
        out["macro_accuracy_ci"] = bootstrap_macro(correct, groups)
    if rows[0]["benchmark"] == "pubmedqa":
        gold, pred = [r["gold"] for r in rows], [r["prediction"] for r in rows]
        out["macro_f1"] = macro_f1(gold, pred, labels="ABC")
        out["macro_f1_ci"] = bootstrap_interval(lambda g, p: macro_f1(g, p, labels="ABC"), gold, pred)
    return out


def constant_comparison(rows: Sequence[dict[str, Any]], correct: Sequence[float]) -> dict[str, Any]:
    """The best constant answer of these rows' gold answers, and the paired-bootstrap interval of the
    system's accuracy minus that constant's; rows of a head (`route.lm_prediction`) add the expert's
    own zero-shot accuracy from the same forward pass."""
    gold = [r["gold"] for r in rows]
    answer, accuracy = best_constant(gold)
    diff, ci = paired_difference(correct, [float(g == answer) for g in gold])
    out: dict[str, Any] = {"best_constant": {"answer": answer, "accuracy": accuracy},
                           "diff_vs_constant": diff, "diff_vs_constant_ci": ci}
    lm = [(r.get("route") or {}).get("lm_prediction") for r in rows]
    if all(p is not None for p in lm):
        out["lm_accuracy"] = sum(p == g for p, g in zip(lm, gold)) / len(rows)
    return out


def routing_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """For a routed system's rows (each with `route`: expert, gate_ms): the share sent to E_M, the gate's
    own latency p50/p95 (already inside each row's latency_ms) and accuracy per expert."""
    experts = [r["route"]["expert"] for r in rows]
    gate = [r["route"].get("gate_ms", 0.0) for r in rows]
    per_expert: dict[str, dict[str, Any]] = {}
    for name in sorted(set(experts)):
        mine = [r for r, e in zip(rows, experts) if e == name]
        per_expert[name] = {"examples": len(mine)}
        if "correct" in mine[0]:
            per_expert[name]["accuracy"] = sum(float(r["correct"]) for r in mine) / len(mine)
    return {"share_mamba": experts.count("mamba") / len(rows), "gate_latency_p50_ms": percentile(gate, 50),
            "gate_latency_p95_ms": percentile(gate, 95), "per_expert": per_expert}


def headline(summary: dict[str, Any]) -> tuple[str, float, tuple[float, float]]:
    """(metric name, value, interval) that stands for a benchmark in tables and plots."""
    if "accuracy" in summary:
        return "accuracy", summary["accuracy"], tuple(summary["accuracy_ci"])
    return "rouge_l", summary.get("rouge_l", 0.0), tuple(summary.get("rouge_l_ci", (0.0, 0.0)))


def _fmt(value: float, ci: Sequence[float]) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def secondary_metrics(s: dict[str, Any]) -> list[str]:
    """The summary's metrics beside the headline one, as short strings for a table's "also" cell."""
    extras = []
    if "macro_accuracy" in s:
        extras.append(f"macro acc {_fmt(s['macro_accuracy'], s['macro_accuracy_ci'])}")
    if "macro_f1" in s:
        extras.append(f"macro-F1 {_fmt(s['macro_f1'], s['macro_f1_ci'])}")
    if "bertscore_f1" in s:
        extras.append(f"BERTScore-F1 {_fmt(s['bertscore_f1'], s['bertscore_f1_ci'])} ({s['bertscore_encoder']})")
    if "best_constant" in s:
        c = s["best_constant"]
        extras.append(f"constant '{c['answer']}' {c['accuracy']:.3f}, difference {_fmt(s['diff_vs_constant'], s['diff_vs_constant_ci'])}")
    if "lm_accuracy" in s:
        extras.append(f"expert zero-shot {s['lm_accuracy']:.3f}")
    if "no_answer_rate" in s:
        extras.append(f"no answer {s['no_answer_rate']:.1%}")
    if "share_mamba" in s:
        extras.append(f"to Mamba {s['share_mamba']:.0%} (gate p50 {s['gate_latency_p50_ms']:.1f} ms)")
    if "most_frequent_prediction" in s:
        extras.append(f"predicts {s['most_frequent_prediction']['letter']} {s['most_frequent_prediction']['share']:.0%}")
    return extras


def markdown_table(summaries: dict[str, dict[str, Any]]) -> str:
    """One row per benchmark: n, headline metric with 95% interval, extras, latency."""
    lines = ["| benchmark | n | metric | value [95% CI] | also | latency p50 (ms) |", "|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        if not s.get("examples"):
            continue
        metric, value, ci = headline(s)
        extras = secondary_metrics(s)
        lines.append(f"| {name} | {s['examples']} | {metric} | {_fmt(value, ci)} | {'; '.join(extras)} | {s['latency_p50_ms']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(summaries: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Bar chart of each benchmark's headline metric with its 95% interval as error bars.
    Without matplotlib (the `plots` extra) the chart is skipped with a warning; the rest of the report stands."""
    try:
        matplotlib = require("matplotlib", "plots", f"the chart {path.name}")
    except MissingExtra as exc:
        log.warning("medmoe: %s; skipped", exc)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, s in summaries.items() if s.get("examples")]
    heads = [headline(summaries[n]) for n in names]
    values = [h[1] for h in heads]
    errors = [[h[1] - h[2][0] for h in heads], [h[2][1] - h[1] for h in heads]]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.5))
    ax.bar(range(len(names)), values, yerr=errors, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(names)), [f"{n}\n({h[0]})" for n, h in zip(names, heads)], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
