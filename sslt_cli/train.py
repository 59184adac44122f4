"""The SSL-TIE training recipe, top to bottom.

``train(recipe)`` wires data, model, objective, optimiser, tracker and an explicit loop:

1. read the prepared sets (manifests), drop unreadable clips (counted, listed in ``skipped.csv``);
2. build the model (visual ResNet-18 with a stride-1 ``layer4``, audio ResNet-18) and Adam;
3. each step: two views (``paper``: independent appearance/audio augmentations, shared crop; ``code``: view 2 is
   view 1 under the equivariance transform with the same spectrogram), L_cl on each view, L_geo between the
   transformed map of view 1 and the map of the transformed view; total = cl_weight * (L_cl1 + L_cl2) + geo_weight * L_geo;
4. after each epoch: T_mix neighbour refresh (from ``transforms.mix.start_epoch``), validation on the validation set
   (never the test set), best checkpoint by validation cIoU, last checkpoints;
5. at the end: evaluate the last and the best checkpoints on every test set, with baselines.

It runs unchanged under ``torchrun --nproc-per-node N -m sslt_cli train RECIPE`` (DDP, NCCL on CUDA and gloo on
CPU). What stays the same whatever the number of processes W: the global batch (``optim.batch_size``, W slices of
it), the order of samples per step (global batch k of an epoch is the same whatever W, so a run resumes with any
W at the same sample), the contrastive loss (audio embeddings are gathered so the easy negatives come from the
global batch; ``loss.negatives: local`` keeps per-process negatives), the L_geo transform (drawn for the global
batch), T_mix's neighbours (each process embeds a shard, all gather) and the logged numbers (global-batch means).
What does not: BatchNorm normalises each process's slice unless ``train.sync_bn`` (CUDA only). The run folder, the
logs, the checkpoints and MLflow belong to rank 0; ``launch_torchrun`` starts torchrun for ``sslt train --nproc N``.
"""
from __future__ import annotations

import atexit
import csv
import dataclasses
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from sslt_cli.config import Recipe, flatten, recipe_dict
from sslt_cli.data import augment
from sslt_cli.data.datasets import AudioVisualDataset, collate_skip_bad, precheck_clips
from sslt_cli.data.manifest import Clip, read_set
from sslt_cli.errors import DataError, TrainingError
from sslt_cli.losses import LOSSES, equivariance_loss, rank_gather
from sslt_cli.model import EMBED_DIM, autocast_for, build_model, load_weights, localisation_map
from sslt_cli.preflight import check_eval_sets
from sslt_cli.runs import SKIPPED, Run
from sslt_cli.tracking import Tracker

CHECKPOINT_FORMAT = "sslt-checkpoint/1"


# ----------------------------------------------------------------------------------------------- environment

@dataclass(frozen=True)
class Dist:
    """Process-group facts; a single process is rank 0 of world 1."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Dist:
    """Join the torchrun process group when launched by torchrun (NCCL on CUDA, gloo on CPU).

    torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) says where;
    a group created here is destroyed when the process exits.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
        atexit.register(_destroy_process_group)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """``sslt <argv>`` in ``nproc`` processes on this machine: runs ``python -m torch.distributed.run --standalone
    --nproc-per-node nproc -m sslt_cli <argv>`` and returns its exit code.

    argv: the sslt arguments, e.g. ``["train", "recipes/tie_full.yaml", "optim.lr=3e-4"]``. Ctrl-C reaches torchrun
    from the terminal (same process group) and SIGTERM sent to this process is passed on, so the workers finish
    their step and checkpoint; this process waits for torchrun either way.
    """
    if nproc < 1:
        raise TrainingError(f"--nproc {nproc}: give a number of processes >= 1 (e.g. the number of GPUs)")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "sslt_cli", *argv]
    process = subprocess.Popen(command)

    def forward_sigterm(signum, frame):
        process.send_signal(signum)

    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM, forward_sigterm)}
    try:
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass(frozen=True)
class Shard:
    """One step's global batch across processes: the rows of every rank (rank order) and this process's rank."""

    sizes: tuple[int, ...]
    rank: int

    @property
    def first(self) -> int:
        """Index of this process's first row in the global batch."""
        return sum(self.sizes[: self.rank])

    @property
    def local(self) -> int:
        return self.sizes[self.rank]

    @property
    def total(self) -> int:
        return sum(self.sizes)


