"""One process per folder: the lock a run folder and an ablation folder are held by while a process works in them.

The lock is an advisory ``fcntl.flock`` on ``<folder>/.lock``, taken without waiting. The kernel gives it to one
process only, however many start at once, and releases it when that process ends in any way (kill -9 included), so a
lock left by a dead process is taken over with no pid guessing. Once it holds the lock, the process writes who it is
into the file (pid, host, since when, the command) so that a refused process can say who holds the folder. The file
is removed on release; a process that locked a file some other process has just removed sees that its inode is no
longer the folder's lock file and tries again, so two processes never both hold a folder.
"""
from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import platform
import shlex
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from sslt_cli.errors import SsltError

LOCK = ".lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


@dataclass(frozen=True)
class Holder:
    """Who holds a folder: the record a holder writes into its lock file."""

    pid: int
    host: str
    since: str
    command: str

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} since {self.since} ({self.command})"


class FolderBusy(SsltError):
    """The folder is held by another process (``holder``: who, when it could be read)."""

    def __init__(self, message: str, hints: list[str], holder: Holder | None):
        super().__init__(message, hints)
        self.holder = holder


def _this_command() -> str:
    name = Path(sys.argv[0]).name if sys.argv else "sslt"
    args = sys.argv[1:] if name in ("sslt", "__main__.py") else sys.argv
    return shlex.join(["sslt", *args] if name in ("sslt", "__main__.py") else args)


def read_holder(folder: str | Path) -> Holder | None:
    """The holder recorded in ``folder``'s lock file, or None (no file, or a holder still writing its record)."""
    try:
        record = json.loads((Path(folder) / LOCK).read_text())
        return Holder(int(record["pid"]), str(record["host"]), str(record["since"]), str(record["command"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _open_locked(path: Path) -> int | None:
    """A descriptor of ``path`` locked by this process, or None when another process holds it."""
    import fcntl

    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SsltError(f"{path.parent}: cannot write into this folder ({exc.strerror})",
                            ["a process that works in a folder must be able to write into it: check its "
                             "permissions and free space, or that the disk is not mounted read-only"]) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in _NO_LOCKS:
                return fd  # a file system without locks (some FUSE mounts): work unguarded rather than not at all
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder before us removed this file while we waited for it: lock the folder's new one


def _write_record(fd: int, command: str | None) -> None:
    record = {"pid": os.getpid(), "host": platform.node(),
              "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": command or _this_command()}
    data = (json.dumps(record) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


@contextmanager
def hold(folder: str | Path, what: str = "folder", command: str | None = None) -> Iterator[None]:
    """Hold ``folder`` for the block: no other process can hold it meanwhile. ``what`` names it in the message a
    second process gets (``run folder``, ``ablation folder``); ``command``: what this process records as its command
    (default: its own command line). Raises :class:`FolderBusy` naming the holder when another process holds it."""
    folder = Path(folder)
    path = folder / LOCK
    fd = _open_locked(path)
    if fd is None:
        holder = read_holder(folder)
        who = holder.describe() if holder else "another process that is starting"
        raise FolderBusy(f"{folder}: this {what} is in use by {who}",
                         ["one process works in a folder at a time: wait for it to finish or stop it, then run the "
                          "command again"], holder)
    try:
        _write_record(fd, command)
        yield
    finally:
        try:
            path.unlink()  # while still locked: a process waiting on this file then sees it is gone and retries
        except FileNotFoundError:
            pass
        os.close(fd)
