"""Input that used to be accepted and then misbehaved: each is refused with one
``error:`` line and exit 2 (or handled correctly), and leaves nothing behind."""
import pytest
import torch

from fdgbench.data import load_image_folder
from fdgbench.method import make_method
from fdgbench.schedule import steps_until_every_stage_updates
from fdgbench.config import RunConfig
from fdgbench.plan import check_config
from fdgbench.errors import UserError

from .conftest import ROOT
from .test_data import _make_tree, _write_png

TINY = ["--model", "tiny_resnet", "--dataset", "synthetic", "--batch-size", "32", "--train-subset", "256",
        "--test-subset", "64", "--epochs", "2", "--threads", "1", "--no-progress"]


def _one_error(status, err, message):
    assert status == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err


def _run_refused(cli, tmp_path, args, message):
    """`fdgbench run` on the tiny net with ``args``: one error line holding ``message``, exit 2, nothing written."""
    status, _, err = cli("run", *TINY, *args, "--out", tmp_path)
    _one_error(status, err, message)
    assert not any(tmp_path.iterdir())


def test_adding_an_image_to_a_folder_dataset_invalidates_its_cache(tmp_path):
    tree = _make_tree(tmp_path / "imgs")
    before = load_image_folder(tree, tmp_path / "cache")
    # Inside a class folder: the top directory's size and mtime do not change.
    _write_png(tree / "train" / "a_dog" / "new.png", torch.full((3, 8, 8), 7, dtype=torch.uint8))
    after = load_image_folder(tree, tmp_path / "cache")
    assert len(after.train_labels) == len(before.train_labels) + 1
    assert after.train_labels.tolist().count(0) == 4
    assert any(torch.equal(img, torch.full((3, 8, 8), 7, dtype=torch.uint8)) for img in after.train_images)


def test_a_single_class_folder_is_refused_and_leaves_no_run_directory(cli, tmp_path):
    tree = _make_tree(tmp_path / "imgs", classes=("only",))
    out = tmp_path / "results"
    status, _, err = cli("run", "--method", "bp", *TINY[:2], "--dataset", f"folder:{tree}", "--data-dir",
                         tmp_path / "cache", "--out", out)
    _one_error(status, err, "a classifier needs at least 2")
    # A data error used to leave an empty run directory that `sweep status` counted as incomplete.
    assert not out.exists() or not any(out.iterdir())


def test_an_empty_folder_path_is_refused(cli):
    _one_error(*cli("run", *TINY[:2], "--dataset", "folder:")[::2], "folder:PATH needs a path")


@pytest.mark.parametrize("args,message", [
    (["--lr", "inf"], "--lr must be a positive finite number, got inf"),
    (["--lr", "nan"], "--lr must be a positive finite number, got nan"),
    (["--weight-decay", "inf"], "--weight-decay must be a non-negative finite number, got inf"),
    (["--warmup-epochs", "2"], "--warmup-epochs 2 covers all 2 epoch(s)"),
    (["--split-at", "L2.0", "--partition", "flops"], "--partition flops would be ignored"),
    (["-K", "5", "--max-steps", "4"], "fdg with K=5 updates every stage only from iteration 8 on, so the run "
                                      "needs at least 9 iterations; --max-steps is 4"),
])
def test_values_that_would_run_wrongly_are_refused(cli, args, message):
    _one_error(*cli("run", "--method", "fdg", *TINY, *args)[::2], message)


@pytest.mark.parametrize("args,message", [
    # 256 images / 32 = 8 iterations per epoch: a 1-epoch warm-up covers a 4-iteration run.
    (["--method", "bp", "--epochs", "10", "--warmup-epochs", "1", "--max-steps", "4"],
     "--warmup-epochs 1 (8 iterations) covers all 4 iterations"),
    # One epoch of 2 iterations: FDG K=3's first stage would never update.
    (["--method", "fdg", "-K", "3", "--epochs", "1", "--train-subset", "64"],
     "needs at least 5 iterations; --epochs 1 of 2 iteration(s) each give 2"),
])
def test_budgets_too_short_for_the_data_are_refused_before_training(cli, tmp_path, args, message):
    status, _, err = cli("run", *TINY, *args, "--out", tmp_path)
    _one_error(status, err, message)
    assert not any(tmp_path.iterdir())  # no empty run directory left behind


