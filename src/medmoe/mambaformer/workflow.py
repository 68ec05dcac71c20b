"""The router's jobs end to end, on `ExpertResults` tables (what `medmoe router ...` runs):
fit a gate (train, then calibrate tau on dev), and the Pareto run with every baseline on one test table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medmoe.mambaformer.baselines import AlwaysMamba, AlwaysTransformer, LengthThreshold, OracleRouter, RandomRouter
from medmoe.mambaformer.calibrate import Calibration, calibrate_tau
from medmoe.mambaformer.features import GateFeatures
from medmoe.mambaformer.gate import GateConfig, TokenGate
from medmoe.mambaformer.latency import LatencyModel
from medmoe.mambaformer.loss import LossConfig
from medmoe.mambaformer.metrics import default_c_ref, evaluate
from medmoe.mambaformer.pareto import OperatingPoint, baseline_points, pareto_report, sweep_points
from medmoe.mambaformer.results import ExpertResults
from medmoe.mambaformer.train import TrainConfig, expert_costs, gate_scores, train_gate


@dataclass
class FittedGate:
    gate: TokenGate
    tau: float
    loss_config: LossConfig
    history: list[dict]
    calibration: Calibration | None
    dev_metrics: dict


def fit_gate(train: ExpertResults, train_features: GateFeatures, dev: ExpertResults, dev_features: GateFeatures,
             loss_config: LossConfig, train_config: TrainConfig, latency_models: Mapping[str, LatencyModel] | None = None,
             budget_ms: float | None = None, statistic: str = "p50", gate_config: GateConfig | None = None,
             c_ref: float | None = None, gate_ms: float = 0.0) -> FittedGate:
    """Train on `train` (costs from the latency models, else measured) and calibrate tau on `dev` for the
    budget (dev latencies as measured); without a budget tau = 0.5. C_ref defaults to E_T's mean train cost."""
    costs = expert_costs(train, latency_models)
    c_ref = default_c_ref(costs) if c_ref is None else c_ref
    loss_config = LossConfig.from_dict({**loss_config.to_dict(), "c_ref": c_ref})
    gate, history = train_gate(train_features, train, costs, loss_config, train_config, gate_config)
    dev_scores = gate_scores(gate, dev_features)
    calibration = calibrate_tau(dev_scores, dev, budget_ms, statistic, gate_ms=gate_ms) if budget_ms else None
    tau = calibration.tau if calibration else 0.5
    gate.config.tau = tau
    return FittedGate(gate, tau, loss_config, history, calibration,
                      evaluate(dev, dev_scores > tau, gate_ms=gate_ms).to_dict())


def baseline_routers(test: ExpertResults, mix: float, dev: ExpertResults | None = None, seed: int = 0,
                     oracle_beta: float = 1.0) -> list:
    """Every baseline of a routing report, in this order: E_T only, E_M only, random at `mix`, the length
    threshold fitted on `dev` (on `test` when no dev is given, and named so), the utility oracle
    (argmax_e U_e with `oracle_beta`) and the accuracy oracle."""
    length = LengthThreshold().fit(dev if dev is not None else test)
    if dev is None:
        length.name = "length-threshold (fit on test)"
    utility_oracle = OracleRouter(beta=oracle_beta)
    utility_oracle.name = f"oracle(beta={oracle_beta:g})"
    return [AlwaysTransformer(), AlwaysMamba(), RandomRouter(mix, seed), length, utility_oracle,
            OracleRouter(objective="accuracy")]


def pareto_run(test: ExpertResults, scores_by_beta: Mapping[float, np.ndarray], tau: float, dev: ExpertResults | None = None,
               extra_points: Sequence[OperatingPoint] = (), seed: int = 0, gate_ms: float = 0.0,
               statistic: str = "p50", oracle_beta: float = 1.0, routers: Sequence | None = None) -> dict:
    """Sweep the gate(s) over tau on `test`; baselines: E_T only, E_M only, random at the mix of the first
    gate at its tau, the length threshold fitted on `dev` (on `test` when no dev is given, marked so), the
    utility oracle (argmax_e U_e with `oracle_beta`, C_ref = E_T's mean test latency), the accuracy oracle,
    and any extra points (e.g. the largest Transformer alone). `routers`: those baselines, already built
    by `baseline_routers` (a caller that also tabulates them passes its own)."""
    first = np.asarray(next(iter(scores_by_beta.values())))
    if routers is None:
        routers = baseline_routers(test, float((first > tau).mean()), dev, seed, oracle_beta)
    length = routers[3]
    baselines = baseline_points(test, routers, statistic=statistic) + list(extra_points)
    gate_points = sweep_points(test, scores_by_beta, gate_ms=gate_ms, statistic=statistic)
    report = pareto_report(gate_points, baselines, baselines[0], baselines[1])
    at_tau = evaluate(test, first > tau, gate_ms=gate_ms)
    report["gate_at_tau"] = {"tau": tau, **at_tau.to_dict()}
    report["length_threshold"] = {"threshold": float(length.threshold), "long_to_mamba": bool(length.long_to_mamba)}
    return report
