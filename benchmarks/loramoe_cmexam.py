"""SparseDoctor on the full CMExam test: LoRA-MoE and PEFT LoRA adapters on the top blocks, scored over
cached lower-block states (issue 16 item 4).

    PYTHONPATH=src python benchmarks/loramoe_cmexam.py cache                     # once: the lower blocks per test prompt
    PYTHONPATH=src python benchmarks/loramoe_cmexam.py score --system zero-shot  # the base, no adapter
    PYTHONPATH=src python benchmarks/loramoe_cmexam.py score --system loramoe    # runs/sd-cmexam-loramoe/adapter
    PYTHONPATH=src python benchmarks/loramoe_cmexam.py score --system lora       # runs/sd-cmexam-lora/adapter
    PYTHONPATH=src python benchmarks/loramoe_cmexam.py check --system loramoe --n 5   # vs the full model
    PYTHONPATH=src python benchmarks/loramoe_cmexam.py report                    # reports/loramoe_cmexam.{md,json}

A second budget (2,000 train questions, 500 steps) scores as `lora-2000` and `loramoe-2000` (adapters in
runs/sd-cmexam-{lora,loramoe}-2000/) in the same WORKDIR, over the same test cache, and reports with
`report --name loramoe_cmexam_2000`; each budget's pair gets its own paired LoRA-MoE minus LoRA interval.

The adapters (`medmoe finetune --top-blocks 4`) sit on the last 4 of Qwen2.5-Coder-1.5B's 28 blocks,
so the lower 24 compute the same states for a prompt under every system. `cache` runs them once per
test prompt (the prompt `medmoe eval --benchmarks cmexam --rule letter` builds: zero-shot, chat
template, the multi-answer instruction) into WORKDIR/test_cache/, an ActivationCache (safetensors,
manifest and key as in training; resumable; its build time in WORKDIR/top_blocks_cache.json). The base is
loaded in fp32, the dtype `medmoe finetune` trains in on CPU, and the cache's key holds it: `score` with
another --dtype is refused. `score` runs only the top 4 blocks, the final norm and the LM head at the
prompt's last position (medmoe.train.top_blocks_scoring), through `medmoe eval`'s own prompt, decision
rule and rows (medmoe.eval.runner.run_benchmark: WORKDIR/NAME.jsonl, one row per question with id,
gold, prediction, correct, the option log-probs `scores` and probabilities `probs`; resumable; the
system's settings in WORKDIR/NAME.json, a resume with others refused). `check` scores the first n
questions both ways (the full model as `medmoe eval` runs it, `load_eval_model` + `apply_rule`) and
writes WORKDIR/check-NAME.json: the largest option log-prob difference and whether the predictions agree.

How questions count: as in `medmoe eval` and reports/quality.md, the letter rule predicts one letter and a
prediction is right only when it equals the gold answer, so the multi-answer CMExam questions (gold
"AB", ...) are wrong for every system and for the constant; `cmexam-single` is the single-answer subset.
`report` gives per system n, accuracy with its 95% bootstrap interval, macro-F1 (over the single
letters), and paired-bootstrap intervals of the difference to the best constant answer and to the
zero-shot base (medmoe.eval.metrics; 1,000 resamples, seed 0), with each adapter's training budget read
from its run folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

NAME = "loramoe_cmexam"
SYSTEMS = {  # --system -> (default adapter, what it is in the report)
    "zero-shot": (None, "zero-shot (no adapter)"),
    "lora": ("runs/sd-cmexam-lora/adapter", "PEFT LoRA (top 4 blocks)"),
    "loramoe": ("runs/sd-cmexam-loramoe/adapter", "LoRA-MoE (top 4 blocks)"),
    "lora-2000": ("runs/sd-cmexam-lora-2000/adapter", "PEFT LoRA (top 4 blocks, 2,000 train questions)"),
    "loramoe-2000": ("runs/sd-cmexam-loramoe-2000/adapter", "LoRA-MoE (top 4 blocks, 2,000 train questions)"),
}
BASELINE = "zero-shot"
METHOD_PAIRS = {  # the report's method comparisons, each at one budget: LoRA-MoE minus PEFT LoRA, paired
    "loramoe_minus_lora": ("loramoe", "lora"),
    "loramoe_minus_lora_2000": ("loramoe-2000", "lora-2000"),
}
CACHE = "test_cache"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    parsers = {name: sub.add_parser(name, help=text) for name, text in (
        ("cache", "compute the lower blocks' states of every test prompt (resumable)"),
        ("score", "score one system over the cache (resumable)"),
        ("check", "the top-blocks path against the full model on the first n questions"),
        ("report", "write reports/loramoe_cmexam.md and .json"))}
    for name, p in parsers.items():
        p.add_argument("--workdir", type=Path, default=Path("runs/loramoe_cmexam"), help="cache, rows and checks")
        p.add_argument("--benchmark", default="cmexam")
        p.add_argument("--limit", type=int, default=0, help="the first N test questions in split order (0 = all)")
        if name == "report":
            p.add_argument("--report-dir", type=Path, default=None, help="write the report here instead of reports/")
            p.add_argument("--name", default=NAME, help="the report's file name: reports/NAME.md and .json")
            p.add_argument("--threads", type=int, default=2,
                           help="torch CPU threads the training and scoring runs used (they do not record it): CPU-hours = hours x this")
            continue
        p.add_argument("--model", default="qwen2.5-coder-1.5b", help="the base the adapters were trained on")
        p.add_argument("--top-blocks", type=int, default=4)
        p.add_argument("--dtype", default="float32", help="the base's dtype: the one the adapters were trained in")
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--batch-size", type=int, default=4, help="prompts per forward (cache: lower blocks; score: top blocks)")
        if name in ("score", "check"):
            p.add_argument("--system", required=True, help=f"{', '.join(SYSTEMS)}, or any name with --adapter")
            p.add_argument("--adapter", default=None, help="the adapter folder (default: the system's, see SYSTEMS)")
        if name == "check":
            p.add_argument("--n", type=int, default=5, help="questions to score both ways")
            p.add_argument("--tolerance", type=float, default=1e-3, help="largest allowed option log-prob difference")
    return ap.parse_args(argv)


def load_bench(args: argparse.Namespace, limit: int | None = None) -> Any:
    """The benchmark `medmoe eval` scores, its records cut to the first `limit` (or --limit) in split order."""
    from medmoe.eval.benchmarks import load_benchmark

    bench = load_benchmark(args.benchmark)
    n = limit if limit is not None else args.limit
    return dataclasses.replace(bench, records=bench.records[:n]) if n else bench


def adapter_of(args: argparse.Namespace) -> str | None:
    if args.adapter:
        return str(args.adapter)
    if args.system not in SYSTEMS:
        raise SystemExit(f"--system {args.system}: not one of {', '.join(SYSTEMS)}; give its --adapter")
    adapter = SYSTEMS[args.system][0]
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise SystemExit(f"{adapter}: no adapter there yet (the training run writes it when it ends); or give --adapter")
    return adapter


def load(args: argparse.Namespace, adapter: str | None) -> tuple[Any, Any]:
    import torch

    from medmoe.models import load_causal_lm

    torch.set_num_threads(args.threads)
    return load_causal_lm(args.model, dtype=getattr(torch, args.dtype), adapter=adapter)


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def cache(args: argparse.Namespace) -> None:
    from medmoe.train.finetune import note_cache_build
    from medmoe.train.top_blocks import ActivationCache
    from medmoe.train.top_blocks_scoring import prompt_features

    model, tokenizer = load(args, None)
    bench = load_bench(args)
    features = prompt_features(model, tokenizer, bench)
    built = ActivationCache.build_or_open(args.workdir / CACHE, model, features, args.top_blocks, pad_id(tokenizer),
                                          batch_size=args.batch_size, progress=True, otherwise="use another --workdir")
    note_cache_build(args.workdir, built)
    print(f"{args.workdir / CACHE}: {len(features)} prompts, {built.computed} computed in {built.seconds:.0f} s", flush=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def system_settings(args: argparse.Namespace, adapter: str | None, records: int, key: dict[str, Any]) -> dict[str, Any]:
    """What a system's rows depend on; a resumed `score` must match them."""
    weights = sorted(Path(adapter).glob("adapter_model*.safetensors")) if adapter else []
    return {"system": args.system, "model": args.model, "adapter": adapter, "dtype": args.dtype,
            "adapter_sha256": {w.name: file_sha256(w) for w in weights}, "top_blocks": args.top_blocks,
            "benchmark": args.benchmark, "records": records, "rule": "letter", "shots": 0,
            "cache_key_sha256": hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()}


