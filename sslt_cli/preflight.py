"""Checks made before any work starts, so a run does not fail (or, worse, succeed on nothing) hours in.

- :func:`writable_dir`: an output folder can be created and written, or a clear error says which path and why.
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from sslt_cli.errors import SsltError


def writable_dir(path: str | Path, what: str, why: str | None = None) -> Path:
    """Create folder ``path`` (and its parents) if needed and check that a file can be written in it; an SsltError
    naming the path, ``what`` it is (e.g. ``runs_dir``, ``--out``), ``why`` it must be writable, if given, and the
    cause otherwise."""
    path = Path(path)
    blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise SsltError(f"{what} {path}: {blocker} is a file, not a folder", [f"choose another {what}, or move the "
                                                                             "file away"])
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        cause = {errno.EACCES: "permission denied", errno.EPERM: "not permitted", errno.EROFS: "read-only file system",
               errno.ENOSPC: "the disk is full"}.get(exc.errno or 0, os.strerror(exc.errno or 0) or str(exc))
        raise SsltError(f"{what} {path}: cannot write there ({cause})",
                        ([why] if why else []) + [f"choose another {what}, or make {path} writable"]) from None
    return path
