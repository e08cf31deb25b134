"""Paper table specs (``paper_tables/<table>.toml``): rows (model, K, the
paper's numbers and best beta), columns (method and its options), presets
(full = the paper's protocol; quick and smoke say what they cut), footnotes.
``expand`` turns a spec and a preset into the runs that fill its cells."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import UserError
from ..method import make_method
from ..runs import PROJECT_ROOT
from .measures import MEASURES
from ..config import RunConfig, field_kind, flag_name, spec_fields
from ..plan import check_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library (a dependency on Python 3.10)
    import tomli as tomllib

SPEC_DIR = PROJECT_ROOT / "paper_tables"
# The RunConfig fields a spec may set, and how each is written (RunConfig's field metadata, config.run_field).
RUN_FIELDS = spec_fields()
TEXT_FIELDS = tuple(f for f in RUN_FIELDS if field_kind(f) is str)
FLAG_FIELDS = tuple(f for f in RUN_FIELDS if field_kind(f) is bool)
# The keys each part of a spec may have: anything else is a typo that would be silently ignored.
# ``reference``: the id of the column the others are compared with (BP: time-to-accuracy's target, the time
# table's speedup, the stability map's loss difference); default: the column whose method is bp, if any.
SPEC_KEYS = ("title", "dataset", "source", "footnotes", "columns", "rows", "presets", "measure", "reference")
COLUMN_KEYS = ("id", "method", "options", "paper", "beta_from_row", "run")
ROW_KEYS = ("id", "model", "splits", "paper", "best_beta", "paper_params", "columns")
# ``runs``: the folder under the results root holding the preset's runs (default <table>-<preset>);
# two presets whose cells coincide name the same folder and share those runs.
# ``speed``: a `bench speedup --save` file (relative to the spec) whose seconds per iteration turn the
# iterations each run needs to reach BP's final error into time-to-accuracy.
# ``footnotes``: notes for this preset's tables only (e.g. why its runs warm up).
# ``slurm``: the cluster resources of `sweep --launcher slurm` (sweep.CLUSTER_KEYS; flags override them).
PRESET_KEYS = ("description", "rows", "columns", "seeds", "fallback_dataset", *RUN_FIELDS, "runs", "speed",
               "footnotes", "slurm")


@dataclass(frozen=True)
class Column:
    id: str
    method: str
    options: dict[str, Any]
    paper: tuple[str, ...]  # published columns shown beside ours; ours is compared with the last
    beta_from_row: bool = False
    run: dict[str, Any] = field(default_factory=dict)  # RunConfig fields of this column (e.g. engine)

    def options_in(self, row: "Row") -> dict[str, Any]:
        """The method's options in ``row`` (its best beta, where the column takes beta from the row)."""
        return {**self.options, **({"beta": row.best_beta} if self.beta_from_row else {})}


@dataclass(frozen=True)
class Row:
    id: str
    model: str
    splits: int
    paper: dict[str, float]
    best_beta: float | None = None
    paper_params: str | None = None
    # The column ids this row runs (None: every column); the others are shown as not applying (a reversible
    # network's row has no column of a method for plain ResNets, and PETRA's column no ResNet row).
    columns: tuple[str, ...] | None = None

    def runs(self, column: str) -> bool:
        return self.columns is None or column in self.columns


@dataclass(frozen=True)
class Cell:
    row: Row
    column: Column
    seed: int
    config: RunConfig


@dataclass(frozen=True)
class Preset:
    """One of a spec's presets, resolved once when the spec loads: which of
    its rows and columns it keeps, its budget (RunConfig fields), and where
    its runs, speed record and notes are. Commands look it up once
    (``TableSpec.preset``) and hand the object down."""

    name: str
    spec: "TableSpec" = field(repr=False, compare=False)
    description: str = "the paper's protocol"
    rows: tuple[str, ...] | None = None  # the row ids it keeps (None: all)
    columns: tuple[str, ...] | None = None  # the column ids it keeps (None: all)
    seeds: int = 1
    fallback_dataset: str | None = None  # trained on where the spec's dataset cannot be loaded
    run: dict[str, Any] = field(default_factory=dict)  # RunConfig fields: the budget every cell shares
    runs: str = ""  # the folder under the results root holding its runs (default <table>-<preset>)
    speed: tuple[str, ...] = ()  # `bench speedup --save` files (one per model), relative to the spec
    footnotes: tuple[str, ...] = ()  # notes for this preset's tables only
    slurm: dict[str, Any] = field(default_factory=dict)  # `sweep --launcher slurm`'s resources

    @classmethod
    def from_toml(cls, name: str, spec: "TableSpec", values: dict[str, Any]) -> "Preset":
        keep = {key: tuple(values[key]) for key in ("rows", "columns") if key in values}
        return cls(name, spec, values.get("description", cls.description), seeds=values.get("seeds", cls.seeds),
                   fallback_dataset=values.get("fallback_dataset"),
                   run={k: values[k] for k in RUN_FIELDS if k in values},
                   runs=values.get("runs", f"{spec.name}-{name}"), speed=_paths(values.get("speed")),
                   footnotes=tuple(values.get("footnotes", ())), slurm=dict(values.get("slurm", {})), **keep)


