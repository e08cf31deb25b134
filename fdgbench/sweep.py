"""Sweeps as library code: a table preset's runs as Jobs (config -> run
directory -> state, the state read from the directory alone, as in
DomainBed's sweep), and launchers that train the jobs not done yet: in this
process, as ``fdgbench run`` subprocesses (several at once), as a Slurm job
array through submitit, or printed as commands for a scheduler. A launcher
for another cluster is a class with the same ``launch(jobs, options)``,
registered in LAUNCHERS.

Every reader of run state (``sweep status``, tables, plots, the sweep
itself) asks ``run_record.read_run`` (or ``run_state``, its state alone)."""
from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Protocol

from . import checkpoint
from .config import AUTO, RESOLVED_FIELDS, TUPLE_FIELDS, RunConfig, device_available, flag_name
from .data import load_dataset
from .errors import DivergedError, RunInUseError, UserError
from .engines.launch import set_parent_death_signal
from .execute import RunOptions, done_summary, train_run
from .method import all_options
from .report.specs import Cell, Preset, load_spec
from .run_record import CORRUPT, RECORDED, SETTLED, RunRecord, corrupt_text, read_run, run_state  # noqa: F401
from .runs import RunDirectory

@dataclass(frozen=True)
class Job:
    """One run of a sweep: where its records go follows from its config."""

    label: str
    config: RunConfig
    root: Path

    @property
    def run(self) -> RunDirectory:
        return RunDirectory.for_config(self.root, self.config.to_dict())

    @property
    def record(self) -> RunRecord:
        return read_run(self.run)

    @property
    def state(self) -> str:
        return self.record.state


def preset_root(preset: Preset, out: str | Path) -> Path:
    """Where a preset's runs go: OUT/<table>-<preset>, or OUT/<the preset's runs>."""
    return Path(out) / preset.runs


def preset_jobs(table: str, preset: str, seeds: int | None, out: str | Path, data_dir: str = "data",
                device: str | None = None) -> tuple[Preset, list[Cell], list[Job]]:
    """TABLE's preset (resolved here, once: the object the caller hands on;
    its ``spec`` is the table's), its cells and one Job per cell, under the
    preset's results root (``preset_root``); ``device``, where given, replaces
    the preset's, except that ``auto`` keeps a preset's own device (converge-gpu's
    cuda, wherever the command runs) and is otherwise this machine's (RunConfig
    resolves it). A preset with a ``fallback_dataset`` uses it where the
    spec's dataset cannot be loaded (sweep, status and table all decide the
    same way)."""
    p = load_spec(table).preset(preset)
    spec = p.spec
    dataset = spec.dataset
    if p.fallback_dataset:
        try:
            load_dataset(spec.dataset, data_dir)
        except UserError as exc:  # e.g. no CIFAR-100 here: the preset allows labelled synthetic data
            print(f"note: {exc}; using {p.fallback_dataset} as this preset allows", file=sys.stderr)
            dataset = p.fallback_dataset
    cells = spec.cells(p, seeds, dataset)
    if device is not None and not (device == AUTO and "device" in p.run):
        cells = [replace(c, config=replace(c.config, device=device)) for c in cells]
    root = preset_root(p, out)
    jobs = [Job(f"{c.row.id} / {c.column.id} / seed {c.seed}", c.config, root) for c in cells]
    return p, cells, jobs


def config_args(cfg: RunConfig) -> list[str]:
    """``fdgbench run`` arguments that rebuild ``cfg`` exactly (every field
    that differs from its default, and those whose flag defaults to auto;
    the inverse of cli.options.run_config)."""
    args = ["--method", cfg.method]
    default = RunConfig()
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in ("method", "method_options") or (value == getattr(default, f.name)
                                                      and f.name not in RESOLVED_FIELDS):
            continue
        flag = flag_name(f.name)
        if f.metadata.get("negatable"):  # a --x/--no-x switch (config.run_field)
            args.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, bool):
            args.append(flag)  # a flag whose default is off
        else:
            args += [flag, ",".join(value) if f.name in TUPLE_FIELDS else str(value)]
    options = all_options()
    for name, value in cfg.method_options.items():
        option = options[name]
        if option.type is bool:
            if value:
                args.append(option.flag)
            continue
        args += [option.flag, str(value)]
    return args


