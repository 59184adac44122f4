"""Localisation maps: read and write precomputed maps (``--maps``), and a model's maps on a test set's clips."""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from sslt_cli.checkpoint import describe_file
from sslt_cli.data.manifest import Clip, atomic_write_bytes
from sslt_cli.errors import DataError
from sslt_cli.metrics import Protocol

if TYPE_CHECKING:
    from sslt_cli.checkpoint import LoadedModel
    from sslt_cli.ogl import ObjectGuidance

BatchHook = Callable[[list, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def _as_map(array: np.ndarray, where: str) -> np.ndarray:
    """A loaded array as one float32 (h, w) map; leading singleton axes ((1, h, w), (1, 1, h, w)) are dropped."""
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2 or 0 in array.shape:
        raise DataError(f"{where}: a map must be a 2-D array (h, w), got shape {tuple(array.shape)}")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
            or array.dtype == np.bool_):
        raise DataError(f"{where}: dtype {array.dtype} is not a real number type; save maps as float arrays")
    return array.astype(np.float32)


def load_maps(path: str | Path) -> dict[str, np.ndarray]:
    """Precomputed maps: a folder of ``<clip id>.npy`` or one ``.npz`` keyed by clip id -> {id: (h, w) float32}.

    Any map size; (1, h, w) and (1, 1, h, w) arrays are accepted. Values are not checked here: a map with NaN or
    inf is excluded (and listed) when scored. float64 maps are cast to float32 like the official pipelines do.
    """
    path = Path(path).expanduser()
    hint = "--maps takes a folder of <clip id>.npy files or one .npz file keyed by clip id"
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; {hint}")
    maps: dict[str, np.ndarray] = {}
    if path.is_dir():
        files = sorted(path.glob("*.npy"))
        if not files:
            raise DataError(f"{path}: no .npy files in this folder; {hint}")
        for file in files:
            try:
                array = np.load(file, allow_pickle=False)
            except (ValueError, OSError, EOFError):
                raise DataError(f"{file}: {numpy_file_problem(file, '.npy array')}") from None
            maps[file.stem] = _as_map(array, str(file))
        return maps
    if path.suffix != ".npz":
        raise DataError(f"{path}: expected a folder of .npy files or a .npz file, not a "
                        f"{path.suffix or 'file without extension'}; {hint}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            for key in archive.files:
                maps[key] = _as_map(archive[key], f"{path}[{key}]")
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        raise DataError(f"{path}: {numpy_file_problem(path, '.npz archive')}; {hint}") from None
    if not maps:
        raise DataError(f"{path}: the archive holds no arrays; {hint}")
    return maps


def numpy_file_problem(path: Path, expected: str) -> str:
    """Why numpy could not read ``path`` (``expected``: '.npy array' or '.npz archive'), from what the file is; never
    numpy's advice to load pickled data unsafely."""
    kind = describe_file(path)
    if kind.startswith(("a zip archive", "a .npy array")):
        return f"a truncated or damaged {expected} ({kind})"
    return f"not a {expected}: {kind}"


def save_maps(maps: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """Write maps as one ``.npz`` keyed by clip id (what :func:`load_maps` reads), atomically."""
    path = Path(path)
    buffer = io.BytesIO()
    np.savez(buffer, **{cid: np.asarray(m, dtype=np.float32) for cid, m in maps.items()})
    atomic_write_bytes(path, buffer.getvalue())
    return path


def embed_images(model: torch.nn.Module, images: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """images (B, 3, H, W) normalised -> the visual maps (B, C, h, w), L2-normalised over C: the image half of a map,
    computed once per frame whatever audio it is paired with."""
    return model.embed_image(images.to(device, non_blocking=True))


def embed_audio(model: torch.nn.Module, specs: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """specs (B, 1, n_mels, T) log-mel dB -> the audio embeddings (B, C), L2-normalised: the audio half of a map."""
    return model.embed_audio(specs.to(device, non_blocking=True))


def map_value_range(loaded: "LoadedModel") -> tuple[float, float]:
    """The value range of the raw maps of ``loaded``'s family (:data:`~sslt_cli.families.FAMILIES`): (-1, 1) for
    cosine maps (SSL-TIE, LVS, SSL-Align), +-1/0.03 for EZ-VSL, FNAC and SLAVC's cos / tau. Its common scale,
    ``(A - lo) / (hi - lo)``, is (cos + 1) / 2 for every family (what the negative-audio metrics threshold)."""
    from sslt_cli.families import get_family

    return tuple(get_family(loaded.family).value_range)  # type: ignore[return-value]


def maps_of(loaded: "LoadedModel", v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The raw map of each image with an audio, in the family's own scale (``model.maps``): v (B, C, h, w) from
    :func:`embed_images`, a (B, C) from :func:`embed_audio` -> (B, h, w) float32."""
    return loaded.model.maps(v, a)[:, 0].float()


@dataclass(frozen=True)
class AudioInputs:
    """How a loaded model's audio front end makes a spectrogram: ``of_file(path)`` (a clip's audio, as its positive
    pass reads it) and ``of_wave(wave)`` (a mono waveform at ``sample_rate`` lasting ``seconds``, the front end's
    window: what a generated negative audio is made as), both -> (1, F, T)."""

    sample_rate: int
    seconds: float
    of_file: Callable[[str], torch.Tensor]
    of_wave: Callable[[np.ndarray], torch.Tensor]


def audio_inputs(loaded: "LoadedModel") -> AudioInputs:
    """The audio front end of ``loaded``'s recipe (``audio.front_end``): sslt's log-mel (the recipe's ``audio``
    section: tiled to ``clip_seconds``) or a released family's (:mod:`sslt_cli.frontends`: its window at the recipe's
    sample rate; a generated waveform is not clipped to [-1, 1], as vssl_eval feeds its noise)."""
    from sslt_cli import frontends
    from sslt_cli.audio import load_waveform
    from sslt_cli.data.datasets import waveform_spectrogram

    audio = loaded.recipe.audio
    rate = int(audio.sample_rate)
    if audio.front_end == "logmel":
        return AudioInputs(rate, float(audio.clip_seconds),
                           lambda path: waveform_spectrogram(audio, load_waveform(path, rate)[0]),
                           lambda wave: waveform_spectrogram(audio, wave))
    front_end = frontends.get_front_end(audio.front_end)
    return AudioInputs(rate, front_end.window_seconds, lambda path: frontends.spectrogram_of_file(path, front_end.name),
                       lambda wave: frontends.spectrogram_of_wave(wave, rate, front_end.name, clip=False))


def maps_from_batches(model: torch.nn.Module, batches: Iterable[tuple[Sequence[str], torch.Tensor, torch.Tensor]],
                      device: str | torch.device, progress: Callable[[int], None] | None = None,
                      on_batch: BatchHook | None = None, ogl: "ObjectGuidance | None" = None
                      ) -> dict[str, np.ndarray]:
    """Localisation maps of a model over test batches -> {clip id: (h, w) float32 cosine map}.

    batches yield ``(ids, images (B, 3, H, W) normalised, specs (B, 1, n_mels, T) log-mel dB)``; the map of each
    image with its own audio is ``localisation_map(model.embed_image(images), model.embed_audio(specs))``
    (B, 1, h, w), ``model.maps(v, a)`` for any network (a released family's map in its own scale). The model is put
    in eval mode; ``progress`` is called with the clip count of each batch and
    ``on_batch(ids, images, v, a, maps (B, h, w))`` sees each batch's embeddings (validation's L_cl and heatmaps),
    outside autocast. ``ogl``: EZ-VSL's object-guided localisation; each map is then the combined (S, S) map
    (:mod:`sslt_cli.ogl`).
    """
    model.eval()
    maps: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        for ids, images, specs in batches:
            v = embed_images(model, images, device)
            a = embed_audio(model, specs, device)
            batch_maps = model.maps(v, a)[:, 0].float()
            if ogl is not None:
                batch_maps = ogl.apply(batch_maps, images)
            batch_maps = batch_maps.cpu().numpy()
            if on_batch is not None:
                with torch.autocast(torch.device(device).type, enabled=False):
                    on_batch(list(ids), images, v, a, torch.from_numpy(batch_maps))
            for cid, m in zip(ids, batch_maps):
                if cid in maps:
                    raise DataError(f"clip id {cid} appears twice in the evaluation batches; "
                                    f"each test clip must be listed once")
                maps[cid] = m
            if progress is not None:
                progress(len(ids))
    return maps



def eval_loader(clips: Sequence[Clip], recipe: Any, device: str | torch.device, image_mode: str, *,
                batch_size: int | None = None, num_workers: int | None = None) -> torch.utils.data.DataLoader:
    """A loader of (id, image, spec) items for evaluation: the protocol's image pre-processing (``image_mode``) at
    ``recipe.data.image_size``, the recipe's audio front end, no augmentation, the clips' order kept; batch size and
    workers default to ``recipe.eval.batch_size`` and ``recipe.data.num_workers``."""
    from sslt_cli.data import augment
    from sslt_cli.data.datasets import AudioVisualDataset, collate_skip_bad

    dataset = AudioVisualDataset(
        list(clips), image_transform=augment.build_eval_transform(recipe.data.image_size, image_mode), n_views=1,
        audio=recipe.audio.model_dump(), spec_augment=None, train=False, seed=recipe.seed, cache_dir=None)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size or recipe.eval.batch_size, shuffle=False,
        num_workers=recipe.data.num_workers if num_workers is None else num_workers, collate_fn=collate_skip_bad,
        pin_memory=torch.device(device).type == "cuda")


def predict_maps(loaded: "LoadedModel", clips: Sequence[Clip], protocol: Protocol, *, device: str | torch.device,
                 batch_size: int | None = None, num_workers: int | None = None,
                 pairs: Sequence[tuple[str, Clip, Clip]] | None = None, progress: Callable[[int], None] | None = None,
                 on_batch: BatchHook | None = None, ogl: "ObjectGuidance | None" = None
                 ) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
    """The one step from a loaded model to maps: ``loaded``'s maps on ``clips`` (each frame with its own audio), or on
    ``pairs`` (key, frame clip, audio clip).

    ``loaded`` (:class:`~sslt_cli.checkpoint.LoadedModel`, of any family: :func:`sslt_cli.families.load_released`)
    brings the network and the recipe that describes its inputs: frames get the protocol's image pre-processing at
    ``recipe.data.image_size``, audio the recipe's front end (``audio.front_end``: log-mel or a released one),
    the maps are computed at ``recipe.eval.precision``. Returns ({key: (h, w) map}, [(key, reason)] for clips that
    could not be decoded); ``ogl`` as in :func:`maps_from_batches`.
    """
    from sslt_cli.model import autocast_for

    if pairs is None:
        items = list(clips)
        keys = [c.id for c in items]
    else:
        # a pair's frame comes from one clip and its audio from another: a synthetic Clip carries both paths
        items = [Clip(id=key, frame=fc.frame, audio=ac.audio) for key, fc, ac in pairs]
        keys = [key for key, _, _ in pairs]
    recipe = loaded.recipe
    loader = eval_loader(items, recipe, device, protocol.image_preprocessing, batch_size=batch_size,
                         num_workers=num_workers)
    skipped: list[tuple[str, str]] = []

    def batches():
        for batch in loader:
            skipped.extend(batch.get("skipped", []))
            if "image" in batch:
                yield [keys[int(i)] for i in batch["index"]], batch["image"], batch["spec"]

    device = torch.device(device)
    with autocast_for(device, recipe.eval.precision):
        maps = maps_from_batches(loaded.model, batches(), device, progress, on_batch, ogl)
    return maps, skipped
