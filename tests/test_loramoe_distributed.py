"""Two CPU processes (gloo) train to the same weights as one process on the same global batch."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loramoe_tiny_models import CharTokenizer, arithmetic_examples, tiny_model
from medmoe.train.finetune import FinetuneConfig, finetune

# Queue off and every token an anchor: with them on, each rank contrasts against its own queue and
# sub-sample, which by design differs from one process (docs/loramoe.md, "Data parallelism").
MOE = {"num_experts": 4, "top_k": 2, "rank": 4, "router_dim": 8, "contrastive_tokens": None, "queue_size": 0}


def _config(output: str, world: int) -> FinetuneConfig:
    # one optimizer step = 4 examples: 2 ranks x 2, or 1 process x 2 micro-batches x 2
    return FinetuneConfig(method="loramoe", output=output, steps=3, batch_size=2, grad_accum=2 // world, lr=5e-3,
                          warmup_steps=1, eval_examples=0, save_every=100, progress=False, loramoe=MOE, seed=5)


def _trained(result) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in result["model"].named_parameters() if p.requires_grad}


def _worker(rank: int, world: int, port: int, output: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, _ = tiny_model("llama")
        result = finetune(_config(output, world), model, CharTokenizer(), train_examples=arithmetic_examples(), rank=rank, world=world)
        torch.save(_trained(result), os.path.join(output, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process(tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    rank0, rank1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")

    model, _ = tiny_model("llama")
    single = _trained(finetune(_config(str(tmp_path / "single"), 1), model, CharTokenizer(), train_examples=arithmetic_examples()))

    assert rank0.keys() == single.keys() and len(single) > 0
    for name, weight in single.items():
        assert torch.equal(rank0[name], rank1[name]), name  # ranks stay in sync
        assert torch.allclose(rank0[name], weight, atol=1e-6, rtol=1e-5), name
    moved = sum(float((w - 0).abs().sum()) for n, w in single.items() if "lora_B" in n)
    assert moved > 0  # training happened (B starts at zero)
