"""Evaluation: N accounting, baselines (hand cases and the real VGG-SS boxes), --maps round trip, test set loading,
outputs, the model path and the SLAVC extended evaluation."""
from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from sslt_cli import evaluate as E
from sslt_cli import metrics as M
from sslt_cli.catalog import RESOURCES_DIR
from sslt_cli.checkpoint import LoadedModel
from sslt_cli.data.annotations import Annotation, write_annotation_xml
from sslt_cli.data.manifest import Clip, layout_paths, write_set
from sslt_cli.errors import DataError, SsltError

REALDATA = RESOURCES_DIR  # the public metadata shipped in the package

torch.set_num_threads(1)
HINT = "--maps takes a folder of <clip id>.npy files or one .npz file keyed by clip id"


def ann(cid: str, *boxes) -> Annotation:
    return Annotation(cid, "vggss", tuple(boxes))


def indicator(rows: slice, cols: slice, inside: float = 1.0, outside: float = 0.0) -> np.ndarray:
    m = np.full((224, 224), outside, dtype=np.float32)
    m[rows, cols] = inside
    return m


# Two clips with hand-computed scores under every preset:
# a: GT = top-left quarter (112 x 112 = 12544 px); the map is the GT's indicator -> the prediction is the GT: IoU 1.
# b: GT = top quarter (56 rows); the map is the left half's indicator (25088 px = N/2: the median is the maximum, so
#    the strict rule keeps the plateau): inter 56 x 112 = 6272, IoU = 6272 / (12544 + 18816) = 0.2, pointing 1/4.
HAND_ANNOTATIONS = {"a": ann("a", (0.0, 0.0, 0.5, 0.5)), "b": ann("b", (0.0, 0.0, 1.0, 0.25))}
HAND_MAPS = {"a": indicator(slice(0, 112), slice(0, 112)), "b": indicator(slice(None), slice(0, 112))}


@pytest.mark.parametrize("protocol", ["ssltie", "ezvsl", "sspl"])
def test_score_maps_hand_cases(protocol):
    result = E.score_maps(HAND_MAPS, HAND_ANNOTATIONS, protocol, name="hand")
    # Under the >= median rule, map a (a quarter at 1, the rest tied at 0: the median is 0) predicts the whole frame.
    row_a = ("a", 0.25, False, 0.25, 1.0, 1.0) if protocol == "ezvsl" else ("a", 1.0, True, 0.25, 1.0, 0.25)
    assert [(r.id, r.iou, r.hit, r.gt_area, r.pointing, r.pred_area) for r in result.rows] == [
        row_a, ("b", 0.2, False, 0.25, 0.25, 0.5)]
    ious = [row_a[1], 0.2]
    assert result.method == pytest.approx({"ciou": np.mean(np.array(ious) >= 0.5), "auc": M.auc(ious),
                                           "mean_iou": np.mean(ious), "pointing": 0.625,
                                           "pred_area": (row_a[5] + 0.5) / 2, "n": 2})
    whole = result.baselines["whole_frame"]
    assert (whole["mean_iou"], whole["ciou"], whole["pointing"], whole["pred_area"]) == (0.25, 0.0, 0.25, 1.0)
    oracle = result.baselines["oracle"]
    # A = 25087 (strict) or 25088 (>=): 12544 / (12544 + A - 12544); the >= 0.5 rule: the GT itself
    expected = {"ssltie": 12544 / 25087, "ezvsl": 0.5, "sspl": 1.0}[protocol]
    assert oracle["mean_iou"] == pytest.approx(expected, abs=1e-15) and oracle["ciou"] == 1.0
    prior = M.binarise(torch.from_numpy(M.centre_prior_map())[None], M.PROTOCOLS[protocol].threshold)[0].numpy()
    gts = [M.vggss_gt_map(HAND_ANNOTATIONS[c].boxes) for c in "ab"]
    centre_ious = [np.sum(prior * g) / (np.sum(g) + np.sum(prior * (g == 0))) for g in gts]
    assert result.baselines["centre"]["mean_iou"] == pytest.approx(np.mean(centre_ious), abs=1e-12)
    assert list(result.baselines) == ["centre", "random", "whole_frame", "oracle"]
    assert result.baselines["random"]["seeds"] == [0, 1, 2] and 0 < result.baselines["random"]["mean_iou"] < 0.5


def test_flickr_consensus_through_score_maps():
    # two annotators on the top-left quarter, a third on the top half: weights 1 (top-left), 0.5 (top-right), 0 below
    annotations = {"f": Annotation("f", "flickr", ((0, 0, 128, 128), (0, 0, 128, 128), (0, 0, 256, 128)))}
    maps = {"f": indicator(slice(0, 112), slice(0, 112))}
    ssltie = E.score_maps(maps, annotations, "ssltie")
    # prediction = the top-left quarter: 12544 / (12544 + 6272 + 0)
    assert ssltie.rows[0].iou == pytest.approx(2 / 3, abs=1e-15) and ssltie.rows[0].gt_area == 0.5
    assert ssltie.baselines["whole_frame"]["mean_iou"] == pytest.approx(18816 / (18816 + 25088), abs=1e-15)
    # 25088 weighted pixels > A = 25087: the best 25087 are 12544 ones and 12543 halves
    assert ssltie.baselines["oracle"]["mean_iou"] == pytest.approx((12544 + 12543 / 2) / 18816, abs=1e-15)
    ezvsl = E.score_maps(maps, annotations, "ezvsl")
    assert ezvsl.rows[0].iou == ezvsl.baselines["whole_frame"]["mean_iou"]  # a 0-plateau map: the whole frame
    assert ezvsl.baselines["oracle"]["mean_iou"] == 1.0


