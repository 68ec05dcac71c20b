"""Auxiliary losses of the LoRA-MoE tuner (equations in docs/loramoe.md, "Losses").

Glossary: N tokens, E experts, k top-k, g router probabilities (N, E), ghat renormalised gates,
q router embeddings (normalised), y expert labels (top-1 expert of each anchor token), T temperature.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F


def switch_balance_loss(probs: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load balance: L_bal = E * sum_i f_i P_i.

    f_i = share of the N*k (token, slot) assignments that go to expert i (not differentiable),
    P_i = mean router probability of expert i. Equals 1 when routing is uniform.
    probs: (N, E) fp32; top_i: (N, k) long.
    """
    n_tokens, num_experts = probs.shape
    counts = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device)
    counts.scatter_add_(0, top_i.reshape(-1), torch.ones(top_i.numel(), dtype=probs.dtype, device=probs.device))
    f = counts / top_i.numel()  # (E,)
    p_mean = probs.mean(dim=0)  # (E,)
    return num_experts * (f * p_mean).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: L_z = mean_t (logsumexp_i logits_{t,i})^2. logits: (N, E) fp32."""
    return logits.logsumexp(dim=-1).square().mean()


def supervised_contrastive_loss(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    candidates: torch.Tensor,
    candidate_labels: torch.Tensor,
    temperature: float,
    anchors_in_candidates: bool = True,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Supervised InfoNCE (SupCon, Khosla et al. 2020) of anchors against candidates.

    L = mean_a  -1/|P(a)| sum_{p in P(a)} log( exp(q_a . k_p / T) / sum_{j != a} exp(q_a . k_j / T) )
      = mean_a  [ log sum_{j != a} exp(q_a . k_j / T)  -  q_a . (sum_{p in P(a)} k_p) / (T |P(a)|) ]
    with P(a) the candidates sharing a's label, excluding a itself. The second form is what is
    computed: the positives enter through per-label sums of the candidates (C, d), so the only
    (n, m) work is the similarity matrix and its log-sum-exp (no (n, m) masks).
    anchors: (n, d) normalised; candidates: (m, d) normalised; labels: non-negative ints below
    num_classes (default: the largest label + 1). When anchors_in_candidates, the first n
    candidates are the anchors themselves and each is excluded from its own row.
    Anchors without any positive are skipped; returns 0 if none has one.
    """
    n = anchors.shape[0]
    scaled = anchors / temperature  # (n, d): 1/T applied to the anchors, not to the (n, m) matrix
    sim = scaled @ candidates.t()  # (n, m): q_a . k_j / T
    if anchors_in_candidates:  # j != a: the anchor's similarity to itself leaves the normaliser
        sim[:, :n].diagonal().fill_(float("-inf"))
    log_norm = sim.logsumexp(dim=-1)  # (n,)
    if num_classes is None:
        num_classes = int(torch.cat([anchor_labels, candidate_labels]).max()) + 1
    class_sums = torch.zeros(num_classes, candidates.shape[1], dtype=candidates.dtype, device=candidates.device)
    class_sums = class_sums.index_add(0, candidate_labels, candidates)  # (C, d): sum of the candidates per label
    class_counts = torch.bincount(candidate_labels, minlength=num_classes)  # (C,)
    positive_sum, n_pos = class_sums[anchor_labels], class_counts[anchor_labels]  # (n, d), (n,)
    if anchors_in_candidates:
        positive_sum, n_pos = positive_sum - candidates[:n], n_pos - 1
    has_pos = n_pos > 0
    if not bool(has_pos.any()):
        return anchors.sum() * 0.0
    per_anchor = log_norm - (scaled * positive_sum).sum(dim=-1) / n_pos.clamp(min=1)  # (n,)
    return per_anchor[has_pos].mean()


def prototype_contrastive_loss(
    q: torch.Tensor,
    labels: torch.Tensor,
    keys: torch.Tensor,
    queue_q: torch.Tensor | None,
    queue_labels: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """Contrastive routing supervision for the prototype router.

    Anchors: sub-sampled router embeddings q (n, d_q) labelled with their top-1 expert y (n,).
    Candidates: the other anchors (with gradient), the queue's detached entries, and the E
    normalised expert keys c_i (labels 0..E-1), so every anchor has its own key as a positive.
    """
    num_experts = keys.shape[0]
    expert_ids = torch.arange(num_experts, device=q.device)
    parts, part_labels = [q], [labels]
    if queue_q is not None and queue_q.shape[0] > 0:
        parts.append(queue_q.to(q.dtype))
        part_labels.append(cast(torch.Tensor, queue_labels))  # given with queue_q
    parts.append(keys)
    part_labels.append(expert_ids)
    candidates = torch.cat(parts, dim=0)  # (n + m_queue + E, d_q)
    candidate_labels = torch.cat(part_labels, dim=0)
    return supervised_contrastive_loss(q, labels, candidates, candidate_labels, temperature, num_classes=num_experts)


def expert_output_contrastive_loss(outputs: torch.Tensor, gates_dense: torch.Tensor, temperature: float) -> torch.Tensor:
    """Expert-output variant (after CoMoE): per token, active experts' outputs are positives,
    inactive experts' outputs negatives, around the token's mixed adapter output.

    outputs: (n, E, d_out) every expert's B_i A_i x for n sub-sampled tokens;
    gates_dense: (n, E) renormalised gates, zero for unselected experts.
    z_i = normalize(o_i); a = normalize(sum_i ghat_i z_i);
    L = mean_t -1/k sum_{i active} log softmax_j(z_j . a / T)_i
    """
    z = F.normalize(outputs.float(), dim=-1, eps=1e-6)  # (n, E, d_out)
    anchor = F.normalize((gates_dense[:, :, None] * z).sum(dim=1), dim=-1, eps=1e-6)  # (n, d_out)
    logits = torch.einsum("ned,nd->ne", z, anchor) / temperature  # (n, E)
    log_p = logits.log_softmax(dim=-1)
    active = gates_dense > 0
    return (-(log_p * active).sum(dim=-1) / active.sum(dim=-1)).mean()
