"""Baseline routers; the oracle router is optimal in utility on random tables."""

import itertools

import numpy as np
import pytest

from medmoe.errors import MedmoeError
from medmoe.mambaformer.experiments.baselines import (
    AlwaysMamba,
    AlwaysTransformer,
    LengthThreshold,
    OracleRouter,
    RandomRouter,
    ScoreRouter,
    make_router,
)
from medmoe.mambaformer.metrics import evaluate, total_utility
from router_helpers import length_table, random_table


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("beta", [0.0, 0.5, 3.0])
def test_oracle_beats_every_routing_on_utility(seed, beta):
    table = random_table(n=10, seed=seed)
    c_ref = 50.0
    oracle = total_utility(table, OracleRouter(beta, c_ref).route(table), beta, c_ref)
    for bits in itertools.product([False, True], repeat=10):       # all 1024 routings
        assert total_utility(table, np.array(bits), beta, c_ref) <= oracle + 1e-12
    big = random_table(n=300, seed=seed)
    best = total_utility(big, OracleRouter(beta, c_ref).route(big), beta, c_ref)
    routers = [AlwaysTransformer(), AlwaysMamba(), RandomRouter(0.5, seed), LengthThreshold().fit(big),
               OracleRouter(beta, c_ref, objective="accuracy")]
    for router in routers:
        assert total_utility(big, router.route(big), beta, c_ref) <= best + 1e-12


def test_accuracy_oracle_is_an_accuracy_upper_bound():
    table = random_table(n=200, seed=3)
    oracle = evaluate(table, OracleRouter(objective="accuracy").route(table)).accuracy
    correct = table.stacked("correct")
    assert oracle == pytest.approx(correct.any(axis=1).mean())


def test_random_router_mix_and_seed():
    table = random_table(n=2000)
    d1, d2 = RandomRouter(0.3, seed=7).route(table), RandomRouter(0.3, seed=7).route(table)
    assert np.array_equal(d1, d2) and abs(d1.mean() - 0.3) < 0.04
    assert not np.array_equal(d1, RandomRouter(0.3, seed=8).route(table))
    with pytest.raises(MedmoeError):
        RandomRouter(1.5)


def test_length_threshold_finds_the_planted_split():
    table = length_table(600, seed=2)              # E_M better above 500 tokens
    router = LengthThreshold().fit(table)
    assert router.long_to_mamba and 350 <= router.threshold <= 650
    assert np.array_equal(router.route(table), table.n_tokens > router.threshold)
    acc = evaluate(table, router.route(table)).accuracy
    assert acc >= max(evaluate(table, AlwaysTransformer().route(table)).accuracy,
                      evaluate(table, AlwaysMamba().route(table)).accuracy)


def test_registry_and_score_router():
    table = random_table(n=4)
    router = make_router("score", scores={"q0": 0.9, "q1": 0.1, "q2": 0.6, "q3": 0.4}, tau=0.5)
    assert router.route(table).tolist() == [True, False, True, False]
    assert make_router("random", mix=0.2).mix == 0.2
    with pytest.raises(MedmoeError, match="unknown router"):
        make_router("nope")
    with pytest.raises(MedmoeError, match="no gate score"):
        ScoreRouter({"q0": 0.2}).route(table)