def score(args: argparse.Namespace) -> None:
    from medmoe.eval.runner import run_benchmark
    from medmoe.paths import atomic_write_json
    from medmoe.train.top_blocks import ActivationCache
    from medmoe.train.top_blocks_scoring import TopBlocksEvalModel, prompt_features

    adapter = adapter_of(args)
    model, tokenizer = load(args, adapter)
    bench = load_bench(args)
    features = prompt_features(model, tokenizer, bench)
    cached = ActivationCache.open(args.workdir / CACHE, model, features, args.top_blocks,
                                  otherwise="run `cache` with the same --model, --dtype, --top-blocks, --limit")
    settings = system_settings(args, adapter, len(bench.records), cached.manifest["key"])
    path = args.workdir / f"{args.system}.json"
    info: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"settings": settings, "runs": []}
    changed = {k: (info["settings"].get(k), v) for k, v in settings.items() if info["settings"].get(k) != v}
    if changed:
        raise SystemExit(f"{path}: {args.system}'s rows were scored with other settings ("
                         + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
                         + f"); delete {path} and {path.with_suffix('.jsonl')} to score again")
    output = args.workdir / f"{args.system}.jsonl"
    before = sum(1 for _ in output.open(encoding="utf-8")) if output.is_file() else 0
    start = time.perf_counter()
    lm = TopBlocksEvalModel(model, tokenizer, cached, features, args.top_blocks, name=args.system)
    rows = run_benchmark(lm, bench, output, rule="letter", batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    info["runs"].append({"scored": len(rows) - min(before, len(rows)), "seconds": round(seconds, 1), "threads": args.threads})
    atomic_write_json(path, info)
    accuracy = sum(r["correct"] for r in rows) / len(rows)
    print(f"{args.system}: {len(rows)} questions, accuracy {accuracy:.3f} ({seconds:.0f} s this run)", flush=True)


def check(args: argparse.Namespace) -> bool:
    """True when every prediction agrees and the log-probs are within --tolerance."""
    import torch

    from medmoe.errors import MedmoeError
    from medmoe.eval.model import load_eval_model
    from medmoe.eval.rules import apply_rule
    from medmoe.eval.window import PromptFitter
    from medmoe.paths import atomic_write_json
    from medmoe.train.top_blocks import ActivationCache
    from medmoe.train.top_blocks_scoring import TopBlocksEvalModel, prompt_features

    if args.dtype != "float32":
        raise SystemExit("check compares with `medmoe eval`'s full model, which loads in float32: give --dtype float32")
    adapter = adapter_of(args)
    torch.set_num_threads(args.threads)
    full = load_eval_model(args.model, adapter)  # what `medmoe eval --model M [--adapter A]` scores with
    model, tokenizer = full.model, full.tokenizer  # type: ignore[attr-defined]  # an HFEvalModel
    bench, test_bench = load_bench(args, args.n), load_bench(args)
    features = prompt_features(model, tokenizer, bench)
    try:  # the test cache when it is built: the states `score` reads
        all_features = prompt_features(model, tokenizer, test_bench)
        cached, source = ActivationCache.open(args.workdir / CACHE, model, all_features, args.top_blocks), str(args.workdir / CACHE)
        features = all_features
    except MedmoeError as exc:  # none yet, incomplete, or of other settings: a small cache of these n prompts
        print(f"check: {exc}; using a cache of the first {args.n} prompts", flush=True)
        folder = args.workdir / f"check_cache-{args.system}"
        cached = ActivationCache.build_or_open(folder, model, features, args.top_blocks, pad_id(tokenizer),
                                               batch_size=args.batch_size, otherwise="delete it")
        source = str(folder)
    top = TopBlocksEvalModel(model, tokenizer, cached, features, args.top_blocks, name=args.system)
    fitter = PromptFitter(full, "letter", bench.multi)
    rows, seconds = [], {"full": 0.0, "top_blocks": 0.0}
    for record in bench.records:
        fitted, _ = fitter.fit(record, [])
        outcomes = {}
        for path, lm in (("full", full), ("top_blocks", top)):
            start = time.perf_counter()
            outcomes[path] = apply_rule(lm, [fitted], "letter", [[]], bench.multi)[0]
            seconds[path] += time.perf_counter() - start
        a, b = outcomes["full"], outcomes["top_blocks"]
        rows.append({"id": record.id, "gold": record.answer, "full": a.prediction, "top_blocks": b.prediction,
                     "max_abs_logprob_diff": max(abs(a.scores[k] - b.scores[k]) for k in a.scores),
                     "full_scores": a.scores, "top_blocks_scores": b.scores})
    worst = max(r["max_abs_logprob_diff"] for r in rows)
    same = all(r["full"] == r["top_blocks"] for r in rows)
    result = {"system": args.system, "model": args.model, "adapter": adapter, "n": len(rows), "cache": source,
              "max_abs_logprob_diff": worst, "same_predictions": same, "tolerance": args.tolerance,
              "seconds_per_question": {k: v / len(rows) for k, v in seconds.items()}, "threads": args.threads, "rows": rows}
    atomic_write_json(args.workdir / f"check-{args.system}.json", result)
    ok = same and worst <= args.tolerance
    print(f"check {args.system}: {len(rows)} questions, max |option log-prob difference| {worst:.2e}, predictions "
          f"{'identical' if same else 'DIFFER'}; s/question full {result['seconds_per_question']['full']:.2f}, "
          f"top blocks {result['seconds_per_question']['top_blocks']:.2f} -> {'ok' if ok else 'FAILED'}", flush=True)
    return ok


# ---- the report -----------------------------------------------------------------------------------------

def scored_systems(workdir: Path) -> dict[str, list[dict[str, Any]]]:
    """System -> its rows (SYSTEMS' order, then any other NAME.jsonl), each on the same questions."""
    from medmoe.eval.runner import read_done

    found = {p.stem for p in workdir.glob("*.jsonl")}
    names = [s for s in SYSTEMS if s in found] + sorted(found - set(SYSTEMS))
    systems = {name: list(read_done(workdir / f"{name}.jsonl").values()) for name in names}
    if not systems:
        raise SystemExit(f"{workdir}: no scored system (*.jsonl); run `score` first")
    ids = [r["id"] for r in next(iter(systems.values()))]
    for name, rows in systems.items():
        if [r["id"] for r in rows] != ids:
            raise SystemExit(f"{workdir / name}.jsonl: other questions than {next(iter(systems))}.jsonl "
                             "(score every system on the same --limit, to the end)")
    return systems


def summarize(rows: list[dict[str, Any]], systems: list[str]) -> dict[str, Any]:
    """quality.py's summary (accuracy, macro-F1, CIs, difference to the constant) plus the paired
    difference to the zero-shot base. rows: {"id", "gold", SYSTEM: prediction, ...}."""
    from medmoe.eval.metrics import paired_difference
    from quality import summarize as quality_summary

    out = quality_summary(NAME, rows, systems, None)
    for system in systems:
        out["systems"][system].pop("deployed")
        if BASELINE in systems and system != BASELINE:
            diff, ci = paired_difference([float(r[system] == r["gold"]) for r in rows], [float(r[BASELINE] == r["gold"]) for r in rows])
            out["systems"][system] |= {"diff_vs_zero_shot": diff, "diff_vs_zero_shot_ci95": list(ci)}
    for key, (a, b) in METHOD_PAIRS.items():  # SparseDoctor's method against PEFT LoRA at one budget
        if a in systems and b in systems:
            diff, ci = paired_difference([float(r[a] == r["gold"]) for r in rows], [float(r[b] == r["gold"]) for r in rows])
            out[key] = {"diff": diff, "ci95": list(ci), "systems": [a, b]}
    return out


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def training_budget(adapter: str | None) -> dict[str, Any] | None:
    """What the adapter's run cost and saw, from its run folder (the adapter folder's parent)."""
    if adapter is None:
        return None
    run = Path(adapter).parent
    cfg = read_json(run / "finetune_config.json") or {}
    log_path = run / "train_log.jsonl"
    log = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()] if log_path.is_file() else []
    step_seconds = [r["seconds"] for r in log if "seconds" in r]
    done = Path(adapter) / "medmoe_training.json"
    started = run / "finetune_config.json"
    span = done.stat().st_mtime - started.stat().st_mtime if done.is_file() and started.is_file() else None
    examples = (cfg.get("examples") or {}).get("count")
    per_step = cfg.get("batch_size", 0) * cfg.get("grad_accum", 1)
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    return {
        "run": str(run), "method": cfg.get("method"), "data": cfg.get("data"), "steps": cfg.get("steps"),
        "logged_steps": len(log), "batch_size": cfg.get("batch_size"), "grad_accum": cfg.get("grad_accum"),
        "examples": examples, "held_out": cfg.get("eval_examples"),
        "trained_on": examples - cfg.get("eval_examples", 0) if examples is not None else None,
        "examples_seen": (cfg.get("steps") or 0) * per_step, "epochs": log[-1].get("epoch") if log else None,
        "max_length": cfg.get("max_length"), "top_blocks": cfg.get("top_blocks"), "lr": cfg.get("lr"), "seed": cfg.get("seed"),
        "last_loss": log[-1]["loss"] if log else None, "last_eval_loss": evals[-1] if evals else None,
        "train_seconds": sum(step_seconds) if log and len(step_seconds) == len(log) else None,
        "span_seconds": span, "cache_build": read_json(run / "top_blocks_cache.json"),
    }


