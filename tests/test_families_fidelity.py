"""Fidelity of every released family (issue 19 item 3): a checkpoint in the released format with random weights; sslt's
front end equals the repository's test loader (re-stated in tests/official_restated.py), sslt's maps equal the
re-stated forward pass to float tolerance, and the per-clip IoUs under the family's preset equal the repository's
own test loop on those maps exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import official_restated as O
from sslt_cli import families
from sslt_cli import metrics as M
from sslt_cli.data.annotations import Annotation
from sslt_cli.errors import CheckpointError
from sslt_cli.evaluate import get_protocol, predict_maps, score_maps
from sslt_cli.frontends import spectrogram_of_file

torch.set_num_threads(1)

# family -> (official network factory, container, prefix, official front end, official image transform)
CASES = {
    "lvs": (O.LvsAVENet, "model_state_dict", "module.", O.lvs_spectrogram, O.image_resize_centercrop),
    "ssl_align": (O.LvsAVENet, "model_state_dict", "", O.align_lvs_spectrogram, O.image_tensor_resize),
    "ezvsl": (O.EZVSL, "model", "module.", O.ezvsl_spectrogram, O.image_resize_square),
    "fnac": (O.EZVSL, "model", "module.", O.ezvsl_spectrogram, O.image_resize_square),
    "slavc": (O.SLAVC, "model", "module.", O.ezvsl_spectrogram, O.image_resize_square),
}
BOXES = {"c0": ((0.1, 0.2, 0.6, 0.7),), "c1": ((0.4, 0.0, 1.0, 0.5), (0.0, 0.6, 0.3, 1.0)), "c2": ((0.2, 0.2, 0.8, 0.8),)}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Three clips: frames of different shapes, 16 kHz mono audio of 2.5 s, 4 s and 11 s (tiled, centred, cut)."""
    import soundfile as sf
    from PIL import Image

    from sslt_cli.data.manifest import Clip

    folder = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(19)
    out = []
    for cid, (w, h), seconds in zip(BOXES, ((96, 64), (64, 96), (80, 80)), (2.5, 4.0, 11.0)):
        frame, audio = folder / f"{cid}.jpg", folder / f"{cid}.wav"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(frame)
        t = np.arange(int(16000 * seconds)) / 16000
        wave = 0.4 * np.sin(2 * np.pi * (300 + 200 * rng.random()) * t) + rng.uniform(-0.3, 0.3, t.shape)
        sf.write(audio, wave.astype(np.float32), 16000, subtype="PCM_16")
        out.append(Clip(cid, frame=str(frame), audio=str(audio)))
    return out


def _released(tmp_path, family: str, seed: int = 1, **network_options):
    net_class, container, prefix, _, _ = CASES[family]
    net = net_class(**network_options)
    state = O.random_state(net, seed)
    return O.save_released(state, tmp_path / f"{family}.pth", container, prefix, epoch=0), net.eval()


FRONT_ENDS = {"lvs": (O.lvs_spectrogram, 671), "align_lvs": (O.align_lvs_spectrogram, 299),
              "ezvsl": (O.ezvsl_spectrogram, 200), "align_ezvsl": (O.align_ezvsl_spectrogram, 200)}


@pytest.mark.parametrize("front_end", list(FRONT_ENDS))
def test_the_front_end_equals_the_released_loader(clips, front_end):
    official, width = FRONT_ENDS[front_end]
    for clip in clips:
        ours = spectrogram_of_file(clip.audio, front_end)
        theirs = official(clip.audio)
        assert ours.dtype == torch.float32 and ours.shape == theirs.shape, clip.id
        assert torch.equal(ours, theirs), clip.id
    assert tuple(spectrogram_of_file(clips[0].audio, front_end).shape) == (1, 257, width)


def _official_maps(family: str, net, clips, spectrogram=None, image=None) -> dict[str, torch.Tensor]:
    spectrogram = spectrogram or CASES[family][3]
    image = image or CASES[family][4]
    return {c.id: O.official_map(family, net, image(c.frame)[None], spectrogram(c.audio)[None]) for c in clips}


