"""Negative-audio evaluation through the one orchestrator: one image pass (one extra audio forward per kind and draw),
maps on the common scale, outputs (metrics.json block, negatives.csv with every draw, the picture read back), MLflow
names, the per-model threshold from a validation set, precomputed negative maps, and the refusals."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sslt_cli import evaluate as E
from sslt_cli import negative_metrics as NM
from sslt_cli.checkpoint import LoadedModel
from sslt_cli.cli import app
from sslt_cli.config import Recipe
from sslt_cli.data.annotations import Annotation, write_annotation_xml
from sslt_cli.data.manifest import Clip, layout_paths, write_set
from sslt_cli.data.negatives import NegativeSettings, write_scenes
from sslt_cli.errors import DataError, SsltError

IDS = [f"c{i}" for i in range(6)]
LABELS = ["dog", "cat", "car", "dog", "cat", "car"]
RECIPE = {"data": {"image_size": 64, "num_workers": 0}, "audio": {"clip_seconds": 3.0, "n_mels": 40},
          "eval": {"batch_size": 4}}


def box(cid: str) -> Annotation:
    return Annotation(cid, "vggss", [(0.1, 0.1, 0.6, 0.6)])


@pytest.fixture()
def labelled(tmp_path, write_noise_clips):
    clips = write_noise_clips(tmp_path, IDS, size=64, seed=0)
    clips = {cid: dataclasses.replace(c, label=label) for (cid, c), label in zip(clips.items(), LABELS)}
    return E.TestSet(name="t", anno_kind="vggss", ids=list(IDS), annotations={c: box(c) for c in IDS}, clips=clips)


def loaded_model(tmp_path) -> LoadedModel:
    from sslt_cli.model import build_model

    torch.manual_seed(0)
    return LoadedModel(model=build_model().eval(), recipe=Recipe.model_validate(RECIPE), label="sslt",
                       source=tmp_path / "m.pt")


def options(**negatives) -> E.EvalOptions:
    settings = NegativeSettings(negatives.pop("types", ("silence", "noise", "offscreen")), draws=2, seed=3)
    return E.EvalOptions(protocol="ezvsl", negatives=E.NegativeOptions(settings, **negatives))


def test_images_are_embedded_once_and_each_negative_costs_one_audio_forward(tmp_path, labelled):
    loaded = loaded_model(tmp_path)
    calls = {"image": 0, "audio": 0}
    image, audio = loaded.model.embed_image, loaded.model.embed_audio

    def counted_image(x):
        calls["image"] += 1
        return image(x)

    def counted_audio(x):
        calls["audio"] += 1
        return audio(x)

    loaded.model.embed_image, loaded.model.embed_audio = counted_image, counted_audio
    result = E.evaluate_model(loaded, labelled, options())
    # 2 batches of <= 4 frames: per batch the positive audio, 2 noise draws and 2 offscreen draws; silence once
    assert calls == {"image": 2, "audio": 2 * (1 + 2 + 2) + 1}
    assert result.negatives.n_positive == 6
    assert [len(result.negatives.rows)] == [6 + 12 + 12]


def test_negative_maps_are_the_frame_with_the_negative_audio(tmp_path, labelled):
    from sslt_cli.data.datasets import waveform_spectrogram
    from sslt_cli.data.negatives import noise_waveform, silence_waveform
    from sslt_cli.model import localisation_map

    loaded = loaded_model(tmp_path)
    proto = E.get_protocol("ezvsl")
    clips = [labelled.clips[c] for c in IDS]
    maps, skipped, neg = E.predict_with_negatives(loaded, clips, proto, options(), options().negatives,
                                                  set_name="t", scenes=None)
    assert skipped == [] and set(neg.maps) == {("silence", 0), ("noise", 0), ("noise", 1), ("offscreen", 0),
                                               ("offscreen", 1)}
    batch = next(iter(E.eval_loader(clips[:1], loaded.recipe, "cpu", proto.image_preprocessing)))
    audio = loaded.recipe.audio
    noise_draw = next(d for d in neg.draws if d.kind == "noise" and d.clip_id == "c0" and d.draw == 1)
    with torch.inference_mode():
        v = loaded.model.embed_image(batch["image"])
        silence = loaded.model.embed_audio(waveform_spectrogram(audio, silence_waveform(48000))[None])
        noise = loaded.model.embed_audio(waveform_spectrogram(audio, noise_waveform(48000, noise_draw.seed))[None])
        np.testing.assert_allclose(maps["c0"], localisation_map(v, loaded.model.embed_audio(batch["spec"]))[0, 0],
                                   atol=1e-5)
    np.testing.assert_allclose(neg.maps[("silence", 0)]["c0"], localisation_map(v, silence)[0, 0], atol=1e-5)
    np.testing.assert_allclose(neg.maps[("noise", 1)]["c0"], localisation_map(v, noise)[0, 0], atol=1e-5)
    off = next(d for d in neg.draws if d.kind == "offscreen" and d.clip_id == "c0" and d.draw == 0)
    assert off.partner_class != "dog" and LABELS[IDS.index(off.partner)] == off.partner_class


def test_outputs_csv_picture_metrics_json_and_mlflow_names(tmp_path, labelled):
    from PIL import Image

    from test_evaluate import RecordingSink

    sink = RecordingSink()
    evaluation = E.run_evaluation([E.Source.model("m", loaded_model(tmp_path))], [("t", labelled)],
                                  options(validation=labelled), sink, out=tmp_path / "eval", kind="eval")
    item = evaluation.items[0]
    folder = item.folder
    block = json.loads((folder / "metrics.json").read_text())["negatives"]
    assert block["settings"] == {"types": ["silence", "noise", "offscreen"], "draws": 2, "noise_level": 1.0,
                                 "noise_colour": "white", "seed": 3}
    assert block["thresholds"]["universal"] == 0.5 and block["thresholds"]["per_model"] in NM.THRESHOLD_GRID
    assert block["thresholds"]["per_model_set"] == "t" and block["n_positive"] == 6
    assert set(block["slavc"]) == {"silence", "noise", "offscreen", "all"}
    assert block["slavc"]["all"]["n_silent"] == 18 and "ap_std" in block["slavc"]["noise"]
    assert set(block["references"]) == {"centre_disc", "nothing"}
    assert block["references"]["nothing"]["vssl"]["universal"]["mean"]["pia"] == 0.0
    with open(folder / "negatives.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 30 and {r["kind"] for r in rows} == {"silence", "noise", "offscreen"}
    assert {(r["kind"], r["draw"]) for r in rows} == {("silence", "0"), ("noise", "0"), ("noise", "1"),
                                                      ("offscreen", "0"), ("offscreen", "1")}
    for r in rows:
        if r["kind"] == "offscreen":
            assert r["partner_class"] != LABELS[IDS.index(r["id"])] and r["seed"]
        assert 0.0 <= float(r["pia_universal"]) <= 1.0 and r["pia_per_model"] != ""
    with Image.open(folder / "negatives.png") as picture:
        assert picture.format == "PNG" and picture.size[0] > picture.size[1] // 2 > 100
        pixels = np.asarray(picture.convert("RGB"))
    assert pixels.std() > 10  # frames and maps were drawn, not a blank canvas
    kind, _, numbers, fields, mlflow = sink.logged[0]
    assert kind == "eval" and numbers["negatives/ap"] == block["slavc"]["all"]["ap"]
    assert mlflow["eval/t-m-ezvsl/negatives/slavc/noise/ap"] == block["slavc"]["noise"]["ap"]
    assert "eval/t-m-ezvsl/negatives/vssl/per_model/types/offscreen/stability" in mlflow
    assert "eval/t-m-ezvsl/negatives/references/centre_disc/slavc/all/ap" in mlflow
    assert all(E.MLFLOW_NAME.match(name) for name in mlflow)
    from rich.console import Console

    console = Console(width=220, record=True)
    console.print(E.negatives_table(item.result))
    text = console.export_text()
    assert "off-screen" in text and "ref.: nothing" in text and "F/model" in text


def test_offscreen_without_labels_is_one_clear_error(tmp_path, labelled):
    unlabelled = dataclasses.replace(labelled, clips={c: dataclasses.replace(v, label="")
                                                      for c, v in labelled.clips.items()})
    with pytest.raises(DataError, match="offscreen negatives need each clip's class, and t has none"):
        E.evaluate_model(loaded_model(tmp_path), unlabelled, options())
    labels = {c: label for c, label in zip(IDS, LABELS)}
    result = E.evaluate_model(loaded_model(tmp_path), unlabelled, options(types=("offscreen",), labels=labels))
    assert result.negatives.slavc["offscreen"]["n_silent"] == 6


def test_two_object_frames_exclude_both_classes(tmp_path, labelled):
    scenes = dataclasses.replace(labelled, scenes={"c0": frozenset({"dog", "cat"})})
    result = E.evaluate_model(loaded_model(tmp_path), scenes, options(types=("offscreen",)))
    partners = [r for r in result.negatives.rows if r["id"] == "c0"]
    assert len(partners) == 2 and {r["partner_class"] for r in partners} == {"car"}


def test_precomputed_negative_maps_and_the_refusals(tmp_path):
    rng = np.random.default_rng(0)
    annotations = {c: box(c) for c in IDS}
    test = E.TestSet(name="p", anno_kind="vggss", ids=list(IDS), annotations=annotations)
    maps = {c: rng.uniform(-1, 1, (7, 7)).astype(np.float32) for c in IDS}
    negative = {E.negative_key(c, "silence", 0): np.full((7, 7), -0.5, np.float32) for c in IDS}
    negative.update({E.negative_key(c, "noise", d): rng.uniform(-1, 0, (7, 7)).astype(np.float32)
                     for c in IDS for d in (0, 1)})
    opts = dataclasses.replace(options(), negatives=E.NegativeOptions(
        NegativeSettings(("silence", "noise")), maps=negative, maps_source="neg.npz"))
    result = E.score_precomputed(maps, test, E.get_protocol("ezvsl"), opts, out_dir=tmp_path / "out")
    neg = result.negatives
    assert neg.vssl["universal"]["types"]["silence"]["pia"] == 0.0  # (−0.5 + 1) / 2 = 0.25, never above 0.5
    assert neg.slavc["silence"]["n_silent"] == 6 and neg.slavc["noise"]["n_silent"] == 6
    assert "per-model threshold: not computed" in neg.notes[-1]
    with pytest.raises(DataError, match="--negatives with --maps needs the negative maps too"):
        E.score_precomputed(maps, test, E.get_protocol("ezvsl"), options())
    with pytest.raises(DataError, match=r"keyed <clip id>@<kind>@<draw>.*1 keys are not"):
        E.parse_negative_maps({"c0@hum@0": maps["c0"], "c1@noise@0": maps["c1"]}, "neg.npz")


def test_object_guidance_and_negatives_are_refused(tmp_path, labelled):
    opts = dataclasses.replace(options(), ogl_weights=str(tmp_path / "r18.pth"))
    with pytest.raises(DataError, match="negative audio is scored on the raw audio-visual maps"):
        E.evaluate_model(loaded_model(tmp_path), labelled, opts)


def _prepared(root: Path, ids, labels) -> Path:
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(1)
    clips = []
    for cid, label in zip(ids, labels):
        frame, audio, anno = layout_paths("vggss_test", cid)
        (root / frame).parent.mkdir(parents=True, exist_ok=True)
        (root / audio).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / frame)
        sf.write(root / audio, rng.uniform(-0.5, 0.5, 16000).astype(np.float32), 16000)
        write_annotation_xml(root / anno, box(cid))
        clips.append(Clip(cid, label, frame, audio, anno))
    write_set(root, "vggss_test", clips)
    return root


def test_sslt_eval_negatives_from_the_command_line(tmp_path):
    from sslt_cli.checkpoint import CHECKPOINT_FORMAT
    from sslt_cli.model import build_model

    torch.manual_seed(0)  # an sslt checkpoint carrying the small recipe (64-pixel frames, 3 s of audio)
    torch.save({"format": CHECKPOINT_FORMAT, "model": build_model().state_dict(), "step": 0, "epoch": 0,
                "recipe": Recipe.model_validate(RECIPE).model_dump()}, tmp_path / "w.pth.tar")
    data = _prepared(tmp_path / "set", ["a", "b", "c"], ["dog", "cat", ""])
    write_scenes(data / "scenes.csv", {"a": ["dog"], "b": ["cat"]})
    args = ["eval", str(tmp_path / "w.pth.tar"), "--data", str(data), "--protocol", "ezvsl", "--device", "cpu",
            "--out", str(tmp_path / "out"), "--negatives", "silence,noise,offscreen", "--draws", "2",
            "--noise-level", "0.1", "--noise-colour", "pink"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "negative audio" in result.output and "off-screen" in result.output
    folder = tmp_path / "out" / "set-w.pth-ezvsl"
    block = json.loads((folder / "metrics.json").read_text())["negatives"]
    assert block["settings"]["noise_colour"] == "pink" and block["settings"]["noise_level"] == 0.1
    rows = list(csv.DictReader(open(folder / "negatives.csv")))
    assert [(r["kind"], r["missing_reason"]) for r in rows if r["id"] == "c" and r["missing_reason"]] == [
        ("offscreen", "offscreen: the clip has no class, so no class can be excluded")]
    assert sum(1 for r in rows if r["kind"] == "offscreen" and not r["missing_reason"]) == 4  # a and b, 2 draws
    np.savez(tmp_path / "m.npz", a=np.zeros((7, 7), np.float32))
    refused = CliRunner().invoke(app, ["eval", "--maps", str(tmp_path / "m.npz"), "--data", str(data),
                                       "--negatives", "silence"])
    assert isinstance(refused.exception, SsltError)
    assert "--negatives with --maps needs the negative maps too" in refused.exception.message
    unknown = CliRunner().invoke(app, args[:-8] + ["--negatives", "silence,hum"])
    assert isinstance(unknown.exception, SsltError) and "hum" in unknown.exception.render()


# ------------------------------------------------------------------------------------------ every model family

FAMILY_SPECS = {"lvs": (257, 671), "ssl_align": (257, 299), "ezvsl": (257, 200), "fnac": (257, 200),
                "slavc": (257, 200)}


@pytest.mark.parametrize("family", list(FAMILY_SPECS))
def test_every_family_is_evaluated_with_negatives_through_its_own_front_end(tmp_path, write_noise_clips, family):
    from test_families import released_file

    from sslt_cli import families

    path, _ = released_file(tmp_path, "ezvsl" if family == "fnac" else family)
    loaded = families.load_released(path, family="fnac" if family == "fnac" else None)
    assert loaded.family == family
    clips = write_noise_clips(tmp_path, IDS[:3], size=224, seed=1)
    clips = {cid: dataclasses.replace(c, label=label) for (cid, c), label in zip(clips.items(), LABELS)}
    test = E.TestSet(name="t", anno_kind="vggss", ids=IDS[:3], annotations={c: box(c) for c in IDS[:3]}, clips=clips)
    shapes = []
    audio = loaded.model.embed_audio

    def recorded(spec):
        shapes.append(tuple(spec.shape[-2:]))
        return audio(spec)

    loaded.model.embed_audio = recorded
    settings = NegativeSettings(("silence", "noise", "offscreen"))
    result = E.evaluate_model(loaded, test, E.EvalOptions(negatives=E.NegativeOptions(settings)))
    # the positive audio, the noise, the off-screen audio and the silence: all through the family's front end
    assert set(shapes) == {FAMILY_SPECS[family]} and len(shapes) == 4
    families_range = families.get_family(family).value_range
    assert result.negatives.value_range == families_range
    for row in result.negatives.rows:  # the common scale: confidences of (A - lo) / (hi - lo) lie in [0, 1]
        assert 0.0 <= row["confidence"] <= 1.0 and 0.0 <= row["positive_confidence"] <= 1.0
    assert result.negatives.slavc["all"]["n_silent"] == 9 and result.protocol.name == loaded.recipe.eval.protocol


def test_the_final_test_evaluation_takes_the_recipes_negatives(tmp_path):
    from sslt_cli.catalog import resolve_recipe
    from sslt_cli.config import load_recipe
    from sslt_cli.train import test_negatives

    _prepared(tmp_path / "val", ["a", "b"], ["dog", "cat"])
    (tmp_path / "labels.csv").write_text("a,dog\nb,cat\n")
    recipe = Recipe.model_validate({"seed": 9, "data": {"root": str(tmp_path), "val": "val", "labels": "labels.csv"},
                                    "eval": {"negatives": ["silence", "offscreen"]}})
    options = test_negatives(recipe)
    assert options.settings.types == ("silence", "offscreen") and options.settings.seed == 9
    assert options.labels == {"a": "dog", "b": "cat"} and options.validation.name == "val"
    assert test_negatives(Recipe()) is None
    assert load_recipe(resolve_recipe("quickstart")).eval.negatives == ("silence", "noise", "offscreen")
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="negatives"):
        Recipe.model_validate({"eval": {"negatives": ["hum"]}})


def test_the_per_model_threshold_is_chosen_once_per_model(tmp_path, labelled, monkeypatch):
    from sslt_cli.evaluate import orchestrate

    from test_evaluate import RecordingSink

    calls = []
    chosen = {"threshold": 0.61, "f": 0.4, "set": "val", "n": 6}
    monkeypatch.setattr(orchestrate, "per_model_threshold", lambda *args, **kwargs: calls.append(1) or chosen)
    evaluation = E.run_evaluation([E.Source.model("m", loaded_model(tmp_path))], [("a", labelled), ("b", labelled)],
                                  options(types=("silence",), validation=labelled), RecordingSink(), out=None)
    assert len(calls) == 1
    assert [item.result.negatives.thresholds["per_model"] for item in evaluation.items] == [0.61, 0.61]
