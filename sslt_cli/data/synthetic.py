"""The embedded synthetic benchmark: scenes of coloured, textured shapes where exactly one category sounds.

Nobody can download VGGSound inside sslt's own tests and quickstart, so ``generate`` writes a benchmark in the exact
real layouts (``docs/architecture.md``, "Data contract") on which SSL-TIE has something real to learn:

* 10 categories, each a look (shape, hue, texture) paired with a sound (pitch, timbre, rhythm or noise band).
* Every scene holds objects of 2-3 different categories on a textured background; exactly one category sounds and
  is the clip's label; about 10% of scenes show two instances of it (two boxes, as in VGG-SS).
* Sounding objects and distractors share one size distribution (the union-box area follows VGG-SS's quantiles), one
  colour saturation and one drawing rule (larger objects behind smaller ones), so neither saliency nor a centre prior
  finds the sounding object: only the audio-visual correspondence does.

Every clip draws from its own RNG seeded by ``(seed, split, index)``, so the files are byte-identical whatever the
number of workers, and a longer set starts with the clips of a shorter one.
"""
from __future__ import annotations

import colorsys
import csv
import io
import json
import math
import multiprocessing
import os
import string
import tempfile
import time
import wave
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from sslt_cli.data.difficulty import Difficulty, from_params
from sslt_cli.data.annotations import (FLICKR_GRID, Annotation, annotations_to_vggss_json, flickr_xml_text,
                                      vggss_xml_text)
from sslt_cli.data.negatives import SCENES
from sslt_cli.data.manifest import MANIFEST, SET_INFO, Clip, atomic_write_bytes, layout_paths, read_set, write_set
from sslt_cli.data.workers import die_with_parent
from sslt_cli.errors import DataError

if TYPE_CHECKING:
    from rich.progress import Progress

# Bump whenever the generator's output changes: a finished folder is trusted as-is when its benchmark.json matches.
FORMAT = "sslt-synthetic/1"


@dataclass(frozen=True)
class _Category:
    name: str
    shape: str
    hue: float  # degrees; every category has its own hue, 36 degrees apart
    texture: str
    sound: str  # what the synthesiser plays, for benchmark.json and the reader


_CATEGORIES = (
    _Category("whistle blowing", "circle", 0.0, "solid", "steady 2.5 kHz tone with a 6 Hz vibrato"),
    _Category("bell ringing", "triangle", 36.0, "stripes_h", "inharmonic 520 Hz partials struck once a second"),
    _Category("drum beating", "square", 72.0, "checker", "low thumps (60-140 Hz) with a noise burst, 3.3 per second"),
    _Category("siren wailing", "ring", 108.0, "solid", "tone sweeping 550-1150 Hz, 0.7 sweeps per second"),
    _Category("engine idling", "hexagon", 144.0, "dots", "70 Hz buzz rich in harmonics, 13 Hz rumble"),
    _Category("bird chirping", "star", 180.0, "solid", "70 ms chirps rising 3.2-4.8 kHz, 6 per second"),
    _Category("horn honking", "diamond", 216.0, "stripes_d", "350 Hz square-like tone, on 0.66 s of every 1.1 s"),
    _Category("rain falling", "cross", 252.0, "dots", "steady noise in the 4.5-7 kHz band"),
    _Category("clock ticking", "hourglass", 288.0, "stripes_v", "short 2-4 kHz clicks, tick-tock twice a second"),
    _Category("organ playing", "arrow", 324.0, "checker", "G major chord (196/247/294 Hz) with a slow tremolo"),
)
CLASSES: tuple[str, ...] = tuple(c.name for c in _CATEGORIES)

# Union-box area (fraction of the frame) of the real VGG-SS boxes at these quantiles; the ends extrapolate them.
_AREA_QUANTILES = ((0.0, 0.01), (0.05, 0.03), (0.25, 0.12), (0.5, 0.25), (0.75, 0.46), (0.95, 0.78), (1.0, 0.95))
_ASPECT_RANGE = (0.625, 1.6)  # box width / height, log-uniform
_TWO_INSTANCE_PROB = 0.1
_MIN_VISIBLE = 0.6  # fraction of every object's shape left uncovered by the objects drawn over it
_PLACEMENT_TRIES = 25
_JPEG_QUALITY = 90
_FLICKR_JITTER = 3  # annotator disagreement, 256-grid pixels
_AUDIO_SECONDS = {"train": 3, "val": 10, "test_vggss": 10, "test_flickr": 10}
_SETS = (  # name, layout, stream code of its RNG, two instances allowed
    ("train", "vggsound_train", 0, True),
    ("val", "vggss_test", 1, True),
    ("test_vggss", "vggss_test", 2, True),
    ("test_flickr", "flickr_test", 3, False),  # Flickr-SoundNet: 3 annotators box one source
)
_ID_ALPHABET = string.ascii_letters + string.digits + "_-"
# Extra SeedSequence words that keep id and label draws apart from the clip's own [seed, stream, index]; non-zero
# because SeedSequence pads short entropy with zeros, so a trailing 0 would not tell two sequences apart.
_ID_STREAM, _LABEL_STREAM = 1, 2
_MOVING_STREAM = 10  # RNG stream of moving_clip's scenes, apart from every set's (0-3)
# The difficulty knobs draw from their own RNGs (SeedSequence word 3), so the easy benchmark's draws are untouched
# and one knob changed on its own leaves the rest of every scene as it was.
_KNOB_STREAM = 3
_CAMERA_KEEP = 0.5  # share of the sounding boxes' area a camera crop must keep in the frame
_CAMERA_TRIES = 20
_MOVING_MAX_SIDE = 0.4


# ------------------------------------------------------------------------------------------------------ scene specs

@dataclass(frozen=True)
class _Object:
    category: int
    box: tuple[float, float, float, float]  # normalised xmin, ymin, xmax, ymax, in scene coordinates
    sounding: bool
    shape: str = ""  # drawn in this shape instead of its category's (a same-shape distractor)

    @property
    def drawn_shape(self) -> str:
        return self.shape or _CATEGORIES[self.category].shape


