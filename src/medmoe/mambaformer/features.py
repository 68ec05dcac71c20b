"""Per-token and global gate features, batched over padded batches (no Python loop over tokens).

Glossary (docs/router.md, docs/methods.md 1.2), for a batch of B queries padded to T tokens:
  ids  (B, T) token ids, mask (B, T) bool (True = real token; left or right padding both work)
  e_t  (D,)   the token's row of the frozen embedding table (mean-centred, top-D principal components)
  c_t  complexity     1 - cos(e_t, mean of e_{t'} for real t' != t with |t' - t| <= window);
                      0 when the query has no neighbour
  r_t  rarity         -log p(v_t) / log(N + alpha V), p = add-alpha unigram frequency on the training corpus
  g_t  fragmentation  1 - 1/k_t, k_t = number of sub-word pieces of the word containing token t
  d_t  domain         1 if the token's word (case-insensitive) is in the medical lexicon
  l    length         min(n / L_ref, 1);   log_length = log n / log L_ref
A *word* is a maximal run of alphanumeric tokens (every character after the marker alphanumeric) where
no token but the first carries a word-start marker ("Ġ", "▁", space); every other token ("'s", "(",
special tokens) is a word of its own.
Words are matched against the lexicon by a two-modulus polynomial hash of their token ids, computed
with scatter_add; lexicon words are hashed by the same code after tokenising them (four casings /
spacings each), so the match is exact up to hash collisions (~1e-9 per word pair).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from medmoe.errors import MedmoeError

TOKEN_FEATURES = ("complexity", "rarity", "fragmentation", "domain")
GLOBAL_FEATURES = ("length", "log_length")
WORD_START_MARKERS = ("Ġ", "▁", " ", "Ċ", "\n", "\t")
# Two polynomial hashes (base P, modulus M); terms are reduced mod M before summing, so int64 never overflows.
HASH_BASES = ((1_000_003, 2_147_483_647), (911_382_323, 1_000_000_007))


@dataclass
class FeatureConfig:
    """How gate features are computed (serialised with the router checkpoint)."""

    window: int = 4              # neighbours on each side for the complexity c_t
    l_ref: int = 512             # L_ref of the normalised length l = min(n / L_ref, 1)
    embed_dim: int = 64          # principal components kept of the frozen embedding table
    smoothing: float = 1.0       # alpha of the add-alpha unigram estimate
    max_word_pieces: int = 64    # pieces beyond this position in a word share a hash power
    max_tokens: int = 4096       # a query's gate tokens at most: the first max_tokens (queries.encode_queries)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FeatureConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class GateFeatures:
    """token: (B, T, F) in TOKEN_FEATURES order; mask: (B, T) bool; global_: (B, G); n_tokens: (B,)."""

    token: torch.Tensor
    mask: torch.Tensor
    global_: torch.Tensor
    n_tokens: torch.Tensor

    def __getitem__(self, index) -> GateFeatures:
        return GateFeatures(self.token[index], self.mask[index], self.global_[index], self.n_tokens[index])


@dataclass
class VocabInfo:
    """Per-vocabulary-entry flags: starts_word (V,) bool, alnum (V,) bool."""

    starts_word: torch.Tensor
    alnum: torch.Tensor

    @classmethod
    def from_tokens(cls, tokens: Sequence[str], special_ids: Iterable[int] = (),
                    texts: Sequence[str] | None = None) -> VocabInfo:
        """Flags from token strings; `texts` (each token decoded on its own) decide alphanumeric-ness when
        given, since byte-level BPE spells non-ASCII bytes as letters ("Âł" is a no-break space)."""
        starts = [t.startswith(WORD_START_MARKERS) for t in tokens]
        if texts is None:
            bodies = [t.lstrip("".join(WORD_START_MARKERS)) for t in tokens]
        else:
            starts = [s or x[:1].isspace() for s, x in zip(starts, texts)]
            bodies = [x.strip() for x in texts]
        alnum = torch.tensor([bool(b) and b.isalnum() for b in bodies], dtype=torch.bool)
        special = [i for i in special_ids if 0 <= i < len(tokens)]
        alnum[special] = False
        return cls(torch.tensor(starts, dtype=torch.bool), alnum)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> VocabInfo:
        """From a Hugging Face tokenizer (special tokens count as non-alphanumeric)."""
        ids = list(range(len(tokenizer)))
        tokens = [t or "" for t in tokenizer.convert_ids_to_tokens(ids)]
        texts = tokenizer.batch_decode([[i] for i in ids])
        return cls.from_tokens(tokens, tokenizer.all_special_ids, texts)


def segment_words(ids: torch.Tensor, mask: torch.Tensor, vocab: VocabInfo):
    """Word segmentation of a padded batch.

    Returns word_id (B, T) long: index of the token's word within its row (pads: the previous word, or 0),
    piece (B, T) long: position of the token within its word, alnum (B, T) bool.
    """
    B, T = ids.shape
    alnum = vocab.alnum[ids] & mask                                          # (B, T)
    prev_alnum = F.pad(alnum[:, :-1], (1, 0), value=False)                   # (B, T)
    start = mask & (vocab.starts_word[ids] | ~alnum | ~prev_alnum)           # (B, T)
    word_id = (start.long().cumsum(1) - 1).clamp_min(0)                      # (B, T)
    position = torch.arange(T, device=ids.device).expand(B, T)
    start_pos = torch.where(start, position, torch.zeros_like(position)).cummax(1).values
    return word_id, position - start_pos, alnum


@functools.lru_cache(maxsize=8)
def _hash_powers(base: int, modulus: int, count: int) -> torch.Tensor:
    """(count,) int64: base^k mod modulus for k = 0 .. count - 1."""
    return torch.tensor([pow(base, k, modulus) for k in range(count)], dtype=torch.long)


def word_keys(ids: torch.Tensor, mask: torch.Tensor, word_id: torch.Tensor, piece: torch.Tensor,
              max_pieces: int) -> torch.Tensor:
    """(B, T) int64: the hash key of each token's word (same for all tokens of a word)."""
    B, T = ids.shape
    piece = piece.clamp(max=max_pieces - 1)
    keys = []
    for base, modulus in HASH_BASES:
        powers = _hash_powers(base, modulus, max_pieces).to(ids.device)
        term = ((ids.long() + 1) * powers[piece]) % modulus * mask          # (B, T)
        per_word = torch.zeros(B, T, dtype=torch.long, device=ids.device).scatter_add_(1, word_id, term) % modulus
        keys.append(per_word.gather(1, word_id))                             # (B, T)
    return keys[0] * HASH_BASES[1][1] + keys[1]