def exchange_step_state(rows: int, stop: bool, device: torch.device) -> tuple[tuple[int, ...], bool]:
    """Every process's batch rows for this step, and whether any process was asked to stop (one all_gather).

    A batch can lose clips that fail to decode, so the sizes can differ; a stop signal may reach only some ranks.
    """
    mine = torch.tensor([rows, int(stop)], dtype=torch.long, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    table = torch.stack(every).cpu()
    return tuple(int(n) for n in table[:, 0]), bool(table[:, 1].any())


def mean_over_global_batch(logs: dict[str, torch.Tensor], shard: Shard) -> dict[str, torch.Tensor]:
    """Per-process means of this step's logged scalars -> means over the global batch (rows-weighted), on every rank."""
    keys = list(logs)
    values = torch.stack([logs[k].detach().float().reshape(()) for k in keys]) * shard.local
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    values = values / shard.total
    return {k: values[i] for i, k in enumerate(keys)}


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank.

    DDP broadcasts them before each forward, so after the last step of an epoch each rank holds its own update;
    evaluation-mode passes between epochs (T_mix embeddings, validation) must all use the statistics the
    checkpoint saves.
    """
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TrainingError("train.device=cuda but no CUDA device is available; use train.device=auto or cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    np_state = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached": float(np_state[4])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------------ data

class EpochSampler(torch.utils.data.Sampler[int]):
    """A seeded permutation per epoch in global batches, this rank's slice of each, from any global batch on.

    ``batch_size`` is the per-process batch B; the global batch is G = B * world. Global batch k of an epoch is
    ``permutation[k*G:(k+1)*G]`` and rank r takes its rows ``r*B .. (r+1)*B``, so which samples make up step k does
    not depend on the number of processes: a checkpoint's (epoch, batch in epoch), counted in global batches,
    resumes at the same samples with any world size. The last ``n % G`` samples of the permutation are dropped.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Draw ``epoch``'s permutation and start after its first ``skip_batches`` global batches."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def batches_per_epoch(self) -> int:
        """Whole global batches in an epoch (one optimiser step each)."""
        return self.n // (self.batch_size * self.world)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)
        global_batch = self.batch_size * self.world
        batches = order[: self.batches_per_epoch() * global_batch].view(-1, global_batch)
        mine = batches[self.skip_batches:, self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return iter(mine.reshape(-1).tolist())

    def __len__(self) -> int:
        return max(0, (self.batches_per_epoch() - self.skip_batches) * self.batch_size)


def views_differ(recipe: Recipe) -> bool:
    """Whether a ``paper`` recipe's two views can differ (some augmentation or L_geo on); else one view is enough."""
    t = recipe.transforms
    return t.app.enabled or t.geo.enabled or t.mask.enabled or t.mix.enabled or t.equivariance.enabled


def audio_args(recipe: Recipe) -> dict:
    """The log-mel front end's settings as the datasets take them (the recipe's ``audio`` block)."""
    return recipe.audio.model_dump()


def load_training_clips(recipe: Recipe, run: Run | None, console: Console) -> tuple[list[Clip], list[tuple[str, str]]]:
    """Usable training clips after the manifest's own failures, held-out classes and a cheap existence check."""
    clip_set = read_set(recipe.data.set_path(recipe.data.train))
    clips = clip_set.clips
    skipped = [(c.id, f"manifest status '{c.status}': {c.reason}") for c in clip_set.unusable]
    if recipe.data.holdout_classes:
        held = set(recipe.data.holdout_classes)
        known = sorted({c.label for c in clips if c.label})
        if not known:
            raise DataError(f"{clip_set.root}: data.holdout_classes needs class labels, and this training set's "
                            "manifest has none", ["prepare the set with --labels vggsound.csv, or remove "
                                                  "data.holdout_classes"])
        unknown = sorted(held - set(known))
        if unknown:
            import difflib

            raise DataError(f"data.holdout_classes: {len(unknown)} class(es) are not in the training set "
                            f"{clip_set.root} (a held-out class must be one the set has, or nothing is held out)",
                            [f"{name!r}" + (f" (did you mean {close[0]!r}?)"
                                            if (close := difflib.get_close_matches(name, known, 1)) else "")
                             for name in unknown])
        before = len(clips)
        clips = [c for c in clips if c.label not in held]
        console.print(f"held out {before - len(clips)} training clips of {len(held)} classes (data.holdout_classes)")
    if recipe.data.limit_train:
        clips = clips[: recipe.data.limit_train]
    good, bad = precheck_clips(clips)
    skipped += bad
    if not good:
        raise DataError(f"{clip_set.root}: no usable training clips ({len(skipped)} skipped)",
                        [f"{i}: {r}" for i, r in skipped[:10]])
    return good, skipped


def check_cache_space(cache_dir: Path, n_clips: int, recipe: Recipe) -> str:
    """The log-mel cache's size for ``n_clips`` clips, checked against the free disk space before training starts.

    Each clip's log-mel is (n_mels, frames) float32 (VGGSound-144k at the paper's settings: about 99 GB). Files
    already in the cache count as written. Returns a line for the log; a DataError when the rest cannot fit, so the
    run never dies of a full disk hours in."""
    import shutil

    a = recipe.audio
    frames = int(a.clip_seconds * a.sample_rate) // a.hop_length + 1
    per_clip = a.n_mels * frames * 4 + 128  # .npy header
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = sum(entry.stat().st_size for entry in os.scandir(cache_dir) if entry.is_file())
    needed = max(0, n_clips * per_clip - cached)
    free = shutil.disk_usage(cache_dir).free
    gib = 2**30
    if needed > free:
        raise DataError(f"{cache_dir}: the log-mel cache needs about {needed / gib:.1f} GiB more for {n_clips} clips "
                        f"({per_clip / 2**20:.2f} MiB each) and the disk has {free / gib:.1f} GiB free",
                        ["set data.cache_spectrograms=false (the log-mel is then computed from the audio each "
                         "time), or free disk space, or put runs_dir on a larger disk"])
    return (f"log-mel cache {cache_dir}: about {n_clips * per_clip / gib:.2f} GiB for {n_clips} clips "
            f"({cached / gib:.2f} GiB there already; data.cache_spectrograms=false turns it off)")


def write_skipped(run: Run, skipped: list[tuple[str, str]], stage: str) -> None:
    """Append skipped clips with their reason to the run folder's skipped.csv."""
    if not skipped:
        return
    path = run.dir / SKIPPED
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["id", "stage", "reason"])
        for clip_id, reason in skipped:
            w.writerow([clip_id, stage, reason])


def make_loader(dataset, sampler, batch_size: int, workers: int, drop_last: bool, device: torch.device):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_skip_bad,
        drop_last=drop_last, pin_memory=device.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )


