"""What a delayed backward sees: how a stage keeps a batch between its forward
and its backward (``--staleness``).

- ``legacy``: keep the autograd graph; the optimizer writes through ``.data``
  (see optim.py), so the backward uses the stored activations, ReLU masks and
  BN batch statistics with the *current* weights: what the FDG/DDG authors'
  code computed under PyTorch 1.0. Under autocast the graph's low-precision
  weight copies are refilled from the current weights before the backward
  (KeptGraphUnderAutocast), so the meaning holds in bf16 too.
- ``stash``: run the forward on a detached copy of the weights (one copy per
  batch in flight) and keep that graph: the gradient at the weights the
  forward used (weight stashing), the quantity the convergence proofs analyse.
- ``replay``: keep only the input; before the backward, recompute the forward
  in train mode with the current weights (features replay; no stored graph,
  and BN running statistics see the second forward too).

A stage whose backward immediately follows its forward (delay 0) keeps its
graph whatever the mode: there is nothing stale to handle.

Checkpoints: a graph cannot be saved, but it can be rebuilt. ``held_state``
lists each batch in flight with its input and the weights its forward used
(a stash copy, or for a kept graph a snapshot taken while ``snapshot`` is
armed: the trainer arms it in the iterations before a checkpoint);
``restore_held`` re-runs those forwards on those weights, then puts the live
weights and buffers back. The rebuilt graph holds the same saved tensors as
the lost one and, under ``legacy``, reads the live weights at its backward
exactly as the lost one would have.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
from torch import nn
from torch.func import functional_call

from .errors import UserError

STALENESS_MODES = ("legacy", "stash", "replay")
AutocastFactory = Callable[[], ContextManager]


class WeightCopies:
    """Copies of a stage's parameters in reusable buffers: a stash needs one
    per batch in flight and a snapshot one per armed forward, every
    iteration, so the buffers of a finished batch are filled again (one
    fused ``_foreach_copy_``) instead of allocating a clone per parameter."""

    def __init__(self, params: list[torch.Tensor], leaves: bool):
        self.params = params
        self.leaves = leaves  # copies that autograd differentiates (a stash's)
        self._free: list[list[torch.Tensor]] = []

    def take(self) -> list[torch.Tensor]:
        copies = self._free.pop() if self._free else [torch.empty_like(p, requires_grad=self.leaves)
                                                      for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_(copies, [p.detach() for p in self.params])
        return copies

    def give(self, copies: list[torch.Tensor] | None) -> None:
        """Return copies whose batch is done (their graph is gone)."""
        if copies is not None:
            for c in copies:
                c.grad = None
            self._free.append(copies)


class KeptGraph:
    """Keeps (input, graph root) per batch: ``legacy``, and every delay-0 stage."""

    snapshots_weights = True  # whether an armed forward copies the weights (a stash keeps its own copies)

    def __init__(self, module: nn.Module, autocast: AutocastFactory = contextlib.nullcontext):
        self.module = module
        self.autocast = autocast
        self._held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self.snapshot = False  # armed: copy the weights at each forward, for a checkpoint
        self._snapshots: dict[int, list[torch.Tensor]] = {}
        self._snapshot_copies = WeightCopies(self._params, leaves=False)
        self._rooted: set[int] = set()

    def _run(self, batch: int, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def forward(self, batch: int, x: torch.Tensor) -> torch.Tensor:
        if self.snapshot and self.snapshots_weights:
            self._snapshots[batch] = self._snapshot_copies.take()
        with self.autocast():
            out = self._run(batch, x)
        self._held[batch] = (x, out)
        return out

    def set_root(self, batch: int, root: torch.Tensor) -> None:
        """Back-propagate from ``root`` (the last stage's loss) instead of the output."""
        self._held[batch] = (self._held[batch][0], root)
        self._rooted.add(batch)

    def input_of(self, batch: int) -> torch.Tensor:
        """The input ``batch``'s forward ran on (held until its backward)."""
        return self._held[batch][0]

    def backward(self, batch: int, grad: torch.Tensor | None) -> torch.Tensor | None:
        """Accumulate parameter gradients; return the input's gradient (None
        for an input that needs none)."""
        x, root = self._held.pop(batch)
        self._snapshot_copies.give(self._snapshots.pop(batch, None))
        self._rooted.discard(batch)
        torch.autograd.backward(root, grad)
        return x.grad

    # -- checkpoints -------------------------------------------------------------------------------

    def _forward_weights(self, batch: int) -> list[torch.Tensor] | None:
        return self._snapshots.get(batch)

    def held_state(self) -> list[dict]:
        """Each batch in flight: its input and the weights its forward used."""
        out = []
        for batch, (x, _) in self._held.items():
            if batch in self._rooted:  # a loss graph would need the labels and loss too; no method keeps one
                raise RuntimeError(f"batch {batch}'s loss graph is still held between iterations; "
                                   f"checkpoints cannot rebuild it")
            weights = self._forward_weights(batch)
            if weights is None:
                raise RuntimeError(f"batch {batch} is in flight but its forward's weights were not kept "
                                   f"(snapshot was not armed when it was forwarded)")
            out.append({"batch": batch, "input": x.detach(), "input_grad": x.requires_grad,
                        "weights": [w.detach() for w in weights]})
        return out

    def restore_held(self, held: list[dict]) -> None:
        """Rebuild the held batches' graphs (the module holds the live state)."""
        live = [p.detach().clone() for p in self._params]
        buffers = [b.detach().clone() for b in self.module.buffers()]
        armed, self.snapshot = self.snapshot, True  # rebuilt batches keep their weights for the next checkpoint
        for entry in held:
            x = entry["input"].detach().requires_grad_(entry["input_grad"])
            for p, w in zip(self._params, entry["weights"]):
                p.data.copy_(w)  # .data: no version bump, so the rebuilt graph stays usable
            self.forward(entry["batch"], x)
        self.snapshot = armed
        # Put back what the rebuilding forwards changed: the weights and BN's
        # running statistics (which BN's graph also refers to).
        for tensor, saved in zip([*self._params, *self.module.buffers()], live + buffers):
            tensor.data.copy_(saved)


class KeptGraphUnderAutocast(KeptGraph):
    """``legacy`` under autocast. Autocast casts each conv and linear weight
    to a low-precision copy at the forward, and the graph saves that copy:
    left alone, a delayed backward would read forward-time weights in convs
    and linears and current ones in BN, a mix no mode means. So the forward
    makes those casts itself (autocast passes a tensor already in its dtype
    through unchanged, so the graph saves exactly these), and before the
    backward refills them from the current weights, writing through
    ``.data`` as the optimizer does under legacy: the backward then reads
    the current weights everywhere, in the autocast precision."""

    CAST_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # what autocast casts in the suite's models
    # Modules whose parameters autocast leaves in float32 (their weights are read live, as legacy means).
    FLOAT32_MODULES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)

    def __init__(self, module: nn.Module, autocast: AutocastFactory, dtype: torch.dtype):
        super().__init__(module, autocast)
        self.dtype = dtype
        for name, m in module.named_modules():
            own = any(p.requires_grad for p in m.parameters(recurse=False))
            if own and not isinstance(m, self.CAST_MODULES + self.FLOAT32_MODULES):
                # Autocast would cast its weights itself, and legacy would silently mix forward-time
                # and current weights: refuse rather than relabel.
                raise UserError(f"--staleness legacy under autocast handles conv, linear and normalisation layers; "
                                f"{name or 'the stage'} is a {type(m).__name__}: use --staleness stash or "
                                f"replay, or --amp off")
        cast, seen = [], set()
        for prefix, m in module.named_modules():
            if isinstance(m, self.CAST_MODULES):
                for name, p in m.named_parameters(recurse=False):
                    if p.requires_grad and id(p) not in seen:  # a weight shared by two layers: one cast
                        seen.add(id(p))
                        cast.append((f"{prefix}.{name}" if prefix else name, p))
        self._cast_names = [n for n, _ in cast]
        self._cast_params = [p for _, p in cast]
        self._casts: dict[int, list[torch.Tensor]] = {}

    def _run(self, batch: int, x: torch.Tensor) -> torch.Tensor:
        casts = [p.to(self.dtype) for p in self._cast_params]  # differentiable: gradients reach the fp32 weights
        self._casts[batch] = casts
        return functional_call(self.module, dict(zip(self._cast_names, casts)), (x,), strict=False)

    def backward(self, batch: int, grad: torch.Tensor | None) -> torch.Tensor | None:
        casts = self._casts.pop(batch)
        if casts:
            with torch.no_grad():
                torch._foreach_copy_([c.data for c in casts], [p.detach() for p in self._cast_params])
        return super().backward(batch, grad)


