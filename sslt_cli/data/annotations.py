"""Box annotations in the formats the field uses, read and written faithfully, defects reported.

Two kinds of annotation exist:

* ``vggss``: boxes normalised to [0, 1] on the full frame, ``(xmin, ymin, xmax, ymax)``; several boxes of one clip are
  united into a binary ground truth. Sources: the public ``vggss.json`` (a list of ``{"file", "class", "bbox"}``) or the
  per-clip XML that SSL-TIE's loader reads: ``<annotation><bbox><box><xmin/><ymin/><xmax/><ymax/></box>...</bbox>``
  (root > ``bbox`` > one element per box > four coordinate elements in that order).
* ``flickr``: one box per annotator on a 256 x 256 grid (integers); the ground truth is a consensus map. XML as the
  SSL-TIE and LVS loaders read it: every ``bbox`` element that is a grandchild of the root is one annotator box; its
  first child is skipped and the next four are integer xmin, ymin, xmax, ymax.

Nothing here clips or drops boxes: that is the evaluation protocol's business (see ``metrics``), and what the
protocol does with a defective box is reported there. Parsing only counts defects so the user sees them, including the
VGG-SS clips whose ground truth, built by ``metrics.vggss_gt_map``, is empty once the boxes are clipped to [0, 1].
"""
from __future__ import annotations

import csv
import json
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

from sslt_cli.catalog import names_hint, resolve_data_file
from sslt_cli.errors import DataError
from sslt_cli.runs import atomic_write_text

AnnotationKind = Literal["vggss", "flickr"]
FLICKR_GRID = 256


@dataclass(frozen=True)
class Annotation:
    """The boxes of one clip.

    ``boxes``: tuple of ``(xmin, ymin, xmax, ymax)``; normalised floats for ``vggss``, 256-grid ints for ``flickr``
    (one box per annotator).
    """

    clip_id: str
    kind: AnnotationKind
    boxes: tuple[tuple[float, float, float, float], ...]
    label: str | None = None


@dataclass
class DefectReport:
    """Defects found while parsing annotations, each with the clip id and the offending box."""

    non_finite_or_huge: list[tuple[str, tuple[float, ...]]] = field(default_factory=list)
    degenerate: list[tuple[str, tuple[float, ...]]] = field(default_factory=list)
    out_of_range: list[tuple[str, tuple[float, ...]]] = field(default_factory=list)
    duplicate_ids: list[str] = field(default_factory=list)
    empty_after_clipping: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        """One line per non-empty defect category."""
        lines = []
        if self.non_finite_or_huge:
            lines.append(f"{len(self.non_finite_or_huge)} boxes hold a non-finite or huge coordinate "
                         f"(e.g. {self.non_finite_or_huge[0][0]}: {list(self.non_finite_or_huge[0][1])})")
        if self.degenerate:
            lines.append(f"{len(self.degenerate)} boxes are degenerate (xmax <= xmin or ymax <= ymin), "
                         f"e.g. {self.degenerate[0][0]}: {list(self.degenerate[0][1])}")
        if self.out_of_range:
            lines.append(f"{len(self.out_of_range)} boxes have a finite coordinate outside [0, 1] "
                         f"(e.g. {self.out_of_range[0][0]}: {list(self.out_of_range[0][1])})")
        if self.duplicate_ids:
            lines.append(f"{len(self.duplicate_ids)} clip ids appear more than once (kept the first): "
                         f"{', '.join(self.duplicate_ids[:5])}")
        if self.empty_after_clipping:
            lines.append(f"{len(self.empty_after_clipping)} clips have an empty ground truth once their boxes are "
                         f"clipped to [0, 1]; evaluation excludes them (--empty-gt zero scores them 0, as the "
                         f"official code): "
                         f"{', '.join(self.empty_after_clipping[:5])}")
        return lines

    def restricted_to(self, ids: Iterable[str]) -> DefectReport:
        """The defects of the clips in ``ids`` only (e.g. a published test list out of the whole ``vggss.json``)."""
        keep = set(ids)
        return DefectReport(
            non_finite_or_huge=[d for d in self.non_finite_or_huge if d[0] in keep],
            degenerate=[d for d in self.degenerate if d[0] in keep],
            out_of_range=[d for d in self.out_of_range if d[0] in keep],
            duplicate_ids=[c for c in self.duplicate_ids if c in keep],
            empty_after_clipping=[c for c in self.empty_after_clipping if c in keep],
        )

    def boxes(self) -> list[tuple[str, tuple[float, ...], str]]:
        """Every defective box as (clip id, box, defect kind); kinds: ``non_finite_or_huge``, ``degenerate``,
        ``out_of_range``. A box with two defects (a huge ymax below ymin) appears once for each."""
        return [(cid, box, kind) for kind in ("non_finite_or_huge", "degenerate", "out_of_range")
                for cid, box in getattr(self, kind)]

    def to_dict(self) -> dict:
        return {
            "non_finite_or_huge": [[c, list(b)] for c, b in self.non_finite_or_huge],
            "degenerate": [[c, list(b)] for c, b in self.degenerate],
            "out_of_range": [[c, list(b)] for c, b in self.out_of_range],
            "duplicate_ids": list(self.duplicate_ids),
            "empty_after_clipping": list(self.empty_after_clipping),
        }


