"""`sslt eval | localize | retrieve | export` with released checkpoints of other methods (issue 19 items 2 and 5):
each family with its own front end and preset, `--family` and `--branch`, and `sslt export --family` round trips.
The commands run as subprocesses on a 12-clip synthetic set; those that run a model on it are marked slow (the
orchestrator's path with a family runs in-process in tests/test_families.py)."""
from __future__ import annotations

import json

import pytest
import torch

import official_restated as O
from sslt_cli import families
from sslt_cli.cli import FAMILY_CHOICES
from test_cli import sslt

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from sslt_cli.data.synthetic import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, n_train=0, n_val=0, n_test=12, n_flickr=0, image_size=64, workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("released")
    out = {}
    for name, net, container, prefix in (("ezvsl", O.EZVSL, "model", "module."),
                                         ("slavc", O.SLAVC, "model", "module."),
                                         ("lvs", O.LvsAVENet, "model_state_dict", "module.")):
        out[name] = O.save_released(O.random_state(net(), 3), folder / f"{name}_best.pth", container, prefix)
    return out


def test_the_cli_names_every_family():
    assert FAMILY_CHOICES == families.FAMILY_NAMES


@pytest.mark.slow
def test_eval_a_released_ezvsl_checkpoint_under_its_own_preset(synthetic, checkpoints, tmp_path):
    result = sslt("eval", str(checkpoints["ezvsl"]), "--data", str(synthetic / "test_vggss"), "--out",
                  str(tmp_path / "ev"), "--device", "cpu", env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "EZ-VSL" in result.stdout and "protocol ezvsl" in result.stdout and "N = 12" in result.stdout
    (folder,) = (tmp_path / "ev").iterdir()
    assert folder.name == "test_vggss-ezvsl_best-ezvsl"
    notes = json.loads((folder / "metrics.json").read_text())["notes"]
    assert any(note.startswith("family ezvsl: recognised as EZ-VSL from its keys") for note in notes)
    assert any("audio front end: EZ-VSL: PyAV" in note for note in notes)


@pytest.mark.slow
def test_eval_family_and_branch_options(synthetic, checkpoints, tmp_path):
    result = sslt("eval", str(checkpoints["slavc"]), "--data", str(synthetic / "test_vggss"), "--branch", "momentum",
                  "--protocol", "slavc_abs", "--out", str(tmp_path / "ev"), "--device", "cpu",
                  env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "SLAVC, momentum branch" in result.stdout and "protocol slavc_abs" in result.stdout
    wrong = sslt("eval", str(checkpoints["lvs"]), "--data", str(synthetic / "test_vggss"), "--family", "slavc",
                 "--device", "cpu")
    assert wrong.returncode == 1 and "the weights do not fit SLAVC's network" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    bad = sslt("eval", str(checkpoints["lvs"]), "--family", "avenet")
    assert bad.returncode == 1 and "--family 'avenet' is not one of ssltie, lvs, ssl_align" in bad.stderr


@pytest.mark.slow
def test_localize_names_the_family_on_its_page(synthetic, checkpoints, tmp_path):
    frame = next((synthetic / "test_vggss" / "frame").iterdir())
    audio = synthetic / "test_vggss" / "audio" / f"{frame.stem}.wav"
    result = sslt("localize", str(checkpoints["lvs"]), "--image", str(frame), "--audio", str(audio), "--out",
                  str(tmp_path / "loc"), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "loc" / "index.html").read_text()
    assert "(LVS)" in page and "family lvs: recognised as LVS from its keys" in page
    assert "audio front end: LVS: soundfile" in page and "protocol lvs" in page


@pytest.mark.slow
def test_retrieve_with_a_released_checkpoint(synthetic, checkpoints, tmp_path):
    result = sslt("retrieve", str(checkpoints["ezvsl"]), "--data", str(synthetic / "test_vggss"), "--task", "a2i",
                  "--out", str(tmp_path / "ret"), "--device", "cpu", "--gallery-rows", "0")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "ret" / "test_vggss" / "a2i" / "metrics.json").read_text())
    assert metrics["task"] == "a2i" and 0 < metrics["metrics"]["map"] <= 1


def test_export_family_round_trips(checkpoints, tmp_path):
    from typer.testing import CliRunner

    from sslt_cli.cli import app
    from sslt_cli.errors import CheckpointError

    for source, target in (("ezvsl", "fnac"), ("slavc", "slavc"), ("lvs", "ssl_align")):
        out = tmp_path / f"{source}_as_{target}.pth"
        result = CliRunner().invoke(app, ["export", str(checkpoints[source]), "--family", target, "--out", str(out)])
        assert result.exit_code == 0, f"{result.exception!r} {result.output}"
        assert f"{families.FAMILIES[target].title} ({{'{families.FAMILIES[target].container}'" in result.stdout
        loaded = families.load_released(out)
        assert loaded.family == ("ezvsl" if target == "fnac" else target)  # FNAC's files have EZ-VSL's keys
        original = families.load_released(checkpoints[source])
        for key, value in original.model.state_dict().items():
            if not key.startswith(("conv3.", "norm3.")):  # kept by sslt's network, absent from LVS's files
                assert torch.equal(loaded.model.state_dict()[key], value), (source, target, key)
    refused = CliRunner().invoke(app, ["export", str(checkpoints["ezvsl"]), "--family", "lvs", "--out",
                                       str(tmp_path / "no.pth")])
    assert isinstance(refused.exception, CheckpointError)
    assert refused.exception.message.startswith("the EZ-VSL network cannot be written as LVS")
