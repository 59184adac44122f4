"""Negative audio: the sound a frame is paired with when nothing it shows is sounding.

Three kinds, after vssl_eval (xavijuanola/vssl_eval ``datasets/datasets.py``):

* ``silence``: digital silence, every sample 0 (one waveform for every clip and draw; the front end turns it into the
  dB floor of zero power);
* ``noise``: Gaussian noise at a stated level, the standard deviation of the waveform (default 1.0: vssl_eval's
  ``np.random.normal(0, 1, len(audio))``, unseeded there, seeded here); colour ``white`` (flat spectrum) or ``pink``
  (power falling as 1/f, rescaled to the same standard deviation);
* ``offscreen``: the audio of a clip of another class, vssl_eval's rule: a class drawn uniformly among the classes
  not on screen, then a clip of that class. A frame's on-screen classes are its own label, or, for a frame showing
  several objects (IS3's two-object images), every class of its ``scenes.csv`` row: all of them are excluded.

Draws are seeded: draw d of a run with seed s uses ``SeedSequence([s, d, kind])`` (offscreen: the partner choices in
clip order) and ``SeedSequence([s, d, kind, clip index])`` (noise: each clip's own generator, whose first state word
is recorded), so a result can be reproduced from ``negatives.csv`` alone. Silence is the same in every draw.

``scenes.csv`` (in a prepared set's folder or the folder above it, optional): ``clip_id,on_screen_classes`` with the
classes on screen joined by ``;`` (the synthetic benchmark writes it, with more columns, for all its sets), and
optionally ``image``, the image a sample shows (IS3: the two samples of one two-object image).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from sslt_cli.data.manifest import Clip, atomic_write_bytes
from sslt_cli.errors import DataError

NEGATIVE_TYPES = ("silence", "noise", "offscreen")
NOISE_COLOURS = ("white", "pink")
DEFAULT_NOISE_LEVEL = 1.0
SCENES = "scenes.csv"
_KIND_INDEX = {name: i for i, name in enumerate(NEGATIVE_TYPES)}


@dataclass(frozen=True)
class NegativeSettings:
    """Which negatives and how: ``types`` (a subset of NEGATIVE_TYPES, in that order), ``draws`` (>= 1),
    ``noise_level`` (standard deviation of the noise waveform), ``noise_colour`` (white | pink), ``seed``."""

    types: tuple[str, ...]
    draws: int = 1
    noise_level: float = DEFAULT_NOISE_LEVEL
    noise_colour: str = "white"
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [t for t in self.types if t not in NEGATIVE_TYPES]
        if unknown or not self.types:
            raise DataError(f"unknown negative audio {', '.join(unknown) or '(none given)'}; choose from "
                            f"{', '.join(NEGATIVE_TYPES)}")
        if self.draws < 1:
            raise DataError(f"--draws must be at least 1, got {self.draws}")
        if self.noise_colour not in NOISE_COLOURS:
            raise DataError(f"unknown noise colour {self.noise_colour!r}; choose {' or '.join(NOISE_COLOURS)}")
        if not (self.noise_level > 0 and np.isfinite(self.noise_level)):
            raise DataError(f"--noise-level must be a positive number (the noise's standard deviation), got "
                            f"{self.noise_level}")

    def draws_of(self, kind: str) -> int:
        """How many distinct draws a kind has: silence has one, whatever ``draws`` says."""
        return 1 if kind == "silence" else self.draws


@dataclass(frozen=True)
class Draw:
    """One negative audio of one frame: its kind, draw index, the seed recorded for it (noise: the clip's own
    generator's first state word; offscreen: the draw's seed; silence: None), and for offscreen the partner clip
    whose audio is played and that clip's class."""

    clip_id: str
    kind: str
    draw: int
    seed: int | None = None
    partner: str = ""
    partner_class: str = ""


def _sequence(seed: int, draw: int, kind: str, *more: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(seed), int(draw), _KIND_INDEX[kind], *more])


def noise_waveform(n_samples: int, seed: int, level: float = DEFAULT_NOISE_LEVEL, colour: str = "white"
                   ) -> np.ndarray:
    """Gaussian noise of standard deviation ``level``: (n_samples,) float32 from ``np.random.default_rng(seed)``.

    ``pink``: the white draw's spectrum scaled by 1 / sqrt(f) (power ~ 1/f, no DC), rescaled to std ``level``.
    """
    white = np.random.default_rng(seed).standard_normal(n_samples)
    if colour == "white":
        return (white * level).astype(np.float32)
    if colour != "pink":
        raise DataError(f"unknown noise colour {colour!r}; choose {' or '.join(NOISE_COLOURS)}")
    spectrum = np.fft.rfft(white)
    freqs = np.arange(spectrum.size, dtype=np.float64)
    freqs[0] = np.inf  # no DC
    pink = np.fft.irfft(spectrum / np.sqrt(freqs), n=n_samples)
    return (pink / pink.std() * level).astype(np.float32)


def silence_waveform(n_samples: int) -> np.ndarray:
    """Digital silence: (n_samples,) float32 zeros."""
    return np.zeros(n_samples, dtype=np.float32)


def _scene_rows(path: Path) -> list[dict[str, str]]:
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
    except OSError as exc:
        raise DataError(f"{path}: cannot read the on-screen classes ({exc.strerror})") from None
    if rows and not {"clip_id", "on_screen_classes"} <= set(rows[0]):
        raise DataError(f"{path}: expected the columns clip_id,on_screen_classes, got {','.join(rows[0])}")
    return rows


def read_scenes(path: str | Path) -> dict[str, frozenset[str]]:
    """A ``scenes.csv`` (``clip_id,on_screen_classes,...``, classes joined by ``;``; the synthetic benchmark's has
    more columns) -> {clip id: classes on screen}."""
    return {row["clip_id"]: frozenset(c for c in (row["on_screen_classes"] or "").split(";") if c)
            for row in _scene_rows(Path(path))}


