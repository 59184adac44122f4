"""Ablations: a study of many training runs in one command, with a table, a chart and one MLflow parent run.

An ablation file (YAML, validated like a recipe, unknown keys refused) names a base recipe and either named ``rows``
or a ``grid`` (the cartesian product of values of recipe keys), plus seeds::

    base: ../tie_full.yaml             # relative to this file or the cwd; a bare name finds recipes/<name>.yaml
    overrides: [optim.epochs=20]       # applied to every cell
    rows:                              # named rows, in this order
      A: {switches: {T_app: false, T_geo: false, T_mask: false, T_mix: false, L_geo: false},
          paper: {ciou: 0.3292, auc: 0.3744}}
      B: {switches: {T_app: true}, overrides: [transforms.app.gray_p=0]}
    seeds: 1                           # a count (the base recipe's seed, +1, ...) or a list such as [4, 5]
    evaluate: {set: vggss, checkpoint: best}
    retrieve: false                    # also run `sslt retrieve` on each cell's run

A cell is one (row, seed). Its recipe is, in order of precedence: the base recipe < the file's ``overrides`` < the
row's switches < the row's overrides (or the grid values) < the command line's recipe overrides; the cell's ``name``
(``<row>-seed<k>``), ``seed`` and ``runs_dir`` come last. On the command line ``base=``, ``name=``, ``seeds=``,
``evaluate.set=``, ``evaluate.checkpoint=`` and ``retrieve=`` change the ablation; every other ``key=value`` is a
recipe override for every cell. Every cell's recipe is validated before anything runs.

Folder (``<runs_dir>/ablations/<name>/``; ``name`` defaults to the file's stem)::

    ablation.json          state: the base recipe, command-line overrides and seeds run; each cell's run folder,
                           status and error; the parent MLflow run
    <row>-seed<k>-<time>/  one ordinary run folder per cell (the cell's recipe name is the cell's name)
    .spec_cache/           the log-mel cache train.py keeps beside run folders, shared by all cells
    summary.csv  summary.md  summary.png  cells.csv

All cells share one ``runs_dir`` so they share the log-mel cache (keyed by the front-end settings, so sharing is
safe): one folder per cell would compute and store it once per cell, which for VGGSound-144k at 257 mels is about
100 GB each. A run is found again by its recipe name and must have been made with exactly the cell's recipe; a run made
with another recipe (the file or the base recipe's text changed) is left untouched and the cell trains anew.

A folder holds one ablation: a command whose base recipe or command-line recipe overrides differ from those recorded
in ``ablation.json`` is refused and told to give ``name=`` (a folder of its own). Refusing keeps every existing folder
where it is and names the difference; a folder name derived from the base and the overrides would be unreadable. Its
seeds are the recorded ones: a re-run or ``--report`` without ``--seeds`` or ``seeds=`` uses them; with them, the
recorded seeds change, and the command says so.

A re-run skips finished cells, resumes an interrupted one from its last checkpoint, and re-tries a failed one in a new
run folder (a cell whose training finished but whose retrieval failed only retrieves again). A failing cell is recorded
with its error and the other cells go on. MLflow: one parent run for the ablation; each cell's run (started by
``train``) becomes its child through the ``mlflow.parentRunId`` tag. Other seeds get a new parent run (MLflow keeps
a run's parameters, ``ablation.seeds`` among them, as first logged) and the finished cells' runs become its children.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import re
import shlex
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sslt_cli.catalog import RECIPES_DIR, resolve_recipe
from sslt_cli.config import (Recipe, apply_overrides, flatten, load_tree, parse_override, parse_yaml, recipe_dict,
                             validate_tree)
from sslt_cli.errors import RecipeError, SsltError
from sslt_cli.runs import CONFIG, META, Run, atomic_write_text
from sslt_cli.tracking import Tracker

STATE = "ablation.json"
STATE_FORMAT = "sslt-ablation/1"
LOCK = ".lock"

# The paper's switches (REFERENCE.md section 7) and the recipe keys they set.
SWITCHES: dict[str, str] = {
    "T_app": "transforms.app.enabled",
    "T_geo": "transforms.geo.enabled",
    "T_mask": "transforms.mask.enabled",
    "T_mix": "transforms.mix.enabled",
    "L_geo": "transforms.equivariance.enabled",
}

# The table's tick columns, read from each cell's resolved recipe so a tick always says what ran.
TICKS: dict[str, Callable[[Recipe], bool]] = {
    "T_app": lambda r: r.transforms.app.enabled,
    "T_geo": lambda r: r.transforms.geo.enabled,
    "T_mask": lambda r: r.transforms.mask.enabled,
    "T_mix": lambda r: r.transforms.mix.enabled,
    "L_cl": lambda r: r.loss.cl_weight > 0,
    "L_geo": lambda r: r.transforms.equivariance.enabled and r.loss.geo_weight > 0,
}

# (column header, key in a cell's metrics) of the localisation test record and, with retrieve, of the retrieval record.
LOCALISATION_METRICS = (("cIoU", "ciou"), ("AUC", "auc"), ("mean IoU", "mean_iou"))
RETRIEVAL_METRICS = (("a2a P@1", "retrieve/a2a/p_at_1"), ("a2i P@1", "retrieve/a2i/p_at_1"))
PAPER_METRICS = (("cIoU", "ciou"), ("AUC", "auc"))

# Command-line keys that change the ablation itself; every other key is a recipe override.
ABLATION_KEYS = ("base", "name", "seeds", "evaluate.set", "evaluate.checkpoint", "retrieve")
_FOLDER_NAME = re.compile(r"[\w.\-]+")


# ------------------------------------------------------------------------------------------------ file schema

class _FileModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PaperValues(_FileModel):
    """The paper's numbers for a row, as fractions (REFERENCE.md section 7: 0.3292 means 32.92 cIoU)."""

    ciou: float | None = Field(None, ge=0, le=1)
    auc: float | None = Field(None, ge=0, le=1)


class RowSpec(_FileModel):
    """One named row: the paper's switches (shorthand for ``SWITCHES``' keys), overrides, the paper's values."""

    overrides: list[str] = Field(default_factory=list)
    switches: dict[str, bool] = Field(default_factory=dict)
    paper: PaperValues | None = None


class EvaluateSpec(_FileModel):
    """Which test record of each run the table reports: the test set's name in ``data.test`` and the checkpoint."""

    set: str = "vggss"
    checkpoint: Literal["best", "last"] = "best"


class AblationSpec(_FileModel):
    """The ablation file. ``rows`` and ``grid`` are checked by :func:`load_ablation` (one of them, not empty)."""

    name: str | None = None
    base: str | None = None
    overrides: list[str] = Field(default_factory=list)
    rows: dict[str, Any] | None = None
    grid: dict[str, Any] | None = None
    seeds: Any = None
    evaluate: EvaluateSpec = EvaluateSpec()
    retrieve: bool = False


# ------------------------------------------------------------------------------------------ loaded ablation

@dataclass(frozen=True)
class Row:
    """A row of the table. ``name`` names its cells' runs; ``overrides`` are the row's own (switches first, then its
    overrides, or the grid values); ``values`` are the grid values by key (empty for named rows)."""

    name: str
    label: str
    overrides: tuple[str, ...]
    paper: PaperValues | None = None
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Ablation:
    """A validated ablation: what :func:`expand_cells` turns into cells and :func:`run_ablation` runs.

    ``base`` is the base recipe with the file's and the command line's recipe overrides (the cells' common part);
    ``folder`` is ``<base.runs_dir>/ablations/<name>``; ``seeds_from_command``: the command line set ``seeds=``, so
    ``seeds`` beat the seeds recorded in the folder (:func:`resolve_seeds`).
    """

    path: Path
    name: str
    base_path: Path
    base_tree: dict
    base: Recipe
    file_overrides: tuple[str, ...]
    command_overrides: tuple[str, ...]
    mode: Literal["rows", "grid"]
    rows: tuple[Row, ...]
    grid_keys: tuple[str, ...]
    seeds: tuple[int, ...]
    seeds_from_command: bool
    evaluate_set: str
    checkpoint: Literal["best", "last"]
    retrieve: bool
    folder: Path

    @property
    def metrics(self) -> tuple[tuple[str, str], ...]:
        """(header, key) of the metrics tabulated: localisation, and retrieval when the cells retrieve."""
        return LOCALISATION_METRICS + (RETRIEVAL_METRICS if self.retrieve else ())


