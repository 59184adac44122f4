"""EZ-VSL's object-guided localisation (sslt_cli/ogl.py) against a plain re-statement of EZ-VSL's test.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from sslt_cli import evaluate as E
from sslt_cli.data.annotations import Annotation
from sslt_cli.errors import CheckpointError, SsltError

SIZE = 224


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A random-weight torchvision resnet18 state_dict file (the format of torchvision's ImageNet download)."""
    from torchvision.models import resnet18

    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("ogl") / "resnet18-random.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, write_noise_clips):
    """(model, test set, recipe): three clips of random frames and noise, an untrained sslt model."""
    from sslt_cli.config import Recipe
    from sslt_cli.model import build_model

    clips = write_noise_clips(tmp_path_factory.mktemp("tiny"), ("a", "b", "c"), size=96, seed=5)
    boxes = {"a": (0.1, 0.1, 0.6, 0.5), "b": (0.4, 0.3, 0.9, 0.9), "c": (0.0, 0.5, 0.5, 1.0)}
    test = E.TestSet(name="t", anno_kind="vggss", ids=list(clips), clips=clips,
                     annotations={cid: Annotation(cid, "vggss", (box,))
                                  for cid, box in boxes.items()})
    recipe = Recipe.model_validate({"data": {"image_size": 96, "num_workers": 0},
                                    "audio": {"clip_seconds": 3.0, "n_mels": 40}, "eval": {"protocol": "ezvsl"}})
    torch.manual_seed(0)
    return build_model().eval(), test, recipe


def evaluate(model, test, recipe, out_dir=None, **options):
    """The one evaluation of ``model`` (described by ``recipe``) on ``test`` under the ezvsl protocol."""
    from sslt_cli.checkpoint import LoadedModel

    loaded = LoadedModel(model=model, recipe=recipe, label="sslt", source=Path("model.pt"))
    return E.evaluate_model(loaded, test, E.EvalOptions(protocol="ezvsl", **options), out_dir=out_dir)


def _with_ogl(recipe, weights, alpha):
    return recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"ogl_weights": str(weights),
                                                                            "ogl_alpha": alpha})})


def normalize_img(value: np.ndarray) -> np.ndarray:
    """EZ-VSL utils.normalize_img: min-max, a constant map left as it is."""
    lo, hi = value.min(), value.max()
    return value if hi - lo == 0 else (value - lo) / (hi - lo)


def official_ogl_maps(model, test, recipe, weights: Path, alpha: float) -> dict[str, np.ndarray]:
    """EZ-VSL test.py's S_AVL / S_OBJ / combination, re-stated: resnet18 with avgpool removed and an fc that unflattens
    to (512, h, w) and takes |x|.mean over channels; both maps bilinear (align_corners) to 224; normalise each, mix,
    normalise again."""
    from torchvision.models import resnet18

    from sslt_cli.model import localisation_map

    net = resnet18(weights=None)
    state = torch.load(weights, weights_only=True)
    net.load_state_dict(state)
    batch = next(iter(E.eval_loader(list(test.clips.values()), recipe, "cpu", "resize_square", batch_size=8)))
    side = recipe.data.image_size // 32
    net.avgpool = torch.nn.Identity()
    net.fc = torch.nn.Sequential(torch.nn.Unflatten(1, (512, side, side)))
    net.eval()
    out = {}
    with torch.no_grad():
        av = localisation_map(model.embed_image(batch["image"]), model.embed_audio(batch["spec"]))
        av = F.interpolate(av.float(), size=(SIZE, SIZE), mode="bilinear", align_corners=True).numpy()
        obj = net(batch["image"]).abs().mean(1).unsqueeze(1)
        obj = F.interpolate(obj, size=(SIZE, SIZE), mode="bilinear", align_corners=True).numpy()
    for i, index in enumerate(batch["index"]):
        cid = list(test.clips)[int(index)]
        pred_av, pred_obj = normalize_img(av[i, 0]), normalize_img(obj[i, 0])
        out[cid] = normalize_img(pred_av * alpha + pred_obj * (1 - alpha))
    return out


