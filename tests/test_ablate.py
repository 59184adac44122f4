"""`sslt ablate`: ablation files, cells, resume/skip/retry, the summary, and one real 2-cell run with MLflow."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from sslt_cli import ablate
from sslt_cli.ablate import (TICKS, expand_cells, inspect_cell, load_ablation, load_state, paper_orderings,
                             resolve_seeds, run_ablation)
from sslt_cli.config import load_recipe
from sslt_cli.errors import RecipeError, TrainingError
from sslt_cli.runs import Run
from sslt_cli.train import TrainResult

SHIPPED = ("paper_transformations", "per_transform", "geo_weight", "baselines", "hard_factors")
# REFERENCE.md section 7: row -> (T_app, T_geo, T_mask, T_mix, L_cl, L_geo), cIoU, AUC
PAPER_TABLE = {
    "A": ((False, False, False, False, True, False), 0.3292, 0.3744),
    "B": ((True, False, False, False, True, False), 0.3364, 0.3721),
    "C": ((True, True, False, False, True, False), 0.3580, 0.3847),
    "D": ((True, True, True, False, True, False), 0.3748, 0.3887),
    "E": ((True, True, True, True, True, False), 0.3766, 0.3937),
    "F": ((True, True, True, True, True, True), 0.3863, 0.3965),
}


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


@pytest.fixture
def recipes(tmp_path: Path, repo_root: Path) -> Path:
    """tmp/recipes/ with tie_full.yaml (tracking off) and an empty ablations/ folder."""
    folder = tmp_path / "recipes"
    (folder / "ablations").mkdir(parents=True)
    text = (repo_root / "recipes" / "tie_full.yaml").read_text()
    (folder / "tie_full.yaml").write_text(text + "tracking: {enabled: false}\n")
    return folder


def write_ablation(recipes: Path, body: str, name: str = "study") -> Path:
    path = recipes / "ablations" / f"{name}.yaml"
    path.write_text(body)
    return path


ROWS_ABC = """\
base: ../tie_full.yaml
seeds: [4, 5]
rows:
  A:
    switches: {T_app: false, T_geo: false}
    paper: {ciou: 0.30, auc: 0.40}
  B:
    switches: {T_geo: false}
    paper: {ciou: 0.32, auc: 0.39}
  C:
    overrides: [optim.lr=2e-4]
    paper: {ciou: 0.35, auc: 0.41}
"""


# ------------------------------------------------------------------------------------------- file validation

def problems_of(path: Path, overrides: list[str] | None = None) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_ablation(path, overrides)
    return info.value


def test_an_unknown_key_in_a_row_names_the_file_the_row_the_key_and_the_closest_key(recipes: Path) -> None:
    path = write_ablation(recipes, "base: ../tie_full.yaml\nrows:\n  A: {}\n  B:\n"
                                   "    overrides: [transforms.app.enabeld=false]\n")
    err = problems_of(path)
    assert err.message == f"{path}: 1 problem(s) in the ablation"
    assert err.problems == [f"{path}: row 'B': unknown key 'transforms.app.enabeld' (did you mean "
                            "'transforms.app.enabled'?) (from override 'transforms.app.enabeld=false')"]


def test_an_empty_grid_is_an_error(recipes: Path) -> None:
    path = write_ablation(recipes, "base: ../tie_full.yaml\ngrid: {}\n")
    assert problems_of(path).problems == [
        f"{path}: grid is empty; give each key a list of values, e.g. grid: {{loss.geo_weight: [0.5, 1.0]}}"]
    path = write_ablation(recipes, "base: ../tie_full.yaml\ngrid: {loss.geo_weight: []}\n")
    assert problems_of(path).problems == [
        f"{path}: grid 'loss.geo_weight' has no values; give a list such as [0.5, 1.0]"]


def test_every_problem_of_a_file_is_reported_together(recipes: Path) -> None:
    path = write_ablation(recipes, """\
base: ../tie_full.yaml
seed: 3
rows:
  A: {overides: [optim.lr=1]}
  B: {switches: {T_ap: true}}
  C: {overrides: [seed=5, optim.lr]}
