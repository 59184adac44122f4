"""Running an ablation: its folder's state file and lock, each cell's run (checked, created and tracked here: its MLflow
run is opened as a child of the ablation's parent run, with the cell's tags, and its sink handed to ``train`` and
``retrieve``), resume, and the summary files.

A cell's runs are recorded in ``ablation.json`` (``cells.<name>.runs``, oldest first, and ``run_dir``, the newest) the
moment they are created, so a re-run finds them there and resumes the newest; the results of the cells this process
runs come from what ``train`` and ``retrieve`` return. For cells an earlier process ran (a re-run that skips them,
``--report``) the same numbers are read back from their run folders by the code beside the one that wrote them
(``evaluate.saved_summaries``).
"""
from __future__ import annotations

import json
import shlex
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.markup import escape

from sslt_cli import interrupts
from sslt_cli.ablate import report
from sslt_cli.ablate.report import CellResult, RowSummary, describe, summarise, x100
from sslt_cli.ablate.spec import Ablation, Cell, expand_cells, resolve_seeds
from sslt_cli.config import flatten, parse_override, recipe_dict
from sslt_cli.errors import SsltError
from sslt_cli.folder_lock import LOCK, hold
from sslt_cli.runs import CONFIG, META, Run, atomic_write_text
from sslt_cli.tracking import (MetricsSink, Tracker, absolute_uri, open_run_tracking, recorded_run_id, start_tracking,
                               tracking_uri)

STATE = "ablation.json"
STATE_FORMAT = "sslt-ablation/1"
# set in a state once each cell's runs are recorded in it (cells.<name>.runs)
RUNS_RECORDED = "runs_recorded"
# the keys of a test record the ablation tabulates, and those of its centre-prior baseline (REFERENCE.md section 5)
TEST_KEYS = ("ciou", "auc", "mean_iou", "pointing", "n")
CENTRE_KEYS = ("baseline_centre/ciou", "baseline_centre/auc")


@dataclass
class AblationResult:
    """What :func:`run_ablation` did: every cell's state, the row summaries, the files written, the parent run."""

    ablation: Ablation
    cells: list[CellResult]
    rows: list[RowSummary]
    files: dict[str, Path]
    parent_run_id: str | None
    interrupted: bool = False

    @property
    def failed(self) -> list[CellResult]:
        """Cells whose last attempt failed (their errors are in ``error``)."""
        return [c for c in self.cells if c.status == "failed"]

    @property
    def finished(self) -> list[CellResult]:
        """Cells trained and evaluated (and retrieved, when asked)."""
        return [c for c in self.cells if c.status == "finished"]


# ------------------------------------------------------------------------------------------ state on disk

def _now() -> str:
    import datetime as _dt

    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def load_state(folder: Path) -> dict:
    """The folder's ``ablation.json`` (a new state when there is none), with every cell's runs recorded."""
    state = _read_state(folder)
    if not state.get(RUNS_RECORDED):
        _record_found_runs(state, folder)
    return state


def _read_state(folder: Path) -> dict:
    path = folder / STATE
    if not path.is_file():
        return {"format": STATE_FORMAT, "cells": {}}
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as exc:
        raise SsltError(f"{path}: unreadable ablation state ({exc})",
                        ["delete it to start the bookkeeping anew: finished run folders are found again by name"]) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise SsltError(f"{path}: not an sslt ablation state (expected format {STATE_FORMAT!r})",
                        ["delete it to start the bookkeeping anew: finished run folders are found again by name"])
    state.setdefault("cells", {})
    return state


def _save_state(folder: Path, state: dict) -> None:
    state["updated"] = _now()
    atomic_write_text(folder / STATE, json.dumps(state, indent=2, default=str) + "\n")


def _seed_numbers(seeds: Sequence[int]) -> str:
    return ", ".join(map(str, seeds))


