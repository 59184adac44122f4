"""Folders written by an older sslt still report, evaluate and resume.

``tests/data/old_ablation`` is an ablation folder made by sslt at commit fe7094d (before the evaluation orchestrator
and the objective registry): `sslt ablate old_abl.yaml runs_dir=<root>/runs` on a 2-cell ablation of a tiny
``ezvsl`` recipe (rows EZ and TIE), with the checkpoints, maps and pictures left out. Its run folders have the flat
``loss`` section of that time (an ``ezvsl`` run carries the ``tie`` keys at their defaults), test records in
metrics.jsonl without the centre-prior baseline (read from each evaluation's metrics.json) and no results index.
Paths in it are written ``@ROOT@`` (the folder it was made in) and ``@DATA@`` (the synthetic benchmark).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from typer.testing import CliRunner

from sslt_cli.cli import app

OLD_ABLATION = Path(__file__).resolve().parent / "data" / "old_ablation"
WIDE = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}


def copy_old_ablation(root: Path) -> Path:
    """The old ablation folder under ``root`` with its placeholders filled in; returns the ablation folder."""
    shutil.copytree(OLD_ABLATION, root)
    for path in root.rglob("*"):
        if path.is_file():
            path.write_text(path.read_text().replace("@ROOT@", str(root)).replace("@DATA@", str(root / "data")))
    return root / "runs" / "ablations" / "old_abl"


def test_report_of_an_ablation_made_before_the_orchestrator(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "old"
    folder = copy_old_ablation(root)
    written = {name: (folder / name).read_text() for name in ("summary.csv", "cells.csv", "summary.md")}
    for name in written:
        (folder / name).unlink()
    monkeypatch.chdir(root)
    result = CliRunner().invoke(app, ["ablate", "old_abl.yaml", f"runs_dir={root}/runs", "--report"], env=WIDE)
    assert result.exit_code == 0, f"{result.exception!r}\n{result.output}"
    # the same table from the same numbers: the old test records, the baselines from each evaluation's metrics.json
    for name, text in written.items():
        assert (folder / name).read_text() == text, name
    assert "EZ  " in result.stdout and "4.69" in result.stdout and "23.52" in result.stdout


# the flat loss section every run folder and checkpoint of sslt fe7094d holds: an ezvsl run carries tie's keys
FLAT_EZVSL_LOSS = {"objective": "ezvsl", "eps_pos": 0.65, "eps_neg": 0.4, "tau": 0.03, "temperature": 0.03,
                   "cl_weight": 0.5, "geo_weight": 1.0, "negatives": "global"}


def write_old_loss_section(run, loss: dict) -> None:
    """Rewrite ``run``'s config.yaml and the recipe inside each of its checkpoints with ``loss`` (the old form)."""
    import torch
    import yaml

    tree = yaml.safe_load((run.dir / "config.yaml").read_text())
    (run.dir / "config.yaml").write_text(yaml.safe_dump({**tree, "loss": loss}, sort_keys=False))
    for path in run.checkpoints.glob("*.pt"):
        state = torch.load(path, weights_only=True)
        state["recipe"]["loss"] = dict(loss)
        torch.save(state, path)


def test_an_ezvsl_run_saved_with_the_flat_loss_section_resumes_and_evaluates(tmp_path: Path, monkeypatch) -> None:
    import io
    import json

    import torch
    from rich.console import Console

    from callers import train_in
    from sslt_cli.config import EzvslLoss, load_recipe
    from sslt_cli.data.synthetic import generate
    from sslt_cli.errors import SsltError
    from sslt_cli.runs import Run

    generate(tmp_path / "bench", n_train=16, n_val=4, n_test=4, n_flickr=2, image_size=64, workers=1,
             progress=False)
    recipe = load_recipe("ezvsl", [f"data.root={tmp_path / 'bench'}", "data.image_size=64", "data.num_workers=0",
                                   "data.test={vggss: test_vggss}", "audio.clip_seconds=3", "audio.n_mels=32",
                                   "optim.batch_size=8", "optim.max_steps=2", "eval.batch_size=4",
                                   "tracking.enabled=false", f"runs_dir={tmp_path / 'runs'}"])
    torch.set_num_threads(1)
    quiet = Console(file=io.StringIO(), width=120)
    run = train_in(recipe, Run.create(recipe), stop_after_steps=1, evaluate_at_end=False, console=quiet,
                   out=quiet).run
    write_old_loss_section(run, FLAT_EZVSL_LOSS)
    assert Run.open(run.dir).recipe().loss == EzvslLoss(temperature=0.03)

    monkeypatch.chdir(tmp_path)
    resumed = CliRunner().invoke(app, ["train", "--resume", str(run.dir)], env=WIDE)
    assert resumed.exit_code == 0, f"{resumed.exception!r}\n{resumed.output}"
    assert run.meta()["status"] == "finished"
    assert {(r["set"], r["checkpoint"]) for r in run.metrics() if r["kind"] == "test"} == {("vggss", "last"),
                                                                                         ("vggss", "best")}
    write_old_loss_section(run, FLAT_EZVSL_LOSS)  # the checkpoints the resumed run wrote, in the old form too
    evaluated = CliRunner().invoke(app, ["eval", str(run.dir), "--which", "last", "--protocol", "lvs"], env=WIDE)
    assert evaluated.exit_code == 0, f"{evaluated.exception!r}\n{evaluated.output}"
    assert json.loads((run.dir / "eval" / "vggss-last-lvs" / "metrics.json").read_text())["n"] == 4

    write_old_loss_section(run, {**FLAT_EZVSL_LOSS, "eps_pos": 0.7})
    refused = CliRunner().invoke(app, ["eval", str(run.dir), "--which", "last"], env=WIDE)
    assert isinstance(refused.exception, SsltError)
    assert refused.exception.message == (
        f"{run.dir / 'config.yaml'}: the saved recipe's loss section sets eps_pos=0.7, which belong(s) to another "
        "objective than its own ('ezvsl'): the sslt that saved it ignored them")
