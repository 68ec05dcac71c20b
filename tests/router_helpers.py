"""Synthetic expert-result tables for the router tests (no experts needed)."""

from __future__ import annotations

import numpy as np

from medmoe.mambaformer.queries import encode_queries
from medmoe.mambaformer.results import ExpertOutcome, ExpertResults


def random_table(n: int = 50, seed: int = 0) -> ExpertResults:
    """A table where both experts have random losses, correctness and latencies."""
    rng = np.random.default_rng(seed)
    n_tokens = rng.integers(10, 1000, size=n)
    experts = {}
    for name in ("transformer", "mamba"):
        loss = rng.exponential(1.0, size=n)
        experts[name] = ExpertOutcome(loss=loss, correct=rng.random(n) < 0.6, pred=["yes"] * n,
                                      latency_ms=rng.uniform(5, 200, size=n))
    return ExpertResults([f"q{i}" for i in range(n)], n_tokens, experts)


def length_table(n: int = 400, seed: int = 0) -> ExpertResults:
    """Synthetic latencies C_T = 1e-3 n^2 + 0.2 n + 5, C_M = 0.3 n + 15 (ms, +-5% noise); the Transformer
    is right more often on short queries, the Mamba expert on long ones."""
    rng = np.random.default_rng(seed)
    n_tok = rng.integers(20, 1200, size=n)
    lat_t = (1e-3 * n_tok**2 + 0.2 * n_tok + 5) * rng.uniform(0.95, 1.05, size=n)
    lat_m = (0.3 * n_tok + 15) * rng.uniform(0.95, 1.05, size=n)
    long = n_tok > 500
    p_t = np.where(long, 0.6, 0.85)
    p_m = np.where(long, 0.8, 0.55)
    correct_t, correct_m = rng.random(n) < p_t, rng.random(n) < p_m
    loss_t = np.where(correct_t, 0.2, 2.0) + rng.uniform(0, 0.1, size=n)
    loss_m = np.where(correct_m, 0.2, 2.0) + rng.uniform(0, 0.1, size=n)
    experts = {
        "transformer": ExpertOutcome(loss_t, correct_t, ["a"] * n, lat_t, rng.dirichlet([1, 1, 1], size=n)),
        "mamba": ExpertOutcome(loss_m, correct_m, ["b"] * n, lat_m, rng.dirichlet([1, 1, 1], size=n)),
    }
    return ExpertResults([f"x{i}" for i in range(n)], n_tok, experts)


def query_results(records, tokenizer, seed: int = 0, prediction: str = "yes") -> ExpertResults:
    """Results on real records with a length signal in their gate tokens: E_T is right on short
    queries (90%) and slow per token, E_M right on long ones and cheaper per token."""
    rng = np.random.default_rng(seed)
    n_tok = np.array([len(s) for s in encode_queries(tokenizer, records)])
    n = len(records)
    long = n_tok > np.median(n_tok)
    experts = {}
    for name, good, ms in (("transformer", ~long, 2.0 * n_tok), ("mamba", long, 0.5 * n_tok + 50)):
        correct = np.where(good, rng.random(n) < 0.9, rng.random(n) < 0.5)
        experts[name] = ExpertOutcome(np.where(correct, 0.3, 1.5), correct, [prediction] * n, ms)
    return ExpertResults([r.id for r in records], n_tok, experts)
