"""Video and audio files through PyAV: probe a file, decode the frames at given times by seeking, decode the audio
track, and write an MP4 a browser plays (H.264 yuv420p + AAC) with audio muxed back in.

Only the frames asked for are converted to pictures: :func:`frames_at` seeks to the key frame before a requested
time whenever the next time is further ahead than ``SEEK_AHEAD_S`` and decodes forward from there, so a long video is
never held in memory. The audio track is decoded forward in chunks (:class:`AudioChunks`) as the frames need it, and
written into the MP4 the same way, so memory does not grow with the length of the file (a 2-hour film at 48 kHz
stereo is 2.8 GB as float32); :func:`read_audio` decodes a whole (short) track through the same reader.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from sslt_cli.errors import DataError

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".m4v", ".avi")
SEEK_AHEAD_S = 2.0  # decoding forward is cheaper than a seek for gaps shorter than a typical key-frame interval
# the AAC encoder's output is cut at this rate when the input rate is not one AAC supports
_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` found: picture size, duration (s), frame rate, the audio stream's rate and channels."""

    path: Path
    width: int
    height: int
    duration: float
    frame_rate: float
    audio_rate: int
    audio_channels: int


def _open(path: Path):
    import av

    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable: not a media file PyAV can open ({exc})") from None


def _duration(container, stream) -> float:
    """Seconds of a stream: its own duration, else the container's; 0 when neither is known."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return 0.0


def probe_video(path: str | Path) -> VideoInfo:
    """Open a video file and check it has a video and an audio stream and a duration.

    Raises DataError naming the file for a missing or unreadable file, a missing stream or a file with no duration.
    """
    path = Path(path)
    with _open(path) as container:
        if not container.streams.video:
            raise DataError(f"{path}: no video stream (streams: {_stream_kinds(container)}); sslt localize needs "
                            f"pictures and sound: pass a video, or a still frame with --image and --audio")
        if not container.streams.audio:
            raise DataError(f"{path}: no audio stream (streams: {_stream_kinds(container)}); the model localises a "
                            f"sound: pass a video with sound, or --image FRAME --audio WAV")
        video, audio = container.streams.video[0], container.streams.audio[0]
        duration = _duration(container, video)
        if duration <= 0:
            raise DataError(f"{path}: the video stream states no duration; re-mux it (ffmpeg -i IN -c copy OUT.mp4)")
        rate = float(video.average_rate or video.guessed_rate or 25)
        return VideoInfo(path, int(video.codec_context.width), int(video.codec_context.height), duration, rate,
                         int(audio.codec_context.sample_rate), int(audio.codec_context.channels))


def _stream_kinds(container) -> str:
    kinds = [stream.type for stream in container.streams]
    return ", ".join(kinds) if kinds else "none"


def sample_times(duration: float, fps: float) -> list[float]:
    """Times (s) of the frames sampled at ``fps``: 0, 1/fps, ... up to but not including ``duration``."""
    count = max(1, math.ceil(duration * fps - 1e-9))
    return [k / fps for k in range(count)]


def frames_at(path: str | Path, times: Sequence[float]) -> Iterator[tuple[int, float, np.ndarray]]:
    """(index, time of the frame shown, (H, W, 3) uint8 RGB) for each requested time (ascending), in order.

    The frame shown at time t is the last one whose timestamp is at most t (the first frame for t before it).
    Raises DataError when the video ends before a requested time (a truncated file) or cannot be decoded.
    """
    path = Path(path)
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frame_period = 1.0 / float(stream.average_rate or 25)
        frames = _decode(container, stream, path)
        current = ahead = None  # (time, frame): the last decoded frame at or before t, the first one after it
        for index, t in enumerate(times):
            position = (ahead or current or (-math.inf, None))[0]
            if t - position > SEEK_AHEAD_S:
                container.seek(int(t / stream.time_base), stream=stream, backward=True, any_frame=False)
                frames, current, ahead = _decode(container, stream, path), None, None
            if ahead is not None and ahead[0] <= t + 1e-6:
                current, ahead = ahead, None
            if ahead is None:
                for decoded in frames:
                    if decoded[0] > t + 1e-6:
                        ahead = decoded
                        break
                    current = decoded
            chosen = current or ahead
            if ahead is None and (chosen is None or t - chosen[0] > 2 * frame_period):
                seen = f"at {chosen[0]:.2f} s" if chosen is not None else "before its first frame"
                raise DataError(f"{path}: truncated: the video stream ends {seen}, before the frame at {t:.2f} s "
                                f"(the header states {_duration(container, stream):.2f} s)")
            yield index, chosen[0], chosen[1].to_ndarray(format="rgb24")


def _decode(container, stream, path: Path) -> Iterator[tuple[float, object]]:
    """(time, frame) of the stream's frames from the current position; decoding errors become DataError."""
    import av

    try:
        for frame in container.decode(stream):
            if frame.time is not None:
                yield float(frame.time), frame
    except av.error.FFmpegError as exc:
        raise DataError(f"{path}: the video stream cannot be decoded ({exc}); the file may be truncated") from None


