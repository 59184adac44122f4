"""Training objectives: SSL-TIE's tri-map contrastive loss L_cl, the equivariance loss L_geo, and EZ-VSL's baseline.

Pure torch; the only project module imported is ``config``, for the objectives' recipe sections. Every contrastive
objective takes the L2-normalised visual map ``v: (B, C, h, w)`` and audio embedding ``a: (B, C)`` and returns ``(loss, parts)`` where ``parts["map"]`` is the
``(B, 1, h, w)`` cosine map of each image with its own audio (kept in the graph so L_geo can reuse it) and the other
entries are detached scalar tensors for logging (no host sync here: the caller decides when to call ``.item()``).
:data:`OBJECTIVES` maps a recipe's objective name to its function, its recipe section and what validation reports.

Global negatives under DistributedDataParallel: a contrastive objective given ``gather`` (see :func:`rank_gather`)
scores this process's images against the audio of every process, so its easy negatives are those a single process
with the whole global batch would see. The loss stays the mean over this process's rows; DDP's gradient average over
equal shards then equals the gradient of the global mean, because the gather's backward sums every process's
gradient for a row into the process that owns it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sslt_cli.config import EzvslLoss, LossSection, TieLoss

Parts = dict[str, torch.Tensor]
Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]
"""x (B, ...) of this process -> (the rows of every process in rank order (G, ...), index of this process's first
row in them)."""


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 with shards of known, possibly unequal sizes; the backward sums the gradient of each
    gathered row over the processes and hands every process the rows it contributed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: tuple[int, ...], rank: int) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        # all_gather needs equal shapes: pad every shard to the largest, then cut the padding out again
        peak = max(sizes)
        padded = x.new_zeros((peak, *x.shape[1:]))
        padded[: x.shape[0]] = x
        shards = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(shards, padded)
        return torch.cat([shard[:n] for shard, n in zip(shards, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # every process's loss depends on every row; the sum over processes is the gradient of the summed losses
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        first = sum(ctx.sizes[: ctx.rank])
        return total[first:first + ctx.sizes[ctx.rank]], None, None


def rank_gather(sizes: Sequence[int], rank: int) -> Gather:
    """A differentiable all-gather over the default process group, for ``gather=`` of the contrastive losses.

    sizes: the batch size of every process in rank order (every process passes the same list); rank: this process.
    The returned function maps x (sizes[rank], ...) to (x of all processes concatenated (sum(sizes), ...), index of
    this process's first row). Every process must call it the same number of times in the same order (it is a
    collective in the forward and the backward). torch.distributed.nn.functional.all_gather does the same for equal
    shards only and is deprecated in the installed torch.
    """
    sizes = tuple(int(n) for n in sizes)
    first = sum(sizes[:rank])

    def gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        if x.shape[0] != sizes[rank]:
            raise ValueError(f"rank {rank} was declared {sizes[rank]} rows and gathers {x.shape[0]}")
        return _GatherRows.apply(x, sizes, rank), first

    return gather


def _masked_mean(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """sum(mask * values) / sum(mask) over the two spatial dims: (..., h, w) -> (...)."""
    # The denominator can only reach 0 through float underflow of every mask entry (inputs far outside [-1, 1]);
    # the numerator is then 0 too, and the clamp turns 0/0 into 0 instead of a NaN that would stop the run.
    return (mask * values).sum(dim=(-2, -1)) / mask.sum(dim=(-2, -1)).clamp_min(torch.finfo(values.dtype).tiny)


def tie_contrastive_loss(
    v: torch.Tensor,
    a: torch.Tensor,
    eps_pos: float = 0.65,
    eps_neg: float = 0.40,
    tau: float = 0.03,
    temperature: float = 0.07,
    hard_negative: bool = True,
    gather: Gather | None = None,
) -> tuple[torch.Tensor, Parts]:
    """L_cl: LVS's "hard way" contrastive loss with SSL-TIE's tri-map (REFERENCE.md section 2).

    v: (B, C, h, w) visual map, L2-normalised over C; a: (B, C) audio embeddings, L2-normalised.
    With A0[i, j] = cos(v_i(h, w), a_j): (B, B, h, w) and A = its diagonal (B, 1, h, w):

    - positive mask P = sigmoid((A - eps_pos) / tau); pos_i = sum(P * A) / sum(P)
    - negative mask N = 1 - sigmoid((A - eps_neg) / tau); hard_neg_i = sum(N * A) / sum(N) (the image's background)
    - easy negatives: easy_ij = sum(P_ij * A0_ij) / sum(P_ij), P_ij = sigmoid((A0_ij - eps_pos) / tau), multiplied
      by (1 - 100 * I): the diagonal (the positive pair itself) becomes -99 * easy_ii, far below every other logit
      whenever easy_ii > 0, which is how the official code removes it from the negatives
    - logits = [pos, easy (B), hard_neg] / temperature: (B, B + 2); cross-entropy with target 0.

    ``hard_negative=False`` drops the hard-negative column (the official code's ``Neg`` switch).
    ``gather`` (distributed training, :func:`rank_gather`): the easy negatives come from the audio of every process,
    G rows in all, this process's own audio at rows ``first .. first + B``; the logits are then (B, G + 2) and the
    loss is still the mean over this process's B images.
    Returns ``(loss, parts)``: ``parts["map"]`` = A (B, 1, h, w) in the autograd graph, ``parts["logits"]``
    (B, B + 2) detached, and detached scalars ``acc1`` (share of rows whose largest logit is the positive),
    ``pos``, ``hard_neg`` (batch means) and ``pos_area`` (mean share of map cells in P).
    The computation runs in float32 whatever the input dtype (autocast-safe): the sigmoid masks with tau = 0.03 need it.
    """
    v, a = v.float(), a.float()
    batch = v.shape[0]
    audio, first = gather(a) if gather is not None else (a, 0)
    all_pairs = torch.einsum("nchw,kc->nkhw", v, audio)
    own = torch.diagonal(all_pairs, offset=first, dim1=0, dim2=1).permute(2, 0, 1).unsqueeze(1)
    pos_mask = torch.sigmoid((own - eps_pos) / tau)
    # 1 - sigmoid(x) == sigmoid(-x); the latter keeps its precision where the map is close to 1.
    neg_mask = torch.sigmoid(-(own - eps_neg) / tau)
    pos = _masked_mean(pos_mask, own)
    hard_neg = _masked_mean(neg_mask, own)

    easy = _masked_mean(torch.sigmoid((all_pairs - eps_pos) / tau), all_pairs)
    own_audio = torch.eye(batch, audio.shape[0], device=v.device, dtype=easy.dtype).roll(first, dims=1)
    easy = easy * (1.0 - 100.0 * own_audio)

    columns = [pos, easy, hard_neg] if hard_negative else [pos, easy]
    logits = torch.cat(columns, dim=1) / temperature
    target = torch.zeros(batch, dtype=torch.long, device=v.device)
    loss = F.cross_entropy(logits, target)
    parts = {
        "map": own,
        "logits": logits.detach(),
        "acc1": (logits.detach().argmax(dim=1) == 0).float().mean(),
        "pos": pos.detach().mean(),
        "hard_neg": hard_neg.detach().mean(),
        "pos_area": pos_mask.detach().mean(),
    }
    return loss, parts


def ezvsl_loss(v: torch.Tensor, a: torch.Tensor, temperature: float = 0.03,
               gather: Gather | None = None) -> tuple[torch.Tensor, Parts]:
    """EZ-VSL's multiple-instance contrastive loss (ECCV 2022), a baseline objective.

    v: (B, C, h, w) L2-normalised visual map; a: (B, C) L2-normalised audio. The image-audio score is the max over the
    map of cos(v_i(h, w), a_j) / temperature: (B, B); InfoNCE in both directions (image->audio and audio->image) with
    the matching pair on the diagonal, the two terms summed as EZ-VSL does.
    ``gather`` (distributed training, :func:`rank_gather`): this process's B images are scored against the G audios
    of all processes, and its B audios against the G images of all processes (the score rows of every process are
    gathered, not the maps); each term is the mean over this process's B rows, ``logits`` is then (B, G).
    Returns ``(loss, parts)`` with ``parts["map"]`` = the own-audio cosine map (B, 1, h, w), ``logits`` (B, B)
    detached and ``acc1`` (share of images whose best audio is their own).
    """
    v = v.float()
    a = a.float()
    audio, first = gather(a) if gather is not None else (a, 0)
    all_pairs = torch.einsum("nchw,kc->nkhw", v, audio)
    logits = all_pairs.flatten(2).amax(dim=2) / temperature
    target = torch.arange(v.shape[0], device=v.device) + first
    if gather is not None:
        every_image, _ = gather(logits)
        audio_rows = every_image[:, first:first + v.shape[0]].t()
    else:
        audio_rows = logits.t()
    loss = F.cross_entropy(logits, target) + F.cross_entropy(audio_rows, target)
    own = torch.diagonal(all_pairs, offset=first, dim1=0, dim2=1).permute(2, 0, 1).unsqueeze(1)
    parts = {
        "map": own,
        "logits": logits.detach(),
        "acc1": (logits.detach().argmax(dim=1) == target).float().mean(),
    }
    return loss, parts


def equivariance_loss(pred_map: torch.Tensor, target_map: torch.Tensor) -> torch.Tensor:
    """L_geo: mean squared error between the map of the transformed view and the transformed map of view 1.

    pred_map: (B, 1, h, w), the model's map on T(image); target_map: (B, 1, h', w'), T applied to view 1's map
    (see ``data.augment.apply_geo_transform``). Where the sizes differ (a scaled view whose map size is not exactly
    the scaled size, e.g. 112 px -> 4 x 4 but 7 * 0.5 -> 3), the target is resized bilinearly to the prediction's size,
    as the official code does. Gradients flow into both maps (the official default).
    """
    if target_map.shape[-2:] != pred_map.shape[-2:]:
        target_map = F.interpolate(target_map, size=pred_map.shape[-2:], mode="bilinear", align_corners=False)
    return F.mse_loss(pred_map.float(), target_map.float())


LossFn = Callable[..., tuple[torch.Tensor, Parts]]


@dataclass(frozen=True)
class Objective:
    """A training objective, one entry of :data:`OBJECTIVES`: its contrastive ``loss`` (``loss(v, a, **parameters,
    gather=None) -> (loss, parts)``, as the functions above), the recipe ``section`` holding its parameters (a
    :class:`config.LossSection`: the shared weights plus the keyword arguments of ``loss``) and whether validation
    reports its loss on the validation set (``l_cl`` in each ``val`` record)."""

    loss: LossFn
    section: type[LossSection]
    validation_loss: bool


# The closed registry of objectives: a recipe's ``loss.objective`` names one (its section is the schema's
# ``loss``; config.LOSS_SECTIONS holds the same names, tests/test_losses.py pins the two together).
OBJECTIVES: dict[str, Objective] = {
    "tie": Objective(tie_contrastive_loss, TieLoss, validation_loss=True),
    "ezvsl": Objective(ezvsl_loss, EzvslLoss, validation_loss=False),
}


def build_objective(loss: LossSection) -> Callable[..., tuple[torch.Tensor, dict]]:
    """The contrastive objective of a recipe's ``loss`` section, its parameters (:meth:`LossSection.parameters`)
    bound once: call it as ``objective(v, a)`` or, with global negatives, ``objective(v, a, gather=rank_gather(...))``."""
    return functools.partial(OBJECTIVES[loss.objective].loss, **loss.parameters())