@dataclass
class TableSpec:
    name: str
    title: str
    dataset: str
    source: str
    columns: list[Column]
    rows: list[Row]
    presets: dict[str, Preset]  # by name, resolved when the spec loads
    footnotes: list[str] = field(default_factory=list)
    measure: str = "error"  # a name in report.measures.MEASURES (error, time, stability)
    path: Path | None = None  # the spec file, named in errors about its values
    reference: str | None = None  # the column compared against (BP), or none

    def preset(self, name: str) -> Preset:
        """The preset called ``name``; an unknown name is one line naming the known ones."""
        if name not in self.presets:
            raise UserError(f"{self.name} has no preset '{name}'; known: {', '.join(self.presets)}")
        return self.presets[name]

    def cells(self, preset: Preset | str, seeds: int | None = None, dataset: str | None = None) -> list[Cell]:
        """The runs of ``preset`` (the object, or its name: rows and columns it
        keeps, its budget), with ``seeds`` seeds (default: the preset's) and
        ``dataset`` (default: the spec's)."""
        p = preset if isinstance(preset, Preset) else self.preset(preset)
        rows = [r for r in self.rows if p.rows is None or r.id in p.rows]
        columns = [c for c in self.columns if p.columns is None or c.id in p.columns]
        n = seeds if seeds is not None else p.seeds
        if n < 1:
            where = "--seeds" if seeds is not None else f"{self.path}: [presets.{p.name}] seeds"
            raise UserError(f"{where} must be at least 1, got {n}")
        budget = p.run
        out = []
        for row in rows:
            for column in (c for c in columns if row.runs(c.id)):
                options = column.options_in(row)
                for seed in range(n):
                    cfg = RunConfig(method=column.method, method_options=options, model=row.model,
                                    splits=row.splits, dataset=dataset or self.dataset, seed=seed,
                                    **{**budget, **column.run})
                    out.append(Cell(row, column, seed, cfg))
        return out

    def check(self, preset: Preset, cell: Cell) -> None:
        """check_config on a cell, with its errors naming this spec file and
        the key that set the bad value (not a command-line flag); fields the
        spec cannot set (e.g. a sweep's --device) keep their flags."""
        spec_keys = {*RUN_FIELDS, "method", "model", "splits"}

        def name(key: str) -> str:
            if key in cell.column.run:
                return f"run.{key}"
            return key if key in spec_keys else flag_name(key)

        try:
            check_config(cell.config, name)
        except UserError as exc:
            raise UserError(f"{self.path}, preset '{preset.name}', row '{cell.row.id}', column '{cell.column.id}': "
                            f"{exc}") from None


def spec_path(name: str) -> Path:
    """A table name (table2) or a path to a spec file."""
    path = Path(name)
    if path.suffix == ".toml":
        return path
    return SPEC_DIR / f"{name}.toml"


