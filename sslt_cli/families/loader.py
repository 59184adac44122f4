"""Loading a released file of any family (:func:`load_released`) and writing a model in a family's released format
(:func:`export_released`)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping

import torch

from sslt_cli.checkpoint import (CHECKPOINT_FORMAT, LoadedModel, _listing, _strip_wrapper_prefixes, model_from_file,
                                 read_file)
from sslt_cli.data.manifest import atomic_write_bytes
from sslt_cli.errors import CheckpointError
from sslt_cli.families.registry import FAMILIES, Family, get_family

_CONTAINERS = ("model", "model_state_dict", "state_dict")


def _weights_in(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """(state_dict with wrapper prefixes removed, whether its keys carried ``module.``) of a released file: the
    state_dict under 'model', 'model_state_dict' or 'state_dict', or the file itself."""
    if isinstance(obj, Mapping):
        for key in _CONTAINERS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not (isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        found = (f"a dict with keys {_listing(sorted(map(str, obj)))}" if isinstance(obj, Mapping) and obj
                 else f"a {type(obj).__name__}" if not isinstance(obj, Mapping) else "an empty dict")
        raise CheckpointError(f"{path}: no state_dict found (under {', '.join(map(repr, _CONTAINERS))} or the file "
                              f"itself; found {found})", [family.expects() for family in FAMILIES.values()])
    prefixed = all(str(key).startswith("module.") for key in obj)
    return _strip_wrapper_prefixes(dict(obj)), prefixed


def recognise(state: Mapping[str, torch.Tensor], prefixed: bool) -> tuple[Family, str]:
    """The family whose keys a state_dict (prefixes removed) has, and a note saying how it was told: the family
    with the most identifying keys present; families with the same keys are told apart by the ``module.`` prefix,
    then by the registry's order (EZ-VSL before FNAC: the same network). CheckpointError listing what each family
    expects when none matches."""
    candidates = [f for f in FAMILIES.values() if all(key in state for key in f.signature)]
    if not candidates:
        keys = sorted(state)
        raise CheckpointError(f"the keys match no model family (found {len(keys)} keys: {_listing(keys)})",
                              [f"{family.expects()}" for family in FAMILIES.values()])
    most = max(len(f.signature) for f in candidates)
    best = [f for f in candidates if len(f.signature) == most]
    fitting = [f for f in best if f.prefixed in (None, prefixed)] or best
    chosen = fitting[0]
    note = f"recognised as {chosen.title} from its keys"
    same = [f.name for f in fitting[1:]]
    if same:
        note += f" ({', '.join(same)} has the same keys: pass --family to use its front end and presets)"
    return chosen, note


def load_released(path: str | Path, family: str | None = None, *, recipe: Any = None, branch: str | None = None,
                  device: str | torch.device = "cpu", front_end: str | None = None) -> LoadedModel:
    """Any model file -> a :class:`~sslt_cli.checkpoint.LoadedModel`: an sslt checkpoint (SSL-TIE's network and the
    recipe it carries, or ``recipe``; an official SSL-TIE file takes ``recipe`` too), or a released checkpoint of a family in :data:`FAMILIES`, recognised from its
    keys (``family`` overrides), ``module.`` stripped, loaded key by key (a missing, extra or wrong-shape key is a
    CheckpointError naming it). ``branch``: SLAVC's ``online`` (default) or ``momentum`` branch; ``front_end``: one
    of the family's ``other_front_ends`` instead of its own (SSLalignment's windows). The result's
    ``family``, ``front_end`` and ``notes`` say what was used; its recipe carries the family's front end and preset.
    """
    path = Path(path)
    obj = read_file(path)
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        if family not in (None, "ssltie"):
            raise CheckpointError(f"{path}: an sslt checkpoint holds SSL-TIE's network, not {family!r}; "
                                  f"write it in another family's format with `sslt export --family`")
        _check_branch(get_family("ssltie"), branch)
        _check_front_end(get_family("ssltie"), front_end)
        return _with_notes(model_from_file(obj, path, recipe, device), get_family("ssltie"), "an sslt checkpoint")
    state, prefixed = _weights_in(obj, path)
    if family is None:
        chosen, note = recognise(state, prefixed)
    else:
        chosen, note = get_family(family), f"{get_family(family).title} (--family {family})"
    _check_branch(chosen, branch)
    _check_front_end(chosen, front_end)
    network = chosen.network(branch or chosen.branches[0])
    network.load_state_dict(chosen.to_network(state, network, path, chosen.title))
    network.to(device).eval()
    label = "official SSL-TIE" if chosen.name == "ssltie" else chosen.title  # sslt's own checkpoints are "sslt"
    # an official SSL-TIE file carries no recipe: the caller's (image size, log-mel settings) describes its inputs
    own_recipe = recipe if recipe is not None and chosen.name == "ssltie" else chosen.recipe(front_end)
    loaded = LoadedModel(model=network, recipe=own_recipe, label=label, source=path,
                         family=chosen.name, front_end=chosen.front_end)
    return _with_notes(loaded, chosen, note, branch or (chosen.branches[0] if len(chosen.branches) > 1 else None))


def _check_branch(family: Family, branch: str | None) -> None:
    if branch is not None and branch not in family.branches:
        raise CheckpointError(f"--branch {branch}: {family.title} has {'branches ' + ', '.join(family.branches) if len(family.branches) > 1 else 'one branch'}"
                              f"{'' if len(family.branches) > 1 else ' (--branch is for SLAVC: online or momentum)'}")


def _check_front_end(family: Family, front_end: str | None) -> None:
    allowed = (family.front_end, *family.other_front_ends)
    if front_end is not None and front_end not in allowed:
        raise CheckpointError(f"--front-end {front_end}: {family.title} is fed by {' or '.join(allowed)}")


def _with_notes(loaded: LoadedModel, family: Family, how: str, branch: str | None = None) -> LoadedModel:
    from sslt_cli.frontends import FRONT_ENDS

    front = FRONT_ENDS[loaded.recipe.audio.front_end].describe if loaded.recipe.audio.front_end in FRONT_ENDS else \
        (f"log-mel ({loaded.recipe.audio.n_mels} mels, {loaded.recipe.audio.clip_seconds:g} s at "
         f"{loaded.recipe.audio.sample_rate} Hz)")
    notes = [f"family {family.name}: {how}" + (f", {branch} branch" if branch else ""), f"audio front end: {front}",
             f"protocol preset: {loaded.recipe.eval.protocol}"]
    loaded.family, loaded.front_end, loaded.notes = family.name, loaded.recipe.audio.front_end, tuple(notes)
    if branch:
        loaded.label = f"{loaded.label}, {branch} branch"
    return loaded


def export_released(loaded: LoadedModel, family: str, out: str | Path) -> Path:
    """Write ``loaded``'s network in ``family``'s released format (its container key, its ``module.`` prefix, its
    other entries) atomically. The network must be the family's kind (SSL-TIE, LVS and SSL-Align share one; EZ-VSL
    and FNAC share one; SLAVC has its own)."""
    target = get_family(family)
    source = get_family(loaded.family)
    if source.network_kind != target.network_kind:
        kinds = sorted(f.name for f in FAMILIES.values() if f.network_kind == source.network_kind)
        raise CheckpointError(f"the {source.title} network cannot be written as {target.title}: the networks differ; "
                              f"it can be written as {', '.join(kinds)}")
    weights = {f"{target.export_prefix}{key}": value for key, value in target.released(loaded.model).items()}
    payload = {target.container: weights, **target.extras}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    out = Path(out)
    atomic_write_bytes(out, buffer.getvalue())
    return out


def export_as(target: str | Path, family: str, out: str | Path, which: str = "best") -> tuple[Path, Path]:
    """``sslt export --family``: the model of a run folder (its ``which`` checkpoint) or of any model file, written in
    ``family``'s released format. Returns (the file read, the file written)."""
    from sslt_cli.checkpoint import resolve_checkpoints
    from sslt_cli.errors import DataError

    if which not in ("best", "last"):
        raise DataError(f"--which must be best or last for an export, got {which!r}")
    _, checkpoints, _ = resolve_checkpoints(target, which)
    (_, source), = checkpoints
    return source, export_released(load_released(source), family, out)


def describe_format(family: str) -> str:
    """A family's released format in words (what ``sslt export`` prints)."""
    target = get_family(family)
    extras = ", ".join(repr(k) for k in target.extras)
    prefix = f"keys prefixed {target.export_prefix!r}" if target.export_prefix else "keys without a prefix"
    return f"{target.title} ({{'{target.container}': state_dict, {extras}}}; {prefix}; as {target.released_files})"
