"""AudioVisualDataset on tiny generated sets: items, determinism per (seed, epoch, index), bad clips, cache, T_mix."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from sslt_cli import audio as audio_lib
from sslt_cli.data.augment import build_eval_transform, build_image_transform, spec_augment
from sslt_cli.config import AudioConfig
from sslt_cli.data.datasets import AudioVisualDataset, BadClip, collate_skip_bad, precheck_clips
from sslt_cli.data.manifest import Clip, layout_paths, read_set, write_set

AUDIO = AudioConfig(sample_rate=8000, clip_seconds=1.0, n_fft=256, hop_length=128, n_mels=32, normalized=True)
FRAMES = 1 + 8000 // 128


def tone(seconds: float, rate: int, hz: float, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def make_set(root, n: int = 4, **files) -> list[Clip]:
    """A vggsound_train set of n clips: textured 48x40 JPEG frames, 0.6 s tones at 8 kHz; read back via read_set."""
    rng = np.random.default_rng(0)
    clips = []
    for i in range(n):
        clip_id = f"clip{i:02d}_000010"
        frame, wav, _ = layout_paths("vggsound_train", clip_id)
        (root / frame).parent.mkdir(parents=True, exist_ok=True)
        (root / wav).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / frame, quality=95)
        soundfile.write(root / wav, tone(0.6, 8000, 300 + 200 * i), 8000)
        clips.append(Clip(id=clip_id, label=f"class{i % 2}", frame=frame, audio=wav))
    write_set(root, "vggsound_train", clips)
    return read_set(root).clips


def train_dataset(clips, **kwargs) -> AudioVisualDataset:
    options = dict(image_transform=build_image_transform(32, app=True, geo=True), n_views=2, audio=AUDIO,
                   spec_augment=None, train=True, seed=4)
    options.update(kwargs)
    return AudioVisualDataset(clips, **options)


def expected_log_mel(path, seconds=None) -> torch.Tensor:
    wave, _ = audio_lib.load_waveform(path, AUDIO.sample_rate)
    if seconds is not None:
        wave = wave[: int(seconds * AUDIO.sample_rate)]
    wave = audio_lib.tile_and_cut(wave, AUDIO.clip_seconds, AUDIO.sample_rate)
    return audio_lib.log_mel(wave, AUDIO.sample_rate, n_fft=AUDIO.n_fft, hop_length=AUDIO.hop_length,
                             n_mels=AUDIO.n_mels, normalized=AUDIO.normalized)[0]


def test_training_item_holds_views_of_the_right_shape(tmp_path):
    clips = make_set(tmp_path)
    item = train_dataset(clips)[1]
    assert item["index"] == 1 and item["id"] == "clip01_000010"
    assert item["images"].shape == (2, 3, 32, 32) and item["images"].dtype == torch.float32
    assert item["specs"].shape == (2, 1, 32, FRAMES)
    assert not torch.allclose(item["images"][0], item["images"][1])  # independent draws
    torch.testing.assert_close(item["specs"][0], expected_log_mel(clips[1].audio))
    single = train_dataset(clips, n_views=1)[1]
    assert single["images"].shape == (1, 3, 32, 32) and single["specs"].shape == (1, 1, 32, FRAMES)


def test_eval_item_and_audio_only_item(tmp_path):
    clips = make_set(tmp_path)
    dataset = AudioVisualDataset(clips, image_transform=build_eval_transform(32, "resize_centercrop"), n_views=1,
                                 audio=AUDIO.model_dump(), train=False, seed=0)
    item = dataset[2]
    assert set(item) == {"index", "id", "image", "spec"}
    expected_image = build_eval_transform(32, "resize_centercrop")(Image.open(clips[2].frame).convert("RGB"))
    torch.testing.assert_close(item["image"], expected_image)
    torch.testing.assert_close(item["spec"], expected_log_mel(clips[2].audio))
    audio_only = AudioVisualDataset(clips, image_transform=None, audio=AUDIO, train=False)[0]
    assert set(audio_only) == {"index", "id", "spec"}
    with pytest.raises(ValueError, match="n_views must be"):
        AudioVisualDataset(clips, image_transform=None, n_views=2, audio=AUDIO, train=False)


def test_items_depend_only_on_seed_epoch_and_index(tmp_path):
    clips = make_set(tmp_path)
    mask = dict(p=1.0, time=20, freq=8)
    dataset = train_dataset(clips, spec_augment=mask)
    first = dataset[0]
    dataset[1], dataset[3]  # other items in between change nothing
    again = dataset[0]
    torch.testing.assert_close(first["images"], again["images"])
    torch.testing.assert_close(first["specs"], again["specs"])
    torch.testing.assert_close(train_dataset(clips, spec_augment=mask)[0]["images"], first["images"])
    dataset.set_epoch(1)
    assert not torch.allclose(dataset[0]["images"], first["images"])
    assert not torch.allclose(dataset[0]["specs"], first["specs"])
    assert not torch.allclose(train_dataset(clips, spec_augment=mask, seed=5)[0]["images"], first["images"])


def test_workers_reproduce_the_main_process_and_follow_set_epoch(tmp_path):
    clips = make_set(tmp_path)
    dataset = train_dataset(clips, spec_augment=dict(p=1.0, time=20, freq=8))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, persistent_workers=True,
                                         collate_fn=collate_skip_bad)
    for epoch in (0, 3):
        dataset.set_epoch(epoch)
        batches = list(loader)
        expected = [dataset[i] for i in range(len(dataset))]
        images = torch.cat([b["images"] for b in batches])
        torch.testing.assert_close(images, torch.stack([e["images"] for e in expected]))
        torch.testing.assert_close(torch.cat([b["specs"] for b in batches]),
                                   torch.stack([e["specs"] for e in expected]))
        assert [i for b in batches for i in b["id"]] == [c.id for c in clips]
        assert all(b["skipped"] == [] for b in batches)


def test_bad_clips_are_skipped_with_reasons(tmp_path):
    clips = make_set(tmp_path, n=6)
    (tmp_path / "total_video_frames/clip01_000010/125.jpg").write_bytes(b"not a jpeg at all")
    data = (tmp_path / "total_video_frames/clip02_000010/125.jpg").read_bytes()
    (tmp_path / "total_video_frames/clip02_000010/125.jpg").write_bytes(data[: len(data) // 2])
    soundfile.write(tmp_path / "total_video_3s_audio/clip03_000010.wav", np.zeros(0, dtype=np.float32), 8000)
    (tmp_path / "total_video_3s_audio/clip04_000010.wav").write_bytes(b"RIFF garbage")
    dataset = train_dataset(clips)
    assert isinstance(dataset[1], BadClip) and dataset[1].id == "clip01_000010"
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=1, collate_fn=collate_skip_bad)
    batches = list(loader)
    assert [b["id"] for b in batches if "id" in b] == [["clip00_000010"], ["clip05_000010"]]
    assert batches[0]["images"].shape[0] == 1
    skipped = dict(s for b in batches for s in b["skipped"])
    assert sorted(skipped) == ["clip01_000010", "clip02_000010", "clip03_000010", "clip04_000010"]
    frame1 = tmp_path / "total_video_frames/clip01_000010/125.jpg"
    assert skipped["clip01_000010"].startswith(f"unreadable frame {frame1}: cannot identify image file")
    assert skipped["clip02_000010"].startswith("unreadable frame ") and "truncated" in skipped["clip02_000010"]
    assert skipped["clip03_000010"].endswith("clip03_000010.wav: 0 samples")
    assert "clip04_000010.wav: not a sound file" in skipped["clip04_000010"]
    all_bad = collate_skip_bad([dataset[1], dataset[3]])
    assert all_bad == {"skipped": [("clip01_000010", dataset[1].reason), ("clip03_000010", dataset[3].reason)]}


def test_precheck_finds_missing_and_empty_files(tmp_path):
    clips = make_set(tmp_path, n=4)
    (tmp_path / "total_video_frames/clip00_000010/125.jpg").unlink()
    (tmp_path / "total_video_3s_audio/clip02_000010.wav").write_bytes(b"")
    no_audio = Clip(id="x_000001", frame=clips[1].frame, audio="")
    good, bad = precheck_clips(clips + [no_audio])
    assert [c.id for c in good] == ["clip01_000010", "clip03_000010"]
    assert bad == [
        ("clip00_000010", f"missing frame file {tmp_path}/total_video_frames/clip00_000010/125.jpg"),
        ("clip02_000010", f"empty audio file {tmp_path}/total_video_3s_audio/clip02_000010.wav (0 bytes)"),
        ("x_000001", "no audio file in the manifest"),
    ]


def test_stereo_44k_audio_is_downmixed_and_resampled(tmp_path):
    clips = make_set(tmp_path, n=2)
    soundfile.write(clips[0].audio, tone(0.5, 44100, 440, channels=2), 44100)
    item = AudioVisualDataset(clips, image_transform=None, audio=AUDIO, train=False)[0]
    assert item["spec"].shape == (1, 32, FRAMES)
    # The 440 Hz tone lands in the mel band around 440 Hz, not elsewhere.
    energy = item["spec"][0].mean(dim=1)
    centres = audio_lib.mel_filterbank(AUDIO.n_fft // 2 + 1, 0.0, 4000.0, 32, 8000).argmax(dim=0) * (4000 / 128)
    assert abs(float(centres[energy.argmax()]) - 440) < 120


def test_source_seconds_keeps_the_start_of_the_file(tmp_path):
    clips = make_set(tmp_path, n=1)
    wave = np.concatenate([tone(0.3, 8000, 500), tone(0.3, 8000, 2500)])
    soundfile.write(clips[0].audio, wave, 8000)
    item = AudioVisualDataset(clips, image_transform=None, audio=AUDIO, train=False, source_seconds=0.3)[0]
    torch.testing.assert_close(item["spec"], expected_log_mel(clips[0].audio, seconds=0.3))
    full = AudioVisualDataset(clips, image_transform=None, audio=AUDIO, train=False)[0]
    assert not torch.allclose(item["spec"], full["spec"])


def test_cache_is_written_once_and_gives_the_same_spectrogram(tmp_path):
    clips = make_set(tmp_path / "set", n=3)
    cache = tmp_path / "cache"
    mask = dict(p=0.8, time=20, freq=8)
    cached = train_dataset(clips, cache_dir=cache, spec_augment=mask)
    plain = train_dataset(clips, spec_augment=mask)
    for index in range(3):
        torch.testing.assert_close(cached[index]["specs"], plain[index]["specs"])
    files = sorted(cache.glob("*.npy"))
    assert len(files) == 3 and files[0].name.startswith("clip00_000010.")
    mtimes = [f.stat().st_mtime_ns for f in files]
    torch.testing.assert_close(cached[0]["specs"], plain[0]["specs"])  # read from the cache this time
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert not list(cache.glob(".*.tmp"))
    # Other front-end settings never read these files.
    other = AudioVisualDataset(clips, image_transform=None, audio=AUDIO.model_copy(update={"n_mels": 16}),
                               train=False, cache_dir=cache)[0]
    assert other["spec"].shape == (1, 16, FRAMES) and len(list(cache.glob("*.npy"))) == 4
    # A re-prepared audio file gets a new cache entry.
    soundfile.write(clips[1].audio, tone(0.6, 8000, 1234), 8000)
    fresh = AudioVisualDataset(clips, image_transform=None, audio=AUDIO, train=False, cache_dir=cache)[1]["spec"]
    torch.testing.assert_close(fresh, expected_log_mel(clips[1].audio))
    assert len(list(cache.glob("clip01_000010.*.npy"))) == 2


def test_masking_the_db_spectrogram_equals_masking_the_power_first():
    power = torch.rand(1, 32, 70) ** 4
    silence = float(audio_lib.power_to_db(torch.zeros(())))
    for seed in range(5):
        official = audio_lib.power_to_db(spec_augment(power, torch.Generator().manual_seed(seed), p=1.0,
                                                      time_mask=30, freq_mask=10))
        ours = spec_augment(audio_lib.power_to_db(power), torch.Generator().manual_seed(seed), p=1.0, time_mask=30,
                            freq_mask=10, fill=silence)
        assert torch.equal(official, ours)


def test_t_mix_mixes_with_the_partner_and_reaches_running_workers(tmp_path):
    clips = make_set(tmp_path, n=4)
    dataset = train_dataset(clips, n_views=1)
    unmixed = dataset[0]["specs"][0]
    # k = 90 gives p = 1.0 and a = 0.9: every view is mixed, mostly with the partner.
    dataset.set_mix(np.array([2, 3, 0, 1]), 90)
    own, _ = audio_lib.load_waveform(clips[0].audio, 8000)
    partner, _ = audio_lib.load_waveform(clips[2].audio, 8000)
    mixed = audio_lib.tile_and_cut(0.1 * own + 0.9 * partner, 1.0, 8000)
    expected = audio_lib.log_mel(mixed, 8000, n_fft=256, hop_length=128, n_mels=32)[0]
    torch.testing.assert_close(dataset[0]["specs"][0], expected, atol=1e-3, rtol=1e-4)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1, persistent_workers=True,
                                         collate_fn=collate_skip_bad)
    torch.testing.assert_close(next(iter(loader))["specs"][0, 0], expected, atol=1e-3, rtol=1e-4)
    dataset.set_mix(None, 0)
    torch.testing.assert_close(next(iter(loader))["specs"][0, 0], unmixed)
    # -1 means "no partner"; a small k mixes only some items, decided per (seed, epoch, index).
    dataset.set_mix(np.array([-1, 3, 0, 1]), 90)
    torch.testing.assert_close(dataset[0]["specs"][0], unmixed)
    with pytest.raises(ValueError, match="3 entries for 4 clips"):
        dataset.set_mix(np.array([1, 2, 3]), 1)


def test_mixing_probability_follows_the_curriculum(tmp_path):
    clips = make_set(tmp_path, n=2)
    dataset = train_dataset(clips, n_views=1, image_transform=None, mix_neighbours=np.array([1, 0]), mix_k=40)
    unmixed = AudioVisualDataset(clips, image_transform=None, audio=AUDIO, train=False)[0]["spec"]
    mixed = 0
    for epoch in range(60):
        dataset.set_epoch(epoch)
        mixed += not torch.allclose(dataset[0]["specs"][0], unmixed)
    assert 0.3 < mixed / 60 < 0.7  # p = 0.1 + 0.01 * 40 = 0.5


def test_shared_geometry_views_differ_only_in_appearance(tmp_path):
    clips = make_set(tmp_path, n=1)
    geo_only = build_image_transform(32, app=False, geo=True)
    shared = train_dataset(clips, image_transform=geo_only, shared_geometry=True)[0]["images"]
    torch.testing.assert_close(shared[0], shared[1])
    independent = train_dataset(clips, image_transform=geo_only)[0]["images"]
    assert not torch.allclose(independent[0], independent[1])
    both = train_dataset(clips, image_transform=build_image_transform(32, app=True, geo=True, jitter_p=1.0),
                         shared_geometry=True)[0]["images"]
    assert not torch.allclose(both[0], both[1])
    with pytest.raises(ValueError, match="shared_geometry needs an ImageTransform"):
        train_dataset(clips, image_transform=build_eval_transform(32, "resize_square"), shared_geometry=True)
