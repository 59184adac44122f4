"""IS3 (Interactive Synthetic Sound Source; kaistmm/SSLalignment): 3240 two-object images, one sample per object,
read from its released layout into a prepared set (``sslt prepare is3``).

The released layout, as SSLalignment's README and vssl_eval's loader describe it::

    IS3/images/<a>_<b>_<n>_<obj>.jpg         one copy of the image per annotated object
    IS3/audio_wav/<a>_<b>_<n>_<obj>.wav      the sound of that object
    IS3/IS3_annotation.json                  a list of {"image", "audio", box, category} records, one per sample
    IS3/gt_segmentation/<a>_<b>_<n>_<obj>.png  a binary mask of the object

The box is ``[x1, y1, x2, y2]`` in pixels of the 224 x 224 frame (key ``gt_box``, as SSLalignment's
``synthetic3240_bbox.json``, or ``bbox``); the category key is ``category``, ``class`` or ``label``. Only the
image's and audio's file names are used (the records' folders are the authors' machines).

The prepared set (layout ``is3``, written into ``--out``, default the IS3 folder itself) reads the media where they
are and holds, per sample: ``anno/<id>.xml``, the ground truth as VGG-SS boxes normalised so that ``int(v * 224)``
gives back each pixel coordinate (``--gt boxes``), or the mask, resized to 224 x 224 (nearest) and made binary
(> 0, as vssl_eval and SSLalignment binarise), written as the union of its one-pixel-high runs (``--gt masks``):
the same 224 x 224 ground truth either way under every protocol that does not clip or rescale boxes; the manifest
label is the object's category; ``scenes.csv`` gives each sample's on-screen classes (both objects: off-screen audio
excludes both) and its image (the two samples of one image are one interactive pair: IIoU / IAUC).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np

from sslt_cli.data.annotations import Annotation, write_annotation_xml
from sslt_cli.data.manifest import Clip, write_set
from sslt_cli.data.negatives import SCENES, write_scenes
from sslt_cli.errors import DataError

ANNOTATION_FILES = ("IS3_annotation.json", "synthetic3240_bbox.json")
SIZE = 224
BOX_KEYS = ("gt_box", "bbox", "box")
CATEGORY_KEYS = ("category", "class", "label")


def pixel_to_normalised(x: int, size: int = SIZE) -> float:
    """The normalised coordinate v nearest x / size with ``int(v * size) == x`` (x / size alone gives x - 1 for some
    x: 61 / 224 * 224 = 60.99999...)."""
    v = x / size
    while int(v * size) < x:
        v = float(np.nextafter(v, 2.0))
    return v


def mask_runs(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """A binary (H, W) mask as the union of its one-pixel-high runs: [(x0, y, x1, y + 1)] in pixels (exclusive ends)."""
    runs = []
    for y, row in enumerate(np.asarray(mask, bool)):
        padded = np.concatenate([[False], row, [False]])
        edges = np.flatnonzero(padded[1:] != padded[:-1])
        runs += [(int(x0), y, int(x1), y + 1) for x0, x1 in zip(edges[::2], edges[1::2])]
    return runs


def read_mask(path: Path, size: int = SIZE) -> np.ndarray:
    """A segmentation mask resized to (size, size) with nearest neighbours, > 0 -> (size, size) bool."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            grey = image.convert("L").resize((size, size), Image.NEAREST)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: not a readable mask image ({exc})") from None
    return np.asarray(grey) > 0


def _first(record: dict[str, Any], keys: tuple[str, ...], where: str) -> Any:
    for key in keys:
        if key in record:
            return record[key]
    raise DataError(f"{where}: a record has none of the keys {', '.join(keys)} (it has {', '.join(record)})")


def read_records(root: Path) -> tuple[Path, list[dict[str, Any]]]:
    """(the annotation file, its records as {id, image, audio, box, category}) of an IS3 folder."""
    path = next((root / name for name in ANNOTATION_FILES if (root / name).is_file()), None)
    if path is None:
        raise DataError(f"{root}: no {' or '.join(ANNOTATION_FILES)} here; expected IS3's released layout "
                        f"(images/, audio_wav/, IS3_annotation.json, gt_segmentation/)")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable JSON list ({exc})") from None
    if isinstance(data, dict):
        data = [{"image": name, **value} for name, value in data.items()]
    records = []
    for record in data:
        image = Path(str(_first(record, ("image",), str(path)))).name
        box = [int(round(float(v))) for v in _first(record, BOX_KEYS, str(path))]
        if len(box) != 4:
            raise DataError(f"{path}: {image}: a box needs 4 pixel coordinates, got {box}")
        records.append({"id": Path(image).stem, "image": image,
                        "audio": Path(str(record.get("audio") or Path(image).stem + ".wav")).name,
                        "box": box, "category": str(_first(record, CATEGORY_KEYS, str(path)))})
    return path, records


