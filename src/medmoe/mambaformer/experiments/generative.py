"""Generative MambaFormer: each expert writes an answer with an explanation; ROUGE-L and BERTScore.

For option questions that carry a reference explanation (Dental: MedMCQA's `exp` field), every
expert generates greedily after the explanation prompt (`build_prompt(..., kind="none",
explain=True)`: the harness's prompt with "Then explain your answer briefly." appended; chat
template where the tokenizer has one) through the harness's `HFEvalModel.generate`. Each generation
is scored against the reference explanation:
  rouge_l                      ROUGE-L F1 (textmetrics.rouge_l)
  bertscore_p / _r / _f1       BERTScore with the named local encoder of the record's language
  correct                      whether the letter the strict extractor reads from it is the gold one
Systems, all on the same queries:
  transformer, mamba           one expert alone
  mambaformer                  the gate (the router checkpoint's own `RoutedAnswerer.route`) picks the
                               expert per query; its row is that expert's generation (greedy decoding
                               is deterministic, so a second pass would only add noise) and its
                               latency that generation's plus the gate's measured cost for the query
  oracle-rouge                 per query the expert with the higher ROUGE-L (ties: E_T); an upper
                               bound that reads the reference, not a deployable router
Expert rows are appended to `<folder>/<expert>.jsonl` as they finish (resumable, as the harness's
runs; `run.json` holds the settings a resumed run must match): `cached_rows`, which the gate trained on
the generative utility (`generative_routing`) calls once per split too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from medmoe.data.record import Record
from medmoe.errors import MedmoeError
from medmoe.eval.extract import extract_letters, extract_yesno
from medmoe.eval.metrics import bootstrap_mean, percentile
from medmoe.eval.model import HFEvalModel
from medmoe.eval.prompts import build_prompt, is_yesno, language_of, may_have_several_answers
from medmoe.eval.runner import check_settings, claim_folder, progress_bar, read_done
from medmoe.eval.textmetrics import BertScorer, load_bertscorer, rouge_l
from medmoe.mambaformer.answerer import RoutedAnswerer
from medmoe.mambaformer.experts import Expert

EXPERTS = ("transformer", "mamba")
SYSTEMS = EXPERTS + ("mambaformer", "oracle-rouge")


def explained_records(records: Sequence[Record]) -> list[Record]:
    """The option questions that have a reference explanation (the only ones that can be scored)."""
    return [r for r in records if r.is_choice and (r.explanation or "").strip()]


def extracted_answer(record: Record, text: str) -> str:
    """The answer letter(s) the strict extractor reads from a generation ("" when none)."""
    if is_yesno(record):
        return extract_yesno(text).letters
    return extract_letters(text, record.letters, may_have_several_answers(record)).letters


def generate_row(model: HFEvalModel, record: Record, scorer: BertScorer, max_new_tokens: int) -> dict[str, Any]:
    """One expert's explanation of one record, timed and scored against the reference."""
    prompt = build_prompt(record, model.tokenizer, (), "none", explain=True)
    start = time.perf_counter()
    gen = model.generate(prompt.context, max_new_tokens)
    latency_ms = (time.perf_counter() - start) * 1000
    reference = cast(str, record.explanation)  # generation runs on records with an explanation
    precision, recall, f1 = scorer.score(gen.text, reference)
    answer = extracted_answer(record, gen.text)
    return {
        "id": record.id, "expert": model.name, "generation": gen.text, "reference": record.explanation,
        "answer": answer, "gold": record.answer, "correct": answer == record.answer,
        "rouge_l": rouge_l(gen.text, reference),
        "bertscore_p": precision, "bertscore_r": recall, "bertscore_f1": f1, "bertscore_encoder": scorer.name,
        "latency_ms": latency_ms, "prompt_tokens": gen.prompt_tokens, "new_tokens": gen.new_tokens,
    }


def expert_rows(experts: Mapping[str, Expert], records: Sequence[Record], folder: Path, max_new_tokens: int,
                bertscorer: Callable[[str], BertScorer]) -> dict[str, list[dict[str, Any]]]:
    """Every expert's rows for `records` (in record order), generating only those not yet in `folder`."""
    scorers: dict[str, BertScorer] = {}
    rows: dict[str, list[dict[str, Any]]] = {}
    for name in EXPERTS:
        expert = experts[name]
        model = HFEvalModel(expert.model, expert.tokenizer, name)
        path = folder / f"{name}.jsonl"
        done = read_done(path)
        todo = [r for r in records if r.id not in done]
        with progress_bar(f"explain {name}") as bar, path.open("a", encoding="utf-8") as sink:
            task = bar.add_task(name, total=len(records), completed=len(records) - len(todo))
            for record in todo:
                language = language_of(record)
                if language not in scorers:
                    scorers[language] = bertscorer(language)
                row = generate_row(model, record, scorers[language], max_new_tokens)
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                sink.flush()
                done[record.id] = row
                bar.advance(task)
        rows[name] = [done[r.id] for r in records]
    return rows


