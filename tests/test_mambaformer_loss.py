"""Each loss term against values computed by hand from the equations in docs/router.md."""

import math

import pytest
import torch

from medmoe.errors import MedmoeError
from medmoe.mambaformer.loss import DualCostWeight, LossConfig, binary_entropy, routing_loss

# Two examples: q_M = p_M = (0.2, 0.9); l_T = (1, 2), l_M = (3, 0.5); C_T = (10, 20), C_M = (5, 5) ms; C_ref = 10.
Q = torch.tensor([0.2, 0.9])
L_T, L_M = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.5])
C_T, C_M = torch.tensor([10.0, 20.0]), torch.tensor([5.0, 5.0])


def H(q):
    return -(q * math.log(q) + (1 - q) * math.log(1 - q))


def terms_of(**overrides):
    config = LossConfig(**{"c_ref": 10.0, "beta": 1.0, **overrides})
    params = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    return routing_loss(Q, Q, L_T, L_M, C_T, C_M, config, params)


def test_task_cost_util_ent_reg_by_hand():
    _, t = terms_of()
    # L_task = mean(0.8*1 + 0.2*3, 0.1*2 + 0.9*0.5) = mean(1.4, 0.65)
    assert t["task"].item() == pytest.approx(1.025)
    # L_cost = mean(0.8*10 + 0.2*5, 0.1*20 + 0.9*5) / 10 = mean(9, 6.5) / 10
    assert t["cost"].item() == pytest.approx(0.775)
    # U_T = (-2, -4), U_M = (-3.5, -1) -> y = (0, 1); L_util = mean(-log 0.8, -log 0.9)
    assert t["util"].item() == pytest.approx((-math.log(0.8) - math.log(0.9)) / 2, rel=1e-5)
    assert t["ent"].item() == pytest.approx((H(0.2) + H(0.9)) / 2, rel=1e-5)
    assert t["reg"].item() == pytest.approx(1 + 4 + 9)


def test_utility_target_flips_with_beta():
    # beta = 0: y = 1[l_M < l_T] = (0, 1); beta = 10: costs dominate, U_M > U_T on both (C_M < C_T).
    _, t0 = terms_of(beta=0.0)
    assert t0["util"].item() == pytest.approx((-math.log(0.8) - math.log(0.9)) / 2, rel=1e-5)
    config = LossConfig(c_ref=10.0, beta=10.0)
    _, t10 = routing_loss(Q, Q, L_T, L_M, C_T, C_M, config)
    assert t10["util"].item() == pytest.approx((-math.log(0.2) - math.log(0.9)) / 2, rel=1e-5)


def test_balance_target_and_switch():
    _, t = terms_of(balance="target", target_mix=0.5)
    assert t["bal"].item() == pytest.approx((0.55 - 0.5) ** 2)
    _, t = terms_of(balance="switch")
    # f_M = 1/2 (only 0.9 > 0.5), P_M = 0.55: 2 * (0.5 * 0.45 + 0.5 * 0.55) = 1
    assert t["bal"].item() == pytest.approx(1.0)
    all_to_t = torch.tensor([0.1, 0.2])
    _, t = routing_loss(all_to_t, all_to_t, L_T, L_M, C_T, C_M, LossConfig(c_ref=10.0, balance="switch"))
    assert t["bal"].item() == pytest.approx(2 * (1.0 * 0.85 + 0.0))   # collapse costs more than balance


def test_total_is_weighted_sum_and_zero_lambda_switches_off():
    weights = dict(task=1.0, cost=0.1, util=0.5, bal=2.0, ent=0.3, reg=0.01)
    total, t = terms_of(**weights)
    expected = (1.025 + 0.1 * 0.775 + 0.5 * (-math.log(0.8) - math.log(0.9)) / 2 + 2.0 * 0.0025
                + 0.3 * (H(0.2) + H(0.9)) / 2 + 0.01 * 14)
    assert total.item() == pytest.approx(expected, rel=1e-5)
    total_off, _ = terms_of(**{**weights, "ent": 0.0, "reg": 0.0})
    assert total_off.item() == pytest.approx(expected - 0.3 * (H(0.2) + H(0.9)) / 2 - 0.14, rel=1e-5)
    total_dual, _ = routing_loss(Q, Q, L_T, L_M, C_T, C_M, LossConfig(c_ref=10.0, **{**weights, "cost": 0.0}),
                                 [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])], lambda_cost=0.1)
    assert total_dual.item() == pytest.approx(expected, rel=1e-5)


def test_decisions_weight_task_and_cost_but_q_drives_util_and_entropy():
    p_hard = torch.tensor([0.0, 1.0])
    _, t = routing_loss(Q, p_hard, L_T, L_M, C_T, C_M, LossConfig(c_ref=10.0))
    assert t["task"].item() == pytest.approx((1.0 + 0.5) / 2)
    assert t["cost"].item() == pytest.approx((10 + 5) / 2 / 10)
    assert t["ent"].item() == pytest.approx((H(0.2) + H(0.9)) / 2, rel=1e-5)


def test_entropy_finite_at_edges_and_bad_config():
    assert torch.isfinite(binary_entropy(torch.tensor([0.0, 1.0]))).all()
    with pytest.raises(MedmoeError):
        LossConfig(balance="nope")
    with pytest.raises(MedmoeError):
        LossConfig(util=-1.0)
    with pytest.raises(MedmoeError):
        routing_loss(Q, Q[:1], L_T, L_M, C_T, C_M, LossConfig())


def test_dual_ascent_by_hand():
    dual = DualCostWeight(budget_ms=100.0, c_ref=50.0, eta=0.5)
    assert dual.update(150.0) == pytest.approx(0.5)        # 0 + 0.5 * (150 - 100) / 50
    assert dual.update(125.0) == pytest.approx(0.75)       # 0.5 + 0.5 * 25 / 50
    assert dual.update(0.0) == 0.0                         # max(0, 0.75 - 1.0)