def read_scene_images(path: str | Path) -> dict[str, str]:
    """The ``image`` column of a ``scenes.csv`` (the image a sample shows, shared by the samples of one multi-object
    image: IS3's interactive pairs) -> {clip id: image}; {} when the file has no such column."""
    return {row["clip_id"]: row["image"] for row in _scene_rows(Path(path)) if row.get("image")}


def write_scenes(path: str | Path, scenes: Mapping[str, Sequence[str]],
                 images: Mapping[str, str] | None = None) -> Path:
    """Write a ``scenes.csv`` atomically (rows in the mapping's order, classes sorted); with ``images``, a third
    column ``image`` naming the image each sample shows."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("clip_id", "on_screen_classes") + (("image",) if images is not None else ()))
    for cid, classes in scenes.items():
        writer.writerow((cid, ";".join(sorted(classes))) + ((images.get(cid, ""),) if images is not None else ()))
    atomic_write_bytes(Path(path), buffer.getvalue().encode())
    return Path(path)


def scenes_file(root: str | Path) -> Path | None:
    """The ``scenes.csv`` that describes a prepared set: the set's own, else its benchmark's (the synthetic
    benchmark writes one for all its sets beside them), else None."""
    root = Path(root)
    return next((p for p in (root / SCENES, root.parent / SCENES) if p.is_file()), None)


def clip_classes(clips: Sequence[Clip], labels: Mapping[str, str] | None = None,
                 scenes: Mapping[str, frozenset[str]] | None = None, *, set_name: str = "the set"
                 ) -> tuple[dict[str, frozenset[str]], dict[str, str]]:
    """(on-screen classes of each frame, the class of each clip's audio) for offscreen draws.

    A clip's audio class is ``labels[id]`` when a label file gives one, else its manifest label; its frame's on-screen
    classes are its ``scenes`` row when there is one, else its audio class. Raises DataError naming what is missing
    when no clip has a class.
    """
    audio_class = {c.id: (labels or {}).get(c.id) or c.label for c in clips}
    audio_class = {cid: label for cid, label in audio_class.items() if label}
    scenes = scenes or {}
    on_screen = {c.id: scenes.get(c.id) or (frozenset([audio_class[c.id]]) if c.id in audio_class else frozenset())
                 for c in clips}
    if not audio_class:
        source = ("neither the labels file nor its manifest names a class of its clips" if labels is not None
                  else "its manifest has no label column values")
        raise DataError(f"offscreen negatives need each clip's class, and {set_name} has none: {source}",
                        ["pass --labels FILE (VGGSound's vggsound.csv, an id,label CSV or vggss.json), or drop "
                         "offscreen from --negatives"])
    return on_screen, audio_class


def offscreen_draws(clips: Sequence[Clip], on_screen: Mapping[str, frozenset[str]], audio_class: Mapping[str, str],
                    seed: int, draw: int) -> tuple[list[Draw], list[tuple[str, str]]]:
    """One offscreen draw for every clip: a class not on its screen (uniformly), then a clip of that class
    (uniformly) among ``clips`` with a class. -> (draws, [(clip id, why it has none)])."""
    by_class: dict[str, list[str]] = {}
    for c in clips:
        if c.id in audio_class:
            by_class.setdefault(audio_class[c.id], []).append(c.id)
    classes = sorted(by_class)
    rng = np.random.default_rng(_sequence(seed, draw, "offscreen"))
    recorded = int(_sequence(seed, draw, "offscreen").generate_state(1)[0])
    draws: list[Draw] = []
    missing: list[tuple[str, str]] = []
    for c in clips:
        seen = on_screen.get(c.id, frozenset())
        if not seen:
            missing.append((c.id, "offscreen: the clip has no class, so no class can be excluded"))
            continue
        allowed = [k for k in classes if k not in seen]
        if not allowed:
            missing.append((c.id, f"offscreen: no clip of a class other than {', '.join(sorted(seen))}"))
            continue
        chosen = allowed[int(rng.integers(len(allowed)))]
        partner = by_class[chosen][int(rng.integers(len(by_class[chosen])))]
        draws.append(Draw(c.id, "offscreen", draw, recorded, partner, chosen))
    return draws, missing


def noise_draws(clips: Sequence[Clip], seed: int, draw: int) -> list[Draw]:
    """One noise draw per clip, each with its own recorded seed."""
    return [Draw(c.id, "noise", draw, int(_sequence(seed, draw, "noise", i).generate_state(1)[0]))
            for i, c in enumerate(clips)]


def plan_draws(clips: Sequence[Clip], settings: NegativeSettings,
               classes: tuple[Mapping[str, frozenset[str]], Mapping[str, str]] | None = None
               ) -> tuple[list[Draw], list[tuple[str, str]]]:
    """Every draw of every kind for ``clips`` -> (draws, [(clip id, why an offscreen draw is missing)]).

    ``classes``: :func:`clip_classes`' result, needed when ``offscreen`` is asked for.
    """
    draws: list[Draw] = []
    missing: list[tuple[str, str]] = []
    for kind in settings.types:
        for d in range(settings.draws_of(kind)):
            if kind == "silence":
                draws += [Draw(c.id, "silence", 0) for c in clips]
            elif kind == "noise":
                draws += noise_draws(clips, settings.seed, d)
            else:
                if classes is None:
                    raise DataError("offscreen negatives need the clips' classes (clip_classes)")
                found, lacking = offscreen_draws(clips, classes[0], classes[1], settings.seed, d)
                draws += found
                missing += lacking if d == 0 else []
    return draws, missing