def load_spec(name: str) -> TableSpec:
    path = spec_path(name)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SPEC_DIR.glob("*.toml")))
        raise UserError(f"no table spec '{name}' ({path} not found); known: {known}")
    try:
        data = tomllib.loads(path.read_text())
        _check_keys(path, "the top level", data, SPEC_KEYS)
        for i, c in enumerate(data["columns"], 1):
            where = f"column '{c.get('id', i)}'"
            _check_keys(path, where, c, COLUMN_KEYS)
            _check_keys(path, f"{where} run", c.get("run", {}), RUN_FIELDS)
            _check_run_values(path, f"{where} run", c.get("run", {}))
            try:  # a misspelt option would otherwise be found only when the sweep reaches the column
                make_method(c["method"], **c.get("options", {}))
            except UserError as exc:
                raise UserError(f"{path}: {where} options: {exc}") from None
        for i, r in enumerate(data["rows"], 1):
            _check_keys(path, f"row '{r.get('id', i)}'", r, ROW_KEYS)
        columns = [Column(c["id"], c["method"], dict(c.get("options", {})), tuple(c.get("paper", ())),
                          bool(c.get("beta_from_row", False)), dict(c.get("run", {}))) for c in data["columns"]]
        rows = [Row(r["id"], r["model"], int(r["splits"]), {k: float(v) for k, v in r.get("paper", {}).items()},
                    r.get("best_beta"), r.get("paper_params"), tuple(r["columns"]) if "columns" in r else None)
                for r in data["rows"]]
        for row in rows:
            _check_ids(path, f"row '{row.id}' columns", row.columns or (), [c.id for c in columns])
        for preset, values in data.get("presets", {}).items():
            where = f"[presets.{preset}]"
            _check_keys(path, where, values, PRESET_KEYS)
            _check_run_values(path, where, values)
            _check_preset_paths(path, where, values)
            for key, ids in (("rows", [r.id for r in rows]), ("columns", [c.id for c in columns])):
                _check_ids(path, f"{where} {key}", values.get(key, []), ids)
        measure = data.get("measure", "error")
        if measure not in MEASURES:
            raise ValueError(f"measure must be one of {', '.join(MEASURES)}, got {measure!r}")
        # Default: the column that trains BP (the one place a reference is found by its method).
        reference = data.get("reference", next((c.id for c in columns if c.method == "bp"), None))
        if reference is not None and reference not in [c.id for c in columns]:
            raise ValueError(f"reference {reference!r} names no column; columns: {', '.join(c.id for c in columns)}")
        spec = TableSpec(path.stem, data["title"], data["dataset"], data.get("source", ""), columns, rows, {},
                         list(data.get("footnotes", [])), measure, path, reference)
        spec.presets.update({name: Preset.from_toml(name, spec, values)
                             for name, values in data.get("presets", {}).items()})
        return spec
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{path} is not a valid table spec: {type(exc).__name__}: {exc}") from None


def _check_keys(path: Path, where: str, table: dict[str, Any], known: tuple[str, ...]) -> None:
    """A key the loader does not know (a typo such as ``epoch``) is an error, not silently ignored."""
    unknown = [k for k in table if k not in known]
    if unknown:
        raise UserError(f"{path}: {where} has unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")


def _check_ids(path: Path, where: str, listed: Iterable[str], ids: list[str]) -> None:
    """Every id ``listed`` (a preset's rows or columns, a row's columns) names one of ``ids``."""
    unknown = [i for i in listed if i not in ids]
    if unknown:
        raise UserError(f"{path}: {where} lists unknown {', '.join(map(repr, unknown))}; "
                        f"known: {', '.join(map(repr, ids))}")


def _paths(value: str | list[str] | None) -> tuple[str, ...]:
    """A preset's ``speed``: one path or a list of them (checked by _check_preset_paths)."""
    return () if value is None else (value,) if isinstance(value, str) else tuple(value)


def _check_preset_paths(path: Path, where: str, values: dict[str, Any]) -> None:
    """``runs``: one folder name under the results root (a path would leave
    it); ``speed``: a relative path beside the spec; ``footnotes``: strings."""
    runs = values.get("runs")
    if runs is not None and (not isinstance(runs, str) or not runs or Path(runs).name != runs or runs in (".", "..")):
        raise UserError(f"{path}: {where} runs must be one folder name (no '/'), got {runs!r}")
    speed = values.get("speed")
    if speed is not None and (not isinstance(speed, (str, list)) or not speed
                              or not all(isinstance(s, str) and not Path(s).is_absolute() for s in _paths(speed))):
        raise UserError(f"{path}: {where} speed must be a path relative to the spec (or a list of them, one per "
                        f"model), got {speed!r}")
    notes = values.get("footnotes", [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise UserError(f"{path}: {where} footnotes must be a list of strings, got {notes!r}")


def _check_run_values(path: Path, where: str, values: dict[str, Any]) -> None:
    """RunConfig fields of the right type (their ranges are check_config's, at sweep time)."""
    for key in (*RUN_FIELDS, "seeds"):
        if key not in values:
            continue
        value = values[key]
        if key in FLAG_FIELDS:
            if not isinstance(value, bool):
                raise UserError(f"{path}: {where} {key} must be true or false, got {value!r}")
            continue
        want = str if key in TEXT_FIELDS else int
        if not isinstance(value, want) or isinstance(value, bool):
            raise UserError(f"{path}: {where} {key} must be {'a string' if want is str else 'an integer'}, "
                            f"got {value!r}")