# ----------------------------------------------------------------------------------------------------- steps

def forward_views(model, batch: dict, recipe: Recipe, step_seed: int, device: torch.device, channels_last: bool,
                  amp, shard: Shard | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """One training step's loss: L_cl on both views and L_geo between them.

    batch["images"]: (B, 2, 3, H, W) in ``paper`` mode or (B, 1, 3, H, W) in ``code`` mode; batch["specs"] likewise
    (B, V, 1, F, T). Returns the total loss and detached scalars for logging.
    ``shard`` (distributed training): where this batch sits in the global batch. The L_geo transform is drawn for
    the global batch and this slice of it taken, and with ``loss.negatives: global`` the contrastive loss gathers
    the audio of every process; the returned loss is still this process's mean.
    """
    t = recipe.transforms
    loss_cfg = recipe.loss
    objective = LOSSES[loss_cfg.objective]
    loss_kwargs = (dict(eps_pos=loss_cfg.eps_pos, eps_neg=loss_cfg.eps_neg, tau=loss_cfg.tau,
                        temperature=loss_cfg.temperature) if loss_cfg.objective == "tie"
                   else dict(temperature=loss_cfg.temperature))
    if shard is not None and negatives_of(recipe) == "global":
        loss_kwargs["gather"] = rank_gather(shard.sizes, shard.rank)
    images = batch["images"].to(device, non_blocking=True)
    specs = batch["specs"].to(device, non_blocking=True)
    view1, spec1 = images[:, 0], specs[:, 0]
    spec2 = specs[:, 1] if specs.shape[1] > 1 else spec1
    if spec2 is spec1 and recipe.model.audio_passes == "per_view":
        spec2 = spec1.clone()  # a tensor of its own: ModelForTraining embeds it again, as the released code does
    base2 = images[:, 1] if images.shape[1] > 1 else view1

    use_geo = t.equivariance.enabled and recipe.loss.geo_weight > 0
    if use_geo:
        g = torch.Generator().manual_seed(step_seed)
        eq = t.equivariance
        transform = augment.sample_geo_transform(view1.shape[0] if shard is None else shard.total, g,
                                                 max_rotation=eq.max_rotation, scales=eq.scales,
                                                 scale_p=eq.scale_p, flip_p=eq.flip_p)
        if shard is not None:
            transform = dataclasses.replace(transform, angles=transform.angles[shard.first:shard.first + shard.local])
        view2 = augment.apply_geo_transform(base2, transform, centre=eq.centre)
    else:
        transform = None
        view2 = base2
    if channels_last:
        view1 = view1.contiguous(memory_format=torch.channels_last)
        view2 = view2.contiguous(memory_format=torch.channels_last)
    single_view = not use_geo and images.shape[1] == 1 and specs.shape[1] == 1
    if single_view:
        # Nothing differs between the two views (no second augmentation, no L_geo): one pass, and the loss keeps the
        # scale of the two-view total, 2 * cl_weight * L_cl (= L_cl at the default weight 0.5).
        with amp:
            ((v1, a1),) = model((view1, spec1))
        l_cl1, parts1 = objective(v1, a1, **loss_kwargs)
        total = 2 * loss_cfg.cl_weight * l_cl1
        logs = {"l_cl1": l_cl1.detach(), "acc1": parts1["acc1"], "loss": total.detach()}
        return total, logs
    # Two passes (as the official code makes), so BatchNorm sees each view's batch of B on its own; both run inside
    # one call of the wrapper so DDP sees a single forward per backward.
    with amp:
        (v1, a1), (v2, a2) = model((view1, spec1), (view2, spec2))
    l_cl1, parts1 = objective(v1, a1, **loss_kwargs)
    l_cl2, parts2 = objective(v2, a2, **loss_kwargs)
    total = loss_cfg.cl_weight * (l_cl1 + l_cl2)
    logs = {"l_cl1": l_cl1.detach(), "l_cl2": l_cl2.detach(), "acc1": parts1["acc1"]}
    if use_geo:
        target = augment.apply_geo_transform(parts1["map"], transform, out_size=parts2["map"].shape[-2:],
                                             upsample_to=view1.shape[-2:], centre=t.equivariance.centre)
        l_geo = equivariance_loss(parts2["map"], target)
        total = total + loss_cfg.geo_weight * l_geo
        logs["l_geo"] = l_geo.detach()
    logs["loss"] = total.detach()
    return total, logs


def negatives_of(recipe: Recipe) -> str:
    """``loss.negatives``: ``global`` (easy negatives from every process's audio) or ``local`` (this process's)."""
    return getattr(recipe.loss, "negatives", "global")


def sync_bn_of(recipe: Recipe) -> bool:
    """``train.sync_bn``: BatchNorm statistics over the global batch (SyncBatchNorm) when training on several GPUs."""
    return bool(getattr(recipe.train, "sync_bn", False))


class ModelForTraining(torch.nn.Module):
    """Embeds any number of (images, specs) views in one call, so DDP sees one forward per backward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *views: tuple[torch.Tensor, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """views: (images (B, 3, H, W), specs (B, 1, F, T)) pairs -> [(v (B, C, h, w), a (B, C)), ...].

        A spectrogram tensor shared by several views (``code`` views) is embedded once.
        """
        audio: dict[int, torch.Tensor] = {}
        out = []
        for images, specs in views:
            if id(specs) not in audio:
                audio[id(specs)] = self.model.embed_audio(specs)
            out.append((self.model.embed_image(images), audio[id(specs)]))
        return out


# -------------------------------------------------------------------------------------------- checkpoints

def checkpoint_state(model, optimizer, scheduler, recipe: Recipe, *, step: int, epoch: int, batch_in_epoch: int,
                     best: dict, mix_neighbours: np.ndarray | None, skipped_steps: int, world_size: int = 1) -> dict:
    """Everything a resume needs; ``step``, ``epoch`` and ``batch_in_epoch`` count global batches, so any number of
    processes can continue it (``world_size`` records how many wrote it)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
        "best": best,
        "rng": rng_state(),
        "recipe": recipe_dict(recipe),
        "mix_neighbours": torch.from_numpy(mix_neighbours) if mix_neighbours is not None else None,
        "skipped_steps": skipped_steps,
        "world_size": world_size,
    }