""")
    err = problems_of(path)
    assert err.problems == [
        f"{path}: unknown key 'seed' (did you mean 'seeds'?)",
    ]
    path.write_text(path.read_text().replace("seed: 3\n", ""))
    assert problems_of(path).problems == [
        f"{path}: row 'A': unknown key 'overides' (did you mean 'overrides'?)",
        f"{path}: row 'B': unknown switch 'T_ap' (did you mean 'T_app'?); the switches are T_app, T_geo, T_mask, "
        "T_mix, L_geo",
        f"{path}: row 'C': override 'seed=5': the ablation sets each cell's seed: use seeds: [...] in the file, "
        "seeds=[...] or --seeds N",
        f"{path}: row 'C': override 'optim.lr' is not of the form key=value",
    ]


def test_grid_and_recipe_problems_name_where_they_come_from(recipes: Path) -> None:
    path = write_ablation(recipes, "base: ../tie_full.yaml\ngrid:\n  loss.geo_weigth: [0.5, 1.0]\n"
                                   "  optim.lr: [1e-4, -1]\n")
    assert problems_of(path).problems == [
        f"{path}: grid: unknown key 'loss.geo_weigth' (did you mean 'loss.geo_weight'?) "
        "(from override 'loss.geo_weigth=0.5')",
        f"{path}: grid: key 'optim.lr': input should be greater than 0, got -1 (from override 'optim.lr=-1')",
    ]
    path = write_ablation(recipes, ROWS_ABC)
    err = problems_of(path, ["optim.lrr=1", "evaluate.set=flickr"])
    assert err.problems == [
        f"{path}: unknown key 'optim.lrr' (did you mean 'optim.lr'?) (from override 'optim.lrr=1')"]
    err = problems_of(path, ["evaluate.set=flickr", "data.val=null"])
    assert err.problems == [
        f"{path}: key 'evaluate.set': 'flickr' is not a test set of the base recipe (data.test has vggss); choose one "
        "of those",
        f"{path}: key 'evaluate.checkpoint': 'best' is chosen on the validation set and the base recipe has none "
        "(data.val); use evaluate.checkpoint=last or set data.val",
    ]


def test_rows_and_grid_together_or_neither_is_an_error(recipes: Path) -> None:
    path = write_ablation(recipes, "base: ../tie_full.yaml\nrows: {A: {}}\ngrid: {optim.lr: [1e-4]}\n")
    assert problems_of(path).problems == [
        f"{path}: give either rows (named cells) or grid (a cartesian product), not both"]
    path = write_ablation(recipes, "base: ../tie_full.yaml\nrows: {}\n")
    assert problems_of(path).problems == [
        f"{path}: rows is empty; name at least one row, e.g. rows: {{A: {{overrides: [...]}}}}"]


def test_a_missing_base_and_a_report_before_any_run_are_explained(recipes: Path) -> None:
    path = write_ablation(recipes, "rows: {A: {}}\n")
    assert problems_of(path).problems == [
        f"{path}: key 'base' is missing; name the base recipe, e.g. base: ../tie_full.yaml in the file or "
        "base=quickstart on the command line"]
    ablation = load_ablation(path, ["base=tie_full"])
    with pytest.raises(ablate.SsltError) as info:
        run_ablation(ablation, report_only=True, console=quiet(), out=quiet())
    assert info.value.message == ("runs/ablations/study: nothing to report yet (no ablation.json); run the ablation "
                                  "without --report first")


# ------------------------------------------------------------------------------------------- base selection

def test_base_by_name_by_path_and_by_override(recipes: Path, tmp_path: Path) -> None:
    quick = (recipes / "tie_full.yaml").read_text().replace("name: tie_full", "name: quickstart")
    (recipes / "quickstart.yaml").write_text(quick)
    path = write_ablation(recipes, ROWS_ABC.replace("../tie_full.yaml", "tie_full"))
    assert load_ablation(path).base_path == recipes / "tie_full.yaml"
    selected = load_ablation(path, ["base=quickstart"])
    assert selected.base_path == recipes / "quickstart.yaml"
    assert {c.recipe.name for c in expand_cells(selected)} == {"A-seed4", "B-seed4", "C-seed4", "A-seed5",
                                                               "B-seed5", "C-seed5"}
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(recipes / "quickstart.yaml", tmp_path / "elsewhere" / "mine.yaml")
    assert load_ablation(path, ["base=elsewhere/mine.yaml"]).base_path == Path("elsewhere/mine.yaml")
    err = problems_of(path, ["base=nowhere"])
    assert err.problems[0].startswith(f"{path}: base recipe 'nowhere' not found; tried {recipes / 'ablations'}"
                                      "/nowhere.yaml")


# ---------------------------------------------------------------------------------------------------- cells

def test_rows_expand_seed_by_seed_with_the_precedence_of_the_overrides(recipes: Path) -> None:
    path = write_ablation(recipes, ROWS_ABC.replace("seeds: [4, 5]\n", "seeds: [4, 5]\noverrides: [optim.lr=3e-4, "
                                                    "transforms.geo.enabled=true]\n"))
    ablation = load_ablation(path, ["optim.epochs=2"])
    cells = expand_cells(ablation)
    assert [(c.name, c.row, c.seed) for c in cells] == [
        ("A-seed4", "A", 4), ("B-seed4", "B", 4), ("C-seed4", "C", 4),
        ("A-seed5", "A", 5), ("B-seed5", "B", 5), ("C-seed5", "C", 5)]
    a, b, c = cells[:3]
    # the row's switch beats the file's override; the file's override holds where the row says nothing
    assert (a.recipe.transforms.geo.enabled, a.recipe.transforms.app.enabled, a.recipe.optim.lr) == (False, False, 3e-4)
    assert c.recipe.optim.lr == 2e-4 and c.recipe.transforms.geo.enabled
    assert all(x.recipe.optim.epochs == 2 and x.recipe.runs_dir == "runs/ablations/study" for x in cells)
    assert cells[4].recipe.seed == 5
    assert load_ablation(path, ["name=other"]).folder == Path("runs/ablations/other")
    assert load_ablation(path, ["runs_dir=elsewhere"]).folder == Path("elsewhere/ablations/study")
    # the overrides reproduce the cell's recipe from the base recipe
    for cell in cells:
        assert load_recipe(ablation.base_path, list(cell.overrides)) == cell.recipe


def test_a_grid_is_the_cartesian_product_in_file_order(recipes: Path) -> None:
    path = write_ablation(recipes, "base: ../tie_full.yaml\nseeds: 2\ngrid:\n  loss.geo_weight: [0.5, 2]\n"
                                   "  transforms.equivariance.max_rotation: [0, 15, 30]\n")
    ablation = load_ablation(path)
    assert ablation.seeds == (4, 5)  # a count starts at the base recipe's seed
    cells = expand_cells(ablation)
    assert len(cells) == 12
    assert [(c.recipe.loss.geo_weight, c.recipe.transforms.equivariance.max_rotation) for c in cells[:6]] == [
        (0.5, 0), (0.5, 15), (0.5, 30), (2.0, 0), (2.0, 15), (2.0, 30)]
    assert [c.seed for c in cells] == [4] * 6 + [5] * 6
    assert cells[1].name == "geo_weight_0.5-max_rotation_15-seed4"
    assert ablation.rows[1].label == "geo_weight=0.5 max_rotation=15"


def test_seeds_from_the_file_a_count_or_a_list(recipes: Path) -> None:
    path = write_ablation(recipes, ROWS_ABC.replace("seeds: [4, 5]", "seeds: [7, 3]"))
    ablation = load_ablation(path)
    assert resolve_seeds(ablation, None) == [7, 3]
    assert resolve_seeds(ablation, 1) == [7]
    assert resolve_seeds(ablation, 4) == [7, 3, 8, 9]
    assert resolve_seeds(ablation, [1, 2]) == [1, 2]
    assert load_ablation(path, ["seeds=3"]).seeds == (4, 5, 6)
    assert len(expand_cells(ablation, 3)) == 9
    with pytest.raises(RecipeError, match="give at least 1 seed"):
        resolve_seeds(ablation, 0)
    # the seeds recorded in the ablation's folder are the current ones, unless the command line says seeds=
    assert resolve_seeds(ablation, None, [3, 9]) == [3, 9]
    assert resolve_seeds(ablation, 3, [3, 9]) == [3, 9, 10]
    assert resolve_seeds(load_ablation(path, ["seeds=[1]"]), None, [3, 9]) == [1]


def test_every_shipped_ablation_file_is_tested(repo_root: Path) -> None:
    assert sorted(p.stem for p in (repo_root / "recipes" / "ablations").glob("*.yaml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("base", [None, "tie_full", "quickstart"])
def test_shipped_ablation_files_validate(repo_root: Path, name: str, base: str | None) -> None:
    path = repo_root / "recipes" / "ablations" / f"{name}.yaml"
    ablation = load_ablation(path, [f"base={base}"] if base else [])
    if base:
        assert ablation.base_path == repo_root / "recipes" / f"{base}.yaml"
    cells = expand_cells(ablation)
    assert [c.name for c in cells] == [f"{row.name}-seed{seed}" for seed in ablation.seeds for row in ablation.rows]
    assert all(c.recipe.name == c.name and c.recipe.runs_dir == str(ablation.folder) for c in cells)


def test_the_paper_file_has_rows_a_to_f_exactly_as_the_paper(repo_root: Path) -> None:
    ablation = load_ablation(repo_root / "recipes" / "ablations" / "paper_transformations.yaml")
    cells = expand_cells(ablation)
    assert [c.row for c in cells] == list(PAPER_TABLE)
    for cell, row in zip(cells, ablation.rows):
        ticks, ciou, auc = PAPER_TABLE[cell.row]
        assert tuple(fn(cell.recipe) for fn in TICKS.values()) == ticks, cell.row
        assert (row.paper.ciou, row.paper.auc) == (ciou, auc)


def test_the_per_transform_file_turns_on_one_transformation_per_row(repo_root: Path) -> None:
    cells = {c.row: c.recipe for c in expand_cells(load_ablation(repo_root / "recipes/ablations/per_transform.yaml"))}

    def active(r) -> set[str]:
        t = r.transforms
        on = set()
        if t.app.enabled:
            on |= {n for n, p in (("jitter", t.app.jitter_p), ("grayscale", t.app.gray_p), ("blur", t.app.blur_p)) if p}
        if t.geo.enabled:
            on |= {n for n, v in (("crop", t.geo.crop), ("rotation", t.geo.rotation), ("flip", t.geo.flip)) if v}
        if t.mask.enabled:
            on |= {n for n, v in (("time_mask", t.mask.time), ("freq_mask", t.mask.freq)) if v}
        if t.mix.enabled or t.equivariance.enabled:
            on.add("mix or L_geo")
        return on

    assert {row: active(r) for row, r in cells.items()} == {
        "A": set(), **{name: {name} for name in ("jitter", "grayscale", "blur", "crop", "rotation", "flip",
                                                  "time_mask", "freq_mask")}}


# ------------------------------------------------------------------------------- running with a fake trainer

# cIoU of the best checkpoint per (row, seed); 'last' is 0.1 lower so a wrong checkpoint shows
CIOU = {("A", 4): 0.30, ("A", 5): 0.32, ("B", 4): 0.33, ("B", 5): 0.37, ("C", 4): 0.31, ("C", 5): 0.35}


class FakeTrainer:
    """Stands in for sslt_cli.train.train: fills the run folder it is given with test records (as train writes them,
    for a later process to read) and returns them in a TrainResult, or fails, or stops. ``files=False``: it writes
    no test record, so only the returned result carries the numbers."""

    def __init__(self, behaviour: dict[str, str] | None = None, files: bool = True):
        self.behaviour = behaviour or {}
        self.files = files
        self.calls: list[tuple[str, str | None]] = []

    def __call__(self, recipe, run, *, sink, resume=False, console=None, out=None, stop_after_steps=None,
                 evaluate_at_end=True) -> TrainResult:
        self.calls.append((recipe.name, run.dir.name if resume else None))
        what = self.behaviour.get(recipe.name, "ok")
        if what == "fail":
            run.update_meta(status="failed", error="TrainingError: the loss became nan")
            raise TrainingError("the loss became nan at step 3 (epoch 0); training stopped")
        if what in ("ctrl-c", "interrupt"):
            last = run.checkpoints / "last-00000002.pt"
            last.write_bytes(b"")
            if what == "ctrl-c":  # outside train's own signal handling: it marks the run failed and re-raises
                run.update_meta(status="failed", error="KeyboardInterrupt: ")
                raise KeyboardInterrupt
            run.update_meta(status="interrupted")
            return TrainResult(run=run, status="interrupted", best=None, last=last, history=[], protocol=None,
                               test={})
        return self.finish(recipe, run)

    def finish(self, recipe, run: Run) -> TrainResult:
        row, seed = recipe.name.rsplit("-seed", 1)
        ciou = CIOU[(row, int(seed))]
        test: dict[str, dict[str, float]] = {}
        for checkpoint, shift in (("last", -0.1), ("best", 0.0)):
            numbers = {"n": 8, "ciou": ciou + shift, "auc": ciou + 0.05 + shift, "mean_iou": ciou - 0.1 + shift}
            test[checkpoint] = {**numbers, "baseline_centre/ciou": 0.5, "baseline_centre/auc": 0.4375}
            if self.files:
                run.append_metrics({"kind": "test", "set": "vggss", "checkpoint": checkpoint, "step": 4,
                                    "protocol": "ssltie", **numbers})
                evaluation = run.dir / "eval" / f"vggss-{checkpoint}-ssltie"
                evaluation.mkdir(parents=True)
                (evaluation / "metrics.json").write_text(json.dumps(
                    {"n": 8, "baselines": {"centre": {"ciou": 0.5, "auc": 0.4375, "n": 8}}}))
        run.update_meta(status="finished")
        return TrainResult(run=run, status="finished", best=run.checkpoints / "best.pt",
                           last=run.checkpoints / "last-00000004.pt", history=[], protocol="ssltie",
                           test={"vggss": test})


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeTrainer:
    trainer = FakeTrainer()
    monkeypatch.setattr("sslt_cli.train.train", trainer)
    # and for the checks before a run, which would look for the base recipe's data (there is none here)
    monkeypatch.setattr("sslt_cli.train.preflight", lambda recipe, *args, **kwargs: None)
    return trainer


def test_summary_values_files_and_chart(recipes: Path, fake: FakeTrainer) -> None:
    out = quiet()
    result = run_ablation(load_ablation(write_ablation(recipes, ROWS_ABC)), console=quiet(), out=out)
    assert [c.status for c in result.cells] == ["finished"] * 6
    a, b, c = result.rows
    assert a.mean("ciou") == pytest.approx(0.31) and a.std("ciou") == pytest.approx(math.sqrt(2) * 0.01)
    assert b.mean("ciou") == pytest.approx(0.35) and b.std("ciou") == pytest.approx(math.sqrt(2) * 0.02)
    assert c.mean("auc") == pytest.approx(0.38)
    folder = result.ablation.folder
    with open(folder / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["row"] for r in rows] == ["A", "B", "C"]
    assert float(rows[1]["ciou_mean"]) == pytest.approx(0.35)
    assert float(rows[1]["ciou_delta"]) == pytest.approx(0.04)
    assert float(rows[2]["ciou_delta"]) == pytest.approx(-0.02)
    assert float(rows[2]["paper_ciou_delta"]) == pytest.approx(0.03)
    assert (rows[0]["T_app"], rows[1]["T_app"], rows[0]["L_cl"], rows[0]["L_geo"]) == ("0", "1", "1", "1")
    assert rows[0]["ciou_std"] and rows[0]["seeds_done"] == "2"
    md = (folder / "summary.md").read_text()
    assert ("| B | ✓ |  | ✓ | ✓ | ✓ | ✓ | 2/2 | 35.00 ± 2.83 | +4.00 | 32.00 (+2.00) | 40.00 ± 2.83 | +4.00 | "
            "39.00 (-1.00) | 25.00 ± 2.83 |") in md.splitlines()
    assert "cIoU: 1 of 2 of the paper's steps reproduced (A<B ✓, B<C ✗)" in md
    assert "N = 8 test clips (vggss); centre-prior baseline: cIoU 50.00, AUC 43.75." in md.splitlines()
    printed = out.file.getvalue()
    assert "35.00 ± 2.83" in printed and "cIoU: 1 of 2" in printed
    png = (folder / "summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    cells = list(csv.DictReader(open(folder / "cells.csv")))
    assert [(r["cell"], float(r["ciou"])) for r in cells][:2] == [("A-seed4", 0.30), ("B-seed4", 0.33)]


def test_the_cells_run_now_are_tabulated_from_what_train_returns(recipes: Path, fake: FakeTrainer) -> None:
    fake.files = False  # no test record in any run folder: the numbers are only in the returned TrainResult
    ablation = load_ablation(write_ablation(recipes, ROWS_ABC.replace("seeds: [4, 5]", "seeds: [4]")))
    result = run_ablation(ablation, console=quiet(), out=quiet())
    assert [(c.status, c.metrics["ciou"]) for c in result.cells] == [("finished", 0.30), ("finished", 0.33),
                                                                      ("finished", 0.31)]
    assert result.cells[0].metrics["baseline_centre/auc"] == 0.4375
    assert [r["ciou"] for r in csv.DictReader(open(ablation.folder / "cells.csv"))] == ["0.3", "0.33", "0.31"]


def test_paper_orderings_compare_the_direction_of_each_step(recipes: Path, fake: FakeTrainer) -> None:
    result = run_ablation(load_ablation(write_ablation(recipes, ROWS_ABC)), console=quiet(), out=quiet())
    assert paper_orderings(result.rows, "ciou") == [("A", "B", pytest.approx(0.02), pytest.approx(0.04)),
                                                    ("B", "C", pytest.approx(0.03), pytest.approx(-0.02))]
    assert paper_orderings(result.rows, "auc") == [("A", "B", pytest.approx(-0.01), pytest.approx(0.04)),
                                                   ("B", "C", pytest.approx(0.02), pytest.approx(-0.02))]
    # ties and missing rows: '=' and '?', and neither counts as reproduced
    result.rows[1].values["ciou"] = list(result.rows[0].values["ciou"])
    result.rows[2].values["ciou"] = []
    assert ablate.ordering_lines(result.rows)[0] == "cIoU: 0 of 1 of the paper's steps reproduced (A<B =, B<C ?)"


def test_a_rerun_skips_finished_cells_and_the_report_rebuilds_without_training(recipes: Path,
                                                                               fake: FakeTrainer) -> None:
    ablation = load_ablation(write_ablation(recipes, ROWS_ABC))
    run_ablation(ablation, console=quiet(), out=quiet())
    assert len(fake.calls) == 6
    folder = ablation.folder
    before = {name: (folder / name).read_bytes() for name in ("summary.csv", "summary.md", "cells.csv")}
    for name in before:
        (folder / name).unlink()
    (folder / "summary.png").unlink()
    result = run_ablation(ablation, report_only=True, console=quiet(), out=quiet())
    assert len(fake.calls) == 6
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert (folder / "summary.png").is_file()
    assert [c.action for c in result.cells] == ["skip"] * 6
    run_ablation(ablation, console=quiet(), out=quiet())
    assert len(fake.calls) == 6


def test_a_failing_cell_is_recorded_the_rest_go_on_and_a_rerun_retries_it(recipes: Path, fake: FakeTrainer) -> None:
    ablation = load_ablation(write_ablation(recipes, ROWS_ABC))
    fake.behaviour = {"B-seed4": "fail"}
    console = quiet()
    result = run_ablation(ablation, console=console, out=quiet())
    assert [(c.cell.name, c.status) for c in result.cells] == [
        ("A-seed4", "finished"), ("B-seed4", "failed"), ("C-seed4", "finished"),
        ("A-seed5", "finished"), ("B-seed5", "finished"), ("C-seed5", "finished")]
    assert result.failed[0].error == "the loss became nan at step 3 (epoch 0); training stopped"
    assert "cell B-seed4 failed: the loss became nan" in console.file.getvalue()
    state = json.loads((ablation.folder / "ablation.json").read_text())
    failed_dir = state["cells"]["B-seed4"]["run_dir"]
    assert state["cells"]["B-seed4"]["status"] == "failed" and failed_dir.startswith("B-seed4-")
    assert result.rows[1].n_done == 1 and result.rows[1].mean("ciou") == pytest.approx(0.37)
    cells = {r["cell"]: r for r in csv.DictReader(open(ablation.folder / "cells.csv"))}
    assert cells["B-seed4"]["status"] == "failed" and "loss became nan" in cells["B-seed4"]["error"]
    assert "1/2 (1 failed)" in (ablation.folder / "summary.md").read_text()

    fake.behaviour = {}
    fake.calls.clear()
    result = run_ablation(ablation, console=quiet(), out=quiet())
    assert fake.calls == [("B-seed4", None)]  # trained anew; every other cell skipped
    retried = result.cells[1]
    assert retried.status == "finished" and retried.run.dir.name != failed_dir
    assert (ablation.folder / failed_dir).is_dir()  # the failed run folder is kept


def test_an_interrupted_cell_stops_the_ablation_and_resumes_on_the_next_call(recipes: Path, fake: FakeTrainer,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    ablation = load_ablation(write_ablation(recipes, ROWS_ABC.replace("seeds: [4, 5]", "seeds: [4]")))
    fake.behaviour = {"B-seed4": "interrupt"}
    result = run_ablation(ablation, console=quiet(), out=quiet())
    assert result.interrupted
    assert [c for c, _ in fake.calls] == ["A-seed4", "B-seed4"]
    interrupted = result.cells[1].run.dir.name
    assert [(c.status, c.action) for c in result.cells] == [("finished", "skip"), ("interrupted", "resume"),
                                                            ("pending", "train")]
    state = json.loads((ablation.folder / "ablation.json").read_text())
    assert state["cells"]["B-seed4"]["runs"] == [interrupted] and state["cells"]["B-seed4"]["status"] == "interrupted"
    fake.behaviour = {}
    fake.calls.clear()

    def no_scan(*args):
        raise AssertionError("the cells' runs are recorded in ablation.json: no folder scan")

    monkeypatch.setattr("sslt_cli.ablate.runner._record_found_runs", no_scan)
    result = run_ablation(ablation, console=quiet(), out=quiet())
    assert fake.calls == [("B-seed4", interrupted), ("C-seed4", None)]
    assert [c.status for c in result.cells] == ["finished"] * 3


def test_ctrl_c_outside_the_training_loop_stops_everything_and_the_cell_resumes(recipes: Path,
                                                                                 fake: FakeTrainer) -> None:
    ablation = load_ablation(write_ablation(recipes, ROWS_ABC.replace("seeds: [4, 5]", "seeds: [4]")))
    fake.behaviour = {"B-seed4": "ctrl-c"}
    with pytest.raises(KeyboardInterrupt):
        run_ablation(ablation, console=quiet(), out=quiet())
    state = json.loads((ablation.folder / "ablation.json").read_text())
    assert state["cells"]["B-seed4"]["status"] == "interrupted"
    assert (ablation.folder / "summary.csv").is_file() and not (ablation.folder / ".lock").exists()
    stopped = state["cells"]["B-seed4"]["run_dir"]
    fake.behaviour = {}
    fake.calls.clear()
    run_ablation(ablation, console=quiet(), out=quiet())
    assert fake.calls == [("B-seed4", stopped), ("C-seed4", None)]


def test_retrieval_columns_and_a_failed_retrieval_retries_without_training(recipes: Path, fake: FakeTrainer,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from sslt_cli.errors import DataError
    from sslt_cli.retrieve import RetrievalReport, TaskResult, mlflow_metrics

    retrieved: list[str] = []
    failing = {"B-seed4"}

    def fake_inputs(target, *, which, device):
        assert which == "best"
        return Run.open(target), None, None

    def fake_retrieve(run, clip_set, labels, options, sink, **drawing):
        retrieved.append(run.meta()["recipe_name"])
        if run.meta()["recipe_name"] in failing:
            raise DataError("no labels for the test set")
        tasks = [TaskResult(task=task, score="loc", metrics={"p_at_1": p}, random={"p_at_1": 0.01}, ranked=None,
                            n_queries=8, n_without_relevant=0, gallery_size=8, n_classes=4)
                 for task, p in (("a2a", 0.25), ("a2i", 0.125))]
        report = RetrievalReport(tasks=tasks, ids=[], labels=[], classes=[], classes_without_clips=[], n_embedded=8,
                                 unlabeled=[], n_other_classes=0, skipped=[])
        # what retrieve records for a later process (--report) to read; this process reads what it returns
        sink.log("retrieve", 4, mlflow_metrics(report), fields={"set": "test_vggss", "classes": "all"})
        return report

    monkeypatch.setattr("sslt_cli.retrieve.retrieval_inputs", fake_inputs)
    monkeypatch.setattr("sslt_cli.retrieve.retrieve", fake_retrieve)
    ablation = load_ablation(write_ablation(recipes, ROWS_ABC.replace("seeds: [4, 5]", "seeds: [4]")),
                             ["retrieve=true"])
    out = quiet()
    result = run_ablation(ablation, console=quiet(), out=out)
    assert [(c.status, c.action) for c in result.cells] == [("finished", "skip"), ("failed", "retrieve"),
                                                            ("finished", "skip")]
    assert result.cells[1].error == "no labels for the test set"
    rows = list(csv.DictReader(open(ablation.folder / "summary.csv")))
    assert float(rows[0]["retrieve_a2a_p_at_1_mean"]) == 0.25 and rows[1]["retrieve_a2a_p_at_1_mean"] == ""
    assert "a2i P@1" in out.file.getvalue() and "12.50" in out.file.getvalue()
    failing.clear()
    fake.calls.clear()
    result = run_ablation(ablation, console=quiet(), out=quiet())
    assert fake.calls == [] and retrieved == ["A-seed4", "B-seed4", "C-seed4", "B-seed4"]
    assert [c.status for c in result.cells] == ["finished"] * 3


def test_ctrl_c_in_a_retrieval_leaves_the_trained_cell_to_retrieve_again(recipes: Path, fake: FakeTrainer,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def stopped_retrieve(run, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("sslt_cli.retrieve.retrieval_inputs", lambda target, **kwargs: (Run.open(target), None, None))
    monkeypatch.setattr("sslt_cli.retrieve.retrieve", stopped_retrieve)
    ablation = load_ablation(write_ablation(recipes, ROWS_ABC.replace("seeds: [4, 5]", "seeds: [4]")),
                             ["retrieve=true"])
    with pytest.raises(KeyboardInterrupt):
        run_ablation(ablation, console=quiet(), out=quiet())
    state = json.loads((ablation.folder / "ablation.json").read_text())
    assert state["cells"]["A-seed4"]["status"] == "interrupted" and fake.calls == [("A-seed4", None)]
    rows = list(csv.DictReader(open(ablation.folder / "cells.csv")))
    assert (rows[0]["status"], rows[0]["ciou"]) == ("interrupted", "0.3")  # its test result is kept
    plans = run_ablation(ablation, dry_run=True, console=quiet(), out=quiet()).cells
    assert [(p.status, p.action) for p in plans] == [("pending", "retrieve"), ("pending", "train"),
                                                     ("pending", "train")]


def test_a_killed_run_of_an_older_state_resumes_from_its_checkpoint_or_trains_anew_without_one(
        recipes: Path, fake: FakeTrainer) -> None:
    # a state written before ablation.json recorded each cell's runs (no "runs"): they are found by their recipe name
    ablation = load_ablation(write_ablation(recipes, ROWS_ABC.replace("seeds: [4, 5]", "seeds: [4]")))
    cells = expand_cells(ablation)
    with_checkpoint = Run.create(cells[0].recipe)
    with_checkpoint.update_meta(status="running")  # its process was killed: meta never said otherwise
    (with_checkpoint.checkpoints / "last-00000010.pt").write_bytes(b"")
    Run.create(cells[1].recipe).update_meta(status="running")
    older = {"format": "sslt-ablation/1", "cells": {"A-seed4": {"status": "running", "run_dir": None}}}
    (ablation.folder / "ablation.json").write_text(json.dumps(older))
    state = load_state(ablation.folder)
    plans = [inspect_cell(c, ablation, state) for c in cells]
    assert [(p.status, p.action) for p in plans] == [("interrupted", "resume"), ("interrupted", "train"),
                                                     ("pending", "train")]
    run_ablation(ablation, console=quiet(), out=quiet())
    assert fake.calls == [("A-seed4", with_checkpoint.dir.name), ("B-seed4", None), ("C-seed4", None)]
    # the scan's finds are recorded with the new runs: B-seed4's killed run, then the one that trained anew
    recorded = json.loads((ablation.folder / "ablation.json").read_text())["cells"]
    assert recorded["A-seed4"]["runs"] == [with_checkpoint.dir.name]
    assert len(recorded["B-seed4"]["runs"]) == 2 and recorded["B-seed4"]["run_dir"] == recorded["B-seed4"]["runs"][1]


def test_a_changed_recipe_trains_anew_and_keeps_the_old_runs(recipes: Path, fake: FakeTrainer) -> None:
    path = write_ablation(recipes, ROWS_ABC.replace("seeds: [4, 5]", "seeds: [4]"))
    run_ablation(load_ablation(path), console=quiet(), out=quiet())
    original = path.read_text()
    path.write_text(original + "overrides: [optim.epochs=3]\n")  # the file changed: so did its cells' recipes
    changed = load_ablation(path)
    out = quiet()
    result = run_ablation(changed, dry_run=True, console=quiet(), out=out)
    assert [(c.status, c.action) for c in result.cells] == [("pending", "train")] * 3
    assert "was made with another recipe" in out.file.getvalue()
    assert len(fake.calls) == 3
    run_ablation(changed, console=quiet(), out=quiet())
    assert [c for c, _ in fake.calls] == ["A-seed4", "B-seed4", "C-seed4"] * 2
    assert len([p for p in changed.folder.iterdir() if p.name.startswith("A-seed4-")]) == 2
    # and back: the first runs match again, nothing trains
    path.write_text(original)
    result = run_ablation(load_ablation(path), console=quiet(), out=quiet())
    assert len(fake.calls) == 6 and [c.action for c in result.cells] == ["skip"] * 3


def summary_seeds(folder: Path) -> list[tuple[str, str, str]]:
    """(row, seeds, seeds done) of each row of summary.csv."""
    with open(folder / "summary.csv") as f:
        return [(r["row"], r["seeds"], r["seeds_done"]) for r in csv.DictReader(f)]


def test_the_report_and_a_rerun_use_the_seeds_recorded_in_the_folder(recipes: Path, fake: FakeTrainer) -> None:
    ablation = load_ablation(write_ablation(recipes, ROWS_ABC.replace("seeds: [4, 5]", "seeds: 1")))
    state = ablation.folder / "ablation.json"
    run_ablation(ablation, seeds=2, console=quiet(), out=quiet())
    assert len(fake.calls) == 6 and json.loads(state.read_text())["seeds"] == [4, 5]

    console = quiet()
    result = run_ablation(ablation, report_only=True, console=console, out=quiet())
    assert [c.cell.name for c in result.cells] == ["A-seed4", "B-seed4", "C-seed4", "A-seed5", "B-seed5", "C-seed5"]
    assert summary_seeds(ablation.folder) == [("A", "2", "2"), ("B", "2", "2"), ("C", "2", "2")]
    assert result.rows[0].mean("ciou") == pytest.approx(0.31)
    assert console.file.getvalue().splitlines()[0] == (
        "seeds 4, 5, as recorded in runs/ablations/study/ablation.json (the file names 4); to change them, give "
        "--seeds N or seeds=[...]")
    run_ablation(ablation, console=quiet(), out=quiet())
    assert len(fake.calls) == 6 and json.loads(state.read_text())["seeds"] == [4, 5]

    # explicit seeds change the recorded ones, and say how
    console = quiet()
    run_ablation(ablation, seeds=1, report_only=True, console=console, out=quiet())
    assert console.file.getvalue().splitlines()[0] == (
        "seeds 4: changed from 4, 5 recorded in runs/ablations/study/ablation.json; leaves out 5 (their runs stay in "
        "the folder, outside the summary)")
    assert summary_seeds(ablation.folder) == [("A", "1", "1"), ("B", "1", "1"), ("C", "1", "1")]
    assert json.loads(state.read_text())["seeds"] == [4]
    console = quiet()
    run_ablation(load_ablation(ablation.path, ["seeds=[4, 5]"]), console=console, out=quiet())
    assert console.file.getvalue().splitlines()[0] == (
        "seeds 4, 5: changed from 4 recorded in runs/ablations/study/ablation.json; adds 5")
    assert len(fake.calls) == 6 and summary_seeds(ablation.folder)[0] == ("A", "2", "2")


def test_other_seeds_get_a_parent_run_that_names_them_with_every_finished_cell(recipes: Path,
                                                                               fake: FakeTrainer) -> None:
    from mlflow.tracking import MlflowClient

    ablation = load_ablation(write_ablation(recipes, ROWS_ABC.replace("seeds: [4, 5]", "seeds: 1")),
                             ["tracking.enabled=true"])
    first = run_ablation(ablation, console=quiet(), out=quiet())
    console = quiet()
    second = run_ablation(ablation, seeds=2, console=console, out=quiet())
    assert len(fake.calls) == 6 and second.parent_run_id != first.parent_run_id
    assert (f"MLflow parent run {second.parent_run_id} replaces {first.parent_run_id} (other seeds; MLflow keeps a "
            "run's parameters); the finished cells' runs are now its children") in console.file.getvalue().splitlines()
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert client.get_run(first.parent_run_id).data.params["ablation.seeds"] == "4"
    parent = client.get_run(second.parent_run_id)
    assert parent.data.params["ablation.seeds"] == "4,5" and parent.data.metrics["A/seeds_done"] == 2
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["sslt.cell"] for c in children) == ["A-seed4", "A-seed5", "B-seed4", "B-seed5",
                                                                   "C-seed4", "C-seed5"]
    assert run_ablation(ablation, report_only=True, console=quiet(), out=quiet()).parent_run_id == parent.info.run_id


def test_another_base_or_other_overrides_in_the_same_folder_are_refused(recipes: Path, fake: FakeTrainer) -> None:
    quick = (recipes / "tie_full.yaml").read_text().replace("name: tie_full", "name: quickstart")
    (recipes / "quickstart.yaml").write_text(quick)
    path = write_ablation(recipes, ROWS_ABC.replace("seeds: [4, 5]", "seeds: [4]"))
    recorded = ["base=quickstart", "optim.epochs=3", "data.num_workers=0"]
    run_ablation(load_ablation(path, recorded), console=quiet(), out=quiet())
    assert len(fake.calls) == 3
    for overrides, command in (
            ([], f"base={recipes / 'tie_full.yaml'} and no recipe overrides"),
            (["base=quickstart", "optim.epochs=4", "data.num_workers=0"],
             f"base={recipes / 'quickstart.yaml'} optim.epochs=4 data.num_workers=0")):
        other = load_ablation(path, overrides)
        for how in ({}, {"report_only": True}, {"dry_run": True}):
            with pytest.raises(ablate.SsltError) as info:
                run_ablation(other, console=quiet(), out=quiet(), **how)
            assert info.value.message == ("runs/ablations/study: this folder holds an ablation with another base "
                                          "recipe or other recipe overrides")
            assert info.value.problems == [
                f"recorded in runs/ablations/study/ablation.json: base={recipes / 'quickstart.yaml'} optim.epochs=3 "
                "data.num_workers=0",
                f"this command: {command}",
                "to continue or report on the recorded ablation, give its base= and overrides; to run this one beside "
                "it, give it its own folder with name=<other> (runs/ablations/<other>)"]
    assert len(fake.calls) == 3
    # the same overrides in another order are the same ablation
    same = run_ablation(load_ablation(path, ["data.num_workers=0", "base=quickstart", "optim.epochs=3"]),
                        report_only=True, console=quiet(), out=quiet())
    assert [c.status for c in same.cells] == ["finished"] * 3
    # with a name of its own, the other base runs beside it and the first folder keeps its own
    beside = run_ablation(load_ablation(path, ["name=study_full"]), console=quiet(), out=quiet())
    assert beside.ablation.folder == Path("runs/ablations/study_full") and len(fake.calls) == 6
    assert json.loads(Path("runs/ablations/study/ablation.json").read_text())["base"] == str(recipes /
                                                                                              "quickstart.yaml")


def test_a_dry_run_touches_nothing(recipes: Path, fake: FakeTrainer) -> None:
    ablation = load_ablation(write_ablation(recipes, ROWS_ABC))
    out, console = quiet(), quiet()
    result = run_ablation(ablation, dry_run=True, seeds=1, console=console, out=out)
    assert fake.calls == [] and not ablation.folder.exists()
    assert [(c.cell.name, c.action) for c in result.cells] == [("A-seed4", "train"), ("B-seed4", "train"),
                                                               ("C-seed4", "train")]
    assert "transforms.app.enabled=false transforms.geo.enabled=false" in out.file.getvalue()
    assert f"each cell is: sslt train {ablation.base_path} <row overrides> name=<row>-seed<k>" in \
        console.file.getvalue()


def test_a_second_process_on_the_same_ablation_is_refused(recipes: Path, fake: FakeTrainer) -> None:
    from holders import LOCK_ONLY, start_holder, stop

    from sslt_cli.folder_lock import FolderBusy

    ablation = load_ablation(write_ablation(recipes, ROWS_ABC))
    ablation.folder.mkdir(parents=True)
    # a holder between taking the lock and writing who it is (issue 22: the old lock took this as stale)
    holder = start_holder(ablation.folder, LOCK_ONLY)
    try:
        with pytest.raises(FolderBusy, match="this ablation folder is in use by another process that is starting"):
            run_ablation(ablation, console=quiet(), out=quiet())
    finally:
        stop(holder)
    holder = start_holder(ablation.folder, command="sslt ablate paper_transformations")
    try:
        with pytest.raises(FolderBusy, match=rf"this ablation folder is in use by pid {holder.pid} on host .* since "
                                             r".* \(sslt ablate paper_transformations\)"):
            run_ablation(ablation, console=quiet(), out=quiet())
    finally:
        stop(holder)  # kill -9: the lock of a process that is gone is taken over
    run_ablation(ablation, console=quiet(), out=quiet())
    assert not (ablation.folder / ".lock").exists() and len(fake.calls) == 6


# -------------------------------------------------------------------------------------- real, end to end

def tiny_two_rows(tmp_path: Path, repo_root: Path, epochs: int) -> tuple[Path, list[str]]:
    """Rows A and F of the paper over tie_full on a tiny synthetic benchmark (16 training clips: two steps an
    epoch), tracked in MLflow: the ablation file and its command-line overrides."""
    import torch

    from sslt_cli.data.synthetic import generate

    torch.set_num_threads(1)
    data = tmp_path / "bench"
    generate(data, n_train=16, n_val=8, n_test=8, n_flickr=4, image_size=64, workers=1, progress=False)
    path = tmp_path / "two.yaml"
    path.write_text(f"base: {repo_root / 'recipes' / 'tie_full.yaml'}\nseeds: 1\nrows:\n"
                    "  A: {switches: {T_app: false, T_geo: false, T_mask: false, T_mix: false, L_geo: false},"
                    " paper: {ciou: 0.3292, auc: 0.3744}}\n"
                    "  F: {paper: {ciou: 0.3863, auc: 0.3965}}\n")
    return path, [f"data.root={data}", "data.image_size=64", "audio.clip_seconds=3", "audio.n_mels=32",
                  "optim.batch_size=8", f"optim.epochs={epochs}", "data.num_workers=0", "tracking.enabled=true"]


@pytest.fixture
def mlflow_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Records, for every MLflow run created, its id and the tags it was created with ("created"), and every run
    whose mlflow.parentRunId is set after its creation ("reparented")."""
    from mlflow.tracking import MlflowClient

    calls: dict[str, list] = {"created": [], "reparented": []}
    create_run, set_tag = MlflowClient.create_run, MlflowClient.set_tag

    def recording_create_run(self, *args, **kwargs):
        run = create_run(self, *args, **kwargs)
        calls["created"].append((run.info.run_id, {**(kwargs.get("tags") or {}), **run.data.tags}))
        return run

    def recording_set_tag(self, run_id, key, value, *args, **kwargs):
        if key == "mlflow.parentRunId":
            calls["reparented"].append(run_id)
        return set_tag(self, run_id, key, value, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "create_run", recording_create_run)
    monkeypatch.setattr(MlflowClient, "set_tag", recording_set_tag)
    return calls


