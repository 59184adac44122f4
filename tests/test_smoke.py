"""One CPU smoke test of the real command line, end to end, on a tiny recipe:
prepare synthetic -> train a few steps (with the final evaluation) -> eval -> retrieve -> a 2-cell ablation -> runs.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path


TINY = ["data.root=bench", "data.image_size=64", "data.num_workers=0", "audio.clip_seconds=3", "audio.n_mels=32",
        "audio.hop_length=478", "optim.batch_size=8", "optim.epochs=1", "transforms.mix.queue=8",
        "transforms.mask.time=20", "transforms.mask.freq=4", "eval.batch_size=8", "runs_dir=runs"]


def sslt(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "160"}
    result = subprocess.run([sys.executable, "-m", "sslt_cli", *args], capture_output=True, text=True, env=env,
                            timeout=600)
    if check:
        assert result.returncode == 0, f"sslt {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_cli_end_to_end(repo_root: Path, tmp_path: Path) -> None:
    recipe = str(repo_root / "recipes" / "quickstart.yaml")

    prepared = sslt("prepare", "synthetic", "--out", "bench", "--train", "24", "--val", "8", "--test", "16",
                    "--flickr", "4", "--image-size", "64", "--workers", "1")
    assert "train=24" in prepared.stdout
    assert json.loads(Path("bench/benchmark.json").read_text())["params"]["seed"] == 0

    trained = sslt("train", recipe, *TINY)
    run_dir = next(Path("runs").glob("quickstart-*"))
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "finished"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert {"train", "val", "test"} <= kinds
    tests = {(r["set"], r["checkpoint"]) for r in records if r["kind"] == "test"}
    assert tests == {("vggss", "last"), ("vggss", "best"), ("flickr", "last"), ("flickr", "best")}
    assert (run_dir / "eval" / "vggss-best-ssltie" / "metrics.json").is_file()
    assert "centre prior" in trained.stdout and "oracle" in trained.stdout
    # one epoch, one validation: the best checkpoint is the last one, evaluated once and its results copied
    assert "the best checkpoint is the last checkpoint" in " ".join(trained.stderr.split())
    assert (run_dir / "eval" / "flickr-best-ssltie" / "per_clip.csv").read_bytes() == \
        (run_dir / "eval" / "flickr-last-ssltie" / "per_clip.csv").read_bytes()

    evaluated = sslt("eval", str(run_dir), "--which", "last", "--protocol", "ezvsl")
    assert "test_vggss: last" in evaluated.stdout
    metrics = json.loads((run_dir / "eval" / "vggss-last-ezvsl" / "metrics.json").read_text())
    assert metrics["accounting"]["scored"] == 16

    retrieved = sslt("retrieve", str(run_dir), "--task", "a2a")
    assert "random" in retrieved.stdout
    assert (run_dir / "retrieve" / "a2a" / "metrics.json").is_file()

    ablation = tmp_path / "two_rows.yaml"
    ablation.write_text(
        "# two rows of the paper's table on the tiny benchmark\n# rows A and F of REFERENCE.md section 7\n"
        "# seconds on CPU and on one GPU\n"
        f"base: {recipe}\n"
        "rows:\n"
        "  A:\n    overrides: [transforms.app.enabled=false, transforms.geo.enabled=false, "
        "transforms.mask.enabled=false, transforms.mix.enabled=false, transforms.equivariance.enabled=false]\n"
        "  F:\n    overrides: []\n")
    ablated = sslt("ablate", str(ablation), *TINY)
    # the table's first column names the rows (a bare "A" would be found in the header "AUC")
    assert [line.split("│")[1].strip() for line in ablated.stdout.splitlines() if line.startswith("│ ")
            and line.split("│")[1].strip() not in ("", "row")] == ["A", "F"]
    with open("runs/ablations/two_rows/summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert [(r["row"], r["seeds_done"]) for r in summary] == [("A", "1"), ("F", "1")]

    listed = sslt("runs")
    assert run_dir.name in listed.stdout
