"""The head path batched (heads.features.pooled_prompts, heads.answerer.head_logits_batch, the server's
CausalLMAnswerer): rows of different lengths, formats and heads (layers, poolings, a calibration)
right-padded into shared passes get the pooled states, option log-probs and head logits that each
prompt gets alone (`forward_prompt` + `pool`, `head_logits`), on tiny random Llama, Qwen2, Gemma-3,
the Mamba hybrid, HF Mamba, a LoRA-MoE Llama and (one prompt at a time) T5."""

from __future__ import annotations

import math

import pytest
import torch

from medmoe.data.record import Record
from medmoe.eval.batch_scoring import MAX_PADDING_WASTE, length_groups
from medmoe.eval.prompts import build_prompt
from medmoe.eval.scoring import score_options
from medmoe.heads.answerer import head_logits, head_logits_batch
from medmoe.heads.features import forward_prompt, letter_plan, pool, pooled_prompts
from medmoe.models.head import HeadConfig, OptionHead
from test_heads_experts import build
from tiny_lm import tiny_tokenizer

torch.set_num_threads(1)  # tiny matrices: threads only spin on a shared machine

LONG = ("the patient has fever and cough . the patient has pain with rest . which drug of heparin and aspirin "
        "is best with the fever ? the patient has cough and pain . ") * 3
RECORDS = (  # five lengths, both formats
    Record(id="b/yesno-long", question="is aspirin best for the patient ?", context=LONG, options=("yes", "no", "maybe"), answer="A"),
    Record(id="b/four", question="which drug is best ?", options=("aspirin", "heparin", "rest", "surgery"), answer="B"),
    Record(id="b/yesno", question="is rest best ?", context="the patient has pain .", options=("yes", "no", "maybe"), answer="A"),
    Record(id="b/four-context", question="which drug is best with pain ?", context=LONG[:120],
           options=("aspirin", "heparin", "rest", "surgery"), answer="B"),
    Record(id="b/five", question="which is best with fever and cough ?", options=("aspirin", "heparin", "rest", "surgery", "a"), answer="E"),
)
TEXT = " ".join(" ".join([r.question, r.context or "", *r.options]) for r in RECORDS)
WIDTH = 32
# (letters, layer, pooling) per record: different layers and poolings in one batch; None: a calibration
READS = ((3, 1, "mean"), (4, -1, "last"), (3, 0, "last"), (4, 2, "mean"), (5, None, None))
KINDS = ("llama", "qwen2", "gemma3", "hybrid", "hf-mamba", "loramoe", "t5")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(extra_text=TEXT)


