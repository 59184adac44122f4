"""The synthetic benchmark's difficulty knobs (issue 21): each knob's effect measured back from the generated files
(box-size quantiles, SNR from the audio, the off-screen share, objects per scene, background texture, camera
motion), the ground truth following every knob, presets, parsing and determinism."""
from __future__ import annotations

import csv
import hashlib
import io
import wave
from pathlib import Path

import cv2
import numpy as np
import pytest

from sslt_cli.data import synthetic
from sslt_cli.data.annotations import read_annotation
from sslt_cli.data.difficulty import PRESETS, Difficulty, from_params, parse_difficulty
from sslt_cli.data.manifest import read_set
from sslt_cli.data.synthetic import CLASSES, generate
from sslt_cli.errors import DataError

SMALL = dict(n_train=0, n_val=0, n_flickr=0, image_size=128, workers=1, progress=False)


def scenes_csv(root: Path) -> list[dict[str, str]]:
    """Every set's scenes.csv rows, sets in the generator's order."""
    rows = []
    for name in ("train", "val", "test_vggss", "test_flickr"):
        if (root / name / "scenes.csv").is_file():
            with open(root / name / "scenes.csv", newline="") as f:
                rows += list(csv.DictReader(f))
    return rows


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_wav(path: str | Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)


def gray_frames(root: Path, name: str = "test_vggss") -> dict[str, np.ndarray]:
    return {c.id: cv2.imread(c.frame) for c in read_set(root / name).clips}


# -------------------------------------------------------------------------------------------------------- parsing

def test_presets_and_overrides_parse_into_one_typed_difficulty() -> None:
    assert parse_difficulty() == Difficulty() and Difficulty().is_default
    hard = parse_difficulty("hard", {"snr_db": "0:5", "objects": "4:4", "area": [0.01, 0.05], "camera": "0"})
    assert hard == Difficulty(objects=(4, 4), area=(0.01, 0.05), background="cluttered", same_shape=0.5,
                              offscreen=0.5, offscreen_db=(-6.0, 0.0), snr_db=(0.0, 5.0), camera=0.0)
    assert from_params({"n_classes": 10, "difficulty": hard.as_dict()}) == hard
    assert from_params({"n_classes": 10}) == Difficulty()


def test_bad_knobs_are_refused_all_together() -> None:
    with pytest.raises(DataError) as caught:
        parse_difficulty("hard", {"objcts": 3, "snr_db": "10:0", "offscreen": 2, "background": "noisy"},
                          where="recipes/ablations/x.yaml: cell 'a'")
    assert caught.value.render() == (
        "recipes/ablations/x.yaml: cell 'a': bad difficulty knobs\n"
        "  - unknown knob 'objcts'; knobs: objects, area, background, same_shape, offscreen, offscreen_db, snr_db, "
        "camera\n"
        "  - snr_db = '10:0': LOW is above HIGH")
    with pytest.raises(DataError) as caught:
        parse_difficulty("hard", {"offscreen": 2, "background": "noisy", "objects": "2:11"})
    assert caught.value.problems == ["objects = 2:11: use 2 to 10 categories, LOW at most n_classes (10)",
                                     "background = 'noisy': use one of smooth, textured, cluttered",
                                     "offscreen = 2.0: a share, use 0 to 1"]
    with pytest.raises(DataError, match="unknown preset 'medium'; expected one of easy, hard"):
        parse_difficulty("medium")


def test_explicit_easy_difficulty_is_the_default_benchmark(tmp_path: Path) -> None:
    generate(tmp_path / "none", n_train=3, n_val=0, n_test=2, n_flickr=0, image_size=64, workers=1, progress=False)
    generate(tmp_path / "easy", n_train=3, n_val=0, n_test=2, n_flickr=0, image_size=64, workers=1, progress=False,
             difficulty=PRESETS["easy"])
    assert tree_hashes(tmp_path / "none") == tree_hashes(tmp_path / "easy")
    assert "difficulty" not in (tmp_path / "easy" / "benchmark.json").read_text()


# ------------------------------------------------------------------------------------------ knobs, measured back

def test_objects_per_scene_follow_the_knob() -> None:
    knob = Difficulty(objects=(4, 6))
    scenes = [synthetic._sample_scene(np.random.default_rng([5, i]), i % 10, 10, False, knob,
                                      np.random.default_rng([6, i])) for i in range(600)]
    counts = np.array([len({o.category for o in s.objects}) for s in scenes])
    assert set(counts) == {4, 5, 6} and abs(counts.mean() - 5.0) < 0.15
    easy = [synthetic._sample_scene(np.random.default_rng([5, i]), i % 10, 10, False) for i in range(600)]
    assert set(len({o.category for o in s.objects}) for s in easy) == {2, 3}


