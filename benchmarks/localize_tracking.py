"""Does ``sslt localize`` follow a moving sounding object, and does its calibrated score tell on-screen sound from
off-screen sound? On synthetic benchmark scenes where the sounding object glides across the picture (``moving_clip``:
one scene per category and seed, 4 s at 10 frames/s, 128 px, with the category's sound; distractors stay still):

* tracking: the share of sampled frames whose map peak lies inside the sounding object's box. A peak blind to the
  scene would land there in about the share of the frame the box covers (printed as the chance level);
* on-screen vs off-screen: the same scenes again with the sound of a category shown nowhere in the picture; the
  calibrated ``visible`` score (``calibration.py``) of both, and the share of frames above 0.5 in each.

Optionally writes the README's picture: the contact sheet of one clip. The calibration is computed on the run's
validation set on the first call and stored in the run folder.

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


def off_screen_sound(clips: dict, name: str) -> np.ndarray:
    """The sound of another clip whose category appears nowhere in clip ``name``'s picture."""
    return next(c for c in clips.values() if c.label not in clips[name].shown).audio


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
        videos = []
        for name, clip in clips.items():
            for suffix, sound in (("", clip.audio), ("-offscreen", off_screen_sound(clips, name))):
                videos.append(write_video(folder / f"{name}{suffix}.mp4", clip.frames, clip.fps, sound[None],
                                          clip.sample_rate))
        result = localize(args.model, videos, folder / "out", options=LocalizeOptions(fps=args.fps),
                          device=args.device)
        hits, frames, visible = 0, 0, {"on": [], "off": []}
        for item in result.inputs:
            if item.name.endswith("-offscreen"):
                visible["off"] += [r.visible for r in item.records if r.visible is not None]
                continue
            clip = clips[item.name]
            inside = [clip.contains(r.time_s, r.peak_x, r.peak_y) for r in item.records]
            hits, frames = hits + sum(inside), frames + len(inside)
            visible["on"] += [r.visible for r in item.records if r.visible is not None]
            print(f"{item.name:8s} {clip.label:16s} {sum(inside)}/{len(inside)}")
        if args.picture is not None:
            from PIL import Image

            sheet = Image.open(folder / "out" / args.picture_clip / "contact_sheet.png")
            sheet.thumbnail((800, 800))
            sheet.convert("RGB").quantize(colors=128).save(args.picture, optimize=True)  # small enough to commit
    chance = float(np.mean([((c.boxes[:, 2] - c.boxes[:, 0]) * (c.boxes[:, 3] - c.boxes[:, 1])).mean()
                            for c in clips.values()]))
    report = {"model": result.model, "clips": len(clips), "frames": frames, "peak_in_box": hits,
              "share": round(hits / frames, 4), "chance_box_area": round(chance, 4)}
    for where, scores in visible.items():
        if scores:
            report[f"visible_{where}screen_mean"] = round(float(np.mean(scores)), 4)
            report[f"visible_{where}screen_above_half"] = round(float(np.mean(np.asarray(scores) > 0.5)), 4)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
