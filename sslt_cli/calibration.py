""""Is the sound visible?": a model's map maximum made comparable, from its own validation set.

The maximum cosine of a localisation map depends on the model (its training, its temperature, its data): 0.4 may be
high for one model and low for another. :func:`compute_calibration` runs the model on a prepared set twice: each
frame with its own audio (matched: the sound's source is on screen) and with the audio of another clip, of another
class where labels are known (mismatched: what the model gives a sound whose source is not in the picture). A new
frame's maximum is then placed in both distributions (:meth:`Calibration.scores`):

* ``visible`` = the share of mismatched validation pairs whose maximum is below this frame's (ties count half):
  0.99 means a higher peak than 99% of sounds whose source was off screen;
* ``matched_percentile`` = the same share among matched pairs: 0.5 means a typical on-screen source.

Limits: both are only as good as the validation set's resemblance to the user's video (the synthetic benchmark says
little about street recordings), mismatched pairs stand in for off-screen sound, and the distributions are those of
the window the validation clips were cut to (the recipe's clip length).

The distributions are stored in ``<run>/calibration.json`` keyed by the checkpoint's step and the set, so they are
computed once per checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from sslt_cli.data.manifest import Clip, read_set
from sslt_cli.errors import DataError
from sslt_cli.runs import atomic_write_text

FORMAT = "sslt-calibration/1"
FILE = "calibration.json"
MAX_CLIPS = 1000  # enough for percentiles to 0.1%; a large validation set would otherwise cost minutes


@dataclass(frozen=True)
class Calibration:
    """Sorted map maxima of matched and mismatched validation pairs, and the set they came from."""

    matched: np.ndarray
    mismatched: np.ndarray
    set_path: str
    step: int | None

    def scores(self, max_cos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(visible, matched_percentile) of each map maximum, both in [0, 1]: max_cos (N,) -> two (N,) arrays."""
        return _mid_rank(self.mismatched, max_cos), _mid_rank(self.matched, max_cos)

    def to_dict(self) -> dict[str, Any]:
        return {"set": self.set_path, "step": self.step, "n": int(len(self.matched)),
                "matched": [round(float(v), 6) for v in self.matched],
                "mismatched": [round(float(v), 6) for v in self.mismatched]}

    def summary(self) -> dict[str, Any]:
        """Medians and size, for reports (the full distributions stay in calibration.json)."""
        return {"set": self.set_path, "step": self.step, "n_pairs": int(len(self.matched)),
                "matched_median": float(np.median(self.matched)),
                "mismatched_median": float(np.median(self.mismatched))}


