"""Task-level distillation of the Mamba expert against its budget: E_M/E_T answer agreement and accuracy
on the task's test split after each budget of `medmoe mambaformer distill-task`.

    PYTHONPATH=src python benchmarks/mamba_task_distill.py --student $MEDMOE_HOME/experts/mamba-shallow \
        --data pubmedqa --budgets 0,2,5,10 --threads 2 [--head runs/heads/pubmedqa/head]
    PYTHONPATH=src python benchmarks/mamba_task_distill.py --tiny     # smoke test: tiny random models, seconds

One run folder (--run, default runs/mamba_task_distill/<data>): a budget is the run's total training
minutes, so each budget continues the previous one's checkpoint (rerunning the script resumes too;
the run's settings are checked as `distill-task` checks them). After each budget, E_M (the student's
own zero-shot letter answer, as the pipeline scores it) is compared with E_T (the teacher, through
its option head with --head) on the whole test split (--test-limit N: its first N): agreement (same
answer), both accuracies, and the best constant answer of the split. The test split is only read for
this report; nothing is chosen on it (the training prompts come from the pool, the held-out curve
from the dev split). E_T's test answers are a teacher cache of the test records (answers only, no
activations) in the run folder.

Reports reports/mamba_task_distill.md / .json / .png (the held-out dev curve of the run's log against
training minutes, with the test points); --report-dir writes them elsewhere (--tiny: a temp folder).
Minutes are wall-clock training minutes at --threads torch threads (evaluation, checkpoints and the
teacher cache not counted); "CPU minutes" is the process CPU time (user + system, all threads) of a
budget's whole segment, evaluation and cache build included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

NAME = "mamba_task_distill"


def tiny_models(folder: Path, texts: list[str]) -> tuple[str, str]:
    """(teacher folder, student folder): a 4-layer random Llama with a word-level tokenizer over `texts`,
    and a hybrid keeping teacher layers 0, 2, 3 (attention replaced in all three), built by transfer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from medmoe.mamba.transfer import build_hybrid, save_hybrid

    splitter = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    words = ["<pad>", "<unk>", "<s>", "</s>", "yes", "no", "maybe", "Answer", "Question", "Context", ":"]
    for text in texts:
        words += [w for w, _ in splitter.pre_tokenize_str(text)]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = splitter
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    teacher = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30)  # decided answers (a random LM head gives near-uniform ones)
    teacher.save_pretrained(folder / "teacher")
    tokenizer.save_pretrained(folder / "teacher")
    student, spec = build_hybrid(teacher, layers=[0, 2, 3], teacher_name=str(folder / "teacher"))
    save_hybrid(student, spec, folder / "student", tokenizer)
    return str(folder / "teacher"), str(folder / "student")


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def plot(path: Path, evals: list[dict], rows: list[dict]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    x = [e["minutes"] for e in evals]
    ax.plot(x, [e["agreement"] for e in evals], "-", color="C0", label="dev: E_M/E_T agreement")
    ax.plot(x, [e["accuracy"] for e in evals], "-", color="C1", label="dev: E_M accuracy")
    if evals:
        ax.axhline(evals[0]["teacher_accuracy"], color="C1", ls=":", label="dev: E_T accuracy")
    ax.plot([r["minutes"] for r in rows], [r["test"]["agreement"] for r in rows], "o", color="C0", label="test: agreement")
    ax.plot([r["minutes"] for r in rows], [r["test"]["accuracy"] for r in rows], "s", color="C1", label="test: E_M accuracy")
    ax.set_xlabel("training minutes")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="E_T (default smollm2-135m, or the head's expert)")
    ap.add_argument("--head", default=None, help="E_T's option head folder (`medmoe heads train`)")
    ap.add_argument("--student", default=None, help="E_M before task distillation (default: $MEDMOE_HOME/experts/mamba-shallow)")
    ap.add_argument("--data", default="pubmedqa")
    ap.add_argument("--budgets", default="0,2,5,10", help="training minutes, cumulative (one run)")
    ap.add_argument("--run", type=Path, default=None, help="run folder (default runs/mamba_task_distill/<data>)")
    ap.add_argument("--test-limit", type=int, default=0, help="first N test questions (0 = the whole split)")
    ap.add_argument("--limit", type=int, default=0, help="training prompts (0 = all)")
    ap.add_argument("--heldout-limit", type=int, default=100)
    ap.add_argument("--skip-first", type=int, default=150)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--gamma", type=float, default=0.0)
    ap.add_argument("--delta", type=float, default=1.0)
    ap.add_argument("--align-only-minutes", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="tiny random teacher and student (smoke test of this script)")
    ap.add_argument("--report-dir", type=Path, default=None, help="write the report here instead of reports/")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from medmoe.data import load_dataset
    from medmoe.eval.metrics import best_constant
    from medmoe.mambaformer.experiments.task_distill import load_teacher
    from medmoe.train.task_distill import TaskDistillConfig, TeacherCache, evaluate, run_task_distill, task_records

    test = load_dataset(args.data, "test")
    scratch = None
    if args.tiny:
        scratch = args.run.with_name(args.run.name + "_tiny_models") if args.run else \
            Path(tempfile.mkdtemp(prefix="mamba_task_distill_tiny_"))
        args.test_limit = args.test_limit or 12
        args.limit, args.heldout_limit, args.eval_every, args.batch_size = args.limit or 6, 4, 2, 2
        args.lr = 3e-3
        if args.budgets == ap.get_default("budgets"):
            args.budgets = "0,0.02,0.04"
        args.report_dir = args.report_dir or scratch / "reports"
        args.run = args.run or scratch / "run"
    test = test[: args.test_limit] if args.test_limit else test
    data = task_records(args.data, skip_first=args.skip_first, limit=args.limit, heldout_limit=args.heldout_limit)
    if args.tiny:
        assert scratch is not None
        texts = [" ".join([r.question, r.context or "", *r.options]) for r in data.records + test]
        args.model, args.student = tiny_models(scratch, texts)
    if args.student is None:
        from medmoe.paths import medmoe_home

        args.student = str(medmoe_home() / "experts" / "mamba-shallow")
    run = args.run or Path("runs") / "mamba_task_distill" / args.data
    if args.report_dir is not None:
        common.REPORTS = Path(args.report_dir)

    teacher = load_teacher(args.model, args.head)
    cpu0 = cpu_seconds()
    test_cache = TeacherCache.build_or_open(run / "test_teacher_cache", teacher, test, active=0)
    test_cache_cpu = cpu_seconds() - cpu0
    constant, constant_acc = best_constant([r.answer for r in test])
    rows = []
    result: dict = {}
    for budget in sorted(float(b) for b in args.budgets.split(",") if b.strip()):
        cfg = TaskDistillConfig(alpha=args.alpha, gamma=args.gamma, delta=args.delta, lr=args.lr, batch_size=args.batch_size,
                                align_only_minutes=args.align_only_minutes, minutes=budget, eval_every=args.eval_every)
        cpu0, wall0 = cpu_seconds(), time.monotonic()
        result = run_task_distill(teacher, args.student, data, run, cfg)
        cpu, wall = cpu_seconds() - cpu0, time.monotonic() - wall0
        metrics = evaluate(result["student"], test_cache, list(range(len(test))), test)
        heldout = result["evals"][-1] if result["evals"] else None
        rows.append({"budget": budget, "steps": result["step"], "minutes": round(result["minutes"], 3),
                     "segment_cpu_minutes": round(cpu / 60, 3), "segment_wall_minutes": round(wall / 60, 3),
                     "test": metrics, "heldout": heldout})
        print(f"budget {budget:g} min: step {result['step']}, test agreement {metrics['agreement']:.3f}, "
              f"E_M {metrics['accuracy']:.3f} / E_T {metrics['teacher_accuracy']:.3f}", flush=True)
    cache = result["cache"]
    evals = result["evals"]
    settings = json.loads((run / "task_distill.json").read_text())

    lines = [
        f"E_T: `{teacher.source}`" + (f" through its option head `{args.head}`" if args.head else " (its own option log-probs)")
        + f"; E_M before task distillation: `{args.student}`; task: {args.data}.",
        f"Prompts: {len(data.train)} training prompts from the {args.data} training pool ({data.pool_records} records; the "
        f"first {args.skip_first} train records left out for the gate), {len(data.heldout)} held out ({data.notes['heldout']}). "
        f"Loss: alpha {args.alpha} (answer KL) + gamma {args.gamma} (prompt-token KL) + delta {args.delta} (mixer alignment)"
        + (f", {args.align_only_minutes:g} align-only minutes first" if args.align_only_minutes else "")
        + f"; AdamW lr {args.lr}, {args.batch_size} prompts per step.",
        f"Teacher cache: {cache.manifest['build_seconds'] / 60:.2f} min for the training and held-out prompts "
        f"(layers {cache.layers}), {test_cache.manifest['build_seconds'] / 60:.2f} min for the test answers; "
        "not counted in the budgets.",
        f"Test: {len(test)} questions of {args.data} test (read for this report only); best constant answer "
        f"'{constant}' {constant_acc:.3f}.",
        "",
        "| budget (min) | steps | training min | CPU min (segment) | test agreement E_M/E_T | E_M accuracy | E_T accuracy "
        "| E_M answers | dev agreement | dev E_M accuracy |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        t, h = r["test"], r["heldout"] or {}
        answers = ", ".join(f"{k} {v}" for k, v in t["answers"].items())
        lines.append(f"| {r['budget']:g} | {r['steps']} | {r['minutes']:.2f} | {r['segment_cpu_minutes']:.2f} | {t['agreement']:.3f} "
                     f"| {t['accuracy']:.3f} | {t['teacher_accuracy']:.3f} | {answers} | {h.get('agreement', float('nan')):.3f} "
                     f"| {h.get('accuracy', float('nan')):.3f} |")
    lines += ["", f"Best constant answer of the test split: '{constant}', accuracy {constant_acc:.3f}. "
              "The dev columns are the run log's last evaluation at that budget (the curve in the PNG)."]
    report_dir = Path(common.REPORTS)
    report_dir.mkdir(parents=True, exist_ok=True)
    has_png = plot(report_dir / f"{NAME}.png", evals, rows)
    if has_png:
        lines += ["", f"![agreement and accuracy against training minutes]({NAME}.png)"]
    path = common.write_report(NAME, f"Task-level distillation of the Mamba expert on {args.data}", "\n".join(lines), {
        "teacher": teacher.source, "head": args.head, "student": args.student, "data": args.data, "run": str(run),
        "threads": args.threads, "settings": settings, "test_examples": len(test),
        "best_constant": {"answer": constant, "accuracy": constant_acc},
        "teacher_cache_minutes": round(cache.manifest["build_seconds"] / 60, 3),
        "test_cache_minutes": round(test_cache.manifest["build_seconds"] / 60, 3),
        "test_cache_cpu_minutes": round(test_cache_cpu / 60, 3), "budgets": rows, "heldout_curve": evals})
    print(f"report: {path}")
    return path


if __name__ == "__main__":
    main()
