"""MambaFormer: a Transformer expert E_T and a Mamba expert E_M behind a token-level gate.

The model (this package's top level):
  experts.py     loading the two experts (any HF causal LM; a Mamba hybrid)
  results.py     ExpertResults: cached per-example expert outcomes, what training and calibration read
  lexicon.py     the medical lexicon behind the domain feature
  features.py    per-token and global gate features (GateFeaturizer, FeatureConfig)
  queries.py     record -> query text -> token ids -> features: `query_features`, the one path
  gate.py        the gate (TokenGate): token scores pooled into p_M
  loss.py        the utility-guided multi-objective loss
  latency.py     latency models C_e(n) and the gate's own cost (`gate_cost_ms`)
  metrics.py     what a routing achieves on an ExpertResults table
  calibrate.py   tau on dev: `calibrate_tau`, the one calibration (gate cost included)
  train.py       train_gate on cached results
  checkpoint.py  RouterCheckpoint: gate, feature tables, tau (once), gate cost, the experts' sources
  fit.py         fit_gate (train + calibrate), train_router / recalibrate (`medmoe mambaformer gate train|calibrate`)
  answerer.py    RoutedAnswerer: a checkpoint and its experts as an Answerer (ask, serve, eval)
The experiments run with it (medmoe.mambaformer.experiments: pipeline, pareto, baselines,
generative) and are never imported by the model.
"""

from medmoe.mambaformer.results import EXPERTS, ExpertOutcome, ExpertResults

__all__ = ["EXPERTS", "ExpertOutcome", "ExpertResults"]