@dataclass(frozen=True)
class Cell:
    """One training run of the ablation: a row with a seed. ``overrides`` applied to the base recipe give ``recipe``
    exactly (``sslt train <base> <overrides>`` reproduces the cell)."""

    name: str
    row: str
    seed: int
    recipe: Recipe
    overrides: tuple[str, ...]


@dataclass
class CellResult:
    """A cell's state on disk. ``status``: finished | failed | interrupted | pending; ``action``: what running the
    ablation does next (skip | train | resume | retrieve); ``metrics``: its test record (and retrieval), if any."""

    cell: Cell
    status: str
    run: Run | None
    metrics: dict[str, float]
    error: str | None
    action: str
    note: str = ""


@dataclass
class RowSummary:
    """A row over its seeds: tick values from its recipe and each metric's values from the cells that have them."""

    row: Row
    cells: list[CellResult]
    ticks: dict[str, bool]
    values: dict[str, list[float]]

    def mean(self, key: str) -> float | None:
        """Mean over the seeds that have a result; None when none has."""
        vals = self.values.get(key) or []
        return sum(vals) / len(vals) if vals else None

    def std(self, key: str) -> float | None:
        """Sample standard deviation over seeds (n - 1 in the denominator); None below two seeds."""
        vals = self.values.get(key) or []
        if len(vals) < 2:
            return None
        m = sum(vals) / len(vals)
        return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))

    def count(self, status: str) -> int:
        """Cells of the row in ``status``."""
        return sum(1 for c in self.cells if c.status == status)

    @property
    def n_done(self) -> int:
        """Cells of the row with a test result."""
        return sum(1 for c in self.cells if c.metrics)

    def paper(self, key: str) -> float | None:
        """The paper's value of ``key`` for the row, if the file gives one."""
        return getattr(self.row.paper, key) if self.row.paper is not None else None


@dataclass
class AblationResult:
    """What :func:`run_ablation` did: every cell's state, the row summaries, the files written, the parent run."""

    ablation: Ablation
    cells: list[CellResult]
    rows: list[RowSummary]
    files: dict[str, Path]
    parent_run_id: str | None
    interrupted: bool = False

    @property
    def failed(self) -> list[CellResult]:
        """Cells whose last attempt failed (their errors are in ``error``)."""
        return [c for c in self.cells if c.status == "failed"]

    @property
    def finished(self) -> list[CellResult]:
        """Cells trained and evaluated (and retrieved, when asked)."""
        return [c for c in self.cells if c.status == "finished"]


# ----------------------------------------------------------------------------------------------- loading

def _yaml_value(value: Any) -> str:
    """Override text that :func:`parse_override` reads back as ``value`` (JSON is YAML flow syntax)."""
    if isinstance(value, str):
        plain = value and value.strip() == value and parse_yaml(value) == value
        return value if plain else json.dumps(value)
    return json.dumps(value)


def resolve_base(value: str, ablation_path: Path) -> Path:
    """The base recipe file: ``value`` as a path relative to the ablation file's folder or the cwd, with or without
    ``.yaml``; a bare name (``quickstart``) is also looked up in the recipes folder above the ablation file, in
    ``./recipes`` and among the recipes shipped with sslt. Raises RecipeError listing the places tried."""
    raw = Path(value).expanduser()
    names = [raw] if raw.suffix in (".yaml", ".yml") else [raw.with_name(raw.name + ".yaml"), raw]
    here = ablation_path.parent
    folders = [Path()] if raw.is_absolute() else [here, Path()]
    if not raw.is_absolute() and len(raw.parts) == 1:
        folders += [here.parent, Path("recipes"), RECIPES_DIR]
    tried: list[Path] = []
    for folder in folders:
        for name in names:
            candidate = folder / name
            if candidate.is_file():
                return Path(os.path.normpath(candidate))
            if candidate not in tried:
                tried.append(candidate)
    raise RecipeError(f"{ablation_path}: base recipe {value!r} not found",
                      [f"tried {', '.join(str(p) for p in tried)}",
                       "give a recipe path (relative to the ablation file or the current folder) or a name such as "
                       "base=quickstart"])


def _override_problems(overrides: Sequence[str], in_row: bool) -> list[tuple[str | None, str]]:
    """(override text, problem) for each override a cell cannot take; the text is None for a malformed override."""
    found: list[tuple[str | None, str]] = []
    for text in overrides:
        try:
            key, _ = parse_override(text)
        except RecipeError as exc:
            found.append((None, exc.message))
            continue
        why = _per_cell_key_problem(key, in_row=in_row)
        if why:
            found.append((text, why))
    return found


def _seed_list(value: Any, base_seed: int) -> list[int] | str:
    """The seeds a ``seeds`` value names, or a problem text."""
    if value is None:
        return [base_seed]
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            return f"expected a count of at least 1, got {value!r}"
        return [base_seed + i for i in range(value)]
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        if len(set(value)) != len(value):
            return f"the seeds must differ, got {value!r}"
        return list(value)
    return f"expected a count (1, 2, ...) or a list of integer seeds such as [4, 5], got {value!r}"


def _per_cell_key_problem(key: str, in_row: bool) -> str | None:
    """Why an override may not set ``key`` (the ablation sets it per cell), if so. ``in_row``: a row or the grid,
    where ``runs_dir`` is refused too (every cell runs in the ablation's folder)."""
    if key == "seed":
        return "the ablation sets each cell's seed: use seeds: [...] in the file, seeds=[...] or --seeds N"
    if key == "name":
        return "the ablation names each cell's run <row>-seed<k>; to name the ablation use name: in the file"
    if key == "runs_dir" and in_row:
        return "every cell runs in the ablation's folder; set runs_dir once in the file's overrides"
    return None


def _switch_overrides(switches: dict[str, bool]) -> list[str]:
    return [f"{SWITCHES[name]}={'true' if on else 'false'}" for name, on in switches.items()]


def _close_word(word: str, choices: Sequence[str]) -> str | None:
    """The choice closest to ``word`` (case-insensitive), if any is close."""
    import difflib

    lowered = {c.lower(): c for c in choices}
    match = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.5)
    return lowered[match[0]] if match else None


def _parse_row(name: str, body: Any, source: str, problems: list[str]) -> Row | None:
    """A named row, or None after adding its problems to ``problems``."""
    where = f"{source}: row '{name}'"
    if not _FOLDER_NAME.fullmatch(name):
        problems.append(f"{where}: use letters, digits, '_', '.' and '-' only in a row name (it names run folders)")
        return None
    try:
        spec = validate_tree(body if body is not None else {}, where, RowSpec)
    except RecipeError as exc:
        problems.extend(exc.problems)
        return None
    assert isinstance(spec, RowSpec)
    found: list[str] = []
    for switch in spec.switches:
        if switch not in SWITCHES:
            hint = _close_word(switch, list(SWITCHES))
            found.append(f"{where}: unknown switch '{switch}'{f' (did you mean {hint!r}?)' if hint else ''}; "
                         f"the switches are {', '.join(SWITCHES)}")
    for text, why in _override_problems(spec.overrides, in_row=True):
        found.append(f"{where}: {why}" if text is None else f"{where}: override {text!r}: {why}")
    problems.extend(found)
    if found:
        return None
    return Row(name=name, label=name, overrides=tuple(_switch_overrides(spec.switches) + spec.overrides),
               paper=spec.paper)


def _parse_rows(rows: dict[str, Any], source: str, problems: list[str]) -> list[Row]:
    if not rows:
        problems.append(f"{source}: rows is empty; name at least one row, e.g. rows: {{A: {{overrides: [...]}}}}")
    parsed = [_parse_row(str(name), body, source, problems) for name, body in rows.items()]
    return [row for row in parsed if row is not None]


