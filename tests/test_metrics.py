"""Metrics: hand-computed 4x4 and 224x224 cases, a naive per-pixel reference and the real vggss.json with its defects
(the official test loops, re-stated, are in test_official_parity.py)."""
from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sslt_cli import metrics as M
from sslt_cli.catalog import RESOURCES_DIR
from sslt_cli.data.annotations import load_vggss_json, read_id_list

REALDATA = RESOURCES_DIR  # the public metadata shipped in the package

torch.set_num_threads(1)


def t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float32))


# ------------------------------------------------------------------------------------------------ ground truth

def test_vggss_gt_union_4x4():
    gt = M.vggss_gt_map([(0.25, 0.25, 0.75, 1.0), (0.0, 0.0, 0.5, 0.5)], size=4)
    expected = [[1, 1, 0, 0],
                [1, 1, 1, 0],
                [0, 1, 1, 0],
                [0, 1, 1, 0]]
    np.testing.assert_array_equal(gt, expected)
    assert gt.dtype == np.float32


def test_vggss_gt_clipping_and_sslties_negative_index_4x4():
    box = (-0.25, 0.5, 1.0, 1.0)
    clipped = M.vggss_gt_map([box], size=4, clip=True)
    np.testing.assert_array_equal(clipped, [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    # SSL-TIE's literal int(-0.25 * 4) = -1: the slice [-1:4] is the last column only.
    literal = M.vggss_gt_map([box], size=4, clip=False)
    np.testing.assert_array_equal(literal, [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1]])


@pytest.mark.parametrize("clip", [True, False])
def test_vggss_gt_huge_values_empty_or_start_at_zero(clip):
    huge = -2.8823037615171176e16
    assert not M.vggss_gt_map([(0.5, 0.5, huge, 1.0)], size=4, clip=clip).any()
    np.testing.assert_array_equal(M.vggss_gt_map([(huge, 0.5, 0.5, 1.0)], size=4, clip=clip),
                                  [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]])
    assert not M.vggss_gt_map([(0.5, 0.5, 0.5, 1.0)], size=4, clip=clip).any()  # degenerate


def test_vggss_gt_bad_coordinates():
    with pytest.raises(ValueError, match="NaN"):
        M.vggss_gt_map([(0.1, float("nan"), 0.5, 0.5)])
    with pytest.raises(ValueError, match="infinite"):
        M.vggss_gt_map([(0.1, 0.1, float("inf"), 0.5)], clip=False)
    np.testing.assert_array_equal(M.vggss_gt_map([(0.5, 0.0, float("inf"), 1.0)], size=4), [[0, 0, 1, 1]] * 4)


def test_vggss_gt_224_hand_case():
    # 0.403125 * 224 = 90.3, 0.253125 * 224 = 56.7, 0.6 * 224 = 134.4, 0.75 * 224 = 168
    gt = M.vggss_gt_map([(0.403125, 0.253125, 0.6, 0.75)])
    assert gt.shape == (224, 224) and gt.sum() == (168 - 56) * (134 - 90) == 4928
    assert gt[56, 90] == 1 and gt[55, 90] == 0 and gt[56, 89] == 0 and gt[167, 133] == 1 and gt[168, 133] == 0


def test_flickr_consensus_4x4():
    gt = M.flickr_gt_map([(0, 0, 128, 128), (64, 64, 192, 192), (0, 0, 64, 64)], size=4)
    expected = [[1.0, 0.5, 0.0, 0.0],
                [0.5, 1.0, 0.5, 0.0],
                [0.0, 0.5, 0.5, 0.0],
                [0.0, 0.0, 0.0, 0.0]]
    np.testing.assert_array_equal(gt, expected)
    np.testing.assert_array_equal(M.flickr_gt_map([(0, 0, 256, 256)] * 3, size=4), np.ones((4, 4)))  # capped at 1


def test_flickr_gt_224_hand_case():
    # int(224 * 100 / 256) = 87, int(224 * 50 / 256) = 43, int(224 * 200 / 256) = 175, int(224 * 150 / 256) = 131
    gt = M.flickr_gt_map([(100, 50, 200, 150)])
    assert set(np.unique(gt)) == {0.0, 0.5}
    assert gt.sum() == 0.5 * (131 - 43) * (175 - 87)
    assert gt[43, 87] == 0.5 and gt[42, 87] == 0 and gt[130, 174] == 0.5 and gt[131, 174] == 0


