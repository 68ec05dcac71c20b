"""Per-request routing of the MambaFormer system: the threshold tau each request is answered at.

The gate sends a query to the Mamba expert iff p_M > tau. By default tau is the router's calibrated one;
a request may ask for its own, RouteLLM-style, in one of these forms (parsed and checked here, in one
place; anything else is a 400 `invalid_routing` naming the field and the allowed form):

  model name (chat)        "mambaformer"             the calibrated tau (so is the system's own name)
                           "mambaformer-tau-0.35"    tau = 0.35, a decimal in [0, 1]
  body field (both         "routing": {"tau": 0.35}                  the same, in the request body
   endpoints)              "routing": {"latency_budget_ms": 300}     the tau calibration would pick for a
                                                                     p50 budget of 300 ms (below)

A latency budget maps to a tau by the calibration's own budget rule (`calibrate.calibrate_tau`: the most
accurate dev routing whose latency statistic, gate cost included, is within the budget), on the run's
cached dev results beside the router (`<out>/<dataset>/dev`, what `medmoe mambaformer calibrate
--latency-budget` re-picks tau on). The router checkpoint holds no sweep of its own, so a router
without those results (one from `medmoe mambaformer gate train`, or moved away from its run) takes
thresholds only, and a budget is refused saying why. The budget is on the dev questions' latencies
(option scoring, measured when the run was made), not a promise for this request.

The server puts the resolved tau in the record's metadata (`medmoe.mambaformer.answerer.TAU_METADATA`),
the routed answerer routes that record at it (batching groups requests by the expert their own tau
picks) and the response reports it (`routing`: tau, where it came from).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from medmoe.errors import MedmoeError

ROUTED_MODEL = "mambaformer"  # the OpenAI model name of the routed system at its calibrated tau
TAU_PREFIX = f"{ROUTED_MODEL}-tau-"
DECIMAL = re.compile(r"^(\d+(\.\d*)?|\.\d+)$")
MODEL_FORM = f"'{ROUTED_MODEL}' (the calibrated threshold) or '{TAU_PREFIX}<tau>' with tau a decimal in [0, 1] (E_M iff p_M > tau)"
BODY_FORM = "routing: {\"tau\": <number in [0, 1]>} or {\"latency_budget_ms\": <number > 0>}, one of the two"
MAX_CACHED_BUDGETS = 1024


class RoutingError(MedmoeError):
    """A request's routing cannot be honoured: the server answers 400 `invalid_routing` naming `param`."""

    def __init__(self, message: str, param: str):
        self.param = param
        super().__init__(message)


@dataclass(frozen=True)
class Routing:
    """The threshold a request is answered at. source: "calibrated" (the router's), "model" (the model
    name's), "request" (routing.tau), "latency_budget" (routing.latency_budget_ms, with the dev accuracy
    and latency of that routing)."""

    tau: float
    source: str
    latency_budget_ms: float | None = None
    dev: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"tau": self.tau, "source": self.source, "latency_budget_ms": self.latency_budget_ms, "dev": self.dev}


