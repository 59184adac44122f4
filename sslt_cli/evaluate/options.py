"""Evaluation options: the protocol presets by name with their documented deviations."""
from __future__ import annotations

import dataclasses
from typing import Any

from sslt_cli import metrics
from sslt_cli.errors import SsltError
from sslt_cli.metrics import Protocol


PROTOCOL_OPTIONS = {"constant_maps": ("whole_frame", "official"), "empty_gt": ("exclude", "zero")}


def get_protocol(protocol: str | Protocol, *, constant_maps: str | None = None,
                 empty_gt: str | None = None) -> Protocol:
    """A protocol preset by name (``ssltie``, ``lvs``, ``ezvsl``, ``fnac``, ``sspl``, ``slavc``), or the one given,
    with the deviation options that are not None replaced (``constant_maps``: ``whole_frame`` | ``official``;
    ``empty_gt``: ``exclude`` | ``zero``; see :class:`metrics.Protocol`)."""
    if not isinstance(protocol, Protocol):
        if protocol not in metrics.PROTOCOLS:
            raise SsltError(f"unknown protocol {protocol!r}; choose one of {', '.join(metrics.PROTOCOLS)}")
        protocol = metrics.PROTOCOLS[protocol]
    changes = {key: value for key, value in (("constant_maps", constant_maps), ("empty_gt", empty_gt))
               if value is not None}
    for key, value in changes.items():
        if value not in PROTOCOL_OPTIONS[key]:
            raise SsltError(f"unknown {key} {value!r}; choose one of {', '.join(PROTOCOL_OPTIONS[key])}")
    return dataclasses.replace(protocol, **changes) if changes else protocol


def recipe_protocol(eval_config: Any, protocol: str | None = None) -> Protocol:
    """The protocol of a recipe's ``eval`` section (``eval.protocol`` unless ``protocol`` names another preset), with
    the section's ``constant_maps`` and ``empty_gt``."""
    return get_protocol(protocol or eval_config.protocol, constant_maps=eval_config.constant_maps,
                        empty_gt=eval_config.empty_gt)
