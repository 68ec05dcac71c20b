"""Training an expert's heads on a benchmark's training pool: features once, every candidate by
cross-validation, the chosen ones refitted on the whole pool (what `medmoe heads train` runs).

    pool records --expert forward (cached)--> Features --TrainingSet--> score_candidates (CV)
        --> chosen per family: calibrated (bias or contextual), head, head + retrieval --> HeadConfig + OptionHead
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from medmoe.data.record import Record
from medmoe.eval.model import HFEvalModel
from medmoe.heads.contextual import contextual_bias
from medmoe.heads.features import Features, extract_features, feature_folder, record_key
from medmoe.heads.fit import Candidate, TrainingSet, best, fit_candidate, score_candidates, training_set
from medmoe.models.head import HeadConfig, OptionHead

FAMILIES = {  # name -> candidate kinds it chooses among
    "zero-shot": ("zero-shot",),
    "calibrated": ("zero-shot", "calibration", "contextual"),
    "head": ("zero-shot", "calibration", "contextual", "head"),
}
OptionExtra = Callable[[Sequence[Record]], torch.Tensor]  # records -> (N, K, F') retrieval features


@dataclass
class TrainedHead:
    head: OptionHead
    config: HeadConfig
    candidate: Candidate


def pool_fingerprint(records: Sequence[Record]) -> str:
    import hashlib

    return hashlib.sha256("".join(record_key(r) for r in records).encode()).hexdigest()[:16]


def expert_features(lm: HFEvalModel, source: str, records: Sequence[Record], progress: bool = True) -> Features:
    """The expert's cached features of `records` (computed where missing)."""
    dtype = next(lm.model.parameters()).dtype
    return extract_features(lm, records, feature_folder(source, dtype), source, progress)


def train_heads(lm: HFEvalModel, source: str, pool_name: str, pool: Sequence[Record],
                extra: OptionExtra | None = None, extra_names: Sequence[str] = (),
                retrieval: dict[str, Any] | None = None, layers: Sequence[int] | None = None,
                adapter: str | None = None, progress: bool = True) -> tuple[dict[str, TrainedHead], list[Candidate]]:
    """For each family (FAMILIES, plus "head+retrieval" when `extra` is given) the CV-best candidate
    refitted on the whole pool; and every scored candidate (the selection table)."""
    features = expert_features(lm, source, pool, progress)
    dtype = str(next(lm.model.parameters()).dtype).replace("torch.", "")
    plain = training_set(features, pool)
    contextual = contextual_bias(lm, pool, plain.letters)
    candidates = score_candidates(plain, contextual, layers)
    sets: dict[str, TrainingSet] = dict.fromkeys(FAMILIES, plain)
    families = {name: list(kinds) for name, kinds in FAMILIES.items()}
    if extra is not None:
        with_extra = training_set(features, pool, extra(pool))
        retrieval_candidates = [c for c in score_candidates(with_extra, None, layers) if c.kind == "head"]
        for c in retrieval_candidates:
            c.kind = f"{c.kind}+retrieval"
        candidates += retrieval_candidates
        sets["head+retrieval"] = with_extra
        families["head+retrieval"] = ["head+retrieval"]
    out = {}
    for family, kinds in families.items():
        chosen = best(candidates, kinds)
        base_kind = chosen.kind.removesuffix("+retrieval")
        ts = sets[family]
        head = fit_candidate(ts, Candidate(base_kind, chosen.layer, chosen.pooling, chosen.l2, chosen.balanced), contextual)
        option_features = ["lm_logprob"] + (list(extra_names) if family == "head+retrieval" else [])
        config = HeadConfig(
            kind="head" if base_kind == "head" else base_kind, base=source, letters=ts.letters,
            option_features=option_features, layer=chosen.layer, pooling=chosen.pooling, adapter=adapter,
            dtype=dtype, retrieval=retrieval if family == "head+retrieval" else None,
            trained_on={"pool": pool_name, "records": len(pool), "single_answer": len(ts.ids),
                        "fingerprint": pool_fingerprint(pool)},
            selection={"family": family, "chosen": chosen.name, "cv_accuracy": chosen.accuracy,
                       "candidates": [asdict(c) | {"name": c.name} for c in candidates if c.kind in kinds]},
        )
        out[family] = TrainedHead(head, config, chosen)
    return out, candidates
