"""Prepare the real benchmarks from what users download: VGGSound clips, the VGG-SS boxes, the Flickr-SoundNet archive.

Every function writes a *set* (``set.json`` + ``manifest.csv``, see :mod:`sslt_cli.data.manifest`) in one of the real
layouts, decoding with PyAV (no ffmpeg binary):

* :func:`prepare_vggsound` ``split="train"`` -> ``vggsound_train``: the frame nearest to ``t = frame_index / fps``
  (frame 125 of 25 fps: t = 5 s, the middle frame VGG-SS boxes are drawn on) as ``total_video_frames/<id>/125.jpg``
  and the 3 s of audio centred on it (3.5-6.5 s) as ``total_video_3s_audio/<id>.wav``. SSL-TIE's released code reads
  a ready-made 3 s wav and never says which 3 s; EZ-VSL, which cuts its 3 s at load time, centres them on the clip's
  middle, which for a 10 s clip is this window. The official frame script dumps every frame with ffmpeg's 1-based
  names, so its ``125.jpg`` is the frame at 4.96 s, one frame before the one taken here (``frame_index=124`` gives it).
* :func:`prepare_vggsound` ``split="test"`` -> ``vggss_test``: the same frame, the clip's first 10 s of audio and
  ``anno/<id>.xml`` from ``vggss.json``.
* :func:`prepare_flickr` -> ``flickr_test`` / ``flickr_train`` from the Flickr-SoundNet archive.
* :func:`prepare_vggss_annotations` / :func:`collect_vggss_json`: ``vggss.json`` to per-clip XML and back.
* :func:`index_existing`: a set for a folder already laid out by other tools (the official VGG-SS test folder, ...).

Audio is always mono (mean of the channels) at one sample rate, 16-bit PCM wav.

Each clip gets a manifest status; ``reason`` says the detail:

===================== ================================================================================================
``ok``                prepared (this run or an earlier one)
``missing``           the id is listed but its source file is not there (e.g. a vanished YouTube video), and no earlier
                      run left its outputs complete
``no video stream``   the file has no video stream
``no audio stream``   the file has no audio stream
``corrupt``           the file cannot be opened, or its data stops before the duration its header declares (truncated)
``decode error``      a packet of the file fails to decode, or the worker process dies while decoding it (a crash or
                      an out-of-memory kill in the decoder; the run goes on without it)
``too short``         the clip really is shorter than needed: no frame within half a frame period of t, or audio that
                      ends before it is needed (train: the end of the 3 s window, t + 1.5 s; test: t; Flickr: any)
``no annotation``     a test clip without boxes (not in ``vggss.json``; a Flickr XML without any ``bbox``)
===================== ================================================================================================

Runs are resumable and idempotent: every output is written through a temp file and ``os.replace``, a clip whose
outputs all exist and are complete is skipped, each finished clip's status is appended to ``.prepare_state.jsonl``
in the output folder, and a failed clip is not decoded again while its source file keeps its size and mtime (delete
the journal to retry every failure). A re-run with nothing new to do writes nothing. A clip prepared earlier stays
``ok`` while its outputs are complete, whether or not its source is still there, and a run without an id list keeps
the clips of earlier runs in the set (so a new batch of videos can be prepared into the same folder).
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import math
import multiprocessing
import os
import signal
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Generator, Iterable, Iterator, Literal, Union

from sslt_cli.data.annotations import (
    Annotation,
    DefectReport,
    annotations_to_vggss_json,
    clip_id_from_name,
    load_vggss_json,
    read_flickr_xml,
    read_id_list,
    read_annotation,
    read_labels,
    read_vggss_xml,
    vggss_xml_text,
    write_annotation_xml,
)
from sslt_cli.data.manifest import (
    COLUMNS,
    LAYOUTS,
    MANIFEST,
    SET_INFO,
    Clip,
    atomic_write_bytes,
    layout_paths,
    write_set,
)
from sslt_cli.data.workers import die_with_parent
from sslt_cli.errors import DataError

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.context import SpawnContext, SpawnProcess

    import numpy as np

OK = "ok"
MISSING = "missing"
NO_VIDEO = "no video stream"
NO_AUDIO = "no audio stream"
CORRUPT = "corrupt"
DECODE_ERROR = "decode error"
TOO_SHORT = "too short"
NO_ANNOTATION = "no annotation"

STATE_FILE = ".prepare_state.jsonl"
STATE_FORMAT = "sslt-prepare-state/1"
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm")
JPEG_QUALITY = 95
TRAIN_AUDIO_SECONDS = 3.0
CLIP_SECONDS = 10.0
FLICKR_TRAIN_FRAME = "00000003.jpg"
# A decoded stream may stop this much short of a window and still count as covering it: AAC and MP3 work in frames of
# ~23 ms, and container durations are rounded. The gap is filled with silence.
AUDIO_TOLERANCE_S = 0.05
# Non-reference frames whose presentation time is this far before the first wanted frame are not decoded.
SKIP_MARGIN_S = 0.5


@dataclass(frozen=True)
class PrepareResult:
    """What a prepare run did. ``failed`` maps a failure status (``corrupt``, ``too short``, ...) to its count;
    ``notes`` are diagnostics worth showing (ignored files, annotation defects)."""

    out: Path
    layout: str
    manifest: Path
    requested: int
    prepared: int
    already_done: int
    missing: int
    failed: dict[str, int]
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> int:
        """Usable clips in the set: prepared now plus already done."""
        return self.prepared + self.already_done

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())


@dataclass(frozen=True)
class AnnotationReport:
    """What :func:`prepare_vggss_annotations` / :func:`collect_vggss_json` did, with the defects found."""

    path: Path
    clips: int
    boxes: int
    written: int
    unchanged: int
    defects: DefectReport


# ---------------------------------------------------------------------------------------------------------------------
# Clip ids


def _requested_ids(id_list: Path | None, default: Iterable[str]) -> list[str]:
    """The ids to prepare, in order: the list's (normalised to ``<ytid>_<start 6 digits>`` where they are clip names)
    or ``default``."""
    if id_list is None:
        return list(default)
    ids = []
    seen = set()
    for raw in read_id_list(id_list):
        clip_id = clip_id_from_name(raw) or raw
        if clip_id not in seen:
            seen.add(clip_id)
            ids.append(clip_id)
    if not ids:
        raise DataError(f"{id_list}: the id list is empty")
    return ids


def _index_videos(videos: Path) -> tuple[dict[str, Path], list[str]]:
    """``{clip id: video file}`` for the clip-named videos in ``videos``, and notes on the files that were not used."""
    if not videos.is_dir():
        raise DataError(f"{videos}: no such folder (expected VGGSound clips named <ytid>_<start>.mp4)")
    found: dict[str, Path] = {}
    ignored: list[str] = []
    duplicates: list[str] = []
    for path in sorted(videos.iterdir()):
        if not path.is_file() or path.suffix.lower() not in VIDEO_SUFFIXES or path.name.startswith("."):
            continue
        clip_id = clip_id_from_name(path.stem)
        if clip_id is None:
            ignored.append(path.name)
        elif clip_id in found:
            duplicates.append(f"{path.name} (kept {found[clip_id].name})")
        else:
            found[clip_id] = path
    notes = []
    if ignored:
        notes.append(f"{len(ignored)} video file(s) in {videos} are not named <ytid>_<start>[_<end>] and were ignored: "
                     f"{', '.join(ignored[:5])}")
    if duplicates:
        notes.append(f"{len(duplicates)} video file(s) name a clip already found: {', '.join(duplicates[:5])}")
    return found, notes


# ---------------------------------------------------------------------------------------------------------------------
# Decoding (runs in worker processes; av, numpy, PIL and soundfile are imported here, not at start-up)


class _ClipFailure(Exception):
    """A clip cannot be prepared; carries its manifest status and reason."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _open_media(path: Path):
    import av

    try:
        return av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise _ClipFailure(CORRUPT, f"cannot open {path.name}: {exc}") from None


