"""The Mamba hybrid's recurrent cache: generation with the cache, left padding, option scoring.

The reference is always a full forward over the whole sequence without any cache (no state carried),
so every check compares the recurrent path against the parallel scan."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from medmoe.errors import ModelError
from medmoe.eval.model import HFEvalModel
from medmoe.eval.scoring import score_options
from medmoe.hf_compat import output_cache, with_cache
from medmoe.mamba.hybrid_cache import HybridCache
from medmoe.mamba.transfer import AttentionMamba, build_hybrid


def _randomise_mixers(model) -> None:
    """Fresh mixers pass x straight through (identity conv, D = 0): make every new parameter matter."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, AttentionMamba):
                module.conv1d.weight.normal_(0, 0.5)
                module.conv1d.bias.normal_(0, 0.1)
                module.A_log.uniform_(-1.0, 1.0)
                module.D.normal_(0, 0.5)
                module.dt_proj.bias.uniform_(-1.0, 1.0)


def _hybrid(attention_layers=()):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
                      pad_token_id=0, eos_token_id=63, bos_token_id=1)
    student, _ = build_hybrid(LlamaForCausalLM(cfg).eval(), attention_layers=list(attention_layers))
    _randomise_mixers(student)
    return student.eval()


def _greedy_without_cache(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding that recomputes the whole sequence each step: the parallel-scan reference."""
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("attention_layers", [(), (1,)], ids=["all-mamba", "one-attention-layer"])
def test_generate_with_cache_equals_full_recompute(attention_layers):
    model = _hybrid(attention_layers)
    prompt = torch.randint(2, 60, (1, 12))
    with torch.no_grad():
        cached = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24,
                                do_sample=False, min_new_tokens=24)
    assert torch.equal(cached, _greedy_without_cache(model, prompt, 24))


def test_cached_logits_match_the_parallel_scan():
    """Prefill 10 tokens with a cache, then feed 5 one at a time: logits equal a single forward."""
    model = _hybrid()
    ids = torch.randint(2, 60, (2, 15))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        out = model(input_ids=ids[:, :10], use_cache=True)
        steps, cache = [out.logits], output_cache(out)
        assert isinstance(cache, HybridCache) and cache.get_seq_length() == 10
        for t in range(10, 15):
            out = model(input_ids=ids[:, t:t + 1], **with_cache(cache), use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


def test_left_padded_batch_generates_like_each_prompt_alone():
    model = _hybrid()
    a, b = torch.randint(2, 60, (1, 9)), torch.randint(2, 60, (1, 5))
    batch = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    batch[0], mask[0] = a[0], 1
    batch[1, 4:], mask[1, 4:] = b[0], 1
    with torch.no_grad():
        together = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                  min_new_tokens=10)
        alone_a = model.generate(input_ids=a, attention_mask=torch.ones_like(a), max_new_tokens=10,
                                 do_sample=False, min_new_tokens=10)
        alone_b = model.generate(input_ids=b, attention_mask=torch.ones_like(b), max_new_tokens=10,
                                 do_sample=False, min_new_tokens=10)
    assert torch.equal(together[0, 9:], alone_a[0, 9:])
    assert torch.equal(together[1, 9:], alone_b[0, 5:])


class _Tokenizer:
    """Whitespace tokenizer over integer words: '5 7 9' -> [1, 5, 7, 9] with special tokens (BOS)."""

    bos_token_id = 1
    pad_token_id = 0
    eos_token_id = 63

    def __call__(self, text, add_special_tokens=False):
        ids = [int(w) if w.isdigit() else 2 for w in text.split()]
        return {"input_ids": [self.bos_token_id] + ids if add_special_tokens else ids}


def test_multi_token_option_scores_use_the_recurrent_state():
    """score_options scores multi-token options over the context's cache (repeated per option)."""
    model = _hybrid()
    tokenizer = _Tokenizer()
    context, options = "5 7 9 11 13", [" 20 21 22", " 30", " 40 41"]
    got = score_options(model, tokenizer, context, options).logprobs
    for option, score in zip(options, got):
        ids = torch.tensor([[1] + [int(w) for w in (context + option).split()]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1)
        n = len(option.split())
        targets = ids[0, -n:]
        expected = logp[-n - 1:-1].gather(-1, targets[:, None]).sum().item()
        assert score == pytest.approx(expected, abs=1e-4)


def test_harness_does_not_reuse_cropped_caches_for_recurrent_models():
    assert HFEvalModel(_hybrid(), _Tokenizer()).prefix is None


def test_batched_scoring_continues_the_shared_prefix_state():
    """score_options_batch runs the prompts' common prefix once and continues each row from the
    mixers' recurrent state: the scores equal scoring each prompt alone."""
    from medmoe.eval.batch_scoring import score_options_batch
    from medmoe.eval.prompts import Prompt

    model = _hybrid()
    tokenizer = _Tokenizer()
    prefix = "5 7 9 11 13 15 17 19 21 23"
    prompts = [Prompt(f"{prefix} {tail}", (" 30", " 31", " 32"), ()) for tail in ("40", "41 42 43", "44 45")]
    from medmoe.eval.batch_scoring import _shared_prefix

    contexts = [[1] + [int(w) for w in p.context.split()] for p in prompts]
    assert _shared_prefix(model, contexts, "cpu")[0] == 11  # BOS + the 10 shared words run once
    batched = score_options_batch(model, tokenizer, prompts)
    for prompt, got in zip(prompts, batched):
        alone = score_options(model, tokenizer, prompt.context, prompt.continuations)
        assert got.logprobs == pytest.approx(alone.logprobs, abs=1e-4)


def test_a_cache_that_cannot_hold_the_recurrent_state_is_refused():
    """Continuing a stock DynamicCache that already holds tokens would restart every mixer from zero."""
    from transformers import DynamicCache

    model = _hybrid(attention_layers=(1,))
    ids = torch.randint(2, 60, (1, 6))
    foreign = DynamicCache()
    foreign.update(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), 0)
    with torch.no_grad(), pytest.raises(ModelError, match="HybridCache"):
        model(input_ids=ids, **with_cache(foreign), use_cache=True)


def test_the_recurrent_state_is_never_cropped():
    model = _hybrid()
    with torch.no_grad():
        cache = output_cache(model(input_ids=torch.randint(2, 60, (1, 8)), use_cache=True))
    with pytest.raises(ModelError, match="cannot be cropped"):
        cache.crop(-3)


def test_repeated_cache_continues_each_row_like_the_single_context():
    """batch_repeat_interleave repeats the recurrent states with the key/value layers."""
    model = _hybrid(attention_layers=(1,))
    ctx, tails = torch.randint(2, 60, (1, 7)), torch.randint(2, 60, (3, 2))
    with torch.no_grad():
        cache = output_cache(model(input_ids=ctx, use_cache=True))
        cache.batch_repeat_interleave(3)
        got = model(input_ids=tails, **with_cache(cache), use_cache=True).logits[:, -1]
        full = model(input_ids=torch.cat([ctx.expand(3, -1), tails], dim=1), use_cache=False).logits[:, -1]
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)
