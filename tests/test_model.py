"""SSL-TIE model: shapes, norms, maps, initialisation and the official checkpoint format (import, export, errors)."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from sslt_cli.errors import CheckpointError
from sslt_cli.model import (SSLTIEModel, all_pairs_map, build_model, load_official_checkpoint, localisation_map,
                            save_official_checkpoint, to_official_state_dict)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model() -> SSLTIEModel:
    torch.manual_seed(0)
    net = build_model()
    # Non-trivial BatchNorm statistics, so a round trip that lost buffers would show in eval-mode outputs.
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.num_batches_tracked.fill_(7)
    return net.eval()


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 64, 64, generator=generator), torch.randn(3, 1, 40, 48, generator=generator)


def official_key_shapes() -> dict[str, tuple[int, ...]]:
    """The official AVENet state_dict, rebuilt from torchvision's resnet18 plus the documented extras."""
    resnet = {key: tuple(value.shape) for key, value in torchvision.models.resnet18().state_dict().items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for net in ("imgnet", "audnet"):
        shapes.update({f"{net}.{key}": shape for key, shape in resnet.items()})
        shapes[f"{net}.conv1_a.weight"] = (64, 1, 7, 7)
        shapes[f"{net}.conv1_flow.weight"] = (64, 6, 7, 7)
    shapes.update({"vision_fc1.weight": (512, 1024, 1, 1), "vision_fc1.bias": (512,), "conv3.weight": (1, 1, 1, 1),
                   "conv3.bias": (1,), "norm3.weight": (1,), "norm3.bias": (1,), "norm3.running_mean": (1,),
                   "norm3.running_var": (1,), "norm3.num_batches_tracked": ()})
    return shapes


def test_shapes_and_unit_norms(model, inputs):
    images, spec = inputs
    with torch.no_grad():
        A, v, a = model(images, spec)
    assert v.shape == (3, 512, 4, 4) and a.shape == (3, 512) and A.shape == (3, 1, 4, 4)
    with torch.no_grad():
        # The audio trunk's layer4 also runs at stride 1, as in the official code: 40 x 48 -> 3 x 3 (2 x 2 at stride 2).
        assert model.audio(spec).shape == (3, 512, 3, 3)
    torch.testing.assert_close(v.norm(dim=1), torch.ones(3, 4, 4))
    torch.testing.assert_close(a.norm(dim=1), torch.ones(3))
    assert A.min() >= -1 - 1e-6 and A.max() <= 1 + 1e-6


def test_full_size_frame_gives_a_14x14_map(model):
    with torch.no_grad():
        assert model.embed_image(torch.randn(1, 3, 224, 224)).shape == (1, 512, 14, 14)


def test_maps_are_cosines_and_all_pairs_diagonal_is_the_own_map(model, inputs):
    images, spec = inputs
    with torch.no_grad():
        raw_v, raw_a = model.vision(images), model.audio(spec).amax(dim=(2, 3))
        A, v, a = model(images, spec)
    expected = F.cosine_similarity(raw_v, raw_a[:, :, None, None], dim=1).unsqueeze(1)
    torch.testing.assert_close(A, expected, atol=1e-5, rtol=1e-4)
    pairs = all_pairs_map(v, a)
    assert pairs.shape == (3, 3, 4, 4)
    for i in range(3):
        torch.testing.assert_close(pairs[i, i:i + 1], localisation_map(v, a)[i])
        for j in range(3):
            torch.testing.assert_close(pairs[i, j], (v[i] * a[j][:, None, None]).sum(0), atol=1e-5, rtol=1e-5)


def test_channels_last_gives_the_same_outputs(model, inputs):
    images, spec = inputs
    with torch.no_grad():
        A, _, a = model(images, spec)
        fast = model.to(memory_format=torch.channels_last)
        A_cl, _, a_cl = fast(images.to(memory_format=torch.channels_last), spec.to(memory_format=torch.channels_last))
        model.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(A_cl, A, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a_cl, a, atol=1e-4, rtol=1e-4)


def test_scratch_init_is_the_official_one_and_conv3_norm3_are_frozen():
    torch.manual_seed(3)
    net = build_model()
    bn_weights = torch.cat([m.weight.detach() for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    bn_biases = torch.cat([m.bias.detach() for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    assert abs(bn_weights.mean().item() - 1.0) < 0.005 and 0.015 < bn_weights.std().item() < 0.025
    assert bn_biases.abs().max().item() == 0.0
    # Kaiming normal, fan-out, ReLU gain: std sqrt(2 / (out_channels * k * k)) = sqrt(2 / (512 * 9)) in layer4.
    conv = net.vision.layer4[1].conv2.weight
    assert conv.std().item() == pytest.approx((2 / (512 * 9)) ** 0.5, rel=0.02)
    frozen = {name for name, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {"conv3.weight", "conv3.bias", "norm3.weight", "norm3.bias"}


def test_torchvision_weight_file_as_vision_and_audio_init(tmp_path):
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    net = build_model(vision_init=path, audio_init=str(path))
    torch.testing.assert_close(net.vision.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    torch.testing.assert_close(net.vision.bn1.running_var, reference.bn1.running_var)
    torch.testing.assert_close(net.audio.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(net.audio.layer4[1].bn2.weight, reference.layer4[1].bn2.weight)
    net.eval()
    with torch.no_grad():
        assert net.embed_image(torch.randn(1, 3, 64, 64)).shape == (1, 512, 4, 4)  # layer4 still at stride 1

    # Files saved before PyTorch 0.4 have no BatchNorm num_batches_tracked counters.
    old_style = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(old_style, path)
    torch.testing.assert_close(build_model(vision_init=path).vision.layer1[0].bn1.bias, reference.layer1[0].bn1.bias)


def test_bad_torchvision_init_files(tmp_path):
    with pytest.raises(CheckpointError) as err:
        build_model(vision_init=tmp_path / "nope.pth")
    assert err.value.message == (f"vision init {str(tmp_path / 'nope.pth')!r}: no such file; use 'scratch' or the "
                                 "path of a torchvision resnet18 state_dict file "
                                 "(torchvision.models.resnet18(...).state_dict())")
    state = torchvision.models.resnet18().state_dict()
    del state["layer2.0.downsample.1.running_mean"]
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        build_model(vision_init=path)
    assert err.value.message.startswith(f"{path}: cannot initialise the vision encoder: keys do not match")
    assert err.value.problems == ["missing keys (1): layer2.0.downsample.1.running_mean",
                                  "unexpected keys (1): extra.weight"]


def test_official_export_has_the_official_keys_shapes_and_parameter_count(model):
    official = to_official_state_dict(model)
    assert len(official) == 257
    assert {key: tuple(value.shape) for key, value in official.items()} == official_key_shapes()
    parameters = sum(v.numel() for k, v in official.items() if not k.endswith(("running_mean", "running_var",
                                                                                "num_batches_tracked")))
    # Two ResNet-18s (11,689,512 each, with their fc) + stems (1- and 6-channel) + vision_fc1 + conv3 + norm3.
    assert parameters == 2 * (11_689_512 + 64 * 49 + 64 * 6 * 49) + 1024 * 512 + 512 + 2 + 2 == 23_947_732
    torch.testing.assert_close(official["imgnet.conv1.weight"], model.vision.conv1.weight)
    torch.testing.assert_close(official["audnet.conv1_a.weight"], model.audio.conv1.weight)
    assert official["audnet.conv1.weight"].abs().sum() == 0 and official["vision_fc1.weight"].abs().sum() == 0
    assert int(official["imgnet.bn1.num_batches_tracked"]) == 7


def test_official_round_trip_gives_identical_outputs(model, inputs, tmp_path):
    path = tmp_path / "ckpt" / "epoch3.pth.tar"
    save_official_checkpoint(model, path, epoch=3, best_miou=0.41, iteration=120)
    assert os.listdir(path.parent) == ["epoch3.pth.tar"]  # no temp file left behind
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"epoch", "state_dict", "best_miou", "optimizer", "iteration"}
    assert (raw["epoch"], raw["best_miou"], raw["iteration"]) == (3, 0.41, 120)

    restored = SSLTIEModel()
    restored.load_state_dict(load_official_checkpoint(path))
    restored.eval()
    images, spec = inputs
    with torch.no_grad():
        for before, after in zip(model(images, spec), restored(images, spec)):
            assert torch.equal(before, after)
    for key, value in model.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key


def test_official_pickle_with_module_prefix_and_numpy_best_miou(model, tmp_path):
    # The released trainer stores best_miou as a numpy.float64 and may wrap the model in DataParallel.
    state = {f"module.{key}": value for key, value in to_official_state_dict(model).items()}
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 87, "state_dict": state, "best_miou": np.float64(0.3863), "optimizer": {"state": {}},
                "iteration": 5}, path)
    loaded = load_official_checkpoint(path)
    assert set(loaded) == set(model.state_dict())
    torch.testing.assert_close(loaded["audio.conv1.weight"], model.audio.conv1.weight)

    bare = tmp_path / "bare.pth"
    torch.save(to_official_state_dict(model), bare)
    torch.testing.assert_close(load_official_checkpoint(bare)["norm3.running_var"], model.norm3.running_var)


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00\xff" + bytes(range(62)))
    with pytest.raises(CheckpointError) as err:
        load_official_checkpoint(junk)
    assert err.value.message == f"{junk}: not a checkpoint: a binary file of 64 bytes"

    truncated = tmp_path / "truncated.pth"
    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(100)}}, buffer, _use_new_zipfile_serialization=False)
    truncated.write_bytes(buffer.getvalue()[:101])
    with pytest.raises(CheckpointError) as err:
        load_official_checkpoint(truncated)
    assert err.value.message == (f"{truncated}: a truncated or damaged checkpoint (a pickle of 101 bytes that ends "
                                 "early or is corrupt)")

    missing = tmp_path / "missing.pth"
    with pytest.raises(CheckpointError) as err:
        load_official_checkpoint(missing)
    assert err.value.message == f"{missing}: no such checkpoint file"

    no_state = tmp_path / "no_state.pth"
    torch.save({"epoch": 1, "weights": [1, 2]}, no_state)
    with pytest.raises(CheckpointError) as err:
        load_official_checkpoint(no_state)
    assert err.value.message == (
        f"{no_state}: no 'state_dict' in this file and it is not a state_dict itself (found a dict with keys epoch, "
        "weights); expected the state_dict of SSL-TIE's AVENet (keys imgnet.*, audnet.*, vision_fc1.*, conv3.*, "
        "norm3.*), bare or inside {'state_dict': ...}")


def test_mismatching_official_keys_are_listed(model, tmp_path):
    state = to_official_state_dict(model)
    del state["audnet.layer4.1.bn2.running_var"]
    state["imgnet.dim_mapping.weight"] = torch.zeros(3, 512)
    state["imgnet.fc.weight"] = torch.zeros(10, 512)
    path = tmp_path / "bad.pth.tar"
    torch.save({"epoch": 0, "state_dict": state}, path)
    with pytest.raises(CheckpointError) as err:
        load_official_checkpoint(path)
    assert err.value.message == (
        f"{path}: keys do not match the official SSL-TIE checkpoint; expected the state_dict of SSL-TIE's AVENet "
        "(keys imgnet.*, audnet.*, vision_fc1.*, conv3.*, norm3.*), bare or inside {'state_dict': ...}")
    assert err.value.problems == ["missing keys (1): audnet.layer4.1.bn2.running_var",
                                  "unexpected keys (1): imgnet.dim_mapping.weight",
                                  "wrong shapes (1): imgnet.fc.weight is (10, 512), expected (1000, 512)"]


def test_long_key_lists_are_cut_after_ten(model, tmp_path):
    # Our own state_dict is not the official format: all keys but conv3/norm3 (7) differ; 10 are shown, then a count.
    path = tmp_path / "ours.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_official_checkpoint(path)
    missing, unexpected = err.value.problems
    assert missing.startswith("missing keys (250): imgnet.conv1_a.weight, imgnet.conv1.weight, ")
    assert missing.endswith(", ... (+240 more)") and missing.count(",") == 10
    assert unexpected.startswith("unexpected keys (240): vision.conv1.weight, ") and unexpected.endswith("(+230 more)")


def test_sslt_weights_that_do_not_fit_are_listed(model, tmp_path):
    from sslt_cli.model import load_weights

    state = model.state_dict()
    del state["audio.layer1.0.bn1.bias"]
    state["vision.extra.weight"] = torch.zeros(2)
    state["conv3.weight"] = torch.zeros(2, 1, 1, 1)
    target = build_model()
    with pytest.raises(CheckpointError) as err:
        load_weights(target, state, tmp_path / "last-7.pt")
    assert err.value.message == f"{tmp_path / 'last-7.pt'}: the checkpoint's weights do not fit the SSL-TIE model"
    assert err.value.problems == ["missing keys (1): audio.layer1.0.bn1.bias",
                                  "unexpected keys (1): vision.extra.weight",
                                  "wrong shapes (1): conv3.weight is (2, 1, 1, 1), expected (1, 1, 1, 1)"]
    # a DDP-wrapped model's keys load after the prefix is stripped
    load_weights(target, {f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "ddp.pt")
    torch.testing.assert_close(target.state_dict()["conv3.weight"], model.state_dict()["conv3.weight"])
