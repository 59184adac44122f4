"""EZ-VSL's object-guided localisation (OGL) for evaluation.

What EZ-VSL's official ``test.py`` computes (hche11/EZ-VSL, mirrored as stoneMo/EZ-VSL): an ImageNet ResNet-18 whose
``avgpool`` is removed and whose ``fc`` reshapes the features back to (512, 7, 7) and takes ``x.abs().mean(1)`` (its
``NormReducer``): the object map is the channel mean of the absolute values of ``layer4``'s output, computed on the same
normalised frame the audio-visual model sees. Both maps are upsampled to 224 with ``F.interpolate(bilinear,
align_corners=True)``, each is min-max normalised (``utils.normalize_img``: a constant map is left as it is), and the
combination ``normalize_img(alpha * av + (1 - alpha) * obj)`` (``--alpha``, default 0.4) is scored.

Here the audio-visual map is upsampled by the protocol's own mode (the ``ezvsl`` preset's is EZ-VSL's), the object map
always as EZ-VSL does, and the combined map (at the protocol's size) is what gets scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sslt_cli import metrics
from sslt_cli.errors import CheckpointError

DEFAULT_ALPHA = 0.4


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


@dataclass
class ObjectGuidance:
    """OGL as one evaluation applies it: the object trunk, alpha, the weights file, and the protocol's upsampling."""

    trunk: nn.Module
    alpha: float
    weights: str
    upsample: metrics.UpsampleMode
    size: int

    @classmethod
    def load(cls, weights: str | Path, alpha: float, protocol: metrics.Protocol,
             device: str | torch.device) -> "ObjectGuidance":
        """The object trunk of ``weights`` on ``device``, mixed in at ``alpha`` under ``protocol``'s upsampling."""
        trunk = object_trunk(weights).to(device)
        return cls(trunk, float(alpha), str(weights), protocol.upsample, protocol.size)

    def apply(self, av_maps: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Combined maps (B, size, size) of a batch's audio-visual maps (B, h, w) and its normalised frames."""
        av_up = metrics.upsample_maps(av_maps.float(), self.upsample, self.size)
        obj = object_maps(self.trunk, images.to(next(self.trunk.parameters()).device))
        obj_up = metrics.upsample_maps(obj, "bilinear_align_corners", self.size)
        return combine(av_up.to(obj_up.device), obj_up, self.alpha)

    def note(self) -> str:
        """What metrics.json and the table caption say about it."""
        return (f"object-guided localisation (EZ-VSL OGL): scored maps are normalize_img({self.alpha:g} * AV + "
                f"{1 - self.alpha:g} * object), object = mean |ResNet-18 layer4| from {self.weights}")