def _declared_end(stream, container) -> float | None:
    """The stream's duration from its header, in seconds from its start (the container's where the stream has none)."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return None


def _stream_origin(stream) -> float:
    return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0


def _nearest_frames(container, stream, origin: float, targets: list[float], fallback_fps: float) -> list:
    """Decode ``stream`` around ``targets`` (seconds from ``origin``) and return, for each, the frame whose timestamp is
    nearest; raises ``_ClipFailure`` where no frame lies within half a frame period of a target."""
    rate = stream.average_rate or stream.guessed_rate
    period = 1.0 / float(rate) if rate else 1.0 / fallback_fps
    # Seek to the last keyframe before the first target: decoding starts there, not at the clip's first frame.
    start = origin + max(min(targets) - period, 0.0)
    container.seek(int(start / stream.time_base), stream=stream, backward=True, any_frame=False)
    best: list = [None] * len(targets)
    best_distance = [math.inf] * len(targets)
    stop = max(targets) + period
    skip_until = min(targets) - SKIP_MARGIN_S
    codec = stream.codec_context
    last_time = None
    for packet in container.demux(stream):
        if packet.pts is not None:
            # Frames no other frame refers to (most B-frames) are skipped well before the targets: about a third less
            # decoding, and the frames kept are bit-identical. Decided per packet, by presentation time, so no frame
            # near a target is ever skipped whatever the decoder's reordering delay.
            codec.skip_frame = "NONREF" if float(packet.pts * stream.time_base) - origin < skip_until else "DEFAULT"
        for frame in packet.decode():
            if frame.time is None:
                continue
            last_time = frame.time - origin
            for i, target in enumerate(targets):
                distance = abs(last_time - target)
                if distance < best_distance[i]:
                    best[i], best_distance[i] = frame, distance
        if last_time is not None and last_time >= stop:
            break
    for target, distance in zip(targets, best_distance):
        if distance > period / 2 + 1e-3:
            declared = _declared_end(stream, container)
            ended = f"frames end at {last_time:.2f} s" if last_time is not None else "data stops before that point"
            if declared is not None and declared > target + period / 2:
                raise _ClipFailure(CORRUPT, f"truncated: no frame near t = {target:.2f} s (video {ended}) but the "
                                            f"header declares {declared:.2f} s")
            raise _ClipFailure(TOO_SHORT, f"video {ended}, before the frame at t = {target:.2f} s")
    return best


@contextmanager
def _decoder_failures() -> Iterator[None]:
    """Any decoder failure inside is this clip's problem, never the run's: it becomes a ``decode error``."""
    try:
        yield
    except _ClipFailure:
        raise
    except Exception as exc:
        raise _ClipFailure(DECODE_ERROR, f"{type(exc).__name__}: {exc}") from None


def _decode_audio(container, stream, origin: float, start: float, end: float, sample_rate: int,
                  need_until: float) -> "np.ndarray":
    """Mono float32 samples at ``sample_rate`` for ``[start, end)`` seconds after ``origin`` (the video's first frame,
    so audio and frame stay in sync), decoded from the current position of ``container``: ``(n,)`` with
    ``n = (end - start) * sample_rate``, or fewer where the stream ends earlier (its declared end, not the padding
    AAC and MP3 add to their last frame).

    Raises ``_ClipFailure`` if the audio ends before ``need_until``: ``corrupt`` if the header declares more,
    ``too short`` otherwise.
    """
    import av
    import numpy as np

    declared = _declared_end(stream, container)
    if declared is not None:
        declared += _stream_origin(stream) - origin
    # Convert any sample format/layout to planar float at the stream's own rate; the downmix is a plain channel mean.
    to_planar = None
    chunks: list[np.ndarray] = []
    first_time = 0.0
    native_rate = 0
    decoded = 0
    for frame in container.decode(stream):
        if to_planar is None:
            native_rate = frame.sample_rate
            to_planar = av.AudioResampler(format="fltp", layout=frame.layout.name, rate=native_rate)
            first_time = (frame.time - origin) if frame.time is not None else _stream_origin(stream) - origin
        for planar in to_planar.resample(frame):
            samples = planar.to_ndarray().astype(np.float32, copy=False)
            chunks.append(samples.mean(axis=0))
            decoded += samples.shape[1]
        # A little past the window, so the resampler's filter sees real signal at the window's end.
        if first_time + decoded / native_rate >= end + 0.1:
            break
    if not chunks:
        if declared:
            raise _ClipFailure(CORRUPT, f"truncated: the audio stream has no data but the header declares "
                                        f"{declared:.2f} s")
        raise _ClipFailure(TOO_SHORT, "the audio stream is empty")
    mono = np.concatenate(chunks)
    data_end = first_time + len(mono) / native_rate
    if declared is not None and data_end > declared:
        mono = mono[: max(0, int(round((declared - first_time) * native_rate)))]
        data_end = declared
    if data_end < need_until - AUDIO_TOLERANCE_S:
        if declared is not None and declared >= need_until:
            raise _ClipFailure(CORRUPT, f"truncated: audio data ends at {data_end:.2f} s but the header declares "
                                        f"{declared:.2f} s")
        raise _ClipFailure(TOO_SHORT, f"audio ends at {data_end:.2f} s, before {need_until:.2f} s")
    if native_rate != sample_rate:
        mono = _resample(mono, native_rate, sample_rate)
    return _audio_window(mono, first_time, data_end, start, end, sample_rate)


def _audio_window(mono: "np.ndarray", first_time: float, data_end: float, start: float, end: float,
                  sample_rate: int) -> "np.ndarray":
    """The ``[start, end)`` seconds of decoded audio ``mono`` (its first sample at ``first_time``, its data ending at
    ``data_end``): audio that starts after ``start`` (a late stream) or stops within the tolerance of ``end`` is padded
    with silence."""
    import numpy as np

    stop = end if data_end >= end - AUDIO_TOLERANCE_S else data_end
    first = int(round((start - first_time) * sample_rate))
    length = int(round((stop - start) * sample_rate))
    if first < 0:
        mono = np.concatenate([np.zeros(-first, np.float32), mono])
        first = 0
    window = mono[first: first + length]
    if len(window) < length:
        window = np.concatenate([window, np.zeros(length - len(window), np.float32)])
    return window


def _resample(mono: "np.ndarray", rate_in: int, rate_out: int) -> "np.ndarray":
    """Resample a mono float32 signal with libswresample (through PyAV)."""
    import av
    import numpy as np

    frame = av.AudioFrame.from_ndarray(mono[None, :], format="flt", layout="mono")
    frame.sample_rate = rate_in
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate_out)
    out = [f.to_ndarray()[0] for f in resampler.resample(frame)]
    out += [f.to_ndarray()[0] for f in resampler.resample(None)]
    return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros(0, np.float32)


def _jpeg_bytes(frame, size: tuple[int, int] | None) -> bytes:
    from PIL import Image

    if size is not None:
        frame = frame.reformat(width=size[0], height=size[1], interpolation="BICUBIC")
    buf = io.BytesIO()
    Image.fromarray(frame.to_ndarray(format="rgb24")).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _wav_bytes(samples: "np.ndarray", sample_rate: int) -> bytes:
    import numpy as np
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(samples, -1.0, 1.0), sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------------
# Jobs: one per clip, picklable, run in worker processes


@dataclass(frozen=True)
class _Outcome:
    clip_id: str
    status: str
    reason: str = ""


@dataclass(frozen=True)
class _VideoJob:
    """Frame(s) + audio (+ annotation XML) of one VGGSound clip.

    ``missing`` says why the video is not there (``source`` is then where it was looked for): such a job only names the
    outputs an earlier run may have left, and is never run.
    """

    clip_id: str
    label: str
    source: Path
    out: Path
    frame: str
    audio: str
    anno: str
    annotation: Annotation | None
    neighbours: tuple[tuple[int, str], ...]  # (frame index, relative path)
    frame_index: int
    fps: float
    sample_rate: int
    train: bool
    frame_size: tuple[int, int] | None
    missing: str = ""

    def outputs(self) -> list[tuple[str, int | None]]:
        """Relative output paths with the expected wav length in samples (None: not a wav, or length not fixed)."""
        wav_length = int(round(TRAIN_AUDIO_SECONDS * self.sample_rate)) if self.train else None
        outs = [(self.frame, None), (self.audio, wav_length)] + [(rel, None) for _, rel in self.neighbours]
        return outs + ([(self.anno, None)] if self.anno else [])

    def run(self) -> _Outcome:
        t = self.frame_index / self.fps
        targets = [t] + [index / self.fps for index, _ in self.neighbours]
        try:
            container = _open_media(self.source)
            with container:
                if not container.streams.video:
                    raise _ClipFailure(NO_VIDEO, f"{self.source.name} has no video stream")
                if not container.streams.audio:
                    raise _ClipFailure(NO_AUDIO, f"{self.source.name} has no audio stream")
                video, audio = container.streams.video[0], container.streams.audio[0]
                with _decoder_failures():
                    origin = _stream_origin(video)
                    frames = _nearest_frames(container, video, origin, targets, self.fps)
                    jpegs = [_jpeg_bytes(f, self.frame_size) for f in frames]
                    container.seek(0)
                    # train: the 3 s centred on the frame, all needed; test: the first 10 s, needed up to the frame
                    half = TRAIN_AUDIO_SECONDS / 2
                    start, end, need = (t - half, t + half, t + half) if self.train else (0.0, CLIP_SECONDS, t)
                    samples = _decode_audio(container, audio, origin, start, end, self.sample_rate, need)
        except _ClipFailure as failure:
            return _Outcome(self.clip_id, failure.status, failure.reason)
        atomic_write_bytes(self.out / self.audio, _wav_bytes(samples, self.sample_rate))
        for (_, rel), data in zip(self.neighbours, jpegs[1:]):
            atomic_write_bytes(self.out / rel, data)
        if self.annotation is not None:
            write_annotation_xml(self.out / self.anno, self.annotation)
        # The main frame last: its presence is what makes a clip look done to a reader that only checks it.
        atomic_write_bytes(self.out / self.frame, jpegs[0])
        return _Outcome(self.clip_id, OK)


@dataclass(frozen=True)
class _FlickrJob:
    """Image + first seconds of audio (+ the annotators' XML, copied) of one Flickr-SoundNet pair.

    ``missing`` says which files are not in the archive (``source`` and ``image`` are then where they were looked for):
    such a job only names the outputs an earlier run may have left, and is never run.
    """

    clip_id: str
    label: str
    source: Path  # the audio file
    image: Path
    anno_source: Path | None
    out: Path
    frame: str
    audio: str
    anno: str
    seconds: float
    sample_rate: int
    missing: str = ""

    def outputs(self) -> list[tuple[str, int | None]]:
        """Relative output paths with the expected wav length in samples (None: not a wav, or length not fixed)."""
        return [(self.frame, None), (self.audio, None)] + ([(self.anno, None)] if self.anno else [])

    def copied(self) -> dict[str, int]:
        """Outputs copied byte for byte, with their sources' sizes: a copy of that size is complete (a JPEG may
        carry bytes after its end-of-image marker, so the marker check alone would redo it on every run). A source no
        longer in the archive gives no size."""
        copies = [(self.frame, self.image)] + ([(self.anno, self.anno_source)] if self.anno_source is not None else [])
        return {rel: source.stat().st_size for rel, source in copies if source.is_file()}

    def run(self) -> _Outcome:
        from PIL import Image, UnidentifiedImageError

        try:
            try:
                image_bytes = self.image.read_bytes()
                with Image.open(io.BytesIO(image_bytes)) as img:
                    img.load()
                    if img.format != "JPEG":
                        buf = io.BytesIO()
                        img.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
                        image_bytes = buf.getvalue()
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
                raise _ClipFailure(CORRUPT, f"image {self.image.name}: {exc}") from None
            container = _open_media(self.source)
            with container:
                if not container.streams.audio:
                    raise _ClipFailure(NO_AUDIO, f"{self.source.name} has no audio stream")
                stream = container.streams.audio[0]
                with _decoder_failures():
                    samples = _decode_audio(container, stream, _stream_origin(stream), 0.0, self.seconds,
                                            self.sample_rate, 0.0)
        except _ClipFailure as failure:
            return _Outcome(self.clip_id, failure.status, failure.reason)
        atomic_write_bytes(self.out / self.audio, _wav_bytes(samples, self.sample_rate))
        if self.anno_source is not None:
            atomic_write_bytes(self.out / self.anno, self.anno_source.read_bytes())
        atomic_write_bytes(self.out / self.frame, image_bytes)
        return _Outcome(self.clip_id, OK)


_Job = Union[_VideoJob, _FlickrJob]


def _run_job(job: _Job) -> _Outcome:
    return job.run()


# ---------------------------------------------------------------------------------------------------------------------
# The engine shared by every prepare: skip what is done, run the rest in a process pool, journal, manifest


def _output_complete(path: Path, sample_rate: int, wav_length: int | None, known_size: int | None = None) -> bool:
    """True if ``path`` is a whole output file: a file of ``known_size`` bytes (the source's size for a byte-for-byte
    copy, or the size journaled when it was written), a JPEG ending with its end-of-image marker, a mono wav at
    ``sample_rate`` (of ``wav_length`` samples where given), any other file non-empty."""
    try:
        size = path.stat().st_size
    except OSError:
        return False
    if size == 0:
        return False
    if known_size is not None and size == known_size:
        return True
    if path.suffix == ".jpg":
        with open(path, "rb") as f:
            f.seek(-2, os.SEEK_END)
            return f.read(2) == b"\xff\xd9"
    if path.suffix == ".wav":
        import soundfile as sf

        try:
            info = sf.info(str(path))
        except (RuntimeError, sf.LibsndfileError):
            return False
        return (info.samplerate == sample_rate and info.channels == 1 and info.frames > 0
                and (wav_length is None or info.frames == wav_length))
    return True


def _fingerprint(job: _Job) -> list[list[int] | None]:
    """(size, mtime) of each source file of a clip: a failed clip is retried only when one of them changed."""
    sources = [job.source] + ([job.image] if isinstance(job, _FlickrJob) else [])
    stamps: list[list[int] | None] = []
    for path in sources:
        try:
            stat = path.stat()
            stamps.append([stat.st_size, stat.st_mtime_ns])
        except OSError:
            stamps.append(None)
    return stamps


class _Journal:
    """``.prepare_state.jsonl``: a header with the settings, then one line per finished clip (appended as it ends)."""

    def __init__(self, out: Path, settings: dict):
        self.path = out / STATE_FILE
        self.settings = settings
        self.entries: dict[str, dict] = {}
        if self.path.exists():
            lines = self.path.read_text().splitlines()
            parsed = []
            for line in lines:
                try:
                    parsed.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
            header = parsed[0] if parsed and parsed[0].get("format") == STATE_FORMAT else None
            if header is None:
                raise DataError(f"{self.path}: not a prepare journal sslt can read; delete it to start the journal "
                                "afresh (finished outputs are kept and recognised)")
            previous = header.get("settings", {})
            if previous != settings:
                changed = sorted(k for k in set(settings) | set(previous) if settings.get(k) != previous.get(k))
                details = ", ".join(f"{k} {previous.get(k)!r} -> {settings.get(k)!r}" for k in changed)
                raise DataError(f"{out}: already holds clips prepared with other settings ({details}); "
                                "use another --out folder, or delete this one to prepare it again")
            for entry in parsed[1:]:
                if "id" in entry:
                    self.entries[entry["id"]] = entry
        self._file = None

    def append(self, outcome: _Outcome, fingerprint: list[list[int] | None],
               outputs: dict[str, int] | None = None) -> None:
        """Record a finished clip: its outcome, its sources' (size, mtime) and, for ``ok``, its outputs' sizes (what
        tells later runs the outputs are whole, even once the sources are gone)."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not self.path.exists() or self.path.stat().st_size == 0
            self._file = open(self.path, "a")
            if fresh:
                self._file.write(json.dumps({"format": STATE_FORMAT, "settings": self.settings}) + "\n")
            elif not self.path.read_bytes().endswith(b"\n"):
                self._file.write("\n")  # close a line cut short by a kill so the next one parses
        entry = {"id": outcome.clip_id, "status": outcome.status, "reason": outcome.reason, "sources": fingerprint}
        if outputs is not None:
            entry["outputs"] = outputs
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        self.entries[outcome.clip_id] = entry

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _prepared_before(out: Path, journal: _Journal) -> set[str]:
    """Ids of the clips an earlier run prepared in ``out``: ``ok`` in its journal or in its manifest (which outlives a
    deleted journal). A run without an id list keeps them, whether or not their sources are still there."""
    ids = {clip_id for clip_id, entry in journal.entries.items() if entry.get("status") == OK}
    if (out / MANIFEST).is_file():
        with open(out / MANIFEST, newline="") as f:
            ids.update(row["id"] for row in csv.DictReader(f) if row.get("status") == OK and row.get("id"))
    return ids


