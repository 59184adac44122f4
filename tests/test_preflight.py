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
def read_only_dir(tmp_path: Path):
    """A folder nobody can write into (chattr +i for root, where the file system allows it)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
    elif subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a file system without chattr +i: cannot make a read-only folder")
    yield folder
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o755)


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
