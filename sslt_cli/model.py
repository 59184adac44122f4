"""The SSL-TIE model: a visual and an audio ResNet-18 whose cosine gives the localisation map.

Architecture (REFERENCE.md section 1; official ``models/model.py`` and ``networks/base_models.py``):

* Visual encoder: torchvision's ResNet-18 with ``layer4`` at stride 1 (its first block's conv and downsample conv),
  no pooling and no classifier: a 224 x 224 frame gives a 512 x 14 x 14 map (stride 16).
* Audio encoder: the same trunk with a 1-channel stem on the log-mel spectrogram (``layer4`` at stride 1 too, as in
  the official code, where both nets share one ResNet definition), then a global max-pool to 512.
* Both L2-normalised; the map is the cosine of every visual position with the audio embedding.

``conv3`` (1x1 conv 1->1) and ``norm3`` (BatchNorm2d(1)): the official forward computes ``norm3(conv3(A))`` and
discards it, so they never change an output or receive a gradient; the only trace is that ``norm3``'s running
statistics drift during official training. sslt keeps both so official checkpoints round-trip, never runs them and
freezes them (``requires_grad=False``): Adam would not update them anyway, and DistributedDataParallel rejects
trainable parameters that take no part in the loss.

``"scratch"`` initialisation is the official one: after construction every conv is re-drawn Kaiming-normal
(fan-out, ReLU gain) and every BatchNorm gets weight ~ N(1, 0.02) and bias 0 (from the global torch RNG, so seed
first).

Reading and writing weight files (sslt checkpoints, official SSL-TIE checkpoints, torchvision weights) is
``checkpoint.py``'s.
"""
from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict

import torch
import torch.nn.functional as F
import torchvision
from torch import nn


EMBED_DIM = 512

_TRUNK_MODULES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def _build_trunk(in_channels: int) -> nn.Sequential:
    """torchvision ResNet-18 up to ``layer4`` (stride 1), no avgpool/fc: (B, C, H, W) -> (B, 512, H/16, W/16)."""
    net = torchvision.models.resnet18(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.layer4[0].conv1.stride = (1, 1)
    net.layer4[0].downsample[0].stride = (1, 1)
    # torchvision's module names are kept so torchvision weight files load without renaming.
    return nn.Sequential(OrderedDict((name, getattr(net, name)) for name in _TRUNK_MODULES))


class SSLTIEModel(nn.Module):
    """Visual and audio encoders of SSL-TIE; ``forward`` gives the localisation map and both embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.vision = _build_trunk(3)
        self.audio = _build_trunk(1)
        self.conv3 = nn.Conv2d(1, 1, kernel_size=1)
        self.norm3 = nn.BatchNorm2d(1)
        for param in [*self.conv3.parameters(), *self.norm3.parameters()]:
            param.requires_grad_(False)

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) normalised frames -> (B, 512, H/16, W/16) visual map, L2-normalised over channels."""
        return F.normalize(self.vision(images), dim=1)

    def embed_audio(self, spec: torch.Tensor) -> torch.Tensor:
        """spec: (B, 1, n_mels, T) log-mel in dB -> (B, 512) audio embedding (global max-pool), L2-normalised."""
        return F.normalize(self.audio(spec).amax(dim=(2, 3)), dim=1)

    def maps(self, v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """v (B, 512, h, w), a (B, 512) -> (B, 1, h, w): each image's cosine map with its own audio."""
        return localisation_map(v, a)

    def forward(self, images: torch.Tensor, spec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W), spec (B, 1, F, T) -> (A (B, 1, h, w) cosine map, v (B, 512, h, w), a (B, 512))."""
        v = self.embed_image(images)
        a = self.embed_audio(spec)
        return localisation_map(v, a), v, a


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast (``auto`` and ``bf16``) on CPU and CUDA; ``fp32`` disables it."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def localisation_map(v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Cosine of each image's map with its own audio: v (B, C, h, w), a (B, C), both L2-normalised -> (B, 1, h, w)."""
    return torch.einsum("bchw,bc->bhw", v, a).unsqueeze(1)


def all_pairs_map(v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Cosine maps of every image with every audio: v (B, C, h, w), a (B', C) -> (B, B', h, w), [i, j] = image i, audio j."""
    return torch.einsum("ichw,jc->ijhw", v, a)


def _official_init_(model: nn.Module) -> None:
    """The released code's re-initialisation of the whole model (see the module docstring)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, mean=1.0, std=0.02)
            nn.init.zeros_(module.bias)


def build_model() -> SSLTIEModel:
    """A new SSL-TIE model with the official "scratch" initialisation (torchvision weights for an encoder:
    ``checkpoint.init_from_torchvision``)."""
    model = SSLTIEModel()
    _official_init_(model)
    return model


@functools.lru_cache(maxsize=1)
def model_shapes() -> dict[str, torch.Size]:
    """Our state_dict's keys and shapes, from a model built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return {key: value.shape for key, value in SSLTIEModel().state_dict().items()}


