"""Model families: the released models of the field (SSL-TIE, LVS, EZ-VSL, FNAC, SLAVC, SSLalignment) as entries of
one registry, :data:`FAMILIES`, and the one loader of a released file, :func:`load_released`.

A :class:`Family` is data: its network, how its checkpoint's keys look (the container key, the ``module.`` prefix,
the keys that identify it), its audio front end (:mod:`sslt_cli.frontends`), its test protocol presets
(:mod:`sslt_cli.protocols`; the first is its default, and its image front end is the preset's
``image_preprocessing``), and the value range of its raw maps (how to bring them to a common [0, 1] scale).
Evaluation, ``sslt localize`` and ``sslt retrieve`` take the :class:`~sslt_cli.checkpoint.LoadedModel` it returns:
the network answers ``embed_image`` / ``embed_audio`` / ``maps(v, a)``, and its recipe names its front end and
preset. Adding a family is one entry here (and its fidelity test), never a new path through the commands.

A file's family is recognised from its keys, never its name; ``family=`` overrides. Keys that match no family, or a
family with a missing, extra or wrong-shape key, are one CheckpointError naming the keys; nothing is loaded with
``strict=False``.
"""
from sslt_cli.families.loader import describe_format, export_as, export_released, load_released, recognise
from sslt_cli.families.registry import FAMILIES, FAMILY_NAMES, Family, get_family, to_common

__all__ = ["FAMILIES", "FAMILY_NAMES", "Family", "describe_format", "export_as", "export_released", "get_family",
           "load_released", "recognise", "to_common"]
