"""Recipes: YAML validated into a typed, frozen schema, with dotted overrides.

Precedence: schema defaults < recipe file < command-line overrides (``optim.lr=3e-4``). Every problem in a recipe and
its overrides is collected and reported together as a :class:`RecipeError` naming the file, the dotted key, the bad
value and, for an unknown key, the closest valid key.

YAML 1.1 (PyYAML) reads ``2e-5`` as a string and ``off``/``no``/``yes`` as booleans; the loader here follows YAML 1.2
instead (only ``true``/``false`` are booleans, ``2e-5`` is a number), and the schema coerces values to each field's type.
"""
from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)

from sslt_cli import PROTOCOL_NAMES
from sslt_cli.catalog import RECIPES_DIR, builtin_recipes, resolve_data_file, resolve_recipe
from sslt_cli.errors import RecipeError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


class DataConfig(_Strict):
    """Where the prepared sets are (see ``data/manifest.py``) and how they are read."""

    root: str = "data/synthetic"
    train: str = "train"
    val: str | None = "val"
    test: dict[str, str] = Field(default_factory=lambda: {"vggss": "test_vggss", "flickr": "test_flickr"})
    labels: str | None = "vggsound.csv"
    image_size: int = Field(224, ge=32)
    num_workers: int = Field(2, ge=0)
    limit_train: int | None = Field(None, ge=1)
    limit_val: int | None = Field(None, ge=1)
    holdout_classes: list[str] = Field(default_factory=list)
    cache_spectrograms: bool = True

    def set_path(self, name: str) -> Path:
        """A set named in the recipe: absolute as written, else relative to ``root``."""
        path = Path(name).expanduser()
        return path if path.is_absolute() else Path(self.root).expanduser() / path

    def labels_file(self) -> Path | None:
        """``labels`` as a file: relative to ``root`` (as :meth:`set_path`), else a built-in label file (``vggss``,
        see :func:`catalog.resolve_data_file`); None when unset or neither exists."""
        if not self.labels:
            return None
        path = self.set_path(self.labels)
        path = path if path.is_file() else resolve_data_file(self.labels, "labels")
        return path if path.is_file() else None


class AudioConfig(_Strict):
    """Log-mel front end (REFERENCE.md section 4): the waveform is tiled to ``clip_seconds`` and cut."""

    sample_rate: int = Field(16000, ge=1000)
    clip_seconds: float = Field(10.0, gt=0)
    n_fft: int = Field(512, ge=16)
    hop_length: int = Field(239, ge=1)
    n_mels: int = Field(257, ge=1)
    normalized: bool = True
    # logmel: the fields above (SSL-TIE); the released front ends of other methods' models (sslt_cli/frontends.py:
    # lvs, ezvsl, align_lvs, align_ezvsl) read the file at its own rate and ignore the fields above
    front_end: Literal["logmel", "lvs", "ezvsl", "align_lvs", "align_ezvsl"] = "logmel"

    @model_validator(mode="after")
    def _fits(self) -> "AudioConfig":
        if self.n_mels > self.n_fft // 2 + 1:
            raise ValueError(f"n_mels={self.n_mels} exceeds the {self.n_fft // 2 + 1} frequency bins of n_fft={self.n_fft}")
        return self


class ModelConfig(_Strict):
    """``vision_init``: ``scratch`` (official code) or a local torchvision ResNet-18 state_dict file.

    ``audio_passes``: when both views share one spectrogram (``code`` views), run the audio network ``once`` a step,
    or once ``per_view`` as the released code does (the same embeddings and gradients, but the audio BatchNorm
    running statistics move twice a step: an effective momentum of 0.19 instead of 0.1)."""

    vision_init: str = "scratch"
    audio_init: str = "scratch"
    audio_passes: Literal["once", "per_view"] = "once"


