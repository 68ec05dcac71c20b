"""`medmoe mambaformer ...`: the routed MambaFormer system, from experts to gate.

    run, ask                  the main job and one routed answer (also top level: `medmoe run`, `medmoe ask`)
    distill                   a Mamba expert from a Transformer (cli/distill.py)
    distill-task              task-level distillation of the Mamba expert from E_T (and its head) (cli/distill.py)
    expert                    task fine-tuning of an expert: a preset of `medmoe finetune` (cli/finetune.py)
    profile, calibrate        an expert's latency model; tau again for a latency budget on a run's cached results
    gate lexicon|train|calibrate|pareto   the gate on cached expert results (cli/gate.py)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from medmoe.cli.config_file import ConfigOption
from medmoe.cli.deprecated import renamed_flags
from medmoe.cli.placement import device_option, dtype_option

console = Console()
DEFAULT_OUT = Path("runs/mambaformer")
RUN_FLAGS = {"--datasets": "--data", "--out": "--output"}  # old -> new (medmoe.cli.deprecated)
RUN_DTYPE_HELP = ("Experts' dtype: auto, float32, bfloat16 or float16 (auto: bfloat16 on a CUDA GPU that has it and on "
                  "CPUs with AVX512-BF16 or AMX, else float32; on a 2-core AVX512-BF16 CPU bfloat16 scores PubMedQA in "
                  "0.69x SmolLM2's and 0.77x Gemma's float32 time, same answers). E_T and the big baseline take it; E_M "
                  "(the Mamba hybrid) stays float32 on CPU, the only dtype of its fused scan kernel. The run folder keeps "
                  "each expert's dtype and device (OUTPUT/<dataset>/experts.json) and refuses to mix in another.")
BIG_BASELINE = "gemma3-270m"  # what --big adds: the largest Transformer available offline


def default_mamba_expert() -> Path:
    from medmoe.paths import medmoe_home

    return medmoe_home() / "experts" / "mamba-shallow"


def ensure_mamba_expert(path: Path, minutes: float, threads: int | None) -> None:
    """Build the default Mamba expert by distillation when it does not exist yet (resumes if interrupted)."""
    from medmoe.models import hybrid_folder

    if path.exists() and hybrid_folder(path) is not None:
        return
    console.print(f"[bold]building the default Mamba expert[/] ({minutes:g} min of distillation from smollm2-135m) -> {path}")
    cmd = [sys.executable, "-m", "medmoe", "mambaformer", "distill", "--output", str(path), "--size", "shallow",
           "--minutes", str(minutes)]
    if threads:
        cmd += ["--threads", str(threads)]
    subprocess.run(cmd, check=True)


def accuracy_cell(accuracy: float, floor: dict | None) -> str:
    """The accuracy, marked "(≤ floor)" when it is not above the best constant answer's."""
    below = floor is not None and accuracy <= floor["accuracy"] + 1e-9
    return f"{accuracy:.3f}" + (" (≤ floor)" if below else "")


def print_targets(targets: dict | None) -> None:
    """One line per target of `report["targets"]["holds"]`: met / NOT met."""
    from medmoe.mambaformer.experiments.targets import TARGET_TEXT

    for key, met in (targets or {}).get("holds", {}).items():
        console.print(f"target: {TARGET_TEXT.get(key, key)}: " + ("[green]met[/]" if met else "[red]NOT met[/]"))


def print_summary(dataset: str, report: dict) -> None:
    big, floor = report.get("big"), report.get("floor")
    table = Table("router", "accuracy", "macro-F1", "p50 ms", "p95 ms", "share to E_M",
                  f"speedup vs {big['name'] if big else 'big'}",
                  title=f"MambaFormer on {dataset} test ({report['examples']['test']} examples; tau {report['tau']:.3f}, gate {report['gate_ms']:.2f} ms)")
    cells = []
    for row in report["summary"]:
        speed = f"{row['speedup_vs_big']:.2f}x" if row["speedup_vs_big"] else "-"
        cells.append([row["router"], accuracy_cell(row["accuracy"], floor), f"{row['macro_f1']:.3f}", f"{row['p50_ms']:.0f}",
                      f"{row['p95_ms']:.0f}", f"{row['share_mamba']:.2f}", speed])
    if big:
        cells.append([big["name"], accuracy_cell(big["accuracy"], floor), "", f"{big['latency_ms']:.0f}", "", "", "1.00x"])
    if floor:
        cells.append([f"best constant ('{floor['answer']}')", f"{floor['accuracy']:.3f}", "", "", "", "", ""])
        if any("≤ floor" in c[1] for c in cells):
            table.caption = f"rows marked ≤ floor answer no better than always answering '{floor['answer']}'"
    for c in cells:
        table.add_row(*c)
    console.print(table)
    print_targets(report.get("targets"))


