"""sslt as a user gets it: the built wheel, installed in a fresh virtualenv, run from an empty folder (``pytest -m slow``).

The wheel is built from a copy of the repository's files (``pip wheel --no-deps --no-build-isolation``: no network,
and the checkout is left as it was) and installed with ``--no-deps --no-index`` into a new virtualenv. The new
environment takes its dependencies (torch, torchvision, mlflow, ...) from the environment running this test through a
``.pth`` file that lists that environment's site-packages: ``--system-site-packages`` would reach only the base
interpreter's packages, which here (a virtualenv on a pyenv Python) do not hold torch, and a ``.pth`` line adds a
folder to ``sys.path`` without running the ``.pth`` files inside it, so the editable install of the development
environment stays invisible. The commands then run with no ``PYTHONPATH``, from an empty folder outside the
repository, and the test checks that ``sslt_cli`` is imported from the new virtualenv.

About 5 minutes on a 2-core CPU: most of it is the baselines on the 5158 real VGG-SS clips.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def repository_files(repo_root: Path) -> list[str]:
    """The files a clone holds (tracked and new, not ignored); symbolic links are listed as themselves."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo_root,
                            capture_output=True, check=True).stdout.decode()
    return [name for name in listed.split("\0") if name and os.path.lexists(repo_root / name)]


def copy_sources(repo_root: Path, target: Path) -> None:
    for name in repository_files(repo_root):
        source, copy = repo_root / name, target / name
        copy.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            copy.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, copy)


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    shown = " ".join(cmd)
    assert result.returncode == 0, f"{shown} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    print(f"$ {shown}\n{result.stdout}", flush=True)
    return result


def fresh_venv_with_wheel(wheel: Path, root: Path, env: dict[str, str]) -> Path:
    """A new virtualenv holding only the wheel, its dependencies reached through a .pth file; returns its bin/."""
    run([sys.executable, "-m", "venv", str(root)], root.parent, env)
    python = root / "bin" / "python"
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], root.parent, env)
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root.parent,
                    env).stdout.strip())
    dependencies = sysconfig.get_paths()["purelib"]  # this environment's: torch and the rest
    (site / "zz_sslt_test_dependencies.pth").write_text(dependencies + "\n")
    return root / "bin"


def test_the_installed_wheel_runs_from_any_folder(repo_root: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(COLUMNS="160", PYTHONUNBUFFERED="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    copy_sources(repo_root, tmp_path / "src")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(tmp_path / "src")], tmp_path, env)
    (wheel,) = (tmp_path / "dist").glob("sslt-*.whl")
    bin_dir = fresh_venv_with_wheel(wheel, tmp_path / "venv", env)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    work = tmp_path / "work"  # an empty folder: no recipes/, no data, no repository
    work.mkdir()

    where = run([str(bin_dir / "python"), "-c", "import sslt_cli, sys; print(sslt_cli.__file__); print(sys.path)"],
                work, env).stdout.splitlines()
    assert where[0].startswith(str(tmp_path / "venv")), where
    assert str(repo_root) not in where[1]

    assert "Usage: sslt" in run(["sslt", "--help"], work, env).stdout
    version = wheel.name.split("-")[1]
    assert run(["sslt", "--version"], work, env).stdout == f"sslt {version}\n"
    assert "ssltie-vggss-4911" in run(["sslt", "data", "list"], work, env).stdout

    run(["sslt", "prepare", "synthetic", "--out", "data/synthetic", "--train", "16", "--val", "4", "--test", "4",
         "--flickr", "2", "--image-size", "64", "--workers", "1"], work, env)
    # the documented way: a shipped recipe by name, its data.root (data/synthetic) relative to this folder
    trained = run(["sslt", "train", "quickstart", "data.image_size=64", "optim.batch_size=8", "optim.max_steps=2",
                   "optim.epochs=1", "eval.batch_size=4", "tracking.enabled=false"],
                  work, env)
    (run_dir,) = (work / "runs").glob("quickstart-*")
    assert json.loads((run_dir / "meta.json").read_text())["status"] == "finished"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"][-1] == 2
    assert {(r["set"], r["n"]) for r in records if r["kind"] == "test"} == {("vggss", 4), ("flickr", 2)}
    assert "vggss: last checkpoint (step 2), protocol ssltie" in trained.stdout

    baselines = run(["sslt", "eval", "--baselines-only", "--vggss-json", "vggss", "--protocol", "ssltie"], work, env)
    text = " ".join(baselines.stdout.split())
    assert "vggss: baselines only · protocol ssltie · N = 5156" in text
    assert re.search(r"centre prior │ 33\.96 │ 37\.44 │", text), text
