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
