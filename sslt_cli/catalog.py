"""What ships inside sslt: the public benchmark metadata (``sslt_cli/resources/``) and the recipes, by short name.

Wherever sslt takes the path of a test list, the VGG-SS box file, a label file, SLAVC's non-sounding pairs or a
recipe, it also takes a built-in short name (``--list ssltie-vggss-4911``, ``--vggss-json vggss``,
``sslt train quickstart``). The rule, in :func:`resolve_data_file` and :func:`resolve_recipe` (the only two
resolvers): a value naming a file that exists is that file, whatever it is called, so a user's own file always wins;
otherwise a built-in name of the right kind is the packaged file; anything else stays the path it is, and its
reader's "not found" error lists the built-in names (:func:`names_hint`).

The packaged files, their sources, commits and licences: ``sslt_cli/resources/NOTICE`` and ``sslt data list``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

PACKAGE_DIR = Path(__file__).resolve().parent
RESOURCES_DIR = PACKAGE_DIR / "resources"
# a real folder in the wheel; in a source checkout a link to the repository's recipes/ folder
RECIPES_DIR = PACKAGE_DIR / "recipes"

Kind = Literal["list", "boxes", "labels", "pairs"]
KIND_WORDS = {"list": "test list", "boxes": "VGG-SS box file", "labels": "label file", "pairs": "non-sounding pairs"}

LVS = "LVS @ 8fe8cbb"
EZVSL = "EZ-VSL @ 95ff5bf"
SLAVC = "SLAVC @ 05b429c"
SSLTIE = "SSL-TIE @ c49e6a9"
# the repositories: LVS hche11/Localizing-Visual-Sounds-the-Hard-Way, EZ-VSL stoneMo/EZ-VSL, SLAVC stoneMo/SLAVC,
# SSL-TIE jinxiang-liu/SSL-TIE (full commits in resources/NOTICE)


@dataclass(frozen=True)
class Builtin:
    """One packaged file: its short name, file name in ``resources/``, the kinds of path it stands for, what it is,
    where it comes from and its licence."""

    name: str
    file: str
    kinds: tuple[str, ...]
    what: str
    source: str
    licence: str

    @property
    def path(self) -> Path:
        return RESOURCES_DIR / self.file


BUILTINS: tuple[Builtin, ...] = (
    Builtin("vggss", "vggss.json", ("boxes", "labels"), "VGG-SS boxes and class names (the public vggss.json)",
            f"{LVS}, metadata/vggss.json", "Apache-2.0"),
    Builtin("vggss-5158", "vggss_test_5158.csv", ("list",), "VGG-SS test list (LVS, EZ-VSL, SLAVC, FNAC)",
            f"{LVS}, metadata/vggss_test.csv", "Apache-2.0"),
    Builtin("ssltie-vggss-4911", "ssltie_test_vggss_4911.txt", ("list",), "SSL-TIE's VGG-SS test subset",
            f"{SSLTIE}, metadata/test_vggss_4911.txt", "MIT"),
    Builtin("vggss-val-247", "vggss_val_247.txt", ("list",),
            "validation: the 5158 list less SSL-TIE's 4911 (never the 4911 test clips)",
            "sslt (derived from vggss-5158 and ssltie-vggss-4911)", "MIT"),
    Builtin("ssltie-openset-heard-2425", "ssltie_openset_test_110_heard_2425.txt", ("list",),
            "SSL-TIE open set: test clips of the 110 heard classes", f"{SSLTIE}, metadata/openset/", "MIT"),
    Builtin("ssltie-openset-unheard-2463", "ssltie_openset_test_110_unheard_2463.txt", ("list",),
            "SSL-TIE open set: test clips of the 110 unheard classes", f"{SSLTIE}, metadata/openset/", "MIT"),
    Builtin("ezvsl-vggss-heard-2564", "vggss_heard_test.csv", ("list",),
            "EZ-VSL open set: test clips of the 110 heard classes", f"{EZVSL}, metadata/vggss_heard_test.csv",
            "Apache-2.0"),
    Builtin("ezvsl-vggss-unheard-2575", "vggss_unheard_test.csv", ("list",),
            "EZ-VSL open set: test clips of the 110 unheard classes", f"{EZVSL}, metadata/vggss_unheard_test.csv",
            "Apache-2.0"),
    Builtin("flickr-249", "flickr_test_249.csv", ("list",), "Flickr-SoundNet test list (LVS, EZ-VSL, SSL-TIE, FNAC)",
            f"{LVS}, metadata/flickr_test.csv", "Apache-2.0"),
    Builtin("slavc-flickr-250", "flickr_test_250_slavc.csv", ("list",), "SLAVC's Flickr-SoundNet test list",
            f"{SLAVC}, metadata/flickr_test.csv", "Apache-2.0"),
    Builtin("ssltie-flickr-5k", "ssltie_test_flickr_5k.txt", ("list",), "the 5k annotated Flickr-SoundNet pairs",
            f"{SSLTIE}, metadata/test_flickr_5k.txt", "MIT"),
    Builtin("slavc-vggss-plus-silent", "vggss_test_plus_silent.csv", ("pairs",),
            "Extended VGG-SS: SLAVC's non-sounding pairs (--extended)", f"{SLAVC}, metadata/vggss_test_plus_silent.csv",
            "Apache-2.0"),
    Builtin("slavc-flickr-plus-silent", "flickr_test_plus_silent.csv", ("pairs",),
            "Extended Flickr: SLAVC's non-sounding pairs (--extended)", f"{SLAVC}, metadata/flickr_test_plus_silent.csv",
            "Apache-2.0"),
)
BY_NAME = {entry.name: entry for entry in BUILTINS}


def builtin_names(kind: str) -> list[str]:
    """The short names that stand for a path of ``kind`` (``list``, ``boxes``, ``labels``, ``pairs``)."""
    return [entry.name for entry in BUILTINS if kind in entry.kinds]


def resolve_data_file(value: str | Path, kind: str) -> Path:
    """The file ``value`` means where a path of ``kind`` is expected: an existing path as it is, else the packaged
    file of a built-in name of that kind, else ``value`` as a path (its reader reports it missing)."""
    path = Path(value).expanduser()
    if path.exists():
        return path
    entry = BY_NAME.get(str(value))
    if entry is not None and kind in entry.kinds:
        return entry.path
    return path


def names_hint(kind: str) -> str:
    """One line for a "not found" error: the built-in names a path of ``kind`` could have been."""
    return f"or a built-in {KIND_WORDS[kind]}: {', '.join(builtin_names(kind))} (sslt data list)"


def builtin_recipes(folder: Path = RECIPES_DIR) -> list[str]:
    """The names of the recipes (or, with ``RECIPES_DIR / 'ablations'``, the ablation files) shipped with sslt."""
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def resolve_recipe(value: str | Path, kind: Literal["recipe", "ablation"] = "recipe") -> Path:
    """The file ``value`` means as a recipe (or ablation file): an existing path as it is, else a bare name with or
    without ``.yaml`` (``quickstart``, ``paper_transformations``) among those shipped, else ``value`` unchanged."""
    path = Path(value).expanduser()
    if path.exists() or len(path.parts) != 1:
        return path
    folder = RECIPES_DIR if kind == "recipe" else RECIPES_DIR / "ablations"
    shipped = folder / (path.name if path.suffix in (".yaml", ".yml") else path.name + ".yaml")
    return shipped if shipped.is_file() else path
