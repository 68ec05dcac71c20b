"""Fine-tune a causal LM with LoRA-MoE, plain LoRA (Hugging Face PEFT) or full fine-tuning.

One loop for the three methods: gradient accumulation, linear warm-up + cosine decay, gradient
clipping, periodic evaluation (held-out loss), atomic checkpoints and exact resume (same seed, same
data order, same RNG streams, per rank), and data parallelism over torch.distributed ranks. A run
folder holds one run (run_folder.py): a resume with other settings is refused, and a finished run is
not repeated.

Device and precision (precision.py): the model is moved to cfg.device (each rank its own GPU), every
weight stays float32, and with cfg.dtype bfloat16 / float16 each forward runs under torch.autocast
(float16 with a GradScaler). cfg.gradient_checkpointing recomputes each block in backward
(activation_checkpointing.py); cfg.fsdp shards the frozen base across the ranks (sharding.py).
The settings themselves, and what a run folder records of them: finetune_config.py.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medmoe.errors import MedmoeError
from medmoe.eval.scoring import is_encoder_decoder
from medmoe.models.loader import TRAINING_FILE
from medmoe.paths import atomic_write_json, atomic_write_text
from medmoe.train.activation_checkpointing import enable_activation_checkpointing
from medmoe.train.checkpoint import load_checkpoint, save_checkpoint
from medmoe.train.data import Example, MicroBatches, collate, load_examples, tokenize_examples
from medmoe.train.distributed import all_reduce_gradients, barrier
from medmoe.train.finetune_config import FinetuneConfig, recorded_settings
from medmoe.train.log_sinks import MetricSinks
from medmoe.train.loss import completion_loss, hf_model
from medmoe.train.precision import Precision, to_device, training_device, training_dtype
from medmoe.train.run_folder import LOG_FILE, open_run, run_settings, truncate_log
from medmoe.train.sharding import check_fsdp, shard_frozen_base
from medmoe.train.top_blocks import (
    CACHE_FOLDER,
    ActivationCache,
    decoder_blocks,
    lower_activations,
    top_block_linears,
    top_blocks_loss,
)

CACHE_NOTE = "top_blocks_cache.json"  # in the run folder: the cache builds of a --top-blocks run (kept)


def prepare_model(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    """Wrap the base for the method; only the method's parameters stay trainable."""
    torch.manual_seed(cfg.seed)
    if cfg.method == "loramoe":
        from medmoe.loramoe import LoraMoeConfig, LoraMoeModel

        moe = {"target_modules": cfg.target_modules, **cfg.loramoe}
        if cfg.top_blocks:  # the full names of the top blocks' target linears (top_blocks.top_block_linears)
            moe["target_modules"] = top_block_linears(model, moe["target_modules"], cfg.top_blocks)
        return LoraMoeModel(model, LoraMoeConfig(**moe))
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        alpha = cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_rank
        targets = top_block_linears(model, cfg.target_modules, cfg.top_blocks) if cfg.top_blocks else cfg.target_modules
        return get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=alpha, lora_dropout=cfg.lora_dropout, target_modules=targets))  # type: ignore[arg-type]  # peft annotates lora_alpha int; a float works
    for p in model.parameters():
        p.requires_grad_(cfg.top_layers == 0)
    if cfg.top_layers:
        for p in top_layer_parameters(model, cfg.top_layers, cfg.freeze_mixers):
            p.requires_grad_(True)
    return model


