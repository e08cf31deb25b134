"""Options shared by several commands: a run's config (RunConfig's fields and every method's options), a sweep's table and preset, and the parsing of comma-separated lists."""
from __future__ import annotations

import os
import re
from dataclasses import fields
from typing import Any, Callable

import click

from ..config import AUTO, DEVICE_ENV, TUPLE_FIELDS, RunConfig, comma_list, field_kind, flag_name
from ..engines.launch import under_torchrun
from ..errors import UserError
from ..method import all_methods, all_options, make_method, option_definitions

DEFAULT_DATA_DIR = "data"
DEFAULT_RESULTS = "results"



class IntOrAuto(click.ParamType):
    """An integer, or ``auto`` (None: RunConfig resolves it, knowing the rest of the run)."""

    name = "integer|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | None:
        if value is None or value == AUTO:
            return None
        if isinstance(value, int):
            return value
        try:
            return int(value)
        except ValueError:
            self.fail(f"'{value}' is not a valid integer or auto", param, ctx)


DEVICE_HELP = RunConfig.__dataclass_fields__["device"].metadata["help"]
# DEVICE_ENV is the default of every --device that says where runs train or which runs to read (run, compare,
# sweep, sweep status, table; plots, which have no --device, read it through sweep_cells): `make test` sets it to
# cpu, so the suite trains where its expectations were written on any machine, and `make reproduce-*` to DEVICE.


def default_device() -> str:
    """The device a command uses when no --device is given: FDGBENCH_DEVICE, else auto."""
    return os.environ.get(DEVICE_ENV) or AUTO

# Not a RunConfig field: it changes whether a run starts, not its numbers (nor its directory's name).
IGNORE_MEMORY_CHECK = click.option(
    "--ignore-memory-check", is_flag=True,
    help="start even if the estimated per-stage memory exceeds what the device has free (--force does not)")


def field_option(name: str) -> Callable:
    """The command-line option of the RunConfig field ``name``, made from its
    metadata (config.run_field): flag, aliases, type, default, help."""
    f = RunConfig.__dataclass_fields__[name]
    meta, kind, flag = f.metadata, field_kind(name), flag_name(name)
    decls: list[str] = [flag, *meta["aliases"]]
    kwargs: dict[str, Any] = {"help": meta["help"] or None}
    if kind is bool and meta["negatable"]:
        decls = [f"{flag}/--no-{flag[2:]}"]
        kwargs.update(default=f.default, show_default=True)
    elif kind is bool:
        kwargs["is_flag"] = True
    else:
        default = f.default if meta["cli_default"] is None else meta["cli_default"]
        kwargs.update(default=default, show_default=default is not None, type=kind)
        if meta["auto"]:
            kwargs["type"] = IntOrAuto()
        elif meta["choices"] and meta["check_choices"]:
            kwargs["type"] = click.Choice(meta["choices"]())
        elif meta["choices"]:  # listed in the help; check_config refuses the rest in one line
            kwargs["help"] = f"{'|'.join(meta['choices']())}; {meta['help']}"
        if meta["envvar"]:
            kwargs.update(envvar=meta["envvar"], show_envvar=True)
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
    return click.option(*decls, name, **kwargs)


def run_config(method: str, options: dict[str, Any]) -> RunConfig:
    """The config that command-line ``options`` (named as the fields; other
    keys such as ``out`` are not a config's business) and ``method`` give:
    a method's options are the keys some method declares (given ones only),
    and a tuple field may come as comma-separated text."""
    method_options = {name: options[name] for name in all_options() if options.get(name) is not None}
    values = {}
    for f in fields(RunConfig):
        if f.name in ("method", "method_options") or f.name not in options:
            continue
        value = options[f.name]
        if f.name in TUPLE_FIELDS and isinstance(value, str):
            value = comma_list(value)
        values[f.name] = value
    return RunConfig(method=method, method_options=method_options, **values)


# Shared by `run`/`compare` (a RunConfig field) and `bench simulate`.
REPLICAS = field_option("replicas")


