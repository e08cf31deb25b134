"""Run records that used to be misread: a --out name too long for the file
system, a finished run whose metrics hold a NaN test error, a truncated
summary.json, a done run whose config.json was deleted. Each is one error
line, or a run in the state "corrupt" that every command names the same way
and none uses (run_record.read_run decides it); fake run directories, built by hand."""
import math

import pytest

from fdgbench import checkpoint
from fdgbench.errors import UserError
from fdgbench.report.records import run_records
from fdgbench.report.specs import load_spec
from fdgbench.runs import RunDirectory
from fdgbench.sweep import run_state

from .test_bad_input import TINY, _one_error

SPEC = """title = "Bad records"
dataset = "synthetic"
[[columns]]
id = "BP"
method = "bp"
[[columns]]
id = "FDG"
method = "fdg"
[[rows]]
id = "Tiny K=2"
model = "tiny_resnet"
splits = 2
paper = {}
[presets.smoke]
epochs = 2
seeds = 2
train_subset = 64
test_subset = 32
batch_size = 32
threads = 1
"""


@pytest.fixture
def table(tmp_path):
    """A two-column, two-seed spec; returns (spec file, results root, {(column, seed): RunDirectory})."""
    spec_file = tmp_path / "bad.toml"
    spec_file.write_text(SPEC)
    out = tmp_path / "runs"
    runs = {(c.column.id, c.seed): RunDirectory.for_config(out / "bad-smoke", c.config.to_dict())
            for c in load_spec(str(spec_file)).cells("smoke")}
    return spec_file, out, runs


def _record(run: RunDirectory, errors: list[float], summary: dict | None = None) -> None:
    """A run as training leaves it: one metrics line per epoch, then (with
    ``summary``) its summary and ``done``; the summary's numbers are the
    metrics' unless ``summary`` says otherwise."""
    run.start({"made_by": "test_bad_records"}, {})  # what a config holds is not what these commands check
    for epoch, error in enumerate(errors, 1):
        run.append_metrics({"epoch": epoch, "iteration": 2 * epoch, "test_error": error, "train_loss": 1.0,
                            "epoch_seconds": 1.0})
    if summary is not None:
        run.finish({"status": "finished", "final_test_error": errors[-1], "best_test_error": min(errors),
                    "dataset": "synthetic", **summary})


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: ")]


def test_an_out_name_too_long_for_the_file_system_is_one_error_before_training(cli, tmp_path):
    out = tmp_path / ("x" * 300)
    status, _, err = cli("run", "--method", "bp", *TINY, "--out", out)
    _one_error(status, err, "too long for the file system")
    assert str(out) in err and not any(tmp_path.iterdir())  # nothing created
    with pytest.raises(UserError, match="too long for the file system"):
        checkpoint.latest(out / "run")


def test_a_nan_test_error_in_a_finished_runs_metrics_is_left_out_of_table_and_plot(cli, table, tmp_path):
    spec_file, out, runs = table
    _record(runs["BP", 0], [30.0, 20.0], {})
    _record(runs["BP", 1], [30.0, math.nan], {"final_test_error": 10.0, "best_test_error": 10.0})
    _record(runs["FDG", 0], [35.0, 25.0], {})
    bad = runs["BP", 1].path
    assert run_state(runs["BP", 1]) == "corrupt" and run_state(runs["BP", 0]) == "done"

    status, _, err = cli("table", spec_file, "--preset", "smoke", "--out", out, "--tables-dir", tmp_path / "t")
    assert status == 0, err
    assert _warnings(err) == [f"warning: left out: run {bad} is corrupt: metrics.jsonl line 2 has test error nan; "
                              f"delete that directory to train the run again"]
    md = (tmp_path / "t" / "bad-smoke.md").read_text()
    assert "| 20.00 (n=1, 1 corrupt) / - / - |" in md and "10.00" not in md  # summary's 10.0 is not used

    status, _, err = cli("plot", "curves", spec_file, "--preset", "smoke", "--out", out, "--plot-out",
                         tmp_path / "curves")
    assert status == 0, err
    assert len(_warnings(err)) == 1 and str(bad) in _warnings(err)[0]
    drawn = (tmp_path / "curves.svg").read_text()
    assert "BP (n=1)" in drawn and "BP (n=2)" not in drawn and "FDG (n=1)" in drawn


def test_a_summary_that_disagrees_with_its_metrics_is_corrupt(table):
    _, _, runs = table
    _record(runs["BP", 0], [30.0, 20.0], {"final_test_error": 19.5})
    frame = run_records(runs["BP", 0].path.parent)
    row = frame.loc[runs["BP", 0].path.name]
    assert row["state"] == "corrupt" and row["summary"] is None and row["metrics"] == []
    assert row["problem"] == "summary.json has final_test_error 19.5, but the last in metrics.jsonl is 20.0"


