"""`medmoe mambaformer distill`: build a Mamba expert from a Transformer and distil it on bundled medical text."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from medmoe.cli.config_file import ConfigOption

console = Console()
DISTILL_FLAGS = {"--teacher": "--model", "--out": "--output"}  # old -> new (medmoe.cli.deprecated)

SIZES = {"full": None, "shallow": 3}  # keep every layer, or every third (evenly spaced, first and last kept)


def _parse_layers(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        from medmoe.errors import MedmoeError

        raise MedmoeError(f"--keep-attention: expected comma-separated layer numbers like 7,15; got {text!r}") from err


def distill_command(
    output: Path = typer.Option(..., "--output", "-o", help="Run folder: checkpoints (ckpt-*/ + latest.json) go here."),
    model: str = typer.Option("smollm2-135m", "--model", help="The teacher: bundled short name, hub id or local folder (Llama family)."),
    size: str = typer.Option("shallow", help="'full' (every teacher layer) or 'shallow' (every third layer)."),
    num_layers: int = typer.Option(0, "--layers", help="Keep this many evenly spaced teacher layers (overrides --size)."),
    keep_attention: str = typer.Option("", help="Teacher layer numbers that keep attention, e.g. '14,29'."),
    minutes: float = typer.Option(15.0, help="Stop after this many minutes of training (a checkpoint is written)."),
    max_steps: int = typer.Option(100000, help="Stop after this many optimizer steps."),
    seq_len: int = typer.Option(256, help="Tokens per training block."),
    batch_size: int = typer.Option(4, help="Blocks per step."),
    lr: float = typer.Option(3e-4, help="AdamW learning rate."),
    train: str = typer.Option("all", help="'all' parameters, or 'mixers' only (the new Mamba layers)."),
    temperature: float = typer.Option(1.0, help="Softmax temperature of the KL loss."),
    save_every: int = typer.Option(25, help="Write a checkpoint every this many steps."),
    resume: bool = typer.Option(True, help="Continue from the last checkpoint in --output when there is one."),
    threads: int = typer.Option(0, help="torch intra-op threads (0: torch's default)."),
    seed: int = typer.Option(0, help="Seed for the block order."),
    config: ConfigOption = None,
) -> None:
    """Distil a Mamba hybrid from a Transformer (KL on logits) on training splits of the bundled medical text.

    Builds the student by transfer (docs/mamba.md): attention replaced by Mamba mixers initialised from
    its weights; embeddings, MLPs, norms and tokenizer copied. Interrupt at any time: rerunning the
    same command resumes from the last checkpoint.

    Example: medmoe mambaformer distill --model smollm2-135m --size shallow --minutes 30 -o runs/mamba-shallow
    """
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from medmoe.errors import MedmoeError
    from medmoe.mamba.distill import DistillConfig, distill, latest_checkpoint, medical_corpus, tokenize_blocks
    from medmoe.mamba.transfer import build_hybrid, evenly_spaced
    from medmoe.models import load_causal_lm

    if size not in SIZES:
        raise MedmoeError(f"--size must be one of {', '.join(SIZES)}, got {size!r}")
    if threads:
        torch.set_num_threads(threads)
    with console.status(f"loading teacher {model}..."):
        teacher_model, tokenizer = load_causal_lm(model)
    n_teacher = teacher_model.config.num_hidden_layers
    if num_layers:
        layers = evenly_spaced(n_teacher, num_layers)
    elif SIZES[size] is None:
        layers = list(range(n_teacher))
    else:
        layers = evenly_spaced(n_teacher, max(1, round(n_teacher / SIZES[size])))
    student, spec = build_hybrid(teacher_model, layers, _parse_layers(keep_attention), teacher_name=model)
    with console.status("tokenizing the training corpus (PubMedQA train contexts, Dental train explanations)..."):
        blocks = tokenize_blocks(medical_corpus(), tokenizer, seq_len)
    cfg = DistillConfig(seq_len=seq_len, batch_size=batch_size, lr=lr, temperature=temperature, train=train,
                        max_steps=max_steps, max_minutes=minutes, save_every=save_every, seed=seed)
    previous = latest_checkpoint(output) if resume else None
    console.print(f"student: {len(spec.layers)} of {n_teacher} teacher layers {spec.layers}; attention kept in "
                  f"{spec.attention_layers or 'none'}; corpus {blocks.numel():,} tokens in {len(blocks)} blocks"
                  + (f"; resuming from {previous}" if previous else ""))
    columns = [TextColumn("[bold]distill"), BarColumn(), TextColumn("step {task.fields[step]}"),
               TextColumn("KL {task.fields[kl]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
               TimeElapsedColumn(), TextColumn("/"), TimeRemainingColumn()]
    tokens_per_step = seq_len * batch_size
    with Progress(*columns, console=console) as progress:
        total_s = 60 * minutes
        task = progress.add_task("distill", total=total_s, kl=float("nan"), tps=0.0, step=0)
        steps_seen = {"first": 0}  # 0: no step seen yet

        def on_step(step: int, kl: float, elapsed: float) -> None:
            steps_seen["first"] = steps_seen["first"] or step
            done = step - steps_seen["first"] + 1
            progress.update(task, completed=min(elapsed, total_s), kl=kl, step=step,
                            tps=done * tokens_per_step / max(elapsed, 1e-9))
        result = distill(teacher_model, student, spec, blocks, output, cfg, tokenizer=tokenizer, resume=resume,
                         on_step=on_step)
    last = result["history"][-1]["kl"] if result["history"] else float("nan")
    console.print(f"[green]done[/]: step {result['step']}, KL {last:.4f}; checkpoint {result['checkpoint']} "
                  f"(load with medmoe.mamba.transfer.load_hybrid)")

