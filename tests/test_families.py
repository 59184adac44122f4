"""Model families (issue 19): one registry, one loader. Released files are built here in each repository's format
from random weights (the networks re-stated in tests/official_restated.py); the loader recognises each from its keys,
never its name, strips ``module.``, and refuses a missing, extra or wrong-shape key by name."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import official_restated as O
from sslt_cli import families
from sslt_cli.errors import CheckpointError
from sslt_cli.protocols import PROTOCOLS

torch.set_num_threads(1)

# family -> (the re-stated official network, container key, prefix as released)
RELEASED = {
    "lvs": (O.LvsAVENet, "model_state_dict", "module."),
    "ssl_align": (O.LvsAVENet, "model_state_dict", ""),
    "ezvsl": (O.EZVSL, "model", "module."),
    "slavc": (O.SLAVC, "model", "module."),
}


def released_file(tmp_path: Path, family: str, seed: int = 0, name: str | None = None) -> tuple[Path, torch.nn.Module]:
    """A checkpoint in ``family``'s released format with random weights, and the official network holding them."""
    net_class, container, prefix = RELEASED[family]
    net = net_class()
    state = O.random_state(net, seed)
    path = tmp_path / (name or f"{family}.pth")
    return O.save_released(state, path, container, prefix, epoch=3), net.eval()


def test_the_registry_is_consistent():
    assert families.FAMILY_NAMES == ("ssltie", "lvs", "ssl_align", "ezvsl", "fnac", "slavc")
    for family in families.FAMILIES.values():
        assert all(preset in PROTOCOLS for preset in family.presets), family.name
        assert family.recipe().eval.protocol == family.protocol
        assert family.recipe().audio.front_end == family.front_end


@pytest.mark.parametrize("family", list(RELEASED))
def test_a_released_file_is_recognised_from_its_keys_not_its_name(tmp_path, family):
    # the file name says another method: only the keys count
    path, _ = released_file(tmp_path, family, name="fnac_model_of_ssltie.pth")
    loaded = families.load_released(path)
    assert loaded.family == family and loaded.front_end == families.FAMILIES[family].front_end
    assert loaded.recipe.eval.protocol == families.FAMILIES[family].protocol
    assert loaded.notes[0].startswith(f"family {family}: recognised as {families.FAMILIES[family].title}")


def test_ezvsl_and_fnac_share_keys_and_family_overrides(tmp_path):
    path, _ = released_file(tmp_path, "ezvsl")
    loaded = families.load_released(path)
    assert loaded.family == "ezvsl" and "fnac has the same keys" in loaded.notes[0]
    fnac = families.load_released(path, "fnac")
    assert fnac.family == "fnac" and fnac.recipe.eval.protocol == "fnac" and "--family fnac" in fnac.notes[0]
    with pytest.raises(CheckpointError) as info:
        families.load_released(path, "slavc")
    assert "the weights do not fit SLAVC's network" in info.value.message
    assert any("missing keys" in d and "img_proj1.weight" in d for d in info.value.problems)


def _edited(tmp_path: Path, edit) -> Path:
    path, _ = released_file(tmp_path, "ezvsl")
    payload = torch.load(path)
    edit(payload["model"])
    torch.save(payload, path)
    return path