def principal_components(weight: torch.Tensor, k: int) -> torch.Tensor:
    """(V, D) -> (V, k): mean-centred rows projected on the top-k eigenvectors of the covariance."""
    x = weight.detach().double()
    x = x - x.mean(0, keepdim=True)
    if k >= x.shape[1]:
        return x.float()
    _, vectors = torch.linalg.eigh(x.T @ x)                                  # ascending eigenvalues
    return (x @ vectors[:, -k:].flip(1)).float()


class GateFeaturizer:
    """Computes `GateFeatures` from token ids with frozen per-vocabulary tables.

    embeddings (V, D) float, rarity (V,) float, vocab flags, lexicon_keys (K,) int64 sorted.
    """

    def __init__(self, embeddings: torch.Tensor, rarity: torch.Tensor, vocab: VocabInfo,
                 lexicon_keys: torch.Tensor, config: FeatureConfig):
        V = embeddings.shape[0]
        if not (rarity.shape == (V,) and vocab.starts_word.shape == (V,) and vocab.alnum.shape == (V,)):
            raise MedmoeError(f"GateFeaturizer: tables disagree on vocabulary size (embeddings have {V} rows)")
        self.embeddings, self.rarity, self.vocab = embeddings.float(), rarity.float(), vocab
        self.lexicon_keys = torch.unique(lexicon_keys.long())
        self.config = config

    @property
    def vocab_size(self) -> int:
        return self.embeddings.shape[0]

    @classmethod
    def build(cls, embedding_weight: torch.Tensor, vocab: VocabInfo, corpus: Iterable[Sequence[int]],
              config: FeatureConfig | None = None, lexicon_words: Iterable[str] = (),
              encode: Callable[[list[str]], list[list[int]]] | None = None) -> GateFeaturizer:
        """Fit the frozen tables: PCA of the embedding table, unigram rarity on `corpus` (training token
        ids), and the hashed lexicon (`encode` tokenises a list of strings without special tokens)."""
        config = config or FeatureConfig()
        V = embedding_weight.shape[0]
        counts = torch.zeros(V, dtype=torch.float64)
        for ids in corpus:
            seq = torch.as_tensor(list(ids), dtype=torch.long)
            if len(seq) and (seq.min() < 0 or seq.max() >= V):
                raise MedmoeError(f"GateFeaturizer.build: corpus token id outside the vocabulary of {V}")
            counts += torch.bincount(seq, minlength=V).double()
        total, alpha = counts.sum().item(), config.smoothing
        rarity = -torch.log((counts + alpha) / (total + alpha * V)) / math.log(total + alpha * V)
        words = sorted({w.lower() for w in lexicon_words})
        if words and encode is None:
            raise MedmoeError("GateFeaturizer.build: a lexicon needs `encode` (the tokenizer) to be hashed")
        featurizer = cls(principal_components(embedding_weight, config.embed_dim), rarity.float(), vocab,
                         torch.zeros(0, dtype=torch.long), config)
        if words and encode is not None:  # (words without encode raised above)
            featurizer.lexicon_keys = featurizer.hash_words(words, encode)
        return featurizer

    def hash_words(self, words: Sequence[str], encode: Callable[[list[str]], list[list[int]]]) -> torch.Tensor:
        """Sorted unique keys of the words in four forms: word, Word, " word", " Word"."""
        variants = [v for w in words for v in (w, w.capitalize(), " " + w, " " + w.capitalize())]
        encoded = [list(e) for e in encode(variants)]
        encoded = [e for e in encoded if 0 < len(e)]
        if not encoded:
            return torch.zeros(0, dtype=torch.long)
        T = max(len(e) for e in encoded)
        ids = torch.zeros(len(encoded), T, dtype=torch.long)
        mask = torch.zeros(len(encoded), T, dtype=torch.bool)
        for i, e in enumerate(encoded):
            ids[i, : len(e)] = torch.tensor(e)
            mask[i, : len(e)] = True
        word_id, piece, alnum = segment_words(ids, mask, self.vocab)
        keys = word_keys(ids, mask, word_id, piece, self.config.max_word_pieces)
        one_word = ((word_id * mask).amax(1) == 0) & (alnum | ~mask).all(1)   # exactly one alphanumeric word
        return torch.unique(keys[one_word, 0])

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> GateFeatures:
        """ids (B, T) long, mask (B, T) bool/int (default: all real) -> GateFeatures."""
        if ids.dim() != 2:
            raise MedmoeError(f"gate features: token ids must be (batch, length), got shape {tuple(ids.shape)}")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        if mask.shape != ids.shape:
            raise MedmoeError(f"gate features: mask shape {tuple(mask.shape)} != ids shape {tuple(ids.shape)}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise MedmoeError(f"gate features: token id outside the vocabulary of {self.vocab_size}")
        n = mask.sum(1)                                                          # (B,)
        if (n < 1).any():
            raise MedmoeError("gate features: every query needs at least one real token")
        B, T = ids.shape
        m = mask.float()                                                         # (B, T)

        # c_t: 1 - cos(e_t, sum of real neighbours within the window), by prefix sums S.
        e = self.embeddings[ids] * m[..., None]                                  # (B, T, D)
        S = F.pad(e.double().cumsum(1), (0, 0, 1, 0))                            # (B, T+1, D): S[:, t] = sum_{t' < t}
        count = F.pad(m.double().cumsum(1), (1, 0))                              # (B, T+1)
        t = torch.arange(T, device=ids.device)
        hi, lo = (t + self.config.window + 1).clamp(max=T), (t - self.config.window).clamp(min=0)
        neighbours = (S[:, hi] - S[:, lo]).float() - e                           # (B, T, D)
        n_neighbours = (count[:, hi] - count[:, lo]).float() - m                 # (B, T)
        cos = F.cosine_similarity(e, neighbours, dim=-1, eps=1e-8)               # (B, T)
        complexity = torch.where(n_neighbours > 0.5, 1.0 - cos, torch.zeros_like(cos))

        # r_t, g_t, d_t from word segmentation.
        rarity = self.rarity[ids]                                                # (B, T)
        word_id, piece, alnum = segment_words(ids, mask, self.vocab)
        pieces = torch.zeros(B, T, device=ids.device).scatter_add_(1, word_id, m).gather(1, word_id)
        fragmentation = 1.0 - 1.0 / pieces.clamp_min(1.0)                        # (B, T)
        if len(self.lexicon_keys):
            keys = word_keys(ids, mask, word_id, piece, self.config.max_word_pieces)
            slot = torch.searchsorted(self.lexicon_keys, keys).clamp(max=len(self.lexicon_keys) - 1)
            domain = ((self.lexicon_keys[slot] == keys) & alnum).float()         # (B, T): key in sorted table
        else:
            domain = torch.zeros(B, T, device=ids.device)

        token = torch.stack([complexity, rarity, fragmentation, domain], dim=-1) * m[..., None]   # (B, T, F)
        n_f = n.float()
        log_ref = math.log(max(self.config.l_ref, 2))
        global_ = torch.stack([(n_f / self.config.l_ref).clamp(max=1.0), n_f.log() / log_ref], dim=-1)  # (B, G)
        return GateFeatures(token, mask, global_, n)

    # ---- serialisation (the router checkpoint stores these tensors) -----------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {"embeddings": self.embeddings.contiguous(), "rarity": self.rarity.contiguous(),
                "starts_word": self.vocab.starts_word.to(torch.uint8), "alnum": self.vocab.alnum.to(torch.uint8),
                "lexicon_keys": self.lexicon_keys.contiguous()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], config: FeatureConfig) -> GateFeaturizer:
        try:
            vocab = VocabInfo(tensors["starts_word"].bool(), tensors["alnum"].bool())
            return cls(tensors["embeddings"], tensors["rarity"], vocab, tensors["lexicon_keys"], config)
        except KeyError as exc:
            raise MedmoeError(f"gate feature tables: missing tensor {exc}") from exc


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ids (B, T) and mask (B, T)."""
    if not sequences:
        raise MedmoeError("pad_batch: empty batch")
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), max(T, 1)), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), max(T, 1), dtype=torch.bool)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = True
    return ids, mask


def featurizer_for_tokenizer(tokenizer, embedding_weight: torch.Tensor, corpus_texts: Iterable[str],
                             lexicon_words: Iterable[str] = (), config: FeatureConfig | None = None) -> GateFeaturizer:
    """Build the featurizer for a Hugging Face tokenizer: its vocabulary flags, the expert's input embedding
    table (e.g. `model.get_input_embeddings().weight`), unigram counts of the training texts and the lexicon."""
    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    vocab = VocabInfo.from_tokenizer(tokenizer)
    V = len(vocab.alnum)
    if embedding_weight.shape[0] < V:
        raise MedmoeError(f"featurizer: embedding table has {embedding_weight.shape[0]} rows for a vocabulary of {V}")
    return GateFeaturizer.build(embedding_weight[:V], vocab, encode(list(corpus_texts)), config, lexicon_words, encode)
