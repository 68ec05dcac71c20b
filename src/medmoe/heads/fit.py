"""Fitting option heads and calibrations on a training pool, chosen by cross-validation.

Training data for N records with K option slots (models/head.py for the head's equation):
  h       (N, D)     pooled hidden states of one (layer, pooling), or None
  f       (N, K, F)  per-option features (f[..., 0] = the LM's own answer s_k, then retrieval ones)
  present (N, K)     which option slots a record has
  y       (N,)       the gold option's index (single-answer records only: a head picks one option)

Loss: cross-entropy, plain or class-balanced (weight of class c = N / (C n_c) over the C classes
present in y; which one is a cross-validated choice: balanced favours macro-F1, plain accuracy), plus
lambda ||W||^2 (lambda chosen by cross-validation), minimized with L-BFGS (a convex problem: the
optimum, not a training schedule). A calibration fits b only (W = 0, v = (1, 0, ...)).
Distillation (optional, `fit_head(soft=q, alpha=a)`): with a teacher's probabilities q (N, K) the loss
is (1 - a) CE(y) + a KL(q || p) + lambda ||W||^2, p the head's softmax (still convex); a = 0 is the
plain loss (mambaformer/experiments/head_tables.py distils E_M's head from E_T's).

Cross-validation: FOLDS folds by a hash of each record's id (stable across runs and machines);
every candidate (zero-shot, per-option bias, contextual calibration, a head per layer, pooling and
lambda) is scored by its mean held-out accuracy; ties go to the simpler candidate, in that order.
No test record is ever seen: callers pass a training pool (data/pools.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medmoe.data.record import Record
from medmoe.heads.features import POOLINGS, Features
from medmoe.models.head import OptionHead, lm_option_feature

FOLDS = 5
LAMBDAS = (1e-3, 1e-2)
BALANCED = (False, True)


def folds_of(ids: Sequence[str], folds: int = FOLDS) -> torch.Tensor:
    """(N,) fold number of each id, from sha256 (stable, about equal folds)."""
    return torch.tensor([int(hashlib.sha256(i.encode()).hexdigest()[:8], 16) % folds for i in ids])


def class_weights(y: torch.Tensor, letters: int) -> torch.Tensor:
    """(K,) weight N / (C n_c) of each class present in y (0 for absent classes)."""
    counts = torch.bincount(y, minlength=letters).float()
    present = counts > 0
    w = torch.zeros(letters)
    w[present] = len(y) / (present.sum() * counts[present])
    return w


def fit_head(h: torch.Tensor | None, f: torch.Tensor, present: torch.Tensor, y: torch.Tensor,
             l2: float = 1e-2, bias_only: bool = False, steps: int = 100, balanced: bool = True,
             soft: torch.Tensor | None = None, alpha: float = 0.0) -> OptionHead:
    """The head minimizing the (class-balanced, or plain) loss on (h, f, present, y) (module docstring);
    with `soft` (N, K) teacher probabilities and alpha in (0, 1], distilled towards them."""
    if not 0.0 <= alpha <= 1.0 or (alpha > 0 and soft is None):
        raise ValueError(f"distillation needs teacher probabilities and alpha in [0, 1], got alpha={alpha}")
    letters = present.shape[1]
    width = 0 if h is None or bias_only else h.shape[1]
    head = OptionHead(letters, width, f.shape[2])
    hh = None if width == 0 else h
    if hh is not None:
        head.mu.copy_(hh.mean(0))
        head.sigma.copy_(hh.std(0).clamp_min(1e-6))
    with torch.no_grad():
        head.v[0] = 1.0  # start from (or, for a calibration, keep) the LM's own answer
    params = [head.b] if bias_only else [p for p in (head.W, head.v, head.b) if p.numel()]
    weights = class_weights(y, letters) if balanced else None
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=steps, tolerance_grad=1e-5, tolerance_change=1e-7,
                                  line_search_fn="strong_wolfe")

    z = None if hh is None else (hh - head.mu) / head.sigma  # (N, D), standardized once
    absent = ~present

    def closure() -> torch.Tensor:  # OptionHead.forward, with z precomputed
        optimizer.zero_grad()
        logits = f @ head.v + head.b
        if z is not None:
            logits = logits + z @ head.W.T
        logits = logits.masked_fill(absent, float("-inf"))
        loss = F.cross_entropy(logits, y, weight=weights)
        if soft is not None and alpha > 0:  # (1 - a) CE + a KL(q || p); absent options: q = 0, log p := 0 (no nan)
            log_p = F.log_softmax(logits, dim=-1).masked_fill(absent, 0.0)
            loss = (1 - alpha) * loss + alpha * F.kl_div(log_p, soft, reduction="batchmean")
        loss = loss + l2 * head.W.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head.eval()


@torch.no_grad()
def predict(head: OptionHead, h: torch.Tensor | None, f: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(N,) the index of the option each record's head logits rank first."""
    return head(h if head.W.shape[1] else None, f, present).argmax(-1)


