"""The SSL-TIE model: a visual and an audio ResNet-18 whose cosine gives the localisation map; official checkpoints.

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

Official checkpoint: ``{'epoch', 'state_dict', 'best_miou', 'optimizer', 'iteration'}``; ``state_dict`` holds 257
tensors (23.9 M parameters): ``imgnet.*`` and ``audnet.*`` are torchvision-named ResNet-18s that each also carry a
1-channel stem ``conv1_a``, a 3-channel ``conv1``, a 6-channel ``conv1_flow`` and a 1000-way ``fc`` (the vision net
runs ``conv1``, the audio net ``conv1_a``), plus ``vision_fc1`` (1x1 conv 1024->512), ``conv3`` and ``norm3``.
The stems a net never runs, both ``fc`` layers and ``vision_fc1`` are never read by the official forward: sslt
does not hold them, checks their presence and shapes on import and writes zeros for them on export.
"""
from __future__ import annotations

import contextlib
import functools
import io
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from sslt_cli.data.manifest import atomic_write_bytes
from sslt_cli.errors import CheckpointError
from sslt_cli.runs import checkpoint_problem

EMBED_DIM = 512

_TRUNK_MODULES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
_LIST_AT_MOST = 10
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_OFFICIAL_FORMAT = ("expected the state_dict of SSL-TIE's AVENet (keys imgnet.*, audnet.*, vision_fc1.*, conv3.*, "
                    "norm3.*), bare or inside {'state_dict': ...}")
_TORCHVISION_FORMAT = "a torchvision resnet18 state_dict file (torchvision.models.resnet18(...).state_dict())"


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


def build_model(vision_init: str | Path = "scratch", audio_init: str | Path = "scratch") -> SSLTIEModel:
    """A new SSL-TIE model: official "scratch" initialisation, then optional torchvision weights per encoder.

    vision_init / audio_init: ``"scratch"`` or the path of a local torchvision resnet18 ``state_dict`` file
    (nothing is downloaded; ``fc.*`` is ignored). For the audio encoder the RGB stem is summed over its 3 input
    channels to make the 1-channel stem. Raises CheckpointError for a missing or mismatching file.
    """
    model = SSLTIEModel()
    _official_init_(model)
    for role, init, trunk in (("vision", vision_init, model.vision), ("audio", audio_init, model.audio)):
        if str(init) != "scratch":
            trunk.load_state_dict(_torchvision_trunk_state(Path(init), role, trunk))
    return model


def _torchvision_trunk_state(path: Path, role: str, trunk: nn.Module) -> dict[str, torch.Tensor]:
    """The trunk's tensors from a torchvision resnet18 weight file, checked against ``trunk``'s keys and shapes."""
    if not path.is_file():
        raise CheckpointError(f"{role} init {str(path)!r}: no such file; use 'scratch' or the path of "
                              f"{_TORCHVISION_FORMAT}")
    state = _state_dict_in(_load_file(path), path, f"expected {_TORCHVISION_FORMAT}")
    state = {key: value for key, value in state.items() if not key.startswith("fc.")}
    expected = {key: value.shape for key, value in trunk.state_dict().items()}
    for key in expected:
        if key.endswith(".num_batches_tracked"):
            # Weight files saved before PyTorch 0.4 (such as torchvision's first resnet18) lack this counter.
            state.setdefault(key, torch.tensor(0))
    stem = state.get("conv1.weight")
    expected_stem = trunk.conv1.weight.shape
    if isinstance(stem, torch.Tensor) and stem.dim() == 4 and stem.shape[1] == 3 and expected_stem[1] == 1:
        # A 1-channel input equal to a grey image feeds the RGB filters the same value on each channel.
        state["conv1.weight"] = stem.sum(dim=1, keepdim=True)
    problems = _key_problems(expected, state)
    if problems:
        raise CheckpointError(f"{path}: cannot initialise the {role} encoder: keys do not match; expected "
                              f"{_TORCHVISION_FORMAT}", problems)
    return state


def _numpy_scalar_globals() -> list[Any]:
    """Allow-list for numpy scalars in checkpoint pickles (the official ``best_miou`` is a numpy.float64)."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    dtype_classes = [type(np.dtype(name)) for name in ("float16", "float32", "float64", "int32", "int64", "bool")]
    # Pickles written under numpy 1 name numpy.core, those under numpy 2 numpy._core: accept both spellings.
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype,
            *dtype_classes]


def _load_file(path: Path) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, any failure reported as a CheckpointError."""
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for a bad file; all mean "not loadable"
        raise CheckpointError(f"{path}: {checkpoint_problem(path, exc)}") from None


def read_checkpoint_file(path: str | Path) -> Any:
    """Any checkpoint file (sslt's or the official SSL-TIE pickle, whose ``best_miou`` is a numpy scalar) loaded with
    ``weights_only=True`` and numpy scalars allowed; a file that is not one raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    return _load_file(path)


def _state_dict_in(obj: Any, path: Path, expected: str) -> dict[str, torch.Tensor]:
    """The state_dict in a loaded file (bare, or under ``'state_dict'``) with any DataParallel/compile prefix removed."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    elif not (isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        if isinstance(obj, Mapping):
            found = f"a dict with keys {_listing(sorted(map(str, obj)))}" if obj else "an empty dict"
        else:
            found = f"a {type(obj).__name__}"
        raise CheckpointError(f"{path}: no 'state_dict' in this file and it is not a state_dict itself (found "
                              f"{found}); {expected}")
    not_tensors = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f"{path}: state_dict entries that are not tensors: {_listing(not_tensors)}; {expected}")
    return _strip_wrapper_prefixes(dict(obj))


