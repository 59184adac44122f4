"""The ablation-file language: the file's schema, its validation (every problem reported together, naming the file,
the row and the dotted key), and its expansion into cells (one validated recipe per row and seed).

Nothing here touches the ablation's folder or MLflow: :mod:`sslt_cli.ablate.runner` runs what this module describes.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from sslt_cli.catalog import RECIPES_DIR, resolve_recipe
from sslt_cli.config import Recipe, apply_overrides, load_tree, parse_override, parse_yaml, validate_tree
from sslt_cli.data.difficulty import Difficulty, parse_difficulty
from sslt_cli.errors import DataError, RecipeError


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
# With generated data the centre prior differs from cell to cell, so the table shows it, the pointing game and the
# share of the row's seeds whose learning check failed (sslt_cli/learning_check.py).
SYNTHETIC_METRICS = (("pointing", "pointing"), ("centre AUC", "baseline_centre/auc"), ("not learning", "not_learning"))

# Command-line keys that change the ablation itself (and any ``synthetic.<key>``); every other key is a recipe override.
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
    """One named row: the paper's switches (shorthand for ``SWITCHES``' keys), overrides, the paper's values, and
    the difficulty knobs of its generated data (``preset`` and knobs over the file's ``synthetic`` section)."""

    overrides: list[str] = Field(default_factory=list)
    switches: dict[str, bool] = Field(default_factory=dict)
    paper: PaperValues | None = None
    synthetic: dict[str, Any] = Field(default_factory=dict)


class SyntheticSpec(_FileModel):
    """Generated data for every cell (``sslt prepare synthetic``): the preset and knobs (``sslt_cli.data.difficulty``)
    and the set sizes; each distinct benchmark is generated once into ``<runs_dir>/.synthetic/<preset>-<digest>``
    and the cell's ``data.root`` points there."""

    preset: str = "easy"
    knobs: dict[str, Any] = Field(default_factory=dict)
    n_train: int = Field(2000, ge=1)
    n_val: int = Field(200, ge=1)
    n_test: int = Field(500, ge=1)
    n_flickr: int = Field(0, ge=0)
    seed: int = Field(0, ge=0)
    image_size: int = Field(128, ge=32, le=1024)


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
    synthetic: SyntheticSpec | None = None


# ------------------------------------------------------------------------------------------ loaded ablation

@dataclass(frozen=True)
class SyntheticData:
    """A cell's generated benchmark: where it lives, its difficulty and ``generate``'s other arguments."""

    root: Path
    difficulty: Difficulty
    sets: dict[str, int]

    @property
    def knobs_text(self) -> str:
        """The knobs that differ from the easy benchmark, as ``name=value`` (``easy`` when none does)."""
        easy = Difficulty().as_dict()
        changed = [f"{k}={v}" for k, v in self.difficulty.as_dict().items() if easy[k] != v]
        return " ".join(changed) or "easy"


def synthetic_data(spec: SyntheticSpec, row_knobs: dict[str, Any], runs_dir: str | Path,
                   where: str) -> SyntheticData:
    """The benchmark a row trains and tests on: the file's preset and knobs, the row's over them (a row's
    ``preset`` replaces the file's). Raises DataError naming ``where`` and every bad knob."""
    knobs = {**spec.knobs, **{k: v for k, v in row_knobs.items() if k != "preset"}}
    difficulty = parse_difficulty(str(row_knobs.get("preset", spec.preset)), knobs, where=where)
    sets = spec.model_dump(exclude={"preset", "knobs"})
    identity = json.dumps({"difficulty": difficulty.as_dict(), **sets}, sort_keys=True)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:10]
    label = "easy" if difficulty.is_default else "knobs"
    return SyntheticData(Path(runs_dir) / ".synthetic" / f"{label}-{digest}", difficulty, sets)

