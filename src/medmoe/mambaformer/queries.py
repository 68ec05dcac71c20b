"""From records to gate inputs: the query text the gate reads, its token ids, its features.

The gate reads the same tokens as the experts (their tokenizer), over the query itself: the question,
the context (a PubMedQA abstract) and the options, one per line. `n_tokens` in an `ExpertResults`
table is the length of this encoding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from medmoe.data.record import Record
from medmoe.errors import MedmoeError
from medmoe.mambaformer.features import GateFeatures, GateFeaturizer, pad_batch


def query_text(record: Record) -> str:
    parts = [record.question, record.context or ""]
    parts += [f"{letter}. {option}" for letter, option in zip(record.letters, record.options)]
    return "\n".join(p for p in parts if p)


def encode_queries(tokenizer, records: Sequence[Record], max_length: int = 4096) -> list[list[int]]:
    """Token ids of each record's query (no special tokens), truncated to max_length (keeping the start)."""
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


def records_for(table_ids: Sequence[str], records: Sequence[Record], where: str) -> list[Record]:
    """The records of the table's ids, in table order; a clear error for ids with no record."""
    by_id = {r.id: r for r in records}
    missing = [i for i in table_ids if i not in by_id]
    if missing:
        raise MedmoeError(f"{where}: {len(missing)} result ids have no record in the dataset split, e.g. {missing[:3]}")
    return [by_id[i] for i in table_ids]
