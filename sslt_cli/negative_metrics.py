"""Negative-audio metrics: does a model predict nothing when nothing it sees is sounding? Pure functions.

Every map here is on the common scale ``(A - lo) / (hi - lo)`` of its family's raw value range (for a cosine map,
(cos + 1) / 2), never min-max normalised per map, so a threshold and a confidence mean the same on every map of a
model, positive or negative (:func:`common_scale`). Two published routes, each re-stated from its code:

* **SLAVC** (stoneMo/SLAVC ``test.py`` / ``utils.py``): the confidence of a pair is the mean of the top quarter of its
  scores (:func:`sslt_cli.metrics.slavc_confidence`); sounding pairs (the frame with its own audio) and non-sounding
  pairs (the frame with negative audio) are ranked by it; TP / FP / FN, AP and max-F1 are
  :func:`sslt_cli.metrics.extended_precision_recall`, :func:`~sslt_cli.metrics.extended_ap`,
  :func:`~sslt_cli.metrics.extended_max_f1` (one implementation, shared with ``sslt eval --extended``); *precision*
  is its ``calc_precision_recall`` at confidence threshold -1000 (every pair detected): correct sounding pairs over all
  pairs (:func:`slavc_summary`).
* **vssl_eval** (xavijuanola/vssl_eval ``utils_dir``): a map is binarised at an absolute threshold t on the common
  scale, strictly (``map > t``). Positives: the per-image IoU of that mask (NaN -> 0), its mean (``ciou``: vssl_eval
  calls the mean IoU cIoU) and the 21-point AUC. Negatives: pIA, the share of pixels above t (:func:`pia`); AOC, the
  area under P(pIA <= 0.05 i), i = 0..20 (:func:`aoc`); F, the harmonic mean of the positive mean IoU and 1 - mean pIA,
  per negative type and "averaged" as vssl_eval averages it: F of the mean IoU and the mean over types of 1 - pIA
  (:func:`vssl_summary`); the stability IoU of the positive mask against each negative mask (:func:`stability_iou`:
  two empty masks give 1, one empty mask 0).

Thresholds: the universal one (vssl_eval's default, 0.5) and a per-model one chosen on a validation set, never on the
test set (:func:`choose_threshold`: the t of :data:`THRESHOLD_GRID` with the highest averaged F on the validation
maps; the lowest such t on ties). vssl_eval hard-codes its per-model thresholds without saying how they were derived;
this rule is sslt's, stated so it can be re-run.

Trivial references (:func:`reference_arrays`): a model that always predicts the centre disc (half the frame, whatever
the audio) and one that predicts nothing (every pixel 0; its sounding IoU is 0): what each number is worth.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

from sslt_cli import metrics

UNIVERSAL_THRESHOLD = 0.5
THRESHOLD_GRID: tuple[float, ...] = tuple(round(0.01 * i, 2) for i in range(101))
REFERENCES = ("centre_disc", "nothing")
PRECISION_THRESHOLD = -1000.0  # SLAVC's EvaluatorFull: precision with every pair detected


def common_scale(up: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """Maps on the common scale: ``(up - lo) / (hi - lo)`` in float32. up: (B, S, S) raw maps -> (B, S, S).

    A cosine map (range (-1, 1)) becomes (cos + 1) / 2; EZ-VSL's cos / 0.03 (range +-1/0.03) becomes the same value.
    """
    lo, hi = value_range
    return ((up.float() - lo) / (hi - lo)).float()


def above(scaled: torch.Tensor, threshold: float) -> torch.Tensor:
    """vssl_eval's binarisation: pixels strictly above ``threshold``. scaled: (B, S, S) -> (B, S, S) bool."""
    return scaled > threshold


def pia(masks: torch.Tensor) -> np.ndarray:
    """pIA, the predicted share of the image. masks: (B, S, S) bool -> (B,) float64 in [0, 1]."""
    flat = masks.reshape(masks.shape[0], -1)
    return (torch.count_nonzero(flat, dim=1).double() / flat.shape[1]).cpu().numpy()


def threshold_ious(masks: torch.Tensor, gt: torch.Tensor) -> np.ndarray:
    """Per-image IoU of thresholded masks (:func:`sslt_cli.metrics.iou_scores`), NaN (empty gt and mask) as 0, as
    vssl_eval appends it. masks: (B, S, S) bool, gt: (B, S, S) -> (B,) float64."""
    ious = metrics.iou_scores(masks, gt).cpu().numpy()
    return np.nan_to_num(ious, nan=0.0)


def stability_iou(positive: torch.Tensor, negative: torch.Tensor) -> np.ndarray:
    """IoU of each positive mask with the same frame's negative mask (vssl_eval's ``compute_IOU_maps``).

    positive, negative: (B, S, S) bool -> (B,) float64: both empty 1, exactly one empty 0, else |P & N| / |P | N|.
    """
    b = positive.shape[0]
    p, n = positive.reshape(b, -1), negative.reshape(b, -1)
    inter = torch.count_nonzero(p & n, dim=1).double()
    union = torch.count_nonzero(p | n, dim=1).double()
    out = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return out.cpu().numpy()