def test_random_baseline_is_seeded():
    one = E.score_maps(None, HAND_ANNOTATIONS, "ssltie", random_seeds=(4,)).baselines["random"]
    two = E.score_maps(None, HAND_ANNOTATIONS, "ssltie", random_seeds=(4,)).baselines["random"]
    other = E.score_maps(None, HAND_ANNOTATIONS, "ssltie", random_seeds=(5,)).baselines["random"]
    assert one == two and one["mean_iou"] != other["mean_iou"] and one["mean_iou_std"] == 0.0


def test_accounting_lists_every_dropped_clip_with_its_reason():
    annotations = {
        **HAND_ANNOTATIONS,
        "c": ann("c", (0.2, 1.0, 0.6, 1.0)),  # empty after clipping
        "d": ann("d", (0.1, float("nan"), 0.5, 0.5)),
        "e": ann("e", (0.1, 0.1, 0.5, 0.5)),
        "f": ann("f", (0.1, 0.1, 0.5, 0.5)),
        "g": ann("g", (0.1, 0.1, 0.5, 0.5)),
    }
    bad_map = np.ones((14, 14))
    bad_map[3, 4] = np.nan
    bad_map[0, 0] = 1e300  # finite in float64, inf in float32
    maps = {**HAND_MAPS, "c": np.ones((7, 7)), "d": np.ones((7, 7)), "e": bad_map, "g": np.ones((7, 7)),
            "z": np.ones((7, 7))}
    ids = ["a", "b", "c", "d", "e", "f", "g", "h", "a"]
    done = []
    result = E.score_maps(maps, annotations, "ssltie", ids, unavailable={"g": "frame file missing: /x/g.jpg"},
                          baselines=False, progress=done.append)
    assert result.accounting == {"requested": 8, "no_annotation": 1, "no_frame_audio": 1, "no_map": 1,
                                 "excluded": 3, "scored": 2, "maps_unused": 1}
    assert result.n == 2 and sum(done) == 2 and result.baselines == {}
    assert [(e.id, e.stage, e.reason) for e in result.excluded] == [
        ("c", "excluded", "empty ground truth after clipping boxes to [0, 1]: [[0.2, 1.0, 0.6, 1.0]]"),
        ("d", "excluded", "unusable box: box [0.1, nan, 0.5, 0.5] has a NaN coordinate"),
        ("e", "excluded", "invalid map: 2 non-finite values (NaN or inf)"),
        ("f", "no map", "no map for this clip id"),
        ("g", "no frame/audio", "frame file missing: /x/g.jpg"),
        ("h", "no annotation", "no annotation for this id"),
    ]
    assert result.n_explained() == (
        "8 requested - 1 without annotation (1 no annotation for this id) - 1 without frame/audio "
        "(1 frame file missing) - 1 without a map (1 no map for this clip id) - 3 excluded (1 empty ground truth "
        "after clipping boxes to [0, 1]; 1 unusable box; 1 invalid map) = 2 scored "
        "(ignored the maps of 1 clips that were not requested)")
    assert result.notes == ["1 duplicate ids in the requested list were counted once"]


def test_unclipped_boxes_follow_sslties_literal_code():
    # clipped: the bottom half; literal: int(-0.25 * 224) = -56, the slice [-56:224] is the last 56 columns
    annotations = {"a": ann("a", (-0.25, 0.5, 1.0, 1.0))}
    clipped = E.score_maps(None, annotations, "ssltie", random_seeds=())
    literal = E.score_maps(None, annotations, "ssltie", random_seeds=(), clip_boxes=False)
    assert clipped.baselines["whole_frame"]["mean_iou"] == 0.5
    assert literal.baselines["whole_frame"]["mean_iou"] == 112 * 56 / 50176
    assert literal.protocol.clip_boxes is False and "random" not in literal.baselines


def test_nothing_scored_and_unknown_protocol_are_clear_errors():
    with pytest.raises(DataError) as info:
        E.score_maps({}, HAND_ANNOTATIONS, "ssltie", ["a", "b"])
    assert info.value.render() == "no clip could be scored (2 requested)\n  - 2 x no map: no map for this clip id"
    with pytest.raises(SsltError) as info:
        E.score_maps(HAND_MAPS, HAND_ANNOTATIONS, "ssl-tie")
    assert info.value.message == ("unknown protocol 'ssl-tie'; choose one of ssltie, lvs, ezvsl, fnac, sspl, slavc, "
                                  "fnac_bicubic, slavc_rel, slavc_abs, align, align_lvs, align_lvs_bilinear")


# ------------------------------------------------------------------------------------------- real VGG-SS boxes

@pytest.fixture(scope="module")
def vggss_5158():
    return E.load_vggss_json_set(REALDATA / "vggss.json", REALDATA / "vggss_test_5158.csv")


