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
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from sslt_cli.config import Recipe, dump_yaml, load_saved_recipe, recipe_dict
from sslt_cli.errors import SsltError, TrainingError

CONFIG = "config.yaml"
META = "meta.json"
METRICS = "metrics.jsonl"
LOG = "train.log"
SKIPPED = "skipped.csv"
EVAL = "eval"  # evaluations: eval/<set>-<checkpoint>-<protocol>/ (eval_name)
HEARTBEAT_EVERY_S = 60.0
STALE_AFTER_S = 1800.0  # a run on another host that has not written for this long is shown as stale
SPACE_MARGIN = 1.2  # a new checkpoint needs the size of the last one, with room for growth and the log
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def eval_name(set_name: str, checkpoint: str, protocol: str) -> str:
    """The one name of an evaluation, ``<set>-<checkpoint>-<protocol>``: its folder under a run's ``eval/``, its
    artifact folder and its MLflow metric prefix (``eval/<name>/ciou``). ``set``: the recipe's name for a test set
    (``vggss``) when it is one of the recipe's ``data.test`` sets, else the set's own name; ``checkpoint``: ``best``,
    ``last``, a checkpoint file's stem, ``maps`` or ``baselines``."""
    return f"{set_name}-{checkpoint}-{protocol}"


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
        """The resolved recipe saved with the run (one saved by an older sslt read in today's schema)."""
        from sslt_cli.config import load_tree

        return load_saved_recipe(load_tree(self.dir / CONFIG), str(self.dir / CONFIG))

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

    def truncate_metrics_after(self, step: int, drop_kinds: tuple[str, ...] = ()) -> None:
        """Drop records logged after ``step`` (used on resume, so a replayed step is not counted twice), and every
        record of ``drop_kinds`` (the final evaluation's ``test`` records, which a resumed run writes again)."""
        kept = [r for r in self.metrics() if int(r.get("step", 0)) <= step and r.get("kind") not in drop_kinds]
        atomic_write_text(self.dir / METRICS, "".join(json.dumps(r, default=float) + "\n" for r in kept))

    # -- checkpoints -------------------------------------------------------------------------------------------

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    def save_checkpoint(self, state: dict, name: str, keep_last: int | None = None) -> Path:
        """Atomically save ``state`` as ``checkpoints/<name>.pt``; prune ``last-*.pt`` to ``keep_last``.

        The disk must first have room for a checkpoint as large as the newest one, or for the first one as large as
        the tensors of ``state`` (model and optimiser state: :func:`check_checkpoint_space`);
        a full disk is a TrainingError naming the folder, and every earlier checkpoint stays as it was (the new one
        is written beside them and only then takes its name, and older ones are pruned only after that)."""
        self.remove_torn_checkpoints()
        check_checkpoint_space(self.checkpoints, first_size=state_bytes(state))
        try:
            path = atomic_torch_save(state, self.checkpoints / f"{name}.pt")
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                raise
            kept = (f"the previous checkpoint is intact: {self.resume_hint()}" if self.has_checkpoint() else
                    f"no checkpoint was written yet, so the run starts again: {self.start_again_command()}")
            raise TrainingError(f"{self.checkpoints}: the disk is full; checkpoint {name}.pt was not written",
                                [kept, "free disk space, or move runs_dir to a larger disk"]) from None
        self.beat()
        if keep_last is not None and name.startswith("last-"):
            lasts = sorted(self.checkpoints.glob("last-*.pt"), key=checkpoint_step)
            for old in lasts[:-keep_last]:
                old.unlink()
        return path

    def remove_torn_checkpoints(self) -> tuple[int, int]:
        """Remove the temporary files (``.<name>.pt.<random>.tmp``) that a kill during a save left in
        ``checkpoints/``; returns (files, bytes) removed. Only the process holding the run folder saves there
        (``folder_lock``), so no such file belongs to a save in progress."""
        files = size = 0
        for torn in self.checkpoints.glob(".*.tmp"):
            try:
                bytes_ = torn.stat().st_size
                torn.unlink()
            except FileNotFoundError:
                continue
            files, size = files + 1, size + bytes_
        return files, size

    def check_resumable(self) -> None:
        """A TrainingError saying what to do when the run has no checkpoint to resume from (it was stopped before
        its first one): start it again with the same recipe."""
        if not self.has_checkpoint():
            raise TrainingError(f"{self.dir}: nothing to resume: the run was stopped before its first checkpoint",
                                [f"start it again with the same recipe: {self.start_again_command()}",
                                 f"(then delete {self.dir}, which holds no trained weights)"])

    def latest_checkpoint(self) -> Path | None:
        lasts = sorted(self.checkpoints.glob("last-*.pt"), key=checkpoint_step)
        return lasts[-1] if lasts else None

    def best_checkpoint(self) -> Path | None:
        path = self.checkpoints / "best.pt"
        return path if path.is_file() else None

    def resume_hint(self) -> str:
        """What continues this run: ``--resume`` from its checkpoint or, before its first one, a new run of the same
        recipe (:meth:`start_again_command`)."""
        if not self.has_checkpoint():
            return f"it has no checkpoint yet, so nothing to resume: start it again with: {self.start_again_command()}"
        return f"continue with: sslt train --resume {self.dir}"

    def has_checkpoint(self) -> bool:
        """Whether a checkpoint file (``last-*.pt`` or ``best.pt``) exists in the run (complete or not)."""
        return any(self.checkpoints.glob("last-*.pt")) or (self.checkpoints / "best.pt").is_file()

    def start_again_command(self) -> str:
        """The command that starts a new run of this run's recipe: the recipe file and overrides it was started with
        (``meta.json``), else the resolved recipe saved in the folder."""
        import shlex

        try:
            meta = self.meta()
        except (OSError, ValueError):
            meta = {}
        if meta.get("recipe_path"):
            return shlex.join(["sslt", "train", str(meta["recipe_path"]), *map(str, meta.get("overrides") or [])])
        return shlex.join(["sslt", "train", str(self.dir / CONFIG)])

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


