"""Torch datasets over prepared clips: decode the frame and the audio in DataLoader workers, augment, count bad clips.

One class serves training and evaluation. An item is a function of (seed, epoch, index) only, so a resumed run
reproduces its augmentations and DataLoader workers (persistent or not) agree with the main process. A clip that
cannot be decoded becomes a :class:`BadClip` marker; :func:`collate_skip_bad` drops it from the batch and reports
``batch["skipped"] = [(id, reason), ...]`` so the main process can count it and list it in the run folder.

Spectrograms: the waveform is loaded at one sample rate (resampled and downmixed by ``audio.load_waveform``), cut to
``source_seconds`` if set (Flickr training uses the first 4 s), optionally mixed with its T_mix neighbour, tiled and cut
to ``clip_seconds``, turned into log-mel dB. The unmixed log-mel of a clip never changes, so with ``cache_dir`` it is
computed once and kept as ``.npy``. T_mask is applied to the dB spectrogram with the dB value of zero power as the
fill, which equals masking the power spectrogram before dB (the official order) because dB conversion is elementwise;
that keeps the cache usable with T_mask on.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence, cast

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from sslt_cli import audio as audio_lib
from sslt_cli import frontends
from sslt_cli.config import AudioConfig, MaskConfig
from sslt_cli.data.augment import (
    ImageTransform,
    mix_probability_and_alpha,
    mix_waveforms,
    seeded_call,
    spec_augment,
)
from sslt_cli.data.manifest import Clip, atomic_write_bytes
from sslt_cli.errors import DataError

CACHE_FORMAT = "sslt-logmel/1"


class BadClip(NamedTuple):
    """What a dataset item is when its clip cannot be decoded: dropped by :func:`collate_skip_bad`, reason kept."""

    index: int
    id: str
    reason: str


def read_frame(path: str):
    """Decode an image file to a PIL RGB image; DataError naming the file when it is missing or unreadable."""
    from PIL import Image

    if not path:
        raise DataError("no frame file in the manifest")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"unreadable frame {path}: file not found") from None
    # PIL reports corrupt data as OSError (truncated, unidentified), ValueError or SyntaxError depending on the codec.
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"unreadable frame {path}: {exc}") from None


def precheck_clips(clips: Sequence[Clip]) -> tuple[list[Clip], list[tuple[str, str]]]:
    """Cheap check before training (no decoding): every clip's frame and audio file exists and is not empty.

    Returns (good clips in order, [(clip id, reason), ...] for the others).
    """
    good: list[Clip] = []
    bad: list[tuple[str, str]] = []
    for clip in clips:
        reason = _missing_file_reason("frame", clip.frame) or _missing_file_reason("audio", clip.audio)
        if reason:
            bad.append((clip.id, reason))
        else:
            good.append(clip)
    return good, bad


def _missing_file_reason(kind: str, path: str) -> str:
    if not path:
        return f"no {kind} file in the manifest"
    try:
        size = os.stat(path).st_size
    except OSError:
        return f"missing {kind} file {path}"
    return f"empty {kind} file {path} (0 bytes)" if size == 0 else ""


def collate_skip_bad(items: list[dict | BadClip]) -> dict[str, Any]:
    """DataLoader collate: stack the good items (``default_collate``), drop :class:`BadClip` markers.

    Returns the stacked batch plus ``skipped``: [(clip id, reason), ...] of the dropped items (always present).
    A batch in which every clip was bad is just ``{"skipped": [...]}``.
    """
    good = [item for item in items if not isinstance(item, BadClip)]
    batch: dict[str, Any] = default_collate(good) if good else {}
    batch["skipped"] = [(item.id, item.reason) for item in items if isinstance(item, BadClip)]
    return batch


def waveform_spectrogram(audio: AudioConfig, wave: np.ndarray) -> torch.Tensor:
    """The recipe's audio front end on a waveform already at ``audio.sample_rate``: tiled and cut to
    ``audio.clip_seconds``, then log-mel dB. wave: (N,) -> (1, n_mels, T)."""
    wave = audio_lib.tile_and_cut(wave, audio.clip_seconds, audio.sample_rate)
    return audio_lib.log_mel(wave, audio.sample_rate, n_fft=audio.n_fft, hop_length=audio.hop_length,
                             n_mels=audio.n_mels, normalized=audio.normalized)[0]


class AudioVisualDataset(Dataset):
    """Frames and log-mel spectrograms of prepared clips, for training (augmented views) or evaluation.

    Items (dicts) hold ``index`` (int), ``id`` (str) and:

    - ``train=True``: ``images`` (n_views, 3, H, W) and ``specs`` (n_views, 1, n_mels, T); each view gets its own
      draw of ``image_transform``, T_mask (``spec_augment``) and T_mix. With ``shared_geometry`` the views share one
      draw of the transform's geometric stage (crop, rotation, flip) and differ only in appearance, so a geometric
      transform between them is known (L_geo needs this); ``image_transform`` must then be an ``ImageTransform``.
    - ``train=False``: ``image`` (3, H, W) and ``spec`` (1, n_mels, T), no augmentation (pass an eval transform).

    ``image_transform=None`` skips the frames (audio only, e.g. to embed every clip for T_mix). ``audio``: an
    the recipe's ``audio`` section (``config.AudioConfig``) or a mapping of its fields. ``spec_augment``: the recipe's
    ``transforms.mask`` section (``config.MaskConfig``: p, time, freq), a mapping of those fields, or None (T_mask off). ``mix_neighbours``: (N,) index of each clip's T_mix partner (-1: never mix) and
    ``mix_k`` the curriculum step (p = 0.1 + 0.01k, a = 0.01k; k < 1: off); both can change later with
    :meth:`set_mix`. ``source_seconds`` keeps only the first seconds of each file before tiling. ``cache_dir``
    enables the log-mel cache.

    Call :meth:`set_epoch` (and :meth:`set_mix`) before creating the epoch's DataLoader iterator: both live in shared
    memory, so workers that are already running (persistent workers) see the new values too.
    """

    def __init__(
        self,
        clips: Sequence[Clip],
        *,
        image_transform: Callable[[Any], torch.Tensor] | None,
        n_views: int = 1,
        audio: AudioConfig | Mapping[str, Any] = AudioConfig(),
        spec_augment: MaskConfig | Mapping[str, Any] | None = None,
        train: bool = True,
        shared_geometry: bool = False,
        mix_neighbours: np.ndarray | torch.Tensor | None = None,
        mix_k: int = 0,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        source_seconds: float | None = None,
    ):
        if n_views < 1 or (not train and n_views != 1):
            raise ValueError(f"n_views must be >= 1 for training and 1 for evaluation, got {n_views} (train={train})")
        if shared_geometry and n_views > 1 and not isinstance(image_transform, ImageTransform):
            raise ValueError("shared_geometry needs an ImageTransform (augment.build_image_transform) to split views")
        self.clips = list(clips)
        self.image_transform = image_transform
        self.n_views = n_views
        self.audio = audio if isinstance(audio, AudioConfig) else AudioConfig(**audio)
        self.spec_augment = (spec_augment if spec_augment is None or isinstance(spec_augment, MaskConfig)
                             else MaskConfig(**spec_augment))
        self.train = train
        self.shared_geometry = shared_geometry
        self.seed = int(seed)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.source_seconds = source_seconds
        self._silence_db = float(audio_lib.power_to_db(torch.zeros(())))
        # [epoch, mix_k] and the neighbour table, in shared memory so running workers see set_epoch / set_mix.
        self._state = torch.zeros(2, dtype=torch.long).share_memory_()
        self._neighbours = torch.full((len(self.clips),), -1, dtype=torch.long).share_memory_()
        self.set_mix(mix_neighbours, mix_k)

    def __len__(self) -> int:
        return len(self.clips)

    @property
    def epoch(self) -> int:
        return int(self._state[0])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations the next items draw."""
        self._state[0] = int(epoch)

    def set_mix(self, neighbours: np.ndarray | torch.Tensor | None, k: int) -> None:
        """T_mix for the next items: (N,) partner index per clip (-1: none) at curriculum step k; None or k < 1: off."""
        if neighbours is None or k < 1:
            self._state[1] = 0
            self._neighbours.fill_(-1)
            return
        table = torch.as_tensor(neighbours, dtype=torch.long).reshape(-1)
        if table.numel() != len(self.clips):
            raise ValueError(f"mix neighbours has {table.numel()} entries for {len(self.clips)} clips")
        self._neighbours.copy_(table)
        self._state[1] = int(k)

    def __getitem__(self, index: int) -> dict[str, Any] | BadClip:
        clip = self.clips[index]
        try:
            return self._item(index, clip)
        except DataError as exc:
            return BadClip(index, clip.id, exc.message)

    # -- internals ----------------------------------------------------------------------------------------------

    def _item(self, index: int, clip: Clip) -> dict[str, Any]:
        # Independent streams per (seed, epoch, index): one per image view, one for the geometric stage, one for audio.
        words = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(self.n_views + 2)
        view_seeds, geometry_seed, audio_seed = [int(w) for w in words[:-2]], int(words[-2]), int(words[-1])
        item: dict[str, Any] = {"index": index, "id": clip.id}
        if self.image_transform is not None:
            frame = read_frame(clip.frame)
            if not self.train:
                item["image"] = self.image_transform(frame)
            elif self.shared_geometry and self.n_views > 1:
                transform = cast(ImageTransform, self.image_transform)
                shared = seeded_call(transform.geometric, frame, geometry_seed)
                item["images"] = torch.stack([seeded_call(transform.appearance, shared, s) for s in view_seeds])
            else:
                item["images"] = torch.stack([seeded_call(self.image_transform, frame, s) for s in view_seeds])
        specs = self._spectrograms(clip, index, torch.Generator().manual_seed(audio_seed))
        if self.train:
            item["specs"] = torch.stack(specs)
        else:
            item["spec"] = specs[0]
        return item

    def _spectrograms(self, clip: Clip, index: int, generator: torch.Generator) -> list[torch.Tensor]:
        """n_views log-mel dB spectrograms (1, n_mels, T): T_mix and T_mask drawn per view."""
        k = int(self._state[1]) if self.train else 0
        partner = int(self._neighbours[index]) if k >= 1 else -1
        base: torch.Tensor | None = None
        specs = []
        for _ in range(self.n_views):
            spec = None
            if partner >= 0:
                p, alpha = mix_probability_and_alpha(k)
                if torch.rand((), generator=generator).item() < p:
                    spec = self._mixed_log_mel(clip, self.clips[partner], alpha)
            if spec is None:
                if base is None:
                    base = self._log_mel(clip)
                spec = base
            if self.train and self.spec_augment is not None:
                params = self.spec_augment
                spec = spec_augment(spec, generator, p=params.p, time_mask=params.time, freq_mask=params.freq,
                                    fill=self._silence_db)
            specs.append(spec)
        return specs

    def _waveform(self, path: str) -> np.ndarray:
        wave, _ = audio_lib.load_waveform(path, self.audio.sample_rate)
        if self.source_seconds is not None:
            wave = wave[: max(1, int(round(self.source_seconds * self.audio.sample_rate)))]
        return wave

    def _spectrogram_of(self, wave: np.ndarray) -> torch.Tensor:
        return waveform_spectrogram(self.audio, wave)

    def _mixed_log_mel(self, clip: Clip, partner: Clip, alpha: float) -> torch.Tensor | None:
        """The log-mel of the clip mixed with its partner, or None when the partner cannot be decoded.

        A partner that fails to decode is skipped (the clip stays unmixed): the partner is a clip of this set, so
        its own item reports the failure.
        """
        own = self._waveform(clip.audio)
        try:
            other = self._waveform(partner.audio)
        except DataError:
            return None
        return self._spectrogram_of(mix_waveforms(own, other, alpha))

    def _log_mel(self, clip: Clip) -> torch.Tensor:
        """The clip's unmixed log-mel (1, n_mels, T), through the cache when there is one; under a released model's
        front end (``audio.front_end``, :mod:`sslt_cli.frontends`) that front end's spectrogram of the file."""
        if self.audio.front_end != "logmel":
            return frontends.spectrogram_of_file(clip.audio, self.audio.front_end)
        if self.cache_dir is None:
            return self._spectrogram_of(self._waveform(clip.audio))
        path = self._cache_path(self.cache_dir, clip)
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except (OSError, ValueError):
            pass  # not cached yet (or unreadable): compute and (re)write it
        spec = self._spectrogram_of(self._waveform(clip.audio))
        buffer = io.BytesIO()
        np.save(buffer, spec.numpy())
        atomic_write_bytes(path, buffer.getvalue())
        return spec

    def _cache_path(self, cache_dir: Path, clip: Clip) -> Path:
        """Cache file of a clip: keyed by the front-end settings and the audio file's path, size and mtime, so a
        changed setting or a re-prepared file never reads a stale spectrogram."""
        try:
            stat = os.stat(clip.audio)
        except OSError:
            raise DataError(f"unreadable audio {clip.audio}: file not found") from None
        key = json.dumps([CACHE_FORMAT, self.audio.model_dump(), self.source_seconds,
                          os.path.abspath(clip.audio), stat.st_size, stat.st_mtime_ns])
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        safe_id = clip.id.replace("/", "_").replace("\\", "_")
        return cache_dir / f"{safe_id}.{digest}.npy"
