"""Real-data preparation on small real media made here with PyAV.

Clips are H.264 (libx264) + AAC mp4s, 64x48 at 25 fps, whose frames carry their own index as 8 black/white column
stripes (bit b of the index = stripe b, robust to compression), so a test can read which frame was written. Audio is a
440 Hz tone in the left channel only (stereo 44.1 kHz), plus a 1 ms click at exactly t = 5 s, so the tests can check
the downmix (a channel mean halves the tone), the resampling and where the window was cut (where the click lands).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from typer.testing import CliRunner

from sslt_cli.cli import app
from sslt_cli.data import prepare as prep
from sslt_cli.data.annotations import Annotation, flickr_xml_text, read_flickr_xml, read_vggss_xml
from sslt_cli.data.manifest import read_set
from sslt_cli.errors import DataError

W, H = 64, 48
TONE = 0.4  # left-channel amplitude; the right channel is silent, so the mono mean carries TONE / 2
CLICK_AT = 5.0


def frame_image(index: int) -> np.ndarray:
    img = np.zeros((H, W, 3), np.uint8)
    for bit in range(8):
        if (index >> bit) & 1:
            img[:, bit * (W // 8):(bit + 1) * (W // 8)] = 255
    return img


def read_index(image: np.ndarray) -> int:
    columns = image.mean(axis=(0, 2))
    return sum(1 << bit for bit in range(8) if columns[bit * (W // 8):(bit + 1) * (W // 8)].mean() > 128)


def stereo_signal(seconds: float, rate: int) -> np.ndarray:
    """(2, n) float32: a 440 Hz tone on the left, silence on the right, a 1 ms click on both at CLICK_AT."""
    t = np.arange(int(round(seconds * rate))) / rate
    left = TONE * np.sin(2 * np.pi * 440 * t)
    right = np.zeros_like(left)
    click = (t >= CLICK_AT) & (t < CLICK_AT + 0.001)
    left[click] = right[click] = 0.95
    return np.stack([left, right]).astype(np.float32)


def make_clip(path: Path, seconds: float = 10.0, fps: int = 25, audio: bool = True, rate: int = 44100,
              faststart: bool = False) -> Path:
    """An H.264 + AAC mp4 (stereo at ``rate``) whose frame i shows i in binary stripes."""
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = W, H, "yuv420p"
        if audio:
            sound = container.add_stream("aac", rate=rate)
            sound.layout = "stereo"
        for i in range(int(round(seconds * fps))):
            frame = av.VideoFrame.from_ndarray(frame_image(i), format="rgb24")
            frame.pts = i
            container.mux(video.encode(frame))
        container.mux(video.encode())
        if audio:
            signal = stereo_signal(seconds, rate)
            for start in range(0, signal.shape[1], 1024):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(signal[:, start:start + 1024]),
                                                   format="fltp", layout="stereo")
                frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
                container.mux(sound.encode(frame))
            container.mux(sound.encode())
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of source clips, generated once: good ones, a mirror-named one and every kind of bad one."""
    root = tmp_path_factory.mktemp("media")
    videos = root / "videos"
    videos.mkdir()
    make_clip(videos / "good_clip_1_000030.mp4")
    make_clip(videos / "-good-clip2_000004_000014.mp4")  # the <ytid>_<start>_<end> naming some mirrors use
    make_clip(videos / "fps30_clip__000120.mp4", fps=30)
    make_clip(videos / "silent_clip_000000.mp4", audio=False)
    make_clip(videos / "short_clip__000000.mp4", seconds=5.0)
    whole = make_clip(root / "whole.mp4").read_bytes()
    (videos / "trunc_clip__000000.mp4").write_bytes(whole[: len(whole) // 2])  # moov atom lost: cannot open
    (videos / "notes.mp4").write_text("not a clip name")
    return videos


GOOD = ["good_clip_1_000030", "-good-clip2_000004", "fps30_clip__000120"]
BAD = {"silent_clip_000000": "no audio stream", "short_clip__000000": "too short", "trunc_clip__000000": "corrupt"}


def copy_videos(media: Path, dest: Path, names: list[str] | None = None) -> Path:
    dest.mkdir()
    for path in media.iterdir():
        if names is None or prep.clip_id_from_name(path.stem) in names:
            shutil.copy2(path, dest / path.name)
    return dest


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def manifest_rows(out: Path) -> dict[str, dict]:
    with open(out / "manifest.csv", newline="") as f:
        return {row["id"]: row for row in csv.DictReader(f)}


def write_list(path: Path, ids: list[str]) -> Path:
    path.write_text("".join(f"{i}\n" for i in ids))
    return path


# ---------------------------------------------------------------------------------------------------------------------


def test_clip_names_map_to_vggsound_ids():
    assert prep.clip_id_from_name("zpWuikVorYg_000032") == "zpWuikVorYg_000032"
    assert prep.clip_id_from_name("__2MwJ2uHu0_000004_000014") == "__2MwJ2uHu0_000004"
    assert prep.clip_id_from_name("-0BIyqJj9ZU_30") == "-0BIyqJj9ZU_000030"
    assert prep.clip_id_from_name("notes") is None
    assert prep.clip_id_from_name("zpWuikVorYg") is None


def test_train_split_frame_audio_and_statuses(media: Path, tmp_path: Path):
    out = tmp_path / "train"
    result = prep.prepare_vggsound(media, out, split="train", neighbours=1, workers=1, progress=False)

    assert (result.requested, result.prepared, result.already_done, result.missing) == (6, 3, 0, 0)
    assert result.failed == {"corrupt": 1, "no audio stream": 1, "too short": 1}
    assert any("notes.mp4" in note for note in result.notes)
    rows = manifest_rows(out)
    assert sorted(rows) == sorted(GOOD + list(BAD))
    for clip_id, status in BAD.items():
        assert rows[clip_id]["status"] == status and rows[clip_id]["frame"] == "" and rows[clip_id]["audio"] == ""
    assert rows["short_clip__000000"]["reason"] == "video frames end at 4.96 s, before the frame at t = 5.00 s"
    assert rows["silent_clip_000000"]["reason"] == "silent_clip_000000.mp4 has no audio stream"
    assert rows["trunc_clip__000000"]["reason"].startswith("cannot open trunc_clip__000000.mp4: ")

    clips = read_set(out)
    assert clips.layout == "vggsound_train" and [c.id for c in clips.clips] == sorted(GOOD)
    for clip in clips.clips:
        assert clip.frame == str(out / "total_video_frames" / clip.id / "125.jpg")
        assert clip.audio == str(out / "total_video_3s_audio" / f"{clip.id}.wav")
        assert read_index(np.asarray(Image.open(clip.frame))) == (150 if clip.id.startswith("fps30") else 125)
        # neighbours at t -+ 1/25 s: frames 124/126 at 25 fps, the nearest 30 fps frames to 4.96 s / 5.04 s
        expected = {124: 149, 126: 151} if clip.id.startswith("fps30") else {124: 124, 126: 126}
        for index, shown in expected.items():
            assert read_index(np.asarray(Image.open(out / "neighbours" / clip.id / f"{index:03d}.jpg"))) == shown
        samples, rate = sf.read(clip.audio, dtype="float32")
        assert rate == 16000 and samples.ndim == 1 and len(samples) == 48000
        # The click at t = 5 s lands 1.5 s into the window 3.5-6.5 s.
        assert abs(int(np.argmax(np.abs(samples))) - 24000) <= 16
        # Stereo downmixed by the channel mean: the left-only tone keeps half its amplitude (RMS = TONE / 2 / sqrt 2).
        rms = float(np.sqrt(np.mean(samples[:16000] ** 2)))
        assert rms == pytest.approx(TONE / 2 / np.sqrt(2), rel=0.05)
    journal = [json.loads(line) for line in (out / prep.STATE_FILE).read_text().splitlines()]
    assert journal[0]["settings"]["split"] == "train"
    assert sorted(entry["id"] for entry in journal[1:]) == sorted(GOOD + list(BAD))


def test_test_split_full_audio_annotations_labels_and_missing(media: Path, tmp_path: Path):
    videos = copy_videos(media, tmp_path / "videos", GOOD)
    make_clip(videos / "seven_secs__000000.mp4", seconds=7.0)
    boxes = {"good_clip_1_000030": [[0.1, 0.2, 0.5, 0.6]],
             "-good-clip2_000004": [[0.0, 0.0, 1.0, 1.0], [0.2, 0.2, 0.3, 0.4]],
             "vanished_id_000001": [[0.1, 0.1, 0.2, 0.2]], "seven_secs__000000": [[0.3, 0.3, 0.4, 0.4]]}
    vggss = tmp_path / "vggss.json"
    vggss.write_text(json.dumps([{"file": k, "class": "dog barking", "bbox": v} for k, v in boxes.items()]))
    labels = tmp_path / "vggsound.csv"
    labels.write_text('good_clip_1,30,"female speech, woman speaking",test\n-good-clip2,4,dog barking,test\n')
    id_list = write_list(tmp_path / "list.txt", ["good_clip_1_000030", "-good-clip2_000004_000014",
                                                 "vanished_id_000001", "fps30_clip__000120", "seven_secs__000000"])
    out = tmp_path / "test"
    result = prep.prepare_vggsound(videos, out, split="test", id_list=id_list, vggss_json=vggss, labels=labels,
                                   workers=1, progress=False)

    assert (result.requested, result.prepared, result.missing) == (5, 3, 1)
    assert result.failed == {"no annotation": 1}
    rows = manifest_rows(out)
    assert list(rows) == ["good_clip_1_000030", "-good-clip2_000004", "vanished_id_000001", "fps30_clip__000120",
                          "seven_secs__000000"]
    assert rows["vanished_id_000001"]["status"] == "missing"
    assert rows["vanished_id_000001"]["reason"] == f"no video vanished_id_000001.mp4 in {videos}"
    assert rows["fps30_clip__000120"]["status"] == "no annotation"
    assert rows["good_clip_1_000030"]["label"] == "female speech, woman speaking"
    clips = read_set(out)
    assert clips.layout == "vggss_test" and clips.anno_kind == "vggss"
    for clip in clips.clips:
        assert read_index(np.asarray(Image.open(clip.frame))) == 125
        samples, rate = sf.read(clip.audio, dtype="float32")
        # The clip's first 10 s exactly, or all of a shorter clip: the AAC padding of the last frame is cut off.
        assert rate == 16000 and samples.ndim == 1
        assert len(samples) == (112000 if clip.id.startswith("seven") else 160000)
        assert abs(int(np.argmax(np.abs(samples))) - 80000) <= 16
        assert list(read_vggss_xml(clip.anno).boxes) == [tuple(b) for b in boxes[clip.id]]


def test_resume_redoes_only_incomplete_clips_and_a_rerun_writes_nothing(media: Path, tmp_path: Path):
    videos = copy_videos(media, tmp_path / "videos", GOOD)
    out = tmp_path / "out"
    first = prep.prepare_vggsound(videos, out, split="train", workers=1, progress=False)
    assert (first.prepared, first.already_done) == (3, 0)
    before = mtimes(out)

    # A kill leaves a temp file behind (never a half-written output), a user deletes one output and truncates another.
    (out / "total_video_3s_audio" / f"{GOOD[0]}.wav").unlink()
    jpg = out / "total_video_frames" / GOOD[1] / "125.jpg"
    jpg.write_bytes(jpg.read_bytes()[:200])
    (out / "total_video_frames" / GOOD[2] / ".125.jpg.abc123.tmp").write_bytes(b"\xff\xd8partial")

    second = prep.prepare_vggsound(videos, out, split="train", workers=1, progress=False)
    assert (second.prepared, second.already_done) == (2, 1)
    after = mtimes(out)
    untouched = [k for k in before if GOOD[2] in k]
    assert untouched and all(after[k] == before[k] for k in untouched)
    assert read_index(np.asarray(Image.open(jpg))) == 125
    assert len(sf.read(out / "total_video_3s_audio" / f"{GOOD[0]}.wav")[0]) == 48000
    assert [c.id for c in read_set(out).clips] == sorted(GOOD)

    third = prep.prepare_vggsound(videos, out, split="train", workers=1, progress=False)
    assert (third.prepared, third.already_done) == (0, 3)
    assert mtimes(out) == after  # manifest, set.json and journal included


def test_an_interrupted_run_keeps_the_statuses_it_finished(media: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    videos = copy_videos(media, tmp_path / "videos", GOOD + ["silent_clip_000000"])
    out = tmp_path / "out"
    real_run = prep._VideoJob.run
    calls: list[str] = []

    def killed_after_two(job):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(job.clip_id)
        return real_run(job)

    monkeypatch.setattr(prep._VideoJob, "run", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare_vggsound(videos, out, split="train", workers=1, progress=False)
    assert not (out / "manifest.csv").exists()
    journal = [json.loads(line) for line in (out / prep.STATE_FILE).read_text().splitlines()[1:]]
    assert [e["id"] for e in journal] == calls

    # The re-run decodes only what the first run did not finish; a failure keeps its journaled status and is not
    # decoded again while its video is unchanged.
    redone: list[str] = []

    def recording(job):
        redone.append(job.clip_id)
        return real_run(job)

    monkeypatch.setattr(prep._VideoJob, "run", recording)
    result = prep.prepare_vggsound(videos, out, split="train", workers=1, progress=False)
    assert sorted(redone) == sorted(set(GOOD + ["silent_clip_000000"]) - set(calls))
    assert result.failed == {"no audio stream": 1} and result.ok == 3
    redone.clear()
    again = prep.prepare_vggsound(videos, out, split="train", workers=1, progress=False)
    assert redone == [] and again.failed == {"no audio stream": 1}


def test_changed_settings_are_refused(media: Path, tmp_path: Path):
    videos = copy_videos(media, tmp_path / "videos", GOOD[:1])
    out = tmp_path / "out"
    prep.prepare_vggsound(videos, out, split="train", workers=1, progress=False)
    with pytest.raises(DataError) as err:
        prep.prepare_vggsound(videos, out, split="train", sample_rate=22050, workers=1, progress=False)
    assert err.value.message == (f"{out}: already holds clips prepared with other settings "
                                 "(sample_rate 16000 -> 22050); use another --out folder, or delete this one to "
                                 "prepare it again")


def test_two_workers_write_the_same_files_as_one(media: Path, tmp_path: Path):
    videos = copy_videos(media, tmp_path / "videos", GOOD + ["trunc_clip__000000"])
    one = prep.prepare_vggsound(videos, tmp_path / "one", split="train", workers=1, progress=False)
    two = prep.prepare_vggsound(videos, tmp_path / "two", split="train", workers=2, progress=False)
    assert (one.prepared, one.failed) == (two.prepared, two.failed) == (3, {"corrupt": 1})
    for rel in ["manifest.csv"] + [f"total_video_frames/{i}/125.jpg" for i in GOOD] + \
               [f"total_video_3s_audio/{i}.wav" for i in GOOD]:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel


def test_frame_size_resizes_the_frame(media: Path, tmp_path: Path):
    videos = copy_videos(media, tmp_path / "videos", GOOD[:1])
    prep.prepare_vggsound(videos, tmp_path / "out", split="train", frame_size=(96, 72), workers=1, progress=False)
    image = Image.open(tmp_path / "out" / "total_video_frames" / GOOD[0] / "125.jpg")
    assert image.size == (96, 72)
    # Stripes scale with the frame: read them on a 64-wide copy.
    assert read_index(np.asarray(image.resize((W, H), Image.NEAREST))) == 125


def test_progress_bar_reports_rate_on_stderr(media: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    videos = copy_videos(media, tmp_path / "videos", GOOD[:1])
    prep.prepare_vggsound(videos, tmp_path / "out", split="train", workers=1, progress=True)
    captured = capsys.readouterr()
    assert captured.out == "" and "clips/s" in captured.err and "vggsound train" in captured.err


def test_truncated_faststart_file_is_reported_corrupt(tmp_path: Path):
    videos = tmp_path / "videos"
    videos.mkdir()
    whole = make_clip(tmp_path / "fs.mp4", faststart=True).read_bytes()
    # The header survives (moov first) but the data stops at about 3 s of the declared 10 s.
    (videos / "fast_start__000000.mp4").write_bytes(whole[: int(len(whole) * 0.3)])
    prep.prepare_vggsound(videos, tmp_path / "out", split="test", workers=1, progress=False)
    row = manifest_rows(tmp_path / "out")["fast_start__000000"]
    assert row["status"] == "corrupt" and row["reason"].startswith("truncated: ")


def test_a_rerun_keeps_clips_whose_videos_are_gone(media: Path, tmp_path: Path):
    videos = copy_videos(media, tmp_path / "videos", GOOD)
    out = tmp_path / "out"
    prep.prepare_vggsound(videos, out, split="train", workers=1, progress=False)
    before = mtimes(out)
    (videos / "-good-clip2_000004_000014.mp4").unlink()

    unlisted = prep.prepare_vggsound(videos, out, split="train", workers=1, progress=False)
    assert (unlisted.requested, unlisted.prepared, unlisted.already_done, unlisted.missing) == (3, 0, 3, 0)
    assert mtimes(out) == before  # the same set: nothing rewritten
    (out / prep.STATE_FILE).unlink()  # the manifest still names the clips an earlier run prepared
    assert prep.prepare_vggsound(videos, out, split="train", workers=1, progress=False).already_done == 3

    id_list = write_list(tmp_path / "list.txt", GOOD + ["vanished_id_000001"])
    listed = prep.prepare_vggsound(videos, out, split="train", id_list=id_list, workers=1, progress=False)
    assert (listed.requested, listed.already_done, listed.missing) == (4, 3, 1)
    assert [c.id for c in read_set(out).clips] == GOOD
    assert manifest_rows(out)["vanished_id_000001"]["reason"] == f"no video vanished_id_000001.mp4 in {videos}"

    # Once its outputs are incomplete too, the clip is missing: nothing is left to prepare it from.
    (out / "total_video_frames" / "-good-clip2_000004" / "125.jpg").unlink()
    again = prep.prepare_vggsound(videos, out, split="train", workers=1, progress=False)
    assert (again.requested, again.already_done, again.missing) == (3, 2, 1)
    assert manifest_rows(out)["-good-clip2_000004"]["reason"] == f"no video -good-clip2_000004.mp4 in {videos}"


def test_a_new_batch_of_videos_into_the_same_folder_keeps_the_first(media: Path, tmp_path: Path):
    first_batch = copy_videos(media, tmp_path / "batch1", GOOD[:1])
    second_batch = copy_videos(media, tmp_path / "batch2", GOOD[1:])
    out = tmp_path / "out"
    prep.prepare_vggsound(first_batch, out, split="train", workers=1, progress=False)
    result = prep.prepare_vggsound(second_batch, out, split="train", workers=1, progress=False)
    assert (result.requested, result.prepared, result.already_done, result.missing) == (3, 2, 1, 0)
    assert [c.id for c in read_set(out).clips] == sorted(GOOD)


DIES_ON = GOOD[1]


class DiesOnOneClip(prep._VideoJob):
    """A clip job whose process is killed on ``DIES_ON``, as a segfault in the decoder or the out-of-memory killer
    would kill it. Defined at module level: spawned workers unpickle it by importing this module."""

    def run(self) -> prep._Outcome:
        if self.clip_id == DIES_ON:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().run()


def test_a_worker_that_dies_fails_its_clip_and_the_run_goes_on(media: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch):
    videos = copy_videos(media, tmp_path / "videos", GOOD)
    out = tmp_path / "out"
    monkeypatch.setattr(prep, "_VideoJob", DiesOnOneClip)
    result = prep.prepare_vggsound(videos, out, split="train", workers=2, progress=False)

    assert (result.requested, result.prepared, result.failed) == (3, 2, {"decode error": 1})
    row = manifest_rows(out)[DIES_ON]
    assert (row["status"], row["reason"]) == ("decode error", "worker process died while decoding (signal SIGKILL)")
    assert [c.id for c in read_set(out).clips] == sorted(set(GOOD) - {DIES_ON})
    # Journaled like any failure: a re-run does not decode it again while its video is unchanged.
    before = mtimes(out)
    again = prep.prepare_vggsound(videos, out, split="train", workers=2, progress=False)
    assert (again.prepared, again.already_done, again.failed) == (0, 2, {"decode error": 1})
    assert mtimes(out) == before


def test_a_decoder_exception_is_a_decode_error(media: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    videos = copy_videos(media, tmp_path / "videos", GOOD[:1])

    def failing_decoder(*args, **kwargs):
        raise RuntimeError("invalid data in an audio packet")

    monkeypatch.setattr(prep, "_decode_audio", failing_decoder)
    result = prep.prepare_vggsound(videos, tmp_path / "out", split="train", workers=1, progress=False)
    assert result.failed == {"decode error": 1}
    assert manifest_rows(tmp_path / "out")[GOOD[0]]["reason"] == "RuntimeError: invalid data in an audio packet"


# ---------------------------------------------------------------------------------------------------------------------
# Flickr-SoundNet


def make_mp3(path: Path, seconds: float, rate: int = 22050) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libmp3lame", rate=rate)
        stream.layout = "stereo"
        signal = stereo_signal(seconds, rate)
        for start in range(0, signal.shape[1], 1152):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(signal[:, start:start + 1152]), format="fltp",
                                               layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def test_flickr_test_archive(tmp_path: Path):
    archive = tmp_path / "archive"
    (archive / "Annotations").mkdir(parents=True)
    (archive / "Data").mkdir()
    boxes = {"10000130166": ((10, 20, 100, 200), (12, 18, 98, 190), (0, 0, 255, 255)),
             "10007936344": ((50, 50, 60, 60), (40, 40, 70, 70), (45, 45, 65, 65))}
    for clip_id, clip_boxes in boxes.items():
        xml = flickr_xml_text(Annotation(clip_id, "flickr", clip_boxes))
        (archive / "Annotations" / f"{clip_id}.xml").write_text(xml)
        Image.fromarray(frame_image(7)).save(archive / "Data" / f"{clip_id}.jpg", quality=80)
        with open(archive / "Data" / f"{clip_id}.jpg", "ab") as f:
            f.write(b"\x00" * 16)  # bytes after the end-of-image marker, as some cameras and editors leave
        make_mp3(archive / "Data" / f"{clip_id}.mp3", seconds=12.0)
    (archive / "Annotations" / "10008553263.xml").write_text("<annotation><object>")  # broken XML
    (archive / "Data" / "10008553263.jpg").write_bytes((archive / "Data" / "10000130166.jpg").read_bytes())
    shutil.copy(archive / "Data" / "10000130166.mp3", archive / "Data" / "10008553263.mp3")
    # 3908875357 is in the original test list but not in the archive.
    id_list = tmp_path / "flickr_test.csv"
    id_list.write_text("10000130166,202\n10007936344,0\n3908875357,0\n10008553263,309\n")
    out = tmp_path / "flickr"
    result = prep.prepare_flickr(archive, out, split="test", id_list=id_list, workers=1, progress=False)

    assert (result.requested, result.prepared, result.missing, result.failed) == (4, 2, 1, {"corrupt": 1})
    rows = manifest_rows(out)
    assert list(rows) == ["10000130166", "10007936344", "3908875357", "10008553263"]
    assert rows["3908875357"]["status"] == "missing"
    assert rows["3908875357"]["reason"] == (f"not in {archive}: "
                                            "image (Data/3908875357.jpg | Data/3908875357/3908875357.jpg); "
                                            "audio (Data/3908875357.mp3 | Data/3908875357.wav); "
                                            "annotation (Annotations/3908875357.xml)")
    assert rows["10008553263"]["reason"].startswith(f"{archive / 'Annotations' / '10008553263.xml'}: not valid XML")
    clips = read_set(out)
    assert clips.layout == "flickr_test" and clips.anno_kind == "flickr"
    before = mtimes(out)
    again = prep.prepare_flickr(archive, out, split="test", id_list=id_list, workers=1, progress=False)
    assert (again.prepared, again.already_done) == (0, 2) and mtimes(out) == before
    for clip in clips.clips:
        assert Path(clip.frame).read_bytes() == (archive / "Data" / f"{clip.id}.jpg").read_bytes()
        assert read_flickr_xml(clip.anno).boxes == tuple(tuple(map(float, b)) for b in boxes[clip.id])
        samples, rate = sf.read(clip.audio, dtype="float32")
        assert rate == 16000 and samples.ndim == 1 and len(samples) == 160000  # the first 10 s of 12 s
        assert abs(int(np.argmax(np.abs(samples))) - int(CLICK_AT * 16000)) <= 16


def test_flickr_pairs_gone_from_the_archive_stay_prepared(tmp_path: Path):
    archive = tmp_path / "archive"
    (archive / "Annotations").mkdir(parents=True)
    (archive / "Data").mkdir()
    for clip_id in ("10000130166", "10007936344"):
        xml = flickr_xml_text(Annotation(clip_id, "flickr", ((10, 20, 100, 200),) * 3))
        (archive / "Annotations" / f"{clip_id}.xml").write_text(xml)
        Image.fromarray(frame_image(7)).save(archive / "Data" / f"{clip_id}.jpg")
        with open(archive / "Data" / f"{clip_id}.jpg", "ab") as f:
            f.write(b"\x00" * 16)  # bytes after the end-of-image marker: only the journaled size says it is whole
        make_mp3(archive / "Data" / f"{clip_id}.mp3", seconds=3.0)
    out = tmp_path / "flickr"
    prep.prepare_flickr(archive, out, split="test", workers=1, progress=False)
    before = mtimes(out)
    for path in [archive / "Annotations" / "10007936344.xml", *(archive / "Data").glob("10007936344.*")]:
        path.unlink()

    again = prep.prepare_flickr(archive, out, split="test", workers=1, progress=False)
    assert (again.requested, again.already_done, again.missing) == (2, 2, 0) and mtimes(out) == before


def test_flickr_train_pairs_from_frames_and_mp3_folders(tmp_path: Path):
    archive = tmp_path / "flickr_all"
    (archive / "mp3").mkdir(parents=True)
    for clip_id, seconds in (("111", 20.0), ("222", 2.5)):
        (archive / "frames" / clip_id).mkdir(parents=True)
        Image.fromarray(frame_image(3)).save(archive / "frames" / clip_id / "00000003.jpg")
        make_mp3(archive / "mp3" / f"{clip_id}.mp3", seconds=seconds, rate=44100)
    out = tmp_path / "train"
    result = prep.prepare_flickr(archive, out, split="train", workers=1, progress=False)
    assert (result.requested, result.prepared) == (2, 2)
    clips = {c.id: c for c in read_set(out).clips}
    assert clips["111"].frame == str(out / "frames" / "111" / "00000003.jpg")
    assert len(sf.read(clips["111"].audio)[0]) == 4 * 16000  # SSL-TIE trains on the first 4 s
    assert abs(len(sf.read(clips["222"].audio)[0]) - int(2.5 * 16000)) <= 2  # shorter audio is kept whole


# ---------------------------------------------------------------------------------------------------------------------
# VGG-SS annotations and indexing existing folders


def test_vggss_json_to_xml_and_back_on_the_real_file(tmp_path: Path):
    from sslt_cli.catalog import RESOURCES_DIR as realdata  # the public files shipped in the package
    anno = tmp_path / "anno"
    report = prep.prepare_vggss_annotations(realdata / "vggss.json", anno)
    assert (report.clips, report.boxes, report.written, report.unchanged) == (5158, 5941, 5158, 0)
    assert (len(report.defects.non_finite_or_huge), len(report.defects.degenerate)) == (12, 18)
    empty_line = ("2 clips have an empty ground truth once their boxes are clipped to [0, 1]; evaluation excludes "
                  "them (--empty-gt zero scores them 0, as the official code): M1P1xla8rg0_000000, "
                  "MKC9LvRivTM_000030")
    assert report.defects.summary()[-1] == empty_line
    assert read_vggss_xml(anno / "Db6Hjt0x28k_000056.xml").boxes[0] == (0.384375, 0.859375, 0.696875,
                                                                         -2.8823037615171176e+16)
    before = mtimes(anno)
    again = prep.prepare_vggss_annotations(realdata / "vggss.json", anno)
    assert (again.written, again.unchanged) == (0, 5158) and mtimes(anno) == before
    shown = CliRunner().invoke(app, ["prepare", "vggss-annotations", "--json", str(realdata / "vggss.json"),
                                     "--out", str(anno)])
    assert shown.exit_code == 0, shown.output
    assert f"defect: {empty_line}" in " ".join(shown.stderr.split())  # rich wraps long lines

    back = tmp_path / "vggss_back.json"
    collected = prep.collect_vggss_json(anno, back, id_list=realdata / "vggss_test_5158.csv")
    assert (collected.clips, collected.boxes) == (5158, 5941)
    assert sorted(collected.defects.empty_after_clipping) == ["M1P1xla8rg0_000000", "MKC9LvRivTM_000030"]
    # Same records in the same order; only ints such as 0 come back as 0.0.
    assert json.loads(back.read_text()) == json.loads((realdata / "vggss.json").read_text())


def test_index_existing_checks_each_listed_clip(tmp_path: Path):
    root = tmp_path / "VGGSound_test"
    for folder in ("frame", "audio", "anno"):
        (root / folder).mkdir(parents=True)
    for clip_id in ("aaaaaaaaaaa_000001", "bbbbbbbbbbb_000002"):
        Image.fromarray(frame_image(1)).save(root / "frame" / f"{clip_id}.jpg")
        (root / "anno" / f"{clip_id}.xml").write_text("<annotation><bbox><box><xmin>0</xmin><ymin>0</ymin>"
                                                        "<xmax>1</xmax><ymax>1</ymax></box></bbox></annotation>")
    sf.write(root / "audio" / "aaaaaaaaaaa_000001.wav", np.zeros(160), 16000)
    before = mtimes(root)

    listed = prep.index_existing(root, "vggss_test")
    assert (listed.requested, listed.already_done, listed.missing) == (2, 1, 1)
    rows = manifest_rows(root)
    assert rows["bbbbbbbbbbb_000002"]["status"] == "missing"
    assert rows["bbbbbbbbbbb_000002"]["reason"] == "no file audio/bbbbbbbbbbb_000002.wav"
    assert {k for k in mtimes(root)} - set(before) == {"set.json", "manifest.csv"}  # nothing else written

    ids = write_list(tmp_path / "list.txt", ["aaaaaaaaaaa_000001.jpg", "ccccccccccc_000003"])
    named = prep.index_existing(root, "vggss_test", ids)
    assert (named.requested, named.already_done, named.missing) == (2, 1, 1)
    assert manifest_rows(root)["ccccccccccc_000003"]["reason"] == (
        "no file frame/ccccccccccc_000003.jpg, audio/ccccccccccc_000003.wav, anno/ccccccccccc_000003.xml")
    assert [c.id for c in read_set(root).clips] == ["aaaaaaaaaaa_000001"]


def test_index_decode_checks_every_clip_and_lists_each_incomplete_one(tmp_path: Path):
    root = tmp_path / "VGGSound_test"
    for folder in ("frame", "audio", "anno"):
        (root / folder).mkdir(parents=True)
    good_box = ("<annotation><bbox><box><xmin>0</xmin><ymin>0</ymin><xmax>1</xmax><ymax>1</ymax></box></bbox>"
                "</annotation>")
    ids = ["good_000001", "noframe_000002", "badjpeg_000003", "badwav_000004", "badxml_000005"]
    for clip_id in ids:
        Image.fromarray(frame_image(1)).save(root / "frame" / f"{clip_id}.jpg")
        sf.write(root / "audio" / f"{clip_id}.wav", np.zeros(160), 16000)
        (root / "anno" / f"{clip_id}.xml").write_text(good_box)
    (root / "frame" / "noframe_000002.jpg").unlink()  # listed from its audio and box files all the same
    (root / "frame" / "badjpeg_000003.jpg").write_bytes(b"not a jpeg at all")
    (root / "audio" / "badwav_000004.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    (root / "anno" / "badxml_000005.xml").write_text("<annotation><bbox>")

    result = CliRunner().invoke(app, ["prepare", "index", str(root), "--layout", "vggss_test", "--workers", "3"],
                                env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    incomplete = [f"incomplete clip {i}" for i in sorted(ids) if i != "good_000001"]
    assert [n.split(":")[1].strip() for n in notes] == incomplete
    rows = manifest_rows(root)
    assert {i: rows[i]["status"] for i in ids} == {"good_000001": "ok", "noframe_000002": "missing",
                                                   "badjpeg_000003": "decode error", "badwav_000004": "decode error",
                                                   "badxml_000005": "decode error"}
    assert rows["noframe_000002"]["reason"] == "no file frame/noframe_000002.jpg"
    assert rows["badjpeg_000003"]["reason"].startswith("frame/badjpeg_000003.jpg: not a readable image (")
    assert rows["badwav_000004"]["reason"].startswith("audio/badwav_000004.wav: not a readable audio file (")
    assert rows["badxml_000005"]["reason"].startswith(f"{root / 'anno' / 'badxml_000005.xml'}: ")
    table = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in result.stdout.splitlines()
             if line.count("│") == 3}
    assert table == {"listed": "5", "complete (headers read, boxes parsed)": "1",
                     "incomplete: a file is absent or empty": "1", "incomplete: decode error": "3", "usable": "1"}
    assert [c.id for c in read_set(root).clips] == ["good_000001"]


def test_user_errors_name_the_problem(tmp_path: Path):
    with pytest.raises(DataError) as err:
        prep.prepare_vggsound(tmp_path / "nowhere", tmp_path / "out", split="train", progress=False)
    assert err.value.message == (f"{tmp_path / 'nowhere'}: no such folder "
                                 "(expected VGGSound clips named <ytid>_<start>.mp4)")
    with pytest.raises(DataError) as err:
        prep.prepare_vggsound(tmp_path, tmp_path / "out", split="val", progress=False)  # type: ignore[arg-type]
    assert err.value.message == "split 'val' is not one of train, test"
    with pytest.raises(DataError) as err:
        prep.index_existing(tmp_path, "vggss_test")
    assert err.value.message == (f"{tmp_path}: none of frame/, audio/, anno/ is there, so this is not a vggss_test "
                                 "folder (expected frame/{id}.jpg, audio/{id}.wav, anno/{id}.xml); pass --list to "
                                 "name the clips")
    os.makedirs(tmp_path / "empty_archive")
    with pytest.raises(DataError) as err:
        prep.prepare_flickr(tmp_path / "empty_archive", tmp_path / "out", progress=False)
    assert err.value.message == (f"{tmp_path / 'empty_archive'}: found no pairs to prepare (looked in "
                                 "Annotations/*.xml); pass --list with the ids")


def test_shipped_vggss_validation_list_is_the_5158_list_outside_ssltie_4911():
    from sslt_cli.data.annotations import read_id_list

    test_4911 = set(read_id_list("ssltie-vggss-4911"))
    expected = [i for i in read_id_list("vggss-5158") if i not in test_4911]
    assert read_id_list("vggss-val-247") == expected
    assert len(expected) == 247


# --- kill -9 of sslt prepare (issue 13) -----------------------------------------------------------------------------

def _children(pid: int) -> set[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process parents from /proc")
@pytest.mark.timeout(180)
def test_kill_9_of_prepare_leaves_no_worker_or_resource_tracker(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen([sys.executable, "-m", "sslt_cli", "prepare", "synthetic", "--out", str(tmp_path / "s"),
                                "--train", "4000", "--workers", "2"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    children: set[int] = set()
    while time.monotonic() < deadline and len(children) < 3:  # two workers and the resource tracker
        time.sleep(0.2)
        children = _children(process.pid)
    assert len(children) >= 3, "the pool did not start"
    time.sleep(1.0)  # the workers are busy rendering clips
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(pid) for pid in children):
        time.sleep(0.2)
    left = [pid for pid in children if _alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == [], "processes outlived their parent"
