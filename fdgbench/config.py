"""What defines a run: ``RunConfig`` (its fields are the numbers' inputs; a
hash of them names the run directory) and the checks that refuse a bad one in
one line before anything is loaded."""
from __future__ import annotations

import functools
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

import torch

from .engines.registry import engine_info, engine_names
from .errors import UserError
from .method import Method, all_options, make_method
from .models import build_model
from .optim import SGDConfig
from .partition import STRATEGIES, make_partition
from .placement import Placement
from .schedule import steps_until_every_stage_updates

# Seeds are 32-bit: numpy's generator takes no more, and a stage seeds its own
# modules' init with seed * 1009 + k + 1 (stage.py), which must stay in int64.
MAX_SEED = 2**32 - 1
TUPLE_FIELDS = ("split_at", "stage_devices")
# The command line's default device and warm-up: resolved when a RunConfig is made (resolve_device,
# resolve_warmup), so a config, its config.json and its hash name what the run does, never "auto".
AUTO = "auto"
# The full presets' warm-up length (paper_tables/*.toml: warmup_epochs = 5, warmup = "linear"; why: stability.md).
FULL_WARMUP_EPOCHS = 5


def comma_list(text: str | None) -> tuple[str, ...] | None:
    """``"a, b"`` -> ``("a", "b")``; None for nothing given (how the command line writes a list)."""
    return tuple(s.strip() for s in text.split(",") if s.strip()) or None if text else None


def run_field(default: Any = None, *, help: str = "", spec: bool = False, added_later: bool = False,
              cli_default: Any = None, aliases: tuple[str, ...] = (), negatable: bool = False, auto: bool = False,
              choices: Callable[[], tuple[str, ...]] | None = None, check_choices: bool = True,
              envvar: str | None = None, metavar: str | None = None,
              default_factory: Callable[[], Any] | None = None) -> Any:
    """A RunConfig field and what every place that names run fields needs to
    know of it, stated once (the command line's options, the keys a table
    spec may set and the hash's "added later" defaults are made from these):

    - ``help``: its command-line help; ``aliases``: more flags for it (``-K``);
    - ``spec``: a table spec's preset or column may set it (report/specs.py);
    - ``added_later``: added after runs were recorded, so left out of
      config.json and the hash at its default (every earlier run keeps its
      directory's name);
    - ``cli_default``: the command line's default where it is not the
      field's (``auto``, resolved when the config is made); ``auto``: the
      option also takes the word auto; ``choices``: the values the option
      takes (a function: registries fill later), refused by the command line
      itself unless ``check_choices`` is false (then check_config's one line
      does, and the help lists them); ``negatable``: a
      ``--x/--no-x`` switch; ``envvar``: the environment variable that sets
      the option; ``metavar``: how the help names its value."""
    metadata = {"help": help, "spec": spec, "added_later": added_later, "cli_default": cli_default,
                "aliases": aliases, "negatable": negatable, "auto": auto, "choices": choices,
                "check_choices": check_choices, "envvar": envvar, "metavar": metavar}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _warmups() -> tuple[str, ...]:
    return (AUTO, *WARMUPS)


def _strategies() -> tuple[str, ...]:
    return STRATEGIES