class Launcher(Protocol):
    def launch(self, jobs: list[Job], options: RunOptions) -> dict[str, int]:
        """Train (or hand off) every job; returns counts for the closing line."""


def _say(text: str) -> None:
    print(text, flush=True)


def _refuse(label: str, job: Job, record: RunRecord) -> None:
    """A corrupt run is neither trained nor handed on (corrupt_text says
    why): one line on stderr naming it; the sweep goes on with the others and
    its command exits non-zero at the end (``counts["corrupt"]``)."""
    print(f"{label}: not trained: {corrupt_text(job.run, record.problem)}", file=sys.stderr, flush=True)


def _records_refusing_corrupt(jobs: list[Job]) -> list[RunRecord]:
    """Each job's record, read once, for a launcher that decides up front; each corrupt one refused."""
    records = [job.record for job in jobs]
    for job, record in zip(jobs, records):
        if record.state == CORRUPT:
            _refuse(job.label, job, record)
    return records


class InProcessLauncher:
    """One job after another in this process (data loaded once). A diverged
    run is recorded and the sweep goes on; a run another process holds is
    left to it, so sweeps started side by side share out a preset's runs; a
    corrupt one is refused. Each job's state is read when its turn comes
    (another process may have finished it meanwhile)."""

    def launch(self, jobs: list[Job], options: RunOptions) -> dict[str, int]:
        counts = {"done before": 0, "finished": 0, "diverged": 0, "left to other processes": 0, CORRUPT: 0}
        datasets: dict[str, Any] = {}
        for i, job in enumerate(jobs, 1):
            label = f"[{i}/{len(jobs)}] {job.label}"
            record = job.record
            if record.state in RECORDED:
                counts["done before"] += 1
                _say(f"{label}: done ({done_summary(job.run)['status']})")
                continue
            if record.state == CORRUPT:
                counts[CORRUPT] += 1
                _refuse(label, job, record)
                continue
            print(f"{label}: training", file=sys.stderr, flush=True)
            try:
                summary, _, _ = train_run(job.config, options, datasets)
                counts["finished"] += 1
                _say(f"{label}: final test error {summary['final_test_error']:.2f}%")
            except DivergedError as exc:
                counts["diverged"] += 1
                _say(f"{label}: diverged ({exc})")
            except RunInUseError as exc:
                counts["left to other processes"] += 1
                _say(f"{label}: another process is training it ({exc})")
        return counts


def run_command(job: Job, options: RunOptions) -> list[str]:
    return ["fdgbench", "run", *config_args(job.config), "--out", str(job.root), "--data-dir", options.data_dir,
            "--no-progress"]


class PrintLauncher:
    """Print one ``fdgbench run`` command per job missing or left incomplete
    (not one another process is training), to hand to a scheduler (a job
    array, ``xargs -P``); trains nothing."""

    def launch(self, jobs: list[Job], options: RunOptions) -> dict[str, int]:
        states = [r.state for r in _records_refusing_corrupt(jobs)]
        todo = [job for job, state in zip(jobs, states) if state in ("missing", "incomplete")]
        for job in todo:
            _say(shlex.join(run_command(job, options)))
        return {"done before": sum(s in RECORDED for s in states), "running elsewhere": states.count("running"),
                "printed": len(todo), CORRUPT: states.count(CORRUPT)}


def _held_elsewhere(job: Job, counts: dict[str, int]) -> bool:
    """Whether another process is training the job's run; such a run is
    left to it (counted and named, as the in-process launcher does)."""
    holder = job.run.holder()
    if holder is None:
        return False
    counts["left to other processes"] += 1
    _say(f"{job.label}: another process is training it (pid {holder})")
    return True


def _worker_command(python: str, job: Job, options: RunOptions) -> list[str]:
    """``fdgbench run`` of the job through this interpreter (the sweep's own install)."""
    return [python, "-m", "fdgbench", *run_command(job, options)[1:]]


