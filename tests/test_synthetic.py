"""The synthetic benchmark: layouts, boxes that match the drawn objects, VGG-SS statistics, separable sounds,
byte-identical and idempotent regeneration."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import wave
from pathlib import Path

import cv2
import numpy as np
import pytest

from sslt_cli.data import synthetic
from sslt_cli.data.annotations import load_vggss_json, read_annotation
from sslt_cli.data.manifest import read_set
from sslt_cli.data.synthetic import CLASSES, generate
from sslt_cli.errors import DataError

TINY = dict(n_train=12, n_val=4, n_test=6, n_flickr=4, image_size=64, workers=1, progress=False)
YOUTUBE_ID = re.compile(r"^[A-Za-z0-9_-]{11}_\d{6}$")


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "bench"
    generate(out, **TINY)
    return out


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_wav(path: str | Path | io.BytesIO) -> tuple[np.ndarray, int, int, int]:
    with wave.open(path if isinstance(path, io.BytesIO) else str(path)) as w:
        frames = w.readframes(w.getnframes())
        return np.frombuffer(frames, "<i2"), w.getframerate(), w.getnchannels(), w.getsampwidth()


def hue_match(bgr: np.ndarray, hue: float) -> np.ndarray:
    """Pixels of a category's colour (either texture shade): its hue within 10 degrees and saturated."""
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV).astype(np.float64)
    diff = np.abs(hsv[..., 0] * 2.0 - hue)
    return (np.minimum(diff, 360.0 - diff) <= 10.0) & (hsv[..., 1] > 0.45 * 255)


# ------------------------------------------------------------------------------------------------- layout and files

def test_every_set_has_its_layout_manifest_and_files(bench: Path) -> None:
    expected = {"train": ("vggsound_train", None, 12, 64, 3), "val": ("vggss_test", "vggss", 4, 64, 10),
                "test_vggss": ("vggss_test", "vggss", 6, 64, 10), "test_flickr": ("flickr_test", "flickr", 4, 256, 10)}
    all_ids = []
    for name, (layout, kind, n, size, seconds) in expected.items():
        clip_set = read_set(bench / name)
        assert (clip_set.layout, clip_set.anno_kind, len(clip_set.clips), clip_set.unusable) == (layout, kind, n, [])
        assert clip_set.info["classes"] == list(CLASSES)
        for clip in clip_set.clips:
            all_ids.append(clip.id)
            assert clip.label in CLASSES and clip.status == "ok"
            if layout == "vggsound_train":
                assert clip.frame == str(bench / name / "total_video_frames" / clip.id / "125.jpg")
                assert clip.audio == str(bench / name / "total_video_3s_audio" / f"{clip.id}.wav")
                assert clip.anno == ""
            else:
                assert clip.frame == str(bench / name / "frame" / f"{clip.id}.jpg")
                assert clip.audio == str(bench / name / "audio" / f"{clip.id}.wav")
                assert clip.anno == str(bench / name / "anno" / f"{clip.id}.xml")
            frame = cv2.imread(clip.frame)
            assert frame.shape == (size, size, 3)
            assert Path(clip.frame).read_bytes()[:2] == b"\xff\xd8"  # JPEG
            samples, rate, channels, width = read_wav(clip.audio)
            assert (rate, channels, width, len(samples)) == (16000, 1, 2, seconds * 16000)
            assert 0.25 * 32767 < np.abs(samples).max() < 0.95 * 32767
            if name == "test_flickr":
                assert re.fullmatch(r"\d{10,11}", clip.id)
            else:
                assert YOUTUBE_ID.fullmatch(clip.id)
    assert len(set(all_ids)) == len(all_ids)
    # Balanced labels: the first 10 training clips hold every class once.
    assert sorted(c.label for c in read_set(bench / "train").clips[:10]) == sorted(CLASSES)


