"""Negative-audio evaluation: the frames of a set with silence, noise or off-screen sound, scored beside the same
model's positive maps (SLAVC's AP / max-F1 / precision, vssl_eval's pIA / AOC / F / stability at the universal and
the per-model threshold, the trivial references), every draw recorded.

Cost: the images are embedded once, in the positive pass; each negative kind adds one audio forward per clip and
draw, run from the positive pass's batch hook on the same visual maps (silence: one forward in all, the same
waveform for every clip). Maps are raw; the metrics put them on the common scale of the family's value range
(:func:`~sslt_cli.evaluate.maps.map_value_range`), never min-max per map.

Precomputed maps (``sslt eval --maps``) need the negative maps too: one ``.npz`` (or a folder of ``.npy``) keyed
``<clip id>@<kind>@<draw>`` (``clip1@silence@0``, ``clip1@noise@2``, ``clip1@offscreen@0``), read by
:func:`parse_negative_maps`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch

from sslt_cli import metrics
from sslt_cli import negative_metrics as NM
from sslt_cli.data.annotations import Annotation
from sslt_cli.data.manifest import Clip
from sslt_cli.data.negatives import NEGATIVE_TYPES, Draw, NegativeSettings, clip_classes, plan_draws
from sslt_cli.errors import DataError
from sslt_cli.evaluate.maps import BatchHook, audio_inputs, embed_audio, map_value_range, maps_of, predict_maps
from sslt_cli.evaluate.scoring import CHUNK, ClipScore, _gt_for, _gt_problem
from sslt_cli.metrics import Protocol

if TYPE_CHECKING:
    from sslt_cli.checkpoint import LoadedModel
    from sslt_cli.evaluate.options import EvalOptions, NegativeOptions
    from sslt_cli.evaluate.sets import TestSet
    from sslt_cli.ogl import ObjectGuidance

FIGURE_CLIPS = 4
PER_MODEL_RULE = ("the threshold of 0.00, 0.01, ..., 1.00 with the highest averaged vssl_eval F (mean IoU of the "
                  "positive maps against the mean over negative kinds of 1 - pIA) on the validation set's maps; the "
                  "lowest on ties")


def negative_key(clip_id: str, kind: str, draw: int) -> str:
    """The key of a negative map in a maps file: ``<clip id>@<kind>@<draw>``."""
    return f"{clip_id}@{kind}@{draw}"


@dataclass
class NegativeMaps:
    """Raw negative maps: ``maps[(kind, draw)][clip id]`` (h, w); the draws they came from; what is missing and why
    (``(clip id, kind, reason)``)."""

    draws: list[Draw] = field(default_factory=list)
    maps: dict[tuple[str, int], dict[str, np.ndarray]] = field(default_factory=dict)
    missing: list[tuple[str, str, str]] = field(default_factory=list)


def parse_negative_maps(maps: Mapping[str, np.ndarray], source: str) -> NegativeMaps:
    """Precomputed negative maps keyed ``<clip id>@<kind>@<draw>`` -> :class:`NegativeMaps` (draws without seeds:
    the file does not say how its audio was made)."""
    out = NegativeMaps()
    bad = []
    for key, m in maps.items():
        parts = key.rsplit("@", 2)
        if len(parts) != 3 or parts[1] not in NEGATIVE_TYPES or not parts[2].isdigit():
            bad.append(key)
            continue
        cid, kind, draw = parts[0], parts[1], int(parts[2])
        out.maps.setdefault((kind, draw), {})[cid] = m
        out.draws.append(Draw(cid, kind, draw))
    if bad or not out.maps:
        raise DataError(f"{source}: negative maps must be keyed <clip id>@<kind>@<draw> with kind one of "
                        f"{', '.join(NEGATIVE_TYPES)} (e.g. clip1@noise@0); {len(bad)} keys are not",
                        [f"bad key: {k}" for k in bad[:5]] or ["the file holds no negative maps"])
    return out


class _NegativeAudio:
    """The positive pass's batch hook: for the batch's frames (their visual maps ``v``), the maps with each planned
    negative audio, one audio forward per kind and draw (silence: embedded once)."""

    def __init__(self, loaded: "LoadedModel", clips: Mapping[str, Clip], draws: Sequence[Draw],
                 settings: NegativeSettings, device: torch.device):
        self.loaded, self.clips, self.settings, self.device = loaded, clips, settings, device
        self.audio = audio_inputs(loaded)
        self.samples = int(round(self.audio.seconds * self.audio.sample_rate))
        self.by_group: dict[tuple[str, int], dict[str, Draw]] = {}
        for d in draws:
            self.by_group.setdefault((d.kind, d.draw), {})[d.clip_id] = d
        self.silence: torch.Tensor | None = None
        self.out = NegativeMaps(draws=list(draws))

    def __call__(self, ids: list, images: torch.Tensor, v: torch.Tensor, a: torch.Tensor, maps: torch.Tensor) -> None:
        from sslt_cli.model import autocast_for

        with autocast_for(self.device, self.loaded.recipe.eval.precision):
            for group, planned in self.by_group.items():
                rows, specs = self._specs(group[0], [(i, planned[cid]) for i, cid in enumerate(ids) if cid in planned])
                if not rows:
                    continue
                audio = self._embedded(group[0], specs, len(rows))
                batch_maps = maps_of(self.loaded, v[rows], audio).cpu().numpy()
                store = self.out.maps.setdefault(group, {})
                for row, m in zip(rows, batch_maps):
                    store[ids[row]] = m

    def _specs(self, kind: str, planned: list[tuple[int, Draw]]) -> tuple[list[int], list[torch.Tensor]]:
        from sslt_cli.data.negatives import noise_waveform

        rows, specs = [], []
        for row, draw in planned:
            if kind == "silence":
                rows.append(row)
                continue
            if kind == "noise":
                specs.append(self.audio.of_wave(noise_waveform(self.samples, int(draw.seed), self.settings.noise_level,
                                                               self.settings.noise_colour)))
            else:
                try:
                    specs.append(self.audio.of_file(self.clips[draw.partner].audio))
                except DataError as exc:
                    self.out.missing.append((draw.clip_id, kind, f"partner {draw.partner}: {exc.message}"))
                    continue
            rows.append(row)
        return rows, specs

    def _embedded(self, kind: str, specs: list[torch.Tensor], count: int) -> torch.Tensor:
        from sslt_cli.data.negatives import silence_waveform

        if kind != "silence":
            return embed_audio(self.loaded.model, torch.stack(specs), self.device)
        if self.silence is None:
            spec = self.audio.of_wave(silence_waveform(self.samples))[None]
            self.silence = embed_audio(self.loaded.model, spec, self.device)
        return self.silence.expand(count, -1)


def predict_with_negatives(loaded: "LoadedModel", clips: Sequence[Clip], proto: Protocol, options: "EvalOptions",
                           negatives: "NegativeOptions", *, set_name: str, scenes: Mapping[str, frozenset] | None,
                           progress: Callable[[int], None] | None = None, on_batch: BatchHook | None = None,
                           ogl: "ObjectGuidance | None" = None
                           ) -> tuple[dict[str, np.ndarray], list[tuple[str, str]], NegativeMaps]:
    """The positive pass of :func:`~sslt_cli.evaluate.maps.predict_maps` with the negative maps of every planned draw
    computed on its visual maps -> (positive maps, clips that could not be decoded, negative maps)."""
    settings = negatives.settings
    classes = (clip_classes(clips, negatives.labels, scenes, set_name=set_name)
               if "offscreen" in settings.types else None)
    draws, lacking = plan_draws(clips, settings, classes)
    device = torch.device(options.device)
    hook = _NegativeAudio(loaded, {c.id: c for c in clips}, draws, settings, device)
    hook.out.missing += [(cid, "offscreen", reason) for cid, reason in lacking]

    def both(ids, images, v, a, maps):
        hook(ids, images, v, a, maps)
        if on_batch is not None:
            on_batch(ids, images, v, a, maps)

    maps, skipped = predict_maps(loaded, clips, proto, device=options.device, batch_size=options.batch_size,
                                 num_workers=options.num_workers, progress=progress, on_batch=both, ogl=ogl)
    return maps, skipped, hook.out


# ----------------------------------------------------------------------------------------------------- scoring

def _upsampled(maps: Sequence[np.ndarray], proto: Protocol) -> torch.Tensor:
    """Maps of any sizes, upsampled by the protocol (grouped by shape), in their order: (B, S, S)."""
    out = torch.empty((len(maps), proto.size, proto.size))
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(maps):
        by_shape.setdefault(np.shape(m), []).append(i)
    for index in by_shape.values():
        batch = torch.from_numpy(np.stack([np.asarray(maps[i], np.float32) for i in index]))
        out[index] = metrics.upsample_maps(batch, proto.upsample, proto.size)
    return out


@dataclass
class _PerClip:
    """Per-clip numbers of one chunk pass: positive confidence and thresholded IoU (one per threshold); per
    (kind, draw): {clip id: (confidence, [pIA per threshold], [stability per threshold])}."""

    confidence: dict[str, float] = field(default_factory=dict)
    iou_t: dict[str, list[float]] = field(default_factory=dict)
    negative: dict[tuple[str, int], dict[str, tuple[float, list[float], list[float]]]] = field(default_factory=dict)


def _per_clip(scored: Sequence[str], pos_maps: Mapping[str, np.ndarray], neg: NegativeMaps,
              annotations: Mapping[str, Annotation], proto: Protocol, value_range: tuple[float, float],
              thresholds: Sequence[float]) -> _PerClip:
    """Confidence, pIA, stability and thresholded IoU of every scored clip and its negative maps, CHUNK at a time."""
    out = _PerClip()
    for start in range(0, len(scored), CHUNK):
        chunk = list(scored[start:start + CHUNK])
        up = _upsampled([pos_maps[c] for c in chunk], proto)
        gt = torch.from_numpy(np.stack([_gt_for(annotations[c], proto) for c in chunk]))
        scaled = NM.common_scale(up, value_range)
        conf = metrics.slavc_confidence(up, value_range).numpy()
        pos_masks = [NM.above(scaled, t) for t in thresholds]
        ious = [NM.threshold_ious(m, gt) for m in pos_masks]
        for i, cid in enumerate(chunk):
            out.confidence[cid] = float(conf[i])
            out.iou_t[cid] = [float(iou[i]) for iou in ious]
        for group, store in neg.maps.items():
            rows = [i for i, cid in enumerate(chunk) if cid in store]
            if not rows:
                continue
            neg_up = _upsampled([store[chunk[i]] for i in rows], proto)
            neg_scaled = NM.common_scale(neg_up, value_range)
            neg_conf = metrics.slavc_confidence(neg_up, value_range).numpy()
            masks = [NM.above(neg_scaled, t) for t in thresholds]
            pias = [NM.pia(m) for m in masks]
            stabs = [NM.stability_iou(p[rows], m) for p, m in zip(pos_masks, masks)]
            target = out.negative.setdefault(group, {})
            for j, i in enumerate(rows):
                target[chunk[i]] = (float(neg_conf[j]), [float(p[j]) for p in pias], [float(s[j]) for s in stabs])
    return out


def _mean_std(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The mean of each number over ``items`` (one per draw) and, beside it, ``<key>_std`` (population std);
    nested dicts recursively; other values from the first item."""
    out: dict[str, Any] = {}
    for key, first in items[0].items():
        if isinstance(first, Mapping):
            out[key] = _mean_std([item[key] for item in items])
        elif isinstance(first, (int, float)) and not isinstance(first, bool):
            column = np.asarray([float(item[key]) for item in items])
            out[key] = float(column.mean())
            if not key.startswith("n_") and key != "threshold":
                out[f"{key}_std"] = float(column.std())
        else:
            out[key] = first
    return out


