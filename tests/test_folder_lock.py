"""One process per run folder and ablation folder (issue 22, items 1 and 2): the lock is taken atomically by exactly
one of many processes starting together, a second process is refused with who holds the folder, and the lock of a
process that died (kill -9) is taken over."""
from __future__ import annotations

import multiprocessing
import os
import sys
import time
from pathlib import Path

import pytest

from sslt_cli.folder_lock import FolderBusy, hold, read_holder

from holders import LOCK_ONLY, start_holder, stop

def _try_to_hold(folder: str, barrier, winners, refusals, tried) -> None:
    barrier.wait()
    try:
        with hold(folder, "run folder"):
            winners.put(os.getpid())
            # hold until every other starter has tried (however slowly a loaded machine schedules them): a second
            # winner then can only mean two holders at once, never one after the other
            deadline = time.monotonic() + 60
            while tried.value < barrier.parties - 1 and time.monotonic() < deadline:
                time.sleep(0.01)
    except FolderBusy as exc:
        refusals.put(exc.message)
    finally:
        with tried.get_lock():
            tried.value += 1


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_exactly_one_of_many_simultaneous_starts_holds_the_folder(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    starters = 20
    for trial in range(3):
        barrier, winners, refusals, tried = ctx.Barrier(starters), ctx.Queue(), ctx.Queue(), ctx.Value("i", 0)
        processes = [ctx.Process(target=_try_to_hold, args=(str(tmp_path), barrier, winners, refusals, tried))
                     for _ in range(starters)]
        for p in processes:
            p.start()
        for p in processes:
            p.join(60)
            assert p.exitcode == 0
        won = [winners.get(timeout=5) for _ in range(winners.qsize())] if not winners.empty() else []
        refused = [refusals.get(timeout=5) for _ in range(starters - len(won))]
        assert len(won) == 1, f"trial {trial}: {len(won)} processes held the folder at once"
        assert all(f"{tmp_path}: this run folder is in use by " in m for m in refused)
        assert not (tmp_path / ".lock").exists()  # released: the next start takes it


def test_a_second_holder_is_refused_with_who_holds_the_folder(tmp_path: Path) -> None:
    holder = start_holder(tmp_path, command="sslt train --resume runs/a")
    try:
        with pytest.raises(FolderBusy) as refused:
            with hold(tmp_path, "run folder"):
                pass
        record = read_holder(tmp_path)
        assert record is not None and record.pid == holder.pid
        assert refused.value.message == (f"{tmp_path}: this run folder is in use by pid {holder.pid} on host "
                                         f"{record.host} since {record.since} (sslt train --resume runs/a)")
    finally:
        stop(holder)


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    holder = start_holder(tmp_path)
    stop(holder)  # kill -9: no handler runs, its record stays in the lock file
    assert read_holder(tmp_path).pid == holder.pid
    with hold(tmp_path, "run folder"):
        assert read_holder(tmp_path).pid == os.getpid()
    assert not (tmp_path / ".lock").exists()


def test_a_holder_that_has_not_written_its_record_yet_still_holds(tmp_path: Path) -> None:
    holder = start_holder(tmp_path, LOCK_ONLY)
    try:
        with pytest.raises(FolderBusy, match="in use by another process that is starting"):
            with hold(tmp_path, "run folder"):
                pass
    finally:
        stop(holder)


def test_a_second_sslt_train_resume_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sslt_cli.cli import app
    from sslt_cli.config import load_recipe
    from sslt_cli.runs import Run

    run = Run.create(load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"), argv=[],
                     runs_dir=tmp_path / "runs")
    holder = start_holder(run.dir, command=f"sslt train --resume {run.dir}")
    try:
        result = CliRunner().invoke(app, ["train", "--resume", str(run.dir)])
    finally:
        stop(holder)
    assert result.exit_code == 1 and isinstance(result.exception, FolderBusy)
    assert result.exception.holder.pid == holder.pid
    assert f"this run folder is in use by pid {holder.pid} on host " in result.exception.message
    assert f"(sslt train --resume {run.dir})" in result.exception.message
