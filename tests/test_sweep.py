"""Sweeps as library code: jobs and their state from the run directory alone,
launchers (in-process, subprocess, print), config <-> command-line arguments,
and the results root as one DataFrame."""
import json
import os
import shlex
import subprocess
import sys

import click
import pytest

from fdgbench.cli import training_options
from fdgbench.cli.options import run_config
from fdgbench.config import RunConfig
from fdgbench.report.records import planned_records, run_records
from fdgbench.report.specs import SPEC_DIR, load_spec
from fdgbench.runs import RunDirectory
from fdgbench.sweep import config_args, preset_jobs, run_state

from .conftest import ROOT
from .test_checkpoint import SPEC


def _parsed(args: list[str]) -> RunConfig:
    """The config `fdgbench run ARGS` would train."""
    @click.command()
    @click.option("--method")
    @training_options
    def probe(method, **kw):
        probe.config = run_config(method, kw)

    probe.main(args, standalone_mode=False)
    return probe.config


@pytest.mark.parametrize("spec", sorted(p.stem for p in SPEC_DIR.glob("*.toml")))
def test_every_presets_configs_round_trip_through_run_arguments(spec):
    """What the print and subprocess launchers hand to `fdgbench run` is the
    job's config exactly: the same run directory name."""
    loaded = load_spec(spec)
    for preset in loaded.presets:
        for cell in loaded.cells(preset):
            assert _parsed(config_args(cell.config)) == cell.config, (spec, preset, cell.column.id)


def test_the_print_launcher_prints_one_run_command_per_job_not_done(tmp_path):
    spec = tmp_path / "printed.toml"
    spec.write_text(SPEC.replace("seeds = 1", "seeds = 2"))
    out = tmp_path / "runs"
    printed = _cli("sweep", str(spec), "--preset", "smoke", "--out", str(out), "--launcher", "print")
    assert printed.returncode == 0, printed.stderr
    commands = [line for line in printed.stdout.splitlines() if line.startswith("fdgbench run ")]
    _, _, jobs = preset_jobs(str(spec), "smoke", None, out)
    assert len(commands) == 2 and not out.exists()  # nothing trained, nothing written
    for command, job in zip(commands, jobs):
        args = shlex.split(command)[2:]
        assert _parsed(args[:args.index("--out")]) == job.config
        assert args[args.index("--out") + 1] == str(job.root)
    first = subprocess.run([sys.executable, "-m", "fdgbench", *shlex.split(commands[0])[1:]], capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert jobs[0].state == "done" and jobs[1].state == "missing"
    again = _cli("sweep", str(spec), "--preset", "smoke", "--out", str(out), "--launcher", "print")
    assert [line for line in again.stdout.splitlines() if line.startswith("fdgbench run ")] == commands[1:]


def test_the_subprocess_launcher_runs_jobs_side_by_side_and_equals_in_process(tmp_path):
    spec = tmp_path / "parallel.toml"
    spec.write_text(SPEC.replace("seeds = 1", "seeds = 2"))
    swept = _cli("sweep", str(spec), "--preset", "smoke", "--out", str(tmp_path / "sub"), "--launcher", "subprocess",
                 "--jobs", "2", "--no-progress")
    assert swept.returncode == 0, swept.stderr
    assert "2 finished" in swept.stdout and "0 failed" in swept.stdout
    here = _cli("sweep", str(spec), "--preset", "smoke", "--out", str(tmp_path / "here"), "--no-progress")
    assert here.returncode == 0, here.stderr
    for root in ("sub", "here"):
        assert len(list((tmp_path / root / "parallel-smoke").glob("*/done"))) == 2
    numbers = {root: sorted(json.dumps(RunDirectory(p).metrics()[-1]["test_error"]) for p in
                            (tmp_path / root / "parallel-smoke").iterdir() if p.is_dir()) for root in ("sub", "here")}
    assert numbers["sub"] == numbers["here"]


def test_run_state_and_the_records_frame_come_from_the_directory_alone(tmp_path):
    spec = tmp_path / "states.toml"
    spec.write_text(SPEC.replace("seeds = 1", "seeds = 3"))
    out = tmp_path / "runs"
    swept = _cli("sweep", str(spec), "--preset", "smoke", "--seeds", "1", "--out", str(out), "--no-progress")
    assert swept.returncode == 0, swept.stderr
    _, cells, jobs = preset_jobs(str(spec), "smoke", None, out)
    done, cut, absent = jobs
    cut.run.path.mkdir(parents=True)
    (cut.run.path / "config.json").write_text(json.dumps(cut.config.to_dict()))
    assert [j.state for j in jobs] == ["done", "running", "missing"]
    later = os.stat(cut.run.path / "config.json").st_mtime + 2 * 3600
    assert run_state(cut.run, now=later) == "incomplete"
    frame = run_records(done.root)
    assert sorted(frame.index) == sorted([done.run.path.name, cut.run.path.name])
    assert frame.loc[done.run.path.name, "summary.status"] == "finished"
    assert frame.loc[done.run.path.name, "metrics"] == done.run.metrics()
    planned = planned_records(cells, done.root)
    assert list(planned["state"]) == ["done", "running", "missing"] and list(planned["seed"]) == [0, 1, 2]
    assert planned.loc[2, "metrics"] == [] and planned.loc[2, "summary"] is None


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fdgbench", *args], capture_output=True, text=True, timeout=600)


def test_the_python_example_in_the_usage_docs_runs_as_written(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "usage.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)  # it writes results/ where it runs
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert printed.returncode == 0, printed.stderr
    assert "epoch 2: test error" in printed.stdout and "fdg" in printed.stdout and "done" in printed.stdout
