"""``sslt localize``: videos written from the synthetic benchmark's moving scenes (with their audio) go through a
tiny untrained model; what is checked is the plumbing a user relies on: the frames picked, the audio windows, the
outputs (the MP4 decoded back: frame count, duration, audio stream), per-file errors, calibration, official
checkpoints. Whether a trained model follows the moving object is checked in tests/test_quickstart_slow.py, the
browser test of index.html in tests/test_localize_browser_slow.py."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sslt_cli.audio import log_mel, tile_and_cut
from sslt_cli.calibration import Calibration, calibration_for, mismatched_partners
from sslt_cli.cli import app
from sslt_cli.config import Recipe, recipe_dict
from sslt_cli.data.manifest import Clip
from sslt_cli.data.synthetic import generate, moving_clip
from sslt_cli.checkpoint import load_model, save_official_checkpoint
from sslt_cli.evaluate import load_maps
from sslt_cli.localize import LocalizeOptions, localize, window_specs
from sslt_cli.media import frames_at, read_audio, sample_times, write_video
from sslt_cli.model import build_model
from sslt_cli.runs import Run

TINY = {"data": {"image_size": 64, "root": "data"}, "audio": {"clip_seconds": 1.0, "hop_length": 956, "n_mels": 40},
        "eval": {"batch_size": 8}}
WIDE = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}


def write_clip(path: Path, label: int, seconds: float = 4.0, audio: bool = True) -> Path:
    clip = moving_clip(0, label, seconds=seconds)
    return write_video(path, clip.frames, clip.fps, clip.audio[None] if audio else None, clip.sample_rate)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny sslt checkpoint (64 px, 1 s windows) and two moving-scene videos with sound."""
    folder = tmp_path_factory.mktemp("localize")
    torch.manual_seed(0)
    state = {"format": "sslt-checkpoint/1", "model": build_model().state_dict(), "step": 7, "epoch": 0,
             "recipe": recipe_dict(Recipe.model_validate(TINY))}
    torch.save(state, folder / "tiny.pt")
    return {"checkpoint": folder / "tiny.pt", "a": write_clip(folder / "a.mp4", 0),
            "b": write_clip(folder / "b.mp4", 3)}


