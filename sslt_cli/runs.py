"""Run folders: one per run, never overwritten; ``--resume`` continues one.

Layout::

    runs/<name>-<YYYYmmdd-HHMMSS>/
        config.yaml      the resolved recipe
        meta.json        argv, overrides, git sha, versions, seed, status, MLflow ids
        train.log        human-readable log
        metrics.jsonl    one JSON object per logged step/epoch/eval: every number lives here
        skipped.csv      clips skipped with their reason (if any)
        checkpoints/     last-*.pt (the last N), best.pt (best validation cIoU)
        eval/            outputs of `sslt eval`
        retrieve/        outputs of `sslt retrieve`
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from sslt_cli.config import Recipe, dump_yaml, recipe_dict, validate_tree
from sslt_cli.errors import SsltError

CONFIG = "config.yaml"
META = "meta.json"
METRICS = "metrics.jsonl"
LOG = "train.log"
SKIPPED = "skipped.csv"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def atomic_write(path: str | Path, write: "Callable[[str], None]") -> Path:
    """Create ``path`` through ``write(temp_path)`` on a temp file in the same folder, then ``os.replace``: a kill
    never leaves a half-written file. The file gets the usual permissions (umask), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` atomically (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` atomically (see :func:`atomic_write`)."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def git_sha() -> str | None:
    """The commit of the sslt source tree, if it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape results."""
    from importlib import metadata

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("sslt", "torch", "torchvision", "numpy", "mlflow", "av", "opencv-python-headless"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


class Run:
    """A run folder."""

    def __init__(self, path: str | Path):
        self.dir = Path(path)

    # -- creation and opening --------------------------------------------------------------------------------

    @classmethod
    def create(cls, recipe: Recipe, *, argv: list[str] | None = None, overrides: list[str] | None = None,
               runs_dir: str | Path | None = None, name: str | None = None, extra_meta: dict | None = None) -> "Run":
        """Make a new run folder (a suffix keeps an existing folder untouched) and write config + meta."""
        base = Path(runs_dir or recipe.runs_dir)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        stem = f"{name or recipe.name}-{stamp}"
        base.mkdir(parents=True, exist_ok=True)
        for n in range(1000):
            candidate = base / (stem if n == 0 else f"{stem}-{n}")
            try:
                candidate.mkdir()
                break
            except FileExistsError:
                continue
        else:
            raise SsltError(f"{base}: could not create a new run folder for {stem}")
        run = cls(candidate)
        (run.dir / "checkpoints").mkdir()
        atomic_write_text(run.dir / CONFIG, dump_yaml(recipe_dict(recipe)))
        meta = {
            "name": run.dir.name, "recipe_name": recipe.name, "argv": list(argv if argv is not None else sys.argv),
            "overrides": list(overrides or []), "git_sha": git_sha(), "versions": versions(), "seed": recipe.seed,
            "status": "created", "created": _now(), "updated": _now(), "host": platform.node(),
        }
        meta.update(extra_meta or {})
        run.write_meta(meta)
        return run

    @classmethod
    def open(cls, path: str | Path) -> "Run":
        """Open an existing run folder; raises SsltError if it is not one."""
        path = Path(path)
        if not (path / CONFIG).is_file() or not (path / META).is_file():
            raise SsltError(f"{path}: not a run folder (expected {CONFIG} and {META} inside); "
                            "pass a folder made by `sslt train`")
        return cls(path)

    # -- config and meta ---------------------------------------------------------------------------------------

    def recipe(self) -> Recipe:
        """The resolved recipe saved with the run."""
        from sslt_cli.config import load_tree

        return validate_tree(load_tree(self.dir / CONFIG), str(self.dir / CONFIG))  # type: ignore[return-value]

    def meta(self) -> dict:
        return json.loads((self.dir / META).read_text())

    def write_meta(self, meta: dict) -> None:
        meta["updated"] = _now()
        atomic_write_text(self.dir / META, json.dumps(meta, indent=2, sort_keys=False, default=str) + "\n")

    def update_meta(self, **fields: Any) -> dict:
        meta = self.meta()
        meta.update(fields)
        self.write_meta(meta)
        return meta

    # -- logs and metrics --------------------------------------------------------------------------------------

    def log(self, message: str) -> None:
        """Append a timestamped line to train.log."""
        with open(self.dir / LOG, "a") as f:
            f.write(f"{_now()} {message}\n")

    def append_metrics(self, record: dict) -> None:
        """Append one JSON record (``{'kind': 'train'|'val'|'test'|..., 'step': int, ...}``) to metrics.jsonl."""
        path = self.dir / METRICS
        torn = False
        if path.is_file() and path.stat().st_size:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        with open(path, "a") as f:
            # a kill can leave the last line without its newline: start on a fresh line so this record survives
            f.write(("\n" if torn else "") + json.dumps(record, default=float) + "\n")
            f.flush()

    def metrics(self) -> list[dict]:
        path = self.dir / METRICS
        if not path.is_file():
            return []
        out = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a kill: the rest of the file is still good
        return out

    def truncate_metrics_after(self, step: int) -> None:
        """Drop records logged after ``step`` (used on resume, so a replayed step is not counted twice)."""
        kept = [r for r in self.metrics() if int(r.get("step", 0)) <= step]
        atomic_write_text(self.dir / METRICS, "".join(json.dumps(r, default=float) + "\n" for r in kept))

    # -- checkpoints -------------------------------------------------------------------------------------------

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    def save_checkpoint(self, state: dict, name: str, keep_last: int | None = None) -> Path:
        """Atomically save ``state`` as ``checkpoints/<name>.pt``; prune ``last-*.pt`` to ``keep_last``."""
        path = atomic_torch_save(state, self.checkpoints / f"{name}.pt")
        if keep_last is not None and name.startswith("last-"):
            lasts = sorted(self.checkpoints.glob("last-*.pt"), key=_step_of)
            for old in lasts[:-keep_last]:
                old.unlink()
        return path

    def latest_checkpoint(self) -> Path | None:
        lasts = sorted(self.checkpoints.glob("last-*.pt"), key=_step_of)
        return lasts[-1] if lasts else None

    def best_checkpoint(self) -> Path | None:
        path = self.checkpoints / "best.pt"
        return path if path.is_file() else None


def _step_of(path: Path) -> int:
    try:
        return int(path.stem.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def list_runs(runs_dir: str | Path) -> list[Run]:
    """Run folders under ``runs_dir`` (those with config.yaml and meta.json), newest first."""
    base = Path(runs_dir)
    if not base.is_dir():
        return []
    runs = [Run(p) for p in base.iterdir() if (p / CONFIG).is_file() and (p / META).is_file()]

    # config.yaml is written once, when the run is created (folder mtimes move whenever meta.json is rewritten)
    return sorted(runs, key=lambda r: ((r.dir / CONFIG).stat().st_mtime_ns, r.dir.name), reverse=True)
