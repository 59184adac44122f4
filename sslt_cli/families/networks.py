"""The networks of the released models of other methods, with the module names of their checkpoints (METHODS.md).

Every network answers the same three calls as sslt's own (:class:`sslt_cli.model.SSLTIEModel`): ``embed_image``
(frames -> visual maps, L2-normalised over channels), ``embed_audio`` (spectrograms -> embeddings, L2-normalised)
and ``maps(v, a)`` (each image with its own audio -> (B, 1, h, w) in the family's own scale, computed with the
operations and order of the released forward pass), plus ``forward(images, spec) -> (maps, v, a)``.

* LVS's AVENet (and SSLalignment's "ours", the same network) is sslt's own :class:`~sslt_cli.model.SSLTIEModel`:
  SSL-TIE inherited LVS's two stride-1 ResNet-18s, max-pooled audio and plain cosine map (14 x 14 at 224); only the
  checkpoint keys differ (no ``vision_fc1``, ``conv3``, ``norm3``), which the family's entry maps.
* :class:`EzvslNet` (EZ-VSL ``model.py``; FNAC's network has the same parameters): torchvision ResNet-18s (avgpool
  and fc removed; the audio one with a 1-channel stem and a max-pool), a 1x1 conv ``img_proj`` and a linear
  ``aud_proj``; the map is cos / tau (7 x 7; 224 input is hard-wired by the released ``unflatten``).
* :class:`SlavcNet` (SLAVC ``model.py``): EZ-VSL's backbones with two heads per side and a full momentum copy; the
  map is (cos1 / tau + cos2 / tau) / 2 of the ``online`` branch (the released test) or of the ``momentum`` branch
  (``use_mom_eval``). ``v`` and ``a`` hold both heads side by side (each half L2-normalised).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

TAU = 0.03
Branch = Literal["online", "momentum"]
BRANCHES: tuple[str, ...] = ("online", "momentum")


def _image_backbone() -> nn.Module:
    net = torchvision.models.resnet18(weights=None)
    net.avgpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def _audio_backbone() -> nn.Module:
    net = torchvision.models.resnet18(weights=None)
    net.conv1 = nn.Conv2d(1, 64, kernel_size=(7, 7), stride=(2, 2), padding=(3, 3), bias=False)
    net.avgpool = nn.AdaptiveMaxPool2d((1, 1))
    net.fc = nn.Identity()
    return net


def _image_features(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The released ``imgnet(image).unflatten(1, (512, 7, 7))``: torchvision's forward flattens layer4's output."""
    return net(images).unflatten(1, (512, 7, 7))


class EzvslNet(nn.Module):
    """EZ-VSL (and FNAC) at test time: images (B, 3, 224, 224), spec (B, 1, 257, T) -> 7 x 7 maps cos / tau."""

    def __init__(self, dim: int = 512, tau: float = TAU) -> None:
        super().__init__()
        self.tau = tau
        self.imgnet = _image_backbone()
        self.img_proj = nn.Conv2d(512, dim, kernel_size=(1, 1))
        self.audnet = _audio_backbone()
        self.aud_proj = nn.Linear(512, dim)

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.img_proj(_image_features(self.imgnet, images)), dim=1)

    def embed_audio(self, spec: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.aud_proj(self.audnet(spec)), dim=1)

    def maps(self, v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """v (B, dim, 7, 7), a (B, dim) -> (B, 1, 7, 7): the diagonal of the released ``einsum(img, aud) / tau``."""
        return (torch.einsum("nchw,nc->nhw", v, a) / self.tau).unsqueeze(1)

    def forward(self, images: torch.Tensor, spec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        v, a = self.embed_image(images), self.embed_audio(spec)
        return self.maps(v, a), v, a


class SlavcNet(nn.Module):
    """SLAVC at test time: two heads, maps (cos1 / tau + cos2 / tau) / 2 of the chosen ``branch``."""

    def __init__(self, dim: int = 512, tau: float = TAU, branch: Branch = "online") -> None:
        super().__init__()
        if branch not in BRANCHES:
            raise ValueError(f"unknown SLAVC branch {branch!r}; choose one of {', '.join(BRANCHES)}")
        self.tau, self.dim, self.branch = tau, dim, branch
        for prefix in ("", "momentum_"):
            setattr(self, f"{prefix}imgnet", _image_backbone())
            setattr(self, f"{prefix}img_proj1", nn.Conv2d(512, dim, kernel_size=(1, 1)))
            setattr(self, f"{prefix}img_proj2", nn.Conv2d(512, dim, kernel_size=(1, 1)))
            setattr(self, f"{prefix}audnet", _audio_backbone())
            setattr(self, f"{prefix}aud_proj1", nn.Linear(512, dim))
            setattr(self, f"{prefix}aud_proj2", nn.Linear(512, dim))

    def _part(self, name: str) -> nn.Module:
        return getattr(self, name if self.branch == "online" else f"momentum_{name}")

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """-> (B, 2 * dim, 7, 7): head 1 then head 2, each L2-normalised over its channels."""
        x = _image_features(self._part("imgnet"), images)
        heads = [F.normalize(self._part(f"img_proj{k}")(x), dim=1) for k in (1, 2)]
        return torch.cat(heads, dim=1)

    def embed_audio(self, spec: torch.Tensor) -> torch.Tensor:
        """-> (B, 2 * dim): head 1 then head 2, each L2-normalised."""
        x = self._part("audnet")(spec)
        return torch.cat([F.normalize(self._part(f"aud_proj{k}")(x), dim=1) for k in (1, 2)], dim=1)

    def maps(self, v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """v (B, 2 dim, 7, 7), a (B, 2 dim) -> (B, 1, 7, 7) = (einsum(v1, a1) / tau + einsum(v2, a2) / tau) / 2."""
        d = self.dim
        first = torch.einsum("nchw,nc->nhw", v[:, :d], a[:, :d]) / self.tau
        second = torch.einsum("nchw,nc->nhw", v[:, d:], a[:, d:]) / self.tau
        return ((first + second) / 2).unsqueeze(1)

    def forward(self, images: torch.Tensor, spec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        v, a = self.embed_image(images), self.embed_audio(spec)
        return self.maps(v, a), v, a
