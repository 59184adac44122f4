"""Training throughput: samples/s of the data loader alone, the model step alone and the whole training loop.

For each recipe (``quickstart``, ``tie_full``) and device (CPU; CUDA when available), on a synthetic training set
generated at the recipe's frame size in a temporary folder:

* ``loader``: the training DataLoader as ``train()`` builds it (frame decode, T_app / T_geo views, log-mel from a warm
  cache, T_mask; ``data.num_workers`` workers), iterated without a model. Steady state: the clock starts when the
  first round of workers has delivered its batches;
* ``step``: one optimiser step on tensors of the recipe's shapes already on the device: both views through the model,
  L_cl per view, L_geo, backward, Adam (``train.forward_views``, the loop's own step function), after one warm-up step;
* ``whole``: ``train()`` itself for warm-up + N steps of the first epoch (no validation, no T_mix refresh, tracking
  off), timed from the start of the first measured step to the start of the step after the last one, so start-up
  (model build, first batches, workers) and the final checkpoint are left out.

Targets (issue 3), as ratios within one run: ``loader / whole >= 2`` and ``whole / step >= 0.9``. A 2-core CPU shares
its cores between the loader workers and the model, so on CPU the ratios say how much the loader takes from the step.

    python benchmarks/train_throughput.py                            # both recipes, CPU (+ CUDA when available)
    python benchmarks/train_throughput.py --recipes quickstart --steps 10 --workers 2
    python benchmarks/train_throughput.py --device cuda --steps 50 --json train_throughput.json
    python benchmarks/train_throughput.py --threads 1      # one intra-op thread: see the note on shared CPUs below

On a CPU shared with other busy processes (or with the loader workers themselves), torch's default of one intra-op
thread per core oversubscribes the cores and its threads wait for each other; ``--threads`` shows the difference.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console

from sslt_cli import train as train_module
from sslt_cli.config import Recipe, load_recipe
from sslt_cli.data.datasets import AudioVisualDataset
from sslt_cli.data.manifest import read_set
from sslt_cli.model import autocast_for, build_model

REPO = Path(__file__).resolve().parents[1]
# Steps measured per recipe and device when --steps is not given: the 224 px recipe takes tens of seconds a step on CPU.
DEFAULT_STEPS = {("quickstart", "cpu"): 8, ("tie_full", "cpu"): 2, ("quickstart", "cuda"): 40, ("tie_full", "cuda"): 20}
WARMUP_STEPS = 1


@dataclass
class Figures:
    """One recipe on one device: samples/s of each stage and the two target ratios."""

    recipe: str
    device: str
    batch_size: int
    image_size: int
    spec_shape: tuple[int, int]
    workers: int
    loader: float
    step: float
    whole: float

    @property
    def loader_over_whole(self) -> float:
        return self.loader / self.whole

    @property
    def whole_over_step(self) -> float:
        return self.whole / self.step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def base_recipe(name: str, overrides: list[str]) -> Recipe:
    """``recipes/<name>.yaml`` with ``overrides`` applied last."""
    return load_recipe(REPO / "recipes" / f"{name}.yaml", overrides)


def make_data(root: Path, n_train: int, image_size: int) -> Path:
    """A synthetic training set only (frames at ``image_size``, 3 s audio), generated once per size."""
    from sslt_cli.data.synthetic import generate

    out = root / f"synthetic-{image_size}px-{n_train}"
    generate(out, n_train=n_train, n_val=0, n_test=0, n_flickr=0, image_size=image_size, progress=False)
    return out


def warm_cache(dataset: AudioVisualDataset) -> None:
    """Read every item once, which writes each clip's log-mel to the cache (``train()`` does so in its first epoch)."""
    for index in range(len(dataset)):
        dataset[index]


def time_loader(dataset: AudioVisualDataset, recipe: Recipe, device: torch.device, batches: int) -> float:
    """Steady-state samples/s of the training DataLoader over ``batches`` batches after the first round of workers.

    The sampler cycles over the set, so any number of batches can be timed on a small set (an item costs the same
    whether or not it was drawn before: the frame is decoded and augmented again, the log-mel read from the cache).
    """
    batch_size = recipe.optim.batch_size
    workers = recipe.data.num_workers
    first_round = max(1, workers)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(recipe.seed)).tolist()
    indices = list(itertools.islice(itertools.cycle(order), (first_round + batches) * batch_size))
    loader = train_module.make_loader(dataset, indices, batch_size, workers, True, device)
    arrivals = []
    for batch in loader:
        assert not batch["skipped"], batch["skipped"]
        arrivals.append(time.perf_counter())
    return batches * batch_size / (arrivals[-1] - arrivals[first_round - 1])


