"""Negative audio construction: silence, seeded noise (level, colour), offscreen draws of another class (both
classes of a two-object frame excluded), every draw recorded and reproducible, one clear error without labels."""
from __future__ import annotations

import numpy as np
import pytest

from sslt_cli.data import negatives as NG
from sslt_cli.data.manifest import Clip
from sslt_cli.errors import DataError


def clips_of(labels: dict[str, str]) -> list[Clip]:
    return [Clip(id=cid, label=label, frame=f"/f/{cid}.jpg", audio=f"/a/{cid}.wav") for cid, label in labels.items()]


def test_silence_is_zeros_and_noise_has_the_stated_level():
    assert not NG.silence_waveform(100).any()
    white = NG.noise_waveform(160000, seed=5, level=0.1)
    assert white.dtype == np.float32 and white.std() == pytest.approx(0.1, rel=0.01)
    np.testing.assert_array_equal(white, NG.noise_waveform(160000, seed=5, level=0.1))  # seeded
    assert not np.array_equal(white, NG.noise_waveform(160000, seed=6, level=0.1))
    pink = NG.noise_waveform(160000, seed=5, level=0.1, colour="pink")
    assert pink.std() == pytest.approx(0.1, rel=1e-3)
    power = np.abs(np.fft.rfft(pink.astype(np.float64))) ** 2
    low, high = power[10:1000].mean(), power[50000:60000].mean()
    assert low > 30 * high  # power falls as 1/f: about 50 times lower at 55 kHz-bins than at 0.5 kHz-bins
    white_power = np.abs(np.fft.rfft(white.astype(np.float64))) ** 2
    assert white_power[10:1000].mean() == pytest.approx(white_power[50000:60000].mean(), rel=0.2)


def test_settings_are_checked():
    with pytest.raises(DataError, match="unknown negative audio hum"):
        NG.NegativeSettings(("silence", "hum"))
    with pytest.raises(DataError, match="--draws must be at least 1"):
        NG.NegativeSettings(("noise",), draws=0)
    with pytest.raises(DataError, match="unknown noise colour 'blue'"):
        NG.NegativeSettings(("noise",), noise_colour="blue")
    with pytest.raises(DataError, match="--noise-level must be a positive number"):
        NG.NegativeSettings(("noise",), noise_level=0)


def test_offscreen_draws_another_class_and_exclude_both_classes_of_a_two_object_frame():
    labels = {"a1": "dog", "a2": "dog", "b1": "cat", "c1": "car", "c2": "car", "d1": "drum"}
    clips = clips_of(labels)
    scenes = {"a1": frozenset({"dog", "cat"})}  # a two-object frame: a dog and a cat
    on_screen, audio_class = NG.clip_classes(clips, scenes=scenes)
    for draw in range(20):
        found, missing = NG.offscreen_draws(clips, on_screen, audio_class, seed=1, draw=draw)
        assert not missing and [d.clip_id for d in found] == list(labels)
        for d in found:
            assert d.partner_class == labels[d.partner] and d.partner_class not in on_screen[d.clip_id]
            assert d.kind == "offscreen" and d.draw == draw and d.seed is not None
        assert found[0].partner_class not in ("dog", "cat")
    again, _ = NG.offscreen_draws(clips, on_screen, audio_class, seed=1, draw=3)
    assert again == NG.offscreen_draws(clips, on_screen, audio_class, seed=1, draw=3)[0]  # reproducible
    chosen = {d.partner for draw in range(30) for d in NG.offscreen_draws(clips, on_screen, audio_class, 1, draw)[0]}
    assert chosen == set(labels)  # every clip is somebody's partner over draws


def test_a_frame_whose_classes_cover_every_class_gets_no_offscreen_draw_and_says_why():
    clips = clips_of({"x": "dog", "y": "cat", "z": ""})
    on_screen, audio_class = NG.clip_classes(clips, scenes={"x": frozenset({"dog", "cat"})})
    found, missing = NG.offscreen_draws(clips, on_screen, audio_class, seed=0, draw=0)
    assert [d.clip_id for d in found] == ["y"]
    assert missing == [("x", "offscreen: no clip of a class other than cat, dog"),
                       ("z", "offscreen: the clip has no class, so no class can be excluded")]


def test_offscreen_without_labels_is_one_clear_error():
    with pytest.raises(DataError) as info:
        NG.clip_classes(clips_of({"x": "", "y": ""}), set_name="test_vggss")
    assert info.value.message == ("offscreen negatives need each clip's class, and test_vggss has none: its manifest "
                                  "has no label column values")
    assert "pass --labels FILE" in info.value.render()
    with pytest.raises(DataError, match="neither the labels file nor its manifest names a class of its clips"):
        NG.clip_classes(clips_of({"x": ""}), labels={"other": "cat"})


def test_a_labels_file_overrides_the_manifest_labels_and_the_manifest_fills_its_gaps():
    on_screen, audio_class = NG.clip_classes(clips_of({"x": "dog", "y": "dog", "z": "car"}),
                                             labels={"x": "dog", "y": "cat"})
    assert audio_class == {"x": "dog", "y": "cat", "z": "car"} and on_screen["y"] == frozenset({"cat"})


def test_plan_draws_records_every_draw_and_silence_once():
    clips = clips_of({"a": "dog", "b": "cat", "c": "car"})
    settings = NG.NegativeSettings(("silence", "noise", "offscreen"), draws=3, seed=7)
    draws, missing = NG.plan_draws(clips, settings, NG.clip_classes(clips))
    kinds = [(d.kind, d.draw) for d in draws]
    assert kinds.count(("silence", 0)) == 3 and not any(k == "silence" and i > 0 for k, i in kinds)
    assert sum(1 for k, _ in kinds if k == "noise") == 9 and sum(1 for k, _ in kinds if k == "offscreen") == 9
    noise_seeds = [d.seed for d in draws if d.kind == "noise"]
    assert len(set(noise_seeds)) == 9 and not missing
    assert draws == NG.plan_draws(clips, settings, NG.clip_classes(clips))[0]
    other = NG.plan_draws(clips, NG.NegativeSettings(("noise",), draws=3, seed=8))[0]
    assert {d.seed for d in other}.isdisjoint(noise_seeds)


def test_scenes_round_trip(tmp_path):
    path = NG.write_scenes(tmp_path / "scenes.csv", {"a": ["dog", "cat"], "b": ["car"]})
    assert path.read_text() == "clip_id,on_screen_classes\na,cat;dog\nb,car\n"
    assert NG.read_scenes(path) == {"a": frozenset({"dog", "cat"}), "b": frozenset({"car"})}
    (tmp_path / "bad.csv").write_text("id,classes\na,dog\n")
    with pytest.raises(DataError, match="expected the columns clip_id,on_screen_classes"):
        NG.read_scenes(tmp_path / "bad.csv")