class BudgetTable:
    """Latency budget -> tau on a run's dev results: `calibrate_tau`'s budget rule on the router's dev
    scores (computed once, here), with the router's gate cost and the calibration's statistic."""

    def __init__(self, scores: Any, table: Any, gate_ms: float, statistic: str = "p50", source: str = ""):
        self.scores, self.table, self.gate_ms, self.statistic, self.source = scores, table, gate_ms, statistic, source
        self._cache: dict[float, Routing] = {}

    def routing(self, budget_ms: float) -> Routing:
        """The routing calibration picks for a budget of `budget_ms`; RoutingError when none meets it."""
        if budget_ms not in self._cache:
            from medmoe.mambaformer.calibrate import STATISTICS, calibrate_tau

            try:
                calibration = calibrate_tau(self.scores, self.table, budget_ms, self.statistic, gate_ms=self.gate_ms)
            except MedmoeError as exc:
                raise RoutingError(f"routing.latency_budget_ms: {str(exc).removeprefix('calibration: ')}",
                                   "routing.latency_budget_ms") from None
            metrics = calibration.metrics
            dev = {"accuracy": metrics.accuracy, f"{self.statistic}_ms": getattr(metrics, STATISTICS[self.statistic]),
                   "share_mamba": metrics.share_mamba, "questions": len(self.table)}
            if len(self._cache) >= MAX_CACHED_BUDGETS:
                self._cache.clear()
            self._cache[budget_ms] = Routing(calibration.tau, "latency_budget", budget_ms, dev)
        return self._cache[budget_ms]

    @classmethod
    def from_run(cls, answerer: Any) -> BudgetTable:
        """From the run's cached dev results beside the answerer's router (`<out>/<dataset>/router` ->
        `<out>/<dataset>/dev`); MedmoeError saying why when they are not there."""
        from medmoe.mambaformer.experiments.pipeline import PipelineConfig, cached_table
        from medmoe.mambaformer.train import gate_scores

        router_dir, checkpoint = getattr(answerer, "router_dir", None), answerer.checkpoint
        if router_dir is None:
            raise MedmoeError("the routed system was not loaded from a router folder")
        config = checkpoint.info.get("config")
        if not isinstance(config, dict) or "dataset" not in config:
            raise MedmoeError(f"{router_dir}/router.json has no `medmoe run` config (a router from `medmoe mambaformer "
                              "gate train`?), so the run's dev results are unknown")
        try:
            run = PipelineConfig(**config)
        except TypeError as exc:
            raise MedmoeError(f"{router_dir}/router.json: its run config does not fit this medmoe ({exc})") from None
        if Path(router_dir).resolve().parent.name == run.dataset:  # the run folder is wherever the router now is
            run = replace(run, out=str(Path(router_dir).resolve().parent.parent))
        records, table = cached_table(run, "dev")
        if not len(table):
            raise MedmoeError(f"the run's dev results for {run.dataset} are empty")
        scores = gate_scores(checkpoint.gate, checkpoint.features(answerer.tokenizer, records))
        statistic = (checkpoint.info.get("calibration") or {}).get("statistic", "p50")
        return cls(scores, table, float(checkpoint.gate_ms or 0.0), statistic,
                   f"{len(table)} dev questions of {run.dataset} in {Path(run.out) / run.dataset / 'dev'}")


