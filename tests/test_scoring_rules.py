"""Each scoring rule against a reference computation on a tiny random Llama."""

import pytest
import torch

from medmoe.data.record import Record
from medmoe.eval.batch_scoring import score_options_batch
from medmoe.eval.model import Generation, HFEvalModel
from medmoe.eval.prompts import build_prompt
from medmoe.eval.rules import apply_rule
from medmoe.eval.scoring import score_options
from tiny_lm import tiny_llama, tiny_tokenizer

CHOICE = Record("q1", "which drug is best ?", "B", options=("aspirin", "heparin with rest", "surgery", "rest"))
YESNO = Record("q2", "the patient has fever ?", "A", context="the patient has cough and fever .", options=("yes", "no", "maybe"))


@pytest.fixture(scope="module")
def lm():
    return tiny_llama(), tiny_tokenizer()


def naive_logprob(model, tokenizer, context, continuation):
    """lm-eval's reference: one full forward over context + continuation, summed continuation log-probs."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    logits = model(input_ids=torch.tensor([whole])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)), len(cont)


def test_shared_context_scoring_equals_one_forward_per_option(lm):
    model, tok = lm
    prompt = build_prompt(CHOICE, tok, kind="text")
    scores = score_options(model, tok, prompt.context, prompt.continuations)
    for i, cont in enumerate(prompt.continuations):
        reference, n_tokens = naive_logprob(model, tok, prompt.context, cont)
        assert scores.logprobs[i] == pytest.approx(reference, abs=1e-4)
        assert scores.num_tokens[i] == n_tokens
    assert scores.num_tokens == [1, 3, 1, 1]  # multi-token options exercise the KV-cache path


def test_loglik_and_loglik_norm_rules(lm):
    model, tok = lm
    em = HFEvalModel(model, tok)
    prompt = build_prompt(CHOICE, tok, kind="text")
    refs = [naive_logprob(model, tok, prompt.context, c)[0] for c in prompt.continuations]
    norm_refs = [r / len(o) for r, o in zip(refs, CHOICE.options)]
    (plain,) = apply_rule(em, [CHOICE], "loglik", [[]])
    (norm,) = apply_rule(em, [CHOICE], "loglik-norm", [[]])
    assert plain.prediction == "ABCD"[max(range(4), key=refs.__getitem__)]
    assert norm.prediction == "ABCD"[max(range(4), key=norm_refs.__getitem__)]
    assert list(norm.scores.values()) == pytest.approx(norm_refs, abs=1e-4)
    assert sum(plain.probs.values()) == pytest.approx(1.0)


def test_letter_rule_reads_the_letter_logits_after_the_prompt(lm):
    model, tok = lm
    em = HFEvalModel(model, tok)
    prompt = build_prompt(CHOICE, tok, kind="letter")
    assert prompt.continuations == (" A", " B", " C", " D")
    ids = tok(prompt.context, add_special_tokens=False)["input_ids"]
    last = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], dim=-1)
    letter_ids = [tok.convert_tokens_to_ids(x) for x in "ABCD"]
    (out,) = apply_rule(em, [CHOICE], "letter", [[]])
    assert list(out.scores.values()) == pytest.approx([last[i].item() for i in letter_ids], abs=1e-5)
    assert out.prediction == "ABCD"[int(torch.argmax(last[letter_ids]))]


def test_batched_scoring_equals_one_example_at_a_time(lm):
    model, tok = lm
    prompts = [build_prompt(r, tok, kind="letter") for r in (CHOICE, YESNO, CHOICE)]
    batched = score_options_batch(model, tok, prompts)
    for p, b in zip(prompts, batched):
        single = score_options(model, tok, p.context, p.continuations)
        assert b.logprobs == pytest.approx(single.logprobs, abs=1e-4)
        assert b.context_tokens == single.context_tokens
    multi = build_prompt(CHOICE, tok, kind="text")  # multi-token options fall back to score_options
    [fallback] = score_options_batch(model, tok, [multi])
    assert fallback.logprobs == pytest.approx(score_options(model, tok, multi.context, multi.continuations).logprobs, abs=1e-5)


class FakeGenerator:
    """An EvalModel whose generation is fixed text: tests the generate rule's wiring."""

    def __init__(self, text):
        self.text, self.tokenizer, self.name = text, tiny_tokenizer(), "fake"

    def generate(self, context, max_new_tokens):
        return Generation(self.text, 5, 2)

    def last_route(self):
        return {"expert": "mamba", "gate_probability": 0.7}


@pytest.mark.parametrize("text, multi, expected", [("答案：B", False, "B"), ("The answer is A and C", True, "AC"),
                                                    ("The answer is A and C", False, ""), ("Aspirin", False, "")])
def test_generate_rule_extracts_strictly(text, multi, expected):
    (out,) = apply_rule(FakeGenerator(text), [CHOICE], "generate", [[]], multi=multi)
    assert out.prediction == expected and out.generation == text
    assert out.route == {"expert": "mamba", "gate_probability": 0.7}


def test_generate_rule_reads_yes_no_maybe():
    (out,) = apply_rule(FakeGenerator("no."), [YESNO], "generate", [[]])
    assert out.prediction == "B"


def test_greedy_generation_is_deterministic(lm):
    model, tok = lm
    em = HFEvalModel(model, tok)
    context = build_prompt(CHOICE, tok, kind="none").context
    first, second = em.generate(context, 6), em.generate(context, 6)
    assert first == second and first.new_tokens == 6


def tiny_gemma3(vocab):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=6,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
                              pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return Gemma3ForCausalLM(config).eval()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_prefix_cache_reuse_equals_recomputing(lm, arch):
    """Few-shot prompts share their shots: reusing the shared prefix's KV cache changes no score."""
    from medmoe.eval.scoring import PrefixCache

    _, tok = lm
    model = tiny_llama() if arch == "llama" else tiny_gemma3(len(tok))
    shots = [Record(f"s{i}", "which drug is best ?", "A", options=("aspirin", "rest")) for i in range(3)]
    cache = PrefixCache(min_tokens=4)
    for record in (CHOICE, YESNO, CHOICE):
        for kind in ("letter", "text"):
            prompt = build_prompt(record, tok, shots, kind=kind)
            reused = score_options(model, tok, prompt.context, prompt.continuations, prefix=cache)
            fresh = score_options(model, tok, prompt.context, prompt.continuations)
            assert reused.logprobs == pytest.approx(fresh.logprobs, abs=1e-4)
    assert len(cache.ids) > 20


def test_bos_follows_the_tokenizers_own_convention():
    from tokenizers import processors

    from medmoe.eval.scoring import bos_ids

    plain = tiny_tokenizer()
    assert bos_ids(plain, [7]) == []  # adds no BOS itself (SmolLM2-like)
    gemma_like = tiny_tokenizer()
    gemma_like.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    assert bos_ids(gemma_like, [7]) == [2]
    assert bos_ids(gemma_like, [2, 7]) == []  # a chat template that already starts with it
    model = tiny_llama()
    with_bos = score_options(model, gemma_like, "which drug is best ?", [" A", " B"])
    assert with_bos.context_tokens == len(gemma_like("which drug is best ?", add_special_tokens=False)["input_ids"]) + 1
