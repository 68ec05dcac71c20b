"""`medmoe export`: an adapter in the current file layout (with its model card), or a plain LoRA merged
into its base (models/adapters.py; docs/loramoe.md, "Adapter files")."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console()


def export_command(
    adapter: str = typer.Argument(..., help="An adapter folder (a `medmoe finetune` RUN/adapter) or its hub id."),
    output: Path = typer.Option(..., "--output", "-o", help="The new folder to write (must not exist, or be empty)."),
    merge: bool = typer.Option(False, "--merge", help="Merge a plain LoRA adapter into its base and write a plain "
                                                      "Hugging Face model folder (LoRA-MoE adapters cannot be merged)."),
    model: str | None = typer.Option(None, help="The base model (default: the one the adapter names in adapter_config.json)."),
    results: list[Path] = typer.Option([], "--results", help="A `medmoe eval --adapter ADAPTER` summary.json whose scores go "
                                                           "into the model card's Results table (repeatable; summaries in "
                                                           "the run folder, RUN/*/summary.json, are found by themselves)."),
) -> None:
    """Write an adapter in PEFT's file layout with a model card, or merge a plain LoRA into its base.

    Without --merge: a LoRA-MoE adapter (this layout, or the older loramoe_config.json one) or a PEFT
    adapter is written to OUTPUT as adapter_config.json + adapter_model.safetensors + README.md (the
    model card: settings, training run, measured results), other files (tokenizer) copied. With --merge:
    a PEFT LoRA adapter is merged into its base (merge_and_unload) and saved as config.json,
    model.safetensors and the tokenizer, which stock transformers loads; a LoRA-MoE adapter is refused
    (its update depends on each token's routing).

    Example: medmoe export runs/pubmedqa-moe/adapter -o exports/pubmedqa-moe
    """
    from medmoe.models.adapters import export_adapter, merge_adapter

    if merge:
        if results:
            raise typer.BadParameter("a merged model has no adapter card; give --results without --merge", param_hint="--results")
        with console.status(f"merging {adapter} into its base..."):
            out = merge_adapter(adapter, output, base=model)
        console.print(f"merged model: {out} (load it with transformers' AutoModelForCausalLM.from_pretrained)")
        return
    out = export_adapter(adapter, output, base=model, summaries=results)
    console.print(f"adapter: {out} (adapter_config.json, adapter_model.safetensors, README.md)")


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