# ------------------------------------------------------------------------------------------- threshold rules

RAMP = np.arange(16, dtype=np.float32).reshape(4, 4)
TIES = np.array([0] * 6 + [1] * 6 + [2] * 4, dtype=np.float32).reshape(4, 4)
PLATEAU = np.array([0] * 6 + [1] * 10, dtype=np.float32).reshape(4, 4)


@pytest.mark.parametrize("array, rule, expected", [
    # N = 16, thr = sort(p)[8]
    (RAMP, "above_median", 7), (RAMP, "at_least_median", 8), (RAMP, "at_least_half", 8),
    # ties at the median: p = 0 x6, 0.5 x6, 1 x4 -> thr = 0.5
    (TIES, "above_median", 4), (TIES, "at_least_median", 10), (TIES, "at_least_half", 10),
    # more than half at the maximum: the strict rule keeps the plateau (official pred[pred < 1] = 0 leaves 1s)
    (PLATEAU, "above_median", 10), (PLATEAU, "at_least_median", 10), (PLATEAU, "at_least_half", 10),
])
def test_binarise_counts_4x4(array, rule, expected):
    mask = M.binarise(t(array)[None], rule)[0]
    assert int(mask.sum()) == expected
    # the predicted pixels are always the largest values
    assert float(t(array)[mask].min()) >= float(t(array)[~mask].max())


@pytest.mark.parametrize("name", list(M.PROTOCOLS))
@pytest.mark.parametrize("value", [-0.3, 0.0, 0.7])
@pytest.mark.parametrize("shape", [(1, 1), (7, 7), (14, 14), (4, 4)])
def test_constant_map_predicts_whole_frame(name, value, shape):
    """Issue 13 item 11: a 1x1 map upsampled to 4x4 / 224 gains float noise (a range of about 2.4e-7 at 224), which
    made it a ranked map predicting a few percent of the frame; a map constant by its own values is the whole frame."""
    maps = torch.full((2, *shape), value)
    up, masks = M.predict_masks(maps, M.PROTOCOLS[name])
    assert masks.shape == (2, 224, 224) and masks.all()


def test_a_1x1_map_gains_noise_on_upsampling():
    """Why the constant-map rule looks at the map before upsampling: OpenCV's INTER_LINEAR of a 1x1 map is not
    constant."""
    up = M.upsample_maps(torch.full((1, 1, 1), 0.7), "opencv_linear")
    assert 0 < float(up.max() - up.min()) < 1e-6


@pytest.mark.parametrize("value, expected", [
    (-0.3, {"ssltie": 0, "lvs": 0, "sspl": 0, "slavc_abs": 0, "align": 0, "align_lvs": 0, "align_lvs_bilinear": 0}),
    (0.7, {"ssltie": 1, "lvs": 1, "sspl": 0, "slavc_abs": 1, "align": 0, "align_lvs": 0, "align_lvs_bilinear": 0})])
def test_constant_maps_official_behaviour_depends_on_the_value(value, expected):
    """constant_maps='official': SSL-TIE/LVS predict 1 + c >= 1 (the whole frame for c >= 0, nothing below); SSPL
    divides by a zero ptp (NaN: nothing); EZ-VSL/FNAC/SLAVC keep the value and predict >= itself (the whole frame);
    SLAVC's absolute rule predicts it when the fixed-range score reaches 0.5 (c >= 0); SSLalignment's strict rule
    predicts nothing (no value is above itself). A map already at 224 stays exactly constant, so this is the official rule itself, without upsampling noise."""
    for name, proto in M.PROTOCOLS.items():
        official = dataclasses.replace(proto, constant_maps="official")
        _, masks = M.predict_masks(torch.full((1, 224, 224), value), official)
        assert float(masks.double().mean()) == expected.get(name, 1), name
