"""The training loop (issue 3) on a tiny synthetic benchmark, on CPU.

Exact resume (a run stopped mid-epoch and resumed ends with the same weights as an uninterrupted one, T_mask and T_mix
on), checkpoint contents and pruning, best-by-validation selection, the official checkpoint format round trip, a NaN
loss, bad clips, loss descent, the final test evaluation with MLflow, and the three view modes.

Every run uses 64 px frames, 3 s audio, 32 mels and batches of 8 so the whole file stays well under a minute and a
half on a loaded 2-core CPU. Runs that several tests read are made once per session; a test that continues a run
continues a hard-linked copy of it, so the shared folder is never changed.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import yaml
from rich.console import Console
from typer.testing import CliRunner

from sslt_cli import train as train_module
from sslt_cli.config import Recipe, load_recipe, recipe_dict
from sslt_cli.checkpoint import load as load_checkpoint
from sslt_cli.checkpoint import load_model, save_official_checkpoint, to_official_state_dict
from sslt_cli.errors import CheckpointError, DataError, TrainingError
from sslt_cli.evaluate import get_protocol, load_test_set, predict_maps
from sslt_cli.model import build_model
from sslt_cli.runs import Run
from sslt_cli.train import train

from callers import train_in

STEPS_PER_EPOCH = 4  # 32 training clips in batches of 8
TOTAL_STEPS = 6  # one whole epoch, validation and T_mix refresh, then half of the next epoch
# the paper's row A: L_cl alone, no transformation, one view per step
ROW_A = ("transforms.views=code", "transforms.app.enabled=false", "transforms.geo.enabled=false",
         "transforms.mask.enabled=false", "transforms.mix.enabled=false", "transforms.equivariance.enabled=false")


@contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread: the CPU is shared, and bit-equal weights need the same count in both runs (the thread
    count changes the order of float reductions)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_test() -> Iterator[None]:
    # session fixtures are set up before this module fixture: they enter one_thread() themselves
    with one_thread():
        yield


@pytest.fixture(scope="session")
def bench(tmp_path_factory) -> Path:
    """A tiny synthetic benchmark: 32 training, 8 validation, 8 VGG-SS-style and 4 Flickr-style test clips, 64 px."""
    from sslt_cli.data.synthetic import generate

    root = tmp_path_factory.mktemp("train-bench") / "bench"
    generate(root, n_train=32, n_val=8, n_test=8, n_flickr=4, image_size=64, workers=1, progress=False)
    return root


def make_recipe(folder: Path, data_root: Path, *overrides: str) -> Recipe:
    """The tiny recipe, written as YAML in ``folder`` and loaded the way ``sslt train`` loads one, plus overrides.

    Everything the paper switches on stays on (paper views, T_app, T_geo, T_mask, T_mix, L_geo); runs go to
    ``folder/runs``.
    """
    tree = {
        "name": "tiny",
        "seed": 4,
        "runs_dir": str(folder / "runs"),
        "data": {"root": str(data_root), "image_size": 64, "num_workers": 0,
                 "test": {"vggss": "test_vggss", "flickr": "test_flickr"}},
        "audio": {"clip_seconds": 3, "n_mels": 32},
        "optim": {"batch_size": 8, "max_steps": TOTAL_STEPS},
        "train": {"log_every": 1},
        "eval": {"batch_size": 8},
        "tracking": {"enabled": False},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return load_recipe(path, list(overrides))


def quiet() -> dict[str, Console]:
    """Consoles that keep the progress bar and tables out of the test output."""
    sink = Console(file=io.StringIO(), width=120)
    return {"console": sink, "out": sink}


def train_new(recipe: Recipe, **kwargs) -> Run:
    """Train a new run folder, created as `sslt train` creates it."""
    return train_in(recipe, Run.create(recipe), **kwargs).run


def train_on(run: Run, **kwargs) -> Run:
    """Resume ``run`` from its newest checkpoint, as `sslt train --resume` does."""
    return train_in(run.recipe(), run, resume=True, **kwargs).run


def only_run(runs_dir: Path) -> Run:
    """The single run folder a test created under ``runs_dir``."""
    found = [p for p in runs_dir.iterdir() if (p / "meta.json").is_file()]
    assert len(found) == 1, found
    return Run(found[0])


def clone_run(source: Path, target: Path) -> Run:
    """A copy of a run folder, checkpoints as hard links: a resumed copy writes new checkpoint files (atomic
    replace) and unlinks pruned ones, so the source is never touched; the files it appends to are real copies."""
    def link_checkpoints(src: str, dst: str) -> None:
        (os.link if src.endswith(".pt") else shutil.copy2)(src, dst)

    shutil.copytree(source, target, copy_function=link_checkpoints)
    return Run(target)


def checkpoint_names(run: Run) -> set[str]:
    return {p.name for p in run.checkpoints.iterdir()}


def model_of(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


def train_losses(run: Run) -> list[tuple[int, float, float, float]]:
    """(step, loss, L_cl view 1, L_geo) of every train record."""
    return [(r["step"], r["loss"], r["l_cl1"], r["l_geo"]) for r in run.metrics() if r["kind"] == "train"]


# --- shared runs ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train-runs")


@pytest.fixture(scope="session")
def reference_run(bench, session_dir) -> Run:
    """Run A: TOTAL_STEPS steps without interruption (validation after each epoch, T_mix refresh after epoch 0)."""
    recipe = make_recipe(session_dir / "reference", bench)
    with one_thread():
        run = train_new(recipe, evaluate_at_end=False, **quiet())
    assert run.meta()["status"] == "finished"
    return run


@dataclass
class Interrupted:
    """Run B stopped twice: after 3 steps (mid epoch 0) and, resumed, after 2 more (mid epoch 1, T_mix active)."""

    run: Run
    first_status: str
    first_checkpoints: set[str]
    second_status: str
    second_checkpoints: set[str]


@pytest.fixture(scope="session")
def interrupted(bench, session_dir) -> Interrupted:
    recipe = make_recipe(session_dir / "interrupted", bench)
    with one_thread():
        run = train_new(recipe, stop_after_steps=3, evaluate_at_end=False, **quiet())
        first_status, first_checkpoints = run.meta()["status"], checkpoint_names(run)
        train_on(run, stop_after_steps=2, evaluate_at_end=False, **quiet())
    return Interrupted(run, first_status, first_checkpoints, run.meta()["status"], checkpoint_names(run))


# --- resume -----------------------------------------------------------------------------------------------------

def test_train_state_round_trips_through_a_checkpoint(interrupted) -> None:
    saved = load_checkpoint(interrupted.run.checkpoints / "last-00000005.pt")
    state = train_module.TrainState.from_checkpoint(saved)
    assert (state.step, state.epoch, state.batch_in_epoch) == (5, 1, 1)
    assert [h["step"] for h in state.history] == [4] and state.best["step"] == 4
    assert state.mix_neighbours is not None and state.mix_neighbours.shape == (32,)
    again = state.to_checkpoint()
    assert again["step"] == saved["step"] and torch.equal(again["mix_neighbours"], saved["mix_neighbours"])
    # a checkpoint written before the validation history was saved loads with an empty one
    older = {k: v for k, v in saved.items() if k != "history"}
    assert train_module.TrainState.from_checkpoint(older).history == []


def test_stopping_leaves_a_resumable_checkpoint_mid_epoch(interrupted) -> None:
    assert interrupted.first_status == "interrupted"
    assert interrupted.first_checkpoints == {"last-00000003.pt"}
    assert interrupted.second_status == "interrupted"
    # saved at step 4 (end of epoch 0, with best.pt after validation) and step 5; keep_last=2 pruned step 3
    assert interrupted.second_checkpoints == {"last-00000004.pt", "last-00000005.pt", "best.pt"}
    state = load_checkpoint(interrupted.run.checkpoints / "last-00000005.pt")
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (5, 1, 1)
    # the T_mix neighbours drawn after epoch 0 travel with the checkpoint
    neighbours = state["mix_neighbours"]
    assert neighbours is not None and neighbours.shape == (32,)
    assert ((neighbours >= 0) & (neighbours < 32) & (neighbours != torch.arange(32))).all()


def test_resumed_run_ends_with_the_uninterrupted_weights(reference_run, interrupted, tmp_path) -> None:
    run = clone_run(interrupted.run.dir, tmp_path / "resumed")
    train_on(run, evaluate_at_end=False, **quiet())

    assert run.meta()["status"] == "finished"
    final = f"last-{TOTAL_STEPS:08d}.pt"
    assert_same_tensors(model_of(run.checkpoints / final), model_of(reference_run.checkpoints / final))
    a, b = load_checkpoint(run.checkpoints / final), load_checkpoint(reference_run.checkpoints / final)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    # every logged step, replayed or not, has the same losses, and nothing is logged twice
    assert train_losses(run) == train_losses(reference_run)
    assert [r["step"] for r in run.metrics() if r["kind"] == "train"] == list(range(1, TOTAL_STEPS + 1))
    val = [(r["step"], r["ciou"], r["auc"], r["l_cl"]) for r in run.metrics() if r["kind"] == "val"]
    assert val == [(r["step"], r["ciou"], r["auc"], r["l_cl"]) for r in reference_run.metrics() if r["kind"] == "val"]


def test_cli_resume_ends_with_the_uninterrupted_weights(reference_run, interrupted, tmp_path) -> None:
    from sslt_cli.cli import app

    run = clone_run(interrupted.run.dir, tmp_path / "resumed")
    result = CliRunner().invoke(app, ["train", "--resume", str(run.dir)])

    assert result.exit_code == 0, result.output
    assert run.meta()["status"] == "finished"
    final = f"last-{TOTAL_STEPS:08d}.pt"
    assert_same_tensors(model_of(run.checkpoints / final), model_of(reference_run.checkpoints / final))


def test_resume_removes_the_torn_temporary_checkpoints_of_a_killed_save(interrupted, tmp_path) -> None:
    run = clone_run(interrupted.run.dir, tmp_path / "resumed")
    torn = run.checkpoints / ".last-00000006.pt.q8z1r0.tmp"  # kill -9 in the middle of torch.save
    torn.write_bytes(b"PK\x03\x04" + bytes(2**20))
    console = Console(file=io.StringIO(), width=200)
    with one_thread():
        train_on(run, stop_after_steps=1, evaluate_at_end=False, console=console, out=console)
    assert not torn.exists() and not list(run.checkpoints.glob(".*.tmp"))
    assert ("removed 1 torn temporary checkpoint file(s) (1.0 MiB) left by a stop during a save"
            in console.file.getvalue())


# --- checkpoints ------------------------------------------------------------------------------------------------

def test_checkpoint_is_self_describing_and_loads_weights_only(reference_run) -> None:
    path = reference_run.checkpoints / f"last-{TOTAL_STEPS:08d}.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)

    assert {"format", "model", "optimizer", "step", "epoch", "rng", "recipe"} <= state.keys()
    assert state["format"] == "sslt-checkpoint/1"
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (TOTAL_STEPS, 2, 0)
    assert state["recipe"] == recipe_dict(reference_run.recipe())
    expected = build_model().state_dict()
    assert {k: v.shape for k, v in state["model"].items()} == {k: v.shape for k, v in expected.items()}
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)
    # Adam has stepped every trainable tensor TOTAL_STEPS times
    steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {float(TOTAL_STEPS)}
    assert isinstance(state["rng"]["torch"], torch.Tensor) and state["rng"]["torch"].dtype == torch.uint8


def test_best_checkpoint_is_the_best_validation_ciou_and_lasts_are_pruned(reference_run) -> None:
    val = [r for r in reference_run.metrics() if r["kind"] == "val"]
    assert [r["step"] for r in val] == [STEPS_PER_EPOCH, TOTAL_STEPS]
    best_record = max(val, key=lambda r: r["ciou"])  # the first of equal values: a later tie does not replace it
    best = load_checkpoint(reference_run.checkpoints / "best.pt")

    assert best["step"] == best_record["step"]
    assert best["best"]["ciou"] == pytest.approx(best_record["ciou"])
    assert_same_tensors(best["model"], model_of(reference_run.checkpoints / f"last-{best_record['step']:08d}.pt"))
    # keep_last=2: the two last-*.pt of the epoch ends, nothing else, no temp file left behind
    assert checkpoint_names(reference_run) == {"best.pt", "last-00000004.pt", "last-00000006.pt"}


def test_official_format_round_trip_gives_identical_maps(reference_run, bench, tmp_path) -> None:
    recipe = reference_run.recipe()
    ours = load_model(reference_run.checkpoints / f"last-{TOTAL_STEPS:08d}.pt", recipe)
    exported = save_official_checkpoint(ours.model, tmp_path / "official.pth", epoch=2, iteration=TOTAL_STEPS)
    theirs = load_model(exported, recipe)

    assert (ours.label, theirs.label) == ("sslt", "official SSL-TIE")
    assert_same_tensors(ours.model.state_dict(), theirs.model.state_dict())
    test = load_test_set(bench / "test_vggss")
    clips = [test.clips[i] for i in test.ids[:4]]
    protocol = get_protocol("ssltie")
    maps_ours, skipped_ours = predict_maps(ours, clips, protocol, device="cpu", num_workers=0)
    maps_theirs, skipped_theirs = predict_maps(theirs, clips, protocol, device="cpu", num_workers=0)
    assert skipped_ours == skipped_theirs == []
    assert sorted(maps_ours) == sorted(c.id for c in clips)
    for clip_id, m in maps_ours.items():
        assert m.shape == (4, 4)  # 64 px / 16
        assert np.array_equal(m, maps_theirs[clip_id])


def test_garbage_and_incomplete_checkpoints_are_refused(tmp_path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 100)
    with pytest.raises(CheckpointError, match="garbage.pth: not a checkpoint"):
        load_model(garbage)

    state = to_official_state_dict(build_model())
    del state["conv3.weight"]
    incomplete = tmp_path / "incomplete.pth"
    torch.save({"epoch": 1, "state_dict": state, "best_miou": 0.3, "optimizer": None, "iteration": 1}, incomplete)
    with pytest.raises(CheckpointError) as info:
        load_model(incomplete)
    assert "keys do not match the official SSL-TIE checkpoint" in info.value.message
    assert info.value.problems == ["missing keys (1): conv3.weight"]


def test_official_checkpoint_with_numpy_best_miou_loads(tmp_path) -> None:
    model = build_model()
    path = tmp_path / "published.pth.tar"
    state = {f"module.{k}": v for k, v in to_official_state_dict(model).items()}
    torch.save({"epoch": 99, "state_dict": state, "best_miou": np.float64(0.3863), "optimizer": None,
                "iteration": 450000}, path)

    loaded = load_model(path)
    assert loaded.label == "official SSL-TIE"
    assert_same_tensors(loaded.model.state_dict(), model.state_dict())


# --- failures and bad data ----------------------------------------------------------------------------------------

# two steps per epoch, no validation, one view per step: the cheapest run that checkpoints before step 3
NAN_RUN = ("data.limit_train=16", "data.val=null", "optim.max_steps=4", *ROW_A)


def nan_loss_at_call(n: int):
    """``train.forward_views`` whose n-th call (1-based) returns a NaN loss."""
    real_forward = train_module.forward_views
    calls = {"n": 0}

    def forward_views(*args, **kwargs):
        loss, logs = real_forward(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), logs) if calls["n"] == n else (loss, logs)

    return forward_views


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(bench, tmp_path, monkeypatch) -> None:
    recipe = make_recipe(tmp_path, bench, *NAN_RUN)
    saved: dict[str, dict[str, torch.Tensor]] = {}
    real_save = Run.save_checkpoint

    def remembering_save(self, state, name, keep_last=None):
        saved[name] = copy.deepcopy(state["model"])
        return real_save(self, state, name, keep_last)

    monkeypatch.setattr(Run, "save_checkpoint", remembering_save)
    monkeypatch.setattr(train_module, "forward_views", nan_loss_at_call(3))
    with pytest.raises(TrainingError) as info:
        train_new(recipe, evaluate_at_end=False, **quiet())

    run = only_run(tmp_path / "runs")
    # two steps per epoch: updates 1 and 2 happen, the third forward (epoch 1) gives NaN; which number the message
    # gives that step is pinned by test_nan_message_names_the_failing_step
    assert re.search(r"^the loss became nan at step \d \(epoch 1\); training stopped$", info.value.message)
    assert any("last-00000002.pt (intact)" in p for p in info.value.problems)
    meta = run.meta()
    assert meta["status"] == "failed" and "TrainingError" in meta["error"] and meta["step"] == 2
    assert checkpoint_names(run) == {"last-00000002.pt"}
    assert_same_tensors(model_of(run.checkpoints / "last-00000002.pt"), saved["last-00000002"])
    assert [r["step"] for r in run.metrics() if r["kind"] == "train"] == [1, 2]


def test_nan_message_names_the_failing_step(bench, tmp_path, monkeypatch) -> None:
    recipe = make_recipe(tmp_path, bench, *NAN_RUN)
    monkeypatch.setattr(train_module, "forward_views", nan_loss_at_call(3))
    with pytest.raises(TrainingError, match=r"at step 3 \(epoch 1\)"):
        train_new(recipe, evaluate_at_end=False, **quiet())


def test_bad_clips_are_skipped_and_listed(bench, tmp_path) -> None:
    root = tmp_path / "data"
    shutil.copytree(bench / "train", root / "train")
    with open(root / "train" / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    corrupt_frame, truncated_audio, missing_frame = rows[2], rows[5], rows[11]
    (root / "train" / corrupt_frame["frame"]).write_bytes(b"\xff\xd8 not really a JPEG " * 40)
    wav = root / "train" / truncated_audio["audio"]
    wav.write_bytes(wav.read_bytes()[:20])  # cut inside the RIFF header
    (root / "train" / missing_frame["frame"]).unlink()
    # 17 clips: the precheck drops the missing one, leaving two full batches, so every clip is read in epoch 0
    recipe = make_recipe(tmp_path, root, "data.limit_train=17", "data.val=null", "optim.max_steps=2")

    run = train_new(recipe, evaluate_at_end=False, **quiet())

    assert run.meta()["status"] == "finished" and run.meta()["step"] == 2
    with open(run.dir / "skipped.csv", newline="") as f:
        listed = {r["id"]: (r["stage"], r["reason"]) for r in csv.DictReader(f)}
    assert sorted(listed) == sorted([corrupt_frame["id"], truncated_audio["id"], missing_frame["id"]])
    assert listed[missing_frame["id"]] == ("train", f"missing frame file {root / 'train' / missing_frame['frame']}")
    stage, reason = listed[corrupt_frame["id"]]
    assert stage == "train epoch 0" and reason.startswith(f"unreadable frame {root / 'train' / corrupt_frame['frame']}")
    stage, reason = listed[truncated_audio["id"]]
    assert stage == "train epoch 0" and reason.startswith(f"unreadable audio {wav}: not a sound file")
    assert run.meta()["skipped_train_clips"] == 1 and run.meta()["train_clips"] == 16


def test_resume_does_not_list_a_skipped_clip_twice(bench, tmp_path) -> None:
    root = tmp_path / "data"
    shutil.copytree(bench / "train", root / "train")
    with open(root / "train" / "manifest.csv", newline="") as f:
        missing = list(csv.DictReader(f))[0]
    (root / "train" / missing["frame"]).unlink()
    recipe = make_recipe(tmp_path, root, "data.limit_train=9", "data.val=null", "optim.max_steps=2", *ROW_A)
    run = train_new(recipe, stop_after_steps=1, evaluate_at_end=False, **quiet())
    train_on(run, evaluate_at_end=False, **quiet())

    assert run.meta()["status"] == "finished"
    with open(run.dir / "skipped.csv", newline="") as f:
        assert [r["id"] for r in csv.DictReader(f)] == [missing["id"]]


# --- learning -----------------------------------------------------------------------------------------------------

def test_a_few_steps_lower_the_loss_from_chance(bench, tmp_path) -> None:
    # Row A (no augmentation, one view) on one batch of 16 clips: every step sees the same inputs, so the logged
    # loss is plain gradient descent on a fixed objective.
    recipe = make_recipe(tmp_path, bench, "data.limit_train=16", "optim.batch_size=16", "data.val=null",
                         "optim.max_steps=6", *ROW_A)
    run = train_new(recipe, evaluate_at_end=False, **quiet())

    losses = [r["loss"] for r in run.metrics() if r["kind"] == "train"]
    assert len(losses) == 6
    # at initialisation the 18 logits (1 positive, 16 easy negatives, 1 hard negative) are nearly equal: ln 18
    assert losses[0] == pytest.approx(math.log(18), abs=0.2)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.5 * losses[0], losses


def test_final_evaluation_and_mlflow_mirror(bench, tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    from sslt_cli.tracking import Tracker

    recipe = make_recipe(tmp_path, bench, "data.limit_train=16", "optim.max_steps=2", "tracking.enabled=true",
                         "tracking.experiment=tiny", "transforms.mix.enabled=false")
    parent_id = Tracker(experiment="tiny").start("an ablation")
    result = train_in(recipe, Run.create(recipe), parent_run_id=parent_id, evaluate_at_end=True, **quiet())
    run = result.run

    assert run.meta()["status"] == "finished"
    assert (result.status, result.protocol, result.best, result.last) == (
        "finished", "ssltie", run.checkpoints / "best.pt", run.checkpoints / "last-00000002.pt")
    val_records = [r for r in run.metrics() if r["kind"] == "val"]
    assert result.history == [{k: v for k, v in r.items() if k != "kind"} for r in val_records]
    tests = [r for r in run.metrics() if r["kind"] == "test"]
    assert sorted((r["set"], r["checkpoint"]) for r in tests) == [
        ("flickr", "best"), ("flickr", "last"), ("vggss", "best"), ("vggss", "last")]
    for record in tests:
        written = json.loads((run.dir / "eval" / f"{record['set']}-{record['checkpoint']}-ssltie" / "metrics.json")
                             .read_text())
        assert written["n"] == record["n"] == (8 if record["set"] == "vggss" else 4)
        assert written["method"]["ciou"] == pytest.approx(record["ciou"])
        assert written["method"]["auc"] == pytest.approx(record["auc"])
        assert record["step"] == 2
        # what train hands back is what it wrote: no caller needs to read the files again
        returned = result.test[record["set"]][record["checkpoint"]]
        assert {k: returned[k] for k in ("ciou", "auc", "mean_iou", "n")} == {
            k: record[k] for k in ("ciou", "auc", "mean_iou", "n")}
        centre = written["baselines"]["centre"]
        assert (returned["baseline_centre/ciou"], returned["baseline_centre/auc"]) == (centre["ciou"], centre["auc"])
        # and the run folder's record carries the same baselines (what ablate reads for a cell run earlier)
        assert (record["baseline_centre/ciou"], record["baseline_centre/auc"]) == (centre["ciou"], centre["auc"])

    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    mlflow_run = client.get_run(run.meta()["mlflow_run_id"])
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["mlflow.parentRunId"] == parent_id  # a child from its creation
    assert mlflow_run.data.params["optim.lr"] == "0.0001"
    assert mlflow_run.data.params["transforms.views"] == "paper"
    train_records = [r for r in run.metrics() if r["kind"] == "train"]
    history = client.get_metric_history(mlflow_run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], r["loss"]) for r in train_records]
    val = [r for r in run.metrics() if r["kind"] == "val"]
    ciou = client.get_metric_history(mlflow_run.info.run_id, "val/ciou")
    assert [(m.step, m.value) for m in ciou] == [(r["step"], r["ciou"]) for r in val]
    assert {"eval/vggss-best-ssltie/ciou", "eval/flickr-last-ssltie/auc"} <= set(mlflow_run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}
    assert {"config.yaml", "metrics.jsonl"} <= artifacts
    assert any(a.path.endswith(".png") for a in client.list_artifacts(mlflow_run.info.run_id, "val"))


# --- views ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["paper", "code", "row-A"])
def test_view_modes(bench, tmp_path, monkeypatch, mode) -> None:
    overrides = ROW_A if mode == "row-A" else (f"transforms.views={mode}",)
    recipe = make_recipe(tmp_path, bench, "data.limit_train=8", "data.val=null", "optim.max_steps=1", *overrides)
    seen: list[tuple] = []
    real_forward = train_module.ModelForTraining.forward

    def recording_forward(self, *views):
        seen.append(tuple((images.clone(), specs) for images, specs in views))
        return real_forward(self, *views)

    monkeypatch.setattr(train_module.ModelForTraining, "forward", recording_forward)
    run = train_new(recipe, evaluate_at_end=False, **quiet())

    assert len(seen) == 1
    (record,) = [r for r in run.metrics() if r["kind"] == "train"]
    if mode == "row-A":
        ((images, specs),) = seen[0]
        assert images.shape == (8, 3, 64, 64) and specs.shape[:2] == (8, 1)
        assert "l_cl2" not in record and "l_geo" not in record
        assert record["loss"] == pytest.approx(2 * 0.5 * record["l_cl1"], rel=1e-6)
        return
    (images1, specs1), (images2, specs2) = seen[0]
    assert images1.shape == images2.shape == (8, 3, 64, 64)
    assert not torch.equal(images1, images2)
    if mode == "code":
        assert specs2 is specs1  # view 2 is T_geo(view 1) with the same spectrogram
    else:
        assert specs2 is not specs1 and not torch.equal(specs1, specs2)  # independent T_mask draws
    expected = 0.5 * (record["l_cl1"] + record["l_cl2"]) + 1.0 * record["l_geo"]
    assert record["loss"] == pytest.approx(expected, rel=1e-5)


def test_holdout_classes_must_exist_in_the_labelled_training_set(tmp_path):
    from sslt_cli.data.manifest import Clip, layout_paths, write_set
    from sslt_cli.errors import DataError

    root = tmp_path / "data" / "train"
    clips = []
    for n, label in enumerate(("dog barking", "dog barking", "cat meowing", "")):
        cid = f"abcdefghij{n}_000001"
        frame, audio, _ = layout_paths("vggsound_train", cid)
        (root / frame).parent.mkdir(parents=True, exist_ok=True)
        (root / frame).write_bytes(b"jpeg")
        (root / audio).parent.mkdir(parents=True, exist_ok=True)
        (root / audio).write_bytes(b"RIFF")
        clips.append(Clip(cid, label, frame, audio))
    write_set(root, "vggsound_train", clips)

    def load(*classes: str, labelled: bool = True):
        if not labelled:
            write_set(root, "vggsound_train", [Clip(c.id, "", c.frame, c.audio) for c in clips])
        recipe = Recipe.model_validate({"data": {"root": str(tmp_path / "data"), "train": "train",
                                                 "holdout_classes": list(classes)}})
        return train_module.load_training_clips(recipe, None, Console(file=io.StringIO()))

    kept, _ = load("cat meowing")
    assert [c.label for c in kept] == ["dog barking", "dog barking", ""]
    with pytest.raises(DataError) as err:
        load("dog barkin", "cat meowing")
    assert err.value.message == (f"data.holdout_classes: 1 class(es) are not in the training set {root} (a held-out "
                                 "class must be one the set has, or nothing is held out)")
    assert err.value.problems == ["'dog barkin' (did you mean 'dog barking'?)"]
    with pytest.raises(DataError) as err:
        load("cat meowing", labelled=False)
    assert err.value.message == (f"{root}: data.holdout_classes needs class labels, and this training set's manifest "
                                 "has none")


def test_the_spectrogram_cache_is_checked_against_free_disk_space(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from sslt_cli.errors import DataError

    recipe = Recipe()  # the paper's front end: 257 mels x 670 frames of float32
    cache = tmp_path / ".spec_cache"
    line = train_module.check_cache_space(cache, 1000, recipe)
    assert line == (f"log-mel cache {cache}: about 0.64 GiB for 1000 clips (0.00 GiB there already; "
                    "data.cache_spectrograms=false turns it off)")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 0, 50 * 2**30))
    with pytest.raises(DataError) as err:
        train_module.check_cache_space(cache, 144_000, recipe)
    assert err.value.message == (f"{cache}: the log-mel cache needs about 92.4 GiB more for 144000 clips (0.66 MiB "
                                 "each) and the disk has 50.0 GiB free")
    # 2 clips need 2 x 688888 bytes; with 1 MiB cached already the remaining 329200 fit in 500000 free bytes
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 0, 500_000))
    with pytest.raises(DataError, match="needs about 0.0 GiB more for 2 clips"):
        train_module.check_cache_space(cache, 2, recipe)
    (cache / "x.npy").write_bytes(bytes(2**20))
    assert train_module.check_cache_space(cache, 2, recipe).startswith(f"log-mel cache {cache}: about 0.00 GiB")


# --- a full disk, signals (issue 13) --------------------------------------------------------------------------------

FULL_DISK_RUN = ("data.limit_train=16", "data.limit_val=4", "optim.max_steps=4", *ROW_A)  # 2 steps/epoch, 2 epochs


def test_a_full_disk_stops_with_a_clear_error_and_resume_continues_from_best(bench, tmp_path, monkeypatch) -> None:
    recipe = make_recipe(tmp_path, bench, *FULL_DISK_RUN)
    real_usage = shutil.disk_usage

    def nearly_full(path):  # the disk fills up once the first checkpoint is written (issue 22: it is checked too)
        usage = real_usage(path)
        filled = Path(path).name == "checkpoints" and any(Path(path).glob("*.pt"))
        return usage._replace(free=1000) if filled else usage

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    with pytest.raises(TrainingError) as info:
        train_new(recipe, evaluate_at_end=False, **quiet())
    run = only_run(tmp_path / "runs")
    # epoch 0 ends: best.pt is written (nothing to compare with yet), then last-00000002.pt does not fit
    assert info.value.message.startswith(f"{run.checkpoints}: not enough disk space for the next checkpoint "
                                         "(0.0 MiB free, about ")
    assert info.value.message.endswith(" MiB needed: the size of best.pt and a margin)")
    assert info.value.problems == ["free disk space, or move runs_dir to a larger disk; the previous checkpoints are "
                                   f"intact: continue with: sslt train --resume {run.dir}"]
    assert checkpoint_names(run) == {"best.pt"}
    meta = run.meta()
    assert meta["status"] == "failed" and meta["error"].startswith("TrainingError: ") and meta["step"] == 2
    assert "not enough disk space for the next checkpoint" in (run.dir / "train.log").read_text()

    monkeypatch.undo()
    with one_thread():
        train_on(run, evaluate_at_end=False, **quiet())
    assert run.meta()["status"] == "finished"
    assert "from best.pt: step 2, epoch 1, batch 0" in (run.dir / "train.log").read_text()
    assert checkpoint_names(run) >= {"last-00000004.pt", "best.pt"}


def test_sigterm_exits_non_zero_with_a_checkpoint_and_the_resume_hint(bench, tmp_path) -> None:
    import signal
    import subprocess
    import sys
    import time

    make_recipe(tmp_path, bench, *ROW_A, "data.val=null", "optim.max_steps=400")
    process = subprocess.Popen([sys.executable, "-m", "sslt_cli", "train", str(tmp_path / "tiny.yaml")],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        runs = list((tmp_path / "runs").glob("*/metrics.jsonl"))
        if runs and runs[0].stat().st_size:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    run = only_run(tmp_path / "runs")
    assert run.meta()["status"] == "interrupted"
    assert any(name.startswith("last-") for name in checkpoint_names(run))
    assert f"not finished: continue with: sslt train --resume {run.dir}" in stderr


def _flatten_vggss_xml(folder: Path) -> int:
    """Rewrite every VGG-SS XML under ``folder`` with its coordinates directly under <bbox> (no <box>)."""
    files = list(folder.rglob("*.xml"))
    for xml in files:
        xml.write_text(re.sub(r"\s*</?box>", "", xml.read_text()))
    return len(files)


@pytest.mark.parametrize("which", ["val", "test_vggss"])
def test_a_named_set_without_a_usable_clip_stops_before_training(bench, tmp_path, which) -> None:
    root = tmp_path / "data"
    shutil.copytree(bench, root)
    n = _flatten_vggss_xml(root / which)
    recipe = make_recipe(tmp_path, root, *ROW_A)
    with pytest.raises(DataError) as info:
        train_module.preflight(recipe)  # what sslt train and sslt ablate check before a run folder exists
    role = "validation set (data.val)" if which == "val" else "test set 'vggss' (data.test)"
    assert info.value.message == (f"{root / which}: the {role} has no usable clip: {n} requested, {n} without a usable "
                                  "annotation, 0 without frame or audio; nothing was trained")
    first = info.value.problems[0]
    assert re.fullmatch(r"\S+: annotation unreadable: .*\.xml: clip \S+: <xmin> holds a coordinate directly under "
                        r"<bbox>; SSL-TIE's form puts each box's four coordinates in a <box> element: "
                        r"<bbox><box><xmin>..</xmin><ymin>..</ymin><xmax>..</xmax><ymax>..</ymax></box></bbox>", first)
    assert len(info.value.problems) == min(n, 5) + 1
    assert info.value.problems[-1].startswith("VGG-SS annotations are read in SSL-TIE's form: <annotation><bbox><box>")
    assert not (tmp_path / "runs").exists()


def test_resume_sends_the_numbers_a_failed_store_missed(bench, isolated_workdir, monkeypatch) -> None:
    tmp_path = isolated_workdir
    from mlflow.tracking import MlflowClient

    recipe = make_recipe(tmp_path, bench, *ROW_A, "data.val=null", "optim.max_steps=4", "tracking.enabled=true",
                         "tracking.experiment=catch-up")
    real_log_batch = MlflowClient.log_batch

    def metrics_refused(self, run_id, *args, **kwargs):
        if kwargs.get("metrics"):
            raise OSError("attempt to write a readonly database")
        return real_log_batch(self, run_id, *args, **kwargs)

    with monkeypatch.context() as patch, one_thread():
        patch.setattr(MlflowClient, "log_batch", metrics_refused)
        run = train_new(recipe, stop_after_steps=2, evaluate_at_end=False, **quiet())
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    run_id = run.meta()["mlflow_run_id"]
    assert client.get_metric_history(run_id, "train/loss") == []
    assert "failed while logging metrics (OSError: attempt to write a readonly database)" in (
        (run.dir / "train.log").read_text())

    with one_thread():
        train_on(run, evaluate_at_end=False, **quiet())
    history = client.get_metric_history(run_id, "train/loss")
    records = [r for r in run.metrics() if r["kind"] == "train"]
    assert sorted((m.step, m.value) for m in history) == [(r["step"], r["loss"]) for r in records]
    assert [r["step"] for r in records] == [1, 2, 3, 4]


def test_train_records_through_the_sink_it_is_given_and_opens_no_tracking_run(bench, tmp_path) -> None:
    """The caller owns the MLflow run: handed a sink without one, train writes metrics.jsonl and nothing else, even
    with tracking on in the recipe (before, train opened the run itself)."""
    from mlflow.tracking import MlflowClient

    from sslt_cli.tracking import MetricsSink

    recipe = make_recipe(tmp_path, bench, *ROW_A, "data.val=null", "optim.max_steps=1", "tracking.enabled=true",
                         "tracking.experiment=owned")
    run = Run.create(recipe)
    with one_thread():
        result = train(recipe, run, sink=MetricsSink(run, None), evaluate_at_end=False, **quiet())
    assert result.status == "finished" and [r["kind"] for r in run.metrics()] == ["train"]
    assert "mlflow_run_id" not in run.meta()
    assert MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"]).get_experiment_by_name("owned") is None


# ------------------------------------------------------------------ issue 22, item 4: every input checked before work

def _not_a_resnet18(path: Path) -> Path:
    """A weights file that loads safely but is no ResNet-18 state_dict (a small linear layer's)."""
    torch.save(torch.nn.Linear(4, 2).state_dict(), path)
    return path


@pytest.mark.parametrize("key, bad", [("eval.ogl_weights", "missing"), ("eval.ogl_weights", "linear"),
                                      ("model.vision_init", "linear")])
def test_a_bad_weights_file_stops_before_training(bench, tmp_path, key, bad) -> None:
    path = tmp_path / "missing.pth" if bad == "missing" else _not_a_resnet18(tmp_path / "linear.pth")
    recipe = make_recipe(tmp_path, bench, *ROW_A, f"{key}={path}")
    with pytest.raises(CheckpointError) as info:
        train_module.preflight(recipe)  # what sslt train and sslt ablate check before a run folder exists
    assert info.value.message.endswith("; nothing was trained")
    assert str(path) in info.value.message
    if bad == "linear":
        assert any(p.startswith("missing keys (") for p in info.value.problems), info.value.problems
    assert info.value.problems[-1] == train_module.WEIGHTS_HINT
    assert not (tmp_path / "runs").exists()


def test_sslt_train_with_bad_ogl_weights_fails_before_its_run_folder_exists(bench, tmp_path) -> None:
    """Before: the run trained to its end, then its final evaluation failed on the missing file."""
    overrides = [*ROW_A, "data.val=null", "optim.max_steps=2", f"eval.ogl_weights={tmp_path / 'no.pth'}"]
    make_recipe(tmp_path, bench)
    result = CliRunner().invoke(_cli_app(), ["train", str(tmp_path / "tiny.yaml"), *overrides])
    assert isinstance(result.exception, CheckpointError)
    assert result.exception.message == (f"object-guided localisation weights {str(tmp_path / 'no.pth')!r}: no such "
                                        "file; give the path of a local torchvision resnet18 state_dict (ImageNet "
                                        "weights), or leave it unset; nothing was trained")
    assert not (tmp_path / "runs").exists()


def _cli_app():
    from sslt_cli.cli import app

    return app


def test_good_weights_files_pass_the_checks(bench, tmp_path) -> None:
    from torchvision.models import resnet18

    torch.save(resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    recipe = make_recipe(tmp_path, bench, *ROW_A, f"eval.ogl_weights={tmp_path / 'r18.pth'}",
                         f"model.vision_init={tmp_path / 'r18.pth'}", f"model.audio_init={tmp_path / 'r18.pth'}")
    train_module.preflight(recipe)


def test_retrieval_inputs_are_checked_before_an_ablation_cell_trains(bench, tmp_path) -> None:
    """An ablation with ``retrieve: true`` retrieves on the recipe's first test set after training: a set whose
    labelled clips cannot make a gallery (8 clips here, 11 needed) is named before the first step."""
    recipe = make_recipe(tmp_path, bench, *ROW_A)
    train_module.preflight(recipe)  # without retrieval the same recipe passes
    with pytest.raises(DataError) as info:
        train_module.preflight(recipe, retrieval=True)
    assert info.value.message == (f"retrieval after training (retrieve: true) on {bench / 'test_vggss'}, labels from "
                                  f"{bench / 'vggsound.csv'}: retrieval needs at least "
                                  "11 labelled clips of the chosen classes; found 8; nothing was trained")
