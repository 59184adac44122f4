"""EZ-VSL's object-guided localisation (OGL) for evaluation.

What EZ-VSL's official ``test.py`` computes (hche11/EZ-VSL, mirrored as stoneMo/EZ-VSL): an ImageNet ResNet-18 whose
``avgpool`` is removed and whose ``fc`` reshapes the features back to (512, 7, 7) and takes ``x.abs().mean(1)`` (its
``NormReducer``): the object map is the channel mean of the absolute values of ``layer4``'s output, computed on the same
normalised frame the audio-visual model sees. Both maps are upsampled to 224 with ``F.interpolate(bilinear,
align_corners=True)``, each is min-max normalised (``utils.normalize_img``: a constant map is left as it is), and the
combination ``normalize_img(alpha * av + (1 - alpha) * obj)`` (``--alpha``, default 0.4) is scored.

Here the audio-visual map is upsampled by the protocol's own mode (the ``ezvsl`` preset's is EZ-VSL's), the object map
always as EZ-VSL does, and the combined map (at the protocol's size) is what gets scored.

SLAVC's own mix (stoneMo/SLAVC ``test.py`` ``validate``; the ``slavc*`` presets select it, ``Protocol.ogl``): the same
object map (its ``NormReducer``), but both maps are upsampled to 224 with ``F.interpolate(bicubic,
align_corners=True)`` and put on fixed ranges, not min-max: ``scores_av = (av - lo) / (hi - lo)`` with the AV map's
range (+-1/tau for SLAVC's maps), ``scores_obj = obj / 2.5``; the mix is ``alpha * scores_av + (1 - alpha) *
scores_obj`` (alpha 0.9 in its scripts and README), with no normalisation after it. Its prediction then applies to the
mix directly: ``>= 0.5`` (``slavc_abs``) or ``normalize_img`` and the median (``--relative_prediction``, ``slavc_rel``),
and its confidence is the mean of the mix's top quarter. The mix is on [0, 1] already, so it is scored with the
value range (0, 1) (:meth:`ObjectGuidance.scoring_protocol`), under which the preset's fixed-range step is exact.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sslt_cli import metrics
from sslt_cli.errors import CheckpointError

DEFAULT_ALPHA = 0.4
SLAVC_OBJECT_RANGE = (0.0, 2.5)  # SLAVC test.py's obj_min, obj_max
MIX_RANGE = (0.0, 1.0)  # the value range SLAVC's mix is scored with


def object_trunk(weights: str | Path) -> nn.Module:
    """torchvision's resnet18 with the ImageNet weights of a local ``state_dict`` file (``fc.*`` ignored; nothing is
    downloaded). CheckpointError when the file is missing or is not a resnet18 state_dict."""
    from torchvision.models import resnet18

    from sslt_cli.checkpoint import _torchvision_trunk_state

    path = Path(weights)
    if not path.is_file():
        raise CheckpointError(f"object-guided localisation weights {str(path)!r}: no such file; give the path of a "
                              f"local torchvision resnet18 state_dict (ImageNet weights), or leave it unset")
    trunk = resnet18(weights=None)
    trunk.fc = nn.Identity()
    trunk.load_state_dict(_torchvision_trunk_state(path, "object-guidance (OGL)", trunk))
    return trunk.eval()


def object_maps(trunk: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """EZ-VSL's object saliency: mean over channels of |layer4 features|. images: (B, 3, H, W) -> (B, h, w) float32."""
    x = trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(images))))
    x = trunk.layer4(trunk.layer3(trunk.layer2(trunk.layer1(x))))
    return x.float().abs().mean(dim=1)


def combine(av_up: torch.Tensor, obj_up: torch.Tensor, alpha: float) -> torch.Tensor:
    """``normalize_img(alpha * normalize_img(av) + (1 - alpha) * normalize_img(obj))`` of (B, S, S) maps, float32."""
    av, _ = metrics._normalize_img(av_up.float())
    obj, _ = metrics._normalize_img(obj_up.float())
    mixed, _ = metrics._normalize_img(av * alpha + obj * (1 - alpha))
    return mixed