def run(
    data: str = typer.Option("pubmedqa,dental", "--data", help="Comma-separated bundled datasets with train/dev/test splits."),
    transformer: str = typer.Option("smollm2-135m", help="E_T: bundled name, hub id or local folder."),
    mamba: Path | None = typer.Option(None, help="E_M: a `medmoe mambaformer distill` run or hybrid folder (default: built once under $MEDMOE_HOME/experts)."),
    big: str = typer.Option("", help=f"A big Transformer evaluated alone, for the 'speedup vs big' column: {BIG_BASELINE} "
                             "is the largest offline (default: none, which keeps a first run within 15 minutes; "
                             f"--big {BIG_BASELINE} adds about 3.5 minutes to a first run, cached after)."),
    distill_minutes: float = typer.Option(2.0, help="Distillation budget when the default Mamba expert is built (once)."),
    train_limit: int = typer.Option(100, help="Train examples for the gate (0 = all)."),
    dev_limit: int = typer.Option(50, help="Dev examples for calibration (0 = all)."),
    test_limit: int = typer.Option(200, help="Test examples (0 = the whole test split)."),
    latency_budget: float | None = typer.Option(None, "--latency-budget", help="Calibrate tau for this p50 budget (ms) instead of 'fastest within 1 point of E_T'."),
    output: Path = typer.Option(DEFAULT_OUT, "--output", "-o", help="Run folder (per-example results are cached here and reused)."),
    threads: int | None = typer.Option(None, help="torch CPU threads (default: all cores)."),
    dtype: str = dtype_option("auto", help=RUN_DTYPE_HELP),
    device: str = device_option("auto"),
    answers: str = typer.Option("heads", help="How the experts answer: heads (each through an option head chosen by "
                                "cross-validation on the run's train + dev questions and cross-fitted, so the gate "
                                "learns from answers to unseen questions; saved with the router, which the server "
                                "answers through) or zero-shot (each expert's own option likelihoods)."),
    config: ConfigOption = None,
) -> None:
    """The main job: build (or load cached) experts and gate, route PubMedQA and Dental test questions.

    Prints, per dataset, accuracy, macro-F1, p50/p95 latency, share to the Mamba expert and speedup
    against the big Transformer, for the calibrated MambaFormer and every baseline; writes the
    Pareto table and plot (pareto.md/.json/.png) and the gate checkpoint under --output. The default
    budgets are small so a first run on 2 CPU cores ends within about 15 minutes (docs/mambaformer.md,
    "Main job budget": experts in bfloat16 where the CPU has it, 2 minutes of E_M distillation, no big
    baseline unless --big gemma3-270m); pass 0 limits for the full splits.

    Example: medmoe run --data pubmedqa --mamba runs/em-pubmedqa/model --config recipes/run_default.yaml
    """
    import torch

    from medmoe.mambaformer.experiments.pipeline import PipelineConfig, run_pipeline

    if threads:
        torch.set_num_threads(threads)
    expert = mamba or default_mamba_expert()
    if mamba is None:
        ensure_mamba_expert(expert, distill_minutes, threads)
    if not big:
        console.print(f"no big baseline (the default, for a short first run): --big {BIG_BASELINE} adds "
                      f"{BIG_BASELINE} alone and the 'speedup vs big' column")
    for dataset in [d.strip() for d in data.split(",") if d.strip()]:
        cfg = PipelineConfig(dataset=dataset, transformer=transformer, mamba=str(expert), big=big or None,
                             train_limit=train_limit or None, dev_limit=dev_limit or None, test_limit=test_limit or None,
                             latency_budget_ms=latency_budget, out=str(output), dtype=dtype, device=device,
                             answers=answers)
        report = run_pipeline(cfg, log=console.print)
        print_summary(dataset, report)
        console.print(f"Pareto table and plot: {output / dataset / 'pareto.md'}, {output / dataset / 'pareto.png'}")


