"""The learning check (issue 21): chance levels of the objectives, the verdict and its one line, and training runs
that do and do not learn (meta.json, metrics.jsonl, the TrainResult and ``sslt runs``)."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from typer.testing import CliRunner

from callers import train_in
from sslt_cli.cli import app
from sslt_cli.config import load_recipe
from sslt_cli.learning_check import USUAL_CAUSES, LearningCheck, chance_loss, verdict
from sslt_cli.losses import OBJECTIVES, ezvsl_loss, tie_contrastive_loss
from sslt_cli.runs import Run

ROW_A = ("transforms.views=code", "transforms.app.enabled=false", "transforms.geo.enabled=false",
         "transforms.mask.enabled=false", "transforms.mix.enabled=false", "transforms.equivariance.enabled=false")


def test_chance_is_the_loss_when_pairs_cannot_be_told_apart() -> None:
    assert set(OBJECTIVES) == {"tie", "ezvsl"}  # a new objective needs its chance level
    batch = 16
    # a model that maps every picture to one vector and every sound to an orthogonal one: all pairs score alike
    v = torch.zeros(batch, 8, 3, 3)
    v[:, 0] = 1.0
    a = torch.zeros(batch, 8)
    a[:, 1] = 1.0
    assert float(tie_contrastive_loss(v, a)[0]) == pytest.approx(chance_loss("tie", batch), rel=1e-5)
    assert float(ezvsl_loss(v, a)[0]) == pytest.approx(chance_loss("ezvsl", batch), rel=1e-5)
    assert chance_loss("tie", batch) == pytest.approx(math.log(18))
    with pytest.raises(ValueError, match="no chance level for objective 'x'"):
        chance_loss("x", 4)


def test_verdicts_and_the_one_line() -> None:
    stuck = LearningCheck(step=120, epoch=1, loss=4.1, chance=math.log(66), tolerance=0.05, val_auc=0.305,
                          centre_auc=0.3)
    assert (stuck.loss_at_chance, stuck.val_at_centre, stuck.learning) == (True, True, False)
    assert stuck.message() == (
        "warning: not learning at step 120 (epoch 1): the loss is at chance and validation is at the centre prior "
        "(L_cl 4.100 = 98% of chance 4.190; validation AUC 0.305 vs centre prior 0.300); usual causes: "
        + USUAL_CAUSES)
    centre_only = LearningCheck(120, 1, 3.0, math.log(66), 0.05, 0.30, 0.30)
    assert (centre_only.loss_at_chance, centre_only.val_at_centre, centre_only.learning) == (False, True, False)
    fine = LearningCheck(120, 1, 3.0, math.log(66), 0.05, 0.40, 0.30)
    assert fine.learning and fine.message() == (
        "learning check at step 120: learning (L_cl 3.000 = 72% of chance 4.190; validation AUC 0.400 vs centre "
        "prior 0.300)")
    no_val = LearningCheck(5, 0, 4.0, 4.19, 0.05, None, None)
    assert not no_val.learning and "validation" not in no_val.figures()
    assert fine.metrics() == {"l_cl": 3.0, "chance": math.log(66), "not_learning": 0.0, "val_auc": 0.4,
                              "centre_auc": 0.3}
    assert [verdict({}), verdict({"learning_check": fine.record()}), verdict({"learning_check": stuck.record()})] == [
        "-", "ok", "NOT LEARNING"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    from sslt_cli.data.synthetic import generate

    root = tmp_path_factory.mktemp("check-bench") / "bench"
    generate(root, n_train=16, n_val=8, n_test=0, n_flickr=0, image_size=64, workers=1, progress=False)
    return root


def tiny_recipe(folder: Path, data_root: Path, *overrides: str):
    tree = {"name": "tiny", "seed": 4, "runs_dir": str(folder / "runs"),
            "data": {"root": str(data_root), "image_size": 64, "num_workers": 0, "test": {}},
            "audio": {"clip_seconds": 3, "n_mels": 32}, "optim": {"batch_size": 16},
            "train": {"log_every": 1}, "eval": {"batch_size": 8}, "tracking": {"enabled": False}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    return load_recipe(folder / "tiny.yaml", [*ROW_A, *overrides])


def run_quietly(recipe) -> tuple:
    text = io.StringIO()
    console = Console(file=text, width=120)
    result = train_in(recipe, Run.create(recipe), console=console, out=console, evaluate_at_end=False)
    return result, text.getvalue()


@pytest.mark.filterwarnings("ignore")
def test_a_run_that_cannot_learn_says_so_and_a_learning_one_does_not(bench, tmp_path) -> None:
    # lr ~ 0: the weights do not move; after the first epoch (one step of 16) the loss is at chance
    frozen, printed = run_quietly(tiny_recipe(tmp_path / "frozen", bench, "optim.lr=1e-12", "optim.max_steps=2"))
    check = frozen.learning_check
    assert check is not None and not check["learning"] and check["loss_at_chance"]
    assert (check["step"], check["epoch"], check["chance"]) == (1, 1, pytest.approx(math.log(18)))
    assert check["val_auc"] is not None and check["centre_auc"] is not None
    warnings = [line for line in printed.splitlines() if "not learning" in line]
    assert warnings == [check["message"]] and warnings[0].startswith("warning: not learning at step 1 (epoch 1)")
    assert json.loads((frozen.run.dir / "meta.json").read_text())["learning_check"] == check
    assert check["message"] in (frozen.run.dir / "train.log").read_text()
    records = [r for r in frozen.run.metrics() if r["kind"] == "learning_check"]
    assert len(records) == 1 and records[0]["not_learning"] == 1.0 and records[0]["step"] == 1

    # the same batch every step, 5 steps of descent before the check at step 5 (a recipe key)
    learning, printed = run_quietly(tiny_recipe(tmp_path / "learning", bench, "optim.lr=1e-3", "optim.max_steps=6",
                                                "train.learning_check_steps=5", "data.val=null"))
    check = learning.learning_check
    assert check is not None and check["learning"] and check["step"] == 5 and check["loss"] < 0.9 * check["chance"]
    assert "not learning" not in printed

    result = CliRunner().invoke(app, ["runs", "--runs-dir", str(tmp_path / "frozen" / "runs")],
                                env={"COLUMNS": "300"})
    assert result.exit_code == 0
    assert "NOT LEARNING" in result.stdout
    assert f"{frozen.run.dir.name}: warning: not learning at step 1" in result.stderr
    off, _ = run_quietly(tiny_recipe(tmp_path / "off", bench, "optim.lr=1e-12", "optim.max_steps=1",
                                     "train.learning_check=false", "data.val=null"))
    assert off.learning_check is None and "learning_check" not in off.run.meta()


def test_learning_curves_script_draws_a_runs_metrics(tmp_path: Path, repo_root: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("learning_curves", repo_root / "scripts" / "learning_curves.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    records = [{"kind": "train", "step": s, "l_cl1": 3.5 - 0.1 * s} for s in range(1, 11)]
    records += [{"kind": "val", "step": 5, "auc": 0.36}, {"kind": "val", "step": 10, "auc": 0.40},
                {"kind": "learning_check", "step": 5, "chance": 3.53, "centre_auc": 0.35},
                {"kind": "test", "step": 10, "set": "vggss", "checkpoint": "best", "auc": 0.41}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = module.draw(tmp_path, tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
