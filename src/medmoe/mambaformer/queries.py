"""From records to gate inputs: the query text the gate reads, its token ids, its features.

One path from a query to the gate, used by training, calibration, the Pareto sweep, the pipeline, the
gate's cost measurement and the routed answerer alike:

  query_text(record)      the question, the context (a PubMedQA abstract) and the options, one per line
                          (never the explanation: a user's query has none)
  encode_queries          token ids of that text with the Transformer expert's tokenizer, no special
                          tokens; the one truncation rule: the first `max_tokens` ids are kept
                          (`FeatureConfig.max_tokens`, 4096 by default, stored with the checkpoint);
                          an empty encoding becomes [eos] (the featurizer needs one real token)
  query_features          encode_queries + the featurizer, in batches: the only records -> GateFeatures
                          function (shapes below)

For B records whose kept encodings have n_1..n_B tokens, T = max n_b:
  token (B, T, 4) in TOKEN_FEATURES order, zero at padding; mask (B, T) bool, right-padded;
  global_ (B, 2) = (length, log_length); n_tokens (B,) = n_b.
`ExpertResults.n_tokens` is a different length: the expert's prompt length (template included), which
the latency models C_e(n) are fitted on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from medmoe.data.record import Record
from medmoe.errors import MedmoeError
from medmoe.mambaformer.features import FeatureConfig, GateFeatures, GateFeaturizer, pad_batch

MAX_QUERY_TOKENS = FeatureConfig().max_tokens


def query_text(record: Record) -> str:
    parts = [record.question, record.context or ""]
    parts += [f"{letter}. {option}" for letter, option in zip(record.letters, record.options)]
    return "\n".join(p for p in parts if p)


def encode_queries(tokenizer: Any, records: Sequence[Record], max_length: int = MAX_QUERY_TOKENS) -> list[list[int]]:
    """Token ids of each record's query (no special tokens), truncated to max_length (keeping the start)."""
    if max_length < 1:
        raise MedmoeError(f"gate queries: max_length must be at least 1, got {max_length}")
    ids = tokenizer([query_text(r) for r in records], add_special_tokens=False)["input_ids"]
    return [list(seq[:max_length]) or [tokenizer.eos_token_id or 0] for seq in ids]


def batched_features(featurizer: GateFeaturizer, sequences: Sequence[Sequence[int]],
                     batch_size: int = 32) -> GateFeatures:
    """GateFeatures of all sequences, computed in batches and right-padded to the longest."""
    if not sequences:
        raise MedmoeError("gate features: no queries")
    T = max(len(s) for s in sequences)
    parts = []
    for start in range(0, len(sequences), batch_size):
        ids, mask = pad_batch(sequences[start:start + batch_size])
        f = featurizer(ids, mask)
        pad = T - ids.shape[1]
        parts.append(GateFeatures(F.pad(f.token, (0, 0, 0, pad)), F.pad(f.mask, (0, pad)), f.global_, f.n_tokens))
    return GateFeatures(torch.cat([p.token for p in parts]), torch.cat([p.mask for p in parts]),
                        torch.cat([p.global_ for p in parts]), torch.cat([p.n_tokens for p in parts]))


def query_features(featurizer: GateFeaturizer, tokenizer: Any, records: Sequence[Record],
                   batch_size: int = 32) -> GateFeatures:
    """The gate's features of each record's query: `encode_queries` with the featurizer's own
    `config.max_tokens`, then `batched_features` (module docstring: the rule and the shapes)."""
    return batched_features(featurizer, encode_queries(tokenizer, records, featurizer.config.max_tokens), batch_size)


def records_for(table_ids: Sequence[str], records: Sequence[Record], where: str) -> list[Record]:
    """The records of the table's ids, in table order; a clear error for ids with no record."""
    by_id = {r.id: r for r in records}
    missing = [i for i in table_ids if i not in by_id]
    if missing:
        raise MedmoeError(f"{where}: {len(missing)} result ids have no record in the dataset split, e.g. {missing[:3]}")
    return [by_id[i] for i in table_ids]
