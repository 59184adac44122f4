"""Negative-audio metrics: hand-computed cases, and each published rule re-stated from its code (SLAVC's
calc_precision_recall / calc_ap / F1 list, vssl_eval's cal_CIOU / compute_pIA / compute_AUC_pIA / compute_IOU_maps /
compute_f) as plain loops on random data, identical to float tolerance."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sslt_cli import metrics as M
from sslt_cli import negative_metrics as N
from sslt_cli.protocols import PROTOCOLS


def t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float32))


# ------------------------------------------------------------------------------------------------ hand cases

def test_common_scale_maps_cosine_and_tau_scaled_maps_to_the_same_value():
    cos = t([[[-1.0, 0.0], [0.5, 1.0]]])
    np.testing.assert_allclose(N.common_scale(cos, (-1.0, 1.0)).numpy(), [[[0.0, 0.5], [0.75, 1.0]]])
    tau = 0.03
    np.testing.assert_allclose(N.common_scale(cos / tau, (-1 / tau, 1 / tau)).numpy(), [[[0.0, 0.5], [0.75, 1.0]]],
                               atol=1e-6)


def test_pia_and_threshold_iou_hand_case_4x4():
    scaled = t([[[0.9, 0.9, 0.1, 0.1], [0.9, 0.5, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.6]]])
    masks = N.above(scaled, 0.5)  # strict: the 0.5 pixel is out -> 3 + 1 pixels
    assert N.pia(masks).tolist() == [4 / 16]
    gt = torch.zeros(1, 4, 4)
    gt[0, :2, :2] = 1  # 4 pixels, 3 predicted inside, 1 outside -> 3 / (4 + 1)
    assert N.threshold_ious(masks, gt).tolist() == [pytest.approx(3 / 5)]
    # an empty ground truth and an empty mask: NaN in the metric, 0 as vssl_eval appends it
    assert N.threshold_ious(N.above(scaled, 0.95), torch.zeros(1, 4, 4)).tolist() == [0.0]


def test_stability_iou_hand_cases():
    a = torch.zeros(4, 2, 2, dtype=torch.bool)
    b = torch.zeros(4, 2, 2, dtype=torch.bool)
    a[1, 0, 0] = True                           # positive only -> 0
    b[2, 0, 0] = True                           # negative only -> 0
    a[3, 0] = True                              # 2 pixels
    b[3, :, 0] = True                           # 2 pixels, 1 shared -> 1 / 3
    assert N.stability_iou(a, b).tolist() == [1.0, 0.0, 0.0, pytest.approx(1 / 3)]  # both empty -> 1


def test_aoc_hand_cases():
    assert N.aoc([0.0, 0.0]) == pytest.approx(1.0)        # nothing predicted: P(pIA <= t) = 1 everywhere
    assert N.aoc([1.0]) == pytest.approx(0.025)            # only the last point: (1 + 0) / 2 * 0.05
    # pIA 0.5: P = 0 for t < .5, 1 from t = .5 (10 full steps + a half step) -> 0.5 + 0.025 = 0.525
    assert N.aoc([0.5]) == pytest.approx(0.525)
    assert math.isnan(N.aoc([]))


def test_harmonic_and_vssl_summary_hand_case():
    assert N.harmonic(0.5, 0.5) == 0.5 and N.harmonic(0.0, 0.0) == 0.0 and N.harmonic(0.2, 0.8) == pytest.approx(0.32)
    summary = N.vssl_summary(np.array([0.6, 0.2]), {"silence": np.array([0.0, 0.2]), "noise": np.array([0.4, 0.4])},
                             {"silence": np.array([1.0, 0.0]), "noise": np.array([0.5, 0.5])}, 0.5)
    assert summary["ciou"] == pytest.approx(0.4)
    assert summary["types"]["silence"]["pia"] == pytest.approx(0.1)
    assert summary["types"]["silence"]["f"] == pytest.approx(2 * 0.4 * 0.9 / 1.3)
    assert summary["types"]["noise"]["f"] == pytest.approx(2 * 0.4 * 0.6 / 1.0)
    assert summary["types"]["noise"]["stability"] == pytest.approx(0.5)
    # averaged as vssl_eval averages: F of the mean IoU and the mean kept share (0.9 + 0.6) / 2 = 0.75
    assert summary["mean"]["f"] == pytest.approx(2 * 0.4 * 0.75 / 1.15)
    assert summary["mean"]["stability"] == pytest.approx(0.5)


def test_slavc_precision_is_correct_sounding_pairs_over_all_pairs():
    # 3 sounding (IoU .6, .3, .7), 2 silent: at -1000 everything is detected: TP 2, FP 1 + 2
    out = N.slavc_summary(np.array([0.9, 0.8, 0.4]), np.array([0.6, 0.3, 0.7]), np.array([0.7, 0.2]))
    assert out["precision"] == pytest.approx(2 / 5)
    assert out["ap"] == pytest.approx(2 / 3) and out["max_f1"] == pytest.approx(2 / 3)  # test_metrics' 5-pair case
    assert (out["n_sounding"], out["n_silent"]) == (3, 2)


def test_choose_threshold_maximises_the_averaged_f_and_takes_the_lowest_on_ties():
    grid = (0.2, 0.4, 0.6)
    iou = np.array([[0.5, 0.5], [0.5, 0.5], [0.1, 0.1]])
    pia = {"silence": np.array([[0.8, 0.8], [0.0, 0.0], [0.0, 0.0]]),
           "noise": np.array([[0.8, 0.8], [0.0, 0.0], [0.0, 0.0]])}
    assert N.choose_threshold(iou, pia, grid) == (0.4, pytest.approx(2 * 0.5 / 1.5))
    flat = {"silence": np.zeros((3, 2))}
    assert N.choose_threshold(np.full((3, 2), 0.5), flat, grid)[0] == 0.2


def test_threshold_curves_equal_the_masks_at_every_threshold():
    rng = np.random.default_rng(5)
    scaled = t(np.round(rng.random((6, 20, 20)), 2))  # rounded: pixels exactly at grid thresholds
    gt = torch.zeros(6, 20, 20)
    gt[:, 3:12, 5:15] = 1
    gt[1, 0:2, 0:2] = 0.5
    gt[2] = 0  # empty: IoU 0 (NaN as 0)
    grid = (0.0, 0.25, 0.5, 0.73, 1.0)
    pia_curve, iou_curve = N.threshold_curves(scaled, gt, grid)
    for i, th in enumerate(grid):
        masks = N.above(scaled, th)
        np.testing.assert_allclose(pia_curve[i], N.pia(masks), rtol=0, atol=1e-15)
        np.testing.assert_allclose(iou_curve[i], N.threshold_ious(masks, gt), rtol=0, atol=1e-12)
    assert N.threshold_curves(scaled, None, grid)[1] is None


def test_references_centre_disc_and_nothing():
    proto = PROTOCOLS["ezvsl"]
    gt = torch.zeros(2, 224, 224)
    gt[:, 62:162, 62:162] = 1  # a centred square inside the disc
    disc = N.reference_arrays("centre_disc", gt, proto, 0.5)
    assert disc["pia"] == pytest.approx([0.5, 0.5], abs=0.002)
    assert disc["stability"].tolist() == [1.0, 1.0]
    assert disc["confidence"].tolist() == [1.0, 1.0]  # the top quarter lies inside the disc
    assert disc["iou"] == pytest.approx([10000 / 25088] * 2, abs=1e-3)
    nothing = N.reference_arrays("nothing", gt, proto, 0.5)
    assert nothing["pia"].tolist() == [0.0, 0.0] and nothing["iou"].tolist() == [0.0, 0.0]
    assert nothing["stability"].tolist() == [1.0, 1.0] and nothing["confidence"].tolist() == [0.0, 0.0]


# ------------------------------------------------------------------------- the published rules, re-stated

def _ve_cal_ciou(infer: np.ndarray, gtmap: np.ndarray, thres: float) -> float:
    """vssl_eval's Evaluator_iiou.cal_CIOU as a loop over pixels (strict > threshold)."""
    inter = union_extra = 0.0
    for value, g in zip(infer.ravel(), gtmap.ravel()):
        predicted = 1.0 if value > thres else 0.0
        inter += predicted * g
        union_extra += predicted * (g == 0)
    denom = gtmap.sum() + union_extra
    return inter / denom if denom else float("nan")


