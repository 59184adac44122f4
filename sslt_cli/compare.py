"""``sslt compare``: several models (any family, each with its own front end) on the same clips, each scored under its
own method's protocol and under one common protocol, through the one orchestrator.

Per model: :func:`~sslt_cli.evaluate.run_evaluation` of the loaded model under its family's preset (its maps kept),
then of the same maps brought to the common (cos + 1) / 2 scale (:func:`sslt_cli.families.to_common`) under the
common protocol, both recorded through the model's own sink (the caller opens one MLflow child run per model under
one parent). The outputs: each evaluation's folder, ``comparison.csv`` (the table), ``agreement.csv`` (per clip: each
model's IoU under both protocols, whether it localised the clip, whether the models agree) and ``maps.png`` (the
same clips, each model's map over the frame; clips where the models disagree first).
"""
from __future__ import annotations

import contextlib
import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import numpy as np

from sslt_cli.errors import SsltError

CELL = 160
SUMMARY = ("n", "ciou", "auc", "pointing", "baseline_centre/ciou", "baseline_centre/auc")


@dataclass(frozen=True)
class ModelSpec:
    """One model to compare: its file, its family (None: recognised from its keys), SLAVC's branch and another
    evaluator's front end (None: its own)."""

    path: Path
    family: str | None = None
    branch: str | None = None
    front_end: str | None = None


@dataclass(frozen=True)
class CompareOptions:
    """``common``: the protocol every model is also scored under; ``picture_clips``: rows of ``maps.png``."""

    common: str = "ezvsl"
    device: str = "cpu"
    batch_size: int | None = None
    num_workers: int | None = None
    picture_clips: int = 6


@dataclass
class ModelResult:
    """One model's two evaluations (its own preset, the common protocol) and its maps (common scale)."""

    label: str
    family: str
    title: str
    own: Any
    common: Any
    maps: dict[str, np.ndarray]
    published: str = ""


@dataclass
class Comparison:
    """What :func:`compare` produced: per model its results, and the files written."""

    set_name: str
    models: list[ModelResult]
    folder: Path
    files: dict[str, Path] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """The table: one row per model and protocol (method, protocol, N, cIoU, AUC, pointing, the centre-prior
        baseline, the published cIoU of the method where the set is its paper's list)."""
        rows = []
        for model in self.models:
            for kind, item in (("own", model.own), ("common", model.common)):
                summary = item.summary()
                rows.append({"method": f"{model.title} ({model.label})", "protocol": item.protocol, "kind": kind,
                             **{key: summary.get(key, float("nan")) for key in SUMMARY},
                             "published": _published_ciou(item.result, model.published)})
        return rows


def _published_ciou(result: Any, method: str) -> str:
    """The paper's cIoU of ``method`` on this set's published list ('' when the set is none or the paper gives
    none); marked '*' when the paper's list or protocol is not this row's."""
    published = result.published or {}
    for entry in published.get("entries", []):
        if method and entry["method"] == method:
            mark = "*" if False in (entry["same_list"], entry["same_protocol"]) else ""
            return f"{100 * entry['ciou']:.2f}{mark} ({entry['trained_on']})"
    return ""


def _labels(specs: Sequence[ModelSpec]) -> list[str]:
    """Each model's label: its file's stem, numbered where two stems are the same."""
    stems = [spec.path.stem for spec in specs]
    return [stem if stems.count(stem) == 1 else f"{stem}-{i + 1}" for i, stem in enumerate(stems)]


def compare(specs: Sequence[ModelSpec], test_set: tuple[str, Any], options: CompareOptions, out: Path, *,
            child_sink: Callable[[str, dict[str, str]], ContextManager[Any]] | None = None,
            progress: Any = None) -> Comparison:
    """Evaluate every model of ``specs`` on ``test_set`` ((name, TestSet)) under its own preset and under
    ``options.common``; outputs under ``out``; each model's numbers through the sink ``child_sink(label, tags)``
    opens (the caller's MLflow child run). Returns the :class:`Comparison`."""
    from sslt_cli.families import load_released
    from sslt_cli.protocols import PROTOCOLS

    if len(specs) < 2:
        raise SsltError(f"sslt compare needs at least two models, got {len(specs)}")
    if options.common not in PROTOCOLS:
        raise SsltError(f"--common {options.common!r} is not one of {', '.join(PROTOCOLS)}")
    from sslt_cli.tracking import MetricsSink

    child_sink = child_sink or (lambda label, tags: contextlib.nullcontext(MetricsSink.null()))
    models = []
    for spec, label in zip(specs, _labels(specs)):
        loaded = load_released(spec.path, spec.family, branch=spec.branch, device=options.device,
                               front_end=spec.front_end)
        tags = {"sslt.family": loaded.family, "sslt.checkpoint": str(spec.path), "sslt.front_end": loaded.front_end}
        with child_sink(label, tags) as sink:
            models.append(_evaluate_model(label, loaded, test_set, options, out / label, sink, progress))
    comparison = Comparison(test_set[0], models, out)
    comparison.files["comparison"] = write_table_csv(comparison, out / "comparison.csv")
    comparison.files["agreement"] = write_agreement(models, out / "agreement.csv")
    comparison.files["picture"] = write_picture(models, test_set[1], out / "maps.png", options.picture_clips)
    return comparison


