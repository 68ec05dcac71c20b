"""`medmoe eval`: a model (or the routed MambaFormer system) on several medical benchmarks, with
per-example JSONL, intervals and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from medmoe.cli.placement import device_option, dtype_option

console = Console()
err_console = Console(stderr=True)
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_DTYPE = "float32"  # not auto: the scores of a folder, and of a rerun, do not change with the machine's CPU
DEFAULT_DEVICE = "auto"
EVAL_DTYPE_HELP = ("The model's dtype: float32 (the default, as before this flag), bfloat16, float16 or auto (bfloat16 on "
                   "a CUDA GPU that has it and on CPUs with AVX512-BF16 or AMX, else float32); a Mamba hybrid on CPU stays "
                   "float32. Recorded in run.json and summary.json; a resumed run must use the same. Not with --router/--head "
                   "(they load what they were calibrated or fitted with).")
EVAL_DEVICE_HELP = ("torch device: auto (the default: cuda when torch sees a GPU, else cpu), cpu, cuda, cuda:N or mps. "
                    "Recorded in run.json and summary.json; a resumed run must use the same. Not with --router/--head.")


def eval_command(
    model: str | None = typer.Option(None, help=f"Bundled short name, Hugging Face hub id or local path (the base model when --adapter is given; default: the base the adapter names, else {DEFAULT_MODEL})."),
    benchmarks: str = typer.Option(
        "pubmedqa", help="Comma-separated: pubmedqa, medmcqa, dental, cmmlu-med, cmexam, cmb-clin, cmb-exam:PATH, or file paths."
    ),
    shots: int = typer.Option(0, min=0, help="Few-shot examples per question (from train/dev splits only)."),
    rule: str = typer.Option("letter", help="Scoring rule: letter, loglik, loglik-norm or generate (docs/evaluation.md)."),
    limit: int | None = typer.Option(None, min=1, help="Fixed subsample of at most N examples per benchmark (sha256 order of ids)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Results folder (default: runs/eval-MODEL-RULE-Kshot; with --router DIR: runs/eval-routed-PARENT-NAME of DIR)."),
    adapter: str | None = typer.Option(None, help="A `medmoe finetune` output folder or its hub id: LoRA-MoE adapter, PEFT LoRA adapter, or full model."),
    batch_size: int = typer.Option(1, min=1, help="Examples per forward pass for single-token rules (latency is then amortized)."),
    max_new_tokens: int = typer.Option(32, min=1, help="Generation length for --rule generate."),
    shots_from: str | None = typer.Option(None, help="Few-shot pool for cmb-exam:PATH and user files (a dataset file)."),
    threads: int | None = typer.Option(None, min=1, help="torch CPU threads (default: all cores)."),
    router: Path | None = typer.Option(None, help="Evaluate the routed MambaFormer system instead of one model: the gate checkpoint folder written by `medmoe run` (it names its two experts). Not with --model/--adapter."),
    head: Path | None = typer.Option(None, help="Evaluate an expert through its output head or calibration: a folder written by `medmoe heads train` (it names its expert; rows also carry the expert's own zero-shot answer). Not with --model/--adapter/--router."),
    dtype: str | None = dtype_option(None, help=EVAL_DTYPE_HELP),
    device: str | None = device_option(None, help=EVAL_DEVICE_HELP),
) -> None:
    """Evaluate a model, or the routed MambaFormer system (--router), on medical benchmarks.

    Writes per-example predictions, summary.json, report.md and a plot.

    Interrupted runs resume: run the same command again.

    Example: medmoe eval --model smollm2-135m --benchmarks pubmedqa,dental --limit 100 -o runs/eval-smollm2
    """
    import torch

    from medmoe.eval.benchmarks import load_benchmark
    from medmoe.eval.harness import evaluate, truncation_warnings
    from medmoe.eval.model import load_eval_model
    from medmoe.eval.rules import check_rule

    try:
        check_rule(rule)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--rule") from None
    if router is not None:
        check_router_options(model, adapter, rule, shots)
    if head is not None and (router is not None or model is not None or adapter is not None or rule != "letter" or shots):
        raise typer.BadParameter("--head names its expert and answers from the zero-shot letter prompt: "
                                 "no --model/--adapter/--router, --rule letter, --shots 0", param_hint="--head")
    if router is not None or head is not None:
        check_placement_options(dtype, device, "--router" if router is not None else "--head")
    if threads:
        torch.set_num_threads(threads)
    names = [b.strip() for b in benchmarks.split(",") if b.strip()]
    for name in names:  # bad data (duplicate ids, bad rows) fails now, not after a model load of minutes
        load_benchmark(name, limit, shots_from)
    lm: Any  # an EvalModel, or a system that apply_rule asks through score_records (head, router)
    if head is not None:
        from medmoe.heads.answerer import HeadAnswerer

        folder = output or Path("runs") / f"eval-head-{head.resolve().name}"
        with console.status(f"loading the head {head} and its expert..."):
            lm = HeadAnswerer.load(head)
        settings = {"head": str(head.resolve()), "expert": lm.config.base, "head_kind": lm.config.kind}
    elif router is not None:
        from medmoe.mambaformer.answerer import RoutedAnswerer

        folder = output or Path("runs") / f"eval-routed-{router.resolve().parent.name}-{router.name}"
        with console.status(f"loading the gate {router} and its experts..."):
            lm = RoutedAnswerer.load(router)  # not an EvalModel: apply_rule asks it through score_records
        settings = {"router": str(router.resolve()), "tau": lm.checkpoint.tau,
                    "experts": {name: e.source for name, e in lm.experts.items()}}
    else:
        if model is None and adapter is not None:  # the base the adapter names (adapter_config.json)
            from medmoe.models.adapters import adapter_base, resolve_adapter

            model = adapter_base(resolve_adapter(adapter)) or None
        model = model or DEFAULT_MODEL
        folder = output or Path("runs") / f"eval-{Path(model).name}-{rule}-{shots}shot"
        with console.status(f"loading {model}..."):
            lm = load_eval_model(model, adapter, dtype or DEFAULT_DTYPE, device or DEFAULT_DEVICE)
        settings = {"adapter": adapter, **lm.placement}  # the resolved dtype and device: a resumed run must match
    result = evaluate(lm, names, folder, rule, shots, limit, batch_size, max_new_tokens, shots_from, settings=settings)
    console.print((folder / "report.md").read_text(encoding="utf-8"))
    for line in truncation_warnings(result["benchmarks"]):  # also in report.md; on stderr for logs and scripts
        err_console.print(f"[yellow]warning:[/] {line}", highlight=False, soft_wrap=True)
    console.print(f"results: {folder} (summary.json, report.md, results.png, <benchmark>/predictions.jsonl)")
    del result


def check_router_options(model: str | None, adapter: str | None, rule: str, shots: int) -> None:
    """--router names the whole system: no --model/--adapter, and the experts' pipeline scoring only."""
    from medmoe.mambaformer.answerer import RULE

    if model is not None or adapter is not None:
        raise typer.BadParameter("--router evaluates the routed system, whose gate folder names both experts; "
                                 "give either --router or --model/--adapter, not both", param_hint="--router")
    if rule != RULE or shots:
        raise typer.BadParameter(f"the routed system is scored as its experts were when the gate was trained: "
                                 f"--rule {RULE}, --shots 0 (got --rule {rule}, --shots {shots})", param_hint="--router")


