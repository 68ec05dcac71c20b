"""Data-parallel training through torch.distributed (torchrun, accelerate launch, or spawn).

Each rank computes gradients on its slice of the global micro-batch; gradients are summed with one
all_reduce over a flat buffer and divided by the world size, so every rank applies the same update.
The LoRA-MoE auxiliary losses and memory queues are per rank (each rank contrasts against its own
queue, as MoCo does without shuffling); so are the RNG streams, and each rank checkpoints its own
(checkpoint.py).

Launchers: torchrun and `accelerate launch` (its torchrun launcher: `--multi_gpu`, or a config with
`distributed_type: MULTI_GPU`, recipes/accelerate/) both set RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT, which init_from_env reads. The backend follows the training device:
NCCL when the run is on CUDA (each rank first takes cuda:LOCAL_RANK with torch.cuda.set_device), gloo
on CPU, even on a machine with GPUs (`--device cpu`).

Why the all-reduce is written by hand, not DistributedDataParallel: the trainable tensors of LoRA and
LoRA-MoE are a few MB, so one collective per optimizer step after the last micro-batch costs little,
and the loop stays the same for 1 and N processes (gradient accumulation needs no `no_sync`). What DDP
would add is overlapping the communication with the backward pass (bucketed all-reduces): that pays
for --method full of a large model, where the flat buffer also doubles the gradients' memory.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device: str = "auto") -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched with WORLD_SIZE > 1: NCCL on
    CUDA, after torch.cuda.set_device(LOCAL_RANK), gloo otherwise. `device` is the run's --device
    (auto | cpu | cuda | mps ...): auto means CUDA when torch sees a GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        kind = device.split(":")[0] if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if kind == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launcher_note() -> str | None:
    """A warning when a launcher asked for several processes but started one: `accelerate launch --cpu
    --num_processes N` runs one process (its --cpu launcher needs an MPI hostfile for more) and sets
    MASTER_ADDR, as it does only for N > 1, but no WORLD_SIZE. None otherwise."""
    asked = "MASTER_ADDR" in os.environ and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true"
    if not asked or "WORLD_SIZE" in os.environ:
        return None
    return ("accelerate launch --cpu started ONE process (without an MPI hostfile its --cpu launcher does not start more); "
            "for N CPU processes use `accelerate launch --config_file recipes/accelerate/cpu_ddp.yaml` (or --multi_gpu "
            "--num_processes N) with --device cpu, or torchrun --nproc-per-node N")


def all_reduce_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Average gradients over ranks: one all_reduce of the concatenated gradients."""
    if world <= 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def barrier(world: int) -> None:
    if world > 1 and dist.is_initialized():
        dist.barrier()
