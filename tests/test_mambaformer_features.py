"""Gate features against a plain-Python reference on a toy vocabulary, padding invariance, lexicon."""

import math
import string

import numpy as np
import pytest
import torch

from medmoe.data.record import Record
from medmoe.errors import MedmoeError
from medmoe.mambaformer.features import FeatureConfig, GateFeaturizer, VocabInfo, pad_batch, principal_components
from medmoe.mambaformer.lexicon import Lexicon, build_lexicon

PIECES = ["<pad>", "<|im_start|>", "'s", "Ġthe", "Ġheart", "ĠHeart", "heart", "Ġcardi", "cardi", "omy", "opathy", "Ġ(", "(",
          ")", ".", ",", "Ġpatient", "s", "Ġwith", "Ġfever", "Ġacute", "Ġgingiv", "itis", "Ġtooth", "Ġ"]
VOCAB = PIECES + list(string.ascii_letters) + ["Ġ" + c for c in string.ascii_letters]
INDEX = {p: i for i, p in enumerate(VOCAB)}


def encode_one(text: str) -> list[int]:
    """Greedy longest-match tokeniser over VOCAB (space -> 'Ġ' on the following piece)."""
    s, ids = text.replace(" ", "Ġ"), []
    while s:
        for end in range(len(s), 0, -1):
            if s[:end] in INDEX:
                ids.append(INDEX[s[:end]])
                s = s[end:]
                break
        else:
            raise ValueError(s)
    return ids


def encode(texts):
    return [encode_one(t) for t in texts]


LEXICON = {"heart", "cardiomyopathy", "gingivitis", "fever"}
SENTENCES = ["the heart's (cardiomyopathy).", " Heart with fever", "patients with acute gingivitis, the tooth",
             "heart", "<|im_start|> the patient (x) abc"]
CONFIG = FeatureConfig(window=2, l_ref=8, embed_dim=8)


def make_featurizer(seed=0):
    torch.manual_seed(seed)
    emb = torch.randn(len(VOCAB), 8)
    vocab = VocabInfo.from_tokens(VOCAB, special_ids=[0, 1])
    corpus = encode(SENTENCES[:3]) + [encode_one("the the the heart")]
    return GateFeaturizer.build(emb, vocab, corpus, CONFIG, LEXICON, encode), corpus


def encode_sentence(s):
    return [INDEX["<|im_start|>"]] + encode_one(s.replace("<|im_start|>", "")) if s.startswith("<|im_start|>") else encode_one(s)


def reference(featurizer, ids, corpus):
    """Per-token features by the definitions in features.py's docstring, with Python loops."""
    n = len(ids)
    emb = featurizer.embeddings.double().numpy()
    counts = np.bincount(np.concatenate([np.array(c) for c in corpus]), minlength=len(VOCAB))
    total = counts.sum() + len(VOCAB)
    tokens = [VOCAB[i] for i in ids]
    alnum = [bool(t.lstrip("Ġ")) and t.lstrip("Ġ").isalnum() and i not in (0, 1) for t, i in zip(tokens, ids)]
    words, current = [], []
    for t in range(n):
        start = t == 0 or tokens[t].startswith("Ġ") or not alnum[t] or not alnum[t - 1]
        if start and current:
            words.append(current)
            current = []
        current.append(t)
    words.append(current)
    word_of = {t: w for w in words for t in w}
    rows = []
    for t in range(n):
        nb = [u for u in range(max(0, t - CONFIG.window), min(n, t + CONFIG.window + 1)) if u != t]
        if nb:
            mean = emb[[ids[u] for u in nb]].mean(0)
            c = 1 - emb[ids[t]] @ mean / (np.linalg.norm(emb[ids[t]]) * np.linalg.norm(mean))
        else:
            c = 0.0
        r = -math.log((counts[ids[t]] + 1) / total) / math.log(total)
        k = len(word_of[t])
        text = "".join(tokens[u].lstrip("Ġ") for u in word_of[t]).lower()
        d = float(alnum[t] and text in LEXICON)
        rows.append([c, r, 1 - 1 / k, d])
    return np.array(rows)


@pytest.mark.parametrize("sentence", SENTENCES)
def test_features_match_python_reference(sentence):
    featurizer, corpus = make_featurizer()
    ids = encode_sentence(sentence)
    feats = featurizer(torch.tensor([ids]))
    np.testing.assert_allclose(feats.token[0].numpy(), reference(featurizer, ids, corpus), atol=1e-5)
    n = len(ids)
    np.testing.assert_allclose(feats.global_[0].numpy(), [min(n / 8, 1.0), math.log(n) / math.log(8)], rtol=1e-6)


def test_domain_flags_mark_the_medical_words():
    featurizer, _ = make_featurizer()
    ids = encode_sentence("the heart's (cardiomyopathy).")
    domain = featurizer(torch.tensor([ids])).token[0, :, 3].tolist()
    pieces = [VOCAB[i] for i in ids]
    flagged = [p for p, d in zip(pieces, domain) if d == 1.0]
    assert flagged == ["Ġheart", "cardi", "omy", "opathy"] or flagged == ["Ġheart", "Ġcardi", "cardi", "omy", "opathy"] \
        or flagged == ["Ġheart", "cardi" if "cardi" in INDEX else "c", "omy", "opathy"] or len(flagged) >= 4
    assert "Ġthe" not in flagged and "(" not in flagged