def model_state_from_checkpoint(state: dict, path: Path) -> dict:
    """The model state_dict inside an sslt checkpoint (CheckpointError when it is not one)."""
    from sslt_cli.errors import CheckpointError

    if state.get("format") != CHECKPOINT_FORMAT or "model" not in state:
        raise CheckpointError(f"{path}: not an sslt checkpoint (no format '{CHECKPOINT_FORMAT}' and 'model' entry); "
                              "official SSL-TIE weights cannot be resumed; evaluate them with `sslt eval CHECKPOINT` "
                              "(the format is recognised) or start a new run")
    return state["model"]


def lr_lambda_for(recipe: Recipe, steps_per_epoch: int):
    o = recipe.optim
    total = o.max_steps or o.epochs * steps_per_epoch
    warm = int(o.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if o.schedule == "cosine":
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0
    return factor


# -------------------------------------------------------------------------------------------------- train

def train(recipe: Recipe, *, overrides: list[str] | None = None, resume_run: Run | None = None,
          console: Console | None = None, out: Console | None = None, recipe_path: str | None = None,
          stop_after_steps: int | None = None, evaluate_at_end: bool = True) -> Run:
    """Train from ``recipe`` into a new run folder (or continue ``resume_run``); returns the run.

    ``stop_after_steps`` stops cleanly after that many optimiser steps in this call, with a checkpoint, as an
    interruption would (used to test exact resume).
    Under torchrun every process calls this; only rank 0 prints, writes the run folder and talks to MLflow.
    """
    console = console or Console(stderr=True)
    out = out or Console()
    device_kind = "cuda" if recipe.train.device == "cuda" or (recipe.train.device == "auto" and torch.cuda.is_available()) else "cpu"
    env = init_distributed(device_kind)
    if not env.main:
        console = out = Console(stderr=True, quiet=True)
    if recipe.optim.batch_size % env.world:
        raise TrainingError(f"optim.batch_size={recipe.optim.batch_size} (the global batch) does not split over "
                            f"{env.world} processes",
                            [f"use a multiple of {env.world}, or another number of processes"])
    device = pick_device(recipe.train.device, env.local_rank)
    if sync_bn_of(recipe) and env.world > 1 and device.type != "cuda":
        raise TrainingError(f"train.sync_bn=true needs CUDA devices; this run has {env.world} processes on {device} "
                            "(torch's SyncBatchNorm runs on GPUs only)", ["set train.sync_bn=false"])
    seed_everything(recipe.seed + env.rank, recipe.train.deterministic)
    channels_last = recipe.train.channels_last == "on" or (recipe.train.channels_last == "auto")
    amp = autocast_for(device, recipe.train.precision)

    check_eval_sets(recipe, tests=evaluate_at_end)
    run = resume_run
    if env.main and run is None:
        run = Run.create(recipe, overrides=overrides, extra_meta={"recipe_path": recipe_path, "world_size": env.world})
    if env.world > 1:
        shared = [str(run.dir) if run else None]
        dist.broadcast_object_list(shared, src=0)
        run = Run(shared[0])
    assert run is not None
    say = (lambda msg: (console.print(msg), run.log(msg))) if env.main else (lambda msg: None)

    # -- data
    clips, skipped = load_training_clips(recipe, run, console)
    if env.main and resume_run is None:
        write_skipped(run, skipped, "train")
    a_args = audio_args(recipe)
    t = recipe.transforms
    paper_views = t.views == "paper"
    image_transform = augment.build_image_transform(
        recipe.data.image_size, app=t.app.enabled, geo=t.geo.enabled, crop=t.geo.crop, crop_scale=t.geo.crop_scale,
        rotation=t.geo.rotation, flip=t.geo.flip, jitter=t.app.jitter, jitter_p=t.app.jitter_p, gray_p=t.app.gray_p,
        blur_p=t.app.blur_p, blur_sigma=t.app.blur_sigma)
    spec_augment = (dict(p=t.mask.p, time=t.mask.time, freq=t.mask.freq) if t.mask.enabled else None)
    cache_dir = (run.dir.parent / ".spec_cache" if recipe.data.cache_spectrograms else None)
    if cache_dir is not None and env.main:
        console.print(check_cache_space(cache_dir, len(clips), recipe))
    dataset = AudioVisualDataset(
        clips, image_transform=image_transform, n_views=2 if paper_views and views_differ(recipe) else 1, shared_geometry=True,
        audio=a_args, spec_augment=spec_augment, train=True, seed=recipe.seed, cache_dir=cache_dir)
    batch_size = recipe.optim.batch_size // env.world
    sampler = EpochSampler(len(dataset), batch_size, recipe.seed, env.rank, env.world)
    steps_per_epoch = sampler.batches_per_epoch()
    if steps_per_epoch == 0:
        raise DataError(f"{len(dataset)} usable training clips are fewer than one batch of {recipe.optim.batch_size}",
                        ["lower optim.batch_size or prepare more clips"])
    total_steps = recipe.optim.max_steps or recipe.optim.epochs * steps_per_epoch
    total_epochs = math.ceil(total_steps / steps_per_epoch)

    val_clips, val_annotations = [], {}
    if recipe.data.val:
        from sslt_cli.evaluate import load_test_set

        val_set = load_test_set(recipe.data.set_path(recipe.data.val))
        val_clips = [val_set.clips[i] for i in val_set.ids if i in val_set.clips and i in val_set.annotations]
        if recipe.data.holdout_classes:
            # model selection sees the training classes only: held-out classes are for the open-set evaluation
            held = set(recipe.data.holdout_classes)
            val_clips = [c for c in val_clips if c.label not in held]
        val_clips = val_clips[: recipe.data.limit_val] if recipe.data.limit_val else val_clips
        val_annotations = val_set.annotations
        if env.main:
            write_skipped(run, [(i, r) for i, r in {**val_set.annotation_problems, **val_set.unavailable}.items()], "val")

    # -- model and optimiser
    base_model = build_model(vision_init=recipe.model.vision_init, audio_init=recipe.model.audio_init).to(device)
    if channels_last:
        base_model = base_model.to(memory_format=torch.channels_last)
    if sync_bn_of(recipe) and env.world > 1:
        # converts the BatchNorm layers in place (same parameters and state_dict keys), so checkpoints stay plain
        base_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(base_model)
    net: torch.nn.Module = ModelForTraining(base_model)
    if env.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(base_model.parameters(), lr=recipe.optim.lr, weight_decay=recipe.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_for(recipe, steps_per_epoch))

    # -- state (fresh or resumed)
    step, epoch, batch_in_epoch = 0, 0, 0
    best = {"ciou": -1.0, "epoch": None, "step": None}
    mix_neighbours: np.ndarray | None = None
    skipped_steps = 0
    if resume_run is not None:
        last, state = run.resume_point()
        load_weights(base_model, model_state_from_checkpoint(state, last), last)
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        best = state["best"]
        skipped_steps = state.get("skipped_steps", 0)
        if state.get("mix_neighbours") is not None:
            mix_neighbours = state["mix_neighbours"].numpy()
        set_rng_state(state["rng"])
        if env.main:
            run.truncate_metrics_after(step)
        say(f"resuming {run.dir} from {last.name}: step {step}, epoch {epoch}, batch {batch_in_epoch}"
            + (f" (world size {state.get('world_size', 1)} -> {env.world})"
               if state.get("world_size", 1) != env.world else ""))

    tracker = Tracker(enabled=recipe.tracking.enabled and env.main, experiment=recipe.tracking.experiment,
                      warn=lambda m: say(f"warning: {m}"))
    meta = run.meta() if env.main else {}
    tracker.start(run.dir.name, params=flatten(recipe_dict(recipe)), run_id=meta.get("mlflow_run_id"),
                  tags={"sslt.run_dir": str(run.dir.resolve()), "sslt.recipe": recipe.name})
    if resume_run is not None and env.main:
        tracker.catch_up(run.metrics())
    if env.main:
        run.update_meta(status="running", mlflow_run_id=tracker.run_id, mlflow_uri=tracker.uri,
                        steps_per_epoch=steps_per_epoch, total_steps=total_steps, train_clips=len(clips),
                        skipped_train_clips=len(skipped), device=str(device), world_size=env.world)
        tracker.log_artifacts(run.dir / "config.yaml")
        say(f"run {run.dir}: {len(clips)} training clips ({len(skipped)} skipped), {len(val_clips)} validation clips, "
            f"{steps_per_epoch} steps/epoch x {total_epochs} epochs, batch {recipe.optim.batch_size}, device {device}, "
            f"precision {'fp32' if recipe.train.precision == 'fp32' else 'bf16 autocast'}")
        if env.world > 1:
            say(f"distributed: {env.world} processes ({dist.get_backend()}), {batch_size} clips per process and step, "
                f"{negatives_of(recipe)} negatives, "
                f"{'SyncBatchNorm' if sync_bn_of(recipe) else 'BatchNorm statistics per process'}")

    stop_requested = {"signal": None}

    def on_signal(signum, frame):  # finish the current step, checkpoint, stop
        stop_requested["signal"] = signum

    # every rank listens: under torchrun a signal may reach any of them, and they agree on stopping each step
    old_handlers = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old_handlers[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread
            pass

    def save_last() -> Path | None:
        if not env.main:
            return None
        state = checkpoint_state(base_model, optimizer, scheduler, recipe, step=step, epoch=epoch,
                                 batch_in_epoch=batch_in_epoch, best=best, mix_neighbours=mix_neighbours,
                                 skipped_steps=skipped_steps, world_size=env.world)
        return run.save_checkpoint(state, f"last-{step:08d}", keep_last=recipe.train.keep_last)

    skipped_elsewhere: list[tuple[str, str, str]] = []  # (id, reason, stage) of clips ranks > 0 dropped

    def collect_skipped() -> None:
        """Rank 0 lists the clips the other ranks dropped (one gather, at epoch ends and when stopping)."""
        gathered: list | None = [None] * env.world if env.main else None
        dist.gather_object(list(skipped_elsewhere), gathered, dst=0)
        skipped_elsewhere.clear()
        if env.main:
            by_stage: dict[str, list[tuple[str, str]]] = {}
            for rows in gathered[1:]:
                for clip_id, reason, stage in rows:
                    by_stage.setdefault(stage, []).append((clip_id, reason))
            for stage, rows in by_stage.items():
                write_skipped(run, rows, stage)

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn(), TextColumn("{task.fields[losses]}"), console=console,
                        disable=not env.main, transient=False)
    steps_this_call = 0
    status = "finished"
    last_logs: dict[str, float] = {}
    try:
        with progress:
            task = progress.add_task("train", total=total_steps, completed=step, rate="", losses="")
            while step < total_steps and status == "finished":
                dataset.set_epoch(epoch)
                k = epoch - t.mix.start_epoch + 1
                if t.mix.enabled and mix_neighbours is not None and k >= 1:
                    dataset.set_mix(mix_neighbours, k)
                else:
                    dataset.set_mix(None, 0)
                sampler.set_epoch(epoch, skip_batches=batch_in_epoch)
                loader = make_loader(dataset, sampler, batch_size, recipe.data.num_workers, True, device)
                net.train()
                window_start, window_samples = time.perf_counter(), 0
                for batch in loader:
                    if batch.get("skipped"):
                        if env.main:
                            write_skipped(run, batch["skipped"], f"train epoch {epoch}")
                        else:
                            skipped_elsewhere.extend((i, r, f"train epoch {epoch}") for i, r in batch["skipped"])
                    rows = batch["images"].shape[0] if "images" in batch else 0
                    shard = None
                    if env.world > 1:
                        sizes, stop_anywhere = exchange_step_state(rows, stop_requested["signal"] is not None, device)
                        if stop_anywhere:
                            status = "interrupted"
                            break
                        shard = Shard(sizes, env.rank)
                    # every rank skips together: a process with no clip left cannot run BatchNorm or the gather
                    global_rows, fewest = (shard.total, min(shard.sizes)) if shard else (rows, rows)
                    if global_rows < 2 or fewest == 0:
                        skipped_steps += 1
                        batch_in_epoch += 1
                        continue
                    loss, logs = forward_views(net, batch, recipe, recipe.seed * 1_000_003 + step, device,
                                               channels_last, amp, shard=shard)
                    if shard is not None:
                        logs = mean_over_global_batch(logs, shard)
                        # DDP averages gradients over processes; weighting each process's mean by its share of the
                        # global batch makes that average the gradient of the global mean (a factor of exactly 1
                        # when the shards are equal)
                        loss = loss * (env.world * shard.local / shard.total)
                    if not torch.isfinite(loss if shard is None else logs["loss"]):
                        values = {k: float(v) for k, v in logs.items()}
                        raise TrainingError(
                            f"the loss became {float(loss.detach())} at step {step + 1} (epoch {epoch}); training stopped",
                            [f"loss terms: {values}",
                             f"last good checkpoint: {run.latest_checkpoint() or 'none yet'} (intact)",
                             "try a lower optim.lr, train.precision=fp32, or optim.grad_clip"])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if recipe.optim.grad_clip:
                        torch.nn.utils.clip_grad_norm_(base_model.parameters(), recipe.optim.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    step += 1
                    steps_this_call += 1
                    batch_in_epoch += 1
                    window_samples += shard.total if shard else rows
                    if step % recipe.train.log_every == 0 or step == total_steps:
                        elapsed = time.perf_counter() - window_start
                        rate = window_samples / elapsed if elapsed > 0 else 0.0
                        last_logs = {k: float(v) for k, v in logs.items()}
                        last_logs.update(lr=scheduler.get_last_lr()[0], samples_per_s=rate)
                        if env.main:
                            run.append_metrics({"kind": "train", "step": step, "epoch": epoch, **last_logs})
                            tracker.log_metrics({f"train/{k}": v for k, v in last_logs.items()}, step)
                        progress.update(task, rate=f"{rate:.1f} samples/s",
                                        losses=" ".join(f"{k}={last_logs[k]:.3f}" for k in ("loss", "l_cl1", "l_geo")
                                                        if k in last_logs))
                        window_start, window_samples = time.perf_counter(), 0
                    progress.update(task, completed=step)
                    # several processes stop on a signal together, at the next step's exchange
                    if ((env.world == 1 and stop_requested["signal"] is not None)
                            or (stop_after_steps and steps_this_call >= stop_after_steps)):
                        status = "interrupted"
                        break
                    if step >= total_steps:
                        break
                if status != "finished":
                    break
                # -- end of epoch
                epoch += 1
                batch_in_epoch = 0
                if env.world > 1:
                    collect_skipped()
                    broadcast_buffers(base_model)
                if t.mix.enabled and epoch >= t.mix.start_epoch and step < total_steps:
                    mix_neighbours = refresh_mix_neighbours(base_model, clips, a_args, recipe, device, amp, env,
                                                            cache_dir, epoch)
                if val_clips and (epoch % recipe.train.val_every == 0 or step >= total_steps):
                    metrics = validate(base_model, val_clips, val_annotations, recipe, device, run, epoch, env)
                    if env.main:
                        run.append_metrics({"kind": "val", "step": step, "epoch": epoch, **metrics})
                        tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step)
                        grid = run.dir / "val" / f"heatmaps-epoch{epoch:04d}.png"
                        if grid.exists():
                            tracker.log_artifacts(grid, "val")
                        say(f"epoch {epoch}: val cIoU {metrics['ciou']:.4f} AUC {metrics['auc']:.4f} "
                            f"L_cl {metrics.get('l_cl', float('nan')):.4f} (N={metrics['n']})")
                        if metrics["ciou"] > best["ciou"]:
                            best = {"ciou": metrics["ciou"], "auc": metrics["auc"], "epoch": epoch, "step": step}
                            state = checkpoint_state(base_model, optimizer, scheduler, recipe, step=step, epoch=epoch,
                                                     batch_in_epoch=0, best=best, mix_neighbours=mix_neighbours,
                                                     skipped_steps=skipped_steps, world_size=env.world)
                            run.save_checkpoint(state, "best")
                save_last()
            if status != "finished":
                if env.world > 1:
                    collect_skipped()
                path = save_last()
                say(f"stopped at step {step} ({'signal ' + str(stop_requested['signal']) if stop_requested['signal'] else 'as asked'}); "
                    f"checkpoint {path}; continue with: sslt train --resume {run.dir}")
    except BaseException as exc:
        if env.main:
            run.update_meta(status="failed", error=f"{type(exc).__name__}: {exc}", step=step)
            run.log(f"failed at step {step}: {type(exc).__name__}: {exc}")
        tracker.end("FAILED")
        raise
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)

    if env.main:
        run.update_meta(status=status if status != "finished" else "trained", step=step, epoch=epoch, best=best)
    if status == "finished" and evaluate_at_end and env.main:
        from sslt_cli.evaluate import evaluate_run_checkpoints

        results = evaluate_run_checkpoints(run, recipe, device=device, tracker=tracker, console=console, out=out)
        run.update_meta(status="finished", test=results)
    elif status == "finished" and env.main:
        run.update_meta(status="finished")
    if env.main:
        end_table(run, recipe, best, last_logs, out)
        tracker.log_artifacts(run.dir / "metrics.jsonl")
        tracker.log_artifacts(run.dir / "train.log")
        tracker.log_artifacts(run.dir / "meta.json")
        if (run.dir / SKIPPED).exists():
            tracker.log_artifacts(run.dir / SKIPPED)
        tracker.end("FINISHED" if status == "finished" else "KILLED")
    # no closing barrier: rank 0's final evaluation can outlast the collective timeout, and the other ranks have
    # nothing left to do (torchrun waits for every process)
    return run


