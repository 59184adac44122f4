"""What the commands do around the library functions that record numbers: the caller opens the run folder's MLflow
run, hands the sink down and closes the run with the outcome (as ``sslt train`` and ``sslt ablate`` do)."""
from __future__ import annotations

from sslt_cli.tracking import run_tracking
from sslt_cli.train import TrainResult, train


def train_in(recipe, run, *, parent_run_id: str | None = None, tags: dict | None = None, main: bool = True,
             **kwargs) -> TrainResult:
    """``train(recipe, run, sink=...)`` inside the run's MLflow run (a child of ``parent_run_id`` from its creation),
    closed FINISHED or KILLED as the training ended (FAILED when it raised)."""
    with run_tracking(run, recipe, main=main, parent_run_id=parent_run_id, tags=tags) as sink:
        result = train(recipe, run, sink=sink, **kwargs)
        sink.end("FINISHED" if result.status == "finished" else "KILLED")
    return result
