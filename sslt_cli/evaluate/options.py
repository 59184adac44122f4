"""Evaluation options: one typed, frozen object that every evaluation takes, and the protocol presets by name.

What a recipe's ``eval`` section says (protocol, deviations, object guidance) is the default; an :class:`EvalOptions`
field that is not None overrides it for this evaluation only. The recipe is never rewritten to carry an option.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from sslt_cli.data.negatives import NegativeSettings
from sslt_cli.errors import SsltError
from sslt_cli.protocols import PROTOCOLS, Protocol
from sslt_cli.ogl import DEFAULT_ALPHA

if TYPE_CHECKING:
    import numpy as np

    from sslt_cli.evaluate.sets import TestSet

PROTOCOL_OPTIONS = {"constant_maps": ("whole_frame", "official"), "empty_gt": ("exclude", "zero")}
DEFAULT_PROTOCOL = "ssltie"  # a model without a recipe (official weights) is scored as its paper scores it


def get_protocol(protocol: str | Protocol, *, constant_maps: str | None = None,
                 empty_gt: str | None = None) -> Protocol:
    """A protocol preset by name (``ssltie``, ``lvs``, ``ezvsl``, ``fnac``, ``sspl``, ``slavc``), or the one given,
    with the deviation options that are not None replaced (``constant_maps``: ``whole_frame`` | ``official``;
    ``empty_gt``: ``exclude`` | ``zero``; see :class:`protocols.Protocol`)."""
    if not isinstance(protocol, Protocol):
        if protocol not in PROTOCOLS:
            raise SsltError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        protocol = PROTOCOLS[protocol]
    changes = {key: value for key, value in (("constant_maps", constant_maps), ("empty_gt", empty_gt))
               if value is not None}
    for key, value in changes.items():
        if value not in PROTOCOL_OPTIONS[key]:
            raise SsltError(f"unknown {key} {value!r}; choose one of {', '.join(PROTOCOL_OPTIONS[key])}")
    return dataclasses.replace(protocol, **changes) if changes else protocol


@dataclass(frozen=True)
class ExtendedPairs:
    """SLAVC's extended evaluation: the non-sounding pairs (video id, audio id) of a ``*_plus_silent.csv``.

    ``media``: the set holding the pairs' frames and audio when a model is scored (None: the test set itself);
    ``maps``: the pairs' precomputed maps keyed ``<video>+<audio>`` when maps are scored, read from ``maps_source``.
    """

    pairs: tuple[tuple[str, str], ...]
    media: "TestSet | None" = None
    maps: "Mapping[str, np.ndarray] | None" = None
    maps_source: str = ""


@dataclass(frozen=True)
class NegativeOptions:
    """Negative-audio evaluation: each frame also with silence, noise or off-screen sound (``settings``).

    ``labels``: {clip id: class} from a ``--labels`` file (None: the set's manifest labels; offscreen needs one);
    ``threshold``: the universal threshold on the common map scale (vssl_eval's 0.5); ``validation``: the set the
    per-model threshold is chosen on (never the test set; None: not computed); ``maps``: precomputed negative maps
    keyed ``<clip id>@<kind>@<draw>`` read from ``maps_source`` (``--maps`` input); ``per_model``: the per-model
    threshold already chosen on ``validation`` for the model evaluated (the orchestrator chooses it once per model).
    """

    settings: NegativeSettings
    labels: "Mapping[str, str] | None" = None
    threshold: float = 0.5
    validation: "TestSet | None" = None
    maps: "Mapping[str, np.ndarray] | None" = None
    maps_source: str = ""
    per_model: "Mapping[str, Any] | None" = None  # the threshold chosen on ``validation`` for one model, once


@dataclass(frozen=True)
class ObjectGuidanceSetting:
    """EZ-VSL's object-guided localisation as one evaluation applies it: the weights file and alpha."""

    weights: str
    alpha: float


@dataclass(frozen=True)
class EvalOptions:
    """How to evaluate, beyond what the model's recipe says. None: the recipe's value (its ``eval`` section).

    ``protocol``: a preset name (default: the recipe's ``eval.protocol``, else ``ssltie``); ``constant_maps`` /
    ``empty_gt``: the protocol's deviation options; ``clip_boxes``: False for SSL-TIE's literal, unclipped VGG-SS
    boxes; ``ogl_weights`` / ``ogl_alpha``: EZ-VSL's object-guided localisation (``object_guidance=False`` turns it
    off whatever the recipe says: validation); ``extended``: SLAVC's extended evaluation; ``negatives``: the
    negative-audio evaluation (:class:`NegativeOptions`); ``baselines``: score the
    baselines beside the maps; ``save_maps``: keep ``maps.npz`` beside the outputs; ``batch_size`` /
    ``num_workers``: the loader (default: the recipe's ``eval.batch_size`` and ``data.num_workers``); ``device``:
    where the model and the metrics run (the caller picks it: ``distributed.pick_device``).
    """

    protocol: str | None = None
    constant_maps: str | None = None
    empty_gt: str | None = None
    clip_boxes: bool | None = None
    ogl_weights: str | None = None
    ogl_alpha: float | None = None
    object_guidance: bool = True
    extended: ExtendedPairs | None = None
    negatives: NegativeOptions | None = None
    baselines: bool = True
    save_maps: bool = True
    batch_size: int | None = None
    num_workers: int | None = None
    device: str = "cpu"

    def protocol_for(self, eval_config: Any = None) -> Protocol:
        """The protocol of an evaluation of a model whose recipe's ``eval`` section is ``eval_config`` (None: a
        model without a recipe): these options first, then the section, then the preset's own settings."""
        name = self.protocol or (eval_config.protocol if eval_config is not None else DEFAULT_PROTOCOL)
        proto = get_protocol(name, constant_maps=self.constant_maps or getattr(eval_config, "constant_maps", None),
                             empty_gt=self.empty_gt or getattr(eval_config, "empty_gt", None))
        return proto if self.clip_boxes is None else dataclasses.replace(proto, clip_boxes=self.clip_boxes)

    def guidance_for(self, eval_config: Any = None) -> ObjectGuidanceSetting | None:
        """The object guidance to apply (these options' weights and alpha, else the section's), or None (off)."""
        if not self.object_guidance:
            return None
        weights = self.ogl_weights or getattr(eval_config, "ogl_weights", None)
        if weights is None:
            if self.ogl_alpha is not None:
                raise SsltError("--ogl-alpha needs object-guided localisation switched on: add --ogl-weights PATH (a "
                                "local torchvision resnet18 state_dict) or set eval.ogl_weights in the recipe")
            return None
        alpha = self.ogl_alpha if self.ogl_alpha is not None else getattr(eval_config, "ogl_alpha", None)
        return ObjectGuidanceSetting(str(weights), float(alpha if alpha is not None else DEFAULT_ALPHA))