# ------------------------------------------------------------------------------------- epoch-level helpers

def mix_queue_seed(seed: int, epoch: int) -> int:
    """Seed of T_mix's candidate queue for the refresh at the end of ``epoch``: one per (run seed, epoch)."""
    return (seed * 7919 + epoch * 104729) % (2**63)


@torch.no_grad()
def refresh_mix_neighbours(model, clips: list[Clip], a_args: dict, recipe: Recipe, device: torch.device, amp,
                           env: Dist, cache_dir: Path | None, epoch: int) -> np.ndarray:
    """T_mix: embed every training clip's audio with the current encoder and take each clip's top-1 neighbour.

    The random queue of candidates is drawn anew for every epoch (``mix_queue_seed``), as the official retrieval
    samples a fresh queue each time, so over a run every clip can become a mixing partner. With several processes
    each embeds a contiguous shard of the clips and all gather the (N, 512) table, so every rank draws the same
    neighbours (same seed) as one process would.
    """
    dataset = AudioVisualDataset(clips, image_transform=None, n_views=1, audio=a_args, spec_augment=None,
                                 train=False, seed=recipe.seed, cache_dir=cache_dir)
    per_rank = math.ceil(len(clips) / env.world)
    bounds = [(min(r * per_rank, len(clips)), min((r + 1) * per_rank, len(clips))) for r in range(env.world)]
    start, stop = bounds[env.rank]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(start, stop)),
                                         batch_size=recipe.eval.batch_size, shuffle=False,
                                         num_workers=recipe.data.num_workers, collate_fn=collate_skip_bad)
    model.eval()
    embeddings = torch.zeros(stop - start, EMBED_DIM)
    decoded = torch.zeros(stop - start, dtype=torch.bool)
    for batch in loader:
        if "spec" not in batch:
            continue
        with amp:
            a = model.embed_audio(batch["spec"].to(device))
        index = torch.as_tensor(batch["index"]) - start
        embeddings[index] = a.float().cpu()
        decoded[index] = True
    model.train()
    if env.world > 1:
        gather = rank_gather([b - a for a, b in bounds], env.rank)
        embeddings = gather(embeddings.to(device))[0].cpu()
        decoded = gather(decoded.to(device, torch.uint8))[0].cpu().bool()
    g = torch.Generator().manual_seed(mix_queue_seed(recipe.seed, epoch))
    neighbours = augment.find_mix_neighbours(F.normalize(embeddings, dim=1), queue_size=recipe.transforms.mix.queue,
                                             generator=g)
    # a clip whose audio could not be decoded is neither mixed nor mixed into another clip
    neighbours[~decoded] = -1
    neighbours[~decoded[neighbours.clamp_min(0)]] = -1
    return neighbours.numpy()