def _grid_names(keys: list[str]) -> dict[str, str]:
    """A short name per grid key: its last part, or the whole key where two keys share a last part."""
    leaves = [k.split(".")[-1] for k in keys]
    return {k: (leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(keys, leaves)}


def _value_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _parse_grid(grid: dict[str, Any], source: str, problems: list[str]) -> list[Row]:
    """The grid's rows, the cartesian product in the file's key order (the last key varies fastest)."""
    if not grid:
        problems.append(f"{source}: grid is empty; give each key a list of values, e.g. "
                        "grid: {loss.geo_weight: [0.5, 1.0]}")
        return []
    ok = True
    for key, values in grid.items():
        why = _per_cell_key_problem(key, in_row=True)
        if why:
            problems.append(f"{source}: grid '{key}': {why}")
            ok = False
        elif not isinstance(values, list):
            problems.append(f"{source}: grid '{key}': expected a list of values such as [0.5, 1.0], got {values!r}")
            ok = False
        elif not values:
            problems.append(f"{source}: grid '{key}' has no values; give a list such as [0.5, 1.0]")
            ok = False
    if not ok:
        return []
    keys = list(grid)
    short = _grid_names(keys)
    rows = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        name = "-".join(re.sub(r"[^\w.\-]", "_", f"{short[k]}_{_value_text(v)}") for k, v in values.items())
        label = " ".join(f"{short[k]}={_value_text(v)}" for k, v in values.items())
        rows.append(Row(name=name, label=label, overrides=tuple(f"{k}={_yaml_value(v)}" for k, v in values.items()),
                        values=values))
    names = [r.name for r in rows]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"{source}: grid values give the same cell name twice ({', '.join(duplicates)}); "
                        "make the values differ in letters or digits")
    return rows


def _validate(tree: dict, overrides: Sequence[str], source: str) -> tuple[Recipe | None, list[str]]:
    try:
        recipe = validate_tree(apply_overrides(tree, list(overrides)), source, overrides=list(overrides))
    except RecipeError as exc:
        return None, exc.problems
    assert isinstance(recipe, Recipe)
    return recipe, []


def _cell_overrides(ablation_file: Sequence[str], row: Row, command: Sequence[str], name: str, seed: int,
                    folder: str) -> list[str]:
    return [*ablation_file, *row.overrides, *command, f"name={name}", f"seed={seed}", f"runs_dir={_yaml_value(folder)}"]


def cell_name(row: str, seed: int) -> str:
    """The name of a cell's runs: ``<row>-seed<k>``."""
    return f"{row}-seed{seed}"


def _split_command_overrides(overrides: Sequence[str], problems: list[str]) -> tuple[list[str], list[str]]:
    """Command-line ``key=value`` texts: (those that change the ablation, the recipe overrides for every cell)."""
    ablation_texts: list[str] = []
    command: list[str] = []
    for text in overrides:
        try:
            key, _ = parse_override(text)
        except RecipeError as exc:
            problems.append(exc.message if not exc.problems else f"{exc.message}: {exc.problems[0]}")
            continue
        if key in ABLATION_KEYS:
            ablation_texts.append(text)
        elif key == "seed":
            problems.append(f"override {text!r}: {_per_cell_key_problem(key, in_row=False)}")
        else:
            command.append(text)
    return ablation_texts, command


def _check_spec(spec: AblationSpec, path: Path, problems: list[str]) -> tuple[list[Row], Path | None]:
    """The file's own problems (name, rows or grid, overrides, base) added to ``problems``; its rows and base file."""
    source = str(path)
    if not _FOLDER_NAME.fullmatch(spec.name or path.stem):
        problems.append(f"{source}: key 'name': use letters, digits, '_', '.' and '-' only (it names the ablation's "
                        f"folder), got {spec.name or path.stem!r}")
    if spec.rows is not None and spec.grid is not None:
        problems.append(f"{source}: give either rows (named cells) or grid (a cartesian product), not both")
    elif spec.rows is None and spec.grid is None:
        problems.append(f"{source}: give rows (named cells) or grid (the cartesian product of values of recipe keys)")
    for text, why in _override_problems(spec.overrides, in_row=False):
        problems.append(f"{source}: overrides: {why}" if text is None else f"{source}: overrides: {text!r}: {why}")
    rows = (_parse_rows(spec.rows, source, problems) if spec.rows is not None
            else _parse_grid(spec.grid, source, problems) if spec.grid is not None else [])
    if spec.base is None:
        problems.append(f"{source}: key 'base' is missing; name the base recipe, e.g. base: ../tie_full.yaml in the "
                        "file or base=quickstart on the command line")
        return rows, None
    try:
        return rows, resolve_base(spec.base, path)
    except RecipeError as exc:
        problems.append(exc.message + "; " + "; ".join(exc.problems))
        return rows, None


def _check_common(spec: AblationSpec, base: Recipe, source: str, problems: list[str]) -> list[int]:
    """The seeds, and the problems of ``seeds`` and ``evaluate`` against the base recipe."""
    found = _seed_list(spec.seeds, base.seed)
    if isinstance(found, str):
        problems.append(f"{source}: key 'seeds': {found}")
    if spec.evaluate.set not in base.data.test:
        problems.append(f"{source}: key 'evaluate.set': {spec.evaluate.set!r} is not a test set of the base "
                        f"recipe (data.test has {', '.join(base.data.test) or 'none'}); choose one of those")
    if spec.evaluate.checkpoint == "best" and not base.data.val:
        problems.append(f"{source}: key 'evaluate.checkpoint': 'best' is chosen on the validation set and the "
                        "base recipe has none (data.val); use evaluate.checkpoint=last or set data.val")
    return [] if isinstance(found, str) else found


def _check_grid_values(spec: AblationSpec, base_tree: dict, command: list[str], source: str,
                       problems: list[str]) -> None:
    """Each grid value on its own, so an unknown key or a bad value is reported once, not once per combination."""
    for key, values in (spec.grid or {}).items():
        for value in values:
            _, found = _validate(base_tree, [*spec.overrides, f"{key}={_yaml_value(value)}", *command],
                                 f"{source}: grid")
            problems += [p for p in found if p not in problems]
            if any("unknown key" in p for p in found):
                break


def _where(source: str, mode: str, row: Row) -> str:
    return f"{source}: row '{row.name}'" if mode == "rows" else f"{source}: grid cell '{row.label}'"