HUGE = 1e3  # a normalised coordinate beyond this is a corrupt value (vggss.json holds -2.88e16)


def _check_box(clip_id: str, box: tuple[float, ...], report: DefectReport, normalised: bool) -> None:
    if any((not math.isfinite(v)) or abs(v) > (HUGE if normalised else HUGE * FLICKR_GRID) for v in box):
        report.non_finite_or_huge.append((clip_id, box))
    elif normalised and any(v < 0.0 or v > 1.0 for v in box):
        report.out_of_range.append((clip_id, box))
    if not (box[2] > box[0] and box[3] > box[1]):
        report.degenerate.append((clip_id, box))


def _check_vggss_clip(clip_id: str, boxes: list[tuple[float, ...]], report: DefectReport) -> None:
    """Record ``clip_id`` if its ground truth is empty once its boxes are clipped to [0, 1] (evaluation excludes it by
    default)."""
    from sslt_cli import metrics  # imports torch: only where boxes are checked, so `sslt --help` stays instant

    try:
        empty = not metrics.vggss_gt_map(boxes).any()
    except ValueError:  # a NaN coordinate, already reported as non-finite
        return
    if empty:
        report.empty_after_clipping.append(clip_id)


def load_vggss_json(path: str | Path) -> tuple[dict[str, Annotation], DefectReport]:
    """Parse the public ``vggss.json``: ``{clip id: Annotation}`` (file order kept) and the defects found."""
    path = resolve_data_file(path, "boxes")
    try:
        records = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (expected the VGG-SS box file vggss.json)",
                        [names_hint("boxes")]) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); expected the VGG-SS box file vggss.json") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of {{'file', 'class', 'bbox'}} records, got {type(records).__name__}")
    out: dict[str, Annotation] = {}
    report = DefectReport()
    for index, rec in enumerate(records):
        if not isinstance(rec, dict) or "file" not in rec or "bbox" not in rec:
            raise DataError(f"{path}: record {index} lacks 'file' or 'bbox': {str(rec)[:120]}")
        clip_id = str(rec["file"])
        boxes = []
        for raw in rec["bbox"]:
            if not isinstance(raw, (list, tuple)) or len(raw) != 4:
                raise DataError(f"{path}: clip {clip_id}: a box must be 4 numbers [xmin, ymin, xmax, ymax], got {raw!r}")
            box = tuple(float(v) for v in raw)
            _check_box(clip_id, box, report, normalised=True)
            boxes.append(box)
        if clip_id in out:
            report.duplicate_ids.append(clip_id)
            continue
        _check_vggss_clip(clip_id, boxes, report)
        out[clip_id] = Annotation(clip_id, "vggss", tuple(boxes), rec.get("class"))
    return out, report


def _indent(root: ET.Element) -> str:
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def vggss_xml_text(annotation: Annotation) -> str:
    """The SSL-TIE per-clip XML for a ``vggss`` annotation (coordinates written with ``repr`` so they round-trip)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = annotation.clip_id
    if annotation.label is not None:
        ET.SubElement(root, "class").text = annotation.label
    bbox = ET.SubElement(root, "bbox")
    for box in annotation.boxes:
        b = ET.SubElement(bbox, "box")
        for name, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
            ET.SubElement(b, name).text = repr(float(value))
    return _indent(root)


def flickr_xml_text(annotation: Annotation) -> str:
    """The Flickr-SoundNet-style XML: one ``<object><bbox>`` per annotator, 256-grid integers.

    Every grandchild of the root is a ``bbox`` (the SSL-TIE loader appends an empty box for any other grandchild).
    """
    root = ET.Element("annotation")
    for i, box in enumerate(annotation.boxes):
        obj = ET.SubElement(root, "object")
        b = ET.SubElement(obj, "bbox")
        ET.SubElement(b, "annotator").text = str(i)
        for name, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
            ET.SubElement(b, name).text = str(int(round(value)))
    return _indent(root)


def write_annotation_xml(path: str | Path, annotation: Annotation) -> None:
    """Write one clip's XML atomically, in the format of its kind."""
    text = vggss_xml_text(annotation) if annotation.kind == "vggss" else flickr_xml_text(annotation)
    atomic_write_text(Path(path), text)


