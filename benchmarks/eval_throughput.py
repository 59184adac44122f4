"""Evaluation throughput: clips/s of the whole ``sslt eval`` of a model and of its metric part alone, on 5000 clips.

* whole eval: ``evaluate.evaluate_model``, what ``sslt eval RUN_OR_CHECKPOINT`` runs for a test set: frame
  decode and pre-processing, audio decode and log-mel (the loader, the recipe's batch size and workers), the model's
  forward pass in the recipe's eval precision, scoring with the baselines, the outputs (metrics.json, per_clip.csv,
  excluded.csv, gallery.png, maps.npz). On a synthetic VGG-SS-style test set at the paper's settings (224 px frames,
  10 s audio, 257 mels) and an untrained model (speed does not depend on the weights), after a one-batch warm-up;
* metric part: ``evaluate.score_maps`` with the baselines (centre prior, random maps x3, whole frame, oracle), called
  as ``sslt eval`` calls it, on the model's maps; timed again on its own after the whole eval.

Target (issue 4): on CPU the metric part takes at most 10% of the whole eval time.

On a GPU the model runs over all ``--clips`` clips. On CPU (decode and forward take about half a second a clip on 2
cores) it runs over ``--model-clips`` (default 500) and the model stage (the whole eval minus its metric part) is
extrapolated linearly to ``--clips``; the output says so. ``--model-clips 5000`` measures it for real. The metric part
is always measured on ``--clips`` clips: when the model ran on fewer, on the first ``--clips`` clips of the real
``vggss.json`` boxes, each given one of the model's maps in turn.

    python benchmarks/eval_throughput.py                       # CPU, 5000 clips, model stage on 500
    python benchmarks/eval_throughput.py --model-clips 5000    # CPU, all measured (over an hour on 2 cores)
    python benchmarks/eval_throughput.py --device cuda         # all measured
    python benchmarks/eval_throughput.py --clips 50            # a quick check that it runs
    python benchmarks/eval_throughput.py --data /tmp/eval_bench   # keep the synthetic set for the next run
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sslt_cli import evaluate, metrics
from sslt_cli.checkpoint import LoadedModel
from sslt_cli.config import Recipe
from sslt_cli.data.annotations import Annotation, load_vggss_json
from sslt_cli.data.synthetic import generate
from sslt_cli.model import build_model

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
CPU_MODEL_CLIPS = 500
TARGET_SHARE = 0.10


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_scoring(maps: dict[str, np.ndarray], annotations: dict[str, Annotation], ids: list[str],
                 protocol: metrics.Protocol, device: torch.device) -> tuple[float, evaluate.EvalResult]:
    """Seconds of the metric part as ``sslt eval`` runs it: ``score_maps`` with the baselines."""
    sync(device)
    start = time.perf_counter()
    result = evaluate.score_maps(maps, annotations, protocol, ids, device=device)
    sync(device)
    return time.perf_counter() - start, result


def time_whole_eval(test: evaluate.TestSet, protocol: metrics.Protocol, device: torch.device,
                    batch_size: int | None, workers: int | None, out_dir: Path
                    ) -> tuple[float, float, dict[str, np.ndarray], evaluate.EvalResult]:
    """(seconds of the whole eval, seconds of its metric part alone, the model's maps, the scoring result)."""
    recipe = Recipe()  # the paper's settings: 224 px, 10 s audio at 16 kHz, 257 mels
    loaded = LoadedModel(build_model().to(device).eval(), recipe, "untrained", Path("untrained"))
    clips = [test.clips[cid] for cid in test.ids]
    evaluate.predict_maps(loaded, clips[:recipe.eval.batch_size], protocol, device=device,
                          num_workers=0)  # warm-up: allocator, kernels
    sync(device)
    start = time.perf_counter()
    options = evaluate.EvalOptions(protocol=protocol.name, batch_size=batch_size, num_workers=workers,
                                   device=str(device))
    evaluate.evaluate_model(loaded, test, options, out_dir=out_dir)
    sync(device)
    whole = time.perf_counter() - start
    maps = evaluate.load_maps(out_dir / "maps.npz")
    metric, result = time_scoring(maps, test.annotations, test.ids, protocol, device)
    return whole, metric, maps, result


def rate(clips: int, seconds: float) -> str:
    return f"{seconds:8.1f} s  {clips / seconds:8.1f} clips/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=5000, help="clips of the eval measured (default 5000)")
    parser.add_argument("--model-clips", type=int, default=None,
                        help=f"clips run through the model (default: --clips on a GPU, {CPU_MODEL_CLIPS} on CPU); "
                             "fewer than --clips: the model stage is extrapolated")
    parser.add_argument("--vggss-json", type=Path, default=REALDATA / "vggss.json")
    parser.add_argument("--data", type=Path, default=None,
                        help="folder for the synthetic test set, kept and reused (default: a temporary folder)")
    parser.add_argument("--protocol", default="ssltie", choices=sorted(metrics.PROTOCOLS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's eval.batch_size")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: the recipe's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    protocol = evaluate.get_protocol(args.protocol)
    default_model_clips = args.clips if device.type == "cuda" else min(args.clips, CPU_MODEL_CLIPS)
    model_clips = min(args.model_clips or default_model_clips, args.clips)
    recipe = Recipe()
    workers = recipe.data.num_workers if args.workers is None else args.workers
    print(f"device {device}, {torch.get_num_threads()} torch threads, protocol {protocol.name}, batch "
          f"{args.batch_size or recipe.eval.batch_size}, {workers} loader workers, an untrained model at the paper's "
          f"settings (224 px, 10 s audio, 257 mels)")

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or Path(tmp) / "synthetic"
        generate(folder, n_train=0, n_val=0, n_test=model_clips, n_flickr=0, image_size=224, progress=False)
        test = evaluate.load_test_set(folder / "test_vggss")
        whole_run, metric_run, maps, result = time_whole_eval(test, protocol, device, args.batch_size,
                                                              args.workers, Path(tmp) / "eval")
    print(f"whole eval (sslt eval of a model) on {model_clips} synthetic clips {rate(model_clips, whole_run)}   "
          f"[{result.n_explained()}]")
    print(f"  of which the metric part (scoring with baselines)  {rate(model_clips, metric_run)}")
    if model_clips == args.clips:
        n_clips, whole, metric = model_clips, whole_run, metric_run
        print(f"on {n_clips} clips, all measured:")
    else:
        annotations, _ = load_vggss_json(args.vggss_json)
        ids = list(annotations)[:args.clips]
        model_maps = list(maps.values())
        real_maps = {cid: model_maps[i % len(model_maps)] for i, cid in enumerate(ids)}
        metric, result = time_scoring(real_maps, annotations, ids, protocol, device)
        n_clips = len(ids)
        print(f"metric part on {n_clips} clips of the real VGG-SS boxes (the model's maps in turn) "
              f"{rate(n_clips, metric)}   [{result.n_explained()}]")
        model_stage = (whole_run - metric_run) / model_clips * n_clips
        whole = model_stage + metric
        print(f"on {n_clips} clips, the model stage EXTRAPOLATED from {model_clips} clips (it would take about "
              f"{model_stage / 60:.0f} min: pass --model-clips {n_clips} to measure it), the metric part measured:")
    share = metric / whole
    verdict = "met" if share <= TARGET_SHARE else "NOT met"
    print(f"  whole eval  {rate(n_clips, whole)}")
    print(f"  metric part {rate(n_clips, metric)}   = {100 * share:.1f}% of the whole eval"
          + (f" (target on CPU: <= {100 * TARGET_SHARE:.0f}%: {verdict})" if device.type == "cpu" else ""))


if __name__ == "__main__":
    main()