def _scene_of(record: dict[str, Any]) -> str:
    """The image a sample belongs to: its id without the trailing ``_<category>``."""
    suffix = "_" + record["category"]
    return record["id"][: -len(suffix)] if record["id"].endswith(suffix) else record["id"].rsplit("_", 1)[0]


def prepare_is3(root: Path, out: Path | None = None, gt: Literal["boxes", "masks"] = "boxes"):
    """Read an IS3 folder into a prepared set at ``out`` (default: ``root``) -> :class:`PrepareResult`.

    A sample whose image or audio file is missing (or, with ``--gt masks``, whose mask is missing or unreadable) is
    listed with its reason, never used.
    """
    from sslt_cli.data.prepare import PrepareResult

    root, out = Path(root).expanduser(), Path(out or root).expanduser()
    if gt not in ("boxes", "masks"):
        raise DataError(f"--gt must be boxes or masks, got {gt!r}")
    source, records = read_records(root)
    scenes: dict[str, list[str]] = {}
    for record in records:
        scenes.setdefault(_scene_of(record), []).append(record["category"])
    rows, scene_rows = [], {}
    for record in records:
        clip, problem = _sample(root, out, record, gt)
        rows.append(clip)
        if problem is None:
            scene_rows[record["id"]] = (scenes[_scene_of(record)], _scene_of(record))
    counts = Counter(row.status for row in rows)
    manifest = write_set(out, "is3", rows, {"source": f"is3 ({source.name})", "gt": gt,
                                            "counts": dict(sorted(counts.items()))})
    write_scenes(out / SCENES, {cid: classes for cid, (classes, _) in scene_rows.items()},
                 images={cid: scene for cid, (_, scene) in scene_rows.items()})
    return PrepareResult(out=out, layout="is3", manifest=manifest, requested=len(records), prepared=0,
                         already_done=counts["ok"], missing=counts["missing"],
                         failed={k: v for k, v in counts.items() if k not in ("ok", "missing")},
                         notes=tuple(f"incomplete sample {r.id}: {r.status}: {r.reason}" for r in rows
                                     if r.status != "ok"))


def _media_problem(frame: Path, audio: Path) -> str | None:
    """Why a sample's image or audio header does not read, else None."""
    import soundfile
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(frame) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        return f"{frame}: not a readable image ({exc})"
    try:
        if soundfile.info(str(audio)).frames == 0:
            return f"{audio}: holds no samples"
    except RuntimeError as exc:
        return f"{audio}: not a readable audio file ({' '.join(str(exc).split())})"
    return None


def _sample(root: Path, out: Path, record: dict[str, Any], gt: str) -> tuple[Clip, str | None]:
    """One sample's manifest row (and its annotation written), or the row saying why it cannot be used."""
    cid = record["id"]
    frame, audio = root / "images" / record["image"], root / "audio_wav" / record["audio"]
    absent = [str(p) for p in (frame, audio) if not p.is_file()]
    if gt == "masks" and not (root / "gt_segmentation" / f"{cid}.png").is_file():
        absent.append(str(root / "gt_segmentation" / f"{cid}.png"))
    if absent:
        reason = "no file " + ", ".join(absent)
        return Clip(cid, record["category"], status="missing", reason=reason), reason
    unreadable = _media_problem(frame, audio)
    if unreadable:
        return Clip(cid, record["category"], status="decode error", reason=unreadable), unreadable
    try:
        pixels = (mask_runs(read_mask(root / "gt_segmentation" / f"{cid}.png")) if gt == "masks"
                  else [tuple(record["box"])])
    except DataError as exc:
        return Clip(cid, record["category"], status="decode error", reason=exc.message), exc.message
    boxes = tuple(tuple(pixel_to_normalised(min(max(v, 0), SIZE)) for v in box) for box in pixels)
    write_annotation_xml(out / "anno" / f"{cid}.xml", Annotation(cid, "vggss", boxes, record["category"]))

    def where(path: Path) -> str:
        return str(path.relative_to(out)) if path.is_relative_to(out) else str(path.resolve())

    return Clip(cid, record["category"], where(frame), where(audio), f"anno/{cid}.xml"), None
