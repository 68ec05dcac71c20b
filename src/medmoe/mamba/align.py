"""Layer-wise alignment of a hybrid's Mamba mixers with the teacher attention blocks they replaced.

MOHAWK's stage 2, "hidden-state alignment" (Bick et al., "Transformers to SSMs: Distilling Quadratic
Knowledge to Subquadratic Models", 2024), as "The Mamba in the Llama" (Wang et al., 2024) uses it
before end-to-end distillation. Student layer p of a hybrid came from teacher layer j = spec.layers[p]
(`HybridSpec.mixer_layers()` lists the (p, j) pairs whose attention was replaced). For such a pair,
with, for one prompt of n tokens and width D,

    u_j (n, D)  the input of teacher layer j's attention: the residual stream after that layer's
                input RMSNorm (what `self_attn` receives as `hidden_states`)
    a_j (n, D)  the attention block's output, a_j = Attn_j(u_j) (after o_proj, before the residual add)

the alignment error of the student's mixer is

    e_p = || Mixer_p(u_j) - a_j ||^2 / || a_j ||^2          (sums over positions and channels)

The mixer reads the teacher's input, not the student's own residual stream, so every layer's target is
fixed (it can be computed once and cached) and the layers learn independently of one another.

`AttentionCapture` records u_j and a_j (and, optionally, the final norm's output, the states the LM
head reads) during any forward pass of the teacher, with forward hooks; `alignment_error` computes e_p.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medmoe.errors import ModelError
from medmoe.mamba.attention_mixer import AttentionMamba
from medmoe.mamba.transfer import _decoder


class AttentionCapture:
    """Forward hooks on a Llama-family model recording, for its last forward pass (batch 1), the input
    `inputs[j]` (1, n, D) and output `outputs[j]` (1, n, D) of the attention of each layer j in
    `layers`, and with `final_norm` the final norm's output `final` (1, n, D). A context manager: the
    hooks are removed on exit. `enabled = False` skips recording (the forward runs unchanged)."""

    def __init__(self, model: Any, layers: Sequence[int], final_norm: bool = False):
        decoder = _decoder(model)
        bad = [j for j in layers if not 0 <= j < len(decoder.layers)]
        if bad:
            raise ModelError(f"layers {bad} out of range: the model has {len(decoder.layers)} layers")
        self.decoder, self.layers, self.final_norm = decoder, list(layers), final_norm
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.final: torch.Tensor | None = None
        self.enabled = True
        self._handles: list[Any] = []

    def clear(self) -> None:
        self.inputs, self.outputs, self.final = {}, {}, None

    def __enter__(self) -> AttentionCapture:
        for j in self.layers:
            self._handles.append(self.decoder.layers[j].self_attn.register_forward_hook(self._attention_hook(j), with_kwargs=True))
        if self.final_norm:
            self._handles.append(self.decoder.norm.register_forward_hook(self._norm_hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _attention_hook(self, j: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not self.enabled:
                return
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if hidden is None:
                raise ModelError(f"layer {j}: the attention was called without hidden_states")
            self.inputs[j] = hidden.detach()
            self.outputs[j] = (output[0] if isinstance(output, tuple) else output).detach()
        return hook

    def _norm_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.enabled:
            self.final = output.detach()


def mixer_output(model: Any, position: int, inputs: torch.Tensor) -> torch.Tensor:
    """(1, n, D): the token mixer of decoder layer `position` (an AttentionMamba, or a kept attention
    block) applied to `inputs` (n, D) or (1, n, D) alone, as the decoder layer would call it on one
    unpadded causal sequence."""
    decoder = _decoder(model)
    mixer = decoder.layers[position].self_attn
    weight = next(mixer.parameters())
    u = inputs.to(device=weight.device, dtype=weight.dtype).reshape(1, -1, inputs.shape[-1])
    kwargs: dict[str, Any] = {}
    if not isinstance(mixer, AttentionMamba):  # attention needs its rotary table and a causal mask
        n = u.shape[1]
        kwargs["position_embeddings"] = decoder.rotary_emb(u, torch.arange(n, device=u.device)[None])
        if getattr(model.config, "_attn_implementation", "sdpa") != "sdpa":  # sdpa is causal without a mask
            mask = torch.full((n, n), torch.finfo(u.dtype).min, device=u.device, dtype=u.dtype).triu(1)
            kwargs["attention_mask"] = mask[None, None]
    kwargs.setdefault("attention_mask", None)
    return mixer(hidden_states=u, **kwargs)[0]


def alignment_error(model: Any, position: int, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """e_p = ||Mixer_p(u) - a||^2 / ||a||^2 (module docstring), a scalar that carries the gradient of
    the mixer's parameters. inputs u and target a: (n, D) or (1, n, D)."""
    out = mixer_output(model, position, inputs).float().reshape(target.shape)
    a = target.to(out.device).float()
    return (out - a).pow(2).sum() / a.pow(2).sum().clamp_min(1e-12)