def slavc_mix(av_up: torch.Tensor, obj_up: torch.Tensor, alpha: float,
              av_range: tuple[float, float]) -> torch.Tensor:
    """SLAVC's ``alpha * (av - lo) / (hi - lo) + (1 - alpha) * (obj - 0) / 2.5`` of (B, S, S) maps, in float32 with
    its operation order (each Python constant rounded to float32, as numpy does with a float32 array)."""
    def fixed(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return (x.float() - torch.tensor(lo, dtype=torch.float32)) / torch.tensor(hi - lo, dtype=torch.float32)

    scores_av = fixed(av_up, *av_range)
    scores_obj = fixed(obj_up, *SLAVC_OBJECT_RANGE)
    return (scores_av * torch.tensor(alpha, dtype=torch.float32)
            + scores_obj * torch.tensor(1 - alpha, dtype=torch.float32))


@dataclass
class ObjectGuidance:
    """OGL as one evaluation applies it: the object trunk, alpha, the weights file, the protocol's upsampling, the
    mixing rule (``Protocol.ogl``) and the AV maps' value range (SLAVC's rule)."""

    trunk: nn.Module
    alpha: float
    weights: str
    upsample: metrics.UpsampleMode
    size: int
    rule: str = "ezvsl"
    av_range: tuple[float, float] = (-1.0, 1.0)

    @classmethod
    def load(cls, weights: str | Path, alpha: float, protocol: metrics.Protocol, device: str | torch.device,
             av_range: tuple[float, float] = (-1.0, 1.0)) -> "ObjectGuidance":
        """The object trunk of ``weights`` on ``device``, mixed in at ``alpha`` under ``protocol``'s upsampling and
        mixing rule; ``av_range``: the fixed range of the model's raw maps (used by SLAVC's rule)."""
        trunk = object_trunk(weights).to(device)
        return cls(trunk, float(alpha), str(weights), protocol.upsample, protocol.size, protocol.ogl,
                   (float(av_range[0]), float(av_range[1])))

    def apply(self, av_maps: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Combined maps (B, size, size) of a batch's audio-visual maps (B, h, w) and its normalised frames."""
        av_up = metrics.upsample_maps(av_maps.float(), self.upsample, self.size)
        obj = object_maps(self.trunk, images.to(next(self.trunk.parameters()).device))
        if self.rule == "slavc":
            obj_up = metrics.upsample_maps(obj, "bicubic_align_corners", self.size)
            return slavc_mix(av_up.to(obj_up.device), obj_up, self.alpha, self.av_range)
        obj_up = metrics.upsample_maps(obj, "bilinear_align_corners", self.size)
        return combine(av_up.to(obj_up.device), obj_up, self.alpha)

    def scoring_protocol(self, protocol: metrics.Protocol) -> metrics.Protocol:
        """The protocol the combined maps are scored under: ``protocol`` itself, or for SLAVC's mix (already on its
        fixed [0, 1] scale) ``protocol`` with the value range (0, 1)."""
        return dataclasses.replace(protocol, value_range=MIX_RANGE) if self.rule == "slavc" else protocol

    def value_range(self, av_range: tuple[float, float]) -> tuple[float, float]:
        """The value range of the combined maps for the confidence: SLAVC's mix is on (0, 1); else ``av_range``."""
        return MIX_RANGE if self.rule == "slavc" else av_range

    def note(self) -> str:
        """What metrics.json and the table caption say about it."""
        if self.rule == "slavc":
            return (f"object-guided localisation (SLAVC's mix): scored maps are {self.alpha:g} * (AV - lo) / (hi - lo)"
                    f" + {1 - self.alpha:g} * object / 2.5 (AV range {self.av_range[0]:g}..{self.av_range[1]:g}, "
                    f"both bicubic align_corners), object = mean |ResNet-18 layer4| from {self.weights}")
        return (f"object-guided localisation (EZ-VSL OGL): scored maps are normalize_img({self.alpha:g} * AV + "
                f"{1 - self.alpha:g} * object), object = mean |ResNet-18 layer4| from {self.weights}")