def _open_log(job: Job, command: list[str]):
    """The job's log beside its run directory, appended to: an earlier
    attempt's output (why it failed) is kept, each attempt headed by its command."""
    job.root.mkdir(parents=True, exist_ok=True)
    log = open(job.root / f"{job.run.path.name}.log", "a")
    log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
    log.flush()
    return log


def _child_setup() -> None:
    # A child outlives no sweep: if the sweep is killed (SIGKILL cannot be caught) the kernel sends the child
    # SIGTERM, which `fdgbench run` handles as a stop (ranks stopped, checkpoint kept).
    set_parent_death_signal(signal.SIGTERM)


class SubprocessLauncher:
    """Each job not done as its own ``fdgbench run`` process, ``parallel`` at
    a time (e.g. several runs sharing one GPU); each process's output is
    appended to ``<run directory>.log`` beside its run directory. A run
    another process is training is left to it, as in-process. When the
    sweep stops (Ctrl-C, SIGTERM, SIGHUP, an error) its children are stopped
    too, each keeping its checkpoint; a failed run makes the sweep exit 1."""

    STOP_S = 30.0  # how long a stopped child gets to write its checkpoint and stop its ranks

    def __init__(self, parallel: int = 1, python: str = sys.executable):
        if parallel < 1:
            raise UserError(f"--jobs must be at least 1, got {parallel}")
        self.parallel, self.python = parallel, python

    def launch(self, jobs: list[Job], options: RunOptions) -> dict[str, int]:
        records = _records_refusing_corrupt(jobs)
        counts = {"done before": sum(r.state in RECORDED for r in records), "finished": 0, "diverged": 0,
                  "failed": 0, "left to other processes": 0, CORRUPT: sum(r.state == CORRUPT for r in records)}
        waiting = [job for job, record in zip(jobs, records) if record.state not in SETTLED]
        running: list[tuple[Job, subprocess.Popen, Any]] = []
        try:
            while waiting or running:
                while waiting and len(running) < self.parallel:
                    job = waiting.pop(0)
                    if _held_elsewhere(job, counts):
                        continue
                    command = _worker_command(self.python, job, options)
                    log = _open_log(job, command)
                    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                               preexec_fn=_child_setup)
                    running.append((job, process, log))
                    print(f"{job.label}: started -> {job.run.path.name}", file=sys.stderr, flush=True)
                time.sleep(0.2)
                for entry in [e for e in running if e[1].poll() is not None]:
                    job, process, log = entry
                    log.close()
                    running.remove(entry)
                    outcome = {0: "finished", 3: "diverged"}.get(process.returncode, "failed")
                    counts[outcome] += 1
                    _say(f"{job.label}: {outcome}" + ("" if outcome != "failed" else
                                                      f" (exit {process.returncode}; see {log.name})"))
        finally:
            self._stop(running)
        return counts

    def _stop(self, running: list[tuple[Job, subprocess.Popen, Any]]) -> None:
        """Stop the children still running (the sweep is stopping): SIGTERM,
        then SIGKILL after STOP_S."""
        for _, process, _ in running:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + self.STOP_S
        for job, process, log in running:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()
            print(f"{job.label}: stopped (exit {process.returncode}); the sweep resumes it", file=sys.stderr,
                  flush=True)


# A preset's ``slurm`` table and the --slurm-* flags name these (SubmititLauncher).
CLUSTER_KEYS = ("partition", "time_min", "gpus_per_node", "cpus_per_task", "mem_gb", "array_parallelism")


