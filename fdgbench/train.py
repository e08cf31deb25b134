"""A training run: data, model, partition, method, engine; epochs with the
paper's step learning-rate schedule; evaluation after every epoch; the run
directory's records."""
from __future__ import annotations

import math
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import RunConfig
from .data import BatchStream, ImageDataset, Normalizer, RenamedBatches, load_dataset
from .diagnose import GradientProbe
from .engines.launch import from_rank0, rank_device, threads_per_rank
from .engines.sequential import Observer
from .engines.trace import Tracer
from .errors import DivergedError, UserError
from .memory import MemoryMonitor
from .models import build_model, count_parameters
from .numerics import configure_numerics, seed_everything
from .optim import lr_at
from .placement import ReplicaStream, replay_shards, replica_groups, steps_outside_update, sync_replicas
from .resume import restore
from .partition import Partition, block_output_shapes, build_stages, make_partition
from .plan import Plan, as_plan, check_budget
from .runs import RunDirectory
from .schedule import hold_span
from .stage import summarize_totals
from .callbacks import Callback, standard_callbacks
from .tracking import WandbTracker

CHECK_EVERY = 50  # iterations between loss read-outs (progress bar, divergence check)


class Run:
    """Every piece of a run, built once from its plan (``build_run``: the
    config checked and resolved by plan.check_config); ``fit`` trains it.

    With ``rank`` (a torch.distributed process group is up, one rank per
    stage and replica: placement.py) this process builds the same model and
    partition as every other rank but keeps and trains only its own stage's
    replica, on the distributed engine; otherwise all stages (and their
    replicas, replayed shard by shard) live here, on the sequential engine.

    ``resume`` (a run directory's ``checkpoint.latest``) continues that run:
    its recorded stage boundaries are used (a measured partition could come
    out different) and ``fit`` restores the checkpoint before training on."""

    def __init__(self, plan: Plan, data_dir: str = "data", dataset: ImageDataset | None = None,
                 observer: Observer | None = None, rank: int | None = None, local_rank: int | None = None,
                 tracer: Tracer | None = None, resume: dict[str, Any] | None = None):
        cfg = plan.cfg
        # The config names the engine; a per-rank engine's process is one rank of it (the group is up).
        self.engine_info = plan.engine
        if self.engine_info.per_rank != (rank is not None):
            raise ValueError(f"a {cfg.engine}-engine run is built " + ("with a rank" if rank is not None else
                             "without its rank: build it in each rank of a torch.distributed group"))
        self.plan, self.cfg = plan, cfg
        self.config_hash = plan.config_hash  # the run directory's name; checkpoints carry it
        self.rank = rank
        # This process among the run's processes (the sequential engine is one).
        self.process, self.processes = (0, 1) if rank is None else (rank, dist.get_world_size())
        self.resume = resume
        # Ranks share their node's cores unless --threads says otherwise; the default is applied here, not
        # recorded in the config, so a run directory's name does not depend on the machine's core count.
        threads = cfg.threads or (threads_per_rank(self.processes) if rank is not None else None)
        if threads:
            torch.set_num_threads(threads)
        configure_numerics(cfg.deterministic)
        seed_everything(cfg.seed)
        self.method = plan.method
        self.placement = plan.placement
        self.num_stages = self.placement.stages
        # This process's replica (replica 0 saves the weights and scores the test set).
        self.replica = 0 if rank is None else self.placement.replica_of(rank)
        devices = list(plan.devices)
        if rank is not None:
            devices = [rank_device(devices[0], rank if local_rank is None else local_rank)] * self.num_stages
        self.devices = devices
        data = dataset if dataset is not None else load_dataset(cfg.dataset, data_dir)
        self.dataset = data.subset(cfg.train_subset, cfg.test_subset)
        # On the first stage's device before the partition (a measured one times it there) and the output shapes
        # are worked out, whether the partition is made now or read from a checkpoint.
        model = build_model(cfg.model, self.dataset.num_classes).to(self.devices[0])
        self.num_parameters = count_parameters(model)
        sample = torch.zeros(8, *self.dataset.train_images.shape[1:], device=self.devices[0])
        if resume is not None:
            recorded = resume["partition"]
            if len(recorded["starts"]) != self.num_stages or recorded["starts"][-1] >= len(model):
                raise UserError(f"the checkpoint pointer's stages {recorded['starts']} do not fit {self.num_stages} "
                                f"stage(s) of {cfg.model} ({len(model)} blocks); --force starts the run over")
            self.partition = Partition(tuple(recorded["starts"]), len(model), recorded.get("strategy", "recorded"))
        else:
            self.partition = make_partition(model, self.num_stages, cfg.partition,
                                            list(cfg.split_at) if cfg.split_at else None, sample=sample)
            if rank is not None and self.num_stages > 1:
                self.partition = from_rank0(self.partition)  # measured (time) partitions differ between ranks
        self.partition_text = self.partition.describe(model.block_names)
        self.block_names = list(model.block_names)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.preserve_format
        block_shapes = block_output_shapes(model, tuple(self.dataset.train_images.shape[1:]), self.devices[0])
        all_stages = build_stages(model, self.partition)
        self.output_shapes = [block_shapes[r.stop - 1] for r in self.partition.ranges()]
        # The stages this process trains: all of them, or the rank's own.
        self.stage_indices = list(range(self.num_stages)) if rank is None else [self.placement.stage_of(rank)]
        self.stages = [all_stages[k].to(self.devices[k], memory_format=self.memory_format)
                       for k in self.stage_indices]
        del all_stages, model
        self.amp_dtype = torch.bfloat16 if cfg.amp == "bf16" else None
        # Every rank creates the replica groups here, before the engine's groups (one order on every rank).
        self._replica_group = (replica_groups(self.placement, self.devices[0])
                               if rank is not None and self.placement.replicas > 1 else None)
        self.workers = [self._make_worker(k, stage, block_shapes)
                        for k, stage in zip(self.stage_indices, self.stages)]
        mean, std = self.dataset.channel_stats()
        self.normalizer = Normalizer(mean, std, self.devices[0], cfg.channels_last)
        self.stream = BatchStream(self.dataset.train_images.to(self.devices[0]),
                                  self.dataset.train_labels.to(self.devices[0]), cfg.batch_size, cfg.seed,
                                  self.normalizer)
        if rank is not None and self.placement.replicas > 1:  # this rank trains its replica's shard of each batch
            self.stream = ReplicaStream(self.stream, self.placement.replicas, self.replica)
        if self.method.renames_batches():  # its schedule's batch ids name other things than training batches
            self.stream = RenamedBatches(self.stream, self.method.data_batch)
        self.test_images = self.dataset.test_images.to(self.devices[0])
        self.test_labels = self.dataset.test_labels
        self.tracer = tracer
        self.probe = GradientProbe(cfg.diagnose, self.workers, self.stream) if cfg.diagnose else None
        self.observer = observer
        self.engine = self.engine_info.build(self)
        self.steps_per_epoch = self.stream.steps_per_epoch
        self.planned_steps = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(self.planned_steps, cfg.max_steps or self.planned_steps)
        self.warmup_steps = cfg.warmup_epochs * self.steps_per_epoch
        check_budget(plan, self.steps_per_epoch, self.total_steps)
        # Forwards this close to a checkpoint keep their weights (their batches may still be in flight there).
        self.hold_span = hold_span(self.method.schedule, self.num_stages)
        self.memory = MemoryMonitor(self.workers, self.stage_indices, self.devices, self.method.schedule,
                                    self.num_stages)
        # Repeated on every metrics line, so a line read on its own says whose it is.
        self.identity = {"method": cfg.method, **self.method.option_values(), "model": cfg.model,
                          "splits": cfg.splits, "seed": cfg.seed}

    def _make_worker(self, k: int, stage: nn.Module, block_shapes: tuple[tuple[int, ...], ...]):
        cfg = self.cfg
        worker = self.method.make_worker(self.plan.stage_context(k, stage, self.partition, block_shapes,
                                                                 self.dataset.num_classes, self.devices[k],
                                                                 self.amp_dtype, self.memory_format))
        replicas = self.placement.replicas
        if replicas == 1:
            return worker
        outside = steps_outside_update(worker)
        if outside:
            raise UserError(f"{cfg.method} cannot run {replicas} replicas: its {', '.join(outside)} step(s) outside "
                            f"the stage's update, so the replicas' copies would drift apart; use --replicas 1")
        if self.rank is None:
            return replay_shards(worker, replicas)
        return sync_replicas(worker, self._replica_group, cfg.deterministic)

    def describe(self) -> str:
        c = self.cfg
        opts = "".join(f" {k}={v}" for k, v in self.method.option_values().items())
        return (f"{c.method}{opts} | {c.model} ({self.num_parameters:,} params) K={c.splits} "
                f"[{self.partition.strategy}: {self.partition_text}] | {self.dataset.description} | "
                f"{self.total_steps} steps ({self.steps_per_epoch}/epoch, batch {c.batch_size}) on "
                f"{','.join(map(str, dict.fromkeys(self.devices)))}, {self._engine_text()}")

    def _engine_text(self) -> str:
        return self.engine_info.describe(self)

    def memory_record(self) -> dict[str, Any]:
        """Every stage's measured memory (memory.MemoryMonitor), from every rank;
        nothing where the engine does not run the stages' actions itself (the
        probes would see only the state, which is not a stage's memory)."""
        if not self.engine_info.observes_actions:
            return {}
        record = self.memory.record()
        if self.rank is not None:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, record)
            record = {}
            for part in gathered:  # replicas report the same stage: replica 0's (the lower ranks) is kept
                for key, value in part.items():
                    record.setdefault(key, value)
        return record

    def barrier(self) -> None:
        if self.rank is not None:
            dist.barrier()

    def summary(self, history: list[dict[str, Any]], status: str, message: str | None,
                 train_seconds: float) -> dict[str, Any]:
        errors = [h["test_error"] for h in history]
        best = min(range(len(errors)), key=errors.__getitem__) if errors else None
        steps = self.steps_done
        return {
            "status": status,
            "message": message,
            "method": self.cfg.method,
            "method_options": self.method.option_values(),
            "model": self.cfg.model,
            "parameters": self.num_parameters,
            "splits": self.cfg.splits,
            "partition": {"strategy": self.partition.strategy, "starts": list(self.partition.starts),
                          "stages": self.partition_text},
            "dataset": self.dataset.description,
            "epochs_completed": len(history),
            "steps": steps,
            "final_test_error": errors[-1] if errors else None,
            "best_test_error": errors[best] if errors else None,
            "best_epoch": history[best]["epoch"] if errors else None,
            "final_train_loss": history[-1]["train_loss"] if history else None,
            "train_seconds": train_seconds,
            "checkpoint_seconds": self.checkpoint_seconds,
            # Over the completed epochs, whose time train_seconds sums.
            "images_per_s": (history[-1]["iteration"] * self.cfg.batch_size / train_seconds
                             if history and train_seconds else None),
        }

    def sync_compute(self) -> None:
        """Wait until this process's computation has finished on its devices
        (for timing, and before an epoch's clock starts and stops).

        Only the compute stream is waited for, never the whole device:
        torch.cuda.synchronize(device) also waits for NCCL's streams, and a
        send of the last iteration whose message exceeds NCCL's internal
        buffering (4 MiB for ResNet-56 at batch 128) completes only when the
        peer posts the matching receive at the start of its next iteration;
        both ranks would block here until the watchdog killed the run."""
        for d in dict.fromkeys(self.devices):
            if d.type == "cuda":
                torch.cuda.current_stream(d).synchronize()


