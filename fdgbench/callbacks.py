"""What happens around training, as callbacks of ``train.fit``'s loop (the
pattern of Lightning's loop / callback split, kept small): the run
directory's records, checkpoints, the progress bar, Weights & Biases, the
action tracer and fault injection. The loop itself only trains, evaluates,
checks for divergence and calls these at fixed points.

Hooks, each optional, in the order ``fit`` calls them:

- ``on_fit_start(run, directory, history)``: ``history`` holds the epochs
  already recorded (a resumed run's).
- ``on_iteration(run, t, epoch_end)``: before iteration ``t``; ``epoch_end``
  is the epoch's last iteration + 1 when a checkpoint follows the epoch, else
  None.
- ``on_progress(run, t, totals, images_per_s)``: every CHECK_EVERY iterations
  and at an epoch's end, after the divergence check.
- ``on_epoch_end(run, directory, record, checkpoint_follows)``.
- ``on_fit_end(run, directory, summary)``: a finished or diverged run; in
  reverse order, so the run records, first to start, write ``done`` last.
- ``teardown()``: always, however the loop ended; in reverse order."""
from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from . import checkpoint
from .engines.trace import write_trace
from .resume import save_checkpoint
from .runs import RunDirectory, environment, write_atomically

if TYPE_CHECKING:
    from .train import Run
    from .tracking import WandbTracker

FAULT_ENV = "FDGBENCH_FAULT"  # test hook: "RANK:ITERATION:raise|kill|stop" makes that rank fail there


class Callback:
    def on_fit_start(self, run: Run, directory: RunDirectory, history: list[dict[str, Any]]) -> None:
        pass

    def on_iteration(self, run: Run, t: int, epoch_end: int | None) -> None:
        pass

    def on_progress(self, run: Run, t: int, totals: dict[str, Any], images_per_s: float) -> None:
        pass

    def on_epoch_end(self, run: Run, directory: RunDirectory, record: dict[str, Any],
                     checkpoint_follows: bool) -> None:
        pass

    def on_fit_end(self, run: Run, directory: RunDirectory, summary: dict[str, Any]) -> None:
        pass

    def teardown(self) -> None:
        pass


class RunRecords(Callback):
    """config.json and env.json at the start, one metrics line per epoch,
    every stage's weights and summary.json + done at the end (rank 0 writes
    the records; every rank its stages' weights)."""

    def on_fit_start(self, run, directory, history):
        if run.resume is None and run.engine.is_primary:
            directory.start(run.cfg.to_dict(), environment(run.devices, run.cfg.seed))
            checkpoint.remove(directory.path)

    def on_epoch_end(self, run, directory, record, checkpoint_follows):
        if run.engine.is_primary:
            directory.append_metrics(record)  # before the checkpoint: a resume drops records past it

    def on_fit_end(self, run, directory, summary):
        if run.replica == 0:  # the replicas' weights are equal: replica 0 saves them
            for k, stage in zip(run.stage_indices, run.stages):
                directory.save_stage(k, stage.state_dict())
        if run.engine.is_primary:
            directory.finish(summary)
            checkpoint.remove(directory.path)


class Checkpoints(Callback):
    """A checkpoint after every epoch but the last. Forwards close to its
    iteration keep their weights (their batches may still be in flight
    there: ``run.hold_span``), so the checkpoint can restore them."""

    def on_iteration(self, run, t, epoch_end):
        for w in run.workers:
            w.keep_forward_weights(epoch_end is not None and t >= epoch_end - run.hold_span)

    def on_epoch_end(self, run, directory, record, checkpoint_follows):
        if checkpoint_follows:
            save_checkpoint(run, directory, record["epoch"], record["iteration"])


class ProgressBar(Callback):
    def __init__(self, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar = None

    def on_fit_start(self, run, directory, history):
        if self.enabled and run.engine.is_primary:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=run.total_steps, unit="it", dynamic_ncols=True, leave=False)
            self.bar.update(run.steps_done)

    def on_progress(self, run, t, totals, images_per_s):
        if self.bar is not None:
            self.bar.update(t + 1 - self.bar.n)
            self.bar.set_postfix(loss=f"{totals['loss']:.3f}", acc=f"{100 - totals['error']:.1f}%",
                                 img_s=f"{images_per_s:.0f}")

    def teardown(self):
        if self.bar is not None:
            self.bar.close()


class WandbLogging(Callback):
    """Config, every epoch's record and the summary to Weights & Biases (rank 0)."""

    def __init__(self, tracker: WandbTracker):
        self.tracker = tracker

    def on_fit_start(self, run, directory, history):
        if run.engine.is_primary:
            self.tracker.start(directory.path.name, directory.path, run.cfg.to_dict(), resumed_from=len(history) or None)

    def on_epoch_end(self, run, directory, record, checkpoint_follows):
        if run.engine.is_primary:
            self.tracker.log(record)

    def on_fit_end(self, run, directory, summary):
        if run.engine.is_primary:
            self.tracker.finish(summary)


class TraceRecording(Callback):
    """Every action's start and end per stage (``--trace``) into trace.json."""

    def on_fit_start(self, run, directory, history):
        run.sync_compute()  # the origin events must not wait behind earlier work
        run.barrier()
        run.tracer.start(run.devices)

    def on_epoch_end(self, run, directory, record, checkpoint_follows):
        run.tracer.resolve()

    def on_fit_end(self, run, directory, summary):
        spans = run.tracer.spans if run.replica == 0 else []  # one timeline per stage: replica 0's
        if run.rank is not None:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, spans)
            spans = [s for part in gathered for s in part]
        if run.engine.is_primary:
            meta = {"method": run.cfg.method, "model": run.cfg.model, "splits": run.cfg.splits,
                    "replicas": run.placement.replicas,
                    "engine": run.cfg.engine, "threads": torch.get_num_threads(),
                    "batch_size": run.cfg.batch_size, "steps_per_epoch": run.steps_per_epoch,
                    "partition": run.partition_text}
            write_atomically(directory.path / "trace.json", lambda tmp: write_trace(tmp, spans, meta))


class FaultInjection(Callback):
    """The test hook FDGBENCH_FAULT="RANK:ITERATION:raise|kill|stop": that rank
    raises, dies (SIGKILL) or hangs (SIGSTOP) just before that iteration."""

    def __init__(self, text: str):
        rank, iteration, self.mode = text.split(":")
        self.where = (int(rank), int(iteration))

    @classmethod
    def from_environment(cls) -> FaultInjection | None:
        text = os.environ.get(FAULT_ENV)
        return cls(text) if text else None

    def on_iteration(self, run, t, epoch_end):
        if (run.process, t) != self.where:
            return
        if self.mode in ("kill", "stop"):
            os.kill(os.getpid(), signal.SIGKILL if self.mode == "kill" else signal.SIGSTOP)
            return
        raise RuntimeError(f"fault injected by {FAULT_ENV} at iteration {t}")


def standard_callbacks(run: Run, progress: bool | None = None, tracker: WandbTracker | None = None) -> list[Callback]:
    """The callbacks every run of the command line has, in their order: an
    epoch's records before its checkpoint (a resume drops records past it);
    at the end, in reverse, the trace and the weights before ``done``."""
    callbacks: list[Callback | None] = [RunRecords(), Checkpoints(), FaultInjection.from_environment(),
                                        ProgressBar(progress), TraceRecording() if run.tracer is not None else None,
                                        WandbLogging(tracker) if tracker is not None else None]
    return [c for c in callbacks if c is not None]
