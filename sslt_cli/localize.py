"""``sslt localize``: where a model hears the sound in a user's videos (or still frames with a sound file).

For a video the frames shown at ``fps`` sampled times are decoded by seeking (``media.frames_at``), each with the
audio window the model was trained on (the recipe's clip length, or ``window``) centred on the frame, cut and tiled at
the ends as training tiles a short clip, turned into the recipe's log-mel. A thread decodes and prepares the next
batches while the model runs the current one. Per input, in ``OUT/<name>/``: ``overlay.mp4`` (heatmap over each
sampled frame, colour bar, time stamp, the original audio), ``contact_sheet.png``, ``max_cosine.svg``,
``localize.csv`` / ``localize.json`` (per frame: peak x, y normalised to [0, 1], the map's maximum and mean cosine,
the share of the frame above the protocol's threshold, and the calibrated scores of ``calibration.py``), ``maps.npz``
with ``save_maps``. Still frame + sound: ``overlay.png`` and the same records. ``OUT/index.html`` shows them all.

Frames are squashed to the model's square input (``resize_square``), so the map covers the whole picture, whatever
its aspect ratio. An input that cannot be used (unreadable, no video or audio stream, too short, truncated) is
reported with its reason and the others go on; its partial outputs are removed.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from sslt_cli import localize_render as render
from sslt_cli.errors import DataError, SsltError
from sslt_cli.media import (VIDEO_SUFFIXES, AudioChunks, Mp4Writer, aac_rate, frames_at, probe_video,
                            sample_times)

T = TypeVar("T")
MIN_AUDIO_S = 0.1
CSV_HEADER = ("frame", "time_s", "peak_x", "peak_y", "max_cos", "mean_cos", "share_above_threshold", "visible",
              "matched_percentile", "confidence")


@dataclass(frozen=True)
class LocalizeOptions:
    """``fps``: frames sampled per second of video; ``window``: audio seconds per frame (None: the recipe's
    clip length); ``display``: longer side of the output pictures (px); ``sheet_frames``: pictures on the sheet."""

    fps: float = 2.0
    window: float | None = None
    batch_size: int = 16
    save_maps: bool = False
    display: int = 384
    sheet_frames: int = 8


@dataclass
class FrameRecord:
    """One sampled frame's result; ``visible`` / ``matched_percentile`` are None without a calibration;
    ``confidence`` is the evaluation's (SLAVC's mean of the top quarter of the map on the common scale, as
    ``sslt eval --negatives`` ranks sounding against non-sounding pairs)."""

    frame: int
    time_s: float
    peak_x: float
    peak_y: float
    max_cos: float
    mean_cos: float
    share_above_threshold: float
    visible: float | None = None
    matched_percentile: float | None = None
    confidence: float | None = None


@dataclass(frozen=True)
class MediaInput:
    """A video file, or a still frame with a sound file; ``name`` is its output folder."""

    name: str
    video: Path | None = None
    image: Path | None = None
    audio: Path | None = None

    @property
    def source(self) -> str:
        return str(self.video) if self.video is not None else f"{self.image} + {self.audio}"


@dataclass
class InputResult:
    """What happened to one input: its records and files (paths relative to the output folder), or its error."""

    name: str
    source: str
    records: list[FrameRecord] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Timings:
    """Seconds spent loading the model and its calibration, decoding and preparing inputs (in the loader thread), in
    the model, and drawing and encoding."""

    setup: float = 0.0
    decode: float = 0.0
    model: float = 0.0
    write: float = 0.0
    frames: int = 0


@dataclass
class LocalizeResult:
    inputs: list[InputResult]
    out: Path
    page: Path
    model: str
    calibration_note: str
    timings: Timings
    wall_s: float

    @property
    def failed(self) -> list[InputResult]:
        return [item for item in self.inputs if item.error]


@dataclass
class _Batch:
    indices: list[int]
    times: list[float]
    pictures: list[np.ndarray]  # at display size, (h, w, 3) uint8
    images: torch.Tensor  # (B, 3, S, S) normalised model input
    specs: torch.Tensor  # (B, 1, n_mels, T)


@dataclass
class _Context:
    """Everything one call needs: the model and its recipe, the protocol, options, calibration, timings."""

    loaded: Any
    protocol: Any
    options: LocalizeOptions
    device: torch.device
    calibration: Any
    timings: Timings
    transform: Callable[[Any], torch.Tensor]

    @property
    def window(self) -> float:
        """Seconds of audio per frame: the option, else the model's front end's window (a released model's own)."""
        from sslt_cli.frontends import FRONT_ENDS

        audio = self.loaded.recipe.audio
        own = FRONT_ENDS[audio.front_end].window_seconds if audio.front_end in FRONT_ENDS else audio.clip_seconds
        return self.options.window or float(own)


# ----------------------------------------------------------------------------------------------------------- inputs

def collect_inputs(media: Sequence[Path], images: Sequence[Path] = (), audios: Sequence[Path] = (),
                   taken: Iterable[str] = ()) -> tuple[list[MediaInput], list[InputResult]]:
    """Inputs from video files, folders of videos (searched recursively, by suffix) and image+audio pairs.

    Returns (inputs with unique names, none of them in ``taken`` (the names an earlier run into the same output
    folder used): ``clip``, ``clip-2``, ...; a failed result for each path that does not exist or folder without
    videos).
    """
    if len(images) != len(audios):
        raise SsltError(f"--image and --audio come in pairs: got {len(images)} --image and {len(audios)} --audio")
    found: list[tuple[str, Path | None, Path | None, Path | None]] = []
    failed: list[InputResult] = []
    for path in media:
        if path.is_dir():
            videos = sorted(p for p in path.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
            if not videos:
                failed.append(InputResult(path.name, str(path), error=f"{path}: no video files here "
                                          f"({', '.join(VIDEO_SUFFIXES)})"))
            found += [(v.stem, v, None, None) for v in videos]
        elif path.exists():
            found.append((path.stem, path, None, None))
        else:
            failed.append(InputResult(path.name, str(path), error=f"{path}: no such file or folder"))
    found += [(image.stem, None, image, audio) for image, audio in zip(images, audios)]
    taken = {item.name for item in failed} | set(taken)
    inputs = []
    for stem, video, image, audio in found:
        name, k = stem or "input", 2
        while name in taken:
            name, k = f"{stem}-{k}", k + 1
        taken.add(name)
        inputs.append(MediaInput(name, video, image, audio))
    return inputs, failed


# ------------------------------------------------------------------------------------------------------ model inputs

def _prefetch(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Run an iterator in a thread, ``depth`` items ahead of the consumer; its exceptions reach the consumer."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> None:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def work() -> None:
        try:
            for item in items:
                put(item)
                if stop.is_set():
                    return
            put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put(exc)

    thread = threading.Thread(target=work, name="sslt-localize-loader", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _window_bounds(centre: float, seconds: float, sample_rate: int, length: int) -> tuple[int, int]:
    """[lo, hi) of the ``seconds`` window centred on ``centre`` in a wave of ``length`` samples: the part inside the
    wave (at least its last sample, for a window after its end)."""
    n = int(round(seconds * sample_rate))
    start = int(round(centre * sample_rate)) - n // 2
    lo = min(max(0, start), length - 1)
    return lo, max(lo + 1, min(length, start + n))


def _window_spec_batch(pieces: Sequence[np.ndarray], sample_rate: int, seconds: float, audio: Any) -> torch.Tensor:
    """The model's input for each window: log-mel, or under a released model's front end (``audio.front_end``)
    that front end's spectrogram (:func:`sslt_cli.frontends.spectrogram_of_wave`)."""
    from sslt_cli.audio import log_mel, tile_and_cut
    from sslt_cli.frontends import spectrogram_of_wave

    tiled = [tile_and_cut(piece, seconds, sample_rate) for piece in pieces]
    if audio.front_end != "logmel":
        return torch.stack([spectrogram_of_wave(piece, sample_rate, audio.front_end) for piece in tiled])
    return log_mel(np.stack(tiled), sample_rate, n_fft=audio.n_fft, hop_length=audio.hop_length,
                   n_mels=audio.n_mels, normalized=audio.normalized)


def window_specs(wave: np.ndarray, sample_rate: int, centres: Sequence[float], seconds: float, audio: Any
                 ) -> torch.Tensor:
    """Log-mel of the ``seconds`` window centred on each time: wave (N,) mono at ``sample_rate`` ->
    (B, 1, n_mels, T). A window reaching past either end keeps the part inside and tiles it to full length, as
    training tiles a short clip (``audio.tile_and_cut``). Under a released model's front end (``audio.front_end``)
    each window is that front end's spectrogram."""
    pieces = [wave[lo:hi] for lo, hi in (_window_bounds(c, seconds, sample_rate, len(wave)) for c in centres)]
    return _window_spec_batch(pieces, sample_rate, seconds, audio)


class StreamingWave:
    """A video's sound as the model hears it (mono, at ``sample_rate``), decoded forward as the windows of the
    sampled frames ask for it: the same samples as decoding the whole track, downmixing and resampling it at once,
    holding only the samples from the earliest window still to come.

    Resampling runs on blocks of the native sound with ``RESAMPLE_CONTEXT`` samples of context on either side (more
    than the resampling filter reaches), each block starting on a multiple of the rates' ratio, so every output
    sample is computed from the same inputs as in one pass over the whole track.
    """

    RESAMPLE_CONTEXT = 4096  # native samples either side of a block: the filter reaches about 6 periods
    BLOCK = 1 << 16  # native samples decoded at a time

    def __init__(self, chunks: AudioChunks, sample_rate: int):
        common = math.gcd(chunks.rate, sample_rate)
        self.chunks, self.sample_rate = chunks, sample_rate
        self.up, self.down = sample_rate // common, chunks.rate // common
        self.context = self.down * -(-self.RESAMPLE_CONTEXT // self.down)
        self.native = np.zeros(0, np.float32)  # mono native samples from native_start (done's left context on)
        self.native_start = self.done = 0  # native samples resampled into `wave` so far
        self.wave = np.zeros(0, np.float32)  # model-rate samples from wave_start
        self.wave_start = 0
        self.held_max = 0  # the most samples (native + model rate) held at once: bounded by the windows, not the file

    @property
    def wave_end(self) -> int:
        return self.wave_start + len(self.wave)

    def _advance(self) -> None:
        """Decode the next block and resample what has enough context (everything, at the end of the sound)."""
        from sslt_cli.audio import resample

        chunk = self.chunks.read(self.BLOCK)
        self.native = np.concatenate([self.native, chunk.mean(axis=0, dtype=np.float32)])
        end = self.native_start + len(self.native)
        until = end if self.chunks.ended else (end - self.context) // self.down * self.down
        if until > self.done:
            left = min(self.context, self.done)
            piece = self.native[self.done - left - self.native_start:min(end, until + self.context) - self.native_start]
            out = resample(torch.from_numpy(piece), self.chunks.rate, self.sample_rate).numpy()
            skip = left // self.down * self.up
            count = (-(-until * self.up // self.down) if self.chunks.ended else until // self.down * self.up) \
                - self.done // self.down * self.up
            self.wave = np.concatenate([self.wave, out[skip:skip + count]])
            self.done = until
            keep_from = max(0, self.done - self.context)
            self.native, self.native_start = self.native[keep_from - self.native_start:], keep_from
        self.held_max = max(self.held_max, len(self.native) + len(self.wave))

    def seconds_at_least(self, seconds: float) -> float:
        """Decode until ``seconds`` of sound are known; the seconds known (fewer only for a shorter sound)."""
        need = int(math.ceil(seconds * self.sample_rate))
        while self.wave_end < need and not self.chunks.ended:
            self._advance()
        return self.chunks.position / self.chunks.rate if self.chunks.ended else self.wave_end / self.sample_rate

    def specs(self, centres: Sequence[float], seconds: float, audio: Any) -> torch.Tensor:
        """:func:`window_specs` of the whole track for these (ascending) centres; samples before the first window
        are then let go."""
        pieces = []
        for centre in centres:
            need = _window_bounds(centre, seconds, self.sample_rate, 1 << 62)[1]
            while self.wave_end < need and not self.chunks.ended:
                self._advance()
            if self.wave_end == 0:
                raise DataError(f"{self.chunks.path}: the audio stream holds no samples")
            lo, hi = _window_bounds(centre, seconds, self.sample_rate, self.wave_end)
            pieces.append(self.wave[lo - self.wave_start:hi - self.wave_start].copy())
        # the next windows start no earlier than this batch's last one
        last = _window_bounds(centres[-1], seconds, self.sample_rate, self.wave_end)[0] if centres else self.wave_start
        self.wave, self.wave_start = self.wave[last - self.wave_start:], last
        return _window_spec_batch(pieces, self.sample_rate, seconds, audio)


def _video_batches(ctx: _Context, path: Path, times: list[float], wave: StreamingWave, size: tuple[int, int]
                   ) -> Iterator[_Batch]:
    """Decoded, prepared batches of the sampled frames (runs in the loader thread; its time is ``timings.decode``)."""
    from PIL import Image

    audio = ctx.loaded.recipe.audio
    frames = frames_at(path, times)
    for first in range(0, len(times), ctx.options.batch_size):
        start = time.perf_counter()
        batch = _Batch([], [], [], torch.empty(0), torch.empty(0))
        images = []
        for index, shown, rgb in (next(frames) for _ in times[first:first + ctx.options.batch_size]):
            image = Image.fromarray(rgb)
            images.append(ctx.transform(image))
            batch.indices.append(index)
            batch.times.append(shown)
            batch.pictures.append(np.asarray(image.resize(size, Image.BILINEAR)))
        batch.images = torch.stack(images)
        batch.specs = wave.specs(batch.times, ctx.window, audio)
        ctx.timings.decode += time.perf_counter() - start
        yield batch


# ------------------------------------------------------------------------------------------------------ model, maps

def _predict(ctx: _Context, images: torch.Tensor, specs: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S), (B, 1, F, T) -> (B, h, w) float32 cosine maps on the CPU."""
    from sslt_cli.model import autocast_for

    start = time.perf_counter()
    with torch.inference_mode(), autocast_for(ctx.device, ctx.loaded.recipe.eval.precision):
        maps, _, _ = ctx.loaded.model(images.to(ctx.device), specs.to(ctx.device))
    out = maps[:, 0].float().cpu()
    ctx.timings.model += time.perf_counter() - start
    return out


def _records(ctx: _Context, maps: torch.Tensor, indices: Sequence[int], times: Sequence[float]
             ) -> tuple[list[FrameRecord], torch.Tensor]:
    """Per-frame records of (B, h, w) maps, and the maps upsampled to the protocol's grid (B, S, S)."""
    from sslt_cli import metrics
    from sslt_cli.evaluate.maps import map_value_range

    proto = ctx.protocol
    up, masks = metrics.predict_masks(maps, proto)
    above = masks.float().mean(dim=(1, 2))
    flat = up.reshape(up.shape[0], -1).argmax(dim=1)
    peak_y, peak_x = (flat // proto.size + 0.5) / proto.size, (flat % proto.size + 0.5) / proto.size
    max_cos, mean_cos = maps.amax(dim=(1, 2)).numpy(), maps.mean(dim=(1, 2)).numpy()
    visible = matched = [None] * len(indices)
    if ctx.calibration is not None:
        visible, matched = (list(map(float, s)) for s in ctx.calibration.scores(max_cos))
    confidence = metrics.slavc_confidence(up, map_value_range(ctx.loaded)).numpy()
    records = [FrameRecord(int(i), round(float(t), 4), round(float(x), 4), round(float(y), 4), float(mx), float(mn),
                           float(a), v, m, float(c))
               for i, t, x, y, mx, mn, a, v, m, c in zip(indices, times, peak_x, peak_y, max_cos, mean_cos, above,
                                                         visible, matched, confidence)]
    return records, up


def _overlay(picture: np.ndarray, up: torch.Tensor, original: torch.Tensor, record: FrameRecord) -> np.ndarray:
    """The overlay picture of one frame: up (S, S) upsampled map, original (h, w) map, picture (H, W, 3)."""
    import torch.nn.functional as F

    h, w = picture.shape[:2]
    heat = F.interpolate(up[None, None], size=(h, w), mode="bilinear", align_corners=False)[0]
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)  # colours span this frame's range
    caption = f"{record.time_s:6.2f} s  max cos {record.max_cos:.2f}" + (
        f"  conf {record.confidence:.2f}" if record.confidence is not None else "")
    if record.visible is not None:
        caption += f"  visible {record.visible:.0%}"
    return render.overlay(picture, heat[0].numpy(), (record.peak_x, record.peak_y), float(original.min()),
                          float(original.max()), caption)


# ------------------------------------------------------------------------------------------------------- per input

def localize_video(ctx: _Context, item: MediaInput, folder: Path) -> InputResult:
    """Run the model over a video's sampled frames and write its outputs into ``folder``. The sound is decoded as
    the frames need it, once for the model's windows (:class:`StreamingWave`) and once for the MP4, so memory is
    bounded by a batch whatever the video's length."""
    path = item.video
    info = probe_video(path)
    times = sample_times(info.duration, ctx.options.fps)
    size = render.display_size(info.width, info.height, ctx.options.display)
    result = InputResult(item.name, str(path))
    with AudioChunks(path) as heard, AudioChunks(path, rate=aac_rate(info.audio_rate)) as muxed:
        wave = StreamingWave(heard, ctx.loaded.recipe.audio.sample_rate)
        known = wave.seconds_at_least(MIN_AUDIO_S)
        if known < MIN_AUDIO_S:
            raise DataError(f"{path}: too short: the audio lasts {known:.3f} s, at least {MIN_AUDIO_S} s is needed")
        with Mp4Writer(folder / "overlay.mp4", size[0] + render.BAR_WIDTH, size[1], ctx.options.fps,
                       muxed) as writer:
            sheet, maps = _run_frames(ctx, item, result, _video_batches(ctx, path, times, wave, size), writer,
                                      set(render.sheet_indices(len(times), ctx.options.sheet_frames)))
        ended = writer.audio_written / muxed.rate
    if muxed.ended and ended < info.duration - 1.0 / ctx.options.fps:
        result.notes.append(f"the audio ends at {ended:.2f} s, before the video ({info.duration:.2f} s): later "
                            f"frames are paired with the last audio")
    ctx.timings.frames += len(result.records)
    render.write_png(render.contact_sheet(sheet), folder / "contact_sheet.png")
    result.files.update(video="overlay.mp4", sheet="contact_sheet.png")
    _write_common(ctx, result, folder, maps)
    return result


def _run_frames(ctx: _Context, item: MediaInput, result: InputResult, batches: Iterator[_Batch], writer: Mp4Writer,
                keep: set[int]) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """The model over the batches (prepared in a loader thread), each overlay written to the MP4: the contact
    sheet's pictures (frames in ``keep``) and the raw maps (with ``save_maps``); records go into ``result``."""
    sheet: list[np.ndarray] = []
    maps: dict[str, np.ndarray] = {}
    for batch in _prefetch(batches):
        raw = _predict(ctx, batch.images, batch.specs)
        records, up = _records(ctx, raw, batch.indices, batch.times)
        start = time.perf_counter()
        for record, up_map, raw_map, picture in zip(records, up, raw, batch.pictures):
            drawn = _overlay(picture, up_map, raw_map, record)
            writer.write(drawn)
            if record.frame in keep:
                sheet.append(drawn)
            if ctx.options.save_maps:
                maps[f"{item.name}_{record.frame:06d}"] = raw_map.numpy()
        ctx.timings.write += time.perf_counter() - start
        result.records += records
    return sheet, maps


def localize_pair(ctx: _Context, item: MediaInput, folder: Path) -> InputResult:
    """A still frame with a sound file: the window from the sound's start (as ``sslt eval`` cuts it)."""
    from sslt_cli.audio import load_waveform
    from sslt_cli.data.datasets import read_frame

    image = read_frame(str(item.image))
    audio = ctx.loaded.recipe.audio
    if audio.front_end != "logmel":  # a released model: its own front end on the file, as sslt eval reads it
        from sslt_cli.frontends import spectrogram_of_file

        specs = spectrogram_of_file(item.audio, audio.front_end)[None]
    else:
        wave, _ = load_waveform(item.audio, audio.sample_rate)
        specs = window_specs(wave, audio.sample_rate, [ctx.window / 2], ctx.window, audio)
    raw = _predict(ctx, ctx.transform(image)[None], specs)
    records, up = _records(ctx, raw, [0], [0.0])
    picture = np.asarray(image.resize(render.display_size(*image.size, ctx.options.display)))
    render.write_png(_overlay(picture, up[0], raw[0], records[0]), folder / "overlay.png")
    ctx.timings.frames += 1
    result = InputResult(item.name, item.source, records=records, files={"overlay": "overlay.png"})
    _write_common(ctx, result, folder, {item.name: raw[0].numpy()} if ctx.options.save_maps else {})
    return result


def _write_common(ctx: _Context, result: InputResult, folder: Path, maps: dict[str, np.ndarray]) -> None:
    """localize.csv, localize.json, the plot (videos) and maps.npz (with ``save_maps``) of one input."""
    from sslt_cli.evaluate import save_maps

    rows = [dataclasses.astuple(r) for r in result.records]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    (folder / "localize.csv").write_text(text.getvalue())
    doc = {"input": result.source, "model": str(ctx.loaded.source), "protocol": ctx.protocol.name,
           "fps": ctx.options.fps, "window_s": ctx.window, "notes": result.notes,
           "calibration": ctx.calibration.summary() if ctx.calibration is not None else None,
           "frames": [dataclasses.asdict(r) for r in result.records]}
    (folder / "localize.json").write_text(json.dumps(doc, indent=1) + "\n")
    result.files.update(csv="localize.csv", json="localize.json")
    if len(result.records) > 1:
        series = {"max cos": [r.max_cos for r in result.records]}
        title = "map maximum (max cosine) over time"
        (folder / "max_cosine.svg").write_text(render.curve_svg([r.time_s for r in result.records], series, title))
        result.files["plot"] = "max_cosine.svg"
    if maps:
        save_maps(maps, folder / "maps.npz")
        result.files["maps"] = "maps.npz"


def _localize_one(ctx: _Context, item: MediaInput, out: Path) -> InputResult:
    """One input into ``out/<name>/``, written to a hidden folder first: a failed input leaves nothing behind."""
    partial = out / f".{item.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        result = (localize_video if item.video is not None else localize_pair)(ctx, item, partial)
    except DataError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        return InputResult(item.name, item.source, error=exc.message)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    final = out / item.name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    result.files = {kind: f"{item.name}/{name}" for kind, name in result.files.items()}
    return result


# ------------------------------------------------------------------------------------------------------------- run

def _summary(item: InputResult) -> str:
    if not item.records:
        return ""
    peak = max(item.records, key=lambda r: r.max_cos)
    text = f"{len(item.records)} frame(s); highest map maximum {peak.max_cos:.3f} at {peak.time_s:.2f} s"
    if peak.visible is not None:
        text += f" (visible {peak.visible:.0%})"
    if peak.confidence is not None:
        text += f"; confidence {peak.confidence:.3f} there (highest {max(r.confidence or 0.0 for r in item.records):.3f})"
    return text + "".join(f"; {note}" for note in item.notes)


def localize(model: Path, media: Sequence[Path], out: Path, *, images: Sequence[Path] = (),
             audios: Sequence[Path] = (), options: LocalizeOptions = LocalizeOptions(), device: Any = "cpu",
             which: str = "best", calibrate_on: Path | None = None, recipe: Any = None, family: str | None = None,
             branch: str | None = None, front_end: str | None = None,
             report: Callable[[str], None] = lambda _: None) -> LocalizeResult:
    """Localise the sound in every input with one model (a run folder, an sslt or an official SSL-TIE checkpoint)
    and write the outputs and ``out/index.html``. Per-input problems are in the result, not raised.

    ``recipe``: the image size and audio front end the model was trained with, for an official checkpoint (which
    does not carry them; without it, the paper's: 224 px, 10 s, 257 mels); by default the run's or checkpoint's.
    A released model of another method is recognised from its keys (``family`` overrides; ``branch``: SLAVC's) and
    gets its own audio front end (or ``front_end``) and protocol preset (:func:`sslt_cli.families.load_released`)."""
    from sslt_cli.calibration import calibration_for
    from sslt_cli.data.augment import build_eval_transform
    from sslt_cli.checkpoint import resolve_checkpoints
    from sslt_cli.families import load_released
    from sslt_cli.evaluate import get_protocol

    wall = time.perf_counter()
    if which not in ("best", "last"):
        raise SsltError(f"--which must be best or last, got {which!r}")
    earlier = read_page(out)
    inputs, failed = collect_inputs(media, images, audios, taken=earlier.names(out))
    if not inputs and not failed:
        raise SsltError("nothing to localise: pass video files or folders, or --image FRAME --audio SOUND pairs")
    run_recipe, found, run_dir = resolve_checkpoints(model, "both")
    chosen = dict(found)
    label = which if which in chosen else found[0][0]
    path = chosen[label]
    loaded = load_released(path, family, recipe=recipe or run_recipe, branch=branch, device=device,
                           front_end=front_end)
    out.mkdir(parents=True, exist_ok=True)
    calibration, note = calibration_for(loaded, run_dir, calibrate_on, out, device)
    report(note)
    ctx = _Context(loaded, get_protocol(loaded.recipe.eval.protocol), options, torch.device(device), calibration,
                   Timings(setup=time.perf_counter() - wall),
                   build_eval_transform(loaded.recipe.data.image_size, "resize_square"))
    results = list(failed)
    for item in inputs:
        result = _localize_one(ctx, item, out)
        report(f"{item.name}: {result.error or _summary(result)}")
        results.append(result)
    model_text = f"{path} ({loaded.label}, {label}, step {loaded.step})" if loaded.step is not None else \
        f"{path} ({loaded.label})"
    notes = [f"model: {model_text}", *loaded.notes, f"frames sampled at {options.fps:g} per second, each with "
             f"{ctx.window:g} s of audio centred on it; protocol {ctx.protocol.name}", note]
    if calibration is not None:
        notes.append(calibration.negatives_line())
    _say_added(earlier, inputs, out, report)
    page = earlier.add(notes, results).write(out)
    return LocalizeResult(results, out, page, model_text, note, ctx.timings, time.perf_counter() - wall)


# ------------------------------------------------------------------------------------------------------------ page

@dataclass
class Page:
    """What ``OUT/index.html`` shows, embedded in it (``localize_render.page_data``) for the next `sslt localize`
    into the same folder: the notes of each run into the folder, and every input's entry (``name``, ``source``,
    ``error``, ``files``, ``summary``, ``run``: its run's number, from 1)."""

    runs: list[list[str]] = field(default_factory=list)
    items: list[dict[str, Any]] = field(default_factory=list)

    def names(self, out: Path) -> set[str]:
        """The input names taken in ``out``: earlier entries and any folder already there (never overwritten)."""
        folders = {p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")} if out.is_dir() else set()
        return folders | {str(item["name"]) for item in self.items}

    def add(self, notes: list[str], results: Sequence[InputResult]) -> "Page":
        run = len(self.runs) + 1
        return Page(self.runs + [notes], self.items + [
            {"name": r.name, "source": r.source, "error": r.error, "files": r.files, "summary": _summary(r),
             "run": run} for r in results])

    def write(self, out: Path) -> Path:
        """``index.html``, the notes and sources of each run numbered once there are several."""
        from sslt_cli.runs import atomic_write_text

        several = len(self.runs) > 1
        notes = [f"run {k}: {n}" if several else n for k, run in enumerate(self.runs, 1) for n in run]
        items = [{**item, "source": f"{item['source']} (run {item.get('run', 1)})" if several else item["source"]}
                 for item in self.items]
        data = {"format": "sslt-localize-page/1", "runs": self.runs, "items": self.items}
        page = out / "index.html"
        atomic_write_text(page, render.index_html("sslt localize", notes, items, data=data))
        return page


def read_page(out: Path) -> Page:
    """The page an earlier `sslt localize` wrote into ``out`` (empty when there is none, or it cannot be read)."""
    try:
        doc = render.page_data((out / "index.html").read_text(encoding="utf-8"))
        return Page([list(map(str, run)) for run in doc["runs"]], [dict(item) for item in doc["items"]])
    except (OSError, ValueError, KeyError, TypeError):
        return Page()


def _say_added(earlier: Page, inputs: Sequence[MediaInput], out: Path, report: Callable[[str], None]) -> None:
    """Say that this run's outputs join an earlier run's page, and which inputs got a numbered name."""
    if not earlier.runs:
        return
    report(f"{out} already holds the outputs of {len(earlier.items)} input(s) of {len(earlier.runs)} earlier "
           f"`sslt localize` run(s): this run's are added to its page (index.html), nothing is overwritten")
    for item in inputs:
        stem = (item.video or item.image or Path(item.name)).stem
        if item.name != stem:
            report(f"{item.source}: written as {item.name}/ ({stem}/ is taken)")
