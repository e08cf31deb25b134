"""The method interface and registry. A method is its schedule (which batch
each stage forwards and back-propagates at iteration t, and which messages
lock) and its per-stage worker. It knows nothing of devices, processes or
files. Adding one is a file in methods/ with a class decorated @register, or
a plug-in outside the repository: an entry point in the group
``fdgbench.methods``, or a module or .py file named by ``--plugin`` /
FDGBENCH_PLUGINS (docs/layout.md, "Adding a method")."""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import types
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator

from .config import RunConfig
from .errors import UserError
from .placement import Placement
from .schedule import IterationPlan, update_delays
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
    # Added to its methods after runs were recorded: at its default it is left out of option_values (so of
    # every run's summary, metrics lines, description and compare label), as RunConfig's added_later fields
    # are left out of config.json: an earlier run's records read the same.
    added_later: bool = False
    # Whether its value changes the time an iteration takes; a speed measured at one value of an option that
    # does not (a scale, a weight of a loss term) counts for every value (report.results.Speeds.per_iteration).
    affects_time: bool = True

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
                    "carries beta^(K-1-k) (1 = no shrinking)", check=in_unit_interval, affects_time=False)
STALENESS = MethodOption("staleness", str, "legacy", "what a delayed backward sees: legacy (authors' "
                         "PyTorch-1.0 behaviour), stash (weights of the forward), replay (recompute)",
                         choices=STALENESS_MODES)
PREDICT = MethodOption("predict", str, "none", "weight prediction: none, or spectrain (a stage's forward runs at "
                       "W - lr * s * v: v its SGD momentum buffer, s its delay in updates; what the delayed "
                       "backward sees follows --staleness)", choices=("none", "spectrain"), added_later=True)


def prediction_delay(method: Any, ctx: StageContext) -> float:
    """The s of stage ``ctx.index``'s weight prediction (a method with the
    PREDICT option): its delay in updates, the number of updates it makes
    between a batch's forward and the update applying that batch's gradient
    (schedule.update_delays), under --predict spectrain; 0 (none) otherwise."""
    if method.predict == "none":
        return 0.0
    return update_delays(method.schedule, ctx.num_stages)[ctx.index]


class Method:
    name: ClassVar[str]
    summary: ClassVar[str]
    # Where `fdgbench list methods` (and every listing of all methods) puts it: ascending, ties in
    # registration order. The built-ins use 10..80, so a new Method subclass comes after them; a
    # subclass of a method inherits its order and so lists after it (cdni after dni).
    order: ClassVar[int] = 100
    breaks: ClassVar[tuple[str, ...]] = ()  # which of LOCKINGS the method breaks
    options: ClassVar[tuple[MethodOption, ...]] = ()
    # Why a method runs one replica per stage, if it does (its stages keep per-worker state that replicas'
    # averaged gradients would not keep equal); None: --replicas R works.
    single_replica: ClassVar[str | None] = None
    # How many tensors of the activation's shape a BACKWARD's message carries, joined along the batch
    # dimension: 1, the gradient; PETRA's 2, the gradient and the activation as the sender rebuilt it. The
    # distributed engine sizes its receive buffers by it, the memory estimate its probe's messages, the
    # timeline simulator the messages' bytes.
    gradient_parts: ClassVar[int] = 1
    # Whether a delayed backward first inverts the stage's reversible blocks (PETRA): the simulator charges it.
    inverts_reversible_blocks: ClassVar[bool] = False

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
        """The method's options as a run records them (added-later ones only where set off their default)."""
        return {o.name: getattr(self, o.name) for o in self.options
                if not (o.added_later and getattr(self, o.name) == o.default)}

    def schedule(self, num_stages: int, t: int) -> IterationPlan:
        raise NotImplementedError

    def replays_forward(self) -> bool:
        """Whether a delayed backward first recomputes the stage's forward
        (the timeline simulator charges it); true for --staleness replay."""
        return getattr(self, "staleness", None) == "replay"

    def make_worker(self, ctx: StageContext) -> StageWorker:
        raise NotImplementedError

    def check_run(self, num_stages: int, batch_size: int) -> str | None:
        """What is wrong with running this method's options on ``num_stages``
        stages and batches of ``batch_size`` per replica (an option naming a
        stage that does not exist, micro-batches that do not divide the
        batch), or None."""
        return None

    def check_model(self, model: Any) -> str | None:
        """What is wrong with training ``model`` (a BlockModel, possibly
        weightless on the meta device) with this method (PETRA needs
        reversible blocks), or None."""
        return None

    def data_batch(self, batch: int) -> int:
        """The training batch behind a batch id of the schedule: the same id,
        unless the method's ids name something else (dgl-async's name the
        iteration and stage of a forward)."""
        return batch

    @classmethod
    def renames_batches(cls) -> bool:
        return cls.data_batch is not Method.data_batch

    def placement(self, splits: int, replicas: int) -> Placement:
        """Where ``-K splits --replicas R`` puts the workers: K stages of R
        replicas each (placement.py). A method whose K counts something else
        (dp: K replicas of the whole model) says so here."""
        if replicas > 1 and self.single_replica:
            raise UserError(f"{self.name} runs one replica per stage ({self.single_replica}); use --replicas 1")
        return Placement(splits, replicas)