def _evaluate_model(label: str, loaded: Any, test_set: tuple[str, Any], options: CompareOptions, out: Path,
                    sink: Any, progress: Any) -> ModelResult:
    """A model under its own preset (maps kept), then its maps on the common scale under the common protocol."""
    import torch

    from sslt_cli import evaluate as ev
    from sslt_cli.families import get_family, to_common

    own_options = ev.EvalOptions(save_maps=True, device=options.device, batch_size=options.batch_size,
                                 num_workers=options.num_workers)
    own = ev.run_evaluation([ev.Source.model(label, loaded)], [test_set], own_options, sink, out=out, kind="eval",
                            progress=progress).items[0]
    raw = ev.load_maps(own.folder / "maps.npz")
    common_maps = {cid: to_common(torch.from_numpy(m), loaded.family).numpy() for cid, m in raw.items()}
    common_options = ev.EvalOptions(protocol=options.common, save_maps=False, device=options.device)
    source = ev.Source(f"{label}-common", maps=common_maps, maps_path=own.folder / "maps.npz")
    common = ev.run_evaluation([source], [test_set], common_options, sink, out=out, kind="eval",
                               progress=progress).items[0]
    family = get_family(loaded.family)
    return ModelResult(label, loaded.family, family.title, own, common, common_maps, family.published)


def write_table_csv(comparison: Comparison, path: Path) -> Path:
    """``comparison.csv``: the rows of :meth:`Comparison.rows`."""
    rows = comparison.rows()
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def clip_agreement(models: Sequence[ModelResult]) -> list[dict[str, Any]]:
    """Per clip scored for every model: each model's IoU under its own preset and the common protocol, whether it
    localised the clip (common IoU >= 0.5), ``agree`` (all models did, or none did) and ``spread`` (the largest
    minus the smallest common IoU); clips where the models disagree first, then by spread."""
    own = [{row.id: row for row in m.own.result.rows} for m in models]
    common = [{row.id: row for row in m.common.result.rows} for m in models]
    ids = [cid for cid in common[0] if all(cid in c for c in common) and all(cid in o for o in own)]
    rows = []
    for cid in ids:
        row: dict[str, Any] = {"id": cid}
        for m, o, c in zip(models, own, common):
            row.update({f"{m.label}/iou_own": o[cid].iou, f"{m.label}/iou_common": c[cid].iou,
                        f"{m.label}/hit": int(c[cid].hit)})
        hits = {c[cid].hit for c in common}
        ious = [c[cid].iou for c in common]
        row.update(agree=int(len(hits) == 1), spread=max(ious) - min(ious))
        rows.append(row)
    rows.sort(key=lambda r: (r["agree"], -r["spread"]))
    return rows


def write_agreement(models: Sequence[ModelResult], path: Path) -> Path:
    rows = clip_agreement(models)
    if not rows:
        raise SsltError("no clip was scored for every model: nothing to compare (see each model's excluded.csv)")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_picture(models: Sequence[ModelResult], test: Any, path: Path, n_clips: int) -> Path:
    """``maps.png``: one row per clip (disagreements first), the frame then each model's common-scale map over it,
    captioned with the model's label and its IoU under the common protocol."""
    import torch
    from PIL import Image

    from sslt_cli import localize_render as render
    from sslt_cli.metrics import upsample_maps

    rows = clip_agreement(models)[:max(1, n_clips)]
    common = [{row.id: row for row in m.common.result.rows} for m in models]
    cells = []
    for row in rows:
        with Image.open(test.clips[row["id"]].frame) as image:
            frame = np.asarray(image.convert("RGB").resize((CELL, CELL), Image.BICUBIC))
        cells.append(np.pad(frame, ((0, 0), (0, render.BAR_WIDTH), (0, 0))))
        for model, scores in zip(models, common):
            raw = torch.from_numpy(model.maps[row["id"]])[None]
            heat = upsample_maps(raw, "bilinear_align_corners", CELL)[0].numpy()
            low, high = float(heat.min()), float(heat.max())
            shown = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
            peak = np.unravel_index(int(heat.argmax()), heat.shape)
            caption = f"{model.label}: IoU {scores[row['id']].iou:.2f}"
            cells.append(render.overlay(frame, shown, ((peak[1] + 0.5) / CELL, (peak[0] + 0.5) / CELL), low, high,
                                        caption))
    return render.write_png(render.contact_sheet(cells, columns=1 + len(models)), path)


def comparison_table(comparison: Comparison) -> Any:
    """The rows of :meth:`Comparison.rows` as a rich table (percentages), titled with the set and N."""
    from rich.table import Table

    table = Table(title=f"sslt compare on {comparison.set_name}: each model under its own preset and the common one")
    for column in ("method", "protocol", "N", "cIoU", "AUC", "pointing", "centre cIoU", "centre AUC", "published"):
        table.add_column(column, justify="left" if column in ("method", "protocol", "published") else "right")
    for row in comparison.rows():
        cells = [f"{100 * row[key]:.2f}" if np.isfinite(row[key]) else "-"
                 for key in ("ciou", "auc", "pointing", "baseline_centre/ciou", "baseline_centre/auc")]
        protocol = row["protocol"] + (" (own)" if row["kind"] == "own" else " (common)")
        table.add_row(row["method"], protocol, str(int(row["n"])), *cells, row["published"] or "-")
    table.caption = ("own: each method's test protocol (its family's preset); common: every model's maps on the "
                     "(cos + 1) / 2 scale under one protocol; published: the paper's cIoU where this set is its list "
                     "(* another list or protocol)")
    return table
