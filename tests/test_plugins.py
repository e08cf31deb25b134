"""Methods as plug-ins: methods/ imported without a list, in a stable order;
a method from outside the package loaded by --plugin (a .py file or a
module), FDGBENCH_PLUGINS (which spawned ranks read) and an entry point;
clashing definitions and broken plug-ins as one error line; compare's
per-method options and schedule show's method flags; the README's table and
docs/layout.md's worked example checked against the code."""
import os
import pkgutil
import re
import subprocess
import sys
import textwrap

import pytest

import methods
from fdgbench import method as registry
from fdgbench.cli.options import method_entries
from fdgbench.config import RunConfig
from fdgbench.data import synthetic_dataset
from fdgbench.method import PLUGINS_ENV, all_methods, make_method
from fdgbench.runs import RunDirectory
from fdgbench.schedule import format_grid
from fdgbench.train import build_run

from .conftest import ROOT

PLUGIN = ROOT / "tests" / "plugins" / "fdg_lrscale.py"
TINY = ["--model", "tiny_resnet", "--dataset", "synthetic", "--batch-size", "32", "--train-subset", "128",
        "--test-subset", "32", "--epochs", "1", "--max-steps", "3", "--threads", "1", "--no-progress"]


@pytest.fixture
def isolated(monkeypatch):
    """What a test's plug-ins register, load and set is undone after it:
    other tests list every registered method (and a module imported by name
    would not register again once cached)."""
    monkeypatch.setattr(registry, "_REGISTRY", list(registry._REGISTRY))
    monkeypatch.setattr(registry, "_LOADED_PLUGINS", set(registry._LOADED_PLUGINS))
    monkeypatch.setattr(registry, "_entry_points_loaded", registry._entry_points_loaded)
    monkeypatch.setenv(PLUGINS_ENV, "")  # recorded, so what --plugin writes there is undone
    before = set(sys.modules)
    yield monkeypatch
    for name in set(sys.modules) - before:
        if name.startswith("fdgbench_plugin_") or name in ("fdg_lrscale", "plain_bp"):
            del sys.modules[name]


def _one_error(status, err, message):
    assert status == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err


def _only_run(out):
    (path,) = [p for p in out.iterdir() if p.is_dir()]
    return RunDirectory(path)


# -- the methods package -----------------------------------------------------------------------

def test_every_module_of_the_methods_package_is_imported_and_listed_in_the_documented_order():
    assert all(f"methods.{m.name}" in sys.modules for m in pkgutil.iter_modules(methods.__path__))
    built_in = [m.name for m in all_methods() if m.__module__.startswith("methods.")]
    # The methods of earlier releases keep their listing order wherever new ones slot in (a property, so adding a
    # method to methods/ changes no test).
    earlier = ["bp", "fdg", "ddg", "fr", "dgl", "dni", "cdni", "adl", "dp"]
    assert [name for name in built_in if name in earlier] == earlier
    orders = [m.order for m in all_methods()]
    assert orders == sorted(orders)


# -- --plugin FILE, run and compare ------------------------------------------------------------

def test_a_plugin_file_adds_a_method_with_its_option_to_list_and_run(cli, isolated, tmp_path):
    status, out, err = cli("--plugin", PLUGIN, "list", "methods")
    assert status == 0, err
    assert "fdg_lrscale breaks: forward, backward, update" in out and "--stage-lr-decay default 1.0" in out
    assert os.environ[PLUGINS_ENV] == str(PLUGIN)  # for the processes a command starts
    status, out, err = cli("--plugin", PLUGIN, "run", "--method", "fdg_lrscale", "--stage-lr-decay", "0.5", *TINY,
                           "--out", tmp_path)
    assert status == 0, err
    assert _only_run(tmp_path).read_json("config.json")["method_options"]["stage_lr_decay"] == 0.5
    # The option reaches the workers: stage k's lr scale is 0.5^(K-1-k).
    cfg = RunConfig(method="fdg_lrscale", method_options={"stage_lr_decay": 0.5}, model="tiny_resnet", splits=3,
                    dataset="synthetic", batch_size=32, epochs=1)
    trainer = build_run(cfg, dataset=synthetic_dataset(10, train=32 * 5, test=32))
    assert [w.lr_scale for w in trainer.workers] == [0.25, 0.5, 1.0]


def test_compare_gives_each_entry_its_own_options_over_the_global_flags(cli, isolated, tmp_path):
    status, out, err = cli("--plugin", PLUGIN, "compare", "--methods",
                           "fdg, fdg[beta=0.5,staleness=stash], fdg_lrscale[stage-lr-decay=0.5]", "--beta", "0.9",
                           *TINY, "--out", tmp_path)
    assert status == 0, err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    labels = [line.split()[0] for line in lines[header + 1:header + 4]]
    assert labels == ["fdg(beta=0.9,staleness=legacy)", "fdg(beta=0.5,staleness=stash)",
                      "fdg_lrscale(beta=0.9,staleness=legacy,stage_lr_decay=0.5)"]


