"""The metadata shipped in the package, the short names that stand for it, and the published numbers beside results."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sslt_cli import __version__, catalog, published
from sslt_cli.cli import app
from sslt_cli.config import load_recipe
from sslt_cli.data.annotations import load_vggss_json, read_id_list, read_labels
from sslt_cli.errors import DataError, RecipeError

WIDE = {"COLUMNS": "250", "TERMINAL_WIDTH": "250"}


def notice_rows() -> dict[str, tuple[str, str]]:
    """file -> (source column, sha256) from the NOTICE table."""
    rows = {}
    for line in (catalog.RESOURCES_DIR / "NOTICE").read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 4 and re.fullmatch(r"[0-9a-f]{64}", cells[3]):
            rows[cells[0]] = (cells[1], cells[3])
    return rows


def test_every_shipped_file_is_in_the_notice_with_its_sha256_and_source() -> None:
    rows = notice_rows()
    data_files = {p.name for p in catalog.RESOURCES_DIR.iterdir()
                  if p.name != "NOTICE" and not p.name.startswith("LICENSE-")}
    assert set(rows) == data_files == {entry.file for entry in catalog.BUILTINS}
    for name, (source, digest) in rows.items():
        assert hashlib.sha256((catalog.RESOURCES_DIR / name).read_bytes()).hexdigest() == digest, name
        assert re.search(r" @ [0-9a-f]{40}, ", source) or source.startswith("sslt (derived)"), source
    licences = {p.name for p in catalog.RESOURCES_DIR.glob("LICENSE-*.txt")}
    assert licences == {"LICENSE-Apache-2.0.txt", "LICENSE-MIT-SSL-TIE.txt"}
    assert {entry.licence for entry in catalog.BUILTINS} == {"Apache-2.0", "MIT"}


def test_each_list_holds_the_count_its_name_says() -> None:
    for name in catalog.builtin_names("list"):
        count = re.search(r"-(\d+)(k?)$", name)
        assert count, name
        expected = int(count.group(1)) * (1000 if count.group(2) else 1)
        ids = read_id_list(name)
        assert len(ids) == expected == len(set(ids)), name
    annotations, report = load_vggss_json("vggss")
    assert len(annotations) == 5158 and sum(len(a.boxes) for a in annotations.values()) == 5941
    assert len({a.label for a in annotations.values()}) == 221
    assert (len(report.non_finite_or_huge), len(report.degenerate)) == (12, 18)
    assert set(read_id_list("ssltie-vggss-4911")) < set(read_id_list("vggss-5158"))


def test_a_file_that_exists_wins_over_a_built_in_name(tmp_path: Path) -> None:
    # the tests run in tmp_path: a file of the user's called like a built-in list is the one read
    (tmp_path / "ssltie-vggss-4911").write_text("abc_000001\nabc_000002\n")
    assert read_id_list("ssltie-vggss-4911") == ["abc_000001", "abc_000002"]
    assert catalog.resolve_data_file("ssltie-vggss-4911", "list") == Path("ssltie-vggss-4911")
    assert catalog.resolve_data_file("vggss-5158", "list") == catalog.RESOURCES_DIR / "vggss_test_5158.csv"
    assert read_labels("vggss")["zpWuikVorYg_000032"] == "elk bugling"


def test_a_name_of_another_kind_or_no_name_is_a_missing_file_with_the_names_listed() -> None:
    with pytest.raises(DataError) as err:
        read_id_list("vggss")  # the box file is not a test list
    assert err.value.render() == (
        "vggss: test list not found\n"
        "  - or a built-in test list: vggss-5158, ssltie-vggss-4911, vggss-val-247, ssltie-openset-heard-2425, "
        "ssltie-openset-unheard-2463, ezvsl-vggss-heard-2564, ezvsl-vggss-unheard-2575, flickr-249, "
        "slavc-flickr-250, ssltie-flickr-5k (sslt data list)")
    with pytest.raises(DataError) as err:
        load_vggss_json("vggs")
    assert err.value.render() == ("vggs: no such file (expected the VGG-SS box file vggss.json)\n"
                                  "  - or a built-in VGG-SS box file: vggss (sslt data list)")


def test_recipes_and_ablations_by_name_from_any_folder() -> None:
    recipe = load_recipe("quickstart", ["optim.epochs=1"])
    assert (recipe.name, recipe.optim.epochs) == ("quickstart", 1)
    assert load_recipe("ezvsl.yaml").loss.objective == "ezvsl"
    assert catalog.resolve_recipe("baselines", "ablation") == catalog.RECIPES_DIR / "ablations" / "baselines.yaml"
    with pytest.raises(RecipeError) as err:
        load_recipe("quickstrat")
    assert err.value.render() == (
        "quickstrat: recipe file not found\n"
        f"  - give a path, or the name of one shipped with sslt: {', '.join(catalog.builtin_recipes())}")
    assert {"ezvsl", "lvs", "quickstart", "tie_code", "tie_full", "tie_openset"} <= set(catalog.builtin_recipes())


def test_version_is_the_package_version_and_the_only_place_it_is_written(repo_root: Path) -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert (result.exit_code, result.stdout) == (0, f"sslt {__version__}\n")
    pyproject = (repo_root / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'version = {attr = "sslt_cli.__version__"}' in pyproject
    assert not re.search(r"^version\s*=\s*\"", pyproject, re.MULTILINE)  # no literal version string


def test_data_list_prints_every_built_in_with_its_count_and_source() -> None:
    result = CliRunner().invoke(app, ["data", "list"], env=WIDE)
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    for entry in catalog.BUILTINS:
        assert entry.name in text and entry.licence in text
    for shown in ("5158 clips (5941 boxes, 221 classes)", "4911 clips", "2575 clips", "250 pairs",
                  "SSL-TIE @ c49e6a9, metadata/test_vggss_4911.txt", "ezvsl, lvs, quickstart",
                  "baselines, geo_weight, hard_factors, paper_transformations, per_transform"):
        assert shown in text, shown


# --- published numbers --------------------------------------------------------------------------------------------

def test_a_published_list_is_recognised_by_its_ids_whatever_their_order() -> None:
    ids = read_id_list("ssltie-vggss-4911")
    assert published.identify_list(list(reversed(ids)) + ids[:3]) == "ssltie-vggss-4911"
    assert published.identify_list(ids[:-1]) is None
    assert published.identify_list(read_id_list("vggss-val-247")) is None  # a list nobody published on
    assert published.lookup(ids[:10], "ssltie") is None


def test_lookup_marks_what_was_measured_on_another_list_or_protocol() -> None:
    found = published.lookup(read_id_list("vggss-5158"), "ezvsl")
    assert (found["list"], found["benchmark"]) == ("vggss-5158", "vggss")
    by_method = {e["method"]: e for e in found["entries"]}
    assert set(by_method) == {"SSL-TIE", "LVS", "EZ-VSL", "FNAC", "SSL-Align"}
    assert (by_method["EZ-VSL"]["same_list"], by_method["EZ-VSL"]["same_protocol"]) == (True, True)
    assert (by_method["SSL-TIE"]["same_list"], by_method["SSL-TIE"]["same_protocol"]) == (False, False)
    assert (by_method["FNAC"]["same_list"], by_method["FNAC"]["same_protocol"]) == (None, False)
    assert (by_method["EZ-VSL"]["ciou"], by_method["EZ-VSL"]["auc"]) == (0.3885, 0.3954)
    assert "REFERENCE.md s.8" in by_method["EZ-VSL"]["cited"] and "ECCV 2022" in by_method["EZ-VSL"]["paper"]
    heard = published.lookup(read_id_list("ezvsl-vggss-heard-2564"), "ssltie")
    assert [(e["ciou"], e["auc"], e["same_list"]) for e in heard["entries"]] == [(0.390, 0.403, False)]
    flickr = published.lookup(read_id_list("flickr-249"), "ssltie")
    assert len(flickr["entries"]) == 11 and {e["same_list"] for e in flickr["entries"]} == {None}


def test_the_readme_table_of_published_numbers_is_the_module_s(repo_root: Path) -> None:
    readme = (repo_root / "README.md").read_text()
    lines = readme.split("### Published numbers", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method | benchmark |"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    table = lines[start + 2:end]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table]
    expected = [[e.method, e.benchmark, e.trained_on, e.test_list or "not stated", e.protocol or "not stated",
                 f"{100 * e.ciou:.2f}", "-" if e.auc is None else f"{100 * e.auc:.2f}"]
                for e in published.PUBLISHED]
    assert [row[:7] for row in rows] == expected


def test_the_eval_table_and_metrics_json_carry_them() -> None:
    import numpy as np
    from rich.console import Console

    from sslt_cli import evaluate

    ids = read_id_list("ssltie-openset-heard-2425")
    boxes, _ = load_vggss_json("vggss")
    # the whole list is requested; only 3 clips have boxes here, so the scoring is quick and the list still is the
    # published one (the others are excluded as "no annotation" and counted)
    annotations = {cid: boxes[cid] for cid in ids[:3]}
    maps = {cid: np.random.default_rng(0).random((14, 14), dtype=np.float32) for cid in ids[:3]}
    result = evaluate.score_maps(maps, annotations, "ssltie", ids, baselines=False, name="heard")
    console = Console(width=250, record=True)
    console.print(evaluate.result_table(result))
    text = " ".join(console.export_text().split())
    assert "published: SSL-TIE, VGGSound, 110 heard classes (70k) │ 39.00 │ 40.30 │ - │ - │ - │" in text
    assert "ssltie-openset-heard-2425 is a published list" in text
    saved = evaluate.result_dict(result)["published"]
    assert saved["list"] == "ssltie-openset-heard-2425" and saved["entries"][0]["same_list"] is True
    assert result.n == 3 and result.accounting["no_annotation"] == 2422
