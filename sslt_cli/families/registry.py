"""The registry of model families: :class:`Family` entries in :data:`FAMILIES` (see the package notes)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from sslt_cli.checkpoint import _key_problems, _strip_wrapper_prefixes, official_state, to_official_state_dict
from sslt_cli.config import AudioConfig, EvalConfig, Recipe
from sslt_cli.errors import CheckpointError
from sslt_cli.families.networks import BRANCHES, TAU, EzvslNet, SlavcNet

_LVS_SKIP = ("vision_fc1.", "conv3.", "norm3.")
_CONTAINERS = ("model", "model_state_dict", "state_dict")


def _avenet(branch: str) -> nn.Module:
    from sslt_cli.model import build_model

    return build_model()


def _ezvsl(branch: str) -> nn.Module:
    return EzvslNet()


def _slavc(branch: str) -> nn.Module:
    return SlavcNet(branch=branch)


def _own_keys(state: Mapping[str, torch.Tensor], model: nn.Module, path: Path, title: str) -> dict[str, torch.Tensor]:
    """A released state_dict whose keys are the network's own, checked key by key and shape by shape."""
    problems = _key_problems({k: v.shape for k, v in model.state_dict().items()}, state)
    if problems:
        raise CheckpointError(f"{path}: the weights do not fit {title}'s network", problems)
    return dict(state)


def _lvs_keys(state: Mapping[str, torch.Tensor], model: nn.Module, path: Path, title: str) -> dict[str, torch.Tensor]:
    """LVS's AVENet keys (SSL-TIE's official keys without vision_fc1, conv3, norm3) -> sslt's SSL-TIE network (its
    conv3 / norm3, which no forward reads, kept)."""
    ours = official_state(state, path, skip=_LVS_SKIP)
    own = model.state_dict()
    ours.update({k: own[k] for k in own if k.startswith(("conv3.", "norm3."))})
    return ours


def _ssltie_keys(state: Mapping[str, torch.Tensor], model: nn.Module, path: Path,
                 title: str) -> dict[str, torch.Tensor]:
    return official_state(state, path)


def _released_own(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in _strip_wrapper_prefixes(dict(model.state_dict())).items()}


def _released_lvs(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in to_official_state_dict(model).items() if not k.startswith(_LVS_SKIP)}


