"""ROUGE-L (against a plain dynamic-programming LCS and the rouge-score package) and BERTScore."""

import random

import pytest
import torch

from medmoe.eval.textmetrics import BertScorer, lcs_length, rouge_l, rouge_tokens


def lcs_reference(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            table[i + 1][j + 1] = table[i][j] + 1 if a[i] == b[j] else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_bit_parallel_lcs_matches_dynamic_programming():
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 70))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 70))]
        assert lcs_length(a, b) == lcs_reference(a, b)


def test_chinese_by_characters_english_by_words():
    assert rouge_tokens("患者发热，咳嗽3天 Fever") == ["患", "者", "发", "热", "咳", "嗽", "3", "天", "fever"]
    assert rouge_l("患者发热", "患者发热") == 1.0
    assert rouge_l("", "患者") == 0.0
    # LCS 2 of 4 candidate chars and 2 of 2 reference chars: P = .5, R = 1, F = 2/3
    assert rouge_l("患者发热", "发热") == pytest.approx(2 / 3)


def test_english_rouge_l_matches_rouge_score_package():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pairs = [("the patient has a fever and a cough", "patient presents with cough and fever"),
             ("Aspirin 100 mg daily", "aspirin daily at 100 mg"), ("no overlap", "entirely different")]
    for cand, ref in pairs:
        assert rouge_l(cand, ref) == pytest.approx(scorer.score(ref, cand)["rougeL"].fmeasure)


def _tiny_bert(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "patient", "has", "fever", "cough", "a"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)).eval()
    return model, tokenizer


def test_bertscore_follows_its_definition(tmp_path):
    model, tokenizer = _tiny_bert(tmp_path)
    scorer = BertScorer(model, tokenizer, layer=2)
    p, r, f = scorer.score("the patient has fever", "the patient has fever")
    assert p == pytest.approx(1.0, abs=1e-5) and r == pytest.approx(1.0, abs=1e-5) and f == pytest.approx(1.0, abs=1e-5)
    # reference computation by hand: greedy cosine matching on layer-2 states without [CLS]/[SEP]
    cand, ref = "the patient has a cough", "fever"
    def states(text):
        enc = tokenizer(text, return_tensors="pt")
        h = model(**enc, output_hidden_states=True).hidden_states[2][0, 1:-1]
        return torch.nn.functional.normalize(h, dim=-1)
    sim = states(cand) @ states(ref).T
    p_ref, r_ref = sim.max(1).values.mean().item(), sim.max(0).values.mean().item()
    p, r, f = scorer.score(cand, ref)
    assert (p, r) == (pytest.approx(p_ref, abs=1e-6), pytest.approx(r_ref, abs=1e-6))
    assert f == pytest.approx(2 * p_ref * r_ref / (p_ref + r_ref), abs=1e-6)
    assert f < 0.999