def _parse_xml(path: Path) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file missing") from None
    except ET.ParseError as exc:
        raise DataError(f"{path}: not valid XML ({exc})") from None


def read_vggss_xml(path: str | Path, clip_id: str | None = None,
                   report: DefectReport | None = None) -> Annotation:
    """Read a per-clip VGG-SS XML as SSL-TIE does (root > bbox > box > 4 coordinates)."""
    path = Path(path)
    clip_id = clip_id or path.stem
    root = _parse_xml(path)
    label_el = root.find("class")
    boxes = []
    for child in root:
        if child.tag != "bbox":
            continue
        for box_el in child:
            try:
                box = tuple(float(x.text) for x in box_el)
            except (TypeError, ValueError):
                raise DataError(f"{path}: clip {clip_id}: a box holds a non-number") from None
            if not len(box) and (box_el.text or "").strip():
                raise DataError(f"{path}: clip {clip_id}: <{box_el.tag}> holds a coordinate directly under <bbox>; "
                                "SSL-TIE's form puts each box's four coordinates in a <box> element: "
                                "<bbox><box><xmin>..</xmin><ymin>..</ymin><xmax>..</xmax><ymax>..</ymax></box></bbox>")
            if len(box) != 4:
                raise DataError(f"{path}: clip {clip_id}: a box has {len(box)} coordinates, expected 4")
            if report is not None:
                _check_box(clip_id, box, report, normalised=True)
            boxes.append(box)
    if report is not None:
        _check_vggss_clip(clip_id, boxes, report)
    return Annotation(clip_id, "vggss", tuple(boxes), label_el.text if label_el is not None else None)


def read_flickr_xml(path: str | Path, clip_id: str | None = None,
                    report: DefectReport | None = None) -> Annotation:
    """Read a Flickr-SoundNet XML: each root grandchild ``bbox`` is one annotator box (first child skipped)."""
    path = Path(path)
    clip_id = clip_id or path.stem
    root = _parse_xml(path)
    boxes = []
    for child in root:
        for grandchild in child:
            if grandchild.tag != "bbox":
                continue
            values = list(grandchild)[1:5]
            try:
                box = tuple(float(int(float(v.text))) for v in values)
            except (TypeError, ValueError):
                raise DataError(f"{path}: clip {clip_id}: a bbox holds a non-integer coordinate") from None
            if len(box) != 4:
                raise DataError(f"{path}: clip {clip_id}: a bbox has {len(box)} coordinates after its first child, expected 4")
            if report is not None:
                _check_box(clip_id, box, report, normalised=False)
            boxes.append(box)
    return Annotation(clip_id, "flickr", tuple(boxes))


def read_annotation(path: str | Path, kind: AnnotationKind, clip_id: str | None = None,
                    report: DefectReport | None = None) -> Annotation:
    """Read one clip's XML of the given kind."""
    if kind == "vggss":
        return read_vggss_xml(path, clip_id, report)
    if kind == "flickr":
        return read_flickr_xml(path, clip_id, report)
    raise ValueError(f"unknown annotation kind {kind!r}")


def read_id_list(path: str | Path) -> list[str]:
    """Clip ids from a published test list, whatever its form.

    Accepts one id per line (``zpWuikVorYg_000032``), ids with an image suffix (``10000130166.jpg``), CSV rows whose
    first column is the id (``10000130166,202``), and SLAVC-style CSV with a ``video,audio,label`` header. Blank lines
    are ignored; order is kept; duplicates are kept once.
    """
    path = resolve_data_file(path, "list")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a BOM is not part of the first id
    except FileNotFoundError:
        raise DataError(f"{path}: test list not found", [names_hint("list")]) from None
    ids: list[str] = []
    seen = set()
    for n, line in enumerate(lines):
        line = line.strip()
        if not line:
            continue
        first = line.split(",")[0].strip()
        if n == 0 and first.lower() in {"video", "id", "file", "ytid", "clip_id"}:
            continue
        for suffix in (".jpg", ".png", ".wav", ".mp4", ".mp3"):
            if first.endswith(suffix):
                first = first[: -len(suffix)]
        if first not in seen:
            seen.add(first)
            ids.append(first)
    return ids


