"""PETRA, parallel end-to-end training with reversible architectures (Rivaud,
Fournier, Pumir, Belilovsky, Eickenberg and Oyallon, ICLR 2025), following
the authors' code (the "Async-Grad" repository: ``--remove-ctx-input
--remove-ctx-param``, gradients accumulated over ``--accumulation-steps``
and averaged).

Stages run FDG's pipeline (stage k forwards batch t-k and back-propagates
batch t-2(K-1)+k, every message one iteration late, no gradient shrinking)
and keep no copy of their weights: every backward runs at the stage's
current weights. What a stage keeps between a batch's forward and its
backward is decided block by block:

- a reversible block (models/revnet.py) keeps nothing. In the backward its
  input is rebuilt by inverting it, at the current weights, from its output
  as rebuilt downstream; the block is recomputed from that input and
  back-propagated;
- any other block keeps its input, as PETRA's non-reversible stages do, and
  is recomputed from it (DSP's replay).

So a BACKWARD's message carries two tensors (``gradient_parts`` 2): the
gradient for the previous stage and the stage's input as it rebuilt it,
which the previous stage inverts in turn. The last stage has no delay: it
keeps its graph and sends back the input it received. A stage steps after
every ``--accumulation-steps`` backward passes, on their mean gradient.

At K = 1 (and ``--accumulation-steps`` 1) there is neither delay nor rebuilding: BP
exactly. Inversion runs in train mode (the batch statistics of the rebuilt
activations) and leaves BatchNorm's running statistics as they were; the
recompute updates them, as ``--staleness replay`` does. Departures from the
authors' code are listed in docs/faithfulness.md.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fdgbench.method import Method, MethodOption, at_least_one, register
from fdgbench.models import is_reversible, reversible_models
from fdgbench.staleness import AutocastFactory

from .adl import AccumulatingWorker, every_mth_update
from .fdg import fdg_plans

# The authors' flag (their --accumulation-steps with --accumulation-averaging); ADL's --accumulate sums.
ACCUMULATION_STEPS = MethodOption("accumulation_steps", int, 1, "backward passes per step k, their gradients "
                                  "averaged (the authors' CIFAR runs use 2 at batch 64)", check=at_least_one)


class RebuiltInputs:
    """What a PETRA stage keeps for a batch in flight: the input of each
    block that is not reversible (none for a reversible block), and the
    dtype each block's input had, so a rebuilt input is the forward's
    dtype. Checkpoints save exactly that (a backward recomputes at the live
    weights, so there are no weights to snapshot)."""

    def __init__(self, module: nn.Module, autocast: AutocastFactory):
        self.blocks = list(module.children())
        self.autocast = autocast
        self.snapshot = False  # StageWorker.keep_forward_weights arms it; nothing here needs the weights
        self._kept: dict[int, tuple[dict[int, torch.Tensor], list[torch.dtype]]] = {}

    def forward(self, batch: int, x: torch.Tensor) -> torch.Tensor:
        kept, dtypes = {}, []
        h = x.detach()
        with torch.no_grad(), self.autocast():
            for i, block in enumerate(self.blocks):
                dtypes.append(h.dtype)
                if not is_reversible(block):
                    kept[i] = h
                h = block(h)
        self._kept[batch] = (kept, dtypes)
        return h

    def backward(self, batch: int, grad: torch.Tensor, output: torch.Tensor,
                 input_grad: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Back-propagate ``grad`` from ``output`` (the stage's output as the
        next stage rebuilt it), block by block from the last; returns the
        input's gradient (None without ``input_grad``) and the input as
        rebuilt (or kept)."""
        kept, dtypes = self._kept.pop(batch)
        h, g = output, grad
        for i in reversed(range(len(self.blocks))):
            block = self.blocks[i]
            x = kept[i] if i in kept else _invert(block, h, self.autocast).to(dtypes[i])
            x = x.detach().requires_grad_(i > 0 or input_grad)
            with torch.enable_grad(), self.autocast():
                y = block(x)
            torch.autograd.backward(y, g)
            g, h = x.grad, x.detach()
        return g, h

    def held_state(self) -> list[dict[str, Any]]:
        return [{"batch": batch, "inputs": kept, "dtypes": dtypes} for batch, (kept, dtypes) in self._kept.items()]

    def restore_held(self, held: list[dict[str, Any]]) -> None:
        for entry in held:
            self._kept[entry["batch"]] = (dict(entry["inputs"]), list(entry["dtypes"]))


def _invert(block: nn.Module, y: torch.Tensor, autocast: AutocastFactory) -> torch.Tensor:
    """``block``'s input rebuilt from ``y`` at its current weights, leaving
    its BatchNorm running statistics as they were."""
    buffers = [b.detach().clone() for b in block.buffers()]
    with torch.no_grad(), autocast():
        x = block.inverse(y)
    with torch.no_grad():
        for b, saved in zip(block.buffers(), buffers):
            b.copy_(saved)
    return x


class ReversibleWorker(AccumulatingWorker):
    """A PETRA stage: its backward's message is the gradient, then the input as rebuilt (PETRA.gradient_parts)."""

    def __init__(self, ctx, average_over: int):
        super().__init__(ctx, average_over, staleness="replay", delayed=not ctx.is_last)
        if not ctx.is_last:
            self.store = RebuiltInputs(self.module, ctx.autocast)

    def backward(self, batch, message):
        if self.ctx.is_last:  # no delay: its graph is kept, and the input it received goes back as it was
            x = self.store.input_of(batch).detach()
            x_grad = self.store.backward(batch, None)
        else:
            grad, output = message.chunk(PETRA.gradient_parts)
            x_grad, x = self.store.backward(batch, grad, output, self.input_grad)
        return torch.cat([x_grad, x.to(x_grad.dtype)]) if self.input_grad else None


@register
class PETRA(Method):
    name = "petra"
    order = 25
    summary = ("PETRA: FDG's pipeline on a reversible net, no weight copies; a delayed backward rebuilds a "
               "reversible block's input by inversion at the current weights, other blocks keep theirs")
    breaks = ("forward", "backward", "update")
    options = (ACCUMULATION_STEPS,)
    single_replica = "its backward messages join two tensors along the batch dimension, which replicas would shard"
    gradient_parts = 2  # a backward's message: the gradient, then the input as rebuilt
    inverts_reversible_blocks = True

    def schedule(self, num_stages, t):
        return every_mth_update(fdg_plans(num_stages, t), num_stages, t, self.accumulation_steps)

    def replays_forward(self) -> bool:
        return True  # every delayed backward recomputes its blocks (a reversible one inverts it first, too)

    def check_model(self, model):
        if not any(is_reversible(block) for block in model.blocks):
            return (f"{model.name} has no reversible block; PETRA trains a reversible network "
                    f"({', '.join(reversible_models())})")
        return None

    def make_worker(self, ctx):
        return ReversibleWorker(ctx, self.accumulation_steps)
