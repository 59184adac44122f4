"""``sslt localize`` peak memory against the length of the video: the sound is decoded as the frames need it, so a
2-hour film runs in the memory of a 2-minute clip.

For each length (``--minutes``, default 1, 10 and 60) a video is generated (64 px pictures at 1 frame/s, H.264, and
48 kHz stereo AAC sound: a tone under noise, so the encoder has something to keep), written in one pass so that the
generator itself holds one second at a time. Then ``python -m sslt_cli localize`` runs on it in a child process
(an untrained model with the quickstart recipe's input sizes: 96 px, 3 s windows, 40 mels; ``--fps`` frames sampled
per second, default 0.5), and its peak resident memory is read from ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` by a
fresh helper process per run (the maximum over a process's children would otherwise carry over between runs).

``--sslt PATH`` measures another sslt source tree (e.g. a checkout of an older commit, with its ``recipes/``) through
PYTHONPATH, to compare; its model file is saved by that tree.
Printed: a table of minutes, sampled frames, peak RSS (MiB) and wall seconds.

    python benchmarks/localize_memory.py
    python benchmarks/localize_memory.py --minutes 1 10 --sslt /path/to/older/checkout
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RATE = 48000
SIZE = 64


def generate(path: Path, minutes: float) -> Path:
    """A ``minutes`` long video (1 frame/s, 64 px, H.264) with 48 kHz stereo AAC sound, one second at a time."""
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=1)
        video.width = video.height = SIZE
        video.pix_fmt = "yuv420p"
        video.options = {"preset": "ultrafast"}
        audio = container.add_stream("aac", rate=RATE)
        audio.layout = "stereo"
        t = np.arange(RATE) / RATE
        for second in range(int(minutes * 60)):
            picture = np.full((SIZE, SIZE, 3), (second * 7) % 255, np.uint8)
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts, frame.time_base = second, Fraction(1, 1)
            container.mux(video.encode(frame))
            tone = 0.2 * np.sin(2 * np.pi * (220 + second % 10 * 55) * t)
            sound = (tone + 0.05 * rng.standard_normal((2, RATE))).astype(np.float32)
            chunk = av.AudioFrame.from_ndarray(sound, format="fltp", layout="stereo")
            chunk.sample_rate, chunk.pts, chunk.time_base = RATE, second * RATE, Fraction(1, RATE)
            container.mux(audio.encode(chunk))
        container.mux(video.encode(None))
        container.mux(audio.encode(None))
    return path


CHECKPOINT = """
import sys, torch
from sslt_cli.config import load_recipe, recipe_dict
from sslt_cli.model import build_model
recipe = load_recipe("quickstart")
torch.save({"format": "sslt-checkpoint/1", "model": build_model().state_dict(), "step": 0, "epoch": 0,
            "recipe": recipe_dict(recipe)}, sys.argv[1])
"""


def tiny_checkpoint(path: Path, sslt: Path) -> Path:
    """An untrained model with the quickstart recipe (its input sizes decide the cost per frame), saved by the sslt
    measured (its recipe schema)."""
    subprocess.run([sys.executable, "-c", CHECKPOINT, str(path)], env={**os.environ, "PYTHONPATH": str(sslt)},
                   cwd=path.parent, check=True)
    return path


def measure(command: list[str], cwd: str, env: dict[str, str]) -> dict:
    """Run ``command`` in ``cwd`` to the end; its peak RSS (MiB) and wall seconds (call in a fresh process)."""
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=cwd)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "wall_s": wall}


def run_one(video: Path, checkpoint: Path, out: Path, fps: float, sslt: Path) -> dict:
    command = [sys.executable, "-m", "sslt_cli", "localize", str(checkpoint), str(video), "--out", str(out),
               "--fps", str(fps), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(sslt)}
    # run from a folder of its own: `python -m` puts the working directory first on sys.path, before PYTHONPATH
    helper = [sys.executable, __file__, "--measure", json.dumps({"command": command, "cwd": str(out.parent)})]
    done = subprocess.run(helper, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 10, 60])
    parser.add_argument("--fps", type=float, default=0.5)
    parser.add_argument("--sslt", type=Path, default=ROOT, help="the sslt source tree to measure")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        job = json.loads(args.measure)
        print(json.dumps(measure(job["command"], job["cwd"], dict(os.environ))))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="sslt-localize-memory-") as tmp:
        folder = Path(tmp)
        checkpoint = tiny_checkpoint(folder / "model.pt", args.sslt)
        for minutes in args.minutes:
            video = generate(folder / f"video-{minutes:g}min.mp4", minutes)
            result = run_one(video, checkpoint, folder / f"out-{minutes:g}", args.fps, args.sslt)
            rows.append((minutes, int(np.ceil(minutes * 60 * args.fps)), result["peak_rss_mib"], result["wall_s"]))
            video.unlink()
            print(f"{minutes:g} min done: {result['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
    print(f"sslt localize peak RSS, sslt from {args.sslt}, 48 kHz stereo AAC, {args.fps:g} frames/s sampled")
    print(f"{'minutes':>8} {'frames':>7} {'peak RSS (MiB)':>15} {'wall (s)':>9}")
    for minutes, frames, rss, wall in rows:
        print(f"{minutes:8g} {frames:7d} {rss:15.0f} {wall:9.1f}")


if __name__ == "__main__":
    main()
