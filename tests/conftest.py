"""Shared fixtures: a tiny random causal LM with a real (offline-built) tokenizer."""

from __future__ import annotations

import pytest


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer trained in-process on a few sentences (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "Is the sky blue? Answer: yes no maybe",
        "Question: which option is correct? A. first B. second C. third D. fourth",
        "Context: patients with diabetes were treated with insulin and metformin.",
        "问题：上消化道出血可单纯表现为呕血或黑便 答案：A B C D E",
    ] * 10
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm(tiny_tokenizer):
    """(model, tokenizer): a 2-layer LlamaForCausalLM with random weights, fixed seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval(), tiny_tokenizer


@pytest.fixture()
def tiny_lm_dir(tiny_lm, tmp_path):
    """The tiny LM saved with save_pretrained (safetensors) to a local folder."""
    model, tokenizer = tiny_lm
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