def ask(
    question: str = typer.Argument(..., help="The question."),
    context: str | None = typer.Option(None, help="Supporting text (e.g. an abstract)."),
    options: str = typer.Option("yes|no|maybe", help="Options separated by '|'."),
    router: Path = typer.Option(DEFAULT_OUT / "pubmedqa" / "router", help="Gate checkpoint folder (written by `medmoe run`; it names both experts)."),
) -> None:
    """Answer one question with the routed system: answer, chosen expert, gate probability, top features, latency.

    Example: medmoe ask "Is aspirin effective for primary prevention of stroke?" --context "..."
    """
    from medmoe.data.record import Record
    from medmoe.errors import MedmoeError
    from medmoe.mambaformer.answerer import RoutedAnswerer

    if not question.strip():
        raise MedmoeError("the question is empty")
    choices = tuple(o.strip() for o in options.split("|") if o.strip())
    if len(choices) < 2:
        raise MedmoeError(f"--options needs at least two options separated by '|', got {options!r}")
    with console.status("loading the router and experts..."):
        answerer = RoutedAnswerer.load(router)
    record = Record(id="ask", question=question, answer="A", context=context, options=choices)
    answer = answerer.answer(record)
    chosen = choices["ABCDEFGHIJ".index(answer.answer)]
    console.print(f"[bold]answer[/]: {chosen}   ({', '.join(f'{choices[i]} {p:.2f}' for i, p in enumerate(answer.label_scores.values()))})")
    console.print(f"[bold]expert[/]: {answer.expert}   p_M = {answer.gate_probability:.3f} (tau {answerer.checkpoint.tau:.3f})")
    console.print("[bold]why[/]: " + ", ".join(f"{name} {value:+.3f}" for name, value in answer.top_features))
    console.print("[bold]latency[/]: " + ", ".join(f"{k} {v:.0f} ms" for k, v in answer.latency_ms.items()))


def profile(
    expert: str = typer.Argument(..., help="Expert to time: bundled name, hub id, local folder or distill run."),
    lengths: str = typer.Option("64,128,256,512,1024", help="Input lengths (tokens)."),
    repeats: int = typer.Option(5, help="Timed repeats per length (median)."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the latency model (JSON)."),
) -> None:
    """Time one expert's forward pass over a grid of lengths on this machine and fit C(n) = a n^2 + b n + c.

    Example: medmoe mambaformer profile smollm2-135m -o lat_t.json
    """
    import torch

    from medmoe.mambaformer.experts import load_expert
    from medmoe.mambaformer.latency import profile as profile_latency

    loaded = load_expert("expert", expert)
    vocab = loaded.model.get_input_embeddings().weight.shape[0]

    @torch.inference_mode()
    def forward(n: int) -> None:
        loaded.model(input_ids=torch.randint(0, vocab, (1, n)), use_cache=False)

    grid = [int(x) for x in lengths.split(",")]
    with console.status(f"timing {expert} at {grid} tokens..."):
        model = profile_latency(forward, grid, repeats=repeats, expert=expert)
    model.save(output)
    console.print(f"C(n) = {model.a:.3g} n^2 + {model.b:.3g} n + {model.c:.3g} ms  -> {output}")


def calibrate(
    router: Path = typer.Option(DEFAULT_OUT / "pubmedqa" / "router", help="Gate checkpoint folder written by `medmoe run`."),
    latency_budget: float = typer.Option(..., "--latency-budget", help="p50 latency budget per query (ms)."),
) -> None:
    """Re-pick tau for a latency budget on the run's cached dev results, and save it in the checkpoint.

    Example: medmoe mambaformer calibrate --router runs/mambaformer/pubmedqa/router --latency-budget 300
    """
    from medmoe.mambaformer.checkpoint import RouterCheckpoint
    from medmoe.mambaformer.experiments.pipeline import PipelineConfig, cached_table
    from medmoe.mambaformer.fit import recalibrate

    checkpoint = RouterCheckpoint.load(router)
    records, table = cached_table(PipelineConfig(**checkpoint.info["config"]), "dev")
    result = recalibrate(router, table, records, latency_budget)
    console.print(f"tau = {result.tau:.4f}: dev accuracy {result.metrics.accuracy:.3f}, p50 {result.metrics.p50_ms:.0f} ms, "
                  f"share to E_M {result.metrics.share_mamba:.2f}  -> {router}")
    console.print(json.dumps(result.to_dict()["metrics"]))


def register(app: typer.Typer) -> None:
    """`run` and `ask` at the top level, and the `mambaformer` group."""
    from medmoe.cli.distill import DISTILL_FLAGS, distill_command, distill_task_command
    from medmoe.cli.finetune import EXPERT_FLAGS, expert_command
    from medmoe.cli.gate import gate_app

    group = typer.Typer(
        help="MambaFormer: route each question to a Transformer or a Mamba expert (docs/mambaformer.md).\n\n"
             "Example: medmoe mambaformer run --data pubmedqa",
        no_args_is_help=True)
    for target in (app, group):
        target.command("run", cls=renamed_flags(RUN_FLAGS))(run)
        target.command("ask")(ask)
    group.command("distill", cls=renamed_flags(DISTILL_FLAGS))(distill_command)
    group.command("distill-task")(distill_task_command)
    group.command("expert", cls=renamed_flags(EXPERT_FLAGS))(expert_command)
    group.command("profile")(profile)
    group.command("calibrate")(calibrate)
    group.add_typer(gate_app, name="gate")
    app.add_typer(group, name="mambaformer", rich_help_panel="Methods")