def fixed_head(bias: torch.Tensor, option_features: int = 1) -> OptionHead:
    """The LM's own answer plus a given per-option bias (zero-shot: bias 0; contextual calibration)."""
    head = OptionHead(len(bias), 0, option_features)
    with torch.no_grad():
        head.v[0] = 1.0
        head.b.copy_(bias)
    return head.eval()


@dataclass
class Candidate:
    """One way of answering, as cross-validation scored it."""

    kind: str  # zero-shot | calibration | contextual | head
    layer: int | None = None
    pooling: str | None = None
    l2: float | None = None
    balanced: bool = True  # class-balanced cross-entropy (else plain)
    accuracy: float = 0.0  # mean held-out accuracy over the folds

    @property
    def name(self) -> str:
        loss = "balanced" if self.balanced else "plain"
        if self.kind == "calibration":
            return f"calibration({loss})"
        if not self.kind.startswith("head"):
            return self.kind
        return f"{self.kind}(layer={self.layer}, {self.pooling}, lambda={self.l2:g}, {loss})"


def cv_accuracy(h: torch.Tensor | None, f: torch.Tensor, present: torch.Tensor, y: torch.Tensor,
                folds: torch.Tensor, l2: float = 1e-2, bias_only: bool = False,
                fixed_bias: torch.Tensor | None = None, balanced: bool = True) -> float:
    """Mean held-out accuracy over the folds (a fixed bias, e.g. contextual calibration, is not fitted)."""
    scores = []
    for k in folds.unique().tolist():
        test = folds == k
        if fixed_bias is not None:
            head = fixed_head(fixed_bias, f.shape[2])
        else:
            train = ~test
            head = fit_head(None if h is None else h[train], f[train], present[train], y[train], l2, bias_only,
                            balanced=balanced)
        pred = predict(head, None if h is None else h[test], f[test], present[test])
        scores.append((pred == y[test]).float().mean().item())
    return float(sum(scores) / len(scores))


@dataclass
class TrainingSet:
    """A pool's single-answer records as head inputs (module docstring for the symbols)."""

    ids: list[str]
    features: Features  # hidden states of every layer and pooling
    f: torch.Tensor  # (N, K, F)
    present: torch.Tensor  # (N, K) bool
    y: torch.Tensor  # (N,)

    @property
    def letters(self) -> int:
        return int(self.present.shape[1])

    def h(self, layer: int | None, pooling: str | None) -> torch.Tensor | None:
        return None if layer is None or pooling is None else self.features.pooled(layer, pooling)


