"""The frozen base sharded across ranks (FSDP): `medmoe finetune --fsdp`, or an accelerate FSDP config.

In a data-parallel run every rank holds the whole frozen base, so the largest model one GPU trains
is the one whose float32 weights fit on it. With --fsdp the base's weights are split across the W
ranks (torch's FSDP2, `torch.distributed.fsdp.fully_shard`): each decoder block is one FSDP unit,
all-gathered just before its forward (and again for its backward) and freed after, so a rank holds
about 1/W of the base at rest plus one block in flight.

What is sharded: the frozen weights only. The adapters' parameters (LoRA, LoRA-MoE: a few MB) are
`ignored_params`, left whole on every rank as in the data-parallel run, so everything downstream is
unchanged: their gradients are averaged by the loop's one all-reduce (distributed.py), the optimizer,
clipping, checkpoints (checkpoint.py) and the saved adapter see plain tensors, and a --fsdp run
computes what the data-parallel run computes (the all-gathered weights are the same numbers; tested
bit for bit on CPU, tests/test_finetune_sharding.py). So --fsdp is not a setting of the run: a run
may resume with or without it. --method full trains every weight, so there would be nothing frozen
to shard and its sharded training (gradients, optimizer state, checkpoints of sharded tensors) is not
built: refused.

Units: the HF model's own block classes (`_no_split_modules`, what accelerate's transformer auto-wrap
reads), then the whole model as the root unit (embeddings, final norm, LM head). Every rank must run
every forward (an all-gather is a collective), so under --fsdp the held-out loss is computed on every
rank (rank 0 logs it).

accelerate: `accelerate launch --config_file recipes/accelerate/fsdp.yaml -m medmoe finetune ...` sets
ACCELERATE_USE_FSDP, which turns --fsdp on; its fsdp_config options are accelerate's Accelerator's,
not read here (medmoe's loop does not go through Accelerator.prepare), and a warning names them.
DeepSpeed ZeRO is not supported (docs/loramoe.md, "Training on GPUs").
"""

from __future__ import annotations

import os

import torch
from torch import nn

from medmoe.errors import MedmoeError
from medmoe.train.loss import hf_model

ACCELERATE_FSDP = "ACCELERATE_USE_FSDP"
IGNORED_ACCELERATE_SETTINGS = ("FSDP_OFFLOAD_PARAMS", "FSDP_CPU_RAM_EFFICIENT_LOADING", "FSDP_STATE_DICT_TYPE")


def fsdp_requested(flag: bool) -> bool:
    """--fsdp, or an accelerate launch with an FSDP config (ACCELERATE_USE_FSDP=true)."""
    return flag or os.environ.get(ACCELERATE_FSDP, "").lower() == "true"


def accelerate_fsdp_note() -> str | None:
    """A warning when accelerate's FSDP config asks for something medmoe's sharding does not do."""
    if os.environ.get(ACCELERATE_FSDP, "").lower() != "true":
        return None
    asked = [name for name in IGNORED_ACCELERATE_SETTINGS if os.environ.get(name, "false").lower() not in ("false", "", "sharded_state_dict")]
    return (f"accelerate's FSDP config: medmoe shards the frozen base per decoder block itself (FSDP2, docs/loramoe.md); "
            f"{', '.join(asked)} are not read") if asked else None


def check_fsdp(method: str, top_blocks: int) -> None:
    if method == "full":
        raise MedmoeError("--fsdp shards the frozen base of --method lora and loramoe; --method full trains every weight, "
                          "and its sharded training is not built: run it data-parallel (without --fsdp)")
    if top_blocks:
        raise MedmoeError("--fsdp with --top-blocks: a --top-blocks run trains in one process; drop one of them")


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The FSDP units below the root: every module whose class is one of the HF model's blocks."""
    names = set(getattr(hf_model(model), "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def shard_frozen_base(model: nn.Module, device: str | torch.device, world: int) -> int:
    """Shard `model`'s frozen weights over the `world` ranks of the process group (module docstring),
    in place; returns the number of block units. The trainable parameters stay whole on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (world,))
    trainable = {p for p in model.parameters() if p.requires_grad}
    units = shard_units(model)
    if not units:
        raise MedmoeError(f"--fsdp: {type(hf_model(model)).__name__} names no block classes (_no_split_modules) to shard by")
    for unit in units:
        fully_shard(unit, mesh=mesh, ignored_params=trainable, reshard_after_forward=True)  # each unit is a root: say it
    return len(units)
