"""LoRA-MoE speed on SmolLM2-135M: training step and inference forward, ratios in one run.

Compared, alternately (A B C A B C ...) after a warm-up, median of --repeats (--layer-repeats for part 1):
  1. layer level: one LoRA-MoE layer per compute kind (sparse kernel / dense / gather / per-expert
     loop) and the frozen base linear, fwd + bwd; then the same at 32 experts (dense cost grows with E);
  2. training step (forward, backward, AdamW): PEFT LoRA (rank 16, all linear) vs LoRA-MoE
     (8 experts, top-2, rank 8, full losses + queue; the default compute, and dense) vs the same
     LoRA-MoE with a per-expert Python loop;
  3. inference forward (no grad): base model vs LoRA-MoE.
"Ours" is the default compute ("auto": the sparse kernel on CPU fp32 when it is built, else dense).
Targets (issue): MoE step <= 1.25x PEFT LoRA; >= 2x faster than the loop; inference <= 1.3x base.
The loop ratio is reported for one layer (the issue's "of the same layer"; the lower of the two
shapes counts) and for the whole training step; the layer table also gives the adapter alone (layer
minus the frozen base linear, which both run identically).

    PYTHONPATH=src python benchmarks/loramoe_speed.py --repeats 9   # the committed report: 4 x 256 tokens, 2 threads
    PYTHONPATH=src python benchmarks/loramoe_speed.py --layer-only   # part 1 only: print the layer table (~30 s)

The committed report's run took 508 s on a 2-core machine (its last line); it varies with the machine's load.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _loramoe_common import alternate, ratio_summary, write_report
from medmoe.loramoe import LoraMoeConfig, LoraMoeLinear, LoraMoeModel

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ours_kind() -> str:
    """What compute="auto" runs here: the sparse kernel when it is built (CPU fp32), else dense."""
    from medmoe.loramoe import sparse_kernel

    return "sparse" if sparse_kernel.available() else "dense"


LAYER_CASES = [(576, 576, 8), (1536, 576, 8), (576, 576, 32)]  # d_in, d_out, experts (SmolLM2's input widths)


def layer_kernels(tokens: int, repeats: int) -> tuple[dict, dict]:
    """Forward + backward of one LoRA-MoE layer per compute kind (router included), next to the
    frozen base linear alone. A random upstream gradient, as in a model (not .sum(), whose gradient
    is one broadcast value). Returns the median seconds per case and kind, and per case the loop /
    ours ratios: of the whole layer, and of the adapter alone (each round's layer time minus that
    round's base-linear time: the part the implementations differ in)."""
    ours = ours_kind()
    kinds = list(dict.fromkeys([ours, "dense", "gather", "loop"]))
    results, loop_over_ours = {}, {}
    for d_in, d_out, experts in LAYER_CASES:
        torch.manual_seed(0)
        x = torch.randn(tokens, d_in, requires_grad=True)
        dy = torch.randn(tokens, d_out)
        base = torch.nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
        layers = {"base": base}
        for kind in kinds if experts == 8 else [k for k in kinds if k != "gather"]:
            layers[kind] = LoraMoeLinear(base, LoraMoeConfig(num_experts=experts, top_k=2, rank=8, alpha=16, compute=kind))
            torch.nn.init.normal_(layers[kind].lora_B, std=0.02)

        def run(layer, x=x, dy=dy):
            def fn():
                layer(x).backward(dy)
                x.grad = None
                for p in layer.parameters():
                    p.grad = None
            return fn

        times = alternate({k: run(layer) for k, layer in layers.items()}, repeats)
        case = f"{d_in}x{d_out}, E={experts}"
        results[case] = {k: statistics.median(v) for k, v in times.items()}
        adapter = {k: [t - b for t, b in zip(times[k], times["base"])] for k in (ours, "loop")}
        loop_over_ours[case] = {**ratio_summary(times, "loop", ours),
                                "adapter_median_round_ratio": statistics.median(a / b for a, b in zip(adapter["loop"], adapter[ours]))}
    return results, loop_over_ours


def kernel_table(kernels: dict, loop_over_ours: dict) -> list[str]:
    """The per-layer table (markdown lines)."""
    ours = ours_kind()
    kinds = list(dict.fromkeys([ours, "dense", "gather", "loop"]))
    lines = [("| d_in x d_out, experts | base linear | " + " | ".join(f"{k} (ours)" if k == ours else k for k in kinds)
              + " | loop / ours, layer: of medians (of rounds) | loop / ours, adapter only (layer - base linear) |"),
             "| --- | ---: | " + " | ".join("---:" for _ in kinds) + " | ---: | ---: |"]
    for case, r in kernels.items():
        ratio = loop_over_ours[case]
        cells = " | ".join(f"{r[k]:.4f}" if k in r else "-" for k in kinds)
        lines.append(f"| {case} | {r['base']:.4f} | {cells} "
                     f"| {ratio['ratio_of_medians']:.2f} ({ratio['median_round_ratio']:.2f}) | {ratio['adapter_median_round_ratio']:.2f} |")
    return lines


def build_variants(base, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    moe_cfg = {"num_experts": 8, "top_k": 2, "rank": 8, "alpha": 16, "target_modules": TARGETS}
    variants = {"peft_lora_r16": peft_model}
    for name, compute in [("loramoe_e8k2r8", "auto"), ("loramoe_dense", "dense"), ("loramoe_python_loop", "loop")]:
        if compute == "dense" and ours_kind() == "dense":
            continue  # "auto" is dense here already
        torch.manual_seed(seed)  # the same adapter initialisation for every compute kind
        variants[name] = LoraMoeModel(copy.deepcopy(base), LoraMoeConfig(**moe_cfg, compute=compute))
    return variants


def train_step_fn(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step():
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, sum(p.numel() for p in params)


def forward_fn(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def fwd():
        model.eval()
        with torch.no_grad():
            model(**inputs)
    return fwd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layer-repeats", type=int, default=21, help="repeats of the one-layer timings (tens of ms each)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layer-only", action="store_true", help="time one layer per compute kind, print the table, write no report")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    tokens = args.batch * args.seq
    if args.layer_only:
        print("\n".join(kernel_table(*layer_kernels(tokens, args.layer_repeats))))
        return

    from medmoe.models import load_causal_lm

    print(f"layer kernels at {tokens} tokens ...", flush=True)
    kernels, loop_over_ours = layer_kernels(tokens, args.layer_repeats)
    print(kernels, flush=True)

    base, _ = load_causal_lm(args.base)
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    variants = build_variants(base)
    steps, trainable = {}, {}
    for name, model in variants.items():
        steps[name], trainable[name] = train_step_fn(model, batch)
    print("training steps ...", flush=True)
    train_times = alternate(steps, args.repeats)
    del steps
    variants = {k: v for k, v in variants.items() if k == "loramoe_e8k2r8"}

    print("inference forward ...", flush=True)
    fwd_times = alternate({"base": forward_fn(base, batch), "loramoe_e8k2r8": forward_fn(variants["loramoe_e8k2r8"], batch)}, args.repeats)

    vs_lora = ratio_summary(train_times, "loramoe_e8k2r8", "peft_lora_r16")
    vs_loop = ratio_summary(train_times, "loramoe_python_loop", "loramoe_e8k2r8")
    vs_base = ratio_summary(fwd_times, "loramoe_e8k2r8", "base")
    layer_loop = min(r["median_round_ratio"] for case, r in loop_over_ours.items() if case.endswith("E=8"))
    checks = {  # name -> (measured, target, met)
        "train_step_vs_peft_lora (target <= 1.25)": (vs_lora["ratio_of_medians"], vs_lora["ratio_of_medians"] <= 1.25),
        "python_loop_over_ours, one layer fwd+bwd, lower of the two shapes at E=8 (target >= 2.0)": (layer_loop, layer_loop >= 2.0),
        "python_loop_over_ours, whole training step (target >= 2.0)": (vs_loop["ratio_of_medians"], vs_loop["ratio_of_medians"] >= 2.0),
        "inference_vs_base (target <= 1.3)": (vs_base["ratio_of_medians"], vs_base["ratio_of_medians"] <= 1.3),
    }
    met = {k: ok for k, (_, ok) in checks.items()}
    checks = {k: v for k, (v, _) in checks.items()}

    lines = [f"Base `{args.base}`, batch {args.batch} x {args.seq} tokens, {args.repeats} repeats, alternating, after one warm-up.\n"]
    lines.append("## Targets\n\n| ratio | measured | target met |\n| --- | ---: | --- |")
    lines += [f"| {k} | {v:.3f} | {'yes' if met[k] else 'NO'} |" for k, v in checks.items()]
    lines.append("\n## Training step (forward + backward + AdamW), seconds\n")
    lines.append("| variant | trainable params | median s | all repeats |\n| --- | ---: | ---: | --- |")
    for name, t in train_times.items():
        lines.append(f"| {name} | {trainable[name]:,} | {statistics.median(t):.3f} | {', '.join(f'{x:.2f}' for x in t)} |")
    lines.append(f"\nMedian of per-round ratios: MoE / LoRA {vs_lora['median_round_ratio']:.3f}; loop / MoE {vs_loop['median_round_ratio']:.3f}.\n")
    lines.append("## Inference forward (no grad), seconds\n\n| model | median s | all repeats |\n| --- | ---: | --- |")
    for name, t in fwd_times.items():
        lines.append(f"| {name} | {statistics.median(t):.3f} | {', '.join(f'{x:.2f}' for x in t)} |")
    lines.append(f"\nMedian of per-round ratios: MoE / base {vs_base['median_round_ratio']:.3f}.\n")
    lines.append(f"## One layer (fwd + bwd, {tokens} tokens, top-2, rank 8, router included), median seconds\n")
    lines.append(f"Ours = `compute=\"auto\"`, here `{ours_kind()}`. At 32 experts the dense form computes 32 experts' A x and B h "
                 "per token; the sparse kernel still computes two.\n")
    lines += kernel_table(kernels, loop_over_ours)
    lines.append(f"\nWhole benchmark: {time.perf_counter() - started:.0f} s.")
    data = {"args": vars(args), "ratios": checks, "targets_met": met, "train_step_s": train_times,
            "forward_s": fwd_times, "trainable_params": trainable, "kernels_median_s": kernels, "kernels_loop_over_ours": loop_over_ours,
            "round_ratios": {"moe_over_lora": vs_lora, "loop_over_moe": vs_loop, "moe_over_base": vs_base}}
    path = write_report("loramoe_speed", "LoRA-MoE speed (SmolLM2-135M, CPU)", "\n".join(lines), data)
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
