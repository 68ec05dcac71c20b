"""Data-parallel training through torch.distributed (torchrun, accelerate launch, or spawn).

Each rank computes gradients on its slice of the global micro-batch; gradients are summed with one
all_reduce over a flat buffer and divided by the world size, so every rank applies the same update.
The LoRA-MoE auxiliary losses and memory queues are per rank (each rank contrasts against its own
queue, as MoCo does without shuffling).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