def _seeds_to_run(ablation: Ablation, seeds: int | Sequence[int] | None, state: dict, console: Console) -> list[int]:
    """The seeds of this command (:func:`resolve_seeds` with the seeds recorded in the state), said on ``console``
    when they change the recorded ones, or when the recorded ones are not the file's."""
    recorded = state.get("seeds") or None
    chosen = resolve_seeds(ablation, seeds, recorded)
    where = ablation.folder / STATE
    if recorded and chosen != recorded:
        added = [s for s in chosen if s not in recorded]
        left_out = [s for s in recorded if s not in chosen]
        parts = [f"seeds {_seed_numbers(chosen)}: changed from {_seed_numbers(recorded)} recorded in {where}"]
        if added:
            parts.append(f"adds {_seed_numbers(added)}")
        if left_out:
            parts.append(f"leaves out {_seed_numbers(left_out)} (their runs stay in the folder, outside the summary)")
        console.print("; ".join(parts), highlight=False, markup=False)
    elif recorded and seeds is None and not ablation.seeds_from_command and recorded != list(ablation.seeds):
        console.print(f"seeds {_seed_numbers(recorded)}, as recorded in {where} (the file names "
                      f"{_seed_numbers(ablation.seeds)}); to change them, give --seeds N or seeds=[...]",
                      highlight=False, markup=False)
    return chosen


def _setup_text(base: str, overrides: Sequence[str] | None) -> str:
    """``base=<path> key=value ...`` as typed on the command line; no overrides part when they are unknown (None)."""
    if overrides is None:
        return f"base={base}"
    return f"base={base} " + (shlex.join(overrides) if overrides else "and no recipe overrides")


def _check_same_ablation(ablation: Ablation, state: dict) -> None:
    """Refuse to run or report ``ablation`` in a folder whose state records another base recipe or other command-line
    recipe overrides: the two would share the summary files and the MLflow parent run. A state written before the
    overrides were recorded (no ``command_overrides``) is checked on its base only."""
    recorded_base = state.get("base")
    if recorded_base is None:
        return
    recorded_overrides = state.get("command_overrides")

    def by_key(texts: Sequence[str]) -> dict[str, str]:
        return {parse_override(text)[0]: text for text in texts}  # the last of a key wins, as in the recipe

    same_base = Path(recorded_base).resolve() == ablation.base_path.resolve()
    same_overrides = recorded_overrides is None or by_key(recorded_overrides) == by_key(ablation.command_overrides)
    if same_base and same_overrides:
        return
    folder = ablation.folder
    raise SsltError(f"{folder}: this folder holds an ablation with another base recipe or other recipe overrides",
                    [f"recorded in {folder / STATE}: {_setup_text(recorded_base, recorded_overrides)}",
                     f"this command: {_setup_text(str(ablation.base_path), ablation.command_overrides)}",
                     "to continue or report on the recorded ablation, give its base= and overrides; to run this one "
                     f"beside it, give it its own folder with name=<other> ({folder.parent}/<other>)"])


# ------------------------------------------------------------------------------------------ finding a cell's runs

def _record_found_runs(state: dict, folder: Path) -> None:
    """Record in ``state`` the runs of every cell whose entry has no ``runs`` list, found by their recipe name (the
    cell's name) in the folder's run folders, oldest first. Once per state: only a state written before each cell's
    runs were recorded as they were created (same format, no ``runs_recorded``), or a deleted one, lacks them; the
    ablation's runs are found again so that its folder still resumes and reports."""
    found: dict[str, list[tuple[tuple[str, int], str]]] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not ((path / CONFIG).is_file() and (path / META).is_file()):
            continue
        try:
            name = json.loads((path / META).read_text()).get("recipe_name")
        except (json.JSONDecodeError, OSError):
            continue
        if isinstance(name, str) and path.name.startswith(f"{name}-"):
            # <cell>-<YYYYmmdd-HHMMSS>[-n]: the time, then the collision suffix Run.create adds
            rest = path.name[len(name) + 1:]
            stamp, suffix = rest[:15], rest[16:]
            found.setdefault(name, []).append(((stamp, int(suffix) if suffix.isdigit() else 0), path.name))
    for name, runs in found.items():
        entry = state["cells"].setdefault(name, {})
        if "runs" not in entry:
            entry["runs"] = [folder_name for _, folder_name in sorted(runs)]
    state[RUNS_RECORDED] = True


