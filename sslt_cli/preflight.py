"""Checks made before any work starts, so a run does not fail (or, worse, succeed on nothing) hours in.

- :func:`check_eval_sets`: the validation set and the test sets a recipe names each hold at least one usable clip;
- :func:`writable_dir`: an output folder can be created and written, or a clear error says which path and why.
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from sslt_cli.errors import DataError, SsltError

if TYPE_CHECKING:  # the CLI imports this module for --help: no pydantic there
    from sslt_cli.config import Recipe

FIRST_REASONS = 5
VGGSS_XML_FORM = ("<annotation><bbox><box><xmin>..</xmin><ymin>..</ymin><xmax>..</xmax><ymax>..</ymax></box>"
                  "</bbox></annotation>, one <box> per box, coordinates in [0, 1]")


def check_eval_sets(recipe: "Recipe", tests: bool = True) -> None:
    """Stop before training when the validation set (``data.val``) or, with ``tests``, a test set (``data.test``)
    has no usable clip: a model selected on nothing, or a run whose final evaluation has nothing to score.

    A usable clip has a readable annotation and its frame and audio; for validation it is also outside
    ``data.holdout_classes``. The DataError gives the counts and the first reasons.
    """
    from sslt_cli.evaluate import load_test_set

    named = [("validation set (data.val)", recipe.data.val)] if recipe.data.val else []
    if tests:
        named += [(f"test set {name!r} (data.test)", path) for name, path in recipe.data.test.items()]
    held = set(recipe.data.holdout_classes or [])
    for role, relative in named:
        test = load_test_set(recipe.data.set_path(relative))
        ready = [cid for cid in test.ids if cid in test.clips and cid in test.annotations]
        if role.startswith("validation"):
            ready = [cid for cid in ready if test.clips[cid].label not in held]
        if ready:
            continue
        reasons = {**test.annotation_problems, **test.unavailable}
        in_held = len(test.ids) - len(reasons)
        raise DataError(
            f"{recipe.data.set_path(relative)}: the {role} has no usable clip: {len(test.ids)} requested, "
            f"{len(test.annotation_problems)} without a usable annotation, {len(test.unavailable)} without frame "
            f"or audio" + (f", {in_held} in data.holdout_classes" if in_held else "") + "; nothing was trained",
            [f"{cid}: {reason}" for cid, reason in list(reasons.items())[:FIRST_REASONS]]
            + ([f"VGG-SS annotations are read in SSL-TIE's form: {VGGSS_XML_FORM}"]
               if test.anno_kind == "vggss" and test.annotation_problems else []))


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
