"""Where a training run computes and in what precision: `medmoe finetune --device D --dtype T`.

Mixed precision, as training means it (not the frozen base stored in T):

  - every weight stays float32: the frozen base, the trainable adapters (LoRA, LoRA-MoE) or the full
    model's weights, AdamW's moments, the gradients (the master weights of mixed-precision training);
  - T = bfloat16 | float16: each micro-batch's forward runs under torch.autocast(device_type, T), so
    the matmuls compute in T while norms, softmax and the loss (completion_loss upcasts the logits)
    stay float32; the backward runs outside the autocast region, in the dtypes the forward chose;
  - T = float16 adds a GradScaler (torch.amp): the loss is scaled before backward, the gradients are
    unscaled before clipping, a step with inf/NaN gradients is skipped and the scale lowered. Its
    state (scale, growth tracker) is checkpointed, so a resume is exact;
  - T = float32: no autocast, no scaler: the run as before these options existed.

`auto`: bfloat16 autocast on a CUDA GPU that supports it, float32 elsewhere. Not bfloat16 on CPU
even where the CPU has bfloat16 instructions (the inference default of medmoe.models.placement):
one measured LoRA-MoE training step of SmolLM2-135M on this project's CPU took 7.32 s under bfloat16
autocast against 7.40 s in float32 (docs/loramoe.md, "Training on GPUs"), no gain worth the rounding,
and the LoRA-MoE sparse C++ kernel, the fastest CPU path, computes in float32 only.

The dtype changes the numbers, so it is a setting of the run (a resume with another is refused);
the device is not (a run may move machines: checkpoints hold CPU tensors).

Device: auto | cpu | cuda | cuda:N | mps (medmoe.models.placement.parse_device). Under torchrun or
accelerate launch with more than one process, rank r uses cuda:LOCAL_RANK (`--device cuda` or `auto`;
a fixed cuda:N is refused there: every rank would share one GPU).
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from medmoe.errors import MedmoeError
from medmoe.models.placement import parse_dtype, resolve_device, torch_dtype

AUTOCAST_DTYPES = ("bfloat16", "float16")


def local_rank() -> int:
    """This process's index on its machine: LOCAL_RANK (set by torchrun and accelerate launch), else 0."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def training_device(device: str, world: int = 1) -> str:
    """The torch device of this rank: `device` resolved (placement.resolve_device); with world > 1
    on CUDA, cuda:LOCAL_RANK."""
    resolved = resolve_device(device)
    if world > 1 and resolved == "mps":
        raise MedmoeError("--device mps: the process group of a multi-process run (gloo) cannot reduce MPS tensors; "
                          "train on one process, or use --device cpu")
    if world <= 1 or resolved.split(":")[0] != "cuda":
        return resolved
    if ":" in resolved:
        raise MedmoeError(f"--device {resolved}: under torchrun / accelerate launch ({world} processes) each rank uses its "
                          "own GPU, cuda:LOCAL_RANK; give --device cuda or auto (CUDA_VISIBLE_DEVICES picks the GPUs)")
    index = local_rank()
    count = torch.cuda.device_count()
    if index >= count:
        raise MedmoeError(f"LOCAL_RANK {index}: this machine has {count} CUDA GPU(s); start at most {count} processes per "
                          "machine (torchrun --nproc-per-node, accelerate launch --num_processes)")
    return f"cuda:{index}"


def training_dtype(dtype: str, device: str) -> str:
    """The autocast dtype name of a run on `device` (resolved): `auto` as the module docstring says."""
    name = parse_dtype(dtype)
    if name != "auto":
        return name
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


@dataclass(frozen=True)
class Precision:
    """A run's device and autocast dtype (resolved names), and what they imply for a training step."""

    device: str = "cpu"
    dtype: str = "float32"

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type

    @property
    def mixed(self) -> bool:
        return self.dtype in AUTOCAST_DTYPES

    def autocast(self) -> AbstractContextManager[Any]:
        """The forward's context: torch.autocast(device_type, dtype), or nothing for float32."""
        if not self.mixed:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=torch_dtype(self.dtype))

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A GradScaler for float16 (its gradients underflow without one), else None."""
        return torch.amp.GradScaler(self.device_type) if self.dtype == "float16" else None

    def use(self) -> None:
        """Make this run's GPU the current one (torch.cuda.set_device): CUDA RNG state, NCCL and the
        kernels' default device follow it."""
        if self.device_type == "cuda":
            torch.cuda.set_device(torch.device(self.device))


def to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    """A collated batch (data.collate: CPU tensors) on `device`."""
    if device == "cpu":
        return batch
    return {name: t.to(device, non_blocking=True) for name, t in batch.items()}
