"""The ``fdgbench`` command group, which every submodule adds its commands to
(kept apart from the package's __init__, which imports those submodules)."""
from __future__ import annotations

import os

import click

from ..method import PLUGINS_ENV, add_plugins


def _load_plugins(ctx: click.Context, param: click.Parameter, specs: tuple[str, ...]) -> None:
    if specs:
        add_plugins(specs)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--plugin", multiple=True, metavar="MODULE_OR_FILE", expose_value=False, callback=_load_plugins,
              help=f"load methods from a module on sys.path or a .py file (repeatable); also read from "
                   f"{PLUGINS_ENV} (separated by '{os.pathsep}'), which this sets for the processes a command starts")
def cli() -> None:
    """fdgbench: decoupled neural-network training, benchmarked against backprop."""
