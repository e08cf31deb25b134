"""Engines by name. An engine executes a method's schedule on a run's stages
(sequential.py: every stage in this process; distributed.py: one process
per rank). Everything above the engines (config checks, the memory guard,
``execute``, the trainer, the command line) asks this registry what it
needs to know of one: whether it runs one process per rank, what it checks
in a config, and how a run builds it. Adding an engine is one module that
calls ``register_engine`` and one line in ``_BUILT_IN``."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import UserError

# The modules that register the built-in engines, in the order `--help` lists them.
_BUILT_IN = ("fdgbench.engines.sequential", "fdgbench.engines.distributed", "fdgbench.engines.pipelining")


@dataclass(frozen=True)
class EngineInfo:
    name: str
    description: str
    # True: one process per rank (started by torchrun or spawned here), each building only its own stage;
    # False: every stage (and replica) in this one process.
    per_rank: bool
    # The engine of a run being built (train.Run, with its workers, stream and placement made).
    build: Callable[[Any], Any]
    # What the engine refuses in a run's plan (plan.Plan: its config, method, placement and stage devices, as
    # check_config resolved them) in one line (a UserError), naming each field as the user wrote it (``name``).
    check: Callable[[Any, Callable[[str], str]], None] = lambda plan, name: None
    # How a run's description (its first line on stderr) names the engine, its processes and threads.
    describe: Callable[[Any], str] = lambda run: f"{run.cfg.engine} engine"
    # Whether --diagnose can run on it (its true gradient is one synchronous pass through every stage).
    diagnoses: bool = False
    # Whether it runs the stages' actions itself, so --trace can time them and the memory probes see what each
    # stage keeps (an engine that hands the stages to a library does neither).
    observes_actions: bool = True


_ENGINES: dict[str, EngineInfo] = {}


def register_engine(info: EngineInfo) -> EngineInfo:
    if info.name in _ENGINES:
        raise ValueError(f"engine {info.name!r} registered twice")
    _ENGINES[info.name] = info
    return info


def _load() -> dict[str, EngineInfo]:
    for module in _BUILT_IN:
        importlib.import_module(module)
    return _ENGINES


def engine_names() -> tuple[str, ...]:
    return tuple(_load())


def engine_info(name: str, flag: str = "--engine") -> EngineInfo:
    engines = _load()
    if name not in engines:
        raise UserError(f"unknown engine '{name}' ({flag}); known: {', '.join(engines)}")
    return engines[name]
