"""The deployed MambaFormer: a router checkpoint plus its two experts, as an `Answerer`.

Per query: tokenize the query text, compute gate features, p_M = gate(features); hard decision
E_M if p_M > tau; the chosen expert scores the options with the pipeline's rule (`letter`,
zero-shot). `score_records` returns the harness's `Outcome`s (what `medmoe eval --router` writes);
`answer_batch` turns them into `Answer`s with the gate's top features (attributions) for `ask` and
the server. Latency per query = the gate's decision (tokenizing, features, gate forward; amortized
over the batch) + the chosen expert's scoring; the attributions are computed after, outside it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from medmoe.answer import Answer
from medmoe.data.record import Record
from medmoe.errors import MedmoeError, ModelError
from medmoe.eval.model import HFEvalModel
from medmoe.eval.rules import Outcome, apply_rule
from medmoe.experts import Expert, load_expert
from medmoe.router.checkpoint import RouterCheckpoint
from medmoe.router.features import pad_batch
from medmoe.router.gate import torch_threads
from medmoe.router.queries import query_text

RULE = "letter"  # how each expert scores in the pipeline (zero-shot): the outcomes the gate was trained on


class RoutedAnswerer:
    def __init__(self, checkpoint: RouterCheckpoint, experts: dict[str, Expert], name: str = "mambaformer"):
        self.checkpoint, self.experts, self.name = checkpoint, experts, name
        self.tokenizer = experts["transformer"].tokenizer  # the gate's features use E_T's vocabulary

    @classmethod
    def load(cls, router_dir: str | Path) -> "RoutedAnswerer":
        """Router checkpoint written by the pipeline; its config names the two experts."""
        checkpoint = RouterCheckpoint.load(router_dir)
        config = checkpoint.info.get("config") or {}
        if not (isinstance(config, dict) and config.get("transformer") and config.get("mamba")):
            raise ModelError(f"router checkpoint {router_dir}: router.json names no experts (config.transformer and "
                             "config.mamba, written by `medmoe run`; a `medmoe train router` gate names only its Transformer)")
        experts = {"transformer": load_expert("transformer", config["transformer"]),
                   "mamba": load_expert("mamba", config["mamba"], tokenizer_source=config["transformer"])}
        return cls(checkpoint, experts, name=f"mambaformer:{router_dir}")

    def score_records(self, records: Sequence[Record], rule: str = RULE, shots: Sequence[Sequence[Record]] = (),
                      multi: bool = False, max_new_tokens: int = 32) -> list[Outcome]:
        """Route every record, then let each expert score its share in one batched call (the harness's hook:
        `medmoe.eval.rules.apply_rule` calls it for this system). Outcome.latency_ms = gate + expert;
        Outcome.route = {expert, gate_probability (p_M), tau, gate_ms, expert_ms}."""
        if rule != RULE or any(shots):
            raise MedmoeError(f"the routed system scores as its experts did when the gate was trained: rule {RULE!r}, "
                              f"zero-shot (got rule {rule!r}, {max((len(s) for s in shots), default=0)} shots)")
        if any(not r.is_choice for r in records):
            raise MedmoeError("the routed system answers option questions (yes/no/maybe or lettered options)")
        start = time.perf_counter()
        routes = self.route(records)
        gate_ms = (time.perf_counter() - start) * 1000 / len(records)  # per query, amortized
        outcomes: list[Outcome | None] = [None] * len(records)
        for name, expert in self.experts.items():
            chosen = [i for i, (picked, _) in enumerate(routes) if picked == name]
            if not chosen:
                continue
            model = HFEvalModel(expert.model, expert.tokenizer, expert.name)
            scored = apply_rule(model, [records[i] for i in chosen], RULE, [[] for _ in chosen], multi, max_new_tokens)
            for i, outcome in zip(chosen, scored):
                outcome.route = {"expert": name, "gate_probability": routes[i][1], "tau": self.checkpoint.tau,
                                 "gate_ms": gate_ms, "expert_ms": outcome.latency_ms}
                outcome.latency_ms += gate_ms
                outcomes[i] = outcome
        return outcomes  # type: ignore[return-value]

    def answer_batch(self, records: Sequence[Record]) -> list[Answer]:
        """`score_records` as `Answer`s, with the gate's top features (why this expert)."""
        outcomes = self.score_records(records)
        ids = self.tokenizer([query_text(r) for r in records], add_special_tokens=False)["input_ids"]
        with torch_threads(1):  # tiny tensors: one thread is faster than waking the pool (docs/router.md)
            reasons = self.checkpoint.explain(*pad_batch(ids), top_tokens=3)
        return [Answer(answer=o.prediction, expert=o.route["expert"], label_scores=dict(o.probs),
                       gate_probability=o.route["gate_probability"], top_features=why["top_features"][:5],
                       latency_ms={"gate": o.route["gate_ms"], "expert": o.route["expert_ms"], "total": o.latency_ms})
                for o, why in zip(outcomes, reasons)]

    def answer(self, record: Record) -> Answer:
        return self.answer_batch([record])[0]

    def route(self, records: Sequence[Record]) -> list[tuple[str, float]]:
        """(expert, p_M) per record: the gate's hard decision at tau over each query's text."""
        ids = self.tokenizer([query_text(r) for r in records], add_special_tokens=False)["input_ids"]
        p_mamba, to_mamba = self.checkpoint.route(*pad_batch(ids), threads=1)
        return [("mamba" if m else "transformer", p) for p, m in zip(p_mamba.tolist(), to_mamba.tolist())]

    def batch_key(self, record: Record) -> str:
        """The expert the gate picks: the server batches requests for the same expert together."""
        return self.route([record])[0][0]


def load_routed_answerer(config) -> RoutedAnswerer:
    """Server factory (`answerer: medmoe.router.answerer:load_routed_answerer`, with
    `answerer_options: {router: runs/mambaformer/pubmedqa/router}`)."""
    options = getattr(config, "answerer_options", {}) or {}
    if "router" not in options:
        raise MedmoeError("server config: answerer_options.router must name a router checkpoint folder")
    return RoutedAnswerer.load(options["router"])
