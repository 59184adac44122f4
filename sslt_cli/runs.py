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
import errno
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from sslt_cli.config import Recipe, dump_yaml, recipe_dict, validate_tree
from sslt_cli.errors import CheckpointError, SsltError, TrainingError

CONFIG = "config.yaml"
META = "meta.json"
METRICS = "metrics.jsonl"
LOG = "train.log"
SKIPPED = "skipped.csv"
HEARTBEAT_EVERY_S = 60.0
STALE_AFTER_S = 1800.0  # a run on another host that has not written for this long is shown as stale
SPACE_MARGIN = 1.2  # a new checkpoint needs the size of the last one, with room for growth and the log
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


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
        self._last_beat = float("-inf")

    # -- creation and opening --------------------------------------------------------------------------------

    @classmethod
    def create(cls, recipe: Recipe, *, argv: list[str] | None = None, overrides: list[str] | None = None,
               runs_dir: str | Path | None = None, name: str | None = None, extra_meta: dict | None = None) -> "Run":
        """Make a new run folder (a suffix keeps an existing folder untouched) and write config + meta."""
        from sslt_cli.preflight import writable_dir

        base = writable_dir(runs_dir or recipe.runs_dir, "runs_dir")
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        stem = f"{name or recipe.name}-{stamp}"
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
        """Write meta.json atomically; on a full disk, in place (a file of about the same size needs no new block),
        so a run's final status is still recorded."""
        meta["updated"] = _now()
        text = json.dumps(meta, indent=2, sort_keys=False, default=str) + "\n"
        try:
            atomic_write_text(self.dir / META, text)
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                raise
            with open(self.dir / META, "r+b") as f:
                f.write(text.encode())
                f.truncate()

    def update_meta(self, **fields: Any) -> dict:
        """Merge ``fields`` into meta.json. Setting ``status='running'`` also records this process (``pid``,
        ``host``) and a ``heartbeat``, renewed while it logs (:meth:`beat`), so a killed run can be told from a
        running one."""
        meta = self.meta()
        meta.update(fields)
        if fields.get("status") == "running":
            meta.update(pid=os.getpid(), pid_started=_process_start(os.getpid()), host=platform.node(),
                        heartbeat=_now())
            self._last_beat = _monotonic()
        self.write_meta(meta)
        return meta

    def beat(self) -> None:
        """Renew the heartbeat (at most every HEARTBEAT_EVERY_S), only from the process that runs the training."""
        if _monotonic() - self._last_beat < HEARTBEAT_EVERY_S:
            return
        self._last_beat = _monotonic()
        meta = self.meta()
        if meta.get("status") == "running" and meta.get("pid") == os.getpid() and meta.get("host") == platform.node():
            meta["heartbeat"] = _now()
            self.write_meta(meta)

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
        self.beat()

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
        """Atomically save ``state`` as ``checkpoints/<name>.pt``; prune ``last-*.pt`` to ``keep_last``.

        The disk must first have room for a checkpoint as large as the newest one (:func:`check_checkpoint_space`);
        a full disk is a TrainingError naming the folder, and every earlier checkpoint stays as it was (the new one
        is written beside them and only then takes its name, and older ones are pruned only after that)."""
        check_checkpoint_space(self.checkpoints)
        try:
            path = atomic_torch_save(state, self.checkpoints / f"{name}.pt")
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                raise
            raise TrainingError(f"{self.checkpoints}: the disk is full; checkpoint {name}.pt was not written",
                                [f"the previous checkpoint is intact: {self.resume_hint()}",
                                 "free disk space, or move runs_dir to a larger disk"]) from None
        self.beat()
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

    def resume_point(self) -> tuple[Path, dict]:
        """The newest complete checkpoint to resume from and its state: the newest ``last-*.pt`` that loads, or
        ``best.pt`` when it is newer (a full disk can stop the run before the last checkpoint of an epoch whose best
        checkpoint was written); a TrainingError listing what was tried when none loads."""
        tried: list[str] = []
        chosen: tuple[Path, dict] | None = None
        for path in sorted(self.checkpoints.glob("last-*.pt"), key=_step_of, reverse=True):
            try:
                chosen = (path, load_checkpoint(path))
                break
            except CheckpointError as exc:
                tried.append(exc.message)
        best = self.best_checkpoint()
        if best is not None and (chosen is None or best.stat().st_mtime_ns > chosen[0].stat().st_mtime_ns):
            try:
                state = load_checkpoint(best)
                if chosen is None or int(state.get("step", -1)) > int(chosen[1].get("step", -1)):
                    chosen = (best, state)
            except CheckpointError as exc:
                tried.append(exc.message)
        if chosen is None:
            raise TrainingError(f"{self.dir}: nothing to resume (no complete checkpoint in {self.checkpoints})",
                                tried or ["no last-*.pt or best.pt: start a new run"])
        return chosen

    def resume_hint(self) -> str:
        return f"continue with: sslt train --resume {self.dir}"

    def state(self, now: _dt.datetime | None = None) -> str:
        """meta.json's status, except that a 'running' run whose process is gone reads ``stale (last heard at
        <heartbeat>)``: on this host its pid is no longer alive; on another host its heartbeat is older than
        STALE_AFTER_S."""
        meta = self.meta()
        status = str(meta.get("status", ""))
        if status != "running" or "heartbeat" not in meta:
            return status
        heard = str(meta["heartbeat"])
        if meta.get("host") == platform.node():
            pid = int(meta.get("pid", 0))
            # a pid reused by another process after the run's died: its start time differs
            gone = not _pid_alive(pid) or meta.get("pid_started") not in (None, _process_start(pid))
        else:
            age = ((now or _dt.datetime.now(_dt.timezone.utc)) - _dt.datetime.fromisoformat(heard)).total_seconds()
            gone = age > STALE_AFTER_S
        return f"stale (last heard at {heard})" if gone else status


