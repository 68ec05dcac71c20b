"""Tiny random Hugging Face models, built in-process, one per supported architecture."""

from __future__ import annotations

import torch

VOCAB = 128

# Tiny matrices gain nothing from threads, and on a busy shared machine extra threads spin and wait.
torch.set_num_threads(1)


def tiny_model(arch: str):
    """A (model, kind) pair with a few thousand parameters; kind is "causal", "seq2seq" or "encoder"."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if arch == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common)), "causal"
    if arch == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common)), "causal"
    if arch == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=8)), "causal"
    if arch == "gemma3":
        cfg = tf.Gemma3TextConfig(**common, head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
        return tf.Gemma3ForCausalLM(cfg), "causal"
    if arch == "t5":
        cfg = tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                          num_heads=4, decoder_start_token_id=0, pad_token_id=0)
        return tf.T5ForConditionalGeneration(cfg), "seq2seq"
    if arch == "bert":
        cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64, num_labels=3)
        return tf.BertForSequenceClassification(cfg), "encoder"
    raise ValueError(arch)


def model_inputs(kind: str, batch: int = 2, length: int = 12, seed: int = 1) -> dict:
    """Inputs with one right-padded row, plus labels so the model returns a loss."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -3:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if kind == "causal":
        inputs["labels"] = ids.masked_fill(mask == 0, -100)
    elif kind == "seq2seq":
        inputs["labels"] = torch.randint(1, VOCAB, (batch, 5), generator=g)
    else:
        inputs["labels"] = torch.tensor([0, 2][:batch] + [1] * max(0, batch - 2))
    return inputs


class CharTokenizer:
    """A character-level stand-in for a Hugging Face tokenizer (ids 3..127; eos 2; pad 0)."""

    eos_token_id = 2
    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [3 + (ord(c) % (VOCAB - 3)) for c in text]}


def arithmetic_examples(n: int = 40) -> list:
    """Tiny question/answer pairs a small model can start to fit in a few steps."""
    from medmoe.train.data import format_record

    return [format_record(f"{i % 7} plus {i % 5}?", str(i % 7 + i % 5)) for i in range(n)]


class Killed(Exception):
    """Raised from a finetune step callback to stand for a killed run."""


def run_tiny_finetune(cfg, on_step=None, examples=None):
    """`finetune(cfg)` on a tiny random Llama over arithmetic examples (16 unless `examples`)."""
    from medmoe.train.finetune import finetune

    model, _ = tiny_model("llama")
    return finetune(cfg, model, CharTokenizer(), train_examples=examples or arithmetic_examples(16), on_step=on_step)


def kill_at(step: int):
    """A finetune on_step callback that raises Killed once `step` optimizer steps are done."""
    def on_step(done, loss):
        if done == step:
            raise Killed()
    return on_step


def train_log(folder) -> list:
    """The rows of a run folder's train_log.jsonl."""
    import json

    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
