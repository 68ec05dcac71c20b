"""The settings of one fine-tuning run (`FinetuneConfig`) and what a run folder records of them.

`recorded_settings` is what a resume compares: the fields that change what is trained, without those
that only say where or how it runs (the log's sinks, the cache's folder, the device, activation
checkpointing, FSDP).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from medmoe.errors import MedmoeError
from medmoe.models.placement import parse_device, parse_dtype
from medmoe.train.log_sinks import parse_report_to

METHODS = ("loramoe", "lora", "full")


@dataclass
class FinetuneConfig:
    """One fine-tuning run. batch_size is per rank and micro-batch; an optimizer step sees
    batch_size * grad_accum * world_size examples."""

    method: str = "loramoe"
    output: str = "runs/finetune"
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    max_length: int = 256
    seed: int = 0
    eval_every: int = 50
    eval_examples: int = 64
    save_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = True
    progress: bool = True
    lora_rank: int = 16
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    loramoe: dict = field(default_factory=dict)  # LoraMoeConfig fields
    top_layers: int = 0  # method full: train only the last N decoder layers + final norm (0 = every weight)
    freeze_mixers: bool = False  # with top_layers: keep those layers' attention / Mamba mixers frozen
    # methods lora and loramoe: adapters on the last N decoder blocks only, trained over cached activations of the
    # frozen lower blocks (top_blocks.py): one no-grad forward of the lower blocks per example, then every step runs
    # only the top N (0 = adapters on every block, the whole model at every step). Not top_layers: that one trains
    # the weights of the last N layers (method full) and still runs the lower layers at every step.
    top_blocks: int = 0
    top_blocks_cache_dtype: str = "model"  # with top_blocks: the cache's dtype, "model" (exact) or "bfloat16" (half the disk)
    # with top_blocks: where the cache lives. "" = OUTPUT/top_blocks_cache, deleted when the run ends; a folder given
    # here is kept, so runs at the same settings share it (LoRA and LoRA-MoE: the key does not see the adapters).
    # Not a training setting (the key checks the cache is this run's): a resume may change it.
    top_blocks_cache: str = ""
    data: str = ""  # provenance, written next to the result (TRAINING_FILE): which data ...
    skip_first: int = 0  # ... which of its training examples were left out (the first N) ...
    limit: int = 0  # ... and how many were used after those (0 = all)
    with_explanation: bool = False  # ... and whether completions went on with the records' explanations
    base: str = ""  # the base model as given (--model): a resume must name the same one
    # where each step's record goes besides train_log.jsonl: tensorboard, wandb (log_sinks.py); a list or
    # "jsonl,tensorboard"; None: $MEDMOE_REPORT_TO, else jsonl only. Not a training setting: a resume may change it
    report_to: str | list[str] | None = None
    # where the run computes (precision.py): auto | cpu | cuda | cuda:N | mps; each rank of a multi-process run
    # takes cuda:LOCAL_RANK. Not a training setting: a run may resume on another machine
    device: str = "auto"
    # the forward's autocast dtype (weights stay float32): auto | float32 | bfloat16 | float16; auto = bfloat16 on a
    # CUDA GPU that has it, else float32. Resolved by finetune() and a training setting (recorded unless float32)
    dtype: str = "auto"
    # recompute each decoder block in backward instead of keeping its activations (activation_checkpointing.py):
    # the same loss and gradients, less memory, one more forward per step. Not a training setting
    gradient_checkpointing: bool = False
    # shard the frozen base across the ranks of a multi-process run (sharding.py, FSDP2): each rank holds ~1/W of
    # it; the adapters stay whole, so the run computes what the data-parallel one does. Not a training setting
    fsdp: bool = False

    def __post_init__(self) -> None:
        self.report_to = parse_report_to(self.report_to)  # a missing package fails here, before anything is loaded
        self.device, self.dtype = parse_device(self.device), parse_dtype(self.dtype)
        if self.method not in METHODS:
            raise MedmoeError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise MedmoeError("steps, batch size and gradient accumulation must all be >= 1")
        if self.top_blocks < 0:
            raise MedmoeError(f"--top-blocks must be >= 0, got {self.top_blocks}")
        if self.top_blocks and self.method == "full":
            raise MedmoeError("--top-blocks is for --method lora and loramoe (adapters on the last N blocks); for --method "
                              "full, --top-layers N trains the last N layers' weights (the lower layers still run every step)")
        if self.top_blocks_cache and not self.top_blocks:
            raise MedmoeError("--top-blocks-cache is for --top-blocks N (the cache of the lower blocks' states)")
        if self.top_blocks_cache_dtype not in ("model", "bfloat16"):
            raise MedmoeError(f"--top-blocks-cache-dtype must be model or bfloat16, got {self.top_blocks_cache_dtype!r}")


def recorded_settings(cfg: FinetuneConfig) -> dict[str, Any]:
    """The config as the run folder records it: asdict(cfg), without the top-blocks fields when
    top_blocks is 0 (they mean nothing then), so folders written before those fields existed resume
    unchanged, and a resume that adds --top-blocks is refused as a change (`(not set) -> 4`). The same
    for dtype: recorded when it is bfloat16 or float16 (a float32 run is what older folders hold)."""
    if cfg.dtype == "auto":
        raise MedmoeError("recorded_settings: resolve the config's dtype first (precision.training_dtype)")
    settings = asdict(cfg)
    settings.pop("report_to")  # where the log goes changes nothing trained (and older folders lack it)
    settings.pop("top_blocks_cache")  # nor where the cache lives (its key checks it holds this run's states)
    settings.pop("device")  # nor the machine (checkpoints hold CPU tensors)
    settings.pop("gradient_checkpointing")  # nor recomputing the activations (the same gradients)
    settings.pop("fsdp")  # nor where the frozen weights are kept between forwards (the same numbers)
    if cfg.dtype == "float32":
        settings.pop("dtype")
    if not cfg.top_blocks:
        settings.pop("top_blocks")
        settings.pop("top_blocks_cache_dtype")
    return settings
