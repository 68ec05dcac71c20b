"""Encoder-decoder (T5-family) models as experts: option scoring and generation, on a tiny random T5."""

import pytest
import torch

from loramoe_tiny_models import tiny_model
from medmoe.eval.model import HFEvalModel
from medmoe.eval.scoring import score_options


class T5CharTokenizer:
    """Character ids 3..127, </s> = 1 appended with special tokens (as T5's tokenizer does), pad 0."""

    pad_token_id, eos_token_id, bos_token_id = 0, 1, None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [3 + ord(c) % 125 for c in text]
        return {"input_ids": ids + ([self.eos_token_id] if add_special_tokens else [])}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in (int(t) for t in ids) if not (skip_special_tokens and i < 3))


@pytest.fixture(scope="module")
def t5():
    model, _ = tiny_model("t5")
    return model.eval(), T5CharTokenizer()


def test_option_scores_equal_the_models_own_loss(t5):
    """log p(option | context) = -(T5's mean label cross-entropy) x option length, per option; options
    of different lengths share one padded decoder batch."""
    model, tok = t5
    context, options = "Question: is it? Answer:", [" yes", " no", " maybe"]
    scores = score_options(model, tok, context, options)
    enc = torch.tensor([tok(context)["input_ids"]])
    for option, got in zip(options, scores.logprobs):
        labels = torch.tensor([tok(option[1:], add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            want = -model(input_ids=enc, labels=labels).loss.item() * labels.shape[1]
        assert got == pytest.approx(want, abs=1e-4)
    assert scores.num_tokens == [3, 2, 5] and scores.context_tokens == len(context) + 1


def test_eval_model_scores_batches_and_generates(t5):
    model, tok = t5
    lm = HFEvalModel(model, tok, "tiny-t5")
    requests = [("First context:", [" a", " bb"]), ("Second, longer context:", [" ccc", " d"])]
    batch = lm.score_batch(requests)
    for (context, options), got in zip(requests, batch):
        assert got.logprobs == pytest.approx(lm.score_options(context, options).logprobs, abs=1e-6)
    gen = lm.generate("Explain:", max_new_tokens=6)
    with torch.no_grad():
        ids = torch.tensor([tok("Explain:")["input_ids"]])
        direct = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)[0, 1:]
    assert gen.text == tok.decode(direct, skip_special_tokens=True).strip()
    assert gen.prompt_tokens == len("Explain:") + 1 and 0 <= gen.new_tokens <= 6


def test_seq2seq_completion_loss_is_the_models_own_loss(t5):
    from medmoe.train.data import Example, collate, tokenize_examples
    from medmoe.train.finetune import completion_loss

    model, tok = t5
    examples = [Example("Question: 1 plus 2? Answer:", " 3"), Example("Q: x?", " a longer answer")]
    features = tokenize_examples(examples, tok, max_length=64, seq2seq=True)
    assert features[0]["input_ids"][-1] == tok.eos_token_id  # the encoder input ends with </s>
    assert features[1]["labels"] == tok("a longer answer", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    batch = collate(features, pad_id=0)
    assert batch["input_ids"].shape == (2, len(features[0]["input_ids"])) and batch["labels"].shape == (2, 16)
    with torch.no_grad():
        want = model(**batch).loss  # T5's mean cross-entropy over the non-padding labels
        got, n_tokens = completion_loss(model, **batch)
        assert got.item() == pytest.approx(want.item(), rel=1e-5) and n_tokens == int((batch["labels"] != -100).sum())


def test_train_expert_top_layer_of_a_t5_decoder(tmp_path):
    """`medmoe train expert`'s recipe (full method, --top-layers 1 --freeze-mixers) on a T5: only the
    last decoder block's feed-forward and the decoder's final norm move."""
    from loramoe_tiny_models import arithmetic_examples
    from medmoe.train.finetune import FinetuneConfig, finetune

    model, _ = tiny_model("t5")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = FinetuneConfig(method="full", output=str(tmp_path / "run"), steps=4, batch_size=4, lr=1e-2, warmup_steps=1,
                         max_length=32, eval_examples=4, eval_every=4, save_every=4, progress=False,
                         top_layers=1, freeze_mixers=True)
    result = finetune(cfg, model, T5CharTokenizer(), train_examples=arithmetic_examples(24))
    after = result["model"].state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("decoder.block.1.layer.2.", "decoder.final_layer_norm.")) for k in moved), moved
    assert (tmp_path / "run" / "model" / "config.json").is_file()