class SubmititLauncher:
    """Each job not done and not held as one job of an array submitted
    through submitit (optional dependency: ``pip install fdgbench[slurm]``):
    to Slurm (``executor="slurm"``), or to this machine (``"local"``, the
    same submission run here, for a try-out or a test). Resources come from
    the preset's ``slurm`` table, overridden by flags (``settings``:
    partition, time_min, gpus_per_node, cpus_per_task, mem_gb,
    array_parallelism). Each job runs ``fdgbench run`` of its config, so a
    job that is stopped and requeued resumes from its checkpoint. With
    ``wait`` the sweep waits for every job and counts outcomes; without it,
    it returns once they are queued (``sweep status`` follows them)."""

    EXECUTORS = ("slurm", "local")

    def __init__(self, executor: str = "slurm", settings: dict[str, Any] | None = None, wait: bool = False,
                 python: str = sys.executable):
        if executor not in self.EXECUTORS:
            raise UserError(f"--slurm-executor must be {' or '.join(self.EXECUTORS)}, got '{executor}'")
        unknown = sorted(set(settings or {}) - set(CLUSTER_KEYS))
        if unknown:
            raise UserError(f"unknown slurm setting(s) {', '.join(unknown)}; known: {', '.join(CLUSTER_KEYS)}")
        self.executor, self.settings, self.wait, self.python = executor, dict(settings or {}), wait, python

    def _make_executor(self, folder: Path):
        try:
            import submitit
        except ImportError:
            raise UserError("--launcher slurm needs submitit: pip install 'fdgbench[slurm]' (or submitit)") from None
        if self.executor == "slurm" and submitit.SlurmExecutor.affinity() <= 0:
            raise UserError("no Slurm here (sbatch not found); --slurm-executor local runs the same submission on "
                            "this machine")
        executor = submitit.AutoExecutor(folder=folder, cluster=self.executor)
        settings = {k: v for k, v in self.settings.items() if v is not None}
        names = {"partition": "slurm_partition", "array_parallelism": "slurm_array_parallelism",
                 "time_min": "timeout_min"}
        executor.update_parameters(name="fdgbench", **{names.get(k, k): v for k, v in settings.items()
                                                       if self.executor == "slurm" or not names.get(k, k).startswith(
                                                           "slurm_")})
        return executor

    def launch(self, jobs: list[Job], options: RunOptions) -> dict[str, int]:
        records = _records_refusing_corrupt(jobs)
        counts = {"done before": sum(r.state in RECORDED for r in records), "submitted": 0,
                  "left to other processes": 0, CORRUPT: sum(r.state == CORRUPT for r in records)}
        todo = [job for job, record in zip(jobs, records)
                if record.state not in SETTLED and not _held_elsewhere(job, counts)]
        if not todo:
            return counts
        root = todo[0].root
        executor = self._make_executor(root / "submitit")
        with executor.batch():  # one job array
            submitted = [(job, executor.submit(_CommandJob(_worker_command(self.python, job, options))))
                         for job in todo]
        counts["submitted"] = len(submitted)
        for job, handle in submitted:
            _say(f"{job.label}: submitted as job {handle.job_id} -> {job.run.path.name}")
        if self.wait:
            counts.update({"finished": 0, "diverged": 0, "failed": 0})
            for job, handle in submitted:
                status = handle.result()
                outcome = {0: "finished", 3: "diverged"}.get(status, "failed")
                counts[outcome] += 1
                _say(f"{job.label}: {outcome}" + ("" if outcome != "failed" else
                                                  f" (exit {status}; see {handle.paths.stdout})"))
        return counts


@dataclass(frozen=True)
class _CommandJob:
    """What a submitit job runs: one command, its output in the job's log;
    returns its exit status (a failed run is an outcome, not a lost job)."""

    command: list[str]

    def __call__(self) -> int:
        return subprocess.run(self.command, stdout=sys.stdout, stderr=sys.stderr).returncode

    def checkpoint(self):  # submitit: requeue a preempted job as it is; `fdgbench run` resumes from its checkpoint
        import submitit

        return submitit.helpers.DelayedSubmission(self)


@dataclass(frozen=True)
class LaunchSettings:
    """What the command line says of how to launch (each launcher reads its part)."""

    parallel: int = 1  # subprocess: runs at once
    executor: str = "slurm"  # slurm launcher: slurm, or local (this machine, through submitit)
    cluster: dict[str, Any] = field(default_factory=dict)  # slurm launcher: resources (SubmititLauncher)
    wait: bool = False  # slurm launcher: wait for the jobs and count their outcomes