def test_box_area_quantiles_follow_the_area_knob_in_the_annotations(tmp_path: Path) -> None:
    out = tmp_path / "small"
    generate(out, n_test=60, **SMALL, difficulty=Difficulty(area=(0.02, 0.08)))
    areas = []
    for clip in read_set(out / "test_vggss").clips:
        boxes = read_annotation(clip.anno, "vggss").boxes
        areas.append(synthetic._union_area([tuple(map(float, b)) for b in boxes]))
    # log-uniform on [0.02, 0.08]: quantile q at 0.02 * 4 ** q (pixel rounding at 128 px moves a few percent)
    np.testing.assert_allclose(np.quantile(areas, [0.1, 0.5, 0.9]), 0.02 * 4.0 ** np.array([0.1, 0.5, 0.9]),
                               rtol=0.15)
    recorded = [float(r["sounding_area"]) for r in scenes_csv(out)]
    np.testing.assert_allclose(recorded, areas, atol=0.004)


def measured_snr_db(samples: np.ndarray, sr: int) -> float:
    """SNR of a whistle clip measured from its audio alone: the pink noise floor fitted (power ~ c / f) away from
    the whistle's two partials (2.5 and 5 kHz), the whistle's power being the rest."""
    power = np.abs(np.fft.rfft(samples)) ** 2
    freqs = np.fft.rfftfreq(len(samples), 1.0 / sr)
    tone = ((freqs > 2380) & (freqs < 2650)) | ((freqs > 4780) & (freqs < 5280))
    floor = (~tone) & (freqs > 60) & (freqs < 7500)
    c = np.median(power[floor] * freqs[floor]) / np.log(2.0)  # a periodogram bin's median is ln 2 of its mean
    noise = (c / np.maximum(freqs, 50.0)).sum()
    return float(10.0 * np.log10((power.sum() - noise) / noise))


def test_snr_measured_from_the_audio_follows_the_knob(tmp_path: Path) -> None:
    out = tmp_path / "noisy"
    generate(out, n_train=20, n_val=0, n_test=0, n_flickr=0, image_size=32, n_classes=2, workers=1, progress=False,
             difficulty=Difficulty(snr_db=(-5.0, 10.0)))
    rows = {r["clip_id"]: r for r in scenes_csv(out)}
    whistles = [c for c in read_set(out / "train").clips if c.label == "whistle blowing"]
    assert len(whistles) == 10
    recorded = np.array([float(rows[c.id]["snr_db"]) for c in whistles])
    measured = np.array([measured_snr_db(read_wav(c.audio), 16000) for c in whistles])
    assert recorded.min() >= -5.0 and recorded.max() <= 10.0 and np.ptp(recorded) > 5.0
    np.testing.assert_allclose(measured, recorded, atol=1.0)


def test_offscreen_share_and_sound_follow_the_knob(tmp_path: Path) -> None:
    """3 classes, 2 on screen: the off-screen sound is the third class; a whistle clip's energy below 1 kHz (where
    the whistle has none and the noise is 30 dB down) tells from the audio alone which clips have one."""
    out = tmp_path / "offscreen"
    knob = Difficulty(objects=(2, 2), offscreen=0.5, offscreen_db=(-6.0, 0.0), snr_db=(30.0, 30.0))
    generate(out, n_train=60, n_val=0, n_test=0, n_flickr=0, image_size=32, n_classes=3, workers=1, progress=False,
             difficulty=knob)
    rows = {r["clip_id"]: r for r in scenes_csv(out)}
    share = np.mean([bool(r["offscreen_class"]) for r in rows.values()])
    assert 0.3 < share < 0.7  # 60 clips at 0.5: 3 sigma is 0.19
    for row in rows.values():
        on_screen = row["on_screen_classes"].split(";")
        assert row["sounding_class"] in on_screen and row["offscreen_class"] not in on_screen
        if row["offscreen_class"]:
            assert -6.0 <= float(row["offscreen_db"]) <= 0.0
    for clip in (c for c in read_set(out / "train").clips if c.label == "whistle blowing"):
        samples = read_wav(clip.audio)
        power = np.abs(np.fft.rfft(samples)) ** 2
        low = power[np.fft.rfftfreq(len(samples), 1 / 16000) < 1000].sum() / power.sum()
        assert (low > 0.05) == bool(rows[clip.id]["offscreen_class"]), (low, rows[clip.id])


