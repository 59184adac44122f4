"""``sslt localize`` throughput: sampled frames per second end to end, and the share of the time the model takes.

End to end is ``localize.localize`` on one video, as ``sslt localize MODEL VIDEO`` runs it after loading the model:
probe, audio decode, seek-decoding the sampled frames and their log-mel windows (in the loader thread), the model's
forward passes, the records, drawing the overlays and encoding the MP4 with the audio, the contact sheet, the plot,
CSV/JSON and index.html. The video is a synthetic benchmark scene with a moving sounding object (``moving_clip``),
``--seconds`` long at 25 frames/s, ``--size`` px square, with its sound. The model is untrained (speed does not depend
on the weights) and takes the recipe's image size and audio front end (``--recipe``, default the quickstart's 96 px,
3 s windows, 40 mels; ``recipes/tie_full.yaml`` gives the paper's 224 px, 10 s, 257 mels). One warm-up call on a 1 s
clip comes first.

Printed: frames, wall seconds, frames/s, and the seconds and share of the wall time of the model (forward passes in
the main thread), of the loader thread (decode and pre-processing, which overlaps the model) and of drawing and
encoding; loading the model (and its calibration) is timed apart. The pipeline is built so that on CPU the model step
dominates.

    python benchmarks/localize_throughput.py                                  # quickstart recipe, CPU
    python benchmarks/localize_throughput.py --recipe recipes/tie_full.yaml   # the paper's input sizes
    python benchmarks/localize_throughput.py --device cuda
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from sslt_cli.config import load_recipe, recipe_dict
from sslt_cli.data.synthetic import moving_clip
from sslt_cli.localize import LocalizeOptions, localize
from sslt_cli.media import write_video
from sslt_cli.model import build_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "quickstart.yaml")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the test video")
    parser.add_argument("--size", type=int, default=256, help="side of the test video's pictures (px)")
    parser.add_argument("--fps", type=float, default=2.0, help="frames sampled per second (sslt localize --fps)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    recipe = load_recipe(args.recipe)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        torch.manual_seed(0)
        torch.save({"format": "sslt-checkpoint/1", "model": build_model().state_dict(), "step": 0, "epoch": 0,
                    "recipe": recipe_dict(recipe)}, folder / "model.pt")
        videos = {}
        for name, seconds in (("warmup", 1.0), ("video", args.seconds)):
            clip = moving_clip(0, 2, seconds=seconds, fps=25, size=args.size)
            videos[name] = write_video(folder / f"{name}.mp4", clip.frames, clip.fps, clip.audio[None],
                                       clip.sample_rate)
        options = LocalizeOptions(fps=args.fps, batch_size=args.batch_size)
        localize(folder / "model.pt", [videos["warmup"]], folder / "warmup", options=options, device=device)
        result = localize(folder / "model.pt", [videos["video"]], folder / "out", options=options, device=device)
    t = result.timings
    wall = result.wall_s - t.setup
    print(f"recipe {args.recipe.name}: {recipe.data.image_size} px, {recipe.audio.clip_seconds:g} s windows, "
          f"{recipe.audio.n_mels} mels; video {args.seconds:g} s, {args.size} px, 25 fps, sampled at {args.fps:g}/s; "
          f"device {device}, {torch.get_num_threads()} torch threads")
    print(f"model and calibration loaded in {t.setup:.2f} s (once per call, not counted below)")
    print(f"frames {t.frames}  wall {wall:.2f} s  ->  {t.frames / wall:.2f} frames/s end to end")
    for label, seconds in (("model (forward passes)", t.model), ("loader thread (decode, log-mel)", t.decode),
                           ("overlays + MP4 encoding", t.write)):
        print(f"  {label:34s} {seconds:7.2f} s  {seconds / wall:6.1%} of wall")


if __name__ == "__main__":
    main()
