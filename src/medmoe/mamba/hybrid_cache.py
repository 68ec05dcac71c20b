"""The Mamba hybrid's inference cache: medmoe's own object, one per batch being decoded.

A hybrid (medmoe.mamba.hybrid) mixes two kinds of layers, so its cache holds two kinds of state:

    attention layers kept from the teacher -> keys and values, (b, H_kv, t, P), in the
                                              `DynamicCache` transformers expects;
    AttentionMamba mixers                  -> `LayerState`: the last K-1 conv inputs (b, K-1, d) and
                                              the SSM state h_t (b, d, N), constant in t.

The mixer states live in `HybridCache.recurrent`, a plain dict this class owns; nothing is stored on,
or read from, transformers' private cache internals. Each mixer also appends a (b, 1, l, 1)
placeholder to its own layer of the `DynamicCache`, so that every layer reports the same sequence
length t (which `generate`, the position ids and the masks of kept attention layers are computed
from) whichever layer transformers asks.

Batch operations that `generate` and the scoring code apply to a cache (repeat for k continuations,
select rows, beam reorder) are applied to the recurrent states too. Cropping cannot rewind a
recurrent state, so `crop` refuses; the harness knows not to reuse cropped caches (`is_recurrent`).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from medmoe.errors import ModelError
from medmoe.mamba.block import LayerState


class HybridCache(DynamicCache):
    """DynamicCache for kept attention layers + medmoe-owned recurrent states for Mamba mixers."""

    is_recurrent = True

    def __init__(self) -> None:
        super().__init__()  # no config: DynamicLayer for every layer, created on first update
        self.recurrent: dict[int, LayerState] = {}

    def recurrent_state(self, layer_idx: int, batch: int) -> LayerState | None:
        """The mixer's state before this call, or None at the first call (the state is zero)."""
        state = self.recurrent.get(layer_idx)
        if state is None or state.ssm.shape[0] == batch:
            return state
        if state.ssm.shape[0] != 1:
            raise ModelError(f"layer {layer_idx}: recurrent state has batch {state.ssm.shape[0]}, the input {batch}")
        # One context shared by `batch` continuations (option scoring repeats a batch-1 state).
        return LayerState(conv=state.conv.expand(batch, -1, -1), ssm=state.ssm.expand(batch, -1, -1).contiguous())

    def store_recurrent(self, layer_idx: int, state: LayerState, new_tokens: int) -> None:
        """Keep the mixer's state after `new_tokens` more tokens, and count them on its layer."""
        self.recurrent[layer_idx] = LayerState(conv=state.conv.detach(), ssm=state.ssm.detach())
        b = state.ssm.shape[0]
        placeholder = state.ssm.new_zeros(b, 1, new_tokens, 1)                 # (b, 1, l, 1)
        self.update(placeholder, placeholder, layer_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_states(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_states(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_states(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def crop(self, tokens: int) -> None:
        """Refused when it would remove tokens (transformers' `tokens` is a negative count to remove,
        or in older releases the length to keep): a recurrent state cannot be rewound."""
        if self.recurrent and tokens not in (0, self.get_seq_length()):
            raise ModelError("a Mamba hybrid's recurrent state cannot be cropped (rewound); run the prefix again")
        super().crop(tokens)

    def _map_states(self, fn) -> None:
        self.recurrent = {i: LayerState(conv=fn(s.conv), ssm=fn(s.ssm)) for i, s in self.recurrent.items()}
