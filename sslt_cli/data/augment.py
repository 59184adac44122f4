"""The four transformation groups of SSL-TIE and the L_geo transform (REFERENCE.md section 3).

* T_app (appearance) and T_geo (geometric, as invariance) act on the decoded frame: :func:`build_image_transform`
  composes them from plain switches, so the ablation rows A-F are recipe switches. Row A is "resize + normalise".
* T_mask (SpecAugment) acts on the mel power spectrogram before dB: :func:`spec_augment`.
* T_mix (retrieval-based audio mixing): :func:`mix_probability_and_alpha`, :func:`find_mix_neighbours`,
  :func:`mix_waveforms`.
* L_geo's transform T (rotation per sample, scale and flip per batch) acts on image batches and on maps:
  :func:`sample_geo_transform`, :func:`apply_geo_transform` (``F.affine_grid`` + ``F.grid_sample``).

Randomness: the image transforms draw from torch's global generator (torchvision's design); :func:`seeded_call`
runs one under a given seed and restores the global state, so a dataset item is a function of (seed, epoch, index)
and never disturbs the training loop's generator. Everything else takes an explicit ``torch.Generator``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sslt_cli.config import AppearanceConfig, GeometricConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_MODES = ("resize_centercrop", "resize_square", "tensor_resize_square")
EvalMode = Literal["resize_centercrop", "resize_square", "tensor_resize_square"]


def _to_normalised_tensor() -> list:
    from torchvision.transforms import v2

    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


class PilGaussianBlur:
    """Gaussian blur with sigma uniform in ``sigma`` (drawn from torch's global generator), by PIL's
    ``ImageFilter.GaussianBlur(radius=sigma)`` as the official loader does; PIL image in, PIL image out."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def __call__(self, image: Any) -> Any:
        from PIL import ImageFilter

        low, high = self.sigma
        radius = low + (high - low) * torch.rand(()).item()
        return image.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f"PilGaussianBlur(sigma={self.sigma})"


class ImageTransform:
    """A training image transform in two stages: ``geometric`` (PIL -> PIL: crop or resize, rotation, flip) then
    ``appearance`` (PIL -> normalised tensor: jitter, grayscale, blur, to tensor, ImageNet mean/std).

    Calling it runs both. The split lets two views share one geometric draw and differ in appearance
    (``AudioVisualDataset(shared_geometry=True)``), which L_geo needs when it compares the maps of two views.
    """

    def __init__(self, geometric: Callable[[Any], Any], appearance: Callable[[Any], torch.Tensor]):
        self.geometric = geometric
        self.appearance = appearance

    def __call__(self, image: Any) -> torch.Tensor:
        return self.appearance(self.geometric(image))


def build_image_transform(image_size: int, app: AppearanceConfig = AppearanceConfig(),
                          geo: GeometricConfig = GeometricConfig()) -> ImageTransform:
    """The training image transform: PIL RGB image -> (3, image_size, image_size) float tensor, ImageNet-normalised.

    ``app`` and ``geo``: the recipe's ``transforms.app`` and ``transforms.geo`` sections. T_geo (``geo.enabled``):
    RandomResizedCrop(image_size, geo.crop_scale) (or, with ``geo.crop`` off, a resize to (image_size, image_size)),
    then a rotation by a uniform angle in [-geo.rotation, geo.rotation] degrees (0 = off), then a horizontal flip with
    p=0.5 when ``geo.flip``. T_app (``app.enabled``): ColorJitter(*app.jitter) with p=app.jitter_p, grayscale with
    p=app.gray_p, Gaussian blur with sigma uniform in app.blur_sigma and p=app.blur_p (:class:`PilGaussianBlur`).
    Without T_geo the frame is resized to (image_size, image_size) (bicubic); with neither group this is row A's
    "resize + normalise". The official ``moco_v2`` order is crop, jitter, grayscale, blur, flip; the flip moves before
    the appearance stage here, which gives the same distribution (every appearance operation is pixelwise, uses
    flip-invariant image statistics, or is a symmetric blur) and lets views share their geometry.
    """
    from torchvision.transforms import v2

    geometric: list = []
    if geo.enabled and geo.crop:
        geometric.append(v2.RandomResizedCrop(image_size, scale=tuple(geo.crop_scale), antialias=True))
    else:
        geometric.append(v2.Resize((image_size, image_size), interpolation=v2.InterpolationMode.BICUBIC,
                                   antialias=True))
    if geo.enabled and geo.rotation > 0:
        geometric.append(v2.RandomRotation(geo.rotation, interpolation=v2.InterpolationMode.BILINEAR))
    if geo.enabled and geo.flip:
        geometric.append(v2.RandomHorizontalFlip(p=0.5))
    appearance: list = []
    if app.enabled:
        if app.jitter_p > 0:
            appearance.append(v2.RandomApply([v2.ColorJitter(*app.jitter)], p=app.jitter_p))
        if app.gray_p > 0:
            appearance.append(v2.RandomGrayscale(p=app.gray_p))
        if app.blur_p > 0:
            appearance.append(v2.RandomApply([PilGaussianBlur(app.blur_sigma)], p=app.blur_p))
    return ImageTransform(v2.Compose(geometric), v2.Compose(appearance + _to_normalised_tensor()))


def build_eval_transform(image_size: int, mode: EvalMode) -> Callable[[Any], torch.Tensor]:
    """The evaluation image transform of a protocol: PIL RGB image -> (3, image_size, image_size), ImageNet-normalised.

    ``resize_centercrop``: Resize(image_size, bicubic) on the short side + CenterCrop (SSL-TIE, LVS);
    ``resize_square``: Resize((image_size, image_size), bicubic), the whole frame squashed (EZ-VSL, FNAC, SSPL);
    ``tensor_resize_square``: the same squash on the float tensor (SSLalignment's ToTensor-then-Resize order).
    The tensor conversion and normalisation are the released test loaders' own arithmetic (``ToTensor``: divide by
    255; ``Normalize``: subtract, then divide), so a frame reaches every released model bit for bit as in its code.
    """
    from torchvision.transforms import v2

    bicubic = v2.InterpolationMode.BICUBIC
    if mode == "resize_centercrop":
        steps = [v2.Resize(image_size, interpolation=bicubic, antialias=True), v2.CenterCrop(image_size)]
    elif mode == "resize_square":
        steps = [v2.Resize((image_size, image_size), interpolation=bicubic, antialias=True)]
    elif mode == "tensor_resize_square":
        # SSLalignment: ToTensor first, so the bicubic resize runs on the float tensor (no rounding to 8 bits)
        return v2.Compose([_official_to_tensor, v2.Resize((image_size, image_size), interpolation=bicubic,
                                                          antialias=True), _official_normalise])
    else:
        raise ValueError(f"unknown eval image mode {mode!r}; expected one of {', '.join(EVAL_MODES)}")
    return v2.Compose(steps + [_official_to_tensor, _official_normalise])


def _official_to_tensor(image: Any) -> torch.Tensor:
    """torchvision's ``ToTensor`` of a PIL RGB image: (3, H, W) float32, the bytes divided by 255."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous().to(torch.float32).div(255)


def _official_normalise(tensor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``Normalize(ImageNet mean, std)``: subtract the mean, then divide by the std, per channel."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=tensor.dtype)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=tensor.dtype)[:, None, None]
    return tensor.sub(mean).div(std)


def seeded_call(transform: Callable[[Any], Any], value: Any, seed: int) -> Any:
    """``transform(value)`` with torch's global generator seeded by ``seed``, the caller's generator state restored."""
    with torch.random.fork_rng(devices=[]):
        # the CPU generator alone: torch.manual_seed would also queue a seed for every CUDA device, which costs about
        # a millisecond a call in a CUDA build of torch (a quarter of a training item's decode and augmentation time)
        torch.default_generator.manual_seed(seed)
        return transform(value)


# --- T_mask -------------------------------------------------------------------------------------------------------


def _mask_along(spec: torch.Tensor, axis: int, max_width: int, generator: torch.Generator | None, fill: float) -> None:
    size = spec.shape[axis]
    # torchaudio's semantics: width uniform in [0, max_width), then a start that keeps the mask inside the axis.
    width = min(int(torch.rand((), generator=generator).item() * max_width), size)
    start = int(torch.randint(0, size - width + 1, (), generator=generator).item())
    spec.narrow(axis, start, width).fill_(fill)


def spec_augment(
    spec: torch.Tensor,
    generator: torch.Generator | None = None,
    p: float = 0.8,
    time_mask: int = 180,
    freq_mask: int = 35,
    fill: float = 0.0,
) -> torch.Tensor:
    """T_mask: SpecAugment on a mel spectrogram (..., F, T); returns a masked copy (the input is left alone).

    With probability ``p`` (one draw): a time mask (width uniform in [0, time_mask) frames, start uniform over the
    positions that keep it inside), then a frequency mask the same way over the mel bins; masked cells get ``fill``
    (0 on the power spectrogram, as torchaudio's TimeMasking/FrequencyMasking; on a dB spectrogram pass the dB value
    of zero power, which gives the same result because dB conversion is elementwise). All leading dims share the masks.
    """
    out = spec.clone()
    if torch.rand((), generator=generator).item() < p:
        if time_mask > 0:
            _mask_along(out, out.dim() - 1, time_mask, generator, fill)
        if freq_mask > 0:
            _mask_along(out, out.dim() - 2, freq_mask, generator, fill)
    return out


# --- T_mix --------------------------------------------------------------------------------------------------------


def mix_probability_and_alpha(k: int) -> tuple[float, float]:
    """T_mix's curriculum: (p, a) = (0.1 + 0.01 k, 0.01 k), k = epochs since ``mix_start_epoch`` + 1 (k >= 1)."""
    if k < 1:
        raise ValueError(f"T_mix curriculum step k must be >= 1, got {k}")
    return 0.1 + 0.01 * k, 0.01 * k


def find_mix_neighbours(
    embeddings: torch.Tensor | np.ndarray,
    queue_size: int = 4000,
    generator: torch.Generator | None = None,
    chunk_size: int = 2048,
) -> torch.Tensor:
    """Each clip's most similar other clip among one random queue of ``queue_size`` clips (T_mix's retrieval).

    embeddings: (N, C) audio embeddings (cosine similarity is used, so any scale works). The queue is
    ``torch.randperm(N, generator=generator)[:queue_size]``, drawn once for all clips (generator on CPU); a clip in
    the queue never picks itself. Queries run in chunks of ``chunk_size`` rows against the queue, on the embeddings'
    device, so 200k clips x 4000 queue entries need only chunk_size x 4000 similarities at a time.
    Returns (N,) int64 CPU tensor of indices into ``embeddings``. A clip whose queue holds only itself (N == 1 or
    queue_size == 1) gets its own index, and mixing a clip with itself leaves it unchanged.
    """
    emb = F.normalize(torch.as_tensor(embeddings).float(), dim=1)
    n = emb.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    queue_len = max(1, min(int(queue_size), n))
    queue = torch.randperm(n, generator=generator)[:queue_len].to(emb.device)
    keys = emb[queue].t().contiguous()
    position_in_queue = torch.full((n,), -1, dtype=torch.long, device=emb.device)
    position_in_queue[queue] = torch.arange(queue_len, device=emb.device)
    neighbours = torch.empty(n, dtype=torch.long, device=emb.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        sims = emb[start:stop] @ keys
        own = position_in_queue[start:stop]
        rows = torch.nonzero(own >= 0).squeeze(1)
        sims[rows, own[rows]] = float("-inf")
        neighbours[start:stop] = queue[sims.argmax(dim=1)]
    return neighbours.cpu()


def mix_waveforms(own: np.ndarray, neighbour: np.ndarray, alpha: float) -> np.ndarray:
    """T_mix's waveform: (1 - alpha) * own + alpha * neighbour, both (N,) at the same sample rate.

    The longer one is cut to the shorter length first (as the official loader does, before tiling to 10 s).
    """
    length = min(len(own), len(neighbour))
    mixed = (1.0 - alpha) * own[:length] + alpha * neighbour[:length]
    return mixed.astype(np.float32, copy=False)


# --- L_geo's transform ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeoTransform:
    """One draw of L_geo's transform T for a batch.

    angles: (B,) rotation in degrees about the image centre, positive = counter-clockwise as seen on screen
    (kornia's / OpenCV's convention); scale: zoom factor for the whole batch (0.5 = zoom out: content shrinks about the
    centre, the border is zero-padded, and the output is ``scale`` times the input size); flip: a horizontal flip of
    the whole batch, applied last.
    """

    angles: torch.Tensor
    scale: float
    flip: bool


def sample_geo_transform(
    batch_size: int,
    generator: torch.Generator | None = None,
    max_rotation: int = 30,
    scales: Sequence[float] = (1.0, 0.5),
    scale_p: float = 0.5,
    flip_p: float = 0.5,
) -> GeoTransform:
    """Draw T as the official code: an integer angle per sample uniform in [-max_rotation, max_rotation], then per
    batch ``scales[1]`` with probability ``scale_p`` (else ``scales[0]``) and a horizontal flip with probability
    ``flip_p``. All draws come from ``generator`` (CPU)."""
    angles = torch.randint(-max_rotation, max_rotation + 1, (batch_size,), generator=generator).float()
    scale = float(scales[1]) if torch.rand((), generator=generator).item() < scale_p else float(scales[0])
    flip = bool(torch.rand((), generator=generator).item() < flip_p)
    return GeoTransform(angles=angles, scale=scale, flip=flip)


def _warp_matrices(angles: torch.Tensor, scale: float, height: int, width: int, centre: str = "exact") -> torch.Tensor:
    """(B, 2, 3) ``affine_grid`` matrices mapping each output position to its source (normalised coordinates).

    Forward map in pixels about the centre c (y points down): dst - c = scale * [[cos, sin], [-sin, cos]] (src - c),
    which turns content counter-clockwise on screen for a positive angle. affine_grid needs the inverse,
    src - c = (1 / scale) * [[cos, -sin], [sin, cos]] (dst - c), rewritten for coordinates normalised by (W/2, H/2)
    (``align_corners=False``: pixel x sits at (2x + 1) / W - 1). ``centre``: ``exact``, the image centre
    ((W - 1) / 2, (H - 1) / 2), normalised (0, 0); ``code``, pixel (W / 2, H / 2) as the released code's kornia call,
    normalised (1 / W, 1 / H): then src = A dst + (c - A c).
    """
    rad = torch.deg2rad(angles)
    cos, sin = torch.cos(rad) / scale, torch.sin(rad) / scale
    cx, cy = {"exact": (0.0, 0.0), "code": (1.0 / width, 1.0 / height)}[centre]
    a_xy, a_yx = -sin * (height / width), sin * (width / height)
    row_x = torch.stack([cos, a_xy, cx - (cos * cx + a_xy * cy)], dim=1)
    row_y = torch.stack([a_yx, cos, cy - (a_yx * cx + cos * cy)], dim=1)
    return torch.stack([row_x, row_y], dim=1)


def apply_geo_transform(
    x: torch.Tensor,
    transform: GeoTransform,
    out_size: tuple[int, int] | None = None,
    upsample_to: tuple[int, int] | None = None,
    centre: str = "exact",
) -> torch.Tensor:
    """Apply T to images or maps: (B, C, H, W) -> (B, C, H', W'), float32.

    Steps, as the official kornia code: resize to ``upsample_to`` when given and different (bilinear; a map is
    upsampled to the image size so it is warped at the image's resolution), warp by rotation and scale about the
    centre (bilinear, zeros outside), resize to ``out_size`` (default: ``int(scale * H), int(scale * W)`` of the
    input's size, e.g. a 14 x 14 map -> 7 x 7 at scale 0.5, a 224 image -> 112), then flip horizontally if T flips.
    ``centre``: ``exact`` rotates and scales about the true image centre ((W - 1) / 2, (H - 1) / 2 in pixel indices),
    so a 90-degree turn or a flip moves pixel centres onto pixel centres; ``code`` about pixel (W / 2, H / 2), half a
    pixel off, as the released code's kornia ``warp_affine`` (``transforms.equivariance.centre``).
    """
    height, width = x.shape[-2:]
    x = x.float()
    if upsample_to is not None and tuple(upsample_to) != (height, width):
        x = F.interpolate(x, size=tuple(upsample_to), mode="bilinear", align_corners=False)
    theta = _warp_matrices(transform.angles.to(device=x.device, dtype=torch.float32), transform.scale, *x.shape[-2:],
                           centre)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if out_size is None:
        out_size = (int(height * transform.scale), int(width * transform.scale))
    if tuple(out_size) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=tuple(out_size), mode="bilinear", align_corners=False)
    if transform.flip:
        x = x.flip(-1)
    return x
