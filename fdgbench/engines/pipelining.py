"""The torch.distributed.pipelining engine: GPipe and 1F1B run by PyTorch's
own pipeline library, the implementation a practitioner would otherwise
pick, so the suite measures that one rather than a schedule of its own.

Each rank (one per stage, as the distributed engine) wraps its stage module
in a ``PipelineStage`` and steps the library's schedule class
(``ScheduleGPipe`` or ``Schedule1F1B``, the method's ``pipeline_schedule``)
with ``n_microbatches`` = the method's M: rank 0 hands it the batch, the last
rank the labels and the loss (the run's cross-entropy per micro-batch; the
library scales the accumulated gradients by 1/M); then every rank steps its
optimizer. The pipeline drains within ``step()``, so nothing is in flight
between iterations (a checkpoint is the stage's state). Everything else -
the process groups, the test set pipelined through the stages, training
totals and meters across ranks, checkpoints - is the distributed engine's.

The library calls the stage module itself, so the engine hands it the
stage wrapped in the run's settings (``RunSettingsStage``): ``--amp bf16``'s
autocast around the forward (the library's backward then runs the autocast
graph, as every engine's does), and under ``--channels-last`` the stage's
input converted to channels-last and its output back to contiguous NCHW,
the layout the library's messages are allocated in (two copies per
micro-batch and stage; the convs run channels-last as everywhere else).

Not yet: replicas; ``--trace`` is refused and no per-stage memory is recorded (the library
runs the module itself, so neither the tracer nor the memory probes see its
actions). Not yet run on NCCL: the library infers its message shapes at the
first ``step()`` on the world group, which the distributed engine's warm-up
of its own groups does not cover.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from ..stage import upcast_half
from .distributed import DistributedEngine, _check as _distributed_check, _describe as _distributed_describe
from .registry import EngineInfo, register_engine

SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B"}  # the method's pipeline_schedule -> the class


def _library():
    """torch.distributed.pipelining, imported when this engine is used (it
    takes seconds to import, and every other engine does without it)."""
    try:
        import torch.distributed.pipelining as library
        from torch.distributed.pipelining.schedules import PipelineScheduleSingle
    except ImportError as exc:
        raise UserError(f"--engine pipelining needs torch.distributed.pipelining (torch 2.6 or later), which this "
                        f"torch {torch.__version__} lacks: {exc}") from None
    if "scale_grads" not in PipelineScheduleSingle.__init__.__code__.co_varnames:
        raise UserError(f"--engine pipelining needs a torch.distributed.pipelining whose schedules take "
                        f"scale_grads (torch 2.6 or later); this is torch {torch.__version__}")
    return library


class _ChannelsLastInside(torch.autograd.Function):
    """An NCHW tensor to channels-last, whose gradient goes back NCHW: the
    library sizes and lays out its gradient buffers from the input gradient
    it sees (metadata inference), and gloo receives only into contiguous
    buffers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class RunSettingsStage(nn.Module):
    """A stage module as the library calls it: the run's autocast around its
    forward, its activations channels-last inside and contiguous NCHW on the
    wire (the library allocates its message buffers by shape alone)."""

    def __init__(self, stage: nn.Module, autocast, memory_format: torch.memory_format):
        super().__init__()
        self.stage, self.autocast, self.memory_format = stage, autocast, memory_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = self.memory_format == torch.channels_last
        if channels_last and x.dim() == 4:
            x = _ChannelsLastInside.apply(x)
        with self.autocast():
            out = self.stage(x)
        return out.contiguous() if channels_last and out.dim() == 4 else out


class PipeliningEngine(DistributedEngine):
    def __init__(self, run):
        super().__init__(run.method, run.workers[0], run.stages[0], run.stream, run.placement,
                         tuple(run.dataset.train_images.shape[1:]), run.memory_format, run.tracer)
        ctx, library = self.worker.ctx, _library()
        wrapped = RunSettingsStage(self.stage, ctx.autocast, self.memory_format)
        self.pipe_stage = library.PipelineStage(wrapped, self.k, self.num_stages, self.device)
        self.schedule = getattr(library, SCHEDULES[self.method.pipeline_schedule])(
            self.pipe_stage, n_microbatches=self.method.microbatches,
            loss_fn=lambda out, labels: ctx.loss_fn(upcast_half(out), labels), scale_grads=True)

    def run_iteration(self, t: int) -> None:
        if self.k == 0:
            x, _ = self.stream.batch(t)
            self.schedule.step(x.to(self.device))
        elif self.k == self.num_stages - 1:
            labels = self.stream.labels(t).to(self.device)
            losses: list[torch.Tensor] = []
            out = self.schedule.step(target=labels, losses=losses)
            # Equal micro-batches: the batch's mean loss is the mean of theirs.
            self.worker.metrics.add(torch.stack([loss.detach() for loss in losses]).mean(), out, labels)
        else:
            self.schedule.step()
        self.worker.update()


def _check(plan, name) -> None:
    cfg, method, placement = plan.cfg, plan.method, plan.placement
    if getattr(method, "pipeline_schedule", None) not in SCHEDULES:
        runs = ", ".join(SCHEDULES)
        raise UserError(f"{name('engine')} pipelining runs {runs} (torch.distributed.pipelining's schedules), not "
                        f"{cfg.method}")
    _library()
    if placement.stages < 2:
        raise UserError(f"{name('engine')} pipelining runs a pipeline of K >= 2 stages; {cfg.method} at "
                        f"{name('splits')} 1 is BP: use the sequential engine")
    if method.pipeline_schedule == "1f1b" and method.microbatches < placement.stages:
        raise UserError(f"1f1b on {name('engine')} pipelining needs at least one micro-batch per stage: "
                        f"--microbatches {method.microbatches} < {placement.stages} stages")
    if cfg.replicas != 1:
        raise UserError(f"{name('engine')} pipelining does not take {name('replicas')} yet (one pipeline of K ranks)")
    _distributed_check(plan, name)


def _describe(run) -> str:
    return _distributed_describe(run).replace("distributed engine",
                                              f"torch.distributed.pipelining ({run.method.pipeline_schedule})", 1)


register_engine(EngineInfo(
    "pipelining", "gpipe and 1f1b through torch.distributed.pipelining's PipelineStage and schedules, one rank "
                  "per stage", per_rank=True, check=_check, describe=_describe, build=PipeliningEngine,
    observes_actions=False))
