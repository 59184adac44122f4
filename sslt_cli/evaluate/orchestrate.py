"""The one evaluation orchestrator: what is scored (checkpoints, loaded models, precomputed maps, or only the baselines)
x test sets x :class:`~sslt_cli.evaluate.options.EvalOptions` -> one typed :class:`Evaluation`, each result written
to its folder and through the one :class:`~sslt_cli.tracking.MetricsSink`.

Training's end, ``sslt eval`` and ``sslt ablate`` (through training) call :func:`run_evaluation`; validation calls
:func:`evaluate_model`, the evaluation of one model on one set that the orchestrator runs for each pair.

What the sink records, per set and checkpoint (:meth:`SetEvaluation.record`): a ``metrics.jsonl`` record of kind
``test`` (training's final evaluation) or ``eval`` (``sslt eval``) with ``set``, ``checkpoint``, ``protocol``,
``folder``, N and the numbers a run keeps (:data:`SUMMARY_KEYS`: the method's cIoU, AUC, mean IoU, pointing and the
centre-prior baseline's cIoU and AUC), and every finite number under one MLflow prefix, ``eval/<set>-<checkpoint>-
<protocol>/`` (:func:`runs.eval_name`, also the folder's name). :func:`saved_summaries` reads those records back.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Mapping, Sequence

import numpy as np

from sslt_cli.checkpoint import LoadedModel
from sslt_cli.data.manifest import Clip
from sslt_cli.errors import DataError
from sslt_cli.evaluate.maps import BatchHook, map_value_range, predict_maps, save_maps
from sslt_cli.evaluate.negatives import (parse_negative_maps, per_model_threshold, predict_with_negatives,
                                         score_negatives)
from sslt_cli.evaluate.options import EvalOptions
from sslt_cli.evaluate.outputs import (_metric_name, eval_folder, mlflow_metrics, negatives_table, result_table,
                                       write_outputs)
from sslt_cli.evaluate.scoring import (EvalResult, Exclusion, score_extended, score_extended_maps,
                                       score_interactive, score_maps, test_summary)
from sslt_cli.evaluate.sets import TestSet, silent_pair_key
from sslt_cli.metrics import Protocol
from sslt_cli.runs import EVAL, eval_name

if TYPE_CHECKING:
    from rich.console import Console

    from sslt_cli.ogl import ObjectGuidance

ProgressFactory = Callable[[str, int], ContextManager[Callable[[int], None]]]
"""(description, total clips) -> a context whose value advances a progress display by n clips."""
PRECOMPUTED_RANGE = (-1.0, 1.0)  # precomputed maps are read as cosine maps: their common scale is (cos + 1) / 2
SUMMARY_KEYS = ("ciou", "auc", "mean_iou", "pointing", "n", "baseline_centre/ciou", "baseline_centre/auc")


# ------------------------------------------------------------------------------------------ one model on one set

def evaluate_model(loaded: LoadedModel, test: TestSet, options: EvalOptions, *, out_dir: Path | None = None,
                   progress: Callable[[int], None] | None = None, on_batch: BatchHook | None = None) -> EvalResult:
    """The one evaluation of a model on a set: ``loaded``'s maps for the set's clips (its recipe's front end), scored
    under ``options.protocol_for(loaded.recipe.eval)`` with baselines (``options.baselines``), outputs written to
    ``out_dir`` when given (with ``maps.npz`` when ``options.save_maps``).

    ``options.extended`` adds SLAVC's extended evaluation (a pair whose frame or audio is unavailable is left out and
    listed); with object guidance on (:meth:`EvalOptions.guidance_for`) the scored maps are EZ-VSL's combination
    (:mod:`sslt_cli.ogl`) and the result says so. ``progress`` is called with the clip count of each predicted batch,
    the non-sounding pairs' batches included; ``on_batch`` as in :func:`~sslt_cli.evaluate.maps.maps_from_batches`.
    """
    proto = options.protocol_for(loaded.recipe.eval)
    negatives = options.negatives
    if negatives is not None and options.guidance_for(loaded.recipe.eval) is not None:
        raise DataError("negative audio is scored on the raw audio-visual maps, and object-guided localisation "
                        "mixes in a map of the image alone",
                        ["drop --ogl-weights (or the recipe's eval.ogl_weights) to evaluate with --negatives"])
    ogl = _object_guidance(options, loaded, proto)
    clips = [test.clips[i] for i in test.ids if i in test.clips and i in test.annotations]
    if negatives is not None:
        maps, skipped, negative_maps = predict_with_negatives(
            loaded, clips, proto, options, negatives, set_name=test.name, scenes=test.scenes, progress=progress,
            on_batch=on_batch)
    else:
        maps, skipped = predict_maps(loaded, clips, proto, device=options.device, batch_size=options.batch_size,
                                     num_workers=options.num_workers, progress=progress, on_batch=on_batch, ogl=ogl)
    unavailable = dict(test.unavailable)
    unavailable.update({cid: f"decode error: {reason}" for cid, reason in skipped})
    result = score_maps(maps, test.annotations, proto, test.ids, unavailable=unavailable,
                        annotation_problems=test.annotation_problems, baselines=options.baselines, name=test.name,
                        notes=[*test.notes, *loaded.notes], device=options.device)
    if ogl is not None:
        result.notes = [*result.notes, ogl.note()]
        result.object_guidance = {"alpha": ogl.alpha, "weights": ogl.weights}
    if options.extended is not None:
        result.extended = _extended_of_model(loaded, maps, test, proto, options, ogl, progress, result.notes)
    if test.images:
        result.interactive = score_interactive(maps, result.rows, test.annotations, test.images, proto)
    if negatives is not None:
        per_model = negatives.per_model or _model_threshold(loaded, negatives, proto, options)
        result.negatives = score_negatives(maps, negative_maps, result.rows, test.annotations, proto,
                                           map_value_range(loaded), negatives, per_model)
    if out_dir is not None:
        write_outputs(result, out_dir, maps=maps, frames=test.frames, annotations=test.annotations,
                      defects=test.defects)
        if options.save_maps:
            save_maps(maps, out_dir / "maps.npz")
    return result


def _object_guidance(options: EvalOptions, loaded: LoadedModel, proto: Protocol) -> "ObjectGuidance | None":
    setting = options.guidance_for(loaded.recipe.eval)
    if setting is None:
        return None
    from sslt_cli.ogl import ObjectGuidance

    return ObjectGuidance.load(setting.weights, setting.alpha, proto, options.device)


def _extended_of_model(loaded: LoadedModel, maps: Mapping[str, np.ndarray], test: TestSet, proto: Protocol,
                       options: EvalOptions, ogl: "ObjectGuidance | None", progress: Callable[[int], None] | None,
                       notes: list[str]):
    """SLAVC's extended evaluation of a model: the maps of the non-sounding pairs (frames and audio from
    ``options.extended.media``, else the test set), scored with the sounding ``maps``; pairs left out go to notes."""
    extended = options.extended
    media = extended.media or test
    pairs: list[tuple[str, Clip, Clip]] = []
    dropped: list[Exclusion] = []
    for video, audio in extended.pairs:
        key = silent_pair_key(video, audio)
        frame_clip, audio_clip = media.clips.get(video), media.clips.get(audio)
        if frame_clip is not None and audio_clip is not None:
            pairs.append((key, frame_clip, audio_clip))
            continue
        missing = [f"{column} {cid}: {media.unavailable.get(cid, 'not among its usable clips')}"
                   for column, cid, clip in (("video", video, frame_clip), ("audio", audio, audio_clip))
                   if clip is None]
        dropped.append(Exclusion(key, "no frame/audio", f"unavailable in {media.name}: {'; '.join(missing)}"))
    silent_maps, silent_skipped = predict_maps(loaded, [], proto, device=options.device,
                                               batch_size=options.batch_size, num_workers=options.num_workers,
                                               pairs=pairs, progress=progress, ogl=ogl)
    dropped += [Exclusion(key, "no frame/audio", f"decode error: {reason}") for key, reason in silent_skipped]
    if dropped:
        notes.append(f"extended evaluation: {len(dropped)} of {len(extended.pairs)} non-sounding pairs have no usable "
                     f"frame/audio in {media.name} and were left out (listed in excluded.csv)")
    value_range = map_value_range(loaded)
    # SLAVC's evaluator on the family's own maps: its fixed range; the slavc_rel / slavc_abs preset when chosen
    extended_proto = proto.name if proto.name in ("slavc_rel", "slavc_abs") else (
        "slavc" if tuple(value_range) == (-1.0, 1.0) else "slavc_rel")
    return score_extended(maps, silent_maps, test.annotations, protocol=extended_proto, value_range=value_range,
                          dropped=dropped)


def score_precomputed(maps: Mapping[str, np.ndarray] | None, test: TestSet, proto: Protocol, options: EvalOptions, *,
                      out_dir: Path | None = None, progress: Callable[[int], None] | None = None) -> EvalResult:
    """Precomputed ``maps`` (None: only the baselines) on a set, with ``options.extended`` from the pairs' own maps;
    outputs written to ``out_dir``. Maps and baselines need no frame or audio: the boxes decide what is scored."""
    result = score_maps(maps, test.annotations, proto, test.ids, annotation_problems=test.annotation_problems,
                        name=test.name, notes=test.notes, device=options.device, progress=progress)
    extended = options.extended
    if extended is not None and maps is not None:
        result.extended, notes = score_extended_maps(maps, extended.maps or {}, extended.pairs, test.ids,
                                                     test.annotations, extended.maps_source)
        result.notes += notes
    if test.images and maps is not None:
        result.interactive = score_interactive(maps, result.rows, test.annotations, test.images, proto)
    negatives = options.negatives
    if negatives is not None and maps is not None:
        if negatives.maps is None:
            raise DataError("--negatives with --maps needs the negative maps too: give --negative-maps FILE_OR_DIR, "
                            "maps keyed <clip id>@<kind>@<draw> (e.g. clip1@silence@0, clip1@noise@0)")
        result.negatives = score_negatives(maps, parse_negative_maps(negatives.maps, negatives.maps_source),
                                           result.rows, test.annotations, proto, PRECOMPUTED_RANGE, negatives)
    if out_dir is not None:
        write_outputs(result, out_dir, maps=maps, frames=test.frames, annotations=test.annotations,
                      defects=test.defects)
    return result


# ------------------------------------------------------------------------------------------------- the orchestrator

@dataclass(frozen=True)
class Source:
    """What an evaluation scores, under ``label`` (``best``, ``last``, a checkpoint's stem, ``maps``,
    ``baselines``): a checkpoint file (loaded when the evaluation starts, with ``recipe`` when given, else its own),
    a model already loaded, precomputed maps, or nothing (only the baselines).

    ``run_dir``: the run folder a checkpoint belongs to; two checkpoints of one run at the same step hold the same
    weights (the best checkpoint of the last validation), so the second one's results are copied, not recomputed.
    ``family`` / ``branch`` / ``front_end``: a checkpoint file's model family (None: recognised from its keys),
    SLAVC's branch and another evaluator's front end (:func:`sslt_cli.families.load_released`).
    """

    label: str
    checkpoint: Path | None = None
    recipe: Any = None
    run_dir: Path | None = None
    loaded: LoadedModel | None = None
    maps: Mapping[str, np.ndarray] | None = None
    maps_path: Path | None = None
    family: str | None = None
    branch: str | None = None
    front_end: str | None = None

    @classmethod
    def checkpoint_file(cls, label: str, path: Path, recipe: Any = None, run_dir: Path | None = None, *,
                        family: str | None = None, branch: str | None = None,
                        front_end: str | None = None) -> "Source":
        return cls(label, checkpoint=Path(path), recipe=recipe, run_dir=run_dir, family=family, branch=branch,
                   front_end=front_end)

    @classmethod
    def model(cls, label: str, loaded: LoadedModel, run_dir: Path | None = None) -> "Source":
        return cls(label, loaded=loaded, run_dir=run_dir)

    @classmethod
    def precomputed(cls, maps: Mapping[str, np.ndarray], path: Path) -> "Source":
        return cls("maps", maps=maps, maps_path=Path(path))

    @classmethod
    def baselines(cls) -> "Source":
        return cls("baselines")

    @property
    def scores_a_model(self) -> bool:
        return self.checkpoint is not None or self.loaded is not None


@dataclass(frozen=True)
class SetEvaluation:
    """One set x one source: its result (numbers, N and its accounting, baselines, published rows, extended), where
    its outputs are, and, for a checkpoint with the same weights as one evaluated before, that one's label."""

    set_name: str
    checkpoint: str
    step: int | None
    described: str
    result: EvalResult
    folder: Path | None
    same_as: str | None = None

    @property
    def protocol(self) -> str:
        return self.result.protocol.name

    @property
    def name(self) -> str:
        """``<set>-<checkpoint>-<protocol>``: the folder name and MLflow prefix (``eval/<name>/...``)."""
        return eval_name(self.set_name, self.checkpoint, self.protocol)

    def summary(self) -> dict[str, float]:
        """What a run keeps of it (:data:`SUMMARY_KEYS`), as :func:`~sslt_cli.evaluate.scoring.test_summary`."""
        return test_summary(self.result)

    def record(self) -> tuple[dict[str, Any], dict[str, float]]:
        """(fields, numbers) of its ``metrics.jsonl`` record; :func:`saved_summaries` reads them back. The numbers
        are every one MLflow gets (:func:`mlflow_metrics` under ``eval/<name>/``, named without that prefix: the
        baselines, the oracle, N requested, the extended evaluation), so no number lives only in MLflow and
        ``sslt sync`` sends them all from the file."""
        fields = {"set": self.set_name, "checkpoint": self.checkpoint, "protocol": self.protocol,
                  "folder": str(self.folder.resolve()) if self.folder is not None else None}
        prefix = _metric_name(f"{EVAL}/{self.name}")
        numbers = {name[len(prefix) + 1:]: value for name, value in self.mlflow_numbers().items()}
        numbers.update(self.summary())
        if self.result.negatives is not None:
            numbers.update(self.result.negatives.headline())
        return fields, numbers

    def mlflow_numbers(self) -> dict[str, float]:
        """Its numbers as MLflow names them: ``eval/<name>/<metric>``."""
        return mlflow_metrics(self.result, f"{EVAL}/{self.name}")


