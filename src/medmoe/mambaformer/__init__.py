"""MambaFormer routing: gate features, the gate, the utility-guided loss, latency models,
calibration, Pareto sweeps and baseline routers. Everything here works on an `ExpertResults`
table of per-example expert results, so it never needs the experts themselves."""

from medmoe.mambaformer.results import EXPERTS, ExpertOutcome, ExpertResults

__all__ = ["EXPERTS", "ExpertOutcome", "ExpertResults"]