class StashedWeights(KeptGraph):
    """Forward through a copy of the parameters taken at forward time; the
    backward adds the copies' gradients to the live parameters' grads."""

    snapshots_weights = False

    def __init__(self, module: nn.Module, autocast: AutocastFactory = contextlib.nullcontext):
        super().__init__(module, autocast)
        self._copies: dict[int, list[torch.Tensor]] = {}
        self._stash_copies = WeightCopies(self._params, leaves=True)

    def _forward_weights(self, batch: int) -> list[torch.Tensor] | None:
        return self._copies.get(batch)

    def _run(self, batch: int, x: torch.Tensor) -> torch.Tensor:
        copies = self._stash_copies.take()
        self._copies[batch] = copies
        # Buffers (BN running statistics) are the module's own, updated in place.
        return functional_call(self.module, dict(zip(self._names, copies)), (x,), strict=False)

    def backward(self, batch: int, grad: torch.Tensor | None) -> torch.Tensor | None:
        x_grad = super().backward(batch, grad)
        copies = self._copies.pop(batch)
        for p, copy in zip(self._params, copies):
            if copy.grad is not None:
                p.grad = copy.grad if p.grad is None else p.grad + copy.grad
        self._stash_copies.give(copies)
        return x_grad


class ReplayedForward(KeptGraph):
    """Keeps only the input; the backward recomputes the forward (train mode,
    current weights) and back-propagates through the recomputation."""

    def forward(self, batch: int, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.autocast():
            out = self.module(x)
        self._held[batch] = (x.detach().requires_grad_(x.requires_grad), out)
        return out

    def held_state(self) -> list[dict]:
        """Only the inputs: the backward recomputes from the live weights."""
        return [{"batch": batch, "input": x.detach(), "input_grad": x.requires_grad}
                for batch, (x, _) in self._held.items()]

    def restore_held(self, held: list[dict]) -> None:
        for entry in held:
            self._held[entry["batch"]] = (entry["input"].detach().requires_grad_(entry["input_grad"]), None)

    def backward(self, batch: int, grad: torch.Tensor | None) -> torch.Tensor | None:
        x, _ = self._held.pop(batch)
        with torch.enable_grad(), self.autocast():
            out = self.module(x)
        torch.autograd.backward(out, grad)
        return x.grad


def make_store(mode: str, module: nn.Module, delayed: bool,
               autocast: AutocastFactory = contextlib.nullcontext, amp_dtype: torch.dtype | None = None) -> KeptGraph:
    if not delayed:
        return KeptGraph(module, autocast)
    if mode == "legacy":
        return KeptGraph(module, autocast) if amp_dtype is None else KeptGraphUnderAutocast(module, autocast, amp_dtype)
    if mode == "stash":
        return StashedWeights(module, autocast)
    if mode == "replay":
        return ReplayedForward(module, autocast)
    raise ValueError(f"unknown staleness mode {mode!r}")