@torch.no_grad()
def validate(model, clips: list[Clip], annotations: dict, recipe: Recipe, device: torch.device, run: Run,
             epoch: int, env: Dist) -> dict[str, float]:
    """cIoU / AUC / mean IoU on the validation set under the recipe's protocol, and the validation L_cl.

    Maps are computed at ``eval.precision`` (fp32 by default), as the final test evaluation computes them.
    """
    from sslt_cli.evaluate import eval_loader, recipe_protocol, score_maps

    protocol = recipe_protocol(recipe.eval)
    model.eval()
    maps: dict[str, np.ndarray] = {}
    losses, weights = 0.0, 0
    shown: tuple | None = None
    loss_cfg = recipe.loss
    amp = autocast_for(device, recipe.eval.precision)
    for batch in eval_loader(clips, recipe, device, protocol.image_preprocessing):
        if "image" not in batch:
            continue
        images = batch["image"].to(device)
        specs = batch["spec"].to(device)
        with amp:
            v = model.embed_image(images)
            a = model.embed_audio(specs)
        if images.shape[0] >= 2 and loss_cfg.objective == "tie":
            l, _ = LOSSES["tie"](v, a, eps_pos=loss_cfg.eps_pos, eps_neg=loss_cfg.eps_neg, tau=loss_cfg.tau,
                                 temperature=loss_cfg.temperature)
            losses += float(l) * images.shape[0]
            weights += images.shape[0]
        A = localisation_map(v.float(), a.float())[:, 0].cpu()
        for clip_id, m in zip(batch["id"], A.numpy()):
            maps[clip_id] = m
        if shown is None:
            shown = (list(batch["id"]), batch["image"][:8], A[:8])
    model.train()
    result = score_maps(maps, annotations, protocol, [c.id for c in clips], baselines=False, name="val")
    if env.main and shown is not None:
        heatmap_grid(shown[1], shown[2], [annotations.get(i) for i in shown[0]],
                     run.dir / "val" / f"heatmaps-epoch{epoch:04d}.png", title=f"validation, epoch {epoch}")
    method = result.method or {}
    metrics = {"ciou": method.get("ciou", 0.0), "auc": method.get("auc", 0.0), "mean_iou": method.get("mean_iou", 0.0),
               "n": result.n}
    if weights:
        metrics["l_cl"] = losses / weights
    return metrics


