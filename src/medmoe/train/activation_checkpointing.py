"""`medmoe finetune --gradient-checkpointing`: keep each decoder block's input only, recompute the rest in backward.

The base's own Hugging Face switch does the work (`activation_checkpointing_enable`, called
`gradient_checkpointing_enable` before transformers 5.24) with torch's non-reentrant checkpoint
(`use_reentrant=False`): it needs no input that requires grad (HF also calls enable_input_require_grads
for models fed input_ids, which PEFT's frozen embeddings need with the reentrant variant), it works
with keyword arguments, and torch restores the RNG state before the recompute, so dropout draws the
same masks. Memory: the activations of one block instead of all blocks; time: one more forward of
every block per step. The loss and gradients equal the run without it (tests/test_finetune_placement.py).

LoRA-MoE needs the recompute to be a replay of its forward, which it is not by itself: its layers
read the model's RoutingContext (compute the aux losses? which tokens are padding?), which is reset
once the forward returns, and the prototype contrastive loss reads and then pushes the expert memory
queue, which has moved on by backward time. A recompute that saved other tensors than the forward is
an error in torch (CheckpointError: a different number of tensors saved), and one that read the moved
queue would give other gradients and push the batch twice. So each checkpointed module gets its own
`context_fn` (`LoraMoeReplay`): at the forward it records the context and copies the queues of the
LoRA-MoE layers inside that module (K x d_q floats each, freed after its backward), and around the
recompute it puts both back, swapping the copies in for the live queues (the replay's pushes land in
the copies, which are dropped) and discarding the aux losses the replay computed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from medmoe.errors import MedmoeError
from medmoe.loramoe import LoraMoeModel
from medmoe.loramoe.layer import LoraMoeLinear
from medmoe.train.loss import hf_model

CHECKPOINT_KWARGS = {"use_reentrant": False}


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Turn on HF gradient checkpointing in the base of `model` (bare, PEFT or LoRA-MoE; after the
    adapters are in place), with the replay above for LoRA-MoE."""
    lm = hf_model(model)
    if not getattr(lm, "supports_gradient_checkpointing", False):
        raise MedmoeError(f"--gradient-checkpointing: {type(lm).__name__} does not support gradient checkpointing "
                          "(transformers' supports_gradient_checkpointing is False); run without it")
    enable = getattr(lm, "activation_checkpointing_enable", None)
    try:
        if enable is not None:  # transformers >= 5.24
            enable(activation_checkpointing_kwargs=dict(CHECKPOINT_KWARGS))
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(CHECKPOINT_KWARGS))
    except ValueError as exc:
        raise MedmoeError(f"--gradient-checkpointing: {type(lm).__name__}: {exc}") from None
    if isinstance(model, LoraMoeModel):
        for module in lm.modules():
            if getattr(module, "_gradient_checkpointing_func", None) is not None:
                module._gradient_checkpointing_func = functools.partial(
                    checkpoint, use_reentrant=False, context_fn=LoraMoeReplay(model, module))


class LoraMoeReplay:
    """torch.utils.checkpoint's context_fn for one checkpointed module of a LoRA-MoE model: called at
    the module's forward, it returns (nothing, the replay context of that forward)."""

    def __init__(self, model: LoraMoeModel, module: nn.Module):
        self.context = model.context
        self.module = module

    def __call__(self) -> tuple[AbstractContextManager[Any], AbstractContextManager[Any]]:
        ctx = self.context
        routing = (ctx.compute_aux, ctx.token_mask)
        layers = [m for m in self.module.modules() if isinstance(m, LoraMoeLinear)]
        queues = [(layer.queue, {name: b.clone() for name, b in layer.queue.named_buffers()})
                  for layer in layers if layer.queue is not None and ctx.compute_aux]
        return nullcontext(), self._replay(routing, queues, layers)

    @contextmanager
    def _replay(self, routing: tuple[bool, torch.Tensor | None], queues: Sequence[tuple[nn.Module, dict[str, torch.Tensor]]],
                layers: list[LoraMoeLinear]) -> Iterator[None]:
        ctx = self.context
        live = (ctx.compute_aux, ctx.token_mask, ctx.track_load)
        ctx.compute_aux, ctx.token_mask = routing
        ctx.track_load = False  # the forward counted these tokens already
        swapped = [(queue, {name: getattr(queue, name) for name in copy}) for queue, copy in queues]
        for queue, copy in queues:
            for name, tensor in copy.items():
                setattr(queue, name, tensor)  # a registered buffer: replaced, not copied into
        try:
            yield
        finally:
            for queue, buffers in swapped:
                for name, tensor in buffers.items():
                    setattr(queue, name, tensor)
            ctx.compute_aux, ctx.token_mask, ctx.track_load = live
            for layer in layers:
                layer.aux_losses = {}  # the replay's terms: the step's loss already holds the forward's
