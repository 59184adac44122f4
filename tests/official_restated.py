"""The released repositories' own code paths, re-stated by this test suite (written from reading them, at the commits
named in each docstring; no line copied): how each saves its checkpoint, its network's test-time forward pass and
its test loader's front end. The fidelity tests (tests/test_families_fidelity.py) require sslt's maps to equal these.

* LVS (hche11/Localizing-Visual-Sounds-the-Hard-Way@8fe8cbb): ``model.py`` AVENet with ``models/base_models.py``
  ResNet-18s (layer4 stride 1, stems ``conv1`` / ``conv1_a`` / ``conv1_flow``, ``fc``); ``test.py`` loads
  ``checkpoint['model_state_dict']`` into a DataParallel model (keys ``module.``); ``datasets/dataloader.py``.
* EZ-VSL (stoneMo/EZ-VSL@95ff5bf) ``model.py`` / ``datasets.py`` / ``audio_io.py``; FNAC (OpenNLPLab/FNAC_AVL@0a0ca78)
  has the same network and front end; SLAVC (stoneMo/SLAVC@05b429c) ``model.py`` with ``mode='test'``.
* SSLalignment (kaistmm/SSLalignment@e7ae3c5) ``datasets_lvs.py`` (its LVS models' front end).
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock


# ------------------------------------------------------------------------------------------ LVS AVENet

class LvsBaseResNet(nn.Module):
    """base_models.ResNet(BasicBlock, [2, 2, 2, 2], modal): three stems, layer4 at stride 1, avgpool and fc unused."""

    def __init__(self, modal: str) -> None:
        super().__init__()
        self.modal = modal
        self.inplanes = 64
        self.conv1_a = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.conv1_flow = nn.Conv2d(6, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._layer(64, 1)
        self.layer2 = self._layer(128, 2)
        self.layer3 = self._layer(256, 2)
        self.layer4 = self._layer(512, 1)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, 1000)

    def _layer(self, planes: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        blocks = [BasicBlock(self.inplanes, planes, stride, downsample), BasicBlock(planes, planes)]
        self.inplanes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1_a(x) if self.modal == "audio" else self.conv1(x)
        x = self.maxpool(self.relu(self.bn1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class LvsAVENet(nn.Module):
    """LVS model.py AVENet's test path: ``A = einsum('ncqa,nchw->nqa', img, aud[..., None, None])``."""

    def __init__(self) -> None:
        super().__init__()
        self.imgnet = LvsBaseResNet("vision")
        self.audnet = LvsBaseResNet("audio")
        self.m = nn.Sigmoid()
        self.avgpool = nn.AdaptiveMaxPool2d((1, 1))

    def forward(self, image: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        b = image.shape[0]
        img = nn.functional.normalize(self.imgnet(image), dim=1)
        aud = nn.functional.normalize(self.avgpool(self.audnet(audio)).view(b, -1), dim=1)
        return torch.einsum("ncqa,nchw->nqa", [img, aud.unsqueeze(2).unsqueeze(3)]).unsqueeze(1)


# ------------------------------------------------------------------------------------------ EZ-VSL / FNAC / SLAVC

def _imgnet() -> nn.Module:
    net = resnet18(weights=None)
    net.avgpool, net.fc = nn.Identity(), nn.Identity()
    return net


def _audnet() -> nn.Module:
    net = resnet18(weights=None)
    net.conv1 = nn.Conv2d(1, 64, kernel_size=(7, 7), stride=(2, 2), padding=(3, 3), bias=False)
    net.avgpool, net.fc = nn.AdaptiveMaxPool2d((1, 1)), nn.Identity()
    return net


class EZVSL(nn.Module):
    """EZ-VSL model.py (and FNAC's, dropout p=0 at test): ``Savl = diag(einsum('nchw,mc->nmhw') / tau)``."""

    def __init__(self, tau: float = 0.03, dim: int = 512) -> None:
        super().__init__()
        self.tau = tau
        self.imgnet = _imgnet()
        self.img_proj = nn.Conv2d(512, dim, kernel_size=(1, 1))
        self.audnet = _audnet()
        self.aud_proj = nn.Linear(512, dim)

    def forward(self, image: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        img = nn.functional.normalize(self.img_proj(self.imgnet(image).unflatten(1, (512, 7, 7))), dim=1)
        aud = nn.functional.normalize(self.aud_proj(self.audnet(audio)), dim=1)
        logits = torch.einsum("nchw,mc->nmhw", img, aud) / self.tau
        b = img.shape[0]
        return logits[torch.arange(b), torch.arange(b)]


class SLAVC(nn.Module):
    """SLAVC model.py at ``mode='test'``: two heads per side; the online or (use_mom_eval) momentum branch."""

    def __init__(self, tau: float = 0.03, dim: int = 512, use_mom_eval: bool = False) -> None:
        super().__init__()
        self.tau, self.use_mom_eval = tau, use_mom_eval
        self.imgnet, self.audnet = _imgnet(), _audnet()
        self.img_dropout, self.aud_dropout = nn.Dropout(0.0), nn.Dropout(0.0)
        self.img_proj1, self.img_proj2 = nn.Conv2d(512, dim, (1, 1)), nn.Conv2d(512, dim, (1, 1))
        self.aud_proj1, self.aud_proj2 = nn.Linear(512, dim), nn.Linear(512, dim)
        self.momentum_imgnet, self.momentum_audnet = _imgnet(), _audnet()
        self.momentum_img_proj1, self.momentum_img_proj2 = nn.Conv2d(512, dim, (1, 1)), nn.Conv2d(512, dim, (1, 1))
        self.momentum_aud_proj1, self.momentum_aud_proj2 = nn.Linear(512, dim), nn.Linear(512, dim)

    def _img(self, net, p1, p2, image):
        img = self.img_dropout(net(image).unflatten(1, (512, 7, 7)))
        return nn.functional.normalize(p1(img), dim=1), nn.functional.normalize(p2(img), dim=1)

    def _aud(self, net, p1, p2, audio):
        aud = self.aud_dropout(net(audio))
        return nn.functional.normalize(p1(aud), dim=1), nn.functional.normalize(p2(aud), dim=1)

    def forward(self, image: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        img1, img2 = self._img(self.imgnet, self.img_proj1, self.img_proj2, image)
        aud1, aud2 = self._aud(self.audnet, self.aud_proj1, self.aud_proj2, audio)
        t1, t2 = self._img(self.momentum_imgnet, self.momentum_img_proj1, self.momentum_img_proj2, image)
        u1, u2 = self._aud(self.momentum_audnet, self.momentum_aud_proj1, self.momentum_aud_proj2, audio)
        if self.use_mom_eval:
            img1, img2, aud1, aud2 = t1, t2, u1, u2
        s1 = torch.einsum("nchw,nc->nhw", img1, aud1) / self.tau
        s2 = torch.einsum("nchw,nc->nhw", img2, aud2) / self.tau
        return (s1 + s2) / 2


# ------------------------------------------------------------------------------------------ saving as released

def save_released(state: dict[str, torch.Tensor], path: Path, container: str, prefix: str, **extras) -> Path:
    """``torch.save({container: {prefix + key: tensor}, **extras})``: LVS ``{'model_state_dict'}`` of a DataParallel
    model, EZ-VSL / FNAC / SLAVC ``{'model', 'optimizer', 'epoch', best_*}`` from DDP, SSLalignment's ``ours_*``
    without ``module.``."""
    torch.save({container: {prefix + k: v for k, v in state.items()}, **extras}, path)
    return path


def random_state(net: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random weights and BatchNorm statistics for ``net`` (so BN in eval mode is not the identity)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in net.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = value
        elif key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=gen) + 0.5
        elif key.endswith("running_mean"):
            state[key] = torch.randn(value.shape, generator=gen) * 0.1
        else:
            fan = value[0].numel() if value.dim() > 1 else 1
            state[key] = torch.randn(value.shape, generator=gen) / max(fan, 1) ** 0.5
    net.load_state_dict(state)
    return state


# ------------------------------------------------------------------------------------------ front ends

def _spectrogram(samples: np.ndarray, samplerate: int, noverlap: int) -> torch.Tensor:
    from scipy import signal

    _, _, spectrogram = signal.spectrogram(samples, samplerate, nperseg=512, noverlap=noverlap)
    spectrogram = np.log(spectrogram + 1e-7)
    # transforms.ToTensor() of an (F, T) float64 array, Normalize(mean=[0.0], std=[12.0]), then spec.float()
    return ((torch.from_numpy(spectrogram)[None] - 0.0) / 12.0).float()


def lvs_spectrogram(path: Path) -> torch.Tensor:
    """LVS datasets/dataloader.py __getitem__ (a mono file)."""
    import soundfile as sf

    samples, samplerate = sf.read(str(path))
    if samples.shape[0] < samplerate * 10:
        n = int(samplerate * 10 / samples.shape[0]) + 1
        samples = np.tile(samples, n)
    resamples = samples[:samplerate * 10]
    resamples[resamples > 1.] = 1.
    resamples[resamples < -1.] = -1.
    return _spectrogram(resamples, samplerate, 274)


def align_lvs_spectrogram(path: Path) -> torch.Tensor:
    """SSLalignment datasets_lvs.py (audio_length 10, st 3.5, fi 6.5)."""
    import soundfile as sf

    samples, samplerate = sf.read(str(path))
    if len(samples.shape) > 1 and samples.shape[1] == 2:
        samples = samples[:, 0]
    if samples.shape[0] < samplerate * 10:
        samples = np.tile(samples, int(samplerate * 10 / samples.shape[0]) + 1)
    resamples = samples[:samplerate * 10][int(16000 * 3.5):int(16000 * 6.5)]
    resamples[resamples > 1.] = 1.
    resamples[resamples < -1.] = -1.
    return _spectrogram(resamples, samplerate, 353)


def _load_audio_av(path: Path, start_time: float, duration: float) -> tuple[np.ndarray, int]:
    """EZ-VSL audio_io.load_audio_av(container, start_time, duration), layout mono, the stream's rate."""
    import av

    container = av.open(str(path))
    stream = container.streams.audio[0]
    ss = stream.start_time * stream.time_base if stream.start_time is not None else 0.
    ff = ss + stream.duration * stream.time_base
    rate = stream.rate
    duration = min(duration, ff - start_time)
    end_time = start_time + duration
    resampler = av.audio.resampler.AudioResampler(format="s16p", layout="mono", rate=rate)
    chunks = []
    container.seek(int(start_time * av.time_base))
    for frame in container.decode(audio=0):
        chunk_start = frame.pts * frame.time_base
        if chunk_start + Fraction(frame.samples, frame.rate) < start_time:
            continue
        if chunk_start > end_time:
            break
        frame.pts = None
        out = resampler.resample(frame)
        for piece in (out if isinstance(out, list) else [out]):
            chunks.append((chunk_start, piece.to_ndarray()))
    container.close()
    audio = np.concatenate([c[1] for c in chunks], 1)
    ss = int((start_time - chunks[0][0]) * rate)
    t = int(duration * rate)
    if ss < 0:
        audio = np.pad(audio, ((0, 0), (-ss, 0)), "constant", constant_values=0)
        ss = 0
    audio = audio[:, ss:ss + t]
    return audio / np.iinfo(audio.dtype).max, rate


def ezvsl_spectrogram(path: Path, dur: float = 3.) -> torch.Tensor:
    """EZ-VSL datasets.load_spectrogram (SLAVC's and FNAC's the same)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        audio_dur = stream.duration * stream.time_base
    audio_ss = max(float(audio_dur) / 2 - dur / 2, 0)
    audio, samplerate = _load_audio_av(path, audio_ss, dur)
    audio = np.clip(audio, -1., 1.).mean(0)
    if audio.shape[0] < samplerate * dur:
        audio = np.tile(audio, int(samplerate * dur / audio.shape[0]) + 1)
    audio = audio[:int(samplerate * dur)]
    return _spectrogram(audio, samplerate, 274)


def align_ezvsl_spectrogram(path: Path, dur: float = 10.) -> torch.Tensor:
    """SSLalignment datasets.load_spectrogram (how its test feeds EZ-VSL and SLAVC) and its audio transform
    (ToTensor, CenterCrop((257, 200)), Normalize(0, 12))."""
    import av
    from torchvision import transforms

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        audio_dur = stream.duration * stream.time_base
    audio, samplerate = _load_audio_av(path, 0, dur)
    audio = np.clip(audio, -1., 1.).mean(0)
    if audio.shape[0] < samplerate * dur:
        audio = np.tile(audio, int(samplerate * dur / audio.shape[0]) + 1)
    audio = audio[:int(samplerate * dur)]
    audio_center = int(float(audio_dur) / 2 * samplerate)
    audio = np.roll(audio, int(samplerate * dur / 2) - audio_center)
    from scipy import signal

    _, _, spectrogram = signal.spectrogram(audio, samplerate, nperseg=512, noverlap=274)
    spectrogram = np.log(spectrogram + 1e-7)
    t = transforms.Compose([transforms.ToTensor(), transforms.CenterCrop((257, 200)),
                            transforms.Normalize(mean=[0.0], std=[12.0])])
    return t(spectrogram).float()


def image_resize_centercrop(path: Path) -> torch.Tensor:
    """LVS test transform: Resize(224, BICUBIC), CenterCrop(224), ToTensor, Normalize(ImageNet)."""
    from PIL import Image
    from torchvision import transforms

    t = transforms.Compose([transforms.Resize(224, Image.BICUBIC), transforms.CenterCrop(224), transforms.ToTensor(),
                            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    return t(Image.open(path).convert("RGB"))


def image_resize_square(path: Path) -> torch.Tensor:
    """EZ-VSL / SLAVC / FNAC test transform: Resize((224, 224), BICUBIC), ToTensor, Normalize(ImageNet)."""
    from PIL import Image
    from torchvision import transforms

    t = transforms.Compose([transforms.Resize((224, 224), Image.BICUBIC), transforms.ToTensor(),
                            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    return t(Image.open(path).convert("RGB"))


def image_tensor_resize(path: Path) -> torch.Tensor:
    """SSLalignment's test transform: ToTensor, Resize((224, 224), BICUBIC) on the tensor, CenterCrop, Normalize."""
    from PIL import Image
    from torchvision import transforms

    t = transforms.Compose([transforms.ToTensor(),
                            transforms.Resize((224, 224), transforms.InterpolationMode.BICUBIC, antialias=True),
                            transforms.CenterCrop(224),
                            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    return t(Image.open(path).convert("RGB"))


def upsample_and_score(heatmap: torch.Tensor, gt: np.ndarray, preset: str) -> float:
    """One clip's IoU as each method's own test loop scores its (1, 1, h, w) map (the loops are re-stated in full in
    tests/test_official_parity.py; this is the same arithmetic for one clip)."""
    import cv2

    def normalize_img(value):
        lo, hi = value.min(), value.max()
        return (value - lo) / (hi - lo) if hi - lo != 0 else value

    def ciou(infer_map):
        return float(np.sum(infer_map * gt) / (np.sum(gt) + np.sum(infer_map * (gt == 0))))

    if preset in ("lvs", "ssltie", "align_lvs"):
        now = cv2.resize(heatmap[0, 0].numpy(), dsize=(224, 224), interpolation=cv2.INTER_LINEAR)
        pred = 1 - normalize_img(-now)
        thr = np.sort(pred.flatten())[int(224 * 224 / 2)]
        if preset == "align_lvs":
            return ciou((pred > thr).astype(np.float64))
        pred[pred > thr] = 1
        pred[pred < 1] = 0
        return ciou((pred >= 0.5).astype(np.float64))
    if preset in ("ezvsl", "fnac", "align"):
        pred = normalize_img(F.interpolate(heatmap, size=(224, 224), mode="bilinear", align_corners=True)[0, 0].numpy())
        thr = np.sort(pred.flatten())[int(224 * 224 * 0.5)]
        return ciou(((pred > thr) if preset == "align" else (pred >= thr)).astype(np.float64))
    if preset in ("slavc_rel", "slavc_abs"):
        up = F.interpolate(heatmap, size=(224, 224), mode="bicubic", align_corners=True)[0, 0].numpy()
        scores = (up - (-1. / 0.03)) / (1. / 0.03 - (-1. / 0.03))
        if preset == "slavc_abs":
            return ciou((scores >= 0.5).astype(np.float64))
        pred = normalize_img(scores)
        return ciou((pred >= np.sort(pred.flatten())[int(pred.size * 0.5)]).astype(np.float64))
    raise ValueError(preset)


def official_map(name: str, net: nn.Module, image: torch.Tensor, spec: torch.Tensor) -> torch.Tensor:
    """The (B, 1, h, w) map the official test loop feeds its upsampling (``forward(...)[1].unsqueeze(1)`` etc.)."""
    with torch.no_grad():
        out = net.eval()(image.float(), spec.float())
    return out if name in ("lvs", "ssl_align") else out.unsqueeze(1)
