"""``sslt compare`` throughput: three released families (LVS, EZ-VSL, SLAVC; random weights in their released
formats, speed does not depend on the weights) on a synthetic VGG-SS-style set of 200 clips at 224 px (10 s audio).

Per model it prints clips/s of the whole comparison of that model (``compare.compare``: loading it, its own preset
with the baselines and the outputs, then the common protocol on its maps) and the share of that time spent, measured
inside the same run:

* decoding: the loader's items (frame decode + its image pre-processing, audio decode + its released front end);
* model: the forward passes (``embed_images`` + ``embed_audio``);
* scoring: ``score_maps`` with the baselines, under the model's own preset and under the common protocol;
* the rest: loading the checkpoint, the maps' einsum, the outputs (metrics.json, per_clip.csv, gallery.png,
  maps.npz), the picture and the CSVs.

The loader runs in the main process (``num_workers=0``) so the shares add up; with workers, decoding overlaps the
model. Run it under nice on a shared machine; the figures depend on the CPU and its load.

    nice -n 10 python benchmarks/compare_throughput.py                 # 200 clips, CPU
    python benchmarks/compare_throughput.py --clips 20                 # a quick check that it runs
    python benchmarks/compare_throughput.py --device cuda
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch

from sslt_cli import compare as C
from sslt_cli import evaluate
from sslt_cli.data.synthetic import generate
from sslt_cli.families import FAMILIES
from sslt_cli.tracking import MetricsSink

FAMILIES_TIMED = ("lvs", "ezvsl", "slavc")


def released_checkpoint(name: str, folder: Path) -> Path:
    """A checkpoint in ``name``'s released format (container, ``module.`` prefix), random weights."""
    family = FAMILIES[name]
    network = family.network(family.branches[0])
    weights = {f"{family.export_prefix}{k}": v for k, v in family.released(network).items()}
    path = folder / f"{name}.pth"
    torch.save({family.container: weights, **family.extras}, path)
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageClock:
    """Seconds spent in each stage, charged to the model being compared (``current``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.current = ""
        self.seconds: dict[str, dict[str, float]] = {}

    def wrap(self, stage: str, function):
        def timed(*args, **kwargs):
            sync(self.device)
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                sync(self.device)
                bucket = self.seconds.setdefault(self.current, {"decode": 0.0, "model": 0.0, "scoring": 0.0})
                bucket[stage] += time.perf_counter() - start
        return timed


def instrument(clock: StageClock) -> None:
    """Time the loader's items, the forward passes and the scoring where ``sslt compare`` calls them."""
    from sslt_cli.data import datasets
    from sslt_cli.evaluate import maps, orchestrate

    datasets.AudioVisualDataset.__getitem__ = clock.wrap("decode", datasets.AudioVisualDataset.__getitem__)
    maps.embed_images = clock.wrap("model", maps.embed_images)
    maps.embed_audio = clock.wrap("model", maps.embed_audio)
    orchestrate.score_maps = clock.wrap("scoring", orchestrate.score_maps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--common", default="ezvsl")
    parser.add_argument("--data", type=Path, default=None, help="keep the synthetic set here for the next run")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.data or Path(scratch) / "synth"
        if not (root / "test_vggss" / "manifest.csv").is_file():
            generate(root, n_train=0, n_val=0, n_test=args.clips, n_flickr=0, image_size=224, workers=2,
                     progress=False)
        test = evaluate.load_test_set(root / "test_vggss")
        paths = [released_checkpoint(name, Path(scratch)) for name in FAMILIES_TIMED]
        whole: dict[str, float] = {}
        clock = StageClock(device)
        instrument(clock)

        @contextlib.contextmanager
        def timed(label, tags):
            clock.current = label
            start = time.perf_counter()
            yield MetricsSink.null()
            sync(device)
            whole[label] = time.perf_counter() - start

        options = C.CompareOptions(common=args.common, device=str(device), num_workers=0)
        comparison = C.compare([C.ModelSpec(p) for p in paths], ("synthetic", test), options,
                               Path(scratch) / "out", child_sink=timed)
        n = comparison.models[0].own.result.n
        print(f"sslt compare, {n} clips at 224 px, 10 s audio, device {device}, torch threads "
              f"{torch.get_num_threads()}, loader in the main process")
        print(f"{'model':8} {'preset':10} {'clips/s':>8} {'whole s':>8} {'decode':>7} {'model':>7} {'scoring':>8} "
              f"{'rest':>6}")
        for result in comparison.models:
            stages, total = clock.seconds[result.label], whole[result.label]
            rest = max(0.0, total - sum(stages.values()))
            shares = [100 * stages[k] / total for k in ("decode", "model", "scoring")] + [100 * rest / total]
            print(f"{result.label:8} {result.own.protocol:10} {n / total:8.2f} {total:8.1f} "
                  + " ".join(f"{s:6.0f}%" for s in shares[:2]) + f" {shares[2]:7.0f}% {shares[3]:5.0f}%")


if __name__ == "__main__":
    main()