def tiny(kind: str, tokenizer):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common)).eval()
    if kind == "gemma3":  # a sliding window shorter than the prompts
        cfg = tf.Gemma3TextConfig(**common, head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
        return tf.Gemma3ForCausalLM(cfg).eval()
    return build(kind, tokenizer)


@pytest.fixture(scope="module", params=KINDS)
def expert(request, tokenizer):
    return request.param, tiny(request.param, tokenizer)


def _prompts(tokenizer):
    return [build_prompt(r, tokenizer) for r in RECORDS]


def _heads(model, tokenizer) -> list[tuple[OptionHead, HeadConfig]]:
    """A random head per READS row, standardized on the records' own pooled states (z of order 1) with
    small W, so the hidden state moves the logits by ~0.1 and one float16 rounding step by < 1e-4."""
    g = torch.Generator().manual_seed(7)
    heads = []
    for letters, layer, pooling in READS:
        head = OptionHead(letters, WIDTH, 1)
        with torch.no_grad():
            head.v.fill_(1.0)
            head.b.copy_(0.3 * torch.randn(letters, generator=g))
            if layer is not None:
                states = torch.cat([pool(forward_prompt(model, tokenizer, p.context, p.continuations)[0], layer, pooling)
                                    for p in _prompts(tokenizer)])  # (5, D)
                head.mu.copy_(states.mean(0))
                head.sigma.copy_(states.std(0) + 1e-3)
                head.W.copy_(0.02 * torch.randn(letters, WIDTH, generator=g))  # else a calibration: W = 0, no z
        questions = "yesno/en" if letters == 3 else "choice/en"
        heads.append((head.eval(), HeadConfig(kind="head" if layer is not None else "calibration", base="tiny",
                                              letters=letters, layer=layer, pooling=pooling, questions=questions)))
    return heads


BATCHINGS = [(math.inf, True), (MAX_PADDING_WASTE, True), (math.inf, False)]  # (max_waste, share_prefix)


@pytest.mark.parametrize(("max_waste", "share_prefix"), BATCHINGS)
def test_batched_pooled_states_and_logprobs_are_each_prompts_alone(expert, tokenizer, max_waste, share_prefix):
    kind, model = expert
    prompts = _prompts(tokenizer)
    pools = [(layer, pooling) if layer is not None else None for _, layer, pooling in READS]
    rows = pooled_prompts(model, tokenizer, prompts, pools, max_waste, share_prefix)
    lengths = set()
    for prompt, want, (h, logprobs, tokens) in zip(prompts, pools, rows):
        with torch.inference_mode():
            hidden, alone = forward_prompt(model, tokenizer, prompt.context, prompt.continuations)
        assert tokens == hidden[0].shape[1]
        lengths.add(tokens)
        assert logprobs == pytest.approx(alone, abs=1e-4)
        if want is None:
            assert h is None
            continue
        reference = pool(hidden, *want)
        assert h.shape == reference.shape == (1, WIDTH) and h.device.type == "cpu"
        # the same float16 rounding: equal but where a value sits on a rounding boundary (one step apart)
        torch.testing.assert_close(h, reference, rtol=2e-3, atol=1e-5)
        assert (h == reference).float().mean() >= 0.9
    assert len(lengths) == len(RECORDS)  # five lengths: padding is exercised


@pytest.mark.parametrize(("max_waste", "share_prefix"), BATCHINGS)
def test_batched_head_logits_equal_head_logits(expert, tokenizer, max_waste, share_prefix, monkeypatch):
    from medmoe.heads import features

    kind, model = expert
    heads = _heads(model, tokenizer)
    prompts = _prompts(tokenizer)
    items = [(head, config, prompt, len(r.options)) for (head, config), prompt, r in zip(heads, prompts, RECORDS)]
    real = features.pooled_prompts
    monkeypatch.setattr(features, "pooled_prompts", lambda *a: real(*a, share_prefix=share_prefix))
    batched = head_logits_batch(model, tokenizer, items, max_waste)
    moved = 0.0
    for (head, config, prompt, options), (logits, logprobs, tokens) in zip(items, batched):
        alone, alone_logprobs, alone_tokens = head_logits(model, tokenizer, head, config, prompt, options)
        assert logits.shape == (options,) and tokens == alone_tokens
        torch.testing.assert_close(logits, alone, rtol=0, atol=1e-4)
        assert int(logits.argmax()) == int(alone.argmax())
        assert logprobs == pytest.approx(alone_logprobs, abs=1e-4)
        if config.layer is not None:  # the hidden state matters: a wrong layer, pooling or padding would show
            calibration_only = head_logits(model, tokenizer, _without_z(head), config, prompt, options)[0]
            moved = max(moved, float((alone - calibration_only).abs().max()))
    assert moved > 0.02


def _without_z(head: OptionHead) -> OptionHead:
    out = OptionHead(head.letters, WIDTH, 1)
    out.load_state_dict(head.state_dict())
    with torch.no_grad():
        out.W.zero_()
    return out.eval()


def _common(rows: list[list[int]]) -> int:
    return next((i for i in range(min(map(len, rows))) if len({r[i] for r in rows}) > 1), min(map(len, rows)))


def test_a_prefix_pass_per_format_then_one_pass_per_length_group_reading_only_the_heads_layers(tokenizer):
    model = tiny("llama", tokenizer)
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    prompts = _prompts(tokenizer)
    pools = [(layer, pooling) if layer is not None else None for _, layer, pooling in READS]
    plans = [letter_plan(tokenizer, p.context, p.continuations)[0] for p in prompts]
    lengths = [len(ids) for ids in plans]
    formats = [[plans[i] for i in (0, 2)], [plans[i] for i in (1, 3, 4)]]  # yes/no, then choice: their instructions differ
    assert _common(plans) < 8 <= min(_common(rows) for rows in formats)
    pooled_prompts(model, tokenizer, prompts, pools, math.inf)
    assert len(calls) == 4  # per format: its instruction once, then its rows, whatever their heads read, in one pass
    # the layers the rows' heads read; the prefix only those a mean reads (a row's last token is its own)
    layers = [([1], [0, 1]), ([2], [-1, 2])]
    for (prefix, rest), rows, (prefix_layers, rest_layers) in zip([calls[:2], calls[2:]], formats, layers):
        k = _common(rows)
        assert prefix["input_ids"].tolist() == [rows[0][:k]] and prefix["use_cache"] is True
        assert prefix["output_hidden_states"] == prefix_layers and rest["output_hidden_states"] == rest_layers
        suffixes = sorted(len(r) - k for r in rows)  # rows by length
        assert rest["input_ids"].shape == (len(rows), max(suffixes)) and rest["use_cache"] is True
        mask = rest["attention_mask"]  # the prefix, then each row right-padded
        assert mask.shape == (len(rows), k + max(suffixes)) and mask[:, : k + 1].all()
        assert mask.sum(1).tolist() == [k + n for n in suffixes]
        assert rest["logits_to_keep"].tolist() == sorted({n - 1 for n in suffixes})
    calls.clear()
    pooled_prompts(model, tokenizer, prompts, pools, math.inf, share_prefix=False)
    assert len(calls) == 1 and calls[0]["input_ids"].shape == (5, max(lengths)) and calls[0]["use_cache"] is False
    calls.clear()
    pooled_prompts(model, tokenizer, prompts, pools, share_prefix=False)
    assert len(calls) == len(length_groups(lengths)) > 1
    calls.clear()
    pooled_prompts(model, tokenizer, [prompts[0], prompts[2]], [None, None], math.inf)
    assert [c["output_hidden_states"] for c in calls] == [False, False]  # calibrations only: no hidden states kept


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_the_answerers_mixed_batch_is_answered_as_one_by_one(tokenizer, kind):
    """Head records (two heads, two formats), records no head reads (5 options for a 4-letter head)
    and an open question in one answer_batch: the heads' answers are head_logits' (what the answerer
    did before, one pass each), the others the likelihood path's and generation's."""
    from medmoe.answer.causal_lm import CausalLMAnswerer
    from medmoe.heads.bundled import HeadSet

    model = tiny(kind, tokenizer)
    heads = _heads(model, tokenizer)
    headset = HeadSet([heads[0], heads[1]])  # yes/no: layer 1 mean; choice/en (4 letters): the last layer, last token
    open_question = Record(id="b/open", question="which drug is best with pain ?", answer="rest")
    records = [RECORDS[4], RECORDS[0], open_question, RECORDS[1], RECORDS[2], RECORDS[3]]
    answerer = CausalLMAnswerer(model, tokenizer, "tiny", max_new_tokens=4, heads=headset)
    answers = answerer.answer_batch(records)
    assert [a.expert for a in answers] == ["tiny", "tiny+head(head)", "tiny", "tiny+head(head)", "tiny+head(head)",
                                           "tiny+head(head)"]
    for record, answer in zip(records, answers):
        if not record.options:
            alone = answerer.answer_batch([record])[0]
            assert (answer.answer, answer.finish_reason) == (alone.answer, alone.finish_reason)
            continue
        prompt = build_prompt(record, tokenizer)
        found = headset.for_record(record)
        if found is None:
            probs = score_options(model, tokenizer, prompt.context, prompt.continuations).probabilities()
        else:
            logits = head_logits(model, tokenizer, *found, prompt, len(record.options))[0]
            probs = torch.softmax(logits, dim=0).tolist()
        assert list(answer.label_scores) == list(record.letters)
        assert list(answer.label_scores.values()) == pytest.approx(probs, abs=1e-4)
        assert answer.answer == record.letters[max(range(len(probs)), key=probs.__getitem__)]
