"""A tiny random Llama and a word-level tokenizer, built offline in a fraction of a second."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

WORDS = tuple(
    "<pad> <unk> <s> </s> <|user|> <|assistant|> A B C D E yes no maybe Answer Question Context : . , ? "
    "the patient has fever cough pain which drug is best aspirin heparin rest surgery of and a with "
    "答 案 问 题 病 例 是 否 可 能 患 者 发 热"
.split()
)


def pre_split(text: str) -> list[str]:
    splitter = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return [piece for piece, _ in splitter.pre_tokenize_str(text)]


CHAT_TEMPLATE = "{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"


def tiny_tokenizer(chat: bool = False, extra_text: str = ""):
    """Word-level tokenizer over WORDS (plus every word of `extra_text`, so real data is not all <unk>)."""
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(WORDS + tuple(pre_split(extra_text))))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(seed: int = 0, vocab: int = len(WORDS)):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return LlamaForCausalLM(config).eval()
