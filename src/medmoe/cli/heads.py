"""`medmoe heads train`: an expert's target-specific output head (or calibration) for a benchmark."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console()
heads_app = typer.Typer(help="Target-specific output heads and calibrations on an expert's cached features (docs/heads.md).\n\nExample: medmoe heads train --data pubmedqa -o runs/heads/pubmedqa",
                        no_args_is_help=True)
FAMILY_CHOICES = ("best", "zero-shot", "calibrated", "head", "head+retrieval")


@heads_app.command("train")
def train_command(
    data: str = typer.Option(..., help="The benchmark whose training pool the head learns from (pubmedqa, dental, cmexam, cmmlu-med); never its test split."),
    model: str = typer.Option("smollm2-135m", help="The expert: bundled short name, Hugging Face hub id or local path."),
    adapter: str | None = typer.Option(None, help="A `medmoe finetune` adapter on the expert (LoRA-MoE, PEFT LoRA)."),
    output: Path = typer.Option(..., "--output", "-o", help="The head folder to write (medmoe_head.json + head.safetensors)."),
    family: str = typer.Option("best", help="best (the highest cross-validated accuracy), zero-shot, calibrated (per-option bias or contextual calibration), head (a linear head on hidden states) or head+retrieval (with --retrieval)."),
    retrieval: bool = typer.Option(False, help="Also train a head with kNN features of the nearest training questions (MiniLM for English, multilingual-e5 for Chinese; the pool is embedded once and cached)."),
    dtype: str = typer.Option("bfloat16", help="The expert's dtype for its forward passes: float32 or bfloat16 (about 1.8x faster on CPUs with AVX512-BF16)."),
    device: str = typer.Option("cpu", help="torch device for the expert (cpu, cuda, cuda:1, mps)."),
    threads: int | None = typer.Option(None, min=1, help="torch CPU threads (default: all cores)."),
) -> None:
    """Train a head for an expert on a benchmark's training pool, chosen by 5-fold cross-validation.

    The expert reads each training question once (features cached under $MEDMOE_HOME/features/, so a
    second run takes seconds); then every candidate (zero-shot, per-option bias, contextual
    calibration, linear heads per layer, pooling and weight decay) is scored on held-out folds and the
    best is refitted on the whole pool.

    Example: medmoe heads train --data pubmedqa --model smollm2-135m -o runs/heads/pubmedqa
    Then:    medmoe eval --head runs/heads/pubmedqa --benchmarks pubmedqa
    """
    import torch

    from medmoe.data.pools import training_pool
    from medmoe.eval.model import HFEvalModel
    from medmoe.heads.train import RETRIEVAL_FEATURES, retrieval_extra, train_heads
    from medmoe.models import load_causal_lm
    from medmoe.models.head import save_head

    if family not in FAMILY_CHOICES:
        raise typer.BadParameter(f"one of {', '.join(FAMILY_CHOICES)}", param_hint="--family")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise typer.BadParameter("float32, bfloat16 or float16", param_hint="--dtype")
    if threads:
        torch.set_num_threads(threads)
    pool = training_pool(data)
    with console.status(f"loading {model}..."):
        network, tokenizer = load_causal_lm(model, dtype=getattr(torch, dtype), device=device, adapter=adapter)
    lm = HFEvalModel(network, tokenizer, model, share_prefix=False)
    extra, settings = retrieval_extra(data, pool) if retrieval else (None, None)
    if family == "head+retrieval" and not retrieval:
        raise typer.BadParameter("head+retrieval needs --retrieval", param_hint="--family")
    trained, candidates = train_heads(lm, model, data, pool, extra=extra, extra_names=RETRIEVAL_FEATURES,
                                      retrieval=settings, adapter=adapter)
    if family == "best":
        family = max(trained, key=lambda f: (trained[f].candidate.accuracy, -list(trained).index(f)))
    chosen = trained[family]
    table = Table("candidate", "CV accuracy", title=f"{data}: {len(pool)} training questions, 5-fold CV")
    for c in sorted(candidates, key=lambda c: -c.accuracy)[:12]:
        table.add_row(c.name, f"{c.accuracy:.3f}")
    console.print(table)
    save_head(chosen.head, chosen.config, output)
    console.print(f"{family}: {chosen.candidate.name} (CV accuracy {chosen.candidate.accuracy:.3f}) -> {output}")


def register(app: typer.Typer) -> None:
    app.add_typer(heads_app, name="heads")
