"""The method interface and registry. A method is its schedule (which batch
each stage forwards and back-propagates at iteration t, and which messages
lock) and its per-stage worker. It knows nothing of devices, processes or
files. Adding one is a file in methods/ with a class decorated @register."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from .errors import UserError
from .placement import Placement
from .schedule import IterationPlan
from .stage import StageContext, StageWorker
from .staleness import STALENESS_MODES

LOCKINGS = ("forward", "backward", "update")


@dataclass(frozen=True)
class MethodOption:
    """A method-specific option, exposed on the CLI as ``--<name>``."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], str | None] | None = None  # returns an error message or None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


# Option checks: each returns an error message, or None for a valid value.
def in_unit_interval(value: float) -> str | None:
    return None if 0.0 < value <= 1.0 else f"must be in (0, 1], got {value}"


def positive(value: float) -> str | None:
    return None if value > 0 else f"must be positive, got {value}"


def at_least_one(value: int) -> str | None:
    return None if value >= 1 else f"must be at least 1, got {value}"


BETA = MethodOption("beta", float, 1.0, "gradient shrinking factor in (0, 1]; stage k's gradient "
                    "carries beta^(K-1-k) (1 = no shrinking)", check=in_unit_interval)
STALENESS = MethodOption("staleness", str, "legacy", "what a delayed backward sees: legacy (authors' "
                         "PyTorch-1.0 behaviour), stash (weights of the forward), replay (recompute)",
                         choices=STALENESS_MODES)


class Method:
    name: ClassVar[str]
    summary: ClassVar[str]
    breaks: ClassVar[tuple[str, ...]] = ()  # which of LOCKINGS the method breaks
    options: ClassVar[tuple[MethodOption, ...]] = ()

    def __init__(self, **values: Any):
        known = {o.name: o for o in self.options}
        for name, value in values.items():
            if name not in known:
                owners = [m.name for m in all_methods() if any(o.name == name for o in m.options)]
                flag = "--" + name.replace("_", "-")
                raise UserError(f"{flag} is an option of {', '.join(owners) or 'no method'}, not {self.name}")
        for option in self.options:
            value = values.get(option.name)
            value = option.default if value is None else option.type(value)
            if option.choices and value not in option.choices:
                raise UserError(f"{option.flag} must be one of {', '.join(option.choices)}, got '{value}'")
            problem = option.check(value) if option.check else None
            if problem:
                raise UserError(f"{option.flag} {problem}")
            setattr(self, option.name, value)

    def option_values(self) -> dict[str, Any]:
        return {o.name: getattr(self, o.name) for o in self.options}

    def schedule(self, num_stages: int, t: int) -> IterationPlan:
        raise NotImplementedError

    def replays_forward(self) -> bool:
        """Whether a delayed backward first recomputes the stage's forward
        (the timeline simulator charges it); true for --staleness replay."""
        return getattr(self, "staleness", None) == "replay"

    def make_worker(self, ctx: StageContext) -> StageWorker:
        raise NotImplementedError

    def placement(self, splits: int, replicas: int) -> Placement:
        """Where ``-K splits --replicas R`` puts the workers: K stages of R
        replicas each (placement.py). A method whose K counts something else
        (dp: K replicas of the whole model) says so here."""
        return Placement(splits, replicas)


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    unknown = set(cls.breaks) - set(LOCKINGS)
    if unknown:
        raise ValueError(f"{cls.name}: unknown lockings {unknown}")
    _REGISTRY[cls.name] = cls
    return cls


def all_methods() -> list[type[Method]]:
    importlib.import_module("methods")  # each module there registers itself
    return list(_REGISTRY.values())


def make_method(name: str, **options: Any) -> Method:
    methods = {m.name: m for m in all_methods()}
    if name not in methods:
        raise UserError(f"unknown method '{name}'; known: {', '.join(methods)}")
    return methods[name](**options)


def all_options() -> dict[str, MethodOption]:
    """Every registered method's options, by name (shared ones listed once;
    their definitions per method: ``option_definitions``)."""
    out: dict[str, MethodOption] = {}
    for method in all_methods():
        for option in method.options:
            out.setdefault(option.name, option)
    return out


def option_definitions(name: str) -> dict[MethodOption, list[str]]:
    """Each distinct definition of the option ``name`` and the methods that
    use it: two methods may share a flag (``--staleness``) with their own
    choices, default and help, and each method checks its own."""
    out: dict[MethodOption, list[str]] = {}
    for method in all_methods():
        for option in method.options:
            if option.name == name:
                out.setdefault(option, []).append(method.name)
    return out
