"""Mamba-1 language model: embeddings, N x (RMSNorm + mixer) residual layers, final norm, LM head.

Module names mirror Hugging Face's MambaForCausalLM (backbone.embeddings, backbone.layers.i.norm,
backbone.layers.i.mixer.*, backbone.norm_f, lm_head), so its state dict loads with strict=True.

Inference: `forward` runs the whole prompt in parallel (the chunked / fused scan) and, given a
`MambaCache`, leaves the per-layer recurrent states in it; `step` then decodes one token at a time at
a cost independent of how long the prefix was. `generate` is greedy decoding on top of both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from medmoe.mamba.block import LayerState, MambaLayer, RMSNorm
from medmoe.mamba.config import MambaConfig


class MambaCache:
    """Recurrent states of every layer for one batch: O(layers * d_inner * (N + K)), not O(length)."""

    def __init__(self, layers: list[LayerState]):
        self.layers = layers


class MambaBackbone(nn.Module):
    def __init__(self, config: MambaConfig):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(MambaLayer(config) for _ in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)

    def forward(self, input_ids: torch.Tensor, cache: MambaCache | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (b, l) -> final hidden states (b, l, D)."""
        h = self.embeddings(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, None if cache is None else cache.layers[i], attention_mask)
        return self.norm_f(h)


class MambaLM(nn.Module):
    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = config
        self.backbone = MambaBackbone(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    def _layers(self) -> Sequence[MambaLayer]:
        return cast(Sequence[MambaLayer], self.backbone.layers)  # an nn.ModuleList of MambaLayer

    def set_scan_backend(self, backend: str) -> None:
        """Choose the selective-scan backend for every layer ('auto', 'chunked', 'cpu', 'reference', 'cuda')."""
        for layer in self._layers():
            layer.mixer.scan_backend = backend

    def new_cache(self, batch: int) -> MambaCache:
        p = self.backbone.embeddings.weight
        return MambaCache([layer.mixer.new_state(batch, p.dtype, p.device) for layer in self._layers()])

    def forward(self, input_ids: torch.Tensor, cache: MambaCache | None = None,
                attention_mask: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """input_ids (b, l) -> logits (b, l, V), or (b, 1, V) with last_only (skips the head elsewhere)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        h = self.backbone(input_ids, cache, attention_mask)
        return self.lm_head(h[:, -1:] if last_only else h)

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor, cache: MambaCache) -> torch.Tensor:
        """token_ids (b,) -> next-token logits (b, V); advances `cache` by one token."""
        h = self.backbone.embeddings(token_ids)
        for layer, state in zip(self._layers(), cache.layers):
            h = layer.step(h, state)
        return self.lm_head(self.backbone.norm_f(h))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy decoding: parallel prefill, then `step` per token. Returns (b, max_new_tokens) new ids
        (after an EOS a row keeps emitting EOS)."""
        cache = self.new_cache(input_ids.shape[0])
        logits = self.forward(input_ids, cache, last_only=True)[:, -1]
        out, done = [], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i in range(max_new_tokens):
            tok = logits.argmax(-1)
            if eos_token_id is not None:
                tok = torch.where(done, torch.full_like(tok, eos_token_id), tok)
                done |= tok == eos_token_id
            out.append(tok)
            if i + 1 < max_new_tokens and not (eos_token_id is not None and bool(done.all())):
                logits = self.step(tok, cache)
            elif eos_token_id is not None and bool(done.all()):
                break
        return torch.stack(out, dim=1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
