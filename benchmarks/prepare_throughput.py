"""Throughput of ``sslt prepare vggsound`` against the official way (decode every frame, write every frame).

Generates N VGGSound-like clips once (10 s, 25 fps, H.264 + stereo 44.1 kHz AAC, moving content, libx264 defaults:
one keyframe at the start plus scene cuts, as clips re-encoded by ffmpeg are), then in the same run and with the same
number of worker processes measures:

* ``sslt``: :func:`sslt_cli.data.prepare.prepare_vggsound` (train split): decode up to the frame at t = 5 s, write it
  as one JPEG and the 3 s wav;
* ``naive``: what SSL-TIE's ``utils/convert_video2frames.py`` does with ffmpeg, here with PyAV and the same JPEG
  encoder and quality so only the strategy differs: decode all 250 frames and write each as a JPEG, plus the same
  3 s wav.

Prints clips/s (median of alternated runs, with the range), seconds per clip and bytes written per clip for both,
and the ratios.

    .venv/bin/python benchmarks/prepare_throughput.py --clips 40 --size 640x360 --workers 2
"""
from __future__ import annotations

import argparse
import io
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sslt_cli.data import prepare as prep  # noqa: E402


def make_clip(path: Path, width: int, height: int, seed: int, seconds: float = 10.0, fps: int = 25,
              rate: int = 44100) -> None:
    """A clip with smooth scrolling texture and a moving square (so frames differ like real video), and audio."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (height // 16 + 2, width // 16 + 2, 3))
    texture = np.kron(coarse, np.ones((16, 16, 1)))  # blocky, then blurred by box-averaging neighbours
    texture = (texture + np.roll(texture, 8, 0) + np.roll(texture, 8, 1) + np.roll(texture, (8, 8), (0, 1))) / 4
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        sound = container.add_stream("aac", rate=rate)
        sound.layout = "stereo"
        for i in range(int(seconds * fps)):
            image = np.roll(texture, (i, 2 * i), (0, 1))[:height, :width].copy()
            x, y = (7 * i) % (width - 40), (3 * i) % (height - 40)
            image[y:y + 40, x:x + 40] = (255, 255 - i % 255, i % 255)
            frame = av.VideoFrame.from_ndarray(image.astype(np.uint8), format="rgb24")
            frame.pts = i
            container.mux(video.encode(frame))
        container.mux(video.encode())
        t = np.arange(int(seconds * rate)) / rate
        tone = 0.3 * np.sin(2 * np.pi * (220 + 20 * seed) * t)
        signal = np.stack([tone + 0.05 * rng.standard_normal(t.size), tone]).astype(np.float32)
        for start in range(0, signal.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(signal[:, start:start + 1024]), format="fltp",
                                               layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
            container.mux(sound.encode(frame))
        container.mux(sound.encode())


def naive_clip(video: Path, out: Path) -> int:
    """Every frame as ``<out>/frames/<id>/<n:03d>.jpg`` (1-based, like ffmpeg's image2) + the 3 s wav; bytes written."""
    from PIL import Image

    clip_id = video.stem
    frame_dir = out / "frames" / clip_id
    frame_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    with av.open(str(video)) as container:
        for n, frame in enumerate(container.decode(container.streams.video[0]), start=1):
            buf = io.BytesIO()
            Image.fromarray(frame.to_ndarray(format="rgb24")).save(buf, format="JPEG", quality=prep.JPEG_QUALITY)
            (frame_dir / f"{n:03d}.jpg").write_bytes(buf.getvalue())
            written += buf.tell()
        container.seek(0)
        video = container.streams.video[0]
        samples = prep._decode_audio(container, container.streams.audio[0], prep._stream_origin(video), 3.5, 6.5,
                                     16000, 6.5)
    wav = prep._wav_bytes(samples, 16000)
    (out / "audio").mkdir(exist_ok=True)
    (out / "audio" / f"{clip_id}.wav").write_bytes(wav)
    return written + len(wav)


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--size", default="640x360", help="WxH of the generated clips")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each pass, alternated; medians reported")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the generated clips here and reuse them (default: a temp folder, removed)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sslt_prepare_bench_"))
    videos = workdir / f"videos_{args.size}_{args.clips}"
    try:
        if not videos.is_dir():
            videos.mkdir(parents=True)
            started = time.perf_counter()
            for i in range(args.clips):
                make_clip(videos / f"bench{i:06d}_{30 + i:06d}.mp4", width, height, seed=i)
            print(f"generated {args.clips} clips of 10 s at {args.size} in {time.perf_counter() - started:.1f} s",
                  file=sys.stderr)
        sources = sorted(videos.glob("*.mp4"))
        source_bytes = sum(p.stat().st_size for p in sources) / len(sources)

        # Alternate the two passes and keep the median of each: the machine may be shared, and load drifts.
        sslt_times, naive_times = [], []
        for _ in range(args.repeats):
            out_sslt = workdir / "out_sslt"
            shutil.rmtree(out_sslt, ignore_errors=True)
            started = time.perf_counter()
            result = prep.prepare_vggsound(videos, out_sslt, split="train", workers=args.workers, progress=False)
            sslt_times.append(time.perf_counter() - started)
            assert result.prepared == len(sources), result
            sslt_bytes = folder_bytes(out_sslt) / len(sources)  # manifest, set.json and journal included

            out_naive = workdir / "out_naive"
            shutil.rmtree(out_naive, ignore_errors=True)
            out_naive.mkdir()
            started = time.perf_counter()
            with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                naive_total = sum(pool.map(naive_clip, sources, [out_naive] * len(sources)))
            naive_times.append(time.perf_counter() - started)
            naive_bytes = naive_total / len(sources)

        n = len(sources)
        sslt_s, naive_s = statistics.median(sslt_times), statistics.median(naive_times)
        print(f"{n} clips, 10 s, 25 fps, {args.size}, H.264 + AAC ({source_bytes / 1e6:.2f} MB each), "
              f"{args.workers} worker processes (pool start-up included), median of {args.repeats} runs")
        print(f"{'pass':<8}{'clips/s':>10}{'(range)':>16}{'s/clip':>10}{'bytes written/clip':>22}")
        for name, seconds, runs, size in (("sslt", sslt_s, sslt_times, sslt_bytes),
                                          ("naive", naive_s, naive_times, naive_bytes)):
            spread = f"{n / max(runs):.1f}-{n / min(runs):.1f}"
            print(f"{name:<8}{n / seconds:>10.2f}{spread:>16}{seconds / n:>10.3f}{size:>22,.0f}")
        print(f"speed-up {naive_s / sslt_s:.1f}x, {naive_bytes / sslt_bytes:.0f}x fewer bytes written")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
