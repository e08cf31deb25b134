"""Train one config into its run directory: skip it if done, resume it from
its checkpoint, hold the directory's lock while it trains, refuse it if its
estimated memory does not fit, and run it on the engine its config names
(spawned ranks, or this process as one torchrun rank). The command line, the
sweep launchers and the benchmarks all train through ``train_run``."""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from . import checkpoint
from .config import RunConfig
from .data import load_dataset
from .engines.launch import (check_ranks_fit, init_process_group, is_communication_error, lost_contact_of, spawn_ranks,
                             under_torchrun)
from .engines.trace import Tracer
from .errors import DivergedError, UserError
from .memory import check_fits, estimate_built
from .run_record import CORRUPT, corrupt_text, read_run
from .plan import Plan, as_plan, check_config
from .runs import RunDirectory
from .tracking import WandbTracker
from .callbacks import standard_callbacks
from .train import Run, build_run, fit, train_rank


@dataclass(frozen=True)
class RunOptions:
    """How a run is carried out, not what it computes (none of it is in the
    config or the run directory's name)."""

    out: str = "results"  # results root
    force: bool = False  # start over even if done or checkpointed
    data_dir: str = "data"
    progress: bool | None = None
    trace: bool = False
    use_wandb: bool = False
    wandb_project: str = "fdgbench"
    ignore_memory_check: bool = False

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> RunOptions:
        return cls(**{k: options[k] for k in cls.__dataclass_fields__ if k in options})


def train_run(plan_or_config: Plan | RunConfig, kw: RunOptions, datasets: dict[str, Any] | None = None
              ) -> tuple[dict[str, Any], Path, bool]:
    """Train one config unless its run directory is done (resuming from its
    checkpoint if it has one); returns the summary, the directory and whether
    it was cached. ``datasets`` caches loaded data across calls (by spec).
    A run recorded as diverged raises DivergedError, cached or not."""
    plan = as_plan(plan_or_config)
    cfg, engine = plan.cfg, plan.engine
    if kw.trace and not engine.observes_actions:
        raise UserError(f"--trace times the actions an engine runs itself; --engine {cfg.engine} hands the stages to "
                        f"a library: drop --trace")
    per_rank = engine.per_rank  # one process per rank: this one under torchrun, else spawned
    if per_rank and under_torchrun():
        return _run_torchrun_rank(plan, kw)
    run = plan.directory(kw.out)
    if run.is_done and not kw.force:
        return _cached(run, done_summary(run))
    run.ensure_writable()
    with run.lock(), _removed_if_left_empty(run):  # the lock is held until the run ends: its ranks write under it
        if run.is_done and not kw.force:  # finished by another process since the check above
            return _cached(run, done_summary(run))
        resume = _resume_point(run, plan, kw)
        datasets = {} if datasets is None else datasets
        if cfg.dataset not in datasets:
            datasets[cfg.dataset] = load_dataset(cfg.dataset, kw.data_dir)
        if per_rank:  # spawn one process per rank here; the data is checked (and cached) above
            if not kw.ignore_memory_check:
                _check_memory(plan, datasets[cfg.dataset])
            summaries = spawn_ranks(plan.placement.ranks, plan.devices[0], _spawned_rank,
                                    (cfg, kw.data_dir, str(run.path), kw.progress, kw.trace, None,
                                     _wandb_project(kw), resume))
            return summaries[0], run.path, False
        tracker = WandbTracker(_wandb_project(kw)) if kw.use_wandb else None  # fails before training if absent
        trainer = build_run(plan, dataset=datasets[cfg.dataset], tracer=Tracer() if kw.trace else None, resume=resume)
        if not kw.ignore_memory_check:
            _check_built_memory(trainer)
        print(trainer.describe(), file=sys.stderr, flush=True)
        return fit(trainer, run, standard_callbacks(trainer, kw.progress, tracker)), run.path, False


@contextlib.contextmanager
def _removed_if_left_empty(run: RunDirectory) -> Iterator[None]:
    """A run that fails before it writes anything (bad data, a budget the data
    makes too short, Ctrl-C while decoding) leaves no directory behind, which
    `sweep status` would count as an incomplete run. Used inside the run's
    lock: its lock file is all such a directory holds, and no other process
    is waiting for it (a second one is refused at once, not queued)."""
    try:
        yield
    except BaseException:
        run.remove_if_only_lock()
        raise


def _check_built_memory(trainer: Run) -> None:
    """Refuse (one line) a run on the sequential engine whose stages, measured
    on its own workers before it trains (memory.estimate_built), do not fit.
    Its data and weights are in place already, so they are counted in what is
    free (the weights once more in the stages' state: the check errs high)."""
    data = trainer.dataset  # the run's subset
    check_fits(trainer.plan, tuple(data.train_images.shape[1:]), data.num_classes,
               _data_bytes(data, len(data.train_labels), len(data.test_labels)), trainer.total_steps,
               built=estimate_built(trainer))


