"""Audio front end: mel filterbank, log-mel, resampling, loading and tiling against hand values and naive references."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import soundfile
import torch

from sslt_cli.audio import load_waveform, log_mel, mel_filterbank, mel_power, power_to_db, resample, tile_and_cut
from sslt_cli.errors import DataError

torch.set_num_threads(1)


def htk_filterbank_reference(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int) -> np.ndarray:
    """Float64 loops straight from the definition: bin b at b * (sr // 2) / (n_freqs - 1) Hz, triangles between
    mel-equispaced edges."""
    def to_mel(hz: float) -> float:
        return 2595.0 * math.log10(1.0 + hz / 700.0)

    def to_hz(mel: float) -> float:
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)

    low, high = to_mel(f_min), to_mel(f_max)
    edges = [to_hz(low + (high - low) * i / (n_mels + 1)) for i in range(n_mels + 2)]
    out = np.zeros((n_freqs, n_mels))
    for m in range(n_mels):
        left, peak, right = edges[m], edges[m + 1], edges[m + 2]
        for b in range(n_freqs):
            hz = (sample_rate // 2) * b / (n_freqs - 1)
            if left < hz <= peak:
                out[b, m] = (hz - left) / (peak - left)
            elif peak < hz < right:
                out[b, m] = (right - hz) / (right - peak)
    return out


def log_mel_reference(x: np.ndarray, sample_rate: int, n_fft: int, hop: int, n_mels: int) -> np.ndarray:
    """numpy: reflect-pad by n_fft/2, periodic Hann frames, rfft, |X|^2 / sum(w^2), mel, 10 log10 -> (n_mels, T)."""
    padded = np.pad(x.astype(np.float64), n_fft // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    n_frames = 1 + len(x) // hop
    frames = np.stack([padded[t * hop:t * hop + n_fft] * window for t in range(n_frames)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2 / np.sum(window ** 2)
    mel = power @ htk_filterbank_reference(n_fft // 2 + 1, 0.0, sample_rate // 2, n_mels, sample_rate)
    return 10 * np.log10(np.maximum(mel, 1e-10)).T


def resample_reference(x: np.ndarray, orig: int, new: int, zero_crossings: int = 6, rolloff: float = 0.99) -> np.ndarray:
    """Direct sum in seconds: y(n / new) = sum_k x[k] h(n / new - k / orig), h a Hann-windowed ideal low-pass."""
    cutoff_hz = min(orig, new) / 2 * rolloff
    k = np.arange(len(x))
    out = []
    for n in range(math.ceil(len(x) * new / orig)):
        crossings = 2 * cutoff_hz * (n / new - k / orig)
        taps = (2 * cutoff_hz / orig) * np.sinc(crossings) * np.cos(np.pi * crossings / (2 * zero_crossings)) ** 2
        out.append(np.dot(x, np.where(np.abs(crossings) <= zero_crossings, taps, 0.0)))
    return np.array(out)


# --- mel filterbank -------------------------------------------------------------------------------------------------

def test_filterbank_matches_definition_and_official_size_has_28_empty_filters():
    fb = mel_filterbank(257, 0.0, 8000.0, 257, 16000)
    assert fb.shape == (257, 257) and fb.dtype == torch.float32
    np.testing.assert_allclose(fb.numpy(), htk_filterbank_reference(257, 0.0, 8000.0, 257, 16000), atol=1e-4)
    empty = (fb.sum(dim=0) == 0).nonzero().flatten().tolist()
    assert len(empty) == 28
    # Low bands narrower than the 31.25 Hz bin spacing, between two bins: band 81 spans 844.2-874.6 Hz, and the
    # bins sit at 843.75 and 875 Hz.
    assert empty[:4] == [0, 1, 2, 5] and empty[-1] == 81

    small = mel_filterbank(201, 20.0, 7000.0, 40, 16000)
    np.testing.assert_allclose(small.numpy(), htk_filterbank_reference(201, 20.0, 7000.0, 40, 16000), atol=1e-5)


def test_filterbank_hand_values():
    # Slaney's scale is linear below 1 kHz: bins at 0..4 Hz and edges at 0, 1, 2, 3, 4 Hz give unit spikes.
    spikes = mel_filterbank(5, 0.0, 4.0, 3, 8, mel_scale="slaney")
    np.testing.assert_allclose(spikes.numpy(), [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]], atol=1e-6)
    one = mel_filterbank(5, 0.0, 4.0, 1, 8, mel_scale="slaney")
    np.testing.assert_allclose(one[:, 0].numpy(), [0, 0.5, 1, 0.5, 0], atol=1e-6)
    area = mel_filterbank(5, 0.0, 4.0, 1, 8, norm="slaney", mel_scale="slaney")
    np.testing.assert_allclose(area[:, 0].numpy(), [0, 0.25, 0.5, 0.25, 0], atol=1e-6)  # x 2 / (4 Hz - 0 Hz)

    # HTK: 1000 Hz is ~1000 mel (2595 log10(1 + 1000/700) = 999.99). One band from 0 to 2000 mel peaks at 1000 mel,
    # i.e. at 1000.03 Hz; with 1 Hz bins (sr 20000, 10001 bins) that is bin 1000 with weight 1 - 0.03/width.
    top_hz = 700.0 * (10 ** (2000.0 / 2595.0) - 1.0)
    band = mel_filterbank(10001, 0.0, top_hz, 1, 20000)[:, 0]
    assert int(band.argmax()) == 1000
    assert band[1000].item() == pytest.approx(1.0, abs=1e-4)
    assert band[0].item() == 0.0 and band[int(top_hz) + 1].item() == 0.0


def test_filterbank_rows_sum_to_one_between_first_and_last_peak():
    # Neighbouring triangles share edges, so between the first and the last peak the weights of a bin add to 1.
    fb = mel_filterbank(257, 0.0, 8000.0, 40, 16000)
    hz = torch.linspace(0, 8000, 257)
    top_mel = 2595.0 * math.log10(1.0 + 8000.0 / 700.0)
    first_peak, last_peak = (700.0 * (10 ** (top_mel * i / 41 / 2595.0) - 1.0) for i in (1, 40))
    inside = (hz >= first_peak) & (hz <= last_peak)
    assert int(inside.sum()) > 200
    np.testing.assert_allclose(fb[inside].sum(dim=1).numpy(), 1.0, atol=1e-5)


# --- log-mel ---------------------------------------------------------------------------------------------------------

def test_log_mel_shape_for_ten_seconds_and_batch():
    wave = torch.randn(3, 160000)
    spec = log_mel(wave, 16000)
    assert spec.shape == (3, 1, 257, 1 + 160000 // 239) == (3, 1, 257, 670)
    single = log_mel(wave[1], 16000)
    assert single.shape == (1, 1, 257, 670)
    torch.testing.assert_close(single[0], spec[1])
    # The 28 empty filters give rows of silence (-100 dB) whatever the input.
    assert int((spec[0, 0] == -100.0).all(dim=1).sum()) == 28


def test_log_mel_matches_numpy_reference():
    rng = np.random.default_rng(0)
    wave = rng.standard_normal(4000).astype(np.float32)
    for n_mels in (64, 257):
        ours = log_mel(torch.from_numpy(wave), 16000, n_mels=n_mels)[0, 0].numpy()
        np.testing.assert_allclose(ours, log_mel_reference(wave, 16000, 512, 239, n_mels), atol=2e-3)


def test_mel_power_of_a_bin_centred_tone_by_hand():
    # A tone on bin k of a periodic-Hann STFT: |X[k]| = A n/4 and |X[k +- 1]| = A n/8; window-normalised power
    # divides by sum(w^2) = 3n/8, so P[k] = A^2 n/6 and P[k +- 1] = A^2 n/24.
    n, k, amp, sr = 512, 40, 0.5, 16000
    t = np.arange(8000)
    wave = torch.tensor(amp * np.cos(2 * np.pi * k * t / n), dtype=torch.float32)
    fb = mel_filterbank(n // 2 + 1, 0.0, sr // 2, 64, sr)
    expected = fb[k] * amp ** 2 * n / 6 + (fb[k - 1] + fb[k + 1]) * amp ** 2 * n / 24
    middle = mel_power(wave, sr, n_mels=64)[0, 0, :, 15]
    torch.testing.assert_close(middle, expected, rtol=1e-3, atol=1e-6)
    raw = mel_power(wave, sr, n_mels=64, normalized=False)[0, 0, :, 15]
    torch.testing.assert_close(raw, middle * (3 * n / 8), rtol=1e-4, atol=1e-4)


def test_power_to_db_known_values():
    power = torch.tensor([1.0, 100.0, 1e-3, 0.0, 1e-12])
    torch.testing.assert_close(power_to_db(power), torch.tensor([0.0, 20.0, -30.0, -100.0, -100.0]))


def test_log_mel_rejects_a_waveform_shorter_than_half_a_window():
    with pytest.raises(DataError) as err:
        log_mel(torch.zeros(200), 16000)
    assert err.value.message == ("waveform has 200 samples; a spectrogram with n_fft=512 needs more than 256 "
                                 "(tile short clips first)")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_log_mel_on_cuda_matches_cpu():
    wave = torch.randn(2, 32000)
    torch.testing.assert_close(log_mel(wave.cuda(), 16000).cpu(), log_mel(wave, 16000), atol=2e-3, rtol=1e-4)


# --- resampling ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("orig,new", [(44100, 16000), (8000, 16000), (48000, 16000), (16000, 22050)])
def test_resample_matches_direct_sum(orig: int, new: int):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(orig // 50)
    ours = resample(torch.tensor(x, dtype=torch.float64), orig, new).numpy()
    expected = resample_reference(x, orig, new)
    assert ours.shape == expected.shape == (math.ceil(len(x) * new / orig),)
    np.testing.assert_allclose(ours, expected, atol=1e-9)


def test_resample_tone_keeps_frequency_and_amplitude_and_removes_aliases():
    sr, t = 44100, np.arange(44100) / 44100
    tone = torch.tensor(np.sin(2 * np.pi * 1000 * t), dtype=torch.float32)
    out = resample(tone, sr, 16000).numpy()
    assert out.shape == (16000,)
    spectrum = np.abs(np.fft.rfft(out))
    assert int(spectrum.argmax()) == 1000  # 1 Hz bins over 1 s
    assert np.abs(out[1000:-1000]).max() == pytest.approx(1.0, abs=0.01)
    # 12 kHz is above the new 8 kHz Nyquist: it must be filtered out, not folded down to 4 kHz.
    high = torch.tensor(np.sin(2 * np.pi * 12000 * t), dtype=torch.float32)
    assert np.abs(resample(high, sr, 16000).numpy()[1000:-1000]).max() < 0.01


def test_resample_batched_and_same_rate():
    wave = torch.randn(2, 3, 441)
    out = resample(wave, 44100, 16000)
    assert out.shape == (2, 3, 160)
    torch.testing.assert_close(out[1, 2], resample(wave[1, 2], 44100, 16000))
    assert resample(wave, 16000, 16000) is wave


# --- loading ---------------------------------------------------------------------------------------------------------

def test_load_stereo_downmix_and_info(tmp_path):
    path = tmp_path / "stereo.wav"
    stereo = np.stack([np.full(1600, 0.5), np.full(1600, 0.1)], axis=1)
    soundfile.write(path, stereo, 16000, subtype="FLOAT")
    wave, info = load_waveform(path, 16000)
    assert wave.dtype == np.float32 and wave.shape == (1600,)
    np.testing.assert_allclose(wave, 0.3, atol=1e-6)
    assert info == {"sample_rate": 16000, "channels": 2, "frames": 1600, "duration_s": 0.1, "resampled": False,
                    "downmixed": True}
    both, info = load_waveform(path, 16000, mono=False)
    assert both.shape == (2, 1600) and not info["downmixed"]
    np.testing.assert_allclose(both[:, 0], [0.5, 0.1], atol=1e-6)


def test_load_resamples_to_the_requested_rate(tmp_path):
    path = tmp_path / "tone8k.wav"
    t = np.arange(8000) / 8000
    soundfile.write(path, 0.5 * np.sin(2 * np.pi * 440 * t), 8000, subtype="FLOAT")
    wave, info = load_waveform(path, 16000)
    assert wave.shape == (16000,)
    assert info["sample_rate"] == 8000 and info["resampled"] and not info["downmixed"]
    assert int(np.abs(np.fft.rfft(wave)).argmax()) == 440
    assert np.abs(wave[500:-500]).max() == pytest.approx(0.5, abs=0.01)


def test_load_errors_name_the_file_and_the_reason(tmp_path):
    missing = tmp_path / "missing.wav"
    with pytest.raises(DataError) as err:
        load_waveform(missing, 16000)
    assert err.value.message == f"unreadable audio {missing}: file not found"

    junk = tmp_path / "junk.wav"
    junk.write_bytes(os.urandom(2000))
    with pytest.raises(DataError) as err:
        load_waveform(junk, 16000)
    assert err.value.message == f"unreadable audio {junk}: not a sound file: Format not recognised."

    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros((0, 1)), 16000)
    with pytest.raises(DataError) as err:
        load_waveform(empty, 16000)
    assert err.value.message == f"unreadable audio {empty}: 0 samples"

    broken = tmp_path / "nan.wav"
    soundfile.write(broken, np.array([0.0, np.nan, 0.1]), 16000, subtype="FLOAT")
    with pytest.raises(DataError) as err:
        load_waveform(broken, 16000)
    assert err.value.message == f"unreadable audio {broken}: contains NaN or inf samples"


# --- tiling ----------------------------------------------------------------------------------------------------------

def test_tile_and_cut_numpy_and_torch():
    short = np.array([1.0, 2.0, 3.0])
    np.testing.assert_array_equal(tile_and_cut(short, 1.0, 7), [1, 2, 3, 1, 2, 3, 1])
    np.testing.assert_array_equal(tile_and_cut(np.arange(10.0), 0.5, 8), [0, 1, 2, 3])
    batch = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    torch.testing.assert_close(tile_and_cut(batch, 0.5, 10), torch.tensor([[1.0, 2, 1, 2, 1], [3.0, 4, 3, 4, 3]]))
    # The official rule on a 3 s clip at 16 kHz: repeated 4 times, cut to exactly 10 s.
    clip = np.arange(48000, dtype=np.float32)
    ten = tile_and_cut(clip, 10, 16000)
    assert ten.shape == (160000,) and ten[48000] == 0 and ten[-1] == 160000 - 1 - 3 * 48000
    with pytest.raises(DataError) as err:
        tile_and_cut(np.zeros(0), 10, 16000)
    assert err.value.message == "cannot tile an empty waveform (0 samples)"
