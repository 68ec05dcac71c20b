"""Expert memory queue: a per-layer FIFO ring buffer of detached router embeddings with expert ids.

Memory is O(K d_q), independent of batch size and sequence length (docs/loramoe.md, "Queue").
The buffers are registered on the module so training checkpoints carry them (exact resume); they
are not part of a saved adapter.
"""

from __future__ import annotations

import torch
from torch import nn


class ExpertQueue(nn.Module):
    """Ring buffer of K (q, expert id) pairs. Empty slots have label -1."""

    embeddings: torch.Tensor  # buffers (registered in __init__), declared for the type checker
    labels: torch.Tensor
    pointer: torch.Tensor

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        self.size = size
        self.register_buffer("embeddings", torch.zeros(size, dim, dtype=torch.float32))  # (K, d_q)
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))  # (K,)
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))  # next slot to write

    @torch.no_grad()
    def push(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Append (n, d_q) embeddings with (n,) labels, overwriting the oldest entries."""
        n = embeddings.shape[0]
        if n == 0:
            return
        if n > self.size:  # only the newest K survive
            embeddings, labels, n = embeddings[-self.size :], labels[-self.size :], self.size
        slots = (self.pointer + torch.arange(n, device=self.labels.device)) % self.size
        self.embeddings[slots] = embeddings.detach().to(self.embeddings.dtype)
        self.labels[slots] = labels.detach().to(torch.long)
        self.pointer.copy_((self.pointer + n) % self.size)

    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Filled entries: (m, d_q) embeddings and (m,) labels, m <= K."""
        filled = self.labels >= 0
        return self.embeddings[filled], self.labels[filled]

    def __len__(self) -> int:
        return int((self.labels >= 0).sum())

    @torch.no_grad()
    def clear(self) -> None:
        self.labels.fill_(-1)
        self.pointer.zero_()
