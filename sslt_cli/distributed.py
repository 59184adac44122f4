"""Process groups: who this process is, how a global batch is split, what the processes exchange each step.

Training runs unchanged under ``torchrun --nproc-per-node N -m sslt_cli train RECIPE`` (NCCL on CUDA, gloo on
CPU); a single process is rank 0 of world 1 and calls none of the collectives below. ``launch_torchrun`` starts
torchrun for ``sslt train --nproc N``. Imports no project module but ``errors``.
"""
from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from sslt_cli.errors import SsltError, TrainingError

T = TypeVar("T")


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


def backend() -> str:
    """The process group's backend (``nccl``, ``gloo``), for what a run says about itself."""
    return str(dist.get_backend())


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


def pick_device(choice: str, local_rank: int = 0, option: str = "train.device") -> torch.device:
    """The one device rule: ``auto`` -> CUDA when available (GPU ``local_rank``), else CPU; ``cuda`` without a GPU
    is an error naming ``option`` (``train.device`` for training, ``--device`` for ``sslt eval`` / ``retrieve``)."""
    if choice not in ("auto", "cpu", "cuda"):
        raise SsltError(f"{option} {choice!r}: use auto, cpu or cuda")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            separator = " " if option.startswith("-") else "="
            raise SsltError(f"{option}{separator}cuda but no CUDA device is available; use {option}{separator}auto "
                            "or cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def device_kind(choice: str) -> str:
    """``cuda`` or ``cpu``: what :func:`pick_device` will choose, known before the process group is joined."""
    return "cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu"


def share_run(env: Dist, make: Callable[[], T]) -> T:
    """``make()`` on rank 0 (e.g. create the run folder), its result pickled to every rank (one broadcast)."""
    if env.world == 1:
        return make()
    shared = [make() if env.main else None]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def gather_to_main(env: Dist, items: list) -> list | None:
    """Every rank's ``items`` on rank 0 (a list per rank, rank order); None on the other ranks."""
    gathered: list | None = [None] * env.world if env.main else None
    dist.gather_object(list(items), gathered, dst=0)
    return gathered
