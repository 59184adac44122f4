"""Checks made before any work starts, so a run does not fail (or, worse, succeed on nothing) hours in.

- :func:`writable_dir`: an output folder can be created and written, or a clear error says which path and why;
- :func:`readable_file`: an input file (or a built-in name of its kind) is a file that can be read, not a folder.

Both try the operation itself (write a temporary file, open for reading) rather than read permission bits, so they
hold for any user (root ignores the bits), on read-only and immutable file systems alike.
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from sslt_cli.catalog import resolve_data_file
from sslt_cli.errors import SsltError

_CAUSES = {errno.EACCES: "permission denied", errno.EPERM: "not permitted", errno.EROFS: "read-only file system",
           errno.ENOSPC: "the disk is full"}


def _cause(exc: OSError) -> str:
    return _CAUSES.get(exc.errno or 0, os.strerror(exc.errno or 0) or str(exc))


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
        raise SsltError(f"{what} {path}: cannot write there ({_cause(exc)})",
                        ([why] if why else []) + [f"choose another {what}, or make {path} writable"]) from None
    return path


def readable_file(path: str | Path, what: str, kind: str | None = None) -> Path:
    """The file ``path`` names, checked before any work: with ``kind`` (``list``, ``boxes``, ``labels``, ``pairs``)
    a built-in name of that kind counts (:func:`catalog.resolve_data_file`). A folder, or a file that cannot be
    opened for reading, is an SsltError naming ``what`` (e.g. ``--list``) and the path; a path that does not exist is
    returned as it is, for its reader to name with the built-in names it could have been."""
    resolved = resolve_data_file(path, kind) if kind else Path(path).expanduser()
    if resolved.is_dir():
        raise SsltError(f"{what} {path}: is a folder, not a file", [f"give {what} a file"
                                                                    + (" (or a built-in name: sslt data list)"
                                                                       if kind else "")])
    if not resolved.exists():
        return resolved
    try:
        os.close(os.open(resolved, os.O_RDONLY))
    except OSError as exc:
        raise SsltError(f"{what} {path}: cannot read it ({_cause(exc)})",
                        [f"make {resolved} readable, or give {what} another file"]) from None
    return resolved
