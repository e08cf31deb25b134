"""The stage interface engines drive: one stage's module, optimizer and the
actions FORWARD, BACKWARD, LOCAL (back-propagate a local signal) and UPDATE.
Methods configure it (staleness handling, gradient scaling) or subclass it
(auxiliary losses, synthetic gradients); engines never look inside."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import to_device
from .optim import SGDConfig, StageOptimizer
from .staleness import WeightCopies, make_store


def upcast_half(t: torch.Tensor) -> torch.Tensor:
    """Low-precision (autocast) outputs in float32 for a loss; float32 and float64 kept as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@dataclass
class StageContext:
    """What the infrastructure hands a method for one stage."""

    index: int
    num_stages: int
    module: nn.Module
    device: torch.device
    optim: SGDConfig = field(default_factory=SGDConfig)
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    amp_dtype: torch.dtype | None = None
    output_shape: tuple[int, ...] | None = None  # one sample's output shape (auxiliary nets are built from it)
    # The network's blocks this stage holds (indices into its block list), and one sample's output shape after
    # every block of the network: what an auxiliary net shaped after the rest of the network (AugLocal) reads.
    blocks: range = range(0)
    block_shapes: tuple[tuple[int, ...], ...] = ()
    num_classes: int = 10
    seed: int = 0
    # Data-parallel methods: how many replicas share each batch, and which one
    # this process is (None: all of them run here, one after another).
    replicas: int = 1
    replica: int | None = None
    # The stage's activation layout; a method's own nets (auxiliary
    # classifiers, synthetic-gradient nets) take the same, so their convs run
    # on the layout they receive instead of converting it.
    memory_format: torch.memory_format = torch.preserve_format

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    @property
    def dtype(self) -> torch.dtype:
        """The stage's weights' dtype (float64 in hand-computed tests): a method's own nets are made in it."""
        return next(self.module.parameters(), torch.empty(())).dtype

    def seeded(self) -> ContextManager:
        """A context whose random draws (a method's extra modules' init) depend
        only on the run's seed and this stage, not on what ran before."""
        return _seeded(self.seed * 1009 + self.index + 1)

    def autocast(self) -> ContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class MeanMeter:
    """Running mean of a scalar tensor, accumulated on its device."""

    def __init__(self) -> None:
        self.total: torch.Tensor | float = 0.0
        self.count = 0

    def add(self, value: torch.Tensor, n: int = 1) -> None:
        self.total = self.total + value.detach().double() * n
        self.count += n

    def take(self) -> float:
        """The mean since the last take (NaN if nothing was added)."""
        mean = float(self.total) / self.count if self.count else float("nan")
        self.total, self.count = 0.0, 0
        return mean


class TrainMetrics:
    """Loss and accuracy of the batches a stage's loss saw, summed on the
    device (no synchronisation per step) and read out on demand."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self.count = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = labels.shape[0]
        self.loss_sum += loss.detach().double() * n
        if logits.dim() == 2 and not labels.is_floating_point():
            self.correct += (logits.detach().argmax(1) == labels).sum()
        self.count += n

    def totals(self) -> torch.Tensor:
        """(loss sum, correct, count) as one float64 tensor: what engines add
        up across stages and processes."""
        return torch.stack([self.loss_sum, self.correct.double(),
                            torch.tensor(float(self.count), dtype=torch.float64, device=self.device)])

    def summary(self) -> dict[str, float]:
        return summarize_totals(self.totals())


def summarize_totals(totals: torch.Tensor) -> dict[str, float]:
    """Mean loss, error (%) and image count from TrainMetrics.totals()."""
    loss_sum, correct, count = totals.tolist()
    if not count:
        return {"loss": float("nan"), "error": float("nan"), "images": 0}
    return {"loss": loss_sum / count, "error": 100.0 * (1.0 - correct / count), "images": int(count)}


@dataclass(frozen=True)
class LocalModule:
    """A method's own module at a stage and its optimizer (StageWorker.add_local)."""

    module: nn.Module
    optimizer: Any  # StageOptimizer or a torch.optim optimizer: step, state_dict, load_state_dict (+ set_lr)
    follows_schedule: bool
    steps_with_stage: bool