DEVICE_ENV = "FDGBENCH_DEVICE"  # `make test` sets it to cpu, `make reproduce-*` to DEVICE (cli/options.py)
WARMUPS = ("constant", "linear")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run's numbers; its hash names the run directory.
    Each field's metadata (run_field) says how the command line, the table
    specs and the hash treat it."""

    method: str = "fdg"
    method_options: dict[str, Any] = field(default_factory=dict)
    model: str = run_field("resnet56", help="see `fdgbench list models`")
    splits: int = run_field(2, help="number of stages K", aliases=("-K",))
    # each stage's data-parallel replicas (placement.py); the run has splits x replicas workers
    replicas: int = run_field(1, added_later=True, aliases=("-R",),
                              help="data-parallel replicas of every stage (K x R workers; each replica trains 1/R of "
                                   "every batch, gradients averaged at each update; dp: 1 stage x K R replicas)")
    partition: str = run_field("auto", help="auto = the paper's split if known, else FLOPs-balanced",
                               choices=_strategies, check_choices=False)
    split_at: tuple[str, ...] | None = run_field(
        None, help="explicit cut points: first blocks of stages 1..K-1, e.g. L2.4 or 19")
    dataset: str = run_field("cifar10", help="see `fdgbench list datasets`")
    epochs: int = run_field(300, spec=True, help="lr / 10 at 50%, 75% and 91.7% of the epochs (150/225/275 of 300)")
    max_steps: int | None = run_field(None, spec=True, help="stop after this many iterations (smoke runs)")
    train_subset: int | None = run_field(None, spec=True, help="train on this many images (fixed subset)")
    test_subset: int | None = run_field(None, spec=True, help="evaluate on this many test images (fixed subset)")
    batch_size: int = run_field(128, spec=True)
    # The optimiser's defaults are SGDConfig's (the paper's protocol), stated once there.
    lr: float = run_field(SGDConfig.lr)
    momentum: float = run_field(SGDConfig.momentum)
    weight_decay: float = run_field(SGDConfig.weight_decay)
    nesterov: bool = run_field(SGDConfig.nesterov, negatable=True)
    seed: int = run_field(0)
    device: str = run_field("cpu", spec=True, cli_default=AUTO, envvar=DEVICE_ENV,
                            help="auto (CUDA where available, else the CPU; config.json records which), cpu, cuda or "
                                 "cuda:N")
    stage_devices: tuple[str, ...] | None = run_field(
        None, help="one device per stage, comma-separated (sequential engine)")
    amp: str = run_field("off", spec=True, help="off or bf16 (autocast, fp32 weights)")
    channels_last: bool = run_field(False, spec=True, help="NHWC memory format (faster convs on GPUs)")
    threads: int | None = run_field(None, spec=True, aliases=("--threads-per-stage",),
                                    help="torch intra-op threads of each process (each rank on the distributed "
                                         "engine; default there: this machine's cores / K)")
    engine: str = run_field("sequential", spec=True, choices=engine_names,
                            help="sequential: every stage in this process; distributed: one torch.distributed rank "
                                 "per stage (under torchrun, or spawned here); pipelining: gpipe / 1f1b through "
                                 "torch.distributed.pipelining's own schedules, one rank per stage")
    # The first N epochs warm up (the FDG authors' code's --warm-up: 3, constant); None: auto (resolve_warmup).
    # The default here stays 0: table specs build on RunConfig's defaults and set their warm-up themselves.
    warmup_epochs: int | None = run_field(
        0, spec=True, added_later=True, cli_default=AUTO, auto=True,
        help=f"warm up over the first N epochs, then train at --lr; auto: min({FULL_WARMUP_EPOCHS}, epochs // 10) for "
             f"every method, BP included (the full presets' protocol: 300 epochs warm up 5, 20 epochs 2, runs under "
             f"10 epochs such as the compare demo and runs cut by --max-steps none); 0: no warm-up (the paper states "
             f"none; the FDG authors' code has an opt-in 3-epoch one)")
    # constant: lr / 10 throughout; linear: 1% of lr rising to 100% (the ADL code's); auto: resolve_warmup.
    warmup: str = run_field("constant", spec=True, added_later=True, cli_default=AUTO, choices=_warmups,
                            help="auto: linear where there is a warm-up; linear: 1% of lr rising to 100% (the ADL "
                                 "code's, the full presets'); constant: lr/10 throughout the warm-up (the FDG "
                                 "authors' code)")
    diagnose: int = run_field(0, spec=True, added_later=True, metavar="N",
                              help="every N iterations, record per stage the cosine and norm ratio of the applied "
                                   "gradient to the true gradient of the same batches at the current weights, and the "
                                   "weights' age (sequential engine; 0: off)")
    # Bit-reproducible numerics where a faster kernel or reduction would not be
    # (numerics.py): cuDNN deterministic, no TF32, replicas' gradients summed in order (placement.py).
    deterministic: bool = run_field(False, added_later=True,
                                    help="bit-reproducible numerics: cuDNN deterministic, no TF32, data-parallel "
                                         "gradients summed in rank order (for parity and resume checks on GPUs; "
                                         "slower)")

    def __post_init__(self) -> None:
        # "auto" is what the command line passes when a flag is not given; what it resolves to here depends on
        # this machine (device) and on the budget (warm-up), so it is settled once, before anything hashes it.
        warmup_epochs, warmup = resolve_warmup(self.epochs, self.max_steps, self.warmup_epochs, self.warmup)
        object.__setattr__(self, "warmup_epochs", warmup_epochs)
        object.__setattr__(self, "warmup", warmup)
        object.__setattr__(self, "device", resolve_device(self.device))
        if self.stage_devices and AUTO in self.stage_devices:
            object.__setattr__(self, "stage_devices", tuple(map(resolve_device, self.stage_devices)))

    @classmethod
    def from_options(cls, method: str, options: dict[str, Any]) -> RunConfig:
        """The config that command-line ``options`` (named as the fields; other
        keys such as ``out`` are not a config's business) and ``method`` give:
        a method's options are the keys some method declares (given ones only),
        and a tuple field may come as comma-separated text."""
        method_options = {name: options[name] for name in all_options() if options.get(name) is not None}
        values = {}
        for f in fields(cls):
            if f.name in ("method", "method_options") or f.name not in options:
                continue
            value = options[f.name]
            if f.name in TUPLE_FIELDS and isinstance(value, str):
                value = comma_list(value)
            values[f.name] = value
        return cls(method=method, method_options=method_options, **values)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in TUPLE_FIELDS:
            d[key] = list(d[key]) if d[key] is not None else None
        # Fields added after runs were recorded are left out at their defaults,
        # so the config (and the run directory's hash-based name) of every
        # earlier run is unchanged.
        for key, default in ADDED_LATER.items():
            if d[key] == default:
                del d[key]
        return d


@functools.cache
def field_kind(name: str) -> type:
    """The kind of value a RunConfig field takes, as a command line or a spec
    writes it: bool, int, float or str (a tuple field is comma-separated text;
    ``int | None`` is int)."""
    hint = typing.get_type_hints(RunConfig)[name]
    kinds = [a for a in (typing.get_args(hint) or (hint,)) if a is not type(None)]
    kind = typing.get_origin(kinds[0]) or kinds[0]
    return str if kind is tuple else kind


def spec_fields() -> tuple[str, ...]:
    """The RunConfig fields a table spec's preset or column may set (run_field's spec)."""
    return tuple(f.name for f in fields(RunConfig) if f.metadata.get("spec"))


# Left out of config.json and the hash at their defaults (run_field's added_later).
ADDED_LATER = {f.name: f.default for f in fields(RunConfig) if f.metadata.get("added_later")}
# Fields whose command-line default (auto) is not RunConfig's default: a command line that rebuilds a
# config (sweep.config_args) spells them out even where they equal RunConfig's default.
RESOLVED_FIELDS = tuple(f.name for f in fields(RunConfig) if f.metadata.get("cli_default") is not None)


def resolve_device(text: str) -> str:
    """``auto``: CUDA where this machine has it, else the CPU; any other name as given (parse_device checks it)."""
    if text != AUTO:
        return text
    return "cuda" if torch.cuda.is_available() else "cpu"


def auto_warmup_epochs(epochs: int, max_steps: int | None) -> int:
    """The default warm-up length: the full presets' 5 epochs, cut to a tenth of a shorter run (300 epochs: 5,
    20: 2, under 10 such as the 4-epoch demo: none). A run cut short by --max-steps (a smoke run, or the first
    iterations of a protocol) gets none: a warm-up it did not ask for could cover all of it."""
    return 0 if max_steps else max(0, min(FULL_WARMUP_EPOCHS, epochs // 10))


def resolve_warmup(epochs: int, max_steps: int | None, warmup_epochs: int | None, warmup: str) -> tuple[int, str]:
    """(epochs, kind) of a run's warm-up: None epochs are auto_warmup_epochs; an auto kind is linear (the
    full presets' ramp) where there is a warm-up and constant where there is none, the value every run
    without a warm-up has recorded (ADDED_LATER leaves it out of the hash)."""
    epochs_n = auto_warmup_epochs(epochs, max_steps) if warmup_epochs is None else warmup_epochs
    if warmup == AUTO:
        warmup = "linear" if epochs_n else "constant"
    return epochs_n, warmup


def flag_name(field_name: str) -> str:
    """How the command line spells a RunConfig field (``max_steps`` -> ``--max-steps``)."""
    return "--" + field_name.replace("_", "-")


def check_config(cfg: RunConfig, name: Callable[[str], str] = flag_name) -> None:
    """Reject bad values before anything is loaded. ``name`` says how the user
    wrote each field (a flag by default; a table spec passes its own keys)."""
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
    devices = stage_devices(cfg)
    engine.check(cfg, placement, devices, name)
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
    num_stages = placement.stages
    cheap = "uniform" if cfg.partition in ("time", "balanced") else cfg.partition  # measured later, on the data's device
    make_partition(model, num_stages, cheap, list(cfg.split_at) if cfg.split_at else None,
                   sample=torch.zeros(1, 3, 32, 32, device="meta"))
    if cfg.max_steps is not None:
        check_pipeline_depth(cfg, method, num_stages, cfg.max_steps, f"{name('max_steps')} is {cfg.max_steps}")


def check_pipeline_depth(cfg: RunConfig, method: Method, num_stages: int, total_steps: int, budget: str) -> None:
    """Refuse a run that ends before some stage has ever updated: it would
    "finish" with that stage's weights as initialised."""
    needed = steps_until_every_stage_updates(method.schedule, num_stages)
    if total_steps < needed:
        raise UserError(f"{cfg.method} with K={num_stages} updates every stage only from iteration {needed - 1} "
                        f"on, so the run needs at least {needed} iterations; {budget}")


