"""Checkpoints: the sslt format, the one loader, the training state in and out, official SSL-TIE import/export.

An sslt checkpoint (``CHECKPOINT_FORMAT``) is the training state serialised (``train.TrainState``: step, epoch,
batch in epoch, best, T_mix neighbours, skipped steps, validation history) with the model, the optimiser, the
scheduler, the RNG states, the resolved recipe and the world size that wrote it. Files are written atomically
(``runs.Run.save_checkpoint``) and read with ``weights_only=True`` by :func:`read_file`, the only place that loads.

Official checkpoint: ``{'epoch', 'state_dict', 'best_miou', 'optimizer', 'iteration'}``; ``state_dict`` holds 257
tensors (23.9 M parameters): ``imgnet.*`` and ``audnet.*`` are torchvision-named ResNet-18s that each also carry a
1-channel stem ``conv1_a``, a 3-channel ``conv1``, a 6-channel ``conv1_flow`` and a 1000-way ``fc`` (the vision net
runs ``conv1``, the audio net ``conv1_a``), plus ``vision_fc1`` (1x1 conv 1024->512), ``conv3`` and ``norm3``.
The stems a net never runs, both ``fc`` layers and ``vision_fc1`` are never read by the official forward: sslt
does not hold them, checks their presence and shapes on import and writes zeros for them on export.
"""
from __future__ import annotations

import io
import random
import re
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from sslt_cli.data.manifest import atomic_write_bytes
from sslt_cli.errors import CheckpointError, DataError, TrainingError
from sslt_cli.config import Recipe, load_saved_recipe
from sslt_cli.model import EMBED_DIM, build_model, model_shapes
from sslt_cli.runs import Run, checkpoint_step

CHECKPOINT_FORMAT = "sslt-checkpoint/1"

_LIST_AT_MOST = 10
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_OFFICIAL_FORMAT = ("expected the state_dict of SSL-TIE's AVENet (keys imgnet.*, audnet.*, vision_fc1.*, conv3.*, "
                    "norm3.*), bare or inside {'state_dict': ...}")
_TORCHVISION_FORMAT = "a torchvision resnet18 state_dict file (torchvision.models.resnet18(...).state_dict())"


def _torchvision_trunk_state(path: Path, role: str, trunk: nn.Module) -> dict[str, torch.Tensor]:
    """The trunk's tensors from a torchvision resnet18 weight file, checked against ``trunk``'s keys and shapes."""
    if not path.is_file():
        raise CheckpointError(f"{role} init {str(path)!r}: no such file; use 'scratch' or the path of "
                              f"{_TORCHVISION_FORMAT}")
    state = _state_dict_in(read_file(path), path, f"expected {_TORCHVISION_FORMAT}")
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


