"""The fine-tuning loss: mean cross-entropy over the completion tokens, with the LM head run only there.

A training example is a prompt (labels -100) followed by a short completion; a batch of 4 x 384
tokens holds a few dozen completion tokens. The LM head of Gemma-3-270M (262k words x 640) run at
every position was most of a training step, forward and backward; here it runs at the completion
tokens only:

    hidden = body(input_ids, attention_mask)        # (B, T, D): the decoder with its final norm
    rows, cols = nonzero(labels[:, 1:] != -100)     # position t predicts token t + 1
    logits = head(hidden[rows, cols])               # (M, D) -> (M, V), M = completion tokens in the batch
    loss = cross_entropy(softcap(logits), labels[rows, cols + 1])   # the mean over the M tokens

This is the model's own `labels=` loss (the mean over the same tokens, logits upcast to float
before the cross-entropy, Gemma's final-logit soft-capping applied), up to float rounding; LoRA-MoE's
auxiliary losses are added the way `LoraMoeModel.forward` adds them to a labelled forward.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from medmoe.eval.scoring import is_encoder_decoder
from medmoe.loramoe import LoraMoeModel

# Config fields of causal LMs whose forward changes the logits after the head in a way this module
# does not repeat (Cohere's logit_scale, Granite's logits_scaling): those models use their own forward.
_UNHANDLED_LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling")


def hf_model(model: Any) -> Any:
    """The Hugging Face model under any wrapper: LoRA-MoE (modules swapped in place) or PEFT."""
    if isinstance(model, LoraMoeModel):
        model = model.model
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def body_and_head(model: Any) -> tuple[nn.Module, nn.Module] | None:
    """(decoder body, LM head) of a decoder-only HF causal LM, or None when it cannot be split: the
    body returns the last hidden states after the final norm, the head maps them to logits."""
    lm = hf_model(model)
    if is_encoder_decoder(lm) or any(getattr(lm.config, name, None) is not None for name in _UNHANDLED_LOGIT_TRANSFORMS):
        return None
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    body = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    if not isinstance(head, nn.Module) or not isinstance(body, nn.Module) or body is lm:
        return None
    return body, head


def completion_loss(model: nn.Module, input_ids: torch.Tensor | None, attention_mask: torch.Tensor, labels: torch.Tensor, *,
                    with_aux: bool = True, inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(loss, n_tokens): the mean cross-entropy over the n_tokens completion tokens (labels != -100)
    plus, with_aux, LoRA-MoE's auxiliary losses of this forward (training mode only).

    model: a decoder-only HF causal LM, bare (method full) or wrapped (PEFT LoRA, LoraMoeModel);
    input_ids, attention_mask, labels: (B, T), right-padded, padding labelled -100 (data.collate).
    An encoder-decoder model (T5 family) takes labels (B, m) as its decoder targets and computes its
    own loss; a causal LM that cannot be split into body and head gets the full logits.
    A batch without a completion token gives a zero loss (n_tokens 0) instead of a NaN.
    inputs_embeds (B, T, D), instead of input_ids (then None): the first block's input, handed to the
    decoder as HF's inputs_embeds (top_blocks.py gives the lower blocks' cached output this way)."""
    inputs: dict[str, torch.Tensor | None] = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    if is_encoder_decoder(hf_model(model)):  # T5 family: labels are the decoder's targets (B, m)
        out = model(**inputs, attention_mask=attention_mask, labels=labels)  # decoder inputs = labels shifted right
        logits = out.logits                                                 # (B, m, V)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        aux = out.get("aux_loss") if with_aux and hasattr(out, "get") else None
        return (loss + aux if aux is not None else loss), int((labels != -100).sum())
    split = body_and_head(model)
    if split is None:
        return _full_logits_loss(model, inputs, attention_mask, labels, with_aux)
    body, head = split
    target = labels[:, 1:]                                                  # (B, T-1): the token each position predicts
    rows, cols = (target != -100).nonzero(as_tuple=True)                    # (M,), (M,)
    routing = model.routing(attention_mask) if isinstance(model, LoraMoeModel) else nullcontext()
    with routing:  # LoRA-MoE layers see the padding mask and compute their aux losses (training)
        hidden = body(**inputs, attention_mask=attention_mask, use_cache=False).last_hidden_state  # (B, T, D)
        logits = head(hidden[rows, cols])                                   # (M, D) -> (M, V)
    cap = getattr(hf_model(model).config, "final_logit_softcapping", None)  # Gemma 2/3: in the model's order
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    if rows.numel() == 0:
        loss = hidden.sum() * 0.0                                           # no completion token: nothing to learn
    else:
        loss = nn.functional.cross_entropy(logits.float(), target[rows, cols])
    aux = model.aux_loss() if isinstance(model, LoraMoeModel) else None     # also clears the layers' terms
    return (loss + aux if with_aux and aux is not None else loss), int(rows.numel())


def _full_logits_loss(model: nn.Module, inputs: dict[str, torch.Tensor | None], attention_mask: torch.Tensor,
                      labels: torch.Tensor, with_aux: bool) -> tuple[torch.Tensor, int]:
    """The LM head at every position: for causal LMs whose body and head this module cannot split."""
    out = model(**inputs, attention_mask=attention_mask)
    logits, target = out.logits[:, :-1], labels[:, 1:]                      # (B, T-1, V), (B, T-1)
    n_tokens = int((target != -100).sum())
    loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100) if n_tokens \
        else logits.sum() * 0.0
    aux = out.get("aux_loss") if hasattr(out, "get") else None
    return (loss + aux if with_aux and aux is not None else loss), n_tokens