def load_ablation(path: str | Path, overrides: Sequence[str] | None = None) -> Ablation:
    """Load and validate an ablation file with command-line overrides; every cell's recipe is validated.

    ``overrides``: ``base=``, ``name=``, ``seeds=``, ``evaluate.set=``, ``evaluate.checkpoint=``, ``retrieve=`` change
    the ablation; any other ``key=value`` is a recipe override applied to every cell (after the rows). Raises
    RecipeError listing every problem found (file, row, dotted key, closest valid key). The checks run in stages
    (the file, the base recipe, the common overrides, each row) and a stage runs only when the one before it passed,
    so one mistake is reported once.
    """
    path = resolve_recipe(path, "ablation")
    source = str(path)
    tree = load_tree(path, "ablation")
    problems: list[str] = []
    ablation_texts, command = _split_command_overrides(list(overrides or []), problems)

    def fail() -> RecipeError:
        return RecipeError(f"{source}: {len(problems)} problem(s) in the ablation", problems)

    try:
        spec = validate_tree(apply_overrides(tree, ablation_texts), source, AblationSpec, overrides=ablation_texts)
    except RecipeError as exc:
        problems += exc.problems
        raise fail() from None
    assert isinstance(spec, AblationSpec)
    rows, base_path = _check_spec(spec, path, problems)
    if base_path is None:
        raise fail()
    base_tree = load_tree(base_path)
    plain, found = _validate(base_tree, [], str(base_path))
    problems += found
    base, found = _validate(base_tree, [*spec.overrides, *command], source) if plain is not None else (None, [])
    problems += found
    seeds = _check_common(spec, base, source, problems) if base is not None else []
    if problems or base is None:
        raise fail()

    mode: Literal["rows", "grid"] = "rows" if spec.rows is not None else "grid"
    _check_grid_values(spec, base_tree, command, source, problems)
    if problems:
        raise fail()
    name = spec.name or path.stem
    folder = Path(base.runs_dir) / "ablations" / name
    for row in rows:
        texts = _cell_overrides(spec.overrides, row, command, cell_name(row.name, seeds[0]), seeds[0], str(folder))
        recipe, found = _validate(base_tree, texts, _where(source, mode, row))
        problems += [p for p in found if p not in problems]
        if recipe is not None and spec.evaluate.set not in recipe.data.test:
            problems.append(f"{_where(source, mode, row)}: evaluate.set {spec.evaluate.set!r} is not among its test "
                            f"sets ({', '.join(recipe.data.test)})")
    if problems:
        raise fail()
    return Ablation(path=path, name=name, base_path=base_path, base_tree=base_tree, base=base,
                    file_overrides=tuple(spec.overrides), command_overrides=tuple(command), mode=mode,
                    rows=tuple(rows), grid_keys=tuple(spec.grid or ()), seeds=tuple(seeds),
                    seeds_from_command=any(parse_override(t)[0] == "seeds" for t in ablation_texts),
                    evaluate_set=spec.evaluate.set, checkpoint=spec.evaluate.checkpoint, retrieve=spec.retrieve,
                    folder=folder)


def resolve_seeds(ablation: Ablation, seeds: int | Sequence[int] | None,
                  recorded: Sequence[int] | None = None) -> list[int]:
    """The seeds to run. The current seeds are the command line's ``seeds=``, else ``recorded`` (the seeds the
    ablation's folder last ran, from its ``ablation.json``), else the file's. ``seeds``: None for the current seeds,
    a count N (``--seeds N``: the current first N, then the next integers after the largest), or an explicit list."""
    current = list(recorded) if recorded and not ablation.seeds_from_command else list(ablation.seeds)
    if seeds is None:
        return current
    if isinstance(seeds, int):
        if seeds < 1:
            raise RecipeError(f"--seeds {seeds}: give at least 1 seed")
        out = current[:seeds]
        following = max(current) + 1
        while len(out) < seeds:
            out.append(following)
            following += 1
        return out
    out = list(seeds)
    if not out or len(set(out)) != len(out):
        raise RecipeError(f"seeds {out!r}: give at least one seed, each once")
    return out


def expand_cells(ablation: Ablation, seeds: int | Sequence[int] | None = None) -> list[Cell]:
    """Every (row, seed) cell with its validated recipe, seed by seed (all rows of the first seed, then of the next),
    so a partly run multi-seed ablation already has a whole table. ``seeds``: see :func:`resolve_seeds`."""
    cells = []
    for seed in resolve_seeds(ablation, seeds):
        for row in ablation.rows:
            name = cell_name(row.name, seed)
            texts = _cell_overrides(ablation.file_overrides, row, ablation.command_overrides, name, seed,
                                    str(ablation.folder))
            recipe, problems = _validate(ablation.base_tree, texts, _where(str(ablation.path), ablation.mode, row))
            if recipe is None:
                raise RecipeError(f"{ablation.path}: {len(problems)} problem(s) in the ablation", problems)
            cells.append(Cell(name=name, row=row.name, seed=seed, recipe=recipe, overrides=tuple(texts)))
    return cells


# ------------------------------------------------------------------------------------------ state on disk

def _now() -> str:
    import datetime as _dt

    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _load_state(folder: Path) -> dict:
    path = folder / STATE
    if not path.is_file():
        return {"format": STATE_FORMAT, "cells": {}}
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as exc:
        raise SsltError(f"{path}: unreadable ablation state ({exc})",
                        ["delete it to start the bookkeeping anew: finished run folders are found again by name"]) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise SsltError(f"{path}: not an sslt ablation state (expected format {STATE_FORMAT!r})",
                        ["delete it to start the bookkeeping anew: finished run folders are found again by name"])
    state.setdefault("cells", {})
    return state


def _save_state(folder: Path, state: dict) -> None:
    state["updated"] = _now()
    atomic_write_text(folder / STATE, json.dumps(state, indent=2, default=str) + "\n")


def _seed_numbers(seeds: Sequence[int]) -> str:
    return ", ".join(map(str, seeds))


def _seeds_to_run(ablation: Ablation, seeds: int | Sequence[int] | None, state: dict, console: Console) -> list[int]:
    """The seeds of this command (:func:`resolve_seeds` with the seeds recorded in the state), said on ``console``
    when they change the recorded ones, or when the recorded ones are not the file's."""
    recorded = state.get("seeds") or None
    chosen = resolve_seeds(ablation, seeds, recorded)
    where = ablation.folder / STATE
    if recorded and chosen != recorded:
        added = [s for s in chosen if s not in recorded]
        left_out = [s for s in recorded if s not in chosen]
        parts = [f"seeds {_seed_numbers(chosen)}: changed from {_seed_numbers(recorded)} recorded in {where}"]
        if added:
            parts.append(f"adds {_seed_numbers(added)}")
        if left_out:
            parts.append(f"leaves out {_seed_numbers(left_out)} (their runs stay in the folder, outside the summary)")
        console.print("; ".join(parts), highlight=False, markup=False)
    elif recorded and seeds is None and not ablation.seeds_from_command and recorded != list(ablation.seeds):
        console.print(f"seeds {_seed_numbers(recorded)}, as recorded in {where} (the file names "
                      f"{_seed_numbers(ablation.seeds)}); to change them, give --seeds N or seeds=[...]",
                      highlight=False, markup=False)
    return chosen


def _setup_text(base: str, overrides: Sequence[str] | None) -> str:
    """``base=<path> key=value ...`` as typed on the command line; no overrides part when they are unknown (None)."""
    if overrides is None:
        return f"base={base}"
    return f"base={base} " + (shlex.join(overrides) if overrides else "and no recipe overrides")


def _check_same_ablation(ablation: Ablation, state: dict) -> None:
    """Refuse to run or report ``ablation`` in a folder whose state records another base recipe or other command-line
    recipe overrides: the two would share the summary files and the MLflow parent run. A state written before the
    overrides were recorded (no ``command_overrides``) is checked on its base only."""
    recorded_base = state.get("base")
    if recorded_base is None:
        return
    recorded_overrides = state.get("command_overrides")

    def by_key(texts: Sequence[str]) -> dict[str, str]:
        return {parse_override(text)[0]: text for text in texts}  # the last of a key wins, as in the recipe

    same_base = Path(recorded_base).resolve() == ablation.base_path.resolve()
    same_overrides = recorded_overrides is None or by_key(recorded_overrides) == by_key(ablation.command_overrides)
    if same_base and same_overrides:
        return
    folder = ablation.folder
    raise SsltError(f"{folder}: this folder holds an ablation with another base recipe or other recipe overrides",
                    [f"recorded in {folder / STATE}: {_setup_text(recorded_base, recorded_overrides)}",
                     f"this command: {_setup_text(str(ablation.base_path), ablation.command_overrides)}",
                     "to continue or report on the recorded ablation, give its base= and overrides; to run this one "
                     f"beside it, give it its own folder with name=<other> ({folder.parent}/<other>)"])


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold the ablation folder: two `sslt ablate` processes on one folder would train the same cells twice."""
    path = folder / LOCK
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = int(path.read_text().strip() or "0")
            except (OSError, ValueError):
                holder = 0
            if holder and holder != os.getpid() and _process_alive(holder):
                raise SsltError(f"{folder}: another `sslt ablate` (process {holder}) is running this ablation; "
                                "wait for it to finish or stop it, then run the command again") from None
            path.unlink(missing_ok=True)  # left behind by a process that no longer runs
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _runs_of(cell: Cell, folder: Path) -> list[Run]:
    """The run folders made for ``cell`` (recipe name = cell name), oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if not ((path / CONFIG).is_file() and (path / META).is_file()):
            continue
        try:
            meta = json.loads((path / META).read_text())
        except (json.JSONDecodeError, OSError):
            continue
        if meta.get("recipe_name") == cell.name:
            # <cell>-<YYYYmmdd-HHMMSS>[-n]: the time, then the collision suffix Run.create adds
            rest = path.name[len(cell.name) + 1:]
            stamp, _, suffix = rest[:15], rest[15:16], rest[16:]
            found.append(((stamp, int(suffix) if suffix.isdigit() else 0), Run(path)))
    return [run for _, run in sorted(found, key=lambda item: item[0])]


