"""``sslt compare`` throughput: three released families (LVS, EZ-VSL, SLAVC; random weights in their released
formats, speed does not depend on the weights) on a synthetic VGG-SS-style set of 200 clips at 224 px (10 s audio).

Per model it prints clips/s of the whole comparison of that model (``compare.compare``: its own preset with the
baselines and the outputs, then the common protocol on its maps) and the share of that time spent

* decoding: the model's loader alone (frame decode + its image pre-processing, audio decode + its released front
  end), timed in a second pass over the same clips;
* model: the forward passes alone on the decoded batches (``embed_images``, ``embed_audio``, ``maps``);
* scoring: ``score_maps`` with the baselines under the model's own preset and under the common protocol;
* the rest: outputs (metrics.json, per_clip.csv, gallery.png, maps.npz), loading the checkpoint, the picture and CSVs.

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
from sslt_cli.families import FAMILIES, load_released
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


def stage_times(path: Path, test: evaluate.TestSet, device: torch.device, common: str) -> dict[str, float]:
    """Seconds of decoding, model and scoring of one model over the set, each timed on its own."""
    loaded = load_released(path, device=device)
    protocol = evaluate.get_protocol(loaded.recipe.eval.protocol)
    clips = [test.clips[cid] for cid in test.ids]
    loader = evaluate.eval_loader(clips, loaded.recipe, device, protocol.image_preprocessing, num_workers=0)
    start = time.perf_counter()
    batches = [(batch["index"], batch["image"], batch["spec"]) for batch in loader]
    decode = time.perf_counter() - start
    ids = {int(i): clips[int(i)].id for index, _, _ in batches for i in index}
    maps = {}
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for index, images, specs in batches:
            v = evaluate.embed_images(loaded.model, images, device)
            a = evaluate.embed_audio(loaded.model, specs, device)
            for i, m in zip(index, loaded.model.maps(v, a)[:, 0].float().cpu().numpy()):
                maps[ids[int(i)]] = m
    sync(device)
    model = time.perf_counter() - start
    start = time.perf_counter()
    evaluate.score_maps(maps, test.annotations, protocol, test.ids, device=device)
    evaluate.score_maps(maps, test.annotations, evaluate.get_protocol(common), test.ids, device=device)
    scoring = time.perf_counter() - start
    return {"decode": decode, "model": model, "scoring": scoring}


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

        @contextlib.contextmanager
        def timed(label, tags):
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
        for path, result in zip(paths, comparison.models):
            stages = stage_times(path, test, device, args.common)
            total = whole[result.label]
            rest = max(0.0, total - sum(stages.values()))
            shares = [100 * stages[k] / total for k in ("decode", "model", "scoring")] + [100 * rest / total]
            print(f"{result.label:8} {result.own.protocol:10} {n / total:8.2f} {total:8.1f} "
                  + " ".join(f"{s:6.0f}%" for s in shares[:2]) + f" {shares[2]:7.0f}% {shares[3]:5.0f}%")


if __name__ == "__main__":
    main()
