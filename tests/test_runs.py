"""Run folders: creation without reuse, config and meta, metrics.jsonl, atomic checkpoints, listing."""
from __future__ import annotations

import datetime
import io
import itertools
import json
import re
import types
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sslt_cli import runs as runs_module
from sslt_cli.config import load_recipe
from sslt_cli.errors import CheckpointError, SsltError
from sslt_cli.checkpoint import load as load_checkpoint
from sslt_cli.checkpoint import resume_point
from sslt_cli.runs import Run, list_runs


@pytest.fixture
def recipe():
    """A small recipe with values that differ from the defaults, so a round trip can lose them."""
    Path("recipe.yaml").write_text("name: t\noptim:\n  lr: 2e-5\n  epochs: 3\n")
    return load_recipe("recipe.yaml", ["data.test={vggss: a}", "data.holdout_classes=[dog, cat]",
                                       "transforms.equivariance.scales=[1.0,0.75]", "seed=7"])


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run stamp reads 2025-01-02 03:04:05, so creations fall in the same second."""
    fixed = datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    clock = types.SimpleNamespace(datetime=types.SimpleNamespace(now=lambda tz=None: fixed),
                                  timezone=datetime.timezone)
    monkeypatch.setattr(runs_module, "_dt", clock)


@pytest.fixture
def ticking_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The run clock advances one second each time it is read, from 2025-01-02 03:04:05."""
    start = datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    reads = itertools.count()
    clock = types.SimpleNamespace(
        datetime=types.SimpleNamespace(now=lambda tz=None: start + datetime.timedelta(seconds=next(reads))),
        timezone=datetime.timezone)
    monkeypatch.setattr(runs_module, "_dt", clock)


# --- creation, config, meta -----------------------------------------------------------------------------------------

def test_create_never_reuses_a_folder(recipe, frozen_clock) -> None:
    first = Run.create(recipe, argv=["sslt", "train", "a"])
    before = {p.name: p.read_bytes() for p in first.dir.iterdir() if p.is_file()}
    second = Run.create(recipe, argv=["sslt", "train", "b"])
    third = Run.create(recipe, argv=["sslt", "train", "c"])
    assert [first.dir.name, second.dir.name, third.dir.name] == [
        "t-20250102-030405", "t-20250102-030405-1", "t-20250102-030405-2"]
    assert first.dir.parent == Path("runs")
    assert {p.name: p.read_bytes() for p in first.dir.iterdir() if p.is_file()} == before
    assert second.meta()["argv"] == ["sslt", "train", "b"]
    assert (second.dir / "checkpoints").is_dir()


def test_create_uses_runs_dir_and_name(recipe, tmp_path: Path) -> None:
    run = Run.create(recipe, argv=[], runs_dir=tmp_path / "elsewhere", name="cell-a")
    assert run.dir.parent == tmp_path / "elsewhere"
    assert re.fullmatch(r"cell-a-\d{8}-\d{6}", run.dir.name)
    assert run.meta()["name"] == run.dir.name and run.meta()["recipe_name"] == "t"


def test_config_round_trips_to_the_same_recipe(recipe) -> None:
    run = Run.create(recipe, argv=[])
    assert run.recipe() == recipe
    assert Run.open(run.dir).recipe() == recipe
    assert run.recipe().optim.lr == 2e-5 and run.recipe().transforms.equivariance.scales == (1.0, 0.75)


def test_meta_fields(recipe) -> None:
    argv = ["sslt", "train", "recipe.yaml", "seed=7"]
    run = Run.create(recipe, argv=argv, overrides=["seed=7"], extra_meta={"recipe_path": "recipe.yaml"})
    meta = json.loads((run.dir / "meta.json").read_text())
    assert meta["argv"] == argv
    assert meta["overrides"] == ["seed=7"]
    assert "git_sha" in meta and (meta["git_sha"] is None or re.fullmatch(r"[0-9a-f]{40}", meta["git_sha"]))
    assert torch.__version__.startswith(meta["versions"]["torch"])  # metadata drops a local tag such as +cpu
    assert re.fullmatch(r"3\.\d+\.\d+", meta["versions"]["python"])
    assert meta["seed"] == 7
    assert meta["status"] == "created"
    assert meta["recipe_path"] == "recipe.yaml"