def _same_recipe(run: Run, cell: Cell) -> bool:
    try:
        return run.recipe() == cell.recipe
    except SsltError:
        return False


def read_cell_metrics(run: Run, set_name: str, checkpoint: str) -> dict[str, float]:
    """The run's last test record for ``set_name`` and ``checkpoint`` (ciou, auc, mean_iou, n) and its last retrieval
    record's metrics; empty when it has no such test record."""
    test: dict | None = None
    retrieval: dict | None = None
    for record in run.metrics():
        if record.get("kind") == "test" and record.get("set") == set_name and record.get("checkpoint") == checkpoint:
            test = record
        elif record.get("kind") == "retrieve":
            retrieval = record
    if test is None:
        return {}
    out = {k: float(test[k]) for k in ("ciou", "auc", "mean_iou", "n") if isinstance(test.get(k), (int, float))}
    # the centre-prior baseline of the same evaluation, printed beside the results (REFERENCE.md section 5)
    evaluation = run.dir / "eval" / f"{set_name}-{checkpoint}-{test.get('protocol')}" / "metrics.json"
    try:
        centre = (json.loads(evaluation.read_text()).get("baselines") or {}).get("centre") or {}
    except (OSError, json.JSONDecodeError):
        centre = {}
    out.update({f"baseline_centre/{k}": float(centre[k]) for k in ("ciou", "auc")
                if isinstance(centre.get(k), (int, float))})
    if retrieval is not None:
        out.update({k: float(v) for k, v in retrieval.items() if k.startswith("retrieve/")
                    and isinstance(v, (int, float))})
    return out


def _has_retrieval(run: Run) -> bool:
    return any(r.get("kind") == "retrieve" for r in run.metrics())


def inspect_cell(cell: Cell, ablation: Ablation, state: dict) -> CellResult:
    """A cell's state from its newest run folder and the ablation state, and what running it next would do."""
    entry = state.get("cells", {}).get(cell.name, {})
    runs = _runs_of(cell, ablation.folder)
    matching = [r for r in runs if _same_recipe(r, cell)]
    run = matching[-1] if matching else None
    if run is None:
        if runs:
            return CellResult(cell, "pending", None, {}, None, "train",
                              note=f"{runs[-1].dir.name} was made with another recipe; it is kept and the cell "
                                   "trains anew")
        if entry.get("status") == "failed":
            return CellResult(cell, "failed", None, {}, entry.get("error"), "train")
        return CellResult(cell, "pending", None, {}, None, "train")
    meta = run.meta()
    status = meta.get("status")
    failed_here = entry.get("status") == "failed" and entry.get("run_dir") == run.dir.name
    error = entry.get("error") if failed_here else None
    metrics = read_cell_metrics(run, ablation.evaluate_set, ablation.checkpoint)
    if status == "finished" and metrics:
        if ablation.retrieve and not _has_retrieval(run):
            return CellResult(cell, "failed" if failed_here else "pending", run, metrics, error, "retrieve")
        return CellResult(cell, "finished", run, metrics, None, "skip")
    interrupted = str(meta.get("error", "")).startswith("KeyboardInterrupt")
    if status == "failed" and not interrupted:
        return CellResult(cell, "failed", run, {}, error or meta.get("error"), "train")
    if status == "finished":
        error = error or (f"{run.dir}: no test record for set {ablation.evaluate_set!r}, checkpoint "
                          f"{ablation.checkpoint!r} in metrics.jsonl")
    # created, running (its process was killed), interrupted, trained (stopped during the final evaluation)
    action = "resume" if run.latest_checkpoint() is not None else "train"
    return CellResult(cell, "failed" if error else "interrupted", run, {}, error, action)


# ------------------------------------------------------------------------------------------------ running

def _describe(result: CellResult) -> str:
    run = result.run.dir.name if result.run is not None else ""
    return {"train": "train" + (" anew" if result.run is not None else ""), "resume": f"resume {run}",
            "retrieve": f"retrieve with {run}", "skip": f"finished ({run})"}[result.action]


def _link_child(run: Run | None, parent_id: str | None, cell: Cell, ablation: Ablation, status: str,
                console: Console) -> None:
    """Make the cell's MLflow run (started by train) a child of the ablation's parent run, and close it."""
    if run is None or parent_id is None:
        return
    child_id = run.meta().get("mlflow_run_id")
    if not child_id:
        return
    tracking = cell.recipe.tracking
    tracker = Tracker(enabled=tracking.enabled, experiment=tracking.experiment,
                      warn=lambda m: console.print(f"warning: {escape(m)}"))
    if tracker.start(run.dir.name, run_id=child_id) is None:
        return
    tracker.set_tags({"mlflow.parentRunId": parent_id, "sslt.ablation": ablation.name, "sslt.cell": cell.name,
                      "sslt.row": cell.row, "sslt.seed": str(cell.seed)})
    tracker.end(status)