class LossSection(_Strict):
    """What every objective's ``loss`` section holds: the weights of the total loss (REFERENCE.md section 3) and, with
    several processes, where the easy negatives come from (``global``: the whole global batch; ``local``: each
    process's own batch). An objective's section adds its own settings (:meth:`parameters`)."""

    objective: str
    cl_weight: float = Field(0.5, ge=0)
    geo_weight: float = Field(1.0, ge=0)
    negatives: Literal["global", "local"] = "global"

    def parameters(self) -> dict[str, Any]:
        """The objective's own settings, what its loss function takes: the section's fields beyond the shared ones."""
        return {name: getattr(self, name) for name in type(self).model_fields if name not in LossSection.model_fields}


class TieLoss(LossSection):
    """``tie``: L_cl, LVS's hard-way contrastive loss with SSL-TIE's tri-map (REFERENCE.md section 2)."""

    objective: Literal["tie"] = "tie"
    eps_pos: float = 0.65
    eps_neg: float = 0.40
    tau: float = Field(0.03, gt=0)
    temperature: float = Field(0.07, gt=0)


class EzvslLoss(LossSection):
    """``ezvsl``: EZ-VSL's multiple-instance contrastive loss (max over the map, InfoNCE both ways)."""

    objective: Literal["ezvsl"] = "ezvsl"
    temperature: float = Field(0.07, gt=0)


# The objectives' sections by name: the recipe schema's ``loss`` is one of them, chosen by ``loss.objective``
# (default ``tie``). ``losses.OBJECTIVES`` holds the same names with their loss functions (a test pins the two).
LOSS_SECTIONS: dict[str, type[LossSection]] = {"tie": TieLoss, "ezvsl": EzvslLoss}
DEFAULT_OBJECTIVE = "tie"


def _objective_of(value: Any) -> str:
    """The ``objective`` a ``loss`` section names (a mapping being validated, or a section), default ``tie``."""
    if isinstance(value, dict):
        return str(value.get("objective", DEFAULT_OBJECTIVE))
    return str(getattr(value, "objective", DEFAULT_OBJECTIVE))


LossConfig = Annotated[Union[tuple(Annotated[section, Tag(name)] for name, section in LOSS_SECTIONS.items())],
                       Discriminator(_objective_of)]


class AppearanceConfig(_Strict):
    """T_app: colour jitter, grayscale, Gaussian blur (invariance)."""

    enabled: bool = True
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = Field(0.8, ge=0, le=1)
    gray_p: float = Field(0.2, ge=0, le=1)
    blur_p: float = Field(0.5, ge=0, le=1)
    blur_sigma: tuple[float, float] = (0.1, 2.0)


class GeometricConfig(_Strict):
    """T_geo as invariance: random resized crop, rotation, horizontal flip."""

    enabled: bool = True
    crop: bool = True
    crop_scale: tuple[float, float] = (0.3, 1.0)
    rotation: float = Field(0.0, ge=0, le=180)
    flip: bool = True


class MaskConfig(_Strict):
    """T_mask: SpecAugment time then frequency masking on the mel power spectrogram."""

    enabled: bool = True
    p: float = Field(0.8, ge=0, le=1)
    time: int = Field(180, ge=0)
    freq: int = Field(35, ge=0)


class MixConfig(_Strict):
    """T_mix: mixing with a retrieved, semantically similar clip; neighbours refreshed after each epoch."""

    enabled: bool = True
    start_epoch: int = Field(1, ge=1)
    queue: int = Field(4000, ge=2)


class EquivarianceConfig(_Strict):
    """L_geo: equivariance of the localisation map under rotation, scale and flip."""

    enabled: bool = True
    max_rotation: int = Field(30, ge=0, le=180)
    scales: tuple[float, ...] = (1.0, 0.5)
    scale_p: float = Field(0.5, ge=0, le=1)
    flip_p: float = Field(0.5, ge=0, le=1)
    # rotate and scale about the true image centre ((W - 1) / 2, ``exact``) or, as the released code's kornia
    # warp_affine, about pixel (W / 2, H / 2), half a pixel off (``code``)
    centre: Literal["exact", "code"] = "exact"