def run_options(f: Callable) -> Callable:
    """Options shared by ``run`` and ``compare``: every RunConfig field but the
    method and its options (made from the fields' metadata), and how the run
    is kept and shown."""
    options = [field_option(f_.name) for f_ in fields(RunConfig) if f_.name not in ("method", "method_options")]
    options += [
        click.option("--data-dir", default=DEFAULT_DATA_DIR, show_default=True, envvar="FDGBENCH_DATA_DIR",
                     help="torchvision downloads and decoded-image caches"),
        click.option("--trace", is_flag=True, help="record every action's start and end per stage into trace.json "
                     "(Chrome/Perfetto format; `fdgbench plot gantt RUN_DIR` draws it)"),
        click.option("--out", default=DEFAULT_RESULTS, show_default=True, help="results root directory"),
        click.option("--wandb", "use_wandb", is_flag=True,
                     help="also log config and per-epoch metrics to Weights & Biases (honours WANDB_MODE)"),
        click.option("--wandb-project", default="fdgbench", show_default=True),
        click.option("--force", is_flag=True, help="start over even if the run directory is done or has a "
                     "checkpoint (an unfinished run otherwise resumes from its last epoch's checkpoint)"),
        click.option("--progress/--no-progress", default=None, help="progress bar (default: on a terminal)"),
        IGNORE_MEMORY_CHECK,
    ]
    for option in reversed(options):
        f = option(f)
    return f


def training_options(f: Callable) -> Callable:
    """``run_options`` and every method's flags, made now, for a command
    defined outside this CLI (tests, extensions). This CLI's own commands make
    their method flags when they parse (MethodOptionsCommand), after --plugin."""
    for decls, kwargs in reversed(_method_option_specs()):
        f = click.option(*decls, **kwargs)(f)
    return run_options(f)


class MethodOptionsCommand(click.Command):
    """A command that also takes every registered method's flags, after its
    own. They are made when it parses or prints its help, not when it is
    defined (at import): by then the methods of --plugin, FDGBENCH_PLUGINS
    and entry points are registered, and a plug-in whose definitions clash
    is one ``error:`` line rather than a traceback while the CLI loads."""

    _made: tuple[tuple[type, ...], list[click.Parameter]] | None = None  # (the registry, its flags)

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)  # the command's own, then --help
        own = len(self.params)
        return [*params[:own], *self._method_flags(ctx), *params[own:]]

    def _method_flags(self, ctx: click.Context) -> list[click.Parameter]:
        # Made once per registry: click matches a parse's parameters by identity across get_params calls.
        methods = tuple(all_methods())
        if self._made is None or self._made[0] != methods:
            flags = [click.Option(decls, **kwargs) for decls, kwargs in _method_option_specs()]
            _check_not_taken(self.params, flags, ctx.command_path)
            self._made = methods, flags
        return self._made[1]


def _check_not_taken(own: list[click.Parameter], flags: list[click.Parameter], command: str) -> None:
    """A method's flag named like one of the command's own (``--out``,
    ``--iterations``) would silently take its value (run options proper are
    refused by the registry itself: method.py)."""
    taken = {name for p in own for name in (p.name, *p.opts, *p.secondary_opts)}
    for flag in flags:
        if any(name in taken for name in (flag.name, *flag.opts)):
            owner = next(iter(option_definitions(flag.name).values()))[0]
            raise UserError(f"method '{owner}' defines {flag.opts[0]}, which is an option of {command}")


def _method_option_specs() -> list[tuple[list[str], dict[str, Any]]]:
    """(declarations, keyword arguments) of one click option per method
    option name, in name order: for click.option and click.Option alike."""
    return [_method_option_spec(name) for name in sorted(all_options())]


def _method_option_spec(name: str) -> tuple[list[str], dict[str, Any]]:
    """One flag for a method option, whichever methods share its name: each
    definition's choices, default and help, named by its methods (the
    method given checks the value against its own definition; the registry
    has checked that they share a type)."""
    definitions = option_definitions(name)
    option = next(iter(definitions))
    text = "; ".join(f"[{','.join(methods)}] {d.help}" + (f" ({'|'.join(d.choices)})" if d.choices else "")
                     + f" (default {d.default})" for d, methods in definitions.items())
    kwargs: dict[str, Any] = {"default": None, "help": text}
    if option.type is bool:
        kwargs["is_flag"] = True  # absent: None, so "not given" stays distinguishable
    elif all(d.choices for d in definitions):
        kwargs["type"] = click.Choice(list(dict.fromkeys(c for d in definitions for c in d.choices)))
    else:
        kwargs["type"] = option.type
    return [option.flag, name], kwargs


