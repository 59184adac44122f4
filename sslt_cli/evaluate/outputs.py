"""What an evaluation leaves behind: ``metrics.json``, ``per_clip.csv``, ``excluded.csv``, ``defects.csv``,
``gallery.png``, its MLflow metric names and its table; the one rule naming its folder."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from sslt_cli import metrics, published
from sslt_cli.data.annotations import Annotation, DefectReport
from sslt_cli.data.manifest import atomic_write_bytes
from sslt_cli.evaluate.scoring import BASELINE_LABELS, EvalResult, _gt_for, _reason_kind
from sslt_cli.runs import eval_name

if TYPE_CHECKING:
    from rich.table import Table

    from sslt_cli.evaluate.negatives import NegativesResult

MLFLOW_NAME = re.compile(r"^[/\w.\- ]*$")


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
        "negatives": result.negatives.to_dict() if result.negatives is not None else None,
        "interactive": result.interactive,
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
    if result.negatives is not None:
        written.update(write_negatives(result, out_dir, frames or {}))
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
        if mode in ("resize_square", "tensor_resize_square"):
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


def _write_png(figure: Any, path: Path, dpi: int) -> Path:
    """A matplotlib figure as a PNG written atomically at ``path``."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())
    return path


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
    return _write_png(figure, path, dpi=110)


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
    if result.negatives is not None:
        out.update(negatives_metrics(result.negatives, f"{base}/negatives"))
    if result.interactive is not None:
        out.update(_flat_numbers(f"{base}/interactive", result.interactive))
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



def eval_folder(base: Path, set_name: str, checkpoint: str, protocol: str) -> Path:
    """The folder of an evaluation under ``base``: ``<base>/<set>-<checkpoint>-<protocol>`` (:func:`runs.eval_name`,
    the one naming rule)."""
    return Path(base) / eval_name(set_name, checkpoint, protocol)


# ------------------------------------------------------------------------------------------- negative audio

NEGATIVE_LABELS = {"silence": "silence", "noise": "noise", "offscreen": "off-screen", "all": "all negatives"}
REFERENCE_LABELS = {"centre_disc": "ref.: centre disc", "nothing": "ref.: nothing"}


def write_negatives(result: EvalResult, out_dir: Path, frames: Mapping[str, str]) -> dict[str, Path]:
    """``negatives.csv`` (one row per negative map: its draw's record, confidences, pIA and stability at each
    threshold) and ``negatives.png`` (a few clips: the frame, the positive map and each kind's map side by side)."""
    negatives = result.negatives
    assert negatives is not None
    written = {"negatives_csv": out_dir / "negatives.csv"}
    header = ["id", "kind", "draw", "seed", "partner", "partner_class", "positive_confidence", "confidence"]
    header += [f"{what}_{name}" for name in ("universal", "per_model") if name in negatives.thresholds
               for what in ("pia", "stability")]
    rows = [[_csv_value(row.get(k, "")) for k in header] + [""] for row in negatives.rows]
    rows += [[cid, kind] + [""] * (len(header) - 2) + [reason] for cid, kind, reason in negatives.missing]
    atomic_write_bytes(written["negatives_csv"], _csv_bytes(header + ["missing_reason"], rows))
    picture = _write_negatives_figure(result, frames, out_dir / "negatives.png")
    if picture is not None:
        written["negatives_png"] = picture
    return written


