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
        return [self.answer(record) for record in records]

    def answer(self, record: Record) -> Answer:
        if not record.is_choice:
            raise MedmoeError("the routed system answers option questions (yes/no/maybe or lettered options)")
        start = time.perf_counter()
        ids = self.tokenizer([query_text(record)], add_special_tokens=False)["input_ids"]
        with torch_threads(1):  # tiny tensors: one thread is faster than waking the pool (docs/router.md)
            features = self.checkpoint.featurizer(*pad_batch(ids))
            [why] = self.checkpoint.gate.explain(features, tau=self.checkpoint.tau, top_tokens=3)
        gate_ms = (time.perf_counter() - start) * 1000
        expert = self.experts[why["expert"]]
        [outcome] = apply_rule(HFEvalModel(expert.model, expert.tokenizer, expert.name), [record], "letter", [[]])
        total_ms = (time.perf_counter() - start) * 1000
        return Answer(
            answer=outcome.prediction,
            expert=why["expert"],
            label_scores=dict(outcome.probs),
            gate_probability=why["p_mamba"],
            top_features=why["top_features"][:5],
            latency_ms={"gate": gate_ms, "expert": outcome.latency_ms, "total": total_ms},
        )