def test_spawned_ranks_load_the_plugin_the_command_line_named(cli, isolated, tmp_path):
    """The ranks are fresh processes (spawn): they know fdg_lrscale only
    through FDGBENCH_PLUGINS, which --plugin set."""
    status, out, err = cli("--plugin", PLUGIN, "run", "--method", "fdg_lrscale", "--engine", "distributed", "-K", "2",
                           *TINY, "--out", tmp_path)
    assert status == 0, err
    assert "fdg_lrscale tiny_resnet K=2: final test error" in out
    assert _only_run(tmp_path).read_json("config.json")["engine"] == "distributed"


@pytest.mark.parametrize("how", ["--plugin", PLUGINS_ENV])
def test_a_module_on_sys_path_is_a_plugin_by_the_option_or_the_environment(cli, isolated, how):
    isolated.syspath_prepend(str(PLUGIN.parent))
    args = ["--plugin", "fdg_lrscale"] if how == "--plugin" else []
    if how == PLUGINS_ENV:
        isolated.setenv(PLUGINS_ENV, "fdg_lrscale")
    status, out, err = cli(*args, "schedule", "show", "--method", "fdg_lrscale", "--stage-lr-decay", "0.5",
                           "-K", "2", "--iterations", "4")
    assert status == 0, err
    assert format_grid(make_method("fdg").schedule, 2, 4) in out  # FDG's schedule


# -- entry points ------------------------------------------------------------------------------

def _distribution(root, entry_points: str, name: str = "fdgbench_test_plugin"):
    """An installed distribution as importlib.metadata finds one on sys.path: a dist-info folder."""
    info = root / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[fdgbench.methods]\n{entry_points}\n")


