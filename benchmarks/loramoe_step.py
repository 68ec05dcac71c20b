"""LoRA-MoE training step on CPU: the LM head at every position vs at the completion tokens only.

One fine-tuning step (forward, backward, gradient clipping, AdamW) of the default LoRA-MoE adapter
(`medmoe finetune --method loramoe`, LoraMoeConfig() on "all-linear") on a bundled model, timed with
three losses, alternating A B C A B C after a warm-up, median of --repeats:
  full_logits      model(..., labels=labels).loss: the head (Gemma-3: 262k words) at all B x T positions
  keep_union       the previous `completion_loss` (before train/loss.py): `logits_to_keep` = the positions
                   that predict a completion token in any row, the head at B x |union| positions
  completion_only  medmoe.train.loss.completion_loss: the body once, the head at the M (row, position)
                   pairs that predict a completion token, (M, D) -> (M, V)
One model and one optimizer serve all three (the adapter's weights move a little every step; the cost
of a step does not depend on them). Before timing, the three losses are checked equal (eval mode, no
aux losses: completion_loss's equality with the aux losses is in tests/test_completion_loss.py).

Batch: --batch rows x --seq tokens of CMExam train records, formatted and tokenized as `medmoe
finetune --data cmexam` does (medmoe.train.data: the evaluation prompt, the gold letter + EOS as the
labelled completion). A CMExam record is shorter than 384 tokens, so with --layout packed (default)
each row is consecutive records, one after another, cut at --seq: every row is --seq tokens and its
share of labelled tokens is finetune's. --layout padded: the first --batch records, right-padded as
finetune batches them (the width is the longest record, below --seq).

    PYTHONPATH=src python benchmarks/loramoe_step.py                          # the report: gemma3-270m, 4 x 384, 5 repeats
    PYTHONPATH=src python benchmarks/loramoe_step.py --model smollm2-135m --repeats 2 --batch 1   # a quick check

Writes reports/loramoe_step.md and .json (or --name).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _loramoe_common import alternate, ratio_summary, write_report

MODELS = ("gemma3-270m", "smollm2-135m")


def cmexam_batch(tokenizer, batch: int, seq: int, layout: str, with_explanation: bool) -> dict[str, torch.Tensor]:
    """(batch, seq) input_ids / attention_mask / labels from CMExam's train split, finetune's formatting."""
    from medmoe.train.data import collate, load_examples, tokenize_examples

    examples = load_examples("cmexam", tokenizer, with_explanation=with_explanation)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if layout == "padded":
        return collate(tokenize_examples(examples[:batch], tokenizer, seq), pad_id)
    rows, ids, labels, i = [], [], [], 0
    while len(rows) < batch:
        if i >= len(examples):
            raise SystemExit(f"CMExam's train split has too few records for {batch} x {seq} tokens")
        feature = tokenize_examples([examples[i]], tokenizer, seq)[0]
        i += 1
        ids, labels = ids + feature["input_ids"], labels + feature["labels"]
        if len(ids) >= seq:
            rows.append({"input_ids": ids[:seq], "labels": labels[:seq]})
            ids, labels = [], []
    return collate(rows, pad_id)


def keep_union_loss(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """The previous completion_loss for a causal LM: the head at the union over rows of the positions
    that predict a completion token (`logits_to_keep`), then the mean cross-entropy, plus aux."""
    target = labels[:, 1:]                                                  # (B, T-1)
    positions = (target != -100).any(dim=0).nonzero()[:, 0]                # (k,)
    out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=positions)
    logits, target = out.logits, target[:, positions]                       # (B, k, V), (B, k)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)
    aux = out.get("aux_loss")
    return loss + aux if aux is not None else loss


def loss_fns(batch: dict) -> dict:
    from medmoe.train.loss import completion_loss

    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    return {
        "full_logits": lambda m: m(input_ids=args[0], attention_mask=args[1], labels=args[2]).loss,
        "keep_union": lambda m: keep_union_loss(m, *args),
        "completion_only": lambda m: completion_loss(m, *args)[0],
    }


def step_fn(model, params, optimizer, loss_of):
    """One finetune step as medmoe.train.finetune runs it (grad_accum 1, max_grad_norm 1.0)."""

    def step():
        loss = loss_of(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m", choices=MODELS, help="a bundled model")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=384)
    parser.add_argument("--layout", default="packed", choices=("packed", "padded"))
    parser.add_argument("--with-explanation", action="store_true", help="completions go on with the records' explanations")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="loramoe_step", help="reports/<name>.md and .json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    from medmoe.models import load_causal_lm
    from medmoe.train.finetune import FinetuneConfig, prepare_model

    base, tokenizer = load_causal_lm(args.model)
    batch = cmexam_batch(tokenizer, args.batch, args.seq, args.layout, args.with_explanation)
    target = batch["labels"][:, 1:] != -100
    shape = {"rows": int(batch["input_ids"].shape[0]), "width": int(batch["input_ids"].shape[1]),
             "real_tokens": int(batch["attention_mask"].sum()), "completion_tokens_M": int(target.sum()),
             "union_positions_k": int(target.any(dim=0).sum()), "vocab": int(base.config.vocab_size),
             "final_logit_softcapping": getattr(base.config, "final_logit_softcapping", None)}
    print(shape, flush=True)

    cfg = FinetuneConfig(method="loramoe")  # the default adapter, seed 0, as `medmoe finetune` builds it
    model = prepare_model(base, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    fns = loss_fns(batch)

    model.eval()  # the three losses agree (no aux in eval; with aux: tests/test_completion_loss.py)
    with torch.no_grad():
        check = {name: float(fn(model)) for name, fn in fns.items()}
    gap = max(abs(v - check["full_logits"]) for v in check.values())
    print(f"losses (eval, no aux): {check}; largest gap {gap:.2e}", flush=True)

    model.train()
    times = alternate({name: step_fn(model, params, optimizer, fn) for name, fn in fns.items()}, args.repeats)
    medians = {name: statistics.median(t) for name, t in times.items()}
    vs_full = ratio_summary(times, "full_logits", "completion_only")
    vs_union = ratio_summary(times, "keep_union", "completion_only")

    lines = [f"Model `{args.model}` with the default LoRA-MoE adapter (`medmoe finetune --method loramoe`: "
             f"{sum(p.numel() for p in params):,} trainable parameters); one step = forward, backward, gradient "
             f"clipping, AdamW. Batch: {shape['rows']} x {shape['width']} tokens of CMExam train records "
             f"({args.layout} layout{', with explanations' if args.with_explanation else ''}), "
             f"{shape['completion_tokens_M']} completion tokens predicted (M), {shape['union_positions_k']} positions "
             f"predicting one in some row (k), vocabulary {shape['vocab']:,}. {args.repeats} repeats, alternating "
             "A B C after one warm-up round.\n",
             "## Result\n",
             "| ratio | of medians | median of per-round ratios |\n| --- | ---: | ---: |",
             f"| full_logits / completion_only | {vs_full['ratio_of_medians']:.2f} | {vs_full['median_round_ratio']:.2f} |",
             f"| keep_union / completion_only | {vs_union['ratio_of_medians']:.2f} | {vs_union['median_round_ratio']:.2f} |",
             "\n## Training step, seconds\n",
             "| loss path | LM head at | median s | all repeats |\n| --- | --- | ---: | --- |"]
    head_at = {"full_logits": f"B x T = {shape['rows'] * shape['width']}",
               "keep_union": f"B x k = {shape['rows'] * shape['union_positions_k']}",
               "completion_only": f"M = {shape['completion_tokens_M']}"}
    for name, t in times.items():
        lines.append(f"| {name} | {head_at[name]} | {medians[name]:.3f} | {', '.join(f'{x:.2f}' for x in t)} |")
    lines.append("\nfull_logits: the model's own `labels=` loss; keep_union: the previous `completion_loss` "
                 "(`logits_to_keep` at the union of the rows' completion positions); completion_only: "
                 "`medmoe.train.loss.completion_loss`, what `medmoe finetune` runs.\n")
    lines.append("Losses of the three paths on this batch (eval mode, no aux losses): "
                 + ", ".join(f"{k} {v:.6f}" for k, v in check.items()) + f"; largest gap {gap:.1e}.\n")
    lines.append(f"Whole benchmark: {time.perf_counter() - started:.0f} s.")
    data = {"args": vars(args), "batch": shape, "ratios": {"full_logits_over_completion_only": vs_full,
                                                            "keep_union_over_completion_only": vs_union},
            "median_s": medians, "step_s": times, "eval_losses": check, "largest_loss_gap": gap,
            "trainable_params": sum(p.numel() for p in params)}
    path = write_report(args.name, f"LoRA-MoE training step: LM head at completion tokens only ({args.model}, CPU)",
                        "\n".join(lines), data)
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