def test_two_cells_end_to_end_children_from_the_start_and_resumed_after_an_interruption(
        tmp_path: Path, repo_root: Path, monkeypatch: pytest.MonkeyPatch, mlflow_calls: dict[str, list]) -> None:
    from mlflow.tracking import MlflowClient

    from sslt_cli import train as train_module

    path, overrides = tiny_two_rows(tmp_path, repo_root, epochs=1)
    ablation = load_ablation(path, overrides)
    train = train_module.train

    def stopped_in_f(recipe, run, **kwargs):
        """F's first training stops after one of its two steps, with a checkpoint, as Ctrl-C in the loop does."""
        if recipe.name == "F-seed4" and not kwargs.get("resume"):
            kwargs["stop_after_steps"] = 1
        return train(recipe, run, **kwargs)

    monkeypatch.setattr(train_module, "train", stopped_in_f)
    first = run_ablation(ablation, console=quiet(), out=quiet())
    assert first.interrupted
    assert [(c.cell.name, c.status, c.action) for c in first.cells] == [("A-seed4", "finished", "skip"),
                                                                       ("F-seed4", "interrupted", "resume")]
    stopped = first.cells[1].run.dir

    out = quiet()
    result = run_ablation(ablation, console=quiet(), out=out)
    assert [(c.cell.name, c.status) for c in result.cells] == [("A-seed4", "finished"), ("F-seed4", "finished")]
    assert result.cells[1].run.dir == stopped and len(list(ablation.folder.glob("F-seed4-*"))) == 1
    assert result.parent_run_id == first.parent_run_id

    # the summary holds each run's best-checkpoint test record
    rows = list(csv.DictReader(open(ablation.folder / "summary.csv")))
    for row, cell in zip(rows, result.cells):
        test = [r for r in cell.run.metrics() if r.get("kind") == "test" and r["checkpoint"] == "best"][-1]
        assert float(row["ciou_mean"]) == pytest.approx(test["ciou"])
        assert float(row["auc_mean"]) == pytest.approx(test["auc"])
    assert [(r["row"], r["T_app"], r["L_geo"]) for r in rows] == [("A", "0", "0"), ("F", "1", "1")]
    assert (ablation.folder / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert "ablation two: base tie_full" in out.file.getvalue()
    evaluation = json.loads((result.cells[0].run.dir / "eval" / "vggss-best-ssltie" / "metrics.json").read_text())
    centre = evaluation["baselines"]["centre"]
    assert (f"N = {evaluation['n']} test clips (vggss); centre-prior baseline: cIoU {100 * centre['ciou']:.2f}, "
            f"AUC {100 * centre['auc']:.2f}") in out.file.getvalue()

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["sslt.ablation"] == "two" and parent.info.status == "FINISHED"
    assert parent.data.metrics["A/ciou"] == pytest.approx(float(rows[0]["ciou_mean"]))
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "summary.csv", "summary.md", "summary.png", "cells.csv", "ablation.json"}
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["sslt.cell"] for c in children) == ["A-seed4", "F-seed4"]
    child_ids = {c.run.meta()["mlflow_run_id"] for c in result.cells}
    assert {c.info.run_id for c in children} == child_ids
    assert all(c.info.status == "FINISHED" and "eval/vggss-best-ssltie/ciou" in c.data.metrics for c in children)
    # each child was created once (F's resume reopened it) as the parent's child, and never re-parented
    created = {run_id: tags for run_id, tags in mlflow_calls["created"]}
    assert len(mlflow_calls["created"]) == 3 and set(created) == child_ids | {parent.info.run_id}
    assert all(created[child]["mlflow.parentRunId"] == parent.info.run_id for child in child_ids)
    assert mlflow_calls["reparented"] == []

    # a third call finds both cells finished and trains nothing
    again = run_ablation(ablation, console=quiet(), out=quiet())
    assert [c.action for c in again.cells] == ["skip", "skip"]
    assert again.parent_run_id == result.parent_run_id
    assert len(list(ablation.folder.glob("*-seed4-*"))) == 2