@dataclass(frozen=True)
class _Scene:
    label: int
    objects: tuple[_Object, ...]  # in drawing order, back to front
    camera: tuple[float, float, float] | None = None  # zoom, window's left and top in scene coordinates
    offscreen: int | None = None  # category of the off-screen second sound

    def frame_box(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """A scene box in the frame's normalised coordinates, clipped to the frame (empty when cut out)."""
        if self.camera is None:
            return box
        zoom, left, top = self.camera
        x0, x1 = (min(max((v - left) * zoom, 0.0), 1.0) for v in (box[0], box[2]))
        y0, y1 = (min(max((v - top) * zoom, 0.0), 1.0) for v in (box[1], box[3]))
        return (x0, y0, x1, y1)

    @property
    def sounding_boxes(self) -> list[tuple[float, float, float, float]]:
        """The sounding object's boxes as the frame shows them (a box the camera cuts out entirely is dropped)."""
        boxes = [self.frame_box(o.box) for o in self.objects if o.sounding]
        return [b for b in boxes if _box_area(b) > 0.0]


def _sample_area(rng: np.random.Generator, area: tuple[float, float] | None = None) -> float:
    """A box area: VGG-SS's union-box quantiles, or log-uniform over ``area`` (the difficulty knob)."""
    if area is not None:
        return float(area[0] * (area[1] / area[0]) ** rng.uniform())
    qs, areas = zip(*_AREA_QUANTILES)
    return float(np.interp(rng.uniform(), qs, areas))


def _sample_aspect(rng: np.random.Generator) -> float:
    return float(np.exp(rng.uniform(np.log(_ASPECT_RANGE[0]), np.log(_ASPECT_RANGE[1]))))


def _box_size(area: float, aspect: float) -> tuple[float, float]:
    """Width and height of a box of ``area`` and ``aspect``; a side longer than the frame is cut and the other grows."""
    w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
    if w > 1.0:
        w, h = 1.0, area
    if h > 1.0:
        w, h = area, 1.0
    return w, h


def _place(w: float, h: float, rng: np.random.Generator) -> tuple[float, float, float, float]:
    x0, y0 = rng.uniform(0.0, 1.0 - w), rng.uniform(0.0, 1.0 - h)
    return (x0, y0, x0 + w, y0 + h)


def _two_instances(area: float, rng: np.random.Generator) -> list[tuple[float, float, float, float]]:
    """Two disjoint boxes side by side (or stacked) whose union covers ``area``."""
    gap = rng.uniform(0.02, 0.08)
    sizes = [_box_size(area / 2, _sample_aspect(rng)) for _ in range(2)]
    along = [s[0] for s in sizes]  # extents along the split axis
    if sum(along) + gap > 1.0:
        scale = (1.0 - gap) / sum(along)
        along = [a * scale for a in along]
    across = [min(1.0, (area / 2) / a) for a in along]
    slack = max(0.0, 1.0 - sum(along) - gap)
    start = rng.uniform(0.0, slack)
    lo1, hi1 = start, start + along[0]
    lo2 = hi1 + gap + rng.uniform(0.0, max(0.0, slack - start))
    spans = [(lo1, hi1), (lo2, min(1.0, lo2 + along[1]))]
    boxes = []
    for (lo, hi), c in zip(spans, across):
        c0 = rng.uniform(0.0, 1.0 - c)
        boxes.append((lo, c0, hi, c0 + c))
    if rng.uniform() < 0.5:  # stacked vertically instead of side by side
        boxes = [(b[1], b[0], b[3], b[2]) for b in boxes]
    return boxes


def _box_area(box: tuple[float, float, float, float]) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def _visibility(objects: list[_Object], grid: int = 64) -> list[float]:
    """Fraction of each object's shape not covered by the shapes drawn after it (painter's order), on a coarse grid."""
    masks = []
    for obj in objects:
        x0, y0, x1, y1 = _pixel_box(obj.box, grid)
        mask = np.zeros((grid, grid), bool)
        mask[y0:y1, x0:x1] = _shape_mask(obj.drawn_shape, x1 - x0, y1 - y0) >= 0.5
        masks.append(mask)
    covered = np.zeros((grid, grid), bool)
    fractions = []
    for mask in reversed(masks):  # front to back
        total = mask.sum()
        fractions.append(float((mask & ~covered).sum() / total) if total else 1.0)
        covered |= mask
    return fractions[::-1]


def _drawing_order(objects: list[_Object]) -> tuple[list[_Object], list[float]]:
    """Largest first so small objects stay visible; sounding objects go on top only when that rule hides them.

    Returns the objects back to front and the visible fraction of each object's shape.
    """
    order = sorted(objects, key=lambda o: -_box_area(o.box))
    visible = _visibility(order)
    if min(v for o, v in zip(order, visible) if o.sounding) < _MIN_VISIBLE:
        order = [o for o in order if not o.sounding] + [o for o in order if o.sounding]
        visible = _visibility(order)
    return order, visible


_EASY = Difficulty()


def _sample_scene(rng: np.random.Generator, label: int, n_classes: int, two_instances_allowed: bool,
                  difficulty: Difficulty = _EASY, knob_rng: np.random.Generator | None = None) -> _Scene:
    """One scene: the sounding category (one box, or two disjoint ones), plus 1-2 distractors of other categories
    (``difficulty.objects`` sets how many categories).

    Every object's size is drawn once from the same area distribution; then all objects are placed together,
    up to ``_PLACEMENT_TRIES`` times (keeping the best), until each keeps ``_MIN_VISIBLE`` of its shape visible.
    Sizes never depend on the placement, and sounding and distractor objects are placed by the same rule, so neither
    size nor position tells them apart. The knobs that add to a scene (same-shape distractors, the off-screen sound,
    the camera) draw from ``knob_rng`` only when they are on, so the easy scenes stay as they always were.
    """
    area = _sample_area(rng, difficulty.area)
    two = two_instances_allowed and rng.uniform() < _TWO_INSTANCE_PROB
    size = _box_size(area, _sample_aspect(rng))
    low, high = difficulty.objects
    n_distractors = min(int(rng.integers(low - 1, high)), n_classes - 1)
    others = [c for c in range(n_classes) if c != label]
    distractors = [(int(c), _box_size(_sample_area(rng, difficulty.area), _sample_aspect(rng)))
                   for c in rng.choice(others, size=n_distractors, replace=False)]
    knob_rng = knob_rng if knob_rng is not None else np.random.default_rng(0)
    shapes = [_CATEGORIES[label].shape if difficulty.same_shape and knob_rng.uniform() < difficulty.same_shape else ""
              for _ in distractors]
    objects = _placed(rng, label, area, size, two, distractors, shapes)
    offscreen = None
    if difficulty.offscreen and knob_rng.uniform() < difficulty.offscreen:
        unseen = sorted(set(range(n_classes)) - {o.category for o in objects})
        offscreen = int(knob_rng.choice(unseen)) if unseen else None
    camera = _camera(objects, difficulty.camera, knob_rng) if difficulty.camera else None
    return _Scene(label, tuple(objects), camera, offscreen)


def _placed(rng: np.random.Generator, label: int, area: float, size: tuple[float, float], two: bool,
            distractors: list[tuple[int, tuple[float, float]]], shapes: list[str]) -> list[_Object]:
    """The scene's objects placed (the best of ``_PLACEMENT_TRIES`` tries), back to front."""
    best: list[_Object] = []
    best_score = (-1.0, -1.0)
    for _ in range(_PLACEMENT_TRIES):
        sounding = _two_instances(area, rng) if two else [_place(*size, rng)]
        objects = [_Object(label, b, True) for b in sounding]
        objects += [_Object(c, _place(w, h, rng), False, shape) for (c, (w, h)), shape in zip(distractors, shapes)]
        objects, visible = _drawing_order(objects)
        # A hidden sounding object is worse than a hidden distractor: rank by it first.
        sounding_visible = min(v for o, v in zip(objects, visible) if o.sounding)
        score = (min(sounding_visible, _MIN_VISIBLE), min(visible))
        if score > best_score:
            best, best_score = objects, score
        if score[1] >= _MIN_VISIBLE:
            break
    return best


def _kept_share(objects: list[_Object], camera: tuple[float, float, float]) -> float:
    """Share of the sounding boxes' area inside the camera's window."""
    scene = _Scene(0, tuple(objects), camera)
    whole = sum(_box_area(o.box) for o in objects if o.sounding)
    kept = sum(_box_area(scene.frame_box(o.box)) / camera[0] ** 2 for o in objects if o.sounding)
    return kept / whole if whole > 0 else 0.0


def _camera(objects: list[_Object], strength: float, rng: np.random.Generator) -> tuple[float, float, float]:
    """A hand-held camera's window on the scene: zoom 1 to 1 + ``strength``, panned anywhere that keeps
    ``_CAMERA_KEEP`` of the sounding object in the frame (else centred on it): (zoom, left, top)."""
    zoom = 1.0 + rng.uniform(0.0, strength)
    side = 1.0 / zoom
    for _ in range(_CAMERA_TRIES):
        camera = (zoom, rng.uniform(0.0, 1.0 - side), rng.uniform(0.0, 1.0 - side))
        if _kept_share(objects, camera) >= _CAMERA_KEEP:
            return camera
    box = next(o.box for o in objects if o.sounding)
    centre = [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]
    return (zoom, *(min(max(c - side / 2, 0.0), 1.0 - side) for c in centre))


def _union_area(boxes: list[tuple[float, float, float, float]]) -> float:
    """Area of the union of up to two boxes (normalised)."""
    total = sum(_box_area(b) for b in boxes)
    if len(boxes) == 2:
        a, b = boxes
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        total -= iw * ih
    return total


# ---------------------------------------------------------------------------------------------------------- images

def _rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((hue % 360.0) / 360.0, saturation, value), dtype=np.float32) * 255.0