def _ve_pia(binary: np.ndarray) -> float:
    return float(np.sum(binary)) / binary.size


def _ve_auc_pia(values: list[float]) -> float:
    from sklearn import metrics as skm

    shares = [np.sum(np.array(values) <= 0.05 * i) / len(values) for i in range(21)]
    return skm.auc([0.05 * i for i in range(21)], shares)


def _ve_auc(values: list[float]) -> float:
    from sklearn import metrics as skm

    shares = [np.sum(np.array(values) >= 0.05 * i) / len(values) for i in range(21)]
    return skm.auc([0.05 * i for i in range(21)], shares)


def _ve_iou_maps(m1: np.ndarray, m2: np.ndarray) -> float:
    if m2.sum() == 0 and m1.sum() > 0:
        return 0.0
    if m1.sum() == 0 and m2.sum() == 0:
        return 1.0
    return np.logical_and(m1, m2).sum() / np.logical_or(m1, m2).sum()


def _ve_f(a: float, b: float) -> float:
    return 2 * (a * b) / (a + b)


@pytest.mark.parametrize("threshold", [0.5, 0.5460, 0.62])
def test_vssl_numbers_against_vssl_evals_rules_on_random_maps(threshold):
    rng = np.random.default_rng(3)
    n, size = 12, 32
    pos = (rng.random((n, size, size)) * 0.5 + 0.3).astype(np.float32)
    negs = {k: (rng.random((n, size, size)) * s + 0.25).astype(np.float32)
            for k, s in (("silence", 0.3), ("noise", 0.5), ("offscreen", 0.7))}
    gt = np.zeros((n, size, size), np.float32)
    for i in range(n):
        x, y = rng.integers(0, size // 2, 2)
        gt[i, y:y + rng.integers(4, size // 2), x:x + rng.integers(4, size // 2)] = 1
    gt[0] = 0  # an empty ground truth: NaN -> 0 in vssl_eval's list
    pos_masks = N.above(t(pos), threshold)
    ours_iou = N.threshold_ious(pos_masks, t(gt))
    literal_iou = [_ve_cal_ciou(pos[i], gt[i], threshold) for i in range(n)]
    literal_iou = [0.0 if np.isnan(v) else v for v in literal_iou]
    np.testing.assert_allclose(ours_iou, literal_iou, rtol=0, atol=1e-12)
    pia = {k: N.pia(N.above(t(v), threshold)) for k, v in negs.items()}
    stab = {k: N.stability_iou(pos_masks, N.above(t(v), threshold)) for k, v in negs.items()}
    summary = N.vssl_summary(ours_iou, pia, stab, threshold)
    literal_pia = {k: [_ve_pia((v[i] > threshold).astype(int)) for i in range(n)] for k, v in negs.items()}
    ciou_pct = np.mean(literal_iou) * 100
    assert summary["ciou"] * 100 == pytest.approx(ciou_pct, abs=1e-9)
    assert summary["auc"] == pytest.approx(_ve_auc(literal_iou), abs=1e-12)
    for k in negs:
        pia_pct = np.mean(literal_pia[k]) * 100
        assert summary["types"][k]["pia"] * 100 == pytest.approx(pia_pct, abs=1e-9)
        assert summary["types"][k]["aoc"] == pytest.approx(_ve_auc_pia(literal_pia[k]), abs=1e-12)
        assert summary["types"][k]["f"] * 100 == pytest.approx(_ve_f(ciou_pct, 100 - pia_pct), abs=1e-9)
        literal_stab = [_ve_iou_maps((pos[i] > threshold).astype(int), (negs[k][i] > threshold).astype(int))
                        for i in range(n)]
        assert summary["types"][k]["stability"] == pytest.approx(np.mean(literal_stab), abs=1e-12)
    pia_mean_neg = np.mean([100 - np.mean(literal_pia[k]) * 100 for k in negs])
    assert summary["mean"]["f"] * 100 == pytest.approx(_ve_f(ciou_pct, pia_mean_neg), abs=1e-9)
    aoc_mean = np.mean([_ve_auc_pia(literal_pia[k]) * 100 for k in negs])
    assert summary["mean"]["f_auc_aoc"] * 100 == pytest.approx(_ve_f(_ve_auc(literal_iou) * 100, aoc_mean), abs=1e-9)


def _slavc_calc_precision_recall(bb_list, ciou_list, confidence_list, confidence_thr, ciou_thr=0.5):
    """SLAVC's EvaluatorFull.calc_precision_recall as a plain loop (bb: number of boxes, 0 for non-sounding)."""
    true_pos = false_pos = false_neg = 0
    for bb, ciou, confidence in zip(bb_list, ciou_list, confidence_list):
        if bb == 0:
            if confidence >= confidence_thr:
                false_pos += 1
        elif confidence >= confidence_thr:
            if ciou >= ciou_thr:
                true_pos += 1
            else:
                false_pos += 1
        else:
            false_neg += 1
    precision = 1.0 if true_pos + false_pos == 0 else true_pos / (true_pos + false_pos)
    recall = 1.0 if true_pos + false_neg == 0 else true_pos / (true_pos + false_neg)
    return precision, recall


def _slavc_top_quarter(scores: np.ndarray) -> float:
    """SLAVC test.py: conf = np.sort(scores.flatten())[-n // 4:].mean() (n // 4 with a negative n rounds down)."""
    flat = np.sort(scores.flatten())
    return float(flat[-flat.size // 4:].mean())


def test_slavc_numbers_against_slavcs_loops_on_random_maps():
    rng = np.random.default_rng(11)
    n_pos, n_neg, size = 40, 60, 14
    raw_pos = rng.uniform(-1, 1, (n_pos, size, size)).astype(np.float32)
    raw_neg = rng.uniform(-1, 0.6, (n_neg, size, size)).astype(np.float32)
    ours_pos = M.slavc_confidence(t(raw_pos)).numpy()
    ours_neg = M.slavc_confidence(t(raw_neg)).numpy()
    literal_pos = [_slavc_top_quarter((raw_pos[i].astype(np.float64) + 1) / 2) for i in range(n_pos)]
    np.testing.assert_allclose(ours_pos, literal_pos, rtol=0, atol=1e-6)
    iou = np.round(rng.random(n_pos), 2)
    out = N.slavc_summary(ours_pos, iou, ours_neg)
    bb = [1] * n_pos + [0] * n_neg
    ious = list(iou) + [0.0] * n_neg
    conf = list(ours_pos) + list(ours_neg)
    assert out["precision"] == pytest.approx(_slavc_calc_precision_recall(bb, ious, conf, -1000)[0], abs=1e-15)
    skip = max(1, len(conf) // 200)
    precision, recall = [], []
    for thr in np.sort(np.array(conf))[:-1][::-skip]:
        p, r = _slavc_calc_precision_recall(bb, ious, conf, thr)
        precision.append(p)
        recall.append(r)
    precision_max = [np.max(precision[i:]) for i in range(len(precision))]
    ap = sum(precision_max[i] * (recall[i + 1] - recall[i]) for i in range(len(precision_max) - 1))
    assert out["ap_slavc"] == pytest.approx(ap, abs=1e-12)
    thresholds = list(sorted(conf))[::max(1, len(conf) // 10)]
    pr = [_slavc_calc_precision_recall(bb, ious, conf, thr) for thr in thresholds]
    f1 = [2 * r * p / (r + p) if r + p > 0 else 0.0 for p, r in pr]
    assert out["max_f1_slavc"] == pytest.approx(max(f1), abs=1e-12)
