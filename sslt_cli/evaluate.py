"""Evaluation: score localisation maps under a published protocol, beside honest baselines, with N accounted for.

The pieces, in the order ``sslt eval`` uses them:

* a test set: :func:`load_test_set` (a prepared ``vggss_test`` / ``flickr_test`` folder) or :func:`load_vggss_json_set`
  (the public ``vggss.json``, optionally a published id list and a media folder); both report every listed clip whose
  annotation, frame or audio cannot be used;
* maps: :func:`maps_from_batches` (a model over batches of ``(ids, images, specs)``) or :func:`load_maps` (``--maps``:
  a folder of ``<clip id>.npy`` or one ``.npz`` keyed by clip id, any map size);
* :func:`score_maps`: per-clip IoU, pointing game and predicted area, cIoU / AUC / mean IoU, and on the same clips
  the baselines: centre prior, uniform random maps, whole frame and the oracle ceiling of the protocol;
* :func:`score_extended`: SLAVC's extended evaluation (AP and max-F1 with non-sounding pairs);
  :func:`score_extended_maps` feeds it precomputed maps;
* outputs: :func:`write_outputs` (``metrics.json``, ``per_clip.csv``, ``excluded.csv``, ``defects.csv``,
  ``gallery.png``), :func:`mlflow_metrics`, :func:`result_table`.

How N is reached (``EvalResult.accounting``, in this order): the requested ids (the list, else every annotated clip),
minus those without an annotation, minus those whose frame or audio is unavailable (model path only), minus those
without a map, minus those excluded while scoring (empty ground truth, e.g. after clipping boxes to [0, 1]; an
unusable box; a map that is not finite) = the scored clips. Every dropped id is listed with its stage and reason.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import shutil
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from sslt_cli import metrics, published
from sslt_cli.checkpoint import describe_file, load_model, resolve_checkpoints
from sslt_cli.data.annotations import (
    Annotation,
    DefectReport,
    load_vggss_json,
    read_annotation,
    read_id_list,
)
from sslt_cli.data.manifest import Clip, atomic_write_bytes, layout_paths, read_set
from sslt_cli.catalog import names_hint, resolve_data_file
from sslt_cli.errors import DataError, SsltError
from sslt_cli.metrics import Protocol

if TYPE_CHECKING:
    from rich.table import Table

    from sslt_cli.ogl import ObjectGuidance

CHUNK = 64  # clips per scoring batch: a (64, 224, 224) float32 tensor is 13 MB
RANDOM_SEEDS = (0, 1, 2)
MLFLOW_NAME = re.compile(r"^[/\w.\- ]*$")
BatchHook = Callable[[list, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
STAGES = ("no annotation", "no frame/audio", "no map", "excluded")
BASELINE_LABELS = {
    "centre": "centre prior",
    "random": "random map",
    "whole_frame": "whole frame",
    "oracle": "oracle ceiling",
}


PROTOCOL_OPTIONS = {"constant_maps": ("whole_frame", "official"), "empty_gt": ("exclude", "zero")}


def get_protocol(protocol: str | Protocol, *, constant_maps: str | None = None,
                 empty_gt: str | None = None) -> Protocol:
    """A protocol preset by name (``ssltie``, ``lvs``, ``ezvsl``, ``fnac``, ``sspl``, ``slavc``), or the one given,
    with the deviation options that are not None replaced (``constant_maps``: ``whole_frame`` | ``official``;
    ``empty_gt``: ``exclude`` | ``zero``; see :class:`metrics.Protocol`)."""
    if not isinstance(protocol, Protocol):
        if protocol not in metrics.PROTOCOLS:
            raise SsltError(f"unknown protocol {protocol!r}; choose one of {', '.join(metrics.PROTOCOLS)}")
        protocol = metrics.PROTOCOLS[protocol]
    changes = {key: value for key, value in (("constant_maps", constant_maps), ("empty_gt", empty_gt))
               if value is not None}
    for key, value in changes.items():
        if value not in PROTOCOL_OPTIONS[key]:
            raise SsltError(f"unknown {key} {value!r}; choose one of {', '.join(PROTOCOL_OPTIONS[key])}")
    return dataclasses.replace(protocol, **changes) if changes else protocol


def recipe_protocol(eval_config: Any, protocol: str | None = None) -> Protocol:
    """The protocol of a recipe's ``eval`` section (``eval.protocol`` unless ``protocol`` names another preset), with
    the section's ``constant_maps`` and ``empty_gt``."""
    return get_protocol(protocol or eval_config.protocol, constant_maps=eval_config.constant_maps,
                        empty_gt=eval_config.empty_gt)


