"""What a perfect localiser scores on the embedded synthetic benchmark, beside the box-level oracle ceiling.

The oracle ceiling that ``sslt eval`` prints is the best IoU a prediction of the protocol's area (half the frame under
the median rule) can reach when the prediction is the box itself. A self-supervised model never sees a box: the best
it can do is to light up the sounding object's own pixels. The synthetic generator is deterministic, so the visible
pixels of every sounding object can be replayed (``synthetic.sounding_masks``) and scored as maps under the same
protocol. That gives references a model can actually approach:

* ``perfect segmentation``: the sounding object's visible pixels ranked above every other pixel, the others by
  their distance to the object (a continuous map without ties, so the median rule keeps half the frame as it does
  for a model's map), at 224 px;
* ``perfect segmentation at R x R``: the same map averaged down to the model's map size (``image_size / 16`` for
  SSL-TIE's stride-16 visual map), the resolution limit of the architecture at that frame size;
* ``box-shaped map``: the union of the boxes ranked the same way, which reaches the oracle up to pixel rounding.

The replay follows the benchmark's difficulty knobs (recorded in its benchmark.json): on a ``--preset hard`` benchmark
the masks are the small, look-alike-surrounded, camera-cropped sounding objects that its frames show.

    python benchmarks/synthetic_ceiling.py --benchmark data/synthetic --set test_vggss --map-size 6
    sslt prepare synthetic --out data/hard --preset hard && python benchmarks/synthetic_ceiling.py --benchmark data/hard
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from rich.console import Console
from rich.table import Table

from sslt_cli import evaluate
from sslt_cli.data.synthetic import sounding_masks

GT_SIZE = 224


def ranked_by_distance(mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """A continuous map from a bool mask: the signed distance to the mask's edge (depth inside, minus the distance
    outside), plus a 1e-4 px jitter that breaks ties, so every threshold keeps the share of the frame the protocol's
    rule asks for (a map with ties can shrink the predicted area and beat the oracle unfairly). (H, W) float32."""
    jitter = np.random.default_rng(seed).uniform(0.0, 1e-4, mask.shape)
    if not mask.any():
        return jitter.astype(np.float32)
    outside = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    inside = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return (np.where(mask, inside, -outside) + jitter).astype(np.float32)


def box_masks(annotations: dict, size: int) -> dict[str, np.ndarray]:
    """The union of each clip's VGG-SS boxes (normalised, clipped to [0, 1]) as a bool mask."""
    masks = {}
    for clip_id, annotation in annotations.items():
        mask = np.zeros((size, size), bool)
        for box in annotation.boxes:
            x0, y0, x1, y1 = (int(min(max(float(v), 0.0), 1.0) * size) for v in box)
            mask[y0:y1, x0:x1] = True
        masks[clip_id] = mask
    return masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", type=Path, default=Path("data/synthetic"), help="sslt prepare synthetic --out")
    parser.add_argument("--set", default="test_vggss", help="a set with VGG-SS boxes (val or test_vggss)")
    parser.add_argument("--protocol", default="ssltie")
    parser.add_argument("--map-size", type=int, nargs="+", default=[4, 6, 7, 8, 14],
                        help="map sizes to simulate (image_size / 16)")
    args = parser.parse_args()

    test = evaluate.load_test_set(args.benchmark / args.set)
    masks = sounding_masks(args.benchmark, args.set, GT_SIZE)
    ids = [i for i in test.ids if i in masks and i in test.annotations]
    segmentation = {i: ranked_by_distance(masks[i]) for i in ids}
    boxes = {i: ranked_by_distance(m) for i, m in box_masks({i: test.annotations[i] for i in ids}, GT_SIZE).items()}
    rows: list[tuple[str, evaluate.EvalResult]] = []
    rows.append(("perfect segmentation, 224 x 224",
                 evaluate.score_maps(segmentation, test.annotations, args.protocol, ids, baselines=True)))
    for size in args.map_size:
        coarse = {i: cv2.resize(m, (size, size), interpolation=cv2.INTER_AREA) for i, m in segmentation.items()}
        rows.append((f"perfect segmentation, {size} x {size}",
                     evaluate.score_maps(coarse, test.annotations, args.protocol, ids, baselines=False)))
    rows.append(("box-shaped map, 224 x 224",
                 evaluate.score_maps(boxes, test.annotations, args.protocol, ids, baselines=False)))

    table = Table(title=f"{args.benchmark / args.set}: references under the {args.protocol} protocol (x100), "
                        f"N = {rows[0][1].n}")
    for column in ("map", "cIoU", "AUC", "mean IoU", "pointing"):
        table.add_column(column, justify="left" if column == "map" else "right")
    first = rows[0][1]
    for label, key in (("centre prior", "centre"), ("oracle ceiling (box level)", "oracle")):
        values = first.baselines[key]
        table.add_row(label, *(f"{100 * values[k]:.2f}" for k in ("ciou", "auc", "mean_iou", "pointing")))
    for label, result in rows:
        table.add_row(label, *(f"{100 * result.method[k]:.2f}" for k in ("ciou", "auc", "mean_iou", "pointing")))
    Console().print(table)


if __name__ == "__main__":
    main()