def top_layer_parameters(model: Any, n: int, freeze_mixers: bool = False) -> list[nn.Parameter]:
    """The last n decoder layers and the final norm of a decoder-only HF model, or of the decoder of a
    T5-family model: fine-tuning only these makes the backward pass stop n layers deep (a task head on
    frozen features, for small data).
    freeze_mixers: leave the token mixers (attention, or a hybrid's Mamba mixers; in T5 self- and
    cross-attention) and their pre-norms frozen too, so with n = 1 no gradient goes through any mixer
    (the Mamba scan then runs its fast inference kernel instead of the autograd-capable chunked scan)."""
    if is_encoder_decoder(model) and hasattr(getattr(model, "decoder", None), "block"):
        layers, norm = model.decoder.block, model.decoder.final_layer_norm
        mixer_parts: tuple[str, ...] = ("layer.0.", "layer.1.")  # T5Block: self-attention, cross-attention, FF
    else:
        inner = getattr(model, "model", None)
        layers, norm = getattr(inner, "layers", None), getattr(inner, "norm", None)
        mixer_parts = ("self_attn.", "input_layernorm.")  # the mixer and the pre-norm that feeds it
    if layers is None or norm is None:
        raise MedmoeError(f"{type(model).__name__}: --top-layers needs a decoder-only model (model.layers, model.norm) "
                          "or a T5-family model (decoder.block, decoder.final_layer_norm)")
    if not 1 <= n <= len(layers):
        raise MedmoeError(f"--top-layers {n}: the model has {len(layers)} layers")
    chosen = [p for layer in layers[-n:] for name, p in layer.named_parameters()
              if not (freeze_mixers and name.startswith(mixer_parts))]
    return chosen + list(norm.parameters())


def _scheduler(optimizer, cfg: FinetuneConfig):
    """Linear warm-up over warmup_steps, then cosine decay to 10% of the peak rate."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


LossFn = Callable[..., tuple[torch.Tensor, int]]  # (batch, feature indices, with_aux=) -> (loss, n_tokens)


def whole_model_loss(model: nn.Module) -> LossFn:
    """completion_loss of the whole model on a collated batch (the indices are not needed)."""
    def loss_of(batch: dict, indices: list[int], with_aux: bool = True) -> tuple[torch.Tensor, int]:
        return completion_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"], with_aux=with_aux)
    return loss_of


def cached_top_blocks_loss(model: nn.Module, cache: ActivationCache, n_top: int, offset: int = 0) -> LossFn:
    """The same loss from the cached lower-block states of features offset + indices (top_blocks.py),
    moved to the batch's device."""
    def loss_of(batch: dict, indices: list[int], with_aux: bool = True) -> tuple[torch.Tensor, int]:
        mask = batch["attention_mask"]
        states = cache.states([offset + i for i in indices], batch["input_ids"].shape[1]).to(mask.device)  # (B, T, D)
        return top_blocks_loss(model, states, mask, batch["labels"], n_top, with_aux=with_aux)
    return loss_of


def on_device_lower(lower: Callable | None, device: str) -> Callable | None:
    """The cache's lower-block forward (top_blocks.lower_activations, or a test's) on the model's
    device: the collated batch goes there, the states come back to the CPU (where the cache is written)."""
    if device == "cpu":
        return lower
    run_lower = lower or lower_activations

    def on_device(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_top: int) -> torch.Tensor:
        return run_lower(model, input_ids.to(device), attention_mask.to(device), n_top).cpu()
    return on_device


@torch.no_grad()
def evaluate_loss(model: nn.Module, features: list[dict], batch_size: int, pad_id: int, loss_of: LossFn | None = None,
                  precision: Precision | None = None) -> float:
    """Mean completion-token cross-entropy over the held-out features; loss_of(batch, indices into
    features, with_aux=) computes a batch's loss (default: the whole model's completion_loss).
    precision: the run's device and autocast (default: CPU, float32), as in training."""
    loss_of = loss_of or whole_model_loss(model)
    precision = precision or Precision()
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(features), batch_size):
        batch = to_device(collate(features[start : start + batch_size], pad_id), precision.device)
        indices = list(range(start, min(start + batch_size, len(features))))
        with precision.autocast():
            loss, n_tokens = loss_of(batch, indices, with_aux=False)
        total += float(loss) * n_tokens
        count += n_tokens
    model.train(was_training)
    return total / max(count, 1)


