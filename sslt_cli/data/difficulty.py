"""The synthetic benchmark's difficulty knobs and presets (issue 21): what real videos have that the easy scenes lack.

Each knob imitates one thing VGGSound/VGG-SS clips do to a localiser (see ``KNOB_HELP``); the defaults are the easy
benchmark, whose files stay byte-identical. ``PRESETS`` names combinations (``easy``, ``hard``), and
``parse_difficulty`` turns a preset plus ``knob=value`` overrides (from the CLI or an ablation file) into one typed,
validated :class:`Difficulty`. No numpy, no torch: the recipe and ablation layers read it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from sslt_cli.errors import DataError

BACKGROUNDS = ("smooth", "textured", "cluttered")


@dataclass(frozen=True)
class Difficulty:
    """Knobs of the generator; ranges are (low, high) drawn uniformly per clip (``area`` log-uniformly)."""

    objects: tuple[int, int] = (2, 3)
    area: tuple[float, float] | None = None
    background: str = "smooth"
    same_shape: float = 0.0
    offscreen: float = 0.0
    offscreen_db: tuple[float, float] = (-6.0, 0.0)
    snr_db: tuple[float, float] = (5.0, 20.0)
    camera: float = 0.0

    @property
    def is_default(self) -> bool:
        return self == Difficulty()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples as lists."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


KNOB_HELP = {
    "objects": "categories on screen, the sounding one included, LOW:HIGH (easy 2:3). Real frames show several "
               "things at once (people, cars, instruments) of which one sounds.",
    "area": "the objects' box area as a share of the frame, LOW:HIGH, log-uniform, for sounding objects and "
            "distractors alike (easy: VGG-SS's union-box quantiles, median 25%). VGG-SS has many small sources: a "
            "few percent of the frame (a bird in a tree, a distant siren).",
    "background": "smooth (easy: a muted gradient with blotches and a few lines), textured (adds fine gratings and "
                  "grain, like foliage, brick, water, crowds) or cluttered (textured plus grey objects of the same "
                  "shape family, like the furniture of a real scene).",
    "same_shape": "share of distractors drawn in the sounding category's shape (with their own colour and "
                  "texture): real scenes hold look-alikes (two dogs, one barking; a row of cars, one honking).",
    "offscreen": "share of clips with a second sound whose source is not on screen (narration, music, traffic "
                 "off camera), of a category not shown; the label stays the on-screen source.",
    "offscreen_db": "the off-screen sound's level relative to the sounding object's, LOW:HIGH dB (easy -6:0).",
    "snr_db": "ambient (pink) noise, signal-to-noise ratio LOW:HIGH dB (easy 5:20); wind, room tone and "
              "microphone hiss drown real sources.",
    "camera": "a moving hand-held camera: each clip frames a random window of the scene, zoomed in by up to "
              "1 + camera (easy 0: the whole scene), so objects are cut at the frame's edge and the framing "
              "never repeats.",
}

PRESETS: dict[str, Difficulty] = {
    "easy": Difficulty(),
    "hard": Difficulty(objects=(3, 6), area=(0.01, 0.2), background="cluttered", same_shape=0.5, offscreen=0.5,
                       offscreen_db=(-6.0, 0.0), snr_db=(-5.0, 10.0), camera=0.5),
}


def _range(text: Any, kind: type, key: str) -> tuple:
    if isinstance(text, (list, tuple)):
        parts = list(text)
    else:
        parts = str(text).split(":")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise ValueError(f"{key} = {text!r}: write LOW:HIGH (e.g. 3:6) or one value")
    try:
        low, high = (float(p) if kind is float else int(str(p)) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"{key} = {text!r}: LOW and HIGH must be {kind.__name__}s") from None
    if low > high:
        raise ValueError(f"{key} = {text!r}: LOW is above HIGH")
    return (low, high)


def _coerce(key: str, value: Any) -> Any:
    if key == "objects":
        return _range(value, int, key)
    if key == "area":
        return None if value in (None, "", "vggss") else _range(value, float, key)
    if key in ("offscreen_db", "snr_db"):
        return _range(value, float, key)
    if key == "background":
        return str(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} = {value!r}: expected a number") from None


def _problems(d: Difficulty, n_classes: int) -> list[str]:
    problems = []
    # A scene never shows more categories than the benchmark has: HIGH is capped at n_classes when drawing.
    if not (2 <= d.objects[0] <= min(n_classes, 10) and d.objects[1] <= 10):
        problems.append(f"objects = {d.objects[0]}:{d.objects[1]}: use 2 to 10 categories, LOW at most n_classes "
                        f"({n_classes})")
    if d.area is not None and not 0.001 <= d.area[0] <= d.area[1] <= 0.95:
        problems.append(f"area = {d.area[0]}:{d.area[1]}: use shares of the frame from 0.001 to 0.95")
    if d.background not in BACKGROUNDS:
        problems.append(f"background = {d.background!r}: use one of {', '.join(BACKGROUNDS)}")
    for key in ("same_shape", "offscreen"):
        if not 0.0 <= getattr(d, key) <= 1.0:
            problems.append(f"{key} = {getattr(d, key)}: a share, use 0 to 1")
    if not 0.0 <= d.camera <= 2.0:
        problems.append(f"camera = {d.camera}: use 0 (still) to 2 (zoom in up to 3x)")
    if not (-30.0 <= d.snr_db[0] and d.snr_db[1] <= 60.0):
        problems.append(f"snr_db = {d.snr_db[0]}:{d.snr_db[1]}: use -30 to 60 dB")
    if not (-30.0 <= d.offscreen_db[0] and d.offscreen_db[1] <= 30.0):
        problems.append(f"offscreen_db = {d.offscreen_db[0]}:{d.offscreen_db[1]}: use -30 to 30 dB")
    return problems


def parse_difficulty(preset: str = "easy", knobs: Mapping[str, Any] | None = None, *, n_classes: int = 10,
                     where: str = "synthetic") -> Difficulty:
    """``PRESETS[preset]`` with ``knobs`` (name -> value; ranges as ``LOW:HIGH`` strings or pairs) over it.

    Raises DataError naming ``where`` and every bad knob at once.
    """
    if preset not in PRESETS:
        raise DataError(f"{where}: unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    values = dataclasses.asdict(PRESETS[preset])
    problems = []
    for key, value in (knobs or {}).items():
        if key not in values:
            problems.append(f"unknown knob {key!r}; knobs: {', '.join(values)}")
            continue
        try:
            values[key] = _coerce(key, value)
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise DataError(f"{where}: bad difficulty knobs", problems)
    difficulty = Difficulty(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    problems = _problems(difficulty, n_classes)
    if problems:
        raise DataError(f"{where}: bad difficulty knobs", problems)
    return difficulty


def from_params(params: Mapping[str, Any]) -> Difficulty:
    """The difficulty recorded in a benchmark.json's ``params`` (absent: the easy defaults)."""
    recorded = params.get("difficulty")
    if not recorded:
        return Difficulty()
    return parse_difficulty("easy", recorded, n_classes=int(params.get("n_classes", 10)), where="benchmark.json")