def build_run(run: Plan | RunConfig, data_dir: str = "data", dataset: ImageDataset | None = None, **kw: Any) -> Run:
    """Load the data of ``run`` (a plan; a config is checked into its plan
    here) unless ``dataset`` is given, and build the model, partition, stages,
    workers, batch stream, test set and engine, once (Run's keyword
    arguments: observer, rank, local_rank, tracer, resume)."""
    return Run(as_plan(run), data_dir, dataset, **kw)


def fit(run: Run, directory: RunDirectory, callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Train ``run`` to the end (or divergence) into ``directory``: an epoch
    loop of the schedule's iterations at the paper's lr schedule, the
    divergence check, an evaluation after every epoch; everything else is
    ``callbacks`` (default: ``standard_callbacks``: records, checkpoints,
    progress bar, trace, faults). Returns the summary; a diverged run is
    recorded and raises DivergedError."""
    callbacks = standard_callbacks(run) if callbacks is None else callbacks
    history = restore(run, directory) if run.resume is not None else []
    if run.resume is None:
        run.steps_done = 0
    run.checkpoint_seconds = 0.0
    train_seconds = sum(h["epoch_seconds"] for h in history)
    epochs = math.ceil(run.total_steps / run.steps_per_epoch)
    status, message = "finished", None
    try:
        for c in callbacks:
            c.on_fit_start(run, directory, history)
        try:
            for epoch in range(len(history), epochs):
                record = _train_epoch(run, epoch, epoch + 1 < epochs, callbacks)
                train_seconds += record["epoch_seconds"]
                history.append(record)
                for c in callbacks:
                    c.on_epoch_end(run, directory, record, epoch + 1 < epochs)  # the last epoch ends the run
        except DivergedError as exc:  # every rank raises it at the same check (the totals are shared)
            status, message = "diverged", str(exc)
        run.engine.finish(run.steps_done)
        summary = {**run.summary(history, status, message, train_seconds), **run.memory_record()}
        for c in reversed(callbacks):
            c.on_fit_end(run, directory, summary)
    finally:
        for c in reversed(callbacks):
            c.teardown()
    if status == "diverged":
        raise DivergedError(f"{message}; recorded in {directory.path}")
    return summary


def _train_epoch(run: Run, epoch: int, checkpoint_follows: bool, callbacks: list[Callback]) -> dict[str, Any]:
    """One epoch's iterations and its evaluation; returns its metrics record."""
    first = epoch * run.steps_per_epoch
    last = min(first + run.steps_per_epoch, run.total_steps)
    run.sync_compute()
    t0 = time.perf_counter()
    totals: dict[str, Any] = {}  # the epoch's training totals: read (and checked) at its last iteration too
    for t in range(first, last):
        lr = lr_at(t, run.cfg.lr, run.planned_steps, run.warmup_steps, run.cfg.warmup)
        for w in run.workers:
            w.set_lr(lr)
        for c in callbacks:
            c.on_iteration(run, t, last if checkpoint_follows else None)
        run.memory.watch(t)
        run.engine.run_iteration(t)
        run.steps_done = t + 1
        if (t + 1) % CHECK_EVERY == 0 or t + 1 == last:
            totals = summarize_totals(run.engine.train_totals())
            _check_finite(totals, t, first)
            rate = (t + 1 - first) * run.cfg.batch_size / max(time.perf_counter() - t0, 1e-9)
            for c in callbacks:
                c.on_progress(run, t, totals, rate)
    run.sync_compute()
    seconds = time.perf_counter() - t0
    run.engine.reset_train_metrics()  # not read again: on the distributed engine a read is an all-reduce
    meters = run.engine.take_meters()
    test = run.engine.evaluate(run.test_images, run.test_labels, run.normalizer)
    return {**run.identity, "epoch": epoch + 1, "iteration": last, "lr": lr, "train_loss": totals["loss"],
            "train_error": totals["error"], "test_loss": test["loss"], "test_error": test["error"],
            "epoch_seconds": seconds, "images_per_s": (last - first) * run.cfg.batch_size / seconds,
            **meters, **({"diagnostics": run.probe.take()} if run.probe is not None else {})}


def _check_finite(totals: dict[str, Any], t: int, first: int) -> None:
    """The divergence check, the one place a run is found diverged: the
    epoch's summed training loss, every CHECK_EVERY iterations and at the
    epoch's end."""
    if totals["images"] and not math.isfinite(totals["loss"]):
        # The epoch's summed loss was finite at the previous check, so it turned in between.
        since = max(first, t // CHECK_EVERY * CHECK_EVERY)
        raise DivergedError(f"training loss is {totals['loss']} by iteration {t} (first non-finite in iterations "
                            f"{since}-{t}; the loss is checked every {CHECK_EVERY} iterations)")


def train_rank(rank: int, plan: Plan, data_dir: str, run_path: str, progress: bool | None, trace: bool,
               local_rank: int | None = None, wandb_project: str | None = None,
               resume: dict[str, Any] | None = None) -> dict[str, Any]:
    """One rank of a distributed run (the process group is up): load the data
    (rank 0 first, so a decoding cache is written once), build this rank's
    stage and train it (from ``resume``, rank 0's checkpoint pointer, if given)."""
    if rank == 0:
        dataset = load_dataset(plan.cfg.dataset, data_dir)
    dist.barrier()
    if rank != 0:
        dataset = load_dataset(plan.cfg.dataset, data_dir)
    trainer = build_run(plan, dataset=dataset, rank=rank, local_rank=local_rank, tracer=Tracer() if trace else None,
                        resume=resume)
    if rank == 0:
        print(trainer.describe(), file=sys.stderr, flush=True)
    tracker = WandbTracker(wandb_project) if wandb_project and rank == 0 else None
    return fit(trainer, RunDirectory(run_path), standard_callbacks(trainer, progress, tracker))
