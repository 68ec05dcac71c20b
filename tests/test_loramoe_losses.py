"""Auxiliary losses and the expert memory queue on small cases computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medmoe.loramoe import ExpertQueue, LoraMoeConfig, LoraMoeLinear
from medmoe.loramoe.losses import (
    expert_output_contrastive_loss,
    prototype_contrastive_loss,
    router_z_loss,
    supervised_contrastive_loss,
    switch_balance_loss,
)


def test_switch_balance_hand_case():
    probs = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    top_i = torch.tensor([[0], [0]])
    # f = [1, 0], P = [0.625, 0.375], L = E * sum f P = 2 * 0.625
    assert switch_balance_loss(probs, top_i).item() == pytest.approx(1.25)


def test_switch_balance_is_one_when_uniform():
    probs = torch.full((4, 4), 0.25)
    top_i = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert switch_balance_loss(probs, top_i).item() == pytest.approx(1.0)


def test_z_loss_hand_case():
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    expected = (math.log(2) ** 2 + (1 + math.log(2)) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected)


def test_supervised_contrastive_hand_case():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    candidates = torch.cat([anchors, keys])
    labels = torch.tensor([0, 1])
    loss = supervised_contrastive_loss(anchors, labels, candidates, torch.cat([labels, labels]), temperature=1.0)
    # anchor 1: self excluded; similarities to (anchor 2, key 0, key 1) = (0, 1, 0); positive = key 0
    assert loss.item() == pytest.approx(math.log(math.e + 2) - 1, rel=1e-6)


def test_supervised_contrastive_averages_over_positives():
    anchors = torch.tensor([[1.0, 0.0]])
    candidates = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    cand_labels = torch.tensor([0, 0, 0, 1])
    loss = supervised_contrastive_loss(anchors, torch.tensor([0]), candidates, cand_labels, 0.5)
    # self (index 0) excluded; logits (2, 0, -2); positives: indices 1 and 2
    log_z = math.log(math.exp(2) + 1 + math.exp(-2))
    expected = -((2 - log_z) + (0 - log_z)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def _supcon_by_pairs(anchors, anchor_labels, candidates, candidate_labels, temperature, anchors_in_candidates):
    """The SupCon equation pair by pair: log-probabilities over j != a, averaged over positives."""
    per_anchor = []
    for a in range(anchors.shape[0]):
        keep = [j for j in range(candidates.shape[0]) if not (anchors_in_candidates and j == a)]
        logits = torch.stack([anchors[a] @ candidates[j] / temperature for j in keep])
        log_prob = logits - logits.logsumexp(0)
        positives = [i for i, j in enumerate(keep) if candidate_labels[j] == anchor_labels[a]]
        if positives:
            per_anchor.append(-log_prob[positives].mean())
    return torch.stack(per_anchor).mean()


@pytest.mark.parametrize("anchors_in_candidates", [True, False])
def test_supervised_contrastive_matches_the_pairwise_equation_with_gradients(anchors_in_candidates):
    torch.manual_seed(0)
    q = nn.functional.normalize(torch.randn(6, 4), dim=-1).requires_grad_(True)
    labels = torch.tensor([0, 1, 1, 3, 0, 3])  # label 3 has no other member: only with the extra ones below
    extra = nn.functional.normalize(torch.randn(5, 4), dim=-1).requires_grad_(True)
    extra_labels = torch.tensor([2, 0, 2, 1, 2])
    candidates = torch.cat([q, extra]) if anchors_in_candidates else extra
    cand_labels = torch.cat([labels, extra_labels]) if anchors_in_candidates else extra_labels
    got = supervised_contrastive_loss(q, labels, candidates, cand_labels, 0.3, anchors_in_candidates)
    grads = torch.autograd.grad(got, (q, extra))
    want = _supcon_by_pairs(q, labels, candidates, cand_labels, 0.3, anchors_in_candidates)
    want_grads = torch.autograd.grad(want, (q, extra))
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    for g, w in zip(grads, want_grads):
        assert torch.allclose(g, w, atol=1e-5)


def test_prototype_loss_uses_the_queue_as_extra_candidates():
    torch.manual_seed(0)
    q = nn.functional.normalize(torch.randn(5, 3), dim=-1)
    labels = torch.tensor([0, 1, 1, 2, 0])
    keys = nn.functional.normalize(torch.randn(3, 3), dim=-1)
    queue_q = nn.functional.normalize(torch.randn(4, 3), dim=-1)
    queue_labels = torch.tensor([2, 2, 0, 1])
    got = prototype_contrastive_loss(q, labels, keys, queue_q, queue_labels, 0.2)
    expected = supervised_contrastive_loss(
        q, labels, torch.cat([q, queue_q, keys]), torch.cat([labels, queue_labels, torch.arange(3)]), 0.2
    )
    assert got.item() == pytest.approx(expected.item())
    without_queue = prototype_contrastive_loss(q, labels, keys, None, None, 0.2)
    assert without_queue.item() != pytest.approx(got.item())


def test_expert_output_contrastive_hand_case():
    outputs = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])  # one token, two experts
    gates = torch.tensor([[1.0, 0.0]])  # expert 0 active
    # z = ([1,0], [0,1]); anchor = [1,0]; logits (1, 0); L = -log(e / (e + 1))
    loss = expert_output_contrastive_loss(outputs, gates, temperature=1.0)
    assert loss.item() == pytest.approx(-math.log(math.e / (math.e + 1)), rel=1e-6)


def test_queue_is_a_fifo_ring_buffer():
    queue = ExpertQueue(size=4, dim=2)
    assert len(queue) == 0
    queue.push(torch.tensor([[1.0, 0], [2, 0], [3, 0]]), torch.tensor([0, 1, 2]))
    emb, labels = queue.entries()
    assert labels.tolist() == [0, 1, 2] and emb[:, 0].tolist() == [1, 2, 3]
    queue.push(torch.tensor([[4.0, 0], [5, 0]]), torch.tensor([3, 4]))  # wraps: 5 overwrites 1
    emb, labels = queue.entries()
    assert len(queue) == 4 and emb[:, 0].tolist() == [5, 2, 3, 4] and labels.tolist() == [4, 1, 2, 3]
    queue.push(torch.arange(12.0).view(6, 2), torch.arange(6))  # more than K: only the newest 4 stay
    assert sorted(queue.entries()[1].tolist()) == [2, 3, 4, 5]
    assert queue.embeddings.requires_grad is False


def _trained_layer(**kw):
    torch.manual_seed(0)
    cfg = LoraMoeConfig(num_experts=4, top_k=2, rank=2, router_dim=6, **kw)
    from medmoe.loramoe.layer import RoutingContext

    return LoraMoeLinear(nn.Linear(8, 8), cfg, RoutingContext(compute_aux=True))


def test_layer_pushes_sub_sampled_detached_embeddings():
    layer = _trained_layer(contrastive_tokens=16, queue_size=40)
    layer(torch.randn(3, 20, 8))
    assert len(layer.queue) == 16
    layer(torch.randn(3, 20, 8))
    layer(torch.randn(3, 20, 8))
    assert len(layer.queue) == 40  # full: FIFO overwrites from now on
    assert set(layer.aux_losses) == {"balance", "z", "contrastive"}


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"balance_weight": 0.0}, {"z", "contrastive"}),
        ({"z_loss_weight": 0.0}, {"balance", "contrastive"}),
        ({"contrastive_weight": 0.0}, {"balance", "z"}),
        ({"contrastive_kind": "none"}, {"balance", "z"}),
        ({"contrastive_kind": "expert_output"}, {"balance", "z", "contrastive"}),
    ],
)
def test_every_term_is_switchable(kwargs, expected):
    layer = _trained_layer(**kwargs)
    layer(torch.randn(2, 6, 8))
    assert set(layer.aux_losses) == expected
    if kwargs.get("contrastive_weight") == 0.0 or kwargs.get("contrastive_kind") in ("none", "expert_output"):
        assert layer.queue is None


def test_queue_size_zero_uses_in_batch_negatives_only():
    layer = _trained_layer(queue_size=0)
    layer(torch.randn(2, 6, 8))
    assert layer.queue is None and "contrastive" in layer.aux_losses


def test_contrastive_gradients_are_finite_despite_the_masked_diagonal():
    torch.manual_seed(1)
    q = nn.functional.normalize(torch.randn(6, 4), dim=-1).requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    keys = nn.functional.normalize(torch.randn(3, 4), dim=-1)
    prototype_contrastive_loss(q, labels, keys, None, None, 0.1).backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