@pytest.mark.parametrize("name", list(M.PROTOCOLS))
def test_every_preset_on_hand_maps_4x4(name):
    proto = M.PROTOCOLS[name]
    gt = torch.zeros(3, 4, 4)
    gt[:, 2:, :] = 1  # the bottom half (values 8..15 of RAMP)
    scores = M.localisation_scores(t(np.stack([RAMP, TIES, PLATEAU])), gt, proto)
    strict = proto.threshold in ("above_median", "strictly_above_median")
    # RAMP: strict 7 px all inside -> 7/8; >= rules: the 8 bottom pixels -> 1
    # TIES: strict the four 2s (bottom row) -> 4/8; >= rules: 10 px, 8 inside -> 8/(8+2)
    # PLATEAU: 10 px, 8 inside -> 0.8 (the strictly-above rule without the official "score 1" step: nothing, 0)
    expected = [7 / 8 if strict else 1.0, 0.5 if strict else 0.8, 0.0 if proto.threshold == "strictly_above_median"
                else 0.8]
    areas = [7 / 16 if strict else 0.5, 4 / 16 if strict else 10 / 16,
             0.0 if proto.threshold == "strictly_above_median" else 10 / 16]
    if proto.normalise == "fixed_range":
        # SLAVC's absolute rule: scores (v + 1/tau) / (2/tau) >= 0.5 for every v >= 0: the whole frame, half inside
        expected, areas = [0.5] * 3, [1.0] * 3
    np.testing.assert_allclose(scores.iou, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(scores.pred_area, areas)
    # pointing: RAMP max 15 inside; TIES: four 2s all inside; PLATEAU: ten 1s, eight inside
    np.testing.assert_allclose(scores.pointing, [1.0, 1.0, 0.8])


def test_presets_follow_the_reference_table():
    from sslt_cli import PROTOCOL_NAMES
    from sslt_cli.config import EvalConfig

    p = M.PROTOCOLS
    # one list of names: the presets, the recipe schema and `sslt eval --protocol` (which reads PROTOCOL_NAMES)
    assert tuple(p) == PROTOCOL_NAMES == ("ssltie", "lvs", "ezvsl", "fnac", "sspl", "slavc", "fnac_bicubic",
                                          "slavc_rel", "slavc_abs", "align", "align_lvs", "align_lvs_bilinear")
    assert [EvalConfig(protocol=name).protocol for name in PROTOCOL_NAMES] == list(PROTOCOL_NAMES)
    for name in ("ssltie", "lvs"):
        assert (p[name].map_size, p[name].upsample, p[name].threshold, p[name].image_preprocessing) == (
            14, "opencv_linear", "above_median", "resize_centercrop")
        assert p[name].normalise == "negated_minmax"
    for name in ("ezvsl", "fnac"):
        assert (p[name].map_size, p[name].upsample, p[name].threshold, p[name].image_preprocessing) == (
            7, "bilinear_align_corners", "at_least_median", "resize_square")
    assert (p["sspl"].upsample, p["sspl"].threshold, p["sspl"].image_preprocessing, p["sspl"].normalise) == (
        "opencv_linear", "at_least_half", "resize_square", "minmax_ptp")
    assert (p["slavc"].map_size, p["slavc"].upsample, p["slavc"].threshold) == (
        7, "bicubic_align_corners", "at_least_median")
    assert (p["slavc"].normalise, p["slavc"].value_range) == ("range_minmax", (-1.0, 1.0))
    assert all(x.clip_boxes and x.size == 224 for x in p.values())
    assert all((x.constant_maps, x.empty_gt) == ("whole_frame", "exclude") for x in p.values())


# ------------------------------------------------------------------------------------------------ upsampling

def test_upsample_hand_cases_2x2_to_4x4():
    m = t([[0, 4], [8, 12]])[None]
    # half-pixel centres (OpenCV INTER_LINEAR): 1-D [a, .75a + .25b, .25a + .75b, b]
    expected = np.array([0, 2, 6, 8])[:, None] + np.array([0, 1, 3, 4])[None, :]
    np.testing.assert_allclose(M.upsample_maps(m, "opencv_linear", 4)[0], expected, atol=1e-6)
    # align_corners=True: 1-D [a, (2a + b) / 3, (a + 2b) / 3, b]
    expected = np.array([0, 8 / 3, 16 / 3, 8])[:, None] + np.array([0, 4 / 3, 8 / 3, 4])[None, :]
    np.testing.assert_allclose(M.upsample_maps(m, "bilinear_align_corners", 4)[0], expected, atol=1e-6)
    same = torch.rand(2, 4, 4)
    for mode in ("opencv_linear", "bilinear_align_corners", "bicubic_align_corners"):
        assert torch.equal(M.upsample_maps(same, mode, 4), same)


def test_opencv_linear_is_opencv_to_the_bit():
    import cv2

    rng = np.random.default_rng(0)
    maps = rng.standard_normal((8, 14, 14)).astype(np.float32)
    ours = M.upsample_maps(torch.from_numpy(maps), "opencv_linear").numpy()
    theirs = np.stack([cv2.resize(m, (224, 224), interpolation=cv2.INTER_LINEAR) for m in maps])
    assert ours.dtype == np.float32 and np.array_equal(ours, theirs)


# ------------------------------------------------------------------------------------------------ per image

def test_iou_hand_cases_4x4():
    gt = t(M.vggss_gt_map([(0.25, 0.25, 0.75, 1.0), (0.0, 0.0, 0.5, 0.5)], size=4))  # 9 pixels
    top = torch.zeros(4, 4, dtype=torch.bool)
    top[:2] = True  # 8 pixels, 5 inside
    assert float(M.iou_scores(top[None], gt[None])[0]) == 5 / 12
    flickr = t(M.flickr_gt_map([(0, 0, 128, 128), (64, 64, 192, 192), (0, 0, 64, 64)], size=4))
    # inside weights 1 + .5 + .5 + 1 + .5 = 3.5; sum(gt) = 4.5; 3 predicted pixels where gt == 0
    assert float(M.iou_scores(top[None], flickr[None])[0]) == 3.5 / 7.5
    assert float(M.iou_scores(torch.ones(1, 4, 4, dtype=torch.bool), gt[None])[0]) == 9 / 16
    assert math.isnan(float(M.iou_scores(torch.zeros(1, 4, 4, dtype=torch.bool), torch.zeros(1, 4, 4))[0]))


def test_pointing_hand_cases_4x4():
    gt = torch.zeros(4, 4, 4)
    gt[:, :2, :2] = 1
    up = torch.zeros(4, 4, 4)
    up[0, 0, 0] = 1.0  # unique max inside
    up[1, 3, 3] = 1.0  # unique max outside
    up[2, 0, 1] = up[2, 3, 0] = 1.0  # tie: one of two inside
    np.testing.assert_allclose(M.pointing_scores(up, gt).numpy(), [1.0, 0.0, 0.5, 4 / 16])  # 3: constant map


def test_ciou_auc_mean_hand_case():
    ious = [0.0, 3 / 20, 0.5, 1.0]
    assert M.ciou(ious) == 0.5
    # success rates y_i at t = 0.05 i: 1, .75, .75, then .5 up to i = 10 (3/20 fails t_3 = 0.15000000000000002),
    # then .25; trapezoid: 0.05 * (0.875 + 0.75 + 0.625 + 7 * 0.5 + 0.375 + 9 * 0.25) = 0.41875
    assert M.auc(ious) == pytest.approx(0.41875, abs=1e-12)
    assert M.auc(ious) == pytest.approx(float(np.trapezoid(
        [np.mean(np.array(ious) >= th) for th in M.AUC_THRESHOLDS], M.AUC_THRESHOLDS)), abs=0)
    summary = M.summarise(np.array(ious), np.array([1, 0, 1, 1.0]), np.full(4, 0.5))
    assert summary == {"ciou": 0.5, "auc": M.auc(ious), "mean_iou": 0.4125, "pointing": 0.75, "pred_area": 0.5, "n": 4}
    assert math.isnan(M.ciou([])) and math.isnan(M.auc([]))


def test_auc_of_constant_iou_is_its_value_on_the_grid():
    assert M.auc([1.0] * 3) == pytest.approx(1.0, abs=1e-12)
    assert M.auc([0.0] * 3) == pytest.approx(0.05 / 2, abs=1e-12)  # y = 1 at t = 0 only
    assert M.auc([0.5] * 3) == pytest.approx(0.5 + 0.05 / 2, abs=1e-12)


# ------------------------------------------------------------------------------------------- oracle and priors

def _oracle_brute_force(weights: np.ndarray, area: int) -> float:
    flat = weights.ravel()
    best = 0.0
    for subset in itertools.combinations(range(flat.size), area):
        chosen = flat[list(subset)]
        best = max(best, chosen.sum() / (flat.sum() + np.sum(chosen == 0)))
    return best


def test_oracle_hand_cases_4x4():
    small = torch.zeros(1, 4, 4)
    small[0, :2, :2] = 1  # 4 px
    big = torch.ones(1, 4, 4)
    big[0, 3] = 0  # 12 px
    flickr = t([[1, 1, .5, .5], [.5, .5, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])[None]  # 2 ones, 4 halves
    crowded = t([[1, 1, 1, .5], [.5, .5, .5, .5], [.5, .5, .5, 0], [0, 0, 0, 0]])[None]  # 3 ones, 8 halves
    # N = 16: the strict rule predicts 7 px, the >= rule 8 px
    assert float(M.oracle_ious(small, "above_median")[0]) == 4 / 7
    assert float(M.oracle_ious(small, "at_least_median")[0]) == 4 / 8
    assert float(M.oracle_ious(big, "above_median")[0]) == 7 / 12
    assert float(M.oracle_ious(big, "at_least_median")[0]) == 8 / 12
    assert float(M.oracle_ious(flickr, "above_median")[0]) == 4 / 5
    assert float(M.oracle_ious(flickr, "at_least_median")[0]) == 4 / 6
    assert float(M.oracle_ious(crowded, "at_least_median")[0]) == 5.5 / 7  # 3 ones + 5 halves of 7
    for gt in (small, big, flickr, crowded):
        assert float(M.oracle_ious(gt, "at_least_half")[0]) == 1.0
    assert M.nominal_predicted_pixels("above_median", 224 * 224) == 25087
    assert M.nominal_predicted_pixels("at_least_median", 224 * 224) == 25088


def test_oracle_against_brute_force_on_random_weights():
    rng = np.random.default_rng(3)
    for _ in range(3):
        weights = rng.choice([0.0, 0.5, 1.0], size=(4, 4), p=[0.4, 0.3, 0.3]).astype(np.float32)
        for rule, area in (("above_median", 7), ("at_least_median", 8)):
            expected = _oracle_brute_force(weights, area)
            assert float(M.oracle_ious(t(weights)[None], rule)[0]) == pytest.approx(expected, abs=1e-12)


def test_oracle_bounds_every_map_of_the_nominal_area():
    rng = np.random.default_rng(1)
    gt = t(M.vggss_gt_map([(0.1, 0.2, 0.6, 0.9)], size=32))[None].repeat(64, 1, 1)
    maps = torch.from_numpy(rng.random((64, 32, 32), dtype=np.float32))  # no ties: nominal area exactly
    for rule in ("above_median", "at_least_median"):
        ious = M.iou_scores(M.binarise(maps, rule), gt)
        assert float(ious.max()) <= float(M.oracle_ious(gt[:1], rule)[0])


@pytest.mark.parametrize("size", [224, 32, 31])
def test_centre_prior_is_a_centred_half_frame_disc_under_every_preset(size):
    prior = M.centre_prior_map(size)
    assert prior.shape == (size, size) and prior.dtype == np.float32
    np.testing.assert_array_equal(prior, prior.T)
    np.testing.assert_array_equal(prior, prior[::-1, ::-1])
    coords = np.arange(size) - (size - 1) / 2
    r2 = coords[None] ** 2 + coords[:, None] ** 2
    for rule in ("above_median", "at_least_median", "at_least_half"):
        mask = M.binarise(torch.from_numpy(prior)[None], rule)[0].numpy()
        assert abs(mask.mean() - 0.5) < (0.002 if size == 224 else 0.04)
        assert r2[mask].max() < r2[~mask].min()  # a disc: every predicted pixel is nearer the centre


# -------------------------------------------------------------------------------------------------- SLAVC

def test_slavc_confidence_hand_cases():
    ramp = t(np.arange(16).reshape(4, 4) / 15 * 2 - 1)[None]  # cosine -1..1 -> scores v / 15
    assert float(M.slavc_confidence(ramp)[0]) == pytest.approx((12 + 13 + 14 + 15) / 4 / 15, abs=1e-7)
    nine = t(np.arange(9).reshape(3, 3))[None]  # ceil(9 / 4) = 3 top values, range (0, 8)
    assert float(M.slavc_confidence(nine, (0.0, 8.0))[0]) == pytest.approx((6 + 7 + 8) / 3 / 8)


EXT_CONF = np.array([0.9, 0.8, 0.4, 0.7, 0.2])
EXT_IOU = np.array([0.6, 0.3, 0.7, 0.0, 0.0])
EXT_SOUNDING = np.array([True, True, True, False, False])


def test_extended_precision_recall_hand_case():
    p, r = M.extended_precision_recall(EXT_CONF, EXT_IOU, EXT_SOUNDING, np.array([0.9, 0.8, 0.7, 0.4, 0.2, 0.95]))
    # t=.9: TP1 FP0 FN2; t=.8: TP1 FP1 FN1; t=.7: TP1 FP2 FN1; t=.4: TP2 FP2 FN0; t=.2: TP2 FP3 FN0;
    # t=.95: nothing detected -> precision 1, recall 0
    np.testing.assert_allclose(p, [1, 1 / 2, 1 / 3, 1 / 2, 2 / 5, 1])
    np.testing.assert_allclose(r, [1 / 3, 1 / 2, 1 / 2, 1, 1, 0])


def test_extended_ap_and_f1_hand_case():
    # all thresholds: envelope [1, .5, .5, .5, .4] over recall steps [1/3, 1/6, 0, 1/2, 0] -> 1/3 + 1/12 + 1/4
    assert M.extended_ap(EXT_CONF, EXT_IOU, EXT_SOUNDING) == pytest.approx(2 / 3)
    # SLAVC: thresholds [.8, .7, .4, .2] -> P [.5, 1/3, .5, .4], R [.5, .5, 1, 1], envelope .5 -> .5 * .5
    assert M.extended_ap(EXT_CONF, EXT_IOU, EXT_SOUNDING, sampling="slavc") == pytest.approx(0.25)
    # best F1 at t = .4: P .5, R 1
    assert M.extended_max_f1(EXT_CONF, EXT_IOU, EXT_SOUNDING) == pytest.approx(2 / 3)
    assert M.extended_max_f1(EXT_CONF, EXT_IOU, EXT_SOUNDING, sampling="slavc") == pytest.approx(2 / 3)
    perfect = np.array([True, True, False])
    assert M.extended_ap(np.array([0.9, 0.8, 0.1]), np.array([1.0, 1.0, 0]), perfect) == 1.0
    assert M.extended_max_f1(np.array([0.9, 0.8, 0.1]), np.array([1.0, 1.0, 0]), perfect) == 1.0


def _slavc_literal_pr(sounding, ciou, confidence, thr, iou_thr=0.5):
    """SLAVC's released calc_precision_recall, rewritten as a plain loop."""
    tp = fp = fn = 0
    for s, c, conf in zip(sounding, ciou, confidence):
        if not s:
            fp += conf >= thr
        elif conf >= thr:
            tp += c >= iou_thr
            fp += c < iou_thr
        else:
            fn += 1
    return (1.0 if tp + fp == 0 else tp / (tp + fp)), (1.0 if tp + fn == 0 else tp / (tp + fn))


def test_extended_metrics_against_slavc_literal_loops():
    rng = np.random.default_rng(7)
    n = 450
    conf = np.round(rng.random(n), 2)  # rounded: ties between confidences
    iou = rng.random(n)
    sounding = rng.random(n) < 0.5
    thresholds = np.sort(conf)[:-1][::-max(1, n // 200)]
    pr = [_slavc_literal_pr(sounding, iou, conf, th) for th in thresholds]
    p, r = M.extended_precision_recall(conf, iou, sounding, thresholds)
    np.testing.assert_allclose(p, [x[0] for x in pr], rtol=0, atol=1e-15)
    np.testing.assert_allclose(r, [x[1] for x in pr], rtol=0, atol=1e-15)
    pmax = [max(x[0] for x in pr[i:]) for i in range(len(pr))]
    literal_ap = sum(pmax[i] * (pr[i + 1][1] - pr[i][1]) for i in range(len(pmax) - 1))
    assert M.extended_ap(conf, iou, sounding, sampling="slavc") == pytest.approx(literal_ap, abs=1e-12)
    f1 = [2 * a * b / (a + b) if a + b > 0 else 0.0
          for a, b in (_slavc_literal_pr(sounding, iou, conf, th) for th in sorted(conf)[::max(1, n // 10)])]
    assert M.extended_max_f1(conf, iou, sounding, sampling="slavc") == pytest.approx(max(f1), abs=1e-12)
    # all points: every distinct confidence, highest first, VOC envelope from recall 0
    pr_all = [_slavc_literal_pr(sounding, iou, conf, th) for th in sorted(set(conf), reverse=True)]
    recall_before, voc = 0.0, 0.0
    for i, (_, rec) in enumerate(pr_all):
        voc += (rec - recall_before) * max(x[0] for x in pr_all[i:])
        recall_before = rec
    assert M.extended_ap(conf, iou, sounding) == pytest.approx(voc, abs=1e-12)


# ------------------------------------------------------------------------------- naive per-pixel reference

def _naive_upsample(m: np.ndarray, mode: str, size: int) -> np.ndarray:
    """Per-pixel Python interpolation (float64): OpenCV half-pixel bilinear, align-corners bilinear, Keys bicubic."""
    h, w = m.shape
    if (h, w) == (size, size):
        return m.astype(np.float64)

    def taps(dst: int, n_in: int) -> list[tuple[int, float]]:
        if mode == "opencv_linear":
            src = max((dst + 0.5) * n_in / size - 0.5, 0.0)
        elif mode == "bicubic":  # half-pixel centres, not clamped (torch's cubic source index)
            src = (dst + 0.5) * n_in / size - 0.5
        else:
            src = dst * (n_in - 1) / (size - 1)
        i0 = int(math.floor(src))
        frac = src - i0
        if mode in ("bicubic_align_corners", "bicubic"):
            a = -0.75

            def k(x):
                x = abs(x)
                if x <= 1:
                    return ((a + 2) * x - (a + 3)) * x * x + 1
                return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

            return [(min(max(i0 + j, 0), n_in - 1), k(frac - j)) for j in (-1, 0, 1, 2)]
        return [(min(i0, n_in - 1), 1 - frac), (min(i0 + 1, n_in - 1), frac)]

    out = np.zeros((size, size))
    for y in range(size):
        ty = taps(y, h)
        for x in range(size):
            out[y, x] = sum(wy * wx * float(m[iy, ix]) for iy, wy in ty for ix, wx in taps(x, w))
    return out


def _naive_normalise(values: list, normalise: str, value_range: tuple[float, float] | None = None) -> list:
    """A preset's normalisation, one float32 value at a time, in the official operation order."""
    f32 = np.float32
    if normalise in ("range_minmax", "fixed_range"):
        lo, hi = value_range
        values = [f32((v - f32(lo)) / f32(hi - lo)) for v in values]
        if normalise == "fixed_range":
            return values
    if normalise == "negated_minmax":
        neg = [-v for v in values]
        lo, hi = min(neg), max(neg)
        return [f32(1) - f32((v - lo) / (hi - lo)) for v in neg]
    lo, hi = min(values), max(values)
    return [f32((v - lo) / (hi - lo)) for v in values]


def _naive_scores(up: np.ndarray, gt: np.ndarray, proto: M.Protocol) -> tuple[float, float, float]:
    """The official pipeline pixel by pixel: the preset's float32 normalisation, sorted threshold, official quirks, loop
    IoU; a constant map predicts the whole frame (sslt's default)."""
    values = [np.float32(v) for v in up.ravel()]
    lo, hi = min(values), max(values)
    n = len(values)
    if hi == lo:
        pred = [1] * n
    else:
        p = _naive_normalise(values, proto.normalise, proto.value_range)
        thr = sorted(p)[int(n / 2)]
        if proto.threshold == "above_median":
            pred = [1 if (x > thr or x >= 1) else 0 for x in p]
        elif proto.threshold == "strictly_above_median":
            pred = [1 if x > thr else 0 for x in p]
        elif proto.threshold == "at_least_median":
            pred = [1 if x >= thr else 0 for x in p]
        else:
            pred = [1 if x >= 0.5 else 0 for x in p]
    g = [float(v) for v in gt.ravel()]
    inter = sum(pi * gi for pi, gi in zip(pred, g))
    union = sum(g) + sum(pi for pi, gi in zip(pred, g) if gi == 0)
    at_max = [i for i, v in enumerate(values) if v == hi]
    pointing = sum(1 for i in at_max if g[i] > 0) / len(at_max)
    return inter / union, pointing, sum(pred) / n


def _random_cases(rng: np.random.Generator, size: int) -> list[np.ndarray]:
    return [
        rng.random((size, size), dtype=np.float32),  # no ties
        rng.integers(0, 4, (size, size)).astype(np.float32),  # heavy ties at the median
        np.repeat(np.repeat(rng.integers(0, 3, (4, 4)), size // 4, 0), size // 4, 1).astype(np.float32),  # blocks
        np.where(rng.random((size, size)) < 0.7, 5.0, rng.random((size, size))).astype(np.float32),  # max plateau
        np.full((size, size), 2.5, dtype=np.float32),  # constant
    ]


@pytest.mark.parametrize("name", list(M.PROTOCOLS))
def test_fast_path_equals_naive_reference_with_ties(name):
    proto = M.PROTOCOLS[name]
    rng = np.random.default_rng(11)
    size = 32
    maps = _random_cases(rng, size)
    gts = [M.vggss_gt_map([(0.1, 0.2, 0.55, 0.9)], size=size),
           M.flickr_gt_map([(10, 30, 200, 150), (40, 60, 250, 256), (0, 0, 64, 64)], size=size)]
    for gt in gts:
        scores = M.localisation_scores(t(np.stack(maps)), t(np.stack([gt] * len(maps))), proto)
        for i, m in enumerate(maps):
            expected = _naive_scores(m, gt, proto)
            assert (scores.iou[i], scores.pointing[i], scores.pred_area[i]) == pytest.approx(expected, abs=1e-12), i


@pytest.mark.parametrize("mode", ["opencv_linear", "bilinear_align_corners", "bicubic_align_corners", "bicubic"])
def test_upsampling_equals_naive_reference(mode):
    rng = np.random.default_rng(5)
    for shape in ((4, 4), (7, 7), (5, 9)):
        m = rng.standard_normal(shape).astype(np.float32)
        ours = M.upsample_maps(t(m)[None], mode, 24)[0].numpy()
        np.testing.assert_allclose(ours, _naive_upsample(m, mode, 24), rtol=0, atol=2e-6)


@pytest.mark.parametrize("name", list(M.PROTOCOLS))
def test_upsampled_small_maps_match_naive_reference(name):
    """Small maps through the whole pipeline; the reference binarises the torch-upsampled map (float rounding of the
    interpolation itself is checked above), so the comparison is exact."""
    proto = M.PROTOCOLS[name]
    rng = np.random.default_rng(2)
    maps = np.stack([rng.random((7, 7), dtype=np.float32), rng.integers(0, 3, (7, 7)).astype(np.float32)])
    gt = M.vggss_gt_map([(0.3, 0.1, 0.9, 0.6)], size=32)
    scores = M.localisation_scores(t(maps), t(np.stack([gt, gt])), proto)
    up = M.upsample_maps(t(maps), proto.upsample, 32).numpy()
    for i in range(2):
        assert (scores.iou[i], scores.pointing[i], scores.pred_area[i]) == pytest.approx(
            _naive_scores(up[i], gt, proto), abs=1e-12)


# ------------------------------------------------------------------------------------------ the real vggss.json

@pytest.fixture(scope="module")
def real_vggss():
    return load_vggss_json(REALDATA / "vggss.json")


def test_real_vggss_defects_counted_exactly(real_vggss):
    annotations, report = real_vggss
    assert len(annotations) == 5158 and sum(len(a.boxes) for a in annotations.values()) == 5941
    assert len(report.non_finite_or_huge) == 12
    assert len(report.degenerate) == 18
    empty_clipped, differs = [], []
    for cid, ann in annotations.items():
        clipped = M.vggss_gt_map(ann.boxes, clip=True)
        if not clipped.any():
            empty_clipped.append(cid)
        if not np.array_equal(clipped, M.vggss_gt_map(ann.boxes, clip=False)):
            differs.append(cid)
    assert empty_clipped == ["M1P1xla8rg0_000000", "MKC9LvRivTM_000030"]
    # the only out-of-range values are the huge negative ones: SSL-TIE's unclipped code gives the same maps
    assert differs == []
    ssltie = set(read_id_list(REALDATA / "ssltie_test_vggss_4911.txt"))
    assert len(ssltie) == 4911 and ssltie <= set(annotations) and not ssltie & set(empty_clipped)