@pytest.mark.parametrize("family, presets, options", [
    ("lvs", ("lvs",), {}),
    ("ssl_align", ("align_lvs",), {}),
    ("ezvsl", ("ezvsl",), {}),
    ("fnac", ("fnac",), {}),
    ("slavc", ("slavc_rel", "slavc_abs"), {"branch": None}),
    ("slavc", ("slavc_rel",), {"branch": "momentum"}),
])
def test_maps_and_ious_equal_the_released_code(tmp_path, clips, family, presets, options):
    branch = options.get("branch")
    network_options = {"use_mom_eval": True} if branch == "momentum" else {}
    path, net = _released(tmp_path, family, **network_options)
    loaded = families.load_released(path, family if family == "fnac" else None, branch=branch)
    assert loaded.family == family and loaded.recipe.eval.protocol == presets[0]
    ours, skipped = predict_maps(loaded, clips, get_protocol(presets[0]), device="cpu", batch_size=1, num_workers=0)
    assert not skipped
    theirs = _official_maps(family, net, clips)
    scale = 1.0 if family in ("lvs", "ssl_align") else 1 / 0.03
    for cid, official in theirs.items():
        np.testing.assert_allclose(ours[cid], official[0, 0].numpy(), rtol=0, atol=2e-6 * scale, err_msg=cid)
    annotations = {cid: Annotation(cid, "vggss", boxes) for cid, boxes in BOXES.items()}
    for preset in presets:
        result = score_maps(ours, annotations, get_protocol(preset), list(BOXES), baselines=False)
        got = {row.id: row.iou for row in result.rows}
        expected = {cid: O.upsample_and_score(torch.from_numpy(ours[cid])[None, None],
                                              M.gt_map(BOXES[cid], "vggss"), preset) for cid in BOXES}
        assert got == expected, preset
        # the official loop on the official maps gives the same IoUs
        official = {cid: O.upsample_and_score(theirs[cid], M.gt_map(BOXES[cid], "vggss"), preset) for cid in BOXES}
        assert official == expected, preset


def test_common_scale_brings_every_family_to_the_cosine_scale():
    maps = torch.tensor([[-1 / 0.03, 0.0, 1 / 0.03]])
    assert torch.allclose(families.to_common(maps, "ezvsl"), torch.tensor([[0.0, 0.5, 1.0]]))
    assert torch.allclose(families.to_common(torch.tensor([[-1.0, 0.0, 1.0]]), "lvs"), torch.tensor([[0.0, 0.5, 1.0]]))


def test_sslalignments_evaluation_of_ezvsl_is_a_front_end_and_a_preset(tmp_path, clips):
    """SSLalignment feeds EZ-VSL its rolled first 10 s and ToTensor-then-resize frames, and scores with a strict
    median: --front-end align_ezvsl with --protocol align."""
    path, net = _released(tmp_path, "ezvsl")
    loaded = families.load_released(path, front_end="align_ezvsl")
    assert loaded.front_end == "align_ezvsl" and "SSLalignment (EZ-VSL, SLAVC models)" in loaded.notes[1]
    ours, _ = predict_maps(loaded, clips, get_protocol("align"), device="cpu", batch_size=1, num_workers=0)
    theirs = _official_maps("ezvsl", net, clips, O.align_ezvsl_spectrogram, O.image_tensor_resize)
    for cid, official in theirs.items():
        np.testing.assert_allclose(ours[cid], official[0, 0].numpy(), rtol=0, atol=2e-6 / 0.03, err_msg=cid)
    annotations = {cid: Annotation(cid, "vggss", boxes) for cid, boxes in BOXES.items()}
    result = score_maps(ours, annotations, get_protocol("align"), list(BOXES), baselines=False)
    official_ious = {cid: O.upsample_and_score(theirs[cid], M.gt_map(BOXES[cid], "vggss"), "align") for cid in BOXES}
    assert {row.id: row.iou for row in result.rows} == official_ious
    with pytest.raises(CheckpointError, match="--front-end lvs: EZ-VSL is fed by ezvsl or align_ezvsl"):
        families.load_released(path, front_end="lvs")