@pytest.mark.parametrize("method,expected", [
    ("bp", [1, 1, 1]), ("fdg", [1, 3, 5]), ("ddg", [1, 2, 3]), ("fr", [1, 2, 3]), ("dgl", [1, 1, 1]),
])
def test_first_update_of_every_stage_comes_from_the_schedule(method, expected):
    # FDG's stage 0 back-propagates batch t - 2(K-1); DDG's and FR's stage 0 batch t - (K-1).
    assert [steps_until_every_stage_updates(make_method(method).schedule, k) for k in (1, 2, 3)] == expected


def test_a_run_exactly_as_deep_as_the_pipeline_and_explicit_split_points_are_accepted():
    check_config(RunConfig(method="fdg", model="tiny_resnet", splits=3, max_steps=5))
    for partition in ("auto", "explicit"):
        check_config(RunConfig(model="tiny_resnet", splits=2, partition=partition, split_at=("L2.0",)))


def _spec(tmp_path, old, new):
    text = (ROOT / "paper_tables" / "table2.toml").read_text()
    assert old in text
    path = tmp_path / "typo.toml"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize("old,new,message", [
    ("[presets.smoke]\n", "[presets.smoke]\nepoch = 3\n",
     "[presets.smoke] has unknown key(s) epoch; known: description, rows, columns, seeds, fallback_dataset, epochs"),
    ('id = "FR"\n', 'id = "FR"\nbeta_form_row = true\n', "column 'FR' has unknown key(s) beta_form_row"),
    ('id = "ResNet-20"\n', 'id = "ResNet-20"\nsplit = 3\n', "row 'ResNet-20' has unknown key(s) split"),
    ('options = { staleness = "legacy" }', 'options = { stalenes = "legacy" }',
     "column 'DDG' options: --stalenes is an option of no method"),
    ('rows = ["ResNet-20"]', 'rows = ["ResNet-2O"]', "rows lists unknown 'ResNet-2O'"),
    ("[presets.smoke]\n", "[presets.smoke]\nwarmup_epochs = \"3\"\n", "warmup_epochs must be an integer, got '3'"),
    ("[presets.smoke]\n", "[presets.smoke]\nruns = \"../elsewhere\"\n", "runs must be one folder name (no '/')"),
    ("[presets.smoke]\n", "[presets.smoke]\nruns = 5\n", "runs must be one folder name (no '/'), got 5"),
    ("[presets.smoke]\n", "[presets.smoke]\nspeed = \"/abs/s.json\"\n", "speed must be a path relative to the spec"),
    ("[presets.smoke]\n", "[presets.smoke]\nfootnotes = \"one\"\n", "footnotes must be a list of strings"),
    ("[presets.smoke]\n", "[presets.smoke]\nchannels_last = 1\n", "channels_last must be true or false, got 1"),
    ('reference = "BP"', 'reference = "bp"', "reference 'bp' names no column; columns: BP, DDG"),
    ('reference = "BP"', 'measure = "speed"', "measure must be one of error, time, stability, got 'speed'"),
])
def test_spec_typos_name_the_file_the_table_and_the_key(cli, tmp_path, old, new, message):
    path = _spec(tmp_path, old, new)
    status, _, err = cli("table", path, "--preset", "smoke", "--out", tmp_path / "results")
    _one_error(status, err, message)
    assert str(path) in err


def test_a_bad_spec_value_names_the_spec_key_not_a_flag(cli, tmp_path):
    path = _spec(tmp_path, "[presets.smoke]\n", "[presets.smoke]\nwarmup_epochs = 5\n")
    status, _, err = cli("sweep", path, "--preset", "smoke", "--dry-run", "--out", tmp_path / "results")
    _one_error(status, err, f"{path}, preset 'smoke', row 'ResNet-20', column 'BP': warmup_epochs 5 covers all")
    assert "--warmup-epochs" not in err