def background_texture(frame: np.ndarray, scene: synthetic._Scene) -> float:
    """Variance of the frame's fine detail (grey minus its 5x5 blur) over the pixels no object's box covers."""
    gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY).astype(np.float64)
    detail = gray - cv2.blur(gray, (5, 5))
    free = np.ones(gray.shape, bool)
    size = gray.shape[0]
    for obj in scene.objects:
        x0, y0, x1, y1 = synthetic._pixel_box(scene.frame_box(obj.box), size)
        free[max(0, y0 - 3):y1 + 3, max(0, x0 - 3):x1 + 3] = False
    return float(detail[free].var())


def test_textured_and_cluttered_backgrounds_change_only_the_background(tmp_path: Path) -> None:
    sets = {}
    for background in ("smooth", "textured", "cluttered"):
        generate(tmp_path / background, n_test=12, **SMALL, difficulty=Difficulty(background=background))
        sets[background] = gray_frames(tmp_path / background)
    ids = list(sets["smooth"])
    clips = read_set(tmp_path / "smooth" / "test_vggss").clips
    scenes = [synthetic._replay_scene({"seed": 0, "n_classes": 10}, 2, k, CLASSES.index(c.label), True, Difficulty())
              for k, c in enumerate(clips)]
    ratio = np.median([background_texture(sets["textured"][c.id], s) / background_texture(sets["smooth"][c.id], s)
                       for c, s in zip(clips, scenes)])
    assert ratio > 4.0, ratio  # fine gratings and grain: much more fine detail where no object is
    changed_shares = []
    for i in ids:  # what clutter adds over the textured frame is grey (washed-out), as its knob says
        diff = np.abs(sets["cluttered"][i].astype(int) - sets["textured"][i].astype(int)).max(-1) > 40
        hsv = cv2.cvtColor(sets["cluttered"][i], cv2.COLOR_BGR2HSV)
        changed_shares.append(diff.mean())
        assert np.median(hsv[..., 1][diff]) < 0.35 * 255
    assert 0.02 < np.median(changed_shares) < 0.4
    # the knobs draw from their own RNG: the annotated boxes (the scenes) are the same on every background
    boxes = {bg: [read_annotation(c.anno, "vggss").boxes for c in read_set(tmp_path / bg / "test_vggss").clips]
             for bg in sets}
    assert boxes["smooth"] == boxes["textured"] == boxes["cluttered"]


def test_same_shape_distractors_take_the_sounding_shape() -> None:
    knob = Difficulty(objects=(3, 3), same_shape=1.0)
    for i in range(50):
        scene = synthetic._sample_scene(np.random.default_rng([7, i]), i % 10, 10, False, knob,
                                        np.random.default_rng([8, i]))
        shapes = {o.drawn_shape for o in scene.objects}
        assert shapes == {synthetic._CATEGORIES[scene.label].shape}
        assert len({o.category for o in scene.objects}) == 3
    half = Difficulty(objects=(3, 3), same_shape=0.5)
    scenes = [synthetic._sample_scene(np.random.default_rng([7, i]), i % 10, 10, False, half,
                                      np.random.default_rng([8, i])) for i in range(300)]
    share = np.mean([bool(o.shape) for s in scenes for o in s.objects if not o.sounding])
    assert 0.42 < share < 0.58  # 600 distractors: 3 sigma is 0.06


def test_camera_crop_moves_and_zooms_and_the_boxes_follow(tmp_path: Path) -> None:
    out = tmp_path / "camera"
    generate(out, n_test=30, **SMALL, difficulty=Difficulty(camera=0.5))
    rows = {r["clip_id"]: r for r in scenes_csv(out)}
    zooms = np.array([float(r["camera_zoom"]) for r in rows.values()])
    lefts = np.array([float(r["camera_left"]) for r in rows.values()])
    assert zooms.min() >= 1.0 and zooms.max() <= 1.5 and np.ptp(zooms) > 0.25 and np.ptp(lefts) > 0.1
    params = {"seed": 0, "n_classes": 10}
    for index, clip in enumerate(read_set(out / "test_vggss").clips):  # the annotation is the scene box, zoomed
        scene = synthetic._replay_scene(params, 2, index, CLASSES.index(clip.label), True, Difficulty(camera=0.5))
        zoom, left, top = scene.camera
        assert zoom == pytest.approx(float(rows[clip.id]["camera_zoom"]), abs=1e-4)
        for shown, obj in zip(read_annotation(clip.anno, "vggss").boxes, (o for o in scene.objects if o.sounding)):
            expect = np.clip([(obj.box[0] - left) * zoom, (obj.box[1] - top) * zoom,
                              (obj.box[2] - left) * zoom, (obj.box[3] - top) * zoom], 0.0, 1.0)
            np.testing.assert_allclose(np.asarray(shown, float), expect, atol=1.5 / 128)
        assert synthetic._union_area(scene.sounding_boxes) >= 0.5 * zoom ** 2 * sum(
            synthetic._box_area(o.box) for o in scene.objects if o.sounding) - 1e-9