def _pixel_box(box: tuple[float, float, float, float], size: int) -> tuple[int, int, int, int]:
    """The integer pixel box (x0, y0, x1, y1), x1/y1 exclusive, at least 2 pixels a side."""
    x0, y0 = min(int(round(box[0] * size)), size - 2), min(int(round(box[1] * size)), size - 2)
    x1, y1 = max(int(round(box[2] * size)), x0 + 2), max(int(round(box[3] * size)), y0 + 2)
    return x0, y0, min(x1, size), min(y1, size)


def _star(points: int = 5, inner: float = 0.55) -> list[tuple[float, float]]:
    angles = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    xs, ys = radii * np.cos(angles), radii * np.sin(angles)
    xs, ys = (xs - xs.min()) / np.ptp(xs), (ys - ys.min()) / np.ptp(ys)
    return list(zip(xs.tolist(), ys.tolist()))


# Unit-square outlines touching all four sides, so a shape's bounding box is its annotated box.
_POLYGONS = {
    "square": [(0, 0), (1, 0), (1, 1), (0, 1)],
    "triangle": [(0.5, 0), (1, 1), (0, 1)],
    "diamond": [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)],
    "hexagon": [(0.25, 0), (0.75, 0), (1, 0.5), (0.75, 1), (0.25, 1), (0, 0.5)],
    "cross": [(0.3, 0), (0.7, 0), (0.7, 0.3), (1, 0.3), (1, 0.7), (0.7, 0.7), (0.7, 1), (0.3, 1), (0.3, 0.7),
              (0, 0.7), (0, 0.3), (0.3, 0.3)],
    "hourglass": [(0, 0), (1, 0), (0.62, 0.5), (1, 1), (0, 1), (0.38, 0.5)],
    "arrow": [(0, 0.25), (0.5, 0.25), (0.5, 0), (1, 0.5), (0.5, 1), (0.5, 0.75), (0, 0.75)],
    "star": _star(),
}