def test_real_vggss_baselines_5158(vggss_5158):
    test = vggss_5158
    assert len(test.ids) == 5158 and not test.annotation_problems
    # the list holds every clip of the file: its defects are the file's, and no whole-file line is added
    assert not any(" as a whole " in note for note in test.notes)
    assert test.notes[:2] == [
        "vggss.json, in the 5158 requested clips: 12 boxes hold a non-finite or huge coordinate (e.g. "
        "Db6Hjt0x28k_000056: [0.384375, 0.859375, 0.696875, -2.8823037615171176e+16])",
        "vggss.json, in the 5158 requested clips: 18 boxes are degenerate (xmax <= xmin or ymax <= ymin), e.g. "
        "UyCw7pCgYg8_000055: [0.00625, 0.015625, 0.00625, 0.015625]"]
    assert Counter(kind for _, _, kind in test.defects.boxes()) == {"non_finite_or_huge": 12, "degenerate": 18}
    result = E.score_maps(None, test.annotations, "ssltie", test.ids, random_seeds=(0,))
    assert result.n_explained() == ("5158 requested - 2 excluded (2 empty ground truth after clipping boxes to "
                                    "[0, 1]) = 5156 scored")
    assert [e.id for e in result.excluded] == ["M1P1xla8rg0_000000", "MKC9LvRivTM_000030"]
    # Independent check: a literal disc pi r^2 = half the frame, scored with plain numpy.
    scored = [cid for cid in test.ids if cid not in {e.id for e in result.excluded}]
    gts = [M.vggss_gt_map(test.annotations[cid].boxes) for cid in scored]
    coords = np.arange(224) - 111.5
    disc = (coords[None] ** 2 + coords[:, None] ** 2) < 224 * 224 / (2 * math.pi)
    areas = np.array([g.sum(dtype=np.float64) for g in gts])
    inter = np.array([g[disc].sum() for g in gts])
    disc_ious = inter / (areas + disc.sum() - inter)
    centre = result.baselines["centre"]
    # The Gaussian's prediction differs from the literal disc only by the ring of pixels tied at the median radius.
    assert centre["ciou"] == pytest.approx(np.mean(disc_ious >= 0.5), abs=0.002)
    assert centre["auc"] == pytest.approx(M.auc(disc_ious), abs=0.002)
    # The independent check of the issue: about 34 cIoU / 37 AUC.
    assert 0.335 < centre["ciou"] < 0.345 and 0.370 < centre["auc"] < 0.380
    whole = result.baselines["whole_frame"]
    assert whole["mean_iou"] == pytest.approx(np.mean(areas / 50176), abs=1e-12)
    assert whole["ciou"] == np.mean(areas >= 25088)
    # Oracle: IoU >= 0.5 needs 12544 <= |G| <= 2 A (A = 25087): about half of the clips ("no method can exceed ~50").
    oracle = result.baselines["oracle"]
    assert oracle["ciou"] == np.mean((areas >= 12544) & (areas <= 2 * 25087))
    assert 0.50 < oracle["ciou"] < 0.51
    assert result.baselines["random"]["ciou"] < 0.01 and 0.20 < result.baselines["random"]["auc"] < 0.23


def test_real_vggss_baselines_4911():
    test = E.load_vggss_json_set(REALDATA / "vggss.json", REALDATA / "ssltie_test_vggss_4911.txt")
    assert test.name == "ssltie_test_vggss_4911" and len(test.ids) == 4911
    # the defects of the evaluated clips, then the whole file's counts
    assert test.notes[:1] + test.notes[-1:] == [
        "vggss.json, in the 4911 requested clips: 5 boxes are degenerate (xmax <= xmin or ymax <= ymin), e.g. "
        "UyCw7pCgYg8_000055: [0.00625, 0.015625, 0.00625, 0.015625]",
        "vggss.json as a whole (5158 clips): 12 boxes with a non-finite or huge coordinate, 18 degenerate boxes; "
        "in the 4911 requested clips: 5 degenerate boxes"]
    assert [(cid, kind) for cid, _, kind in test.defects.boxes()] == [
        ("UyCw7pCgYg8_000055", "degenerate"), ("YBd5lEnpT_8_000000", "degenerate"),
        ("UMidlzROhC0_000082", "degenerate"), ("8_rFjamYo1Y_000022", "degenerate"),
        ("c-8SLUH5pp4_000030", "degenerate")]
    result = E.score_maps(None, test.annotations, "ssltie", test.ids, random_seeds=())
    assert result.n_explained() == "4911 requested = 4911 scored"
    assert 0.335 < result.baselines["centre"]["ciou"] < 0.345 and 0.370 < result.baselines["centre"]["auc"] < 0.380
    assert 0.50 < result.baselines["oracle"]["ciou"] < 0.51


def test_vggss_json_set_reports_unknown_ids_and_missing_media(tmp_path):
    ids = tmp_path / "list.txt"
    ids.write_text("zpWuikVorYg_000032.jpg\nnope_000001\ngEvCUcZ6w88_000030\n")
    media = tmp_path / "media"
    for rel in layout_paths("vggss_test", "zpWuikVorYg_000032")[:2] + ("frame/gEvCUcZ6w88_000030.jpg",):
        (media / rel).parent.mkdir(parents=True, exist_ok=True)
        (media / rel).write_bytes(b"x")
    test = E.load_vggss_json_set(REALDATA / "vggss.json", ids, media)
    assert test.ids == ["zpWuikVorYg_000032", "nope_000001", "gEvCUcZ6w88_000030"]
    assert test.annotation_problems == {"nope_000001": f"not in {REALDATA / 'vggss.json'}"}
    assert list(test.clips) == ["zpWuikVorYg_000032"]
    assert test.unavailable == {
        "nope_000001": f"frame file missing: {media / 'frame/nope_000001.jpg'}",
        "gEvCUcZ6w88_000030": f"audio file missing: {media / 'audio/gEvCUcZ6w88_000030.wav'}"}


# ------------------------------------------------------------------------------------------- prepared sets

