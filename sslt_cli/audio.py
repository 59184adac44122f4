"""Audio front end: waveform loading and resampling, tiling to a fixed length, the mel filterbank and log-mel.

Everything here is torch (plus soundfile for decoding): torchaudio is not a dependency. The functions reproduce the
released SSL-TIE pipeline (REFERENCE.md section 4), which used torchaudio:

* ``tile_and_cut``: a clip shorter than ``seconds`` is repeated until it is long enough, then cut to exactly
  ``seconds`` (the official loader does this at the file's own rate; sslt first resamples every file to one rate).
* ``mel_power`` = ``torchaudio.transforms.MelSpectrogram(n_fft=512, hop_length=239, n_mels=257, normalized=True)``:
  centred STFT (reflect padding, periodic Hann window of ``n_fft``), magnitude divided by ``sqrt(sum(window**2))``,
  squared, then an HTK mel filterbank without area normalisation.
* ``power_to_db`` = ``torchaudio.transforms.AmplitudeToDB()`` (power, no ``top_db``): ``10 * log10(max(x, 1e-10))``.
  SpecAugment (``data/augment.py``) masks the mel power between the two steps, as the official loader does.
* ``resample``: band-limited windowed-sinc interpolation with torchaudio's default design (Hann window over
  6 zero crossings on each side, cut-off at 0.99 of the lower Nyquist frequency).

With 257 mel bands over the 257 bins of a 512-point FFT, the lowest bands are narrower than one FFT bin and fall
between bins: at 16 kHz, 28 filters are all zero (so are those spectrogram rows). The official code has the same
empty rows; 257 stays the faithful default and the band count is a parameter.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from sslt_cli.errors import DataError, RecipeError

if TYPE_CHECKING:
    import torch

ArrayT = TypeVar("ArrayT", np.ndarray, "torch.Tensor")

_DB_FLOOR_POWER = 1e-10
_MEL_SCALES = ("htk", "slaney")
_MEL_NORMS = (None, "slaney")
# Slaney's auditory-toolbox mel scale: linear below 1 kHz (3 bands per 200 Hz), logarithmic above.
_SLANEY_HZ_PER_MEL = 200.0 / 3.0
_SLANEY_BREAK_HZ = 1000.0
_SLANEY_BREAK_MEL = _SLANEY_BREAK_HZ / _SLANEY_HZ_PER_MEL
_SLANEY_LOG_STEP = math.log(6.4) / 27.0


def _hz_to_mel(hz: float, mel_scale: str) -> float:
    """One frequency in Hz to mels (a Python float, computed in double precision as torchaudio does)."""
    if mel_scale == "htk":
        return 2595.0 * math.log10(1.0 + hz / 700.0)
    if hz < _SLANEY_BREAK_HZ:
        return hz / _SLANEY_HZ_PER_MEL
    return _SLANEY_BREAK_MEL + math.log(hz / _SLANEY_BREAK_HZ) / _SLANEY_LOG_STEP


def _mel_to_hz(mels: "torch.Tensor", mel_scale: str) -> "torch.Tensor":
    """Mels to Hz, elementwise; the inverse of :func:`_hz_to_mel`."""
    import torch

    if mel_scale == "htk":
        return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    linear = mels * _SLANEY_HZ_PER_MEL
    logarithmic = _SLANEY_BREAK_HZ * torch.exp(_SLANEY_LOG_STEP * (mels - _SLANEY_BREAK_MEL))
    return torch.where(mels >= _SLANEY_BREAK_MEL, logarithmic, linear)


def mel_filterbank(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int,
                   norm: str | None = None, mel_scale: str = "htk") -> "torch.Tensor":
    """Triangular mel filters over linearly spaced FFT bins, as ``torchaudio.functional.melscale_fbanks``.

    The ``n_freqs`` bins sit at ``linspace(0, sample_rate // 2, n_freqs)`` Hz. ``n_mels + 2`` edges are equally
    spaced in mels between ``f_min`` and ``f_max``; filter ``m`` rises linearly from edge ``m`` to a peak of 1 at
    edge ``m + 1`` and falls back to 0 at edge ``m + 2``. ``norm="slaney"`` scales each filter by
    ``2 / (width in Hz)`` (equal area). Returns a float32 tensor (n_freqs, n_mels); a filter narrower than the bin
    spacing may be an all-zero column.
    """
    import torch

    if mel_scale not in _MEL_SCALES:
        raise RecipeError(f"mel scale {mel_scale!r} is not one of {', '.join(_MEL_SCALES)}")
    if norm not in _MEL_NORMS:
        raise RecipeError(f"mel filter norm {norm!r} is not one of None, 'slaney'")
    if n_freqs < 2 or n_mels < 1:
        raise RecipeError(f"mel filterbank needs at least 2 FFT bins and 1 band, got {n_freqs} bins, {n_mels} bands")
    if not 0.0 <= f_min < f_max:
        raise RecipeError(f"mel filterbank: need 0 <= f_min < f_max, got f_min={f_min} Hz, f_max={f_max} Hz")

    bin_hz = torch.linspace(0, sample_rate // 2, n_freqs)
    edge_mels = torch.linspace(_hz_to_mel(f_min, mel_scale), _hz_to_mel(f_max, mel_scale), n_mels + 2)
    edge_hz = _mel_to_hz(edge_mels, mel_scale)
    lower, peak, upper = edge_hz[:-2], edge_hz[1:-1], edge_hz[2:]
    freqs = bin_hz[:, None]
    rising = (freqs - lower) / (peak - lower)
    falling = (upper - freqs) / (upper - peak)
    filters = torch.clamp(torch.minimum(rising, falling), min=0.0)
    if norm == "slaney":
        filters = filters * (2.0 / (upper - lower))
    return filters


@functools.lru_cache(maxsize=32)
def _stft_constants(n_fft: int, n_mels: int, sample_rate: int, f_min: float, f_max: float,
                    device: "torch.device") -> tuple["torch.Tensor", "torch.Tensor"]:
    """(Hann window (n_fft,), mel filterbank (n_fft // 2 + 1, n_mels)) on ``device``, built once per setting."""
    import torch

    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float32, device=device)
    filters = mel_filterbank(n_fft // 2 + 1, f_min, f_max, n_mels, sample_rate).to(device)
    return window, filters


def mel_power(waveform: "torch.Tensor | np.ndarray", sample_rate: int, n_fft: int = 512, hop_length: int = 239,
              n_mels: int = 257, normalized: bool = True, f_min: float = 0.0,
              f_max: float | None = None) -> "torch.Tensor":
    """Mel power spectrogram, as torchaudio's ``MelSpectrogram`` (power 2, centred reflect-padded STFT).

    waveform: (B, N) or (N,) samples, on any device (computed in float32 there). ``normalized`` divides the STFT
    magnitude by ``sqrt(sum(window**2))`` before squaring. ``f_max`` defaults to ``sample_rate // 2``.
    Returns (B, 1, n_mels, 1 + N // hop_length) float32; a (N,) input gives B = 1.
    """
    import torch

    samples = torch.as_tensor(waveform)
    if samples.dim() == 1:
        samples = samples.unsqueeze(0)
    if samples.dim() != 2:
        raise ValueError(f"waveform must be (B, N) or (N,), got shape {tuple(samples.shape)}")
    samples = samples.float()
    if samples.shape[-1] <= n_fft // 2:
        raise DataError(f"waveform has {samples.shape[-1]} samples; a spectrogram with n_fft={n_fft} needs more "
                        f"than {n_fft // 2} (tile short clips first)")
    top = float(sample_rate // 2) if f_max is None else float(f_max)
    window, filters = _stft_constants(n_fft, n_mels, sample_rate, float(f_min), top, samples.device)
    spectrum = torch.stft(samples, n_fft, hop_length=hop_length, win_length=n_fft, window=window, center=True,
                          pad_mode="reflect", normalized=False, onesided=True, return_complex=True)
    power = torch.view_as_real(spectrum).square().sum(-1)  # (B, n_fft // 2 + 1, T)
    if normalized:
        # Dividing the magnitude by sqrt(sum(w^2)) before squaring divides the power by sum(w^2).
        power = power / window.square().sum()
    mel = torch.matmul(power.transpose(1, 2), filters).transpose(1, 2)
    return mel.unsqueeze(1)


def power_to_db(power: "torch.Tensor") -> "torch.Tensor":
    """Decibels of a power spectrogram, as torchaudio's ``AmplitudeToDB()``: ``10 * log10(max(power, 1e-10))``.

    power: any shape; returns the same shape (so silence reads -100 dB).
    """
    import torch

    return 10.0 * torch.log10(torch.clamp(power, min=_DB_FLOOR_POWER))


def log_mel(waveform: "torch.Tensor | np.ndarray", sample_rate: int, n_fft: int = 512, hop_length: int = 239,
            n_mels: int = 257, normalized: bool = True, f_min: float = 0.0,
            f_max: float | None = None) -> "torch.Tensor":
    """Log-mel spectrogram in dB, the audio network's input: ``power_to_db(mel_power(...))``.

    waveform: (B, N) or (N,). Returns (B, 1, n_mels, 1 + N // hop_length); 10 s at 16 kHz with hop 239 gives
    670 frames.
    """
    return power_to_db(mel_power(waveform, sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels,
                                 normalized=normalized, f_min=f_min, f_max=f_max))


@functools.lru_cache(maxsize=16)
def _sinc_kernel(up: int, down: int, zero_crossings: int, rolloff: float) -> tuple["torch.Tensor", int]:
    """Polyphase windowed-sinc filters for a rate change by ``up / down`` (coprime).

    Returns (kernel (up, 1, 2 * half_width + down) float64, half_width in input samples). Row ``j`` makes output
    sample ``q * up + j`` from input samples ``q * down - half_width ...``: it sits ``j * down / up`` input samples
    after input ``q * down``.
    """
    import torch

    # Low-pass at rolloff x the lower Nyquist frequency; `bandwidth` is twice the cut-off, in units where the input
    # rate is `down`, so one zero crossing of the sinc spans down / bandwidth input samples.
    bandwidth = min(up, down) * rolloff
    half_width = math.ceil(zero_crossings * down / bandwidth)
    taps = torch.arange(-half_width, half_width + down, dtype=torch.float64)
    phases = torch.arange(up, dtype=torch.float64)[:, None] * (down / up)
    crossings = ((taps - phases) * (bandwidth / down)).clamp(-zero_crossings, zero_crossings)
    window = torch.cos(crossings * (math.pi / (2 * zero_crossings))).square()
    kernel = torch.sinc(crossings) * window * (bandwidth / down)
    return kernel[:, None, :], half_width


def resample(waveform: "torch.Tensor", orig_rate: int, new_rate: int, *, zero_crossings: int = 6,
             rolloff: float = 0.99) -> "torch.Tensor":
    """Band-limited resampling with a Hann-windowed sinc (torchaudio's ``resample`` defaults).

    waveform: (..., N) float tensor. Returns (..., ceil(N * new_rate / orig_rate)) in the input's dtype; the
    input is returned unchanged when the rates are equal. Content above ``rolloff`` x the lower Nyquist frequency is
    filtered out (no aliasing when downsampling).
    """
    import torch.nn.functional as F

    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {new_rate}")
    if orig_rate == new_rate:
        return waveform
    common = math.gcd(int(orig_rate), int(new_rate))
    up, down = int(new_rate) // common, int(orig_rate) // common
    kernel, half_width = _sinc_kernel(up, down, zero_crossings, rolloff)
    kernel = kernel.to(device=waveform.device, dtype=waveform.dtype)
    shape = waveform.shape
    flat = waveform.reshape(-1, 1, shape[-1])
    padded = F.pad(flat, (half_width, half_width + down))
    blocks = F.conv1d(padded, kernel, stride=down)  # (batch, up, blocks): phase j of each block of `down` inputs
    out = blocks.transpose(1, 2).reshape(flat.shape[0], -1)
    out_len = -(-shape[-1] * up // down)
    return out[:, :out_len].reshape(*shape[:-1], out_len)


def load_waveform(path: str | Path, sample_rate: int, *, mono: bool = True) -> tuple[np.ndarray, dict]:
    """Decode an audio file with soundfile, downmix to mono and resample to ``sample_rate``.

    Returns (samples, info): samples float32 (N,) when ``mono`` (channels averaged), else (C, N); info has the
    file's ``sample_rate``, ``channels``, ``frames``, ``duration_s`` and whether it was ``resampled`` /
    ``downmixed``. Raises DataError naming the file for a missing, unreadable, empty or non-finite file.
    """
    import soundfile
    import torch

    path = Path(path)
    if not path.is_file():
        raise DataError(f"unreadable audio {path}: file not found")
    try:
        data, file_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.SoundFileError, RuntimeError, OSError) as exc:
        detail = str(exc).replace(f"Error opening {str(path)!r}: ", "")
        raise DataError(f"unreadable audio {path}: not a sound file: {detail}") from None
    frames, channels = data.shape
    if frames == 0:
        raise DataError(f"unreadable audio {path}: 0 samples")
    if not np.isfinite(data).all():
        raise DataError(f"unreadable audio {path}: contains NaN or inf samples")
    samples = data.T  # (C, N)
    downmixed = mono and channels > 1
    if mono:
        samples = samples.mean(axis=0)
    resampled = file_rate != sample_rate
    if resampled:
        samples = resample(torch.from_numpy(np.ascontiguousarray(samples)), file_rate, sample_rate).numpy()
    info = {"sample_rate": int(file_rate), "channels": int(channels), "frames": int(frames),
            "duration_s": frames / file_rate, "resampled": resampled, "downmixed": downmixed}
    return np.ascontiguousarray(samples, dtype=np.float32), info


def tile_and_cut(waveform: ArrayT, seconds: float, sample_rate: int) -> ArrayT:
    """Repeat a clip until it lasts at least ``seconds``, then keep exactly the first ``seconds`` (official loader).

    waveform: (..., N) numpy array or torch tensor with N > 0. Returns (..., round(seconds * sample_rate)) of the
    same kind: sample ``i`` is input sample ``i mod N``, so a longer clip is simply cut.
    """
    length = waveform.shape[-1]
    if length == 0:
        raise DataError("cannot tile an empty waveform (0 samples)")
    target = int(round(seconds * sample_rate))
    if isinstance(waveform, np.ndarray):
        return waveform[..., np.arange(target) % length]
    import torch

    return waveform[..., torch.arange(target, device=waveform.device) % length]