# ---------------------------------------------------------------------------------------------------------------
# Test sets


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


# ---------------------------------------------------------------------------------------------------------------
# Maps


def _as_map(array: np.ndarray, where: str) -> np.ndarray:
    """A loaded array as one float32 (h, w) map; leading singleton axes ((1, h, w), (1, 1, h, w)) are dropped."""
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2 or 0 in array.shape:
        raise DataError(f"{where}: a map must be a 2-D array (h, w), got shape {tuple(array.shape)}")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
            or array.dtype == np.bool_):
        raise DataError(f"{where}: dtype {array.dtype} is not a real number type; save maps as float arrays")
    return array.astype(np.float32)


def load_maps(path: str | Path) -> dict[str, np.ndarray]:
    """Precomputed maps: a folder of ``<clip id>.npy`` or one ``.npz`` keyed by clip id -> {id: (h, w) float32}.

    Any map size; (1, h, w) and (1, 1, h, w) arrays are accepted. Values are not checked here: a map with NaN or
    inf is excluded (and listed) when scored. float64 maps are cast to float32 like the official pipelines do.
    """
    path = Path(path).expanduser()
    hint = "--maps takes a folder of <clip id>.npy files or one .npz file keyed by clip id"
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; {hint}")
    maps: dict[str, np.ndarray] = {}
    if path.is_dir():
        files = sorted(path.glob("*.npy"))
        if not files:
            raise DataError(f"{path}: no .npy files in this folder; {hint}")
        for file in files:
            try:
                array = np.load(file, allow_pickle=False)
            except (ValueError, OSError, EOFError):
                raise DataError(f"{file}: {numpy_file_problem(file, '.npy array')}") from None
            maps[file.stem] = _as_map(array, str(file))
        return maps
    if path.suffix != ".npz":
        raise DataError(f"{path}: expected a folder of .npy files or a .npz file, not a "
                        f"{path.suffix or 'file without extension'}; {hint}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            for key in archive.files:
                maps[key] = _as_map(archive[key], f"{path}[{key}]")
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        raise DataError(f"{path}: {numpy_file_problem(path, '.npz archive')}; {hint}") from None
    if not maps:
        raise DataError(f"{path}: the archive holds no arrays; {hint}")
    return maps


def numpy_file_problem(path: Path, expected: str) -> str:
    """Why numpy could not read ``path`` (``expected``: '.npy array' or '.npz archive'), from what the file is; never
    numpy's advice to load pickled data unsafely."""
    kind = describe_file(path)
    if kind.startswith(("a zip archive", "a .npy array")):
        return f"a truncated or damaged {expected} ({kind})"
    return f"not a {expected}: {kind}"


def save_maps(maps: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """Write maps as one ``.npz`` keyed by clip id (what :func:`load_maps` reads), atomically."""
    path = Path(path)
    buffer = io.BytesIO()
    np.savez(buffer, **{cid: np.asarray(m, dtype=np.float32) for cid, m in maps.items()})
    atomic_write_bytes(path, buffer.getvalue())
    return path


def maps_from_batches(model: torch.nn.Module, batches: Iterable[tuple[Sequence[str], torch.Tensor, torch.Tensor]],
                      device: str | torch.device, progress: Callable[[int], None] | None = None,
                      on_batch: BatchHook | None = None, ogl: "ObjectGuidance | None" = None
                      ) -> dict[str, np.ndarray]:
    """Localisation maps of a model over test batches -> {clip id: (h, w) float32 cosine map}.

    batches yield ``(ids, images (B, 3, H, W) normalised, specs (B, 1, n_mels, T) log-mel dB)``; the map of each
    image with its own audio is ``localisation_map(model.embed_image(images), model.embed_audio(specs))``
    (B, 1, h, w). The model is put in eval mode; ``progress`` is called with the clip count of each batch and
    ``on_batch(ids, images, v, a, maps (B, h, w))`` sees each batch's embeddings (validation's L_cl and heatmaps),
    outside autocast. ``ogl``: EZ-VSL's object-guided localisation; each map is then the combined (S, S) map
    (:mod:`sslt_cli.ogl`).
    """
    from sslt_cli.model import localisation_map

    model.eval()
    maps: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        for ids, images, specs in batches:
            v = model.embed_image(images.to(device, non_blocking=True))
            a = model.embed_audio(specs.to(device, non_blocking=True))
            batch_maps = localisation_map(v, a)[:, 0].float()
            if ogl is not None:
                batch_maps = ogl.apply(batch_maps, images)
            batch_maps = batch_maps.cpu().numpy()
            if on_batch is not None:
                with torch.autocast(torch.device(device).type, enabled=False):
                    on_batch(list(ids), images, v, a, torch.from_numpy(batch_maps))
            for cid, m in zip(ids, batch_maps):
                if cid in maps:
                    raise DataError(f"clip id {cid} appears twice in the evaluation batches; "
                                    f"each test clip must be listed once")
                maps[cid] = m
            if progress is not None:
                progress(len(ids))
    return maps


# ---------------------------------------------------------------------------------------------------------------
# Scoring


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
    stage_counts = Counter(e.stage for e in excluded)
    requested_set = set(requested)
    accounting = {
        "requested": len(requested),
        "no_annotation": stage_counts["no annotation"],
        "no_frame_audio": stage_counts["no frame/audio"],
        "no_map": stage_counts["no map"],
        "excluded": stage_counts["excluded"],
        "scored": len(scored),
        "maps_unused": sum(1 for cid in maps if cid not in requested_set) if maps is not None else 0,
    }
    if not scored:
        kinds = Counter(f"{e.stage}: {_reason_kind(e.reason)}" for e in excluded)
        raise DataError(f"no clip could be scored ({len(requested)} requested)",
                        [f"{count} x {kind}" for kind, count in kinds.most_common()]
                        or ["the requested id list is empty"])

    rows, method_values, baseline_values = _score_scored(scored, maps, annotations, proto, baselines,
                                                         random_seeds, torch.device(device), progress)
    return EvalResult(
        name=name, protocol=proto, rows=rows,
        method=_stage_summary(method_values) if maps is not None else None,
        baselines=_baseline_summaries(baseline_values, random_seeds, len(scored)) if baselines else {},
        accounting=accounting, excluded=excluded, notes=notes, published=published.lookup(requested, proto.name),
    )


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
    if baselines:
        centre = torch.from_numpy(metrics.centre_prior_map(size))[None].to(device)
        centre_mask = metrics.predict_masks(centre, proto)[1]  # scored as a map: the preset's own normalisation
        centre_at_max = (centre == centre.amax())
        random_maps = {s: np.random.default_rng(s).random((n, proto.map_size, proto.map_size), dtype=np.float32)
                       for s in random_seeds}
        nominal = metrics.nominal_predicted_pixels(proto.threshold, size * size)
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
            b = len(chunk)
            base["centre"]["iou"][sl] = metrics.iou_scores(centre_mask.expand(b, -1, -1), gt).cpu().numpy()
            base["centre"]["pointing"][sl] = (
                (centre_at_max & (gt > 0)).reshape(b, -1).sum(1).double() / centre_at_max.sum().double()).cpu().numpy()
            base["centre"]["pred_area"][sl] = centre_mask.double().mean().item()
            whole = torch.ones((b, size, size), dtype=torch.bool, device=device)
            base["whole_frame"]["iou"][sl] = metrics.iou_scores(whole, gt).cpu().numpy()
            base["whole_frame"]["pointing"][sl] = gt_area[sl]
            base["whole_frame"]["pred_area"][sl] = 1.0
            base["oracle"]["iou"][sl] = metrics.oracle_ious(gt, proto.threshold).cpu().numpy()
            base["oracle"]["pointing"][sl] = 1.0
            base["oracle"]["pred_area"][sl] = (nominal / (size * size) if nominal is not None
                                               else gt_area[sl])
            for s in random_seeds:
                scores = metrics.localisation_scores(torch.from_numpy(random_maps[s][sl]).to(device), gt, proto)
                base[f"random_{s}"]["iou"][sl] = scores.iou
                base[f"random_{s}"]["pointing"][sl] = scores.pointing
                base[f"random_{s}"]["pred_area"][sl] = scores.pred_area
        if progress is not None:
            progress(len(chunk))
    rows = []
    if maps is not None:
        rows = [ClipScore(cid, float(method["iou"][i]), bool(method["iou"][i] >= metrics.CIOU_THRESHOLD),
                          float(gt_area[i]), float(method["pointing"][i]), float(method["pred_area"][i]))
                for i, cid in enumerate(scored)]
    return rows, method, base


# ---------------------------------------------------------------------------------------------------------------
# SLAVC extended evaluation


def silent_pair_key(video: str, audio: str) -> str:
    """The map key of a non-sounding pair (frame of ``video`` with audio of ``audio``): ``<video>+<audio>``."""
    return f"{video}+{audio}"


def read_silent_pairs(path: str | Path) -> list[tuple[str, str]]:
    """The non-sounding pairs of a SLAVC ``*_plus_silent.csv`` (``video,audio,label`` rows, label ``non-sounding``)."""
    path = resolve_data_file(path, "pairs")
    try:
        text = path.read_text()
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
        for start in range(0, len(usable), CHUNK):
            chunk = usable[start:start + CHUNK]
            by_shape: dict[tuple[int, ...], list[str]] = {}
            for key in chunk:
                by_shape.setdefault(np.shape(items[key]), []).append(key)
            for keys in by_shape.values():
                up, masks = metrics.predict_masks(torch.from_numpy(np.stack([np.asarray(items[k], np.float32)
                                                                             for k in keys])), proto)
                confidence.append(metrics.slavc_confidence(up, value_range).numpy())
                sounding_flags.append(np.full(len(keys), sounding))
                if sounding:
                    gt = torch.from_numpy(np.stack([_gt_for(annotations[k], proto) for k in keys]))
                    ious.append(metrics.iou_scores(masks, gt).numpy())
                else:
                    ious.append(np.zeros(len(keys)))
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


# ---------------------------------------------------------------------------------------------------------------
# Outputs


def _json_safe(value: Any) -> Any:
    """NaN and inf become null so metrics.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def result_dict(result: EvalResult) -> dict[str, Any]:
    """The content of ``metrics.json``: protocol settings, N accounting, method, baselines, extended, exclusions."""
    return _json_safe({
        "name": result.name,
        "protocol": {**dataclasses.asdict(result.protocol), "object_guidance": result.object_guidance},
        "n": result.n,
        "accounting": result.accounting,
        "n_explained": result.n_explained(),
        "method": result.method,
        "baselines": result.baselines,
        "extended": result.extended.to_dict() if result.extended is not None else None,
        "excluded_by_reason": dict(Counter(f"{e.stage}: {_reason_kind(e.reason)}" for e in result.excluded)),
        "notes": result.notes,
        "published": result.published,
    })


def _csv_bytes(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


def write_outputs(result: EvalResult, out_dir: str | Path, *, maps: Mapping[str, np.ndarray] | None = None,
                  frames: Mapping[str, str] | None = None, annotations: Mapping[str, Annotation] | None = None,
                  defects: DefectReport | None = None, gallery_count: int = 4) -> dict[str, Path]:
    """Write ``metrics.json``, ``per_clip.csv``, ``excluded.csv``, with ``defects`` ``defects.csv``, and, when
    maps, frames and annotations are given for scored clips, ``gallery.png`` (the ``gallery_count`` best and worst
    clips). Returns {kind: path}.

    per_clip.csv: ``id,iou,hit,gt_area,pointing,pred_area,protocol`` (areas are shares of the 224 x 224 frame);
    excluded.csv: ``id,stage,reason``, the extended evaluation's pairs (``<video>+<audio>`` ids) with stages
    ``extended: <stage>``; defects.csv: ``id,xmin,ymin,xmax,ymax,defect``, one row per defective box and defect
    (kinds of :meth:`DefectReport.boxes`). Every file is written atomically.
    """
    out_dir = Path(out_dir)
    written = {"metrics": out_dir / "metrics.json", "per_clip": out_dir / "per_clip.csv",
               "excluded": out_dir / "excluded.csv"}
    excluded = [(e.id, e.stage, e.reason) for e in result.excluded]
    if result.extended is not None:
        excluded += [(e.id, f"extended: {e.stage}", e.reason) for e in result.extended.excluded]
    atomic_write_bytes(written["metrics"], (json.dumps(result_dict(result), indent=2) + "\n").encode())
    atomic_write_bytes(written["per_clip"], _csv_bytes(
        ("id", "iou", "hit", "gt_area", "pointing", "pred_area", "protocol"),
        ((r.id, repr(r.iou), int(r.hit), repr(r.gt_area), repr(r.pointing), repr(r.pred_area), result.protocol.name)
         for r in result.rows)))
    atomic_write_bytes(written["excluded"], _csv_bytes(("id", "stage", "reason"), excluded))
    if defects is not None:
        written["defects"] = out_dir / "defects.csv"
        atomic_write_bytes(written["defects"], _csv_bytes(
            ("id", "xmin", "ymin", "xmax", "ymax", "defect"),
            ((cid, *(repr(v) for v in box), kind) for cid, box, kind in defects.boxes())))
    if maps is not None and frames and annotations is not None:
        gallery = _write_gallery(result, maps, frames, annotations, out_dir / "gallery.png", gallery_count)
        if gallery is not None:
            written["gallery"] = gallery
    return written


def _load_frame(path: str, mode: str, size: int) -> np.ndarray:
    """A frame as the model saw it: (size, size, 3) uint8 after the protocol's image pre-processing."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if mode == "resize_square":
            image = image.resize((size, size), Image.BICUBIC)
        else:
            w, h = image.size
            # torchvision Resize(int): the short side becomes size, the long side int(size * long / short)
            new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
            image = image.resize(new, Image.BICUBIC)
            w, h = image.size
            left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
            image = image.crop((left, top, left + size, top + size))
        return np.asarray(image)


def _write_gallery(result: EvalResult, maps: Mapping[str, np.ndarray], frames: Mapping[str, str],
                   annotations: Mapping[str, Annotation], path: Path, count: int) -> Path | None:
    """Best and worst clips: frame, normalised heatmap overlay, ground truth (green) and prediction (white) outlines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    candidates = [r for r in result.rows
                  if r.id in maps and r.id in annotations and os.path.isfile(frames.get(r.id, ""))]
    if not candidates:
        return None
    ranked = sorted(candidates, key=lambda r: (-r.iou, r.id))
    picks = ranked[:count] + [r for r in ranked[::-1][:count] if r not in ranked[:count]]
    proto = result.protocol
    columns = min(len(picks), count)
    rows = math.ceil(len(picks) / columns)
    figure = Figure(figsize=(2.6 * columns, 3.0 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    for i, row in enumerate(picks):
        axes = figure.add_subplot(rows, columns, i + 1)
        up, masks = metrics.predict_masks(torch.from_numpy(np.asarray(maps[row.id], np.float32))[None], proto)
        heat, _ = metrics.normalised_scores(up, proto.normalise, proto.value_range)
        mask = masks[0].numpy()
        gt = _gt_for(annotations[row.id], proto)
        axes.imshow(_load_frame(frames[row.id], proto.image_preprocessing, proto.size))
        axes.imshow(heat[0].numpy(), cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
        levels = [0.25, 0.75] if gt.max() > 0 and (gt == 0.5).any() else [0.5]
        axes.contour(gt, levels=levels, colors="lime", linewidths=1.2)
        if mask.any() and not mask.all():
            axes.contour(mask.astype(np.float32), levels=[0.5], colors="white", linewidths=0.9, linestyles="dashed")
        axes.set_title(f"{row.id}\nIoU {row.iou:.2f}", fontsize=7)
        axes.set_axis_off()
    figure.suptitle(f"{result.name or 'eval'} ({proto.name}): best and worst IoU; green = ground truth, "
                    f"white = prediction", fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _metric_name(prefix: str) -> str:
    """A prefix MLflow accepts: characters outside [/\\w.\\- ] become '_'."""
    return re.sub(r"[^/\w.\- ]", "_", prefix).strip("/") or "eval"


def mlflow_metrics(result: EvalResult, prefix: str) -> dict[str, float]:
    """Finite metrics under names MLflow accepts: ``<prefix>/ciou``, ``<prefix>/baseline_centre/auc``,
    ``<prefix>/oracle/ciou``, ``<prefix>/extended/ap``, ``<prefix>/n``, ...
    """
    base = _metric_name(prefix)
    out: dict[str, float] = {f"{base}/n": float(result.n), f"{base}/n_requested": float(result.accounting["requested"])}
    keys = ("ciou", "auc", "mean_iou", "pointing", "pred_area")
    if result.method is not None:
        out.update({f"{base}/{k}": result.method[k] for k in keys})
    for name, summary in result.baselines.items():
        group = "oracle" if name == "oracle" else f"baseline_{name}"
        out.update({f"{base}/{group}/{k}": summary[k] for k in keys})
    if result.extended is not None:
        ext = result.extended
        out.update({f"{base}/extended/{k}": float(getattr(ext, k))
                    for k in ("ap", "ap_slavc", "max_f1", "max_f1_slavc", "n_sounding", "n_silent")})
    out = {k: float(v) for k, v in out.items() if math.isfinite(v)}
    assert all(MLFLOW_NAME.match(k) for k in out), "metric names must match MLflow's pattern"
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.2f}"


def result_table(result: EvalResult) -> "Table":
    """A rich table: the maps (if any), the baselines and the oracle ceiling; cIoU, AUC, mean IoU, pointing and
    predicted area in percent. The title names the set, the protocol and N; the caption says how N was reached.
    """
    from rich.table import Table

    proto = result.protocol
    table = Table(title=f"{result.name or 'evaluation'} · protocol {proto.name} · N = {result.n}",
                  caption=(f"{result.n_explained()}\n{proto.upsample} upsampling to {proto.size}, {proto.normalise}, "
                           f"{proto.threshold.replace('_', ' ')}; frames {proto.image_preprocessing.replace('_', ' ')}"
                           f"; boxes {'clipped to [0, 1]' if proto.clip_boxes else 'not clipped'}\n"
                           + (f"maps: EZ-VSL object-guided localisation, alpha {result.object_guidance['alpha']:g} "
                              f"(object map from {result.object_guidance['weights']})\n"
                              if result.object_guidance else "") +
                           "centre prior: a centred disc of half the frame; random: uniform maps, mean±std over the "
                           "seeds; oracle ceiling: the best IoU a prediction of the rule's area can reach"),
                  caption_justify="left")
    table.add_column("method")
    for title in ("cIoU", "AUC", "mean IoU", "pointing", "pred. area"):
        table.add_column(title, justify="right")
    keys = ("ciou", "auc", "mean_iou", "pointing", "pred_area")
    if result.method is not None:
        table.add_row(result.name or "maps", *(_pct(result.method[k]) for k in keys))
    for name, summary in result.baselines.items():
        label = BASELINE_LABELS[name]
        if name == "random":
            label += f" ({len(summary['seeds'])} seeds)"
            cells = [f"{_pct(summary[k])}±{100 * summary[f'{k}_std']:.2f}" for k in keys]
        else:
            cells = [_pct(summary[k]) for k in keys]
        table.add_row(label, *cells, style="dim" if name != "oracle" else "italic")
    if result.extended is not None:
        ext = result.extended
        table.caption += (f"\nextended ({ext.protocol}, {ext.n_sounding} sounding + {ext.n_silent} non-sounding "
                          f"pairs): AP {_pct(ext.ap)} (SLAVC sampling {_pct(ext.ap_slavc)}), max-F1 "
                          f"{_pct(ext.max_f1)} (SLAVC sampling {_pct(ext.max_f1_slavc)})")
    published.add_rows(table, result.published, len(keys))
    return table


# ---------------------------------------------------------------------------------------------------------------
# Model path: checkpoints -> maps -> results


def eval_loader(clips: Sequence[Clip], recipe: Any, device: str | torch.device, image_mode: str, *,
                batch_size: int | None = None, num_workers: int | None = None) -> torch.utils.data.DataLoader:
    """A loader of (id, image, spec) items for evaluation: the protocol's image pre-processing (``image_mode``) at
    ``recipe.data.image_size``, the recipe's audio front end, no augmentation, the clips' order kept; batch size and
    workers default to ``recipe.eval.batch_size`` and ``recipe.data.num_workers``."""
    from sslt_cli.data import augment
    from sslt_cli.data.datasets import AudioVisualDataset, collate_skip_bad

    dataset = AudioVisualDataset(
        list(clips), image_transform=augment.build_eval_transform(recipe.data.image_size, image_mode), n_views=1,
        audio=recipe.audio.model_dump(), spec_augment=None, train=False, seed=recipe.seed, cache_dir=None)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size or recipe.eval.batch_size, shuffle=False,
        num_workers=recipe.data.num_workers if num_workers is None else num_workers, collate_fn=collate_skip_bad,
        pin_memory=torch.device(device).type == "cuda")


def predict_maps(model: torch.nn.Module, clips: Sequence[Clip], recipe: Any, protocol: Protocol,
                 device: str | torch.device, *, batch_size: int | None = None, num_workers: int | None = None,
                 pairs: Sequence[tuple[str, Clip, Clip]] | None = None, progress: Callable[[int], None] | None = None,
                 on_batch: BatchHook | None = None, ogl: "ObjectGuidance | None" = None
                 ) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
    """Maps of ``model`` on ``clips`` (each frame with its own audio), or on ``pairs`` (key, frame clip, audio clip).

    Frames get the protocol's image pre-processing at ``recipe.data.image_size``; audio gets the recipe's front end.
    Returns ({key: (h, w) map}, [(key, reason)] for clips that could not be decoded); ``ogl`` as in
    :func:`maps_from_batches`.
    """
    if pairs is None:
        items = list(clips)
        keys = [c.id for c in items]
    else:
        # a pair's frame comes from one clip and its audio from another: a synthetic Clip carries both paths
        items = [Clip(id=key, frame=fc.frame, audio=ac.audio) for key, fc, ac in pairs]
        keys = [key for key, _, _ in pairs]
    loader = eval_loader(items, recipe, device, protocol.image_preprocessing, batch_size=batch_size,
                         num_workers=num_workers)
    skipped: list[tuple[str, str]] = []

    def batches():
        for batch in loader:
            skipped.extend(batch.get("skipped", []))
            if "image" in batch:
                yield [keys[int(i)] for i in batch["index"]], batch["image"], batch["spec"]

    from sslt_cli.model import autocast_for

    device = torch.device(device)
    with autocast_for(device, recipe.eval.precision):
        maps = maps_from_batches(model, batches(), device, progress, on_batch, ogl)
    return maps, skipped


def eval_folder(base: Path, set_name: str, checkpoint: str, protocol: str) -> Path:
    """The one naming rule for evaluation outputs: ``<base>/<set>-<checkpoint>-<protocol>``. ``set``: the recipe's
    name for the test set (``vggss``) when it is one of the recipe's ``data.test`` sets, else the set folder's name;
    ``checkpoint``: ``best``, ``last``, a checkpoint file's stem, ``maps`` or ``baselines``."""
    return Path(base) / f"{set_name}-{checkpoint}-{protocol}"


def evaluate_model(model: torch.nn.Module, test: TestSet, protocol: str | Protocol, recipe: Any, *,
                   device: str | torch.device = "cpu", out_dir: Path | None = None, baselines: bool = True,
                   batch_size: int | None = None, num_workers: int | None = None, clip_boxes: bool | None = None,
                   extended: tuple[list[tuple[str, str]], TestSet] | None = None,
                   progress: Callable[[int], None] | None = None, on_batch: BatchHook | None = None,
                   object_guidance: bool = True) -> EvalResult:
    """The one evaluation of a model: maps for the test set's clips (``recipe``'s image size and audio front end at
    ``eval.precision``), scored under ``protocol`` with baselines, outputs written to ``out_dir`` when given.

    Validation, the end of training, ``sslt eval`` and ``sslt ablate`` (through training) all call this.
    ``extended``: (non-sounding pairs, the set holding their frames and audio) adds SLAVC's extended evaluation; a
    pair whose frame or audio is unavailable is left out and listed. ``progress`` is called with the clip count of
    each predicted batch, the non-sounding pairs' batches included; ``on_batch`` as in :func:`maps_from_batches`.
    With ``recipe.eval.ogl_weights`` set (and ``object_guidance``), the scored maps are EZ-VSL's object-guided
    combination (:mod:`sslt_cli.ogl`), and the result's notes say so.
    """
    from sslt_cli.ogl import ObjectGuidance

    proto = get_protocol(protocol)
    ogl = ObjectGuidance.from_eval(recipe.eval, proto, device) if object_guidance else None
    clips = [test.clips[i] for i in test.ids if i in test.clips and i in test.annotations]
    maps, skipped = predict_maps(model, clips, recipe, proto, device, batch_size=batch_size, num_workers=num_workers,
                                 progress=progress, on_batch=on_batch, ogl=ogl)
    unavailable = dict(test.unavailable)
    unavailable.update({cid: f"decode error: {reason}" for cid, reason in skipped})
    result = score_maps(maps, test.annotations, proto, test.ids, unavailable=unavailable,
                        annotation_problems=test.annotation_problems, baselines=baselines, clip_boxes=clip_boxes,
                        name=test.name, notes=test.notes, device=device)
    if ogl is not None:
        result.notes = [*result.notes, ogl.note()]
        result.object_guidance = {"alpha": ogl.alpha, "weights": ogl.weights}
    if extended is not None:
        silent_pairs, silent_set = extended
        pairs: list[tuple[str, Clip, Clip]] = []
        dropped: list[Exclusion] = []
        for video, audio in silent_pairs:
            key = silent_pair_key(video, audio)
            fc, ac = silent_set.clips.get(video), silent_set.clips.get(audio)
            if fc is not None and ac is not None:
                pairs.append((key, fc, ac))
                continue
            missing = [f"{column} {cid}: {silent_set.unavailable.get(cid, 'not among its usable clips')}"
                       for column, cid, clip in (("video", video, fc), ("audio", audio, ac)) if clip is None]
            dropped.append(Exclusion(key, "no frame/audio", f"unavailable in {silent_set.name}: {'; '.join(missing)}"))
        silent_maps, silent_skipped = predict_maps(model, [], recipe, proto, device,
                                                   batch_size=batch_size, num_workers=num_workers, pairs=pairs,
                                                   progress=progress, ogl=ogl)
        dropped += [Exclusion(key, "no frame/audio", f"decode error: {reason}") for key, reason in silent_skipped]
        if dropped:
            result.notes.append(f"extended evaluation: {len(dropped)} of {len(silent_pairs)} non-sounding pairs have "
                                f"no usable frame/audio in {silent_set.name} and were left out (listed in "
                                f"excluded.csv)")
        result.extended = score_extended(maps, silent_maps, test.annotations, dropped=dropped)
    if out_dir is not None:
        write_outputs(result, out_dir, maps=maps, frames=test.frames, annotations=test.annotations,
                      defects=test.defects)
        save_maps(maps, out_dir / "maps.npz")
    return result


def test_summary(result: EvalResult) -> dict[str, float]:
    """What a run keeps of a test evaluation: the method's ciou, auc, mean_iou (and pointing when the protocol has
    it), N, and the centre-prior baseline's ciou and auc on the same clips."""
    method = result.method or {}
    summary = {k: float(method[k]) for k in ("ciou", "auc", "mean_iou", "pointing") if k in method}
    summary["n"] = result.n
    centre = result.baselines.get("centre") or {}
    summary.update({f"baseline_centre/{k}": float(centre[k]) for k in ("ciou", "auc") if k in centre})
    return summary


def evaluate_checkpoints(run: Any, recipe: Any, sink: Any, *, device: str | torch.device, console: Any = None,
                         out: Any = None) -> dict[str, dict[str, dict[str, float]]]:
    """The end of training: the run's last and best checkpoints on every test set of the recipe under its protocol.

    Writes ``eval/<set>-<checkpoint>-<protocol>/`` (:func:`eval_folder`), a ``kind: test`` record per set and
    checkpoint through ``sink`` (metrics.jsonl, MLflow ``test_<set>/<checkpoint>/...``) and prints a table per set and
    checkpoint. Returns ``{set: {checkpoint: test_summary}}``. The best checkpoint was chosen on the validation set,
    never on a test set.
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    out = out or Console()
    proto = recipe_protocol(recipe.eval)
    _, checkpoints, _ = resolve_checkpoints(run.dir, "both")
    loaded_models = [(label, load_model(path, recipe, device)) for label, path in checkpoints]
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for set_name, set_path in recipe.data.test.items():
        test = load_test_set(recipe.data.set_path(set_path))
        done: dict[int | None, tuple[str, Path, EvalResult]] = {}  # step -> (label, out_dir, result) on this set
        for label, loaded in loaded_models:
            out_dir = eval_folder(run.dir / "eval", set_name, label, proto.name)
            same = done.get(loaded.step) if loaded.step is not None else None
            if same is not None:
                # the best checkpoint of the last validation is the last checkpoint's weights: copy, do not redo
                shutil.copytree(same[1], out_dir, dirs_exist_ok=True)
                result = same[2]
                console.print(f"{set_name}: the {label} checkpoint is the {same[0]} checkpoint (step {loaded.step}); "
                              f"its results are copied to {out_dir}", highlight=False)
            else:
                result = evaluate_model(loaded.model, test, proto, recipe, device=device, out_dir=out_dir)
                done[loaded.step] = (label, out_dir, result)
            summary.setdefault(set_name, {})[label] = test_summary(result)
            method = result.method or {}
            sink.log("test", loaded.step or 0, {k: method[k] for k in ("ciou", "auc", "mean_iou", "pointing")
                                                if k in method},
                     fields={"set": set_name, "checkpoint": label, "protocol": proto.name, "n": result.n},
                     mlflow=mlflow_metrics(result, f"test_{set_name}/{label}"))
            sink.artifact(out_dir, f"eval/{out_dir.name}")
            if same is None:
                table = result_table(result)
                table.title = f"{set_name}: {label} checkpoint (step {loaded.step}), protocol {proto.name}"
                out.print(table)
                console.print(result.n_explained(), highlight=False)
    return summary