def cached_rows(experts: Mapping[str, Expert], records: Sequence[Record], folder: Path, max_new_tokens: int,
                bertscorer: Callable[[str], BertScorer], settings: dict[str, Any] | None = None) -> dict[str, list[dict[str, Any]]]:
    """`expert_rows` in the run folder `folder`, locked (`claim_folder`) and with its settings pinned in run.json
    (max new tokens, the prompt, and `settings`: a resumed run with others is refused); what every
    generative run calls (this module's `generative_run`, `generative_routing` once per split)."""
    folder.mkdir(parents=True, exist_ok=True)
    claim_folder(folder)
    check_settings(folder, {"max_new_tokens": max_new_tokens, "prompt": "explain", **(settings or {})})
    return expert_rows(experts, records, folder, max_new_tokens, bertscorer)


def route_each(router: RoutedAnswerer, records: Sequence[Record]) -> tuple[list[str], list[float], list[float]]:
    """(expert, p_M, gate ms) per record, routed one query at a time as served."""
    experts, probabilities, costs = [], [], []
    for record in records:
        start = time.perf_counter()
        expert, p_mamba = router.route([record])[0]
        costs.append((time.perf_counter() - start) * 1000)
        experts.append(expert)
        probabilities.append(p_mamba)
    return experts, probabilities, costs


def summarize(chosen: Sequence[str], rows: dict[str, list[dict[str, Any]]], extra_ms: Sequence[float],
              baseline_rouge: Sequence[float]) -> dict[str, Any]:
    """Metrics of a system that takes expert `chosen[i]`'s row for query i (plus `extra_ms` latency)."""
    picked = [rows[name][i] for i, name in enumerate(chosen)]
    latency = [r["latency_ms"] + extra for r, extra in zip(picked, extra_ms)]
    rouge = [r["rouge_l"] for r in picked]
    bert = [r["bertscore_f1"] for r in picked]
    correct = [float(r["correct"]) for r in picked]
    new_tokens = sum(r["new_tokens"] for r in picked)
    delta = np.asarray(rouge) - np.asarray(baseline_rouge)  # paired difference to E_T, per query
    return {
        "examples": len(picked),
        "rouge_l": float(np.mean(rouge)), "rouge_l_ci": bootstrap_mean(rouge),
        "rouge_l_minus_transformer": float(delta.mean()), "rouge_l_minus_transformer_ci": bootstrap_mean(delta),
        "bertscore_f1": float(np.mean(bert)), "bertscore_f1_ci": bootstrap_mean(bert),
        "answer_accuracy": float(np.mean(correct)), "answer_accuracy_ci": bootstrap_mean(correct),
        "latency_p50_ms": percentile(latency, 50), "latency_p95_ms": percentile(latency, 95),
        "new_tokens_mean": new_tokens / len(picked),
        "new_tokens_per_s": new_tokens / (sum(latency) / 1000) if sum(latency) > 0 else 0.0,
        "share_mamba": sum(name == "mamba" for name in chosen) / len(chosen),
    }


def generative_run(router: RoutedAnswerer, records: Sequence[Record], folder: Path, max_new_tokens: int = 64,
                   bertscorer: Callable[[str], BertScorer] = load_bertscorer,
                   settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Generate, score and route (module docstring); returns per-system summaries and per-query rows."""
    records = explained_records(records)
    if not records:
        raise MedmoeError("generative run: no option question with a reference explanation to score")
    rows = cached_rows(router.experts, records, folder, max_new_tokens, bertscorer, settings)
    routed, p_mamba, gate_ms = route_each(router, records)
    oracle = ["mamba" if m["rouge_l"] > t["rouge_l"] else "transformer"  # ties: E_T
              for t, m in zip(rows["transformer"], rows["mamba"])]
    zero = [0.0] * len(records)
    base = [r["rouge_l"] for r in rows["transformer"]]
    systems = {
        "transformer": summarize(["transformer"] * len(records), rows, zero, base),
        "mamba": summarize(["mamba"] * len(records), rows, zero, base),
        "mambaformer": summarize(routed, rows, gate_ms, base),
        "oracle-rouge": summarize(oracle, rows, zero, base),
    }
    per_query = [
        {"id": r.id, "p_mamba": p, "routed": e, "oracle": o, "gate_ms": g,
         **{f"rouge_l_{name}": rows[name][i]["rouge_l"] for name in EXPERTS},
         **{f"bertscore_f1_{name}": rows[name][i]["bertscore_f1"] for name in EXPERTS}}
        for i, (r, p, e, o, g) in enumerate(zip(records, p_mamba, routed, oracle, gate_ms))
    ]
    encoders = sorted({row["bertscore_encoder"] for name in EXPERTS for row in rows[name]})
    return {"systems": systems, "per_query": per_query, "tau": router.checkpoint.tau,
            "gate_ms_p50": percentile(gate_ms, 50), "bertscore_encoders": encoders,
            "max_new_tokens": max_new_tokens, "examples": len(records)}
