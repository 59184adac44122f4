"""The cost of negative audio: seconds per clip of ``sslt eval`` positive-only, and with each kind of negative added.

Each configuration is ``evaluate.evaluate_model`` as ``sslt eval --negatives KINDS`` runs it (loader, frame and audio
decode, the model, scoring; no baselines, no outputs, no validation set), on the same synthetic VGG-SS-style test
set and an untrained network (speed does not depend on the weights), after a one-batch warm-up. The images are
embedded once whatever the kinds; each kind adds one audio forward per clip (silence: one in all) plus its maps and
scoring: the forward counts are printed beside the times, counted on the network itself.

    python benchmarks/negatives_cost.py                   # quickstart settings (96 px, 3 s, 40 mels), 128 clips
    python benchmarks/negatives_cost.py --paper           # the paper's (224 px, 10 s, 257 mels)
    python benchmarks/negatives_cost.py --clips 16        # a quick check that it runs
    python benchmarks/negatives_cost.py --device cuda
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from sslt_cli import evaluate
from sslt_cli.checkpoint import LoadedModel
from sslt_cli.config import Recipe
from sslt_cli.data.negatives import NegativeSettings
from sslt_cli.data.synthetic import generate
from sslt_cli.model import build_model

CONFIGURATIONS = (("positive only", ()), ("+ silence", ("silence",)), ("+ noise", ("noise",)),
                  ("+ offscreen", ("offscreen",)), ("+ all three", ("silence", "noise", "offscreen")))
QUICKSTART = {"data": {"image_size": 96, "num_workers": 0},
              "audio": {"clip_seconds": 3.0, "hop_length": 956, "n_mels": 40}, "eval": {"batch_size": 32}}


def counted(model: torch.nn.Module) -> dict[str, float]:
    """Count the rows the network embeds (wrapping its two embedding methods)."""
    counts: dict[str, float] = {"image": 0, "audio": 0}
    image, audio = model.embed_image, model.embed_audio

    def embed_image(x):
        counts["image"] += x.shape[0]
        return image(x)

    def embed_audio(x):
        counts["audio"] += x.shape[0]
        return audio(x)

    model.embed_image, model.embed_audio = embed_image, embed_audio
    return counts


def run(loaded: LoadedModel, test: evaluate.TestSet, kinds: tuple[str, ...], device: torch.device
        ) -> tuple[float, dict[str, float]]:
    """Wall seconds of one evaluation, and its CPU seconds and the (image, audio) rows the network embedded."""
    counts = counted(loaded.model)
    negatives = evaluate.NegativeOptions(NegativeSettings(kinds)) if kinds else None
    options = evaluate.EvalOptions(protocol="ssltie", negatives=negatives, baselines=False, save_maps=False,
                                   num_workers=0, device=str(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    evaluate.evaluate_model(loaded, test, options)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    counts["cpu_s"] = time.process_time() - cpu
    del loaded.model.embed_image, loaded.model.embed_audio  # the network's own methods again
    return seconds, dict(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=128)
    parser.add_argument("--paper", action="store_true", help="224 px frames, 10 s of audio, 257 mels")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", type=Path, default=None, help="keep the synthetic set here")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    recipe = Recipe() if args.paper else Recipe.model_validate(QUICKSTART)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.data or Path(scratch)
        if not (root / "test_vggss" / "manifest.csv").is_file():
            generate(root, n_train=0, n_val=0, n_test=args.clips, n_flickr=0, workers=1, progress=False)
        test = evaluate.load_test_set(root / "test_vggss")
        torch.manual_seed(0)
        loaded = LoadedModel(build_model().to(device).eval(), recipe, "untrained", Path("untrained"))
        warm = dataclasses.replace(test, ids=test.ids[:recipe.eval.batch_size])
        run(loaded, warm, ("silence", "noise", "offscreen"), device)  # warm-up: allocator, kernels, file cache
        rows = [(label, *run(loaded, test, kinds, device)) for label, kinds in CONFIGURATIONS]
    n = len(test.ids)
    base = rows[0][1]
    setting = "paper (224 px, 10 s, 257 mels)" if args.paper else "quickstart (96 px, 3 s, 40 mels)"
    print(f"negative audio cost: {n} clips, {setting}, device {device}, {torch.get_num_threads()} threads")
    print(f"{'configuration':<16} {'wall s':>8} {'s/clip':>8} {'x positive':>10} {'CPU s/clip':>10} "
          f"{'x positive':>10} {'image rows':>10} {'audio rows':>10}")
    cpu_base = rows[0][2]["cpu_s"]
    for label, seconds, counts in rows:
        print(f"{label:<16} {seconds:8.2f} {seconds / n:8.4f} {seconds / base:10.2f} {counts['cpu_s'] / n:10.4f} "
              f"{counts['cpu_s'] / cpu_base:10.2f} {int(counts['image']):10d} {int(counts['audio']):10d}")
    print("CPU s: the process's CPU time over all its threads (steadier than wall time on a shared machine)")


if __name__ == "__main__":
    main()