@dataclass(frozen=True)
class Family:
    """One released model family (see the module notes).

    ``network(branch)``: a new network; ``network_kind``: families with one kind share a network (a file of one can
    be written in the other's format); ``signature``: keys (prefixes removed) that identify its files; ``prefixed``:
    whether its released files carry ``module.`` (True / False; None: either), what tells two families with the
    same keys apart; ``to_network(state, model, path, title)``: the released keys -> the network's state_dict,
    checked; ``released(model)``: the network -> the released keys (no prefix); ``container``: the dict key its
    files keep the weights under; ``extras``: the other entries its files hold; ``front_end``: its audio front end;
    ``presets``: its protocol presets (the first is its own test's); ``value_range``: the range of its raw maps (what
    :func:`to_common` maps to [0, 1]); ``branches``: the networks' branches (SLAVC: online, momentum);
    ``export_prefix``: the prefix its released files carry (``module.`` from DataParallel/DDP); ``published``: the
    method's name among the papers' numbers (:mod:`sslt_cli.published`; '' when none is recorded);
    ``other_front_ends``: front ends another evaluator feeds it (SSLalignment's), chosen with ``--front-end``.
    """

    name: str
    title: str
    repository: str
    released_files: str
    network: Callable[[str], nn.Module]
    network_kind: str
    signature: tuple[str, ...]
    to_network: Callable[[Mapping[str, torch.Tensor], nn.Module, Path, str], dict[str, torch.Tensor]]
    released: Callable[[nn.Module], dict[str, torch.Tensor]]
    container: str
    front_end: str
    presets: tuple[str, ...]
    value_range: tuple[float, float]
    prefixed: bool | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)
    branches: tuple[str, ...] = ("online",)
    published: str = ""
    export_prefix: str = "module."
    other_front_ends: tuple[str, ...] = ()

    @property
    def protocol(self) -> str:
        """The default preset: the method's own test code."""
        return self.presets[0]

    def expects(self) -> str:
        """What a file of this family looks like, in words (for the error of a file that matches none)."""
        prefix = {True: " with 'module.'", False: " without 'module.'", None: ""}[self.prefixed]
        return f"{self.name} ({self.title}): {{'{self.container}': state_dict{prefix}}} with keys " \
               f"{', '.join(self.signature)}"

    def recipe(self, front_end: str | None = None) -> Recipe:
        """The recipe that describes this family's inputs: its front end (or ``front_end``, one of
        ``other_front_ends``), its default preset, fp32 maps."""
        return Recipe(audio=AudioConfig(front_end=front_end or self.front_end),
                      eval=EvalConfig(protocol=self.protocol, precision="fp32"))


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("ssltie", "SSL-TIE", "OpenNLPLab/SSL-TIE", "SSL-TIE's released checkpoints (and every sslt checkpoint)",
           _avenet, "avenet", ("imgnet.conv1_a.weight", "audnet.conv1_a.weight", "vision_fc1.weight"),
           _ssltie_keys, to_official_state_dict, "state_dict", "logmel", ("ssltie",), (-1.0, 1.0),
           extras={"epoch": 0, "best_miou": 0.0, "optimizer": None, "iteration": 0}, export_prefix="",
           published="SSL-TIE"),
    Family("lvs", "LVS", "hche11/Localizing-Visual-Sounds-the-Hard-Way@8fe8cbb",
           "the Flickr and VGG-SS models linked from LVS's README ('model_state_dict', keys module.imgnet.*)",
           _avenet, "avenet", ("imgnet.conv1_a.weight", "audnet.conv1_a.weight"), _lvs_keys, _released_lvs,
           "model_state_dict", "lvs", ("lvs",), (-1.0, 1.0), prefixed=True, extras={"epoch": 0},
           other_front_ends=("align_lvs",),
           published="LVS"),
    Family("ssl_align", "SSL-Align (LVS AVENet)", "kaistmm/SSLalignment@e7ae3c5",
           "ours_sup.pth.tar, ours_selfsup.pth.tar, ours_sup_previs.pth.tar ('model_state_dict', no 'module.')",
           _avenet, "avenet", ("imgnet.conv1_a.weight", "audnet.conv1_a.weight"), _lvs_keys, _released_lvs,
           "model_state_dict", "align_lvs", ("align_lvs", "align_lvs_bilinear"), (-1.0, 1.0), prefixed=False,
           other_front_ends=("lvs",),
           extras={"epoch": 0}, export_prefix="", published="SSL-Align"),
    Family("ezvsl", "EZ-VSL", "stoneMo/EZ-VSL@95ff5bf",
           "checkpoints_release/<experiment>/best.pth ({'model': ...} saved from DDP, keys module.*)",
           _ezvsl, "ezvsl", ("img_proj.weight", "aud_proj.weight"), _own_keys, _released_own, "model", "ezvsl",
           ("ezvsl", "align"), (-1.0 / TAU, 1.0 / TAU), prefixed=None,
           extras={"epoch": 0, "best_cIoU": 0.0, "best_Auc": 0.0, "optimizer": None}, published="EZ-VSL", other_front_ends=("align_ezvsl",)),
    Family("fnac", "FNAC", "OpenNLPLab/FNAC_AVL@0a0ca78",
           "<model_dir>/<experiment>/best.pth ({'model': ...}, keys module.*; the same keys as EZ-VSL's)",
           _ezvsl, "ezvsl", ("img_proj.weight", "aud_proj.weight"), _own_keys, _released_own, "model", "ezvsl",
           ("fnac", "fnac_bicubic", "align"), (-1.0 / TAU, 1.0 / TAU), prefixed=None,
           extras={"epoch": 0, "best_cIoU": 0.0, "best_Auc": 0.0, "optimizer": None}, published="FNAC", other_front_ends=("align_ezvsl",)),
    Family("slavc", "SLAVC", "stoneMo/SLAVC@05b429c",
           "checkpoints_slavc/vggss144k_slavc/latest.pth ({'model': ...}, keys module.*, with momentum_*)",
           _slavc, "slavc", ("img_proj1.weight", "img_proj2.weight", "momentum_imgnet.conv1.weight"), _own_keys,
           _released_own, "model", "ezvsl", ("slavc_rel", "slavc_abs", "align"), (-1.0 / TAU, 1.0 / TAU),
           prefixed=None, extras={"epoch": 0, "best_Precision": 0.0, "best_AP": 0.0, "best_F1": 0.0,
                                  "optimizer": None}, branches=BRANCHES, other_front_ends=("align_ezvsl",)),
)}
FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise CheckpointError(f"unknown model family {name!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def to_common(maps: torch.Tensor, family: str) -> torch.Tensor:
    """A family's raw maps -> the common scale (cos + 1) / 2 in [0, 1]: ``(maps - lo) / (hi - lo)`` with the family's
    value range (cosine maps: (-1, 1); EZ-VSL, FNAC, SLAVC: (-1 / tau, 1 / tau))."""
    lo, hi = get_family(family).value_range
    return (maps.float() - lo) / (hi - lo)
