"""Metrics for open-ended answers (CMB-Clin): ROUGE-L and BERTScore with a named local encoder.

ROUGE-L (Lin 2004), F-measure with beta = 1 (as the `rouge-score` package reports):
  tokens: each CJK character is one token (Chinese by characters); each run of ASCII letters/digits
  is one lower-cased token (English by words); whitespace and punctuation are dropped.
  P = LCS / |candidate|, R = LCS / |reference|, F = 2PR / (P + R).
  The LCS is computed with the bit-parallel algorithm of Hyyrö (2004): O(|b|) big-integer operations
  instead of an O(|a||b|) Python loop.

BERTScore (Zhang et al. 2020), without idf weighting or baseline rescaling:
  h = the encoder's hidden states at layer l, special tokens dropped, each row L2-normalized;
  S = h_cand h_ref^T (cosine similarities); P = mean_i max_j S_ij, R = mean_j max_i S_ij,
  F = 2PR / (P + R). Encoders (no multilingual BERT installs offline):
    en: minilm-l6 (all-MiniLM-L6-v2), layer 6 (last)
    zh: gemma3-270m (Gemma-3-270M, multilingual), layer 9 of 18 (middle layers match best in the
        BERTScore paper). Numbers are comparable within medmoe, not with published BERTScores
        computed with bert-base-chinese.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

_TOKEN_RE = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[A-Za-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    return [t.lower() for t in _TOKEN_RE.findall(text)]


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (Hyyrö's bit-vector recurrence).

    Bit i of V is 0 where a[: i + 1] has gained an LCS step; V' = (V + U) | (V - U), U = V & M[b_j].
    """
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        u = v & masks.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l(candidate: str, reference: str) -> float:
    cand, ref = rouge_tokens(candidate), rouge_tokens(reference)
    lcs = lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


BERTSCORE_ENCODERS = {"en": ("minilm-l6", 6), "zh": ("gemma3-270m", 9)}


@dataclass
class BertScorer:
    """BERTScore with one encoder (a BERT-like AutoModel or a causal LM) at hidden layer `layer`."""

    model: Any
    tokenizer: Any
    layer: int
    name: str = "encoder"
    max_tokens: int = 512

    @torch.inference_mode()
    def embed(self, text: str) -> torch.Tensor:
        enc = self.tokenizer(text, return_tensors="pt", truncation=True, max_length=self.max_tokens,
                             return_special_tokens_mask=True)
        special = enc.pop("special_tokens_mask")[0].bool()
        out = self.model(**enc, output_hidden_states=True)
        h = out.hidden_states[self.layer][0][~special]  # (n, d): content tokens only
        return torch.nn.functional.normalize(h.float(), dim=-1)

    def score(self, candidate: str, reference: str) -> tuple[float, float, float]:
        """(P, R, F) of one candidate against one reference; 0 when either side has no tokens."""
        c, r = self.embed(candidate), self.embed(reference)
        if len(c) == 0 or len(r) == 0:
            return 0.0, 0.0, 0.0
        sim = c @ r.T  # (n_c, n_r) cosine similarities
        precision, recall = sim.max(dim=1).values.mean().item(), sim.max(dim=0).values.mean().item()
        f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        return precision, recall, f


def load_bertscorer(language: str) -> BertScorer:
    """The named local encoder for `language` ("en" or "zh"), see the module docstring."""
    from medmoe.models import load_causal_lm, load_encoder

    name, layer = BERTSCORE_ENCODERS[language]
    model, tokenizer = load_encoder(name) if language == "en" else load_causal_lm(name)
    return BertScorer(model, tokenizer, layer, name)
