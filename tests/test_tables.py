"""Paper table specs, sweeps and tables: the specs encode the paper, tables
come from run directories only (golden files pin their format), and the
smoke preset of Table 2 runs end to end."""
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fdgbench.report.specs import load_spec, spec_path
from fdgbench.runs import RunDirectory

from .conftest import needs_offline_cifar10

GOLDEN = Path(__file__).parent / "golden"


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fdgbench", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})


def test_paper_specs_hold_the_published_numbers():
    t2, t3, t4 = load_spec("table2"), load_spec("table3"), load_spec("table4")
    r56 = next(r for r in t2.rows if r.model == "resnet56")
    assert r56.paper["FDG b=1"] == 6.20 and r56.paper["FDG best"] == 5.90 and r56.best_beta == 0.5
    # The README's "WRN-28-10, 19.4M" row is ResNet-1202 (REFERENCE.md note 2).
    r1202 = next(r for r in t2.rows if r.model == "resnet1202")
    assert r1202.paper["BP"] == 7.93 and "19.4M" in r1202.paper_params
    r56_rows = [r for r in t4.rows if r.model == "resnet56"]
    assert [r.splits for r in r56_rows] == [2, 3, 4] and r56_rows[2].paper["DGL*"] == 9.65
    assert t3.dataset == "cifar100" and next(r for r in t3.rows if r.model == "wrn28_10").paper["FDG best"] == 19.08
    # Presets: full is the paper's protocol (300 epochs, 3 seeds) for every row and column.
    full = t2.cells("full")
    # Every row x every column x 3 seeds (the spec's lists, whatever they hold: adding a column changes no test).
    assert len(t2.rows) >= 6 and len(t2.columns) >= 6
    assert sorted((c.row.id, c.column.id, c.seed) for c in full) == sorted(
        (r.id, col.id, seed) for r in t2.rows for col in t2.columns for seed in range(3))
    assert {c.config.epochs for c in full} == {300}
    fdg_best = [c for c in full if c.column.id == "FDG best b" and c.row.model == "resnet20"]
    assert {c.config.method_options["beta"] for c in fdg_best} == {0.2}
    assert {c.row.model for c in t4.cells("full")} == {"resnet56"}
    # The stability map's decision: every full-preset cell warms up linearly over 5 epochs, and says why.
    for spec in (load_spec(n) for n in ("table2", "table3", "table4", "ablation_beta", "ablation_staleness")):
        assert {(c.config.warmup, c.config.warmup_epochs) for c in spec.cells("full")} == {("linear", 5)}, spec.name
        assert any("docs/stability.md" in note for note in spec.preset("full").footnotes), spec.name


def test_converge_presets_share_their_k2_runs():
    """Table 2's and Table 4's converge presets: ResNet-20, 20 epochs, bf16 +
    channels-last in every cell; Table 4's K = 2 cells are Table 2's runs."""
    t2, t4 = load_spec("table2").cells("converge"), load_spec("table4").cells("converge")
    assert {c.config.model for c in t2 + t4} == {"resnet20"} and {c.config.epochs for c in t2 + t4} == {20}
    assert {(c.config.amp, c.config.channels_last) for c in t2 + t4} == {("bf16", True)}
    # Every column of the spec the preset names (all of them where it names none), once, in the spec's order.
    spec2, preset2 = load_spec("table2"), load_spec("table2").preset("converge")
    named = preset2.columns or [c.id for c in spec2.columns]
    assert [c.column.id for c in t2] == [c.id for c in spec2.columns if c.id in named] and len(t2) >= 6
    assert sorted((c.config.splits, c.column.id) for c in t4) == [
        (2, "BP"), (2, "DGL"), (2, "FDG b=1"), (4, "BP"), (4, "DGL"), (4, "FDG b=1")]
    shared = {c.config.to_dict()["method"]: c.config for c in t4 if c.config.splits == 2}
    assert all(cfg in [c.config for c in t2] for cfg in shared.values())
    assert load_spec("table2").preset("converge").runs == load_spec("table4").preset("converge").runs