def threshold_curves(scaled: torch.Tensor, gt: torch.Tensor | None, grid: Sequence[float]
                     ) -> tuple[np.ndarray, np.ndarray | None]:
    """pIA and the thresholded IoU of each map at every threshold of ``grid`` in one sort per map.

    scaled: (B, S, S) common-scale maps; gt: (B, S, S) weights or None -> (pia (T, B), iou (T, B) or None), the same
    numbers as :func:`pia` and :func:`threshold_ious` of ``above(scaled, t)`` for each t (from suffix sums of the
    ground truth over the pixels sorted by score, so choosing a threshold on a grid costs one sort, not T passes).
    """
    # compared in float32, as ``scaled > t`` compares a float32 map with a Python float (torch and numpy alike)
    flat = scaled.reshape(scaled.shape[0], -1).float().cpu().numpy()
    n_pixels = flat.shape[1]
    order = np.argsort(flat, axis=1, kind="stable")
    values = np.take_along_axis(flat, order, axis=1)
    thresholds = np.asarray(grid, dtype=np.float32)
    # index of the first pixel strictly above t, per map and threshold
    first = np.stack([np.searchsorted(row, thresholds, side="right") for row in values], axis=1)  # (T, B)
    pia_curve = (n_pixels - first) / n_pixels
    if gt is None:
        return pia_curve, None
    weights = np.take_along_axis(gt.reshape(gt.shape[0], -1).double().cpu().numpy(), order, axis=1)
    zero = (weights == 0).astype(np.float64)
    suffix_w = np.concatenate([np.cumsum(weights[:, ::-1], axis=1)[:, ::-1], np.zeros((len(flat), 1))], axis=1)
    suffix_z = np.concatenate([np.cumsum(zero[:, ::-1], axis=1)[:, ::-1], np.zeros((len(flat), 1))], axis=1)
    rows = np.arange(len(flat))[None, :]
    inter = suffix_w[rows, first]
    outside = suffix_z[rows, first]
    denom = weights.sum(axis=1)[None, :] + outside
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, inter / np.where(denom > 0, denom, 1.0), 0.0)
    return pia_curve, iou


def _trapezoid(y: Sequence[float]) -> float:
    x = np.asarray(metrics.AUC_THRESHOLDS)
    y = np.asarray(y, dtype=np.float64)
    return float((np.diff(x) * (y[1:] + y[:-1]) / 2.0).sum())


def aoc(pia_values: Sequence[float] | np.ndarray) -> float:
    """vssl_eval's AOC: the trapezoid over t = 0.05 i, i = 0..20, of the share of images with pIA <= t.

    pia_values: (N,) in [0, 1] -> float in [0, 1] (1: every negative map predicts nothing; NaN for N = 0).
    """
    values = np.asarray(pia_values, dtype=np.float64)
    if not values.size:
        return math.nan
    return _trapezoid([np.sum(values <= t) / values.size for t in metrics.AUC_THRESHOLDS])