def _check_memory(plan: Plan, data) -> None:
    """Refuse (one line) a run on a per-rank engine whose estimated stage
    memory does not fit, before its ranks start (on copies of its stages
    built here on the CPU: each rank builds only its own)."""
    cfg = plan.cfg
    train = min(len(data.train_labels), cfg.train_subset or len(data.train_labels))
    test = min(len(data.test_labels), cfg.test_subset or len(data.test_labels))
    steps = cfg.epochs * max(1, train // cfg.batch_size)
    check_fits(plan, tuple(data.train_images.shape[1:]), data.num_classes, _data_bytes(data, train, test),
               min(steps, cfg.max_steps or steps))


def _data_bytes(data, train: int, test: int) -> int:
    """The bytes of a process's copy of ``train`` + ``test`` of the data's images (uint8)."""
    return (train + test) * data.train_images[0].nbytes


def done_summary(run: RunDirectory) -> dict[str, Any]:
    """A done run's summary. A checkpoint left beside a done run (killed
    after ``done`` was written, before the checkpoint was removed) is removed
    here, under the run's lock. A corrupt one (run_record.read_run: its
    config gone, its records torn or contradicting each other) is refused,
    as every command refuses it."""
    record = read_run(run)
    if record.state == CORRUPT:
        raise UserError(corrupt_text(run, record.problem))
    if (run.path / checkpoint.FOLDER).exists():
        with run.lock():
            checkpoint.remove(run.path)
    return record.summary


def _cached(run: RunDirectory, summary: dict[str, Any]) -> tuple[dict[str, Any], Path, bool]:
    """``train_run``'s answer for a done run; one recorded as diverged raises
    the error (and so gets the exit status) it raised when it ran."""
    if summary.get("status") == "diverged":
        raise DivergedError(f"{summary.get('message')}; recorded in {run.path}")
    return summary, run.path, True


def _resume_point(run: RunDirectory, plan: Plan, kw: RunOptions) -> dict[str, Any] | None:
    """The checkpoint an unfinished run continues from (None: start afresh,
    also under --force), announced on stderr; one another run wrote is refused."""
    resume = None if kw.force else checkpoint.latest(run.path, plan.config_hash)
    if resume is not None:
        print(f"resuming {run.path.name} from its checkpoint after epoch {resume['epoch']} (--force starts over)",
              file=sys.stderr, flush=True)
    return resume


def _spawned_rank(rank: int, cfg: RunConfig, *args: Any) -> dict[str, Any]:
    """One spawned rank of a distributed run: a process of its own, so it
    resolves its own plan (a method from a plug-in is found there by name, as
    the parent found it) and trains its stage (train.train_rank's arguments)."""
    return train_rank(rank, check_config(cfg), *args)


def _wandb_project(kw: RunOptions) -> str | None:
    return (kw.wandb_project or "fdgbench") if kw.use_wandb else None


def _run_torchrun_rank(plan: Plan, kw: RunOptions) -> tuple[dict[str, Any], Path, bool]:
    """This process is one rank that torchrun started (multi-node: torchrun's
    flags). Rank 0 decides whether the run is already done."""
    import torch.distributed as dist

    device = plan.devices[0]
    check_ranks_fit(device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
                    torch.cuda.device_count() if device.type == "cuda" else 0)
    init_process_group(device, int(os.environ["LOCAL_RANK"]))
    peer_lost = False
    try:
        placement = plan.placement
        if dist.get_world_size() != placement.ranks:
            raise UserError(f"torchrun started {dist.get_world_size()} ranks but the run places "
                            f"{placement.describe()} = {placement.ranks} ranks; use --nproc-per-node "
                            f"{placement.ranks} (times the nodes)")
        run = plan.directory(kw.out)
        with contextlib.ExitStack() as held:
            # (summary if done already, checkpoint to resume from, rank 0's error): every rank must
            # learn of the error, or the others would wait for rank 0 until the collective times out.
            decision: list[Any] = [None, None, None]
            if dist.get_rank() == 0:
                try:
                    run.ensure_writable()
                    held.enter_context(run.lock())  # rank 0 owns the directory for the whole run
                    if run.is_done and not kw.force:
                        decision[0] = done_summary(run)
                    else:
                        decision[1] = _resume_point(run, plan, kw)
                except UserError as exc:
                    decision[2] = str(exc)
            dist.broadcast_object_list(decision, src=0)
            if decision[2] is not None:
                raise UserError(decision[2])
            if decision[0] is not None:
                return _cached(run, decision[0])
            if dist.get_rank() == 0:  # the directory's owner removes it if nothing was written
                held.enter_context(_removed_if_left_empty(run))
            summary = train_rank(dist.get_rank(), plan, kw.data_dir, str(run.path), kw.progress, kw.trace,
                                 local_rank=int(os.environ["LOCAL_RANK"]), wandb_project=_wandb_project(kw),
                                 resume=decision[1])
            return summary, run.path, False
    except Exception as exc:
        if isinstance(exc, UserError) or not is_communication_error(exc):
            raise
        # A peer died or stopped responding (torchrun's own agent reports which one and stops the job):
        # one line from this rank, and no teardown, which can block on the dead peer.
        peer_lost = True
        raise lost_contact_of(dist.get_rank(), exc) from None
    finally:
        if not peer_lost:
            dist.destroy_process_group()