def test_converge_gpu_presets_are_the_converge_cells_on_a_gpu():
    """The GPU presets train the converge presets' cells with device cuda
    (Table 2 with a second seed) into their own shared folder."""
    for name, seeds in (("table2", 2), ("table4", 1)):
        spec = load_spec(name)
        cpu, gpu = spec.cells("converge", seeds=seeds), spec.cells("converge-gpu")
        assert [replace(c.config, device="cuda") for c in cpu] == [c.config for c in gpu], name
        assert spec.preset("converge-gpu").runs == "resnet20-converge-gpu" != spec.preset("converge").runs


def _fake_runs(spec_path, root):
    spec = load_spec(str(spec_path))
    wanted = {(r["row"], r["column"], r["seed"]): r for r in json.loads((GOLDEN / "fake_runs.json").read_text())["runs"]}
    for cell in spec.cells("smoke"):
        fake = wanted.get((cell.row.id, cell.column.id, cell.seed))
        if fake is None:
            continue
        run = RunDirectory.for_config(root, cell.config.to_dict())
        run.start(cell.config.to_dict(), {"seed": cell.seed})
        run.finish({"status": fake["status"], "final_test_error": fake["final"], "best_test_error": fake["best"],
                    "dataset": "synthetic 10-class patterns (not real images)"})
    # An unfinished run (no done file) counts as missing.
    extra = next(c for c in spec.cells("smoke") if (c.row.id, c.column.id, c.seed) == ("Tiny K=3", "BP", 0))
    RunDirectory.for_config(root, extra.config.to_dict()).start(extra.config.to_dict(), {})


