"""The audio front ends of the released models of other methods: file or waveform -> the spectrogram their test code
feeds the network (METHODS.md; each read from the repository's own test loader).

Every one is ``scipy.signal.spectrogram(x, rate, nperseg=512, noverlap=N)``, ``log(S + 1e-7)`` and ``/ 12``
(torchvision ``Normalize(0, 12)``), computed in float64 as numpy computes it and handed to the network as float32
(the test loops call ``spec.float()``). They differ in how the file is read and which window is kept:

* ``lvs`` (LVS ``datasets/dataloader.py``): ``soundfile`` at the file's own rate, tiled to 10 s, the first 10 s,
  clipped to [-1, 1], noverlap 274 (257 x 671 at 16 kHz). LVS assumes mono; a multi-channel file is averaged here.
* ``ezvsl`` (EZ-VSL, SLAVC and FNAC ``datasets.py`` + ``audio_io.py``): PyAV at the stream's own rate through a
  mono s16 resampler, ``/ 32767``; the centre 3 s (``start = max(duration / 2 - 1.5, 0)``), clipped, tiled when
  short, noverlap 274 (257 x 200 at 16 kHz).
* ``align_lvs`` (SSLalignment ``datasets_lvs.py``, its LVS and "ours" models): ``soundfile``, the left channel of a
  stereo file, tiled to 10 s, then samples ``[16000 * 3.5 : 16000 * 6.5]`` (the 3.5-6.5 s slice at 16 kHz), clipped,
  noverlap 353 (257 x 299 at 16 kHz).
* ``align_ezvsl`` (SSLalignment ``datasets.py``, how it feeds EZ-VSL and SLAVC): PyAV as ``ezvsl`` but the first
  10 s, tiled, rolled so the file's middle sits at 5 s, noverlap 274, then the centre 200 columns
  (``CenterCrop((257, 200))``; 257 x 200 at 16 kHz).

``logmel`` is sslt's own (SSL-TIE's) front end (:mod:`sslt_cli.audio`), not handled here.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np

from sslt_cli.errors import DataError

FrontEndName = Literal["logmel", "lvs", "ezvsl", "align_lvs", "align_ezvsl"]
FRONT_END_NAMES: tuple[str, ...] = ("logmel", "lvs", "ezvsl", "align_lvs", "align_ezvsl")
SPEC_SCALE = 12.0
NPERSEG = 512
RELEASED_RATE = 16000  # the rate of the audio every released model was trained on (VGGSound / Flickr at 16 kHz)


@dataclass(frozen=True)
class FrontEnd:
    """One released front end: ``reader`` (``soundfile`` or ``pyav``), ``window`` (``first``: the first ``seconds``
    after tiling; ``centre``: ``seconds`` around the middle of the file; ``slice``: tiled to ``seconds``, then
    ``[16000 * start : 16000 * stop]``; ``rolled``: the first ``seconds``, tiled, the file's middle rolled to the
    window's), the spectrogram's ``noverlap``, the spectrogram columns kept (``columns``: a centre crop) and what a
    page says about it."""

    name: str
    reader: Literal["soundfile", "pyav"]
    window: Literal["first", "centre", "slice", "rolled"]
    seconds: float
    noverlap: int
    describe: str
    slice_s: tuple[float, float] | None = None
    columns: int | None = None

    @property
    def window_seconds(self) -> float:
        """Seconds of audio one spectrogram covers (``sslt localize`` centres this much on each frame)."""
        if self.slice_s is not None:
            return self.slice_s[1] - self.slice_s[0]
        if self.columns is not None:  # the centre crop keeps about columns * hop samples
            return 3.0
        return self.seconds


FRONT_ENDS: dict[str, FrontEnd] = {
    fe.name: fe for fe in (
        FrontEnd("lvs", "soundfile", "first", 10.0, 274,
                 "LVS: soundfile at the file's rate, first 10 s (tiled), spectrogram nperseg 512 / noverlap 274, "
                 "log, / 12"),
        FrontEnd("ezvsl", "pyav", "centre", 3.0, 274,
                 "EZ-VSL: PyAV mono s16 / 32767 at the stream's rate, centre 3 s (tiled), spectrogram nperseg 512 / "
                 "noverlap 274, log, / 12"),
        FrontEnd("align_lvs", "soundfile", "slice", 10.0, 353,
                 "SSLalignment (LVS models): soundfile, left channel, tiled to 10 s, samples 3.5-6.5 s at 16 kHz, "
                 "spectrogram nperseg 512 / noverlap 353, log, / 12", slice_s=(3.5, 6.5)),
        FrontEnd("align_ezvsl", "pyav", "rolled", 10.0, 274,
                 "SSLalignment (EZ-VSL, SLAVC models): PyAV mono s16 / 32767, first 10 s (tiled), the middle rolled to "
                 "5 s, spectrogram nperseg 512 / noverlap 274, log, centre 200 columns, / 12", columns=200),
    )
}


def get_front_end(name: str) -> FrontEnd:
    if name not in FRONT_ENDS:
        raise DataError(f"unknown audio front end {name!r}; choose one of {', '.join(FRONT_ENDS)}")
    return FRONT_ENDS[name]


def spectrogram(wave: np.ndarray, rate: int, noverlap: int) -> np.ndarray:
    """wave (N,) float64 in [-1, 1] -> (257, T) float64: ``log(spectrogram + 1e-7) / 12`` (scipy's defaults:
    Tukey window 0.25, density scaling, constant detrend)."""
    from scipy import signal

    if wave.shape[0] < NPERSEG:
        raise DataError(f"audio window of {wave.shape[0]} samples is shorter than one {NPERSEG}-sample frame")
    _, _, power = signal.spectrogram(wave, rate, nperseg=NPERSEG, noverlap=noverlap)
    return np.log(power + 1e-7) / SPEC_SCALE


def tile_to(wave: np.ndarray, samples: int) -> np.ndarray:
    """The released loaders' repeat: a clip shorter than ``samples`` is tiled ``int(samples / N) + 1`` times; then the
    first ``samples`` are kept."""
    if wave.shape[0] == 0:
        raise DataError("cannot tile an empty waveform (0 samples)")
    if wave.shape[0] < samples:
        wave = np.tile(wave, int(samples / wave.shape[0]) + 1)
    return wave[:samples]


def window_of(wave: np.ndarray, rate: int, front_end: FrontEnd) -> np.ndarray:
    """The samples a front end keeps of a whole mono waveform (``first`` and ``slice``; ``centre`` windows are cut
    while decoding, :func:`read_window`). Clipped to [-1, 1]."""
    if front_end.window == "slice":
        start, stop = front_end.slice_s or (0.0, front_end.seconds)
        wave = tile_to(wave, int(rate * front_end.seconds))[int(16000 * start):int(16000 * stop)]
    else:
        wave = tile_to(wave, int(rate * front_end.seconds))
    return np.clip(wave, -1.0, 1.0)


def _read_soundfile(path: Path, front_end: FrontEnd) -> tuple[np.ndarray, int]:
    import soundfile

    try:
        data, rate = soundfile.read(str(path), dtype="float64", always_2d=True)
    except (soundfile.SoundFileError, RuntimeError, OSError) as exc:
        raise DataError(f"unreadable audio {path}: not a sound file: {exc}") from None
    if data.shape[0] == 0:
        raise DataError(f"unreadable audio {path}: 0 samples")
    # SSLalignment keeps the left channel of a stereo file; LVS assumes mono (averaged here)
    wave = data[:, 0] if front_end.name == "align_lvs" or data.shape[1] == 1 else data.mean(axis=1)
    return np.ascontiguousarray(wave), int(rate)


def _duration(path: Path) -> float:
    """Seconds of the first audio stream, as its header states (what the released loaders read)."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.audio[0]
            return float(stream.duration * stream.time_base)
    except (av.error.FFmpegError, OSError, IndexError, TypeError) as exc:
        raise DataError(f"unreadable audio {path}: {exc}") from None


def _read_pyav_centre(path: Path, seconds: float) -> tuple[np.ndarray, int]:
    """EZ-VSL's ``load_spectrogram`` window: ``seconds`` around the middle of the first audio stream
    (``start = max(duration / 2 - seconds / 2, 0)``)."""
    duration = _duration(path)
    return _read_pyav(path, max(duration / 2 - seconds / 2, 0), seconds)


def _read_pyav(path: Path, start: float, seconds: float) -> tuple[np.ndarray, int]:
    """EZ-VSL's ``load_audio_av``: ``seconds`` from ``start`` of the first audio stream, mono s16 at its own rate
    through PyAV's resampler, ``/ 32767``, then clipped to [-1, 1] (float64)."""
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise DataError(f"unreadable audio {path}: {exc}") from None
    with container:
        if not container.streams.audio:
            raise DataError(f"unreadable audio {path}: no audio stream")
        stream = container.streams.audio[0]
        if stream.duration is None:
            raise DataError(f"unreadable audio {path}: the audio stream has no duration")
        first = stream.start_time * stream.time_base if stream.start_time is not None else Fraction(0)
        end = first + stream.duration * stream.time_base
        rate = int(stream.rate)
        duration = min(seconds, end - start)
        chunks = _decode_from(container, stream, start, start + duration, rate)
    if not chunks:
        raise DataError(f"unreadable audio {path}: no audio decoded")
    audio = np.concatenate([samples for _, samples in chunks], 1)
    offset = int((start - chunks[0][0]) * rate)
    length = int(duration * rate)
    if offset < 0:
        audio = np.pad(audio, ((0, 0), (-offset, 0)))
        offset = 0
    audio = audio[:, offset:offset + length] / np.iinfo(audio.dtype).max
    return np.clip(audio, -1.0, 1.0).mean(0), rate


def _read_pyav_rolled(path: Path, seconds: float) -> tuple[np.ndarray, int]:
    """SSLalignment's ``load_spectrogram``: the first ``seconds`` of the file (PyAV mono s16 / 32767, clipped),
    tiled, then rolled by ``int(rate * seconds / 2) - int(duration / 2 * rate)`` (the file's middle to the window's)."""
    duration = _duration(path)
    wave, rate = _read_pyav(path, 0.0, seconds)
    wave = tile_to(wave, int(rate * seconds))
    return np.roll(wave, int(rate * seconds / 2) - int(duration / 2 * rate)), rate


def _decode_from(container, stream, start: float, stop: float, rate: int) -> list[tuple[Fraction, np.ndarray]]:
    import av

    resampler = av.audio.resampler.AudioResampler(format="s16p", layout="mono", rate=rate)
    chunks: list[tuple[Fraction, np.ndarray]] = []
    container.seek(int(start * av.time_base))
    for frame in container.decode(stream):
        begins = frame.pts * frame.time_base
        if begins + Fraction(frame.samples, frame.rate) < start:
            continue
        if begins > stop:
            break
        frame.pts = None
        for out in _as_list(resampler.resample(frame)):
            chunks.append((begins, out.to_ndarray()))
    return chunks


def _as_list(frames) -> list:
    """PyAV >= 9 returns a list of frames from ``resample``, older versions one frame."""
    return frames if isinstance(frames, list) else [frames]


def spectrogram_of_file(path: str | Path, name: str) -> "torch.Tensor":  # noqa: F821
    """The released front end ``name``'s input for an audio file: (1, 257, T) float32."""
    import torch

    front_end = get_front_end(name)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"unreadable audio {path}: file not found")
    if front_end.window == "rolled":
        wave, rate = _read_pyav_rolled(path, front_end.seconds)
    elif front_end.reader == "pyav":
        wave, rate = _read_pyav_centre(path, front_end.seconds)
        wave = tile_to(wave, int(rate * front_end.seconds))
    else:
        wave, rate = _read_soundfile(path, front_end)
        wave = window_of(wave, rate, front_end)
    return torch.from_numpy(_crop(spectrogram(wave, rate, front_end.noverlap), front_end)).float()[None]


