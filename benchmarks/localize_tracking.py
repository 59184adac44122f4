"""Does ``sslt localize`` follow a moving sounding object? The share of sampled frames whose map peak lies inside the
sounding object's box, on synthetic benchmark scenes where that object glides across the picture (``moving_clip``:
one scene per category and seed, 4 s at 10 frames/s, 128 px, with the category's sound; distractors stay still).

A model that ignored the sound and the picture would hit the box in about the share of the frame it covers (printed
as the chance level: the mean box area). Optionally writes the README's picture: the contact sheet of one clip. The
calibration is computed on the run's validation set on the first call and stored in the run folder.

    python benchmarks/localize_tracking.py runs/quickstart-20261206-030147
    python benchmarks/localize_tracking.py RUN --seeds 1 --picture docs/localize_quickstart.png --picture-clip s0-6
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from sslt_cli.data.synthetic import CLASSES, moving_clip
from sslt_cli.localize import LocalizeOptions, localize
from sslt_cli.media import write_video


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="run folder or checkpoint")
    parser.add_argument("--seeds", type=int, default=2, help="scenes per category")
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--picture", type=Path, default=None, help="write a clip's contact sheet here")
    parser.add_argument("--picture-clip", default="s0-0", help="the clip of --picture (s<seed>-<category>)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    clips = {f"s{seed}-{label}": moving_clip(seed, label) for seed in range(args.seeds) for label in
             range(len(CLASSES))}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        videos = [write_video(folder / f"{name}.mp4", clip.frames, clip.fps, clip.audio[None], clip.sample_rate)
                  for name, clip in clips.items()]
        result = localize(args.model, videos, folder / "out", options=LocalizeOptions(fps=args.fps),
                          device=args.device)
        hits, frames = 0, 0
        for item in result.inputs:
            clip = clips[item.name]
            inside = [clip.contains(r.time_s, r.peak_x, r.peak_y) for r in item.records]
            hits, frames = hits + sum(inside), frames + len(inside)
            print(f"{item.name:8s} {clip.label:16s} {sum(inside)}/{len(inside)}")
        if args.picture is not None:
            from PIL import Image

            sheet = Image.open(folder / "out" / args.picture_clip / "contact_sheet.png")
            sheet.thumbnail((800, 800))
            sheet.convert("RGB").quantize(colors=128).save(args.picture, optimize=True)  # small enough to commit
    chance = float(np.mean([(c.boxes[:, 2] - c.boxes[:, 0]).mean() * (c.boxes[:, 3] - c.boxes[:, 1]).mean()
                            for c in clips.values()]))
    print(json.dumps({"model": result.model, "clips": len(clips), "frames": frames, "peak_in_box": hits,
                      "share": round(hits / frames, 4), "chance_box_area": round(chance, 4)}))


if __name__ == "__main__":
    main()