def _run_cell(cell: Cell, plan: CellResult, ablation: Ablation, state: dict, parent_id: str | None,
              console: Console) -> str:
    """Train (or resume), retrieve if asked, check the test record; returns finished | failed | interrupted.

    Any exception but KeyboardInterrupt fails this cell only: it is recorded (with the traceback for a bug) and the
    ablation goes on.
    """
    from sslt_cli import train as train_module

    folder = ablation.folder
    entry = state["cells"].setdefault(cell.name, {})
    entry.update(row=cell.row, seed=cell.seed, status="running", error=None, traceback=None, started=_now(),
                 attempts=int(entry.get("attempts", 0)) + 1,
                 run_dir=plan.run.dir.name if plan.run is not None and plan.action != "train" else None)
    _save_state(folder, state)
    existing = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    run = plan.run if plan.action in ("resume", "retrieve") else None
    # each run's own result tables stay in its folder; the ablation prints one line per cell and its own table
    silent = Console(quiet=True)

    def new_run() -> Run | None:
        made = [r for r in _runs_of(cell, folder) if r.dir.name not in existing]
        return made[-1] if made else None

    try:
        if plan.action == "train":
            run = train_module.train(cell.recipe, overrides=list(cell.overrides), console=console, out=silent,
                                     recipe_path=str(ablation.base_path))
        elif plan.action == "resume":
            assert run is not None
            run = train_module.train(run.recipe(), resume_run=run, console=console, out=silent)
        assert run is not None
        entry["run_dir"] = run.dir.name
        if run.meta().get("status") == "interrupted":
            entry["status"] = "interrupted"
            _link_child(run, parent_id, cell, ablation, "KILLED", console)
            return "interrupted"
        if ablation.retrieve and not _has_retrieval(run):
            from sslt_cli.retrieve import retrieve

            retrieve(run.dir, which=ablation.checkpoint, device=cell.recipe.train.device, console=console,
                     out=silent)
        metrics = read_cell_metrics(run, ablation.evaluate_set, ablation.checkpoint)
        if not metrics:
            raise SsltError(f"{run.dir}: training finished but metrics.jsonl has no test record for set "
                            f"{ablation.evaluate_set!r}, checkpoint {ablation.checkpoint!r}")
        shown = ", ".join(f"{header} {_x100(metrics[key])}" for header, key in ablation.metrics if key in metrics)
        console.print(f"cell {cell.name} finished: {shown} ({ablation.evaluate_set}, {ablation.checkpoint} "
                      f"checkpoint, N={int(metrics.get('n', 0))}); run {run.dir}", highlight=False, markup=False)
        entry["status"] = "finished"
        _link_child(run, parent_id, cell, ablation, "FINISHED", console)
        return "finished"
    except KeyboardInterrupt:
        run = run or new_run()
        entry.update(status="interrupted", run_dir=run.dir.name if run else None)
        _link_child(run, parent_id, cell, ablation, "KILLED", console)
        raise
    except Exception as exc:  # one cell's failure, whatever it is, must not stop the others
        run = run or new_run()
        error = exc.render() if isinstance(exc, SsltError) else f"{type(exc).__name__}: {exc}"
        entry.update(status="failed", error=error, run_dir=run.dir.name if run else None,
                     traceback=None if isinstance(exc, SsltError) else traceback.format_exc()[-6000:])
        console.print(f"[bold red]cell {cell.name} failed:[/] {escape(error)}", highlight=False)
        if not isinstance(exc, SsltError):
            console.print(f"(traceback in {folder / STATE})", highlight=False)
        _link_child(run, parent_id, cell, ablation, "FAILED", console)
        return "failed"
    finally:
        entry["updated"] = _now()
        _save_state(folder, state)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _run_cells(cells: list[Cell], ablation: Ablation, state: dict, parent_id: str | None,
               console: Console) -> bool:
    """Run every cell that is not finished; returns True when a cell was interrupted (the rest is left for later)."""
    plans = [inspect_cell(c, ablation, state) for c in cells]
    todo = [p for p in plans if p.action != "skip"]
    console.print(f"ablation {ablation.name}: {len(cells)} cells, {len(cells) - len(todo)} finished, {len(todo)} to "
                  f"run; folder {ablation.folder}", highlight=False)
    durations: list[float] = []
    for k, plan in enumerate(todo, 1):
        eta = ""
        if durations:
            mean = sum(durations) / len(durations)
            eta = f"; {_duration(mean)} per cell so far, about {_duration(mean * (len(todo) - k + 1))} left"
        note = f"; {plan.note}" if plan.note else ""
        console.print(f"[bold]cell {k}/{len(todo)} {escape(plan.cell.name)}[/]: {escape(_describe(plan))}"
                      f"{escape(note)}{eta}", highlight=False)
        started = time.monotonic()
        outcome = _run_cell(plan.cell, plan, ablation, state, parent_id, console)
        durations.append(time.monotonic() - started)
        if outcome == "interrupted":
            console.print(f"interrupted in cell {plan.cell.name}; run the same command again to continue from its "
                          "last checkpoint", highlight=False)
            return True
    return False


def _parent_tracker(ablation: Ablation, seeds: list[int], state: dict,
                    console: Console) -> tuple[Tracker, str | None]:
    """The ablation's MLflow parent run: reopened when the state names one in the same store that ran the same
    ``seeds``, else started. MLflow refuses to change a run's parameter, so other seeds get a new parent run whose
    ``ablation.seeds`` names them; returns the tracker and the id of the parent run it replaces so (else None)."""
    tracking = ablation.base.tracking
    warn = (lambda m: console.print(f"warning: {escape(m)}"))
    tracker = Tracker(enabled=tracking.enabled, experiment=tracking.experiment, warn=warn)
    tags = {"sslt.ablation": ablation.name, "sslt.ablation_dir": str(ablation.folder.resolve()),
            "sslt.ablation_file": str(ablation.path), "sslt.base": str(ablation.base_path)}
    previous = state.get("parent_run_id") if state.get("mlflow_uri") == tracker.uri else None
    same_seeds = state.get("seeds") == seeds
    if previous and same_seeds and tracker.start(f"ablation-{ablation.name}", run_id=previous) is not None:
        tracker.set_tags(tags)
        return tracker, None
    if previous and same_seeds:  # the parent run is gone from the store: start another
        tracker = Tracker(enabled=tracking.enabled, experiment=tracking.experiment, warn=warn)
    params = {"ablation.file": str(ablation.path), "ablation.base": str(ablation.base_path),
              "ablation.mode": ablation.mode, "ablation.rows": ",".join(r.name for r in ablation.rows),
              "ablation.seeds": ",".join(map(str, seeds)),
              "ablation.overrides": " ".join(ablation.file_overrides + ablation.command_overrides),
              "ablation.evaluate": f"{ablation.evaluate_set}/{ablation.checkpoint}",
              "ablation.retrieve": ablation.retrieve,
              **{f"base.{k}": v for k, v in flatten(recipe_dict(ablation.base)).items()}}
    tracker.start(f"ablation-{ablation.name}", params=params, tags=tags)
    return tracker, previous if previous and not same_seeds and tracker.run_id else None


def run_ablation(ablation: Ablation, *, seeds: int | Sequence[int] | None = None, dry_run: bool = False,
                 report_only: bool = False, console: Console | None = None,
                 out: Console | None = None) -> AblationResult:
    """``sslt ablate``: run every cell not yet finished, then write and print the summary.

    ``dry_run``: print each cell and what would happen to it (train, resume, retrieve, skip); touch nothing.
    ``report_only``: rebuild the table, ``summary.csv``, ``summary.md``, ``cells.csv`` and ``summary.png`` from the
    finished runs, without training. Progress and per-run output go to ``console`` (stderr); the ablation's table to
    ``out`` (stdout). A failed cell does not raise: see ``AblationResult.failed``.

    ``seeds`` (see :func:`resolve_seeds`): without them the seeds recorded in the folder's ``ablation.json`` run (or
    are reported), else the file's; given, they become the recorded ones. Raises SsltError when the folder records
    another base recipe or other command-line recipe overrides.
    """
    console = console or Console(stderr=True)
    out = out or Console()
    if dry_run:
        state = _load_state(ablation.folder)
        _check_same_ablation(ablation, state)
        cells = expand_cells(ablation, _seeds_to_run(ablation, seeds, state, console))
        results = [inspect_cell(c, ablation, state) for c in cells]
        out.print(plan_table(ablation, results))
        command = " ".join([str(ablation.base_path), *ablation.file_overrides, "<row overrides>",
                            *ablation.command_overrides, "name=<row>-seed<k>", "seed=<k>", f"runs_dir={ablation.folder}"])
        console.print(f"ablation folder: {ablation.folder}\neach cell is: sslt train {command}", highlight=False,
                      markup=False)
        return AblationResult(ablation, results, summarise(ablation, results), {}, state.get("parent_run_id"))
    if report_only and not (ablation.folder / STATE).is_file():
        raise SsltError(f"{ablation.folder}: nothing to report yet (no {STATE}); run the ablation without --report "
                        "first")
    ablation.folder.mkdir(parents=True, exist_ok=True)
    with _locked(ablation.folder):
        state = _load_state(ablation.folder)
        _check_same_ablation(ablation, state)
        run_seeds = _seeds_to_run(ablation, seeds, state, console)
        cells = expand_cells(ablation, run_seeds)
        tracker, replaced = _parent_tracker(ablation, run_seeds, state, console)
        state.update(file=str(ablation.path), name=ablation.name, base=str(ablation.base_path),
                     overrides=list(ablation.file_overrides + ablation.command_overrides),
                     command_overrides=list(ablation.command_overrides), seeds=run_seeds,
                     parent_run_id=tracker.run_id, mlflow_uri=tracker.uri if tracker.run_id else None)
        _save_state(ablation.folder, state)
        if replaced:
            console.print(f"MLflow parent run {tracker.run_id} replaces {replaced} (other seeds; MLflow keeps a "
                          "run's parameters); the finished cells' runs are now its children",
                          highlight=False, markup=False)
            for result in (inspect_cell(c, ablation, state) for c in cells):
                if result.status == "finished":
                    _link_child(result.run, tracker.run_id, result.cell, ablation, "FINISHED", console)
        interrupted = False
        try:
            if not report_only:
                interrupted = _run_cells(cells, ablation, state, tracker.run_id, console)
        except KeyboardInterrupt:
            results = [inspect_cell(c, ablation, state) for c in cells]
            _log_parent(tracker, ablation, results, write_report(ablation, results, out=None), "KILLED")
            raise
        results = [inspect_cell(c, ablation, state) for c in cells]
        files = write_report(ablation, results, out=out)
        if interrupted:
            status = "KILLED"
        elif any(r.status == "failed" for r in results):
            status = "FAILED"
        else:
            status = "FINISHED"
        _log_parent(tracker, ablation, results, files, status)
    return AblationResult(ablation, results, summarise(ablation, results), files, tracker.run_id, interrupted)