@dataclass
class NegativesResult:
    """What the negative-audio evaluation of one set gives.

    ``slavc[kind | "all"]``: AP, max-F1, precision (and SLAVC-sampled AP / max-F1), mean and ``*_std`` over draws;
    ``vssl["universal" | "per_model"]``: mean IoU, AUC, per kind ``types[kind]`` pIA / AOC / F / F(AUC, AOC) /
    stability, and ``mean`` over kinds, each with ``*_std`` over draws; ``references[name]``: the same for the
    trivial references; ``thresholds``: the universal and per-model thresholds, the rule and the set it was chosen
    on; ``rows``: one per negative map (negatives.csv); ``missing``: (clip, kind, reason) of draws without a map;
    ``figure``: a few clips' raw maps (``positive`` and each kind's first draw) for the picture.
    """

    settings: dict[str, Any]
    value_range: tuple[float, float]
    thresholds: dict[str, Any]
    n_positive: int
    slavc: dict[str, dict[str, Any]]
    vssl: dict[str, dict[str, Any]]
    references: dict[str, dict[str, Any]]
    rows: list[dict[str, Any]] = field(default_factory=list)
    missing: list[tuple[str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figure: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The ``negatives`` block of metrics.json (rows and maps stay in negatives.csv and the picture)."""
        return {"settings": self.settings, "value_range": list(self.value_range), "thresholds": self.thresholds,
                "n_positive": self.n_positive, "slavc": self.slavc, "vssl": self.vssl,
                "references": self.references, "missing": len(self.missing), "notes": self.notes}

    def headline(self) -> dict[str, float]:
        """The numbers a run's metrics.jsonl record keeps: pooled AP / max-F1 / precision and the averaged F."""
        pooled = self.slavc.get("all", {})
        out = {f"negatives/{k}": float(pooled[k]) for k in ("ap", "max_f1", "precision") if k in pooled}
        mean = self.vssl.get("universal", {}).get("mean", {})
        out.update({f"negatives/{k}": float(mean[k]) for k in ("f", "pia") if k in mean})
        return out


def _kinds(neg: NegativeMaps) -> list[str]:
    return [k for k in NEGATIVE_TYPES if any(kind == k for kind, _ in neg.maps)]


def _draw_of(neg: NegativeMaps, kind: str, draw: int) -> tuple[str, int] | None:
    """The (kind, draw) group standing for draw ``draw`` of a kind: silence has one draw for all."""
    draws = sorted(d for k, d in neg.maps if k == kind)
    return (kind, draws[min(draw, len(draws) - 1)]) if draws else None


def _summaries(scored: Sequence[str], iou_rule: Mapping[str, float], clip: _PerClip, neg: NegativeMaps,
               thresholds: Mapping[str, float]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(SLAVC numbers by kind and pooled, vssl numbers by threshold), each the mean and std over draws."""
    kinds = _kinds(neg)
    n_draws = max((d for _, d in neg.maps), default=0) + 1
    pos_conf = np.array([clip.confidence[c] for c in scored])
    pos_iou = np.array([iou_rule[c] for c in scored])
    slavc_draws: list[dict[str, Any]] = []
    vssl_draws: list[dict[str, Any]] = []
    for d in range(n_draws):
        groups = {k: _draw_of(neg, k, d) for k in kinds}
        per_kind = {k: np.array([v[0] for v in clip.negative.get(g, {}).values()]) for k, g in groups.items()}
        entry = {k: NM.slavc_summary(pos_conf, pos_iou, conf) for k, conf in per_kind.items() if conf.size}
        entry["all"] = NM.slavc_summary(pos_conf, pos_iou, np.concatenate(list(per_kind.values())))
        slavc_draws.append(entry)
        vssl_entry = {}
        for t_index, (name, t) in enumerate(thresholds.items()):
            iou_t = np.array([clip.iou_t[c][t_index] for c in scored])
            pias = {k: np.array([v[1][t_index] for v in clip.negative.get(g, {}).values()]) for k, g in groups.items()}
            stabs = {k: np.array([v[2][t_index] for v in clip.negative.get(g, {}).values()]) for k, g in groups.items()}
            vssl_entry[name] = NM.vssl_summary(iou_t, pias, stabs, t)
        vssl_draws.append(vssl_entry)
    return _mean_std(slavc_draws), _mean_std(vssl_draws)


def _references(scored: Sequence[str], annotations: Mapping[str, Annotation], proto: Protocol, kinds: Sequence[str],
                thresholds: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """The trivial references' SLAVC and vssl numbers on the scored clips, one negative per clip and kind."""
    out: dict[str, dict[str, Any]] = {}
    for name in NM.REFERENCES:
        arrays: dict[str, dict[str, list[np.ndarray]]] = {t: {} for t in thresholds}
        for start in range(0, len(scored), CHUNK):
            gt = torch.from_numpy(np.stack([_gt_for(annotations[c], proto) for c in scored[start:start + CHUNK]]))
            for t_name, t in thresholds.items():
                for key, values in NM.reference_arrays(name, gt, proto, t).items():
                    arrays[t_name].setdefault(key, []).append(values)
        joined = {t: {k: np.concatenate(v) for k, v in a.items()} for t, a in arrays.items()}
        first = next(iter(joined.values()))
        slavc = {k: NM.slavc_summary(first["confidence"], first["iou"], first["neg_confidence"]) for k in kinds}
        slavc["all"] = NM.slavc_summary(first["confidence"], first["iou"],
                                        np.concatenate([first["neg_confidence"]] * len(kinds)))
        vssl = {t_name: NM.vssl_summary(a["iou_t"], {k: a["pia"] for k in kinds}, {k: a["stability"] for k in kinds},
                                        thresholds[t_name]) for t_name, a in joined.items()}
        out[name] = {"slavc": slavc, "vssl": vssl}
    return out


def _rows(neg: NegativeMaps, clip: _PerClip, thresholds: Mapping[str, float]) -> list[dict[str, Any]]:
    """negatives.csv: one row per negative map scored, with its draw's record."""
    draws = {(d.clip_id, d.kind, d.draw): d for d in neg.draws}
    rows = []
    for (kind, draw), store in neg.maps.items():
        for cid, (conf, pias, stabs) in clip.negative.get((kind, draw), {}).items():
            record = draws.get((cid, kind, draw), Draw(cid, kind, draw))
            row = {"id": cid, "kind": kind, "draw": draw, "seed": "" if record.seed is None else record.seed,
                   "partner": record.partner, "partner_class": record.partner_class,
                   "positive_confidence": clip.confidence[cid], "confidence": conf}
            for index, name in enumerate(thresholds):
                row[f"pia_{name}"] = pias[index]
                row[f"stability_{name}"] = stabs[index]
            rows.append(row)
    return rows


def score_negatives(pos_maps: Mapping[str, np.ndarray], neg: NegativeMaps, positive_rows: Sequence[ClipScore],
                    annotations: Mapping[str, Annotation], proto: Protocol, value_range: tuple[float, float],
                    negatives: "NegativeOptions", per_model: Mapping[str, Any] | None = None) -> NegativesResult:
    """Score the negative maps of the clips the positive evaluation scored (``positive_rows``: their IoU under the
    protocol's rule is the sounding IoU of SLAVC's route). ``per_model``: :func:`per_model_threshold`'s result."""
    scored = [r.id for r in positive_rows]
    iou_rule = {r.id: r.iou for r in positive_rows}
    thresholds = {"universal": float(negatives.threshold)}
    if per_model is not None:
        thresholds["per_model"] = float(per_model["threshold"])
    neg.maps = {g: {c: m for c, m in store.items() if c in iou_rule} for g, store in neg.maps.items()}
    if not any(neg.maps.values()):
        raise DataError("no negative map belongs to a scored clip: nothing to score the negatives on",
                        [f"{cid} ({kind}): {reason}" for cid, kind, reason in neg.missing[:5]])
    clip = _per_clip(scored, pos_maps, neg, annotations, proto, value_range, list(thresholds.values()))
    slavc, vssl = _summaries(scored, iou_rule, clip, neg, thresholds)
    notes = [f"negative audio: {len(neg.missing)} draws have no map (listed in negatives.csv's notes)"] \
        if neg.missing else []
    if per_model is None:
        notes.append("per-model threshold: not computed (no validation set with boxes; give --negatives-val SET)")
    settings = negatives.settings
    best = sorted(scored, key=lambda c: (-iou_rule[c], c))[:FIGURE_CLIPS]
    figure = {c: {"positive": pos_maps[c], **{k: neg.maps[g][c] for k in _kinds(neg)
                                              if (g := _draw_of(neg, k, 0)) and c in neg.maps[g]}} for c in best}
    return NegativesResult(
        settings={"types": list(settings.types), "draws": settings.draws, "noise_level": settings.noise_level,
                  "noise_colour": settings.noise_colour, "seed": settings.seed},
        value_range=tuple(value_range),
        thresholds={**thresholds, **({"per_model_set": per_model["set"], "per_model_f": per_model["f"],
                                      "per_model_n": per_model["n"]} if per_model else {}),
                    "per_model_rule": PER_MODEL_RULE},
        n_positive=len(scored), slavc=slavc, vssl=vssl,
        references=_references(scored, annotations, proto, _kinds(neg), thresholds),
        rows=_rows(neg, clip, thresholds), missing=list(neg.missing), notes=notes, figure=figure)


def per_model_threshold(loaded: "LoadedModel", validation: "TestSet", proto: Protocol, options: "EvalOptions",
                        negatives: "NegativeOptions", scenes: Mapping[str, frozenset] | None = None
                        ) -> dict[str, Any]:
    """The per-model threshold chosen on ``validation`` (never the test set) by :data:`PER_MODEL_RULE`: the model's
    positive and negative maps of the validation clips with usable boxes, IoU and pIA curves over
    :data:`~sslt_cli.negative_metrics.THRESHOLD_GRID` -> {threshold, f, set, n}."""
    clips = [validation.clips[c] for c in validation.ids if c in validation.clips and c in validation.annotations
             and _gt_problem(validation.annotations[c], proto) is None]
    if len(clips) < 2:
        raise DataError(f"the validation set {validation.name} has {len(clips)} clips with frame, audio and usable "
                        f"boxes; the per-model threshold needs some (give another --negatives-val SET)")
    pos_maps, _, neg = predict_with_negatives(loaded, clips, proto, options, negatives, set_name=validation.name,
                                              scenes=scenes)
    value_range = map_value_range(loaded)
    ids = [c.id for c in clips if c.id in pos_maps]
    iou_parts, pia_parts = [], {}
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start:start + CHUNK]
        gt = torch.from_numpy(np.stack([_gt_for(validation.annotations[c], proto) for c in chunk]))
        scaled = NM.common_scale(_upsampled([pos_maps[c] for c in chunk], proto), value_range)
        iou_parts.append(NM.threshold_curves(scaled, gt, NM.THRESHOLD_GRID)[1])
        for (kind, _), store in neg.maps.items():
            present = [store[c] for c in chunk if c in store]
            if present:
                neg_scaled = NM.common_scale(_upsampled(present, proto), value_range)
                pia_parts.setdefault(kind, []).append(NM.threshold_curves(neg_scaled, None, NM.THRESHOLD_GRID)[0])
    t, f = NM.choose_threshold(np.concatenate(iou_parts, axis=1),
                               {k: np.concatenate(v, axis=1) for k, v in pia_parts.items()})
    return {"threshold": t, "f": f, "set": validation.name, "n": len(ids)}