@dataclass(frozen=True)
class Row:
    """A row of the table. ``name`` names its cells' runs; ``overrides`` are the row's own (switches first, then its
    overrides, or the grid values); ``values`` are the grid values by key (empty for named rows)."""

    name: str
    label: str
    overrides: tuple[str, ...]
    paper: PaperValues | None = None
    values: dict[str, Any] = field(default_factory=dict)
    synthetic: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Ablation:
    """A validated ablation: what :func:`expand_cells` turns into cells and the runner runs.

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
    synthetic: SyntheticSpec | None = None

    @property
    def metrics(self) -> tuple[tuple[str, str], ...]:
        """(header, key) of the metrics tabulated: localisation, with generated data its pointing game, centre prior
        and learning check, and retrieval when the cells retrieve."""
        return (LOCALISATION_METRICS + (SYNTHETIC_METRICS if self.synthetic else ())
                + (RETRIEVAL_METRICS if self.retrieve else ()))

    def data_of(self, row: Row) -> SyntheticData | None:
        """The generated benchmark of ``row``'s cells (None: the recipe's own data)."""
        if self.synthetic is None:
            return None
        return synthetic_data(self.synthetic, row.synthetic, self.base.runs_dir, _where(str(self.path), self.mode,
                                                                                         row))


@dataclass(frozen=True)
class Cell:
    """One training run of the ablation: a row with a seed. ``overrides`` applied to the base recipe give ``recipe``
    exactly (``sslt train <base> <overrides>`` reproduces the cell)."""

    name: str
    row: str
    seed: int
    recipe: Recipe
    overrides: tuple[str, ...]
    data: SyntheticData | None = None


# ----------------------------------------------------------------------------------------------- loading

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
               paper=spec.paper, synthetic=dict(spec.synthetic))


def _parse_rows(rows: dict[str, Any], source: str, problems: list[str]) -> list[Row]:
    if not rows:
        problems.append(f"{source}: rows is empty; name at least one row, e.g. rows: {{A: {{overrides: [...]}}}}")
    parsed = [_parse_row(str(name), body, source, problems) for name, body in rows.items()]
    return [row for row in parsed if row is not None]


def grid_names(keys: list[str]) -> dict[str, str]:
    """A short name per grid key: its last part, or the whole key where two keys share a last part."""
    leaves = [k.split(".")[-1] for k in keys]
    return {k: (leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(keys, leaves)}


def value_text(value: Any) -> str:
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
    short = grid_names(keys)
    rows = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        name = "-".join(re.sub(r"[^\w.\-]", "_", f"{short[k]}_{value_text(v)}") for k, v in values.items())
        label = " ".join(f"{short[k]}={value_text(v)}" for k, v in values.items())
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
                    folder: str, data: SyntheticData | None = None) -> list[str]:
    """The cell's overrides; a generated benchmark's ``data.root`` comes after the file's overrides (a row's or the
    command line's own ``data.root`` still wins)."""
    root = [f"data.root={_yaml_value(str(data.root))}"] if data is not None else []
    return [*ablation_file, *root, *row.overrides, *command, f"name={name}", f"seed={seed}",
            f"runs_dir={_yaml_value(folder)}"]


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
        if key in ABLATION_KEYS or key.startswith("synthetic."):
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
        data = _row_data(spec, row, base.runs_dir, _where(source, mode, row), problems)
        texts = _cell_overrides(spec.overrides, row, command, cell_name(row.name, seeds[0]), seeds[0], str(folder),
                                data)
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
                    folder=folder, synthetic=spec.synthetic)


def _row_data(spec: AblationSpec, row: Row, runs_dir: str, where: str, problems: list[str]) -> SyntheticData | None:
    """The row's generated benchmark (None without a ``synthetic`` section), its problems added to ``problems``."""
    if spec.synthetic is None:
        if row.synthetic:
            problems.append(f"{where}: synthetic knobs need the file's synthetic: section (the sets to generate), "
                            "e.g. synthetic: {preset: easy, n_train: 2000}")
        return None
    try:
        return synthetic_data(spec.synthetic, row.synthetic, runs_dir, where)
    except DataError as exc:
        problems.extend([f"{exc.message}: {p}" for p in exc.problems] or [exc.message])
        return None


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
            data = ablation.data_of(row)
            texts = _cell_overrides(ablation.file_overrides, row, ablation.command_overrides, name, seed,
                                    str(ablation.folder), data)
            recipe, problems = _validate(ablation.base_tree, texts, _where(str(ablation.path), ablation.mode, row))
            if recipe is None:
                raise RecipeError(f"{ablation.path}: {len(problems)} problem(s) in the ablation", problems)
            cells.append(Cell(name=name, row=row.name, seed=seed, recipe=recipe, overrides=tuple(texts), data=data))
    return cells

