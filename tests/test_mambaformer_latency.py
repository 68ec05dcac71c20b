"""Latency model: NNLS fit recovers planted coefficients, stays non-negative, is optimal; profile; JSON."""

import itertools

import numpy as np
import pytest

from medmoe.errors import MedmoeError
from medmoe.mambaformer.latency import LatencyModel, fit_latency_model, nnls, profile


def test_fit_recovers_a_planted_quadratic():
    n = np.array([64, 128, 256, 512, 1024, 2048, 4096])
    y = 2e-4 * n**2 + 0.8 * n + 12.0
    model = fit_latency_model(n, y)
    assert (model.a, model.b, model.c) == pytest.approx((2e-4, 0.8, 12.0), rel=1e-6)
    np.testing.assert_allclose(model(n), y, rtol=1e-9)


def test_fit_is_non_negative_when_least_squares_is_not():
    n = np.array([100, 200, 400, 800])
    y = -1e-4 * n**2 + 0.5 * n + 30       # concave: unconstrained LS gives a < 0
    model = fit_latency_model(n, y)
    assert min(model.a, model.b, model.c) >= 0 and model.a == 0.0


def test_nnls_beats_every_non_negative_point_on_a_grid():
    rng = np.random.default_rng(0)
    A, y = rng.normal(size=(12, 3)), rng.normal(size=12)
    x = nnls(A, y)
    assert (x >= 0).all()
    best = np.sum((A @ x - y) ** 2)
    grid = np.linspace(0, 2, 21)
    for point in itertools.product(grid, grid, grid):
        assert np.sum((A @ np.array(point) - y) ** 2) >= best - 1e-9
    # KKT: gradient is zero on the support and non-negative off it.
    grad = A.T @ (A @ x - y)
    assert np.allclose(grad[x > 0], 0, atol=1e-8) and (grad[x == 0] >= -1e-8).all()


def test_profile_uses_the_median_and_fits(tmp_path):
    calls = []
    fake_now = [0.0]

    def clock():
        return fake_now[0]

    def fn(n):                      # a "model" that takes 0.01 n + 2 ms, with one slow outlier
        calls.append(n)
        fake_now[0] += (0.01 * n + 2 + (50 if len(calls) == 7 else 0)) / 1000

    model = profile(fn, [100, 200, 400], repeats=5, warmup=1, expert="toy", clock=clock)
    assert len(calls) == 3 * (1 + 5)
    assert (model.b, model.c) == pytest.approx((0.01, 2.0), rel=1e-6) and model.a == pytest.approx(0, abs=1e-12)
    path = tmp_path / "lat.json"
    model.save(path)
    again = LatencyModel.load(path)
    assert again == model and again.expert == "toy"


def test_bad_inputs():
    with pytest.raises(MedmoeError):
        fit_latency_model([1], [2.0])
    with pytest.raises(MedmoeError):
        fit_latency_model([0, 10], [1.0, 2.0])
    with pytest.raises(MedmoeError):
        LatencyModel.from_dict({"a": 1})
