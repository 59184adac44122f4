"""SIGINT / SIGTERM in every phase of `sslt train` and in an ablation cell's retrieval (issue 22, item 7).

Each test starts the real command in a subprocess on a tiny synthetic set and sends a real signal in the phase it
names. The phase is held with the documented test hook of ``sslt_cli/interrupts.py`` (``SSLT_TEST_HOLD_PHASE`` /
``SSLT_TEST_HOLD_FILE``: entering the phase writes the file and waits for a signal), so the signal never races the
phase; the hook only waits and changes no result.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sslt_cli.interrupts import HOLD_FILE_ENV, HOLD_PHASE_ENV


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """16 training, 4 validation, 12 VGG-SS-style (enough for a retrieval gallery) and 2 Flickr-style clips, 64 px."""
    from sslt_cli.data.synthetic import generate

    root = tmp_path_factory.mktemp("signals-bench") / "bench"
    generate(root, n_train=16, n_val=4, n_test=12, n_flickr=2, image_size=64, workers=1, progress=False)
    return root


def write_recipe(folder: Path, bench: Path) -> Path:
    """Two steps (one epoch, a validation), the final evaluation on the VGG-SS-style set, tracked in MLflow."""
    tree = {"name": "sig", "runs_dir": str(folder / "runs"),
            "data": {"root": str(bench), "image_size": 64, "num_workers": 0, "test": {"vggss": "test_vggss"}},
            "audio": {"clip_seconds": 3, "n_mels": 32}, "optim": {"batch_size": 8, "max_steps": 2},
            "train": {"log_every": 1}, "eval": {"batch_size": 4},
            "transforms": {"views": "code", **{t: {"enabled": False} for t in ("app", "geo", "mask", "mix",
                                                                                "equivariance")}},
            "tracking": {"enabled": True, "experiment": "signals"}}
    path = folder / "sig.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def run_until_held(args: list[str], folder: Path, phase: str, sig: int,
                   background: bool = False) -> subprocess.CompletedProcess:
    """``sslt ARGS`` held in ``phase``, sent ``sig`` there; its exit code and output. ``background``: started as a
    shell starts a background job, with SIGINT ignored."""
    held = folder / "held"
    env = {**os.environ, HOLD_PHASE_ENV: phase, HOLD_FILE_ENV: str(held), "OMP_NUM_THREADS": "1", "COLUMNS": "400",
           "NO_COLOR": "1"}
    process = subprocess.Popen([sys.executable, "-m", "sslt_cli", *args], cwd=folder, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if background else None)
    deadline = time.monotonic() + 240
    while not held.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if not held.exists():
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"never reached the {phase}: exit {process.returncode}\n{stdout}\n{stderr}")
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=240)
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def only_run(runs_dir: Path):
    from sslt_cli.runs import Run

    found = [p for p in runs_dir.iterdir() if (p / "meta.json").is_file()]
    assert len(found) == 1, found
    return Run(found[0])


def mlflow_status(run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"]).get_run(run_id).info.status


@pytest.mark.parametrize("phase, sig, background", [
    ("setup", signal.SIGTERM, False), ("validation", signal.SIGINT, False), ("final evaluation", signal.SIGTERM, False),
    ("final evaluation", signal.SIGINT, False), ("final evaluation", signal.SIGINT, True)])
def test_a_signal_in_any_phase_of_sslt_train_ends_interrupted_with_exit_130_and_the_command_that_continues(
        bench: Path, isolated_workdir: Path, phase: str, sig: int, background: bool) -> None:
    """Before: in the final evaluation SIGTERM exited 143 with status ``trained`` and the MLflow run RUNNING, and
    SIGINT to a run started in the background (SIGINT ignored, as a shell's ``&`` does) was ignored: exit 0."""
    recipe = write_recipe(isolated_workdir, bench)
    result = run_until_held(["train", str(recipe)], isolated_workdir, phase, sig, background)
    assert result.returncode == 130, result.stderr
    run = only_run(isolated_workdir / "runs")
    meta = run.meta()
    assert (meta["status"], meta["interrupted_in"]) == ("interrupted", phase)
    assert mlflow_status(meta["mlflow_run_id"]) == "KILLED"
    hint = {"setup": "nothing was trained yet: start it again with the same command (a new run folder)",
            "validation": f"continue with: sslt train --resume {run.dir}",
            "final evaluation": f"continue with: sslt train --resume {run.dir} (its training is complete: it goes "
                                f"straight to the final evaluation; or evaluate it with: sslt eval {run.dir})"}[phase]
    assert f"not finished: {hint}" in " ".join(result.stderr.split()), result.stderr
    if phase == "validation":
        # the validation finished and was checkpointed before the stop
        assert [r["kind"] for r in run.metrics() if r["kind"] == "val"] == ["val"]
        assert (run.checkpoints / "last-00000002.pt").is_file()


def test_a_run_stopped_in_its_final_evaluation_resumes_straight_into_it(bench: Path, isolated_workdir: Path) -> None:
    recipe = write_recipe(isolated_workdir, bench)
    stopped = run_until_held(["train", str(recipe)], isolated_workdir, "final evaluation", signal.SIGTERM)
    assert stopped.returncode == 130, stopped.stderr
    run = only_run(isolated_workdir / "runs")
    steps_before = [r["step"] for r in run.metrics() if r["kind"] == "train"]

    resumed = subprocess.run([sys.executable, "-m", "sslt_cli", "train", "--resume", str(run.dir)], cwd=isolated_workdir,
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    meta = run.meta()
    assert meta["status"] == "finished" and mlflow_status(meta["mlflow_run_id"]) == "FINISHED"
    assert [r["step"] for r in run.metrics() if r["kind"] == "train"] == steps_before  # no step trained again
    tests = [(r["set"], r["checkpoint"]) for r in run.metrics() if r["kind"] == "test"]
    assert sorted(tests) == [("vggss", "best"), ("vggss", "last")]


def test_sigterm_in_an_ablation_cells_retrieval_ends_interrupted_with_exit_130(bench: Path,
                                                                               isolated_workdir: Path) -> None:
    """Before: SIGTERM there ended the process (143) with the cell left ``running`` and its MLflow run RUNNING."""
    recipe = write_recipe(isolated_workdir, bench)
    ablation = isolated_workdir / "one_row.yaml"
    ablation.write_text("# one row, retrieval after training\n# no paper row\n# seconds on CPU\n"
                        f"base: {recipe}\nretrieve: true\nrows:\n  A:\n    overrides: []\n")
    result = run_until_held(["ablate", str(ablation)], isolated_workdir, "retrieval", signal.SIGTERM)
    assert result.returncode == 130, result.stderr
    folder = isolated_workdir / "runs" / "ablations" / "one_row"
    state = json.loads((folder / "ablation.json").read_text())
    (cell,) = state["cells"].values()
    assert cell["status"] == "interrupted"
    from sslt_cli.runs import Run

    cell_run = Run(folder / cell["run_dir"])
    assert mlflow_status(cell_run.meta()["mlflow_run_id"]) == "KILLED"
    assert cell["interrupted_in"] == "retrieval"
    assert "interrupted by SIGTERM during the retrieval; run the same command again to continue" in " ".join(
        result.stderr.split())
