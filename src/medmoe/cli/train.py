"""`medmoe train expert|router`: the two training steps of MambaFormer.

    medmoe train expert --source smollm2-135m --dataset pubmedqa -o runs/et-pubmedqa
    medmoe train expert --source ~/.medmoe/experts/mamba-shallow --dataset pubmedqa -o runs/em-pubmedqa
    medmoe run --datasets pubmedqa --transformer runs/et-pubmedqa/model --mamba runs/em-pubmedqa/model

`train expert` is full fine-tuning on the task through the same loop as `medmoe finetune` (progress,
atomic checkpoints, exact resume) with defaults for experts; `train router` is `medmoe router train`.
"""

from __future__ import annotations

import math
from pathlib import Path

import typer

train_app = typer.Typer(help="Train MambaFormer's parts: task fine-tuning of an expert, or the gate.", no_args_is_help=True)


@train_app.command("expert")
def train_expert(
    source: str = typer.Option(..., "--source", help="The expert: bundled name, hub id, local folder, or a Mamba hybrid (a `medmoe distill` run)."),
    dataset: str = typer.Option("pubmedqa", help="Bundled dataset whose train split teaches the task (answers as the evaluation scores them)."),
    output: Path = typer.Option(..., "--output", "-o", help="Run folder; the fine-tuned expert is written to OUTPUT/model."),
    gate_holdout: int = typer.Option(150, help="Leave the first N train records out: the gate learns from the experts' outcomes on them (`medmoe run --train-limit` <= N)."),
    epochs: float = typer.Option(1.0, help="Passes over the remaining train records."),
    lr: float = typer.Option(3e-5, help="Peak learning rate (linear warm-up, cosine decay to 10%)."),
    batch_size: int = typer.Option(4, help="Examples per micro-batch."),
    grad_accum: int = typer.Option(2, help="Micro-batches per optimizer step."),
    max_length: int = typer.Option(512, help="Tokens per example (the prompt is truncated on the left)."),
    top_layers: int = typer.Option(1, help="Train only the last N decoder layers and the final norm (0 = every weight): the backward pass stops N layers deep."),
    freeze_mixers: bool = typer.Option(True, help="In those layers train the MLPs and norms only (attention / Mamba mixers frozen): much cheaper on CPU."),
    threads: int = typer.Option(0, help="torch threads (0 = torch default)."),
    resume: bool = typer.Option(True, help="Resume from the newest checkpoint in OUTPUT, if any (the same settings only); --no-resume refuses a folder that already holds a run (nothing is deleted)."),
    seed: int = typer.Option(0),
) -> None:
    """Fine-tune one expert (its top layers, or every weight) on DATASET's train split, minus the gate's records."""
    import torch

    from medmoe.cli.finetune import outcome_line
    from medmoe.models import load_causal_lm
    from medmoe.train.data import load_examples, select_examples
    from medmoe.train.finetune import FinetuneConfig, finetune

    if threads > 0:
        torch.set_num_threads(threads)
    model, tokenizer = load_causal_lm(source)
    examples = select_examples(load_examples(dataset, tokenizer), gate_holdout)
    eval_examples = min(32, len(examples) // 5)
    steps = max(1, math.ceil((len(examples) - eval_examples) * epochs / (batch_size * grad_accum)))
    cfg = FinetuneConfig(
        method="full", base=source, output=str(output), steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
        warmup_steps=max(1, steps // 10), max_length=max_length, seed=seed, eval_every=max(1, steps // 4),
        eval_examples=eval_examples, save_every=max(1, steps // 4), resume=resume, data=dataset, skip_first=gate_holdout,
        top_layers=top_layers, freeze_mixers=freeze_mixers,
    )
    typer.echo(f"fine-tuning {source} on {len(examples) - eval_examples} {dataset} train records "
               f"(first {gate_holdout} kept for the gate, {eval_examples} for held-out loss): {steps} steps")
    result = finetune(cfg, model, tokenizer, train_examples=examples)
    if not result["losses"]:
        typer.echo(outcome_line(result, cfg.steps))
    else:
        typer.echo(f"done: held-out loss {result['eval']}; expert saved to {result['adapter']}")


def register(app: typer.Typer) -> None:
    from medmoe.cli.router import train_router

    train_app.command("router", help="The same as `medmoe router train`.")(train_router)
    app.add_typer(train_app, name="train")