def _shape_mask(shape: str, w: int, h: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of ``shape`` stretched over a ``w`` x ``h`` patch: (h, w) float32."""
    import cv2

    if shape in ("circle", "ring"):
        # Pixel centres sit at integer coordinates, so the ellipse spans the patch edges at -0.5 and w - 0.5.
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        rx, ry = w / 2.0, h / 2.0
        d = np.sqrt(((xs - (w - 1) / 2.0) / rx) ** 2 + ((ys - (h - 1) / 2.0) / ry) ** 2)
        scale = min(rx, ry)
        mask = np.clip((1.0 - d) * scale + 0.5, 0.0, 1.0)
        if shape == "ring":
            mask *= np.clip((d - 0.55) * scale + 0.5, 0.0, 1.0)
        return mask
    shift = 4  # sub-pixel vertices: cv2 reads coordinates as fixed point with 4 fractional bits
    pts = np.array([[(x * w - 0.5) * (1 << shift), (y * h - 0.5) * (1 << shift)] for x, y in _POLYGONS[shape]])
    canvas = np.zeros((h, w), np.uint8)
    cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 255, lineType=cv2.LINE_AA, shift=shift)
    return canvas.astype(np.float32) / 255.0


def _texture(category: _Category, box: tuple[int, int, int, int], size: int, rng: np.random.Generator) -> np.ndarray:
    """The category's colours and pattern over the box, with per-instance jitter: (h, w, 3) float32 RGB."""
    x0, y0, x1, y1 = box
    hue = category.hue + rng.uniform(-4.0, 4.0)
    saturation, value = rng.uniform(0.75, 0.95), rng.uniform(0.8, 0.95)
    primary, secondary = _rgb(hue, saturation, value), _rgb(hue, saturation, value * 0.55)
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    half = max(2.0, size / 40.0) * rng.uniform(0.8, 1.25)  # half a pattern period, in frame pixels
    phase = rng.uniform(0.0, 2.0 * half)
    pattern = {
        "solid": lambda: np.zeros_like(xs, dtype=bool),
        "stripes_h": lambda: ((ys + phase) // half) % 2 == 1,
        "stripes_v": lambda: ((xs + phase) // half) % 2 == 1,
        "stripes_d": lambda: ((xs + ys + phase) // (1.4 * half)) % 2 == 1,
        "checker": lambda: (((xs + phase) // half) + ((ys + phase) // half)) % 2 == 1,
        "dots": lambda: np.hypot((xs + phase) % (2 * half) - half, (ys + phase) % (2 * half) - half) < 0.5 * half,
    }[category.texture]()
    patch = np.where(pattern[..., None], secondary, primary).astype(np.float32)
    # Soft directional lighting so flat colours do not stand out as the only uniform regions.
    angle = rng.uniform(0.0, 2.0 * math.pi)
    ramp = ((xs - x0) / max(1, x1 - x0) - 0.5) * math.cos(angle) + ((ys - y0) / max(1, y1 - y0) - 0.5) * math.sin(angle)
    return patch * (1.0 + 0.15 * ramp)[..., None]


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A muted gradient with low-frequency colour noise and thin clutter lines: (size, size, 3) float32 RGB."""
    import cv2

    hue = rng.uniform(0.0, 360.0)
    c1 = _rgb(hue, rng.uniform(0.05, 0.35), rng.uniform(0.3, 0.75))
    c2 = _rgb(hue + rng.uniform(-60.0, 60.0), rng.uniform(0.05, 0.35), rng.uniform(0.3, 0.75))
    angle = rng.uniform(0.0, 2.0 * math.pi)
    ramp = (np.arange(size, dtype=np.float32) + 0.5) / size
    proj = (ramp[None, :] * math.cos(angle) + ramp[:, None] * math.sin(angle))
    proj = (proj - proj.min()) / max(1e-6, float(np.ptp(proj)))
    img = c1 + (c2 - c1) * proj[..., None]
    cells = int(rng.integers(3, 8))
    # Mostly brightness, little colour: the background stays muted so its hues are not mistaken for objects'.
    blotches = (rng.normal(0.0, 18.0, (cells, cells, 1)) + rng.normal(0.0, 5.0, (cells, cells, 3))).astype(np.float32)
    img += cv2.resize(blotches, (size, size), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(3, 9))):
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        p2 = tuple(int(v) for v in rng.integers(0, size, 2))
        colour = _rgb(rng.uniform(0.0, 360.0), rng.uniform(0.0, 0.3), rng.uniform(0.2, 0.85))
        cv2.line(img, p1, p2, colour.tolist(), int(rng.integers(1, max(2, size // 80) + 1)), cv2.LINE_AA)
    return img


def _grain_and_gratings(img: np.ndarray, rng: np.random.Generator) -> None:
    """Fine textures over the background, in place: 2-3 gratings (periods of 3-10 px at 128 px, any angle), each
    over a blotchy region, and grain; brightness only, like foliage, brick, water or a crowd."""
    import cv2

    size = img.shape[0]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(int(rng.integers(2, 4))):
        angle, phase = rng.uniform(0.0, math.pi), rng.uniform(0.0, 2.0 * math.pi)
        period = max(3.0, rng.uniform(3.0, 10.0) * size / 128.0)
        wave = np.sin(2.0 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period + phase)
        region = cv2.resize(rng.uniform(-1.0, 1.0, (4, 4)).astype(np.float32), (size, size),
                            interpolation=cv2.INTER_CUBIC)
        img += (rng.uniform(15.0, 30.0) * wave * np.clip(3.0 * region, 0.0, 1.0))[..., None]
    img += rng.normal(0.0, 10.0, (size, size, 1)).astype(np.float32)


def _clutter(img: np.ndarray, rng: np.random.Generator) -> None:
    """4-10 grey, washed-out objects of the benchmark's shape family drawn on the background, in place: the
    furniture of a real scene, things that look like objects but are no category."""
    size = img.shape[0]
    shapes = sorted({c.shape for c in _CATEGORIES})
    for _ in range(int(rng.integers(4, 11))):
        w, h = _box_size(float(0.01 * 12.0 ** rng.uniform()), _sample_aspect(rng))
        x0, y0, x1, y1 = _pixel_box(_place(w, h, rng), size)
        alpha = _shape_mask(shapes[int(rng.integers(len(shapes)))], x1 - x0, y1 - y0)[..., None]
        colour = _rgb(rng.uniform(0.0, 360.0), rng.uniform(0.0, 0.25), rng.uniform(0.25, 0.85))
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1.0 - alpha) + colour * alpha


def _canvas(scene: _Scene, size: int) -> tuple[int, int, int]:
    """The size at which the scene is drawn so that the camera's window is ``size`` pixels, and the window's
    left and top in canvas pixels (``size, 0, 0`` without a camera)."""
    if scene.camera is None:
        return size, 0, 0
    zoom, left, top = scene.camera
    canvas = int(round(size * zoom))
    return canvas, min(int(round(left * canvas)), canvas - size), min(int(round(top * canvas)), canvas - size)


def _render_pixels(scene: _Scene, size: int, rng: np.random.Generator, background: str = "smooth",
                   knob_rng: np.random.Generator | None = None) -> np.ndarray:
    """The scene as a (size, size, 3) uint8 RGB picture; ``background`` and the scene's camera are difficulty
    knobs (their draws come from ``knob_rng``)."""
    canvas, left, top = _canvas(scene, size)
    img = _background(canvas, rng)
    if background != "smooth":
        knob_rng = knob_rng if knob_rng is not None else np.random.default_rng(0)
        _grain_and_gratings(img, knob_rng)
        if background == "cluttered":
            _clutter(img, knob_rng)
    for obj in scene.objects:
        x0, y0, x1, y1 = _pixel_box(obj.box, canvas)
        alpha = _shape_mask(obj.drawn_shape, x1 - x0, y1 - y0)[..., None]
        patch = _texture(_CATEGORIES[obj.category], (x0, y0, x1, y1), canvas, rng)
        region = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = region * (1.0 - alpha) + patch * alpha
    img = img[top:top + size, left:left + size]
    img += rng.normal(0.0, 4.0, img.shape).astype(np.float32)  # sensor noise over everything
    return np.clip(img, 0, 255).astype(np.uint8)


def _render_frame(scene: _Scene, size: int, rng: np.random.Generator, background: str = "smooth",
                  knob_rng: np.random.Generator | None = None) -> bytes:
    """The scene as JPEG bytes (``size`` x ``size``, quality 90)."""
    import cv2

    bgr = _render_pixels(scene, size, rng, background, knob_rng)[..., ::-1]
    ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(bgr), [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
    if not ok:
        raise RuntimeError("cv2.imencode failed to encode a JPEG frame")
    return encoded.tobytes()


# ----------------------------------------------------------------------------------------------------------- audio

_TABLE = 4096


def _harmonic(cycles: np.ndarray, amplitudes: list[float], f0_max: float, sr: int) -> np.ndarray:
    """A periodic wave from its harmonic amplitudes, looked up from a one-cycle table (harmonics above 0.45 sr drop).

    ``cycles``: (n,) phase of the fundamental in cycles; ``f0_max``: its highest frequency in Hz.
    """
    k = np.arange(1, len(amplitudes) + 1)
    amps = np.where(k * f0_max < 0.45 * sr, np.asarray(amplitudes, dtype=np.float64), 0.0)
    grid = np.arange(_TABLE) / _TABLE
    table = (amps[:, None] * np.sin(2.0 * np.pi * k[:, None] * grid[None, :])).sum(0)
    pos = (cycles % 1.0) * _TABLE
    i = pos.astype(np.int64)
    frac = pos - i
    return table[i] * (1.0 - frac) + table[(i + 1) % _TABLE] * frac


def _band_noise(n: int, sr: int, lo: float, hi: float, rng: np.random.Generator) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    spectrum[(freqs < lo) | (freqs > hi)] = 0.0
    return np.fft.irfft(spectrum, n)


def _pulses(n: int, sr: int, period: float, phase: float, kernel: Callable[[int], np.ndarray],
            rng: np.random.Generator, keep: float = 1.0) -> np.ndarray:
    """Events every ``period`` seconds (2% timing jitter), the first ``phase`` of a period early.

    ``kernel(k)`` is the waveform of event k; returns (n,) float64.
    """
    out = np.zeros(n)
    t, k = -phase * period, 0
    while t < n / sr:
        start = int(round((t + rng.normal(0.0, 0.02 * period)) * sr))
        event = kernel(k)
        if rng.uniform() < keep:
            lo, hi = max(0, start), min(n, start + len(event))
            if hi > lo:
                out[lo:hi] += event[lo - start:hi - start]
        t += period
        k += 1
    return out


def _gate(t: np.ndarray, period: float, phase: float, duty: float, ramp: float) -> np.ndarray:
    frac = ((t / period + phase) % 1.0) * period
    return np.clip(np.minimum(frac / ramp, (duty * period - frac) / ramp), 0.0, 1.0)


def _sound(name: str, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """The category's sound, with random pitch (+-0.5 semitone), tempo (+-10%) and phase: (n,) float64."""
    t = np.arange(n) / sr
    pitch = 2.0 ** (rng.uniform(-0.5, 0.5) / 12.0)
    rate = rng.uniform(0.9, 1.1)
    phase = rng.uniform()
    if name == "whistle blowing":
        f = 2500.0 * pitch * (1.0 + 0.012 * np.sin(2 * np.pi * 6.0 * rate * t + 2 * np.pi * phase))
        return _harmonic(np.cumsum(f) / sr, [1.0, 0.12], float(f.max()), sr)
    if name == "bell ringing":
        kt = np.arange(int(1.2 * sr)) / sr
        partials = ((1.0, 1.0, 0.6), (2.0, 0.6, 0.45), (2.76, 0.45, 0.35), (4.1, 0.3, 0.25), (5.4, 0.2, 0.2))
        strike = sum(a * np.exp(-kt / d) * np.sin(2 * np.pi * 520.0 * pitch * r * kt) for r, a, d in partials)
        return _pulses(n, sr, 1.0 / rate, phase, lambda k: strike, rng)
    if name == "drum beating":
        kt = np.arange(int(0.25 * sr)) / sr
        f = (60.0 + 80.0 * np.exp(-kt / 0.03)) * pitch
        body = np.sin(2 * np.pi * np.cumsum(f) / sr) * np.exp(-kt / 0.12)
        thud = _band_noise(len(kt), sr, 20.0, 400.0, rng) * np.exp(-kt / 0.02)
        beat = body + 2.0 * thud
        return _pulses(n, sr, 0.3 / rate, phase, lambda k: beat, rng)
    if name == "siren wailing":
        f = 850.0 * pitch * (1.0 + 0.35 * np.sin(2 * np.pi * 0.7 * rate * t + 2 * np.pi * phase))
        return _harmonic(np.cumsum(f) / sr, [1.0, 0.3, 0.15], float(f.max()), sr)
    if name == "engine idling":
        f0 = 70.0 * pitch
        buzz = _harmonic(f0 * t + phase, [1.0 / k for k in range(1, 41)], f0, sr)
        return buzz * (1.0 + 0.45 * np.sin(2 * np.pi * 13.0 * rate * t))
    if name == "bird chirping":
        kt = np.arange(int(0.07 * sr)) / sr
        f = np.linspace(3200.0, 4800.0, len(kt)) * pitch
        chirp = np.sin(2 * np.pi * np.cumsum(f) / sr) * np.hanning(len(kt))
        return _pulses(n, sr, 0.165 / rate, phase, lambda k: chirp, rng, keep=0.8)
    if name == "horn honking":
        f0 = 350.0 * pitch
        tone = _harmonic(f0 * t, [1.0 / k if k % 2 else 0.08 / k for k in range(1, 16)], f0, sr)
        return tone * _gate(t, 1.1 / rate, phase, 0.6, 0.015)
    if name == "rain falling":
        hiss = _band_noise(n, sr, 4500.0 * pitch, 7000.0 * pitch, rng)
        return hiss * (0.8 + 0.2 * np.sin(2 * np.pi * 0.3 * rate * t + 2 * np.pi * phase))
    if name == "clock ticking":
        length = int(0.012 * sr)
        kt = np.arange(length) / sr
        clicks = [_band_noise(length, sr, 2000.0 * pitch, 4000.0 * pitch, rng) * np.exp(-kt / 0.003) * gain
                  for gain in (1.0, 0.6)]
        return _pulses(n, sr, 0.5 / rate, phase, lambda k: clicks[k % 2], rng)
    if name == "organ playing":
        chord = sum(_harmonic(f * pitch * t + phase * i, [1.0, 0.5, 0.3, 0.2, 0.1, 0.05], f * pitch, sr)
                    for i, f in enumerate((196.0, 247.0, 294.0)))
        return chord * (1.0 + 0.15 * np.sin(2 * np.pi * 5.5 * rate * t))
    raise ValueError(f"no sound for category {name!r}")


def _onset_sound(label: int, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """The category's sound starting 0-0.25 s in (20 ms fade-in), at unit RMS: (n,) float64."""
    signal = _sound(CLASSES[label], n, sr, rng)
    t = np.arange(n) / sr
    signal = signal * np.clip((t - rng.uniform(0.0, 0.25)) / 0.02, 0.0, 1.0)
    signal /= np.sqrt(np.mean(signal ** 2)) + 1e-12
    return signal


def _audio_mix(label: int, seconds: int, sr: int, rng: np.random.Generator, difficulty: Difficulty = _EASY,
               offscreen: int | None = None, knob_rng: np.random.Generator | None = None) -> tuple[np.ndarray, dict]:
    """The clip's audio before encoding: the sounding category (random onset), plus the ``offscreen`` category's
    sound at ``difficulty.offscreen_db`` below/above it when there is one, over pink noise at an SNR drawn from
    ``difficulty.snr_db`` (the sounding object's power over the noise's), peak-normalised to 0.3-0.9.

    Returns ((n,) float64 mix, {"snr_db", "offscreen_db"} as drawn).
    """
    n = seconds * sr
    signal = _onset_sound(label, n, sr, rng)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    spectrum /= np.sqrt(np.maximum(np.fft.rfftfreq(n, 1.0 / sr), 50.0))  # 1/f power: pink
    noise = np.fft.irfft(spectrum, n)
    noise /= np.sqrt(np.mean(noise ** 2)) + 1e-12
    snr = float(rng.uniform(*difficulty.snr_db))
    drawn: dict = {"snr_db": snr, "offscreen_db": None}
    if offscreen is not None:
        knob_rng = knob_rng if knob_rng is not None else np.random.default_rng(0)
        level = float(knob_rng.uniform(*difficulty.offscreen_db))
        signal = signal + _onset_sound(offscreen, n, sr, knob_rng) * 10.0 ** (level / 20.0)
        drawn["offscreen_db"] = level
    mix = signal + noise * 10.0 ** (-snr / 20.0)
    mix *= rng.uniform(0.3, 0.9) / (np.abs(mix).max() + 1e-12)
    return mix, drawn


def _render_audio(label: int, seconds: int, sr: int, rng: np.random.Generator) -> bytes:
    """The easy benchmark's audio of a clip (no off-screen sound, SNR 5-20 dB) as WAV bytes."""
    return _wav_bytes(_audio_mix(label, seconds, sr, rng)[0], sr)


def _wav_bytes(mix: np.ndarray, sr: int) -> bytes:
    """(n,) float audio in [-1, 1] as WAV bytes (mono, PCM 16-bit)."""
    pcm = np.round(np.clip(mix, -1.0, 1.0) * 32767.0).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


@dataclass(frozen=True)
class MovingClip:
    """A benchmark scene whose sounding object moves: ``frames`` (N, size, size, 3) uint8 RGB at ``fps``,
    ``audio`` (samples,) float32 at ``sample_rate``, ``boxes`` (N, 4) the sounding object's normalised box per frame,
    ``shown``: the categories in the picture (the sounding one and the distractors')."""

    label: str
    frames: np.ndarray
    audio: np.ndarray
    boxes: np.ndarray
    fps: int
    sample_rate: int
    shown: tuple[str, ...]

    def contains(self, time_s: float, x: float, y: float) -> bool:
        """Whether the normalised point (x, y) lies in the sounding object's box in the frame shown at ``time_s``."""
        index = min(len(self.boxes) - 1, max(0, int(math.floor(time_s * self.fps + 1e-6))))
        x0, y0, x1, y1 = self.boxes[index]
        return bool(x0 <= x <= x1 and y0 <= y <= y1)


def moving_clip(seed: int, label: int, *, seconds: float = 4.0, fps: int = 10, size: int = 128,
                sample_rate: int = 16000, n_classes: int = 10) -> MovingClip:
    """A scene of the benchmark (one sounding object, 1-2 distractors, the category's sound) in which the sounding
    object glides from one side of the picture to the other while the rest stays still; it is drawn in front, so it
    is never hidden; its longer side is at most 0.4 of the picture's. For testing what a model follows over time
    (``sslt localize``)."""
    import soundfile

    scene_rng, image_rng, audio_rng, _ = _clip_rngs(seed, _MOVING_STREAM, label)
    scene = _sample_scene(scene_rng, label, n_classes, False)
    sounding = next(o for o in scene.objects if o.sounding)
    others = [o for o in scene.objects if not o.sounding]
    w, h = sounding.box[2] - sounding.box[0], sounding.box[3] - sounding.box[1]
    shrink = min(1.0, _MOVING_MAX_SIDE / max(w, h))  # a large object would have nowhere to go
    w, h = w * shrink, h * shrink
    flip = bool(scene_rng.uniform() < 0.5)
    start = np.array([max(w / 2, 0.25), max(h / 2, 0.25)])
    end = np.array([min(1 - w / 2, 0.75), min(1 - h / 2, 0.75)])
    if flip:
        start[0], end[0] = end[0], start[0]
    image_seed = int(image_rng.integers(2 ** 63))
    count = max(1, int(round(seconds * fps)))
    frames, boxes = [], []
    for k in range(count):
        cx, cy = start + (end - start) * (k / max(1, count - 1))
        box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        moved = _Scene(scene.label, tuple(others) + (_Object(sounding.category, box, True),))
        # the same generator seed for every frame: background, textures and noise stay put, only the object moves
        frames.append(_render_pixels(moved, size, np.random.default_rng(image_seed)))
        boxes.append(box)
    wav, _ = soundfile.read(io.BytesIO(_render_audio(label, math.ceil(seconds), sample_rate, audio_rng)),
                            dtype="float32")
    return MovingClip(CLASSES[label], np.stack(frames), wav[:int(round(seconds * sample_rate))],
                      np.asarray(boxes, np.float32), fps, sample_rate,
                      tuple(sorted({CLASSES[o.category] for o in scene.objects})))


# ------------------------------------------------------------------------------------------------------ clip files

def _clip_rngs(seed: int, stream: int, index: int) -> list[np.random.Generator]:
    """Independent scene, image, audio and annotation RNGs of one clip."""
    children = np.random.SeedSequence([seed, stream, index]).spawn(4)
    return [np.random.default_rng(c) for c in children]


def _knob_rngs(seed: int, stream: int, index: int) -> list[np.random.Generator]:
    """Independent scene, image and audio RNGs of one clip's difficulty knobs (apart from ``_clip_rngs``)."""
    children = np.random.SeedSequence([seed, stream, index, _KNOB_STREAM]).spawn(3)
    return [np.random.default_rng(c) for c in children]


def _replay_scene(params: dict, stream: int, index: int, label: int, two_ok: bool,
                  difficulty: Difficulty) -> _Scene:
    """A clip's scene exactly as ``generate`` drew it."""
    scene_rng = _clip_rngs(params["seed"], stream, index)[0]
    knob_rng = _knob_rngs(params["seed"], stream, index)[0]
    return _sample_scene(scene_rng, label, params["n_classes"], two_ok, difficulty, knob_rng)


def _clip_id(seed: int, stream: int, index: int, attempt: int, flickr: bool) -> str:
    """A real-looking id: ``<11 YouTube id chars>_<start seconds, 6 digits>``, or a Flickr photo number."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, stream, index, _ID_STREAM, attempt]))
    if flickr:
        return str(int(rng.integers(1_000_000_000, 12_000_000_000)))
    chars = "".join(_ID_ALPHABET[int(i)] for i in rng.integers(0, len(_ID_ALPHABET), 11))
    return f"{chars}_{int(rng.integers(0, 600)):06d}"


def _label(seed: int, stream: int, index: int, n_classes: int) -> int:
    """Balanced labels: each block of ``n_classes`` clips holds every class once, in a seeded order."""
    block = np.random.default_rng(np.random.SeedSequence([seed, stream, index // n_classes, _LABEL_STREAM]))
    return int(block.permutation(n_classes)[index % n_classes])


def _write_if_changed(path: Path, data: bytes) -> bool:
    """Write atomically unless ``path`` already holds exactly ``data``; True when it wrote."""
    try:
        if path.read_bytes() == data:
            return False
    except (FileNotFoundError, NotADirectoryError):
        pass
    atomic_write_bytes(path, data)
    return True


def _flickr_boxes(box: tuple[int, int, int, int], size: int,
                  rng: np.random.Generator) -> tuple[tuple[float, float, float, float], ...]:
    """Three annotators' boxes on the 256 grid: the drawn pixel box, each side jittered by a few pixels."""
    scale = FLICKR_GRID / size
    boxes = []
    for _ in range(3):
        x0, y0, x1, y1 = (int(round(v * scale)) + int(rng.integers(-_FLICKR_JITTER, _FLICKR_JITTER + 1)) for v in box)
        x0, y0 = min(max(0, x0), FLICKR_GRID - 1), min(max(0, y0), FLICKR_GRID - 1)
        x1, y1 = max(min(FLICKR_GRID, x1), x0 + 1), max(min(FLICKR_GRID, y1), y0 + 1)
        boxes.append((float(x0), float(y0), float(x1), float(y1)))
    return tuple(boxes)


def _assign_clips(params: dict, counts: dict[str, int]) -> dict[str, list[tuple[int, str, int]]]:
    """(index, clip id, label) of every clip of every set; ids are unique across the whole benchmark."""
    assigned: dict[str, list[tuple[int, str, int]]] = {}
    seen: set[str] = set()
    for name, layout, stream, _ in _SETS:
        clips = []
        for index in range(counts[name]):
            attempt = 0
            while (clip_id := _clip_id(params["seed"], stream, index, attempt, layout == "flickr_test")) in seen:
                attempt += 1
            seen.add(clip_id)
            clips.append((index, clip_id, _label(params["seed"], stream, index, params["n_classes"])))
        assigned[name] = clips
    return assigned


def sounding_masks(benchmark: str | Path, set_name: str, size: int = 224) -> dict[str, np.ndarray]:
    """The visible pixels of the sounding object(s) of every clip of a generated set, at ``size`` x ``size``.

    The scenes are replayed from ``benchmark.json`` (the generator is deterministic), so nothing beyond the
    published boxes is stored: {clip id: (size, size) bool mask}, where a pixel is True when a sounding object's
    shape covers it and no object drawn in front of it does. These are the maps a perfect segmenter of the sounding
    object would produce, a reference that is stricter than the box-level oracle ceiling: a model sees objects,
    not their boxes. Raises DataError when ``benchmark`` holds no benchmark made by this generator.
    """
    bench_path = Path(benchmark) / "benchmark.json"
    try:
        doc = json.loads(bench_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{bench_path}: cannot read the synthetic benchmark's parameters ({exc})") from None
    if doc.get("format") != FORMAT:
        raise DataError(f"{bench_path}: format {doc.get('format')!r}, this sslt replays {FORMAT!r} benchmarks")
    streams = {name: (stream, two_ok) for name, _, stream, two_ok in _SETS}
    if set_name not in streams:
        raise DataError(f"unknown synthetic set {set_name!r}; expected one of {', '.join(streams)}")
    params = doc["params"]
    difficulty = from_params(params)
    counts = {name: int(info["clips"]) for name, info in doc["sets"].items()}
    stream, two_ok = streams[set_name]
    return {clip_id: _sounding_mask(_replay_scene(params, stream, index, label, two_ok, difficulty), size)
            for index, clip_id, label in _assign_clips(params, counts)[set_name]}


def _sounding_mask(scene: _Scene, size: int) -> np.ndarray:
    """The sounding object's visible pixels in the frame (through the scene's camera): (size, size) bool."""
    canvas, left, top = _canvas(scene, size)
    covered = np.zeros((canvas, canvas), bool)
    sounding = np.zeros((canvas, canvas), bool)
    for obj in reversed(scene.objects):  # front to back
        x0, y0, x1, y1 = _pixel_box(obj.box, canvas)
        shape = np.zeros((canvas, canvas), bool)
        shape[y0:y1, x0:x1] = _shape_mask(obj.drawn_shape, x1 - x0, y1 - y0) >= 0.5
        if obj.sounding:
            sounding |= shape & ~covered
        covered |= shape
    return sounding[top:top + size, left:left + size]


def _make_clips(job: dict) -> list[dict]:
    """Render and write one chunk of clips; returns one record per clip (id, label, boxes, files written)."""
    out, name, layout, stream, two_ok = Path(job["out"]), job["set"], job["layout"], job["stream"], job["two_ok"]
    p = job["params"]
    difficulty = from_params(p)
    size = max(FLICKR_GRID, p["image_size"]) if layout == "flickr_test" else p["image_size"]
    records = []
    for index, clip_id, label in job["clips"]:
        scene_rng, image_rng, audio_rng, anno_rng = _clip_rngs(p["seed"], stream, index)
        _, knob_image_rng, knob_audio_rng = _knob_rngs(p["seed"], stream, index)
        scene = _replay_scene(p, stream, index, label, two_ok, difficulty)
        # The audio is mixed even when its file is trusted: scenes.csv records the SNR it drew.
        mix, drawn = _audio_mix(label, _AUDIO_SECONDS[name], p["sample_rate"], audio_rng, difficulty,
                                scene.offscreen, knob_audio_rng)
        pixel_boxes = [_pixel_box(b, size) for b in scene.sounding_boxes]
        frame, audio, anno = layout_paths(layout, clip_id)
        annotation = None
        if layout == "vggss_test":
            boxes = tuple(tuple(v / size for v in b) for b in pixel_boxes)
            annotation = Annotation(clip_id, "vggss", boxes, CLASSES[label])
        elif layout == "flickr_test":
            annotation = Annotation(clip_id, "flickr", _flickr_boxes(pixel_boxes[0], size, anno_rng))
        paths = [out / name / rel for rel in (frame, audio, anno) if rel]
        written = 0
        if not (job["trust_existing"] and all(path.is_file() for path in paths)):
            contents = [_render_frame(scene, size, image_rng, difficulty.background, knob_image_rng),
                        _wav_bytes(mix, p["sample_rate"])]
            if annotation is not None:
                text = vggss_xml_text(annotation) if annotation.kind == "vggss" else flickr_xml_text(annotation)
                contents.append(text.encode())
            written = sum(_write_if_changed(path, data) for path, data in zip(paths, contents))
        records.append({"index": index, "id": clip_id, "label": CLASSES[label], "frame": frame, "audio": audio,
                        "anno": anno, "annotation": annotation, "written": written, "files": len(paths),
                        "scene": _scene_row(scene, clip_id, name, drawn, difficulty)})
    return records


SCENE_COLUMNS = ("clip_id", "split", "on_screen_classes", "sounding_class", "n_objects", "sounding_area",
                 "distractor_areas", "same_shape_distractors", "background", "snr_db", "offscreen_class",
                 "offscreen_db", "camera_zoom", "camera_left", "camera_top")


def _scene_row(scene: _Scene, clip_id: str, split: str, drawn: dict, difficulty: Difficulty) -> dict[str, str]:
    """What the generator drew for one clip, as a scenes.csv row (areas are shares of the frame as shown)."""
    shown = [o for o in scene.objects if _box_area(scene.frame_box(o.box)) > 0.0]
    distractors = [o for o in shown if not o.sounding]
    zoom, left, top = scene.camera or (1.0, 0.0, 0.0)
    return {
        "clip_id": clip_id, "split": split,
        "on_screen_classes": ";".join(CLASSES[c] for c in sorted({o.category for o in shown})),
        "sounding_class": CLASSES[scene.label],
        "n_objects": str(len(shown)),
        "sounding_area": f"{_union_area(scene.sounding_boxes):.5f}",
        "distractor_areas": ";".join(f"{_box_area(scene.frame_box(o.box)):.5f}" for o in distractors),
        "same_shape_distractors": str(sum(bool(o.shape) for o in distractors)),
        "background": difficulty.background,
        "snr_db": f"{drawn['snr_db']:.2f}",
        "offscreen_class": "" if scene.offscreen is None else CLASSES[scene.offscreen],
        "offscreen_db": "" if drawn["offscreen_db"] is None else f"{drawn['offscreen_db']:.2f}",
        "camera_zoom": f"{zoom:.4f}", "camera_left": f"{left:.4f}", "camera_top": f"{top:.4f}",
    }


def _scenes_csv(records: list[dict]) -> bytes:
    """A set's scenes.csv: one row per clip (``SCENE_COLUMNS``), by index; ``data.negatives.read_scenes`` reads its
    on-screen classes (the off-screen negatives of ``sslt eval --negatives`` exclude them)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SCENE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rec["scene"] for rec in records)
    return buf.getvalue().encode()


# -------------------------------------------------------------------------------------------------------- generate

def _check_params(out: Path, n_train: int, n_val: int, n_test: int, n_flickr: int, seed: int, image_size: int,
                  sample_rate: int, n_classes: int, workers: int | None) -> None:
    problems = []
    for key, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test), ("n_flickr", n_flickr)):
        if value < 0:
            problems.append(f"{key} = {value}: a clip count cannot be negative")
    if seed < 0:
        problems.append(f"seed = {seed}: use a seed >= 0")
    if not 32 <= image_size <= 1024:
        problems.append(f"image_size = {image_size}: use 32 to 1024 pixels")
    if not 16000 <= sample_rate <= 48000:
        problems.append(f"sample_rate = {sample_rate}: use 16000 to 48000 Hz (the sounds reach 7 kHz)")
    if not 2 <= n_classes <= len(CLASSES):
        problems.append(f"n_classes = {n_classes}: use 2 to {len(CLASSES)} (each scene shows 2-3 categories)")
    if workers is not None and workers < 1:
        problems.append(f"workers = {workers}: use 1 or more")
    if problems:
        raise DataError(f"{out}: cannot generate the synthetic benchmark with these parameters", problems)


def _benchmark_doc(params: dict, counts: dict[str, int]) -> dict:
    n_classes = params["n_classes"]
    return {
        "format": FORMAT,
        "params": params,
        "classes": [{"name": c.name, "shape": c.shape, "hue_degrees": c.hue, "texture": c.texture, "sound": c.sound}
                    for c in _CATEGORIES[:n_classes]],
        "sets": {name: {"layout": layout, "clips": counts[name], "audio_seconds": _AUDIO_SECONDS[name],
                        "image_size": max(FLICKR_GRID, params["image_size"]) if layout == "flickr_test"
                        else params["image_size"]}
                 for name, layout, _, _ in _SETS},
        "generator": {
            "box_area_quantiles": [list(q) for q in _AREA_QUANTILES],
            "aspect_range": list(_ASPECT_RANGE),
            "two_instance_probability": _TWO_INSTANCE_PROB,
            "categories_per_scene": [2, 3],
            "min_visible_fraction": _MIN_VISIBLE,
            "snr_db": list(_EASY.snr_db),
            "jpeg_quality": _JPEG_QUALITY,
            "flickr_annotators": 3,
            "flickr_jitter_px": _FLICKR_JITTER,
        },
    }


def _differences(existing: object, wanted: dict) -> str:
    if not isinstance(existing, dict):
        return "its benchmark.json is unreadable"
    if existing.get("format") != wanted["format"]:
        return f"format {existing.get('format')!r}, this sslt writes {wanted['format']!r}"
    old = existing.get("params") if isinstance(existing.get("params"), dict) else {}
    diffs = [f"{key} {old.get(key)!r} -> {value!r}" for key, value in wanted["params"].items() if old.get(key) != value]
    return ", ".join(diffs) if diffs else "generator settings differ (made by another sslt version)"


def _prepare_out(out: Path, doc: dict, force: bool) -> bool:
    """Check ``out`` against the wanted benchmark; True when its existing files can be trusted as they are."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose another --out")
    bench = out / "benchmark.json"
    if bench.is_file():
        try:
            existing = json.loads(bench.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            existing = None
        if existing == json.loads(json.dumps(doc)):  # compare as JSON: tuples read back as lists
            return True
        if not force:
            raise DataError(f"{out}: holds a synthetic benchmark made with other parameters "
                            f"({_differences(existing, doc)}); use another --out, or --force to replace it")
        return False
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise DataError(f"{out}: folder is not empty and has no benchmark.json, so it is not a synthetic "
                            "benchmark; use a new or empty --out, or --force to write into it")
        return False
    return True


def _old_files(root: Path) -> set[Path]:
    """Files listed by an existing set's manifest (empty when there is none)."""
    if not (root / MANIFEST).is_file():
        return set()
    try:
        old = read_set(root)
    except DataError:
        return set()
    return {Path(p) for c in old.clips + old.unusable for p in (c.frame, c.audio, c.anno) if p}


def _remove_stale(root: Path, stale: set[Path]) -> int:
    """Delete files an earlier run listed that this run does not, and the folders they leave empty."""
    removed = 0
    for path in sorted(stale):
        if root not in path.parents:  # a hand-edited manifest may point anywhere: touch only this set's folder
            continue
        if path.is_file():
            path.unlink()
            removed += 1
        parent = path.parent
        while parent != root and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    return removed


def _write_set_files(root: Path, layout: str, clips: list[Clip], info: dict) -> int:
    """``write_set`` into a scratch folder, then copy only the files that differ; returns the count written."""
    root.mkdir(parents=True, exist_ok=True)
    # The scratch folder lives outside ``root`` so a run that changes nothing leaves even the folder's mtime alone.
    with tempfile.TemporaryDirectory(prefix="sslt-set-") as scratch:
        write_set(scratch, layout, clips, info)
        return sum(_write_if_changed(root / name, (Path(scratch) / name).read_bytes()) for name in (SET_INFO, MANIFEST))


def _vggsound_csv(records: dict[str, list[dict]]) -> bytes:
    """VGGSound's own CSV (no header): ``ytid,start,label,split``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for name, split in (("train", "train"), ("val", "val"), ("test_vggss", "test")):
        for rec in records[name]:
            ytid, start = rec["id"].rsplit("_", 1)
            writer.writerow([ytid, int(start), rec["label"], split])
    return buf.getvalue().encode()


def _progress(enabled: bool) -> Progress:
    """One bar per set on stderr, with clips/s and ETA."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from sslt_cli.progress import RateColumn

    return Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled)


def _init_worker(parent: int) -> None:
    import cv2

    die_with_parent(parent)  # a kill -9 of `sslt prepare` leaves no worker behind
    cv2.setNumThreads(1)  # one process per core already; cv2's own threads would oversubscribe


def generate(out: Path, *, n_train: int = 5000, n_val: int = 200, n_test: int = 500, n_flickr: int = 250,
             seed: int = 0, image_size: int = 128, sample_rate: int = 16000, n_classes: int = 10,
             workers: int | None = None, force: bool = False, progress: bool = True,
             difficulty: Difficulty | None = None) -> dict:
    """Write the synthetic benchmark under ``out`` (layouts in docs/architecture.md, "Data contract").

    Sets: ``train`` (vggsound_train, 3 s audio), ``val`` and ``test_vggss`` (vggss_test, 10 s audio, normalised boxes),
    ``test_flickr`` (flickr_test, frames at max(256, image_size), 3 annotators on the 256 grid), each with ``set.json``
    and ``manifest.csv``; beside them ``benchmark.json`` (all parameters), ``vggsound.csv`` and ``vggss.json``.
    A set asked for with 0 clips is not written. Frames: ``image_size`` square JPEG; audio: mono 16-bit WAV at
    ``sample_rate``.

    The same parameters and seed give byte-identical files whatever ``workers`` is. Re-running over a finished
    folder rewrites nothing; over an interrupted one it completes it. A folder made with other parameters raises
    :class:`DataError` unless ``force``, which regenerates it and removes the files the old manifests listed that the
    new ones do not.

    ``difficulty`` (``sslt_cli.data.difficulty``; default: the easy benchmark) turns on the knobs that imitate real
    video; it is recorded in benchmark.json's params (absent when easy, so the easy files stay as they were), the
    boxes and ``sounding_masks`` follow it, and ``scenes.csv`` records what every clip drew.

    Returns a summary: output paths, clips per set, files written / unchanged / removed and seconds taken.
    """
    started = time.perf_counter()
    out = Path(out).expanduser()
    _check_params(out, n_train, n_val, n_test, n_flickr, seed, image_size, sample_rate, n_classes, workers)
    params = {"n_train": n_train, "n_val": n_val, "n_test": n_test, "n_flickr": n_flickr, "seed": seed,
              "image_size": image_size, "sample_rate": sample_rate, "n_classes": n_classes}
    if difficulty is not None and not difficulty.is_default:
        params["difficulty"] = difficulty.as_dict()
        from_params(params)  # the same checks as a recorded benchmark gets (objects against n_classes, ranges)
    counts = {"train": n_train, "val": n_val, "test_vggss": n_test, "test_flickr": n_flickr}
    doc = _benchmark_doc(params, counts)
    trust_existing = _prepare_out(out, doc, force)
    workers = workers or min(4, os.cpu_count() or 1)
    try:
        return _generate(out, doc, params, counts, trust_existing, workers, progress, started)
    except OSError as exc:
        raise DataError(f"{out}: cannot write the synthetic benchmark ({exc}); choose a writable --out "
                        "with enough free space") from None


def _render_clips(out: Path, params: dict, counts: dict[str, int], trust_existing: bool, workers: int,
                  progress: bool) -> dict[str, list[dict]]:
    """Every set's clips rendered (or found current) in chunks, in ``workers`` processes: {set: [clip record]}."""
    jobs = []
    assigned = _assign_clips(params, counts)
    for name, layout, stream, two_ok in _SETS:
        clips = assigned[name]
        chunk = max(1, min(32, math.ceil(len(clips) / (4 * workers))))
        for i in range(0, len(clips), chunk):
            jobs.append({"out": str(out), "set": name, "layout": layout, "stream": stream, "two_ok": two_ok,
                         "params": params, "trust_existing": trust_existing, "clips": clips[i:i + chunk]})
    records: dict[str, list[dict]] = {name: [] for name, _, _, _ in _SETS}
    with _progress(progress) as bar:
        tasks = {name: bar.add_task(name, total=counts[name]) for name, _, _, _ in _SETS if counts[name]}
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                done = _make_clips(job)
                records[job["set"]] += done
                bar.advance(tasks[job["set"]], len(done))
            return records
        # spawn, not fork: a child forked after the parent used OpenCV's thread pool can hang inside cv2.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                                 initargs=(os.getpid(),)) as pool:
            futures = {pool.submit(_make_clips, job): job["set"] for job in jobs}
            try:
                for future in as_completed(futures):
                    done = future.result()
                    records[futures[future]] += done
                    bar.advance(tasks[futures[future]], len(done))
            except BaseException:  # a failed chunk or Ctrl-C: stop now rather than render every queued chunk
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    return records


def _finish_set(root: Path, layout: str, name: str, records: dict[str, list[dict]], old_files: set, doc: dict,
                params: dict) -> tuple[int, int, int]:
    """A set's records sorted (in place), its stale files removed and its set.json + manifest written (or, for an
    empty set, the folder cleared away): (files written, files it has, files removed)."""
    recs = sorted(records[name], key=lambda r: r["index"])
    records[name] = recs
    written = sum(r["written"] for r in recs)
    files = sum(r["files"] for r in recs)
    new_files = {root / r[key] for r in recs for key in ("frame", "audio", "anno") if r[key]}
    removed = _remove_stale(root, old_files - new_files)
    if not recs:
        for meta in (SET_INFO, MANIFEST, SCENES):
            if (root / meta).is_file():
                (root / meta).unlink()
                removed += 1
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        return written, files, removed
    clips = [Clip(r["id"], r["label"], r["frame"], r["audio"], r["anno"]) for r in recs]
    info = {"source": "sslt synthetic benchmark", "split": name, "seed": params["seed"],
            "classes": list(CLASSES[:params["n_classes"]]), "audio_seconds": _AUDIO_SECONDS[name],
            "sample_rate": params["sample_rate"], "image_size": doc["sets"][name]["image_size"]}
    written += _write_if_changed(root / SCENES, _scenes_csv(recs))
    return written + _write_set_files(root, layout, clips, info), files + 3, removed


def _generate(out: Path, doc: dict, params: dict, counts: dict[str, int], trust_existing: bool, workers: int,
              progress: bool, started: float) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    # benchmark.json first: an interrupted run then resumes as the same benchmark instead of looking foreign.
    bench = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    written = int(_write_if_changed(out / "benchmark.json", bench))
    old_files = {name: _old_files(out / name) for name, _, _, _ in _SETS}
    records = _render_clips(out, params, counts, trust_existing, workers, progress)
    total_files, removed, sets = 0, 0, {}
    for name, layout, _, _ in _SETS:
        set_written, set_files, set_removed = _finish_set(out / name, layout, name, records, old_files[name], doc,
                                                          params)
        written, total_files, removed = written + set_written, total_files + set_files, removed + set_removed
        if records[name]:
            sets[name] = str(out / name)

    vggss = annotations_to_vggss_json(r["annotation"] for r in records["test_vggss"])
    top = {"vggsound_csv": (out / "vggsound.csv", _vggsound_csv(records)),
           "vggss_json": (out / "vggss.json", (json.dumps(vggss) + "\n").encode())}
    for path, data in top.values():
        written += _write_if_changed(path, data)
    total_files += 3
    return {
        "out": str(out),
        "benchmark": str(out / "benchmark.json"),
        **{key: str(path) for key, (path, _) in top.items()},
        "sets": sets,
        "clips": dict(counts),
        "files": {"written": written, "unchanged": total_files - written, "removed": removed},
        "seconds": round(time.perf_counter() - started, 2),
    }
