"""Localisation metrics under the published protocols, batched in torch (REFERENCE.md section 5).

Pure functions of numpy arrays and torch tensors; no file access. The protocol presets they follow are data in
:mod:`sslt_cli.protocols` (re-exported here).

Pipeline per test image (every step batched over a leading B axis):

1. ground truth on a ``size`` x ``size`` grid (224): :func:`vggss_gt_map` (union of normalised boxes, a float
   {0, 1} map) or :func:`flickr_gt_map` (annotator consensus, a float {0, 0.5, 1} map);
2. the predicted map, any h x w, is upsampled to ``size`` (:func:`upsample_maps`), normalised by the protocol's
   formula (:func:`normalised_scores`) and binarised by its threshold rule (:func:`binarise`); :func:`predict_masks`
   runs the three steps;
3. per-image IoU = sum(pred * gt) / (sum(gt) + sum(pred * [gt == 0])) (:func:`iou_scores`; a weighted IoU on Flickr),
   pointing game (:func:`pointing_scores`), predicted area;
4. over images: cIoU (share with IoU >= 0.5), AUC (21-point trapezoid), mean IoU (:func:`summarise`).

Faithfulness (checked digit for digit against the official SSL-TIE, LVS, EZ-VSL, FNAC, SLAVC and SSPL test code;
``tests/test_official_parity.py`` re-states each official loop and requires identical per-clip IoUs):

* Upsampling is computed as each preset's official code computes it: ``cv2.resize(map, (224, 224),
  interpolation=cv2.INTER_LINEAR)`` on the float32 map for ``opencv_linear`` (SSL-TIE, LVS, SSPL; one call per map, a
  few tens of microseconds), ``F.interpolate`` with the official mode and ``align_corners=True`` for the torch presets
  (EZ-VSL, FNAC, SLAVC), on the device the scores are computed on (CUDA kernels may round differently from CPU ones).
* Normalisation is each preset's own float32 formula, so ties at the threshold fall as in the official code:
  ``negated_minmax`` is SSL-TIE/LVS's ``1 - normalize_img(-map)``; ``minmax`` is ``normalize_img`` (EZ-VSL, FNAC);
  ``range_minmax`` is SLAVC's relative prediction, ``normalize_img((map - lo) / (hi - lo))`` with the map's fixed
  value range; ``minmax_ptp`` is SSPL's ``(map - min) / ptp`` (a constant map gives NaN, which predicts nothing).
* The strict rule of SSL-TIE/LVS (``pred[pred > thr] = 1; pred[pred < 1] = 0``) keeps pixels whose score is 1 (the
  map's maximum, and any value within half an ulp of it) even when they are not above the threshold: when more than
  half of the frame sits at the maximum, the plateau is predicted. :func:`binarise` reproduces this.
* Constant maps (``constant_maps``): the official code skips the normalisation of a map whose upsampled values are
  all equal, and the result then depends on the constant (SSL-TIE/LVS: whole frame for a value >= 0, nothing below
  0; EZ-VSL/FNAC/SLAVC: whole frame; SSPL: nothing); a constant map of more than one pixel also gains float noise on
  upsampling (up to a few 1e-7), which the official code then ranks as if it were signal. sslt's default
  (``whole_frame``) judges a map constant by its own values before upsampling and predicts the whole frame under
  every preset, whatever the value; ``official`` reproduces the official behaviour.
* cIoU and AUC use the official thresholds ``0.05 * i`` as Python floats (``0.05 * 3 = 0.15000000000000002``) and the
  same trapezoid as ``sklearn.metrics.auc``, so an IoU of exactly 3/20 does not pass the 0.15 step, as in the papers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# the presets are data in sslt_cli.protocols; metrics.PROTOCOLS and metrics.Protocol name them here too
from sslt_cli.protocols import (EVAL_SIZE, PROTOCOLS, ConstantMaps, EmptyGroundTruth, ImagePreprocessing,  # noqa: F401
                                Normalisation, Protocol, ThresholdRule, UpsampleMode)

FLICKR_GRID = 256
AUC_THRESHOLDS: tuple[float, ...] = tuple(0.05 * i for i in range(21))
CIOU_THRESHOLD = 0.5

# ---------------------------------------------------------------------------------------------------------------
# Ground truth


def _python_slice(start: int, stop: int, size: int) -> slice:
    """``slice(start, stop)`` with Python's semantics (negative indices count from the end), for any int size.

    Clamping to [-size - 1, size + 1] keeps the meaning of every index and lets numpy take -6e18 (what
    ``int(-2.88e16 * 224)`` gives) without overflow.
    """
    lo, hi = -size - 1, size + 1
    return slice(min(max(start, lo), hi), min(max(stop, lo), hi))


def vggss_box_pixels(box: Sequence[float], size: int = EVAL_SIZE, clip: bool = True) -> tuple[int, int, int, int]:
    """Pixel coordinates ``int(v * size)`` of one normalised box ``(xmin, ymin, xmax, ymax)``.

    ``clip=True`` clips every coordinate to [0, 1] first (LVS, EZ-VSL, SLAVC; ``-2.88e16`` becomes 0).
    ``clip=False`` is SSL-TIE's literal code: no clipping, so a slightly negative value becomes a negative index
    (``int(-0.25 * 4) = -1`` selects the last column); on the real ``vggss.json`` both give the same maps, because
    its only out-of-range values are the huge negative ones, which empty their box either way.
    Raises ``ValueError`` for a NaN coordinate (and, without clipping, for an infinite one).
    """
    values = [float(v) for v in box]
    if len(values) != 4:
        raise ValueError(f"a box needs 4 coordinates (xmin, ymin, xmax, ymax), got {list(box)}")
    if any(math.isnan(v) for v in values):
        raise ValueError(f"box {values} has a NaN coordinate")
    if clip:
        values = [min(max(v, 0.0), 1.0) for v in values]
    elif any(math.isinf(v) for v in values):
        raise ValueError(f"box {values} has an infinite coordinate")
    x0, y0, x1, y1 = (int(v * size) for v in values)
    return x0, y0, x1, y1


def vggss_gt_map(boxes: Sequence[Sequence[float]], size: int = EVAL_SIZE, clip: bool = True) -> np.ndarray:
    """VGG-SS ground truth: the union of the boxes. boxes: (K, 4) normalised -> (size, size) float32 in {0, 1}.

    Degenerate boxes (xmax <= xmin or ymax <= ymin after conversion) add nothing, as in every official loader.
    """
    gt = np.zeros((size, size), dtype=np.float32)
    for box in boxes:
        x0, y0, x1, y1 = vggss_box_pixels(box, size, clip)
        gt[_python_slice(y0, y1, size), _python_slice(x0, x1, size)] = 1.0
    return gt


def flickr_gt_map(boxes: Sequence[Sequence[float]], size: int = EVAL_SIZE) -> np.ndarray:
    """Flickr-SoundNet consensus ground truth. boxes: (K, 4) on the 256 grid, one per annotator -> (size, size) float32.

    Each box ``int(size * v / 256)`` adds 1; the sum is halved and capped at 1: 0.5 where one annotator marked the
    pixel, 1 where two or more did (the LVS / SSL-TIE / EZ-VSL code).
    """
    counts = np.zeros((size, size), dtype=np.float32)
    for box in boxes:
        values = [float(v) for v in box]
        if len(values) != 4 or not all(math.isfinite(v) for v in values):
            raise ValueError(f"a Flickr box needs 4 finite coordinates on the 256 grid, got {list(box)}")
        x0, y0, x1, y1 = (int(size * v / FLICKR_GRID) for v in values)
        counts[_python_slice(y0, y1, size), _python_slice(x0, x1, size)] += 1.0
    return np.minimum(counts / 2.0, 1.0).astype(np.float32)


def gt_map(boxes: Sequence[Sequence[float]], kind: Literal["vggss", "flickr"], size: int = EVAL_SIZE,
           clip: bool = True) -> np.ndarray:
    """The ground truth of one image for an annotation kind: (size, size) float32 (see the two builders)."""
    if kind == "vggss":
        return vggss_gt_map(boxes, size, clip)
    if kind == "flickr":
        return flickr_gt_map(boxes, size)
    raise ValueError(f"unknown annotation kind {kind!r}; expected 'vggss' or 'flickr'")


# ---------------------------------------------------------------------------------------------------------------
# Prediction processing


def _opencv_linear(maps: torch.Tensor, size: int) -> torch.Tensor:
    """``cv2.resize(m, (size, size), interpolation=cv2.INTER_LINEAR)`` of each float32 map, as the official loops call
    it (one call per map; OpenCV's own rounding, so the result is the official one to the bit). (B, h, w) -> (B, S, S).
    """
    import cv2

    src = np.ascontiguousarray(maps.detach().cpu().numpy(), dtype=np.float32)
    out = np.empty((src.shape[0], size, size), dtype=np.float32)
    # OpenCV's thread pool only adds wake-up latency on maps this small (and much of it on a busy machine); the
    # result does not depend on the thread count
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        for i in range(src.shape[0]):
            cv2.resize(src[i], (size, size), dst=out[i], interpolation=cv2.INTER_LINEAR)
    finally:
        cv2.setNumThreads(threads)
    return torch.from_numpy(out).to(maps.device)


def upsample_maps(maps: torch.Tensor, mode: UpsampleMode, size: int = EVAL_SIZE) -> torch.Tensor:
    """Bring maps to the evaluation grid. maps: (B, h, w) -> (B, size, size) float32.

    ``opencv_linear``: OpenCV's INTER_LINEAR (half-pixel centres, border replicated) computed by OpenCV on the CPU;
    ``bilinear_align_corners`` / ``bicubic_align_corners``: ``F.interpolate(..., align_corners=True)`` on the maps'
    device. A map already at ``size`` x ``size`` is returned as is (every mode is the identity there).
    """
    maps = maps.float()
    if tuple(maps.shape[-2:]) == (size, size):
        return maps
    if mode == "opencv_linear":
        return _opencv_linear(maps, size)
    if mode == "bilinear_align_corners":
        out = F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=True)
    elif mode == "bicubic_align_corners":
        out = F.interpolate(maps[:, None], size=(size, size), mode="bicubic", align_corners=True)
    elif mode == "bicubic":
        out = F.interpolate(maps[:, None], size=(size, size), mode="bicubic", align_corners=False)
    else:
        raise ValueError(f"unknown upsampling mode {mode!r}")
    return out[:, 0]


def _normalize_img(x: torch.Tensor, guard: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ``normalize_img`` of each map in float32: (x - min) / (max - min).

    x: (B, S, S) -> (p (B, S, S), constant (B,) bool).

    ``guard``: a map with max == min is left as it is (LVS / SSL-TIE / EZ-VSL / SLAVC); without it the division gives
    NaN (SSPL's ``/ np.ptp``).
    """
    flat = x.reshape(x.shape[0], -1)
    lo = flat.amin(dim=1)[:, None, None]
    span = flat.amax(dim=1)[:, None, None] - lo
    constant = span.flatten() == 0
    p = (x - lo) / span
    if guard:
        p = torch.where(constant[:, None, None], x, p)
    return p, constant


def normalised_scores(up: torch.Tensor, normalise: Normalisation = "minmax",
                      value_range: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A preset's official normalisation, in float32 with the official operation order.

    up: (B, S, S) upsampled maps -> (scores (B, S, S), constant (B,) bool: the normalised quantity was constant, so
    the official code skipped the normalisation and the scores are the un-normalised values).
    ``minmax``: ``normalize_img(up)``; ``negated_minmax``: ``1 - normalize_img(-up)`` (SSL-TIE, LVS);
    ``range_minmax``: ``normalize_img((up - lo) / (hi - lo))`` with ``value_range`` = (lo, hi) (SLAVC);
    ``minmax_ptp``: ``(up - min) / ptp`` without the guard (SSPL).
    """
    if normalise == "minmax":
        return _normalize_img(up)
    if normalise == "negated_minmax":
        p, constant = _normalize_img(-up)
        return 1 - p, constant
    if normalise in ("range_minmax", "fixed_range"):
        if value_range is None:
            raise ValueError(f"{normalise} needs the maps' value_range (lo, hi)")
        lo, hi = value_range
        fixed = (up - torch.tensor(lo, dtype=torch.float32)) / torch.tensor(hi - lo, dtype=torch.float32)
        if normalise == "fixed_range":
            flat = up.reshape(up.shape[0], -1)
            return fixed, flat.amax(dim=1) == flat.amin(dim=1)
        return _normalize_img(fixed)
    if normalise == "minmax_ptp":
        return _normalize_img(up, guard=False)
    raise ValueError(f"unknown normalisation {normalise!r}")


def _kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """``sort(row)[k]`` of each row (0-based). flat: (B, N) -> (B,).

    On CPU numpy's introselect is 2-4x faster than ``torch.kthvalue``; both return the exact order statistic.
    """
    if flat.device.type == "cpu":
        return torch.from_numpy(np.partition(flat.numpy(), k, axis=1)[:, k])
    return flat.kthvalue(k + 1, dim=1).values


def binarise(up: torch.Tensor, rule: ThresholdRule, normalise: Normalisation = "minmax",
             value_range: tuple[float, float] | None = None, whole_frame: torch.Tensor | None = None) -> torch.Tensor:
    """The predicted region under a threshold rule. up: (B, S, S) upsampled maps -> (B, S, S) bool.

    The map is normalised to p (:func:`normalised_scores`); with N = S * S and ``thr = sort(p)[int(N / 2)]``:
    ``above_median`` predicts p > thr, plus the pixels whose score is 1 (the official SSL-TIE/LVS
    ``pred[pred < 1] = 0`` keeps them; see the module notes); ``at_least_median`` predicts p >= thr;
    ``at_least_half`` p >= 0.5. Applied to a constant map this is the official behaviour (value-dependent).
    ``whole_frame``: (B,) bool, maps to predict as the whole frame instead (sslt's constant-map rule).
    """
    p, _ = normalised_scores(up, normalise, value_range)
    flat = p.reshape(p.shape[0], -1)
    if rule == "at_least_half":
        mask = flat >= 0.5
    elif rule in ("above_median", "at_least_median", "strictly_above_median"):
        thr = _kth_smallest(flat, flat.shape[1] // 2).to(flat.device)[:, None]
        if rule == "above_median":
            mask = (flat > thr) | (flat >= 1.0)
        else:
            mask = flat > thr if rule == "strictly_above_median" else flat >= thr
    else:
        raise ValueError(f"unknown threshold rule {rule!r}")
    if whole_frame is not None:
        mask[whole_frame.to(mask.device)] = True
    return mask.reshape(p.shape)


def constant_maps(maps: torch.Tensor) -> torch.Tensor:
    """Maps whose own values are all equal. maps: (B, h, w) -> (B,) bool (judged before any upsampling, whose float
    rounding can add noise of a few 1e-7 to a constant map)."""
    flat = maps.reshape(maps.shape[0], -1)
    return flat.amax(dim=1) == flat.amin(dim=1)


def predict_masks(maps: torch.Tensor, protocol: Protocol, size: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Upsample, normalise and binarise raw maps as the protocol does. maps: (B, h, w) -> (up, masks), (B, S, S) each.

    Under ``constant_maps='whole_frame'`` a map constant before upsampling (or after) predicts the whole frame.
    """
    size = protocol.size if size is None else size
    up = upsample_maps(maps, protocol.upsample, size)
    whole = None
    if protocol.constant_maps == "whole_frame":
        flat = up.reshape(up.shape[0], -1)
        whole = constant_maps(maps.float()).to(up.device) | (flat.amax(dim=1) == flat.amin(dim=1))
    elif protocol.constant_maps != "official":
        raise ValueError(f"unknown constant_maps {protocol.constant_maps!r}; expected 'whole_frame' or 'official'")
    return up, binarise(up, protocol.threshold, protocol.normalise, protocol.value_range, whole)


def nominal_predicted_pixels(rule: ThresholdRule, n_pixels: int) -> int | None:
    """Pixels a rule predicts for a map without ties at the median (None: the rule fixes no area).

    With thr = sort(p)[N // 2]: ``above_median`` keeps the N - N // 2 - 1 values above it, ``at_least_median`` the
    N - N // 2 from it up (25087 and 25088 of 50176 at 224 x 224).
    """
    if rule in ("above_median", "strictly_above_median"):
        return n_pixels - n_pixels // 2 - 1
    if rule == "at_least_median":
        return n_pixels - n_pixels // 2
    return None


# ---------------------------------------------------------------------------------------------------------------
# Per-image scores


def iou_scores(masks: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-image IoU. masks: (B, S, S) bool, gt: (B, S, S) float weights in [0, 1] -> (B,) float64.

    IoU = sum(pred * gt) / (sum(gt) + sum(pred * [gt == 0])). sum(pred * gt) is a batched dot product and sum(gt) a
    float32 sum, both exact whatever the order (every partial sum is a multiple of 0.5 below 2^23); the last term is
    a pixel count; the ratio is taken in float64 like numpy does. An empty ground truth with an empty prediction
    gives NaN.
    """
    b = gt.shape[0]
    weights = gt.reshape(b, 1, -1)
    pred = masks.reshape(b, -1)
    inter = torch.bmm(weights, pred[:, :, None].to(gt.dtype)).flatten().double()
    outside = torch.count_nonzero(pred, dim=1) - torch.count_nonzero(pred & (weights[:, 0] > 0), dim=1)
    return inter / (weights.sum(dim=(1, 2)).double() + outside.double())


def pointing_scores(up: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Pointing game. up: (B, S, S) upsampled maps, gt: (B, S, S) -> (B,) float64 in [0, 1].

    A hit when the map's maximum falls inside the ground truth (gt > 0). When several pixels share the maximum, the
    score is the share of them inside: the expected hit when the tie is broken at random (0 or 1 for a unique maximum;
    a constant map scores the share of the frame covered by the ground truth).
    """
    flat = up.reshape(up.shape[0], -1)
    at_max = flat == flat.amax(dim=1, keepdim=True)
    inside = torch.count_nonzero(at_max & (gt.reshape(gt.shape[0], -1) > 0), dim=1)
    return inside.double() / torch.count_nonzero(at_max, dim=1).double()


@dataclass
class LocalisationScores:
    """Per-image results of one batch, float64 numpy arrays of shape (B,)."""

    iou: np.ndarray
    pointing: np.ndarray
    pred_area: np.ndarray


def localisation_scores(maps: torch.Tensor, gt: torch.Tensor, protocol: Protocol) -> LocalisationScores:
    """Score a batch of raw maps under a protocol. maps: (B, h, w) any size, gt: (B, S, S) float -> per-image scores.

    ``S`` is taken from ``gt`` (224 in every protocol; tests use smaller grids). Maps must be finite; both tensors
    on the same device (CPU or CUDA).
    """
    size = gt.shape[-1]
    up, masks = predict_masks(maps, protocol, size)
    return LocalisationScores(
        iou=iou_scores(masks, gt).cpu().numpy(),
        pointing=pointing_scores(up, gt).cpu().numpy(),
        pred_area=(torch.count_nonzero(masks.reshape(masks.shape[0], -1), dim=1).double() / size ** 2).cpu().numpy(),
    )


# ---------------------------------------------------------------------------------------------------------------
# Over images


def ciou(ious: Sequence[float] | np.ndarray, threshold: float = CIOU_THRESHOLD) -> float:
    """cIoU (a.k.a. AP50): the share of images with IoU >= threshold. ious: (N,) -> float (NaN for N = 0)."""
    ious = np.asarray(ious, dtype=np.float64)
    return float(np.mean(ious >= threshold)) if ious.size else math.nan


def auc(ious: Sequence[float] | np.ndarray) -> float:
    """Area under the success curve: trapezoid over t = 0.05 * i, i = 0..20, of the share with IoU >= t.

    ious: (N,) -> float (NaN for N = 0). The thresholds and the trapezoid are those of the official code
    (``sklearn.metrics.auc`` is ``np.trapz``).
    """
    ious = np.asarray(ious, dtype=np.float64)
    if not ious.size:
        return math.nan
    x = np.asarray(AUC_THRESHOLDS)
    y = np.asarray([np.sum(ious >= t) / ious.size for t in AUC_THRESHOLDS])
    return float((np.diff(x) * (y[1:] + y[:-1]) / 2.0).sum())


def summarise(ious: np.ndarray, pointing: np.ndarray, pred_area: np.ndarray) -> dict[str, float]:
    """Summary metrics over N images: ``ciou``, ``auc``, ``mean_iou``, ``pointing``, ``pred_area`` (means), ``n``."""
    n = int(np.asarray(ious).size)
    return {
        "ciou": ciou(ious),
        "auc": auc(ious),
        "mean_iou": float(np.mean(ious)) if n else math.nan,
        "pointing": float(np.mean(pointing)) if n else math.nan,
        "pred_area": float(np.mean(pred_area)) if n else math.nan,
        "n": n,
    }


# ---------------------------------------------------------------------------------------------------------------
# Reference maps for the baselines


def oracle_ious(gt: torch.Tensor, rule: ThresholdRule) -> torch.Tensor:
    """The best IoU any prediction can reach under a rule's predicted area. gt: (B, S, S) -> (B,) float64.

    For the median rules the prediction covers the rule's nominal area A (:func:`nominal_predicted_pixels`, what any
    map without ties at the median gets). Taking pixels by decreasing gt weight is optimal (swapping a 0 pixel for a
    weighted one raises the numerator and lowers the denominator), so the ceiling is exact:
    IoU* = (sum of the A largest weights) / (sum(gt) + max(0, A - #(gt > 0))).
    This bounds every prediction of area A whatever its shape; it ignores that a 14 x 14 map upsampled cannot draw
    every pixel set. A map with ties at the median can predict less (strict rule) or more (``>=`` rule) than A.
    For ``at_least_half`` no area is imposed: the support of the ground truth gives IoU 1. An empty ground truth
    (scored under ``empty_gt='zero'``) gives 0: every prediction of a rule is non-empty.
    """
    flat = gt.reshape(gt.shape[0], -1).double()
    total = flat.sum(dim=1)
    area = nominal_predicted_pixels(rule, flat.shape[1])
    if area is None:
        return (total > 0).double()
    positive = (flat > 0).sum(dim=1)
    taken = total.clone()
    crowded = (positive > area).nonzero().flatten()
    if crowded.numel():
        # More weighted pixels than the area: the A largest weights (flickr 0.5/1 weights make this a partial sort).
        part = np.partition(-flat[crowded].cpu().numpy(), area - 1, axis=1)[:, :area]
        taken[crowded] = torch.from_numpy(-part.sum(axis=1)).to(taken)
    zeros_taken = (area - positive).clamp(min=0).double()
    return taken / (total + zeros_taken)


@lru_cache(maxsize=8)
def _centre_prior_rate(size: int) -> float:
    """1 / (2 sigma^2) of the centre prior's Gaussian so that its min-max >= 0.5 region covers half of the frame."""
    centre = (size - 1) / 2.0
    r2_min = 2 * (centre - math.floor(centre)) ** 2
    r2_max = 2 * centre ** 2
    r2_half = size * size / (2 * math.pi)  # pi r^2 = half the frame

    def excess(rate: float) -> float:
        g_min, g_max = math.exp(-rate * r2_max), math.exp(-rate * r2_min)
        return math.exp(-rate * r2_half) - (g_min + g_max) / 2

    lo, hi = 1e-12, 1.0  # excess > 0 at lo (flat Gaussian), < 0 at hi (narrow)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


def centre_prior_map(size: int = EVAL_SIZE) -> np.ndarray:
    """The centre-prior baseline: a centred Gaussian on the evaluation grid. -> (size, size) float32.

    Its width is chosen so that every preset predicts a centred disc covering about half of the frame: the median
    rules do so for any radial map; for the ``>= 0.5`` rule the Gaussian's min-max half level sits on the radius
    r with pi r^2 = size^2 / 2.
    """
    rate = _centre_prior_rate(size)
    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    r2 = coords[None, :] ** 2 + coords[:, None] ** 2
    return np.exp(-rate * r2).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# SLAVC extended evaluation (sounding and non-sounding pairs)


def slavc_confidence(up: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """SLAVC's confidence that a pair is sounding. up: (B, S, S) upsampled maps -> (B,) float64.

    Scores are the map on a fixed range, ``(A - lo) / (hi - lo)`` (SLAVC's maps are cosine / tau with range
    +-1/tau; for a cosine map the range is (-1, 1), so the score is (A + 1) / 2); the confidence is the mean of the
    top ceil(N / 4) scores (SLAVC's ``np.sort(s)[-n // 4:].mean()``), taken in float64.
    """
    lo, hi = value_range
    flat = ((up.reshape(up.shape[0], -1).double() - lo) / (hi - lo))
    count = -(-flat.shape[1] // 4)
    return flat.topk(count, dim=1).values.mean(dim=1)


def extended_precision_recall(confidence: np.ndarray, iou: np.ndarray, sounding: np.ndarray,
                              thresholds: np.ndarray, iou_threshold: float = CIOU_THRESHOLD
                              ) -> tuple[np.ndarray, np.ndarray]:
    """SLAVC's precision and recall at confidence thresholds. confidence, iou, sounding: (P,); thresholds: (T,).

    A pair is detected when its confidence >= the threshold. A detected sounding pair with IoU >= iou_threshold is a
    true positive; any other detection (a sounding pair in the wrong place, or a non-sounding pair) is a false
    positive; an undetected sounding pair is a false negative (a wrongly placed detection is not also a miss).
    precision = TP / (TP + FP) (1 with no detection), recall = TP / (TP + FN) (1 when TP + FN = 0).
    Returns (precision (T,), recall (T,)) float64. The IoU of a non-sounding pair is ignored.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    sounding = np.asarray(sounding, dtype=bool)
    correct = sounding & (np.asarray(iou, dtype=np.float64) >= iou_threshold)
    order = np.argsort(-confidence, kind="stable")
    desc = confidence[order]
    cum_correct = np.concatenate([[0], np.cumsum(correct[order])])
    cum_sounding = np.concatenate([[0], np.cumsum(sounding[order])])
    # Number of pairs with confidence >= t, for each threshold.
    detected = np.searchsorted(-desc, -np.asarray(thresholds, dtype=np.float64), side="right")
    tp = cum_correct[detected]
    fp = detected - tp
    fn = int(sounding.sum()) - cum_sounding[detected]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp == 0, 1.0, tp / np.maximum(tp + fp, 1))
        recall = np.where(tp + fn == 0, 1.0, tp / np.maximum(tp + fn, 1))
    return precision.astype(np.float64), recall.astype(np.float64)


def extended_ap(confidence: np.ndarray, iou: np.ndarray, sounding: np.ndarray,
                iou_threshold: float = CIOU_THRESHOLD, sampling: Literal["all", "slavc"] = "all") -> float:
    """Average precision over confidence thresholds (precision/recall of :func:`extended_precision_recall`).

    ``all``: every distinct confidence is a threshold (highest first); AP = sum_i (R_i - R_{i-1}) * max_{j>=i} P_j
    with R_{-1} = 0 (the all-points interpolated AP of PASCAL VOC).
    ``slavc``: SLAVC's released ``calc_ap``: thresholds ``sort(conf)[:-1][::-max(1, P // 200)]`` (the top confidence
    left out), AP = sum_i max_{j>=i} P_j * (R_{i+1} - R_i); it leaves out the stretch below its first recall and
    weights each step by the envelope at its start. On thousands of pairs the two agree to about 1e-3; on a handful
    they can differ a lot (0.667 against 0.25 on the 5-pair case of the tests).
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    if sampling == "all":
        thresholds = np.unique(confidence)[::-1]
        precision, recall = extended_precision_recall(confidence, iou, sounding, thresholds, iou_threshold)
        envelope = np.maximum.accumulate(precision[::-1])[::-1]
        steps = np.diff(np.concatenate([[0.0], recall]))
        return float(np.sum(steps * envelope))
    if sampling == "slavc":
        thresholds = np.sort(confidence)[:-1][::-max(1, confidence.size // 200)]
        precision, recall = extended_precision_recall(confidence, iou, sounding, thresholds, iou_threshold)
        envelope = np.maximum.accumulate(precision[::-1])[::-1]
        return float(np.sum(envelope[:-1] * np.diff(recall)))
    raise ValueError(f"unknown sampling {sampling!r}; expected 'all' or 'slavc'")


def extended_max_f1(confidence: np.ndarray, iou: np.ndarray, sounding: np.ndarray,
                    iou_threshold: float = CIOU_THRESHOLD, sampling: Literal["all", "slavc"] = "all") -> float:
    """The best F1 = 2PR / (P + R) (0 where P + R = 0) over confidence thresholds.

    ``all``: every distinct confidence; ``slavc``: SLAVC's ``sorted(conf)[::max(1, P // 10)]`` (about ten thresholds).
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    if sampling == "all":
        thresholds = np.unique(confidence)
    elif sampling == "slavc":
        thresholds = np.sort(confidence)[::max(1, confidence.size // 10)]
    else:
        raise ValueError(f"unknown sampling {sampling!r}; expected 'all' or 'slavc'")
    precision, recall = extended_precision_recall(confidence, iou, sounding, thresholds, iou_threshold)
    total = precision + recall
    f1 = np.where(total > 0, 2 * precision * recall / np.where(total > 0, total, 1.0), 0.0)
    return float(f1.max()) if f1.size else math.nan


# ---------------------------------------------------------------------------------------------------------------
# IS3's interactive metrics (kaistmm/SSLalignment utils.py; vssl_eval Evaluator_iiou)


def adaptive_masks(up: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """The adaptive prediction: the pixels above ``sort(map)[N - k]``, k = the ground truth's area (N // 2 when it
    is empty), as SSLalignment's and vssl_eval's ``cal_CIOU_adap`` threshold it (strictly above: k - 1 pixels of a
    map without ties). up: (B, S, S), gt -> (B, S, S) bool.
    """
    flat = up.reshape(up.shape[0], -1).float()
    n = flat.shape[1]
    area = torch.count_nonzero(gt.reshape(gt.shape[0], -1) != 0, dim=1)
    area = torch.where(area == 0, torch.full_like(area, n // 2), area)
    ordered = flat.sort(dim=1).values
    thr = ordered.gather(1, (n - area).clamp(max=n - 1)[:, None])
    return (flat > thr).reshape(up.shape)


def interactive_scores(ious: Sequence[float], groups: Sequence[str]) -> dict[str, float]:
    """IIoU and IAUC over images that hold several sounding objects, one IoU per object.

    ious: (N,) per-object IoU; groups: (N,) the image each object is in. IIoU = the share of images all of whose
    objects reach IoU >= 0.5; IAUC = the 21-point trapezoid of the same share at t = 0.05 i (SSLalignment's
    ``finalize_IAUC``). Returns ``iiou``, ``iauc``, ``n_images``.
    """
    by_image: dict[str, list[float]] = {}
    for iou, group in zip(ious, groups):
        by_image.setdefault(group, []).append(float(iou))
    if not by_image:
        return {"iiou": math.nan, "iauc": math.nan, "n_images": 0}
    lowest = np.array([min(values) for values in by_image.values()])
    shares = [float(np.mean(lowest >= t)) for t in AUC_THRESHOLDS]
    x = np.asarray(AUC_THRESHOLDS)
    y = np.asarray(shares)
    return {"iiou": float(np.mean(lowest >= CIOU_THRESHOLD)), "iauc": float((np.diff(x) * (y[1:] + y[:-1]) / 2).sum()),
            "n_images": len(by_image)}