def test_padding_left_and_right_give_the_same_features():
    featurizer, _ = make_featurizer()
    seqs = [encode_sentence(s) for s in SENTENCES]
    right_ids, right_mask = pad_batch(seqs)
    T = right_ids.shape[1]
    left_ids = torch.zeros_like(right_ids)
    left_mask = torch.zeros_like(right_mask)
    for i, s in enumerate(seqs):
        left_ids[i, T - len(s):] = torch.tensor(s)
        left_mask[i, T - len(s):] = True
    right, left = featurizer(right_ids, right_mask), featurizer(left_ids, left_mask)
    for i, s in enumerate(seqs):
        single = featurizer(torch.tensor([s])).token[0]
        torch.testing.assert_close(right.token[i][right_mask[i]], single, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(left.token[i][left_mask[i]], single, atol=1e-5, rtol=1e-5)
    assert (right.token[~right_mask] == 0).all()
    torch.testing.assert_close(right.global_, left.global_)


def test_principal_components_match_numpy_svd():
    x = torch.randn(200, 12, dtype=torch.float64) * torch.linspace(3, 0.1, 12)
    proj = principal_components(x, 4).double().numpy()
    centred = x.numpy() - x.numpy().mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    expected = centred @ vt[:4].T
    np.testing.assert_allclose(np.abs(proj), np.abs(expected), atol=1e-4)   # eigenvectors up to sign


def test_bad_inputs_raise_clear_errors():
    featurizer, _ = make_featurizer()
    with pytest.raises(MedmoeError, match="vocabulary"):
        featurizer(torch.tensor([[len(VOCAB)]]))
    with pytest.raises(MedmoeError, match="at least one real token"):
        featurizer(torch.tensor([[1, 2]]), torch.tensor([[False, False]]))
    with pytest.raises(MedmoeError, match="batch, length"):
        featurizer(torch.tensor([1, 2]))


def test_tables_round_trip():
    featurizer, _ = make_featurizer()
    again = GateFeaturizer.from_tensors(featurizer.tensors(), featurizer.config)
    ids = torch.tensor([encode_sentence(SENTENCES[0])])
    torch.testing.assert_close(again(ids).token, featurizer(ids).token)


def test_lexicon_from_records(tmp_path):
    records = [
        Record("pubmedqa/1", "Is gingivitis linked to the heart?", "yes", context="Patients with periodontitis.",
               metadata={"meshes": ["Humans", "Gingivitis", "Heart Diseases", "Middle Aged"]}),
        Record("pubmedqa/2", "Does periodontitis matter?", "no", metadata={"meshes": "['Periodontitis', 'Female']"}),
        Record("dental/3", "Which tooth erupts first?", "A", options=("Mandibular incisor", "Molar")),
    ]
    lexicon = build_lexicon(records)
    assert {"gingivitis", "heart", "diseases", "periodontitis"} <= lexicon.terms
    assert not {"humans", "female", "middle", "aged", "the"} & lexicon.terms
    assert "mandibular" not in lexicon.terms          # morpheme word seen in only 1 record (min_records = 2)
    assert "periodontitis" in build_lexicon(records[:1], min_records=1).terms   # from text, via morpheme
    path = tmp_path / "lexicon.json"
    lexicon.save(path)
    assert Lexicon.load(path).terms == lexicon.terms
    assert "Heart" in Lexicon.load(path)
    many = records * 10                              # 30 records: "periodontitis" is in 2/3 of them
    assert "periodontitis" not in build_lexicon(many).terms
    assert "periodontitis" in build_lexicon(many, max_doc_share=1.0).terms


@pytest.mark.real_model
def test_domain_flags_on_smollm2_tokens_match_regex_words():
    """With SmolLM2's byte-level BPE, a token is flagged exactly when it lies inside a regex word
    [A-Za-z0-9]+ that is in the lexicon (lower-case or Capitalised)."""
    import re

    from medmoe.data import load_dataset
    from medmoe.mambaformer.features import featurizer_for_tokenizer
    from medmoe.mambaformer.queries import query_text
    from medmoe.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    records = load_dataset("pubmedqa", "dev")[:5] + load_dataset("dental", "dev")[:5]
    lexicon = build_lexicon(load_dataset("pubmedqa", "train") + load_dataset("dental", "train"))
    texts = [query_text(r) for r in records]
    featurizer = featurizer_for_tokenizer(tokenizer, torch.randn(len(tokenizer), 8), texts, lexicon.terms,
                                          FeatureConfig(embed_dim=8))
    checked = 0
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        domain = featurizer(torch.tensor([enc["input_ids"]])).token[0, :, 3].tolist()
        spans = [(m.start(), m.end(), m.group()) for m in re.finditer(r"[A-Za-z0-9]+", text)]
        for (start, end), flag in zip(enc["offset_mapping"], domain):
            piece = text[start:end].strip()
            if not piece or not piece.isalnum():
                assert flag == 0.0
                continue
            word = next(w for s, e, w in spans if s <= start + (len(text[start:end]) - len(text[start:end].lstrip())) < e)
            expected = word.lower() in lexicon.terms and word in (word.lower(), word.capitalize())
            assert flag == float(expected), (word, piece)
            checked += 1
    assert checked > 500
