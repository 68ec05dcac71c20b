"""`medmoe finetune` (also `medmoe loramoe finetune`): LoRA-MoE (SparseDoctor), plain LoRA (PEFT) or full
fine-tuning of a causal LM; `medmoe mambaformer expert`, the same command preset for a MambaFormer expert;
`medmoe loramoe routing`, the routing analytics of a LoRA-MoE adapter.

    medmoe finetune --model smollm2-135m --method loramoe --data pubmedqa -o runs/pubmedqa-moe
    medmoe finetune --config recipes/finetune_loramoe_pubmedqa.yaml --steps 20     # flags override the file
    medmoe eval --model smollm2-135m --adapter runs/pubmedqa-moe/adapter --benchmarks pubmedqa
    torchrun --nproc-per-node 2 -m medmoe finetune ...      # data parallel (gloo on CPU, nccl on GPU)
    accelerate launch --config_file recipes/accelerate/ddp.yaml -m medmoe finetune ...   # the same through accelerate
    medmoe finetune --device cuda --dtype bf16 --gradient-checkpointing ...   # bf16 autocast, fp32 weights
    medmoe loramoe routing --adapter runs/pubmedqa-moe/adapter --data pubmedqa,dental -o reports/routing_en
    medmoe mambaformer expert --model smollm2-135m --data pubmedqa -o runs/et-pubmedqa

Both training commands go through `run_finetune`; the options they share are defined once below
(`Data`, `Model`, ...), each command giving its own defaults.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from medmoe.cli.config_file import ConfigOption
from medmoe.cli.deprecated import renamed_flags
from medmoe.cli.placement import device_option, dtype_option

# Old flag -> new flag, accepted with a notice for one release (medmoe.cli.deprecated).
FINETUNE_FLAGS = {"--base": "--model", "--router": "--loramoe-router", "--router-dim": "--loramoe-router-dim"}
EXPERT_FLAGS = {"--source": "--model", "--dataset": "--data", "--gate-holdout": "--skip-first"}
ROUTING_FLAGS = {"--base": "--model", "--out": "--output"}

SCHEDULE, LORAMOE, LORA, FULL = "Schedule and evaluation", "LoRA-MoE (--method loramoe)", "LoRA (--method lora)", "Full fine-tuning (--method full)"
TOP_BLOCKS = "Top blocks over cached activations (--method lora, loramoe)"

# ---- options shared by `finetune` and `mambaformer expert` (each command sets its own default) ----
Data = Annotated[str, typer.Option("--data", help="Bundled dataset name (its train split) or a JSONL/JSON/CSV file.")]
Model = Annotated[str, typer.Option("--model", help="Base model: bundled name, hub id, local folder, or a Mamba hybrid (a `medmoe mambaformer distill` run).")]
Output = Annotated[Path, typer.Option("--output", "-o", help="Run folder: checkpoints, train_log.jsonl, and adapter/ (model/ for --method full).")]
Epochs = Annotated[float, typer.Option(help="Passes over the training examples; sets the number of steps (in `finetune`, 0 = use --steps).", rich_help_panel=SCHEDULE)]
BatchSize = Annotated[int, typer.Option(help="Examples per micro-batch (per process).", rich_help_panel=SCHEDULE)]
GradAccum = Annotated[int, typer.Option(help="Micro-batches per optimizer step.", rich_help_panel=SCHEDULE)]
Lr = Annotated[float, typer.Option(help="Peak learning rate (linear warm-up, cosine decay to 10%).", rich_help_panel=SCHEDULE)]
MaxLength = Annotated[int, typer.Option(help="Tokens per example (the prompt is truncated on the left).")]
SkipFirst = Annotated[int, typer.Option(help="Leave out the first N training examples, kept for the MambaFormer gate: it learns from the experts' outcomes on them (`medmoe run --train-limit` at most N).")]
TopLayers = Annotated[int, typer.Option(help="Train only the last N decoder layers' weights and the final norm (0 = every weight): the backward pass stops N layers deep, the forward still runs every layer at every step (for adapters on the last N blocks over cached activations: --top-blocks).", rich_help_panel=FULL)]
FreezeMixers = Annotated[bool, typer.Option(help="With --top-layers: train the MLPs and norms only (attention / Mamba mixers frozen); much cheaper on CPU.", rich_help_panel=FULL)]
Threads = Annotated[int, typer.Option(help="torch threads (0 = torch default).")]
Resume = Annotated[bool, typer.Option(help="Resume from the newest checkpoint in --output, if any (the same settings only); --no-resume refuses a folder that already holds a run (nothing is deleted).")]
Seed = Annotated[int, typer.Option(help="Seed of the adapter's initialisation and the data order.")]
TRAINING_DEVICE_HELP = ("torch device: auto (cuda when torch sees a GPU, else cpu), cpu, cuda, cuda:N or mps. Under torchrun / "
                        "accelerate launch each process takes cuda:LOCAL_RANK (give cuda or auto). A resume may change it.")
TRAINING_DTYPE_HELP = ("Mixed precision: the forward runs under torch.autocast in this dtype while every weight, the optimizer "
                       "and the gradients stay float32; float16 adds a gradient scaler. auto: bfloat16 on a CUDA GPU that has "
                       "it, float32 on CPU (bfloat16 autocast gained nothing in a CPU training step measured here, docs/loramoe.md, "
                       "and LoRA-MoE's sparse C++ kernel computes in float32 only). A setting of the run: a resume with another "
                       "dtype is refused.")


def finetune_command(
    data: Data,
    model: Model = "smollm2-135m",
    method: Annotated[str, typer.Option(help="loramoe | lora | full")] = "loramoe",
    output: Output = Path("runs/finetune"),
    steps: Annotated[int, typer.Option(help="Optimizer steps.", rich_help_panel=SCHEDULE)] = 100,
    epochs: Epochs = 0.0,
    batch_size: BatchSize = 4,
    grad_accum: GradAccum = 1,
    lr: Lr = 2e-4,
    warmup_steps: Annotated[int, typer.Option(help="Steps of linear warm-up.", rich_help_panel=SCHEDULE)] = 10,
    max_length: MaxLength = 256,
    limit: Annotated[int, typer.Option(help="Use only the first N training examples (0 = all); say so when reporting.")] = 0,
    skip_first: SkipFirst = 0,
    with_explanations: Annotated[bool, typer.Option("--with-explanations", help="Multiple-choice completions go on with the record's explanation (CMExam, MedMCQA), so the model keeps writing text, not only letters.")] = False,
    eval_every: Annotated[int, typer.Option(help="Evaluate held-out loss every N steps.", rich_help_panel=SCHEDULE)] = 50,
    eval_examples: Annotated[int, typer.Option(help="Training examples held out for periodic evaluation.", rich_help_panel=SCHEDULE)] = 64,
    save_every: Annotated[int, typer.Option(help="Write a checkpoint every N steps.", rich_help_panel=SCHEDULE)] = 50,
    resume: Resume = True,
    seed: Seed = 0,
    threads: Threads = 0,
    experts: Annotated[int, typer.Option(help="Experts E.", rich_help_panel=LORAMOE)] = 8,
    top_k: Annotated[int, typer.Option(help="Experts per token k.", rich_help_panel=LORAMOE)] = 2,
    rank: Annotated[int, typer.Option(help="Rank r of each expert.", rich_help_panel=LORAMOE)] = 8,
    alpha: Annotated[float, typer.Option(help="Alpha (scale alpha / r).", rich_help_panel=LORAMOE)] = 16.0,
    dropout: Annotated[float, typer.Option(help="LoRA / LoRA-MoE dropout on the adapter input.", rich_help_panel=LORAMOE)] = 0.0,
    loramoe_router: Annotated[str, typer.Option("--loramoe-router", help="The LoRA-MoE token router: prototype | linear.", rich_help_panel=LORAMOE)] = "prototype",
    loramoe_router_dim: Annotated[int, typer.Option("--loramoe-router-dim", help="Prototype router embedding width d_q.", rich_help_panel=LORAMOE)] = 16,
    contrastive: Annotated[str, typer.Option(help="Contrastive loss: prototype | expert_output | none.", rich_help_panel=LORAMOE)] = "prototype",
    contrastive_weight: Annotated[float, typer.Option(rich_help_panel=LORAMOE)] = 0.1,
    balance_weight: Annotated[float, typer.Option(rich_help_panel=LORAMOE)] = 0.01,
    z_weight: Annotated[float, typer.Option(rich_help_panel=LORAMOE)] = 0.001,
    queue_size: Annotated[int, typer.Option(help="Expert memory queue entries per layer (0 = in-batch negatives only).", rich_help_panel=LORAMOE)] = 1024,
    contrastive_tokens: Annotated[int, typer.Option(help="Anchors sampled per layer and step (0 = every token).", rich_help_panel=LORAMOE)] = 128,
    temperature: Annotated[float, typer.Option(rich_help_panel=LORAMOE)] = 0.1,
    compute: Annotated[str, typer.Option(help="Experts: auto (the sparse C++ kernel on CPU fp32, dense elsewhere) | sparse | dense.", rich_help_panel=LORAMOE)] = "auto",
    lora_rank: Annotated[int, typer.Option(help="Rank.", rich_help_panel=LORA)] = 16,
    target_modules: Annotated[str, typer.Option(help="Comma-separated module names, or all-linear (LoRA and LoRA-MoE).")] = "all-linear",
    top_layers: TopLayers = 0,
    freeze_mixers: FreezeMixers = False,
    top_blocks: Annotated[int, typer.Option(help="Adapters on the last N decoder blocks only, trained over cached activations of the frozen lower blocks: one forward of the lower blocks per example (stored in OUTPUT/top_blocks_cache, reused on resume, deleted when the run ends; --top-blocks-cache DIR keeps it elsewhere), then each step runs only the top N (0 = adapters on every block). Llama, SmolLM2, Qwen2/3, Gemma-3; not --top-layers, which trains the weights of the last N layers of --method full and runs every layer at every step.", rich_help_panel=TOP_BLOCKS)] = 0,
    top_blocks_cache_dtype: Annotated[str, typer.Option(help="With --top-blocks: the cache's dtype, model (the lower blocks' output as computed: training equals the full model's) | bfloat16 (half the disk for an fp32 model; the top blocks see the states rounded to bfloat16).", rich_help_panel=TOP_BLOCKS)] = "model",
    top_blocks_cache: Annotated[Path | None, typer.Option("--top-blocks-cache", help="With --top-blocks: the cache's folder (default OUTPUT/top_blocks_cache, deleted when the run ends). A folder given here is kept after the run, so runs at the same settings share one cache: e.g. --method loramoe, then --method lora with the same model, data, --max-length, --limit, --eval-examples, --seed and --top-blocks computes nothing (the cache's key, which checks it holds this run's states, does not depend on the adapters). A cache made otherwise is refused.", rich_help_panel=TOP_BLOCKS)] = None,
    report_to: Annotated[str, typer.Option("--report-to", help="Training logs besides train_log.jsonl, comma-separated: tensorboard (OUTPUT/tensorboard/; pip install 'medmoe\\[tensorboard]'), wandb. Default: $MEDMOE_REPORT_TO, else none.")] = "",
    device: str = device_option("auto", help=TRAINING_DEVICE_HELP),
    dtype: str = dtype_option("auto", help=TRAINING_DTYPE_HELP),
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute each decoder block's activations in backward instead of keeping them: less memory, one more forward per step, the same loss and gradients. A resume may turn it on or off.")] = False,
    fsdp: Annotated[bool, typer.Option("--fsdp", help="With several processes (torchrun, accelerate launch; on by itself under accelerate's FSDP config, recipes/accelerate/fsdp.yaml): shard the frozen base across the ranks (FSDP2, one unit per decoder block), so each holds about 1/N of it; the adapters stay whole, and the run computes what the data-parallel run does. --method lora and loramoe. A resume may turn it on or off.")] = False,
    config: ConfigOption = None,
) -> None:
    """Fine-tune a model on DATA with LoRA-MoE, plain LoRA or full fine-tuning; resumable.

    Rerun the same command to resume from the newest checkpoint. --config FILE.yaml gives any option
    (flags override the file; recipes/ has examples).

    Example: medmoe finetune --model smollm2-135m --method loramoe --data pubmedqa --steps 200 -o runs/pubmedqa-moe
    """
    if method != "full" and (top_layers or freeze_mixers):
        raise typer.BadParameter("--top-layers and --freeze-mixers are for --method full (for adapters on the last N blocks: "
                                 "--top-blocks N)", param_hint="--method")
    if method == "full" and top_blocks:
        raise typer.BadParameter("--top-blocks is for --method lora and loramoe; for --method full, --top-layers N trains the "
                                 "last N layers' weights", param_hint="--method")
    from medmoe.train.sharding import fsdp_requested

    targets = "all-linear" if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",") if t.strip()]
    loramoe = dict(num_experts=experts, top_k=top_k, rank=rank, alpha=alpha, dropout=dropout, router_kind=loramoe_router,
                   router_dim=loramoe_router_dim,
                   contrastive_kind=contrastive if loramoe_router == "prototype" or contrastive != "prototype" else "none",
                   contrastive_weight=contrastive_weight, balance_weight=balance_weight, z_loss_weight=z_weight,
                   queue_size=queue_size, contrastive_tokens=contrastive_tokens or None, temperature=temperature,
                   compute=compute)
    run_finetune(
        model, data, epochs=epochs, threads=threads, with_explanations=with_explanations,
        fields=dict(method=method, output=str(output), steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                    warmup_steps=warmup_steps, max_length=max_length, seed=seed, eval_every=eval_every,
                    eval_examples=eval_examples, save_every=save_every, resume=resume, skip_first=skip_first, limit=limit,
                    lora_rank=lora_rank, lora_dropout=dropout, target_modules=targets, loramoe=loramoe,
                    top_layers=top_layers, freeze_mixers=freeze_mixers, top_blocks=top_blocks,
                    top_blocks_cache_dtype=top_blocks_cache_dtype, top_blocks_cache=str(top_blocks_cache or ""),
                    report_to=report_to or None, device=device, dtype=dtype, gradient_checkpointing=gradient_checkpointing,
                    fsdp=fsdp_requested(fsdp)),
    )


def expert_command(
    model: Model,
    output: Output,
    data: Data = "pubmedqa",
    skip_first: SkipFirst = 150,
    epochs: Epochs = 1.0,
    lr: Lr = 3e-5,
    batch_size: BatchSize = 4,
    grad_accum: GradAccum = 2,
    max_length: MaxLength = 512,
    top_layers: TopLayers = 1,
    freeze_mixers: FreezeMixers = True,
    threads: Threads = 0,
    resume: Resume = True,
    seed: Seed = 0,
    device: str = device_option("auto", help=TRAINING_DEVICE_HELP),
    dtype: str = dtype_option("auto", help=TRAINING_DTYPE_HELP),
    config: ConfigOption = None,
) -> None:
    """Fine-tune one MambaFormer expert on DATA's train split minus the gate's records (`finetune --method full`, preset).

    The preset: every train record after the first --skip-first becomes the prompt the expert is scored on plus
    its gold answer; --epochs sets the steps; warm-up is a tenth of them, held-out loss and checkpoints every
    quarter (32 examples held out at most); by default only the last layer's MLPs and norms train. The
    expert is written to OUTPUT/model (a Mamba hybrid stays a hybrid).

    Example: medmoe mambaformer expert --model runs/mamba-shallow --data pubmedqa -o runs/em-pubmedqa
    """
    run_finetune(
        model, data, epochs=epochs, threads=threads, with_explanations=False, auto_schedule=True,
        fields=dict(method="full", output=str(output), batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                    max_length=max_length, seed=seed, resume=resume, skip_first=skip_first, top_layers=top_layers,
                    freeze_mixers=freeze_mixers, device=device, dtype=dtype),
    )


def run_finetune(model: str, data: str, *, fields: dict[str, Any], epochs: float, threads: int, with_explanations: bool,
                 auto_schedule: bool = False) -> dict:
    """The core of both commands: load, select the examples, size the schedule, train, print the outcome.

    `fields` are FinetuneConfig's. epochs > 0 sets the steps from the number of training examples;
    auto_schedule (the expert preset) also sets the warm-up (a tenth of the steps), evaluation and
    checkpoint intervals (a quarter) and the held-out examples (a fifth, 32 at most).
    """
    import torch

    from medmoe.models import load_causal_lm
    from medmoe.train.data import load_examples, select_examples
    from medmoe.train.distributed import init_from_env, launcher_note
    from medmoe.train.finetune import FinetuneConfig, finetune
    from medmoe.train.precision import training_device
    from medmoe.train.sharding import accelerate_fsdp_note

    cfg = FinetuneConfig(base=model, data=data, with_explanation=with_explanations, **fields)  # bad settings fail before loading
    if threads > 0:
        torch.set_num_threads(threads)
    rank_id, world = init_from_env(cfg.device)
    for note in (launcher_note(), accelerate_fsdp_note()):
        if note and rank_id == 0:
            typer.echo(f"warning: {note}", err=True)
    if cfg.fsdp and world == 1:
        typer.echo("warning: --fsdp with one process: nothing to shard the base with, training unsharded", err=True)
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "no") not in ("no", "") and rank_id == 0:
        typer.echo(f"warning: accelerate's mixed_precision={os.environ['ACCELERATE_MIXED_PRECISION']} is not read; "
                   f"medmoe finetune --dtype sets the precision (now {cfg.dtype})", err=True)
    lm, tokenizer = load_causal_lm(model, device=training_device(cfg.device, world))  # float32 weights: the master copy
    examples = select_examples(load_examples(data, tokenizer, with_explanation=with_explanations), cfg.skip_first, cfg.limit)
    if auto_schedule:
        cfg = dataclasses.replace(cfg, eval_examples=min(32, len(examples) // 5))
    held_out = cfg.eval_examples if 0 < cfg.eval_examples < len(examples) else 0  # as train.finetune.split_examples holds out
    if cfg.eval_examples > 0 and not held_out and rank_id == 0:
        typer.echo(f"warning: --eval-examples {cfg.eval_examples} is not below the {len(examples)} training examples: "
                   "none is held out, so there is no eval loss (give a smaller --eval-examples)", err=True)
    if epochs > 0:
        per_step = cfg.batch_size * cfg.grad_accum * world
        cfg = dataclasses.replace(cfg, steps=max(1, math.ceil((len(examples) - held_out) * epochs / per_step)))
    if auto_schedule:
        cfg = dataclasses.replace(cfg, warmup_steps=max(1, cfg.steps // 10), eval_every=max(1, cfg.steps // 4),
                                  save_every=max(1, cfg.steps // 4))
    if rank_id == 0:
        left_out = f" (first {cfg.skip_first} kept for the gate)" if cfg.skip_first else ""
        typer.echo(f"{cfg.method} fine-tuning of {model} on {len(examples) - held_out} examples from {data}{left_out}, "
                   f"{held_out} held out for the eval loss: {cfg.steps} steps; {world} process(es)")
    result = finetune(cfg, lm, tokenizer, train_examples=examples, rank=rank_id, world=world)
    if rank_id == 0:
        typer.echo(outcome_line(result, cfg.steps))
    return result


def outcome_line(result: dict, steps: int) -> str:
    """What a finetune() call did, in one line: trained, or found the run already finished."""
    if not result["losses"]:
        verb = "already finished" if result["already_finished"] else "finished"
        return f"{verb} at step {steps}; nothing to train; result in {result['adapter']}"
    last = max(result["losses"])
    held_out = f"; held-out loss {result['eval'][max(result['eval'])]:.4f}" if result.get("eval") else ""
    return f"done: step {last}, loss {result['losses'][last]:.4f}{held_out}; saved {result['adapter']}"


def routing_command(
    adapter: Path = typer.Option(..., "--adapter", help="A LoRA-MoE adapter folder (the adapter/ of a `medmoe finetune` run)."),
    model: str = typer.Option("smollm2-135m", "--model", help="The adapter's base model: bundled name, local folder or hub id."),
    data: str = typer.Option("pubmedqa,dental", "--data", help="Comma-separated bundled datasets or record files."),
    split: str = typer.Option("test", help="Split of the bundled datasets."),
    group_by: str = typer.Option("dataset", help="'dataset', or a metadata field such as 'subject' (CMMLU)."),
    per_group: int = typer.Option(50, help="Texts per group (0 = all)."),
    max_length: int = typer.Option(256, help="Tokens read per text."),
    output: Path = typer.Option(Path("runs/routing"), "--output", "-o", help="Writes OUTPUT.png (heatmaps) and OUTPUT.json (shares)."),
    threads: int = typer.Option(0, help="torch threads (0 = torch default)."),
) -> None:
    """Routing analytics of a LoRA-MoE adapter: expert load per layer and per-group specialisation (PNG + JSON).

    Which experts specialise on which group (dataset or subject): a PNG of both heatmaps and the numbers as JSON.

    Example: medmoe loramoe routing --adapter runs/pubmedqa-moe/adapter --data pubmedqa,dental -o reports/routing_en
    """
    import torch

    from medmoe.data import load_dataset
    from medmoe.errors import ModelError, require
    from medmoe.loramoe.analytics import plot_routing, record_groups, routing_profile
    from medmoe.models import load_causal_lm
    from medmoe.paths import atomic_write_json

    require("matplotlib", "plots", "routing analytics (the heatmaps)")  # before minutes of model loading
    if threads > 0:
        torch.set_num_threads(threads)
    from medmoe.loramoe.config import adapter_layout

    if adapter_layout(adapter) not in ("loramoe", "loramoe-legacy"):
        raise ModelError(f"{adapter}: no loramoe_config.json, nor an adapter_config.json with peft_type MEDMOE_LORAMOE; "
                         "routing analytics need a LoRA-MoE adapter folder")
    lm, tokenizer = load_causal_lm(model, adapter=adapter)
    datasets = {name.strip(): load_dataset(name.strip(), split=split) for name in data.split(",") if name.strip()}
    try:
        groups = record_groups(datasets, group_by, per_group)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--group-by") from None
    profile = routing_profile(lm, tokenizer, groups, max_length=max_length)
    png = plot_routing(profile, output.with_suffix(".png"))
    atomic_write_json(output.with_suffix(".json"), {"adapter": str(adapter), "base": model, "data": data, "split": split,
                                                     "group_by": group_by, **profile.to_dict()})
    spec = profile.specialisation()
    for group, row in zip(profile.groups, spec):
        typer.echo(f"{group}: most preferred expert {int(row.argmax())} ({row.max():.2f}x its mean share)")
    typer.echo(f"wrote {png} and {output.with_suffix('.json')}")


def register(app: typer.Typer) -> None:
    """`finetune` at the top level, and the `loramoe` group (`finetune`, `routing`)."""
    group = typer.Typer(help="LoRA-MoE (SparseDoctor): fine-tune with a mixture of LoRA experts, and see how it routes "
                             "(docs/loramoe.md).\n\nExample: medmoe loramoe finetune --data pubmedqa -o runs/pubmedqa-moe",
                        no_args_is_help=True)
    for target in (app, group):
        target.command("finetune", cls=renamed_flags(FINETUNE_FLAGS))(finetune_command)
    group.command("routing", cls=renamed_flags(ROUTING_FLAGS))(routing_command)
    app.add_typer(group, name="loramoe", rich_help_panel="Methods")
