"""The README.md model card of a saved adapter (LoRA-MoE, or a plain PEFT LoRA trained by medmoe).

    model_card(adapter_config, training=..., results=...) -> str

Hub-style YAML front matter (`library_name`, `base_model` when the base is a hub id, `tags`), then what
the adapter is, how to load it, its settings, its training (the run folder's settings, when known) and a
"Results" table holding only measured values, each with its source (`medmoe.models.adapters` gathers
them from the run folder: train_log.jsonl, `medmoe eval` summaries). Nothing is filled in that was not
measured: without results the section says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LORAMOE_TAGS = ("medmoe", "loramoe", "lora", "medical")
LORA_TAGS = ("medmoe", "lora", "peft", "medical")


def looks_like_hub_id(name: str) -> bool:
    """owner/name, not a local path (what the hub's `base_model` field accepts)."""
    return (name.count("/") == 1 and not name.startswith((".", "/", "~")) and "\\" not in name
            and all(name.split("/")) and not Path(name).expanduser().exists())


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return "`" + json.dumps(value, ensure_ascii=False) + "`"
    if value is None or value == "":
        return "(not set)"
    return str(value).replace("|", "\\|")


def _table(rows: list[tuple[Any, ...]], header: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_value(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def model_card(adapter_config: dict, *, trainable_parameters: int | None = None, training: dict[str, Any] | None = None,
               results: list[dict[str, Any]] | None = None, hub_base: str | None = None) -> str:
    """The card's text. adapter_config: the folder's adapter_config.json (peft_type MEDMOE_LORAMOE, or a
    PEFT LoRA's). training: setting -> value rows (None: not known). results: rows {"metric", "value",
    "source"} of measured values only. hub_base: the base's hub id for the front matter (default: the
    config's base_model_name_or_path when that is a hub id; a local path is left out of it)."""
    loramoe = adapter_config.get("peft_type") == "MEDMOE_LORAMOE"
    base = str(adapter_config.get("base_model_name_or_path") or "")
    hub = hub_base or (base if looks_like_hub_id(base) else None)
    tags = LORAMOE_TAGS if loramoe else LORA_TAGS
    front = ["---", f"library_name: {'medmoe' if loramoe else 'peft'}"]
    if hub:
        front.append(f"base_model: {hub}")
    front += ["tags:", *(f"- {tag}" for tag in tags), "---", ""]
    shown_base = base or "BASE"
    parts = ["\n".join(front)]
    if loramoe:
        parts.append(_loramoe_intro(adapter_config, shown_base))
    else:
        parts.append(_lora_intro(adapter_config, shown_base))
    parts.append(_how_to_load(shown_base, loramoe))
    parts.append(_settings(adapter_config, trainable_parameters, loramoe))
    parts.append("## Training\n\n" + (_table(list(training.items()), ("setting", "value")) if training else
                                      "Not recorded: this card was written without the run folder of the training run.\n"))
    if results:
        rows = [(r["metric"], r["value"], r.get("source", "")) for r in results]
        parts.append("## Results\n\nMeasured values only, each with the file it was read from.\n\n"
                     + _table(rows, ("metric", "value", "source")))
    else:
        parts.append("## Results\n\nNo measured results: no training log or evaluation summary was found for this "
                     "adapter, so none are reported. Measure it with `medmoe eval --adapter ADAPTER`, then "
                     "`medmoe export ADAPTER -o OUT --results EVAL/summary.json` writes a copy of the adapter with "
                     "them in this table.\n")
    return "\n".join(parts)


def _loramoe_intro(c: dict, base: str) -> str:
    targets = c.get("target_modules")
    where = "every linear layer except the output head" if targets == "all-linear" else f"the linear layers {_value(targets)}"
    return (f"# LoRA-MoE adapter for {base}\n\n"
            f"A LoRA mixture-of-experts adapter (SparseDoctor, medmoe's `loramoe`): on {where} of `{base}`, "
            f"{c.get('num_experts')} LoRA experts of rank {c.get('r')} (alpha {c.get('lora_alpha')}) and a "
            f"{c.get('router_kind')} router that picks the top {c.get('top_k')} experts for each token.\n\n"
            "It is not a plain LoRA: the update depends on each token's routing, so it cannot be merged into the "
            "base's weights, and stock PEFT refuses the folder (`peft_type` MEDMOE_LORAMOE is not a PEFT type) "
            "instead of loading it as a LoRA. Load it with medmoe.\n")


def _lora_intro(c: dict, base: str) -> str:
    return (f"# LoRA adapter for {base}\n\n"
            f"A plain LoRA adapter (Hugging Face PEFT, rank {c.get('r')}, alpha {c.get('lora_alpha')}) trained by "
            "`medmoe finetune --method lora`. PEFT loads it as any LoRA; "
            "`medmoe export --merge ADAPTER -o OUT` merges it into the base (a plain Hugging Face model folder).\n")


def _how_to_load(base: str, loramoe: bool) -> str:
    text = ("## How to load it\n\nADAPTER is this folder, or its hub id (downloaded when it is not a local path).\n\n"
            "```bash\n"
            f"medmoe eval --model {base} --adapter ADAPTER --benchmarks pubmedqa\n"
            "medmoe eval --adapter ADAPTER --benchmarks pubmedqa    # the base named in adapter_config.json\n"
            "```\n\n"
            "```python\n"
            "from medmoe.models import load_causal_lm\n"
            f'model, tokenizer = load_causal_lm("{base}", adapter="ADAPTER")\n'
            "```\n")
    if not loramoe and looks_like_hub_id(base):
        text += ("\n```python\nfrom peft import AutoPeftModelForCausalLM\n"
                 'model = AutoPeftModelForCausalLM.from_pretrained("ADAPTER")   # stock PEFT (it loads the base by its hub id)\n```\n')
    elif not loramoe:  # a zoo name or a local path: stock PEFT needs the base model built first
        text += ("\n```python\nfrom peft import PeftModel\n"
                 f'base_model, tokenizer = load_causal_lm("{base}")   # the weights the adapter was trained on\n'
                 'model = PeftModel.from_pretrained(base_model, "ADAPTER")   # stock PEFT\n```\n')
    return text


def _settings(c: dict, trainable: int | None, loramoe: bool) -> str:
    keys = (("r", "lora_alpha", "lora_dropout", "target_modules", "num_experts", "top_k", "router_kind", "router_dim",
             "temperature", "contrastive_kind", "contrastive_weight", "contrastive_tokens", "balance_weight",
             "z_loss_weight", "queue_size") if loramoe else ("r", "lora_alpha", "lora_dropout", "target_modules"))
    rows: list[tuple[Any, ...]] = [(k, c.get(k)) for k in keys if k in c]
    if trainable is not None:
        rows.append(("trainable parameters", f"{trainable:,}"))
    for key in ("base_model_name_or_path", "task_type", "medmoe_format", "medmoe_version"):
        if c.get(key):
            rows.append((key, c[key]))
    files = ("`adapter_config.json` (these settings, PEFT's key names where PEFT has the setting) and "
             "`adapter_model.safetensors` (per wrapped linear `<module>.lora_A` (E, r, d_in), `<module>.lora_B` "
             "(E, d_out, r), `<module>.router.*`)" if loramoe else
             "`adapter_config.json` and `adapter_model.safetensors`, as PEFT writes them")
    return f"## Adapter\n\nFiles: {files}.\n\n" + _table(rows, ("setting", "value"))