def save_final(model: Any, tokenizer, cfg: FinetuneConfig) -> Path:
    """The trained result: LoRA-MoE adapter, PEFT adapter, or the whole model (full). Adapters are in
    PEFT's layout (adapter_config.json naming the base as given, adapter_model.safetensors) with a
    README.md model card of this run's settings and measured losses (models/adapters.py)."""
    from medmoe.models.adapters import write_model_card

    out = result_folder(cfg)
    hybrid_spec = getattr(model, "hybrid_spec", None)
    if cfg.method == "loramoe":
        model.save_adapter(out, base_model=cfg.base or None)
    elif hybrid_spec is not None:  # a Mamba hybrid stays loadable as one (config + spec + weights)
        from medmoe.mamba.transfer import save_hybrid

        save_hybrid(model, hybrid_spec, out, tokenizer)
    else:
        if cfg.method == "lora" and cfg.base:  # the base as given (a zoo name), not the zoo's cache folder
            for peft_config in getattr(model, "peft_config", {}).values():
                peft_config.base_model_name_or_path = cfg.base
        model.save_pretrained(out)
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
    provenance = {"method": cfg.method, "data": cfg.data, "skip_first": cfg.skip_first, "limit": cfg.limit,
                  "top_layers": cfg.top_layers, "freeze_mixers": cfg.freeze_mixers, "with_explanation": cfg.with_explanation,
                  **({"top_blocks": cfg.top_blocks} if cfg.top_blocks else {})}
    if cfg.method in ("loramoe", "lora") and (out / "adapter_config.json").is_file():
        write_model_card(out, run_folder=Path(cfg.output), provenance=provenance)
    atomic_write_text(out / TRAINING_FILE, json.dumps(provenance, indent=2) + "\n")  # last: marks the result complete
    return out


def result_folder(cfg: FinetuneConfig) -> Path:
    return Path(cfg.output) / ("model" if cfg.method == "full" else "adapter")


