"""MambaFormer experiments: what is measured *with* the model (medmoe.mambaformer), never part of it.

  pipeline.py    `medmoe run`: experts over train/dev/test (cached), gates per beta, calibration, the
                 test report against every baseline
  pareto.py      accuracy-vs-latency sweeps, Pareto fronts, APGR, the report files; `pareto_run`
  baselines.py   comparison routers (E_T only, E_M only, random, length threshold, oracles, scores)
  generative.py  explanations by each expert and the routed system, ROUGE-L and BERTScore
  generative_routing.py  the gate trained on the generative utility (quality q = BERTScore or ROUGE-L)
  task_distill.py  E_T (with its option head) as the teacher of task-level distillation of E_M

The model modules never import these (import-linter contract in pyproject.toml).
"""