AUDIO_CHUNK = 1 << 16  # samples per read when a whole track is decoded


def aac_rate(rate: int) -> int:
    """The sample rate AAC writes for audio at ``rate``: the same where AAC supports it, else the nearest above."""
    return min(_AAC_RATES, key=lambda r: (r < rate, abs(r - rate)))


class AudioChunks:
    """The first audio stream of a file, decoded forward on demand: :meth:`read` hands out the next samples as float32
    (channels, n) at ``rate`` (default: the file's own; another rate is converted by libswresample as it streams).
    Only the decoded frame not yet handed out is held. The sound ends where the stream's stated duration ends (AAC
    pads its last frame to 1024 samples; the MP4 edit list states the real end). Use as a context manager.

    Raises DataError for a missing or unreadable file, a file without audio or an undecodable audio stream.
    """

    def __init__(self, path: str | Path, rate: int | None = None):
        import av

        self.path = Path(path)
        self._container = _open(self.path)
        if not self._container.streams.audio:
            self._container.close()
            raise DataError(f"{self.path}: no audio stream")
        stream = self._container.streams.audio[0]
        self.native_rate = int(stream.codec_context.sample_rate)
        self.rate = int(rate or self.native_rate)
        self.channels = int(stream.codec_context.channels)
        stated = float(stream.duration * stream.time_base) if stream.duration is not None else 0.0
        self._limit = max(1, int(round(stated * self.rate))) if stated > 0 else None
        self._resampler = av.AudioResampler(format="fltp", layout=stream.codec_context.layout.name, rate=self.rate)
        self._frames = self._decoded(stream)
        self._pending = np.zeros((self.channels, 0), np.float32)
        self.position = 0  # samples handed out
        self.ended = False

    def _decoded(self, stream) -> Iterator[np.ndarray]:
        import av

        try:
            for frame in self._container.decode(stream):
                for out in self._resampler.resample(frame):
                    yield out.to_ndarray()
            for out in self._resampler.resample(None):  # what the resampler still holds
                yield out.to_ndarray()
        except av.error.FFmpegError as exc:
            raise DataError(f"{self.path}: the audio stream cannot be decoded ({exc}); the file may be truncated"
                            ) from None

    def read(self, n: int) -> np.ndarray:
        """The next ``n`` samples, (channels, n) float32; fewer only at the end of the sound (then ``ended``)."""
        parts, have = [self._pending], self._pending.shape[1]
        while have < n and not self.ended:
            chunk = next(self._frames, None)
            if chunk is None:
                self.ended = True
                break
            parts.append(chunk.astype(np.float32, copy=False))
            have += chunk.shape[1]
        joined = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        take = min(n, joined.shape[1])
        if self._limit is not None and self.position + take >= self._limit:
            take, self.ended = self._limit - self.position, True
        out, self._pending = joined[:, :take], joined[:, take:] if not self.ended else joined[:, :0]
        self.position += take
        return np.ascontiguousarray(out, dtype=np.float32)

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> "AudioChunks":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close()


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """The whole first audio stream as float32 (channels, samples) at the file's own rate, and that rate.

    Raises DataError for a file without audio, an undecodable audio stream or one that decodes to no samples.
    """
    with AudioChunks(path) as audio:
        chunks = [audio.read(AUDIO_CHUNK)]
        while not audio.ended:
            chunks.append(audio.read(AUDIO_CHUNK))
    samples = np.concatenate(chunks, axis=1)
    if samples.shape[1] == 0:
        raise DataError(f"{Path(path)}: the audio stream holds no samples")
    return samples, audio.rate


