"""`medmoe finetune`: LoRA-MoE (SparseDoctor), plain LoRA (PEFT) or full fine-tuning of a causal LM.

    medmoe finetune --base smollm2-135m --method loramoe --data pubmedqa --output runs/pubmedqa-moe
    medmoe eval --model smollm2-135m --adapter runs/pubmedqa-moe/adapter --benchmarks pubmedqa
    torchrun --nproc-per-node 2 -m medmoe finetune ...      # data parallel (gloo on CPU, nccl on GPU)
    medmoe routing --adapter runs/pubmedqa-moe/adapter --data pubmedqa,dental --out reports/routing_en
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune_command)
    app.command("routing")(routing_command)


def finetune_command(
    data: str = typer.Option(..., "--data", help="Bundled dataset name (train split) or a JSONL file."),
    base: str = typer.Option("smollm2-135m", "--base", help="Base model: zoo name, local folder or hub id."),
    method: str = typer.Option("loramoe", "--method", help="loramoe | lora | full"),
    output: Path = typer.Option(Path("runs/finetune"), "--output", "-o", help="Run folder: checkpoints, log, adapter."),
    steps: int = typer.Option(100, help="Optimizer steps."),
    batch_size: int = typer.Option(4, help="Examples per micro-batch (per process)."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
    lr: float = typer.Option(2e-4, help="Peak learning rate (linear warm-up, cosine decay to 10%)."),
    warmup_steps: int = typer.Option(10),
    max_length: int = typer.Option(256, help="Tokens per example (the prompt is truncated on the left)."),
    limit: int = typer.Option(0, help="Use only the first N training examples (0 = all); say so when reporting."),
    skip_first: int = typer.Option(0, help="Leave out the first N training examples (e.g. kept for the MambaFormer gate)."),
    with_explanations: bool = typer.Option(False, "--with-explanations", help="Multiple-choice completions go on with the record's explanation (CMExam, MedMCQA), so the model keeps writing text, not only letters."),
    eval_every: int = typer.Option(50, help="Evaluate held-out loss every N steps."),
    eval_examples: int = typer.Option(64, help="Training examples held out for periodic evaluation."),
    save_every: int = typer.Option(50, help="Write a checkpoint every N steps."),
    resume: bool = typer.Option(True, help="Resume from the newest checkpoint in --output, if any (the same settings only); --no-resume refuses a folder that already holds a run (nothing is deleted)."),
    seed: int = typer.Option(0),
    threads: int = typer.Option(0, help="torch threads (0 = torch default)."),
    experts: int = typer.Option(8, help="LoRA-MoE: experts E."),
    top_k: int = typer.Option(2, help="LoRA-MoE: experts per token k."),
    rank: int = typer.Option(8, help="LoRA-MoE: rank r of each expert."),
    alpha: float = typer.Option(16.0, help="LoRA-MoE: alpha (scale alpha / r)."),
    dropout: float = typer.Option(0.0, help="LoRA / LoRA-MoE dropout on the adapter input."),
    router: str = typer.Option("prototype", help="LoRA-MoE router: prototype | linear."),
    router_dim: int = typer.Option(16, help="LoRA-MoE: prototype router embedding width d_q."),
    contrastive: str = typer.Option("prototype", help="LoRA-MoE contrastive loss: prototype | expert_output | none."),
    contrastive_weight: float = typer.Option(0.1),
    balance_weight: float = typer.Option(0.01),
    z_weight: float = typer.Option(0.001),
    queue_size: int = typer.Option(1024, help="Expert memory queue entries per layer (0 = in-batch negatives only)."),
    contrastive_tokens: int = typer.Option(128, help="Anchors sampled per layer and step (0 = every token)."),
    temperature: float = typer.Option(0.1),
    compute: str = typer.Option("auto", help="LoRA-MoE experts: auto (the sparse C++ kernel on CPU fp32, dense elsewhere) | sparse | dense."),
    lora_rank: int = typer.Option(16, help="Plain LoRA: rank."),
    target_modules: str = typer.Option("all-linear", help="Comma-separated module names, or all-linear."),
) -> None:
    """Fine-tune BASE on DATA with LoRA-MoE, plain LoRA or full fine-tuning; resumable."""
    import torch

    from medmoe.models import load_causal_lm
    from medmoe.train.data import load_examples, select_examples
    from medmoe.train.distributed import init_from_env
    from medmoe.train.finetune import FinetuneConfig, finetune

    if threads > 0:
        torch.set_num_threads(threads)
    targets = "all-linear" if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",") if t.strip()]
    cfg = FinetuneConfig(
        method=method, base=base, output=str(output), steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
        warmup_steps=warmup_steps, max_length=max_length, seed=seed, eval_every=eval_every, eval_examples=eval_examples,
        save_every=save_every, resume=resume, data=data, skip_first=skip_first, limit=limit, with_explanation=with_explanations, lora_rank=lora_rank, lora_dropout=dropout, target_modules=targets,
        loramoe=dict(num_experts=experts, top_k=top_k, rank=rank, alpha=alpha, dropout=dropout, router_kind=router, router_dim=router_dim,
                     contrastive_kind=contrastive if router == "prototype" or contrastive != "prototype" else "none",
                     contrastive_weight=contrastive_weight, balance_weight=balance_weight, z_loss_weight=z_weight,
                     queue_size=queue_size, contrastive_tokens=contrastive_tokens or None, temperature=temperature,
                     compute=compute),
    )
    rank_id, world = init_from_env()
    model, tokenizer = load_causal_lm(base)
    examples = select_examples(load_examples(data, tokenizer, with_explanation=with_explanations), skip_first, limit)
    if rank_id == 0:
        typer.echo(f"{method} fine-tuning of {base} on {len(examples)} examples from {data}; {world} process(es)")
    result = finetune(cfg, model, tokenizer, train_examples=examples, rank=rank_id, world=world)
    if rank_id == 0:
        typer.echo(outcome_line(result, cfg.steps))


def outcome_line(result: dict, steps: int) -> str:
    """What a finetune() call did, in one line: trained, or found the run already finished."""
    if not result["losses"]:
        verb = "already finished" if result["already_finished"] else "finished"
        return f"{verb} at step {steps}; nothing to train; result in {result['adapter']}"
    last = max(result["losses"])
    return f"done: step {last}, loss {result['losses'][last]:.4f}; saved {result['adapter']}"


def routing_command(
    adapter: Path = typer.Option(..., "--adapter", help="A LoRA-MoE adapter folder (`medmoe finetune` output's adapter/)."),
    base: str = typer.Option("smollm2-135m", "--base", help="The adapter's base model: zoo name, local folder or hub id."),
    data: str = typer.Option("pubmedqa,dental", "--data", help="Comma-separated bundled datasets or record files."),
    split: str = typer.Option("test", help="Split of the bundled datasets."),
    group_by: str = typer.Option("dataset", help="'dataset', or a metadata field such as 'subject' (CMMLU)."),
    per_group: int = typer.Option(50, help="Texts per group (0 = all)."),
    max_length: int = typer.Option(256, help="Tokens read per text."),
    out: Path = typer.Option(Path("runs/routing"), "--out", help="Writes OUT.png (heatmaps) and OUT.json (shares)."),
    threads: int = typer.Option(0, help="torch threads (0 = torch default)."),
) -> None:
    """Routing analytics of a LoRA-MoE adapter: expert load per layer, and which experts specialise on
    which group (dataset or subject); a PNG of both heatmaps and the numbers as JSON."""
    import torch

    from medmoe.data import load_dataset
    from medmoe.errors import ModelError, require
    from medmoe.loramoe.analytics import plot_routing, record_groups, routing_profile
    from medmoe.models import load_causal_lm
    from medmoe.paths import atomic_write_json

    require("matplotlib", "plots", "routing analytics (the heatmaps)")  # before minutes of model loading
    if threads > 0:
        torch.set_num_threads(threads)
    if not (adapter / "loramoe_config.json").is_file():
        raise ModelError(f"{adapter}: no loramoe_config.json; routing analytics need a LoRA-MoE adapter folder")
    model, tokenizer = load_causal_lm(base, adapter=adapter)
    datasets = {name.strip(): load_dataset(name.strip(), split=split) for name in data.split(",") if name.strip()}
    try:
        groups = record_groups(datasets, group_by, per_group)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--group-by") from None
    profile = routing_profile(model, tokenizer, groups, max_length=max_length)
    png = plot_routing(profile, out.with_suffix(".png"))
    atomic_write_json(out.with_suffix(".json"), {"adapter": str(adapter), "base": base, "data": data, "split": split,
                                                  "group_by": group_by, **profile.to_dict()})
    spec = profile.specialisation()
    for group, row in zip(profile.groups, spec):
        typer.echo(f"{group}: most preferred expert {int(row.argmax())} ({row.max():.2f}x its mean share)")
    typer.echo(f"wrote {png} and {out.with_suffix('.json')}")
