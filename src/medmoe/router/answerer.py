"""The deployed MambaFormer: a router checkpoint plus its two experts, as an `Answerer`.

Per query: tokenize the query text, compute gate features, p_M = gate(features); hard decision
E_M if p_M > tau; the chosen expert scores the options. The answer carries the expert, p_M, the
gate's top features (attributions) and a latency breakdown (gate, expert, total).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from medmoe.answer import Answer
from medmoe.data.record import Record
from medmoe.errors import MedmoeError
from medmoe.eval.model import HFEvalModel
from medmoe.eval.rules import apply_rule
from medmoe.experts import Expert, load_expert
from medmoe.router.checkpoint import RouterCheckpoint
from medmoe.router.features import pad_batch
from medmoe.router.gate import torch_threads
from medmoe.router.queries import query_text


class RoutedAnswerer:
    def __init__(self, checkpoint: RouterCheckpoint, experts: dict[str, Expert]):
        self.checkpoint, self.experts = checkpoint, experts
        self.tokenizer = experts["transformer"].tokenizer  # the gate's features use E_T's vocabulary

    @classmethod
    def load(cls, router_dir: str | Path) -> "RoutedAnswerer":
        """Router checkpoint written by the pipeline; its config names the two experts."""
        checkpoint = RouterCheckpoint.load(router_dir)
        config = checkpoint.info.get("config")
        if not config:
            raise MedmoeError(f"router checkpoint {router_dir}: router.json names no experts (config missing)")
        experts = {"transformer": load_expert("transformer", config["transformer"]),
                   "mamba": load_expert("mamba", config["mamba"], tokenizer_source=config["transformer"])}
        return cls(checkpoint, experts)

    def answer_batch(self, records: Sequence[Record]) -> list[Answer]:
        """Route every record, then let each expert score its share in one batched call."""
        if any(not r.is_choice for r in records):
            raise MedmoeError("the routed system answers option questions (yes/no/maybe or lettered options)")
        start = time.perf_counter()
        ids = self.tokenizer([query_text(r) for r in records], add_special_tokens=False)["input_ids"]
        with torch_threads(1):  # tiny tensors: one thread is faster than waking the pool (docs/router.md)
            features = self.checkpoint.featurizer(*pad_batch(ids))
            reasons = self.checkpoint.gate.explain(features, tau=self.checkpoint.tau, top_tokens=3)
        gate_ms = (time.perf_counter() - start) * 1000 / len(records)  # per query, amortized
        answers: list[Answer | None] = [None] * len(records)
        for name, expert in self.experts.items():
            chosen = [i for i, why in enumerate(reasons) if why["expert"] == name]
            if not chosen:
                continue
            model = HFEvalModel(expert.model, expert.tokenizer, expert.name)
            outcomes = apply_rule(model, [records[i] for i in chosen], "letter", [[] for _ in chosen])
            for i, outcome in zip(chosen, outcomes):
                answers[i] = Answer(
                    answer=outcome.prediction,
                    expert=name,
                    label_scores=dict(outcome.probs),
                    gate_probability=reasons[i]["p_mamba"],
                    top_features=reasons[i]["top_features"][:5],
                    latency_ms={"gate": gate_ms, "expert": outcome.latency_ms, "total": gate_ms + outcome.latency_ms},
                )
        return answers  # type: ignore[return-value]

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
