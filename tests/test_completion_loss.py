"""The training loss with the LM head at completion positions only (medmoe.train.loss) equals the
model's own `labels=` loss, and its gradients equal that loss's gradients: bare causal LMs (Llama,
Gemma-3 with final-logit soft-capping), PEFT LoRA and LoRA-MoE (aux losses included), padded batches."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

from loramoe_tiny_models import VOCAB
from medmoe.loramoe import LoraMoeConfig, LoraMoeLinear, LoraMoeModel
from medmoe.train.data import collate
from medmoe.train.loss import body_and_head, completion_loss

COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def llama():
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON))


def gemma3(cap: float = 0.1):
    """Soft-capping at 0.1: the random logits (std ~0.1) reach it, so a missing tanh would show."""
    torch.manual_seed(0)
    cfg = tf.Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                              final_logit_softcapping=cap)
    return tf.Gemma3ForCausalLM(cfg)


def peft_lora(base):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapter (and A's gradient) non-trivial
            torch.nn.init.normal_(p, std=0.1)
    return model


def loramoe(base):
    model = LoraMoeModel(base, LoraMoeConfig(seed=0))  # the default adapter: 8 experts, top-2, all losses, queue
    for layer in model.moe_layers().values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    return model


BUILDERS = {"llama": llama, "gemma3": gemma3, "llama+peft": lambda: peft_lora(llama()),
            "llama+loramoe": lambda: loramoe(llama()), "gemma3+loramoe": lambda: loramoe(gemma3())}


def padded_batch() -> dict:
    """Three right-padded rows: prompts of 5, 9 and 3 tokens, completions of 2, 1 and 4 (EOS included)."""
    g = torch.Generator().manual_seed(1)
    features = []
    for prompt, completion in [(5, 2), (9, 1), (3, 4)]:
        ids = torch.randint(3, VOCAB, (prompt + completion,), generator=g).tolist()
        features.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return collate(features, pad_id=0)


def loss_and_grads(model, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # LoRA-MoE samples its contrastive anchors: the same draw on both paths
    loss = fn(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_loss_and_gradients_equal_the_models_own_labelled_loss(name):
    batch = padded_batch()
    model = BUILDERS[name]()
    twin = copy.deepcopy(model)  # LoRA-MoE's queue moves with every training forward: each path gets its own
    want, want_grads = loss_and_grads(model, lambda m: m(**batch).loss)
    got, got_grads = loss_and_grads(twin, lambda m: completion_loss(m, **batch)[0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want_grads and set(got_grads) == set(want_grads)
    for param, grad in want_grads.items():
        torch.testing.assert_close(got_grads[param], grad, rtol=1e-4, atol=1e-5, msg=param)
    if isinstance(model, LoraMoeModel):  # the aux losses were computed (training) and logged alike
        assert set(twin.last_aux_losses) == {"balance", "z", "contrastive"}
        for term, value in model.last_aux_losses.items():
            torch.testing.assert_close(twin.last_aux_losses[term], value, rtol=1e-5, atol=1e-6)
        pairs = [(a.queue, b.queue) for a, b in zip(model.moe_layers().values(), twin.moe_layers().values())]
        assert all(len(a) > 0 for a, _ in pairs)  # the queue took this batch's router embeddings on both paths
        for a, b in pairs:
            torch.testing.assert_close(b.entries(), a.entries(), rtol=1e-5, atol=1e-6)


def test_loramoe_aux_loss_is_added_once_and_only_with_aux():
    batch = padded_batch()
    model = loramoe(llama()).train()
    twin = copy.deepcopy(model)
    torch.manual_seed(5)
    with_aux, _ = completion_loss(model, **batch)
    aux = sum({"balance": 0.01, "z": 0.001, "contrastive": 0.1}[k] * v for k, v in model.last_aux_losses.items())
    torch.manual_seed(5)
    without, n_tokens = completion_loss(twin, **batch, with_aux=False)
    assert n_tokens == 2 + 1 + 4 and float(aux) > 0
    torch.testing.assert_close(with_aux, without + aux, rtol=1e-5, atol=1e-6)
    assert all(not layer.aux_losses for layer in twin.moe_layers().values())  # read and cleared, as forward() does
    model.eval()
    with torch.no_grad():
        plain, _ = completion_loss(model, **batch)
        torch.testing.assert_close(plain, model(**batch).loss, rtol=1e-5, atol=1e-5)  # eval: no aux on either path
    assert model.last_aux_losses == {}


@pytest.mark.parametrize("name", ["gemma3", "llama+peft", "llama+loramoe"])
def test_the_head_sees_only_the_completion_positions(name):
    """The point of it: (M, D) rows into the LM head, M = completion tokens predicted, not (B, T, D)."""
    batch = padded_batch()
    model = BUILDERS[name]()
    _, head = body_and_head(model)
    shapes = []
    handle = head.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    try:
        _, n_tokens = completion_loss(model, **batch)
    finally:
        handle.remove()
    assert n_tokens == 7 and shapes == [(7, 32)]
    assert not isinstance(head, LoraMoeLinear)  # "all-linear" leaves the head alone


def test_a_batch_without_completion_tokens_gives_zero_not_nan():
    model = llama()
    batch = collate([{"input_ids": [5, 6, 7], "labels": [5, -100, -100]}], pad_id=0)  # position 0 is never predicted
    loss, n_tokens = completion_loss(model, **batch)
    assert n_tokens == 0 and loss.item() == 0.0
    loss.backward()  # still a graph: a training step on it is a no-op, not an error


def test_softcapping_is_what_the_model_applies():
    """Without it the loss would differ: the test model's logits do reach the cap."""
    batch = padded_batch()
    capped, uncapped = gemma3(), gemma3()
    uncapped.config.final_logit_softcapping = None
    with torch.no_grad():
        a, _ = completion_loss(capped, **batch)
        b, _ = completion_loss(uncapped, **batch)
        torch.testing.assert_close(b, uncapped(**batch).loss, rtol=1e-5, atol=1e-5)
    assert abs(a.item() - b.item()) > 1e-3
