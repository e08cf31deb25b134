"""`fdgbench list` and `fdgbench schedule show`."""
from __future__ import annotations

from typing import Any

import click

from ..errors import UserError
from ..method import all_methods, make_method
from ..models import most_blocks

from .group import cli
from .options import MethodOptionsCommand, run_config


@cli.group("list")
def list_() -> None:
    """List methods, models or datasets."""


@list_.command("methods")
def list_methods() -> None:
    for m in all_methods():
        breaks = ", ".join(m.breaks) or "none"
        click.echo(f"{m.name:<6} breaks: {breaks:<26} {m.summary}")
        for o in m.options:
            extra = f" ({'|'.join(o.choices)})" if o.choices else ""
            click.echo(f"{'':<8}{o.flag}{extra} default {o.default}: {o.help}")


@list_.command("models")
def list_models() -> None:
    from ..models import MODELS, count_parameters
    from ..partition import PAPER_SPLITS

    for name, info in MODELS.items():
        model = info.build(10)
        splits = ",".join(map(str, PAPER_SPLITS.get(name, {}))) or "-"
        click.echo(f"{name:<14} {count_parameters(model):>11,} params  {len(model):>4} blocks  "
                   f"paper K: {splits:<8} {info.description}")


@list_.command("datasets")
def list_datasets() -> None:
    from ..data import DATASET_SPECS

    for spec, text in DATASET_SPECS.items():
        click.echo(f"{spec:<20} {text}")


@cli.group()
def schedule() -> None:
    """Inspect a method's schedule."""


@schedule.command("show", cls=MethodOptionsCommand)
@click.option("--method", default="fdg", show_default=True)
@click.option("--splits", "-K", type=int, default=3, show_default=True)
@click.option("--iterations", type=int, default=8, show_default=True)
@click.option("--messages", is_flag=True, help="also show sends and receives")
def schedule_show(method: str, splits: int, iterations: int, messages: bool, **method_flags: Any) -> None:
    """Print the step x stage grid of the first iterations (validated first),
    with the method's options as `fdgbench run` takes them."""
    from ..schedule import ScheduleError, format_grid, legend, validate

    if splits < 1 or iterations < 1:
        raise UserError("--splits and --iterations must be at least 1")
    if splits > most_blocks():  # the check costs K^2 plans: a K no model can have would run for hours
        raise UserError(f"--splits {splits} is more stages than any model has blocks (at most {most_blocks()}, "
                        f"`fdgbench list models`)")
    given = run_config(method, method_flags).method_options  # the flags given, read as run reads them
    m = make_method(method, **given)
    placement = m.placement(splits, 1)
    stages = placement.stages
    try:
        validate(m.schedule, stages, max(iterations, 4 * stages))
    except ScheduleError as exc:
        raise UserError(f"invalid schedule: {exc}") from None
    click.echo(f"{method}, K={splits}: {m.summary}")
    if placement.replicas > 1:
        click.echo(f"each of the {placement.replicas} replicas runs this {stages}-stage schedule on its shard of "
                   f"every batch:")
    click.echo(format_grid(m.schedule, stages, iterations, messages))
    click.echo(legend())