def _jpeg(path: Path, size=(320, 240)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture()
def prepared_set(tmp_path):
    root = tmp_path / "test_vggss"
    clips = []
    for cid in ("c1", "c2", "c3", "c4", "c5"):
        frame, audio, anno = layout_paths("vggss_test", cid)
        status, reason = ("missing", "video not found") if cid == "c3" else ("ok", "")
        clips.append(Clip(cid, "", frame, audio, anno, status, reason))
        if cid == "c3":
            continue
        _jpeg(root / frame)
        if cid != "c2":
            (root / audio).parent.mkdir(parents=True, exist_ok=True)
            (root / audio).write_bytes(b"RIFF")
        if cid != "c4":
            write_annotation_xml(root / anno, ann(cid, (0.0, 0.0, 0.5, 0.5) if cid != "c5" else (0.0, 0.0, 1.0, 0.25)))
    write_set(root, "vggss_test", clips)
    return root


def test_load_prepared_set_reports_every_problem(prepared_set):
    root = prepared_set
    test = E.load_test_set(root)
    assert test.name == "test_vggss" and test.anno_kind == "vggss"
    assert test.ids == ["c1", "c2", "c4", "c5", "c3"]
    assert sorted(test.annotations) == ["c1", "c2", "c5"] and list(test.clips) == ["c1", "c4", "c5"]
    assert test.unavailable == {"c2": f"audio file missing: {root / 'audio/c2.wav'}", "c3": "missing: video not found"}
    assert test.annotation_problems == {"c4": f"annotation file missing: {root / 'anno/c4.xml'}",
                                        "c3": "missing: video not found"}
    listed = root.parent / "list.txt"
    listed.write_text("c1\nc9\n")
    test = E.load_test_set(root, listed)
    assert test.ids == ["c1", "c9"] and test.unavailable == {"c9": f"not in {root / 'manifest.csv'}"}
    maps = {"c1": HAND_MAPS["a"], "c2": HAND_MAPS["a"], "c4": HAND_MAPS["a"], "c5": HAND_MAPS["b"]}
    full = E.load_test_set(root)
    result = E.score_maps(maps, full.annotations, "ssltie", full.ids, unavailable=full.unavailable,
                          annotation_problems=full.annotation_problems, baselines=False)
    assert [(e.id, e.stage) for e in result.excluded] == [("c2", "no frame/audio"), ("c4", "no annotation"),
                                                         ("c3", "no annotation")]
    assert [(r.id, r.iou) for r in result.rows] == [("c1", 1.0), ("c5", 0.2)]


def test_a_training_layout_is_not_a_test_set(tmp_path):
    write_set(tmp_path / "train", "vggsound_train", [Clip("x", "", "a.jpg", "a.wav")])
    with pytest.raises(DataError) as info:
        E.load_test_set(tmp_path / "train")
    assert info.value.message == (f"{tmp_path / 'train'}: layout 'vggsound_train' has no box annotations; "
                                  f"evaluate on a vggss_test or flickr_test set")


# ------------------------------------------------------------------------------------------------ --maps

def test_maps_round_trip_npy_folder_and_npz(tmp_path):
    rng = np.random.default_rng(0)
    maps = {"zpWuikVorYg_000032": rng.random((14, 14)).astype(np.float32),
            "-0BIyqJj9ZU_000030": rng.random((7, 9)),  # float64, any size
            "10000130166": rng.random((1, 1, 5, 5)).astype(np.float32)}
    folder = tmp_path / "maps"
    folder.mkdir()
    for cid, m in maps.items():
        np.save(folder / f"{cid}.npy", m)
    loaded = E.load_maps(folder)
    assert sorted(loaded) == sorted(maps)
    for cid, m in maps.items():
        assert loaded[cid].dtype == np.float32 and loaded[cid].ndim == 2
        np.testing.assert_array_equal(loaded[cid], np.asarray(m, np.float32).reshape(loaded[cid].shape))
    archive = E.save_maps(loaded, tmp_path / "maps.npz")
    again = E.load_maps(archive)
    assert sorted(again) == sorted(loaded) and all(np.array_equal(again[k], loaded[k]) for k in loaded)
    # scoring precomputed maps equals scoring the same maps in memory
    annotations = {cid: ann(cid, (0.1, 0.2, 0.6, 0.9)) for cid in maps}
    from_file = E.score_maps(again, annotations, "ezvsl", baselines=False)
    in_memory = E.score_maps(maps, annotations, "ezvsl", baselines=False)
    assert [r.id for r in from_file.rows] == list(maps) and from_file.rows[:2] == in_memory.rows
    # in memory nothing squeezes the (1, 1, 5, 5) array: it is listed, not scored
    assert [(e.id, e.reason) for e in in_memory.excluded] == [
        ("10000130166", "invalid map: shape (1, 1, 5, 5), expected a 2-D (h, w) map")]


def test_load_maps_errors(tmp_path):
    def message(path) -> str:
        with pytest.raises(DataError) as info:
            E.load_maps(path)
        return info.value.message

    assert message(tmp_path / "nope") == f"{tmp_path / 'nope'}: no such file or folder; {HINT}"
    (tmp_path / "empty").mkdir()
    assert message(tmp_path / "empty") == f"{tmp_path / 'empty'}: no .npy files in this folder; {HINT}"
    (tmp_path / "maps.txt").write_text("x")
    assert message(tmp_path / "maps.txt") == (f"{tmp_path / 'maps.txt'}: expected a folder of .npy files or a .npz "
                                              f"file, not a .txt; {HINT}")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.npy").write_bytes(b"garbage")
    assert message(bad) == f"{bad / 'x.npy'}: not a .npy array: a text file of 7 bytes (it starts with 'garbage')"
    np.save(bad / "x.npy", np.zeros((14, 14)))
    (bad / "x.npy").write_bytes((bad / "x.npy").read_bytes()[:100])
    assert message(bad) == f"{bad / 'x.npy'}: a truncated or damaged .npy array (a .npy array of 100 bytes)"
    cube = tmp_path / "cube"
    cube.mkdir()
    np.save(cube / "x.npy", np.zeros((3, 14, 14)))
    assert message(cube) == f"{cube / 'x.npy'}: a map must be a 2-D array (h, w), got shape (3, 14, 14)"
    np.savez(tmp_path / "text.npz", x=np.array([["a", "b"]]))
    assert message(tmp_path / "text.npz") == (f"{tmp_path / 'text.npz'}[x]: dtype <U1 is not a real number type; "
                                              f"save maps as float arrays")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    said = message(tmp_path / "broken.npz")
    assert said == (f"{tmp_path / 'broken.npz'}: not a .npz archive: a text file of 9 bytes (it starts with "
                    f"'not a zip'); {HINT}")
    assert "pickle" not in said and "unsafe" not in said


# ------------------------------------------------------------------------------------------------ outputs

def test_write_outputs_metrics_csv_and_gallery(prepared_set, tmp_path):
    test = E.load_test_set(prepared_set)
    maps = {"c1": HAND_MAPS["a"], "c5": HAND_MAPS["b"]}
    result = E.score_maps(maps, test.annotations, "ssltie", test.ids, annotation_problems=test.annotation_problems,
                          name="test_vggss", random_seeds=(0,))
    written = E.write_outputs(result, tmp_path / "eval", maps=maps, frames=test.frames, annotations=test.annotations,
                              gallery_count=1)
    assert sorted(written) == ["excluded", "gallery", "metrics", "per_clip"]
    data = json.loads(written["metrics"].read_text())
    assert data["n"] == 2 and data["protocol"]["name"] == "ssltie" and data["protocol"]["threshold"] == "above_median"
    assert data["method"]["ciou"] == 0.5 and data["method"]["mean_iou"] == 0.6
    assert data["accounting"]["requested"] == 5 and data["n_explained"] == result.n_explained()
    assert set(data["baselines"]) == {"centre", "random", "whole_frame", "oracle"}
    assert data["excluded_by_reason"] == {"no map: no map for this clip id": 1,
                                          "no annotation: annotation file missing": 1, "no annotation: missing": 1}
    with open(written["per_clip"]) as f:
        rows = list(csv.reader(f))
    assert rows == [["id", "iou", "hit", "gt_area", "pointing", "pred_area", "protocol"],
                    ["c1", "1.0", "1", "0.25", "1.0", "0.25", "ssltie"],
                    ["c5", "0.2", "0", "0.25", "0.25", "0.5", "ssltie"]]
    with open(written["excluded"]) as f:
        excluded = list(csv.reader(f))
    assert excluded[0] == ["id", "stage", "reason"] and [r[0] for r in excluded[1:]] == ["c2", "c4", "c3"]
    assert written["gallery"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and written["gallery"].stat().st_size > 5000
    plain = E.write_outputs(result, tmp_path / "plain")
    assert sorted(plain) == ["excluded", "metrics", "per_clip"]


def test_metrics_json_is_strict_json_with_nan(tmp_path):
    result = E.score_maps(HAND_MAPS, HAND_ANNOTATIONS, "ssltie", baselines=False)
    result.method["pointing"] = float("nan")
    text = E.write_outputs(result, tmp_path)["metrics"].read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert json.loads(text)["method"]["pointing"] is None


def test_mlflow_metric_names():
    result = E.score_maps(HAND_MAPS, HAND_ANNOTATIONS, "ssltie", random_seeds=(0,))
    names = E.mlflow_metrics(result, "test_vggss")
    assert names["test_vggss/ciou"] == 0.5 and names["test_vggss/n"] == 2.0
    assert names["test_vggss/baseline_whole_frame/mean_iou"] == 0.25
    assert names["test_vggss/oracle/ciou"] == 1.0
    assert {"test_vggss/baseline_centre/auc", "test_vggss/baseline_random/ciou"} <= set(names)
    assert all(E.MLFLOW_NAME.match(k) for k in names)
    odd = E.mlflow_metrics(result, "test vggss@4911 (ssltie)")
    assert "test vggss_4911 _ssltie_/ciou" in odd and all(E.MLFLOW_NAME.match(k) for k in odd)


def test_result_table_shows_rows_n_and_protocol():
    result = E.score_maps(HAND_MAPS, HAND_ANNOTATIONS, "ezvsl", name="hand", random_seeds=(0, 1))
    console = Console(record=True, width=200)
    console.print(E.result_table(result))
    text = console.export_text()
    assert "hand · protocol ezvsl · N = 2" in text
    assert "2 requested = 2 scored" in text
    lines = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 3}
    assert list(lines) == ["hand", "centre prior", "random map (2 seeds)",
                           "whole frame", "oracle ceiling"]
    # ezvsl: map a predicts the whole frame (IoU 0.25), map b the left half (IoU 0.2)
    assert [c.strip() for c in lines["hand"].split("│")[2:7]] == ["0.00", f"{100 * M.auc([.25, .2]):.2f}", "22.50",
                                                                  "62.50", "75.00"]
    assert [c.strip() for c in lines["whole frame"].split("│")[2:7]] == ["0.00", f"{100 * M.auc([.25, .25]):.2f}",
                                                                        "25.00", "25.00", "100.00"]


# ------------------------------------------------------------------------------------------------ model path

def test_maps_from_batches_with_a_stand_in_model():
    class StandIn(torch.nn.Module):
        def embed_image(self, images):  # (B, 3, H, W) -> (B, 2, H/16, W/16), unit vectors
            pooled = torch.nn.functional.avg_pool2d(images[:, :2], 16)
            return torch.nn.functional.normalize(pooled, dim=1)

        def embed_audio(self, spec):  # (B, 1, M, T) -> (B, 2)
            return torch.nn.functional.normalize(spec.mean(dim=(2, 3)).repeat(1, 2), dim=1)

        def maps(self, v, a):  # every network's map of each image with its own audio
            return torch.einsum("bchw,bc->bhw", v, a)[:, None]

    model = StandIn().train()
    images = torch.rand(3, 3, 32, 48)
    specs = torch.rand(3, 1, 8, 10) + 0.1
    counts = []
    maps = E.maps_from_batches(model, [(["x", "y"], images[:2], specs[:2]), (["z"], images[2:], specs[2:])], "cpu",
                               progress=counts.append)
    assert not model.training and counts == [2, 1] and list(maps) == ["x", "y", "z"]
    assert maps["z"].shape == (2, 3) and maps["z"].dtype == np.float32
    v = model.embed_image(images[2:])
    np.testing.assert_allclose(maps["z"], (v[0] * (2 ** -0.5)).sum(0).numpy(), atol=1e-6)
    with pytest.raises(DataError, match="clip id x appears twice"):
        E.maps_from_batches(model, [(["x"], images[:1], specs[:1]), (["x"], images[:1], specs[:1])], "cpu")


# ------------------------------------------------------------------------------------------------ SLAVC

def test_read_silent_pairs_real_lists(tmp_path):
    vggss = E.read_silent_pairs(REALDATA / "vggss_test_plus_silent.csv")
    flickr = E.read_silent_pairs(REALDATA / "flickr_test_plus_silent.csv")
    assert len(vggss) == 5158 and vggss[0] == ("9PmzQI8ZYpg_000147", "9PmzQI8ZYpg_000147")
    assert len(flickr) == 250 and flickr[0] == ("10000130166", "10437048305")
    assert E.silent_pair_key(*flickr[0]) == "10000130166+10437048305"
    (tmp_path / "ids.csv").write_text("a,b\n")
    with pytest.raises(DataError) as info:
        E.read_silent_pairs(tmp_path / "ids.csv")
    assert info.value.message == (f"{tmp_path / 'ids.csv'}: expected a 'video,audio,label' header (SLAVC's "
                                  f"*_plus_silent.csv), got a,b")


def test_score_extended_hand_case():
    # GT: the top three quarters (168 rows). Good maps: 0.8 on the GT, -0.2 elsewhere -> more than half at the
    # maximum, the prediction is the GT (IoU 1); confidence = mean of the top quarter of (A + 1) / 2 = 0.9.
    # The wrong map: 0.8 on the bottom half -> IoU 12544 / 50176 = 0.25, same confidence. Silent: constant -0.6 -> 0.2.
    annotations = {cid: ann(cid, (0.0, 0.0, 1.0, 0.75)) for cid in ("g1", "g2", "w", "nan", "x")}
    good = indicator(slice(0, 168), slice(None), 0.8, -0.2)
    wrong = indicator(slice(112, 224), slice(None), 0.8, -0.2)
    broken = good.copy()
    broken[0, 0] = np.inf
    sounding = {"g1": good, "g2": good, "w": wrong, "nan": broken, "orphan": good}
    silent = {E.silent_pair_key("s", str(i)): np.full((7, 7), -0.6, np.float32) for i in range(2)}
    result = E.score_extended(sounding, silent, annotations)
    assert (result.n_sounding, result.n_silent) == (3, 2)
    assert [(e.id, e.reason) for e in result.excluded] == [
        ("nan", "invalid map: 1 non-finite values (NaN or inf)"), ("orphan", "no annotation for this id")]
    # t = 0.9: TP 2, FP 1 (wrong place), FN 0 -> P 2/3, R 1; t = 0.2: P 2/5, R 1
    assert result.ap == pytest.approx(2 / 3) and result.max_f1 == pytest.approx(0.8)
    # SLAVC's sampling drops the top confidence: thresholds [0.9, 0.9, 0.2, 0.2], recall never moves -> AP 0
    assert result.ap_slavc == 0.0 and result.max_f1_slavc == pytest.approx(0.8)
    assert result.to_dict()["excluded"][0] == {"id": "nan", "stage": "excluded",
                                               "reason": "invalid map: 1 non-finite values (NaN or inf)"}
    table = E.score_maps(None, annotations, "slavc", ["g1"], random_seeds=())
    table.extended = result
    console = Console(record=True, width=200)
    console.print(E.result_table(table))
    assert ("extended (slavc, 3 sounding + 2 non-sounding pairs): AP 66.67 (SLAVC sampling 0.00), max-F1 80.00 "
            "(SLAVC sampling 80.00)") in " ".join(console.export_text().split())  # the caption wraps
    assert E.mlflow_metrics(table, "ext")["ext/extended/max_f1"] == pytest.approx(0.8)
    with pytest.raises(DataError, match="needs both kinds of pairs"):
        E.score_extended(sounding, {}, annotations)


def test_extended_maps_follow_the_pairs_list_and_the_requested_ids_and_defects_are_written(tmp_path):
    records = [{"file": "a", "bbox": [[0.0, 0.0, 1.0, 0.75]]},
               {"file": "b", "bbox": [[0.1, 0.2, 0.6, -2.88e16], [0.4, 0.3, 0.4, 0.9]]},  # empty once clipped
               {"file": "c", "bbox": [[0.5, 0.5, 0.2, 0.9]]},  # degenerate, not requested
               {"file": "d", "bbox": [[0.0, 0.0, 1.0, 0.75]]}]  # not requested
    (tmp_path / "boxes.json").write_text(json.dumps(records))
    (tmp_path / "list.txt").write_text("a\nb\n")
    test = E.load_vggss_json_set(tmp_path / "boxes.json", tmp_path / "list.txt")
    assert test.notes[:2] + test.notes[-1:] == [
        "boxes.json, in the 2 requested clips: 1 boxes hold a non-finite or huge coordinate (e.g. b: "
        "[0.1, 0.2, 0.6, -2.88e+16])",
        "boxes.json, in the 2 requested clips: 2 boxes are degenerate (xmax <= xmin or ymax <= ymin), e.g. b: "
        "[0.1, 0.2, 0.6, -2.88e+16]",
        "boxes.json as a whole (4 clips): 1 boxes with a non-finite or huge coordinate, 3 degenerate boxes; "
        "in the 2 requested clips: 1 boxes with a non-finite or huge coordinate, 2 degenerate boxes"]
    good = indicator(slice(0, 168), slice(None), 0.8, -0.2)
    maps = {"a": good, "b": good, "d": good}
    silent_maps = {"a+b": np.full((7, 7), -0.6, np.float32), "x+y": np.full((7, 7), -0.6, np.float32)}
    result = E.score_maps(maps, test.annotations, "ssltie", test.ids, random_seeds=())
    result.extended, notes = E.score_extended_maps(maps, silent_maps, [("a", "b"), ("b", "a"), ("a", "b")],
                                                   test.ids, test.annotations, "silent.npz")
    # d is not requested and x+y is not a listed pair: neither is used
    assert (result.extended.n_sounding, result.extended.n_silent) == (1, 1)
    assert notes == ["extended evaluation: 1 of 2 non-sounding pairs have no map in silent.npz and were left out "
                     "(listed in excluded.csv)",
                     "extended evaluation: ignored the maps of 1 pairs in silent.npz that are not in the "
                     "non-sounding pairs list"]
    written = E.write_outputs(result, tmp_path / "eval", defects=test.defects)
    empty = "empty ground truth after clipping boxes to [0, 1]: [[0.1, 0.2, 0.6, -2.88e+16], [0.4, 0.3, 0.4, 0.9]]"
    with open(written["excluded"]) as f:
        assert list(csv.reader(f)) == [["id", "stage", "reason"], ["b", "excluded", empty],
                                       ["b+a", "extended: no map", "no map for this non-sounding pair in silent.npz"],
                                       ["b", "extended: excluded", empty]]
    with open(written["defects"]) as f:
        assert list(csv.reader(f)) == [["id", "xmin", "ymin", "xmax", "ymax", "defect"],
                                       ["b", "0.1", "0.2", "0.6", "-2.88e+16", "non_finite_or_huge"],
                                       ["b", "0.1", "0.2", "0.6", "-2.88e+16", "degenerate"],
                                       ["b", "0.4", "0.3", "0.4", "0.9", "degenerate"]]


def test_model_extended_lists_every_non_sounding_pair_left_out(tmp_path, write_noise_clips):
    from sslt_cli.config import Recipe
    from sslt_cli.model import build_model

    clips = write_noise_clips(tmp_path, ("a", "b", "c"), size=64, seed=2)
    (tmp_path / "c.jpg").write_bytes(b"not a jpeg")
    test = E.TestSet(name="t", anno_kind="vggss", ids=["a", "b", "c"],
                     annotations={cid: ann(cid, (0.0, 0.0, 0.5, 0.5)) for cid in "abc"}, clips=clips,
                     unavailable={"gone": "frame file missing: /x/gone.jpg"})
    recipe = Recipe.model_validate({"data": {"image_size": 64, "num_workers": 0},
                                    "audio": {"clip_seconds": 3.0, "n_mels": 40}})
    torch.manual_seed(0)
    model = build_model().eval()
    pairs = [("a", "b"), ("a", "gone"), ("nowhere", "b"), ("c", "a")]
    done = []
    loaded = LoadedModel(model=model, recipe=recipe, label="sslt", source=tmp_path / "model.pt")
    options = E.EvalOptions(protocol="ssltie", extended=E.ExtendedPairs(tuple(pairs), media=test))
    result = E.evaluate_model(loaded, test, options, out_dir=tmp_path / "eval", progress=done.append)
    assert sum(done) == 2 + 1  # a and b, then the pair a+b; c and c+a fail to decode
    ext = result.extended
    assert (ext.n_sounding, ext.n_silent) == (2, 1)
    assert [(e.id, e.stage, e.reason) for e in ext.excluded[:2]] == [
        ("a+gone", "no frame/audio", "unavailable in t: audio gone: frame file missing: /x/gone.jpg"),
        ("nowhere+b", "no frame/audio", "unavailable in t: video nowhere: not among its usable clips")]
    assert ext.excluded[2].id == "c+a" and ext.excluded[2].reason.startswith("decode error: ")
    assert result.notes[-1] == ("extended evaluation: 3 of 4 non-sounding pairs have no usable frame/audio in t and "
                                "were left out (listed in excluded.csv)")
    with open(tmp_path / "eval" / "excluded.csv") as f:
        rows = list(csv.reader(f))
    assert [(r[0], r[1]) for r in rows[1:]] == [("c", "no frame/audio"), ("a+gone", "extended: no frame/audio"),
                                                ("nowhere+b", "extended: no frame/audio"),
                                                ("c+a", "extended: no frame/audio")]


def test_predict_maps_is_fp32_by_default_and_bf16_on_request(tmp_path):
    import soundfile as sf
    from PIL import Image

    from sslt_cli.config import Recipe
    from sslt_cli.model import build_model

    rng = np.random.default_rng(1)
    clips = []
    for cid in ("a", "b"):
        frame, audio = tmp_path / f"{cid}.jpg", tmp_path / f"{cid}.wav"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(frame)
        sf.write(audio, rng.uniform(-0.5, 0.5, 16000 * 3).astype(np.float32), 16000)
        clips.append(Clip(cid, frame=str(frame), audio=str(audio)))
    recipe = Recipe.model_validate({"data": {"image_size": 64}, "audio": {"clip_seconds": 3.0, "n_mels": 40}})
    torch.manual_seed(0)
    model = build_model().eval()
    protocol = E.get_protocol("ssltie")
    maps, skipped = E.predict_maps(LoadedModel(model, recipe, "sslt", tmp_path / "m.pt"), clips, protocol, device="cpu")
    assert skipped == [] and recipe.eval.precision == "fp32"
    batch = next(iter(E.eval_loader(clips, recipe, "cpu", protocol.image_preprocessing)))
    with torch.inference_mode():
        from sslt_cli.model import localisation_map

        expected = localisation_map(model.embed_image(batch["image"]), model.embed_audio(batch["spec"]))[:, 0]
    for i, cid in enumerate(("a", "b")):
        np.testing.assert_allclose(maps[cid], expected[i].numpy(), rtol=0, atol=1e-6)
    bf16 = Recipe.model_validate({**recipe.model_dump(), "eval": {"precision": "bf16"}})
    rounded, _ = E.predict_maps(LoadedModel(model, bf16, "sslt", tmp_path / "m.pt"), clips, protocol, device="cpu")
    assert not np.allclose(rounded["a"], maps["a"], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------- the orchestrator

class RecordingSink:
    """A MetricsSink stand-in: what each call received."""

    def __init__(self, run=None):
        self.run, self.logged, self.artifacts = run, [], []

    def log(self, kind, step, values, *, fields=None, mlflow=None):
        self.logged.append((kind, step, dict(values), dict(fields or {}), dict(mlflow or {})))
        if self.run is not None:
            self.run.append_metrics({"kind": kind, "step": step, **(fields or {}), **values})

    def artifact(self, path, folder=None):
        self.artifacts.append((Path(path), folder))


def test_the_orchestrator_records_what_it_returns_and_reads_it_back(tmp_path):
    from sslt_cli.config import Recipe
    from sslt_cli.runs import Run

    test = E.TestSet(name="hand", anno_kind="vggss", ids=["a", "b"], annotations=HAND_ANNOTATIONS)
    run = Run.create(Recipe(runs_dir=str(tmp_path / "runs")))
    sink = RecordingSink(run)
    options = E.EvalOptions(protocol="ezvsl")
    evaluation = E.run_evaluation([E.Source.precomputed(HAND_MAPS, tmp_path / "maps.npz"), E.Source.baselines()],
                                  [("vggss", test)], options, sink, out=run.dir / "eval")
    maps_item, baselines_item = evaluation.items
    assert (maps_item.name, baselines_item.name) == ("vggss-maps-ezvsl", "vggss-baselines-ezvsl")
    assert maps_item.folder == run.dir / "eval" / "vggss-maps-ezvsl" and (maps_item.folder / "metrics.json").is_file()
    direct = E.score_maps(HAND_MAPS, HAND_ANNOTATIONS, "ezvsl")
    assert maps_item.result.method == direct.method and maps_item.result.baselines == direct.baselines
    # one record per set and source: the numbers a run keeps, with the centre-prior baseline, under eval/<name>/;
    # (issue 22) the record holds every number MLflow gets too, named without the prefix, so `sslt sync` can send all
    kind, step, values, fields, mlflow = sink.logged[0]
    assert (kind, step, fields["set"], fields["checkpoint"], fields["protocol"]) == ("test", 0, "vggss", "maps", "ezvsl")
    assert values == {**{k.removeprefix("eval/vggss-maps-ezvsl/"): v for k, v in mlflow.items()},
                      **maps_item.summary()}
    assert maps_item.summary().items() <= values.items()
    assert values["baseline_centre/ciou"] == direct.baselines["centre"]["ciou"]
    assert mlflow["eval/vggss-maps-ezvsl/ciou"] == direct.method["ciou"]
    assert mlflow["eval/vggss-maps-ezvsl/oracle/ciou"] == direct.baselines["oracle"]["ciou"]
    assert sink.artifacts[0] == (maps_item.folder, "eval/vggss-maps-ezvsl")
    # what the run folder holds is what the evaluation returned
    assert E.saved_summaries(run, "ezvsl") == evaluation.summaries()
    assert E.saved_summaries(run, "ssltie") == {}
    with pytest.raises(DataError, match="--out names the folder of one evaluation"):
        E.run_evaluation([E.Source.baselines()], [("a", test), ("b", test)], options, sink, out=tmp_path / "x",
                         exact_folder=True)


def test_saved_summaries_of_a_record_without_baselines_read_its_metrics_json(tmp_path):
    from sslt_cli.config import Recipe
    from sslt_cli.runs import Run

    run = Run.create(Recipe(runs_dir=str(tmp_path / "runs")))
    run.append_metrics({"kind": "test", "step": 4, "set": "vggss", "checkpoint": "best", "protocol": "ssltie", "n": 8,
                        "ciou": 0.25, "auc": 0.3, "mean_iou": 0.28})
    folder = run.dir / "eval" / "vggss-best-ssltie"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"baselines": {"centre": {"ciou": 0.5, "auc": 0.4375}}}))
    assert E.saved_summaries(run, "ssltie") == {"vggss": {"best": {
        "n": 8.0, "ciou": 0.25, "auc": 0.3, "mean_iou": 0.28, "baseline_centre/ciou": 0.5,
        "baseline_centre/auc": 0.4375}}}