def test_a_diverged_run_stays_diverged_whatever_its_metrics_hold(cli, table, tmp_path):
    spec_file, out, runs = table
    _record(runs["FDG", 0], [40.0, math.nan], {"status": "diverged", "final_test_error": None,
                                               "best_test_error": None})
    assert run_state(runs["FDG", 0]) == "diverged"
    status, _, err = cli("table", spec_file, "--preset", "smoke", "--out", out, "--tables-dir", tmp_path / "t")
    assert status == 0 and not _warnings(err), err
    assert "| diverged (1/2) / - |" in (tmp_path / "t" / "bad-smoke.md").read_text()
    status, stdout, err = cli("sweep", "status", spec_file, "--preset", "smoke", "--out", out)
    assert "1 done, 0 running, 0 incomplete, 3 missing (of 4)" in stdout and "corrupt" not in stdout + err


def test_a_truncated_summary_is_corrupt_everywhere_and_named_once(cli, table, tmp_path):
    spec_file, out, runs = table
    _record(runs["BP", 0], [30.0, 20.0], {})
    _record(runs["FDG", 0], [35.0, 25.0], {})
    _record(runs["FDG", 1], [36.0, 26.0], {})
    summary = runs["FDG", 0].path / "summary.json"
    summary.write_text(summary.read_text()[:40])
    named = f"run {runs['FDG', 0].path} is corrupt: summary.json is unreadable ("
    args = ("--preset", "smoke", "--out", out)
    outputs = []

    status, stdout, err = cli("table", spec_file, *args, "--tables-dir", tmp_path / "t")
    assert status == 0 and len(_warnings(err)) == 1 and named in err, err
    assert "| 26.00 (n=1, 1 corrupt) / - / - |" in (tmp_path / "t" / "bad-smoke.md").read_text()  # seed 1 only
    outputs.append(stdout + err)

    status, stdout, err = cli("plot", "curves", spec_file, *args, "--plot-out", tmp_path / "c")
    assert status == 0 and len(_warnings(err)) == 1 and named in err, err
    assert "FDG (n=1)" in (tmp_path / "c.svg").read_text()
    outputs.append(stdout + err)

    status, stdout, err = cli("sweep", "status", spec_file, *args)
    assert status == 0 and len(_warnings(err)) == 1 and named in err, err
    assert "2 done, 0 running, 0 incomplete, 1 missing, 1 corrupt (of 4)" in stdout
    outputs.append(stdout + err)

    status, stdout, err = cli("sweep", spec_file, *args, "--dry-run")
    assert status == 0, err
    assert f"FDG / seed 0: not trained: {named}" in stdout and stdout.count("missing ->") == 1
    outputs.append(stdout + err)

    status, stdout, err = cli("sweep", spec_file, *args, "--launcher", "print")
    assert status == 2 and named in err and err.strip().splitlines()[-1].startswith("error: 1 corrupt run"), err
    printed = [line for line in stdout.splitlines() if line.startswith("fdgbench run ")]
    assert len(printed) == 1 and "--method bp" in printed[0] and "--seed 1" in printed[0]  # the missing run only
    outputs.append(stdout + err)

    # The in-process sweep refuses the corrupt run, trains the missing one, and exits 2 at the end.
    status, stdout, err = cli("sweep", spec_file, *args, "--no-progress")
    assert status == 2 and named in err, err
    assert "1 finished" in stdout and "1 corrupt" in stdout and run_state(runs["BP", 1]) == "done"
    assert err.strip().splitlines()[-1] == ("error: 1 corrupt run directory left alone (named above); delete them "
                                            "and run the sweep again to train those runs")
    outputs.append(stdout + err)
    assert all("--force" not in text for text in outputs), outputs  # none of these commands has it


def test_a_done_run_without_its_config_is_corrupt_in_every_command(cli, table, tmp_path):
    spec_file, out, runs = table
    for key in runs:
        _record(runs[key], [30.0, 20.0], {})
    (runs["BP", 1].path / "config.json").unlink()
    named = f"run {runs['BP', 1].path} is corrupt: config.json is missing"
    args = ("--preset", "smoke", "--out", out)

    status, stdout, err = cli("sweep", "status", spec_file, *args)
    assert "3 done, 0 running, 0 incomplete, 0 missing, 1 corrupt (of 4)" in stdout and named in err
    status, _, err = cli("table", spec_file, *args, "--tables-dir", tmp_path / "t")
    assert status == 0 and named in err
    assert "| 20.00 (n=1, 1 corrupt) / - / - |" in (tmp_path / "t" / "bad-smoke.md").read_text()
    status, stdout, err = cli("sweep", spec_file, *args)  # all done but this one: nothing trains
    assert status == 2 and "3 done before" in stdout and f"BP / seed 1: not trained: {named}" in err
    assert run_records(out / "bad-smoke").loc[runs["BP", 1].path.name, "state"] == "corrupt"
    # `fdgbench run` of that config (train_run, which every command trains through) refuses it the same way.
    from fdgbench.execute import RunOptions, train_run
    from fdgbench.sweep import preset_jobs

    jobs = preset_jobs(str(spec_file), "smoke", None, str(out))[2]
    (job,) = [j for j in jobs if j.run.path == runs["BP", 1].path]
    with pytest.raises(UserError, match=f"^{named}"):
        train_run(job.config, RunOptions(out=str(job.root)))
