"""Prepared data sets: one folder per set, described by ``set.json`` and listed by ``manifest.csv``.

``prepare`` writes them; ``train``, ``eval`` and ``retrieve`` read them and never crawl folders.

A set folder holds files in one of the real layouts (REFERENCE.md section 4), relative to the folder:

=================  ===========================================  ==================================  ==================
layout             frame                                        audio                               anno
=================  ===========================================  ==================================  ==================
vggsound_train     ``total_video_frames/<id>/125.jpg``          ``total_video_3s_audio/<id>.wav``   (none)
vggss_test         ``frame/<id>.jpg``                           ``audio/<id>.wav`` (10 s)           ``anno/<id>.xml``
flickr_test        ``frame/<id>.jpg``                           ``audio/<id>.wav``                  ``anno/<id>.xml``
flickr_train       ``frames/<id>/00000003.jpg``                 ``audio/<id>.wav``                  (none)
is3                ``images/<id>.jpg``                          ``audio_wav/<id>.wav``              ``anno/<id>.xml``
=================  ===========================================  ==================================  ==================

``manifest.csv`` columns: ``id,label,frame,audio,anno,status,reason``. ``status`` is ``ok`` for a usable clip; any
other status (``missing``, ``no audio stream``, ``too short``, ``corrupt``, ``decode error``, ...) marks a clip that
was requested but could not be prepared, with ``reason`` saying why: such rows are counted and reported, never used.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from sslt_cli.errors import DataError
from sslt_cli.runs import atomic_write_bytes

MANIFEST = "manifest.csv"
SET_INFO = "set.json"
COLUMNS = ("id", "label", "frame", "audio", "anno", "status", "reason")
LAYOUTS = {
    "vggsound_train": ("total_video_frames/{id}/125.jpg", "total_video_3s_audio/{id}.wav", None, None),
    "vggss_test": ("frame/{id}.jpg", "audio/{id}.wav", "anno/{id}.xml", "vggss"),
    "flickr_test": ("frame/{id}.jpg", "audio/{id}.wav", "anno/{id}.xml", "flickr"),
    "flickr_train": ("frames/{id}/00000003.jpg", "audio/{id}.wav", None, None),
    "is3": ("images/{id}.jpg", "audio_wav/{id}.wav", "anno/{id}.xml", "vggss"),
}


@dataclass(frozen=True)
class Clip:
    """One manifest row; paths are absolute once read through :func:`read_set`."""

    id: str
    label: str = ""
    frame: str = ""
    audio: str = ""
    anno: str = ""
    status: str = "ok"
    reason: str = ""


@dataclass
class ClipSet:
    """A prepared set: its folder, layout, annotation kind, usable clips and the rows that were not usable."""

    root: Path
    layout: str
    anno_kind: str | None
    clips: list[Clip]
    unusable: list[Clip] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.root.name


def layout_paths(layout: str, clip_id: str) -> tuple[str, str, str]:
    """Relative (frame, audio, anno) paths of ``clip_id`` in ``layout`` (anno is '' where the layout has none)."""
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    frame, audio, anno, _ = LAYOUTS[layout]
    return frame.format(id=clip_id), audio.format(id=clip_id), (anno.format(id=clip_id) if anno else "")


def write_set(root: str | Path, layout: str, clips: Iterable[Clip], info: dict | None = None) -> Path:
    """Write ``set.json`` and ``manifest.csv`` (relative paths, rows in the given order) atomically."""
    root = Path(root)
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for c in clips:
        writer.writerow([c.id, c.label, c.frame, c.audio, c.anno, c.status, c.reason])
    meta = {"format": "sslt-set/1", "layout": layout, "anno_kind": LAYOUTS[layout][3], **(info or {})}
    atomic_write_bytes(root / SET_INFO, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    atomic_write_bytes(root / MANIFEST, buf.getvalue().encode())
    return root / MANIFEST


def read_set(root: str | Path) -> ClipSet:
    """Read a prepared set; paths in the returned clips are absolute."""
    root = Path(root).expanduser()
    if not (root / MANIFEST).is_file():
        hint = ("run `sslt prepare synthetic --out DIR` for the embedded benchmark, `sslt prepare vggsound` / "
                "`sslt prepare flickr` for real data, or `sslt prepare index` for a folder laid out by other tools")
        if not root.exists():
            raise DataError(f"{root}: no such data folder; {hint}")
        raise DataError(f"{root}: no {MANIFEST} here; {hint}")
    info: dict = {}
    if (root / SET_INFO).is_file():
        try:
            info = json.loads((root / SET_INFO).read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{root / SET_INFO}: not valid JSON ({exc})") from None
    layout = info.get("layout", "")
    if layout not in LAYOUTS:
        raise DataError(f"{root / SET_INFO}: layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    with open(root / MANIFEST, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("id", "frame", "audio") if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{root / MANIFEST}: missing column(s) {', '.join(missing)}; expected {','.join(COLUMNS)}")
        clips, unusable = [], []
        for row in reader:
            def absolute(rel: str | None) -> str:
                return str(root / rel) if rel else ""
            clip = Clip(
                id=row["id"], label=row.get("label") or "", frame=absolute(row.get("frame")),
                audio=absolute(row.get("audio")), anno=absolute(row.get("anno")),
                status=row.get("status") or "ok", reason=row.get("reason") or "",
            )
            (clips if clip.status == "ok" else unusable).append(clip)
    return ClipSet(root=root, layout=layout, anno_kind=info.get("anno_kind"), clips=clips, unusable=unusable, info=info)
