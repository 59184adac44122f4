"""Test sets: a prepared ``vggss_test`` / ``flickr_test`` folder or the public ``vggss.json`` (optionally a published
id list and a media folder), every listed clip whose annotation, frame or audio cannot be used reported; SLAVC's
non-sounding pair lists."""
from __future__ import annotations

import csv
import io
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sslt_cli.catalog import names_hint, resolve_data_file
from sslt_cli.data.annotations import Annotation, DefectReport, load_vggss_json, read_annotation, read_id_list
from sslt_cli.data.manifest import Clip, layout_paths, read_set
from sslt_cli.data.negatives import read_scene_images, read_scenes, scenes_file
from sslt_cli.errors import DataError


@dataclass
class TestSet:
    """Clips to evaluate: requested ids, their annotations and media, and why any of them cannot be used.

    ``unavailable``: id -> why its frame or audio cannot be used (matters for the model path only);
    ``annotation_problems``: id -> why it has no usable annotation; ``clips``: ids with frame and audio paths;
    ``defects``: the defective boxes of the requested clips (:func:`write_outputs` lists them in ``defects.csv``).
    """

    __test__ = False  # not a pytest test class despite the name

    name: str
    anno_kind: str
    ids: list[str]
    annotations: dict[str, Annotation]
    clips: dict[str, Clip] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    annotation_problems: dict[str, str] = field(default_factory=dict)
    defects: DefectReport = field(default_factory=DefectReport)
    notes: list[str] = field(default_factory=list)
    scenes: dict[str, frozenset[str]] = field(default_factory=dict)  # on-screen classes (scenes.csv), if known
    images: dict[str, str] = field(default_factory=dict)  # the image each sample shows (scenes.csv; IS3's pairs)

    @property
    def frames(self) -> dict[str, str]:
        """id -> frame path of every clip whose media are available."""
        return {cid: clip.frame for cid, clip in self.clips.items() if clip.frame}


def _media_problem(clip: Clip) -> str | None:
    if not clip.frame or not os.path.isfile(clip.frame):
        return f"frame file missing: {clip.frame or '(no path in the manifest)'}"
    if not clip.audio or not os.path.isfile(clip.audio):
        return f"audio file missing: {clip.audio or '(no path in the manifest)'}"
    return None


def load_test_set(root: str | Path, list_path: str | Path | None = None) -> TestSet:
    """A prepared test set folder (layout ``vggss_test`` or ``flickr_test``), optionally restricted to an id list.

    Without a list every manifest row is requested, the rows ``prepare`` could not use included (they are reported
    with their manifest reason). Annotations are read from each clip's XML; frames and audio are checked on disk.
    """
    clip_set = read_set(root)
    if clip_set.anno_kind not in ("vggss", "flickr"):
        raise DataError(f"{clip_set.root}: layout {clip_set.layout!r} has no box annotations; evaluate on a "
                        f"vggss_test or flickr_test set")
    usable = {c.id: c for c in clip_set.clips}
    unusable = {c.id: c for c in clip_set.unusable}
    ids = read_id_list(list_path) if list_path else list(usable) + [i for i in unusable if i not in usable]
    test = TestSet(name=clip_set.name, anno_kind=clip_set.anno_kind, ids=ids, annotations={})
    report = DefectReport()
    for cid in ids:
        clip = usable.get(cid)
        if clip is None:
            bad = unusable.get(cid)
            reason = (f"{bad.status}: {bad.reason}" if bad is not None
                      else f"not in {clip_set.root / 'manifest.csv'}")
            test.unavailable[cid] = reason
            test.annotation_problems[cid] = reason
            continue
        if not clip.anno or not os.path.isfile(clip.anno):
            test.annotation_problems[cid] = f"annotation file missing: {clip.anno or '(no path in the manifest)'}"
        else:
            try:
                test.annotations[cid] = read_annotation(clip.anno, clip_set.anno_kind, cid, report)
            except DataError as exc:
                test.annotation_problems[cid] = f"annotation unreadable: {exc.message}"
        problem = _media_problem(clip)
        if problem:
            test.unavailable[cid] = problem
        else:
            test.clips[cid] = clip
    test.defects = report
    test.notes += report.summary()
    scenes = scenes_file(clip_set.root)
    if scenes is not None:
        wanted = set(ids)
        test.scenes = {cid: s for cid, s in read_scenes(scenes).items() if cid in wanted}
        test.images = {cid: s for cid, s in read_scene_images(scenes).items() if cid in wanted}
    return test