def time_step(recipe: Recipe, sample_batch: dict, device: torch.device, steps: int) -> float:
    """Samples/s of the loop's step (forward both views, losses, backward, Adam) on tensors already on ``device``."""
    torch.manual_seed(recipe.seed)
    model = build_model().to(device)
    # the same switches as train(): channels_last and autocast from the recipe
    channels_last = recipe.train.channels_last in ("on", "auto")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = train_module.ModelForTraining(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.optim.lr, weight_decay=recipe.optim.weight_decay)
    amp = autocast_for(device, recipe.train.precision)
    batch = {"images": sample_batch["images"].to(device), "specs": sample_batch["specs"].to(device)}
    net.train()

    def one_step(step: int) -> None:
        loss, _ = train_module.forward_views(net, batch, recipe, recipe.seed * 1_000_003 + step, device,
                                             channels_last, amp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for step in range(WARMUP_STEPS):
        one_step(step)
    sync(device)
    start = time.perf_counter()
    for step in range(WARMUP_STEPS, WARMUP_STEPS + steps):
        one_step(step)
    sync(device)
    return steps * batch["images"].shape[0] / (time.perf_counter() - start)


def time_whole(recipe: Recipe, device: torch.device, steps: int) -> float:
    """Samples/s of ``train()`` between the start of step WARMUP_STEPS + 1 and the start of the step after the last.

    ``train.forward_views`` is wrapped to note when each step starts; one extra step is run so the last measured
    step ends where the next begins (its own backward and optimiser update included). The device is synchronised
    at the two starts that bound the measurement only, so the loop keeps its own overlap of data and compute.
    """
    starts: list[float] = []
    bounds = (WARMUP_STEPS, WARMUP_STEPS + steps)
    real_forward_views = train_module.forward_views

    def noting_start(*args, **kwargs):
        if len(starts) in bounds:
            sync(device)
        starts.append(time.perf_counter())
        return real_forward_views(*args, **kwargs)

    train_module.forward_views = noting_start
    try:
        sink = Console(file=io.StringIO())
        train_module.train(recipe, console=sink, out=sink, evaluate_at_end=False)
    finally:
        train_module.forward_views = real_forward_views
    assert len(starts) == WARMUP_STEPS + steps + 1, len(starts)
    return steps * recipe.optim.batch_size / (starts[-1] - starts[WARMUP_STEPS])


def measure(name: str, device: torch.device, steps: int, loader_batches: int, workers: int | None,
            batch_size: int | None, repeats: int, work: Path) -> Figures:
    """The three figures for one recipe on one device, each the best of ``repeats`` rounds."""
    probe = base_recipe(name, [])
    batch = batch_size or probe.optim.batch_size
    # enough clips for the whole-loop run to stay inside its first epoch (no validation or T_mix refresh in it)
    n_train = batch * (WARMUP_STEPS + steps + 1)
    data = make_data(work, n_train, probe.data.image_size)
    runs = work / f"runs-{name}-{device.type}"
    # T_mix first mixes in epoch 1, so switching it off changes no measured step and skips the neighbour refresh
    # that train() runs after the last one
    workers = workers if workers is not None else min(probe.data.num_workers, os.cpu_count() or 1)
    overrides = [f"data.root={data}", "data.train=train", "data.val=null", "tracking.enabled=false",
                 "transforms.mix.enabled=false", f"runs_dir={runs}", f"optim.max_steps={WARMUP_STEPS + steps + 1}",
                 f"optim.batch_size={batch}", f"train.device={device.type}", f"data.num_workers={workers}"]
    recipe = base_recipe(name, overrides)
    clips = read_set(data / "train").clips
    # train() keeps its log-mel cache beside the run folders: warm it there so (a) and (c) both read it
    cache = runs / ".spec_cache" if recipe.data.cache_spectrograms else None
    dataset = train_module.training_dataset(recipe, clips, cache)
    warm_cache(dataset)

    sample = next(iter(train_module.make_loader(dataset, list(range(batch)), batch, 0, True, device)))
    # the stages take turns, and each keeps its best round: other processes on a shared machine only ever slow a
    # stage down, and taking turns exposes all three to the same spells of load
    loader_rate = step_rate = whole_rate = 0.0
    for _ in range(repeats):
        loader_rate = max(loader_rate, time_loader(dataset, recipe, device, loader_batches))
        step_rate = max(step_rate, time_step(recipe, sample, device, steps))
        whole_rate = max(whole_rate, time_whole(recipe, device, steps))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Figures(recipe=name, device=str(device), batch_size=batch, image_size=recipe.data.image_size,
                   spec_shape=tuple(sample["specs"].shape[-2:]), workers=recipe.data.num_workers,
                   loader=loader_rate, step=step_rate, whole=whole_rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=["quickstart", "tie_full"], choices=["quickstart", "tie_full"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: CPU, and CUDA too when available")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default: per recipe and device)")
    parser.add_argument("--loader-batches", type=int, default=None,
                        help="batches timed for the loader (default 8, 4 for tie_full on CPU)")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers (default: the recipe's, at most the CPU count)")
    parser.add_argument("--batch-size", type=int, default=None, help="override optim.batch_size")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the three stages; each keeps its best")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] if args.device in ("auto", "cpu") else []
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        devices.append(torch.device("cuda"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {os.cpu_count()} CPUs"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    results: list[Figures] = []
    with tempfile.TemporaryDirectory(prefix="sslt-train-throughput-") as tmp:
        for device in devices:
            for name in args.recipes:
                steps = args.steps or DEFAULT_STEPS[(name, device.type)]
                loader_batches = args.loader_batches or (4 if (name, device.type) == ("tie_full", "cpu") else 8)
                f = measure(name, device, steps, loader_batches, args.workers, args.batch_size, args.repeats, Path(tmp))
                results.append(f)
                print(f"{f.recipe:10s} {f.device:5s} batch {f.batch_size:3d}, {f.image_size} px, spec {f.spec_shape}, "
                      f"{f.workers} workers: loader {f.loader:8.1f}  step {f.step:7.1f}  whole {f.whole:7.1f} samples/s"
                      f"  | loader/whole {f.loader_over_whole:5.2f} (target >= 2)"
                      f"  whole/step {f.whole_over_step:5.2f} (target >= 0.9)", flush=True)
    if args.json:
        args.json.write_text(json.dumps([{**asdict(f), "loader_over_whole": f.loader_over_whole,
                                          "whole_over_step": f.whole_over_step} for f in results], indent=2) + "\n")


if __name__ == "__main__":
    main()
