"""The model path: checkpoints -> maps -> scored results -> outputs."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from sslt_cli.checkpoint import load_model, resolve_checkpoints
from sslt_cli.data.manifest import Clip
from sslt_cli.evaluate.maps import BatchHook, predict_maps, save_maps
from sslt_cli.evaluate.options import get_protocol, recipe_protocol
from sslt_cli.evaluate.outputs import eval_folder, mlflow_metrics, result_table, write_outputs
from sslt_cli.evaluate.scoring import EvalResult, Exclusion, score_extended, score_maps, test_summary
from sslt_cli.evaluate.sets import TestSet, load_test_set, silent_pair_key
from sslt_cli.metrics import Protocol


def evaluate_model(model: torch.nn.Module, test: TestSet, protocol: str | Protocol, recipe: Any, *,
                   device: str | torch.device = "cpu", out_dir: Path | None = None, baselines: bool = True,
                   batch_size: int | None = None, num_workers: int | None = None, clip_boxes: bool | None = None,
                   extended: tuple[list[tuple[str, str]], TestSet] | None = None,
                   progress: Callable[[int], None] | None = None, on_batch: BatchHook | None = None,
                   object_guidance: bool = True) -> EvalResult:
    """The one evaluation of a model: maps for the test set's clips (``recipe``'s image size and audio front end at
    ``eval.precision``), scored under ``protocol`` with baselines, outputs written to ``out_dir`` when given.

    Validation, the end of training, ``sslt eval`` and ``sslt ablate`` (through training) all call this.
    ``extended``: (non-sounding pairs, the set holding their frames and audio) adds SLAVC's extended evaluation; a
    pair whose frame or audio is unavailable is left out and listed. ``progress`` is called with the clip count of
    each predicted batch, the non-sounding pairs' batches included; ``on_batch`` as in :func:`maps_from_batches`.
    With ``recipe.eval.ogl_weights`` set (and ``object_guidance``), the scored maps are EZ-VSL's object-guided
    combination (:mod:`sslt_cli.ogl`), and the result's notes say so.
    """
    from sslt_cli.ogl import ObjectGuidance

    proto = get_protocol(protocol)
    ogl = ObjectGuidance.from_eval(recipe.eval, proto, device) if object_guidance else None
    clips = [test.clips[i] for i in test.ids if i in test.clips and i in test.annotations]
    maps, skipped = predict_maps(model, clips, recipe, proto, device, batch_size=batch_size, num_workers=num_workers,
                                 progress=progress, on_batch=on_batch, ogl=ogl)
    unavailable = dict(test.unavailable)
    unavailable.update({cid: f"decode error: {reason}" for cid, reason in skipped})
    result = score_maps(maps, test.annotations, proto, test.ids, unavailable=unavailable,
                        annotation_problems=test.annotation_problems, baselines=baselines, clip_boxes=clip_boxes,
                        name=test.name, notes=test.notes, device=device)
    if ogl is not None:
        result.notes = [*result.notes, ogl.note()]
        result.object_guidance = {"alpha": ogl.alpha, "weights": ogl.weights}
    if extended is not None:
        silent_pairs, silent_set = extended
        pairs: list[tuple[str, Clip, Clip]] = []
        dropped: list[Exclusion] = []
        for video, audio in silent_pairs:
            key = silent_pair_key(video, audio)
            fc, ac = silent_set.clips.get(video), silent_set.clips.get(audio)
            if fc is not None and ac is not None:
                pairs.append((key, fc, ac))
                continue
            missing = [f"{column} {cid}: {silent_set.unavailable.get(cid, 'not among its usable clips')}"
                       for column, cid, clip in (("video", video, fc), ("audio", audio, ac)) if clip is None]
            dropped.append(Exclusion(key, "no frame/audio", f"unavailable in {silent_set.name}: {'; '.join(missing)}"))
        silent_maps, silent_skipped = predict_maps(model, [], recipe, proto, device,
                                                   batch_size=batch_size, num_workers=num_workers, pairs=pairs,
                                                   progress=progress, ogl=ogl)
        dropped += [Exclusion(key, "no frame/audio", f"decode error: {reason}") for key, reason in silent_skipped]
        if dropped:
            result.notes.append(f"extended evaluation: {len(dropped)} of {len(silent_pairs)} non-sounding pairs have "
                                f"no usable frame/audio in {silent_set.name} and were left out (listed in "
                                f"excluded.csv)")
        result.extended = score_extended(maps, silent_maps, test.annotations, dropped=dropped)
    if out_dir is not None:
        write_outputs(result, out_dir, maps=maps, frames=test.frames, annotations=test.annotations,
                      defects=test.defects)
        save_maps(maps, out_dir / "maps.npz")
    return result



def evaluate_checkpoints(run: Any, recipe: Any, sink: Any, *, device: str | torch.device, console: Any = None,
                         out: Any = None) -> dict[str, dict[str, dict[str, float]]]:
    """The end of training: the run's last and best checkpoints on every test set of the recipe under its protocol.

    Writes ``eval/<set>-<checkpoint>-<protocol>/`` (:func:`eval_folder`), a ``kind: test`` record per set and
    checkpoint through ``sink`` (metrics.jsonl, MLflow ``test_<set>/<checkpoint>/...``) and prints a table per set and
    checkpoint. Returns ``{set: {checkpoint: test_summary}}``. The best checkpoint was chosen on the validation set,
    never on a test set.
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    out = out or Console()
    proto = recipe_protocol(recipe.eval)
    _, checkpoints, _ = resolve_checkpoints(run.dir, "both")
    loaded_models = [(label, load_model(path, recipe, device)) for label, path in checkpoints]
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for set_name, set_path in recipe.data.test.items():
        test = load_test_set(recipe.data.set_path(set_path))
        done: dict[int | None, tuple[str, Path, EvalResult]] = {}  # step -> (label, out_dir, result) on this set
        for label, loaded in loaded_models:
            out_dir = eval_folder(run.dir / "eval", set_name, label, proto.name)
            same = done.get(loaded.step) if loaded.step is not None else None
            if same is not None:
                # the best checkpoint of the last validation is the last checkpoint's weights: copy, do not redo
                shutil.copytree(same[1], out_dir, dirs_exist_ok=True)
                result = same[2]
                console.print(f"{set_name}: the {label} checkpoint is the {same[0]} checkpoint (step {loaded.step}); "
                              f"its results are copied to {out_dir}", highlight=False)
            else:
                result = evaluate_model(loaded.model, test, proto, recipe, device=device, out_dir=out_dir)
                done[loaded.step] = (label, out_dir, result)
            summary.setdefault(set_name, {})[label] = test_summary(result)
            method = result.method or {}
            sink.log("test", loaded.step or 0, {k: method[k] for k in ("ciou", "auc", "mean_iou", "pointing")
                                                if k in method},
                     fields={"set": set_name, "checkpoint": label, "protocol": proto.name, "n": result.n},
                     mlflow=mlflow_metrics(result, f"test_{set_name}/{label}"))
            sink.artifact(out_dir, f"eval/{out_dir.name}")
            if same is None:
                table = result_table(result)
                table.title = f"{set_name}: {label} checkpoint (step {loaded.step}), protocol {proto.name}"
                out.print(table)
                console.print(result.n_explained(), highlight=False)
    return summary