# Every registered class, in registration order (all_methods sorts and checks them).
_REGISTRY: list[type[Method]] = []
PLUGINS_ENV = "FDGBENCH_PLUGINS"
ENTRY_POINT_GROUP = "fdgbench.methods"
_LOADED_PLUGINS: set[str] = set()  # FDGBENCH_PLUGINS entries imported by this process
_entry_points_loaded = False


class MethodDefinitionError(UserError):
    """Registered methods that cannot share the command line (a clash of
    names or option types). A method registers itself while its module is
    imported, where no error reaches the CLI's one-line report, so this is
    raised by the first use of the registry (all_methods) instead."""


class PluginError(UserError):
    """A plug-in that cannot be loaded: a missing file, or an import that failed."""


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` a method (checked at the first all_methods()).
    Registering a class twice (a decorated class also named by an entry point) keeps it once."""
    if cls not in _REGISTRY:
        _REGISTRY.append(cls)
    return cls


def all_methods() -> list[type[Method]]:
    """Every method: methods/, entry points, FDGBENCH_PLUGINS, in ``order``."""
    _load_methods()
    # Checked in registration order, so a clash names the method registered first (a built-in) first.
    _check_classes(_REGISTRY)
    _check_options(_REGISTRY)
    return sorted(_REGISTRY, key=lambda m: m.order)  # stable: ties keep registration order


def _check_classes(methods: list[type[Method]]) -> None:
    """Each method has a name of its own and breaks only known lockings."""
    seen: dict[str, type[Method]] = {}
    for method in methods:
        name = getattr(method, "name", None)
        if not isinstance(name, str) or not name:
            raise MethodDefinitionError(f"method class {method.__module__}.{method.__qualname__} has no name")
        if name in seen:
            first = seen[name]
            raise MethodDefinitionError(f"two methods are named '{name}': {first.__module__}.{first.__qualname__} "
                                        f"and {method.__module__}.{method.__qualname__}")
        seen[name] = method
        unknown = sorted(set(method.breaks) - set(LOCKINGS))
        if unknown:
            raise MethodDefinitionError(f"method '{name}' breaks unknown lockings {', '.join(unknown)} "
                                        f"(known: {', '.join(LOCKINGS)})")


def _check_options(methods: list[type[Method]]) -> None:
    """Every method's options become flags of ``fdgbench run`` and keys of a
    config (cli.options.run_config reads them from the same dict as the run's
    own fields): a name must not be a run option's, and methods that share a
    name share one flag, which parses one type."""
    run_options = _run_option_names()
    first: dict[str, tuple[str, MethodOption]] = {}
    for method in methods:
        for option in method.options:
            if option.name in run_options:
                raise MethodDefinitionError(f"method '{method.name}' defines {option.flag}, which is a run option")
            owner, definition = first.setdefault(option.name, (method.name, option))
            if definition.type is not option.type:
                raise MethodDefinitionError(f"methods {owner} and {method.name} define {option.flag} with different "
                                            f"types ({definition.type.__name__}, {option.type.__name__})")


@functools.cache
def _run_option_names() -> frozenset[str]:
    return frozenset(f.name for f in fields(RunConfig))


def _load_methods() -> None:
    """Import every source of methods not imported yet; each registers its own."""
    importlib.import_module("methods")  # the package imports each of its modules
    _load_entry_points()
    for spec in _plugin_specs():
        _load_plugin(spec)


def _load_entry_points() -> None:
    """Once per process: each entry point of the group names a module (its
    classes register themselves) or a Method class (registered here)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        label = f"entry point '{entry.name} = {entry.value}' ({ENTRY_POINT_GROUP})"
        with _importing(label):
            loaded = entry.load()
        if isinstance(loaded, type) and issubclass(loaded, Method):
            register(loaded)
        elif not isinstance(loaded, types.ModuleType):
            raise PluginError(f"{label} names neither a module nor a Method class")
    _entry_points_loaded = True


def add_plugins(specs: Iterable[str]) -> None:
    """Load each plug-in (a dotted module name, or a path to a .py file) now,
    and name it in FDGBENCH_PLUGINS: the processes this one starts (spawned
    ranks, a sweep's subprocesses) import fdgbench afresh and load it from there."""
    named = _plugin_specs()
    for spec in specs:
        spec = os.path.abspath(spec) if _names_file(spec) else spec  # a child may start elsewhere
        if spec not in named:
            named.append(spec)
    os.environ[PLUGINS_ENV] = os.pathsep.join(named)
    all_methods()  # a bad plug-in is reported before the command starts


def _plugin_specs() -> list[str]:
    return [s for s in os.environ.get(PLUGINS_ENV, "").split(os.pathsep) if s]


def _names_file(spec: str) -> bool:
    return spec.endswith(".py") or os.sep in spec or "/" in spec


def _load_plugin(spec: str) -> None:
    key = os.path.abspath(spec) if _names_file(spec) else spec  # one file named two ways is loaded once
    if key in _LOADED_PLUGINS:
        return
    with _importing(f"plugin {spec}"):
        if _names_file(spec):
            _import_file(spec)
        else:
            importlib.import_module(spec)
    _LOADED_PLUGINS.add(key)


def _import_file(path: str) -> None:
    if not os.path.isfile(path):
        raise PluginError(f"plugin {path}: no such file")
    # A name of its own: a plug-in file named like a module (json.py) must not replace it.
    name = f"fdgbench_plugin_{Path(path).stem}"
    loaded = sys.modules.get(name)
    if loaded is not None and os.path.abspath(loaded.__file__ or "") != os.path.abspath(path):
        raise PluginError(f"plugin {path}: a plug-in file of the same name is loaded from {loaded.__file__}")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import does: dataclasses, pickle and inspect find the module by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


@contextlib.contextmanager
def _importing(label: str) -> Iterator[None]:
    """One plug-in's import, all or nothing: a failure is one error line
    naming the plug-in and leaves none of its methods registered (the next
    lookup reports the same failure, not a half-registered plug-in)."""
    registered = len(_REGISTRY)
    try:
        yield
    except Exception as exc:
        del _REGISTRY[registered:]
        if isinstance(exc, UserError):  # already a line that says what is wrong
            raise
        message = str(exc).strip().splitlines()
        detail = f": {message[0]}" if message else ""
        raise PluginError(f"{label} failed to import: {type(exc).__name__}{detail}") from exc


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