def test_missing_extra_and_wrong_shape_keys_are_named(tmp_path):
    missing = _edited(tmp_path, lambda s: s.pop("module.aud_proj.bias"))
    with pytest.raises(CheckpointError) as info:
        families.load_released(missing)
    assert info.value.problems == ["missing keys (1): aud_proj.bias"]
    extra = _edited(tmp_path, lambda s: s.update({"module.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError) as info:
        families.load_released(extra)
    assert info.value.problems == ["unexpected keys (1): extra.weight"]
    wrong = _edited(tmp_path, lambda s: s.update({"module.img_proj.bias": torch.zeros(3)}))
    with pytest.raises(CheckpointError) as info:
        families.load_released(wrong)
    assert info.value.problems == ["wrong shapes (1): img_proj.bias is (3,), expected (512,)"]


def test_an_unrelated_network_lists_what_each_family_expects(tmp_path):
    from torchvision.models import resnet18

    path = tmp_path / "resnet.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        families.load_released(path)
    assert info.value.message.startswith("the keys match no model family (found 122 keys: bn1.bias")
    assert len(info.value.problems) == len(families.FAMILIES)
    assert info.value.problems[3] == ("ezvsl (EZ-VSL): {'model': state_dict} with keys img_proj.weight, "
                                     "aud_proj.weight")
    torch.save({"epoch": 1}, path)
    with pytest.raises(CheckpointError, match=r"no state_dict found .* found a dict with keys epoch"):
        families.load_released(path)


def test_lvs_keys_load_into_the_ssltie_network_and_back(tmp_path):
    path, net = released_file(tmp_path, "lvs")
    loaded = families.load_released(path)
    written = families.export_released(loaded, "lvs", tmp_path / "again.pth")
    again = torch.load(written)
    original = torch.load(path)
    assert set(again) == {"model_state_dict", "epoch"}
    for key, value in original["model_state_dict"].items():
        if ".conv1_flow." in key or ".fc." in key or key.endswith(("imgnet.conv1_a.weight", "audnet.conv1.weight")):
            continue  # stems and heads the forward never reads are written as zeros
        assert torch.equal(again["model_state_dict"][key], value), key


def test_slavc_branches_and_branch_checks(tmp_path):
    path, _ = released_file(tmp_path, "slavc")
    online = families.load_released(path)
    momentum = families.load_released(path, branch="momentum")
    assert online.model.branch == "online" and momentum.model.branch == "momentum"
    assert "momentum branch" in momentum.notes[0] and momentum.label == "SLAVC, momentum branch"
    image, spec = torch.randn(1, 3, 224, 224), torch.randn(1, 1, 257, 200)
    with torch.no_grad():
        assert not torch.allclose(online.model(image, spec)[0], momentum.model(image, spec)[0])
    ez, _ = released_file(tmp_path, "ezvsl")
    with pytest.raises(CheckpointError, match="EZ-VSL has one branch"):
        families.load_released(ez, branch="momentum")


def test_an_sslt_checkpoint_is_the_ssltie_family(tmp_path):
    from sslt_cli.checkpoint import save_official_checkpoint
    from sslt_cli.model import build_model

    path = save_official_checkpoint(build_model(), tmp_path / "official.pth.tar")
    loaded = families.load_released(path)
    assert loaded.family == "ssltie" and loaded.front_end == "logmel" and loaded.recipe.eval.protocol == "ssltie"
    written = families.export_released(loaded, "lvs", tmp_path / "as_lvs.pth")
    assert families.load_released(written).family == "lvs"
    with pytest.raises(CheckpointError, match="the SSL-TIE network cannot be written as EZ-VSL"):
        families.export_released(loaded, "ezvsl", tmp_path / "no.pth")


def test_predict_maps_goes_through_the_family(tmp_path, write_noise_clips):
    from sslt_cli.evaluate import get_protocol, predict_maps

    clips = list(write_noise_clips(tmp_path, ["a", "b"], 64, 0).values())
    for family in ("lvs", "ezvsl"):
        path, _ = released_file(tmp_path, family)
        loaded = families.load_released(path)
        maps, skipped = predict_maps(loaded, clips, get_protocol(loaded.recipe.eval.protocol), device="cpu",
                                     num_workers=0)
        side = 14 if family == "lvs" else 7
        assert not skipped and {k: m.shape for k, m in maps.items()} == {"a": (side, side), "b": (side, side)}


class _Sink:
    def __init__(self):
        self.records = []

    def log(self, kind, step, values, *, fields=None, mlflow=None):
        self.records.append((kind, dict(fields or {}), dict(values)))

    def artifact(self, path, folder=None):
        pass


def test_the_orchestrator_evaluates_a_family_as_one_more_source(tmp_path):
    from sslt_cli import evaluate as ev
    from sslt_cli.data.synthetic import generate

    generate(tmp_path / "synth", n_train=0, n_val=0, n_test=3, n_flickr=0, image_size=64, workers=1, progress=False)
    test = ev.load_test_set(tmp_path / "synth" / "test_vggss")
    path, _ = released_file(tmp_path, "ezvsl")
    sink = _Sink()
    evaluation = ev.run_evaluation([ev.Source.checkpoint_file("released", path, family="fnac")], [("synth", test)],
                                   ev.EvalOptions(baselines=False, save_maps=False, num_workers=0), sink,
                                   out=tmp_path / "eval", kind="eval")
    (item,) = evaluation.items
    assert item.protocol == "fnac" and item.result.n == 3 and item.name == "synth-released-fnac"
    assert item.described == "released (FNAC, ezvsl.pth)"
    assert any(note.startswith("family fnac: FNAC (--family fnac)") for note in item.result.notes)
    assert sink.records[0][1]["protocol"] == "fnac" and sink.records[0][2]["n"] == 3


def test_slavcs_extended_evaluation_uses_the_familys_range(tmp_path):
    from sslt_cli import evaluate as ev
    from sslt_cli.data.synthetic import generate

    generate(tmp_path / "synth", n_train=0, n_val=0, n_test=3, n_flickr=0, image_size=64, workers=1, progress=False)
    test = ev.load_test_set(tmp_path / "synth" / "test_vggss")
    path, _ = released_file(tmp_path, "slavc")
    a, b, c = test.ids
    options = ev.EvalOptions(baselines=False, save_maps=False, num_workers=0,
                             extended=ev.ExtendedPairs(((a, b), (b, c))))
    (item,) = ev.run_evaluation([ev.Source.checkpoint_file("slavc", path)], [("synth", test)], options, _Sink(),
                                out=None, kind="eval").items
    extended = item.result.extended
    assert extended.protocol == "slavc_rel" and extended.value_range == (-1 / 0.03, 1 / 0.03)
    assert (extended.n_sounding, extended.n_silent) == (3, 2)