def test_eval_options_come_before_the_recipe_and_never_rewrite_it():
    from sslt_cli.config import Recipe

    recipe = Recipe.model_validate({"eval": {"protocol": "lvs", "empty_gt": "zero", "ogl_weights": "obj.pth",
                                             "ogl_alpha": 0.7}})
    assert E.EvalOptions().protocol_for(recipe.eval) == E.get_protocol("lvs", empty_gt="zero")
    assert E.EvalOptions().protocol_for(None).name == "ssltie"
    chosen = E.EvalOptions(protocol="slavc", constant_maps="official", clip_boxes=False).protocol_for(recipe.eval)
    assert (chosen.name, chosen.constant_maps, chosen.empty_gt, chosen.clip_boxes) == ("slavc", "official", "zero",
                                                                                       False)
    assert E.EvalOptions().guidance_for(recipe.eval) == E.options.ObjectGuidanceSetting("obj.pth", 0.7)
    assert E.EvalOptions(ogl_alpha=0.2).guidance_for(recipe.eval).alpha == 0.2
    assert E.EvalOptions(object_guidance=False).guidance_for(recipe.eval) is None
    assert E.EvalOptions(ogl_weights="mine.pth").guidance_for(None) == E.options.ObjectGuidanceSetting("mine.pth", 0.4)
    with pytest.raises(SsltError, match="--ogl-alpha needs object-guided localisation switched on"):
        E.EvalOptions(ogl_alpha=0.5).guidance_for(Recipe().eval)
    assert recipe.eval.protocol == "lvs" and recipe.eval.ogl_alpha == 0.7  # untouched
