"""The deployed MambaFormer: a router checkpoint plus its two experts, as an `Answerer`.

Per query: the gate's features of the query (`queries.query_features`, the one path training and
calibration use too), p_M = gate(features); hard decision E_M if p_M > tau: the checkpoint's calibrated
tau, or the record's own (`record.metadata[TAU_METADATA]`, a per-request threshold the server sets:
`mambaformer-tau-0.35` as the model name, docs/serving.md). The chosen expert then answers:
  option questions  answered as the gate was trained: through the expert's option head when the
                    checkpoint has one for the question's format (`medmoe run --answers heads`: one
                    batched pass gives the head its hidden states, `heads.answerer.head_outcomes_batch`),
                    else scored with the pipeline's rule (`letter`, zero-shot); `score_records`
                    returns the harness's `Outcome`s (what `medmoe eval --router` writes);
  open questions    greedy generation by that expert, the single-model server's batched decoding
                    (`medmoe.answer.causal_lm.CausalLMAnswerer` over the expert), streamed token by
                    token to a request's sink when it has one (`POST /v1/chat/completions`, stream).
`answer_batch` returns `Answer`s naming the expert, with p_M and the gate's top features
(attributions) for `ask` and the server. Latency per query = the gate's decision (tokenizing,
features, gate forward; amortized over the batch) + the chosen expert's work; the attributions are
computed after, outside it. The server batches requests by `batch_key` (expert and kind of work) and
cuts long contexts with `fit` (both experts' windows).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from medmoe.answer.causal_lm import CausalLMAnswerer
from medmoe.answer.streaming import TextSink
from medmoe.answer.types import Answer, RequestRejected
from medmoe.data.record import Record
from medmoe.errors import MedmoeError, ModelError
from medmoe.eval.model import HFEvalModel
from medmoe.eval.rules import Outcome, apply_rule
from medmoe.heads.answerer import head_outcomes_batch
from medmoe.heads.bundled import HeadSet
from medmoe.mambaformer.checkpoint import ROLES, RouterCheckpoint
from medmoe.mambaformer.experts import Expert, load_expert
from medmoe.mambaformer.features import GateFeatures
from medmoe.mambaformer.gate import torch_threads

RULE = "letter"  # how each expert scores in the pipeline (zero-shot): the outcomes the gate was trained on
TAU_METADATA = "routing_tau"  # a record's own threshold (metadata key): E_M iff p_M > it, instead of the checkpoint's tau


def served_placement(info: Mapping, role: str) -> dict[str, str]:
    """{dtype, device} to serve expert `role` in: the dtype the router was calibrated with (router.json
    info.placement, written by `medmoe run`; float32 for a checkpoint without it), since tau was chosen on
    that dtype's latencies; the recorded device when it is the CPU, else the best one here (`auto`: a
    router calibrated on a GPU still serves on a machine without one)."""
    recorded = (info.get("placement") or {}).get(role) or {}
    device = recorded.get("device", "cpu")
    return {"dtype": recorded.get("dtype", "float32"), "device": device if device == "cpu" else "auto"}


class RoutedAnswerer:
    """checkpoint: the gate; experts: {"transformer": E_T, "mamba": E_M}.
    max_new_tokens / max_input_tokens: generation and prompt limits of open questions (the server's).
    router_dir: the checkpoint's folder, when loaded from one (the server looks for the run's dev results
    beside it, to map latency budgets to thresholds)."""

    def __init__(self, checkpoint: RouterCheckpoint, experts: dict[str, Expert], name: str = "mambaformer",
                 max_new_tokens: int = 64, max_input_tokens: int = 1024, router_dir: str | Path | None = None):
        self.checkpoint, self.experts, self.name = checkpoint, experts, name
        self.router_dir = Path(router_dir) if router_dir is not None else None
        self.tokenizer = experts["transformer"].tokenizer  # the gate's features use E_T's vocabulary
        self.max_new_tokens, self.max_input_tokens = max_new_tokens, max_input_tokens
        self._generators: dict[str, CausalLMAnswerer] = {}
        # each expert's option heads (the checkpoint's): the questions of their format are answered through them
        self.heads = {role: HeadSet([found]) for role, found in checkpoint.heads.items()}
        # the gate runs on the server's event loop (batch_key) and its worker thread (answer_batch); each
        # run sets torch's global thread count and restores it, so two at once could leave it at 1
        self._gate_lock = threading.Lock()

    @classmethod
    def load(cls, router_dir: str | Path, experts: Mapping[str, str | None] | None = None, **limits: int) -> RoutedAnswerer:
        """A router checkpoint (written by `medmoe run` or `medmoe mambaformer gate train`) and the two experts its
        router.json names (`experts`); `experts` here (role -> source) overrides or completes those, e.g.
        E_M for a checkpoint that names only E_T. `limits`: max_new_tokens, max_input_tokens (the class)."""
        checkpoint = RouterCheckpoint.load(router_dir)
        sources = {role: (experts or {}).get(role) or checkpoint.experts.get(role) for role in ROLES}
        missing = [role for role in ROLES if not sources[role]]
        if missing:
            raise ModelError(f"router checkpoint {router_dir}: router.json names no expert for {' and '.join(missing)} "
                             f"(experts.{missing[0]}); write it with `medmoe run` or `medmoe mambaformer gate train --mamba`, or give "
                             f"the source (RoutedAnswerer.load(..., experts={{'{missing[0]}': ...}}), the server's "
                             f"answerer_options.{missing[0]})")
        changed = [role for role in checkpoint.heads if sources[role] != checkpoint.experts.get(role)]
        if changed:
            role = changed[0]
            raise ModelError(f"router checkpoint {router_dir}: its {role} answers through an option head trained on "
                             f"{checkpoint.experts.get(role)}, and {sources[role]} was given instead; a head reads one "
                             "model's hidden states, so run `medmoe run` again with that expert")
        transformer = cast(str, sources["transformer"])
        where = {role: served_placement(checkpoint.info, role) for role in ROLES}
        loaded = {"transformer": load_expert("transformer", transformer, **where["transformer"]),
                  "mamba": load_expert("mamba", cast(str, sources["mamba"]), tokenizer_source=transformer, **where["mamba"])}
        return cls(checkpoint, loaded, name=f"mambaformer:{router_dir}", router_dir=router_dir, **limits)

    @property
    def tau(self) -> float:
        """The calibrated threshold (the checkpoint's): E_M iff p_M > tau, for a record without its own."""
        return self.checkpoint.tau

    def tau_of(self, record: Record) -> float:
        """The threshold `record` is routed at: its own (metadata[TAU_METADATA]) or the calibrated one."""
        value = record.metadata.get(TAU_METADATA)
        if value is None:
            return self.checkpoint.tau
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise RequestRejected(f"routing.tau must be a number in [0, 1], got {value!r}", "routing.tau")
        return float(value)

    def score_records(self, records: Sequence[Record], rule: str = RULE, shots: Sequence[Sequence[Record]] = (),
                      multi: bool = False, max_new_tokens: int = 32) -> list[Outcome]:
        """Route every record, then let each expert score its share in one batched call (the harness's hook:
        `medmoe.eval.rules.apply_rule` calls it for this system). Outcome.latency_ms = gate + expert;
        Outcome.route = {expert, gate_probability (p_M), tau (the record's: `tau_of`), gate_ms, expert_ms}."""
        if rule != RULE or any(shots):
            raise MedmoeError(f"the routed system scores as its experts did when the gate was trained: rule {RULE!r}, "
                              f"zero-shot (got rule {rule!r}, {max((len(s) for s in shots), default=0)} shots)")
        if any(not r.is_choice for r in records):
            raise MedmoeError("the routed system scores option questions (yes/no/maybe or lettered options); "
                              "open questions are answered by `answer_batch`, which generates")
        start = time.perf_counter()
        routes = self.route(records)
        gate_ms = (time.perf_counter() - start) * 1000 / len(records)  # per query, amortized
        return self._score(records, routes, gate_ms, multi, max_new_tokens)

    def _score(self, records: Sequence[Record], routes: Sequence[tuple[str, float]], gate_ms: float,
               multi: bool = False, max_new_tokens: int = 32) -> list[Outcome]:
        """Each expert answers the option questions routed to it: those its head answers in one batched
        head pass (`heads.answerer.head_outcomes_batch`), the others in one batched call of rule `letter`."""
        outcomes: list[Outcome | None] = [None] * len(records)
        for name, expert in self.experts.items():
            chosen = [i for i, (picked, _) in enumerate(routes) if picked == name]
            heads = self.heads.get(name)
            found = {i: heads.for_record(records[i]) for i in chosen} if heads is not None and not multi else {}
            headed = [i for i in chosen if found.get(i) is not None]
            plain = [i for i in chosen if found.get(i) is None]
            model = HFEvalModel(expert.model, expert.tokenizer, expert.name)
            scored = apply_rule(model, [records[i] for i in plain], RULE, [[] for _ in plain], multi, max_new_tokens) if plain else []
            if headed:
                scored += head_outcomes_batch(model, [records[i] for i in headed], [cast(Any, found[i]) for i in headed])
            for i, outcome in zip(plain + headed, scored):
                outcome.route = {**(outcome.route or {}), "expert": name, "gate_probability": routes[i][1],
                                 "tau": self.tau_of(records[i]), "gate_ms": gate_ms, "expert_ms": outcome.latency_ms}
                outcome.latency_ms += gate_ms
                outcomes[i] = outcome
        return cast(list[Outcome], outcomes)  # every slot is filled now

    def answer_batch(self, records: Sequence[Record], sinks: Sequence[TextSink | None] | None = None) -> list[Answer]:
        """Route every record; the chosen expert scores each option question (`score_records`) and
        generates for each open one (streamed to its sink, when it has one). Answers carry the expert,
        p_M and the gate's top features. An open question whose prompt is over its expert's limit
        raises InputTooLong (in the server: a 422 for that request alone)."""
        start = time.perf_counter()
        features = self.checkpoint.features(self.tokenizer, records)
        routes = self._routes(features, [self.tau_of(r) for r in records])
        gate_ms = (time.perf_counter() - start) * 1000 / len(records)  # per query, amortized
        answers: list[Answer | None] = [None] * len(records)
        choice = [i for i, r in enumerate(records) if r.options]
        if choice:
            outcomes = self._score([records[i] for i in choice], [routes[i] for i in choice], gate_ms)
            for i, o in zip(choice, outcomes):
                route = cast(dict[str, Any], o.route)  # set by _score
                answers[i] = Answer(answer=o.prediction, expert=route["expert"], label_scores=dict(o.probs),
                                    latency_ms={"gate": gate_ms, "expert": route["expert_ms"]})
        for expert in self.experts:
            chosen = [i for i, r in enumerate(records) if not r.options and routes[i][0] == expert]
            if chosen:
                chosen_sinks = [sinks[i] for i in chosen] if sinks is not None else None
                for i, answer in zip(chosen, self.generator(expert).answer_batch([records[i] for i in chosen], chosen_sinks)):
                    answer.latency_ms = {"gate": gate_ms, "expert": answer.latency_ms["expert"]}
                    answers[i] = answer
        with self._gate_lock, torch_threads(1):  # tiny tensors: one thread is faster than waking the pool (docs/router.md)
            reasons = self.checkpoint.explain_features(features, top_tokens=3)
        done = cast(list[Answer], answers)  # every slot is filled now
        for answer, (_, p_mamba), why in zip(done, routes, reasons):
            answer.gate_probability, answer.top_features = p_mamba, why["top_features"][:5]
            answer.latency_ms["total"] = answer.latency_ms["gate"] + answer.latency_ms["expert"]
        return done

    def answer(self, record: Record) -> Answer:
        return self.answer_batch([record])[0]

    def route(self, records: Sequence[Record]) -> list[tuple[str, float]]:
        """(expert, p_M) per record: the gate's hard decision over each query's features, at the
        record's threshold (`tau_of`: its own, else the calibrated one)."""
        taus = [self.tau_of(r) for r in records]
        return self._routes(self.checkpoint.features(self.tokenizer, records), taus)

    def _routes(self, features: GateFeatures, taus: Sequence[float]) -> list[tuple[str, float]]:
        with self._gate_lock:
            p_mamba, _ = self.checkpoint.route_features(features, threads=1)
        # compared in p_M's dtype, as route_features compares with the checkpoint's tau
        to_mamba = p_mamba > torch.tensor(list(taus), dtype=p_mamba.dtype)
        return [("mamba" if m else "transformer", p) for p, m in zip(p_mamba.tolist(), to_mamba.tolist())]

    def batch_key(self, record: Record) -> str:
        """The expert the gate picks and the kind of work ("transformer:options", "mamba:open"): the
        server batches requests for the same expert and computation together."""
        return f"{self.route([record])[0][0]}:{'options' if record.options else 'open'}"

    def generator(self, expert: str) -> CausalLMAnswerer:
        """Expert `expert` as the single-model answerer: its greedy (streamable) generation, its prompt
        rule and window (made on first use: scoring alone never needs it)."""
        if expert not in self._generators:
            e = self.experts[expert]
            self._generators[expert] = CausalLMAnswerer(e.model, e.tokenizer, name=expert, max_new_tokens=self.max_new_tokens,
                                                        max_input_tokens=self.max_input_tokens)
        return self._generators[expert]

    def fit(self, record: Record) -> tuple[Record, int]:
        """(record cut to fit both experts' windows, context tokens dropped): the gate routes the record
        as it will be answered. InputTooLong when the question alone does not fit (the server: 422)."""
        dropped = 0
        for expert in self.experts:
            record, cut = self.generator(expert).fit(record)
            dropped += cut
        return record, dropped


def load_routed_answerer(config) -> RoutedAnswerer:
    """Server factory for the routed system: the router checkpoint folder `config.router` (`medmoe serve
    --router DIR`, `router:` in the YAML), or `answerer_options.router` (with `answerer:
    medmoe.mambaformer.answerer:load_routed_answerer`); optional `answerer_options` `transformer` /
    `mamba` sources override or complete the experts router.json names. The server's
    max_new_tokens / max_input_tokens apply to both experts."""
    options = getattr(config, "answerer_options", {}) or {}
    router = getattr(config, "router", None) or options.get("router")
    if not router:
        raise MedmoeError("server config: name a router checkpoint folder (router: DIR, `medmoe serve --router DIR`, "
                          "or answerer_options.router)")
    limits = {name: getattr(config, name) for name in ("max_new_tokens", "max_input_tokens") if hasattr(config, name)}
    return RoutedAnswerer.load(router, {role: options.get(role) for role in ROLES}, **limits)