@dataclass(frozen=True)
class Evaluation:
    """Everything :func:`run_evaluation` produced, set-major in the order the sets and sources were given."""

    items: tuple[SetEvaluation, ...]

    def get(self, set_name: str, checkpoint: str) -> SetEvaluation | None:
        return next((i for i in self.items if (i.set_name, i.checkpoint) == (set_name, checkpoint)), None)

    def summaries(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{set: {checkpoint: summary}}``, as :class:`~sslt_cli.train.TrainResult` hands it back."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for item in self.items:
            out.setdefault(item.set_name, {})[item.checkpoint] = item.summary()
        return out


def run_evaluation(sources: Sequence[Source], sets: Sequence[tuple[str, TestSet]], options: EvalOptions, sink: Any,
                   *, out: Path | None, kind: str = "test", exact_folder: bool = False,
                   progress: ProgressFactory | None = None) -> Evaluation:
    """Evaluate every source on every set (``[(name, set)]``, the name the recipe gives it, else its own) under
    ``options``; each result's outputs go to ``out/<set>-<checkpoint>-<protocol>`` (:func:`eval_folder`; with
    ``exact_folder``, to ``out`` itself: one set and one source only; None: no outputs) and through ``sink``
    (a ``kind`` record, ``test`` or ``eval``, and its MLflow numbers; see the module notes).

    Checkpoint files are loaded once, on ``options.device``. ``progress(description, total)`` draws each
    evaluation's progress (the caller's display). Returns the :class:`Evaluation`.
    """
    if exact_folder and (len(sources) != 1 or len(sets) != 1):
        raise DataError(f"--out names the folder of one evaluation; this one has {len(sets)} test sets x "
                        f"{len(sources)} sources, which would overwrite each other there",
                        ["give one test set, or leave --out out (each result gets eval/<set>-<what>-<protocol>)"])
    models = {source.label: _loaded(source, options) for source in sources}
    chosen = {label: _with_model_threshold(options, loaded) for label, loaded in models.items()}
    items: list[SetEvaluation] = []
    for set_name, test in sets:
        done: dict[tuple[Path, int], SetEvaluation] = {}
        for source in sources:
            item = _evaluate_source(source, models[source.label], set_name, test, chosen[source.label], out,
                                    exact_folder, progress or _no_progress, done)
            log_evaluation(item, sink, kind)
            items.append(item)
    return Evaluation(tuple(items))


def _model_threshold(loaded: LoadedModel, negatives: Any, proto: Protocol, options: EvalOptions) -> dict | None:
    """The per-model threshold of ``loaded`` on the negatives' validation set (None without one)."""
    if negatives.validation is None:
        return None
    return per_model_threshold(loaded, negatives.validation, proto, options, negatives, negatives.validation.scenes)


def _with_model_threshold(options: EvalOptions, loaded: LoadedModel | None) -> EvalOptions:
    """``options`` with the model's per-model threshold chosen once (not once per test set)."""
    negatives = options.negatives
    if loaded is None or negatives is None or negatives.validation is None or negatives.per_model is not None:
        return options
    threshold = _model_threshold(loaded, negatives, options.protocol_for(loaded.recipe.eval), options)
    return dataclasses.replace(options, negatives=dataclasses.replace(negatives, per_model=threshold))


@contextlib.contextmanager
def _no_progress(description: str, total: int) -> Iterator[None]:
    yield None


def _loaded(source: Source, options: EvalOptions) -> LoadedModel | None:
    if source.checkpoint is not None:
        from sslt_cli.families import load_released

        return load_released(source.checkpoint, source.family, recipe=source.recipe, branch=source.branch,
                             device=options.device, front_end=source.front_end)
    return source.loaded


def _evaluate_source(source: Source, loaded: LoadedModel | None, set_name: str, test: TestSet, options: EvalOptions,
                     out: Path | None, exact_folder: bool, progress: ProgressFactory,
                     done: dict[tuple[Path, int], SetEvaluation]) -> SetEvaluation:
    """One source on one set; a checkpoint whose weights were evaluated on this set already gets a copy."""
    proto = options.protocol_for(loaded.recipe.eval if loaded is not None else None)
    folder = (out if exact_folder else eval_folder(out, set_name, source.label, proto.name)) if out else None
    step = loaded.step if loaded is not None else None
    same = (source.run_dir, step) if source.run_dir is not None and step is not None else None
    if same in done:
        first = done[same]
        if folder is not None and first.folder is not None:
            shutil.copytree(first.folder, folder, dirs_exist_ok=True)
        return SetEvaluation(set_name, source.label, step, first.described, first.result, folder, first.checkpoint)
    if loaded is not None:
        total = sum(1 for cid in test.ids if cid in test.clips and cid in test.annotations)
        total += len(options.extended.pairs) if options.extended is not None else 0
        with progress(f"{test.name} ({source.label})", total) as advance:
            result = evaluate_model(loaded, test, options, out_dir=folder, progress=advance)
        described = f"{source.label} ({loaded.label}, {loaded.source.name})"
    else:
        total = sum(1 for cid in test.ids if cid in test.annotations and (source.maps is None or cid in source.maps))
        with progress(f"{test.name} (scoring)", total) as advance:
            result = score_precomputed(source.maps, test, proto, options, out_dir=folder, progress=advance)
        described = f"maps {source.maps_path}" if source.maps is not None else "baselines only"
    item = SetEvaluation(set_name, source.label, step, described, result, folder)
    if same is not None:
        done[same] = item
    return item


def log_evaluation(item: SetEvaluation, sink: Any, kind: str = "test") -> None:
    """Record ``item`` through ``sink``: its ``kind`` record in metrics.jsonl, every finite number of it under
    ``eval/<name>/`` in MLflow, its folder as the artifacts ``eval/<name>``."""
    fields, numbers = item.record()
    prefix = _metric_name(f"{EVAL}/{item.name}")
    # MLflow gets exactly the record's numbers, so `sslt sync` of the record gives a store what logging gave it
    sink.log(kind, item.step or 0, numbers, fields=fields, mlflow={f"{prefix}/{k}": v for k, v in numbers.items()})
    if item.folder is not None:
        sink.artifact(item.folder, f"{EVAL}/{item.name}")


def print_evaluation(evaluation: Evaluation, out: "Console", console: "Console", *,
                     title: Callable[[SetEvaluation], str]) -> None:
    """Each result of an evaluation: its table on ``out`` (titled ``title(item)``) with the extended evaluation's line,
    then how N was reached and where its outputs are on ``console``; a result copied from a checkpoint with the same
    weights is one line on ``console``."""
    for item in evaluation.items:
        if item.same_as is not None:
            console.print(f"{item.set_name}: the {item.checkpoint} checkpoint is the {item.same_as} checkpoint (step "
                          f"{item.step}); its results are copied to {item.folder}", highlight=False)
            continue
        table = result_table(item.result)
        table.title = title(item)
        out.print(table)
        interactive = item.result.interactive
        if interactive is not None:
            out.print(f"IS3 ({interactive['n']} samples of {interactive['n_images']} images): cIoU "
                      f"{100 * interactive['ciou']:.2f}, adaptive cIoU {100 * interactive['ciou_adaptive']:.2f}, IIoU "
                      f"{100 * interactive['iiou']:.2f} (adaptive {100 * interactive['iiou_adaptive']:.2f}), IAUC "
                      f"{100 * interactive['iauc']:.2f} (adaptive {100 * interactive['iauc_adaptive']:.2f})")
        extended = item.result.extended
        if extended is not None:
            left_out = f"; {len(extended.excluded)} pairs left out (excluded.csv)" if extended.excluded else ""
            out.print(f"extended ({extended.protocol}): AP {extended.ap:.4f} (SLAVC sampling {extended.ap_slavc:.4f}), "
                      f"max-F1 {extended.max_f1:.4f} (SLAVC sampling {extended.max_f1_slavc:.4f}); "
                      f"{extended.n_sounding} sounding + {extended.n_silent} non-sounding pairs{left_out}")
        if item.result.negatives is not None:
            out.print(negatives_table(item.result))
            for note in item.result.negatives.notes:
                console.print(f"note: {note}", highlight=False)
        console.print(item.result.n_explained(), highlight=False)
        if item.folder is not None:
            console.print(f"outputs: {item.folder}", highlight=False)


# ------------------------------------------------------------------------------------------------- reading back

def saved_summaries(run: Any, protocol: str, kind: str = "test") -> dict[str, dict[str, dict[str, float]]]:
    """``{set: {checkpoint: summary}}`` of the ``kind`` records :func:`log_evaluation` wrote into ``run``'s
    metrics.jsonl under ``protocol`` (the last record of each set and checkpoint): what :meth:`Evaluation.summaries`
    gave the process that evaluated. Records written before they carried the centre-prior baseline (sslt before the
    orchestrator) get it from their evaluation's ``metrics.json``."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for record in run.metrics():
        if record.get("kind") != kind or record.get("protocol") != protocol:
            continue
        summary = {k: float(record[k]) for k in SUMMARY_KEYS if isinstance(record.get(k), (int, float))}
        if "baseline_centre/ciou" not in summary:
            summary.update(_centre_baseline(run.dir / EVAL, record))
        out.setdefault(str(record.get("set")), {})[str(record.get("checkpoint"))] = summary
    return out


def _centre_baseline(base: Path, record: dict) -> dict[str, float]:
    folder = eval_folder(base, str(record.get("set")), str(record.get("checkpoint")), str(record.get("protocol")))
    try:
        centre = (json.loads((folder / "metrics.json").read_text()).get("baselines") or {}).get("centre") or {}
    except (OSError, json.JSONDecodeError):
        return {}
    return {f"baseline_centre/{k}": float(centre[k]) for k in ("ciou", "auc")
            if isinstance(centre.get(k), (int, float))}