def _hours(seconds: float | None) -> str:
    return f"{seconds / 3600:.2f}" if seconds is not None else "not logged"


def _cache_cost(note: dict[str, Any] | None) -> str:
    if not note:
        return "not logged"
    builds = note["builds"]
    return f"{sum(b['seconds'] for b in builds) / 3600:.2f} h for {sum(b['computed_examples'] for b in builds):,} examples"


def report(args: argparse.Namespace) -> Path:
    if args.report_dir is not None:
        common.REPORTS = Path(args.report_dir)
    workdir = args.workdir
    systems = scored_systems(workdir)
    names = list(systems)
    first = next(iter(systems.values()))
    rows = [{"id": r["id"], "gold": r["gold"], **{s: systems[s][i]["prediction"] for s in names}} for i, r in enumerate(first)]
    single = [r for r in rows if len(r["gold"]) == 1]
    benchmarks = {"cmexam": summarize(rows, names), "cmexam-single": summarize(single, names)}
    details = {s: read_json(workdir / f"{s}.json") or {} for s in names}
    adapters = {s: (details[s].get("settings") or {}).get("adapter") for s in names}
    budgets = {s: training_budget(adapters[s]) for s in names}
    checks = {s: read_json(workdir / f"check-{s}.json") for s in names}
    test_cache = read_json(workdir / "top_blocks_cache.json")
    label = {s: SYSTEMS[s][1] if s in SYSTEMS else s for s in names}
    multi = len(rows) - len(single)
    settings = next(iter(details.values())).get("settings", {})
    total = len(load_bench(args, limit=0).records)
    partial = (f"**PARTIAL: the first {len(rows)} of the {total:,} test questions in split order** (`score --limit "
               f"{len(rows)}`: the CPU time this session had; the rest scores with the same commands without --limit). "
               if len(rows) < total else "")
    lines = [f"{partial}Base {settings.get('model')} in {settings.get('dtype')} (the dtype the adapters were trained in; "
             "reports/quality.md's zero-shot row ran in bfloat16), `medmoe eval`'s zero-shot letter prompt and rule "
             f"on {settings.get('benchmark')}'s test split: every system runs the lower blocks' states cached once per "
             f"prompt (WORKDIR {workdir}), then its own top {settings.get('top_blocks')} blocks (`check` rows below: "
             "the same answers as the full model).", "",
             f"How questions count: {multi} of the {len(rows)} questions have several correct letters; the letter rule "
             "gives one letter and a prediction is right only when it equals the gold answer, so those questions are "
             "wrong for every system and for the constant (as in `medmoe eval` and reports/quality.md); "
             "`cmexam-single` leaves them out. Intervals: 95% bootstrap over questions (1,000 resamples, seed 0); the "
             "differences are paired (the same resampled questions for both).", ""]
    for name, b in benchmarks.items():
        c = b["best_constant"]
        subset = "; the single-answer questions" if name == "cmexam-single" else ""
        lines += [f"## {name} (n = {b['n']}{subset})", "",
                  f"Best constant answer: '{c['answer']}', accuracy {c['accuracy']:.3f}, macro-F1 {c['macro_f1']:.3f}.", "",
                  "| system | adapter | accuracy [95% CI] | macro-F1 | diff vs constant [95% CI] | diff vs zero-shot [95% CI] |",
                  "|---|---|---|---|---|---|"]
        for system, s in b["systems"].items():
            lo, hi = s["diff_vs_constant_ci95"]
            vs_base = "" if "diff_vs_zero_shot" not in s else \
                f"{s['diff_vs_zero_shot']:+.3f} [{s['diff_vs_zero_shot_ci95'][0]:+.3f}, {s['diff_vs_zero_shot_ci95'][1]:+.3f}]"
            lines.append(f"| {label[system]} | {adapters[system] or 'none'} | {s['accuracy']:.3f} [{s['ci95'][0]:.3f}, "
                         f"{s['ci95'][1]:.3f}] | {s['macro_f1']:.3f} | {s['accuracy'] - c['accuracy']:+.3f} [{lo:+.3f}, {hi:+.3f}] "
                         f"| {vs_base} |")
        for key in (k for k in METHOD_PAIRS if k in b):
            d = b[key]
            lines += [f"{label[d['systems'][0]]} minus {label[d['systems'][1]]} (same questions, same budget): {d['diff']:+.3f} "
                      f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" + (" (the interval holds 0: not told apart)"
                                                                        if d["ci95"][0] <= 0 <= d["ci95"][1] else ""), ""]
        lines.append("")
    trained = {s: t for s, t in budgets.items() if t}
    if trained:
        lines += ["## Training budgets (from each adapter's run folder)", "",
                  "`train h`: the sum of the steps' logged wall seconds (train_log.jsonl `seconds`), else not logged; "
                  "`span h`: first start to the adapter written (file times: includes the cache build, evaluations, and "
                  f"any time between a kill and its resume). CPU-hours = hours x {args.threads} torch threads (`report --threads`).", "",
                  "| system | method | steps x batch x accum | examples (trained / held out) | epochs | max length | top blocks | "
                  "last loss | last eval loss | train h | span h | CPU-h (span) | cache build |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for system, t in trained.items():
            lines.append(f"| {label[system]} | {t['method']} | {t['steps']} x {t['batch_size']} x {t['grad_accum']} | "
                         f"{t['trained_on']} / {t['held_out']} | {t['epochs']} | {t['max_length']} | {t['top_blocks']} | "
                         f"{_num(t['last_loss'])} | {_num(t['last_eval_loss'])} | {_hours(t['train_seconds'])} | "
                         f"{_hours(t['span_seconds'])} | {_hours(t['span_seconds'] * args.threads if t['span_seconds'] else None)} | "
                         f"{_cache_cost(t['cache_build'])} |")
        lines.append("")
    lines += ["## Evaluation cost and checks", "",
              f"Test cache ({workdir / CACHE}): " + (f"{test_cache['examples']:,} prompts, {test_cache['tokens']:,} tokens, "
                                                     f"{test_cache['bytes'] / 1e9:.2f} GB; built in {_cache_cost(test_cache)}"
                                                     if test_cache else "build time not logged") + ".", "",
              "| system | scoring s (all runs) | s / question | check: n | max abs option log-prob diff | same predictions | "
              "s / question full model, top blocks |", "|---|---|---|---|---|---|---|"]
    for system in names:
        runs = details[system].get("runs", [])
        total = sum(r["seconds"] for r in runs)
        scored = sum(r["scored"] for r in runs)
        ch = checks[system]
        checked = (f"{ch['n']} | {ch['max_abs_logprob_diff']:.2e} | {'yes' if ch['same_predictions'] else 'NO'} | "
                   f"{ch['seconds_per_question']['full']:.2f}, {ch['seconds_per_question']['top_blocks']:.2f}") if ch else "not run | | |"
        lines.append(f"| {label[system]} | {total:.0f} | {total / scored if scored else 0:.2f} | {checked} |")
    data = {"benchmarks": benchmarks, "systems": {s: {"label": label[s], "adapter": adapters[s], "settings": details[s].get("settings"),
                                                        "scoring_runs": details[s].get("runs"), "training": budgets[s],
                                                        "check": {k: v for k, v in (checks[s] or {}).items() if k != "rows"} or None}
                                                    for s in names},
            "multi_answer_questions": multi, "test_cache": test_cache, "workdir": str(workdir),
            "test_questions": {"scored": len(rows), "split": total}, "threads": args.threads}
    return common.write_report(args.name, "SparseDoctor adapters on the full CMExam test (top blocks over cached states)",
                               "\n".join(lines), data)


def _num(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else ""


def main(argv: list[str] | None = None) -> Any:
    args = parse(argv)
    if args.command == "cache":
        return cache(args)
    if args.command == "score":
        return score(args)
    if args.command == "check":
        ok = check(args)
        if argv is None and not ok:
            raise SystemExit(1)
        return ok
    return report(args)


if __name__ == "__main__":
    main()