def test_an_entry_point_module_is_loaded_by_a_fresh_process(tmp_path):
    site = tmp_path / "site"
    _distribution(site, "fdg_lrscale = fdg_lrscale")
    (site / "fdg_lrscale.py").write_text(PLUGIN.read_text())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    env.pop(PLUGINS_ENV, None)
    proc = subprocess.run([sys.executable, "-m", "fdgbench", "run", "--method", "fdg_lrscale", *TINY,
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "fdg_lrscale tiny_resnet K=2: final test error" in proc.stdout


PLAIN_BP = '''
from methods.bp import BP


class Plain(BP):  # not decorated: its entry point registers it
    name = "plain_bp"
    summary = "BP, registered by an entry point naming the class"

NOT_A_METHOD = 3
'''


@pytest.mark.parametrize("value,message", [
    ("plain_bp:Plain", None),
    ("plain_bp:NOT_A_METHOD", "entry point 'p = plain_bp:NOT_A_METHOD' (fdgbench.methods) names neither a module "
                              "nor a Method class"),
    ("no_such_module", "entry point 'p = no_such_module' (fdgbench.methods) failed to import: ModuleNotFoundError"),
])
def test_an_entry_point_names_a_method_class_or_is_one_error_line(cli, isolated, tmp_path, value, message):
    _distribution(tmp_path, f"p = {value}")
    (tmp_path / "plain_bp.py").write_text(PLAIN_BP)
    isolated.syspath_prepend(str(tmp_path))
    isolated.setattr(registry, "_entry_points_loaded", False)
    status, out, err = cli("list", "methods")
    if message:
        _one_error(status, err, message)
    else:
        assert status == 0 and "\nplain_bp breaks: none " in out, err


# -- definitions that clash, plug-ins that break ------------------------------------------------

def _method_file(tmp_path, options="", name="foo", breaks=()):
    path = tmp_path / "foo_plugin.py"
    path.write_text(textwrap.dedent(f'''
        from fdgbench.method import Method, MethodOption, register
        from methods.bp import BP

        @register
        class Foo(BP):
            name = {name!r}
            summary = "a plug-in whose definitions clash"
            breaks = {breaks!r}
            options = ({options})
    '''))
    return path


@pytest.mark.parametrize("definition,command,message", [
    (dict(options='MethodOption("lr", float, 0.1, "x"),'), ["list", "methods"],
     "method 'foo' defines --lr, which is a run option"),
    (dict(options='MethodOption("epochs", int, 1, "x"),'), ["run", "--method", "foo"],
     "method 'foo' defines --epochs, which is a run option"),
    (dict(options='MethodOption("beta", int, 1, "x"),'), ["run", "--help"],
     "methods fdg and foo define --beta with different types (float, int)"),
    (dict(options='MethodOption("out", str, "x", "x"),'), ["run", "--method", "foo"],
     "method 'foo' defines --out, which is an option of fdgbench run"),
    (dict(options='MethodOption("iterations", int, 1, "x"),'), ["schedule", "show"],
     "method 'foo' defines --iterations, which is an option of fdgbench schedule show"),
    (dict(name="fdg"), ["list", "methods"], "two methods are named 'fdg': methods.fdg.FDG and"),
    (dict(breaks=("sideways",)), ["list", "methods"], "method 'foo' breaks unknown lockings sideways"),
])
@pytest.mark.parametrize("how", ["--plugin", PLUGINS_ENV])
def test_clashing_definitions_are_one_error_line_naming_both(cli, isolated, tmp_path, definition, command, message,
                                                             how):
    path = _method_file(tmp_path, **definition)
    if how == PLUGINS_ENV:  # loaded by the command's first use of the registry, not by the option
        isolated.setenv(PLUGINS_ENV, str(path))
    _one_error(*cli(*(["--plugin", path] if how == "--plugin" else []), *command)[::2], message)


@pytest.mark.parametrize("source,message", [
    (None, "plugin {path}: no such file"),
    ("import no_such_module\n",
     "plugin {path} failed to import: ModuleNotFoundError: No module named 'no_such_module'"),
    ("def broken(:\n", "plugin {path} failed to import: SyntaxError"),
    ("raise RuntimeError('not today\\nsecond line')\n", "plugin {path} failed to import: RuntimeError: not today"),
])
def test_a_plugin_that_is_missing_or_fails_to_import_is_one_error_line(cli, isolated, tmp_path, source, message):
    path = tmp_path / "bad_plugin.py"
    if source is not None:
        path.write_text(source)
    _one_error(*cli("--plugin", path, "list", "models")[::2], message.format(path=path))


def test_a_module_that_cannot_be_imported_is_one_error_line(cli, isolated):
    _one_error(*cli("--plugin", "no_such_plugin_module", "list", "methods")[::2],
               "plugin no_such_plugin_module failed to import: ModuleNotFoundError")


# -- compare --methods and schedule show ---------------------------------------------------------

def test_method_entries_split_outside_brackets_and_convert_values_by_the_option_type():
    assert method_entries("fdg, fdg[beta=0.5,staleness=stash],ddg[staleness=stash], adl[accumulate-mean=true,"
                          "accumulate=3],bp[]") == [
        ("fdg", {}), ("fdg", {"beta": 0.5, "staleness": "stash"}), ("ddg", {"staleness": "stash"}),
        ("adl", {"accumulate_mean": True, "accumulate": 3}), ("bp", {})]


# fdg's options as the registry lists them (a method gaining an option keeps these messages right).
FDG_OPTIONS = ", ".join(o.name for o in make_method("fdg").options)


@pytest.mark.parametrize("entries,message", [
    ("fdg[beta]", f"--methods: fdg[...]: 'beta' is not option=value (fdg's options: {FDG_OPTIONS})"),
    ("fdg[beta=x]", "--methods: fdg[beta=...]: 'x' is not a valid float"),
    ("fdg[nope=1]", f"--methods: fdg[...]: no option 'nope' (fdg's options: {FDG_OPTIONS})"),
    ("bp[beta=0.5]", "--methods: bp[...]: no option 'beta' (bp's options: none)"),
    ("fdg[beta=0.5,ddg", "--methods: cannot read 'fdg[beta=0.5'"),
    ("fdg],ddg", "--methods: cannot read 'fdg]'"),
    ("fdg[staleness=old]", "--staleness must be one of legacy, stash, replay, got 'old'"),
    ("xyz[a=1]", "unknown method 'xyz'"),
    (" , ", "--methods needs at least one method name"),
])
def test_bad_method_entries_are_one_error_line_before_any_training(cli, tmp_path, entries, message):
    _one_error(*cli("compare", "--methods", entries, *TINY, "--out", tmp_path)[::2], message)
    assert not any(tmp_path.iterdir())


def test_schedule_show_takes_the_method_options_run_takes(cli):
    status, out, err = cli("schedule", "show", "--method", "adl", "--accumulate", "3", "-K", "2", "--iterations", "9")
    assert status == 0, err
    shown = format_grid(make_method("adl", accumulate=3).schedule, 2, 9)
    assert shown in out and shown != format_grid(make_method("adl").schedule, 2, 9)
    _one_error(*cli("schedule", "show", "--method", "bp", "--accumulate", "3")[::2],
               "--accumulate is an option of adl, not bp")


# -- the README's table and the docs' example ----------------------------------------------------

def _readme_methods_table() -> dict[str, str]:
    """The README's methods table: each row's first cell (`name`) -> its breaks cell."""
    section = (ROOT / "README.md").read_text().split("\n## Methods\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| `")]
    return {cells[0].removeprefix("| "): cells[1] for cells in rows}


def test_the_readme_methods_table_matches_the_registry():
    """One row per method of the package (plug-ins live outside the
    repository and its README), whose breaks cell lists its lockings."""
    table = _readme_methods_table()
    built_in = [m for m in all_methods() if m.__module__.startswith("methods.")]
    assert sorted(table) == sorted(f"`{m.name}`" for m in built_in)
    for m in built_in:
        assert table[f"`{m.name}`"] == (", ".join(m.breaks) or "nothing"), m.name


def test_the_docs_worked_example_is_the_tested_plugin():
    layout = (ROOT / "docs" / "layout.md").read_text()
    section = layout.split("\n## Adding a method\n", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks == [PLUGIN.read_text()]