def test_outputs_of_two_videos_play_and_hold_one_record_per_sampled_frame(assets, tmp_path: Path) -> None:
    result = localize(assets["checkpoint"], [assets["a"], assets["b"]], tmp_path / "loc",
                      options=LocalizeOptions(fps=2.0, save_maps=True))
    assert [item.error for item in result.inputs] == [None, None]
    folder = tmp_path / "loc" / "a"
    assert sorted(p.name for p in folder.iterdir()) == ["contact_sheet.png", "localize.csv", "localize.json",
                                                         "maps.npz", "max_cosine.svg", "overlay.mp4"]
    with av.open(str(folder / "overlay.mp4")) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert (video.codec_context.name, video.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert audio.codec_context.name == "aac"
        assert sum(1 for _ in container.decode(video)) == 8
        assert float(video.duration * video.time_base) == pytest.approx(4.0)
    samples, rate = read_audio(folder / "overlay.mp4")
    original, _ = read_audio(assets["a"])
    assert rate == 16000 and samples.shape[1] == original.shape[1] == 64000
    # the sound muxed back is the input's sound (AAC is lossy: compare loudness per half second)
    envelope = [np.sqrt(np.mean(s.reshape(8, -1) ** 2, axis=1)) for s in (samples[0], original[0])]
    assert np.allclose(*envelope, rtol=0.2)
    rows = list(csv.DictReader((folder / "localize.csv").open()))
    assert [float(r["time_s"]) for r in rows] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
    for row in rows:
        assert 0 <= float(row["peak_x"]) <= 1 and 0 <= float(row["peak_y"]) <= 1
        assert -1 <= float(row["mean_cos"]) <= float(row["max_cos"]) <= 1
        assert float(row["share_above_threshold"]) == pytest.approx(0.5, abs=0.01)  # ssltie: above the median
        assert row["visible"] == ""  # no validation set: uncalibrated
    doc = json.loads((folder / "localize.json").read_text())
    assert doc["window_s"] == 1.0 and doc["fps"] == 2.0 and doc["calibration"] is None and len(doc["frames"]) == 8
    maps = load_maps(folder / "maps.npz")
    assert sorted(maps) == [f"a_{i:06d}" for i in range(8)] and maps["a_000000"].shape == (4, 4)
    assert max(float(m.max()) for m in maps.values()) == pytest.approx(max(float(r["max_cos"]) for r in rows))
    page = (tmp_path / "loc" / "index.html").read_text()
    for name in ("a/overlay.mp4", "a/contact_sheet.png", "a/max_cosine.svg", "b/overlay.mp4"):
        assert f'src="{name}"' in page
    assert "uncalibrated" in page and result.timings.frames == 16


def test_frames_at_gives_the_frame_shown_at_each_time_across_seeks(tmp_path: Path) -> None:
    path = tmp_path / "ramp.mp4"
    write_video(path, np.stack([np.full((64, 64, 3), 4 * k, np.uint8) for k in range(60)]), 10)  # frame k: grey 4k
    times = [0.0, 0.04, 0.55, 5.0, 5.92]  # 0.55 -> frame 5; 5.0 is more than SEEK_AHEAD_S on: a seek
    got = [(round(shown, 2), int(round(rgb.mean() / 4))) for _, shown, rgb in frames_at(path, times)]
    assert got == [(0.0, 0), (0.0, 0), (0.5, 5), (5.0, 50), (5.9, 59)]
    assert sample_times(4.0, 2.0) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
    assert sample_times(4.1, 2.0)[-1] == 4.0


def test_audio_windows_are_centred_and_tiled_at_the_ends_like_training() -> None:
    audio = Recipe.model_validate(TINY).audio
    wave = np.random.default_rng(0).standard_normal(4 * 16000).astype(np.float32)
    specs = window_specs(wave, 16000, [0.0, 2.0, 4.0], 1.0, audio)
    expected = [tile_and_cut(wave[:8000], 1.0, 16000), wave[24000:40000], tile_and_cut(wave[56000:], 1.0, 16000)]
    reference = log_mel(np.stack(expected), 16000, n_fft=512, hop_length=956, n_mels=40)
    assert specs.shape == (3, 1, 40, 17)
    assert torch.equal(specs, reference)


def test_each_bad_file_is_reported_and_the_others_go_on(assets, tmp_path: Path) -> None:
    silent = write_clip(tmp_path / "silent.mp4", 1, audio=False)
    sound_only = tmp_path / "sound_only.m4a"
    with av.open(str(sound_only), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(assets["b"].read_bytes()[: assets["b"].stat().st_size // 2])
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video at all" * 100)
    short = write_clip(tmp_path / "short.mp4", 2, seconds=0.05)
    inputs = [assets["a"], silent, sound_only, truncated, garbage, short, tmp_path / "missing.mp4"]
    result = localize(assets["checkpoint"], inputs, Path("loc"))
    errors = {item.name: item.error for item in result.failed}
    assert errors == {
        "missing.mp4": f"{tmp_path / 'missing.mp4'}: no such file or folder",
        "silent": f"{silent}: no audio stream (streams: video); the model localises a sound: pass a video with "
                  f"sound, or --image FRAME --audio WAV",
        "sound_only": f"{sound_only}: no video stream (streams: audio); sslt localize needs pictures and sound: "
                      f"pass a video, or a still frame with --image and --audio",
        "truncated": f"{truncated}: truncated: the video stream ends at 1.50 s, before the frame at 2.00 s (the "
                     f"header states 4.00 s)",
        "garbage": errors["garbage"],
        "short": f"{short}: too short: the audio lasts 0.050 s, at least 0.1 s is needed"}
    assert errors["garbage"].startswith(f"{garbage}: unreadable: not a media file PyAV can open")
    assert sorted(p.name for p in Path("loc").iterdir()) == ["a", "index.html"]  # nothing left of the failed ones
    page = Path("loc/index.html").read_text()
    assert page.count('class="failed"') == 6 and page.count("<video") == 1


def test_cli_exits_1_listing_the_failed_inputs_after_doing_the_others(assets) -> None:
    result = CliRunner().invoke(app, ["localize", str(assets["checkpoint"]), str(assets["a"]), "nothere.mp4",
                                      "--out", "loc"], env=WIDE)
    assert result.exit_code == 1 and Path("loc/a/overlay.mp4").is_file()
    assert result.exception.render() == ("1 input(s) could not be localised (the others are in loc/index.html)\n"
                                         "  - nothere.mp4: no such file or folder")


def test_image_and_audio_pair_with_an_official_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    official = save_official_checkpoint(build_model(), tmp_path / "official.pth.tar")
    clip = moving_clip(0, 5, seconds=2.0)
    from PIL import Image
    import soundfile

    Image.fromarray(clip.frames[0]).save(tmp_path / "still.png")
    soundfile.write(tmp_path / "sound.wav", clip.audio, clip.sample_rate)
    result = localize(official, [], tmp_path / "loc", images=[tmp_path / "still.png"],
                      audios=[tmp_path / "sound.wav"])
    (item,) = result.inputs
    assert item.error is None and item.files["overlay"] == "still/overlay.png"
    assert Image.open(tmp_path / "loc" / "still" / "overlay.png").size == (384 + 72, 384)
    assert len(item.records) == 1 and "official SSL-TIE" in result.model
    assert result.calibration_note.startswith("uncalibrated: this checkpoint comes without a validation set")


def test_an_official_export_with_its_recipe_gives_the_same_maps_as_the_sslt_checkpoint(assets, tmp_path: Path) -> None:
    from sslt_cli.checkpoint import export_official

    export_official(assets["checkpoint"], tmp_path / "official.pth.tar")
    options = LocalizeOptions(fps=2.0, save_maps=True)
    ours = localize(assets["checkpoint"], [assets["b"]], Path("ours"), options=options)
    theirs = localize(tmp_path / "official.pth.tar", [assets["b"]], Path("theirs"), options=options,
                      recipe=Recipe.model_validate(TINY))
    assert "official SSL-TIE" in theirs.model
    mine, exported = load_maps("ours/b/maps.npz"), load_maps("theirs/b/maps.npz")
    assert sorted(mine) == sorted(exported) and len(mine) == 8
    assert all(np.allclose(mine[k], exported[k], atol=1e-5) for k in mine)
    assert [r.peak_x for r in ours.inputs[0].records] == [r.peak_x for r in theirs.inputs[0].records]


def test_calibration_from_the_run_validation_set_is_stored_and_reused(tmp_path: Path, assets) -> None:
    generate(Path("data"), n_train=0, n_val=6, n_test=0, n_flickr=0, workers=1, progress=False)
    recipe = Recipe.model_validate({**TINY, "data": {**TINY["data"], "val": "val"}})
    run = Run.create(recipe, runs_dir=tmp_path / "runs")
    state = torch.load(assets["checkpoint"], weights_only=True)
    run.save_checkpoint({**state, "recipe": recipe_dict(recipe)}, "best")
    video = write_clip(tmp_path / "short.mp4", 4, seconds=1.0)
    first = localize(run.dir, [video], Path("loc"))
    assert "computed and stored in" in first.calibration_note
    stored = json.loads((run.dir / "calibration.json").read_text())
    (entry,) = stored["entries"].values()
    assert entry["step"] == 7 and entry["n"] == 6 and len(entry["mismatched"]) == 6
    loaded = load_model(run.dir / "checkpoints" / "best.pt")
    again, note = calibration_for(loaded, run.dir, None, Path("elsewhere"), "cpu")
    assert note.startswith("calibrated on 6 matched and mismatched pairs of data/val (read from")
    rows = list(csv.DictReader(open("loc/short/localize.csv")))
    visible, _ = again.scores(np.array([float(r["max_cos"]) for r in rows]))
    assert [float(r["visible"]) for r in rows] == pytest.approx(list(visible))
    assert len(rows) == 2 and json.loads(Path("loc/short/localize.json").read_text())["calibration"]["n_pairs"] == 6
    # the calibration set's negative-audio figures: stored with it, shown on the page
    figures = entry["negatives"]
    assert figures["n"] == 6 and set(figures["kinds"]) == {"silence", "noise", "offscreen"}
    assert all(0.0 <= v["ap"] <= 1.0 and 0.0 <= v["pia"] <= 1.0 for v in figures["kinds"].values())
    assert again.negatives == figures
    page = Path("loc/index.html").read_text()
    assert "negative audio on the calibration set (6 clips with boxes" in page
    assert f"silence: AP {100 * figures['kinds']['silence']['ap']:.1f}" in page


def test_each_frame_reports_the_confidence_the_evaluation_uses(assets, tmp_path: Path) -> None:
    from sslt_cli import metrics
    from sslt_cli.evaluate import get_protocol

    localize(assets["checkpoint"], [assets["a"]], tmp_path / "loc", options=LocalizeOptions(fps=2.0, save_maps=True))
    rows = list(csv.DictReader(open(tmp_path / "loc" / "a" / "localize.csv")))
    maps = load_maps(tmp_path / "loc" / "a" / "maps.npz")
    stack = torch.from_numpy(np.stack([maps[k] for k in sorted(maps)]))
    up = metrics.upsample_maps(stack, get_protocol("ssltie").upsample)
    expected = metrics.slavc_confidence(up, (-1.0, 1.0)).numpy()
    assert [float(r["confidence"]) for r in rows] == pytest.approx(list(expected), abs=1e-9)
    assert "confidence" in (tmp_path / "loc" / "index.html").read_text()


def test_calibration_scores_are_mid_ranks_and_partners_have_another_label() -> None:
    calibration = Calibration(np.array([0.2, 0.4, 0.6, 0.8]), np.array([0.1, 0.2, 0.3, 0.4]), "set", 1)
    visible, matched = calibration.scores(np.array([0.05, 0.3, 0.5, 0.9]))
    assert list(visible) == [0.0, 0.625, 1.0, 1.0]
    assert list(matched) == [0.0, 0.25, 0.5, 1.0]
    clips = [Clip(id=str(i), label=label) for i, label in enumerate("aabbaa")]
    partners = mismatched_partners(clips)
    assert all(clips[j].label != clips[i].label for i, j in enumerate(partners)) and partners[2] == 5


def test_image_without_audio_is_a_usage_error(assets) -> None:
    result = CliRunner().invoke(app, ["localize", str(assets["checkpoint"]), "--image", "x.png"], env=WIDE)
    assert result.exit_code == 1
    assert result.exception.render() == "--image and --audio come in pairs: got 1 --image and 0 --audio"


# --- the page: file names that are not plain, a second run into the same folder (issue 22) ------------------------

def page_links(page: Path) -> list[str]:
    """Every src and href on the page, as the browser reads them (HTML entities decoded)."""
    from html.parser import HTMLParser

    links: list[str] = []

    class Links(HTMLParser):
        def handle_starttag(self, tag, attrs):
            links.extend(value for name, value in attrs if name in ("src", "href") and value is not None)

    Links().feed(page.read_text())
    return links


def test_page_links_to_files_named_with_hash_percent_spaces_and_quotes_resolve_to_the_files(
        assets, tmp_path: Path) -> None:
    import shutil
    from urllib.parse import unquote, urlsplit

    hostile = []
    for name in ("take #1.mp4", "100% \"loud\" it's.mp4", "a&b%23c.mp4"):
        hostile.append(tmp_path / name)
        shutil.copy(assets["a"], hostile[-1])
    result = localize(assets["checkpoint"], hostile, tmp_path / "loc", options=LocalizeOptions(save_maps=True))
    assert [item.error for item in result.inputs] == [None, None, None]
    links = page_links(result.page)
    assert len(links) == 3 * 6  # per input: the video, contact sheet, plot, and the csv, json and maps links
    for link in links:
        parts = urlsplit(link)  # how a browser resolves it against the page: no fragment, no query cut off
        assert (parts.scheme, parts.netloc, parts.query, parts.fragment) == ("", "", "", ""), link
        assert (tmp_path / "loc" / unquote(parts.path)).is_file(), link
    targets = {unquote(urlsplit(link).path) for link in links}
    assert targets == {path for item in result.inputs for path in item.files.values()}


def test_a_second_localize_into_the_same_folder_adds_to_the_page_and_numbers_a_taken_name(
        assets, tmp_path: Path) -> None:
    out = tmp_path / "loc"
    first = localize(assets["checkpoint"], [assets["a"]], out)
    kept = (out / "a" / "localize.json").read_bytes()
    said: list[str] = []
    second = localize(assets["checkpoint"], [assets["a"], assets["b"]], out, report=said.append)
    assert [item.name for item in second.inputs] == ["a-2", "b"]
    assert (out / "a" / "localize.json").read_bytes() == kept  # the first run's outputs are untouched
    assert {p.name for p in out.iterdir() if p.is_dir()} >= {"a", "a-2", "b"}
    assert (f"{out} already holds the outputs of 1 input(s) of 1 earlier `sslt localize` run(s): this run's are "
            "added to its page (index.html), nothing is overwritten") in said
    assert f"{assets['a']}: written as a-2/ (a/ is taken)" in said
    page = second.page.read_text()
    assert [h for h in ("<h2>a</h2>", "<h2>a-2</h2>", "<h2>b</h2>") if h in page] == ["<h2>a</h2>", "<h2>a-2</h2>",
                                                                                      "<h2>b</h2>"]
    assert f"{assets['a']} (run 1)" in page and f"{assets['a']} (run 2)" in page
    assert page.count("run 1: model: ") == page.count("run 2: model: ") == 1
    assert {link.split("/")[0] for link in page_links(second.page)} == {"a", "a-2", "b"}
    assert first.page == second.page


# --- the sound decoded as the frames need it (issue 22: memory bounded by the batch, whatever the length) ----------

def write_noise_video(path: Path, seconds: float, rate: int, channels: int, tone: bool = False) -> Path:
    """A 32 px video at 2 frames/s with ``seconds`` of noise (or of a 440 Hz tone whose loudness changes every
    second, which AAC keeps) at ``rate`` Hz, ``channels`` channels."""
    frames = np.zeros((int(seconds * 2), 32, 32, 3), np.uint8)
    n = int(seconds * rate)
    if tone:
        t = np.arange(n) / rate
        sound = np.tile((0.1 + 0.05 * (np.floor(t) % 5)) * np.sin(2 * np.pi * 440 * t), (channels, 1))
    else:
        sound = np.random.default_rng(1).uniform(-0.5, 0.5, (channels, n))
    return write_video(path, frames, 2.0, sound.astype(np.float32), rate)


@pytest.mark.parametrize(("rate", "channels"), [(48000, 2), (44100, 1), (16000, 1)])
def test_windows_decoded_as_the_frames_need_them_equal_those_of_the_whole_track(tmp_path: Path, rate: int,
                                                                                channels: int) -> None:
    from sslt_cli.audio import resample
    from sslt_cli.localize import StreamingWave
    from sslt_cli.media import AudioChunks

    audio = Recipe.model_validate(TINY).audio  # 16 kHz, 1 s windows
    path = write_noise_video(tmp_path / "noise.mp4", 20.0, rate, channels)
    samples, native = read_audio(path)
    whole = resample(torch.from_numpy(samples.mean(axis=0)), native, 16000).numpy()
    times = sample_times(20.0, 2.0) + [20.2, 21.0]  # the last two: after the sound ends
    with AudioChunks(path) as chunks:
        wave = StreamingWave(chunks, 16000)
        for first in range(0, len(times), 8):
            batch = times[first:first + 8]
            streamed = wave.specs(batch, 1.0, audio)
            expected = window_specs(whole, 16000, batch, 1.0, audio)
            assert torch.allclose(streamed, expected, atol=1e-3, rtol=1e-4), f"frames at {batch}"
    assert chunks.ended and chunks.position == samples.shape[1]
    # at most a decoded block with its resampling context and the windows of a batch, never the whole track
    bound = StreamingWave.BLOCK + 2 * wave.context + (8 * 0.5 + 1.0) * 16000 * 2
    assert wave.held_max <= bound < samples.shape[1] * channels


def test_the_overlay_video_carries_the_whole_sound_written_as_it_streams(tmp_path: Path, assets) -> None:
    path = write_noise_video(tmp_path / "long.mp4", 12.0, 48000, 2, tone=True)
    result = localize(assets["checkpoint"], [path], tmp_path / "loc", options=LocalizeOptions(fps=1.0))
    assert result.inputs[0].error is None and result.inputs[0].notes == []
    written, rate = read_audio(tmp_path / "loc" / "long" / "overlay.mp4")
    original, _ = read_audio(path)
    assert rate == 48000 and written.shape == original.shape == (2, 12 * 48000)
    envelope = [np.sqrt(np.mean(s.reshape(2, 24, -1) ** 2, axis=2)) for s in (written, original)]
    assert np.allclose(*envelope, rtol=0.05)