def _strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a ``module.`` (DataParallel/DDP) or ``_orig_mod.`` (torch.compile) prefix shared by every key."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if state and all(key.startswith(prefix) for key in state):
                state = {key[len(prefix):]: value for key, value in state.items()}
                stripped = True
    return state


def _listing(names: list[str]) -> str:
    """The first few names, then how many more."""
    shown = ", ".join(names[:_LIST_AT_MOST])
    more = len(names) - _LIST_AT_MOST
    return f"{shown}, ... (+{more} more)" if more > 0 else shown


def _key_problems(expected: Mapping[str, torch.Size], found: Mapping[str, torch.Tensor]) -> list[str]:
    """One line per kind of mismatch (missing keys, unexpected keys, wrong shapes); empty when all match."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    wrong_shape = [f"{key} is {tuple(found[key].shape)}, expected {tuple(shape)}"
                   for key, shape in expected.items() if key in found and found[key].shape != shape]
    problems = []
    for kind, names in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong_shape)):
        if names:
            problems.append(f"{kind} ({len(names)}): {_listing(names)}")
    return problems


def _official_layout() -> list[tuple[str, str | None, tuple[int, ...]]]:
    """Every official key in the official order as (official key, our key or None if unused, shape)."""
    ours = {key: tuple(shape) for key, shape in _model_shapes().items()}
    unused_heads = [("fc.weight", (1000, EMBED_DIM)), ("fc.bias", (1000,))]
    layout: list[tuple[str, str | None, tuple[int, ...]]] = []
    for net, prefix, stem_in_use in (("imgnet", "vision.", "conv1"), ("audnet", "audio.", "conv1_a")):
        for stem, channels in (("conv1_a", 1), ("conv1", 3), ("conv1_flow", 6)):
            used = stem == stem_in_use
            layout.append((f"{net}.{stem}.weight", f"{prefix}conv1.weight" if used else None, (64, channels, 7, 7)))
        for key, shape in ours.items():
            if key.startswith(prefix) and key != f"{prefix}conv1.weight":
                layout.append((f"{net}.{key[len(prefix):]}", key, shape))
        layout += [(f"{net}.{name}", None, shape) for name, shape in unused_heads]
    layout += [("vision_fc1.weight", None, (EMBED_DIM, 2 * EMBED_DIM, 1, 1)), ("vision_fc1.bias", None, (EMBED_DIM,))]
    layout += [(key, key, shape) for key, shape in ours.items() if key.startswith(("conv3.", "norm3."))]
    return layout


@functools.lru_cache(maxsize=1)
def _model_shapes() -> dict[str, torch.Size]:
    """Our state_dict's keys and shapes, from a model built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return {key: value.shape for key, value in SSLTIEModel().state_dict().items()}


def load_official_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an official SSL-TIE checkpoint and return a state_dict for :class:`SSLTIEModel` (``load_state_dict``).

    Accepts the full pickle ``{'epoch', 'state_dict', ...}`` or a bare state_dict, with or without a ``module.``
    prefix; loads with ``weights_only=True``. Raises CheckpointError for a file that is not a checkpoint or whose
    keys or shapes differ from the official 257 (listing the first 10 of each kind and the count).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    state = _state_dict_in(_load_file(path), path, _OFFICIAL_FORMAT)
    layout = _official_layout()
    problems = _key_problems({key: torch.Size(shape) for key, _, shape in layout}, state)
    if problems:
        raise CheckpointError(f"{path}: keys do not match the official SSL-TIE checkpoint; {_OFFICIAL_FORMAT}",
                              problems)
    return {ours: state[official] for official, ours, _ in layout if ours is not None}


def load_weights(model: nn.Module, weights: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Load an sslt ``state_dict`` into ``model``; a CheckpointError from ``path`` lists missing, unexpected and
    wrong-shape keys (never torch's RuntimeError with a traceback)."""
    state = _strip_wrapper_prefixes(dict(weights))
    problems = _key_problems({key: value.shape for key, value in model.state_dict().items()}, state)
    if problems:
        raise CheckpointError(f"{path}: the checkpoint's weights do not fit the SSL-TIE model", problems)
    model.load_state_dict(state)


def to_official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the official key set (257 tensors, CPU); tensors the official forward never
    reads (unused stems, ``fc`` of both nets, ``vision_fc1``) are zeros. Accepts a DDP- or compile-wrapped model."""
    ours = _strip_wrapper_prefixes({key: value.detach() for key, value in model.state_dict().items()})
    dtype = ours["vision.conv1.weight"].dtype
    return {official: (ours[key].to("cpu", copy=True) if key is not None else torch.zeros(shape, dtype=dtype))
            for official, key, shape in _official_layout()}


def save_official_checkpoint(model: nn.Module, path: str | Path, *, epoch: int = 0, best_miou: float = 0.0,
                             iteration: int = 0) -> Path:
    """Write the model as an official SSL-TIE checkpoint (``{'epoch', 'state_dict', 'best_miou', 'optimizer',
    'iteration'}``) atomically. ``optimizer`` is None: the official resume then keeps its own fresh Adam (with the
    user's lr) after a warning, rather than adopting param groups that do not describe its parameters."""
    payload = {"epoch": int(epoch), "state_dict": to_official_state_dict(model), "best_miou": float(best_miou),
               "optimizer": None, "iteration": int(iteration)}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path