def harmonic(a: float, b: float) -> float:
    """vssl_eval's F: 2ab / (a + b); 0 where a + b = 0 (vssl_eval divides by zero there); NaN in, NaN out."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return 0.0 if a + b == 0 else 2.0 * a * b / (a + b)


def vssl_summary(positive_iou: np.ndarray, negative_pia: Mapping[str, np.ndarray],
                 stability: Mapping[str, np.ndarray], threshold: float) -> dict[str, object]:
    """vssl_eval's numbers at one threshold, as fractions (vssl_eval prints them x 100).

    positive_iou: (N,) per-image IoU of the positive masks at ``threshold`` (:func:`threshold_ious`);
    negative_pia / stability: {negative type: (N,)} pIA of each negative map and its stability IoU.
    Returns ``threshold``, ``ciou`` (mean IoU), ``auc``, per type ``{pia, aoc, f, f_auc_aoc, stability}`` under
    ``types``, and ``mean``: pIA, AOC and stability averaged over the types, ``f`` = F(ciou, mean of 1 - pIA) and
    ``f_auc_aoc`` = F(auc, mean AOC) (vssl_eval's ``f_pos_neg`` and ``f_auc_aoc_pos_neg``).
    """
    iou = np.asarray(positive_iou, dtype=np.float64)
    ciou_mean = float(iou.mean()) if iou.size else math.nan
    auc = metrics.auc(iou)
    types: dict[str, dict[str, float]] = {}
    for name, values in negative_pia.items():
        mean_pia = float(np.mean(values)) if len(values) else math.nan
        area = aoc(values)
        types[name] = {"pia": mean_pia, "aoc": area, "f": harmonic(ciou_mean, 1.0 - mean_pia),
                       "f_auc_aoc": harmonic(auc, area),
                       "stability": float(np.mean(stability[name])) if len(stability[name]) else math.nan}
    mean: dict[str, float] = {}
    if types:
        mean = {key: float(np.mean([t[key] for t in types.values()])) for key in ("pia", "aoc", "stability")}
        mean["f"] = harmonic(ciou_mean, float(np.mean([1.0 - t["pia"] for t in types.values()])))
        mean["f_auc_aoc"] = harmonic(auc, mean["aoc"])
    return {"threshold": float(threshold), "ciou": ciou_mean, "auc": auc, "types": types, "mean": mean}


def slavc_summary(positive_confidence: np.ndarray, positive_iou: np.ndarray, negative_confidence: np.ndarray,
                  iou_threshold: float = metrics.CIOU_THRESHOLD) -> dict[str, float]:
    """SLAVC's numbers over sounding pairs (confidence and IoU under the protocol's rule) and non-sounding pairs
    (confidence only): ``ap`` / ``max_f1`` over every distinct confidence, ``ap_slavc`` / ``max_f1_slavc`` with
    SLAVC's threshold sampling, ``precision`` at confidence -1000 (every pair detected), the pair counts."""
    conf = np.concatenate([np.asarray(positive_confidence, np.float64), np.asarray(negative_confidence, np.float64)])
    iou = np.concatenate([np.asarray(positive_iou, np.float64), np.zeros(len(negative_confidence))])
    sounding = np.concatenate([np.ones(len(positive_confidence), bool), np.zeros(len(negative_confidence), bool)])
    precision, _ = metrics.extended_precision_recall(conf, iou, sounding, np.array([PRECISION_THRESHOLD]),
                                                     iou_threshold)
    return {
        "ap": metrics.extended_ap(conf, iou, sounding, iou_threshold, "all"),
        "ap_slavc": metrics.extended_ap(conf, iou, sounding, iou_threshold, "slavc"),
        "max_f1": metrics.extended_max_f1(conf, iou, sounding, iou_threshold, "all"),
        "max_f1_slavc": metrics.extended_max_f1(conf, iou, sounding, iou_threshold, "slavc"),
        "precision": float(precision[0]),
        "n_sounding": int(sounding.sum()),
        "n_silent": int((~sounding).sum()),
    }


def choose_threshold(positive_iou: np.ndarray, negative_pia: Mapping[str, np.ndarray],
                     grid: Sequence[float] = THRESHOLD_GRID) -> tuple[float, float]:
    """The per-model threshold: on VALIDATION maps, the t of ``grid`` with the highest averaged vssl_eval F
    (F of the positive mean IoU and the mean over negative types of 1 - pIA); the lowest t among equals.

    positive_iou: (T, N) per-image IoU at each grid threshold; negative_pia: {type: (T, N)}. -> (t, its F).
    """
    best_t, best_f = float(grid[0]), -1.0
    iou = np.asarray(positive_iou, dtype=np.float64)
    for index, t in enumerate(grid):
        ciou_mean = float(iou[index].mean())
        kept = float(np.mean([1.0 - float(np.mean(values[index])) for values in negative_pia.values()]))
        f = harmonic(ciou_mean, kept)
        if f > best_f + 1e-12:
            best_t, best_f = float(t), f
    return best_t, best_f


def centre_disc(size: int, protocol: metrics.Protocol) -> torch.Tensor:
    """The centred disc of about half the frame that the protocol predicts for the centre prior: (size, size) bool."""
    prior = torch.from_numpy(metrics.centre_prior_map(size))[None]
    return metrics.predict_masks(prior, protocol, size)[1][0]


def reference_arrays(kind: str, gt: torch.Tensor, protocol: metrics.Protocol, threshold: float
                     ) -> dict[str, np.ndarray]:
    """Per-clip arrays of a trivial reference on clips whose ground truth is ``gt`` (B, S, S).

    ``centre_disc``: the common-scale map is 1 on :func:`centre_disc` and 0 elsewhere, for every audio (so every
    negative map equals the positive one); ``nothing``: every pixel 0 and no predicted region (IoU 0).
    Returns ``confidence`` (B,), ``iou`` (B,) under the protocol's rule, ``iou_t`` (B,) at ``threshold``, and for
    every negative map ``neg_confidence``, ``pia`` and ``stability`` (B,).
    """
    b, size = gt.shape[0], gt.shape[-1]
    if kind == "centre_disc":
        disc = centre_disc(size, protocol).to(gt.device)
        scaled = disc.float().expand(b, -1, -1)
    elif kind == "nothing":
        scaled = torch.zeros((b, size, size), device=gt.device)
    else:
        raise ValueError(f"unknown reference {kind!r}; expected one of {', '.join(REFERENCES)}")
    confidence = metrics.slavc_confidence(scaled, (0.0, 1.0)).cpu().numpy()
    masks = above(scaled, threshold)
    region = scaled > 0.5  # the region it predicts under any rule: the disc, or nothing
    iou_rule = threshold_ious(region, gt)
    return {"confidence": confidence, "iou": iou_rule, "iou_t": threshold_ious(masks, gt),
            "neg_confidence": confidence, "pia": pia(masks), "stability": stability_iou(masks, masks)}
