"""The SSL-TIE training recipe, top to bottom.

``train(recipe, run)`` trains into a run folder its caller created, in the five phases of :class:`Training`, one
per step of the method, over one :class:`TrainState` (what a checkpoint saves):

1. ``setup_data``: read the prepared sets (manifests), drop unreadable clips (counted, listed in ``skipped.csv``);
2. ``setup_model``: build the model (visual ResNet-18 with a stride-1 ``layer4``, audio ResNet-18), Adam and the
   schedule, and with ``resume`` restore the newest checkpoint's state;
3. ``train_epoch``: each step two views (``paper``: independent appearance/audio augmentations, shared crop;
   ``code``: view 2 is view 1 under the equivariance transform with the same spectrogram), L_cl on each view,
   L_geo between the transformed map of view 1 and the map of the transformed view;
   total = cl_weight * (L_cl1 + L_cl2) + geo_weight * L_geo (``forward_views``);
4. ``end_epoch``: T_mix neighbour refresh (from ``transforms.mix.start_epoch``), validation on the validation set
   (never the test set), best checkpoint by validation cIoU, last checkpoints;
5. ``finish``: evaluate the last and the best checkpoints on every test set, with baselines; the end table.

It runs unchanged under ``torchrun --nproc-per-node N -m sslt_cli train RECIPE`` (DDP, NCCL on CUDA and gloo on
CPU; process-group code in ``distributed.py``). What stays the same whatever the number of processes W: the global
batch (``optim.batch_size``, W slices of it), the order of samples per step (global batch k of an epoch is the same
whatever W, so a run resumes with any W at the same sample), the contrastive loss (audio embeddings are gathered so
the easy negatives come from the global batch; ``loss.negatives: local`` keeps per-process negatives), the L_geo
transform (drawn for the global batch), T_mix's neighbours (each process embeds a shard, all gather) and the logged
numbers (global-batch means). What does not: BatchNorm normalises each process's slice unless ``train.sync_bn``
(CUDA only). The run folder, the logs, the checkpoints and MLflow belong to rank 0: the other ranks get a null
metrics sink and a quiet console.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from sslt_cli import checkpoint, distributed, interrupts
from sslt_cli.config import EquivarianceConfig, LossSection, Recipe, recipe_dict
from sslt_cli.data import augment
from sslt_cli.data.datasets import AudioVisualDataset, collate_skip_bad, precheck_clips
from sslt_cli.data.manifest import Clip, read_set
from sslt_cli.distributed import Dist, Shard
from sslt_cli.errors import DataError, TrainingError
from sslt_cli.evaluate import TestSet
from sslt_cli.learning_check import LearningCheck, chance_loss
from sslt_cli.losses import OBJECTIVES, build_objective, equivariance_loss, rank_gather
from sslt_cli.model import EMBED_DIM, autocast_for, build_model
from sslt_cli.runs import EVAL, SKIPPED, Run
from sslt_cli.tracking import MetricsSink

CHECKPOINT_FORMAT = checkpoint.CHECKPOINT_FORMAT


# ------------------------------------------------------------------------------------------------- state and result

@dataclass
class TrainState:
    """Where training stands; a checkpoint is this state serialised with the model, optimiser, RNG and recipe.

    ``step``, ``epoch`` and ``batch_in_epoch`` count global batches (optimiser steps), so any number of processes
    can continue a checkpoint. ``history``: one dict per validation ({"epoch", "step", "ciou", "auc", ...}).
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best: dict = field(default_factory=lambda: {"ciou": -1.0, "epoch": None, "step": None})
    mix_neighbours: np.ndarray | None = None
    skipped_steps: int = 0
    history: list[dict] = field(default_factory=list)

    def to_checkpoint(self) -> dict:
        """This state as checkpoint entries (tensors, numbers, lists and dicts: ``weights_only`` loads them)."""
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "best": self.best,
                "mix_neighbours": (torch.from_numpy(self.mix_neighbours) if self.mix_neighbours is not None
                                   else None),
                "skipped_steps": self.skipped_steps, "history": self.history}

    @classmethod
    def from_checkpoint(cls, state: dict) -> "TrainState":
        """The state a checkpoint saved; checkpoints written before ``history`` was saved load with none."""
        neighbours = state.get("mix_neighbours")
        return cls(step=state["step"], epoch=state["epoch"], batch_in_epoch=state["batch_in_epoch"],
                   best=state["best"], mix_neighbours=neighbours.numpy() if neighbours is not None else None,
                   skipped_steps=state.get("skipped_steps", 0), history=list(state.get("history", [])))


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` hands back: the run, how it ended, its checkpoints, validations and test results.

    ``test[set][checkpoint label]`` -> {"ciou", "auc", "mean_iou", "pointing" (when the protocol has it), "n",
    "baseline_centre/ciou", "baseline_centre/auc"}; empty when the run stopped early or ``evaluate_at_end`` was off.
    """

    run: Run
    status: str
    best: Path | None
    last: Path | None
    history: list[dict]
    protocol: str | None
    test: dict[str, dict[str, dict[str, float]]]
    continue_with: str | None = None
    learning_check: dict | None = None  # LearningCheck.record() (None: not checked in this call)


def train(recipe: Recipe, run: Run, *, sink: MetricsSink, resume: bool = False, console: Console | None = None,
          out: Console | None = None, stop_after_steps: int | None = None, evaluate_at_end: bool = True
          ) -> TrainResult:
    """Train ``recipe`` into ``run`` (with ``resume``, continue it from its newest checkpoint), recording every
    number through ``sink``.

    The caller owns the run: it ran the checks before it (:func:`preflight`), created the folder (``Run.create``),
    opened its MLflow run (``tracking.run_tracking``: with its parent and tags from its creation) and closes it with
    the status this returns; ``train`` never opens or closes a tracking run. Under torchrun every process calls this
    with the same run folder (``distributed.share_run``) and rank 0's sink (``MetricsSink.null()`` on the others);
    only rank 0 prints and writes the run folder. ``stop_after_steps`` stops cleanly after that many optimiser steps
    in this call, with a checkpoint, as an interruption would (used to test exact resume).

    SIGINT / SIGTERM (:mod:`sslt_cli.interrupts`) stop it in any phase with status ``interrupted``: during the steps
    and validation at the next safe point with a checkpoint; during the set-up and the final evaluation at once. The
    run's meta.json says in which phase (``interrupted_in``) and ``TrainResult.continue_with`` says how to continue
    (``sslt train --resume RUN``: after the final evaluation was interrupted it goes straight to the evaluation).
    """
    env = distributed.init_distributed(distributed.device_kind(recipe.train.device))
    with interrupts.listening() as stops:
        training = Training(recipe, run, env, sink, console=console, out=out, stop_after_steps=stop_after_steps,
                            stops=stops)
        try:
            with stops.phase("setup"):
                training.setup_data(resume)
                training.setup_model(resume)
                training.announce()
            status = training.run_epochs()
            return training.finish(status, evaluate_at_end)
        except interrupts.Interrupted as stopped:
            return training.interrupted(stopped)


def preflight(recipe: Recipe, env: Dist | None = None, device: torch.device | None = None, *,
              tests: bool = True, retrieval: bool = False) -> None:
    """The checks before a run starts, made once by whoever creates (or resumes) the run folder (``sslt train``,
    ``sslt ablate``) before any folder or MLflow run exists: these processes fit the recipe (:func:`check_processes`),
    a local MLflow store opens (tracking on: a broken store is named before the sets are read), the validation and,
    with ``tests``, the test sets have a usable clip (:func:`check_eval_sets`), and every weights file the run will
    read (:func:`check_weight_files`: the encoders' initialisation, with ``tests`` the final evaluation's object
    guidance) loads. ``retrieval`` (an ablation that retrieves after training): the retrieval set and its labels can
    be scored (``retrieve.check_retrieval_inputs``). ``env``: this process group (default: one process); ``device``:
    where it trains (default: the recipe's)."""
    from sslt_cli.tracking import check_store

    env = env or Dist()
    check_processes(recipe, env, device or distributed.pick_device(recipe.train.device, env.local_rank))
    if recipe.tracking.enabled:
        check_store()
    check_eval_sets(recipe, tests=tests)
    check_weight_files(recipe, tests=tests)
    if retrieval:
        from sslt_cli.retrieve import check_retrieval_inputs

        check_retrieval_inputs(recipe)


# ------------------------------------------------------------------------------------------------------ the recipe

class Training:
    """One training run: the phases of the module docstring, over ``self.state`` (a :class:`TrainState`)."""

    def __init__(self, recipe: Recipe, run: Run, env: Dist, sink: MetricsSink, *, console: Console | None = None,
                 out: Console | None = None, stop_after_steps: int | None = None,
                 stops: interrupts.StopListener | None = None):
        self.recipe, self.run, self.env, self.sink = recipe, run, env, sink
        self.console = console or Console(stderr=True)
        self.out = out or Console()
        if not env.main:
            self.console = self.out = Console(stderr=True, quiet=True)
        self.device = distributed.pick_device(recipe.train.device, env.local_rank)
        seed_everything(recipe.seed + env.rank, recipe.train.deterministic)
        self.channels_last = recipe.train.channels_last in ("on", "auto")
        self.amp = autocast_for(self.device, recipe.train.precision)
        self.step_setup = StepSetup.of(recipe, self.device, self.channels_last, self.amp)
        self.objective = self.step_setup.objective
        self.stop_after_steps = stop_after_steps
        self.stops = stops or interrupts.StopListener()
        self.state = TrainState()
        self.last_logs: dict[str, float] = {}
        self.skipped_elsewhere: list[tuple[str, str, str]] = []  # (id, reason, stage) of clips ranks > 0 dropped
        self.check_losses: deque[float] = deque(maxlen=CHECK_WINDOW)  # l_cl1 of the steps before the learning check
        self.learning_check: dict | None = None

    def say(self, message: str) -> None:
        """A line on the console and in train.log (rank 0)."""
        if self.env.main:
            self.console.print(message)
            self.run.log(message)

    # -- 1. data -------------------------------------------------------------------------------------------------

    def setup_data(self, resume: bool) -> None:
        """Training clips (unusable ones listed in skipped.csv), the dataset and its sampler, the validation set."""
        recipe, env = self.recipe, self.env
        self.clips, skipped = load_training_clips(recipe, self.run, self.console)
        self.n_skipped = len(skipped)
        if env.main and not resume:
            write_skipped(self.run, skipped, "train")
        self.cache_dir = self.run.dir.parent / ".spec_cache" if recipe.data.cache_spectrograms else None
        if self.cache_dir is not None and env.main:
            self.console.print(check_cache_space(self.cache_dir, len(self.clips), recipe))
        self.dataset = training_dataset(recipe, self.clips, self.cache_dir)
        self.batch_size = recipe.optim.batch_size // env.world
        self.sampler = EpochSampler(len(self.dataset), self.batch_size, recipe.seed, env.rank, env.world)
        self.steps_per_epoch = self.sampler.batches_per_epoch()
        if self.steps_per_epoch == 0:
            raise DataError(f"{len(self.dataset)} usable training clips are fewer than one batch of "
                            f"{recipe.optim.batch_size}", ["lower optim.batch_size or prepare more clips"])
        self.total_steps = recipe.optim.max_steps or recipe.optim.epochs * self.steps_per_epoch
        self.val = load_validation_set(recipe, self.run if env.main else None)
        checked = "learning_check" in self.run.meta() if env.main else True
        self.check_at = (recipe.train.learning_check_steps or self.steps_per_epoch
                         if recipe.train.learning_check and env.main and not checked else None)

    # -- 2. model, optimiser, resume -----------------------------------------------------------------------------

    def setup_model(self, resume: bool) -> None:
        """The model (channels-last, SyncBatchNorm, DDP as the recipe and world ask), Adam, the schedule; with
        ``resume`` the newest checkpoint's weights, optimiser, schedule, RNG and :class:`TrainState`."""
        recipe, env = self.recipe, self.env
        model = build_model()
        checkpoint.init_from_torchvision(model, recipe.model.vision_init, recipe.model.audio_init)
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if sync_bn_of(recipe) and env.world > 1:
            # converts the BatchNorm layers in place (same parameters and state_dict keys), so checkpoints stay plain
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.net: torch.nn.Module = ModelForTraining(model)
        if env.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=recipe.optim.lr, weight_decay=recipe.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda_for(recipe, self.steps_per_epoch))
        self.resumed = resume
        if resume:
            self.load_checkpoint()

    def load_checkpoint(self) -> None:
        """Continue from the run's newest complete checkpoint (``checkpoint.resume_point``)."""
        if self.env.main:
            torn, size = self.run.remove_torn_checkpoints()
            if torn:
                self.say(f"removed {torn} torn temporary checkpoint file(s) ({size / 2**20:.1f} MiB) left by a stop "
                         "during a save")
        last, saved = checkpoint.resume_point(self.run)
        checkpoint.load_weights(self.model, checkpoint.model_weights(saved, last), last)
        self.optimizer.load_state_dict(saved["optimizer"])
        if saved.get("scheduler"):
            self.scheduler.load_state_dict(saved["scheduler"])
        self.state = TrainState.from_checkpoint(saved)
        checkpoint.set_rng_state(saved["rng"])
        if self.env.main:
            # a final evaluation cut short left some test records; the resumed run evaluates again, in full
            self.run.truncate_metrics_after(self.state.step, drop_kinds=("test",))
            self.sink.catch_up()  # the numbers a store that failed earlier in the run missed, replayed steps cut
        s, world = self.state, saved.get("world_size", 1)
        self.say(f"resuming {self.run.dir} from {last.name}: step {s.step}, epoch {s.epoch}, batch {s.batch_in_epoch}"
                 + (f" (world size {world} -> {self.env.world})" if world != self.env.world else ""))

    def save_checkpoint(self, name: str) -> Path | None:
        """``checkpoints/<name>.pt`` (rank 0): the state, model, optimiser, schedule, RNG and recipe."""
        if not self.env.main:
            return None
        saved = {"format": CHECKPOINT_FORMAT, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 **self.state.to_checkpoint(), "rng": checkpoint.rng_state(), "recipe": recipe_dict(self.recipe),
                 "world_size": self.env.world}
        keep = self.recipe.train.keep_last if name.startswith("last-") else None
        return self.run.save_checkpoint(saved, name, keep_last=keep)

    def announce(self) -> None:
        """Rank 0 records the run's facts in meta.json (status ``running``) and says what it is about to train."""
        recipe, env, run = self.recipe, self.env, self.run
        if not env.main:
            return
        run.update_meta(status="running", steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
                        train_clips=len(self.clips), skipped_train_clips=self.n_skipped, device=str(self.device),
                        world_size=env.world)
        self.say(f"run {run.dir}: {len(self.clips)} training clips ({self.n_skipped} skipped), "
                 f"{len(self.val.ids) if self.val else 0} validation clips, {self.steps_per_epoch} steps/epoch x "
                 f"{math.ceil(self.total_steps / self.steps_per_epoch)} epochs, batch {recipe.optim.batch_size}, "
                 f"device {self.device}, precision "
                 f"{'fp32' if recipe.train.precision == 'fp32' else 'bf16 autocast'}")
        if env.world > 1:
            self.say(f"distributed: {env.world} processes ({distributed.backend()}), {self.batch_size} "
                     f"clips per process and step, {negatives_of(recipe)} negatives, "
                     f"{'SyncBatchNorm' if sync_bn_of(recipe) else 'BatchNorm statistics per process'}")

    # -- 3. epochs and steps -------------------------------------------------------------------------------------

    def run_epochs(self) -> str:
        """Epochs until the last step, each followed by its end; ``finished``, or ``interrupted`` after a signal (in
        the steps or a validation: both finish first) or ``stop_after_steps`` (with a last checkpoint). A failure is
        recorded in meta.json, then raised (the caller closes the MLflow run as failed); a second signal raises
        :class:`~sslt_cli.interrupts.Interrupted` at once."""
        self.steps_this_call = 0
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[rate]}"),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                 TextColumn("{task.fields[losses]}"), console=self.console, disable=not self.env.main,
                                 transient=False)
        status = "finished"
        try:
            # every rank listens (under torchrun a signal may reach any of them, and they agree on stopping each step)
            with self.stops.phase("training", defer=True), self.progress:
                self.task = self.progress.add_task("train", total=self.total_steps, completed=self.state.step,
                                                   rate="", losses="")
                while self.state.step < self.total_steps and status == "finished":
                    status = self.train_epoch()
                    if status == "finished":
                        self.end_epoch()
                        if self.env.world == 1 and self.stops.requested:
                            status = "interrupted"  # a signal during the end of the epoch: its checkpoint is written
            if status == "finished" and self.env.world == 1 and self.stops.requested:
                status = "interrupted"  # during the last validation: stop before the final evaluation
            # (several processes: rank 0 stops as its final evaluation starts; the others have nothing left to do)
            if status != "finished":
                with self.stops.phase("training", defer=True):
                    self.stop()
        except interrupts.Interrupted:
            raise
        except BaseException as exc:
            if self.env.main:
                self.run.update_meta(status="failed", error=f"{type(exc).__name__}: {exc}", step=self.state.step)
                self.run.log(f"failed at step {self.state.step}: {type(exc).__name__}: {exc}")
            raise
        return status

    def train_epoch(self) -> str:
        """The rest of epoch ``state.epoch`` (from ``state.batch_in_epoch``); ``finished`` or ``interrupted``."""
        s, t = self.state, self.recipe.transforms
        self.dataset.set_epoch(s.epoch)
        k = s.epoch - t.mix.start_epoch + 1
        if t.mix.enabled and s.mix_neighbours is not None and k >= 1:
            self.dataset.set_mix(s.mix_neighbours, k)
        else:
            self.dataset.set_mix(None, 0)
        self.sampler.set_epoch(s.epoch, skip_batches=s.batch_in_epoch)
        loader = make_loader(self.dataset, self.sampler, self.batch_size, self.recipe.data.num_workers, True,
                             self.device)
        self.net.train()
        self.window = (time.perf_counter(), 0)
        for batch in loader:
            if batch.get("skipped"):
                self.note_skipped(batch["skipped"], f"train epoch {s.epoch}")
            rows = batch["images"].shape[0] if "images" in batch else 0
            shard = None
            if self.env.world > 1:
                sizes, stop_anywhere = distributed.exchange_step_state(rows, self.stops.requested,
                                                                       self.device)
                if stop_anywhere:
                    return "interrupted"
                shard = Shard(sizes, self.env.rank)
            # every rank skips together: a process with no clip left cannot run BatchNorm or the gather
            global_rows, fewest = (shard.total, min(shard.sizes)) if shard else (rows, rows)
            if global_rows < 2 or fewest == 0:
                s.skipped_steps += 1
                s.batch_in_epoch += 1
                continue
            self.train_step(batch, shard, rows)
            # several processes stop on a signal together, at the next step's exchange
            if ((self.env.world == 1 and self.stops.requested)
                    or (self.stop_after_steps and self.steps_this_call >= self.stop_after_steps)):
                return "interrupted"
            if s.step >= self.total_steps:
                break
        return "finished"

    def train_step(self, batch: dict, shard: Shard | None, rows: int) -> None:
        """One optimiser step on ``batch`` (this process's slice ``shard`` of the global batch, if distributed)."""
        s, recipe = self.state, self.recipe
        loss, logs = forward_views(self.net, batch, self.step_setup, recipe.seed * 1_000_003 + s.step, shard=shard)
        if shard is not None:
            logs = distributed.mean_over_global_batch(logs, shard)
            # DDP averages gradients over processes; weighting each process's mean by its share of the global batch
            # makes that average the gradient of the global mean (a factor of exactly 1 when the shards are equal)
            loss = loss * (self.env.world * shard.local / shard.total)
        if not torch.isfinite(loss if shard is None else logs["loss"]):
            values = {k: float(v) for k, v in logs.items()}
            raise TrainingError(
                f"the loss became {float(loss.detach())} at step {s.step + 1} (epoch {s.epoch}); training stopped",
                [f"loss terms: {values}",
                 f"last good checkpoint: {self.run.latest_checkpoint() or 'none yet'} (intact)",
                 "try a lower optim.lr, train.precision=fp32, or optim.grad_clip"])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), recipe.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        s.step += 1
        s.batch_in_epoch += 1
        self.steps_this_call += 1
        if self.check_at is not None and s.step <= self.check_at:
            if s.step > min(self.check_at, self.total_steps) - CHECK_WINDOW:
                self.check_losses.append(float(logs["l_cl1"]))
            if s.step == self.check_at and recipe.train.learning_check_steps:
                self.check_learning()
        self.window = (self.window[0], self.window[1] + (shard.total if shard else rows))
        if s.step % recipe.train.log_every == 0 or s.step == self.total_steps:
            self.log_step(logs)
        self.progress.update(self.task, completed=s.step)

    def log_step(self, logs: dict[str, torch.Tensor]) -> None:
        """The step's losses, learning rate and throughput since the last log: metrics sink and progress bar."""
        start, samples = self.window
        elapsed = time.perf_counter() - start
        rate = samples / elapsed if elapsed > 0 else 0.0
        self.last_logs = {k: float(v) for k, v in logs.items()}
        self.last_logs.update(lr=self.scheduler.get_last_lr()[0], samples_per_s=rate)
        self.sink.log("train", self.state.step, self.last_logs, fields={"epoch": self.state.epoch})
        self.progress.update(self.task, rate=f"{rate:.1f} samples/s",
                             losses=" ".join(f"{k}={self.last_logs[k]:.3f}" for k in ("loss", "l_cl1", "l_geo")
                                             if k in self.last_logs))
        self.window = (time.perf_counter(), 0)

    def note_skipped(self, rows: list[tuple[str, str]], stage: str) -> None:
        """Clips a batch dropped: into skipped.csv on rank 0, kept for the next gather on the other ranks."""
        if self.env.main:
            write_skipped(self.run, rows, stage)
        else:
            self.skipped_elsewhere.extend((clip_id, reason, stage) for clip_id, reason in rows)

    def collect_skipped(self) -> None:
        """Rank 0 lists the clips the other ranks dropped (one gather, at epoch ends and when stopping)."""
        gathered = distributed.gather_to_main(self.env, self.skipped_elsewhere)
        self.skipped_elsewhere.clear()
        by_stage: dict[str, list[tuple[str, str]]] = {}
        for rows in (gathered or [[]])[1:]:
            for clip_id, reason, stage in rows:
                by_stage.setdefault(stage, []).append((clip_id, reason))
        for stage, rows in by_stage.items():
            write_skipped(self.run, rows, stage)

    # -- 4. end of epoch -----------------------------------------------------------------------------------------

    def end_epoch(self) -> None:
        """T_mix refresh, validation (best checkpoint by validation cIoU), the last checkpoint."""
        s, recipe, t = self.state, self.recipe, self.recipe.transforms
        s.epoch += 1
        s.batch_in_epoch = 0
        if self.env.world > 1:
            self.collect_skipped()
            distributed.broadcast_buffers(self.model)
        if t.mix.enabled and s.epoch >= t.mix.start_epoch and s.step < self.total_steps:
            s.mix_neighbours = refresh_mix_neighbours(self.model, self.clips, recipe, self.device, self.amp,
                                                      self.env, self.cache_dir, s.epoch)
        if self.val is not None and (s.epoch % recipe.train.val_every == 0 or s.step >= self.total_steps):
            with self.stops.phase("validation", defer=True):
                self.validate()
        # by steps: at that step (train_step); else here, once the first whole epoch is done (a run that ends
        # sooner is too short to judge); skipped batches count towards the epoch
        if (self.check_at is not None and not recipe.train.learning_check_steps
                and s.step + s.skipped_steps >= self.check_at):
            self.check_learning()
        self.save_checkpoint(f"last-{s.step:08d}")

    def check_learning(self) -> None:
        """The learning check (``learning_check.LearningCheck``), once per run, on rank 0: the mean L_cl of the last
        steps against chance, the latest validation AUC against the centre prior's; a run that is not learning
        prints one warning line. Recorded in meta.json, metrics.jsonl and MLflow (metrics and a tag)."""
        s, recipe = self.state, self.recipe
        self.check_at = None
        if not self.check_losses:
            return
        global_negatives = self.env.world > 1 and negatives_of(recipe) == "global"
        candidates = recipe.optim.batch_size if global_negatives else self.batch_size
        latest = s.history[-1] if s.history else None
        check = LearningCheck(step=s.step, epoch=s.epoch, loss=sum(self.check_losses) / len(self.check_losses),
                              chance=chance_loss(recipe.loss.objective, candidates),
                              tolerance=recipe.train.learning_check_tolerance,
                              val_auc=latest["auc"] if latest else None,
                              centre_auc=centre_prior_auc(self.val, recipe) if latest else None)
        self.run.log(check.message())
        if not check.learning:
            self.console.print(check.message(), style="yellow", highlight=False, markup=False, soft_wrap=True)
        self.learning_check = check.record()
        self.run.update_meta(learning_check=self.learning_check)
        self.sink.log("learning_check", s.step, check.metrics(), fields={"epoch": s.epoch})
        self.sink.tag({"learning_check": "learning" if check.learning else "not learning"})

    def validate(self) -> None:
        """Validation metrics into the sink and the history; a new best validation cIoU saves ``best.pt``."""
        s = self.state
        metrics = validate(self.model, self.val, self.recipe, self.device, self.objective,
                           self.run.dir / "val" / f"heatmaps-epoch{s.epoch:04d}.png" if self.env.main else None,
                           s.epoch)
        s.history.append({"epoch": s.epoch, "step": s.step, **metrics})
        self.sink.log("val", s.step, metrics, fields={"epoch": s.epoch})
        self.sink.artifact(self.run.dir / "val" / f"heatmaps-epoch{s.epoch:04d}.png", "val")
        self.say(f"epoch {s.epoch}: val cIoU {metrics['ciou']:.4f} AUC {metrics['auc']:.4f} "
                 f"L_cl {metrics.get('l_cl', float('nan')):.4f} (N={metrics['n']})")
        if metrics["ciou"] > s.best["ciou"]:
            s.best = {"ciou": metrics["ciou"], "auc": metrics["auc"], "epoch": s.epoch, "step": s.step}
            self.save_checkpoint("best")

    def stop(self) -> None:
        """After a signal or ``stop_after_steps``: gather the skipped clips, save the last checkpoint, say how to
        continue."""
        if self.env.world > 1:
            self.collect_skipped()
        path = self.save_checkpoint(f"last-{self.state.step:08d}")
        how = f"{self.stops.signal_name} during the {self.stops.heard_in}" if self.stops.requested else "as asked"
        self.say(f"stopped at step {self.state.step} ({how}); checkpoint {path}; "
                 f"continue with: sslt train --resume {self.run.dir}")

    # -- 5. finish -----------------------------------------------------------------------------------------------

    def finish(self, status: str, evaluate_at_end: bool) -> TrainResult:
        """Test evaluation of the last and best checkpoints (rank 0, finished runs), the end table."""
        run, s = self.run, self.state
        test: dict = {}
        protocol = None
        if self.env.main:
            run.update_meta(status=status if status != "finished" else "trained", step=s.step, epoch=s.epoch,
                            best=s.best, **({"interrupted_in": self.stops.heard_in or "training"}
                                           if status == "interrupted" else {}))
            if status == "finished" and evaluate_at_end:
                protocol = self.recipe.eval.protocol
                with self.stops.phase("final evaluation"):
                    test = self.test_evaluation().summaries()
                run.update_meta(status="finished", test={name: {label: {k: v for k, v in values.items()
                                                                        if k in ("ciou", "auc", "mean_iou", "pointing")}
                                                                for label, values in by_label.items()}
                                                         for name, by_label in test.items()})
            elif status == "finished":
                run.update_meta(status="finished")
            end_table(run, s.best, self.last_logs, self.out)
            for path in (run.dir / "metrics.jsonl", run.dir / "train.log", run.dir / "meta.json", run.dir / SKIPPED):
                self.sink.artifact(path)
        # no closing barrier: rank 0's final evaluation can outlast the collective timeout, and the other ranks have
        # nothing left to do (torchrun waits for every process)
        return TrainResult(run=run, status=status, best=run.best_checkpoint(), last=run.latest_checkpoint(),
                           history=list(s.history), protocol=protocol, test=test,
                           continue_with=run.resume_hint() if status == "interrupted" else None,
                           learning_check=self.learning_check)

    def interrupted(self, stopped: interrupts.Interrupted) -> TrainResult:
        """A signal that stopped a phase at once (the set-up, the final evaluation; a second signal anywhere): rank 0
        records status ``interrupted`` and the phase in meta.json and says how to continue."""
        run, s = self.run, self.state
        has_checkpoint = run.latest_checkpoint() is not None
        if not has_checkpoint:
            hint = "nothing was trained yet: start it again with the same command (a new run folder)"
        elif stopped.phase == "final evaluation":
            hint = (f"{run.resume_hint()} (its training is complete: it goes straight to the final evaluation; or "
                    f"evaluate it with: sslt eval {run.dir})")
        else:
            hint = run.resume_hint()
        if self.env.main:
            run.update_meta(status="interrupted", interrupted_in=stopped.phase, signal=stopped.signal_name,
                            step=s.step, epoch=s.epoch)
            self.say(f"stopped by {stopped.signal_name} during the {stopped.phase} at step {s.step}; {hint}")
        return TrainResult(run=run, status="interrupted", best=run.best_checkpoint(), last=run.latest_checkpoint(),
                           history=list(s.history), protocol=None, test={}, continue_with=hint,
                           learning_check=self.learning_check)

    def test_evaluation(self):
        """The run's last and best checkpoints on every test set of the recipe, under its ``eval`` section, through
        the one orchestrator (``eval/<set>-<checkpoint>-<protocol>/``, a ``test`` record each); tables printed. The
        best checkpoint was chosen on the validation set, never on a test set."""
        from sslt_cli.evaluate import EvalOptions, Source, load_test_set, print_evaluation, run_evaluation

        recipe, run = self.recipe, self.run
        _, checkpoints, _ = checkpoint.resolve_checkpoints(run.dir, "both")
        sources = [Source.checkpoint_file(label, path, recipe, run.dir) for label, path in checkpoints]
        sets = [(name, load_test_set(recipe.data.set_path(path))) for name, path in recipe.data.test.items()]
        options = EvalOptions(device=str(self.device), negatives=test_negatives(recipe))
        evaluation = run_evaluation(sources, sets, options, self.sink, out=run.dir / EVAL)
        print_evaluation(evaluation, self.out, self.console,
                         title=lambda item: f"{item.set_name}: {item.checkpoint} checkpoint (step {item.step}), "
                                            f"protocol {item.protocol}")
        return evaluation


def test_negatives(recipe: Recipe):
    """The negative-audio options of the final test evaluation (``eval.negatives``; None when off): the recipe's seed,
    off-screen classes from ``data.labels`` when it names a file (else the sets' own labels), the per-model threshold
    chosen on ``data.val`` when it is a set with boxes."""
    if not recipe.eval.negatives:
        return None
    from sslt_cli.data.annotations import read_labels
    from sslt_cli.data.manifest import read_set
    from sslt_cli.data.negatives import NegativeSettings
    from sslt_cli.evaluate import NegativeOptions, load_test_set

    labels = recipe.data.labels_file()
    val = recipe.data.set_path(recipe.data.val) if recipe.data.val else None
    validation = load_test_set(val) if val is not None and read_set(val).anno_kind else None
    return NegativeOptions(NegativeSettings(tuple(recipe.eval.negatives), seed=recipe.seed),
                           labels=read_labels(labels) if labels is not None else None,
                           validation=validation)


# ------------------------------------------------------------------------------------------------ set-up helpers

FIRST_REASONS = 5
CHECK_WINDOW = 20  # the learning check averages L_cl over this many steps before it


def centre_prior_auc(val: TestSet, recipe: Recipe) -> float:
    """The centre prior's AUC on the validation clips under the recipe's protocol (what validation at chance
    scores; ``evaluate.score_maps``'s baseline, the same one every evaluation reports)."""
    from sslt_cli.evaluate import score_maps

    result = score_maps(None, val.annotations, recipe.eval.protocol, val.ids, baselines=True, random_seeds=())
    return float(result.baselines["centre"]["auc"])
VGGSS_XML_FORM = ("<annotation><bbox><box><xmin>..</xmin><ymin>..</ymin><xmax>..</xmax><ymax>..</ymax></box>"
                  "</bbox></annotation>, one <box> per box, coordinates in [0, 1]")


def check_eval_sets(recipe: Recipe, tests: bool = True) -> None:
    """Stop before training when the validation set (``data.val``) or, with ``tests``, a test set (``data.test``)
    has no usable clip: a model selected on nothing, or a run whose final evaluation has nothing to score.

    A usable clip has a readable annotation and its frame and audio; for validation it is also outside
    ``data.holdout_classes``. The DataError gives the counts and the first reasons.
    """
    from sslt_cli.evaluate import load_test_set

    named = [("validation set (data.val)", recipe.data.val)] if recipe.data.val else []
    if tests:
        named += [(f"test set {name!r} (data.test)", path) for name, path in recipe.data.test.items()]
    held = set(recipe.data.holdout_classes or [])
    for role, relative in named:
        test = load_test_set(recipe.data.set_path(relative))
        ready = [cid for cid in test.ids if cid in test.clips and cid in test.annotations]
        if role.startswith("validation"):
            ready = [cid for cid in ready if test.clips[cid].label not in held]
        if ready:
            continue
        reasons = {**test.annotation_problems, **test.unavailable}
        in_held = len(test.ids) - len(reasons)
        raise DataError(
            f"{recipe.data.set_path(relative)}: the {role} has no usable clip: {len(test.ids)} requested, "
            f"{len(test.annotation_problems)} without a usable annotation, {len(test.unavailable)} without frame "
            f"or audio" + (f", {in_held} in data.holdout_classes" if in_held else "") + "; nothing was trained",
            [f"{cid}: {reason}" for cid, reason in list(reasons.items())[:FIRST_REASONS]]
            + ([f"VGG-SS annotations are read in SSL-TIE's form: {VGGSS_XML_FORM}"]
               if test.anno_kind == "vggss" and test.annotation_problems else []))


WEIGHTS_HINT = ("set in the recipe as model.vision_init, model.audio_init or eval.ogl_weights (a path, relative to "
                "the folder sslt runs in): fix the path, or leave it unset ('scratch' for the encoders)")


def check_weight_files(recipe: Recipe, tests: bool = True) -> None:
    """Load every weights file the run will read, safely (``weights_only``) and checked key by key and shape by shape
    against the network it feeds, before the first step: ``model.vision_init`` / ``model.audio_init`` and, with
    ``tests``, ``eval.ogl_weights`` (read by the final evaluation, hours later). A CheckpointError names the file and
    the recipe key."""
    from sslt_cli.errors import CheckpointError
    from sslt_cli.ogl import object_trunk

    try:
        if recipe.model.vision_init != "scratch" or recipe.model.audio_init != "scratch":
            checkpoint.init_from_torchvision(build_model(), recipe.model.vision_init, recipe.model.audio_init)
        if tests and recipe.eval.ogl_weights:
            object_trunk(recipe.eval.ogl_weights)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc.message}; nothing was trained", [*exc.problems, WEIGHTS_HINT]) from None


def check_processes(recipe: Recipe, env: Dist, device: torch.device) -> None:
    """Refuse a recipe this set of processes cannot train (before a run folder is made, ``sslt train`` checks)."""
    if recipe.optim.batch_size % env.world:
        raise TrainingError(f"optim.batch_size={recipe.optim.batch_size} (the global batch) does not split over "
                            f"{env.world} processes", [f"use a multiple of {env.world}, or another number of processes"])
    if sync_bn_of(recipe) and env.world > 1 and device.type != "cuda":
        raise TrainingError(f"train.sync_bn=true needs CUDA devices; this run has {env.world} processes on {device} "
                            "(torch's SyncBatchNorm runs on GPUs only)", ["set train.sync_bn=false"])


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True


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


def training_dataset(recipe: Recipe, clips: list[Clip], cache_dir: Path | None) -> AudioVisualDataset:
    """The training dataset of a recipe: its image transform (T_app, T_geo), audio front end, T_mask, views."""
    t = recipe.transforms
    return AudioVisualDataset(
        clips, image_transform=augment.build_image_transform(recipe.data.image_size, t.app, t.geo),
        n_views=2 if t.views == "paper" and views_differ(recipe) else 1, shared_geometry=True, audio=recipe.audio,
        spec_augment=t.mask if t.mask.enabled else None, train=True, seed=recipe.seed, cache_dir=cache_dir)


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


def load_validation_set(recipe: Recipe, run: Run | None) -> TestSet | None:
    """The validation clips with boxes (training classes only when ``data.holdout_classes``), at most
    ``data.limit_val``; None without a validation set. Unusable clips are listed in the run's skipped.csv."""
    from sslt_cli.evaluate import load_test_set

    if not recipe.data.val:
        return None
    val_set = load_test_set(recipe.data.set_path(recipe.data.val))
    clips = [val_set.clips[i] for i in val_set.ids if i in val_set.clips and i in val_set.annotations]
    if recipe.data.holdout_classes:
        # model selection sees the training classes only: held-out classes are for the open-set evaluation
        held = set(recipe.data.holdout_classes)
        clips = [c for c in clips if c.label not in held]
    clips = clips[: recipe.data.limit_val] if recipe.data.limit_val else clips
    if run is not None:
        write_skipped(run, [(i, r) for i, r in {**val_set.annotation_problems, **val_set.unavailable}.items()], "val")
    if not clips:
        return None
    return TestSet(name="val", anno_kind=val_set.anno_kind, ids=[c.id for c in clips],
                   annotations=val_set.annotations, clips={c.id: c for c in clips})


@dataclass(frozen=True)
class StepSetup:
    """What a training step needs besides its batch, built once from the recipe's typed sections (``recipe.loss``:
    the loss weights, ``recipe.transforms.equivariance``: L_geo's transform, ``model.audio_passes``) and the device:
    the objective (``losses.build_objective``), channels-last and the autocast context."""

    loss: LossSection
    equivariance: EquivarianceConfig
    audio_passes: str
    negatives: str
    objective: Callable[..., tuple[torch.Tensor, dict]]
    device: torch.device
    channels_last: bool
    amp: Any

    @classmethod
    def of(cls, recipe: Recipe, device: torch.device, channels_last: bool, amp: Any) -> "StepSetup":
        return cls(recipe.loss, recipe.transforms.equivariance, recipe.model.audio_passes, negatives_of(recipe),
                   build_objective(recipe.loss), device, channels_last, amp)

    @property
    def uses_geo(self) -> bool:
        """Whether L_geo is part of the loss (the equivariance transform on, its weight above 0)."""
        return self.equivariance.enabled and self.loss.geo_weight > 0


def forward_views(model, batch: dict, setup: StepSetup, step_seed: int,
                  shard: Shard | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """One training step's loss: L_cl on both views and L_geo between them.

    batch["images"]: (B, 2, 3, H, W) in ``paper`` mode or (B, 1, 3, H, W) in ``code`` mode; batch["specs"] likewise
    (B, V, 1, F, T). Returns the total loss and detached scalars for logging.
    ``shard`` (distributed training): where this batch sits in the global batch. The L_geo transform is drawn for
    the global batch and this slice of it taken, and with ``loss.negatives: global`` the contrastive loss gathers
    the audio of every process; the returned loss is still this process's mean.
    """
    loss_kwargs = {}
    if shard is not None and setup.negatives == "global":
        loss_kwargs["gather"] = rank_gather(shard.sizes, shard.rank)
    images = batch["images"].to(setup.device, non_blocking=True)
    specs = batch["specs"].to(setup.device, non_blocking=True)
    view1, spec1 = images[:, 0], specs[:, 0]
    spec2 = specs[:, 1] if specs.shape[1] > 1 else spec1
    if spec2 is spec1 and setup.audio_passes == "per_view":
        spec2 = spec1.clone()  # a tensor of its own: ModelForTraining embeds it again, as the released code does
    base2 = images[:, 1] if images.shape[1] > 1 else view1
    transform, view2 = _second_view(view1, base2, setup, step_seed, shard)
    if setup.channels_last:
        view1 = view1.contiguous(memory_format=torch.channels_last)
        view2 = view2.contiguous(memory_format=torch.channels_last)
    if transform is None and images.shape[1] == 1 and specs.shape[1] == 1:
        # Nothing differs between the two views (no second augmentation, no L_geo): one pass, and the loss keeps the
        # scale of the two-view total, 2 * cl_weight * L_cl (= L_cl at the default weight 0.5).
        with setup.amp:
            ((v1, a1),) = model((view1, spec1))
        l_cl1, parts1 = setup.objective(v1, a1, **loss_kwargs)
        total = 2 * setup.loss.cl_weight * l_cl1
        return total, {"l_cl1": l_cl1.detach(), "acc1": parts1["acc1"], "loss": total.detach()}
    # Two passes (as the official code makes), so BatchNorm sees each view's batch of B on its own; both run inside
    # one call of the wrapper so DDP sees a single forward per backward.
    with setup.amp:
        (v1, a1), (v2, a2) = model((view1, spec1), (view2, spec2))
    l_cl1, parts1 = setup.objective(v1, a1, **loss_kwargs)
    l_cl2, parts2 = setup.objective(v2, a2, **loss_kwargs)
    total = setup.loss.cl_weight * (l_cl1 + l_cl2)
    logs = {"l_cl1": l_cl1.detach(), "l_cl2": l_cl2.detach(), "acc1": parts1["acc1"]}
    if transform is not None:
        target = augment.apply_geo_transform(parts1["map"], transform, out_size=parts2["map"].shape[-2:],
                                             upsample_to=view1.shape[-2:], centre=setup.equivariance.centre)
        l_geo = equivariance_loss(parts2["map"], target)
        total = total + setup.loss.geo_weight * l_geo
        logs["l_geo"] = l_geo.detach()
    logs["loss"] = total.detach()
    return total, logs


def _second_view(view1: torch.Tensor, base2: torch.Tensor, setup: StepSetup, step_seed: int,
                 shard: Shard | None) -> tuple[Any, torch.Tensor]:
    """(the L_geo transform or None, view 2): ``base2`` warped by a transform drawn for the global batch (this
    process's slice of it) when L_geo is on, else ``base2`` itself."""
    if not setup.uses_geo:
        return None, base2
    eq = setup.equivariance
    transform = augment.sample_geo_transform(view1.shape[0] if shard is None else shard.total,
                                             torch.Generator().manual_seed(step_seed), max_rotation=eq.max_rotation,
                                             scales=eq.scales, scale_p=eq.scale_p, flip_p=eq.flip_p)
    if shard is not None:
        transform = dataclasses.replace(transform, angles=transform.angles[shard.first:shard.first + shard.local])
    return transform, augment.apply_geo_transform(base2, transform, centre=eq.centre)


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



# --------------------------------------------------------------------------------------------- end-of-epoch helpers

def mix_queue_seed(seed: int, epoch: int) -> int:
    """Seed of T_mix's candidate queue for the refresh at the end of ``epoch``: one per (run seed, epoch)."""
    return (seed * 7919 + epoch * 104729) % (2**63)


@torch.no_grad()
def refresh_mix_neighbours(model, clips: list[Clip], recipe: Recipe, device: torch.device, amp, env: Dist,
                           cache_dir: Path | None, epoch: int) -> np.ndarray:
    """T_mix: embed every training clip's audio with the current encoder and take each clip's top-1 neighbour.

    The random queue of candidates is drawn anew for every epoch (``mix_queue_seed``), as the official retrieval
    samples a fresh queue each time, so over a run every clip can become a mixing partner. With several processes
    each embeds a contiguous shard of the clips and all gather the (N, 512) table, so every rank draws the same
    neighbours (same seed) as one process would.
    """
    dataset = AudioVisualDataset(clips, image_transform=None, n_views=1, audio=recipe.audio, spec_augment=None,
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


class ValidationProbe:
    """What validation takes from each batch besides the maps: the objective's loss when validation reports it
    (weighted by batch size) and the first batch's frames and maps for the heatmap grid (an
    ``evaluate.evaluate_model`` batch hook)."""

    def __init__(self, objective, enabled: bool):
        self.objective, self.enabled = objective, enabled
        self.loss_sum, self.weight = 0.0, 0
        self.shown: tuple[list, torch.Tensor, torch.Tensor] | None = None

    def __call__(self, ids: list, images: torch.Tensor, v: torch.Tensor, a: torch.Tensor, maps: torch.Tensor) -> None:
        if self.enabled and images.shape[0] >= 2:
            loss, _ = self.objective(v, a)
            self.loss_sum += float(loss) * images.shape[0]
            self.weight += images.shape[0]
        if self.shown is None:
            self.shown = (list(ids), images[:8], maps[:8])


def validate(model, val: TestSet, recipe: Recipe, device: torch.device, objective, grid: Path | None,
             epoch: int) -> dict[str, float]:
    """cIoU / AUC / mean IoU on the validation set under the recipe's protocol (``evaluate.evaluate_model``, as every
    evaluation; no baselines, no object guidance), and the validation loss ``l_cl`` of an objective whose registry
    entry reports it (``losses.OBJECTIVES``); a heatmap grid of the first batch to ``grid``."""
    from sslt_cli.evaluate import EvalOptions, evaluate_model

    probe = ValidationProbe(objective, enabled=OBJECTIVES[recipe.loss.objective].validation_loss)
    loaded = checkpoint.LoadedModel(model=model, recipe=recipe, label="training", source=Path(recipe.name))
    options = EvalOptions(baselines=False, object_guidance=False, device=str(device))
    result = evaluate_model(loaded, val, options, on_batch=probe)
    model.train()
    if grid is not None and probe.shown is not None:
        ids, images, maps = probe.shown
        heatmap_grid(images, maps, [val.annotations.get(i) for i in ids], grid, title=f"validation, epoch {epoch}")
    method = result.method or {}
    metrics = {"ciou": method.get("ciou", 0.0), "auc": method.get("auc", 0.0), "mean_iou": method.get("mean_iou", 0.0),
               "n": result.n}
    if probe.weight:
        metrics["l_cl"] = probe.loss_sum / probe.weight
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


def end_table(run: Run, best: dict, last_logs: dict, out: Console) -> None:
    """The run's summary on stdout: status, steps, last losses, best validation, skipped clips, folder."""
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