def load_vggss_json_set(json_path: str | Path, list_path: str | Path | None = None,
                        media_root: str | Path | None = None) -> TestSet:
    """VGG-SS boxes from the public ``vggss.json``; the ids of ``list_path`` (default: every clip in the file).

    ``media_root``, when given, is a folder in the ``vggss_test`` layout (``frame/<id>.jpg``, ``audio/<id>.wav``);
    clips missing either are reported. The defects (huge or degenerate boxes) of the requested clips are kept in
    ``defects`` and summarised in ``notes``, with the whole file's counts beside them when the list leaves some out.
    """
    json_path = resolve_data_file(json_path, "boxes")  # notes name the file, also when given a built-in name
    annotations, report = load_vggss_json(json_path)
    ids = read_id_list(list_path) if list_path else list(annotations)
    test = TestSet(name=Path(list_path).stem if list_path else json_path.stem, anno_kind="vggss", ids=ids,
                   annotations={cid: annotations[cid] for cid in ids if cid in annotations})
    for cid in ids:
        if cid not in annotations:
            test.annotation_problems[cid] = f"not in {json_path}"
    if media_root is not None:
        root = Path(media_root).expanduser()
        for cid in ids:
            frame, audio, _ = layout_paths("vggss_test", cid)
            clip = Clip(id=cid, frame=str(root / frame), audio=str(root / audio))
            problem = _media_problem(clip)
            if problem:
                test.unavailable[cid] = problem
            else:
                test.clips[cid] = clip
    test.defects = report.restricted_to(ids)
    test.notes += [f"{json_path.name}, in the {len(ids)} requested clips: {line}" for line in test.defects.summary()]
    if len(test.defects.boxes()) != len(report.boxes()):
        test.notes.append(f"{json_path.name} as a whole ({len(annotations)} clips): {_defect_counts(report)}; "
                          f"in the {len(ids)} requested clips: {_defect_counts(test.defects)}")
    return test


DEFECT_LABELS = {"non_finite_or_huge": "boxes with a non-finite or huge coordinate", "degenerate": "degenerate boxes",
                 "out_of_range": "boxes with a coordinate outside [0, 1]"}


def _defect_counts(report: DefectReport) -> str:
    """The box defects by kind, e.g. ``12 boxes with a non-finite or huge coordinate, 18 degenerate boxes``."""
    counts = Counter(kind for _, _, kind in report.boxes())
    return ", ".join(f"{counts[kind]} {label}" for kind, label in DEFECT_LABELS.items() if counts[kind]) or "none"



def silent_pair_key(video: str, audio: str) -> str:
    """The map key of a non-sounding pair (frame of ``video`` with audio of ``audio``): ``<video>+<audio>``."""
    return f"{video}+{audio}"


def read_silent_pairs(path: str | Path) -> list[tuple[str, str]]:
    """The non-sounding pairs of a SLAVC ``*_plus_silent.csv`` (``video,audio,label`` rows, label ``non-sounding``)."""
    path = resolve_data_file(path, "pairs")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: non-sounding pairs list not found", [names_hint("pairs")]) from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or [c.strip().lower() for c in rows[0][:3]] != ["video", "audio", "label"]:
        raise DataError(f"{path}: expected a 'video,audio,label' header (SLAVC's *_plus_silent.csv), "
                        f"got {','.join(rows[0]) if rows else 'an empty file'}")
    pairs = []
    for number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) < 3:
            raise DataError(f"{path}: line {number}: expected video,audio,label, got {','.join(row)}")
        if row[2].strip() == "non-sounding":
            pairs.append((row[0].strip(), row[1].strip()))
    return pairs