def _crop(spec: np.ndarray, front_end: FrontEnd) -> np.ndarray:
    """torchvision ``CenterCrop((F, columns))`` of an (F, T) spectrogram: columns from ``round((T - columns) / 2)``."""
    if front_end.columns is None:
        return spec
    if spec.shape[1] < front_end.columns:
        raise DataError(f"a spectrogram of {spec.shape[1]} frames is narrower than the {front_end.columns} the "
                        f"{front_end.name} front end keeps")
    left = int(round((spec.shape[1] - front_end.columns) / 2.0))
    return spec[:, left:left + front_end.columns]


def spectrogram_of_wave(wave: np.ndarray, rate: int, name: str, clip: bool = True) -> "torch.Tensor":  # noqa: F821
    """The front end ``name`` applied to a mono waveform already cut to the front end's window (``sslt localize``:
    the audio around a frame): tiled to the window, clipped to [-1, 1] unless ``clip`` is False (a generated negative
    audio, as vssl_eval feeds its noise) -> (1, 257, T) float32."""
    import torch

    front_end = get_front_end(name)
    wave = tile_to(np.asarray(wave, dtype=np.float64), int(round(rate * front_end.window_seconds)))
    if clip:
        wave = np.clip(wave, -1, 1)
    return torch.from_numpy(spectrogram(wave, rate, front_end.noverlap)).float()[None]