class RoutingPolicy:
    """Which thresholds this server takes, and the one request takes (`resolve`). `tau`: the routed
    system's calibrated threshold (None: a single model, which takes none); `names`: the model names
    that mean the calibrated threshold; `budgets`: latency budget -> tau (None: `no_budgets` says why)."""

    def __init__(self, system: str, tau: float | None = None, budgets: BudgetTable | None = None,
                 no_budgets: str | None = None):
        self.system, self.tau, self.budgets = system, tau, budgets
        self.no_budgets = no_budgets or ("this server answers with a single model" if tau is None else "no dev results")
        self.names = {ROUTED_MODEL, system}  # routed: the names of the calibrated threshold

    @property
    def routed(self) -> bool:
        return self.tau is not None

    @classmethod
    def for_answerer(cls, answerer: Any, name: str) -> RoutingPolicy:
        """A routed system is an answerer with a calibrated `tau` (RoutedAnswerer) that honours a
        record's own (metadata[TAU_METADATA]); its budgets come from its run's dev results, if found."""
        tau = getattr(answerer, "tau", None)
        if isinstance(tau, bool) or not isinstance(tau, int | float):
            return cls(name)
        try:
            return cls(name, float(tau), BudgetTable.from_run(answerer))
        except (MedmoeError, OSError, ValueError, KeyError) as exc:
            return cls(name, float(tau), None, f"latency budgets need the run's dev results: {exc}")

    def resolve(self, model: str | None = None, routing: dict[str, Any] | None = None) -> Routing | None:
        """The routing of a request with this OpenAI `model` name and body `routing` field (None: a single
        model, nothing to route); RoutingError for a form it does not take."""
        if self.tau is None:
            asks_model = model is not None and model != self.system and model.startswith(ROUTED_MODEL)
            if asks_model or routing is not None:
                param = "routing" if routing is not None else "model"
                raise RoutingError(f"{param}: this server answers with a single model ({self.system}): there is no gate, "
                                   "so no threshold to choose; serve a router (`medmoe serve --router DIR`) for that", param)
            return None
        from_model = self._from_model(model)
        from_body = self._from_body(routing) if routing is not None else None
        if from_model is not None and from_body is not None:
            raise RoutingError(f"routing: the threshold is given twice (model {model!r} and the routing field); give it once", "routing")
        return from_model or from_body or Routing(self.tau, "calibrated")

    def _from_model(self, model: str | None) -> Routing | None:
        """The routing a model name asks for: None for the calibrated threshold (and for names that are not
        this system's: OpenAI clients often send a fixed one)."""
        if model is None or model in self.names or not model.startswith(ROUTED_MODEL):
            return None
        if not model.startswith(TAU_PREFIX):
            raise RoutingError(f"model: {model!r} is not a name of this server; use {MODEL_FORM}", "model")
        text = model[len(TAU_PREFIX):]
        tau = float(text) if DECIMAL.match(text) else math.nan
        if not 0.0 <= tau <= 1.0:
            raise RoutingError(f"model: {model!r} has no threshold in [0, 1]; use {MODEL_FORM}", "model")
        return Routing(tau, "model")

    def _from_body(self, routing: dict[str, Any]) -> Routing:
        if not isinstance(routing, dict) or len(routing) != 1 or not set(routing) <= {"tau", "latency_budget_ms"}:
            got = sorted(routing) if isinstance(routing, dict) else type(routing).__name__
            raise RoutingError(f"routing: expected {BODY_FORM}; got {got}", "routing")
        (key, value), = routing.items()
        number = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
        if key == "tau":
            if not number or not 0.0 <= value <= 1.0:
                raise RoutingError(f"routing.tau must be a number in [0, 1] (E_M iff p_M > tau), got {value!r}", "routing.tau")
            return Routing(float(value), "request")
        if not number or value <= 0:
            raise RoutingError(f"routing.latency_budget_ms must be a number of milliseconds > 0, got {value!r}",
                               "routing.latency_budget_ms")
        if self.budgets is None:
            raise RoutingError(f"routing.latency_budget_ms: not available on this server ({self.no_budgets}); "
                               "give a threshold instead: routing.tau or the model name "
                               f"'{TAU_PREFIX}<tau>'", "routing.latency_budget_ms")
        return self.budgets.routing(float(value))

    def models(self) -> list[dict[str, Any]]:
        """The OpenAI model list: the system's name; for a routed one `mambaformer` first, with its
        calibrated threshold and the forms a request may use."""
        base = {"object": "model", "created": 0, "owned_by": "medmoe"}
        if not self.routed:
            return [{"id": self.system, **base}]
        about = {"system": self.system, "tau": self.tau, "threshold_model": f"{TAU_PREFIX}<tau>, tau in [0, 1]",
                 "routing": BODY_FORM, "latency_budgets": self.budgets is not None}
        if self.budgets is None:
            about["latency_budgets_unavailable"] = self.no_budgets
        return [{"id": ROUTED_MODEL, **base, "medmoe": about}, {"id": self.system, **base, "medmoe": {"alias_of": ROUTED_MODEL}}]

    def describe(self) -> str:
        """One line for the server's start: which thresholds requests may ask for."""
        if not self.routed:
            return "single model: no routing"
        budgets = (f"latency budgets from {self.budgets.source}" if self.budgets is not None
                   else f"no latency budgets ({self.no_budgets})")
        return (f"calibrated tau {self.tau:.4f}; per request: model '{TAU_PREFIX}<tau>' or routing.tau; {budgets}")
