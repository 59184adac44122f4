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

When the set has boxes, the negative-audio evaluation of ``sslt eval --negatives`` runs on it too
(:func:`negative_figures`: AP, max-F1, pIA and F per kind of negative audio), what ``sslt localize``'s page shows
beside each frame's confidence. The distributions and figures are stored in ``<run>/calibration.json`` keyed by the
checkpoint's step and the set, so they are computed once per checkpoint.
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
    negatives: dict[str, Any] | None = None  # the negative-audio figures of the set (negative_figures)

    def scores(self, max_cos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(visible, matched_percentile) of each map maximum, both in [0, 1]: max_cos (N,) -> two (N,) arrays."""
        return _mid_rank(self.mismatched, max_cos), _mid_rank(self.matched, max_cos)

    def to_dict(self) -> dict[str, Any]:
        return {"set": self.set_path, "step": self.step, "n": int(len(self.matched)),
                "matched": [round(float(v), 6) for v in self.matched],
                "mismatched": [round(float(v), 6) for v in self.mismatched], "negatives": self.negatives}

    def summary(self) -> dict[str, Any]:
        """Medians and size, for reports (the full distributions stay in calibration.json), and the negative-audio
        figures of the set."""
        return {"set": self.set_path, "step": self.step, "n_pairs": int(len(self.matched)),
                "matched_median": float(np.median(self.matched)),
                "mismatched_median": float(np.median(self.mismatched)), "negatives": self.negatives}

    def negatives_line(self) -> str:
        """The negative-audio figures in one sentence (for the page), or why there are none."""
        figures = self.negatives
        if not figures:
            return ("negative audio on the calibration set: not computed (the set has no boxes, or the calibration "
                    "was stored by an earlier sslt)")
        kinds = "; ".join(f"{k}: AP {100 * v['ap']:.1f}, max-F1 {100 * v['max_f1']:.1f}, pIA {100 * v['pia']:.1f}, "
                          f"F {100 * v['f']:.1f}" for k, v in figures["kinds"].items())
        return (f"negative audio on the calibration set ({figures['n']} clips with boxes, cIoU "
                f"{100 * figures['ciou']:.1f}; threshold {figures['threshold']:g}; confidence = mean of the top "
                f"quarter of the map on the common scale, as sslt eval --negatives scores it): {kinds}")


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
                       loaded.step, negative_figures(loaded, clip_set, device, batch_size=batch_size))


def negative_figures(loaded: Any, clip_set: Any, device: Any, *, batch_size: int | None = None
                     ) -> dict[str, Any] | None:
    """The negative-audio evaluation (``sslt eval --negatives``) of the model on the calibration set's first
    ``MAX_CLIPS`` clips with boxes: per kind (silence, noise, and off-screen when the clips have labels) SLAVC's AP,
    max-F1, precision and vssl_eval's pIA and F at the universal threshold; None for a set without boxes."""
    from sslt_cli.data.negatives import NegativeSettings
    from sslt_cli.evaluate import EvalOptions, NegativeOptions, evaluate_model, load_test_set

    if not clip_set.anno_kind:
        return None
    test = load_test_set(clip_set.root)
    test.ids = [cid for cid in test.ids if cid in test.clips and cid in test.annotations][:MAX_CLIPS]
    kinds = ("silence", "noise") + (("offscreen",) if any(test.clips[c].label for c in test.ids) else ())
    options = EvalOptions(negatives=NegativeOptions(NegativeSettings(kinds)), baselines=False, save_maps=False,
                          object_guidance=False, batch_size=batch_size, num_workers=0, device=str(device))
    result = evaluate_model(loaded, test, options)
    negatives = result.negatives
    universal = negatives.vssl["universal"]
    return {"n": negatives.n_positive, "ciou": float(result.method["ciou"]),
            "threshold": float(negatives.thresholds["universal"]),
            "kinds": {kind: {"ap": negatives.slavc[kind]["ap"], "max_f1": negatives.slavc[kind]["max_f1"],
                             "precision": negatives.slavc[kind]["precision"],
                             "pia": universal["types"][kind]["pia"], "f": universal["types"][kind]["f"]}
                      for kind in kinds if kind in universal["types"]}}


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
                       entry["set"], entry["step"], entry.get("negatives"))


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
