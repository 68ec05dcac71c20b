"""Contrastive routing loss: peak memory and step time against tokens per batch, queue vs in-batch.

One LoRA-MoE layer of SmolLM2's width (576 -> 576, 8 experts, top-2, rank 8, d_q 64) runs forward and
backward with its auxiliary losses on N tokens, in a fresh subprocess per point so that peak RSS
(resource.getrusage) belongs to that point alone. Three modes:
  none      contrastive loss off (the layer's own cost: the baseline subtracted below)
  queue     the defaults: 128 sub-sampled anchors per step against the anchors + a K=1024 memory queue
  in_batch  every token is an anchor against every other token (no queue): memory grows as N^2

    PYTHONPATH=src python benchmarks/loramoe_queue_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _loramoe_common import write_report

MODES = {
    "none": dict(contrastive_weight=0.0),
    "queue": dict(),  # the defaults: contrastive_tokens=128, queue_size=1024
    "in_batch": dict(contrastive_tokens=None, queue_size=0),
}


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_point(tokens: int, mode: str, repeats: int) -> dict:
    """Run in a fresh process: peak RSS growth and median step time of forward + backward."""
    from torch import nn

    from medmoe.loramoe import LoraMoeConfig, LoraMoeLinear
    from medmoe.loramoe.layer import RoutingContext

    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = LoraMoeConfig(num_experts=8, top_k=2, rank=8, router_dim=64, **MODES[mode])
    layer = LoraMoeLinear(nn.Linear(576, 576), cfg, RoutingContext(compute_aux=True))
    if layer.queue is not None:  # a full queue, as in steady-state training
        layer.queue.push(nn.functional.normalize(torch.randn(cfg.queue_size, 64), dim=-1), torch.randint(0, 8, (cfg.queue_size,)))
    x = torch.randn(tokens, 576)
    before = current_rss_mib()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        y = layer(x)
        loss = y.square().mean() + sum(layer.aux_losses.values(), torch.zeros(()))
        loss.backward()
        layer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tokens": tokens, "mode": mode, "peak_growth_mib": max(peak, peak_before) - before, "step_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--point", nargs=2, metavar=("TOKENS", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        print(json.dumps(measure_point(int(args.point[0]), args.point[1], args.repeats)))
        return

    rows = []
    for tokens in args.tokens:
        for mode in MODES:
            cmd = [sys.executable, __file__, "--point", str(tokens), mode, "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ})
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(row, flush=True)

    by = {(r["tokens"], r["mode"]): r for r in rows}
    lines = ["Peak RSS growth during forward + backward of one LoRA-MoE layer (576 -> 576, E=8, k=2, r=8, d_q=64) "
             "with its auxiliary losses; 'contrastive extra' subtracts the same run with the contrastive loss off. "
             f"Median step time of {args.repeats}. Each point in its own process.\n",
             "| tokens per batch | layer only MiB | queue: contrastive extra MiB | in-batch: contrastive extra MiB | layer only s | queue s | in-batch s |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for tokens in args.tokens:
        none, queue, inb = by[(tokens, "none")], by[(tokens, "queue")], by[(tokens, "in_batch")]
        lines.append(
            f"| {tokens} | {none['peak_growth_mib']:.1f} | {queue['peak_growth_mib'] - none['peak_growth_mib']:.1f} | "
            f"{inb['peak_growth_mib'] - none['peak_growth_mib']:.1f} | {none['step_s']:.4f} | {queue['step_s']:.4f} | {inb['step_s']:.4f} |"
        )
    lines.append("\nQueue mode: the anchor-candidate similarity matrix is 128 x (128 + 1024 + 8) whatever the batch; "
                 "in-batch: N x (N + 8), so memory and time grow with N^2.")
    path = write_report("loramoe_queue_memory", "Contrastive loss memory: expert memory queue vs in-batch", "\n".join(lines), {"rows": rows})
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