def _csv_value(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _write_negatives_figure(result: EvalResult, frames: Mapping[str, str], path: Path) -> Path | None:
    """Rows of clips: frame, positive map, each negative kind's map (first draw), all on the common scale 0..1."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from sslt_cli.negative_metrics import common_scale

    negatives = result.negatives
    assert negatives is not None
    picks = list(negatives.figure.items())
    if not picks:
        return None
    proto = result.protocol
    columns = ["frame"] + list(next(iter(negatives.figure.values())))
    figure = Figure(figsize=(2.2 * len(columns), 2.4 * len(picks)), layout="constrained")
    FigureCanvasAgg(figure)
    for r, (cid, maps) in enumerate(picks):
        frame = _load_frame(frames[cid], proto.image_preprocessing, proto.size) if os.path.isfile(
            frames.get(cid, "")) else np.zeros((proto.size, proto.size, 3), np.uint8)
        for c, column in enumerate(columns):
            axes = figure.add_subplot(len(picks), len(columns), r * len(columns) + c + 1)
            axes.imshow(frame)
            if column != "frame" and column in maps:
                up = metrics.upsample_maps(torch.from_numpy(np.asarray(maps[column], np.float32))[None],
                                           proto.upsample, proto.size)
                axes.imshow(common_scale(up, negatives.value_range)[0].numpy(), cmap="jet", alpha=0.5, vmin=0.0,
                            vmax=1.0)
            axes.set_title(cid if column == "frame" else NEGATIVE_LABELS.get(column, column), fontsize=7)
            axes.set_axis_off()
    figure.suptitle(f"{result.name or 'eval'}: the frame with its own audio and with negative audio; maps on the "
                    f"common scale (A - lo) / (hi - lo), 0 blue .. 1 red", fontsize=8)
    return _write_png(figure, path, dpi=100)


def _flat_numbers(prefix: str, value: Any) -> dict[str, float]:
    if isinstance(value, Mapping):
        out: dict[str, float] = {}
        for key, inner in value.items():
            out.update(_flat_numbers(f"{prefix}/{key}", inner))
        return out
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {prefix: float(value)}
    return {}


def negatives_metrics(negatives: "NegativesResult", prefix: str) -> dict[str, float]:
    """Every number of the negative-audio evaluation under ``prefix``: ``<prefix>/slavc/noise/ap``,
    ``<prefix>/vssl/universal/types/silence/pia``, ``<prefix>/references/nothing/slavc/all/ap``, ..."""
    out = _flat_numbers(prefix, {"slavc": negatives.slavc, "vssl": negatives.vssl,
                                 "references": negatives.references, "n_positive": negatives.n_positive})
    out.update(_flat_numbers(f"{prefix}/thresholds", {k: v for k, v in negatives.thresholds.items()
                                                        if k in ("universal", "per_model", "per_model_f")}))
    return {_metric_name(k): v for k, v in out.items()}


def _pm(summary: Mapping[str, Any], key: str) -> str:
    value, spread = summary.get(key), summary.get(f"{key}_std")
    text = _pct(value)
    return text if not spread else f"{text}±{100 * spread:.2f}"


def negatives_table(result: EvalResult) -> "Table":
    """The per-kind table: SLAVC's AP / max-F1 / precision and vssl_eval's pIA / AOC / F / stability at the
    universal threshold (and F at the per-model one), the model's rows then the trivial references', in percent."""
    from rich.table import Table

    negatives = result.negatives
    assert negatives is not None
    th = negatives.thresholds
    per_model = "per_model" in negatives.vssl
    table = Table(title=f"{result.name or 'evaluation'} · negative audio · {negatives.n_positive} positive clips, "
                        f"{negatives.settings['draws']} draw(s) · threshold {th['universal']:g}"
                        + (f", per model {th['per_model']:g}" if per_model else ""), caption_justify="left")
    for title in ("negative audio", "AP", "max-F1", "prec.", "pIA", "AOC", "F", "stab.") + (
            ("F/model",) if per_model else ()):
        table.add_column(title, justify="left" if title == "negative audio" else "right")

    def add(label: str, slavc: Mapping, vssl: Mapping, kind: str, style: str | None = None) -> None:
        universal = vssl["universal"]["types"].get(kind) if kind != "all" else vssl["universal"]["mean"]
        cells = [_pm(slavc[kind], k) for k in ("ap", "max_f1", "precision")]
        cells += [_pm(universal, k) for k in ("pia", "aoc", "f", "stability")] if universal else ["-"] * 4
        if per_model:
            model_kind = (vssl["per_model"]["types"].get(kind) if kind != "all" else vssl["per_model"]["mean"])
            cells.append(_pm(model_kind, "f") if model_kind else "-")
        table.add_row(label, *cells, style=style)

    kinds = [k for k in negatives.slavc if k != "all"] + ["all"]
    for kind in kinds:
        add(NEGATIVE_LABELS.get(kind, kind), negatives.slavc, negatives.vssl, kind)
    for name, ref in negatives.references.items():
        add(REFERENCE_LABELS[name], ref["slavc"], ref["vssl"], "all", style="dim")
    method = result.method or {}
    table.caption = (
        f"positive maps: cIoU {_pct(method.get('ciou'))}, AUC {_pct(method.get('auc'))} ({result.protocol.name}); "
        f"at the threshold, mean IoU {_pct(negatives.vssl['universal']['ciou'])}\n"
        f"AP / max-F1 / prec(ision): SLAVC's, the positives against each kind's negatives (confidence: mean of the top "
        f"quarter of the map on the common scale); pIA / AOC / F / stab(ility): vssl_eval's at the universal "
        f"threshold {th['universal']:g}" + (f"; F/model: F at the per-model threshold {th['per_model']:g}, chosen on "
                                             f"{th['per_model_set']}" if per_model
                                             else " (no per-model threshold: no validation set)") +
        "; ± is the spread over draws; ref.: a model that always predicts the centre disc, one that predicts nothing")
    return table