@pytest.mark.parametrize("command", [["bench", "simulate"], ["plot", "speedup"]])
def test_an_unknown_model_is_refused_before_any_profiling(cli, command, tmp_path):
    status, out, err = cli(*command, "--model", "nope", "--splits", "2", "--methods", "bp")
    _one_error(status, err, "unknown model 'nope'")
    assert "profiling" not in out + err


def test_divergence_names_the_window_the_loss_turned_in(cli, tmp_path):
    # 8 iterations in one epoch: the loss is read once, after iteration 7.
    status, _, err = cli("run", "--method", "bp", *TINY, "--epochs", "1", "--lr", "1e30", "--out", tmp_path)
    assert status == 3, err
    assert err.splitlines()[-1].startswith("diverged: training loss is nan by iteration 7 (first non-finite in "
                                           "iterations 0-7; the loss is checked every 50 iterations)")


@pytest.mark.parametrize("args,env,message", [
    # Seeds are 32-bit (numpy's generator, and a stage's seed * 1009 + k + 1 must stay in int64).
    (["--seed", "1180591620717411303424"], {}, "--seed must be in [0, 4294967295], got 1180591620717411303424"),
    (["--seed", "-1"], {}, "--seed must be in [0, 4294967295], got -1"),
    (["--engine", "distributed"], {"FDGBENCH_DIST_TIMEOUT": "abc"},
     "FDGBENCH_DIST_TIMEOUT must be a positive number of seconds, got 'abc'"),
    (["--engine", "distributed"], {"FDGBENCH_DIST_TIMEOUT": "0"},
     "FDGBENCH_DIST_TIMEOUT must be a positive number of seconds, got '0'"),
    # dp's -K counts replicas: the old message said "give 0 cut points or drop --splits".
    (["--method", "dp", "-K", "2", "--split-at", "L2.0"], {},
     "dp places 1 stage(s) x 2 replica(s) (--splits 2 counts its replicas), so there is nothing to cut: drop --split-at"),
])
def test_bad_values_and_environment_are_one_line_before_anything_runs(cli, tmp_path, monkeypatch, args, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    status, _, err = cli("run", "--method", "fdg", *TINY, *args, "--out", tmp_path)
    _one_error(status, err, message)
    assert not any(tmp_path.iterdir())


def test_a_schedule_with_more_stages_than_any_model_is_refused_at_once(cli):
    # It used to validate 400,000 iterations of 100,000 stages (hours) before printing anything.
    _one_error(*cli("schedule", "show", "--method", "fdg", "--splits", "100000", "--iterations", "3")[::2],
               "--splits 100000 is more stages than any model has blocks (at most 602")


def test_an_interrupted_command_that_trains_nothing_promises_no_resume(cli, monkeypatch):
    import signal

    from fdgbench import schedule
    from fdgbench.cli import Terminated

    def stopped(*args, **kwargs):
        raise Terminated(signal.SIGTERM)

    monkeypatch.setattr(schedule, "format_grid", stopped)
    status, _, err = cli("schedule", "show", "--method", "fdg", "--splits", "2")
    assert status == 128 + signal.SIGTERM and err.strip() == "interrupted"  # click writes a newline first


def test_a_folder_dataset_with_other_image_sizes_in_test_is_refused(tmp_path):
    tree = _make_tree(tmp_path / "imgs")
    for i, png in enumerate(sorted((tree / "test").rglob("*.png"))):  # train 8x8, test 24x24
        _write_png(png, torch.full((3, 24, 24), i, dtype=torch.uint8))
    with pytest.raises(UserError, match=r"train/ images are \(3, 8, 8\) and test/ images \(3, 24, 24\)"):
        load_image_folder(tree, tmp_path / "cache")


def test_an_empty_class_folder_is_named_as_such(tmp_path):
    tree = _make_tree(tmp_path / "imgs")
    for png in (tree / "test" / "a_dog").iterdir():
        png.unlink()
    with pytest.raises(UserError, match="test/ has no images of class.es. a_dog that train/ has"):
        load_image_folder(tree, tmp_path / "cache")