class TransformsConfig(_Strict):
    """The four transformation groups and L_geo; ``views``: ``paper`` (two independent views) or ``code``."""

    views: Literal["paper", "code"] = "paper"
    app: AppearanceConfig = AppearanceConfig()
    geo: GeometricConfig = GeometricConfig()
    mask: MaskConfig = MaskConfig()
    mix: MixConfig = MixConfig()
    equivariance: EquivarianceConfig = EquivarianceConfig()


class OptimConfig(_Strict):
    """Adam with weight decay (REFERENCE.md section 4)."""

    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(32, ge=2)
    epochs: int = Field(100, ge=1)
    schedule: Literal["none", "cosine"] = "none"
    warmup_epochs: float = Field(0.0, ge=0)
    max_steps: int | None = Field(None, ge=1)
    grad_clip: float | None = Field(None, gt=0)


class TrainConfig(_Strict):
    """Device, precision, validation cadence and checkpointing."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    val_every: int = Field(1, ge=1)
    log_every: int = Field(10, ge=1)
    keep_last: int = Field(2, ge=1)
    deterministic: bool = True
    sync_bn: bool = False
    # the learning check (sslt_cli/learning_check.py): at step learning_check_steps (0: the end of the first epoch,
    # after its validation) a contrastive loss within learning_check_tolerance of chance, or validation at the
    # centre prior, prints one warning line and is recorded in meta.json and MLflow
    learning_check: bool = True
    learning_check_steps: int = Field(0, ge=0)
    learning_check_tolerance: float = Field(0.05, ge=0.0, lt=1.0)


class EvalConfig(_Strict):
    """Protocol for validation and the final test evaluation."""

    protocol: Literal[PROTOCOL_NAMES] = "ssltie"  # type: ignore[valid-type]
    # the protocol's two documented deviations from the official test loops (README, "Evaluation protocols"):
    # a map constant before upsampling predicts the whole frame (``official``: the preset's value-dependent result),
    # and a clip whose ground truth is empty after clipping is excluded (``zero``: scored 0 and counted in N)
    constant_maps: Literal["whole_frame", "official"] = "whole_frame"
    empty_gt: Literal["exclude", "zero"] = "exclude"
    batch_size: int = Field(32, ge=1)
    # maps for validation and test in fp32, as the published pipelines score them; bf16 is faster but rounds the
    # cosine map to 8 mantissa bits, which adds ties at the median and at the maximum
    precision: Literal["fp32", "bf16"] = "fp32"
    # EZ-VSL's object-guided localisation for the test evaluation (not validation): the path of a local torchvision
    # resnet18 state_dict (ImageNet weights); the scored map is normalize_img(ogl_alpha * AV + (1 - ogl_alpha) * object)
    # (EZ-VSL's rule), or SLAVC's fixed-range mix under the slavc presets; ogl_alpha unset: the preset's (0.4, SLAVC 0.9)
    ogl_weights: str | None = None
    ogl_alpha: float | None = Field(None, ge=0.0, le=1.0)
    # negative audio in the final test evaluation (`sslt eval --negatives`): each test frame also with silence, noise
    # or the sound of a class not on screen, scored beside cIoU (AP, max-F1, pIA, F; README "Negative audio"), the
    # per-model threshold chosen on data.val; [] = off
    negatives: tuple[Literal["silence", "noise", "offscreen"], ...] = ()


class TrackingConfig(_Strict):
    """MLflow; the store is ``MLFLOW_TRACKING_URI`` or the project's ``sqlite:///mlflow.db``."""

    enabled: bool = True
    experiment: str = "sslt"


class Recipe(_Strict):
    """A whole training recipe."""

    name: str = "run"
    seed: int = 4
    runs_dir: str = "runs"
    data: DataConfig = DataConfig()
    audio: AudioConfig = AudioConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = TieLoss()
    transforms: TransformsConfig = TransformsConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, value: str) -> str:
        if not re.fullmatch(r"[\w.\-]+", value):
            raise ValueError("use letters, digits, '_', '.' and '-' only (it names the run folder)")
        return value


