"""Scoring maps under a protocol: per-clip IoU, pointing game and predicted area, cIoU / AUC / mean IoU, the
baselines on the same clips, the N accounting; SLAVC's extended evaluation (AP and max-F1 with non-sounding pairs).

How N is reached (``EvalResult.accounting``, in this order): the requested ids (the list, else every annotated clip),
minus those without an annotation, minus those whose frame or audio is unavailable (model path only), minus those
without a map, minus those excluded while scoring (empty ground truth, e.g. after clipping boxes to [0, 1]; an
unusable box; a map that is not finite) = the scored clips. Every dropped id is listed with its stage and reason.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from sslt_cli import metrics, published
from sslt_cli.data.annotations import Annotation
from sslt_cli.errors import DataError
from sslt_cli.evaluate.options import get_protocol
from sslt_cli.evaluate.sets import silent_pair_key
from sslt_cli.metrics import Protocol

CHUNK = 64  # clips per scoring batch: a (64, 224, 224) float32 tensor is 13 MB
RANDOM_SEEDS = (0, 1, 2)
STAGES = ("no annotation", "no frame/audio", "no map", "excluded")
BASELINE_LABELS = {
    "centre": "centre prior",
    "random": "random map",
    "whole_frame": "whole frame",
    "oracle": "oracle ceiling",
}


@dataclass(frozen=True)
class ClipScore:
    """One scored clip: IoU, hit (IoU >= 0.5), GT area and predicted area (shares of the frame), pointing score."""

    id: str
    iou: float
    hit: bool
    gt_area: float
    pointing: float
    pred_area: float


@dataclass(frozen=True)
class Exclusion:
    """A requested clip that was not scored: the stage where it dropped out (one of ``STAGES``) and why."""

    id: str
    stage: str
    reason: str


@dataclass
class ExtendedResult:
    """SLAVC-style extended evaluation over sounding pairs (with boxes) and non-sounding pairs (see score_extended)."""

    protocol: str
    value_range: tuple[float, float]
    iou_threshold: float
    n_sounding: int
    n_silent: int
    ap: float
    ap_slavc: float
    max_f1: float
    max_f1_slavc: float
    excluded: list[Exclusion] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["excluded"] = [dataclasses.asdict(e) for e in self.excluded]
        return out


@dataclass
class EvalResult:
    """Everything an evaluation produced: per-clip rows, summaries, baselines, the N accounting, exclusions.

    ``method`` and each baseline are dicts of ``ciou``, ``auc``, ``mean_iou``, ``pointing``, ``pred_area`` (fractions)
    and ``n``; ``random`` adds ``<metric>_std`` over its seeds and ``seeds``. ``method`` is None when only the
    baselines were computed.
    """

    name: str
    protocol: Protocol
    rows: list[ClipScore]
    method: dict[str, float] | None
    baselines: dict[str, dict[str, Any]]
    accounting: dict[str, int]
    excluded: list[Exclusion]
    notes: list[str] = field(default_factory=list)
    extended: ExtendedResult | None = None
    published: dict[str, Any] | None = None  # the papers' numbers when the requested set is a published list
    object_guidance: dict[str, Any] | None = None  # EZ-VSL's OGL when the scored maps are its combination
    negatives: Any = None  # evaluate.negatives.NegativesResult (options.negatives), set by the orchestrator
    interactive: dict[str, Any] | None = None  # IS3's metrics when the set's samples share images (score_interactive)

    @property
    def n(self) -> int:
        """Clips scored."""
        return self.accounting["scored"]

    def n_explained(self) -> str:
        """How N was reached, e.g. ``5158 requested - 2 excluded (empty ground truth ...) = 5156 scored``."""
        a = self.accounting
        parts = [f"{a['requested']} requested"]
        for stage, key in zip(STAGES, ("no_annotation", "no_frame_audio", "no_map", "excluded")):
            if a[key]:
                kinds = Counter(_reason_kind(e.reason) for e in self.excluded if e.stage == stage)
                detail = "; ".join(f"{count} {kind}" for kind, count in kinds.most_common())
                label = {"no annotation": "without annotation", "no frame/audio": "without frame/audio",
                         "no map": "without a map", "excluded": "excluded"}[stage]
                parts.append(f"- {a[key]} {label} ({detail})")
        text = " ".join(parts) + f" = {a['scored']} scored"
        if a.get("maps_unused"):
            text += f" (ignored the maps of {a['maps_unused']} clips that were not requested)"
        return text


def _reason_kind(reason: str) -> str:
    """The reason up to its first colon: groups 'frame file missing: /a' and 'frame file missing: /b'."""
    return reason.split(":", 1)[0]


def _dedupe(ids: Sequence[str]) -> tuple[list[str], int]:
    """Ids in first-seen order, and how many repeats were dropped."""
    unique = list(dict.fromkeys(ids))
    return unique, len(ids) - len(unique)


def _map_problem(array: np.ndarray) -> str | None:
    array = np.asarray(array)
    if array.ndim != 2 or 0 in array.shape:
        return f"invalid map: shape {tuple(array.shape)}, expected a 2-D (h, w) map"
    with np.errstate(over="ignore", invalid="ignore"):  # scored in float32: 1e300 becomes inf there
        bad = int(array.size - np.isfinite(array.astype(np.float32)).sum())
    if bad:
        return f"invalid map: {bad} non-finite values (NaN or inf)"
    return None


def _gt_for(annotation: Annotation, protocol: Protocol) -> np.ndarray:
    return metrics.gt_map(annotation.boxes, annotation.kind, protocol.size, protocol.clip_boxes)


def _gt_problem(annotation: Annotation, protocol: Protocol) -> str | None:
    try:
        gt = _gt_for(annotation, protocol)
    except ValueError as exc:
        return f"unusable box: {exc}"
    if not gt.any() and protocol.empty_gt == "exclude":
        boxes = [list(b) for b in annotation.boxes]
        if annotation.kind == "vggss" and protocol.clip_boxes:
            return f"empty ground truth after clipping boxes to [0, 1]: {boxes}"
        return f"empty ground truth: {boxes}"
    return None


def _stage_summary(values: dict[str, np.ndarray]) -> dict[str, float]:
    return metrics.summarise(values["iou"], values["pointing"], values["pred_area"])


def score_maps(maps: Mapping[str, np.ndarray] | None, annotations: Mapping[str, Annotation],
               protocol: str | Protocol, ids: Sequence[str] | None = None, *,
               unavailable: Mapping[str, str] | None = None, annotation_problems: Mapping[str, str] | None = None,
               baselines: bool = True, random_seeds: Sequence[int] = RANDOM_SEEDS, clip_boxes: bool | None = None,
               name: str = "", notes: Sequence[str] = (), device: str | torch.device = "cpu",
               progress: Callable[[int], None] | None = None) -> EvalResult:
    """Score maps (or only the baselines when ``maps`` is None) under a protocol, on the requested clips.

    maps: {clip id: (h, w) map, any size}; ids: the requested clips (default: every annotated clip, in order).
    ``unavailable``: id -> why its frame/audio is missing (model path); ``annotation_problems``: id -> why it has no
    annotation (used as the reason text). ``clip_boxes`` overrides the protocol's VGG-SS clipping (False: SSL-TIE's
    literal, unclipped ``int(x * 224)``). A clip with an empty ground truth is excluded and listed under the protocol's
    ``empty_gt='exclude'`` and scored (IoU 0, in N) under ``'zero'``. ``device``: where the batched metric
    computation runs (``cuda`` works).
    Baselines are computed on exactly the scored clips:

    * ``centre``: :func:`metrics.centre_prior_map`, a centred Gaussian: every preset predicts a centred disc of about
      half of the frame;
    * ``random``: i.i.d. uniform maps at the protocol's ``map_size``, upsampled like a model's map; the mean (and
      ``*_std``) over ``random_seeds`` (none: no random baseline);
    * ``whole_frame``: a constant map, which every preset binarises to the whole frame; IoU = GT area share;
    * ``oracle``: :func:`metrics.oracle_ious`, the best IoU a prediction of the rule's area can reach (1 for ``sspl``).

    Raises DataError when no clip can be scored (with the accounting).
    """
    proto = get_protocol(protocol)
    if clip_boxes is not None:
        proto = dataclasses.replace(proto, clip_boxes=clip_boxes)
    unavailable = unavailable or {}
    annotation_problems = annotation_problems or {}
    requested_raw = list(ids) if ids is not None else list(annotations)
    requested, duplicates = _dedupe(requested_raw)
    notes = list(notes)
    if duplicates:
        notes.append(f"{duplicates} duplicate ids in the requested list were counted once")

    scored, excluded = _triage(requested, maps, annotations, proto, unavailable, annotation_problems)
    if proto.empty_gt == "zero":
        empty = sum(1 for cid in scored if not _gt_for(annotations[cid], proto).any())
        if empty:
            where = " after clipping" if proto.clip_boxes else ""
            notes.append(f"{empty} scored clips have an empty ground truth{where}: IoU 0, counted in N, as the "
                         f"official test loops do (empty_gt=zero)")
    accounting = _accounting(requested, scored, excluded, maps)
    rows, method_values, baseline_values = _score_scored(scored, maps, annotations, proto, baselines,
                                                         random_seeds, torch.device(device), progress)
    return EvalResult(
        name=name, protocol=proto, rows=rows,
        method=_stage_summary(method_values) if maps is not None else None,
        baselines=_baseline_summaries(baseline_values, random_seeds, len(scored)) if baselines else {},
        accounting=accounting, excluded=excluded, notes=notes, published=published.lookup(requested, proto.name),
    )


def _accounting(requested: Sequence[str], scored: Sequence[str], excluded: Sequence[Exclusion],
                maps: Mapping[str, np.ndarray] | None) -> dict[str, int]:
    """How N was reached (``EvalResult.accounting``); a DataError with the reasons when no clip can be scored."""
    if not scored:
        kinds = Counter(f"{e.stage}: {_reason_kind(e.reason)}" for e in excluded)
        raise DataError(f"no clip could be scored ({len(requested)} requested)",
                        [f"{count} x {kind}" for kind, count in kinds.most_common()]
                        or ["the requested id list is empty"])
    stage_counts = Counter(e.stage for e in excluded)
    requested_set = set(requested)
    return {
        "requested": len(requested),
        "no_annotation": stage_counts["no annotation"],
        "no_frame_audio": stage_counts["no frame/audio"],
        "no_map": stage_counts["no map"],
        "excluded": stage_counts["excluded"],
        "scored": len(scored),
        "maps_unused": sum(1 for cid in maps if cid not in requested_set) if maps is not None else 0,
    }


def _triage(requested: Sequence[str], maps: Mapping[str, np.ndarray] | None, annotations: Mapping[str, Annotation],
            proto: Protocol, unavailable: Mapping[str, str], annotation_problems: Mapping[str, str]
            ) -> tuple[list[str], list[Exclusion]]:
    """(the clips that can be scored, every other requested clip with its stage and reason), in request order."""
    excluded: list[Exclusion] = []
    scored: list[str] = []
    for cid in requested:
        annotation = annotations.get(cid)
        if annotation is None:
            excluded.append(Exclusion(cid, "no annotation", annotation_problems.get(cid, "no annotation for this id")))
        elif cid in unavailable:
            excluded.append(Exclusion(cid, "no frame/audio", unavailable[cid]))
        elif maps is not None and cid not in maps:
            excluded.append(Exclusion(cid, "no map", "no map for this clip id"))
        else:
            problem = _gt_problem(annotation, proto) or (_map_problem(maps[cid]) if maps is not None else None)
            if problem:
                excluded.append(Exclusion(cid, "excluded", problem))
            else:
                scored.append(cid)
    return scored, excluded


def _baseline_summaries(values: dict[str, dict[str, np.ndarray]], random_seeds: Sequence[int],
                        n: int) -> dict[str, dict[str, Any]]:
    """The baselines' summaries in BASELINE_LABELS order; the random map's is the mean (and std) over its seeds."""
    summaries: dict[str, dict[str, Any]] = {}
    for key in ("centre", "whole_frame", "oracle"):
        summaries[key] = _stage_summary(values[key])
    if random_seeds:
        per_seed = [_stage_summary(values[f"random_{seed}"]) for seed in random_seeds]
        random_summary: dict[str, Any] = {}
        for metric in ("ciou", "auc", "mean_iou", "pointing", "pred_area"):
            column = np.array([s[metric] for s in per_seed])
            random_summary[metric] = float(column.mean())
            random_summary[f"{metric}_std"] = float(column.std())
        random_summary["n"] = n
        random_summary["seeds"] = list(random_seeds)
        summaries["random"] = random_summary
    return {k: summaries[k] for k in BASELINE_LABELS if k in summaries}


def _score_scored(scored: list[str], maps: Mapping[str, np.ndarray] | None, annotations: Mapping[str, Annotation],
                  proto: Protocol, baselines: bool, random_seeds: Sequence[int], device: torch.device,
                  progress: Callable[[int], None] | None
                  ) -> tuple[list[ClipScore], dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """The per-clip pass, CHUNK clips at a time; the ground truth of a chunk is built once and shared by all maps."""
    size = proto.size
    n = len(scored)
    method = {k: np.empty(n) for k in ("iou", "pointing", "pred_area")}
    gt_area = np.empty(n)
    names = (["centre", "whole_frame", "oracle"] + [f"random_{s}" for s in random_seeds]) if baselines else []
    base = {name: {k: np.empty(n) for k in ("iou", "pointing", "pred_area")} for name in names}
    centre = torch.from_numpy(metrics.centre_prior_map(size))[None].to(device)
    random_maps = {s: np.random.default_rng(s).random((n, proto.map_size, proto.map_size), dtype=np.float32)
                   for s in random_seeds} if baselines else {}
    for start in range(0, n, CHUNK):
        chunk = scored[start:start + CHUNK]
        sl = slice(start, start + len(chunk))
        gt = torch.from_numpy(np.stack([_gt_for(annotations[cid], proto) for cid in chunk])).to(device)
        gt_area[sl] = (torch.count_nonzero((gt > 0).reshape(len(chunk), -1), dim=1).double() / size ** 2).cpu().numpy()
        if maps is not None:
            by_shape: dict[tuple[int, ...], list[int]] = {}
            for i, cid in enumerate(chunk):
                by_shape.setdefault(np.shape(maps[cid]), []).append(i)
            for index in by_shape.values():
                batch = torch.from_numpy(np.stack([np.asarray(maps[chunk[i]], dtype=np.float32) for i in index]))
                scores = metrics.localisation_scores(batch.to(device), gt[index], proto)
                rows_at = np.asarray(index) + start
                method["iou"][rows_at] = scores.iou
                method["pointing"][rows_at] = scores.pointing
                method["pred_area"][rows_at] = scores.pred_area
        if baselines:
            _score_baselines(base, sl, gt, gt_area[sl], proto, centre, random_maps)
        if progress is not None:
            progress(len(chunk))
    rows = []
    if maps is not None:
        rows = [ClipScore(cid, float(method["iou"][i]), bool(method["iou"][i] >= metrics.CIOU_THRESHOLD),
                          float(gt_area[i]), float(method["pointing"][i]), float(method["pred_area"][i]))
                for i, cid in enumerate(scored)]
    return rows, method, base



def _score_baselines(base: dict[str, dict[str, np.ndarray]], sl: slice, gt: torch.Tensor, gt_area: np.ndarray,
                     proto: Protocol, centre: torch.Tensor, random_maps: dict[int, np.ndarray]) -> None:
    """The baselines' per-clip IoU, pointing and predicted area for the clips ``sl`` of the scored list, whose ground
    truth is ``gt`` (B, S, S), into ``base``. ``centre``: the centre prior (1, S, S), scored as a map (the preset's own
    normalisation); ``random_maps``: seed -> (N, m, m) uniform maps of every scored clip."""
    size, b, device = proto.size, gt.shape[0], gt.device
    centre_mask = metrics.predict_masks(centre, proto)[1]
    centre_at_max = (centre == centre.amax())
    base["centre"]["iou"][sl] = metrics.iou_scores(centre_mask.expand(b, -1, -1), gt).cpu().numpy()
    base["centre"]["pointing"][sl] = (
        (centre_at_max & (gt > 0)).reshape(b, -1).sum(1).double() / centre_at_max.sum().double()).cpu().numpy()
    base["centre"]["pred_area"][sl] = centre_mask.double().mean().item()
    whole = torch.ones((b, size, size), dtype=torch.bool, device=device)
    base["whole_frame"]["iou"][sl] = metrics.iou_scores(whole, gt).cpu().numpy()
    base["whole_frame"]["pointing"][sl] = gt_area
    base["whole_frame"]["pred_area"][sl] = 1.0
    nominal = metrics.nominal_predicted_pixels(proto.threshold, size * size)
    base["oracle"]["iou"][sl] = metrics.oracle_ious(gt, proto.threshold).cpu().numpy()
    base["oracle"]["pointing"][sl] = 1.0
    base["oracle"]["pred_area"][sl] = nominal / (size * size) if nominal is not None else gt_area
    for seed, maps in random_maps.items():
        scores = metrics.localisation_scores(torch.from_numpy(maps[sl]).to(device), gt, proto)
        base[f"random_{seed}"]["iou"][sl] = scores.iou
        base[f"random_{seed}"]["pointing"][sl] = scores.pointing
        base[f"random_{seed}"]["pred_area"][sl] = scores.pred_area


def _chunks_by_shape(keys: Sequence[str], maps: Mapping[str, np.ndarray]) -> list[list[str]]:
    """``keys`` in chunks of at most CHUNK, each split by map shape (maps of one shape stack into one batch)."""
    out: list[list[str]] = []
    for start in range(0, len(keys), CHUNK):
        by_shape: dict[tuple[int, ...], list[str]] = {}
        for key in keys[start:start + CHUNK]:
            by_shape.setdefault(np.shape(maps[key]), []).append(key)
        out += list(by_shape.values())
    return out


def score_extended(sounding_maps: Mapping[str, np.ndarray], silent_maps: Mapping[str, np.ndarray],
                   annotations: Mapping[str, Annotation], *, protocol: str | Protocol = "slavc",
                   value_range: tuple[float, float] = (-1.0, 1.0), iou_threshold: float = metrics.CIOU_THRESHOLD,
                   dropped: Sequence[Exclusion] = ()) -> ExtendedResult:
    """SLAVC's extended evaluation: can the model tell sounding pairs from non-sounding ones, and localise the former?

    sounding_maps: {clip id: (h, w) map of the frame with its own audio} (clips with boxes); silent_maps:
    {pair key: (h, w) map} of the non-sounding pairs (:func:`silent_pair_key`). Every map is upsampled by the
    protocol (SLAVC: bicubic, align_corners=True); its confidence is :func:`metrics.slavc_confidence` with the fixed
    ``value_range`` of the raw map ((-1, 1) for cosine maps); a sounding pair's IoU uses the protocol's rule
    (SLAVC: relative 50%, ``>= sorted[N/2]``). AP and max-F1 are over all distinct confidences (``ap``, ``max_f1``)
    and with SLAVC's released threshold sampling (``ap_slavc``, ``max_f1_slavc``); see :func:`metrics.extended_ap`.
    Sounding clips without annotation, with an empty ground truth or with a non-finite map are excluded and listed
    in ``excluded``, after ``dropped``: the pairs the caller left out before scoring (no frame/audio, no map).
    """
    proto = get_protocol(protocol)
    excluded: list[Exclusion] = list(dropped)
    confidence: list[np.ndarray] = []
    ious: list[np.ndarray] = []
    sounding_flags: list[np.ndarray] = []
    for items, sounding in ((sounding_maps, True), (silent_maps, False)):
        usable: list[str] = []
        for key, m in items.items():
            problem = _map_problem(m)
            if sounding and problem is None:
                annotation = annotations.get(key)
                problem = (_gt_problem(annotation, proto) if annotation is not None
                           else "no annotation for this id")
            if problem:
                excluded.append(Exclusion(key, "excluded", problem))
            else:
                usable.append(key)
        for keys in _chunks_by_shape(usable, items):
            up, masks = metrics.predict_masks(torch.from_numpy(np.stack([np.asarray(items[k], np.float32)
                                                                         for k in keys])), proto)
            confidence.append(metrics.slavc_confidence(up, value_range).numpy())
            sounding_flags.append(np.full(len(keys), sounding))
            gt = torch.from_numpy(np.stack([_gt_for(annotations[k], proto) for k in keys])) if sounding else None
            ious.append(metrics.iou_scores(masks, gt).numpy() if gt is not None else np.zeros(len(keys)))
    flags = np.concatenate(sounding_flags) if sounding_flags else np.zeros(0, bool)
    n_sounding, n_silent = int(flags.sum()), int((~flags).sum())
    if not n_sounding or not n_silent:
        raise DataError(f"the extended evaluation needs both kinds of pairs; got {n_sounding} usable sounding and "
                        f"{n_silent} usable non-sounding pairs ({len(excluded)} excluded)",
                        [f"{count} x {kind}" for kind, count in
                         Counter(f"{e.stage}: {_reason_kind(e.reason)}" for e in excluded).most_common()])
    conf, iou = np.concatenate(confidence), np.concatenate(ious)
    return ExtendedResult(
        protocol=proto.name, value_range=tuple(value_range), iou_threshold=iou_threshold,
        n_sounding=n_sounding, n_silent=n_silent,
        ap=metrics.extended_ap(conf, iou, flags, iou_threshold, "all"),
        ap_slavc=metrics.extended_ap(conf, iou, flags, iou_threshold, "slavc"),
        max_f1=metrics.extended_max_f1(conf, iou, flags, iou_threshold, "all"),
        max_f1_slavc=metrics.extended_max_f1(conf, iou, flags, iou_threshold, "slavc"),
        excluded=excluded,
    )


def score_extended_maps(maps: Mapping[str, np.ndarray], silent_maps: Mapping[str, np.ndarray],
                        silent_pairs: Sequence[tuple[str, str]], ids: Sequence[str],
                        annotations: Mapping[str, Annotation], source: str) -> tuple[ExtendedResult, list[str]]:
    """SLAVC's extended evaluation of precomputed maps (``sslt eval --maps --extended``) -> (result, notes).

    Sounding pairs: the maps of the requested ``ids`` only. Non-sounding pairs: those of the ``*_plus_silent.csv``
    (``silent_pairs``, from :func:`read_silent_pairs`), each map looked up in ``silent_maps`` (read from ``source``)
    by :func:`silent_pair_key`. A pair without a map is left out and listed (stage ``no map``); maps of pairs that
    the list does not hold are ignored. The notes say how many pairs were left out or maps ignored.
    """
    sounding = {cid: maps[cid] for cid in dict.fromkeys(ids) if cid in maps}
    keys = list(dict.fromkeys(silent_pair_key(video, audio) for video, audio in silent_pairs))
    silent = {key: silent_maps[key] for key in keys if key in silent_maps}
    dropped = [Exclusion(key, "no map", f"no map for this non-sounding pair in {source}")
               for key in keys if key not in silent_maps]
    notes = []
    if dropped:
        notes.append(f"extended evaluation: {len(dropped)} of {len(keys)} non-sounding pairs have no map in {source} "
                     f"and were left out (listed in excluded.csv)")
    unused = len(silent_maps.keys() - set(keys))
    if unused:
        notes.append(f"extended evaluation: ignored the maps of {unused} pairs in {source} that are not in the "
                     f"non-sounding pairs list")
    return score_extended(sounding, silent, annotations, dropped=dropped), notes



def score_interactive(maps: Mapping[str, np.ndarray], rows: Sequence[ClipScore],
                      annotations: Mapping[str, Annotation], images: Mapping[str, str], proto: Protocol
                      ) -> dict[str, Any]:
    """IS3's numbers over the scored samples that share an image with others (``images``: sample -> its image):
    the protocol's cIoU and AUC, the adaptive cIoU and AUC (:func:`metrics.adaptive_masks`: the top-k pixels, k the
    ground truth's area), IIoU and IAUC of both (:func:`metrics.interactive_scores`), the sample and image counts."""
    scored = [r for r in rows if r.id in images]
    adaptive: list[np.ndarray] = []
    for start in range(0, len(scored), CHUNK):
        chunk = [r.id for r in scored[start:start + CHUNK]]
        gt = torch.from_numpy(np.stack([_gt_for(annotations[c], proto) for c in chunk]))
        for keys in _chunks_by_shape(chunk, maps):
            up = metrics.upsample_maps(torch.from_numpy(np.stack([np.asarray(maps[k], np.float32) for k in keys])),
                                       proto.upsample, proto.size)
            index = [chunk.index(k) for k in keys]
            adaptive.append((np.asarray(index) + start, metrics.iou_scores(metrics.adaptive_masks(up, gt[index]),
                                                                           gt[index]).numpy()))
    adaptive_iou = np.zeros(len(scored))
    for index, values in adaptive:
        adaptive_iou[index] = np.nan_to_num(values, nan=0.0)
    standard = np.array([r.iou for r in scored])
    groups = [images[r.id] for r in scored]
    plain, adapted = metrics.interactive_scores(standard, groups), metrics.interactive_scores(adaptive_iou, groups)
    return {"n": len(scored), "n_images": plain["n_images"], "ciou": metrics.ciou(standard),
            "auc": metrics.auc(standard), "iiou": plain["iiou"], "iauc": plain["iauc"],
            "ciou_adaptive": metrics.ciou(adaptive_iou), "auc_adaptive": metrics.auc(adaptive_iou),
            "iiou_adaptive": adapted["iiou"], "iauc_adaptive": adapted["iauc"]}


def test_summary(result: EvalResult) -> dict[str, float]:
    """What a run keeps of a test evaluation: the method's ciou, auc, mean_iou (and pointing when the protocol has
    it), N, and the centre-prior baseline's ciou and auc on the same clips."""
    method = result.method or {}
    summary = {k: float(method[k]) for k in ("ciou", "auc", "mean_iou", "pointing") if k in method}
    summary["n"] = result.n
    centre = result.baselines.get("centre") or {}
    summary.update({f"baseline_centre/{k}": float(centre[k]) for k in ("ciou", "auc") if k in centre})
    return summary
