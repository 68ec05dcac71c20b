"""`medmoe mambaformer distill`: build a Mamba expert from a Transformer and distil it on bundled medical text;
`medmoe mambaformer distill-task`: distil it further on a task's prompts (medmoe.train.task_distill)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from medmoe.cli.config_file import ConfigOption
from medmoe.cli.placement import device_option, dtype_option

console = Console()
DISTILL_FLAGS = {"--teacher": "--model", "--out": "--output"}  # old -> new (medmoe.cli.deprecated)

DISTILL_DTYPE_HELP = ("Autocast of the teacher's forward: float32 (the default: none), bfloat16, float16 or auto "
                      "(bfloat16 on a CUDA GPU that has it and on CPUs with AVX512-BF16 or AMX, else float32). The student "
                      "always trains in float32: on CPU the Mamba hybrid's fused scan kernel is float32-only.")
DISTILL_DEVICE_HELP = ("torch device of teacher and student: auto (the default: cuda when torch sees a GPU, else cpu), "
                       "cpu, cuda, cuda:N or mps.")
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
    dtype: str = dtype_option("float32", help=DISTILL_DTYPE_HELP),
    device: str = device_option("auto", help=DISTILL_DEVICE_HELP),
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
    from medmoe.models.placement import resolve_device, resolve_dtype

    if size not in SIZES:
        raise MedmoeError(f"--size must be one of {', '.join(SIZES)}, got {size!r}")
    device = resolve_device(device)  # before the teacher loads: a missing GPU fails now
    dtype = resolve_dtype(dtype, device)
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
                        max_steps=max_steps, max_minutes=minutes, save_every=save_every, seed=seed,
                        device=device, dtype=dtype)
    previous = latest_checkpoint(output) if resume else None
    console.print(f"student: {len(spec.layers)} of {n_teacher} teacher layers {spec.layers}; attention kept in "
                  f"{spec.attention_layers or 'none'}; on {device}, teacher autocast {dtype}; corpus {blocks.numel():,} tokens in {len(blocks)} blocks"
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



def distill_task_command(
    output: Path = typer.Option(..., "--output", "-o", help="Run folder: ckpt-*/ + latest.json (load it as E_M: `medmoe run --mamba OUTPUT`), log.jsonl, task_distill.json, teacher_cache/."),
    data: str = typer.Option("pubmedqa", "--data", help="Bundled benchmark whose training pool gives the prompts (pubmedqa, dental, medmcqa, cmexam, cmmlu-med); never its test split."),
    model: str | None = typer.Option(None, "--model", help="The teacher E_T: bundled short name, hub id or local folder (Llama family; default smollm2-135m, or the --head's expert)."),
    head: Path | None = typer.Option(None, "--head", help="E_T's option head (`medmoe heads train`): its probabilities are the answer distribution p_T the student learns."),
    student: Path | None = typer.Option(None, "--student", help="The student E_M: a hybrid folder or a `mambaformer distill` run (default: the default Mamba expert under $MEDMOE_HOME/experts)."),
    minutes: float = typer.Option(10.0, help="Training budget of the whole run in minutes, across resumes (evaluation and checkpoint writes not counted)."),
    max_steps: int = typer.Option(100000, help="Stop at this many optimizer steps."),
    alpha: float = typer.Option(1.0, help="Weight of KL(p_T || p_M) over the options at the answer position.", rich_help_panel="Loss"),
    gamma: float = typer.Option(0.0, help="Weight of the prompt-token KL over the teacher's top --top-k tokens per position (0 = off).", rich_help_panel="Loss"),
    delta: float = typer.Option(1.0, help="Weight of the layer-wise alignment: each Mamba mixer vs the teacher attention it replaced, on the teacher's input (0 = off: no activations cached).", rich_help_panel="Loss"),
    top_k: int = typer.Option(64, help="Teacher tokens per prompt position cached for --gamma.", rich_help_panel="Loss"),
    align_only_minutes: float = typer.Option(0.0, help="First train the alignment term alone (the mixers only) for this many minutes.", rich_help_panel="Loss"),
    align_only_steps: int = typer.Option(0, help="... and at least this many steps (the phase ends when both are reached).", rich_help_panel="Loss"),
    batch_size: int = typer.Option(4, help="Prompts per optimizer step (gradients accumulated one prompt at a time)."),
    lr: float = typer.Option(1e-4, help="AdamW learning rate, constant after --warmup-steps."),
    warmup_steps: int = typer.Option(10, help="Linear warm-up steps."),
    train: str = typer.Option("all", help="'all' parameters, or 'mixers' only (the Mamba layers)."),
    skip_first: int = typer.Option(150, help="Leave out the first N train records, kept for the MambaFormer gate (as `mambaformer expert --skip-first`)."),
    limit: int = typer.Option(0, help="At most this many training prompts (0 = all)."),
    heldout_limit: int = typer.Option(100, help="Held-out prompts (the task's dev split) evaluated every --eval-every steps (0 = all)."),
    eval_every: int = typer.Option(25, help="Evaluate E_M/E_T agreement and accuracy on the held-out prompts every N steps."),
    save_every: int = typer.Option(25, help="Write a checkpoint every N steps."),
    cache: Path | None = typer.Option(None, help="Teacher cache folder (default OUTPUT/teacher_cache); one of other settings is refused."),
    cache_dtype: str = typer.Option("float16", help="Storage of the cached activations: float16, bfloat16 or float32."),
    resume: bool = typer.Option(True, help="Continue the run in --output (same settings; a larger budget is fine); --no-resume refuses a used folder."),
    threads: int = typer.Option(0, help="torch intra-op threads (0: torch's default)."),
    seed: int = typer.Option(0, help="Seed of the prompt order."),
    config: ConfigOption = None,
) -> None:
    """Task-level distillation: the Mamba expert learns E_T's answers on the task's own prompts.

    On the zero-shot letter prompts of the task's training pool (the gate's records and the dev split
    left out; dev is the held-out set), the student learns alpha * KL of the teacher's answer distribution
    (its option head's, with --head) + gamma * prompt-token KL + delta * alignment of each Mamba mixer
    with the attention block it replaced (docs/mamba.md). The teacher runs once per prompt (cached on
    disk); each step then costs only the student. Rerunning the command resumes; a larger --minutes
    continues the same run.

    Example: medmoe mambaformer distill-task --data pubmedqa --student runs/mamba-shallow --minutes 10 -o runs/em-task-pubmedqa
    """
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from medmoe.cli.mambaformer import default_mamba_expert
    from medmoe.errors import MedmoeError
    from medmoe.mambaformer.experiments.task_distill import load_teacher
    from medmoe.train.task_distill import TaskDistillConfig, run_task_distill, task_records

    if threads:
        torch.set_num_threads(threads)
    cfg = TaskDistillConfig(alpha=alpha, gamma=gamma, delta=delta, top_k=top_k, cache_dtype=cache_dtype, lr=lr,
                            warmup_steps=warmup_steps, batch_size=batch_size, train=train,
                            align_only_minutes=align_only_minutes, align_only_steps=align_only_steps, seed=seed,
                            minutes=minutes, max_steps=max_steps, eval_every=eval_every, save_every=save_every)
    student_path = student or default_mamba_expert()
    if not student_path.exists():
        raise MedmoeError(f"--student {student_path}: does not exist; build a Mamba expert first "
                          "(`medmoe mambaformer distill -o DIR`) and pass it as --student")
    with console.status(f"loading the teacher {model or ''}{' with head ' + str(head) if head else ''}..."):
        teacher = load_teacher(model, head)
    with console.status(f"collecting the {data} prompts..."):
        records = task_records(data, skip_first=skip_first, limit=limit, heldout_limit=heldout_limit)
    console.print(f"teacher {teacher.source}{' + head ' + str(head) if head else ''}; student {student_path}; {data}: "
                  f"{len(records.train)} training prompts, {len(records.heldout)} held out ({records.notes['heldout']}), "
                  f"first {skip_first} train records left out for the gate")
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console) as progress:
        cache_task = progress.add_task("teacher cache", total=len(records.records), info="")
        train_task = progress.add_task("distill-task", total=60 * minutes, info="", visible=False)

        def on_cache(done: int, total: int) -> None:
            progress.update(cache_task, completed=done, info=f"{done}/{total} prompts")

        def on_step(step: int, terms: dict[str, float], seconds: float) -> None:
            shown = " ".join(f"{k} {v:.4f}" for k, v in terms.items())
            progress.update(train_task, visible=True, completed=min(seconds, 60 * minutes), info=f"step {step} {shown}")

        def on_eval(step: int, metrics: dict) -> None:
            progress.console.print(f"step {step} ({metrics['minutes']:.2f} min): held-out agreement with E_T "
                                   f"{metrics['agreement']:.3f}, accuracy E_M {metrics['accuracy']:.3f} / E_T "
                                   f"{metrics['teacher_accuracy']:.3f}, answer KL {metrics['answer_kl']:.4f}, answers {metrics['answers']}")

        result = run_task_distill(teacher, student_path, records, output, cfg, cache_folder=cache, resume=resume,
                                  on_cache=on_cache, on_step=on_step, on_eval=on_eval)
        progress.update(cache_task, completed=len(records.records))
    built = result["cache"]
    console.print(f"teacher cache {built.folder}: {len(built)} prompts, activations of teacher layers {built.layers or 'none'}, "
                  f"{built.bytes / 1e9:.2f} GB, built in {built.manifest['build_seconds'] / 60:.1f} min")
    console.print(f"[green]done[/]: step {result['step']}, {result['minutes']:.2f} training minutes; checkpoint "
                  f"{result['checkpoint']}. Use it as E_M: medmoe run --data {data} --mamba {output}")