# --- YAML 1.2-style loading -------------------------------------------------------------------------------------

class DuplicateKeyError(yaml.YAMLError):
    """A mapping repeats a key (PyYAML would keep the last value silently): the key and the 1-based lines of both."""

    def __init__(self, key: str, first: int, second: int):
        super().__init__(f"key {key!r} appears twice, on line {first} and line {second}")
        self.key, self.first, self.second = key, first, second


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars: booleans are only true/false, integers are decimal (or 0o/0x),
    floats include ``2e-5`` and ``1e4``, and there are no implicit timestamps, base-60 numbers or leading-zero octals.
    A key repeated in one mapping is an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                line = key_node.start_mark.line + 1
                if key_node.value in seen:
                    raise DuplicateKeyError(key_node.value, seen[key_node.value], line)
                seen[key_node.value] = line
        return super().construct_mapping(node, deep=deep)


_DROPPED = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:float", "tag:yaml.org,2002:int", "tag:yaml.org,2002:timestamp"}
_Yaml12Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in _DROPPED]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node)
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text)


_Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Yaml12Loader.add_constructor("tag:yaml.org,2002:float", yaml.SafeLoader.construct_yaml_float)


class _Yaml12Dumper(yaml.SafeDumper):
    """SafeDumper that quotes every string our loader would read back as something else (``'2e-5'``, ``'off'``)."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    plain_tag = _Yaml12Loader.resolve(_Yaml12Loader, yaml.ScalarNode, value, (True, False))
    style = "'" if plain_tag != "tag:yaml.org,2002:str" or value != value.strip() else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Yaml12Dumper.add_representer(str, _represent_str)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML with the 1.2-style rules above; a syntax error becomes a RecipeError naming ``source``."""
    try:
        return yaml.load(text, Loader=_Yaml12Loader)
    except DuplicateKeyError as exc:
        raise RecipeError(f"{source}: {exc}; keep one of them") from None
    except yaml.MarkedYAMLError as exc:
        def at(mark: Any, text: str | None) -> str:
            return f"line {mark.line + 1}, column {mark.column + 1}: {text}" if mark is not None else str(text)
        parts = []
        if exc.context:
            parts.append(at(exc.context_mark, exc.context))
        if exc.problem:
            parts.append(at(exc.problem_mark, exc.problem))
        raise RecipeError(f"{source}: not valid YAML", ["; ".join(parts)]) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: not valid YAML", [" ".join(str(exc).split())]) from None


def dump_yaml(data: Any) -> str:
    """YAML text for a plain structure (tuples as lists), keys in schema order."""
    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x
    return yaml.dump(plain(data), Dumper=_Yaml12Dumper, sort_keys=False, default_flow_style=None, width=120)


# --- keys, suggestions, overrides ------------------------------------------------------------------------------

