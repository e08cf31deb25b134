"""fdgbench command line: run, compare, sweep, table, plot, bench, schedule,
list. Each submodule parses one family of commands and calls the library;
this one holds the group, the entry point and how errors become exit statuses."""
from __future__ import annotations

import os
import signal
import sys
import threading

import click

from ..engines.launch import under_torchrun
from ..errors import DivergedError, RunsFailedError, UserError, WorkerFailedError
from .group import cli
from .options import training_options  # noqa: F401  (tests and extensions build on the shared options)

__all__ = ["cli", "main", "training_options"]


from . import bench, info, plots, sweeps, train  # noqa: F401  (each registers its commands on ``cli``)


# How each error reaches the user: its word, the exit status, whether a torchrun rank names itself
# (a worker failure names its rank in its message already).
EXITS = {UserError: ("error", 2, True), DivergedError: ("diverged", 3, True), WorkerFailedError: ("error", 1, False),
         RunsFailedError: ("error", 1, False)}


# SIGTERM (a job scheduler's stop, ``kill``) and SIGHUP (the terminal closed)
# unwind like Ctrl-C: spawned ranks are stopped, their rendezvous folder is
# removed, the checkpoint is kept, and the same command resumes.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
# The commands that train, whose interruption leaves a run to resume.
TRAINING_COMMANDS = ("run", "compare", "sweep")


class Terminated(KeyboardInterrupt):
    """A stop signal, raised in the main thread."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum, frame) -> None:
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad input is one ``error:`` line and exit status 2; a
    diverged run exits 3; Ctrl-C exits 130, SIGTERM 143 and SIGHUP 129 (128 + signal)."""
    previous = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
        previous = {signum: signal.signal(signum, _raise_terminated) for signum in STOP_SIGNALS}
    try:
        return _main(argv)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _main(argv: list[str] | None) -> int:
    try:
        result = cli.main(args=argv, prog_name="fdgbench", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # click turns Ctrl-C (and Terminated) into Abort
            return _interrupted(exc.__cause__, argv)
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        return 2
    except tuple(EXITS) as exc:
        word, status, prefix = next(v for kind, v in EXITS.items() if isinstance(exc, kind))
        click.echo(f"{word}: {_rank_prefix() if prefix else ''}{exc}", err=True)
        return status
    except KeyboardInterrupt as exc:
        return _interrupted(exc, argv)


def _interrupted(exc: KeyboardInterrupt, argv: list[str] | None) -> int:
    command = (sys.argv[1:] if argv is None else argv)[:1]
    trains = bool(command) and command[0] in TRAINING_COMMANDS
    click.echo("interrupted" + (" (the same command resumes an unfinished run from its last epoch's checkpoint)"
                                if trains else ""), err=True)
    return 128 + getattr(exc, "signum", signal.SIGINT)


def _rank_prefix() -> str:
    return f"rank {os.environ['RANK']}: " if under_torchrun() else ""


if __name__ == "__main__":
    sys.exit(main())