def _outputs_complete(out: Path, job: _Job, entry: dict | None, sample_rate: int) -> bool:
    """True if every output of ``job`` is whole in ``out``; ``entry`` is the clip's journal line, whose output sizes
    vouch for copies whose sources are gone."""
    known = {**(job.copied() if isinstance(job, _FlickrJob) else {}), **((entry or {}).get("outputs") or {})}
    return all(_output_complete(out / rel, sample_rate, length, known.get(rel)) for rel, length in job.outputs())


@contextmanager
def _progress_bar(total: int, description: str, enabled: bool) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr (clips done, clips/s, elapsed, ETA); yields the function that advances it."""
    if not enabled or total == 0:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from sslt_cli.progress import RateColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                  console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def _run_jobs(jobs: list[_Job], workers: int | None) -> Iterator[_Outcome]:
    """Run ``jobs`` in a pool of worker processes, yielding outcomes as clips finish; ``workers=1`` runs them inline in
    this process instead (quicker for a few clips, but a crash in the decoder then ends the run).

    A worker process that dies (a segfault or an out-of-memory kill in the decoder) breaks the whole pool, losing the
    outcomes of every clip in flight. Those clips are run again, each in a process of its own, so the one whose process
    dies gets ``decode error`` and the others their own outcome; the remaining clips go on in a new pool.
    """
    if workers == 1:
        for job in jobs:
            yield job.run()
        return
    if not jobs:
        return
    n = min(workers or os.cpu_count() or 1, len(jobs))
    # spawn, not fork: the parent runs a progress thread, and forking a threaded process can deadlock.
    context = multiprocessing.get_context("spawn")
    queue = iter(jobs)
    while True:
        lost = yield from _run_pool(queue, n, context)
        if not lost:
            return
        for start in range(0, len(lost), n):
            yield from _run_alone(lost[start:start + n], context)


def _run_pool(queue: Iterator[_Job], n: int, context: SpawnContext) -> Generator[_Outcome, None, list[_Job]]:
    """Run the jobs of ``queue`` in a pool of ``n`` processes, yielding outcomes as clips finish, until ``queue`` is
    exhausted or a worker process dies; returns the jobs whose outcomes the broken pool lost (none if none died)."""
    pool = ProcessPoolExecutor(n, mp_context=context, initializer=die_with_parent, initargs=(os.getpid(),))
    in_flight: dict[Future, _Job] = {}
    lost: list[_Job] = []

    def submit(job: _Job) -> None:
        try:
            in_flight[pool.submit(_run_job, job)] = job
        except BrokenProcessPool:  # a worker died since the last outcome
            lost.append(job)

    try:
        # A bounded number in flight keeps memory flat on 190k clips.
        for job in itertools.islice(queue, 4 * n):
            submit(job)
        while in_flight:
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                job = in_flight.pop(future)
                if isinstance(future.exception(), BrokenProcessPool):
                    lost.append(job)
                    continue
                yield future.result()
                if not lost:  # a broken pool takes no more work: the rest of the queue goes to the next one
                    next_job = next(queue, None)
                    if next_job is not None:
                        submit(next_job)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return lost


def _run_alone(jobs: list[_Job], context: SpawnContext) -> Iterator[_Outcome]:
    """Run each job in a process of its own, all at once, yielding their outcomes in order. A job whose process dies
    gets ``decode error``: nothing else ran in that process, so the job is the cause."""
    runs: list[tuple[_Job, SpawnProcess, Connection]] = []
    try:
        for job in jobs:
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(target=_send_outcome, args=(job, sender, os.getpid()), daemon=True)
            process.start()
            sender.close()  # the child now holds the only writer, so its death ends the pipe
            runs.append((job, process, receiver))
        for job, process, receiver in runs:
            try:
                result = receiver.recv()
            except EOFError:  # the process died before sending anything
                result = None
            process.join()
            if isinstance(result, Exception):
                raise result
            yield result if result is not None else _Outcome(
                job.clip_id, DECODE_ERROR, f"worker process died while decoding ({_exit_cause(process.exitcode)})")
    finally:
        for _, process, receiver in runs:
            receiver.close()
            if process.is_alive():
                process.terminate()
            process.join()


def _send_outcome(job: _Job, connection: Connection, parent: int) -> None:
    """Run ``job`` and send its outcome, or the exception it raised (re-raised by the parent, as a pool's would be)."""
    die_with_parent(parent)
    try:
        result: _Outcome | Exception = job.run()
    except Exception as exc:
        result = exc
    connection.send(result)


def _exit_cause(exitcode: int | None) -> str:
    """How a process ended, from its exit code: ``signal SIGKILL`` for -9, ``exit code 1`` for 1."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:  # a signal without a name, such as a real-time one
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def _execute(*, out: Path, layout: str, journal: _Journal, order: list[str], fixed: dict[str, Clip],
             jobs: list[_Job], sample_rate: int, workers: int | None, progress: bool, description: str, info: dict,
             notes: list[str]) -> PrepareResult:
    """Skip finished clips, run the others, journal each outcome, then write the set for ``order``.

    ``fixed`` holds the rows decided without decoding (``missing``, ``no annotation``); ``jobs`` the clips to decode.
    A clip whose outputs are complete is ``ok`` without decoding, so a job whose source is gone (``job.missing``) is
    ``missing`` only when its outputs are not all there.
    """
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, Clip] = dict(fixed)
    to_run: list[_Job] = []
    already_done = 0
    for job in jobs:
        entry = journal.entries.get(job.clip_id)
        if _outputs_complete(out, job, entry, sample_rate):
            rows[job.clip_id] = _ok_row(job)
            already_done += 1
        elif job.missing:
            rows[job.clip_id] = Clip(job.clip_id, job.label, status=MISSING, reason=job.missing)
        elif entry and entry["status"] != OK and entry.get("sources") == _fingerprint(job):
            rows[job.clip_id] = Clip(job.clip_id, job.label, status=entry["status"], reason=entry["reason"])
        else:
            to_run.append(job)
    by_id = {job.clip_id: job for job in to_run}
    prepared = 0
    try:
        with _progress_bar(len(to_run), description, progress) as advance:
            for outcome in _run_jobs(to_run, workers):
                job = by_id[outcome.clip_id]
                sizes = {rel: (out / rel).stat().st_size for rel, _ in job.outputs()} if outcome.status == OK else None
                journal.append(outcome, _fingerprint(job), sizes)
                if outcome.status == OK:
                    rows[job.clip_id] = _ok_row(job)
                    prepared += 1
                else:
                    rows[job.clip_id] = Clip(job.clip_id, job.label, status=outcome.status, reason=outcome.reason)
                advance()
    except OSError as exc:
        raise DataError(f"{out}: cannot write the prepared files ({exc}); free some space or fix the permissions, "
                        "then run the same command again: finished clips are kept") from None
    finally:
        journal.close()
    ordered = [rows[clip_id] for clip_id in order]
    counts = Counter(row.status for row in ordered)
    failed = {status: n for status, n in sorted(counts.items()) if status not in (OK, MISSING)}
    info = {**info, "settings": journal.settings, "counts": dict(sorted(counts.items()))}
    manifest = _write_set_if_changed(out, layout, ordered, info)
    return PrepareResult(out=out, layout=layout, manifest=manifest, requested=len(order), prepared=prepared,
                         already_done=already_done, missing=counts.get(MISSING, 0), failed=failed, notes=tuple(notes))


def _ok_row(job: _Job) -> Clip:
    return Clip(job.clip_id, job.label, frame=job.frame, audio=job.audio, anno=job.anno)


def _write_set_if_changed(out: Path, layout: str, clips: list[Clip], info: dict) -> Path:
    """``write_set`` unless the folder already holds exactly this set (a re-run then writes nothing)."""
    try:
        with open(out / MANIFEST, newline="") as f:
            rows = [tuple(row[col] for col in COLUMNS) for row in csv.DictReader(f)]
        meta = json.loads((out / SET_INFO).read_text())
    except (OSError, KeyError, json.JSONDecodeError):
        return write_set(out, layout, clips, info)
    same_info = meta.get("layout") == layout and all(meta.get(k) == json.loads(json.dumps(v)) for k, v in info.items())
    if same_info and rows == [tuple(getattr(c, col) for col in COLUMNS) for c in clips]:
        return out / MANIFEST
    return write_set(out, layout, clips, info)


# ---------------------------------------------------------------------------------------------------------------------
# Public prepare functions


AUDIO_WINDOWS = {"train": "3 s centred on the frame", "test": "first 10 s"}


def _check_vggsound_options(split: str, frame_index: int, fps: float, neighbours: int, sample_rate: int) -> None:
    """A DataError for settings :func:`prepare_vggsound` cannot use, before anything is read."""
    if split not in ("train", "test"):
        raise DataError(f"split {split!r} is not one of train, test")
    if frame_index < 0 or fps <= 0 or neighbours < 0 or sample_rate <= 0:
        raise DataError(f"frame_index ({frame_index}), fps ({fps}), neighbours ({neighbours}) and sample_rate "
                        f"({sample_rate}) must be positive (frame_index and neighbours may be 0)")
    if frame_index - neighbours < 0:
        raise DataError(f"{neighbours} neighbours before frame {frame_index} would start before the clip's first frame")


def _neighbour_frames(clip_id: str, frame_index: int, neighbours: int) -> tuple[tuple[int, str], ...]:
    """(index, output path) of the ``neighbours`` frames either side of ``frame_index``."""
    return tuple((i, f"neighbours/{clip_id}/{i:03d}.jpg") for i in range(frame_index - neighbours,
                                                                        frame_index + neighbours + 1)
                 if i != frame_index)


def _vggss_boxes(vggss_json: Path | None, notes: list[str]) -> dict[str, Annotation]:
    """The boxes of ``vggss_json`` by clip id (none without one); its defects are added to ``notes``."""
    if vggss_json is None:
        return {}
    annotations, defects = load_vggss_json(vggss_json)
    notes += [f"{vggss_json}: {line}" for line in defects.summary()]
    return annotations


def prepare_vggsound(videos: Path, out: Path, *, split: Literal["train", "test"], id_list: Path | None = None,
                     vggss_json: Path | None = None, labels: Path | None = None, sample_rate: int = 16000,
                     frame_index: int = 125, fps: float = 25.0, neighbours: int = 0,
                     frame_size: tuple[int, int] | None = None, workers: int | None = None,
                     progress: bool = True) -> PrepareResult:
    """Prepare VGGSound clips (``<ytid>_<start>.mp4`` or ``<ytid>_<start>_<end>.mp4`` in ``videos``) into ``out``.

    ``split="train"``: layout ``vggsound_train``, frame + the 3 s of audio centred on it.
    ``split="test"``: layout ``vggss_test``, frame + the first 10 s of audio + ``anno/<id>.xml`` from ``vggss_json``.
    The frame is the one whose timestamp is nearest ``frame_index / fps`` seconds after the video's first frame (any
    frame rate); ``neighbours`` more frames either side (``t +- k / fps``) go to ``neighbours/<id>/<index>.jpg``.
    ``frame_size=(W, H)`` resizes frames (bicubic; the official training frames are 299x299), None keeps the video's.
    Audio: mono, ``sample_rate`` Hz, 16-bit wav, ``(3 * sample_rate,)`` samples for train.

    Clips requested: ``id_list`` (any form :func:`read_id_list` reads), else for test the ids of ``vggss_json``, else
    every clip-named video. Labels from ``labels`` (see :func:`read_labels`), else from ``vggss_json``'s classes.
    """
    _check_vggsound_options(split, frame_index, fps, neighbours, sample_rate)
    videos, out = Path(videos).expanduser(), Path(out).expanduser()
    layout = "vggsound_train" if split == "train" else "vggss_test"
    found, notes = _index_videos(videos)
    settings = {"kind": "vggsound", "split": split, "sample_rate": sample_rate, "frame_index": frame_index,
                "fps": fps, "neighbours": neighbours, "frame_size": list(frame_size) if frame_size else None,
                "audio_seconds": TRAIN_AUDIO_SECONDS if split == "train" else CLIP_SECONDS}
    journal = _Journal(out, settings)
    annotations = _vggss_boxes(vggss_json, notes)
    default = (list(annotations) if (split == "test" and annotations)
               else sorted(set(found) | _prepared_before(out, journal)))
    order = _requested_ids(id_list, default)
    label_of = read_labels(labels) if labels is not None else {k: a.label for k, a in annotations.items() if a.label}
    fixed: dict[str, Clip] = {}
    jobs: list[_Job] = []
    for clip_id in order:
        label = label_of.get(clip_id, "")
        source = found.get(clip_id)
        missing = "" if source is not None else f"no video {clip_id}.mp4 in {videos}"
        annotation = None
        if split == "test" and vggss_json is not None:
            annotation = annotations.get(clip_id)
            if annotation is None:
                fixed[clip_id] = (Clip(clip_id, label, status=MISSING, reason=missing) if missing else
                                  Clip(clip_id, label, status=NO_ANNOTATION,
                                       reason=f"{clip_id} has no boxes in {vggss_json}"))
                continue
        frame, audio, anno = layout_paths(layout, clip_id)
        # A clip whose video is gone still gets its job: it names the outputs an earlier run may have left.
        jobs.append(_VideoJob(
            clip_id=clip_id, label=label, source=source or videos / f"{clip_id}.mp4", out=out, frame=frame, audio=audio,
            anno=anno if annotation is not None else "", annotation=annotation,
            neighbours=_neighbour_frames(clip_id, frame_index, neighbours),
            frame_index=frame_index, fps=fps, sample_rate=sample_rate, train=split == "train",
            frame_size=tuple(frame_size) if frame_size else None, missing=missing,
        ))
    if split == "test" and vggss_json is None:
        notes.append("no VGG-SS box file (vggss.json) given: the test set has no boxes (anno column empty); it can "
                     "serve as a validation set, not for localisation metrics")
    info = {"source": "vggsound", "videos": str(videos), "audio_window": AUDIO_WINDOWS[split]}
    return _execute(out=out, layout=layout, journal=journal, order=order, fixed=fixed, jobs=jobs,
                    sample_rate=sample_rate, workers=workers, progress=progress,
                    description=f"vggsound {split}", info=info, notes=notes)


def _first_existing(archive: Path, candidates: Iterable[str]) -> Path | None:
    for rel in candidates:
        path = archive / rel
        if path.is_file():
            return path
    return None


def _flickr_sources(archive: Path, clip_id: str, train: bool) -> tuple[Path | None, Path | None, list[str], list[str]]:
    """The image and audio files of a Flickr-SoundNet pair, and the places looked at for each.

    The test archive ships ``Data/<id>.jpg`` + ``Data/<id>.mp3`` (some copies keep a folder per pair:
    ``Data/<id>/<id>.*``); training copies follow SSL-TIE's ``frames/<id>/00000003.jpg`` + ``mp3/<id>.mp3``; folders
    re-laid by other tools use ``frames/`` or ``frame/`` and ``audio/``.
    """
    images = ([f"frames/{clip_id}/{FLICKR_TRAIN_FRAME}"] if train else []) + [
        f"Data/{clip_id}.jpg", f"Data/{clip_id}/{clip_id}.jpg", f"frames/{clip_id}.jpg", f"frame/{clip_id}.jpg"]
    audios = [f"Data/{clip_id}.mp3", f"Data/{clip_id}.wav", f"Data/{clip_id}/{clip_id}.mp3",
              f"Data/{clip_id}/{clip_id}.wav", f"mp3/{clip_id}.mp3", f"audio/{clip_id}.wav", f"audio/{clip_id}.mp3"]
    return _first_existing(archive, images), _first_existing(archive, audios), images, audios


def _flickr_default_ids(archive: Path, train: bool, out: Path, journal: "_Journal") -> list[str]:
    """The pairs to prepare without an id list: every audio file (train) or annotation (test) of the archive, and
    those an earlier run prepared; a DataError when there is none."""
    if train:
        folder = next((archive / d for d in ("mp3", "Data", "audio") if (archive / d).is_dir()), None)
        found = sorted({p.stem for p in folder.iterdir() if p.suffix in (".mp3", ".wav")}) if folder else []
    else:
        anno_dir = archive / "Annotations"
        found = sorted(p.stem for p in anno_dir.glob("*.xml")) if anno_dir.is_dir() else []
    ids = sorted(set(found) | _prepared_before(out, journal))
    if not ids:
        raise DataError(f"{archive}: found no pairs to prepare (looked in "
                        f"{'mp3/, Data/, audio/' if train else 'Annotations/*.xml'}); pass --list with the ids")
    return ids


def prepare_flickr(archive: Path, out: Path, *, split: Literal["test", "train"] = "test", id_list: Path | None = None,
                   sample_rate: int = 16000, seconds: float | None = None, workers: int | None = None,
                   progress: bool = True) -> PrepareResult:
    """Prepare Flickr-SoundNet pairs from ``archive`` into ``out``.

    ``split="test"``: layout ``flickr_test``: ``frame/<id>.jpg`` (the archive's JPEG, copied byte for byte),
    ``audio/<id>.wav`` (the first ``seconds``, default 10: what SSL-TIE's and LVS's loaders keep) and ``anno/<id>.xml``
    (``Annotations/<id>.xml``, the three annotators' 256-grid boxes, copied after checking it parses).
    ``split="train"``: layout ``flickr_train``: ``frames/<id>/00000003.jpg`` and the first ``seconds`` of audio
    (default 4: SSL-TIE trains on the first 4 s of each Flickr mp3).
    Audio: mono, ``sample_rate`` Hz, 16-bit wav (up to ``(seconds * sample_rate,)`` samples; shorter audio is kept
    whole, the loaders tile it). Ids: ``id_list``, else every ``Annotations/*.xml`` (test) or audio file (train).
    """
    if split not in ("train", "test"):
        raise DataError(f"split {split!r} is not one of test, train")
    archive, out = Path(archive).expanduser(), Path(out).expanduser()
    if not archive.is_dir():
        raise DataError(f"{archive}: no such folder (expected the Flickr-SoundNet archive with Annotations/ and Data/)")
    train = split == "train"
    seconds = seconds if seconds is not None else (4.0 if train else CLIP_SECONDS)
    if seconds <= 0 or sample_rate <= 0:
        raise DataError(f"seconds ({seconds}) and sample_rate ({sample_rate}) must be positive")
    layout = "flickr_train" if train else "flickr_test"
    settings = {"kind": "flickr", "split": split, "sample_rate": sample_rate, "seconds": seconds}
    journal = _Journal(out, settings)
    order = _requested_ids(id_list, _flickr_default_ids(archive, train, out, journal) if id_list is None else ())
    fixed: dict[str, Clip] = {}
    jobs: list[_Job] = []
    notes: list[str] = []
    defects = DefectReport()
    for clip_id in order:
        image, audio, image_candidates, audio_candidates = _flickr_sources(archive, clip_id, train)
        anno_source = None if train else archive / "Annotations" / f"{clip_id}.xml"
        absent = [f"{kind} ({' | '.join(candidates[:2])})" for kind, found_at, candidates in
                  (("image", image, image_candidates), ("audio", audio, audio_candidates)) if found_at is None]
        if anno_source is not None and not anno_source.is_file():
            absent.append(f"annotation (Annotations/{clip_id}.xml)")
        if anno_source is not None and not absent:
            try:
                annotation = read_flickr_xml(anno_source, clip_id, defects)
            except DataError as exc:
                fixed[clip_id] = Clip(clip_id, status=CORRUPT, reason=exc.message)
                continue
            if not annotation.boxes:
                fixed[clip_id] = Clip(clip_id, status=NO_ANNOTATION, reason=f"{anno_source} holds no bbox")
                continue
        frame, audio_rel, anno = layout_paths(layout, clip_id)
        # A pair not in the archive still gets its job: it names the outputs an earlier run may have left.
        jobs.append(_FlickrJob(clip_id=clip_id, label="", source=audio or archive / audio_candidates[0],
                               image=image or archive / image_candidates[0], anno_source=anno_source, out=out,
                               frame=frame, audio=audio_rel, anno=anno, seconds=seconds, sample_rate=sample_rate,
                               missing=f"not in {archive}: {'; '.join(absent)}" if absent else ""))
    notes += [f"Annotations: {line}" for line in defects.summary()]
    info = {"source": "flickr-soundnet", "archive": str(archive), "audio_window": f"first {seconds:g} s"}
    return _execute(out=out, layout=layout, journal=journal, order=order, fixed=fixed, jobs=jobs,
                    sample_rate=sample_rate, workers=workers, progress=progress,
                    description=f"flickr {split}", info=info, notes=notes)


def prepare_vggss_annotations(json_path: Path, out_dir: Path) -> AnnotationReport:
    """Write ``<out_dir>/<id>.xml`` (the per-clip XML SSL-TIE's loader reads) for every clip of ``vggss.json``.

    Boxes are written as they are, defects included (the evaluation protocol decides what to do with them); the
    report lists the defects. An XML that already holds the same content is not rewritten.
    """
    json_path, out_dir = Path(json_path).expanduser(), Path(out_dir).expanduser()
    annotations, defects = load_vggss_json(json_path)
    written = unchanged = 0
    for clip_id, annotation in annotations.items():
        path = out_dir / f"{clip_id}.xml"
        if path.is_file() and path.read_text() == vggss_xml_text(annotation):
            unchanged += 1
            continue
        write_annotation_xml(path, annotation)
        written += 1
    return AnnotationReport(path=out_dir, clips=len(annotations), boxes=sum(len(a.boxes) for a in annotations.values()),
                            written=written, unchanged=unchanged, defects=defects)


def collect_vggss_json(anno_dir: Path, out_json: Path, *, id_list: Path | None = None) -> AnnotationReport:
    """The reverse of :func:`prepare_vggss_annotations`: one ``vggss.json`` (``[{"file", "class", "bbox"}]``) from the
    per-clip XMLs of ``anno_dir``, in ``id_list`` order if given (every id must have its XML), else sorted by id."""
    anno_dir, out_json = Path(anno_dir).expanduser(), Path(out_json).expanduser()
    if not anno_dir.is_dir():
        raise DataError(f"{anno_dir}: no such folder (expected per-clip VGG-SS XML files <id>.xml)")
    ids = read_id_list(id_list) if id_list is not None else sorted(p.stem for p in anno_dir.glob("*.xml"))
    if not ids:
        raise DataError(f"{anno_dir}: holds no .xml file")
    defects = DefectReport()
    annotations = [read_vggss_xml(anno_dir / f"{clip_id}.xml", clip_id, defects) for clip_id in ids]
    text = json.dumps(annotations_to_vggss_json(annotations))
    unchanged = out_json.is_file() and out_json.read_text() == text
    if not unchanged:
        atomic_write_bytes(out_json, text.encode())
    return AnnotationReport(path=out_json, clips=len(annotations), boxes=sum(len(a.boxes) for a in annotations),
                            written=0 if unchanged else 1, unchanged=1 if unchanged else 0, defects=defects)


def _ids_in(root: Path, template: str) -> set[str] | None:
    """Clip ids present under ``root`` for one layout path template (``frame/{id}.jpg``: the .jpg files of frame/;
    ``total_video_frames/{id}/125.jpg``: the folders of total_video_frames/); None when that folder is absent."""
    folder, rest = template.split("{id}")
    base = root / folder
    if not base.is_dir():
        return None
    if rest.startswith("/"):
        return {p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")}
    return {p.name[: -len(rest)] for p in base.iterdir() if p.name.endswith(rest) and not p.name.startswith(".")}


def _listed_ids(root: Path, layout: str) -> list[str]:
    """Every clip id that any of the layout's folders (frames, audio, boxes) has a file for, sorted: a clip whose
    frame is missing is listed (as incomplete) from its audio or box file."""
    templates = [t for t in LAYOUTS[layout][:3] if t]
    found = [ids for ids in (_ids_in(root, t) for t in templates) if ids is not None]
    if not found:
        folders = ", ".join(t.split("{id}")[0] for t in templates)
        raise DataError(f"{root}: none of {folders} is there, so this is not a {layout} folder "
                        f"(expected {', '.join(templates)}); pass --list to name the clips")
    return sorted(set().union(*found))


def _clip_problem(root: Path, layout: str, clip_id: str) -> tuple[str, str] | None:
    """(status, reason) of a clip that cannot be used, else None: absent or empty files are ``missing``; a frame or
    audio file whose header does not read, or a box file that does not parse, is ``decode error``."""
    import soundfile

    from PIL import Image, UnidentifiedImageError

    paths = [p for p in layout_paths(layout, clip_id) if p]
    absent = [p for p in paths if not (root / p).is_file() or (root / p).stat().st_size == 0]
    if absent:
        return MISSING, "no file " + ", ".join(absent)
    frame, audio, anno = layout_paths(layout, clip_id)
    try:
        with Image.open(root / frame) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        return DECODE_ERROR, f"{frame}: not a readable image ({exc})"
    try:
        info = soundfile.info(str(root / audio))
    except RuntimeError as exc:  # soundfile's errors (LibsndfileError) are RuntimeErrors
        return DECODE_ERROR, f"{audio}: not a readable audio file ({' '.join(str(exc).split())})"
    if info.frames == 0:
        return DECODE_ERROR, f"{audio}: holds no samples"
    if anno:
        try:
            read_annotation(root / anno, LAYOUTS[layout][3], clip_id)
        except DataError as exc:
            return DECODE_ERROR, exc.message
    return None


def index_existing(root: Path, layout: str, id_list: Path | None = None, *,
                   labels: Path | None = None, workers: int | None = None) -> PrepareResult:
    """Write ``set.json`` + ``manifest.csv`` for a folder already laid out by other tools (nothing else is written).

    Clips: ``id_list``, else every clip any of the layout's folders has a file for. Each clip is checked in
    ``workers`` threads (default: 2 per CPU): a clip whose frame, audio or annotation file is absent or empty is
    ``missing``, one whose frame or audio header does not read or whose annotation does not parse is ``decode
    error``; each such clip is listed in ``notes`` with its reason. Labels from ``labels`` (see :func:`read_labels`).
    """
    from concurrent.futures import ThreadPoolExecutor

    root = Path(root).expanduser()
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    order = _listed_ids(root, layout) if id_list is None else _requested_ids(id_list, ())
    label_of = read_labels(labels) if labels is not None else {}
    with ThreadPoolExecutor(workers or 2 * (os.cpu_count() or 1)) as pool:
        problems = list(pool.map(lambda clip_id: _clip_problem(root, layout, clip_id), order, chunksize=64))
    rows = []
    for clip_id, problem in zip(order, problems):
        label = label_of.get(clip_id, "")
        if problem is not None:
            rows.append(Clip(clip_id, label, status=problem[0], reason=problem[1]))
        else:
            frame, audio, anno = layout_paths(layout, clip_id)
            rows.append(Clip(clip_id, label, frame=frame, audio=audio, anno=anno))
    counts = Counter(row.status for row in rows)
    manifest = _write_set_if_changed(root, layout, rows, {"source": "index", "counts": dict(sorted(counts.items()))})
    return PrepareResult(out=root, layout=layout, manifest=manifest, requested=len(order), prepared=0,
                         already_done=counts.get(OK, 0), missing=counts.get(MISSING, 0),
                         failed={k: v for k, v in counts.items() if k not in (OK, MISSING)},
                         notes=tuple(f"incomplete clip {row.id}: {row.status}: {row.reason}" for row in rows
                                     if row.status != OK))


__all__ = [
    "AnnotationReport", "PrepareResult", "clip_id_from_name", "collect_vggss_json", "index_existing",
    "prepare_flickr", "prepare_vggss_annotations", "prepare_vggsound", "read_labels",
]