LAUNCHERS: dict[str, Callable[[LaunchSettings], Launcher]] = {
    "in-process": lambda s: InProcessLauncher(),
    "subprocess": lambda s: SubprocessLauncher(s.parallel),
    "print": lambda s: PrintLauncher(),
    "slurm": lambda s: SubmititLauncher(s.executor, s.cluster, s.wait),
}


def describe(job: Job) -> str:
    """A job's state in a dry run's words."""
    record = job.record
    if record.state in RECORDED:
        return f"done ({'finished' if record.state == 'done' else record.state})"
    if record.state == CORRUPT:
        return f"not trained: {corrupt_text(job.run, record.problem)}"
    saved = checkpoint.latest(job.run.path)
    text = (f"incomplete, resumes after epoch {saved['epoch']}" if saved else
            "incomplete, starts over (no checkpoint)" if job.run.path.exists() else "missing")
    return f"{text} -> {job.run.path.name}"


@dataclass
class Progress:
    """Where a sweep stands: runs by state, how many can resume, and the
    training time left at each model's median epoch time so far (None: no
    epoch recorded yet; ``unknown``: models with runs left and no epoch,
    ``unmeasured``: those runs, which ``time_left`` times by a probe)."""

    counts: dict[str, int]
    resumable: int
    seconds_left: float | None
    unknown: list[str]
    remaining: int  # runs not done
    unmeasured: list[RunConfig] = field(default_factory=list)


@dataclass(frozen=True)
class TimeLeft:
    """A sweep's training time left: each model's recorded epoch time where
    it has one, a short timed BP probe on this machine where it has none
    (``probed``); ``uncounted``: models with neither (no epoch recorded, and
    a device this machine does not have)."""

    seconds: float
    probed: list[str]
    uncounted: list[str]


def time_left(p: Progress, data_dir: str = "data") -> TimeLeft:
    """``p``'s recorded estimate, completed by bench.estimate_sweep_seconds
    for the runs of models that have no epoch recorded yet (every run of such
    a model is still whole), so a sweep has an estimate before any run ends."""
    from .bench import estimate_sweep_seconds

    here = [cfg for cfg in p.unmeasured if device_available(cfg.device)]
    probed = sorted({cfg.model for cfg in here})
    return TimeLeft((p.seconds_left or 0.0) + estimate_sweep_seconds(here, data_dir), probed,
                    sorted({cfg.model for cfg in p.unmeasured} - set(probed)))


def progress(cells: list[Cell], root: Path) -> Progress:
    from .report.records import planned_records

    planned = planned_records(cells, root)
    planned["model"] = [c.config.model for c in cells]
    planned["epochs"] = [c.config.epochs if not c.config.max_steps else 1 for c in cells]
    finished = planned["state"].isin(RECORDED)
    counts = {"done": int(finished.sum()),
              **{s: int((planned["state"] == s).sum()) for s in ("running", "incomplete", "missing", CORRUPT)}}
    if not counts[CORRUPT]:
        del counts[CORRUPT]  # named only where there is one (each is named on stderr by planned_records)
    resumable = sum(checkpoint.latest(root / run) is not None
                    for run in planned.loc[planned["state"].isin(["running", "incomplete"]), "run"])
    # Seconds per epoch, per model, over every epoch recorded so far; the epochs each unfinished run has left.
    epochs = planned.explode("metrics").dropna(subset=["metrics"])
    seconds = (epochs["metrics"].map(lambda m: m["epoch_seconds"]).groupby(epochs["model"]).median()
               if len(epochs) else {})
    left = planned[~finished]
    remaining = list(zip(left["model"], (left["epochs"] - left["metrics"].map(len)).clip(lower=0)))
    unmeasured = [cells[i].config for i, (m, e) in zip(left.index, remaining) if e and m not in seconds]
    return Progress(counts, resumable,
                    sum(seconds[m] * e for m, e in remaining if m in seconds) if len(seconds) else None,
                    sorted({cfg.model for cfg in unmeasured}), len(remaining), unmeasured)