@pytest.mark.slow
def test_a_killed_ablate_process_resumes_its_cell_and_finishes(tmp_path: Path, repo_root: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    path, overrides = tiny_two_rows(tmp_path, repo_root, epochs=2)
    ablation = load_ablation(path, overrides)
    with open(tmp_path / "ablate.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "sslt_cli", "ablate", str(path), *overrides],
                                   stdout=log, stderr=subprocess.STDOUT)
        try:  # killed (no handler runs) once F's first epoch has its checkpoint
            deadline = time.monotonic() + 540
            while not list(ablation.folder.glob("F-seed4-*/checkpoints/last-*.pt")):
                assert process.poll() is None, (tmp_path / "ablate.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint of F-seed4 in time"
                time.sleep(0.2)
            process.send_signal(signal.SIGKILL)
        finally:
            process.wait()
    killed = json.loads((ablation.folder / "ablation.json").read_text())["cells"]
    assert (killed["A-seed4"]["status"], killed["F-seed4"]["status"]) == ("finished", "running")
    plans = [inspect_cell(c, ablation, load_state(ablation.folder)) for c in expand_cells(ablation)]
    assert [(p.status, p.action) for p in plans] == [("finished", "skip"), ("interrupted", "resume")]

    result = run_ablation(ablation, console=quiet(), out=quiet())  # the stale lock of the killed process is taken
    assert [c.status for c in result.cells] == ["finished", "finished"]
    assert result.cells[1].run.dir.name == killed["F-seed4"]["run_dir"]
    assert len(list(ablation.folder.glob("F-seed4-*"))) == 1
    resumed = [r for r in result.cells[1].run.metrics() if r.get("kind") == "train"]
    assert [r["step"] for r in resumed] == sorted({r["step"] for r in resumed})  # no step logged twice
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    children = client.search_runs([client.get_run(result.parent_run_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert sorted(c.data.tags["sslt.cell"] for c in children) == ["A-seed4", "F-seed4"]


def test_a_cell_whose_checks_fail_fails_alone_before_its_run_folder_exists(recipes: Path, fake: FakeTrainer,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from sslt_cli.errors import DataError

    def checks(recipe, *args, **kwargs):
        if recipe.name == "B-seed4":
            raise DataError("data/vggsound/test_vggss: the test set 'vggss' (data.test) has no usable clip")

    monkeypatch.setattr("sslt_cli.train.preflight", checks)  # the checks sslt ablate makes before a cell's run
    ablation = load_ablation(write_ablation(recipes, ROWS_ABC.replace("seeds: [4, 5]", "seeds: [4]")))
    result = run_ablation(ablation, console=quiet(), out=quiet())
    assert [(c.cell.name, c.status) for c in result.cells] == [("A-seed4", "finished"), ("B-seed4", "failed"),
                                                               ("C-seed4", "finished")]
    assert result.cells[1].error == "data/vggsound/test_vggss: the test set 'vggss' (data.test) has no usable clip"
    assert result.cells[1].run is None and not list(ablation.folder.glob("B-seed4-*"))
    assert [name for name, _ in fake.calls] == ["A-seed4", "C-seed4"]


def test_an_ablation_that_retrieves_checks_the_retrieval_inputs_before_each_cell(
        recipes: Path, fake: FakeTrainer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 22, item 4: with ``retrieve: true`` the checks before a cell include its retrieval set and labels."""
    from sslt_cli.errors import DataError

    asked: list[tuple[str, bool]] = []

    def checks(recipe, *args, retrieval=False, **kwargs):
        asked.append((recipe.name, retrieval))
        raise DataError("retrieval after training (retrieve: true) on data/x: too few labelled clips")

    monkeypatch.setattr("sslt_cli.train.preflight", checks)
    ablation = load_ablation(write_ablation(recipes, ROWS_ABC.replace("seeds: [4, 5]", "seeds: [4]")),
                             ["retrieve=true"])
    result = run_ablation(ablation, console=quiet(), out=quiet())
    assert asked == [("A-seed4", True), ("B-seed4", True), ("C-seed4", True)]
    assert [c.status for c in result.cells] == ["failed"] * 3 and fake.calls == []
    assert not list(ablation.folder.glob("*-seed4-*"))