def test_annotations_vggss_json_and_benchmark_json(bench: Path) -> None:
    test = read_set(bench / "test_vggss")
    boxes, report = load_vggss_json(bench / "vggss.json")
    assert report.summary() == []
    assert list(boxes) == [c.id for c in test.clips]
    for clip in test.clips:
        ann = read_annotation(clip.anno, "vggss")
        assert ann.boxes == boxes[clip.id].boxes and ann.label == boxes[clip.id].label == clip.label
        assert 1 <= len(ann.boxes) <= 2
        for box in ann.boxes:  # normalised, on the 64-pixel grid of the frame
            assert all(0.0 <= v <= 1.0 for v in box) and box[2] > box[0] and box[3] > box[1]
            assert all(float(v * 64).is_integer() for v in box)
    for clip in read_set(bench / "test_flickr").clips:
        ann = read_annotation(clip.anno, "flickr")
        assert len(ann.boxes) == 3
        xs = np.array(ann.boxes)
        assert xs.min() >= 0 and xs.max() <= 256 and (xs[:, 2] > xs[:, 0]).all() and (xs[:, 3] > xs[:, 1]).all()
        assert np.ptp(xs, axis=0).max() <= 6  # three annotators of one box, each side jittered by up to 3 pixels
    doc = json.loads((bench / "benchmark.json").read_text())
    assert doc["format"] == "sslt-synthetic/1"
    assert doc["params"] == {"n_train": 12, "n_val": 4, "n_test": 6, "n_flickr": 4, "seed": 0, "image_size": 64,
                             "sample_rate": 16000, "n_classes": 10}
    assert [c["name"] for c in doc["classes"]] == list(CLASSES)
    assert {name: s["clips"] for name, s in doc["sets"].items()} == {"train": 12, "val": 4, "test_vggss": 6,
                                                                     "test_flickr": 4}
    assert len({c["shape"] for c in doc["classes"]}) == len({c["hue_degrees"] for c in doc["classes"]}) == 10


def test_vggsound_csv_format(bench: Path) -> None:
    rows = list(csv.reader((bench / "vggsound.csv").read_text().splitlines()))
    expected = [(c.id, c.label, split) for name, split in (("train", "train"), ("val", "val"), ("test_vggss", "test"))
                for c in read_set(bench / name).clips]
    assert [(f"{r[0]}_{int(r[1]):06d}", r[2], r[3]) for r in rows] == expected
    for ytid, start, label, split in rows:
        assert len(ytid) == 11 and start == str(int(start)) and label in CLASSES


# ---------------------------------------------------------------------------------------------- the drawn objects

@pytest.mark.parametrize("shape", sorted({c.shape for c in synthetic._CATEGORIES}))
def test_every_shape_fills_its_box_to_all_four_sides(shape: str) -> None:
    for w, h in ((5, 7), (20, 13), (64, 64), (151, 90)):
        covered = synthetic._shape_mask(shape, w, h) > 0.25
        rows, cols = np.flatnonzero(covered.any(1)), np.flatnonzero(covered.any(0))
        assert (rows[0], rows[-1], cols[0], cols[-1]) == (0, h - 1, 0, w - 1), (shape, w, h)
        if min(w, h) >= 20:
            assert 0.45 < covered.mean() <= 1.0, (shape, covered.mean())


