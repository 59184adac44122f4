"""Distributed training (issue 8) on CPU: gloo, 2 processes on 127.0.0.1.

Against one process with the same global batch: the first step's losses and gradients (Adam's moments) agree to
float rounding, later steps' losses closely, the T_mix neighbours exactly; a checkpoint continued by 1 and by 2
processes gives the same next step whichever process count wrote it. The losses with gathered audio have the value
and the gradients of the whole batch in one process (uneven shards too); per-process negatives give the mean of the
per-half losses. A 2-process run launched through torchrun mirrors to a real ``mlflow server`` (SQLite) as one run.

BatchNorm: one process normalises a step's batch of G clips in each BatchNorm layer, 2 processes normalise G/2
each, so training-mode BatchNorm makes them differ by design. ``train.sync_bn`` makes them agree on GPUs, but torch's
SyncBatchNorm does not run on CPU; the equivalence runs here use a model whose BatchNorm layers stay in evaluation
mode (fixed running statistics, ``frozen_batchnorm_model``), so that everything else in a step is compared: DDP's
gradient average, the gathered negatives, the L_geo transform drawn for the global batch, the sampler, T_mix and
resume. The torchrun/MLflow test trains the real model.

The runs are made once per module by ``session`` (one ``torch.multiprocessing.spawn`` of 2 processes runs every
2-process job in turn) on 16 training clips of 64 px, 3 s of audio and 32 mels, 4 clips per process and step.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import torch
import yaml
from rich.console import Console

from callers import train_in
from sslt_cli import distributed
from sslt_cli import train as train_module
from sslt_cli.checkpoint import load as load_checkpoint
from sslt_cli.config import flatten, load_recipe, recipe_dict
from sslt_cli.errors import TrainingError
from sslt_cli.losses import OBJECTIVES, ezvsl_loss, rank_gather, tie_contrastive_loss
from sslt_cli.model import build_model
from sslt_cli.distributed import Dist
from sslt_cli.runs import Run
from sslt_cli.train import EpochSampler

pytestmark = pytest.mark.timeout(300)  # a collective that waits for a process that died would hang, not fail

WORLD = 2
GLOBAL_BATCH = 8  # 4 clips per process; 16 clips make 2 steps per epoch
STOP_AT = 3  # mid epoch 1, after the T_mix refresh: the checkpoint carries a batch position and the neighbours
TOTAL_STEPS = 4
REAL_BUILD_MODEL = build_model


# --- helpers ------------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stay_in_eval(module: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
    return torch.nn.Module.train(module, False)


def frozen_batchnorm_model(*args: Any, **kwargs: Any) -> torch.nn.Module:
    """``model.build_model`` whose BatchNorm layers ignore ``train()``: they normalise with their running statistics
    and never update them, so a batch split over processes is normalised as the whole batch is in one process."""
    model = REAL_BUILD_MODEL(*args, **kwargs)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.train = functools.partial(_stay_in_eval, module)
            module.eval()
    return model


def quiet() -> dict[str, Console]:
    sink = Console(file=io.StringIO(), width=120)
    return {"console": sink, "out": sink}


def make_recipe_file(folder: Path, data_root: Path, **sections: dict) -> Path:
    """The tiny recipe as YAML in ``folder``: every transformation on (paper views, T_app, T_geo, T_mask, T_mix,
    L_geo), fp32, no validation, runs under ``folder/runs``; ``sections`` update the tree."""
    tree: dict[str, Any] = {
        "name": "dist",
        "seed": 4,
        "runs_dir": str(folder / "runs"),
        "data": {"root": str(data_root), "image_size": 64, "num_workers": 0, "val": None},
        "audio": {"clip_seconds": 3, "n_mels": 32},
        "optim": {"batch_size": GLOBAL_BATCH, "max_steps": TOTAL_STEPS},
        "train": {"log_every": 1, "precision": "fp32", "device": "cpu", "keep_last": TOTAL_STEPS},
        "eval": {"batch_size": 8},
        "tracking": {"enabled": False},
    }
    for key, values in sections.items():
        tree[key] = {**tree.get(key, {}), **values}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def only_run(runs_dir: Path) -> Run:
    found = [p for p in runs_dir.iterdir() if (p / "meta.json").is_file()]
    assert len(found) == 1, found
    return Run(found[0])


def run_in(path: Path) -> Run:
    """The run folder ``path``, or the only run folder inside ``path`` (a recipe's runs_dir)."""
    return Run(path) if (path / "meta.json").is_file() else only_run(path)


def clone_run(source: Path, target: Path) -> Run:
    """A copy whose checkpoints are hard links (resuming writes new files and never changes the source)."""
    shutil.copytree(source, target, copy_function=os.link)
    return Run(target)


def train_records(run: Run) -> list[dict]:
    return [r for r in run.metrics() if r["kind"] == "train"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest absolute difference between two state_dicts' floating tensors, and where."""
    assert a.keys() == b.keys()
    worst = (0.0, "")
    for key in a:
        if a[key].is_floating_point():
            diff = float((a[key] - b[key]).abs().max()) if a[key].numel() else 0.0
            worst = max(worst, (diff, key))
    return worst


def train_new(recipe, **kwargs) -> Run:
    """Train a new run folder in this process, created as `sslt train` creates it."""
    return train_in(recipe, Run.create(recipe), **kwargs).run


# --- the 2-process worker ----------------------------------------------------------------------------------------

def _worker(rank: int, world: int, port: int, jobs: list[dict]) -> None:
    """One process of ``torch.multiprocessing.spawn``: torchrun's environment, then each job in turn."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    train_module.build_model = frozen_batchnorm_model
    for job in jobs:
        if job["kind"] == "train":
            real_negatives = train_module.negatives_of
            if "negatives" in job:
                train_module.negatives_of = lambda recipe, mode=job["negatives"]: mode
            env = distributed.init_distributed("cpu")
            if job.get("resume"):
                run = run_in(Path(job["resume"]))
                train_in(run.recipe(), run, main=env.main, resume=True, stop_after_steps=job.get("stop_after"),
                         evaluate_at_end=False, **quiet())
            else:
                # as `sslt train` under torchrun: rank 0 creates the run folder and every rank trains into it (rank 0
                # alone tracks: the others get a null sink)
                recipe = load_recipe(job["recipe"], [])
                run = distributed.share_run(env, lambda: Run.create(recipe))
                train_in(recipe, run, main=env.main, stop_after_steps=job.get("stop_after"), evaluate_at_end=False,
                         **quiet())
            train_module.negatives_of = real_negatives
        elif job["kind"] == "clone":
            if rank == 0:
                clone_run(run_in(Path(job["source"])).dir, Path(job["target"]))
            torch.distributed.barrier()
        elif job["kind"] == "losses":
            _loss_job(rank, job)
    # both ranks leave the group together: a rank that exits while the other still tears gloo down can abort it
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def loss_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """A global batch of 4: v (4, 8, 3, 3) and a (4, 8), L2-normalised, with cosines spread over [-1, 1]."""
    g = torch.Generator().manual_seed(11)
    v = torch.nn.functional.normalize(torch.randn(4, 8, 3, 3, generator=g), dim=1)
    a = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    return v, a


LOSS_SHARDS = (3, 1)  # uneven on purpose: the gather pads and cuts


def _loss_job(rank: int, job: dict) -> None:
    """Each rank's loss, and the gradients of its own rows, with the audio gathered over both ranks."""
    v_all, a_all = loss_inputs()
    first = sum(LOSS_SHARDS[:rank])
    rows = slice(first, first + LOSS_SHARDS[rank])
    results = {}
    for name, fn, kwargs in (("tie", tie_contrastive_loss, dict(eps_pos=0.1, eps_neg=-0.1, tau=0.3)),
                             ("ezvsl", ezvsl_loss, dict(temperature=0.1))):
        v = v_all[rows].clone().requires_grad_(True)
        a = a_all[rows].clone().requires_grad_(True)
        loss, parts = fn(v, a, gather=rank_gather(LOSS_SHARDS, rank), **kwargs)
        # what the training loop does: weight by the shard's share; DDP's average then sums the ranks' gradients
        (loss * LOSS_SHARDS[rank] / sum(LOSS_SHARDS)).backward()
        results[name] = {"loss": loss.detach(), "grad_v": v.grad, "grad_a": a.grad, "logits": parts["logits"]}
    torch.save(results, Path(job["out"]) / f"rank{rank}.pt")


def spawn(jobs: list[dict]) -> None:
    torch.multiprocessing.spawn(_worker, args=(WORLD, free_port(), jobs), nprocs=WORLD, join=True)


# --- the runs, made once ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    from sslt_cli.data.synthetic import generate

    root = tmp_path_factory.mktemp("dist-bench") / "bench"
    generate(root, n_train=16, n_val=4, n_test=4, n_flickr=2, image_size=64, workers=1, progress=False)
    return root


@dataclass
class Session:
    """Runs of the tiny recipe; ``one``/``two`` train from scratch to STOP_AT in 1 and 2 processes, each stopped
    after step 1 and resumed by the same number of processes, and every continuation to TOTAL_STEPS starts from a
    checkpoint that another continuation shares."""

    one: Run  # 1 process to STOP_AT
    two: Run  # 2 processes to STOP_AT, then continued by 2 processes to TOTAL_STEPS
    one_finished: Run  # ``one`` continued by 1 process
    one_to_two: Run  # ``one`` continued by 2 processes
    two_to_one: Run  # ``two`` at STOP_AT continued by 1 process
    negatives: dict[str, Run]  # one step of row A by 2 processes with global and with local negatives
    row_a_embeddings: tuple[torch.Tensor, torch.Tensor]  # v, a of that step's global batch, from 1 process
    losses: list[dict]  # per rank: {objective: loss, gradients, logits}


@pytest.fixture(scope="module")
def session(bench, tmp_path_factory) -> Iterator[Session]:
    base = tmp_path_factory.mktemp("dist-runs")
    patch = pytest.MonkeyPatch()
    patch.setattr(train_module, "build_model", frozen_batchnorm_model)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = train_new(load_recipe(make_recipe_file(base / "one", bench), []), stop_after_steps=1,
                        evaluate_at_end=False, **quiet())
        train_in(one.recipe(), one, resume=True, stop_after_steps=STOP_AT - 1, evaluate_at_end=False, **quiet())
        one_to_two = clone_run(one.dir, base / "one-to-two" / one.dir.name)
        one_finished = clone_run(one.dir, base / "one-finished" / one.dir.name)
        train_in(one_finished.recipe(), one_finished, resume=True, evaluate_at_end=False, **quiet())

        row_a = dict(transforms={"views": "code", "app": {"enabled": False}, "geo": {"enabled": False},
                                 "mask": {"enabled": False}, "mix": {"enabled": False},
                                 "equivariance": {"enabled": False}},
                     optim={"max_steps": 1})
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        real_tie = OBJECTIVES["tie"]

        def remembering_tie(v, a, **kwargs):
            seen.append((v.detach().clone(), a.detach().clone()))
            return real_tie.loss(v, a, **kwargs)

        with pytest.MonkeyPatch.context() as capture:
            capture.setitem(OBJECTIVES, "tie", dataclasses.replace(real_tie, loss=remembering_tie))
            train_new(load_recipe(make_recipe_file(base / "captured", bench, **row_a), []), evaluate_at_end=False,
                      **quiet())

        two_runs = base / "two" / "runs"  # the 2-process jobs find the run folder in it
        (base / "losses").mkdir()
        spawn([
            {"kind": "train", "recipe": str(make_recipe_file(base / "two", bench)), "stop_after": 1},
            {"kind": "train", "resume": str(two_runs), "stop_after": STOP_AT - 1},
            {"kind": "clone", "source": str(two_runs), "target": str(base / "two-to-one" / "pair")},
            {"kind": "train", "resume": str(two_runs)},
            {"kind": "train", "resume": str(one_to_two.dir)},
            {"kind": "train", "recipe": str(make_recipe_file(base / "global", bench, **row_a)), "negatives": "global"},
            {"kind": "train", "recipe": str(make_recipe_file(base / "local", bench, **row_a)), "negatives": "local"},
            {"kind": "losses", "out": str(base / "losses")},
        ])
        two_to_one = Run(base / "two-to-one" / "pair")
        train_in(two_to_one.recipe(), two_to_one, resume=True, evaluate_at_end=False, **quiet())
        yield Session(
            one=one, two=only_run(two_runs), one_finished=one_finished, one_to_two=one_to_two, two_to_one=two_to_one,
            negatives={mode: only_run(base / mode / "runs") for mode in ("global", "local")},
            row_a_embeddings=seen[0],
            losses=[torch.load(base / "losses" / f"rank{r}.pt", weights_only=True) for r in range(WORLD)])
    finally:
        torch.set_num_threads(before)
        patch.undo()


# --- the sampler ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 4])
def test_sampler_global_batches_do_not_depend_on_the_world_size(world) -> None:
    n, global_batch, epoch = 22, 4, 3
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(4 * 1_000_003 + epoch)).tolist()
    expected = [permutation[k * global_batch:(k + 1) * global_batch] for k in range(2, n // global_batch)]

    per_rank = []
    for rank in range(world):
        sampler = EpochSampler(n, global_batch // world, seed=4, rank=rank, world=world)
        sampler.set_epoch(epoch, skip_batches=2)
        assert sampler.batches_per_epoch() == 5 and len(sampler) == 3 * global_batch // world
        order = list(sampler)
        per_rank.append([order[i:i + global_batch // world] for i in range(0, len(order), global_batch // world)])
    # step k's global batch is the ranks' k-th batches in rank order: the permutation's k-th slice of 4
    assert [sum((per_rank[r][k] for r in range(world)), []) for k in range(3)] == expected


# --- equivalence with one process ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Gap:
    """How far two checkpoints are apart: Adam's moment estimates as relative L2 distances over every parameter
    (``exp_avg`` after step 1 is 0.1 x the gradient), the weights as the largest absolute difference."""

    exp_avg: float
    exp_avg_sq: float
    weights: float
    where: str


def gap(a_path: Path, b_path: Path) -> Gap:
    a, b = load_checkpoint(a_path), load_checkpoint(b_path)

    def relative(key: str) -> float:
        x = torch.cat([s[key].reshape(-1) for s in a["optimizer"]["state"].values()])
        y = torch.cat([s[key].reshape(-1) for s in b["optimizer"]["state"].values()])
        return float((x - y).norm() / y.norm())

    worst, where = max_difference(a["model"], b["model"])
    return Gap(relative("exp_avg"), relative("exp_avg_sq"), worst, where)


def ckpt(run: Run, step: int) -> Path:
    return run.checkpoints / f"last-{step:08d}.pt"


LOSS_TERMS = ("loss", "l_cl1", "l_cl2", "l_geo", "acc1")


def logged(run: Run, step: int) -> list[float]:
    (record,) = [r for r in train_records(run) if r["step"] == step]
    return [record[k] for k in LOSS_TERMS]


# The gradient of one step agrees to float rounding (the sum runs in another order); Adam's first update is nearly
# lr * sign(gradient), so a parameter whose gradient is within rounding of 0 can move by up to lr either way, and
# the sharp tri-map sigmoids (tau = 0.03) make later steps drift apart further: steps after the first are compared
# by their losses, and every continuation is compared with another continuation of the same checkpoint.
GRADIENT_TOLERANCE = 1e-5  # relative
FIRST_UPDATE_TOLERANCE = 0.5e-4  # absolute, on weights (lr = 1e-4)
LOSS_TOLERANCE = 1e-6


def test_two_processes_match_one_with_the_same_global_batch(session) -> None:
    one, two = session.one, session.two
    assert one.meta()["world_size"] == 1
    assert logged(two, 1) == pytest.approx(logged(one, 1), abs=LOSS_TOLERANCE)
    first = gap(ckpt(two, 1), ckpt(one, 1))
    assert first.exp_avg < GRADIENT_TOLERANCE and first.exp_avg_sq < GRADIENT_TOLERANCE, first
    assert first.weights < FIRST_UPDATE_TOLERANCE, first
    for step in range(2, STOP_AT + 1):
        assert logged(two, step) == pytest.approx(logged(one, step), abs=1e-4), step

    a, b = load_checkpoint(ckpt(two, STOP_AT)), load_checkpoint(ckpt(one, STOP_AT))
    assert (a["step"], a["epoch"], a["batch_in_epoch"], a["world_size"]) == (STOP_AT, 1, 1, WORLD)
    assert (b["step"], b["epoch"], b["batch_in_epoch"], b["world_size"]) == (STOP_AT, 1, 1, 1)
    # the T_mix neighbours drawn after epoch 0 from the shards both ranks embedded are the single-process ones
    assert a["mix_neighbours"] is not None and torch.equal(a["mix_neighbours"], b["mix_neighbours"])
    assert (a["mix_neighbours"] != torch.arange(16)).all()


def test_the_comparisons_can_fail(session) -> None:
    # a step of training moves the weights and the moments by orders of magnitude more than the tolerances
    torch.manual_seed(4)  # the run's seed: its initial weights
    worst, _ = max_difference(load_checkpoint(ckpt(session.one, 1))["model"], REAL_BUILD_MODEL().state_dict())
    assert worst > 1.5 * FIRST_UPDATE_TOLERANCE
    later = gap(ckpt(session.one, 2), ckpt(session.one, 1))
    assert later.exp_avg > 100 * GRADIENT_TOLERANCE


def assert_same_continuation(resumed: Run, reference: Run) -> None:
    """Two continuations of one checkpoint by different numbers of processes: the same last step."""
    assert resumed.meta()["status"] == reference.meta()["status"] == "finished"
    assert logged(resumed, TOTAL_STEPS) == pytest.approx(logged(reference, TOTAL_STEPS), abs=LOSS_TOLERANCE)
    last = gap(ckpt(resumed, TOTAL_STEPS), ckpt(reference, TOTAL_STEPS))
    assert last.exp_avg < GRADIENT_TOLERANCE and last.exp_avg_sq < GRADIENT_TOLERANCE, last
    assert last.weights < 1e-6, last
    # every step is logged once: the replayed ones were dropped on resume
    assert [r["step"] for r in train_records(resumed)] == list(range(1, TOTAL_STEPS + 1))


def test_a_two_process_checkpoint_resumes_in_one_process(session) -> None:
    assert_same_continuation(session.two_to_one, session.two)
    assert session.two_to_one.meta()["world_size"] == 1
    assert load_checkpoint(ckpt(session.two_to_one, TOTAL_STEPS))["world_size"] == 1
    assert "step 3, epoch 1, batch 1 (world size 2 -> 1)" in (session.two_to_one.dir / "train.log").read_text()


def test_a_one_process_checkpoint_resumes_in_two_processes(session) -> None:
    assert_same_continuation(session.one_to_two, session.one_finished)
    assert session.one_to_two.meta()["world_size"] == WORLD
    assert load_checkpoint(ckpt(session.one_to_two, TOTAL_STEPS))["world_size"] == WORLD
    assert "step 3, epoch 1, batch 1 (world size 1 -> 2)" in (session.one_to_two.dir / "train.log").read_text()


# --- negatives -------------------------------------------------------------------------------------------------------

def test_gathered_losses_equal_the_whole_batch_in_one_process(session) -> None:
    v_all, a_all = loss_inputs()
    for name, fn, kwargs in (("tie", tie_contrastive_loss, dict(eps_pos=0.1, eps_neg=-0.1, tau=0.3)),
                             ("ezvsl", ezvsl_loss, dict(temperature=0.1))):
        v = v_all.clone().requires_grad_(True)
        a = a_all.clone().requires_grad_(True)
        loss, parts = fn(v, a, **kwargs)
        loss.backward()
        ranks = [r[name] for r in session.losses]
        # the global mean is the rows-weighted mean of the ranks' losses
        combined = sum(r["loss"] * n for r, n in zip(ranks, LOSS_SHARDS)) / sum(LOSS_SHARDS)
        assert float(combined) == pytest.approx(float(loss.detach()), abs=1e-6), name
        assert torch.allclose(torch.cat([r["logits"] for r in ranks]), parts["logits"], atol=1e-5), name
        assert torch.allclose(torch.cat([r["grad_v"] for r in ranks]), v.grad, atol=1e-6), name
        # each audio row's gradient collects the images of both ranks (the gather's backward sums over ranks)
        assert torch.allclose(torch.cat([r["grad_a"] for r in ranks]), a.grad, atol=1e-6), name
        assert float(a.grad[3].abs().sum()) > 1e-3  # rank 1's audio is a negative for rank 0's three images


def test_local_negatives_score_only_the_local_batch(session) -> None:
    # one step of row A from the same weights on the same global batch of 8: with global negatives each image is
    # scored against all 8 audios, with local ones against the 4 of its own process
    v, a = session.row_a_embeddings
    assert v.shape[0] == a.shape[0] == 8
    whole, _ = tie_contrastive_loss(v, a)
    halves = [tie_contrastive_loss(v[rows], a[rows])[0] for rows in (slice(0, 4), slice(4, 8))]
    (global_record,) = train_records(session.negatives["global"])
    (local_record,) = train_records(session.negatives["local"])
    assert global_record["l_cl1"] == pytest.approx(float(whole), abs=1e-5)
    assert local_record["l_cl1"] == pytest.approx(float(sum(halves) / 2), abs=1e-5)
    # each row's local logits are a subset of its global ones, so the local loss is lower
    assert local_record["l_cl1"] < global_record["l_cl1"] - 0.05


def test_rank_gather_refuses_a_shard_of_another_size() -> None:
    gather = rank_gather([2, 3], rank=1)
    with pytest.raises(ValueError, match="rank 1 was declared 3 rows and gathers 2"):
        gather(torch.zeros(2, 4))


# --- recipe checks before anything starts ------------------------------------------------------------------------

def test_a_global_batch_that_does_not_split_is_refused(bench, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(distributed, "init_distributed", lambda kind: Dist(rank=0, world=3))
    recipe = load_recipe(make_recipe_file(tmp_path, bench), [])
    with pytest.raises(TrainingError) as info:  # what sslt train checks before it makes a run folder
        train_module.preflight(recipe, distributed.init_distributed("cpu"), tests=False)
    assert info.value.message == "optim.batch_size=8 (the global batch) does not split over 3 processes"
    assert info.value.problems == ["use a multiple of 3, or another number of processes"]
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_sync_batchnorm_on_cpu_is_refused(bench, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(distributed, "init_distributed", lambda kind: Dist(rank=0, world=2))
    monkeypatch.setattr(train_module, "sync_bn_of", lambda recipe: True)
    recipe = load_recipe(make_recipe_file(tmp_path, bench), [])
    with pytest.raises(TrainingError) as info:
        train_module.preflight(recipe, distributed.init_distributed("cpu"), tests=False)
    assert info.value.message == ("train.sync_bn=true needs CUDA devices; this run has 2 processes on cpu "
                                  "(torch's SyncBatchNorm runs on GPUs only)")
    assert info.value.problems == ["set train.sync_bn=false"]


def test_the_recipe_switches_reach_the_loop(bench, tmp_path) -> None:
    default = load_recipe(make_recipe_file(tmp_path / "default", bench), [])
    assert (train_module.negatives_of(default), train_module.sync_bn_of(default)) == ("global", False)
    switched = load_recipe(make_recipe_file(tmp_path / "switched", bench),
                           ["loss.negatives=local", "train.sync_bn=true"])
    assert (train_module.negatives_of(switched), train_module.sync_bn_of(switched)) == ("local", True)


# --- torchrun and a shared MLflow server ---------------------------------------------------------------------------

@pytest.fixture
def mlflow_server(serve, tmp_path: Path) -> str:
    """``mlflow server`` on 127.0.0.1 with a SQLite database in tmp_path; its base URL (stopped at teardown)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'db.sqlite'}",
           "--default-artifact-root", str(tmp_path / "artifacts")], f"{base}/health")
    return base


def test_torchrun_training_mirrors_to_a_shared_server_once(bench, tmp_path, mlflow_server, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    recipe_path = make_recipe_file(tmp_path / "served", bench, optim={"batch_size": 8, "max_steps": 2},
                                   data={"val": "val"}, tracking={"enabled": True, "experiment": "shared"})

    code = distributed.launch_torchrun(WORLD, ["train", str(recipe_path), "transforms.mix.enabled=false"])

    assert code == 0
    run = only_run(tmp_path / "served" / "runs")  # rank 1 made no run folder
    meta = run.meta()
    assert meta["status"] == "finished" and meta["world_size"] == WORLD and meta["mlflow_uri"] == mlflow_server
    log = (run.dir / "train.log").read_text()
    assert "distributed: 2 processes (gloo), 4 clips per process and step, global negatives" in log

    api = f"{mlflow_server}/api/2.0/mlflow"
    experiment = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "shared"},
                              timeout=10).json()["experiment"]
    runs = requests.post(f"{api}/runs/search", json={"experiment_ids": [experiment["experiment_id"]]},
                         timeout=10).json()["runs"]
    assert len(runs) == 1  # rank 0 only
    (served,) = runs
    assert served["info"]["run_id"] == meta["mlflow_run_id"] and served["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in served["data"]["params"]}
    assert len(params) == len(flatten(recipe_dict(run.recipe())))
    assert params["optim.batch_size"] == "8" and params["transforms.mix.enabled"] == "False"
    history = requests.get(f"{api}/metrics/get-history", params={"run_id": meta["mlflow_run_id"],
                                                                 "metric_key": "train/loss"}, timeout=10).json()
    assert [(m["step"], m["value"]) for m in history["metrics"]] == [(r["step"], r["loss"]) for r in train_records(run)]
    metrics = {m["key"] for m in served["data"]["metrics"]}
    assert {"train/loss", "train/l_geo", "val/ciou", "eval/vggss-last-ssltie/ciou",
            "eval/flickr-best-ssltie/auc"} <= metrics