def test_update_meta_keeps_other_fields(recipe) -> None:
    run = Run.create(recipe, argv=["x"])
    run.update_meta(status="finished", best_step=12)
    meta = run.meta()
    assert (meta["status"], meta["best_step"], meta["argv"], meta["seed"]) == ("finished", 12, ["x"], 7)


def test_open_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    with pytest.raises(SsltError) as info:
        Run.open(tmp_path / "plain")
    assert info.value.render() == (f"{tmp_path / 'plain'}: not a run folder (expected config.yaml and meta.json "
                                   "inside); pass a folder made by `sslt train`")


# --- metrics.jsonl --------------------------------------------------------------------------------------------------

def test_metrics_append_read_and_truncate(recipe) -> None:
    run = Run.create(recipe, argv=[])
    assert run.metrics() == []
    records = [{"kind": "train", "step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4)]
    records.append({"kind": "val", "step": 4, "ciou": 0.25})
    for record in records:
        run.append_metrics(record)
    assert run.metrics() == records
    run.truncate_metrics_after(2)
    assert run.metrics() == records[:2]
    run.append_metrics({"kind": "train", "step": 3, "loss": 0.5})
    assert [r["step"] for r in run.metrics()] == [1, 2, 3]


def test_a_torn_last_line_is_ignored(recipe) -> None:
    run = Run.create(recipe, argv=[])
    run.append_metrics({"kind": "train", "step": 1, "loss": 2.0})
    with open(run.dir / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 2, "lo')  # the process was killed mid-write
    assert run.metrics() == [{"kind": "train", "step": 1, "loss": 2.0}]
    run.truncate_metrics_after(10)
    assert (run.dir / "metrics.jsonl").read_text() == '{"kind": "train", "step": 1, "loss": 2.0}\n'


def test_a_record_appended_after_a_torn_line_survives(recipe) -> None:
    run = Run.create(recipe, argv=[])
    with open(run.dir / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')
    run.append_metrics({"kind": "test", "step": 5, "ciou": 0.5})
    assert run.metrics() == [{"kind": "test", "step": 5, "ciou": 0.5}]


# --- checkpoints ----------------------------------------------------------------------------------------------------

def test_checkpoint_round_trip(recipe) -> None:
    run = Run.create(recipe, argv=[])
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "step": 7, "epoch": 1}
    path = run.save_checkpoint(state, "best")
    assert path == run.dir / "checkpoints" / "best.pt" and run.best_checkpoint() == path
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and torch.equal(loaded["model"]["w"], state["model"]["w"])


def test_a_crash_during_save_leaves_the_previous_checkpoint(recipe, monkeypatch: pytest.MonkeyPatch) -> None:
    run = Run.create(recipe, argv=[])
    run.save_checkpoint({"step": 1, "w": torch.ones(1000)}, "best")
    real_save = torch.save

    def save_half_then_crash(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        with open(f, "wb") as out:
            out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_crash)
    with pytest.raises(OSError, match="No space left"):
        run.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, "best")
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["best.pt"]
    loaded = load_checkpoint(run.checkpoints / "best.pt")
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.ones(1000))


def test_keep_last_prunes_by_step_number(recipe) -> None:
    run = Run.create(recipe, argv=[])
    run.save_checkpoint({"step": 0}, "best")
    for step in (8, 9, 10, 11):  # 10 and 11 sort before 8 and 9 as text
        run.save_checkpoint({"step": step}, f"last-{step}", keep_last=2)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["best.pt", "last-10.pt", "last-11.pt"]
    assert run.latest_checkpoint() == run.checkpoints / "last-11.pt"
    assert load_checkpoint(run.latest_checkpoint())["step"] == 11


def test_latest_checkpoint_of_a_fresh_run_is_none(recipe) -> None:
    run = Run.create(recipe, argv=[])
    assert run.latest_checkpoint() is None and run.best_checkpoint() is None


def test_load_checkpoint_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pt"
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(missing)
    assert info.value.render() == f"{missing}: checkpoint file not found"

    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(100)}, buffer)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(buffer.getvalue()[:200])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(truncated)
    assert info.value.render() == (f"{truncated}: a truncated or damaged checkpoint (a zip archive of 200 bytes that "
                                   "ends early or is corrupt)")

    tensor_only = tmp_path / "tensor.pt"
    torch.save(torch.zeros(2), tensor_only)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tensor_only)
    assert info.value.render() == f"{tensor_only}: expected a checkpoint dict, got Tensor"


