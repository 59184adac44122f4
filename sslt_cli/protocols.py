"""The published evaluation protocols as data: one :class:`Protocol` preset per paper's test code (REFERENCE.md
section 5), by name in :data:`PROTOCOLS`. No torch: the recipe schema, ``sslt eval --protocol`` and ``sslt --help``
read the names (:data:`PROTOCOL_NAMES`) without importing the metrics. :mod:`sslt_cli.metrics` implements what each
field means (upsampling, normalisation, threshold rule); adding a protocol is one entry here (and its tests).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

EVAL_SIZE = 224

UpsampleMode = Literal["opencv_linear", "bilinear_align_corners", "bicubic_align_corners", "bicubic"]
Normalisation = Literal["minmax", "negated_minmax", "range_minmax", "minmax_ptp", "fixed_range"]
ThresholdRule = Literal["above_median", "at_least_median", "at_least_half", "strictly_above_median"]
ConstantMaps = Literal["whole_frame", "official"]
EmptyGroundTruth = Literal["exclude", "zero"]
ImagePreprocessing = Literal["resize_centercrop", "resize_square", "tensor_resize_square"]
ObjectGuidanceRule = Literal["ezvsl", "slavc"]
SLAVC_RANGE = (-1.0 / 0.03, 1.0 / 0.03)  # SLAVC's fixed score range for its own maps, (cos1 + cos2) / 2 / tau


@dataclass(frozen=True)
class Protocol:
    """One published evaluation protocol (REFERENCE.md section 5).

    ``map_size``: side of the maps the protocol was made for (used for the random baseline);
    ``upsample``: how a map reaches ``size`` x ``size`` (``opencv_linear``: ``cv2.resize`` INTER_LINEAR; ``bicubic``:
    ``F.interpolate(bicubic, align_corners=False)``; the others: torch ``F.interpolate`` with ``align_corners=True``);
    ``normalise``: the official float32 normalisation formula (see the module notes; ``fixed_range``: only
    ``(map - lo) / (hi - lo)`` with ``value_range``, SLAVC's absolute prediction); ``threshold``: the binarisation
    rule on the normalised map (``above_median``: strictly above ``sorted[N/2]``, plus scores of 1;
    ``strictly_above_median``: strictly above ``sorted[N/2]`` only (SSLalignment's evaluator);
    ``at_least_median``: ``>= sorted[N/2]``; ``at_least_half``: ``>= 0.5``);
    ``value_range``: the fixed range of ``range_minmax`` (SLAVC: the map's range, (-1, 1) for cosine maps);
    ``image_preprocessing``: how the model path prepares a test frame (``resize_centercrop``: Resize(224, bicubic) +
    CenterCrop(224); ``resize_square``: Resize((224, 224), bicubic); ``tensor_resize_square``: ToTensor, then
    Resize((224, 224), bicubic, antialias) on the float tensor, SSLalignment's order); ``clip_boxes``: VGG-SS box coordinates are
    clipped to [0, 1] before ``int(x * size)``; ``ogl`` / ``ogl_alpha``: how object-guided localisation, when on,
    mixes the object map in (``ezvsl``: EZ-VSL's ``normalize_img(alpha * norm(AV) + (1 - alpha) * norm(obj))``;
    ``slavc``: SLAVC's fixed-range mix, :mod:`sslt_cli.ogl`) and the preset's alpha when none is given.

    Two documented deviations from the official loops, each with the official behaviour available:
    ``constant_maps`` (``whole_frame``: a map constant before upsampling predicts the whole frame under every preset;
    ``official``: as the preset's code, see the module notes) and ``empty_gt`` (``exclude``: a clip whose ground
    truth is empty, e.g. after clipping, is excluded and listed; ``zero``: it is scored, IoU 0, and counted in N, as
    the official loops do).
    """

    name: str
    map_size: int
    upsample: UpsampleMode
    threshold: ThresholdRule
    image_preprocessing: ImagePreprocessing
    source: str
    normalise: Normalisation = "minmax"
    value_range: tuple[float, float] | None = None
    clip_boxes: bool = True
    constant_maps: ConstantMaps = "whole_frame"
    empty_gt: EmptyGroundTruth = "exclude"
    size: int = EVAL_SIZE
    ogl: ObjectGuidanceRule = "ezvsl"
    ogl_alpha: float = 0.4


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol("ssltie", 14, "opencv_linear", "above_median", "resize_centercrop",
                 "SSL-TIE main.py test(): cv2 INTER_LINEAR, 1 - normalise(-map), strictly above sorted[N/2]",
                 normalise="negated_minmax"),
        Protocol("lvs", 14, "opencv_linear", "above_median", "resize_centercrop",
                 "LVS test.py: the same pipeline as SSL-TIE (SSL-TIE inherited it)", normalise="negated_minmax"),
        Protocol("ezvsl", 7, "bilinear_align_corners", "at_least_median", "resize_square",
                 "EZ-VSL test.py: F.interpolate bilinear align_corners=True, min-max, >= sorted[N/2]"),
        Protocol("fnac", 7, "bilinear_align_corners", "at_least_median", "resize_square",
                 "FNAC: the EZ-VSL evaluation"),
        Protocol("sspl", 14, "opencv_linear", "at_least_half", "resize_square",
                 "SSPL test.py eval_cal_ciou: cv2 INTER_LINEAR, (map - min) / ptp, >= 0.5", normalise="minmax_ptp"),
        Protocol("slavc", 7, "bicubic_align_corners", "at_least_median", "resize_square",
                 "SLAVC test.py --relative_prediction: bicubic align_corners=True, fixed-range scores "
                 "(A - lo) / (hi - lo), min-max, >= sorted[N/2]; confidence = mean of the top 25% of the scores",
                 normalise="range_minmax", value_range=(-1.0, 1.0), ogl="slavc", ogl_alpha=0.9),
        Protocol("fnac_bicubic", 7, "bicubic", "at_least_median", "resize_square",
                 "FNAC test.py validate2: F.interpolate bicubic align_corners=False, min-max, >= sorted[N/2] (object "
                 "guidance, when on, bilinear align_corners=True)"),
        Protocol("slavc_rel", 7, "bicubic_align_corners", "at_least_median", "resize_square",
                 "SLAVC test.py --relative_prediction (its README) on SLAVC's own maps (cos / 0.03): bicubic "
                 "align_corners=True, (A + 1/tau) / (2/tau), min-max, >= sorted[N/2]",
                 normalise="range_minmax", value_range=SLAVC_RANGE, ogl="slavc", ogl_alpha=0.9),
        Protocol("slavc_abs", 7, "bicubic_align_corners", "at_least_half", "resize_square",
                 "SLAVC test.py as its scripts run it (pred_thr 0.5) on SLAVC's own maps: bicubic align_corners=True, "
                 "(A + 1/tau) / (2/tau) >= 0.5", normalise="fixed_range", value_range=SLAVC_RANGE, ogl="slavc",
                 ogl_alpha=0.9),
        Protocol("align", 7, "bilinear_align_corners", "strictly_above_median", "tensor_resize_square",
                 "SSLalignment test.py validate (EZ-VSL, SLAVC, FNAC): bilinear align_corners=True, min-max, "
                 "> sorted[N/2]; frames ToTensor then Resize((224, 224)) on the tensor"),
        Protocol("align_lvs", 14, "opencv_linear", "strictly_above_median", "tensor_resize_square",
                 "SSLalignment test.py validate_lvs on VGG-SS (LVS and its own models): cv2 INTER_LINEAR, "
                 "1 - normalize(-map), > sorted[N/2]", normalise="negated_minmax"),
        Protocol("align_lvs_bilinear", 14, "bilinear_align_corners", "strictly_above_median", "tensor_resize_square",
                 "SSLalignment test.py validate_lvs on the other sets: bilinear align_corners=True, "
                 "1 - normalize(-map), > sorted[N/2]", normalise="negated_minmax"),
    )
}

PROTOCOL_NAMES: tuple[str, ...] = tuple(PROTOCOLS)