def read_file(path: str | Path) -> Any:
    """The one checkpoint loader: any weight file (an sslt checkpoint, the official SSL-TIE pickle whose
    ``best_miou`` is a numpy scalar, a torchvision state_dict) loaded on the CPU with ``weights_only=True`` and numpy
    scalars allowed. A missing file, or one that is not such a file, raises CheckpointError saying why."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for a bad file; all mean "not loadable"
        raise CheckpointError(f"{path}: {checkpoint_problem(path, exc)}") from None


def load(path: str | Path) -> dict:
    """An sslt checkpoint (or any dict saved with torch.save) through :func:`read_file`; CheckpointError when the
    file holds something else."""
    state = read_file(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, got {type(state).__name__}")
    return state


_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"
_NPY_MAGIC = b"\x93NUMPY"


def describe_file(path: Path) -> str:
    """What a file that failed to load looks like from its first bytes: ``an empty file``, ``a text file (starts
    with '...')``, ``a zip archive``, ``a pickle``, ``a .npy array``, or ``a binary file``, with its size."""
    size = path.stat().st_size
    if size == 0:
        return "an empty file (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(_ZIP_MAGIC):
        return f"a zip archive of {size} bytes"
    if head.startswith(_NPY_MAGIC):
        return f"a .npy array of {size} bytes"
    if head.startswith(_PICKLE_MAGIC):
        return f"a pickle of {size} bytes"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"a binary file of {size} bytes"
    first = text.splitlines()[0][:40] if text.strip() else text[:40]
    return f"a text file of {size} bytes (it starts with {first!r})"


def checkpoint_problem(path: Path, exc: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in words: truncated, not a checkpoint, holding objects a
    safe load refuses, or holding code (a pickle that would call ``os.system``, ``eval``, ...) that it refuses. Never
    torch's advice to load unsafely."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    kind = describe_file(path)
    if kind.startswith(("an empty", "a text", "a binary")):
        return "an empty file (0 bytes), not a checkpoint" if kind.startswith("an empty") else f"not a checkpoint: {kind}"
    named = re.search(r"unsupported global:? GLOBAL ([\w.]+)", text, re.IGNORECASE)
    found = pickled_globals(path)
    code = [name for name in ([named.group(1)] if named else []) + found if _is_code(name)]
    if code:
        return (f"a file whose pickle holds code ({code[0]}) that a safe load refuses: it would run when loaded; "
                "nothing was run. sslt loads weights only (tensors, numbers, text): use a checkpoint from a source you "
                "trust, saved as a state_dict")
    if named:
        return (f"a checkpoint holding Python objects ({named.group(1)}) that a safe load refuses; sslt loads "
                "weights only (tensors, numbers, text): save the model's state_dict instead")
    if kind.startswith(("a zip archive", "a pickle")):
        return f"a truncated or damaged checkpoint ({kind} that ends early or is corrupt)"
    return f"not a checkpoint: {kind}"


_LEGACY_PICKLES = 5  # torch's legacy format: magic number, protocol, system info, the object, the storage keys
# modules (and builtins) whose callables run code or touch the system: a pickle naming one is code, not data
_CODE_MODULES = {"os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy", "pty", "code",
                 "ctypes", "pickle", "marshal", "types", "webbrowser", "multiprocessing", "signal", "platform"}
_CODE_BUILTINS = {"eval", "exec", "compile", "__import__", "getattr", "setattr", "delattr", "open", "breakpoint",
                  "input", "globals", "locals", "vars", "apply", "execfile"}


def _is_code(name: str) -> bool:
    module, _, attr = name.rpartition(".")
    root = module.split(".")[0]
    return root in _CODE_MODULES or (root in ("builtins", "__builtin__") and attr in _CODE_BUILTINS)


def pickled_globals(path: Path) -> list[str]:
    """The globals (``module.name``) a pickle refers to, read from its opcodes without running it (``pickletools``):
    the ``data.pkl`` of a torch zip checkpoint, or the pickles at the start of a plain or legacy torch file (which holds
    several in a row, then the tensors' bytes); as many as can be read from a damaged file."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                streams = [io.BytesIO(archive.read(member))] if member else []
        else:
            streams = [open(path, "rb")]
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return []
    names: list[str] = []
    strings: list[str] = []
    for stream in streams:
        with stream:
            try:
                for _ in range(_LEGACY_PICKLES):
                    for opcode, arg, _ in pickletools.genops(stream):
                        if opcode.name in ("GLOBAL", "INST"):
                            names.append(str(arg).replace(" ", "."))
                        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                            names.append(f"{strings[-2]}.{strings[-1]}")
                        elif isinstance(arg, str):
                            strings.append(arg)
            except Exception:  # noqa: BLE001 - the end of the pickles, or a truncated or corrupt one
                pass
    return names


def resume_point(run: Run) -> tuple[Path, dict]:
    """The newest complete checkpoint of ``run`` to resume from and its state: the newest ``last-*.pt`` that loads, or
    ``best.pt`` when it is newer (a full disk can stop the run before the last checkpoint of an epoch whose best
    checkpoint was written); a TrainingError listing what was tried when none loads."""
    tried: list[str] = []
    chosen: tuple[Path, dict] | None = None
    for path in sorted(run.checkpoints.glob("last-*.pt"), key=checkpoint_step, reverse=True):
        try:
            chosen = (path, load(path))
            break
        except CheckpointError as exc:
            tried.append(exc.message)
    best = run.best_checkpoint()
    if best is not None and (chosen is None or best.stat().st_mtime_ns > chosen[0].stat().st_mtime_ns):
        try:
            state = load(best)
            if chosen is None or int(state.get("step", -1)) > int(chosen[1].get("step", -1)):
                chosen = (best, state)
        except CheckpointError as exc:
            tried.append(exc.message)
    if chosen is None:
        run.check_resumable()  # no checkpoint file at all: what to do instead
        raise TrainingError(f"{run.dir}: nothing to resume (no complete checkpoint in {run.checkpoints})",
                            tried or ["no last-*.pt or best.pt: start a new run"])
    return chosen


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
    ours = {key: tuple(shape) for key, shape in model_shapes().items()}
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



def load_official_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an official SSL-TIE checkpoint and return a state_dict for :class:`SSLTIEModel` (``load_state_dict``).

    Accepts the full pickle ``{'epoch', 'state_dict', ...}`` or a bare state_dict, with or without a ``module.``
    prefix; loads with ``weights_only=True``. Raises CheckpointError for a file that is not a checkpoint or whose
    keys or shapes differ from the official 257 (listing the first 10 of each kind and the count).
    """
    path = Path(path)
    return official_state(_state_dict_in(read_file(path), path, _OFFICIAL_FORMAT), path)


def official_state(state: Mapping[str, torch.Tensor], path: str | Path,
                   skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """An official SSL-TIE state_dict (prefixes removed) -> the state_dict of :class:`SSLTIEModel`; ``skip``: official
    key prefixes the file does not hold (LVS's AVENet has no ``vision_fc1``, ``conv3``, ``norm3``: the model keeps
    its own ``conv3`` / ``norm3``, which no forward reads). CheckpointError listing missing, unexpected and
    wrong-shape keys."""
    layout = [entry for entry in _official_layout() if not entry[0].startswith(skip)] if skip else _official_layout()
    problems = _key_problems({key: torch.Size(shape) for key, _, shape in layout}, state)
    if problems:
        expected = _OFFICIAL_FORMAT if not skip else "expected LVS's AVENet (keys imgnet.*, audnet.*)"
        raise CheckpointError(f"{path}: keys do not match the official {'SSL-TIE' if not skip else 'LVS'} "
                              f"checkpoint; {expected}", problems)
    return {ours: state[official] for official, ours, _ in layout if ours is not None}


def official_layout_keys(skip: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
    """The official SSL-TIE keys and shapes (without those starting with a ``skip`` prefix)."""
    return {key: shape for key, _, shape in _official_layout() if not key.startswith(skip)}


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


def init_from_torchvision(model: nn.Module, vision_init: str | Path = "scratch", audio_init: str | Path = "scratch") -> None:
    """Load torchvision resnet18 weights into the model's encoders (``model.vision_init`` / ``model.audio_init``).

    Each is ``"scratch"`` (nothing loaded) or the path of a local torchvision resnet18 ``state_dict`` file (nothing
    is downloaded; ``fc.*`` is ignored). For the audio encoder the RGB stem is summed over its 3 input channels to
    make the 1-channel stem. Raises CheckpointError for a missing or mismatching file.
    """
    for role, init, trunk in (("vision", vision_init, model.vision), ("audio", audio_init, model.audio)):
        if str(init) != "scratch":
            trunk.load_state_dict(_torchvision_trunk_state(Path(init), role, trunk))


# ------------------------------------------------------------------------------------------- training state

def rng_state() -> dict:
    """The torch, Python, numpy (and CUDA) RNG states, as tensors and numbers ``weights_only`` loading accepts."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    np_state = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached": float(np_state[4])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_weights(state: dict, path: Path) -> dict:
    """The model state_dict inside an sslt checkpoint (CheckpointError when it is not one)."""
    if state.get("format") != CHECKPOINT_FORMAT or "model" not in state:
        raise CheckpointError(f"{path}: not an sslt checkpoint (no format '{CHECKPOINT_FORMAT}' and 'model' entry); "
                              "official SSL-TIE weights cannot be resumed; evaluate them with `sslt eval CHECKPOINT` "
                              "(the format is recognised) or start a new run")
    return state["model"]


# ------------------------------------------------------------------------------------------ models from files

@dataclass
class LoadedModel:
    """A model ready for evaluation, with the recipe that describes its inputs and where it came from."""

    model: torch.nn.Module
    recipe: Any
    label: str
    source: Path
    step: int | None = None
    epoch: int | None = None
    family: str = "ssltie"
    front_end: str = "logmel"
    notes: tuple[str, ...] = ()


def resolve_checkpoints(target: str | Path, which: str = "both") -> tuple[Any, list[tuple[str, Path]], Path | None]:
    """(recipe or None, [(label, checkpoint path)], run folder or None) for a run folder or a checkpoint file.

    ``which``: ``best``, ``last`` or ``both`` (for run folders). A checkpoint file inside ``<run>/checkpoints/``
    belongs to that run.
    """
    target = Path(target)
    if target.is_dir():
        run = Run.open(target)
        recipe = run.recipe()
        found: list[tuple[str, Path]] = []
        last, best = run.latest_checkpoint(), run.best_checkpoint()
        if which in ("last", "both") and last is not None:
            found.append(("last", last))
        if which in ("best", "both") and best is not None:
            found.append(("best", best))
        if not found:
            raise DataError(f"{target}: no {'checkpoint' if which == 'both' else which + ' checkpoint'} in "
                            f"{target / 'checkpoints'}; train first, or pass --which last/best")
        return recipe, found, run.dir
    if not target.is_file():
        raise DataError(f"{target}: neither a run folder nor a checkpoint file")
    run_dir = target.parent.parent if target.parent.name == "checkpoints" and (target.parent.parent / "meta.json").is_file() else None
    return None, [(target.stem, target)], run_dir


def load_model(path: str | Path, recipe: Any = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Build the model and load weights from an sslt checkpoint or an official SSL-TIE checkpoint.

    The recipe (for image size and audio front end) comes from, in order: the argument, the sslt checkpoint, the
    schema's defaults (the paper's settings, which the official weights were trained with).
    """
    path = Path(path)
    return model_from_file(read_file(path), path, recipe, device)


def model_from_file(state: Any, path: Path, recipe: Any = None, device: str | torch.device = "cpu") -> LoadedModel:
    """:func:`load_model` of a file already read (:func:`read_file`): an sslt checkpoint, else official SSL-TIE."""
    step = epoch = None
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT and "model" in state:
        weights = state["model"]
        step, epoch = int(state.get("step", 0)), int(state.get("epoch", 0))
        if recipe is None and isinstance(state.get("recipe"), dict):
            recipe = load_saved_recipe(state["recipe"], f"{path} (saved recipe)")
        label = "sslt"
    else:
        weights = official_state(_state_dict_in(state, path, _OFFICIAL_FORMAT), path)
        label = "official SSL-TIE"
    recipe = recipe or Recipe()
    model = build_model()
    load_weights(model, weights, path)
    model.to(device).eval()
    return LoadedModel(model=model, recipe=recipe, label=label, source=path, step=step, epoch=epoch)


def export_official(target: str | Path, out: str | Path, which: str = "best") -> tuple[Path, Path]:
    """Write an sslt model in the official SSL-TIE checkpoint format, so the released code (and other tools that read
    it) can load it. ``target``: a run folder (its ``which`` checkpoint, ``best`` or ``last``) or a checkpoint file.
    Returns (the checkpoint read, the file written)."""
    if which not in ("best", "last"):
        raise DataError(f"--which must be best or last for an export, got {which!r}")
    _, checkpoints, _ = resolve_checkpoints(target, which)
    (_, source), = checkpoints
    loaded = load_model(source)
    written = save_official_checkpoint(loaded.model, out, epoch=loaded.epoch or 0, iteration=loaded.step or 0)
    return source, written