def option_inputs(features: Features, letters: int, extra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(f (N, K, F), present (N, K)): the LM's own answer s_k, then `extra` (N, >= K, F') if given."""
    logprobs = features.option_logprobs[:, :letters]
    f = lm_option_feature(logprobs)
    if extra is not None:
        f = torch.cat([f, extra[:, :letters].float()], dim=-1)
    return f, torch.isfinite(logprobs)


def training_set(features: Features, records: Sequence[Record], extra: torch.Tensor | None = None) -> TrainingSet:
    """The single-answer records of a pool (a head picks one option; multi-answer ones are left out)."""
    keep = [i for i, r in enumerate(records) if len(r.gold_indices) == 1]
    letters = max(len(r.options) for r in records)
    sub = features.select([records[i].id for i in keep])
    f, present = option_inputs(sub, letters, None if extra is None else extra[keep])
    y = torch.tensor([records[i].gold_indices[0] for i in keep])
    return TrainingSet(sub.ids, sub, f, present, y)


def default_layers(total: int, count: int = 8) -> list[int]:
    """`count` layers spread over the upper three quarters of the network, always with the last."""
    start = total // 4
    step = max(1, (total - 1 - start) // (count - 1))
    layers = list(range(total - 1, start - 1, -step))[:count]
    return sorted(layers)


def score_candidates(ts: TrainingSet, contextual: torch.Tensor | None = None, layers: Sequence[int] | None = None,
                     poolings: Sequence[str] = POOLINGS, lambdas: Sequence[float] = LAMBDAS,
                     heads: bool = True) -> list[Candidate]:
    """Every candidate's mean held-out accuracy on the pool (module docstring); heads=False scores
    the zero-shot answer and the calibrations only. Runs on one torch thread: the fits are small
    (N x D products), where more threads only wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _score_candidates(ts, contextual, layers, poolings, lambdas, heads)
    finally:
        torch.set_num_threads(threads)


def _score_candidates(ts: TrainingSet, contextual: torch.Tensor | None, layers: Sequence[int] | None,
                      poolings: Sequence[str], lambdas: Sequence[float], heads: bool) -> list[Candidate]:
    folds = folds_of(ts.ids)
    zero = torch.zeros(ts.letters)
    out = [Candidate("zero-shot", accuracy=cv_accuracy(None, ts.f, ts.present, ts.y, folds, fixed_bias=zero))]
    for balanced in BALANCED:
        acc = cv_accuracy(None, ts.f, ts.present, ts.y, folds, bias_only=True, balanced=balanced)
        out.append(Candidate("calibration", balanced=balanced, accuracy=acc))
    if contextual is not None:
        out.append(Candidate("contextual", accuracy=cv_accuracy(None, ts.f, ts.present, ts.y, folds, fixed_bias=contextual)))
    if not heads:
        return out
    for layer in layers if layers is not None else default_layers(ts.features.layers, 6):
        for pooling in poolings:
            h = ts.h(layer, pooling)
            for l2 in lambdas:
                for balanced in BALANCED:
                    acc = cv_accuracy(h, ts.f, ts.present, ts.y, folds, l2, balanced=balanced)
                    out.append(Candidate("head", layer, pooling, l2, balanced, acc))
    return out


def best(candidates: Sequence[Candidate], kinds: Sequence[str] | None = None) -> Candidate:
    """The highest CV accuracy among `kinds` (ties: the earlier, simpler candidate)."""
    pool = [c for c in candidates if kinds is None or c.kind in kinds]
    return max(pool, key=lambda c: (round(c.accuracy, 6), -pool.index(c)))


def fit_candidate(ts: TrainingSet, candidate: Candidate, contextual: torch.Tensor | None = None) -> OptionHead:
    """The candidate refitted on the whole pool."""
    if candidate.kind == "zero-shot":
        return fixed_head(torch.zeros(ts.letters), ts.f.shape[2])
    if candidate.kind == "contextual":
        if contextual is None:
            raise ValueError("the contextual candidate needs its content-free bias")
        return fixed_head(contextual, ts.f.shape[2])
    if candidate.kind == "calibration":
        return fit_head(None, ts.f, ts.present, ts.y, bias_only=True, balanced=candidate.balanced)
    return fit_head(ts.h(candidate.layer, candidate.pooling), ts.f, ts.present, ts.y, candidate.l2 or 0.0,
                    balanced=candidate.balanced)