def state_bytes(state: Any) -> int:
    """The bytes of the tensors in ``state`` (nested dicts, lists and tuples: a checkpoint's model, optimiser and
    schedule state), what a checkpoint of it holds, less the pickle's few kilobytes."""
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    if hasattr(state, "element_size") and hasattr(state, "nelement"):  # a tensor (torch is imported lazily)
        return int(state.element_size() * state.nelement())
    return 0


def check_checkpoint_space(folder: Path, margin: float = SPACE_MARGIN, first_size: int = 0) -> None:
    """Before writing a checkpoint into ``folder``: the disk's free space must hold ``margin`` times the newest
    checkpoint there (a new one is about as large), or, before the first one, ``margin`` times ``first_size`` (the
    bytes of the state to save: :func:`state_bytes`); a TrainingError naming the folder otherwise."""
    import shutil

    existing = [p for p in folder.glob("*.pt") if p.is_file()]
    newest = max(existing, key=lambda p: p.stat().st_mtime_ns) if existing else None
    needed = int((newest.stat().st_size if newest is not None else first_size) * margin)
    free = shutil.disk_usage(folder).free
    if free >= needed:
        return
    mib = 2**20
    if newest is None:
        raise TrainingError(f"{folder}: not enough disk space for the first checkpoint ({free / mib:.1f} MiB free, "
                            f"about {needed / mib:.1f} MiB needed: the model and optimiser state and a margin)",
                            ["free disk space, or move runs_dir to a larger disk; no checkpoint was written yet, so "
                             f"the run starts again: {Run(folder.parent).start_again_command()}"])
    raise TrainingError(f"{folder}: not enough disk space for the next checkpoint ({free / mib:.1f} MiB free, "
                        f"about {needed / mib:.1f} MiB needed: the size of {newest.name} and a margin)",
                        ["free disk space, or move runs_dir to a larger disk; the previous checkpoints are "
                         f"intact: continue with: sslt train --resume {folder.parent}"])


def checkpoint_step(path: Path) -> int:
    """The step in a ``last-<step>.pt`` name (-1 for another name)."""
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
