"""A run's plan: what a ``RunConfig`` resolves to, checked once.

``check_config`` is the one place that turns a config into a ``Plan``: the
method object, the placement (stages x replicas, the method's reading of K),
the stage devices, the engine, the partition request checked on a weightless
model, and the config's hash (the run directory's name). Everything after it
(``execute``, the memory estimate and guard, ``train.Run``, the engines) takes
the plan and never derives any of it again; a distributed run's ranks each
resolve their own (one process, one plan). Bad values are refused here in
one line each, before anything is loaded."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .config import MAX_SEED, WARMUPS, RunConfig, flag_name, parse_device
from .engines.registry import EngineInfo, engine_info
from .errors import UserError
from .method import Method, make_method
from .models import build_model
from .partition import Partition, make_partition
from .placement import Placement
from .runs import RunDirectory, config_hash
from .schedule import steps_until_every_stage_updates
from .stage import StageContext


@dataclass(frozen=True)
class Plan:
    """A checked run: its config and everything resolved from it, once."""

    cfg: RunConfig
    method: Method
    placement: Placement  # the method's stages x replicas for the config's K and R
    devices: tuple[torch.device, ...]  # each stage's (a per-rank engine's ranks bind their own in this type)
    engine: EngineInfo
    config_hash: str  # runs.config_hash of cfg.to_dict(): the run directory's name, carried by checkpoints

    @property
    def num_stages(self) -> int:
        return self.placement.stages

    def stage_context(self, k: int, module: nn.Module, partition: Partition, block_shapes: tuple[tuple[int, ...], ...],
                      num_classes: int, device: torch.device, amp_dtype: torch.dtype | None = None,
                      memory_format: torch.memory_format = torch.preserve_format) -> StageContext:
        """What stage ``k`` (its ``module`` cut from the model by ``partition``)
        is built from: the run's stage context (train.Run), or the memory
        estimate's CPU copy of it (memory.estimate)."""
        return StageContext(k, self.num_stages, module, device, self.cfg.sgd(), amp_dtype=amp_dtype,
                            output_shape=block_shapes[partition.ranges()[k].stop - 1],
                            blocks=partition.ranges()[k], block_shapes=block_shapes, num_classes=num_classes,
                            seed=self.cfg.seed, memory_format=memory_format)

    def directory(self, root: str) -> RunDirectory:
        """The run's directory under the results root ``root``."""
        return RunDirectory.for_config(root, self.cfg.to_dict(), self.config_hash)