def test_rendered_object_lies_exactly_in_its_box() -> None:
    size = 160
    for k, category in enumerate(synthetic._CATEGORIES):
        box = (0.15 + 0.03 * k, 0.2, 0.55 + 0.03 * k, 0.7)
        scene = synthetic._Scene(k, (synthetic._Object(k, box, True),))
        jpeg = synthetic._render_frame(scene, size, np.random.default_rng(k))
        match = hue_match(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), category.hue)
        # The object is the largest blob of its colour (closing joins texture shades that JPEG split).
        closed = cv2.morphologyEx(match.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
        _, _, stats, _ = cv2.connectedComponentsWithStats(closed)
        x, y, w, h = stats[1 + np.argmax(stats[1:, cv2.CC_STAT_AREA]), :4]
        # JPEG chroma subsampling smears colour edges, and the sub-pixel tips of pointed shapes blend with the
        # background: up to 3 pixels either way.
        np.testing.assert_allclose((x, y, x + w, y + h), synthetic._pixel_box(box, size), atol=3, err_msg=category.name)


def test_sounding_colour_dominates_inside_the_annotated_boxes(tmp_path: Path) -> None:
    out = tmp_path / "b"
    generate(out, n_train=0, n_val=0, n_test=30, n_flickr=10, image_size=128, workers=1, progress=False)
    inside, outside = [], []
    for name in ("test_vggss", "test_flickr"):
        clip_set = read_set(out / name)
        for clip in clip_set.clips:
            image = cv2.imread(clip.frame)
            size = image.shape[0]
            scale = size if clip_set.anno_kind == "vggss" else size / 256
            gt = np.zeros((size, size), bool)
            for b in read_annotation(clip.anno, clip_set.anno_kind).boxes:
                x0, y0, x1, y1 = (int(round(v * scale)) for v in b)
                gt[y0:y1, x0:x1] = True
            match = hue_match(image, synthetic._CATEGORIES[CLASSES.index(clip.label)].hue)
            inside.append(match[gt].mean())
            outside.append(match[~gt].mean() if (~gt).any() else 0.0)
    inside, outside = np.array(inside), np.array(outside)
    assert (inside > 3 * outside).all() and inside.min() > 0.15
    assert inside.mean() > 0.45 and outside.mean() < 0.03


def test_sounding_masks_replay_the_visible_sounding_pixels(tmp_path: Path) -> None:
    out = tmp_path / "b"
    generate(out, n_train=3, n_val=2, n_test=20, n_flickr=0, image_size=128, workers=1, progress=False)
    masks = synthetic.sounding_masks(out, "test_vggss", size=128)
    clip_set = read_set(out / "test_vggss")
    assert sorted(masks) == sorted(c.id for c in clip_set.clips)
    for clip in clip_set.clips:
        mask = masks[clip.id]
        assert mask.shape == (128, 128) and mask.dtype == bool
        boxes = np.zeros_like(mask)
        for b in read_annotation(clip.anno, "vggss").boxes:
            x0, y0, x1, y1 = (int(round(v * 128)) for v in b)
            boxes[y0:y1, x0:x1] = True
        # the visible shape lies in its boxes and keeps at least the generator's minimum visible share of them
        assert not (mask & ~boxes).any()
        assert mask.sum() > 0.2 * boxes.sum()
        # and it is where the sounding colour was drawn
        match = hue_match(cv2.imread(clip.frame), synthetic._CATEGORIES[CLASSES.index(clip.label)].hue)
        assert match[mask].mean() > 0.5 and match[~mask].mean() < 0.05
    with pytest.raises(DataError, match="unknown synthetic set 'nope'"):
        synthetic.sounding_masks(out, "nope")
    with pytest.raises(DataError, match="cannot read the synthetic benchmark's parameters"):
        synthetic.sounding_masks(tmp_path / "missing", "test_vggss")


# ------------------------------------------------------------------------------------------ scene spec statistics

@pytest.fixture(scope="module")
def scenes() -> list:
    return [synthetic._sample_scene(np.random.default_rng([11, i]), i % 10, 10, True) for i in range(3000)]


def test_two_instance_rate_is_about_ten_percent(scenes: list) -> None:
    rate = np.mean([len(s.sounding_boxes) == 2 for s in scenes])
    assert 0.085 < rate < 0.115  # 3000 draws: 3 sigma is 0.016
    flickr = [synthetic._sample_scene(np.random.default_rng([12, i]), 0, 10, False) for i in range(300)]
    assert all(len(s.sounding_boxes) == 1 for s in flickr)


def test_union_box_area_quantiles_follow_vgg_ss(scenes: list) -> None:
    areas = [synthetic._union_area(s.sounding_boxes) for s in scenes]
    got = np.quantile(areas, [0.05, 0.25, 0.5, 0.75, 0.95])
    np.testing.assert_allclose(got, [0.03, 0.12, 0.25, 0.46, 0.78], rtol=0.07)  # 3000 draws: within 4%


def test_distractors_match_the_sounding_objects(scenes: list) -> None:
    """Same size distribution, same placement, 2-3 categories per scene, one label, sounding object visible."""
    sounding = [s.sounding_boxes[0] for s in scenes if len(s.sounding_boxes) == 1]
    distractors = [o.box for s in scenes for o in s.objects if not o.sounding]
    q = [0.1, 0.25, 0.5, 0.75, 0.9]
    np.testing.assert_allclose(np.quantile([synthetic._box_area(b) for b in distractors], q),
                               np.quantile([synthetic._box_area(b) for b in sounding], q), rtol=0.12)

    def centre_distance(boxes: list) -> float:
        return float(np.mean([np.hypot((b[0] + b[2]) / 2 - 0.5, (b[1] + b[3]) / 2 - 0.5) for b in boxes]))

    assert abs(centre_distance(sounding) - centre_distance(distractors)) < 0.02
    for scene in scenes:
        categories = [o.category for o in scene.objects if not o.sounding]
        assert 1 <= len(categories) <= 2 and len(set(categories)) == len(categories)
        assert scene.label not in categories
        assert all(o.category == scene.label for o in scene.objects if o.sounding)
        visible = synthetic._visibility(list(scene.objects))
        assert min(v for o, v in zip(scene.objects, visible) if o.sounding) >= synthetic._MIN_VISIBLE
    two_objects = [s for s in scenes if len(s.objects) == 2]
    on_top = np.mean([s.objects[-1].sounding for s in two_objects])
    assert 0.45 < on_top < 0.6  # the drawing order barely favours the sounding object


# ------------------------------------------------------------------------------------------------------------ audio

def band_profile(samples: np.ndarray, sr: int) -> np.ndarray:
    power = np.abs(np.fft.rfft(samples.astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(len(samples), 1.0 / sr)
    edges = np.geomspace(40.0, 8000.0, 33)
    energy = np.array([power[(freqs >= lo) & (freqs < hi)].sum() for lo, hi in zip(edges[:-1], edges[1:])])
    log_energy = np.log(energy + 1e-9)
    return log_energy - log_energy.mean()


def test_each_class_has_its_own_sound() -> None:
    sr, per_class = 16000, 5
    profiles, labels, centroids = [], [], []
    for label in range(len(CLASSES)):
        clips = [read_wav(io.BytesIO(synthetic._render_audio(label, 3, sr, np.random.default_rng([label, i]))))[0]
                 for i in range(per_class)]
        assert len({c.tobytes() for c in clips}) == per_class  # random phase, onset, noise: no two clips alike
        for samples in clips:
            profiles.append(band_profile(samples, sr))
            labels.append(label)
        power = np.abs(np.fft.rfft(np.concatenate(clips).astype(np.float64))) ** 2
        freqs = np.fft.rfftfreq(sum(len(c) for c in clips), 1.0 / sr)
        centroids.append(float((power * freqs).sum() / power.sum()))
    profiles, labels = np.array(profiles), np.array(labels)
    correct = 0
    for i in range(len(labels)):  # leave-one-out nearest class mean
        rest = np.arange(len(labels)) != i
        means = np.array([profiles[rest & (labels == c)].mean(0) for c in range(len(CLASSES))])
        correct += int(np.argmin(((means - profiles[i]) ** 2).sum(1)) == labels[i])
    assert correct == len(labels)
    gaps = np.diff(np.sort(np.log(centroids)))
    assert gaps.min() > 0.08, dict(zip(CLASSES, np.round(centroids)))  # spectral centroids >= 8% apart


# ---------------------------------------------------------------------------------------- determinism, idempotence

def test_same_seed_same_bytes_whatever_the_workers_and_another_seed_differs(bench: Path, tmp_path: Path) -> None:
    generate(tmp_path / "parallel", **{**TINY, "workers": 2})
    assert tree_hashes(tmp_path / "parallel") == tree_hashes(bench)
    generate(tmp_path / "seed1", **{**TINY, "seed": 1})
    other = tree_hashes(tmp_path / "seed1")
    assert len(other) == len(tree_hashes(bench)) and other.keys() != tree_hashes(bench).keys()
    assert set(other.values()).isdisjoint(tree_hashes(bench).values())


def test_rerun_writes_nothing(bench: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in bench.rglob("*")}
    before[bench] = bench.stat().st_mtime_ns
    summary = generate(bench, **TINY)
    after = {p: p.stat().st_mtime_ns for p in bench.rglob("*")}
    after[bench] = bench.stat().st_mtime_ns
    assert after == before
    assert summary["files"] == {"written": 0, "unchanged": 12 * 2 + 4 * 3 + 6 * 3 + 4 * 3 + 12 + 3, "removed": 0}
    assert summary["clips"] == {"train": 12, "val": 4, "test_vggss": 6, "test_flickr": 4}
    assert summary["sets"]["test_flickr"] == str(bench / "test_flickr")


def test_interrupted_run_is_completed_with_identical_bytes(tmp_path: Path) -> None:
    out = tmp_path / "b"
    generate(out, **TINY)
    reference = tree_hashes(out)
    clip = read_set(out / "test_vggss").clips[2]
    Path(clip.audio).unlink()
    Path(clip.anno).unlink()
    (out / "train" / "manifest.csv").unlink()
    summary = generate(out, **TINY)
    assert summary["files"]["written"] == 3
    assert tree_hashes(out) == reference


def test_other_params_are_refused_naming_them(bench: Path) -> None:
    with pytest.raises(DataError) as exc:
        generate(bench, **{**TINY, "n_train": 13, "seed": 2})
    assert exc.value.message == (f"{bench}: holds a synthetic benchmark made with other parameters "
                                 "(n_train 12 -> 13, seed 0 -> 2); use another --out, or --force to replace it")


def test_force_regenerates_and_removes_stale_files(tmp_path: Path) -> None:
    out = tmp_path / "b"
    generate(out, **TINY)
    old_train = read_set(out / "train").clips
    summary = generate(out, **{**TINY, "n_train": 5, "n_flickr": 0, "force": True})
    train = read_set(out / "train").clips
    # A shorter set starts with the clips of the longer one, so only the bookkeeping files change.
    assert [c.id for c in train] == [c.id for c in old_train[:5]]
    # benchmark.json, vggsound.csv, train/manifest.csv and train/scenes.csv
    assert summary["files"]["written"] == 4
    assert summary["files"]["removed"] == 7 * 2 + 4 * 3 + 3  # and test_flickr's set.json, manifest, scenes.csv
    assert sorted(p.name for p in (out / "train" / "total_video_frames").iterdir()) == sorted(c.id for c in train)
    assert not (out / "test_flickr").exists() and "test_flickr" not in summary["sets"]


def test_foreign_folder_and_bad_params_are_refused(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    with pytest.raises(DataError) as exc:
        generate(tmp_path / "data", **TINY)
    assert exc.value.message == (f"{tmp_path / 'data'}: folder is not empty and has no benchmark.json, so it is not a "
                                 "synthetic benchmark; use a new or empty --out, or --force to write into it")
    with pytest.raises(DataError) as exc:
        generate(tmp_path / "new", **{**TINY, "n_classes": 1, "sample_rate": 8000, "n_val": -1})
    assert exc.value.problems == [
        "n_val = -1: a clip count cannot be negative",
        "sample_rate = 8000: use 16000 to 48000 Hz (the sounds reach 7 kHz)",
        "n_classes = 1: use 2 to 10 (each scene shows 2-3 categories)",
    ]
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------ default output, pinned bytes

# Digests of the default-knob output as it was before the difficulty knobs (issue 21): the easy benchmark, the
# quickstart's figures and every published synthetic number rest on these bytes. A change here is a new benchmark:
# bump synthetic.FORMAT and re-measure the README's figures, never just update the digests.
DEFAULT_TREE_DIGEST = "8a6897ef37a75580cac4eeef4a31e98e2d9bdd168e2239dd051e5f1b4e80a238"
DEFAULT_MASKS_DIGEST = "5ca3f1cb339ac67804e1bc939852f169b0d9313f83b34fbdf31d1e6cb9caa21e"
DEFAULT_MOVING_DIGEST = "83619a7b28974c90f01f2dcb62fac8d09e2444a88195c9c9e55a469bf1277dcf"
FILES_BEFORE_KNOBS = 77  # each set's scenes.csv, added with the knobs, are the only files beside them


def test_default_output_is_byte_identical_to_the_pinned_benchmark(bench: Path) -> None:
    hashes = {k: v for k, v in tree_hashes(bench).items() if Path(k).name != "scenes.csv"}
    assert len(hashes) == FILES_BEFORE_KNOBS
    assert hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest() == DEFAULT_TREE_DIGEST
    masks = synthetic.sounding_masks(bench, "test_vggss", 64)
    packed = b"".join(k.encode() + np.packbits(v).tobytes() for k, v in sorted(masks.items()))
    assert hashlib.sha256(packed).hexdigest() == DEFAULT_MASKS_DIGEST
    clip = synthetic.moving_clip(3, 2, seconds=1.0, fps=4, size=64)
    moving = clip.frames.tobytes() + clip.audio.tobytes() + clip.boxes.tobytes()
    assert hashlib.sha256(moving).hexdigest() == DEFAULT_MOVING_DIGEST
