"""Seed spread of the SparseDoctor comparison: the same bounded runs repeated with other seeds.

Reads the JSON reports that `loramoe_results.py` wrote (one per seed, same settings otherwise) and
tabulates, per test set, each variant's accuracy (and macro-F1) per seed, its mean and standard
deviation, and the full method minus PEFT LoRA per seed. It answers whether a difference between
variants in one run is larger than what changing the seed alone does (adapter initialisation, data
order, training mix), and whether the tuned models beat the best constant answer (always the most
frequent gold letter of the evaluated subsample: a model that learned the answer format and a label
prior, and nothing of the questions, scores this).

    PYTHONPATH=src python benchmarks/loramoe_results.py --variants lora,loramoe_full --seed 1 \
        --name loramoe_results_en_seed1      # and --seed 2; the other options as in loramoe_results_en
    PYTHONPATH=src python benchmarks/loramoe_seeds.py \
        --reports loramoe_results_en loramoe_results_en_seed1 loramoe_results_en_seed2 --name loramoe_seeds_en
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _loramoe_common import constant_answer
from common import REPORTS, write_report

SAME = ("base", "train_data", "eval", "steps", "batch_size", "grad_accum", "lr", "max_length", "train_limit")


def headline(summary: dict) -> float:
    return summary["accuracy"] if "accuracy" in summary else summary["rouge_l"]


def load_runs(names: list[str]) -> dict[int, dict]:
    """seed -> report; every report must share the settings in SAME (the seed is the only change)."""
    runs = {}
    for name in names:
        path = REPORTS / f"{name}.json"
        if not path.is_file():
            raise SystemExit(f"{path}: no such report (run benchmarks/loramoe_results.py --name {name} first)")
        report = json.loads(path.read_text())
        seed = report["args"].get("seed", 0)  # reports from before --seed existed used seed 0
        if seed in runs:
            raise SystemExit(f"{path}: seed {seed} appears twice")
        first = next(iter(runs.values()), report)
        differ = [k for k in SAME if report["args"][k] != first["args"][k]]
        if differ:
            raise SystemExit(f"{path}: settings differ from the first report in {differ}; only the seed may change")
        runs[seed] = report
    return dict(sorted(runs.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", nargs="+", required=True, help="report names in reports/ (one per seed)")
    parser.add_argument("--variants", default="lora,loramoe_full", help="variants present in every report")
    parser.add_argument("--name", default="loramoe_seeds_en")
    args = parser.parse_args()
    runs = load_runs(args.reports)
    variants = args.variants.split(",")
    specs = next(iter(runs.values()))["args"]["eval"]
    sets = [e.partition(":")[0] for e in specs]
    constant_scores = {b: constant_answer(spec) for b, spec in zip(sets, specs)}
    constant = {b: c[0] if c else None for b, c in constant_scores.items()}
    for seed, report in runs.items():
        missing = [v for v in variants if v not in report["results"]]
        if missing:
            raise SystemExit(f"seed {seed}: variants {missing} not in its report")
    seeds = list(runs)

    score = {(v, b, s): headline(runs[s]["results"][v][b]) for v in variants for b in sets for s in seeds}
    examples = {b: next(iter(runs.values()))["results"][variants[0]][b]["examples"] for b in sets}
    lines = [(f"Reports: {', '.join(f'`{n}`' for n in args.reports)} (seeds {', '.join(map(str, seeds))}); "
              "each trains every variant with that seed (adapter initialisation, data order, training mix) "
              "and the same settings otherwise. Headline metric per test set (accuracy; ROUGE-L for open questions).\n"),
             "| variant | test set (n) | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | sd over seeds | macro-F1 per seed |",
             "| --- | --- | " + " | ".join("---:" for _ in seeds) + " | ---: | ---: | ---: |"]
    spread = {}
    for v in variants:
        for b in sets:
            values = [score[v, b, s] for s in seeds]
            spread[v, b] = statistics.stdev(values) if len(values) > 1 else 0.0
            f1 = [runs[s]["results"][v][b].get("macro_f1") for s in seeds]
            lines.append(f"| {v} | {b} ({examples[b]}) | " + " | ".join(f"{x:.3f}" for x in values)
                         + f" | {statistics.mean(values):.3f} | {spread[v, b]:.3f} | "
                         + (", ".join(f"{x:.3f}" for x in f1) if None not in f1 else "-") + " |")
    for b in sets:
        if constant[b] is not None:
            lines.append(f"| best constant answer | {b} ({examples[b]}) | " + " | ".join(f"{constant[b]:.3f}" for _ in seeds)
                         + f" | {constant[b]:.3f} | 0 | {constant_scores[b][1]:.3f} |")
    cells = [(v, b, s) for v in variants for b in sets for s in seeds if constant[b] is not None]
    at_or_below = sum(score[c] <= constant[c[1]] + 1e-9 for c in cells)
    lines.append(f"\nTuned models at or below the best constant answer: {at_or_below} of {len(cells)} (variant, set, seed) cells.")
    data = {"args": vars(args), "seeds": seeds, "constant_answer_accuracy_macro_f1": constant_scores, "scores": {f"{v}|{b}|{s}": x for (v, b, s), x in score.items()},
            "sd_over_seeds": {f"{v}|{b}": x for (v, b), x in spread.items()}}
    if "lora" in variants and "loramoe_full" in variants:
        lines += ["\n## Full method minus PEFT LoRA, per seed\n",
                  "| test set | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | full >= LoRA |",
                  "| --- | " + " | ".join("---:" for _ in seeds) + " | ---: | ---: |"]
        diffs = {}
        for b in sets:
            diffs[b] = [score["loramoe_full", b, s] - score["lora", b, s] for s in seeds]
            wins = sum(d >= 0 for d in diffs[b])
            lines.append(f"| {b} | " + " | ".join(f"{d:+.3f}" for d in diffs[b])
                         + f" | {statistics.mean(diffs[b]):+.3f} | {wins}/{len(seeds)} |")
        per_seed_mean = [statistics.mean(diffs[b][i] for b in sets) for i in range(len(seeds))]
        lines.append("| mean over sets | " + " | ".join(f"{d:+.3f}" for d in per_seed_mean)
                     + f" | {statistics.mean(per_seed_mean):+.3f} | {sum(d > 0 for d in per_seed_mean)}/{len(seeds)} |")
        largest_gap = max(abs(statistics.mean(d)) for d in diffs.values())
        largest_sd = max(spread.values())
        lines.append(f"\nLargest mean difference between the two variants on one set: {largest_gap:.3f}; largest "
                     f"seed-to-seed standard deviation of one variant on one set: {largest_sd:.3f}. "
                     + ("The variants' difference is smaller than what the seed alone moves one variant by."
                        if largest_gap < largest_sd else "The difference exceeds one variant's seed spread."))
        data["full_minus_lora"] = diffs
    path = write_report(args.name, "SparseDoctor results: spread over seeds", "\n".join(lines), data)
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