def check_budget(cfg: RunConfig, method: Method, num_stages: int, steps_per_epoch: int, total_steps: int) -> None:
    """The checks that need the data's iterations per epoch (once it is loaded)."""
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    if cfg.warmup_epochs and warmup_steps >= total_steps:
        raise UserError(f"--warmup-epochs {cfg.warmup_epochs} ({warmup_steps} iterations) covers all {total_steps} "
                        f"iterations of the run: it would never train at --lr; use fewer warm-up epochs")
    # (--max-steps alone was checked before the data loaded; here the epochs are short.)
    check_pipeline_depth(cfg, method, num_stages, total_steps, f"--epochs {cfg.epochs} of {steps_per_epoch} "
                                                               f"iteration(s) each give {total_steps}")


def parse_device(text: str) -> torch.device:
    text = resolve_device(text)
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UserError(f"unknown device '{text}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {text} requested but CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {text} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise UserError(f"unsupported device '{text}'; use auto, cpu, cuda or cuda:N")
    return device


def device_available(text: str) -> bool:
    """Whether this machine has the device (parse_device accepts it)."""
    try:
        parse_device(text)
    except UserError:
        return False
    return True


def placement_of(cfg: RunConfig) -> Placement:
    """The run's stages x replicas (its method decides what K counts)."""
    return make_method(cfg.method, **cfg.method_options).placement(cfg.splits, cfg.replicas)


def stage_devices(cfg: RunConfig) -> list[torch.device]:
    if cfg.stage_devices:
        if len(cfg.stage_devices) != cfg.splits:
            raise UserError(f"--stage-devices lists {len(cfg.stage_devices)} devices for {cfg.splits} stages")
        return [parse_device(d) for d in cfg.stage_devices]
    return [parse_device(cfg.device)] * cfg.splits