def check_placement_options(dtype: str | None, device: str | None, system: str) -> None:
    """--router and --head load their models as they were calibrated or fitted (router.json, the head's
    dtype): a --dtype/--device there would score a system other than the one whose threshold or head was chosen."""
    given = [flag for flag, value in (("--dtype", dtype), ("--device", device)) if value is not None]
    if given:
        what = ("loads each expert in the dtype its router was calibrated with (router.json)" if system == "--router"
                else "loads its expert in the dtype its features were computed in (medmoe_head.json)")
        raise typer.BadParameter(f"{system} {what}; {' and '.join(given)} apply to --model/--adapter only",
                                 param_hint=given[0])


def export_lm_eval_task(
    benchmark: str = typer.Argument(..., help="Benchmark name (option questions), cmb-exam:PATH or a file."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for <task>.jsonl and <task>.yaml (lm-eval --include_path)."),
    model: str = typer.Option("smollm2-135m", help="Model whose tokenizer decides the prompt style (plain prompts only)."),
    rule: str = typer.Option("loglik", help="loglik (options as text) or letter (options as letters)."),
    limit: int | None = typer.Option(None, min=1, help="Fixed subsample of at most N examples."),
) -> None:
    """Write a local lm-evaluation-harness task with medmoe's prompts, to compare with lm-eval.

    Then: medmoe-lm-eval --model medmoe --model_args model=MODEL --tasks TASK --include_path OUTPUT
    (or lm-eval's own --model hf). Chat-template prompts cannot be exported (lm-eval joins prompt and
    option with a space); models with a chat template are exported in the plain style.

    Example: medmoe export-lm-eval dental -o runs/lm-eval-tasks --limit 200
    """
    from medmoe.eval.lmeval import export_task
    from medmoe.eval.rules import CONTINUATIONS
    from medmoe.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    tokenizer.chat_template = None
    task = export_task(benchmark, output, tokenizer, CONTINUATIONS[rule], limit)
    console.print(f"task {task}: {output / (task + '.yaml')}")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.command("export-lm-eval")(export_lm_eval_task)
