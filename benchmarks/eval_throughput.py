"""Evaluation throughput: clips/s of scoring localisation maps on the real VGG-SS boxes.

Random 14 x 14 maps (one per clip, seeded) for the first ``--clips`` ids of ``vggss.json``, scored under a protocol:

* ``eval``: the whole evaluation from maps to metrics (``evaluate.score_maps`` without baselines): ground-truth
  maps built from the boxes, upsampling, normalisation, binarisation, IoU, pointing game, summaries, N accounting;
* ``eval + baselines``: the same with the centre-prior, random (3 seeds), whole-frame and oracle baselines;
* ``metrics alone``: ``metrics.localisation_scores`` + ``metrics.summarise`` on ground truths and maps already in
  memory (ground truth kept as bool, 50 KB a clip; the float conversion is timed), in batches of ``evaluate.CHUNK``.

    python benchmarks/eval_throughput.py                        # CPU, all torch threads
    python benchmarks/eval_throughput.py --threads 1 --protocol ezvsl --map-size 7
    python benchmarks/eval_throughput.py --device cuda
    python benchmarks/eval_throughput.py --model-clips 500   # + the whole model eval (frames, audio, forward, metrics)

``--model-clips N`` adds the whole evaluation of a model on a synthetic VGG-SS-style test set of N clips at the paper's
settings (224 px frames, 10 s audio, 257 mels; an untrained model: speed does not depend on the weights): decoding,
log-mel, forward pass, then scoring. It prints clips/s of the whole eval and the share of it spent in the metric part.

The stages are separate functions (``random_maps`` makes the maps) so that a model's maps
(``evaluate.maps_from_batches`` over the test loader) can be timed the same way and compared with the metric part.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from sslt_cli import evaluate, metrics
from sslt_cli.data.annotations import Annotation, load_vggss_json

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"


def random_maps(ids: list[str], size: int, seed: int) -> dict[str, np.ndarray]:
    """One uniform (size, size) float32 map per clip id."""
    rng = np.random.default_rng(seed)
    return {cid: rng.random((size, size), dtype=np.float32) for cid in ids}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_eval(maps: dict[str, np.ndarray], annotations: dict[str, Annotation], ids: list[str], protocol: str,
              baselines: bool, device: torch.device) -> tuple[float, evaluate.EvalResult]:
    """Seconds for maps -> metrics (ground truth building included)."""
    sync(device)
    start = time.perf_counter()
    result = evaluate.score_maps(maps, annotations, protocol, ids, baselines=baselines, device=device)
    sync(device)
    return time.perf_counter() - start, result


def time_metrics_only(maps: dict[str, np.ndarray], annotations: dict[str, Annotation], ids: list[str],
                      protocol: str, device: torch.device) -> float:
    """Seconds for the metric computation alone on ground truths and maps already in memory."""
    proto = metrics.PROTOCOLS[protocol]
    valid = [cid for cid in ids if metrics.gt_map(annotations[cid].boxes, "vggss").any()]
    chunks = []
    for start in range(0, len(valid), evaluate.CHUNK):
        part = valid[start:start + evaluate.CHUNK]
        gt = torch.from_numpy(np.stack([metrics.gt_map(annotations[c].boxes, "vggss") > 0 for c in part]))
        chunks.append((torch.from_numpy(np.stack([maps[c] for c in part])).to(device), gt.to(device)))
    sync(device)
    start = time.perf_counter()
    parts = [metrics.localisation_scores(m, gt.float(), proto) for m, gt in chunks]
    metrics.summarise(np.concatenate([p.iou for p in parts]), np.concatenate([p.pointing for p in parts]),
                      np.concatenate([p.pred_area for p in parts]))
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vggss-json", type=Path, default=REALDATA / "vggss.json")
    parser.add_argument("--clips", type=int, default=5000)
    parser.add_argument("--map-size", type=int, default=14)
    parser.add_argument("--protocol", default="ssltie", choices=sorted(metrics.PROTOCOLS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-clips", type=int, default=0, help="also time a model's whole eval on N synthetic clips")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    annotations, _ = load_vggss_json(args.vggss_json)
    ids = list(annotations)[:args.clips]
    maps = random_maps(ids, args.map_size, args.seed)
    evaluate.score_maps(dict(list(maps.items())[:64]), annotations, args.protocol, ids[:64], baselines=False,
                        device=device)  # warm-up: allocator, kernels

    print(f"{len(ids)} clips, {args.map_size}x{args.map_size} maps, protocol {args.protocol}, device {device}, "
          f"{torch.get_num_threads()} torch threads")
    seconds, result = time_eval(maps, annotations, ids, args.protocol, False, device)
    print(f"  eval (maps -> metrics)   {seconds:7.2f} s  {len(ids) / seconds:8.0f} clips/s  "
          f"{1000 * seconds / len(ids):6.3f} ms/clip   [{result.n_explained()}]")
    seconds_b, result_b = time_eval(maps, annotations, ids, args.protocol, True, device)
    centre = result_b.baselines["centre"]["ciou"]
    print(f"  eval + baselines         {seconds_b:7.2f} s  {len(ids) / seconds_b:8.0f} clips/s  "
          f"{1000 * seconds_b / len(ids):6.3f} ms/clip   [centre prior cIoU {centre:.4f}]")
    seconds_m = time_metrics_only(maps, annotations, ids, args.protocol, device)
    print(f"  metrics alone            {seconds_m:7.2f} s  {result.n / seconds_m:8.0f} clips/s  "
          f"{1000 * seconds_m / result.n:6.3f} ms/clip")
    if args.model_clips:
        time_model_eval(args.model_clips, args.protocol, device, args.batch_size, args.workers)


def time_model_eval(n_clips: int, protocol: str, device: torch.device, batch_size: int, workers: int) -> None:
    """The whole model evaluation (frames + audio -> maps -> metrics) vs its metric part, on synthetic clips."""
    import tempfile

    from sslt_cli.config import Recipe
    from sslt_cli.data.synthetic import generate
    from sslt_cli.model import build_model

    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), n_train=1, n_val=1, n_test=n_clips, n_flickr=1, image_size=224, progress=False)
        recipe = Recipe()  # the paper's settings: 224 px, 10 s audio at 16 kHz, 257 mels
        model = build_model().to(device).eval()
        test = evaluate.load_test_set(Path(tmp) / "test_vggss")
        proto = evaluate.get_protocol(protocol)
        clips = [test.clips[i] for i in test.ids]
        evaluate.predict_maps(model, clips[:batch_size], recipe, proto, device, batch_size=batch_size,
                              num_workers=0)  # warm-up
        sync(device)
        start = time.perf_counter()
        maps, _ = evaluate.predict_maps(model, clips, recipe, proto, device, batch_size=batch_size,
                                        num_workers=workers)
        sync(device)
        predict = time.perf_counter() - start
        start = time.perf_counter()
        result = evaluate.score_maps(maps, test.annotations, proto, test.ids, baselines=False, device=device)
        score = time.perf_counter() - start
    whole = predict + score
    print(f"model eval on {n_clips} synthetic clips (224 px, 10 s audio, 257 mels, batch {batch_size}, "
          f"{workers} loader workers), device {device}:")
    print(f"  whole eval               {whole:7.2f} s  {n_clips / whole:8.1f} clips/s")
    print(f"  of which maps (decode, log-mel, forward) {predict:7.2f} s; metrics {score:6.2f} s "
          f"= {100 * score / whole:.1f}% of the whole eval   [{result.n_explained()}]")


if __name__ == "__main__":
    main()