class Mp4Writer:
    """Writes pictures at a fixed frame rate as H.264 (yuv420p, even size) plus the given audio as AAC, interleaved.

    ``audio``: float32 (channels, samples) at ``audio_rate``, or an :class:`AudioChunks` read as the pictures come
    (at a rate AAC supports: :func:`aac_rate`); 1 or 2 channels are kept, more are downmixed to stereo. It is written
    up to the end of the last picture, so the file's audio and video end together (the encoder's priming samples are
    trimmed by the MP4 edit list ffmpeg writes); ``audio_written`` samples in all. Use as a context manager.
    """

    def __init__(self, path: str | Path, width: int, height: int, fps: float,
                 audio: "np.ndarray | AudioChunks | None" = None, audio_rate: int = 0):
        import av

        if width % 2 or height % 2:
            raise ValueError(f"H.264 yuv420p needs an even picture size, got {width}x{height}")
        self.path = Path(path)
        self.fps = Fraction(fps).limit_denominator(1000)
        self.container = av.open(str(self.path), mode="w", options={"movflags": "+faststart"})
        self.video = self.container.add_stream("libx264", rate=self.fps)
        self.video.width, self.video.height, self.video.pix_fmt = width, height, "yuv420p"
        self.video.options = {"preset": "veryfast", "crf": "23", "tune": "stillimage"}
        self.frames = 0
        self.audio = self.audio_stream = None
        self.audio_written = 0
        if isinstance(audio, AudioChunks):
            if audio.rate not in _AAC_RATES:
                raise ValueError(f"AAC does not write {audio.rate} Hz: read the audio at {aac_rate(audio.rate)} Hz")
            self.audio, self.audio_rate = audio, audio.rate
            self.audio_stream = self.container.add_stream("aac", rate=self.audio_rate)
            self.audio_stream.layout = "stereo" if audio.channels >= 2 else "mono"
        elif audio is not None:
            self.audio = _stereo(audio)
            self.audio_rate = aac_rate(audio_rate)
            if self.audio_rate != audio_rate:
                from sslt_cli.audio import resample
                import torch

                self.audio = resample(torch.from_numpy(np.ascontiguousarray(self.audio)), audio_rate,
                                      self.audio_rate).numpy()
            self.audio_stream = self.container.add_stream("aac", rate=self.audio_rate)
            self.audio_stream.layout = "stereo" if self.audio.shape[0] == 2 else "mono"

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close()

    def write(self, picture: np.ndarray) -> None:
        """Append one (height, width, 3) uint8 RGB picture, then the audio up to its end time."""
        import av

        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")
        frame.pts = self.frames
        frame.time_base = 1 / self.fps
        self.container.mux(self.video.encode(frame))
        self.frames += 1
        self._write_audio_until(float(self.frames / self.fps))

    def _write_audio_until(self, seconds: float) -> None:
        import av

        if self.audio is None:
            return
        wanted = int(round(seconds * self.audio_rate))
        if isinstance(self.audio, AudioChunks):
            chunk = _stereo(self.audio.read(wanted - self.audio_written)) if wanted > self.audio_written else None
            end = self.audio_written + (chunk.shape[1] if chunk is not None else 0)
        else:
            end = min(self.audio.shape[1], wanted)
            chunk = np.ascontiguousarray(self.audio[:, self.audio_written:end], dtype=np.float32)
        if end <= self.audio_written:
            return
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=self.audio_stream.layout.name)
        frame.sample_rate = self.audio_rate
        frame.pts = self.audio_written
        frame.time_base = Fraction(1, self.audio_rate)
        self.container.mux(self.audio_stream.encode(frame))
        self.audio_written = end

    def close(self) -> None:
        """Flush both encoders and finish the file (idempotent)."""
        if self.container is None:
            return
        self.container.mux(self.video.encode(None))
        if self.audio_stream is not None:
            self.container.mux(self.audio_stream.encode(None))
        self.container.close()
        self.container = None


def _stereo(audio: np.ndarray) -> np.ndarray:
    """(C, N) audio as AAC gets it: 1 or 2 channels kept, more downmixed to stereo (odd and even channels)."""
    if audio.shape[0] <= 2:
        return np.ascontiguousarray(audio, dtype=np.float32)
    return np.ascontiguousarray(np.stack([audio[0::2].mean(0), audio[1::2].mean(0)]), dtype=np.float32)


def write_video(path: str | Path, frames: Sequence[np.ndarray] | np.ndarray, fps: float,
                audio: np.ndarray | None = None, audio_rate: int = 0) -> Path:
    """Write (N, H, W, 3) uint8 RGB pictures (even H and W) at ``fps`` with optional (channels, samples) audio as
    an MP4 (H.264 + AAC); returns the path."""
    height, width = frames[0].shape[:2]
    with Mp4Writer(path, width, height, fps, audio, audio_rate) as writer:
        for frame in frames:
            writer.write(frame)
    return Path(path)
