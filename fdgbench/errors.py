"""Errors that reach the user as one line and a non-zero exit, never a traceback."""


class UserError(Exception):
    """Bad input (unknown name, invalid value, missing data, unwritable path).

    The CLI prints ``error: <message>`` and exits with status 2.
    """


class RunInUseError(UserError):
    """Another process holds the run directory's lock (it is training that run)."""


class DivergedError(Exception):
    """A run's loss became NaN or infinite; the run is recorded as diverged (exit 3)."""


class WorkerFailedError(Exception):
    """A distributed worker (rank) died or raised; the message names the rank
    and the cause (exit 1)."""


class RunsFailedError(Exception):
    """Some runs of a sweep failed (their logs say why); the others ran (exit 1)."""