def test_ogl_maps_are_ezvsls_combination_and_are_recorded(tiny, weights, tmp_path):
    model, test, recipe = tiny
    plain = evaluate(model, test, recipe, out_dir=tmp_path / "plain", baselines=False)
    guided = evaluate(model, test, _with_ogl(recipe, weights, 0.4), out_dir=tmp_path / "ogl",
                              baselines=False)
    maps = E.load_maps(tmp_path / "ogl" / "maps.npz")
    expected = official_ogl_maps(model, test, recipe, weights, 0.4)
    assert set(maps) == set(expected) == {"a", "b", "c"}
    for cid, m in maps.items():
        assert m.shape == (SIZE, SIZE)
        np.testing.assert_allclose(m, expected[cid], rtol=0, atol=2e-6)
    # the object map changes what is scored, and the result says OGL was used
    assert [r.iou for r in guided.rows] != [r.iou for r in plain.rows]
    record = json.loads((tmp_path / "ogl" / "metrics.json").read_text())
    assert record["protocol"]["object_guidance"] == {"alpha": 0.4, "weights": str(weights)}
    assert any(note.startswith("object-guided localisation (EZ-VSL OGL)") for note in record["notes"])
    assert json.loads((tmp_path / "plain" / "metrics.json").read_text())["protocol"]["object_guidance"] is None
    console = Console(width=200, record=True)
    console.print(E.result_table(guided))
    assert "EZ-VSL object-guided localisation, alpha 0.4" in console.export_text()


def test_alpha_one_reproduces_the_plain_maps_and_validation_skips_ogl(tiny, weights, tmp_path):
    from sslt_cli import metrics

    model, test, recipe = tiny
    plain = evaluate(model, test, recipe, out_dir=tmp_path / "plain", baselines=False)
    alone = evaluate(model, test, _with_ogl(recipe, weights, 1.0), out_dir=tmp_path / "one",
                             baselines=False)
    assert [(r.id, r.iou) for r in alone.rows] == [(r.id, r.iou) for r in plain.rows]
    raw, one = E.load_maps(tmp_path / "plain" / "maps.npz"), E.load_maps(tmp_path / "one" / "maps.npz")
    for cid in raw:
        up = metrics.upsample_maps(torch.from_numpy(raw[cid])[None], "bilinear_align_corners")[0].numpy()
        np.testing.assert_allclose(one[cid], normalize_img(up), rtol=0, atol=1e-6)
    skipped = evaluate(model, test, _with_ogl(recipe, weights, 0.4), baselines=False,
                               object_guidance=False, out_dir=tmp_path / "val")
    assert skipped.object_guidance is None and [r.iou for r in skipped.rows] == [r.iou for r in plain.rows]


def test_missing_or_wrong_weights_are_clear_errors(tiny, tmp_path):
    model, test, recipe = tiny
    with pytest.raises(CheckpointError, match="no such file"):
        evaluate(model, test, _with_ogl(recipe, tmp_path / "absent.pth", 0.4))
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, wrong)
    with pytest.raises(CheckpointError, match="keys do not match"):
        evaluate(model, test, _with_ogl(recipe, wrong, 0.4))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError):
        evaluate(model, test, _with_ogl(recipe, junk, 0.4))


def test_recipe_keys_and_cli_options(tmp_path):
    from pydantic import ValidationError
    from typer.testing import CliRunner

    from sslt_cli.cli import app
    from sslt_cli.config import Recipe

    assert (Recipe().eval.ogl_weights, Recipe().eval.ogl_alpha) == (None, None)
    with pytest.raises(ValidationError):
        Recipe.model_validate({"eval": {"ogl_alpha": 1.5}})
    result = CliRunner().invoke(app, ["eval", "--baselines-only", "--vggss-json", "vggss", "--ogl-weights",
                                      str(tmp_path / "w.pth")])
    assert isinstance(result.exception, SsltError) and "go with a model" in result.exception.render()


def test_sslt_eval_ogl_options_reach_the_evaluation(weights, tmp_path):
    from typer.testing import CliRunner

    from sslt_cli.checkpoint import save_official_checkpoint
    from sslt_cli.cli import app
    from sslt_cli.data.synthetic import generate
    from sslt_cli.model import build_model

    generate(tmp_path / "bench", n_train=2, n_val=1, n_test=2, n_flickr=1, image_size=64, workers=1, progress=False)
    torch.manual_seed(0)
    save_official_checkpoint(build_model(), tmp_path / "model.pth.tar")
    base = ["eval", str(tmp_path / "model.pth.tar"), "--data", str(tmp_path / "bench" / "test_vggss"),
            "--protocol", "ezvsl", "--device", "cpu"]
    alpha_only = CliRunner().invoke(app, [*base, "--ogl-alpha", "0.5", "--out", str(tmp_path / "x")])
    assert isinstance(alpha_only.exception, SsltError) and "--ogl-weights" in alpha_only.exception.render()
    result = CliRunner().invoke(app, [*base, "--ogl-weights", str(weights), "--ogl-alpha", "0.5",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, f"{result.exception!r} {result.output}"
    record = json.loads(next((tmp_path / "out").glob("*/metrics.json")).read_text())
    assert record["protocol"]["object_guidance"] == {"alpha": 0.5, "weights": str(weights)}