def _log_parent(tracker: Tracker, ablation: Ablation, results: list[CellResult], files: dict[str, Path],
                status: str) -> None:
    """Per-row means and stds, the summary files and the state on the parent run, which is then closed."""
    summaries = summarise(ablation, results)
    metrics: dict[str, float] = {}
    for s in summaries:
        for _, key in ablation.metrics:
            mean, std = s.mean(key), s.std(key)
            if mean is not None:
                metrics[f"{s.row.name}/{key}"] = mean
            if std is not None:
                metrics[f"{s.row.name}/{key}_std"] = std
        metrics[f"{s.row.name}/seeds_done"] = float(s.n_done)
    tracker.log_metrics(metrics, step=sum(s.n_done for s in summaries))
    for path in files.values():
        tracker.log_artifacts(path)
    tracker.log_artifacts(ablation.folder / STATE)
    tracker.end(status)


# ------------------------------------------------------------------------------------------------ results

def summarise(ablation: Ablation, results: list[CellResult]) -> list[RowSummary]:
    """One summary per row, in the file's order, over the row's cells (seeds in the order run)."""
    out = []
    for row in ablation.rows:
        cells = [r for r in results if r.cell.row == row.name]
        values: dict[str, list[float]] = {}
        for _, key in ablation.metrics:
            values[key] = [r.metrics[key] for r in cells if key in r.metrics]
        ticks = {name: fn(cells[0].cell.recipe) for name, fn in TICKS.items()} if cells else {}
        out.append(RowSummary(row=row, cells=cells, ticks=ticks, values=values))
    return out


def _x100(value: float | None, signed: bool = False) -> str:
    if value is None:
        return ""
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def _diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def _seeds_text(s: RowSummary) -> str:
    text = f"{s.n_done}/{len(s.cells)}"
    failed = s.count("failed")
    return text + (f" ({failed} failed)" if failed else "")


def _table_columns(ablation: Ablation, summaries: list[RowSummary]) -> list[tuple[str, str, Callable]]:
    """(header, justify, value(summary, previous summary) -> text) for the table and summary.md."""
    columns: list[tuple[str, str, Callable]] = [("row", "left", lambda s, p: s.row.label)]
    if ablation.mode == "rows":
        columns += [(name, "center", lambda s, p, name=name: "✓" if s.ticks.get(name) else "") for name in TICKS]
    else:
        short = _grid_names(list(ablation.grid_keys))
        columns += [(short[k], "right", lambda s, p, k=k: _value_text(s.row.values[k])) for k in ablation.grid_keys]
    columns.append(("seeds", "right", lambda s, p: _seeds_text(s)))
    with_paper = any(s.row.paper is not None for s in summaries)
    compared = {key for _, key in PAPER_METRICS}
    for header, key in ablation.metrics:
        def mean_std(s: RowSummary, p: RowSummary | None, key: str = key) -> str:
            mean, std = s.mean(key), s.std(key)
            return _x100(mean) + (f" ± {_x100(std)}" if std is not None else "")

        def paper(s: RowSummary, p: RowSummary | None, key: str = key) -> str:
            delta = _diff(s.paper(key), p.paper(key)) if p else None
            return _x100(s.paper(key)) + (f" ({_x100(delta, signed=True)})" if delta is not None else "")

        columns.append((header, "right", mean_std))
        # the deltas and the paper's values only for cIoU and AUC, the paper's columns: the table stays readable
        if key in compared:
            columns.append(("Δ", "right", lambda s, p, key=key: _x100(_diff(s.mean(key), p.mean(key)) if p else None,
                                                                         signed=True)))
            if with_paper:
                columns.append(("paper (Δ)", "right", paper))
    return columns


def _table_cells(ablation: Ablation, summaries: list[RowSummary]) -> tuple[list[tuple[str, str]], list[list[str]]]:
    columns = _table_columns(ablation, summaries)
    rows = [[fn(s, summaries[i - 1] if i else None) for _, _, fn in columns] for i, s in enumerate(summaries)]
    return [(header, justify) for header, justify, _ in columns], rows


def _title(ablation: Ablation, seeds: int) -> str:
    return (f"ablation {ablation.name}: base {ablation.base.name}, test set {ablation.evaluate_set} "
            f"({ablation.checkpoint} checkpoint), {seeds} seed{'s' if seeds != 1 else ''}")


def summary_table(ablation: Ablation, summaries: list[RowSummary]) -> Table:
    """The rich table: row, switches (or grid values), seeds done, each metric x100 as mean ± std over seeds with
    the delta to the row above, and the paper's value and delta beside cIoU and AUC."""
    headers, rows = _table_cells(ablation, summaries)
    seeds = max((len(s.cells) for s in summaries), default=0)
    table = Table(title=_title(ablation, seeds), caption="x100; mean ± sample std over seeds; Δ: to the row above")
    switches = set(TICKS) if ablation.mode == "rows" else set()
    for k, (header, justify) in enumerate(headers):
        if header in switches:
            # a narrow terminal folds the switch headers (their cells are one tick wide), never a number
            table.add_column(header, justify=justify, overflow="fold")  # type: ignore[arg-type]
        else:
            widest = max([len(header), *(len(values[k]) for values in rows)])
            table.add_column(header, justify=justify, no_wrap=True, min_width=widest)  # type: ignore[arg-type]
    for values in rows:
        table.add_row(*(escape(v) for v in values))
    return table


def paper_orderings(summaries: list[RowSummary], key: str) -> list[tuple[str, str, float, float | None]]:
    """For consecutive rows that both have the paper's value of ``key`` (and differ in it): (row above, row, the
    paper's change, our change of the mean (None where a row has no result yet))."""
    out = []
    for prev, cur in zip(summaries, summaries[1:]):
        paper = _diff(cur.paper(key), prev.paper(key))
        if paper is None or paper == 0:
            continue
        out.append((prev.row.label, cur.row.label, paper, _diff(cur.mean(key), prev.mean(key))))
    return out


def ordering_lines(summaries: list[RowSummary]) -> list[str]:
    """One line per metric: which of the paper's steps between consecutive rows the results reproduce (a step is
    reproduced when our mean moves in the paper's direction; '=' marks a tie, '?' a row without a result)."""
    lines = []
    for header, key in PAPER_METRICS:
        steps = paper_orderings(summaries, key)
        measured = [s for s in steps if s[3] is not None]
        if not measured:
            continue
        same = sum(1 for _, _, paper, ours in measured if ours and (ours > 0) == (paper > 0))
        parts = []
        for above, row, paper, ours in steps:
            mark = "?" if ours is None else "=" if ours == 0 else "✓" if (ours > 0) == (paper > 0) else "✗"
            parts.append(f"{above}{'<' if paper > 0 else '>'}{row} {mark}")
        lines.append(f"{header}: {same} of {len(measured)} of the paper's steps reproduced ({', '.join(parts)})")
    return lines


def baseline_line(ablation: Ablation, results: list[CellResult]) -> str | None:
    """``N = 500 test clips (vggss); centre-prior baseline: cIoU 34.10, AUC 37.20`` from the evaluated cells."""
    done = [r.metrics for r in results if r.metrics]
    if not done:
        return None
    sizes = sorted({int(m["n"]) for m in done if "n" in m})
    text = f"N = {' or '.join(map(str, sizes))} test clips ({ablation.evaluate_set})"
    centre = next((m for m in done if "baseline_centre/ciou" in m), None)
    if centre is not None:
        text += (f"; centre-prior baseline: cIoU {_x100(centre['baseline_centre/ciou'])}, "
                 f"AUC {_x100(centre.get('baseline_centre/auc'))}")
    return text