def _field_models(annotation: Any) -> list[type[BaseModel]]:
    """The sections a field holds: its model, or each member of a tagged union (``loss``: one per objective)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) is Union:
        members = [typing.get_args(arg)[0] if typing.get_origin(arg) is Annotated else arg
                   for arg in typing.get_args(annotation)]
        return [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
    return []


def _section_fields(model: type[BaseModel], path: tuple[str, ...]) -> list[str] | None:
    """The field names of the section at ``path`` (of every objective's section for ``loss``), None where the path
    leaves the schema or reaches a leaf."""
    current = [model]
    for part in path:
        fields = [m.model_fields[part] for m in current if part in m.model_fields]
        current = [sub for field in fields for sub in _field_models(field.annotation)]
        if not current:
            return None
    return list(dict.fromkeys(name for m in current for name in m.model_fields))


def valid_keys(model: type[BaseModel] = Recipe, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, leaves and sections (``loss``: the keys of every objective)."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        for section in _field_models(field.annotation):
            keys += [key for key in valid_keys(section, dotted + ".") if key not in keys]
    return keys


def closest_key(bad: str, model: type[BaseModel] = Recipe) -> str | None:
    """The valid dotted key closest to ``bad``: same section first, then anywhere."""
    parts = bad.split(".")
    siblings = _section_fields(model, tuple(parts[:-1]))
    if siblings is not None:
        prefix = ".".join(parts[:-1])
        match = difflib.get_close_matches(parts[-1], siblings, n=1, cutoff=0.5)
        if match:
            return f"{prefix}.{match[0]}" if prefix else match[0]
    keys = valid_keys(model)
    match = difflib.get_close_matches(bad, keys, n=1, cutoff=0.6)
    if match:
        return match[0]
    leaf = [k for k in keys if k.split(".")[-1] == parts[-1]]
    return leaf[0] if leaf else None


def _objective_problem(error: dict, loc: list[str]) -> str | None:
    """What is wrong with a ``loss`` section, said in the recipe's words: an unknown objective, or a key of another
    objective than the section's (``loc``: the error's path with the objective's tag still in it)."""
    if error["type"] == "union_tag_invalid" and loc == ["loss"]:
        return (f"key 'loss.objective': expected one of {', '.join(map(repr, LOSS_SECTIONS))}, got "
                f"{error['ctx']['tag']!r}")
    if error["type"] != "extra_forbidden" or len(loc) != 3 or loc[0] != "loss" or loc[1] not in LOSS_SECTIONS:
        return None
    key, objective = loc[2], loc[1]
    owners = [name for name, section in LOSS_SECTIONS.items() if key in section.model_fields]
    if not owners:
        return None
    return (f"key 'loss.{key}': {key} belongs to objective {' / '.join(map(repr, owners))}, and this loss section's "
            f"objective is {objective!r} (remove the key, or set loss.objective={owners[0]})")


def _describe_type(error: dict) -> str:
    kind = error.get("type", "")
    return {
        "float_parsing": "a number", "float_type": "a number", "int_parsing": "an integer",
        "int_type": "an integer", "int_from_float": "an integer", "bool_parsing": "true or false",
        "bool_type": "true or false", "string_type": "a string", "literal_error": "one of the allowed values",
        "dict_type": "a mapping", "list_type": "a list", "tuple_type": "a list",
    }.get(kind, "")


def _format_errors(exc: ValidationError, source: str, model: type[BaseModel],
                   overrides: dict[str, str] | None = None) -> list[str]:
    problems = []
    overrides = overrides or {}
    for error in exc.errors():
        loc = [str(p) for p in error["loc"]]
        objective_problem = _objective_problem(error, loc) if model is Recipe else None
        if model is Recipe and loc[:1] == ["loss"] and loc[1:2] and loc[1] in LOSS_SECTIONS:
            loc = [loc[0], *loc[2:]]  # the objective's tag is not a key of the recipe
        dotted = ".".join(loc)
        origin = next((f" (from override {text!r})" for key, text in overrides.items()
                       if dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + ".")), "")
        if objective_problem is not None:
            problems.append(f"{source}: {objective_problem}{origin}")
            continue
        if error["type"] == "extra_forbidden":
            hint = closest_key(dotted, model)
            suffix = f" (did you mean '{hint}'?)" if hint else ""
            problems.append(f"{source}: unknown key '{dotted}'{suffix}{origin}")
            continue
        value = error.get("input")
        expected = _describe_type(error)
        msg = error["msg"]
        if error["type"] == "literal_error":
            detail = msg.replace("Input should be ", "expected ")
        elif expected:
            detail = f"expected {expected}"
        else:
            detail = msg[0].lower() + msg[1:] if msg else "invalid"
            detail = detail.removeprefix("value error, ")
        where = f"key '{dotted}'" if dotted else "recipe"
        problems.append(f"{source}: {where}: {detail}, got {value!r}{origin}")
    return problems


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``'optim.lr=3e-4'`` -> ``('optim.lr', 0.0003)``; the value is read as YAML 1.2 (lists, numbers, null)."""
    if "=" not in text:
        raise RecipeError(f"override {text!r} is not of the form key=value",
                          ["write overrides as dotted.key=value, e.g. optim.lr=3e-4 data.root=/data/vggsound"])
    key, raw = text.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise RecipeError(f"override {text!r}: {key!r} is not a dotted key such as optim.lr")
    value = parse_yaml(raw, f"override {text!r}") if raw.strip() else ""
    return key, value


def validate_tree(tree: dict, source: str, model: type[BaseModel] = Recipe,
                  overrides: list[str] | None = None) -> BaseModel:
    """Validate a plain tree into ``model`` or raise RecipeError listing every problem.

    ``overrides`` (the ``key=value`` texts applied to ``tree``) let a problem say it came from the command line.
    """
    by_key = {t.split("=", 1)[0].strip(): t for t in overrides or [] if "=" in t}
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        problems = _format_errors(exc, source, model, by_key)
        raise RecipeError(f"{source}: {len(problems)} problem(s) in the recipe", problems) from None


# The flat ``loss`` section of the recipes sslt saved before each objective had a section of its own (up to commit
# fe7094d): it held every objective's keys, these at their defaults when the recipe left them alone.
FLAT_LOSS_DEFAULTS = {"eps_pos": 0.65, "eps_neg": 0.40, "tau": 0.03, "temperature": 0.07}


def _migrate_ogl_alpha(tree: dict) -> dict:
    """Recipes saved before the released-model families (no ``audio.front_end``) hold ``eval.ogl_alpha: 0.4``, the
    default then: it is today's unset alpha (the preset's) under every preset whose alpha is 0.4, so it reads as
    unset there (an ablation or ``--resume`` then finds the run's recipe equal to today's)."""
    from sslt_cli.protocols import PROTOCOLS

    audio, evaluation = tree.get("audio"), tree.get("eval")
    if not isinstance(evaluation, dict) or evaluation.get("ogl_alpha") != 0.4 or \
            (isinstance(audio, dict) and "front_end" in audio):
        return tree
    preset = PROTOCOLS.get(str(evaluation.get("protocol") or "ssltie"))
    if preset is None or preset.ogl_alpha != 0.4:
        return tree
    return {**tree, "eval": {**evaluation, "ogl_alpha": None}}


def migrate_saved_recipe(tree: dict, source: str) -> dict:
    """A saved recipe (a run's ``config.yaml``, the recipe inside a checkpoint) as today's schema reads it.

    Recipes saved with the flat ``loss`` section carry keys of other objectives than their own (an ``ezvsl`` run has
    ``eps_pos``, ``eps_neg``, ``tau``): those holding the old defaults are dropped (they never had an effect); another
    value is refused with what to do, since the recipe would say something the run did not do. An old default
    ``eval.ogl_alpha`` reads as unset (:func:`_migrate_ogl_alpha`)."""
    tree = _migrate_ogl_alpha(tree)
    loss = tree.get("loss")
    section = LOSS_SECTIONS.get(str(loss.get("objective", DEFAULT_OBJECTIVE))) if isinstance(loss, dict) else None
    if section is None:
        return tree  # nothing saved in the old form (an unknown objective is validation's to report)
    objective = section.model_fields["objective"].default
    foreign = [key for key in loss if key not in section.model_fields
               and any(key in other.model_fields for other in LOSS_SECTIONS.values())]
    changed = [key for key in foreign if key not in FLAT_LOSS_DEFAULTS or loss[key] != FLAT_LOSS_DEFAULTS[key]]
    if changed:
        raise RecipeError(
            f"{source}: the saved recipe's loss section sets {', '.join(f'{k}={loss[k]!r}' for k in changed)}, "
            f"which belong(s) to another objective than its own ({objective!r}): the sslt that saved it ignored them",
            [f"remove loss.{key} from {source} (the run was trained without it) to evaluate, resume or report it"
             for key in changed])
    return {**tree, "loss": {key: value for key, value in loss.items() if key not in foreign}}


def load_saved_recipe(tree: dict, source: str) -> "Recipe":
    """A recipe saved by sslt (any version): :func:`migrate_saved_recipe`, then validated."""
    return validate_tree(migrate_saved_recipe(tree, source), source)  # type: ignore[return-value]


_SHIPPED_EXAMPLE = {"recipe": "recipes/quickstart.yaml", "ablation": "recipes/ablations/paper_transformations.yaml"}


def load_tree(path: str | Path, kind: str = "recipe") -> dict:
    """The raw mapping of a YAML file of ``kind`` (``recipe``, ``ablation``), not validated."""
    path = Path(path)
    article = "an" if kind[:1] in "aeiou" else "a"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        folder = RECIPES_DIR if kind == "recipe" else RECIPES_DIR / "ablations"
        raise RecipeError(f"{path}: {kind} file not found",
                          [f"give a path, or the name of one shipped with sslt: {', '.join(builtin_recipes(folder))}"]
                          ) from None
    except IsADirectoryError:
        raise RecipeError(f"{path}: is a folder, expected {article} {kind} .yaml file") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise RecipeError(f"{path}: not UTF-8 text: byte 0x{data[exc.start]:02x} at byte offset {exc.start} (line "
                          f"{line}) cannot be decoded", [f"save the {kind} as UTF-8"]) from None
    tree = parse_yaml(text, str(path))
    if tree is None or tree == {}:
        what = "only blank lines or comments" if tree is None else "an empty mapping, {}"
        raise RecipeError(f"{path}: the {kind} is empty ({what}); nothing to run",
                          [f"write the settings that differ from the defaults, starting from a shipped {kind} "
                           f"(e.g. {_SHIPPED_EXAMPLE.get(kind, 'recipes/quickstart.yaml')})"])
    if not isinstance(tree, dict):
        raise RecipeError(f"{path}: {article} {kind} must be a mapping of keys, got {type(tree).__name__}")
    return tree


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """A deep copy of ``tree`` with the dotted overrides applied in order."""
    import copy

    out = copy.deepcopy(tree)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(out, key, value)
    return out


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe (a file, or the name of a shipped one: :func:`catalog.resolve_recipe`);
    raises RecipeError with every problem found."""
    path = resolve_recipe(path)
    tree = load_tree(path)
    overrides = list(overrides or [])
    problems: list[str] = []
    usable = []
    for text in overrides:
        try:
            parse_override(text)
            usable.append(text)
        except RecipeError as exc:
            problems.append(exc.message if not exc.problems else f"{exc.message}: {exc.problems[0]}")
    tree = apply_overrides(tree, usable)
    source = str(path)
    try:
        recipe = validate_tree(tree, source, overrides=overrides)
    except RecipeError as exc:
        problems += exc.problems
        recipe = None
    if problems:
        raise RecipeError(f"{source}: {len(problems)} problem(s) in the recipe", problems)
    assert recipe is not None
    return recipe  # type: ignore[return-value]


def recipe_dict(recipe: BaseModel) -> dict:
    """The resolved recipe as a plain, YAML-ready mapping (tuples as lists)."""
    return yaml.safe_load(dump_yaml(recipe.model_dump(mode="python")))


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{'optim': {'lr': 1e-4}}`` -> ``{'optim.lr': 1e-4}`` (lists and dicts of strings kept as their text)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            out.update(flatten(value, dotted + "."))
        elif isinstance(value, dict) and any(isinstance(v, dict) for v in value.values()):
            out.update(flatten(value, dotted + "."))
        elif isinstance(value, dict):
            if value:
                out.update(flatten(value, dotted + "."))
            else:
                out[dotted] = "{}"
        else:
            out[dotted] = value
    return out