class StageWorker:
    """A stage trained by back-propagating a (possibly delayed) gradient.

    ``staleness`` picks what a delayed backward sees (staleness.py); None means
    the method never delays. ``delayed`` says whether this stage's backward
    comes iterations after its forward. ``grad_scale`` multiplies the received
    gradient before it is back-propagated (FDG's gradient shrinking, beta).
    ``lr_scale`` multiplies the scheduled learning rate; ``input_grad=False``
    skips the gradient for the previous stage (methods that send none). The last stage
    computes the loss in its forward and back-propagates it. ``meters`` are
    a method's extra per-epoch statistics (reported as stage<k>_<name>).
    """

    memory_probe = None  # set by the trainer to measure the stage's memory (memory.MemoryMonitor)
    # A worker that needs the network's input images (InfoPro's reconstruction target) sets this: before
    # each forward the engine (compute.run_compute) hands it that batch's images, as stage 0 receives them
    # (augmented and normalised), by set_input_image, whatever stage it is.
    needs_input_image = False
    _input_image: tuple[int, torch.Tensor] | None = None
    # A worker that keeps received activations (DGL's replay buffer) sets this: the engines hand it every
    # activation it receives (keep_input), and a FORWARD with a ``source`` reads one back (kept_input).
    buffers_inputs = False
    # The memory estimate probes a stage at small batches times this: a stage that splits every batch into M
    # micro-batches (gpipe) is probed at batches that split as a run's do.
    probe_batch_multiple = 1

    def __init__(self, ctx: StageContext, staleness: str | None = None, delayed: bool = False,
                 grad_scale: float = 1.0, lr_scale: float = 1.0, input_grad: bool = True, predict_steps: float = 0.0):
        self.ctx = ctx
        self.module = ctx.module
        self.device = ctx.device
        self.store = make_store(staleness or "legacy", self.module, delayed, ctx.autocast, ctx.amp_dtype)
        self.optimizer = StageOptimizer(list(self.module.parameters()), ctx.optim,
                                        write_through_data=staleness == "legacy")
        self.grad_scale = grad_scale
        self.lr_scale = lr_scale
        self.input_grad = input_grad and not ctx.is_first  # whether a gradient goes back to stage k-1
        self.predict_steps = predict_steps  # --predict spectrain's s (0: the forward runs at the live weights)
        # Under prediction, where the live weights wait during each forward (buffers reused every iteration).
        self._live_weights = WeightCopies(self.optimizer.params, leaves=False) if predict_steps else None
        self.metrics = TrainMetrics(ctx.device)
        self.meters: dict[str, MeanMeter] = {}
        self.locals: dict[str, LocalModule] = {}

    def add_local(self, name: str, module: nn.Module, optimizer: Any, follows_schedule: bool = True,
                  steps_with_stage: bool = True) -> None:
        """A module of the method's own at this stage (an auxiliary classifier,
        a synthetic-gradient net) with its optimizer: checkpointed and restored
        as ``name`` / ``name``_optimizer, its lr set from the schedule
        (``follows_schedule``) and stepped in ``update`` (``steps_with_stage``),
        so a method writes none of that itself."""
        self.locals[name] = LocalModule(module, optimizer, follows_schedule, steps_with_stage)

    def set_input_image(self, batch: int, image: torch.Tensor) -> None:
        """The network's input images of ``batch`` (needs_input_image workers only)."""
        self._input_image = (batch, image)

    def input_image(self, batch: Any) -> torch.Tensor | None:
        """The images set_input_image handed for ``batch`` (None if none ever
        was). Replayed replicas (placement.replay_shards) key a batch (batch,
        replica) and get their replica's shard of it."""
        if self._input_image is None:
            return None
        b, replica = batch if isinstance(batch, tuple) else (batch, None)
        held, image = self._input_image
        if held != b:
            raise RuntimeError(f"stage {self.ctx.index} was handed the input images of batch {held}, not {b}")
        return image if replica is None else image.chunk(self.replicas)[replica]

    def forward(self, batch: int, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """Forward ``batch``; returns the activation to send on (detached), or
        None at the last stage, which computes and keeps the loss instead."""
        if self.input_grad:
            x.requires_grad_(True)
        with self._predicted_weights():
            out = self.store.forward(batch, x)
        if not self.ctx.is_last:
            return out.detach()
        loss = self.ctx.loss_fn(upcast_half(out), labels)
        self.store.set_root(batch, loss)
        self.metrics.add(loss, out, labels)
        return None

    @contextlib.contextmanager
    def _predicted_weights(self):
        """Weight prediction (SpecTrain, Chen et al. 2018; PipeOptim's form):
        during the forward the parameters hold W - lr * s * v, the weights
        the stage is expected to have when this batch's gradient is applied
        s updates later (v: the momentum buffer, zero before the first
        step), and the live W afterwards, restored exactly from a copy
        (staleness.WeightCopies: one set of buffers, refilled each time). The
        swap writes through ``.data`` (no version bump), so what the delayed
        backward sees is the staleness mode's: legacy's graph reads the live
        weights, stash keeps a copy of the predicted ones it ran on, replay
        recomputes at the live ones."""
        directions = self.optimizer.directions() if self.predict_steps else []
        moved = [(p, v) for p, v in zip(self.optimizer.params, directions) if v is not None]
        if not moved:
            yield
            return
        live = self._live_weights.take()
        with torch.no_grad():
            torch._foreach_add_([p.data for p, _ in moved], [v for _, v in moved],
                                alpha=-self.optimizer.lr() * self.predict_steps)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.optimizer.params], live)
            self._live_weights.give(live)

    def backward(self, batch: int, grad: torch.Tensor | None) -> torch.Tensor | None:
        """Back-propagate ``batch`` (from the received gradient, or from the
        loss at the last stage); returns the gradient for the previous stage."""
        if grad is not None and self.grad_scale != 1.0:
            grad = grad * self.grad_scale
        x_grad = self.store.backward(batch, grad)
        return x_grad if self.input_grad else None

    def keep_input(self, batch: int, x: torch.Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} keeps no input buffer")

    def kept_input(self, batch: int) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} keeps no input buffer")

    def local_backward(self, batch: int) -> torch.Tensor | None:
        """Back-propagate a signal the stage makes itself (methods with local
        losses or synthetic gradients override this)."""
        raise NotImplementedError(f"{type(self).__name__} has no local backward")

    def update(self) -> None:
        self.optimizer.step()
        for local in self.locals.values():
            if local.steps_with_stage:
                local.optimizer.step()

    def set_lr(self, lr: float) -> None:
        self.optimizer.set_lr(lr * self.lr_scale)
        for local in self.locals.values():
            if local.follows_schedule:
                local.optimizer.set_lr(lr)

    # -- checkpoints: everything a stage carries from one iteration to the next ----------------------

    def keep_forward_weights(self, armed: bool) -> None:
        """Armed in the iterations before a checkpoint: each forward keeps a
        copy of the weights it used, so a batch still in flight at the
        checkpoint can have its graph rebuilt (staleness.py)."""
        self.store.snapshot = armed

    def checkpoint_state(self) -> dict[str, Any]:
        """This stage between two iterations. The epoch's training metrics and
        meters have just been read out (so are empty) and are not included.
        Methods with extra state (auxiliary nets, stored activations) add to it."""
        state = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "grads": [None if p.grad is None else p.grad.detach() for p in self.module.parameters()],
                 "held": self.store.held_state()}
        for name, local in self.locals.items():
            state[name], state[f"{name}_optimizer"] = local.module.state_dict(), local.optimizer.state_dict()
        return state

    def restore_state(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        for p, grad in zip(self.module.parameters(), state["grads"]):
            p.grad = None if grad is None else grad.to(p.device)
        self.store.restore_held(to_device(state["held"], self.device))
        for name, local in self.locals.items():
            local.module.load_state_dict(state[name])
            local.optimizer.load_state_dict(state[f"{name}_optimizer"])
