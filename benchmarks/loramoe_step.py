"""LoRA-MoE training step on CPU: the LM head at every position vs at the completion tokens only, and
adapters on the top N blocks over cached activations of the frozen lower blocks.

One fine-tuning step (forward, backward, gradient clipping, AdamW) of the default adapter of
`medmoe finetune --method loramoe` (LoraMoeConfig() on "all-linear"; --method lora: PEFT LoRA r16) on
a bundled model, timed with these losses, alternating A B C ... after a warm-up, median of --repeats:
  full_logits      model(..., labels=labels).loss: the head (Gemma-3: 262k words) at all B x T positions
  keep_union       the previous `completion_loss` (before train/loss.py): `logits_to_keep` = the positions
                   that predict a completion token in any row, the head at B x |union| positions
  completion_only  medmoe.train.loss.completion_loss: the body once, the head at the M (row, position)
                   pairs that predict a completion token, (M, D) -> (M, V)
and, with --top-blocks N (0: not measured), on a second copy of the model with the same adapter on the
last N blocks only (`medmoe finetune --top-blocks N`):
  top_full_forward completion_loss: every block runs forward, the backward stops N blocks deep
  top_cached       medmoe.train.top_blocks.top_blocks_loss: the batch's lower-block states read from an
                   ActivationCache (safetensors on disk, as finetune reads them), then only the top N
                   blocks, the final norm and the head at the M positions
  lower_forward    not a step: the one-time no-grad forward of the lower L - N blocks that fills the
                   cache for this batch's rows (a run pays it once per example, not per step)
One model and one optimizer serve the first three, the second model and its optimizer the top ones
(the adapters' weights move a little every step; the cost of a step does not depend on them). Before
timing, all losses are checked equal (eval mode, no aux losses; fresh adapters, B = 0, so the two
models compute the same function: the equality with trained adapters and the aux losses is in
tests/test_completion_loss.py and tests/test_top_blocks.py). --variants picks a subset (the full
logits of a 151k-word head are slow); the two models need twice the model's memory.

Batch: --batch rows x --seq tokens of CMExam train records, formatted and tokenized as `medmoe
finetune --data cmexam` does (medmoe.train.data: the evaluation prompt, the gold letter + EOS as the
labelled completion). A CMExam record is shorter than 384 tokens, so with --layout packed (default)
each row is consecutive records, one after another, cut at --seq: every row is --seq tokens and its
share of labelled tokens is finetune's. --layout padded: the first --batch records, right-padded as
finetune batches them (the width is the longest record, below --seq).

    PYTHONPATH=src python benchmarks/loramoe_step.py                          # the report: gemma3-270m, 4 x 384, 5 repeats
    PYTHONPATH=src python benchmarks/loramoe_step.py --model smollm2-135m --repeats 2 --batch 1   # a quick check
    PYTHONPATH=src python benchmarks/loramoe_step.py --model qwen2.5-coder-1.5b --top-blocks 4 \
        --variants completion_only,top_full_forward,top_cached,lower_forward --name loramoe_step_qwen
    PYTHONPATH=src python benchmarks/loramoe_step.py --tiny      # smoke: a tiny random Qwen2, random batch, no report

Writes reports/loramoe_step.md and .json (or --name).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _loramoe_common import alternate, ratio_summary, write_report

MODELS = ("gemma3-270m", "smollm2-135m", "qwen2.5-coder-1.5b")
VARIANTS = ("full_logits", "keep_union", "completion_only", "top_full_forward", "top_cached", "lower_forward")


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


def tiny_base_and_batch(batch: int, seq: int):
    """--tiny: a random 4-block Qwen2 (width 64) and a random (batch, seq) batch whose last 2 tokens of
    each row are the labelled completion (a smoke run of the code paths, not a measurement)."""
    import transformers as tf

    torch.manual_seed(0)
    base = tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq))
    ids = torch.randint(3, 256, (batch, seq), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    return base, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def top_fns(model, batch: dict, n_top: int, folder: str) -> dict:
    """The top-blocks variants on `model` (adapters on the last n_top blocks); the cache in `folder`."""
    from medmoe.train.loss import completion_loss
    from medmoe.train.top_blocks import ActivationCache, lower_activations, top_blocks_loss

    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    rows = [{"input_ids": ids[r][mask[r].bool()].tolist(), "labels": labels[r][mask[r].bool()].tolist()} for r in range(len(ids))]
    cache = ActivationCache.build_or_open(folder, model, rows, n_top, pad_id=0, batch_size=len(rows))
    index = list(range(len(rows)))
    return {
        "top_full_forward": lambda m: completion_loss(m, ids, mask, labels)[0],
        "top_cached": lambda m: top_blocks_loss(m, cache.states(index, ids.shape[1]), mask, labels, n_top)[0],
        "lower_forward": lambda m: lower_activations(m, ids, mask, n_top),
    }


def step_fn(model, params, optimizer, loss_of):
    """One finetune step as medmoe.train.finetune runs it (grad_accum 1, max_grad_norm 1.0)."""

    def step():
        loss = loss_of(model)
        if not loss.requires_grad:  # lower_forward: the no-grad forward that fills the cache, not a step
            return
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m", choices=MODELS, help="a bundled model")
    parser.add_argument("--method", default="loramoe", choices=("loramoe", "lora"), help="the adapter (lora: PEFT LoRA r16)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=384)
    parser.add_argument("--layout", default="packed", choices=("packed", "padded"))
    parser.add_argument("--with-explanation", action="store_true", help="completions go on with the records' explanations")
    parser.add_argument("--top-blocks", type=int, default=4, help="N for the top-blocks variants (0: not measured)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="smoke run: a tiny random Qwen2 and batch; writes no report")
    parser.add_argument("--name", default="loramoe_step", help="reports/<name>.md and .json")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown --variants {unknown}; known: {', '.join(VARIANTS)}")
    if not args.top_blocks:
        variants = [v for v in variants if not v.startswith(("top_", "lower_"))]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    from medmoe.train.finetune import FinetuneConfig, prepare_model

    if args.tiny:
        base, batch = tiny_base_and_batch(args.batch, min(args.seq, 32))
        model_name = "tiny random Qwen2 (4 blocks, width 64)"
    else:
        from medmoe.models import load_causal_lm

        base, tokenizer = load_causal_lm(args.model)
        batch = cmexam_batch(tokenizer, args.batch, args.seq, args.layout, args.with_explanation)
        model_name = args.model
    target = batch["labels"][:, 1:] != -100
    shape = {"rows": int(batch["input_ids"].shape[0]), "width": int(batch["input_ids"].shape[1]),
             "real_tokens": int(batch["attention_mask"].sum()), "completion_tokens_M": int(target.sum()),
             "union_positions_k": int(target.any(dim=0).sum()), "vocab": int(base.config.vocab_size),
             "blocks": int(base.config.num_hidden_layers),
             "final_logit_softcapping": getattr(base.config, "final_logit_softcapping", None)}
    print(shape, flush=True)

    # the adapter as `medmoe finetune --method METHOD [--top-blocks N]` builds it, seed 0
    whole_variants = [v for v in variants if v in VARIANTS[:3]]
    top_variants = [v for v in variants if v in VARIANTS[3:]]
    top_base = copy.deepcopy(base) if top_variants and whole_variants else base
    models, fns = {}, {}
    if whole_variants:
        cfg = FinetuneConfig(method=args.method)
        models["whole"] = prepare_model(base, cfg)
        fns.update({name: ("whole", fn) for name, fn in loss_fns(batch).items() if name in whole_variants})
    with tempfile.TemporaryDirectory(prefix="loramoe_step_cache-") as folder:
        if top_variants:
            cfg = FinetuneConfig(method=args.method, top_blocks=args.top_blocks)
            models["top"] = prepare_model(top_base, cfg)
            fns.update({name: ("top", fn) for name, fn in top_fns(models["top"], batch, args.top_blocks, folder).items()
                        if name in top_variants})
        fns = {name: fns[name] for name in VARIANTS if name in fns}
        trainable = {key: [p for p in m.parameters() if p.requires_grad] for key, m in models.items()}
        optimizers = {key: torch.optim.AdamW(trainable[key], lr=cfg.lr, weight_decay=cfg.weight_decay) for key in models}

        for m in models.values():
            m.eval()  # all losses agree (no aux in eval; fresh adapters: both models compute the base's function)
        with torch.no_grad():
            check = {name: float(fn(models[key])) for name, (key, fn) in fns.items() if name != "lower_forward"}
        reference = check.get("completion_only", next(iter(check.values())))
        gap = max(abs(v - reference) for v in check.values())
        print(f"losses (eval, no aux): {check}; largest gap {gap:.2e}", flush=True)

        for m in models.values():
            m.train()
        times = alternate({name: step_fn(models[key], trainable[key], optimizers[key], fn) for name, (key, fn) in fns.items()},
                          args.repeats)
    medians = {name: statistics.median(t) for name, t in times.items()}
    pairs = [(a, b) for a, b in [("full_logits", "completion_only"), ("keep_union", "completion_only"),
                                 ("completion_only", "top_cached"), ("top_full_forward", "top_cached"),
                                 ("completion_only", "top_full_forward")] if a in times and b in times]
    ratios = {f"{a}_over_{b}": ratio_summary(times, a, b) for a, b in pairs}

    counts = {key: sum(p.numel() for p in trainable[key]) for key in models}
    adapter = "the default LoRA-MoE adapter (`medmoe finetune --method loramoe`" if args.method == "loramoe" else \
        "PEFT LoRA r16 (`medmoe finetune --method lora`"
    lines = [f"Model `{model_name}` ({shape['blocks']} blocks) with {adapter}: "
             + "; ".join(f"{'every block' if key == 'whole' else f'last {args.top_blocks} blocks'} {n:,} trainable parameters"
                         for key, n in counts.items())
             + "); one step = forward, backward, gradient clipping, AdamW. Batch: "
             f"{shape['rows']} x {shape['width']} tokens"
             + ("" if args.tiny else f" of CMExam train records ({args.layout} layout{', with explanations' if args.with_explanation else ''})")
             + f", {shape['completion_tokens_M']} completion tokens predicted (M), {shape['union_positions_k']} positions "
             f"predicting one in some row (k), vocabulary {shape['vocab']:,}. {args.repeats} repeats, alternating "
             "the variants after one warm-up round.\n",
             "## Result\n",
             "| ratio | of medians | median of per-round ratios |\n| --- | ---: | ---: |"]
    for a, b in pairs:
        r = ratios[f"{a}_over_{b}"]
        lines.append(f"| {a} / {b} | {r['ratio_of_medians']:.2f} | {r['median_round_ratio']:.2f} |")
    lines += ["\n## Training step, seconds\n",
              "| loss path | adapters on | blocks run | LM head at | median s | all repeats |\n| --- | --- | --- | --- | ---: | --- |"]
    n, low = args.top_blocks, shape["blocks"] - args.top_blocks
    rows_of = {"full_logits": ("every block", "all", f"B x T = {shape['rows'] * shape['width']}"),
               "keep_union": ("every block", "all", f"B x k = {shape['rows'] * shape['union_positions_k']}"),
               "completion_only": ("every block", "all", f"M = {shape['completion_tokens_M']}"),
               "top_full_forward": (f"last {n}", "all (backward: last " + str(n) + ")", f"M = {shape['completion_tokens_M']}"),
               "top_cached": (f"last {n}", f"last {n} (lower {low}: cached)", f"M = {shape['completion_tokens_M']}"),
               "lower_forward": ("-", f"lower {low}, no grad (once per example)", "-")}
    for name, t in times.items():
        where, blocks, head = rows_of[name]
        lines.append(f"| {name} | {where} | {blocks} | {head} | {medians[name]:.3f} | {', '.join(f'{x:.2f}' for x in t)} |")
    lines.append("\nfull_logits: the model's own `labels=` loss; keep_union: the previous `completion_loss` "
                 "(`logits_to_keep` at the union of the rows' completion positions); completion_only: "
                 "`medmoe.train.loss.completion_loss`, what `medmoe finetune` runs; top_full_forward: the same loss with "
                 f"adapters on the last {n} blocks only; top_cached: `medmoe finetune --top-blocks {n}` "
                 "(`medmoe.train.top_blocks.top_blocks_loss` over states read from the cache); lower_forward: "
                 "filling the cache for this batch's rows, paid once per example.\n")
    if "top_cached" in medians and "lower_forward" in medians:
        per_example = medians["lower_forward"] / shape["rows"]
        lines.append(f"A --top-blocks {n} run of S steps of {shape['rows']} rows over E examples costs about "
                     f"S x {medians['top_cached']:.3f} s + E x {per_example:.3f} s (the cache)"
                     + (f", against S x {medians['completion_only']:.3f} s with adapters on every block" if "completion_only" in medians else "")
                     + ".\n")
    lines.append("Losses of the paths on this batch (eval mode, no aux losses): "
                 + ", ".join(f"{k} {v:.6f}" for k, v in check.items()) + f"; largest gap {gap:.1e}.\n")
    lines.append(f"Whole benchmark: {time.perf_counter() - started:.0f} s.")
    print("\n".join(lines))
    if args.tiny:
        print("--tiny: no report written")
        return
    data = {"args": vars(args), "batch": shape, "ratios": ratios, "median_s": medians, "step_s": times, "eval_losses": check,
            "largest_loss_gap": gap, "trainable_params": counts}
    path = write_report(args.name, f"LoRA-MoE training step: LM head at completion tokens only, top blocks over cached "
                        f"activations ({args.model}, CPU)", "\n".join(lines), data)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