def _failed_lines(results: list[CellResult]) -> list[str]:
    return [f"{r.cell.name}: {r.error or 'failed'}" for r in results if r.status == "failed"]


def _markdown(ablation: Ablation, summaries: list[RowSummary], results: list[CellResult]) -> str:
    headers, rows = _table_cells(ablation, summaries)
    seeds = max((len(s.cells) for s in summaries), default=0)

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    text = [f"# {_title(ablation, seeds)}", "",
            f"Ablation file `{ablation.path}`, base recipe `{ablation.base_path}`"
            + (f", overrides `{' '.join(ablation.file_overrides + ablation.command_overrides)}`"
               if ablation.file_overrides or ablation.command_overrides else "") + ".",
            "Values x100; mean ± sample std over seeds; Δ: to the row above.", "",
            line([h for h, _ in headers]),
            "|" + "|".join(":---" if j == "left" else ":---:" if j == "center" else "---:" for _, j in headers) + "|"]
    text += [line(r) for r in rows]
    baseline = baseline_line(ablation, results)
    if baseline:
        text += ["", baseline + "."]
    orderings = ordering_lines(summaries)
    if orderings:
        text += ["", "## The paper's orderings", ""] + [f"- {o}" for o in orderings]
    failed = _failed_lines(results)
    if failed:
        text += ["", "## Failed cells", ""] + [f"- `{f.splitlines()[0]}`" for f in failed]
    return "\n".join(text) + "\n"


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _number(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _summary_csv(ablation: Ablation, summaries: list[RowSummary]) -> str:
    keys = [key for _, key in ablation.metrics]
    labels = list(TICKS) if ablation.mode == "rows" else list(ablation.grid_keys)
    header = ["row", *labels, "seeds", "seeds_done", "seeds_failed"]
    for key in keys:
        column = key.replace("/", "_")
        header += [f"{column}_mean", f"{column}_std", f"{column}_delta"]
    header += [f"paper_{k}" for _, k in PAPER_METRICS] + [f"paper_{k}_delta" for _, k in PAPER_METRICS]
    rows = []
    for i, s in enumerate(summaries):
        prev = summaries[i - 1] if i else None
        marks = ([int(s.ticks.get(n, False)) for n in labels] if ablation.mode == "rows"
                 else [_value_text(s.row.values[k]) for k in labels])
        row: list[Any] = [s.row.name, *marks, len(s.cells), s.n_done, s.count("failed")]
        for key in keys:
            row += [_number(s.mean(key)), _number(s.std(key)),
                    _number(_diff(s.mean(key), prev.mean(key)) if prev else None)]
        row += [_number(s.paper(k)) for _, k in PAPER_METRICS]
        row += [_number(_diff(s.paper(k), prev.paper(k)) if prev else None) for _, k in PAPER_METRICS]
        rows.append(row)
    return _csv_text(header, rows)


def _cells_csv(ablation: Ablation, results: list[CellResult]) -> str:
    keys = [key for _, key in ablation.metrics]
    keys += ["n", "baseline_centre/ciou", "baseline_centre/auc"]
    header = ["cell", "row", "seed", "status", "run_dir", *(k.replace("/", "_") for k in keys), "error"]
    rows = []
    for r in results:
        error = r.error.splitlines()[0] if r.error else ""
        rows.append([r.cell.name, r.cell.row, r.cell.seed, r.status, str(r.run.dir) if r.run else "",
                     *[_number(r.metrics.get(k)) for k in keys], error])
    return _csv_text(header, rows)


def _chart_png(ablation: Ablation, summaries: list[RowSummary], results: list[CellResult]) -> bytes:
    """cIoU and AUC per row: bars at the mean over seeds with sample-std error bars, each seed as a dot, the
    paper's values as diamonds and the centre-prior baseline as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [s.row.label for s in summaries]
    width = max(6.0, 0.9 * len(labels) + 2.5)
    fig, axes = plt.subplots(1, 2, figsize=(width, 4.2), squeeze=False)
    x = list(range(len(summaries)))
    for ax, (header, key) in zip(axes[0], PAPER_METRICS):
        means = [100 * m if (m := s.mean(key)) is not None else 0.0 for s in summaries]
        errors = [100 * e if (e := s.std(key)) is not None else 0.0 for s in summaries]
        ax.bar(x, means, yerr=errors, capsize=4, color="#4c72b0", alpha=0.85, label="sslt (mean ± std)")
        dots = [(i, 100 * v) for i, s in enumerate(summaries) for v in s.values.get(key, [])]
        if dots:
            ax.scatter([d[0] for d in dots], [d[1] for d in dots], s=12, color="black", zorder=3, label="seeds")
        paper = [(i, 100 * p) for i, s in enumerate(summaries) if (p := s.paper(key)) is not None]
        if paper:
            ax.scatter([p[0] for p in paper], [p[1] for p in paper], marker="D", s=40, color="#c44e52", zorder=4,
                       label="paper")
        centre = next((r.metrics[f"baseline_centre/{key}"] for r in results
                       if f"baseline_centre/{key}" in r.metrics), None)
        if centre is not None:
            ax.axhline(100 * centre, color="grey", linestyle="--", linewidth=1, label="centre prior")
        ax.set_xticks(x, labels, rotation=0 if ablation.mode == "rows" and max(map(len, labels)) <= 6 else 30,
                      ha="center" if ablation.mode == "rows" and max(map(len, labels)) <= 6 else "right", fontsize=8)
        ax.set_ylabel(f"{header} (x100)")
        ax.set_title(header)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{ablation.name} (base {ablation.base.name}, {ablation.evaluate_set}, {ablation.checkpoint})",
                 fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def write_report(ablation: Ablation, results: list[CellResult], *, out: Console | None = None) -> dict[str, Path]:
    """Write ``summary.csv``, ``summary.md``, ``cells.csv`` and ``summary.png`` into the ablation folder and print the
    table, the paper's orderings and the failed cells on ``out`` (nothing printed when ``out`` is None).

    Returns the files by kind: ``csv``, ``md``, ``cells``, ``png``.
    """
    from sslt_cli.data.manifest import atomic_write_bytes

    summaries = summarise(ablation, results)
    folder = ablation.folder
    files = {"csv": folder / "summary.csv", "md": folder / "summary.md", "cells": folder / "cells.csv",
             "png": folder / "summary.png"}
    atomic_write_text(files["csv"], _summary_csv(ablation, summaries))
    atomic_write_text(files["md"], _markdown(ablation, summaries, results))
    atomic_write_text(files["cells"], _cells_csv(ablation, results))
    atomic_write_bytes(files["png"], _chart_png(ablation, summaries, results))
    if out is not None:
        out.print(summary_table(ablation, summaries))
        for text in filter(None, [baseline_line(ablation, results), *ordering_lines(summaries)]):
            out.print(text, highlight=False, markup=False)
        for text in _failed_lines(results):
            out.print(f"failed: {text}", highlight=False, markup=False)
        out.print(f"summary: {files['md']}, {files['csv']}, {files['png']}", highlight=False, markup=False)
    return files


def plan_table(ablation: Ablation, results: list[CellResult]) -> Table:
    """``--dry-run``: each cell, its state and what running the ablation would do with it."""
    table = Table(title=f"ablation {ablation.name}: {len(results)} cells in {ablation.folder}")
    table.add_column("cell", no_wrap=True)
    table.add_column("status")
    table.add_column("next", overflow="fold")
    table.add_column("row overrides", overflow="fold")
    rows = {r.name: r for r in ablation.rows}
    for r in results:
        values = (r.cell.name, r.status, _describe(r) + (f" ({r.note})" if r.note else ""),
                  " ".join(rows[r.cell.row].overrides))
        table.add_row(*(escape(v) for v in values))
    return table
