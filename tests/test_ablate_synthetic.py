"""``sslt ablate`` over generated data (issue 21): the ``synthetic:`` section and rows' knobs, validation, each
distinct benchmark generated once, the learning check in the table, and a tiny real run of the shipped study's
shape."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from sslt_cli.ablate import expand_cells, load_ablation, run_ablation
from sslt_cli.ablate.spec import SYNTHETIC_METRICS
from sslt_cli.data.difficulty import PRESETS, Difficulty
from sslt_cli.errors import RecipeError


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


@pytest.fixture
def recipes(tmp_path: Path, repo_root: Path) -> Path:
    folder = tmp_path / "recipes"
    (folder / "ablations").mkdir(parents=True)
    text = (repo_root / "recipes" / "quickstart.yaml").read_text()
    (folder / "quickstart.yaml").write_text(text + "tracking: {enabled: false}\n" + f"runs_dir: {tmp_path / 'runs'}\n")
    return folder


STUDY = """\
base: ../quickstart.yaml
overrides: ["data.test={vggss: test_vggss}"]
synthetic: {preset: easy, n_train: 16, n_val: 8, n_test: 8, n_flickr: 0, image_size: 64}
rows:
  easy: {}
  noise: {synthetic: {snr_db: "-5:10"}}
  hard: {synthetic: {preset: hard}}
  hard_again: {synthetic: {preset: hard}, overrides: [optim.lr=1e-4]}
"""


def write(recipes: Path, body: str) -> Path:
    path = recipes / "ablations" / "study.yaml"
    path.write_text(body)
    return path


def test_synthetic_rows_get_their_own_benchmark_and_data_root(recipes: Path, tmp_path: Path) -> None:
    ablation = load_ablation(write(recipes, STUDY))
    assert [h for h, _ in ablation.metrics][3:] == [h for h, _ in SYNTHETIC_METRICS]
    cells = {c.row: c for c in expand_cells(ablation)}
    assert cells["easy"].data.difficulty == Difficulty() and cells["easy"].data.knobs_text == "easy"
    assert cells["noise"].data.difficulty == Difficulty(snr_db=(-5.0, 10.0))
    assert cells["hard"].data.difficulty == PRESETS["hard"]
    assert cells["hard"].data.root == cells["hard_again"].data.root != cells["noise"].data.root
    assert cells["hard"].data.root.parent == tmp_path / "runs" / ".synthetic"
    assert cells["hard"].data.sets == {"n_train": 16, "n_val": 8, "n_test": 8, "n_flickr": 0, "seed": 0,
                                       "image_size": 64}
    for cell in cells.values():
        assert cell.recipe.data.root == str(cell.data.root)
        assert cell.overrides[1] == f"data.root={cell.data.root}"  # after the file's overrides, before the row's
    # sizes change on the command line; the benchmark (and so the data root) changes with them
    bigger = {c.row: c for c in expand_cells(load_ablation(write(recipes, STUDY), ["synthetic.n_train=32"]))}
    assert bigger["hard"].data.sets["n_train"] == 32 and bigger["hard"].data.root != cells["hard"].data.root


def test_bad_synthetic_knobs_and_knobs_without_the_section_are_refused(recipes: Path) -> None:
    bad = STUDY.replace('{snr_db: "-5:10"}', '{snr_db: "10:-5", objcts: 3}')
    with pytest.raises(RecipeError) as info:
        load_ablation(write(recipes, bad))
    where = f"{recipes / 'ablations' / 'study.yaml'}: row 'noise'"
    assert info.value.problems == [
        f"{where}: bad difficulty knobs: snr_db = '10:-5': LOW is above HIGH",
        f"{where}: bad difficulty knobs: unknown knob 'objcts'; knobs: objects, area, background, same_shape, "
        "offscreen, offscreen_db, snr_db, camera"]
    without = "\n".join(line for line in STUDY.splitlines() if not line.startswith("synthetic:"))
    with pytest.raises(RecipeError) as info:
        load_ablation(write(recipes, without))
    assert f"{recipes / 'ablations' / 'study.yaml'}: row 'noise': synthetic knobs need the file's synthetic: " \
           "section (the sets to generate), e.g. synthetic: {preset: easy, n_train: 2000}" in info.value.problems


def test_the_shipped_study_has_the_easy_row_each_knob_alone_and_the_hard_preset(repo_root: Path) -> None:
    ablation = load_ablation(repo_root / "recipes" / "ablations" / "hard_factors.yaml")
    cells = {c.row: c for c in expand_cells(ablation)}
    assert cells["easy"].data.difficulty.is_default and cells["hard"].data.difficulty == PRESETS["hard"]
    easy, hard = Difficulty().as_dict(), PRESETS["hard"].as_dict()
    changed = {row: [k for k, v in c.data.difficulty.as_dict().items() if v != easy[k]] for row, c in cells.items()
               if row not in ("easy", "hard")}
    assert all(len(keys) == 1 for keys in changed.values()), changed  # one factor at a time
    # every knob the hard preset turns (offscreen_db rides with offscreen) is some row's only factor
    assert {k for keys in changed.values() for k in keys} == {k for k in hard if hard[k] != easy[k]} - {"offscreen_db"}


@pytest.mark.filterwarnings("ignore")
def test_a_tiny_study_generates_each_benchmark_once_and_tabulates_the_learning_check(recipes: Path,
                                                                                    tmp_path: Path) -> None:
    import torch

    torch.set_num_threads(1)
    body = STUDY.replace("  hard_again: {synthetic: {preset: hard}, overrides: [optim.lr=1e-4]}\n", "")
    body = body.replace("  noise: {synthetic: {snr_db: \"-5:10\"}}\n", "")
    ablation = load_ablation(write(recipes, body), [
        "data.image_size=64", "audio.n_mels=32", "optim.batch_size=8", "optim.epochs=1", "data.num_workers=0",
        "transforms.mix.enabled=false", "eval.batch_size=8"])
    console = quiet()
    result = run_ablation(ablation, console=console, out=quiet())
    assert [r.status for r in result.cells] == ["finished", "finished"]
    for cell_result in result.cells:
        data = cell_result.cell.data
        assert json.loads((data.root / "benchmark.json").read_text())["params"].get("difficulty", {}) == (
            {} if data.difficulty.is_default else data.difficulty.as_dict())
        metrics = cell_result.metrics
        assert set(metrics) >= {"auc", "pointing", "baseline_centre/auc", "not_learning"}
        assert metrics["not_learning"] == float(not cell_result.run.meta()["learning_check"]["learning"])
    summary = (ablation.folder / "summary.csv").read_text()
    assert "not_learning" in summary.splitlines()[0] and "centre" in summary.splitlines()[0]
    log = console.file.getvalue()
    assert log.count(", generating") == 2
    # a re-run (here: the report) regenerates nothing and retrains nothing
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs" / ".synthetic").rglob("*")}
    run_ablation(ablation, console=quiet(), out=quiet())
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs" / ".synthetic").rglob("*")} == before