def _monotonic() -> float:
    import time

    return time.monotonic()


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot, /proc/<pid>/stat field 22), or None where unknown."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def check_checkpoint_space(folder: Path, margin: float = SPACE_MARGIN) -> None:
    """Before writing a checkpoint into ``folder``: the disk's free space must hold ``margin`` times the newest
    checkpoint there (a new one is about as large); a TrainingError naming the folder otherwise. Nothing to compare
    with before the first checkpoint."""
    import shutil

    existing = [p for p in folder.glob("*.pt") if p.is_file()]
    if not existing:
        return
    newest = max(existing, key=lambda p: p.stat().st_mtime_ns)
    needed = int(newest.stat().st_size * margin)
    free = shutil.disk_usage(folder).free
    if free < needed:
        mib = 2**20
        raise TrainingError(f"{folder}: not enough disk space for the next checkpoint ({free / mib:.1f} MiB free, "
                            f"about {needed / mib:.1f} MiB needed: the size of {newest.name} and a margin)",
                            ["free disk space, or move runs_dir to a larger disk; the previous checkpoints are "
                             f"intact: continue with: sslt train --resume {folder.parent}"])


def _step_of(path: Path) -> int:
    try:
        return int(path.stem.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"
_NPY_MAGIC = b"\x93NUMPY"


def describe_file(path: Path) -> str:
    """What a file that failed to load looks like from its first bytes: ``an empty file``, ``a text file (starts
    with '...')``, ``a zip archive``, ``a pickle``, ``a .npy array``, or ``a binary file``, with its size."""
    size = path.stat().st_size
    if size == 0:
        return "an empty file (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(_ZIP_MAGIC):
        return f"a zip archive of {size} bytes"
    if head.startswith(_NPY_MAGIC):
        return f"a .npy array of {size} bytes"
    if head.startswith(_PICKLE_MAGIC):
        return f"a pickle of {size} bytes"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"a binary file of {size} bytes"
    first = text.splitlines()[0][:40] if text.strip() else text[:40]
    return f"a text file of {size} bytes (it starts with {first!r})"


def checkpoint_problem(path: Path, exc: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in words: truncated, not a checkpoint, or holding objects
    a safe load refuses. Never torch's advice to load unsafely."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    kind = describe_file(path)
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if refused and not kind.startswith(("an empty", "a text", "a binary")):
        return (f"a checkpoint holding Python objects ({refused.group(1)}) that a safe load refuses; sslt loads "
                "weights only (tensors, numbers, text): save the model's state_dict instead")
    if kind.startswith(("a zip archive", "a pickle")):
        return f"a truncated or damaged checkpoint ({kind} that ends early or is corrupt)"
    if kind.startswith("an empty file"):
        return "an empty file (0 bytes), not a checkpoint"
    return f"not a checkpoint: {kind}"


def load_checkpoint(path: str | Path) -> dict:
    """Load an sslt checkpoint with ``weights_only=True``; raises CheckpointError saying what the file is."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many kinds on a file that is not a checkpoint
        raise CheckpointError(f"{path}: {checkpoint_problem(path, exc)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, got {type(state).__name__}")
    return state


def list_runs(runs_dir: str | Path) -> list[Run]:
    """Run folders under ``runs_dir`` (those with config.yaml and meta.json), newest first."""
    base = Path(runs_dir)
    if not base.is_dir():
        return []
    runs = [Run(p) for p in base.iterdir() if (p / CONFIG).is_file() and (p / META).is_file()]

    # config.yaml is written once, when the run is created (folder mtimes move whenever meta.json is rewritten)
    return sorted(runs, key=lambda r: ((r.dir / CONFIG).stat().st_mtime_ns, r.dir.name), reverse=True)