def write_annotations(directory: str | Path, annotations: Iterable[Annotation]) -> int:
    """Write every annotation as ``<directory>/<clip id>.xml``; returns the count."""
    directory = Path(directory)
    n = 0
    for ann in annotations:
        write_annotation_xml(directory / f"{ann.clip_id}.xml", ann)
        n += 1
    return n


def annotations_to_vggss_json(annotations: Iterable[Annotation]) -> list[dict]:
    """The ``vggss.json`` records for ``vggss`` annotations (the inverse of :func:`load_vggss_json`)."""
    return [{"file": a.clip_id, "class": a.label, "bbox": [list(b) for b in a.boxes]} for a in annotations]


# ---------------------------------------------------------------------------------------------------------------------
# Clip ids and class labels

# YouTube ids are 11 characters of [A-Za-z0-9_-], so an id may itself contain '_' or start with '-'.
_CLIP_NAME = re.compile(r"^(?P<ytid>[A-Za-z0-9_-]{11})_(?P<start>\d+)(?:_(?P<end>\d+))?$")
_HEADER_WORDS = {"id", "clip", "clip_id", "file", "video", "audio", "ytid", "youtube_id", "start", "start_seconds",
                 "label", "class", "split"}


def clip_id_from_name(stem: str) -> str | None:
    """The VGGSound id ``<ytid>_<start, 6 digits>`` of a file stem, or None if the stem is not a clip name.

    Accepts ``<ytid>_<start>`` and ``<ytid>_<start>_<end>`` (some mirrors), start and end in whole seconds:
    ``__2MwJ2uHu0_4`` and ``__2MwJ2uHu0_000004_000014`` both give ``__2MwJ2uHu0_000004``.
    """
    match = _CLIP_NAME.match(stem)
    if match is None:
        return None
    return f"{match['ytid']}_{int(match['start']):06d}"


def read_labels(path: str | Path) -> dict[str, str]:
    """Clip labels from a file: ``{clip id: class}``. The one label reader of sslt (prepare, training, retrieval).

    Formats: VGGSound's CSV ``ytid,start,label,split`` or ``ytid,start,label`` (id ``<ytid>_<start:06d>``; a label
    holding commas is quoted, as in the real file, or spans the fields between start and split), a two-column
    ``id,label`` CSV (as ACL-SSL's VGG-SS list; clip-file names such as ``<ytid>_<start>_<end>`` are normalised to the
    id), or the VGG-SS JSON (``{"file", "class", "bbox"}`` records). A header row (``ytid,start,label,split``,
    ``id,label``, ...) is skipped; so are blank lines and lines starting with ``#``; a row with an empty label gives
    no label. One id with two different labels is an error.
    """
    path = resolve_data_file(path, "labels")
    if not path.is_file():
        raise DataError(f"{path}: no such label file; pass --labels with VGGSound's vggsound.csv "
                        "(ytid,start,label,split), an id,label CSV or vggss.json", [names_hint("labels")])
    if path.suffix.lower() == ".json":
        annotations, _ = load_vggss_json(path)
        return {clip_id: a.label for clip_id, a in annotations.items() if a.label}
    labels: dict[str, str] = {}
    conflicts: list[str] = []
    first_row = True
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            for row in reader:
                if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                    continue
                fields = [x.strip() for x in row]
                is_header = first_row and all(x.lower() in _HEADER_WORDS for x in fields if x)
                first_row = False
                if is_header:
                    continue
                if len(fields) >= 3 and re.fullmatch(r"\d+", fields[1]):
                    clip_id = f"{fields[0]}_{int(fields[1]):06d}"
                    label = fields[2] if len(fields) <= 4 else ", ".join(fields[2:-1])
                elif len(fields) == 2:
                    clip_id, label = clip_id_from_name(fields[0]) or fields[0], fields[1]
                else:
                    raise DataError(f"{path}, line {reader.line_num}: cannot read {','.join(row)[:120]!r}; expected "
                                    "VGGSound's ytid,start,label,split (start an integer) or id,label")
                if not label:
                    continue
                if labels.setdefault(clip_id, label) != label:
                    conflicts.append(f"{clip_id}: {labels[clip_id]!r} and {label!r}")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); expected a CSV label file") \
            from None
    if conflicts:
        raise DataError(f"{path}: {len(conflicts)} clip id(s) have two different labels; fix the file",
                        conflicts[:5])
    if not labels:
        raise DataError(f"{path}: no labelled rows; expected VGGSound's ytid,start,label,split or id,label")
    return labels