def check_config(cfg: RunConfig, name: Callable[[str], str] = flag_name) -> Plan:
    """Check ``cfg`` and resolve it into its plan; refuse a bad value in one
    line before anything is loaded. ``name`` says how the user wrote each
    field (a flag by default; a table spec passes its own keys)."""
    for key in ("epochs", "batch_size"):
        if getattr(cfg, key) < 1:
            raise UserError(f"{name(key)} must be at least 1, got {getattr(cfg, key)}")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise UserError(f"{name('seed')} must be in [0, {MAX_SEED}], got {cfg.seed}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise UserError(f"{name('max_steps')} must be at least 1, got {cfg.max_steps}")
    if cfg.warmup_epochs < 0:
        raise UserError(f"{name('warmup_epochs')} must be at least 0, got {cfg.warmup_epochs}")
    if cfg.warmup_epochs and cfg.warmup_epochs >= cfg.epochs:
        raise UserError(f"{name('warmup_epochs')} {cfg.warmup_epochs} covers all {cfg.epochs} epoch(s): the run "
                        f"would never train at {name('lr')}; use fewer warm-up epochs")
    if cfg.warmup not in WARMUPS:
        raise UserError(f"{name('warmup')} must be {' or '.join(WARMUPS)}, got '{cfg.warmup}'")
    if cfg.warmup != "constant" and not cfg.warmup_epochs:
        raise UserError(f"{name('warmup')} {cfg.warmup} needs {name('warmup_epochs')} N (how long to warm up)")
    if cfg.diagnose < 0:
        raise UserError(f"{name('diagnose')} must be at least 0 (0: off), got {cfg.diagnose}")
    engine = engine_info(cfg.engine, name("engine"))
    if cfg.diagnose and not engine.diagnoses:
        raise UserError(f"{name('diagnose')} runs on the sequential engine (its true gradient is one synchronous "
                        f"pass through every stage); drop {name('engine')} {cfg.engine}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise UserError(f"{name('lr')} must be a positive finite number, got {cfg.lr}")
    if not 0 <= cfg.momentum < 1:
        raise UserError(f"{name('momentum')} must be in [0, 1), got {cfg.momentum}")
    if not (cfg.weight_decay >= 0 and math.isfinite(cfg.weight_decay)):
        raise UserError(f"{name('weight_decay')} must be a non-negative finite number, got {cfg.weight_decay}")
    if cfg.amp not in ("off", "bf16"):
        raise UserError(f"{name('amp')} must be off or bf16, got '{cfg.amp}'")
    if cfg.threads is not None and cfg.threads < 1:
        raise UserError(f"{name('threads')} must be at least 1, got {cfg.threads}")
    if cfg.split_at and cfg.partition not in ("auto", "explicit"):
        # The cut points decide the stages; the strategy would be ignored yet recorded (and hashed).
        raise UserError(f"--split-at gives the stages itself; --partition {cfg.partition} would be ignored: "
                        f"drop one of the two")
    method = make_method(cfg.method, **cfg.method_options)
    for key in ("splits", "replicas"):
        if getattr(cfg, key) < 1:
            raise UserError(f"{name(key)} must be at least 1, got {getattr(cfg, key)}")
    placement = method.placement(cfg.splits, cfg.replicas)
    problem = method.check_run(placement.stages, cfg.batch_size // placement.replicas)
    if problem:
        raise UserError(f"{cfg.method}: {problem}")
    if cfg.split_at and placement.stages != cfg.splits:  # -K counts something else (dp: replicas)
        raise UserError(f"{cfg.method} places {placement.describe()} ({name('splits')} {cfg.splits} counts its "
                        f"replicas), so there is nothing to cut: drop {name('split_at')}")
    if engine.per_rank and cfg.stage_devices:  # before stage_devices(), whose own message would mislead
        raise UserError(f"{name('stage_devices')} is for the sequential engine; distributed ranks take one device "
                        f"each")
    plan = Plan(cfg, method, placement, tuple(_stage_devices(cfg)), engine, config_hash(cfg.to_dict()))
    engine.check(plan, name)
    if cfg.batch_size % placement.replicas:
        raise UserError(f"{cfg.method} splits each batch across {placement.replicas} replicas: {name('batch_size')} "
                        f"{cfg.batch_size} must be a multiple of {placement.replicas}")
    if placement.replicas > 1 and cfg.diagnose:
        raise UserError(f"{name('diagnose')} measures one stage's gradient, and {cfg.method} here has "
                        f"{placement.replicas} replicas of each: run the diagnosis with one replica")
    # Model name, K and split points are checked on a weightless (meta) model:
    # instant even for ResNet-1202, and before any data is loaded.
    with torch.device("meta"):
        model = build_model(cfg.model)
    problem = method.check_model(model)
    if problem:
        raise UserError(f"{cfg.method}: {problem}")
    num_stages = placement.stages
    cheap = "uniform" if cfg.partition in ("time", "balanced") else cfg.partition  # measured later, on the data's device
    make_partition(model, num_stages, cheap, list(cfg.split_at) if cfg.split_at else None,
                   sample=torch.zeros(1, 3, 32, 32, device="meta"))
    if cfg.max_steps is not None:
        _check_pipeline_depth(cfg, method, num_stages, cfg.max_steps, f"{name('max_steps')} is {cfg.max_steps}")
    return plan


def as_plan(run: Plan | RunConfig) -> Plan:
    """``run`` as a plan: a plan as given, a config checked into its plan
    (for the library's entry points, which take either)."""
    return run if isinstance(run, Plan) else check_config(run)


def _check_pipeline_depth(cfg: RunConfig, method: Method, num_stages: int, total_steps: int, budget: str) -> None:
    """Refuse a run that ends before some stage has ever updated: it would
    "finish" with that stage's weights as initialised."""
    needed = steps_until_every_stage_updates(method.schedule, num_stages)
    if total_steps < needed:
        raise UserError(f"{cfg.method} with K={num_stages} updates every stage only from iteration {needed - 1} "
                        f"on, so the run needs at least {needed} iterations; {budget}")


def check_budget(plan: Plan, steps_per_epoch: int, total_steps: int) -> None:
    """The checks that need the data's iterations per epoch (once it is loaded)."""
    cfg = plan.cfg
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    if cfg.warmup_epochs and warmup_steps >= total_steps:
        raise UserError(f"--warmup-epochs {cfg.warmup_epochs} ({warmup_steps} iterations) covers all {total_steps} "
                        f"iterations of the run: it would never train at --lr; use fewer warm-up epochs")
    # (--max-steps alone was checked before the data loaded; here the epochs are short.)
    _check_pipeline_depth(cfg, plan.method, plan.num_stages, total_steps, f"--epochs {cfg.epochs} of {steps_per_epoch} "
                                                               f"iteration(s) each give {total_steps}")


def _stage_devices(cfg: RunConfig) -> list[torch.device]:
    if cfg.stage_devices:
        if len(cfg.stage_devices) != cfg.splits:
            raise UserError(f"--stage-devices lists {len(cfg.stage_devices)} devices for {cfg.splits} stages")
        return [parse_device(d) for d in cfg.stage_devices]
    return [parse_device(cfg.device)] * cfg.splits