def is_primary() -> bool:
    """False in torchrun's ranks other than 0, which print nothing of their own."""
    return not under_torchrun() or os.environ.get("RANK") == "0"


def positive_ints(text: str, flag: str) -> list[int]:
    values = []
    for s in comma_list(text) or ():
        if not s.isdigit() or int(s) < 1:
            raise UserError(f"{flag} takes positive integers, got '{s}'")
        values.append(int(s))
    if not values:
        raise UserError(f"{flag} needs at least one value")
    return values


def method_names(text: str) -> list[str]:
    names = list(comma_list(text) or ())
    if not names:
        raise UserError("--methods needs at least one method name")
    for name in names:
        make_method(name)  # unknown names fail here, before any work
    return names


# A --methods entry: a method name, and its own options in brackets (commas split entries only outside them).
METHOD_ENTRY = re.compile(r"([\w-]+)(?:\[([^\[\]]*)\])?")
ENTRY_SEPARATOR = re.compile(r",(?![^\[]*\])")  # a comma with no "]" ahead before a "["


def method_entries(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``compare --methods``: ``fdg,fdg[beta=0.5],ddg[staleness=stash]`` ->
    each method with the options given to it alone, each value converted as
    its flag would convert it (choices and checks are the method's, when it is made)."""
    entries = []
    for item in filter(None, (s.strip() for s in ENTRY_SEPARATOR.split(text or ""))):
        match = METHOD_ENTRY.fullmatch(item)
        if not match:
            raise UserError(f"--methods: cannot read '{item}' (write a method, or method[option=value,...])")
        name, given = match.groups()
        entries.append((name, _entry_options(name, given or "")))
    if not entries:
        raise UserError("--methods needs at least one method name")
    return entries


def _entry_options(method: str, text: str) -> dict[str, Any]:
    known = {o.name: o for o in make_method(method).options}  # an unknown method fails here
    values = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, equals, value = (s.strip() for s in item.partition("="))
        option = known.get(key.replace("-", "_"))
        if not equals or option is None:
            what = f"no option '{key}'" if equals else f"'{item}' is not option=value"
            raise UserError(f"--methods: {method}[...]: {what} ({method}'s options: {', '.join(known) or 'none'})")
        try:
            values[option.name] = click.types.convert_type(option.type).convert(value, None, None)
        except click.BadParameter as exc:
            raise UserError(f"--methods: {method}[{key}=...]: {exc.message}") from None
    return values


class DefaultCommandGroup(click.Group):
    """A group whose first argument, when it names no subcommand, goes to
    its ``run`` subcommand (``fdgbench sweep table2`` = ``sweep run table2``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["run", *args]
        return super().parse_args(ctx, args)


def sweep_options(f: Callable) -> Callable:
    for option in reversed([
        click.argument("table"),
        click.option("--preset", default="full", show_default=True,
                     help="full = the paper's protocol; quick / smoke cut models, epochs and data (see the spec)"),
        click.option("--seeds", type=int, help="seeds per cell (default: the preset's)"),
        click.option("--out", default=DEFAULT_RESULTS, show_default=True,
                     help="results root; the sweep's runs go to OUT/<table>-<preset> (or OUT/<the preset's runs>)"),
    ]):
        f = option(f)
    return f


# `sweep run` trains on this device, and `sweep status` and `table` read the runs of the same one (a run's
# device is part of its config, so of its directory's name: runs.md).
SWEEP_DEVICE = click.option(
    "--device", default=AUTO, show_default=True, envvar=DEVICE_ENV, show_envvar=True,
    help="the runs' device: auto = the preset's device where it names one, else CUDA where available, else the "
         "CPU; cpu, cuda or cuda:N replace the preset's")


def sweep_cells(table: str, preset: str, seeds: int | None, out: str, data_dir: str = DEFAULT_DATA_DIR,
                device: str | None = None):
    """TABLE's preset (the object: its ``spec`` is the table's), its cells (on ``device``, default
    default_device(), as sweep.preset_jobs reads it) and their results root."""
    from ..sweep import preset_jobs, preset_root

    p, cells, _ = preset_jobs(table, preset, seeds, out, data_dir, device or default_device())
    return p, cells, preset_root(p, out)