def cell_runs(folder: Path, entry: dict) -> list[Run]:
    """The cell's run folders that its state entry records and that still exist, oldest first."""
    return [Run(folder / name) for name in entry.get("runs", []) if (folder / name / META).is_file()]


def _record_run(entry: dict, run: Run) -> None:
    """Note ``run`` as the cell's newest run in its state entry."""
    entry["runs"] = [name for name in entry.get("runs", []) if name != run.dir.name] + [run.dir.name]
    entry["run_dir"] = run.dir.name


def _same_recipe(run: Run, cell: Cell) -> bool:
    try:
        return run.recipe() == cell.recipe
    except SsltError:
        return False


def pick_test_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The numbers the ablation tabulates from one test result (``ciou``, ``auc``, ``mean_iou``, ``n`` and the
    centre-prior baseline's ``baseline_centre/ciou`` and ``/auc``), as floats."""
    return {k: float(record[k]) for k in (*TEST_KEYS, *CENTRE_KEYS) if isinstance(record.get(k), (int, float))}


def read_cell_metrics(run: Run, cell: Cell, ablation: Ablation) -> dict[str, float]:
    """The result of a cell run by an earlier process: what its final evaluation recorded for the ablation's set and
    checkpoint under the cell's protocol, read back by the code beside the one that wrote it
    (:func:`~sslt_cli.evaluate.saved_summaries`), and its last retrieval record's numbers; empty when it has no such
    evaluation."""
    from sslt_cli.evaluate import saved_summaries

    summary = saved_summaries(run, cell.recipe.eval.protocol).get(ablation.evaluate_set, {}).get(ablation.checkpoint)
    if summary is None:
        return {}
    retrieval = next((r for r in reversed(run.metrics()) if r.get("kind") == "retrieve"), None)
    return (pick_test_metrics(summary) | _learning_numbers(run.meta())
            | (_retrieval_numbers(retrieval) if retrieval is not None else {}))


def _retrieval_numbers(flat: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in flat.items() if k.startswith("retrieve/") and isinstance(v, (int, float))}


def _has_retrieval(run: Run) -> bool:
    return any(r.get("kind") == "retrieve" for r in run.metrics())


def inspect_cell(cell: Cell, ablation: Ablation, state: dict) -> CellResult:
    """A cell's state from its newest run folder (recorded in the ablation state) and what running it next does."""
    entry = state.get("cells", {}).get(cell.name, {})
    runs = cell_runs(ablation.folder, entry)
    matching = [r for r in runs if _same_recipe(r, cell)]
    run = matching[-1] if matching else None
    if run is None:
        if runs:
            return CellResult(cell, "pending", None, {}, None, "train",
                              note=f"{runs[-1].dir.name} was made with another recipe; it is kept and the cell "
                                   "trains anew")
        if entry.get("status") == "failed":
            return CellResult(cell, "failed", None, {}, entry.get("error"), "train")
        return CellResult(cell, "pending", None, {}, None, "train")
    meta = run.meta()
    status = meta.get("status")
    failed_here = entry.get("status") == "failed" and entry.get("run_dir") == run.dir.name
    error = entry.get("error") if failed_here else None
    metrics = read_cell_metrics(run, cell, ablation)
    if status == "finished" and metrics:
        if ablation.retrieve and not _has_retrieval(run):
            return CellResult(cell, "failed" if failed_here else "pending", run, metrics, error, "retrieve")
        return CellResult(cell, "finished", run, metrics, None, "skip")
    interrupted = str(meta.get("error", "")).startswith("KeyboardInterrupt")
    if status == "failed" and not interrupted:
        return CellResult(cell, "failed", run, {}, error or meta.get("error"), "train")
    if status == "finished":
        error = error or (f"{run.dir}: no test record for set {ablation.evaluate_set!r}, checkpoint "
                          f"{ablation.checkpoint!r}, protocol {cell.recipe.eval.protocol!r} in metrics.jsonl")
    # created, running (its process was killed), interrupted, trained (stopped during the final evaluation)
    action = "resume" if run.latest_checkpoint() is not None else "train"
    return CellResult(cell, "failed" if error else "interrupted", run, {}, error, action)


# ------------------------------------------------------------------------------------------------ running

def _cell_tags(cell: Cell, ablation: Ablation) -> dict[str, str]:
    """The tags naming a cell on its MLflow run, set when the run is created (or reopened)."""
    return {"sslt.ablation": ablation.name, "sslt.cell": cell.name, "sslt.row": cell.row, "sslt.seed": str(cell.seed)}


def _retrieve(run: Run, cell: Cell, ablation: Ablation, sink: MetricsSink, console: Console) -> dict[str, float]:
    """Retrieve with the cell's run (its ablation checkpoint, the recipe's first test set, all classes) through the
    cell's sink and return its numbers; a signal stops it at once (phase ``retrieval``: a re-run retrieves again)."""
    from sslt_cli import retrieve as R
    from sslt_cli.distributed import pick_device
    from sslt_cli.progress import StepBars

    device = pick_device(cell.recipe.train.device)
    with interrupts.listening() as stops, stops.phase("retrieval"):
        model, clip_set, labels = R.retrieval_inputs(run.dir, which=ablation.checkpoint, device=device)
        with StepBars(console) as bars:
            report = R.retrieve(model, clip_set, labels, R.RetrieveOptions(device=str(device)), sink,
                                progress=bars.update, say=lambda line: console.print(line, highlight=False,
                                                                                      markup=False))
    return _retrieval_numbers(R.mlflow_metrics(report))


def _generate_data(cell: Cell, console: Console) -> None:
    """The cell's generated benchmark (``synthetic:`` in the ablation file), made once: a finished folder made with
    the same parameters is trusted as it is (``synthetic.generate``), so cells sharing knobs share it."""
    if cell.data is None:
        return
    from sslt_cli.data.synthetic import generate

    data = cell.data
    ready = (data.root / "benchmark.json").is_file()
    console.print(f"cell {cell.name}: data {data.root} ({data.knobs_text}){'' if ready else ', generating'}",
                  highlight=False, markup=False)
    generate(data.root, **data.sets, difficulty=data.difficulty, progress=not ready)


def _learning_numbers(meta: dict) -> dict[str, float]:
    """The learning check's verdict as a number the table averages (1: not learning), when the run made one."""
    check = meta.get("learning_check")
    return {"not_learning": float(not check["learning"])} if isinstance(check, dict) and "learning" in check else {}


def _cell_run(cell: Cell, plan: CellResult, ablation: Ablation, entry: dict, console: Console) -> Run:
    """The run folder the cell works in: the planned one to resume or retrieve with, else a new one, recorded in the
    state before any work starts so that a kill leaves it findable. The checks before a run
    (:func:`~sslt_cli.train.preflight`) come first for a cell that trains."""
    if plan.action != "retrieve":
        from sslt_cli.train import preflight

        _generate_data(cell, console)
        preflight(cell.recipe, retrieval=ablation.retrieve)
    if plan.action in ("resume", "retrieve"):
        assert plan.run is not None
        run = plan.run
    else:
        run = Run.create(cell.recipe, overrides=list(cell.overrides),
                         extra_meta={"recipe_path": str(ablation.base_path), "world_size": 1})
    _record_run(entry, run)
    return run


def _trained(cell: Cell, plan: CellResult, run: Run, ablation: Ablation, sink: MetricsSink,
             console: Console) -> CellResult:
    """Train or resume the cell into ``run`` as planned (a cell to retrieve with was trained by an earlier process);
    its result from what ``train`` returns, interrupted when training stopped with a checkpoint."""
    from sslt_cli import train as train_module

    if plan.action == "retrieve":
        return CellResult(cell, "finished", run, dict(plan.metrics), None, "skip")
    resume = plan.action == "resume"
    # each run's own result tables stay in its folder; the ablation prints one line per cell and its own table
    result = train_module.train(run.recipe() if resume else cell.recipe, run, sink=sink, resume=resume,
                                console=console, out=Console(quiet=True))
    if result.status == "interrupted":
        return _interrupted(cell, run, None)
    record = (result.test or {}).get(ablation.evaluate_set, {}).get(ablation.checkpoint)
    if not record:
        raise SsltError(f"{run.dir}: training finished but metrics.jsonl has no test record for set "
                        f"{ablation.evaluate_set!r}, checkpoint {ablation.checkpoint!r}")
    return CellResult(cell, "finished", run, pick_test_metrics(record) | _learning_numbers(run.meta()), None, "skip")


def _interrupted(cell: Cell, run: Run | None, trained: CellResult | None) -> CellResult:
    """The result of a cell stopped in training (resumed from its last checkpoint, if any) or, when ``trained``
    finished, in its retrieval (which a re-run does again)."""
    if trained is not None and trained.status == "finished":
        return CellResult(cell, "interrupted", run, trained.metrics, None, "retrieve")
    resumable = run is not None and run.latest_checkpoint() is not None
    return CellResult(cell, "interrupted", run, {}, None, "resume" if resumable else "train")


def _run_cell(cell: Cell, plan: CellResult, ablation: Ablation, state: dict, parent_id: str | None,
              console: Console, done: dict[str, CellResult]) -> str:
    """Run one cell (train or resume, then retrieve if asked) and put its result in ``done``; returns its status
    (finished | failed | interrupted).

    The ablation owns the cell's run: it creates the folder, opens its MLflow run (a child of ``parent_id`` with the
    cell's tags from its creation), hands the sink to training and retrieval and closes it with the cell's status.
    Any exception but KeyboardInterrupt fails this cell only: it is recorded (with the traceback for a bug) and the
    ablation goes on. KeyboardInterrupt leaves the cell interrupted and is raised again.
    """
    entry = state["cells"].setdefault(cell.name, {})
    entry.update(row=cell.row, seed=cell.seed, status="running", error=None, traceback=None, started=_now(),
                 attempts=int(entry.get("attempts", 0)) + 1, interrupted_in=None)
    run = trained = result = sink = None
    held = ExitStack()
    try:
        run = _cell_run(cell, plan, ablation, entry, console)
        held.enter_context(hold(run.dir, "run folder"))  # no `sslt train --resume` of the cell's run meanwhile
        _save_state(ablation.folder, state)
        sink = open_run_tracking(run, cell.recipe, parent_run_id=parent_id, tags=_cell_tags(cell, ablation),
                                 warn=lambda m: (console.print(f"warning: {escape(m)}"), run.log(f"warning: {m}")))
        result = trained = _trained(cell, plan, run, ablation, sink, console)
        if trained.status == "finished":
            if ablation.retrieve:
                result = replace(trained, metrics=trained.metrics | _retrieve(run, cell, ablation, sink, console))
            _say_finished(result, ablation, console)
    except Exception as exc:  # one cell's failure, whatever it is, must not stop the others
        result = _failed(cell, run, exc, trained, entry, console, ablation.folder)
    except BaseException as exc:  # KeyboardInterrupt (or SystemExit) in training or retrieval: recorded, raised on
        result = _interrupted(cell, run, trained)
        entry["interrupted_in"] = getattr(exc, "phase", None)
        raise
    finally:
        assert result is not None
        done[cell.name] = result
        if result.status == "interrupted" and run is not None and not entry.get("interrupted_in"):
            entry["interrupted_in"] = run.meta().get("interrupted_in")  # where training stopped
        entry.update(status=result.status, updated=_now())
        _save_state(ablation.folder, state)
        if sink is not None:
            sink.end({"finished": "FINISHED", "failed": "FAILED"}.get(result.status, "KILLED"))
        held.close()
    return result.status


def _say_finished(result: CellResult, ablation: Ablation, console: Console) -> None:
    metrics = result.metrics
    shown = ", ".join(f"{header} {x100(metrics[key])}" for header, key in ablation.metrics if key in metrics)
    console.print(f"cell {result.cell.name} finished: {shown} ({ablation.evaluate_set}, {ablation.checkpoint} "
                  f"checkpoint, N={int(metrics.get('n', 0))}); run {result.run.dir if result.run else ''}",
                  highlight=False, markup=False)


def _failed(cell: Cell, run: Run | None, exc: Exception, trained: CellResult | None, entry: dict, console: Console,
            folder: Path) -> CellResult:
    """The failed cell's result, its error recorded in the state entry and printed. ``trained``: the cell's trained
    result when only its retrieval failed (a re-run then only retrieves again)."""
    error = exc.render() if isinstance(exc, SsltError) else f"{type(exc).__name__}: {exc}"
    entry.update(error=error, traceback=None if isinstance(exc, SsltError) else traceback.format_exc()[-6000:])
    console.print(f"[bold red]cell {cell.name} failed:[/] {escape(error)}", highlight=False)
    if not isinstance(exc, SsltError):
        console.print(f"(traceback in {folder / STATE})", highlight=False)
    if trained is not None and trained.status == "finished":
        return CellResult(cell, "failed", run, trained.metrics, error, "retrieve")
    return CellResult(cell, "failed", run, {}, error, "train")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _run_cells(plans: list[CellResult], ablation: Ablation, state: dict, parent_id: str | None, console: Console,
               done: dict[str, CellResult]) -> bool:
    """Run every planned cell that is not finished, putting each result in ``done``; returns True when a cell was
    interrupted (the rest is left for later)."""
    todo = [p for p in plans if p.action != "skip"]
    console.print(f"ablation {ablation.name}: {len(plans)} cells, {len(plans) - len(todo)} finished, {len(todo)} to "
                  f"run; folder {ablation.folder}", highlight=False)
    durations: list[float] = []
    for k, plan in enumerate(todo, 1):
        eta = ""
        if durations:
            mean = sum(durations) / len(durations)
            eta = f"; {_duration(mean)} per cell so far, about {_duration(mean * (len(todo) - k + 1))} left"
        note = f"; {plan.note}" if plan.note else ""
        console.print(f"[bold]cell {k}/{len(todo)} {escape(plan.cell.name)}[/]: {escape(describe(plan))}"
                      f"{escape(note)}{eta}", highlight=False)
        started = time.monotonic()
        outcome = _run_cell(plan.cell, plan, ablation, state, parent_id, console, done)
        durations.append(time.monotonic() - started)
        if outcome == "interrupted":
            console.print(f"interrupted in cell {plan.cell.name}; run the same command again to continue from its "
                          "last checkpoint", highlight=False)
            return True
    return False


def _parent_tracker(ablation: Ablation, seeds: list[int], state: dict,
                    console: Console) -> tuple[Tracker, str | None]:
    """The ablation's MLflow parent run: reopened when the state names one in the same store that ran the same
    ``seeds``, else started. MLflow refuses to change a run's parameter, so other seeds get a new parent run whose
    ``ablation.seeds`` names them; returns the tracker and the id of the parent run it replaces so (else None)."""
    tracking = ablation.base.tracking
    warn = (lambda m: console.print(f"warning: {escape(m)}"))
    tags = {"sslt.ablation": ablation.name, "sslt.ablation_dir": str(ablation.folder.resolve()),
            "sslt.ablation_file": str(ablation.path), "sslt.base": str(ablation.base_path)}
    recorded_in = state.get("mlflow_uri")
    same_store = recorded_in is not None and absolute_uri(str(recorded_in)) == absolute_uri(tracking_uri())
    previous = state.get("parent_run_id") if same_store else None
    same_seeds = state.get("seeds") == seeds
    if previous and same_seeds:
        tracker = start_tracking(f"ablation-{ablation.name}", enabled=tracking.enabled,
                                 experiment=tracking.experiment, tags=tags, run_id=previous, warn=warn)
        if tracker.run_id is not None and tracker.enabled:
            return tracker, None
        # the parent run is gone from the store: start another
    params = {"ablation.file": str(ablation.path), "ablation.base": str(ablation.base_path),
              "ablation.mode": ablation.mode, "ablation.rows": ",".join(r.name for r in ablation.rows),
              "ablation.seeds": ",".join(map(str, seeds)),
              "ablation.overrides": " ".join(ablation.file_overrides + ablation.command_overrides),
              "ablation.evaluate": f"{ablation.evaluate_set}/{ablation.checkpoint}",
              "ablation.retrieve": ablation.retrieve,
              **{f"base.{k}": v for k, v in flatten(recipe_dict(ablation.base)).items()}}
    tracker = start_tracking(f"ablation-{ablation.name}", enabled=tracking.enabled, experiment=tracking.experiment,
                             params=params, tags=tags, warn=warn)
    return tracker, previous if previous and not same_seeds and tracker.run_id else None


def _adopt(plans: list[CellResult], tracker: Tracker, replaced: str, console: Console) -> None:
    """Make the runs that earlier processes made under the ``replaced`` parent run children of the new one (the
    finished cells', and those a re-run resumes or retrieves with), tagged from the parent's side: nothing reopens
    them."""
    console.print(f"MLflow parent run {tracker.run_id} replaces {replaced} (other seeds; MLflow keeps a run's "
                  "parameters); the finished cells' runs are now its children", highlight=False, markup=False)
    for plan in plans:
        child = recorded_run_id(plan.run.meta(), tracker.uri) if plan.run is not None else None
        if child and plan.action in ("skip", "resume", "retrieve"):
            tracker.tag_run(child, {"mlflow.parentRunId": tracker.run_id})


def _dry_run(ablation: Ablation, seeds: int | Sequence[int] | None, console: Console,
             out: Console) -> AblationResult:
    """Print each cell and what running the ablation would do with it; touch nothing."""
    state = load_state(ablation.folder)
    _check_same_ablation(ablation, state)
    cells = expand_cells(ablation, _seeds_to_run(ablation, seeds, state, console))
    results = [inspect_cell(c, ablation, state) for c in cells]
    out.print(report.plan_table(ablation, results))
    data = ["data.root=<generated data>"] if ablation.synthetic is not None else []
    command = " ".join([str(ablation.base_path), *ablation.file_overrides, *data, "<row overrides>",
                        *ablation.command_overrides, "name=<row>-seed<k>", "seed=<k>", f"runs_dir={ablation.folder}"])
    console.print(f"ablation folder: {ablation.folder}\neach cell is: sslt train {command}", highlight=False,
                  markup=False)
    return AblationResult(ablation, results, summarise(ablation, results), {}, state.get("parent_run_id"))


def _record_setup(ablation: Ablation, state: dict, seeds: list[int], tracker: Tracker) -> None:
    state.update(file=str(ablation.path), name=ablation.name, base=str(ablation.base_path),
                 overrides=list(ablation.file_overrides + ablation.command_overrides),
                 command_overrides=list(ablation.command_overrides), seeds=seeds,
                 parent_run_id=tracker.run_id, mlflow_uri=tracker.uri if tracker.run_id else None)
    _save_state(ablation.folder, state)


def run_ablation(ablation: Ablation, *, seeds: int | Sequence[int] | None = None, dry_run: bool = False,
                 report_only: bool = False, console: Console | None = None,
                 out: Console | None = None) -> AblationResult:
    """``sslt ablate``: run every cell not yet finished, then write and print the summary.

    ``dry_run``: print each cell and what would happen to it (train, resume, retrieve, skip); touch nothing.
    ``report_only``: rebuild the table, ``summary.csv``, ``summary.md``, ``cells.csv`` and ``summary.png`` from the
    finished runs, without training. Progress and per-run output go to ``console`` (stderr); the ablation's table to
    ``out`` (stdout). A failed cell does not raise: see ``AblationResult.failed``.

    ``seeds`` (see :func:`resolve_seeds`): without them the seeds recorded in the folder's ``ablation.json`` run (or
    are reported), else the file's; given, they become the recorded ones. Raises SsltError when the folder records
    another base recipe or other command-line recipe overrides.
    """
    console = console or Console(stderr=True)
    out = out or Console()
    if dry_run:
        return _dry_run(ablation, seeds, console, out)
    if report_only and not (ablation.folder / STATE).is_file():
        raise SsltError(f"{ablation.folder}: nothing to report yet (no {STATE}); run the ablation without --report "
                        "first")
    ablation.folder.mkdir(parents=True, exist_ok=True)
    with hold(ablation.folder, "ablation folder"):
        state = load_state(ablation.folder)
        _check_same_ablation(ablation, state)
        run_seeds = _seeds_to_run(ablation, seeds, state, console)
        cells = expand_cells(ablation, run_seeds)
        tracker, replaced = _parent_tracker(ablation, run_seeds, state, console)
        _record_setup(ablation, state, run_seeds, tracker)
        plans = [inspect_cell(c, ablation, state) for c in cells]
        if replaced:
            _adopt(plans, tracker, replaced, console)
        done: dict[str, CellResult] = {}
        interrupted = False
        try:
            if not report_only:
                interrupted = _run_cells(plans, ablation, state, tracker.run_id, console, done)
        except KeyboardInterrupt:
            results = [done.get(p.cell.name, p) for p in plans]
            _log_parent(tracker, ablation, results, write_report(ablation, results, out=None), "KILLED")
            raise
        results = [done.get(p.cell.name, p) for p in plans]
        files = write_report(ablation, results, out=out)
        failed = any(r.status == "failed" for r in results)
        _log_parent(tracker, ablation, results, files, "KILLED" if interrupted else "FAILED" if failed else "FINISHED")
    return AblationResult(ablation, results, summarise(ablation, results), files, tracker.run_id, interrupted)


def _log_parent(tracker: Tracker, ablation: Ablation, results: list[CellResult], files: dict[str, Path],
                status: str) -> None:
    """Per-row means and stds, the summary files and the state on the parent run, which is then closed."""
    summaries = summarise(ablation, results)
    metrics: dict[str, float] = {}
    for s in summaries:
        for _, key in ablation.metrics:
            mean, std = s.mean(key), s.std(key)
            if mean is not None:
                metrics[f"{s.row.name}/{key}"] = mean
            if std is not None:
                metrics[f"{s.row.name}/{key}_std"] = std
        metrics[f"{s.row.name}/seeds_done"] = float(s.n_done)
    tracker.log_metrics(metrics, step=sum(s.n_done for s in summaries))
    for path in files.values():
        tracker.log_artifacts(path)
    tracker.log_artifacts(ablation.folder / STATE)
    tracker.end(status)


def write_report(ablation: Ablation, results: list[CellResult], *, out: Console | None = None) -> dict[str, Path]:
    """Write ``summary.csv``, ``summary.md``, ``cells.csv`` and ``summary.png`` (built by :mod:`report`) into the
    ablation folder and print the table, the baseline, the paper's orderings and the failed cells on ``out`` (nothing
    printed when ``out`` is None). Returns the files by kind: ``csv``, ``md``, ``cells``, ``png``."""
    from sslt_cli.data.manifest import atomic_write_bytes

    summaries = summarise(ablation, results)
    folder = ablation.folder
    files = {"csv": folder / "summary.csv", "md": folder / "summary.md", "cells": folder / "cells.csv",
             "png": folder / "summary.png"}
    atomic_write_text(files["csv"], report.summary_csv(ablation, summaries))
    atomic_write_text(files["md"], report.markdown(ablation, summaries, results))
    atomic_write_text(files["cells"], report.cells_csv(ablation, results))
    atomic_write_bytes(files["png"], report.chart_png(ablation, summaries, results))
    if out is not None:
        out.print(report.summary_table(ablation, summaries))
        for text in report.report_lines(ablation, results):
            out.print(text, highlight=False, markup=False)
        out.print(f"summary: {files['md']}, {files['csv']}, {files['png']}", highlight=False, markup=False)
    return files