class _NotAllowed:
    """A class that ``weights_only`` unpickling refuses."""


@pytest.mark.parametrize(("content", "said"), [
    (b"", "an empty file (0 bytes), not a checkpoint"),
    (b"PK\x03\x04 not really a zip", "a truncated or damaged checkpoint (a zip archive of 21 bytes that ends early or "
                                      "is corrupt)"),
    (b"\x80\x02}q\x00", "a truncated or damaged checkpoint (a pickle of 5 bytes that ends early or is corrupt)"),
    (b"\x00\xff\xfe binary", "not a checkpoint: a binary file of 10 bytes"),
], ids=["empty", "zip-magic", "cut-pickle", "binary"])
def test_load_checkpoint_on_broken_bytes(tmp_path: Path, content: bytes, said: str) -> None:
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert info.value.render() == f"{path}: {said}"


def test_load_checkpoint_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "object.pt"
    torch.save({"x": _NotAllowed()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    refused = f"{_NotAllowed.__module__}._NotAllowed"
    assert info.value.render() == (f"{path}: a checkpoint holding Python objects ({refused}) that a safe load "
                                   "refuses; sslt loads weights only (tensors, numbers, text): save the model's "
                                   "state_dict instead")
    assert "weights_only=False" not in info.value.render() and "unsafe" not in info.value.render()


class _RunsCode:
    """Unpickled, this would run a shell command (and leave a file as proof)."""

    def __init__(self, proof: Path):
        self.proof = proof

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.proof}",))


@pytest.mark.parametrize("how", ["torch.save", "pickle protocol 2", "pickle protocol 4"])
def test_a_checkpoint_whose_pickle_calls_os_system_is_said_to_hold_code(tmp_path: Path, how: str) -> None:
    import pickle

    path, proof = tmp_path / "evil.pt", tmp_path / "it-ran"
    if how == "torch.save":
        torch.save({"model": _RunsCode(proof)}, path)
    else:
        path.write_bytes(pickle.dumps({"model": _RunsCode(proof)}, protocol=int(how[-1])))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert not proof.exists()  # nothing ran
    assert info.value.render() == (f"{path}: a file whose pickle holds code (posix.system) that a safe load refuses: "
                                   "it would run when loaded; nothing was run. sslt loads weights only (tensors, "
                                   "numbers, text): use a checkpoint from a source you trust, saved as a state_dict")


@pytest.mark.parametrize("content", [b"this is not a checkpoint at all\n" * 3, b"hello world\n"],
                         ids=["sentence", "hello"])
def test_load_checkpoint_on_text_garbage(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    first = content.decode().splitlines()[0][:40]
    assert info.value.render() == (f"{path}: not a checkpoint: a text file of {len(content)} bytes (it starts with "
                                   f"{first!r})")


def test_load_checkpoint_message_is_plain_text(tmp_path: Path) -> None:
    path = tmp_path / "object.pt"
    torch.save({"x": _NotAllowed()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "\x1b" not in info.value.render()


# --- listing --------------------------------------------------------------------------------------------------------

def test_list_runs_newest_first(recipe, ticking_clock) -> None:
    older = Run.create(recipe, argv=[], name="older")
    newer = Run.create(recipe, argv=[], name="newer")
    Path("runs/not-a-run").mkdir()
    (Path("runs") / "stray.txt").write_text("x")
    assert [r.dir for r in list_runs("runs")] == [newer.dir, older.dir]
    older.update_meta(status="finished")  # rewriting meta.json must not move the older run up
    assert [r.dir for r in list_runs("runs")] == [newer.dir, older.dir]
    assert list_runs("no-such-folder") == []


def test_list_runs_newest_first_within_a_second(recipe, frozen_clock) -> None:
    older = Run.create(recipe, argv=[], name="b-cell")
    newer = Run.create(recipe, argv=[], name="a-cell")
    assert [r.dir for r in list_runs("runs")] == [newer.dir, older.dir]


# --- full disks, resume points, stale runs (issue 13) ---------------------------------------------------------------

def test_a_full_disk_while_saving_is_a_clear_error_and_keeps_the_previous_checkpoint(
        recipe, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    run = Run.create(recipe, argv=[])
    run.save_checkpoint({"step": 1, "w": torch.ones(10)}, "last-00000001")

    def disk_full(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(runs_module.TrainingError) as info:
        run.save_checkpoint({"step": 2}, "last-00000002", keep_last=1)
    assert info.value.message == f"{run.checkpoints}: the disk is full; checkpoint last-00000002.pt was not written"
    assert info.value.problems[0] == f"the previous checkpoint is intact: continue with: sslt train --resume {run.dir}"
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["last-00000001.pt"]
    assert load_checkpoint(run.checkpoints / "last-00000001.pt")["step"] == 1


def test_meta_is_still_written_on_a_full_disk(recipe, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    run = Run.create(recipe, argv=[])

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs_module, "atomic_write_bytes", disk_full)
    run.update_meta(status="failed", error="TrainingError: disk full")
    meta = json.loads((run.dir / "meta.json").read_text())
    assert meta["status"] == "failed" and meta["error"] == "TrainingError: disk full"


def test_resume_point_is_the_newest_complete_checkpoint(recipe) -> None:
    run = Run.create(recipe, argv=[])
    with pytest.raises(runs_module.TrainingError) as info:
        resume_point(run)
    assert info.value.message == f"{run.dir}: nothing to resume: the run was stopped before its first checkpoint"
    assert info.value.problems == [f"start it again with the same recipe: sslt train {run.dir / 'config.yaml'}",
                                   f"(then delete {run.dir}, which holds no trained weights)"]

    run.save_checkpoint({"step": 4}, "best")  # a full disk stopped the run before its last checkpoint
    path, state = resume_point(run)
    assert path.name == "best.pt" and state["step"] == 4

    run.save_checkpoint({"step": 6}, "last-00000006")
    run.save_checkpoint({"step": 8}, "last-00000008")
    (run.checkpoints / "last-00000008.pt").write_bytes(b"PK\x03\x04 cut short")  # written by an older sslt, torn
    path, state = resume_point(run)
    assert path.name == "last-00000006.pt" and state["step"] == 6


def test_a_running_run_records_its_process_and_a_heartbeat(recipe, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import platform

    run = Run.create(recipe, argv=[])
    meta = run.update_meta(status="running")
    assert meta["pid"] == os.getpid() and meta["host"] == platform.node()
    first = meta["heartbeat"]
    assert run.state() == "running"
    monkeypatch.setattr(runs_module, "HEARTBEAT_EVERY_S", 0.0)
    monkeypatch.setattr(runs_module, "_now", lambda: "2030-01-01T00:00:00+00:00")
    run.append_metrics({"kind": "train", "step": 1})
    assert run.meta()["heartbeat"] == "2030-01-01T00:00:00+00:00" != first


def test_a_killed_run_reads_stale_and_sslt_runs_says_how_to_resume(recipe, tmp_path: Path) -> None:
    import subprocess
    import sys

    from sslt_cli.cli import app

    run = Run.create(recipe, argv=[], runs_dir=tmp_path / "runs")
    run.save_checkpoint({"step": 1, "w": torch.ones(3)}, "last-00000001")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    meta = run.update_meta(status="running")
    run.update_meta(pid=gone.pid)
    assert run.state() == f"stale (last heard at {meta['heartbeat']})"

    result = CliRunner().invoke(app, ["runs", "--runs-dir", str(tmp_path / "runs")], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    assert "stale (last heard at" in result.stdout
    assert (f"{run.dir.name}: its process is gone (killed, out of memory or a lost node); continue with: sslt train "
            f"--resume {run.dir}") in result.stderr


def test_a_run_on_another_host_is_stale_after_its_heartbeat_stops(recipe) -> None:
    run = Run.create(recipe, argv=[])
    run.update_meta(status="running")
    run.update_meta(host="elsewhere", heartbeat="2025-01-02T03:04:05+00:00")
    soon = datetime.datetime(2025, 1, 2, 3, 14, 5, tzinfo=datetime.timezone.utc)
    late = datetime.datetime(2025, 1, 2, 4, 4, 6, tzinfo=datetime.timezone.utc)
    assert run.state(now=soon) == "running"
    assert run.state(now=late) == "stale (last heard at 2025-01-02T03:04:05+00:00)"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process start times come from /proc")
def test_a_pid_reused_by_another_process_reads_stale(recipe) -> None:
    run = Run.create(recipe, argv=[])
    meta = run.update_meta(status="running")
    assert isinstance(meta["pid_started"], int)
    assert run.state() == "running"
    run.update_meta(pid_started=meta["pid_started"] - 1)  # this pid, but a process that started at another time
    assert run.state() == f"stale (last heard at {meta['heartbeat']})"


# --- the first checkpoint, torn temporary files, a run killed before its first checkpoint (issue 22) ---------------

def _model_and_optimiser_state() -> tuple[dict, int]:
    """A checkpoint's state after one Adam step of the real model, and the model's parameter bytes."""
    from sslt_cli.model import build_model

    model = build_model()
    optimizer = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 1}, params


def test_the_first_checkpoint_needs_room_for_the_model_and_optimiser_state(recipe, monkeypatch) -> None:
    import shutil

    state, params = _model_and_optimiser_state()
    tensors = [*state["model"].values(), *(t for per in state["optimizer"]["state"].values() for t in per.values())]
    estimate = sum(t.numel() * t.element_size() for t in tensors)
    assert 3 * params <= estimate < 3.1 * params  # weights, and Adam's two moments per weight (+ BN buffers)
    run = Run.create(recipe, argv=["sslt", "train", "recipe.yaml"],
                     extra_meta={"recipe_path": "recipe.yaml"}, overrides=["optim.lr=1e-4"])
    usage = shutil.disk_usage(run.dir)
    free = int(estimate * 0.9)  # room for the model, not for its optimiser state: a torch.save would fail midway
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=free))
    with pytest.raises(runs_module.TrainingError) as info:
        run.save_checkpoint(state, "last-00000001")
    mib = 2**20
    assert info.value.message == (f"{run.checkpoints}: not enough disk space for the first checkpoint "
                                  f"({free / mib:.1f} MiB free, about {estimate * 1.2 / mib:.1f} MiB needed: the model "
                                  "and optimiser state and a margin)")
    assert info.value.problems == ["free disk space, or move runs_dir to a larger disk; no checkpoint was written yet, "
                                   "so the run starts again: sslt train recipe.yaml optim.lr=1e-4"]
    assert list(run.checkpoints.iterdir()) == []


def test_a_save_removes_the_torn_temporary_checkpoints_of_a_killed_save(recipe) -> None:
    run = Run.create(recipe, argv=[])
    run.save_checkpoint({"step": 1, "w": torch.ones(3)}, "last-00000001")
    for torn in (".last-00000002.pt.k1x9_a.tmp", ".best.pt.3j2l_q.tmp"):
        (run.checkpoints / torn).write_bytes(b"PK\x03\x04" + bytes(1000))
    run.save_checkpoint({"step": 2, "w": torch.ones(3)}, "last-00000002")
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["last-00000001.pt", "last-00000002.pt"]


def test_a_run_killed_before_its_first_checkpoint_says_to_start_again(tmp_path: Path) -> None:
    import subprocess
    import sys

    from sslt_cli.cli import app

    Path("recipe.yaml").write_text("name: t\n")
    run = Run.create(load_recipe("recipe.yaml"), argv=[], runs_dir=tmp_path / "runs", overrides=["seed=3"],
                     extra_meta={"recipe_path": "recipe.yaml"})
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run.update_meta(status="running")
    run.update_meta(pid=gone.pid)
    start_again = "sslt train recipe.yaml seed=3"

    listed = CliRunner().invoke(app, ["runs", "--runs-dir", str(tmp_path / "runs")], env={"COLUMNS": "300"})
    assert listed.exit_code == 0
    assert (f"{run.dir.name}: its process is gone (killed, out of memory or a lost node); it has no checkpoint yet, "
            f"so nothing to resume: start it again with: {start_again}") in listed.stderr
    resumed = CliRunner().invoke(app, ["train", "--resume", str(run.dir)])
    assert resumed.exit_code == 1
    assert resumed.exception.render() == (
        f"{run.dir}: nothing to resume: the run was stopped before its first checkpoint\n"
        f"  - start it again with the same recipe: {start_again}\n"
        f"  - (then delete {run.dir}, which holds no trained weights)")
    with pytest.raises(runs_module.TrainingError, match="stopped before its first checkpoint"):
        resume_point(run)