# --------------------------------------------------------------------------------- ground truth, determinism, CLI

def hue_match(bgr: np.ndarray, hue: float) -> np.ndarray:
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV).astype(np.float64)
    diff = np.abs(hsv[..., 0] * 2.0 - hue)
    return (np.minimum(diff, 360.0 - diff) <= 10.0) & (hsv[..., 1] > 0.45 * 255)


@pytest.fixture(scope="module")
def hard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hard") / "bench"
    generate(out, n_train=6, n_val=2, n_test=20, n_flickr=2, image_size=128, workers=1, progress=False,
             difficulty=PRESETS["hard"])
    return out


def test_hard_masks_and_boxes_are_the_sounding_objects_pixels(hard: Path) -> None:
    masks = synthetic.sounding_masks(hard, "test_vggss", 128)
    for clip in read_set(hard / "test_vggss").clips:
        mask, image = masks[clip.id], cv2.imread(clip.frame)
        match = hue_match(image, synthetic._CATEGORIES[CLASSES.index(clip.label)].hue)
        assert mask.sum() > 20 and match[mask].mean() > 0.6, clip.id
        inside = np.zeros_like(mask)
        for box in read_annotation(clip.anno, "vggss").boxes:
            x0, y0, x1, y1 = (int(round(float(v) * 128)) for v in box)
            inside[max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1] = True
        assert not (mask & ~inside).any()


def test_hard_scenes_csv_has_a_row_per_clip(hard: Path) -> None:
    rows = scenes_csv(hard)
    assert list(rows[0])[:4] == ["clip_id", "split", "on_screen_classes", "sounding_class"]
    assert [r["split"] for r in rows] == ["train"] * 6 + ["val"] * 2 + ["test_vggss"] * 20 + ["test_flickr"] * 2
    ids = [c.id for name in ("train", "val", "test_vggss", "test_flickr") for c in read_set(hard / name).clips]
    assert [r["clip_id"] for r in rows] == ids
    counts = [len(r["on_screen_classes"].split(";")) for r in rows]
    assert min(counts) >= 2 and max(counts) <= 6 and np.mean(counts) > 3.0
    assert all(r["background"] == "cluttered" and -5.0 <= float(r["snr_db"]) <= 10.0 for r in rows)


def test_negative_evaluation_reads_the_on_screen_classes_of_scenes_csv(hard: Path) -> None:
    from sslt_cli.data.negatives import read_scenes
    from sslt_cli.evaluate import load_test_set

    rows = {r["clip_id"]: r for r in scenes_csv(hard) if r["split"] == "test_vggss"}
    on_screen = read_scenes(hard / "test_vggss" / "scenes.csv")
    assert on_screen == {cid: frozenset(r["on_screen_classes"].split(";")) for cid, r in rows.items()}
    assert load_test_set(hard / "test_vggss").scenes == on_screen
    assert any(len(classes) > 3 for classes in on_screen.values())


def test_hard_benchmark_is_deterministic_whatever_the_workers(hard: Path, tmp_path: Path) -> None:
    generate(tmp_path / "again", n_train=6, n_val=2, n_test=20, n_flickr=2, image_size=128, workers=2,
             progress=False, difficulty=PRESETS["hard"])
    assert tree_hashes(tmp_path / "again") == tree_hashes(hard)
    with pytest.raises(DataError, match="made with other parameters"):
        generate(hard, n_train=6, n_val=2, n_test=20, n_flickr=2, image_size=128, workers=1, progress=False)


def test_cli_prepare_synthetic_takes_the_preset_and_knobs(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sslt_cli.cli import app

    args = ["prepare", "synthetic", "--out", str(tmp_path / "b"), "--train", "2", "--val", "1", "--test", "2",
            "--flickr", "1", "--image-size", "32", "--workers", "1", "--preset", "hard", "--snr-db", "-5:0",
            "--objects", "3:3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = scenes_csv(tmp_path / "b")
    assert all(len(r["on_screen_classes"].split(";")) <= 3 and -5 <= float(r["snr_db"]) <= 0 for r in rows)
    bad = CliRunner().invoke(app, args[:-2] + ["--objects", "3-4"])
    assert isinstance(bad.exception, DataError) and bad.exception.render() == (
        "--preset/knobs: bad difficulty knobs\n  - objects = '3-4': LOW and HIGH must be ints")
