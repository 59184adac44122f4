"""IS3: a small set generated in IS3's released layout (images/, audio_wav/, IS3_annotation.json, gt_segmentation/)
read by `sslt prepare is3`, scored with cIoU, adaptive cIoU, IIoU and IAUC (re-stated from vssl_eval's / SSLalignment's
Evaluator_iiou) and with negatives (off-screen audio excludes both classes of the image)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sslt_cli import evaluate as E
from sslt_cli import metrics as M
from sslt_cli.cli import app
from sslt_cli.data import is3
from sslt_cli.data.annotations import read_annotation
from sslt_cli.data.negatives import read_scene_images, read_scenes

# (first class, second class, image number): each image has one sample per object
IMAGES = [("dog", "guitar", 11), ("cat", "drum", 12), ("dog", "drum", 13)]
BOXES = {"dog": (10, 20, 100, 140), "guitar": (120, 30, 210, 200), "cat": (5, 5, 61, 115), "drum": (122, 90, 223, 224)}


def write_is3(root: Path, images=IMAGES, drop_audio: str | None = None) -> list[str]:
    """A small IS3 in its released layout; returns the sample names (``<a>_<b>_<n>_<obj>``)."""
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(0)
    for folder in ("images", "audio_wav", "gt_segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    records, names = [], []
    for a, b, n in images:
        picture = Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8))
        for obj in (a, b):
            name = f"{a}_{b}_{n}_{obj}"
            names.append(name)
            picture.save(root / "images" / f"{name}.jpg")
            if name != drop_audio:
                sf.write(root / "audio_wav" / f"{name}.wav", rng.uniform(-0.5, 0.5, 16000).astype(np.float32), 16000)
            mask = np.zeros((448, 448), np.uint8)  # masks at twice the frame size: resized to 224 (nearest)
            x0, y0, x1, y1 = BOXES[obj]
            mask[2 * y0:2 * y1, 2 * x0:2 * x1] = 255
            mask[2 * y0:2 * y0 + 20, 2 * x0:2 * x0 + 20] = 0  # a notch: not a box
            Image.fromarray(mask).save(root / "gt_segmentation" / f"{name}.png")
            records.append({"image": f"/mnt/lynx1/datasets/IS3/images/{name}.jpg",
                            "audio": f"/mnt/lynx1/datasets/IS3/audio_wav/{name}.wav",
                            "bbox": list(BOXES[obj]), "category": obj})
    (root / "IS3_annotation.json").write_text(json.dumps(records))
    return names


def test_pixel_coordinates_survive_normalisation_exactly():
    assert [x for x in range(225) if int(is3.pixel_to_normalised(x) * 224) != x] == []
    assert [x for x in range(225) if int(x / 224 * 224) != x] == [61, 115, 122]  # why the nudge is needed


def test_mask_runs_rebuild_the_mask_as_vggss_boxes():
    rng = np.random.default_rng(2)
    mask = rng.random((224, 224)) < 0.3
    boxes = [tuple(is3.pixel_to_normalised(v) for v in run) for run in is3.mask_runs(mask)]
    np.testing.assert_array_equal(M.vggss_gt_map(boxes) > 0, mask)
    assert is3.mask_runs(np.array([[0, 1, 1, 0, 1]])) == [(1, 0, 3, 1), (4, 0, 5, 1)]


@pytest.mark.parametrize("gt", ["boxes", "masks"])
def test_prepare_is3_reads_the_released_layout(tmp_path, gt):
    names = write_is3(tmp_path / "IS3", drop_audio="cat_drum_12_drum")
    result = is3.prepare_is3(tmp_path / "IS3", tmp_path / "set", gt=gt)
    assert (result.requested, result.ok, result.missing) == (6, 5, 1)
    assert result.notes == (f"incomplete sample cat_drum_12_drum: missing: no file "
                            f"{tmp_path / 'IS3' / 'audio_wav' / 'cat_drum_12_drum.wav'}",)
    test = E.load_test_set(tmp_path / "set")
    assert sorted(test.clips) == sorted(n for n in names if n != "cat_drum_12_drum")
    assert test.clips["dog_guitar_11_dog"].label == "dog"
    assert test.scenes["dog_guitar_11_guitar"] == frozenset({"dog", "guitar"})
    assert test.images["dog_guitar_11_dog"] == test.images["dog_guitar_11_guitar"] == "dog_guitar_11"
    gt_map = M.vggss_gt_map(test.annotations["cat_drum_12_cat"].boxes)
    x0, y0, x1, y1 = BOXES["cat"]
    expected = np.zeros((224, 224), np.float32)
    expected[y0:y1, x0:x1] = 1
    if gt == "masks":
        expected[y0:y0 + 10, x0:x0 + 10] = 0
    np.testing.assert_array_equal(gt_map, expected)
    assert read_scenes(tmp_path / "set" / "scenes.csv")["cat_drum_12_cat"] == frozenset({"cat", "drum"})
    assert read_scene_images(tmp_path / "set" / "scenes.csv")["dog_drum_13_drum"] == "dog_drum_13"
    assert read_annotation(tmp_path / "set" / "anno" / "dog_drum_13_dog.xml", "vggss").label == "dog"


def test_prepare_is3_without_its_annotation_file_says_what_is_expected(tmp_path):
    (tmp_path / "IS3").mkdir()
    result = CliRunner().invoke(app, ["prepare", "is3", str(tmp_path / "IS3")])
    assert "no IS3_annotation.json or synthetic3240_bbox.json here" in result.exception.message


def _ve_adaptive_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """vssl_eval / SSLalignment: gt_nums = (gt != 0).sum() (N // 2 if 0); thr = sort(pred)[N - gt_nums]; pred > thr."""
    gt_nums = int((gt != 0).sum()) or pred.size // 2
    thr = np.sort(pred.flatten())[pred.size - gt_nums]
    infer = (pred > thr).astype(float)
    return float(np.sum(infer * gt) / (np.sum(gt) + np.sum(infer * (gt == 0))))


def _ve_iiou_and_iauc(ious_by_name: dict[str, list[float]]) -> tuple[float, float]:
    """Evaluator_iiou.finalize_cIoU's iiou and finalize_IAUC, as loops."""
    from sklearn import metrics as skm

    iiou = []
    for name in ious_by_name:
        pair = np.array(ious_by_name[name])
        pair[pair >= 0.5] = 1
        pair[pair < 0.5] = 0
        iiou.append(np.min(pair))
    shares = []
    for i in range(21):
        per_image = []
        for name in ious_by_name:
            pair = np.array(ious_by_name[name])
            pair[pair >= 0.05 * i] = 1
            pair[pair < 0.05 * i] = 0
            per_image.append(np.min(pair))
        shares.append(np.mean(per_image))
    return float(np.mean(iiou)), float(skm.auc([0.05 * i for i in range(21)], shares))


def test_adaptive_iou_and_interactive_scores_against_the_published_loops():
    rng = np.random.default_rng(4)
    n = 10
    pred = rng.random((n, 32, 32)).astype(np.float32)
    gt = np.zeros((n, 32, 32), np.float32)
    for i in range(n):
        x, y = rng.integers(0, 16, 2)
        gt[i, y:y + rng.integers(3, 16), x:x + rng.integers(3, 16)] = 1
    gt[3] = 0
    ours = M.iou_scores(M.adaptive_masks(torch.from_numpy(pred), torch.from_numpy(gt)), torch.from_numpy(gt)).numpy()
    literal = [_ve_adaptive_iou(pred[i], gt[i]) for i in range(n)]
    np.testing.assert_allclose(ours, literal, rtol=0, atol=1e-12)
    ious = np.round(rng.random(12), 2)
    groups = [f"img{i // 2}" for i in range(12)]
    scores = M.interactive_scores(ious, groups)
    by_name: dict[str, list[float]] = {}
    for iou, g in zip(ious, groups):
        by_name.setdefault(g, []).append(float(iou))
    iiou, iauc = _ve_iiou_and_iauc(by_name)
    assert scores["iiou"] == pytest.approx(iiou, abs=1e-12) and scores["iauc"] == pytest.approx(iauc, abs=1e-12)
    assert scores["n_images"] == 6


def test_interactive_hand_case():
    # image a: both objects found; image b: one of two -> IIoU 1/2
    scores = M.interactive_scores([0.6, 0.9, 0.7, 0.2], ["a", "a", "b", "b"])
    assert scores["iiou"] == 0.5 and scores["n_images"] == 2
    gt = torch.zeros(1, 4, 4)
    gt[0, :2, :2] = 1  # area 4: threshold sort(map)[16 - 4] = 12, strictly above it: 13, 14, 15 (k - 1 pixels)
    up = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4)
    assert M.adaptive_masks(up, gt)[0].flatten().tolist() == [False] * 13 + [True] * 3