def test_tables_from_run_directories_match_the_golden_files(tmp_path):
    spec = tmp_path / "golden.toml"
    shutil.copy(GOLDEN / "golden.toml", spec)
    _fake_runs(spec, tmp_path / "runs" / "golden-smoke")
    result = _cli("table", str(spec), "--preset", "smoke", "--out", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr
    # Tiny K=3's FDG cell has two runs, both diverged: an outcome, counted apart from the gaps.
    assert "3 of 6 cells have finished runs, 1 more only diverged ones;" in result.stdout
    for ext in ("md", "tex", "csv"):
        got = (tmp_path / "results" / f"golden-smoke.{ext}").read_text()
        assert got == (GOLDEN / f"golden-smoke.{ext}").read_text(), ext


@pytest.mark.parametrize("args,message", [
    (["table", "table9"], "no table spec 'table9'"),
    (["sweep", "table2", "--preset", "fast"], "table2 has no preset 'fast'; known: full, converge, converge-gpu, quick, smoke"),
    (["sweep", "status", "table2", "--seeds", "0"], "--seeds must be at least 1"),
])
def test_table_and_sweep_errors_are_one_line(args, message):
    result = _cli(*args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr


@needs_offline_cifar10()
def test_table2_smoke_preset_end_to_end(tmp_path):
    out, tables = tmp_path / "runs", tmp_path / "tables"
    dry = _cli("sweep", "table2", "--preset", "smoke", "--dry-run", "--out", str(out))
    assert dry.returncode == 0 and dry.stdout.count("missing ->") == 2, dry.stdout + dry.stderr
    swept = _cli("sweep", "table2", "--preset", "smoke", "--out", str(out), "--no-progress")
    assert swept.returncode == 0, swept.stderr
    status = _cli("sweep", "status", "table2", "--preset", "smoke", "--out", str(out))
    assert "2 done, 0 running, 0 incomplete, 0 missing (of 2)" in status.stdout
    again = _cli("sweep", "table2", "--preset", "smoke", "--out", str(out))  # done runs are skipped
    assert again.stdout.count(": done (finished)") == 2
    made = _cli("table", "table2", "--preset", "smoke", "--out", str(out), "--tables-dir", str(tables))
    assert made.returncode == 0, made.stderr
    md = (tables / "table2-smoke.md").read_text()
    assert "CIFAR-10, JPEG copy" in md and md.count("(n=1) / 7.78 / ") == 2  # BP vs the authors' rerun, twice
    assert "missing" not in md
    plotted = _cli("plot", "curves", "table2", "--preset", "smoke", "--out", str(out), "--plot-out",
                   str(tmp_path / "curves"))
    assert plotted.returncode == 0, plotted.stderr
    assert all((tmp_path / f"curves.{ext}").stat().st_size > 1000 for ext in ("png", "svg"))
    drawn = (tmp_path / "curves.svg").read_text()
    assert "BP (n=1)" in drawn and "FDG b=1 (n=1)" in drawn  # one line per column, its seeds counted


@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_wandb_logging_writes_local_run_files_offline_and_nothing_when_disabled(mode, tmp_path):
    result = subprocess.run([sys.executable, "-m", "fdgbench", "run", "--method", "bp", "--model", "tiny_resnet",
                             "--dataset", "synthetic", "--epochs", "2", "--max-steps", "10", "--wandb", "--out",
                             str(tmp_path), "--no-progress"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "WANDB_MODE": mode, "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr
    run = next(tmp_path.iterdir())
    assert RunDirectory(run).is_done and len(RunDirectory(run).metrics()) == 1  # the run directory stays the record
    logs = list(run.glob("wandb/offline-run-*/run-*.wandb"))
    if mode == "disabled":
        assert logs == []
    else:  # the offline log holds the config and the per-epoch metrics
        data = logs[0].read_bytes()
        assert b"tiny_resnet" in data and b"test_error" in data and b"train_loss" in data


def test_full_preset_prints_its_estimate_first_and_a_sweep_skips_done_runs(tmp_path):
    spec = tmp_path / "golden.toml"
    shutil.copy(GOLDEN / "golden.toml", spec)
    out = tmp_path / "runs"
    first = _cli("sweep", str(spec), "--preset", "full", "--out", str(out), "--no-progress")
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[1].startswith("estimated total: ") and "for 6 runs on this machine" in lines[1]
    assert first.stdout.count(": final test error") == 6
    status = _cli("sweep", "status", str(spec), "--preset", "full", "--out", str(out))
    assert "6 done, 0 running, 0 incomplete, 0 missing (of 6)" in status.stdout
    again = _cli("sweep", str(spec), "--preset", "full", "--out", str(out))
    assert again.stdout.count(": done (finished)") == 6 and "estimated total: 0.0 h for 0 runs" in again.stdout


def test_time_table_shows_seconds_per_epoch_and_speedups_over_bp(tmp_path):
    spec = load_spec("table6")
    root = tmp_path / "table6-smoke"
    rates = {"BP": 100.0, "FDG": 200.0, "DP": 160.0}  # images/s; the other cells stay missing
    for cell in spec.cells("smoke"):
        if cell.column.id in rates:
            run = RunDirectory.for_config(root, cell.config.to_dict())
            run.start(cell.config.to_dict(), {})
            run.finish({"status": "finished", "images_per_s": rates[cell.column.id], "final_test_error": 50.0,
                        "best_test_error": 50.0, "dataset": "CIFAR-10, JPEG copy"})
    result = _cli("table", "table6", "--preset", "smoke", "--out", str(tmp_path), "--tables-dir", str(tmp_path / "t"))
    assert result.returncode == 0, result.stderr
    md = (tmp_path / "t" / "table6-smoke.md").read_text()
    # 50,000 images at 100 img/s = 500 s per epoch; the paper's FDG 29.6 s against its BP 30.2 s = 1.02x.
    assert "| 500.0 s (1.00x) (n=1) / 30.2 s (1.00x) |" in md
    assert "| 250.0 s (2.00x) (n=1) / 29.6 s (1.02x) |" in md and "312.5 s (1.60x) (n=1) / 32.5 s (0.93x)" in md
    assert md.count("missing / ") == 3
    csv_rows = (tmp_path / "t" / "table6-smoke.csv").read_text().splitlines()
    assert csv_rows[0].startswith("table,preset,row,column") and len(csv_rows) == 7


@pytest.mark.parametrize("kind,table", [("beta", "ablation_beta"), ("bars", "ablation_staleness"), ("k", "deep_k")])
def test_ablation_plots_from_run_directories(kind, table, tmp_path):
    spec = load_spec(table)
    for i, cell in enumerate(spec.cells("smoke")):
        run = RunDirectory.for_config(tmp_path / f"{table}-smoke", cell.config.to_dict())
        run.start(cell.config.to_dict(), {})
        run.finish({"status": "finished", "final_test_error": 40.0 + i, "best_test_error": 39.0 + i, "dataset": "x"})
    result = _cli("plot", kind, table, "--preset", "smoke", "--out", str(tmp_path), "--plot-out", str(tmp_path / "p"))
    assert result.returncode == 0, result.stderr
    assert all((tmp_path / f"p.{ext}").stat().st_size > 1000 for ext in ("png", "svg"))
    drawn = (tmp_path / "p.svg").read_text()
    expected = ({f"{r.id} (ours)" for r in spec.rows if r.id in (spec.preset("smoke").rows or [r.id])}
                if kind == "beta" else {c.column.id for c in spec.cells("smoke")})
    if kind == "k":  # and a dashed line for each column with published numbers
        expected |= {f"{c.column.paper[-1]} (published)" for c in spec.cells("smoke") if c.row.paper.get(
            c.column.paper[-1] if c.column.paper else None) is not None}
        assert any("(published)" in label for label in expected)
    assert all(label in drawn for label in expected), expected  # a line per row / per column / a bar per column
    empty = _cli("plot", kind, table, "--preset", "smoke", "--out", str(tmp_path / "none"))
    assert empty.returncode == 2 and "no finished runs to plot" in empty.stderr


def test_plot_titles_are_wrapped_at_their_width_keeping_every_word_and_line_break():
    """A spec's title (the longest is deep_k's, 160+ characters) is wrapped so
    that a figure does not cut it; the words and the caller's own line breaks
    are kept."""
    from fdgbench.report.plots import TITLE_WIDTH, wrapped_title

    title = max((load_spec(t).title for t in ("deep_k", "since_fdg", "table2")), key=len) + "\nsecond line"
    assert len(title.split("\n")[0]) > TITLE_WIDTH  # else nothing here is wrapped
    wrapped = wrapped_title(title)
    assert all(len(line) <= TITLE_WIDTH for line in wrapped.split("\n"))
    assert wrapped.split() == title.split() and wrapped.endswith("\nsecond line")
    assert wrapped.count("\n") > title.count("\n")
    # A narrower figure (the diagnostics grid at K = 2 is 6.4 inches wide) passes its own width.
    narrow = wrapped_title(title, 77)
    assert all(len(line) <= 77 for line in narrow.split("\n")) and narrow.split() == title.split()


def test_speedup_plot_draws_simulated_lines_and_measured_time_table_points(tmp_path):
    spec = load_spec("table6")
    rates = {"bp": 100.0, "fdg": 190.0}
    for cell in spec.cells("smoke"):
        if cell.column.method in rates:  # ResNet-56 K=2 runs, as a table6 sweep leaves them
            run = RunDirectory.for_config(tmp_path / "runs" / "table6-smoke", cell.config.to_dict())
            run.start(cell.config.to_dict(), {})
            run.finish({"status": "finished", "images_per_s": rates[cell.column.method], "dataset": "x",
                        "final_test_error": 50.0, "best_test_error": 50.0})
    result = _cli("plot", "speedup", "--model", "resnet56", "--splits", "2,3", "--methods", "bp,fdg", "--preset",
                  "smoke", "--out", str(tmp_path / "runs"), "--batch-size", "8", "--plot-out", str(tmp_path / "s"),
                  cwd=tmp_path)  # the block profile is measured and saved under tmp_path/results/profiles
    assert result.returncode == 0, result.stderr
    assert all((tmp_path / f"s.{ext}").stat().st_size > 1000 for ext in ("png", "svg"))
    assert (tmp_path / "results/profiles/resnet56-b8-cpu-t1.json").is_file()
    assert "measured, table6 smoke runs (2 points)" in (tmp_path / "s.svg").read_text()


def test_stability_map_counts_divergences_and_compares_losses_with_bp(tmp_path, cli):
    """The stability measure: per cell, diverged seeds of those run and the
    survivors' median last-epoch training loss against BP's; CSV, Markdown
    and the plot come from the same run directories."""
    spec_file = tmp_path / "stab.toml"
    spec_file.write_text("""title = "Stab"
dataset = "synthetic"
measure = "stability"
[[columns]]
id = "BP"
method = "bp"
[[columns]]
id = "legacy, linear"
method = "fdg"
options = { staleness = "legacy" }
run = { warmup_epochs = 1, warmup = "linear" }
[[rows]]
id = "Tiny K=2"
model = "tiny_resnet"
splits = 2
paper = {}
[presets.map]
epochs = 4
seeds = 3
footnotes = ["A note of this preset only."]
""")
    spec = load_spec(str(spec_file))
    root = tmp_path / "runs" / "stab-map"
    # Per seed: the epochs' mean training losses (None: diverged). Seed 3 of the FDG column blew up
    # (an epoch above 10 x ln(10) = 23.0) and finished at a loss that would otherwise count.
    losses = {("BP", 0): [2.5, 1.0], ("BP", 1): [2.6, 1.2], ("BP", 2): [3.0, 1.1],
              ("legacy, linear", 0): [2.4, 1.5], ("legacy, linear", 1): None, ("legacy, linear", 2): [23.5, 1.3],
              ("legacy, linear", 3): [2.9, 1.3]}
    for cell in spec.cells("map", seeds=4):
        curve = losses.get((cell.column.id, cell.seed))
        if cell.column.id == "BP" and cell.seed == 3:
            continue
        run = RunDirectory.for_config(root, cell.config.to_dict())
        run.start(cell.config.to_dict(), {})
        for epoch, loss in enumerate(curve or [], 1):
            run.append_metrics({"epoch": epoch, "train_loss": loss})
        run.finish({"status": "diverged" if curve is None else "finished",
                    "final_train_loss": None if curve is None else curve[-1], "dataset": "synthetic"})
    status, out, err = cli("table", str(spec_file), "--preset", "map", "--seeds", "4", "--out", tmp_path / "runs",
                           "--tables-dir", tmp_path / "tables")
    assert status == 0, err
    md = (tmp_path / "tables" / "stab-map.md").read_text()
    assert "| Tiny K=2 | 2 |" in md
    # BP: seed 3 missing, median of 1.0, 1.2, 1.1; FDG: seeds 0 and 3 survive (1.5, 1.3).
    assert ("| 0/4 diverged, 0 blew up; loss 1.100 | 1/4 diverged, 1 blew up; loss 1.400 (+0.300 vs BP) |"
            in md)
    assert "Notes:\n\n1. A note of this preset only.\n" in md
    rows = list(csv.DictReader(io.StringIO((tmp_path / "tables" / "stab-map.csv").read_text())))
    assert [(r["column"], r["warmup"], r["runs_diverged"], r["runs_blew_up"], r["survivors_final_train_loss_median"])
            for r in rows] == [("BP", "none", "0", "0", "1.1000"), ("legacy, linear", "linear x1", "1", "1", "1.4000")]
    status, out, err = cli("plot", "stability", str(spec_file), "--preset", "map", "--seeds", "4", "--out",
                           tmp_path / "runs", "--plot-out", tmp_path / "stab")
    assert status == 0, err
    assert (tmp_path / "stab.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_time_to_accuracy_is_iterations_to_bp_final_error_times_measured_speed(tmp_path, cli):
    """Iterations come from the runs' epoch records (the first epoch at or
    below BP's final error), seconds per iteration from the preset's speed
    file; a run that never gets there says so."""
    spec_file = tmp_path / "tta.toml"
    spec_file.write_text("""title = "TTA"
dataset = "synthetic"
[[columns]]
id = "BP"
method = "bp"
[[columns]]
id = "FDG"
method = "fdg"
[[columns]]
id = "DGL"
method = "dgl"
[[rows]]
id = "Tiny K=2"
model = "tiny_resnet"
splits = 2
paper = {}
[presets.p]
epochs = 4
speed = "speed.json"
""")
    (tmp_path / "speed.json").write_text(json.dumps({
        "hardware": "a test CPU", "workers": "bp: 1 x 2; others: K x 1", "amp": "off", "channels_last": False,
        "measured": "today", "seconds_per_iteration": {"bp": 0.1, "fdg K=2": 0.06, "dgl K=2": 0.05}}))
    spec = load_spec(str(spec_file))
    curves = {"BP": [50.0, 30.0, 20.0, 20.0], "FDG": [45.0, 25.0, 19.0, 18.0], "DGL": [60.0, 40.0, 30.0, 25.0]}
    for cell in spec.cells("p"):
        run = RunDirectory.for_config(tmp_path / "runs" / "tta-p", cell.config.to_dict())
        run.start(cell.config.to_dict(), {})
        for epoch, error in enumerate(curves[cell.column.id], 1):
            run.append_metrics({"epoch": epoch, "iteration": 100 * epoch, "test_error": error})
        run.finish({"status": "finished", "final_test_error": error, "best_test_error": min(curves[cell.column.id]),
                    "dataset": "synthetic"})
    status, out, err = cli("table", str(spec_file), "--preset", "p", "--out", tmp_path / "runs", "--tables-dir",
                           tmp_path / "tables")
    assert status == 0, err
    md = (tmp_path / "tables" / "tta-p.md").read_text()
    # BP reaches its own final 20.0 at iteration 300 (30 s); FDG at 300 too, at 0.06 s/iteration (18 s).
    assert "| Tiny K=2 | 2 | 300 it x 100 ms = 0.5 min (1.00x BP) | 300 it x 60 ms = 0.3 min (0.60x BP) | not reached |" in md
    assert "a test CPU" in md
    rows = {r["column"]: r for r in csv.DictReader(io.StringIO((tmp_path / "tables" / "tta-p.csv").read_text()))}
    assert (rows["FDG"]["iterations_to_bp_final"], rows["FDG"]["seconds_to_bp_final"], rows["FDG"]["ratio_to_bp"]) \
        == ("300", "18.0000", "0.6000")
    assert rows["DGL"]["iterations_to_bp_final"] == "" and rows["DGL"]["seconds_per_iteration"] == "0.0500"
    status, out, err = cli("plot", "curves", str(spec_file), "--preset", "p", "--out", tmp_path / "runs", "--time",
                           "--plot-out", tmp_path / "tta")
    assert status == 0, err
    assert (tmp_path / "tta.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rows_columns_limit_its_cells_and_the_table_marks_the_rest(tmp_path):
    """since_fdg: PETRA runs only on the reversible rows, GPipe, 2BW and prediction only on the ResNet rows;
    the cells the rows leave out are not runs (not "missing") and the table prints n/a for them. Its converge
    cells share the converge runs of Tables 2/4 (the BP and FDG cells already trained)."""
    from fdgbench.models import build_model
    from fdgbench.method import make_method
    from fdgbench.report.tables import NOT_RUN, write_tables

    spec = load_spec("since_fdg")
    preset = spec.preset("converge")
    cells = spec.cells(preset)
    for cell in cells:  # every cell is a run its method accepts
        assert cell.row.runs(cell.column.id)
        with torch.device("meta"):
            assert make_method(cell.config.method).check_model(build_model(cell.config.model)) is None
    rows = [r for r in spec.rows if r.id in preset.rows]
    assert len(cells) == sum(len(r.columns) for r in rows) < len(rows) * len(spec.columns)
    t4 = load_spec("table4").cells("converge")
    ours = [c.config for c in cells]
    assert all(c.config in ours for c in t4 if c.column.method == "bp" or c.column.id == "FDG b=1")
    assert preset.runs == load_spec("table4").preset("converge").runs
    paths, *_ = write_tables(preset, cells, tmp_path / "runs", tmp_path, 10)
    markdown = next(p for p in paths if p.suffix == ".md").read_text()
    petra_row = next(line for line in markdown.splitlines() if line.startswith("| ResNet-20, K=2 |"))
    assert petra_row.rstrip(" |").endswith(NOT_RUN) and petra_row.count("missing") == 5


def test_a_row_naming_an_unknown_column_is_one_line(tmp_path):
    from fdgbench.errors import UserError

    text = Path(spec_path("since_fdg")).read_text().replace('columns = ["BP", "FDG b=1", "PETRA"]',
                                                              'columns = ["BP", "PETRA!"]', 1)
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError, match="row 'RevNet-20, K=2' columns lists unknown 'PETRA!'"):
        load_spec(str(path))


def test_a_speed_counts_for_the_options_it_was_measured_at_and_its_model():
    """Speeds.per_iteration: "gpipe[microbatches=4] K=2" is GPipe at M = 4 only, "fdg K=2" FDG at its defaults
    (given or not), "fdg[predict=spectrain]" FDG predicting; each record counts for its own model."""
    from fdgbench.report.results import Speeds

    common = {"hardware": "cpu", "workers": "w", "amp": "bf16", "channels_last": True, "measured": "today"}
    speeds = Speeds(({**common, "model": "resnet20", "seconds_per_iteration": {
        "bp": 0.1, "fdg K=2": 0.06, "gpipe[microbatches=4] K=2": 0.08, "fdg[predict=spectrain] K=2": 0.07}},
                     {**common, "model": "revnet20", "seconds_per_iteration": {"bp": 0.09, "petra K=2": 0.05}}))
    assert speeds.per_iteration("bp", {}, "resnet20", 4) == 0.1  # BP: one process, whatever K its run split into
    assert speeds.per_iteration("fdg", {}, "resnet20", 2) == 0.06
    assert speeds.per_iteration("fdg", {"beta": 1.0, "staleness": "legacy"}, "resnet20", 2) == 0.06
    assert speeds.per_iteration("fdg", {"beta": 0.2}, "resnet20", 2) == 0.06  # beta does not change the time
    assert speeds.per_iteration("fdg", {"staleness": "replay"}, "resnet20", 2) is None  # replay recomputes
    assert speeds.per_iteration("fdg", {"beta": 1.0, "predict": "spectrain"}, "resnet20", 2) == 0.07
    assert speeds.per_iteration("fdg", {}, "resnet20", 4) is None
    assert speeds.per_iteration("gpipe", {"microbatches": 4}, "resnet20", 2) == 0.08
    assert speeds.per_iteration("gpipe", {"microbatches": 8}, "resnet20", 2) is None
    assert speeds.per_iteration("gpipe", {}, "resnet20", 2) is None  # the default M = 2 was not measured
    assert speeds.per_iteration("bp", {}, "revnet20", 2) == 0.09
    assert speeds.per_iteration("petra", {}, "revnet20", 2) == 0.05
    assert speeds.per_iteration("petra", {}, "resnet20", 2) is None
    assert speeds["hardware"] == "cpu" and speeds.get("model") == "resnet20, revnet20"
    old = Speeds(({**common, "model": "resnet20", "seconds_per_iteration": {"fdg[gone=1] K=2": 0.06}},))
    assert old.per_iteration("fdg", {}, "resnet20", 2) is None  # a label naming an option no method has


def test_a_presets_speed_records_must_share_their_machine(tmp_path):
    """Two records measured on different machines (or precisions) would put two clocks in one time column."""
    from fdgbench.errors import UserError
    from fdgbench.report.tables import load_speed

    common = {"workers": "w", "amp": "bf16", "channels_last": True, "measured": "today",
              "seconds_per_iteration": {"bp": 0.1}}
    (tmp_path / "a.json").write_text(json.dumps({**common, "model": "resnet20", "hardware": "cpu A"}))
    (tmp_path / "b.json").write_text(json.dumps({**common, "model": "revnet20", "hardware": "cpu B"}))
    spec_file = tmp_path / "s.toml"
    spec_file.write_text(Path(spec_path("since_fdg")).read_text().replace(
        'speed = ["results/speed-resnet20-bf16-cl-xeon.json", "results/speed-revnet20-bf16-cl-xeon.json"]',
        'speed = ["a.json", "b.json"]'))
    preset = load_spec(str(spec_file)).preset("converge")
    assert preset.speed == ("a.json", "b.json")
    with pytest.raises(UserError, match="b.json was measured with another hardware, workers, amp, channels_last"):
        load_speed(preset)
    (tmp_path / "b.json").write_text(json.dumps({**common, "model": "revnet20", "hardware": "cpu A"}))
    assert load_speed(preset).get("model") == "resnet20, revnet20"