def split_examples(examples: list[Example], n_eval: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out n_eval examples (a seeded shuffle) for periodic evaluation; never trained on."""
    if n_eval <= 0 or len(examples) <= n_eval:
        return examples, []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def finetune(
    cfg: FinetuneConfig,
    model: nn.Module,
    tokenizer,
    train_examples: list[Example] | None = None,
    data: str | None = None,
    rank: int = 0,
    world: int = 1,
    on_step: Callable[[int, float], None] | None = None,
    lower_fn: Callable | None = None,
) -> dict:
    """Train; returns {"model", "losses": {step: loss}, "eval": {step: loss}, "adapter", "start_step",
    "already_finished", "precision"}. A run whose last checkpoint is at cfg.steps trains nothing: its model is the
    checkpoint's, and its result is written only if a kill had stopped that (already_finished False).
    Each train_log.jsonl record holds the step's wall seconds (`seconds`: its micro-batches and
    optimizer step, plus its held-out evaluation when it has one; not its checkpoint).

    on_step(step, loss) is called after every optimizer step (tests use it to simulate a kill).
    The model is moved to cfg.device (precision.training_device: cuda:LOCAL_RANK for rank r of a
    multi-process run) and each forward runs under cfg.dtype's autocast (precision.py); every rank
    checkpoints its own RNG streams and LoRA-MoE queues (checkpoint.py).
    cfg.top_blocks: the lower blocks' states of every example (training and held out) are computed
    once into the run folder's top_blocks_cache/ (or read from it, on resume; lower_fn replaces
    top_blocks.lower_activations there, for tests), each step runs only the top blocks, and the cache is
    deleted once the result is written (a finished run never trains again). With cfg.top_blocks_cache
    the cache is in that folder instead and kept: another run at the same settings reads it. A build
    that computed anything is noted in OUTPUT/top_blocks_cache.json (examples computed, wall seconds).
    The cache is built in float32 without autocast whatever cfg.dtype (its key records the model's dtype).
    """
    if train_examples is None:
        if data is None:
            raise MedmoeError("give --data (a bundled dataset name or a JSONL file)")
        train_examples = load_examples(data, tokenizer, with_explanation=cfg.with_explanation)
    device = training_device(cfg.device, world)
    precision = Precision(device, training_dtype(cfg.dtype, device))
    cfg = replace(cfg, dtype=precision.dtype)  # a resolved dtype is what the run folder records
    out_dir, ckpt_dir = Path(cfg.output), Path(cfg.output) / "checkpoints"
    if cfg.top_blocks:  # refused before the run folder is touched
        decoder_blocks(model, cfg.top_blocks)
        if world > 1:
            raise MedmoeError("--top-blocks trains in one process (one process builds the cache); run it without torchrun")
    if cfg.fsdp:
        check_fsdp(cfg.method, cfg.top_blocks)
    resume_from = open_run(out_dir, run_settings(recorded_settings(cfg), train_examples, world), cfg.resume, rank)
    barrier(world)
    train_examples, eval_examples = split_examples(train_examples, cfg.eval_examples, cfg.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seq2seq = is_encoder_decoder(hf_model(model))
    train_features = tokenize_examples(train_examples, tokenizer, cfg.max_length, seq2seq)
    eval_features = tokenize_examples(eval_examples, tokenizer, cfg.max_length, seq2seq)
    batches = MicroBatches(train_features, cfg.batch_size, cfg.seed, pad_id, rank, world)

    precision.use()
    model = prepare_model(model.to(device), cfg)  # adapters are made on the base's device
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    sharded = cfg.fsdp and world > 1  # one process has nothing to shard with
    if sharded:
        shard_frozen_base(model, device, world)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = _scheduler(optimizer, cfg)
    scaler = precision.grad_scaler()

    start = 0
    if resume_from is not None:
        resumed = load_checkpoint(resume_from, model, optimizer, scheduler, rank=rank)
        start = resumed["step"]
        if scaler is not None and "grad_scaler" in resumed["extra"]:
            scaler.load_state_dict(resumed["extra"]["grad_scaler"])
    else:
        torch.manual_seed(cfg.seed + rank)
        random.seed(cfg.seed + rank)
        np.random.seed(cfg.seed + rank)
    log_path = out_dir / LOG_FILE
    if rank == 0:
        truncate_log(log_path, start)
    if start >= cfg.steps:
        return {**_finished(model, tokenizer, cfg, rank, start), "precision": precision}

    train_loss, eval_loss = whole_model_loss(model), whole_model_loss(model)
    if cfg.top_blocks:
        with torch.random.fork_rng(devices=[]):  # eval-mode forwards draw nothing; the RNG streams stay the run's
            cache = ActivationCache.build_or_open(cache_folder(cfg), model, train_features + eval_features, cfg.top_blocks,
                                                  pad_id, storage=cfg.top_blocks_cache_dtype, batch_size=cfg.batch_size,
                                                  progress=cfg.progress and rank == 0, lower=on_device_lower(lower_fn, device),
                                                  otherwise="give another --top-blocks-cache" if cfg.top_blocks_cache
                                                  else "use a new --output")
        note_cache_build(out_dir, cache)
        train_loss = cached_top_blocks_loss(model, cache, cfg.top_blocks)
        eval_loss = cached_top_blocks_loss(model, cache, cfg.top_blocks, offset=len(train_features))

    losses, evals = {}, {}
    sinks = MetricSinks(log_path, cfg.report_to, resume_step=start, config=recorded_settings(cfg)) if rank == 0 else None
    progress = _progress(range(start, cfg.steps), cfg, rank, start)
    model.train()
    for step in progress:
        step_start = time.perf_counter()
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            index = step * cfg.grad_accum + micro
            batch = to_device(batches.batch(index), device)
            with precision.autocast():
                loss, _ = train_loss(batch, batches.indices(index))  # the LM head at completion tokens only
            loss = loss / cfg.grad_accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
            step_loss += float(loss.detach())
        all_reduce_gradients(params, world)
        applied = optimizer_step(optimizer, params, cfg.max_grad_norm, scaler)
        with warnings.catch_warnings():  # a float16 step skipped by the scaler still moves the schedule: lr is a function of the step
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        losses[done] = step_loss
        record = {"step": done, "loss": step_loss, "lr": scheduler.get_last_lr()[0], "epoch": round(batches.epoch_of(done * cfg.grad_accum - 1), 3)}
        if scaler is not None:  # float16: the loss scale, and a step skipped for inf / NaN gradients
            record["grad_scale"] = scaler.get_scale()
            if not applied:
                record["skipped"] = True
        aux = getattr(model, "last_aux_losses", None)
        if aux:
            record["aux"] = {k: float(v) for k, v in aux.items()}
        if eval_features and (done % cfg.eval_every == 0 or done == cfg.steps) and (rank == 0 or sharded):  # sharded: a collective
            evals[done] = record["eval_loss"] = evaluate_loss(model, eval_features, cfg.batch_size, pad_id, eval_loss, precision)
        record["seconds"] = round(time.perf_counter() - step_start, 3)
        if sinks is not None:  # rank 0
            sinks.write(record)
            if hasattr(progress, "set_postfix"):
                progress.set_postfix(loss=f"{step_loss:.4f}", **({"eval": f"{evals[done]:.4f}"} if done in evals else {}))
        if done % cfg.save_every == 0 or done == cfg.steps:  # the last one too: a finished run is never repeated
            extra = {"grad_scaler": scaler.state_dict()} if scaler is not None else {}
            save_checkpoint(ckpt_dir, done, model, optimizer, scheduler, extra=extra, keep=cfg.keep_checkpoints, rank=rank, world=world)
            barrier(world)
        if on_step is not None:
            on_step(done, step_loss)
    if sinks is not None:
        sinks.close()
    adapter = save_final(model, tokenizer, cfg) if rank == 0 else None
    if rank == 0:  # the result is complete: the run's own cache (GBs) is never read again
        drop_own_cache(cfg)
    return {"model": model, "losses": losses, "eval": evals, "adapter": adapter, "start_step": start, "already_finished": False,
            "precision": precision}


def optimizer_step(optimizer, params: list[nn.Parameter], max_grad_norm: float, scaler: torch.amp.GradScaler | None) -> bool:
    """Clip (max_grad_norm > 0) and step; with a GradScaler (float16) the gradients are unscaled first,
    and a step whose gradients hold inf or NaN is skipped (the scaler then lowers its scale).
    Returns whether the weights were updated. Every rank decides the same: the gradients are all-reduced."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler is None:
        optimizer.step()
        return True
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() >= scale  # update() lowers the scale exactly when it found inf / NaN


def _finished(model: nn.Module, tokenizer, cfg: FinetuneConfig, rank: int, step: int) -> dict:
    """A run resumed at its last step: write the result only if a kill came between the final
    checkpoint and the result's last file."""
    already = (result_folder(cfg) / TRAINING_FILE).is_file()
    adapter = None
    if rank == 0:
        adapter = result_folder(cfg) if already else save_final(model, tokenizer, cfg)
        drop_own_cache(cfg)
    return {"model": model, "losses": {}, "eval": {}, "adapter": adapter, "start_step": step, "already_finished": already}


def cache_folder(cfg: FinetuneConfig) -> Path:
    """Where a --top-blocks run's cache lives: --top-blocks-cache, else OUTPUT/top_blocks_cache."""
    return Path(cfg.top_blocks_cache) if cfg.top_blocks_cache else Path(cfg.output) / CACHE_FOLDER


def drop_own_cache(cfg: FinetuneConfig) -> None:
    """Delete the run's cache once its result is written, unless it lives in a folder the user named
    (--top-blocks-cache: kept for other runs)."""
    if cfg.top_blocks and not cfg.top_blocks_cache:
        shutil.rmtree(Path(cfg.output) / CACHE_FOLDER, ignore_errors=True)


def note_cache_build(out_dir: Path, cache: ActivationCache) -> None:
    """Append this call's build (examples computed, wall seconds) to OUTPUT/top_blocks_cache.json when it
    computed anything: the run's one-time cost, kept after the cache itself is deleted."""
    if not cache.computed:
        return
    path = out_dir / CACHE_NOTE
    note = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"builds": []}
    note.update({"folder": str(cache.folder), "examples": cache.manifest["key"]["examples"],
                 "tokens": cache.manifest["key"]["tokens"], "bytes": sum(int(f["bytes"]) for f in cache.manifest["files"])})
    note["builds"].append({"computed_examples": cache.computed, "seconds": round(cache.seconds, 1)})
    atomic_write_json(path, note)


def _progress(steps: range, cfg: FinetuneConfig, rank: int, start: int):
    if not cfg.progress or rank != 0:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, total=cfg.steps, initial=start, desc=f"finetune {cfg.method}", unit="step", dynamic_ncols=True)
