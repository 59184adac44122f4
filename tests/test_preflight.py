"""Output paths checked before any work: a file where a folder should be, a folder that cannot be written."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sslt_cli.config import Recipe
from sslt_cli.errors import SsltError
from sslt_cli.preflight import writable_dir
from sslt_cli.runs import Run


def sslt(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "300"}
    return subprocess.run([sys.executable, "-m", "sslt_cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.fixture
def read_only_dir(tmp_path: Path, make_read_only):
    """A folder nobody can write into (chattr +i for root, where the file system allows it)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    return make_read_only(folder)


def test_a_runs_dir_that_is_a_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(SsltError) as info:
        Run.create(Recipe(name="t"), runs_dir=tmp_path / "runs" / "deeper")
    assert info.value.render() == (f"runs_dir {tmp_path / 'runs' / 'deeper'}: {tmp_path / 'runs'} is a file, not a "
                                   "folder\n  - choose another runs_dir, or move the file away")


def test_a_read_only_runs_dir_is_named(read_only_dir: Path) -> None:
    with pytest.raises(SsltError) as info:
        Run.create(Recipe(name="t"), runs_dir=read_only_dir)
    reason = "permission denied" if os.geteuid() != 0 else "not permitted"
    assert info.value.render() == (f"runs_dir {read_only_dir}: cannot write there ({reason})\n"
                                   f"  - choose another runs_dir, or make {read_only_dir} writable")


def test_writable_dir_creates_the_folder(tmp_path: Path) -> None:
    assert writable_dir(tmp_path / "a" / "b", "--out").is_dir()


def test_eval_out_that_is_a_file_is_one_message(isolated_workdir: Path) -> None:
    Path("taken").write_text("x")
    result = sslt("eval", "--baselines-only", "--vggss-json", "missing.json", "--out", "taken")
    assert (result.returncode, result.stderr) == (1, "error: --out taken: taken is a file, not a folder\n"
                                                     "  - choose another --out, or move the file away\n")


def test_prepare_index_on_a_read_only_folder_is_one_message(read_only_dir: Path) -> None:
    result = sslt("prepare", "index", str(read_only_dir), "--layout", "vggss_test")
    reason = "permission denied" if os.geteuid() != 0 else "not permitted"
    assert (result.returncode, result.stderr) == (
        1, f"error: ROOT {read_only_dir}: cannot write there ({reason})\n"
           "  - sslt prepare index writes the set's manifest.csv into ROOT\n"
           f"  - choose another ROOT, or make {read_only_dir} writable\n")


# ------------------------------------------------- issue 22, item 5: every path a command reads or writes, up front

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder trained one step on a tiny synthetic set (no final evaluation, no tracking)."""
    import io

    import yaml
    from rich.console import Console

    from callers import train_in
    from sslt_cli.config import load_recipe
    from sslt_cli.data.synthetic import generate

    root = tmp_path_factory.mktemp("preflight-run")
    generate(root / "bench", n_train=8, n_val=4, n_test=4, n_flickr=2, image_size=64, workers=1, progress=False)
    tree = {"name": "tiny", "runs_dir": str(root / "runs"),
            "data": {"root": str(root / "bench"), "image_size": 64, "num_workers": 0, "val": None},
            "audio": {"clip_seconds": 3, "n_mels": 32}, "optim": {"batch_size": 8, "max_steps": 1},
            "transforms": {"views": "code", "app": {"enabled": False}, "geo": {"enabled": False},
                           "mask": {"enabled": False}, "mix": {"enabled": False},
                           "equivariance": {"enabled": False}},
            "eval": {"batch_size": 4}, "tracking": {"enabled": False}}
    (root / "tiny.yaml").write_text(yaml.safe_dump(tree))
    recipe = load_recipe(root / "tiny.yaml")
    quiet = Console(file=io.StringIO())
    return train_in(recipe, Run.create(recipe), evaluate_at_end=False, console=quiet, out=quiet).run.dir


@pytest.mark.parametrize("command", ["eval", "retrieve"])
def test_eval_and_retrieve_into_a_read_only_run_folder_are_one_message(tiny_run: Path, tmp_path: Path,
                                                                       make_read_only, command: str) -> None:
    """Before: both ran, then ended in a PermissionError traceback when writing their outputs."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    make_read_only(run_dir)
    result = sslt(command, str(run_dir), "--device", "cpu")
    reason = "permission denied" if os.geteuid() != 0 else "not permitted"
    assert (result.returncode, result.stderr) == (
        1, f"error: run folder {run_dir}: cannot write there ({reason})\n"
           f"  - sslt {command} records its numbers in the run folder (metrics.jsonl, meta.json)\n"
           f"  - choose another run folder, or make {run_dir} writable\n")


def test_localize_into_a_read_only_out_is_one_message(tiny_run: Path, read_only_dir: Path) -> None:
    bench = tiny_run.parent.parent / "bench" / "test_vggss"
    frame, audio = next(bench.rglob("*.jpg")), next(bench.rglob("*.wav"))
    result = sslt("localize", str(tiny_run), "--image", str(frame), "--audio", str(audio), "--out",
                  str(read_only_dir / "loc"), "--device", "cpu")
    reason = "permission denied" if os.geteuid() != 0 else "not permitted"
    assert (result.returncode, result.stderr) == (
        1, f"error: --out {read_only_dir / 'loc'}: cannot write there ({reason})\n"
           f"  - choose another --out, or make {read_only_dir / 'loc'} writable\n")


@pytest.mark.parametrize("option", ["--vggss-json", "--list"])
def test_a_folder_given_as_an_input_file_is_one_message(isolated_workdir: Path, option: str) -> None:
    Path("folder").mkdir()
    args = ["--vggss-json", "folder"] if option == "--vggss-json" else ["--vggss-json", "vggss", "--list", "folder"]
    result = sslt("eval", "--baselines-only", *args)
    assert (result.returncode, result.stderr) == (
        1, f"error: {option} folder: is a folder, not a file\n"
           f"  - give {option} a file (or a built-in name: sslt data list)\n")


def test_a_file_that_cannot_be_opened_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root reads any file whatever its bits, so the refusal a user meets is simulated at the open call."""
    import errno

    from sslt_cli.preflight import readable_file

    path = tmp_path / "labels.csv"
    path.write_text("id,label\n")

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("sslt_cli.preflight.os.open", refuse)
    with pytest.raises(SsltError) as info:
        readable_file(path, "--labels", "labels")
    assert info.value.render() == (f"--labels {path}: cannot read it (permission denied)\n"
                                   f"  - make {path} readable, or give --labels another file")


def test_a_missing_input_is_left_to_its_reader_and_a_built_in_name_resolves(tmp_path: Path) -> None:
    from sslt_cli import catalog
    from sslt_cli.preflight import readable_file

    assert readable_file(tmp_path / "absent.csv", "--labels", "labels") == tmp_path / "absent.csv"
    assert readable_file("vggss", "--vggss-json", "boxes") == catalog.BY_NAME["vggss"].path