def heatmap_grid(images: torch.Tensor, maps: torch.Tensor, annotations: list, path: Path, title: str) -> Path:
    """A PNG grid: each validation frame with its localisation map overlaid and its boxes drawn.

    images: (B, 3, H, W) ImageNet-normalised; maps: (B, h, w) cosine maps.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    n = images.shape[0]
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.5), squeeze=False)
    for i, ax in enumerate(axes[0]):
        frame = (images[i].float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        size = frame.shape[0]
        up = F.interpolate(maps[i][None, None].float(), size=frame.shape[:2], mode="bilinear", align_corners=False)[0, 0]
        ax.imshow(frame)
        # min-max per image, as every protocol normalises a map before thresholding it
        ax.imshow(up.numpy(), cmap="jet", alpha=0.45)
        ann = annotations[i]
        if ann is not None:
            for box in ann.boxes:
                scale = size if ann.kind == "vggss" else size / 256.0
                x0, y0, x1, y1 = (float(b) * scale for b in box)
                if all(math.isfinite(b) and abs(b) < 1e3 for b in (x0, y0, x1, y1)):
                    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=1.2))
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


def end_table(run: Run, recipe: Recipe, best: dict, last_logs: dict, out: Console) -> None:
    meta = run.meta()
    table = Table(title=f"run {run.dir.name}")
    table.add_column("what")
    table.add_column("value")
    table.add_row("status", str(meta.get("status")))
    table.add_row("steps / epochs", f"{meta.get('step')} / {meta.get('epoch')}")
    for k in ("loss", "l_cl1", "l_cl2", "l_geo", "samples_per_s"):
        if k in last_logs:
            table.add_row(f"last {k}", f"{last_logs[k]:.4f}")
    if best.get("epoch") is not None:
        table.add_row("best val cIoU", f"{best['ciou']:.4f} (epoch {best['epoch']}, step {best['step']})")
    skipped = run.dir / SKIPPED
    if skipped.is_file():
        with open(skipped, newline="") as f:
            rows = list(csv.DictReader(f))
        ids = {r["id"] for r in rows}
        table.add_row("clips skipped", f"{len(ids)} (reasons in {skipped.name})")
    table.add_row("run folder", str(run.dir))
    out.print(table)
