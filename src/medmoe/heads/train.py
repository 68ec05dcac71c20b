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
from medmoe.eval.prompts import language_of
from medmoe.heads.bundled import question_format
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


RETRIEVAL_FEATURES = ("knn_answer", "knn_answer_cosine", "knn_nearest", "knn_distractor")  # heads/retrieval.py f1..f4
RETRIEVAL_K = 16


def retrieval_extra(pool_name: str, pool: Sequence[Record], encoder_name: str | None = None) -> tuple[OptionExtra, dict[str, Any]]:
    """(records -> (N, K, 4) kNN features against `pool`, the settings a head stores to rebuild it).

    The encoder is the default one for the pool's language (heads/retrieval.py); encoder_name, when
    given (a saved head's), must be the one this installation has. `pool` itself is queried
    leave-one-out (its records never see themselves or their duplicates)."""
    from medmoe.errors import MedmoeError
    from medmoe.heads.retrieval import default_cache_dir, default_encoder, knn, option_features

    encoder = default_encoder(language_of(pool[0]))
    if encoder_name is not None and encoder.name != encoder_name:
        raise MedmoeError(f"the head's retrieval features came from the encoder {encoder_name}, this "
                          f"installation has {encoder.name} (install the `retrieval` extra?)")

    def extra(records: Sequence[Record]) -> torch.Tensor:
        idx, sims = knn(records, pool, encoder, RETRIEVAL_K, default_cache_dir())  # embeddings cached
        return option_features(records, pool, idx, sims, encoder, cache_dir=default_cache_dir())

    return extra, {"pool": pool_name, "records": len(pool), "encoder": encoder.name, "k": RETRIEVAL_K}


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
        plain_best = best(candidates, ["head"])  # the retrieval head reads the same layer and pooling
        retrieval_candidates = [c for c in score_candidates(with_extra, None, [plain_best.layer or 0],
                                                            [plain_best.pooling or "last"]) if c.kind == "head"]
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
            questions=question_format(pool[0]),
            trained_on={"pool": pool_name, "records": len(pool), "single_answer": len(ts.ids),
                        "fingerprint": pool_fingerprint(pool)},
            selection={"family": family, "chosen": chosen.name, "cv_accuracy": chosen.accuracy,
                       "candidates": [asdict(c) | {"name": c.name} for c in candidates if c.kind in kinds]},
        )
        out[family] = TrainedHead(head, config, chosen)
    return out, candidates