def test_sslt_eval_scores_is3_with_interactive_metrics_and_negatives(tmp_path):
    from sslt_cli.checkpoint import LoadedModel
    from sslt_cli.config import Recipe
    from sslt_cli.data.negatives import NegativeSettings
    from sslt_cli.model import build_model

    write_is3(tmp_path / "IS3")
    is3.prepare_is3(tmp_path / "IS3")
    test = E.load_test_set(tmp_path / "IS3")
    torch.manual_seed(0)
    recipe = Recipe.model_validate({"data": {"image_size": 64, "num_workers": 0},
                                    "audio": {"clip_seconds": 1.0, "n_mels": 40}})
    loaded = LoadedModel(build_model().eval(), recipe, "sslt", tmp_path / "m.pt")
    options = E.EvalOptions(protocol="ezvsl", negatives=E.NegativeOptions(NegativeSettings(("offscreen",), draws=3)))
    result = E.evaluate_model(loaded, test, options, out_dir=tmp_path / "out")
    inter = result.interactive
    assert (inter["n"], inter["n_images"]) == (6, 3)
    assert inter["ciou"] == result.method["ciou"]
    standard = {r.id: r.iou for r in result.rows}
    assert inter["iiou"] == M.interactive_scores(list(standard.values()), [test.images[c] for c in standard])["iiou"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["interactive"]["n_images"] == 3
    for row in result.negatives.rows:
        assert row["partner_class"] not in test.scenes[row["id"]]  # both classes of the image excluded
    # dog_guitar_11: only cat is neither dog nor guitar (drum is too: it is a class of the set)
    partners = {r["partner_class"] for r in result.negatives.rows if r["id"].startswith("dog_guitar_11")}
    assert partners <= {"cat", "drum"}