def _mid_rank(reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Share of ``reference`` (sorted) below each value, ties counted half."""
    values = np.asarray(values, dtype=np.float64)
    below = np.searchsorted(reference, values, side="left")
    at_or_below = np.searchsorted(reference, values, side="right")
    return (below + at_or_below) / (2.0 * len(reference))


def mismatched_partners(clips: Sequence[Clip]) -> list[int]:
    """For each clip, the index of a clip whose audio it is paired with: half the set away, moved on to the next
    clip of another label where labels are known. Raises DataError for fewer than two clips."""
    n = len(clips)
    if n < 2:
        raise DataError(f"calibration needs at least 2 clips with frame and audio, got {n}")
    partners = []
    for i, clip in enumerate(clips):
        offsets = [(n // 2 + k) % n for k in range(n)]
        candidates = [(i + off) % n for off in offsets if off != 0]
        other_label = [j for j in candidates if clip.label and clips[j].label and clips[j].label != clip.label]
        partners.append((other_label or candidates)[0])
    return partners


def compute_calibration(loaded: Any, set_path: str | Path, device: Any, *, batch_size: int | None = None,
                        progress: Callable[[int], None] | None = None) -> Calibration:
    """Map maxima of ``loaded``'s model on a prepared set (first ``MAX_CLIPS`` clips), matched and mismatched.

    Frames are squashed to the model's square input (``resize_square``), as ``sslt localize`` feeds video frames.
    """
    from sslt_cli.evaluate import get_protocol, predict_maps

    clip_set = read_set(set_path)
    clips = clip_set.clips[:MAX_CLIPS]
    partners = mismatched_partners(clips)
    protocol = dataclasses.replace(get_protocol(loaded.recipe.eval.protocol), image_preprocessing="resize_square")
    matched, skipped = predict_maps(loaded, clips, protocol, device=device, batch_size=batch_size, num_workers=0,
                                    progress=progress)
    pairs = [(f"{clip.id}+{clips[j].id}", clip, clips[j]) for clip, j in zip(clips, partners)]
    mismatched, _ = predict_maps(loaded, [], protocol, device=device, batch_size=batch_size, num_workers=0,
                                 pairs=pairs, progress=progress)
    if len(matched) < 2 or len(mismatched) < 2:
        raise DataError(f"{set_path}: too few decodable clips to calibrate ({len(matched)} of {len(clips)}; "
                        f"{len(skipped)} could not be decoded)")
    return Calibration(np.sort([float(m.max()) for m in matched.values()]),
                       np.sort([float(m.max()) for m in mismatched.values()]), str(Path(set_path).resolve()),
                       loaded.step)


def _entry_key(step: int | None, set_path: str) -> str:
    return f"step {step if step is not None else '-'} | {set_path}"


def cached_calibration(folder: Path, step: int | None, set_path: str | Path) -> Calibration | None:
    """The stored calibration of this step on this set from ``folder/calibration.json``, or None."""
    try:
        doc = json.loads((folder / FILE).read_text())
    except (OSError, ValueError):
        return None
    entry = doc.get("entries", {}).get(_entry_key(step, str(Path(set_path).resolve()))) if doc.get("format") == FORMAT \
        else None
    if not entry:
        return None
    return Calibration(np.sort(np.asarray(entry["matched"], float)), np.sort(np.asarray(entry["mismatched"], float)),
                       entry["set"], entry["step"])


def store_calibration(folder: Path, calibration: Calibration) -> Path:
    """Add (or replace) this calibration's entry in ``folder/calibration.json``."""
    path = folder / FILE
    try:
        doc = json.loads(path.read_text())
        entries = doc["entries"] if doc.get("format") == FORMAT else {}
    except (OSError, ValueError, KeyError):
        entries = {}
    entries[_entry_key(calibration.step, calibration.set_path)] = calibration.to_dict()
    return atomic_write_text(path, json.dumps({"format": FORMAT, "entries": entries}, indent=1) + "\n")


def calibration_for(loaded: Any, run_dir: Path | None, calibrate_on: Path | None, cache_dir: Path,
                    device: Any) -> tuple[Calibration | None, str]:
    """The calibration to score frames with, and a sentence for the user saying where it came from (or why none).

    The set is ``calibrate_on``, else the run's validation set. Stored in the run folder (else ``cache_dir``) and
    read from there when present.
    """
    if calibrate_on is None and run_dir is None:
        return None, ("uncalibrated: this checkpoint comes without a validation set, so 'visible' is not computed "
                      "and the map maximum is not comparable across models; pass --calibrate-on SET (a prepared "
                      "set folder) to calibrate it")
    if calibrate_on is None and not loaded.recipe.data.val:
        return None, "uncalibrated: the run's recipe has no validation set (data.val); pass --calibrate-on SET"
    set_path = Path(calibrate_on) if calibrate_on is not None else loaded.recipe.data.set_path(loaded.recipe.data.val)
    if not set_path.is_dir():
        return None, (f"uncalibrated: the validation set {set_path} is not here (paths in a recipe are relative to "
                      f"the folder training ran in); pass --calibrate-on SET")
    folder = run_dir if run_dir is not None else cache_dir
    calibration = cached_calibration(folder, loaded.step, set_path)
    where = "read from"
    if calibration is None:
        calibration = compute_calibration(loaded, set_path, device)
        store_calibration(folder, calibration)
        where = "computed and stored in"
    return calibration, (f"calibrated on {len(calibration.matched)} matched and mismatched pairs of {set_path} "
                         f"({where} {folder / FILE})")
