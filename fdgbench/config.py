"""What defines a run: ``RunConfig``, a plain value (its fields are the
numbers' inputs; a hash of them names the run directory), each field's
metadata, and the device and warm-up defaults it resolves when made. It sits
on the ground floor: the checks that refuse a bad config and resolve it into
a run's plan are plan.py's."""
from __future__ import annotations

import functools
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

import torch

from .engines.registry import engine_names
from .errors import UserError
from .optim import SGDConfig
from .partition import STRATEGIES

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

    def sgd(self) -> SGDConfig:
        """The stages' optimiser settings."""
        return SGDConfig(self.lr, self.momentum, self.weight_decay, self.nesterov)

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
