"""`medmoe finetune`: LoRA-MoE (SparseDoctor), plain LoRA (PEFT) or full fine-tuning of a causal LM.

    medmoe finetune --base smollm2-135m --method loramoe --data pubmedqa --output runs/pubmedqa-moe
    medmoe eval --model smollm2-135m --adapter runs/pubmedqa-moe/adapter --benchmarks pubmedqa
    torchrun --nproc-per-node 2 -m medmoe finetune ...      # data parallel (gloo on CPU, nccl on GPU)
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune_command)


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
    eval_every: int = typer.Option(50, help="Evaluate held-out loss every N steps."),
    eval_examples: int = typer.Option(64, help="Training examples held out for periodic evaluation."),
    save_every: int = typer.Option(50, help="Write a checkpoint every N steps."),
    resume: bool = typer.Option(True, help="Resume from the newest checkpoint in --output, if any."),
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
    lora_rank: int = typer.Option(16, help="Plain LoRA: rank."),
    target_modules: str = typer.Option("all-linear", help="Comma-separated module names, or all-linear."),
) -> None:
    """Fine-tune BASE on DATA with LoRA-MoE, plain LoRA or full fine-tuning; resumable."""
    import torch

    from medmoe.train.base_models import load_base
    from medmoe.train.data import load_examples, select_examples
    from medmoe.train.distributed import init_from_env
    from medmoe.train.finetune import FinetuneConfig, finetune

    if threads > 0:
        torch.set_num_threads(threads)
    targets = "all-linear" if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",") if t.strip()]
    cfg = FinetuneConfig(
        method=method, output=str(output), steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
        warmup_steps=warmup_steps, max_length=max_length, seed=seed, eval_every=eval_every, eval_examples=eval_examples,
        save_every=save_every, resume=resume, data=data, skip_first=skip_first, limit=limit, lora_rank=lora_rank, lora_dropout=dropout, target_modules=targets,
        loramoe=dict(num_experts=experts, top_k=top_k, rank=rank, alpha=alpha, dropout=dropout, router_kind=router, router_dim=router_dim,
                     contrastive_kind=contrastive if router == "prototype" or contrastive != "prototype" else "none",
                     contrastive_weight=contrastive_weight, balance_weight=balance_weight, z_loss_weight=z_weight,
                     queue_size=queue_size, contrastive_tokens=contrastive_tokens or None, temperature=temperature),
    )
    rank_id, world = init_from_env()
    model, tokenizer = load_base(base)
    examples = select_examples(load_examples(data, tokenizer), skip_first, limit)
    if rank_id == 0:
        typer.echo(f"{method} fine-tuning of {base} on {len(examples)} examples from {data}; {world} process(es)")
    result = finetune(cfg, model, tokenizer, train_examples=examples, rank=rank_id, world=world)
    if rank_id == 0:
        last = max(result["losses"]) if result["losses"] else cfg.steps
        typer.echo(f"done: step {last}, loss {result['losses'].get(last, float('nan')):.4f}; saved {result['adapter']}")
