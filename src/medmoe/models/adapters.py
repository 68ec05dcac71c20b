"""Adapter folders: what they hold, where they come from (local folder or hub id), their model card,
their conversion to the current layout and the merge of a plain LoRA into its base.

    resolve_adapter("owner/name" or a folder) -> Path   a hub id is downloaded only when no such local path exists
    adapter_kind(folder)    "loramoe" | "loramoe-legacy" | "peft" | "model"
    adapter_base(folder)    the base model the adapter names ("" when it names none)
    write_model_card(folder, run_folder=None, provenance=None, summaries=())    README.md from what was measured
    export_adapter(adapter, out, base=None, summaries=())   the adapter in the current layout with a fresh card
    merge_adapter(adapter, out, base=None)                  a plain LoRA merged into its base: a plain HF folder

The layouts (docs/loramoe.md, "Adapter files"): a LoRA-MoE adapter is adapter_config.json (peft_type
MEDMOE_LORAMOE) + adapter_model.safetensors + README.md; before that it was loramoe_config.json +
loramoe_adapter.safetensors (still loaded, with a notice); a PEFT adapter is PEFT's own folder.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medmoe.errors import ModelError
from medmoe.loramoe.card import looks_like_hub_id, model_card
from medmoe.loramoe.config import ADAPTER_CONFIG_NAME, LEGACY_CONFIG_NAME, LoraMoeConfig, adapter_layout, read_json
from medmoe.loramoe.model import CARD_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, saved_base, weights_path

log = logging.getLogger(__name__)

TRAINING_FILE = "medmoe_training.json"  # = loader.TRAINING_FILE (the loader imports this module)
RUN_SETTINGS = "finetune_config.json"  # in the run folder (train/run_folder.py)
RUN_LOG = "train_log.jsonl"
LORAMOE_KINDS = ("loramoe", "loramoe-legacy")
# files an export rewrites rather than copies
_REWRITTEN = {ADAPTER_CONFIG_NAME, WEIGHTS_NAME, LEGACY_CONFIG_NAME, LEGACY_WEIGHTS_NAME, CARD_NAME}


def resolve_adapter(adapter: str | Path) -> Path:
    """The local folder of `adapter`: the path itself when it exists, else a hub id's snapshot
    (huggingface_hub.snapshot_download; the local HF cache first, the network if needed)."""
    path = Path(adapter).expanduser()
    if path.exists():
        return path
    name = str(adapter)
    if looks_like_hub_id(name):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(repo_id=name))
        except Exception as exc:  # offline, no such repo, gated, ...
            raise ModelError(f"adapter '{name}' is no local path, and downloading it from the Hugging Face hub "
                             f"failed: {type(exc).__name__}: {exc}") from exc
    raise ModelError(f"adapter '{adapter}' does not exist")


def adapter_kind(folder: Path) -> str:
    """What `folder` holds (module docstring); a ModelError when it is none of them."""
    layout = adapter_layout(folder)
    if layout is not None:
        return layout
    if (folder / "config.json").is_file():  # --method full saved the whole model
        return "model"
    raise ModelError(f"{folder}: no loramoe_config.json, adapter_config.json or config.json; "
                     "is this a finetune output's adapter/ or model/ folder?")


def adapter_base(folder: Path) -> str:
    """The base model the adapter in `folder` names ("" for a whole model, or when it names none)."""
    kind = adapter_kind(folder)
    if kind in LORAMOE_KINDS:
        return saved_base(folder)
    if kind == "peft":
        return str(read_json(folder / ADAPTER_CONFIG_NAME).get("base_model_name_or_path") or "")
    return ""


def legacy_notice(folder: Path) -> None:
    log.warning("notice: %s is a LoRA-MoE adapter in the layout before 0.2 (%s); `medmoe export %s -o NEW` "
                "rewrites it in PEFT's layout (%s)", folder, LEGACY_CONFIG_NAME, folder, ADAPTER_CONFIG_NAME)


def hub_base(base: str) -> str | None:
    """The hub id for a card's `base_model`: a bundled short name's hub id, a hub id itself, else None."""
    from medmoe.models.registry import BUNDLED

    if base in BUNDLED:
        return BUNDLED[base].hf_id
    return base if looks_like_hub_id(base) else None


# ---- the model card -------------------------------------------------------------------------------

def _run_folder(folder: Path) -> Path | None:
    """The `medmoe finetune` run folder holding this adapter (RUN/adapter), if it is one."""
    parent = folder.resolve().parent
    return parent if (parent / RUN_SETTINGS).is_file() else None


def _read_log(path: Path) -> list[dict]:
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line torn by a kill
            continue
    return [r for r in records if isinstance(r, dict)]


def training_rows(run_folder: Path | None, provenance: dict | None) -> dict[str, Any] | None:
    """The card's Training table: the run's recorded settings (finetune_config.json) and provenance."""
    settings = read_json(run_folder / RUN_SETTINGS) if run_folder is not None and (run_folder / RUN_SETTINGS).is_file() else {}
    provenance = provenance or {}
    if not settings and not provenance:
        return None
    merged = {**settings, **provenance}
    rows: dict[str, Any] = {}
    for key in ("method", "base", "data", "skip_first", "limit", "with_explanation"):
        if key in merged:
            rows[key] = merged[key]
    examples = settings.get("examples") or {}
    if examples:
        rows["training examples"] = f"{examples.get('count')} (sha256 {str(examples.get('sha256', ''))[:16]}...)"
    for key in ("steps", "batch_size", "grad_accum", "world_size", "lr", "warmup_steps", "weight_decay", "max_grad_norm",
                "max_length", "seed", "eval_examples", "top_blocks", "top_layers"):
        if key in merged and not (key in ("top_blocks", "top_layers") and not merged[key]):
            rows[key] = merged[key]
    if {"batch_size", "grad_accum"} <= set(settings):
        rows["examples per optimizer step"] = settings["batch_size"] * settings["grad_accum"] * settings.get("world_size", 1)
    return rows


def _summary_adapter_matches(summary: dict, folder: Path) -> bool:
    given = (summary.get("settings") or {}).get("adapter")
    if not given:
        return False
    given_path = Path(str(given)).expanduser()
    if given_path.exists():
        return given_path.resolve() == folder.resolve()
    return given_path.parts[-2:] == folder.resolve().parts[-2:]  # a relative path from another working folder


def _find_summaries(run_folder: Path | None, folder: Path) -> list[Path]:
    """`medmoe eval` summaries in the run folder (RUN/*/summary.json) that scored this adapter."""
    if run_folder is None:
        return []
    found = []
    for path in sorted(run_folder.glob("*/summary.json")):
        try:
            if _summary_adapter_matches(read_json(path), folder):
                found.append(path)
        except ModelError:
            continue
    return found


def result_rows(folder: Path, run_folder: Path | None, summaries: Iterable[Path] = ()) -> list[dict[str, Any]]:
    """Measured results only: the training log's last loss and held-out eval loss, and each benchmark of
    `medmoe eval` summaries of this adapter (the given ones, which must have scored it, and those in the run folder)."""
    rows: list[dict[str, Any]] = []
    log_path = run_folder / RUN_LOG if run_folder is not None else None
    if log_path is not None and log_path.is_file():
        records = _read_log(log_path)
        source = f"{RUN_LOG}"
        if records and "loss" in records[-1]:
            rows.append({"metric": f"training loss, last step ({records[-1].get('step')})", "value": f"{records[-1]['loss']:.4f}", "source": source})
        evals = [r for r in records if "eval_loss" in r]
        if evals:
            settings = read_json(run_folder / RUN_SETTINGS) if run_folder is not None and (run_folder / RUN_SETTINGS).is_file() else {}
            held = f", {settings['eval_examples']} held-out training examples" if settings.get("eval_examples") else ""
            rows.append({"metric": f"eval loss (step {evals[-1].get('step')}{held})", "value": f"{evals[-1]['eval_loss']:.4f}", "source": source})
    given = [Path(p) for p in summaries]
    for path in given:
        summary = read_json(path)
        if not _summary_adapter_matches(summary, folder):
            raise ModelError(f"{path}: these results are not of {folder} (the evaluation's adapter is "
                             f"{(summary.get('settings') or {}).get('adapter')!r}); give the summary.json of "
                             f"`medmoe eval --adapter {folder}`")
    for path in given + [p for p in _find_summaries(run_folder, folder) if p.resolve() not in {g.resolve() for g in given}]:
        rows += _benchmark_rows(read_json(path), path)
    return rows


def _benchmark_rows(summary: dict, path: Path) -> list[dict[str, Any]]:
    settings = summary.get("settings") or {}
    how = f"rule {settings.get('rule')}, {settings.get('shots', 0)}-shot"
    rows = []
    for name, bench in (summary.get("benchmarks") or {}).items():
        for key, label in (("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("rouge_l", "ROUGE-L")):
            if key not in bench:
                continue
            ci = bench.get(f"{key}_ci")
            interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""
            rows.append({"metric": f"{name} {label} ({bench.get('examples')} examples, {how})",
                         "value": f"{bench[key]:.3f}{interval}", "source": str(path)})
    return rows


def _trainable_count(weights: Path) -> int | None:
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            total = 0
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
            return total
    except Exception:
        return None


def write_model_card(folder: Path, run_folder: Path | None = None, provenance: dict | None = None,
                     summaries: Iterable[Path] = (), results_of: Path | None = None) -> Path:
    """(Re)write folder/README.md for the adapter in `folder` (LoRA-MoE or PEFT), with the training
    settings and measured results of its run folder (default: the folder above it, when that is one)
    and of the given `medmoe eval` summaries. results_of: the folder the summaries scored (an export's source)."""
    folder = Path(folder)
    config = read_json(folder / ADAPTER_CONFIG_NAME)
    run_folder = run_folder if run_folder is not None else _run_folder(results_of or folder)
    if provenance is None and (folder / TRAINING_FILE).is_file():
        provenance = read_json(folder / TRAINING_FILE)
    base = str(config.get("base_model_name_or_path") or "")
    card = model_card(config, trainable_parameters=_trainable_count(folder / WEIGHTS_NAME),
                      training=training_rows(Path(run_folder) if run_folder else None, provenance),
                      results=result_rows(results_of or folder, Path(run_folder) if run_folder else None, summaries),
                      hub_base=hub_base(base))
    path = folder / CARD_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(card, encoding="utf-8")
    tmp.replace(path)
    return path


# ---- export: the current layout, and the merge --------------------------------------------------

def _fresh_output(out: Path, source: Path) -> None:
    if out.resolve() == source.resolve():
        raise ModelError(f"{out}: the output is the adapter itself; write the export to a new folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"{out} exists and is not empty; give a new --output folder")


def export_adapter(adapter: str | Path, out: Path, base: str | None = None, summaries: Iterable[Path] = ()) -> Path:
    """Write the adapter in the current layout into `out`, with a model card of its run and results:
    a LoRA-MoE adapter in either layout becomes adapter_config.json + adapter_model.safetensors (the
    same tensors, names and values); a PEFT adapter's files are copied. Other files (tokenizer,
    medmoe_training.json) are copied. base: the base to record (default: the one the adapter names)."""
    from safetensors.torch import load_file, save_file

    from medmoe.file_checks import safetensors_problem
    from medmoe.loramoe.model import task_type_of_class
    from medmoe.paths import atomic_dir

    folder = resolve_adapter(adapter)
    kind = adapter_kind(folder)
    out = Path(out)
    if kind == "model":
        raise ModelError(f"{folder}: a whole model (config.json), not an adapter: there is nothing to export")
    _fresh_output(out, folder)
    summaries = list(summaries)
    with atomic_dir(out) as tmp:
        for item in sorted(folder.iterdir()):
            if item.is_file() and item.name not in _REWRITTEN and not item.name.endswith(".tmp"):
                shutil.copy2(item, tmp / item.name)
        if kind == "peft":
            for name in (ADAPTER_CONFIG_NAME, WEIGHTS_NAME):
                if (folder / name).is_file():
                    shutil.copy2(folder / name, tmp / name)
            if base:
                peft_config = read_json(tmp / ADAPTER_CONFIG_NAME)
                peft_config["base_model_name_or_path"] = base
                (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(peft_config, indent=2) + "\n", encoding="utf-8")
        else:
            config = LoraMoeConfig.load(folder)
            weights = weights_path(folder)
            if not weights.is_file():
                raise ModelError(f"{weights}: no adapter weights here (expected {weights.name})")
            problem = safetensors_problem(weights)
            if problem:
                raise ModelError(problem)
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as f:
                meta = dict(f.metadata() or {})
            tensors = load_file(str(weights))
            base = base or saved_base(folder)
            model_class = meta.get("model_class", "")
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "base_model": base, "model_class": model_class})
            config.save(tmp, base, task_type_of_class(model_class), model_class)
        write_model_card(tmp, run_folder=_run_folder(folder), summaries=summaries, results_of=folder)
    return out


def merge_adapter(adapter: str | Path, out: Path, base: str | None = None) -> Path:
    """Merge a plain PEFT LoRA adapter into its base (W_0 + (alpha / r) B A, PEFT's merge_and_unload)
    and save the result as a plain Hugging Face model folder (config, safetensors, tokenizer), which
    stock `AutoModelForCausalLM.from_pretrained` loads. A LoRA-MoE adapter is refused: see the message."""
    from medmoe.models.loader import load_causal_lm
    from medmoe.paths import atomic_dir

    folder = resolve_adapter(adapter)
    kind = adapter_kind(folder)
    if kind in LORAMOE_KINDS:
        raise ModelError(
            f"{folder}: a LoRA-MoE adapter cannot be merged into its base: each token's update is the gated sum "
            "of the experts its router picks for that token, sum_i g_i(x) B_i A_i x, which depends on the input, so no "
            "single weight matrix W_0 + B A equals it. Use it as an adapter (`medmoe eval --adapter`, `medmoe serve "
            "--adapter`), or `medmoe export ADAPTER -o OUT` without --merge to rewrite its files")
    if kind == "model":
        raise ModelError(f"{folder}: a whole model (config.json), not an adapter: there is nothing to merge")
    peft_type = read_json(folder / ADAPTER_CONFIG_NAME).get("peft_type")
    if peft_type != "LORA":
        raise ModelError(f"{folder / ADAPTER_CONFIG_NAME}: peft_type {peft_type!r}; only LoRA adapters are merged here")
    _fresh_output(out, folder)
    tokenizer_source = str(folder) if (folder / "tokenizer_config.json").is_file() else None
    model, tokenizer = load_causal_lm(base, adapter=folder, tokenizer=tokenizer_source)
    merged = model.merge_and_unload()
    spec = getattr(merged, "hybrid_spec", None)
    with atomic_dir(Path(out)) as tmp:
        if spec is not None:  # a Mamba hybrid stays one
            from medmoe.mamba.transfer import save_hybrid

            save_hybrid(merged, spec, tmp, tokenizer)
        else:
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        if (folder / TRAINING_FILE).is_file():
            provenance = read_json(folder / TRAINING_FILE)
            provenance["merged"] = {"adapter": str(folder), "base": base or adapter_base(folder)}
            (tmp / TRAINING_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return Path(out)
