"""`sslt compare` (issue 19 item 4): three families' random-weight checkpoints on the embedded synthetic set, each under
its own preset and the common one; the table, the per-clip agreement CSV, the picture (read back) and one MLflow
parent run with a child per model (the whole command, marked slow); the comparison itself on two families, fast."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import official_restated as O
from sslt_cli.cli import app
from sslt_cli.compare import CELL
from sslt_cli.errors import SsltError
from sslt_cli.localize_render import BAR_WIDTH

torch.set_num_threads(1)
WIDE = {"COLUMNS": "220"}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from sslt_cli.data.synthetic import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, n_train=0, n_val=0, n_test=4, n_flickr=0, image_size=64, workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return [O.save_released(O.random_state(net(), seed), folder / name, container, prefix)
            for seed, (name, net, container, prefix) in enumerate((
                ("lvs.pth", O.LvsAVENet, "model_state_dict", "module."),
                ("ezvsl.pth", O.EZVSL, "model", "module."),
                ("slavc.pth", O.SLAVC, "model", "module.")))]


@pytest.mark.slow
def test_compare_three_families(synthetic, models, tmp_path):
    import mlflow

    result = CliRunner().invoke(app, ["compare", *map(str, models), "--data", str(synthetic / "test_vggss"),
                                      "--out", str(tmp_path / "cmp"), "--device", "cpu"], env=WIDE)
    assert result.exit_code == 0, f"{result.exception!r} {result.output}"
    table = result.stdout
    for expected in ("LVS (lvs)", "EZ-VSL (ezvsl)", "SLAVC (slavc)", "lvs (own)", "ezvsl (own)", "slavc_rel (own)",
                     "ezvsl (common)"):
        assert expected in table, expected
    rows = list(csv.DictReader(open(tmp_path / "cmp" / "comparison.csv")))
    assert [(r["method"], r["protocol"], r["kind"]) for r in rows] == [
        ("LVS (lvs)", "lvs", "own"), ("LVS (lvs)", "ezvsl", "common"), ("EZ-VSL (ezvsl)", "ezvsl", "own"),
        ("EZ-VSL (ezvsl)", "ezvsl", "common"), ("SLAVC (slavc)", "slavc_rel", "own"),
        ("SLAVC (slavc)", "ezvsl", "common")]
    assert {r["n"] for r in rows} == {"4"}
    # EZ-VSL's own preset is the common one and min-max ignores the scale: the same numbers both ways
    assert rows[2]["ciou"] == rows[3]["ciou"] and rows[2]["auc"] == rows[3]["auc"]

    agreement = list(csv.DictReader(open(tmp_path / "cmp" / "agreement.csv")))
    assert len(agreement) == 4 and set(agreement[0]) == {
        "id", "agree", "spread", *(f"{m}/{k}" for m in ("lvs", "ezvsl", "slavc") for k in ("iou_own", "iou_common",
                                                                                          "hit"))}
    for row in agreement:
        hits = {row[f"{m}/hit"] for m in ("lvs", "ezvsl", "slavc")}
        assert row["agree"] == str(int(len(hits) == 1))
        assert all(float(row[f"{m}/hit"]) == (float(row[f"{m}/iou_common"]) >= 0.5) for m in ("lvs", "ezvsl", "slavc"))
    assert [row["agree"] for row in agreement] == sorted(row["agree"] for row in agreement)  # disagreements first

    picture = np.asarray(Image.open(tmp_path / "cmp" / "maps.png"))
    width = CELL + BAR_WIDTH
    assert picture.shape == (4 * CELL + 3 * 4, 4 * width + 3 * 4, 3)
    first = agreement[0]["id"]
    with Image.open(synthetic / "test_vggss" / "frame" / f"{first}.jpg") as frame:
        expected = np.asarray(frame.convert("RGB").resize((CELL, CELL), Image.BICUBIC))
    assert np.array_equal(picture[:CELL, :CELL], expected)  # row 1 is the first clip of agreement.csv
    model_cells = [picture[:CELL, k * (width + 4):k * (width + 4) + CELL] for k in (1, 2, 3)]
    assert all(not np.array_equal(cell, expected) for cell in model_cells)  # each model's map drawn over it

    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    parent = [r for r in runs if r.info.run_name == "compare-test_vggss"]
    assert len(parent) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert sorted(r.info.run_name for r in children) == ["ezvsl", "lvs", "slavc"]
    slavc = next(r for r in children if r.info.run_name == "slavc")
    assert slavc.data.tags["sslt.family"] == "slavc"
    assert "eval/test_vggss-slavc-slavc_rel/ciou" in slavc.data.metrics
    assert "eval/test_vggss-slavc-common-ezvsl/ciou" in slavc.data.metrics


def test_compare_refuses_one_model_and_misaligned_families(synthetic, models, tmp_path):
    one = CliRunner().invoke(app, ["compare", str(models[0]), "--data", str(synthetic / "test_vggss"), "--out",
                                   str(tmp_path / "a"), "--device", "cpu"])
    assert isinstance(one.exception, SsltError)
    assert one.exception.message == "sslt compare needs at least two models, got 1"
    misaligned = CliRunner().invoke(app, ["compare", *map(str, models), "--family", "lvs", "--data",
                                          str(synthetic / "test_vggss")])
    assert isinstance(misaligned.exception, SsltError)
    assert misaligned.exception.message.startswith("--family is given once per model, in order (3 models, 1 --family)")


def test_compare_two_families_in_process(synthetic, models, tmp_path):
    from sslt_cli import compare as C
    from sslt_cli import evaluate as ev

    test = ev.load_test_set(synthetic / "test_vggss")
    specs = [C.ModelSpec(models[1]), C.ModelSpec(models[0], "ssl_align")]
    comparison = C.compare(specs, ("synth", test), C.CompareOptions(common="lvs", num_workers=0, picture_clips=2),
                           tmp_path)
    assert [(m.label, m.family, m.own.protocol, m.common.protocol) for m in comparison.models] == [
        ("ezvsl", "ezvsl", "ezvsl", "lvs"), ("lvs", "ssl_align", "align_lvs", "lvs")]
    # the common scale of an LVS map is (cos + 1) / 2 of its own map
    own_maps = ev.load_maps(comparison.models[1].own.folder / "maps.npz")
    cid = next(iter(own_maps))
    np.testing.assert_allclose(comparison.models[1].maps[cid], (own_maps[cid] + 1) / 2, atol=1e-7)
    assert np.asarray(Image.open(comparison.files["picture"])).shape == (2 * CELL + 4, 3 * (CELL + BAR_WIDTH) + 8, 3)
    assert len(list(csv.DictReader(open(comparison.files["agreement"])))) == 4
