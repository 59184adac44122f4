"""Is a run learning? The check training makes once, early (issue 21): a run whose contrastive loss is still within
a few percent of chance, or whose validation localises no better than the centre prior, says so in one line with
its figures and the usual causes, instead of spending its schedule in silence.

Pure: numbers in, a :class:`LearningCheck` out (training records it in meta.json, metrics.jsonl and MLflow;
``sslt runs`` reads it back from meta.json).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# Validation AUC this close to the centre prior's (or below it) counts as "at the centre prior".
AUC_MARGIN = 0.01
USUAL_CAUSES = ("optim.lr too low (or 0) or a warm-up still under way; frames and audio not paired (check the "
                "manifest); sounding objects too small for the map (raise data.image_size); too few negatives "
                "(raise optim.batch_size); augmentation too strong for the data; too few steps so far")


def chance_loss(objective: str, candidates: int) -> float:
    """The objective's loss when every pair scores alike, for ``candidates`` audio clips per image (the batch, or
    the global batch with global negatives).

    ``tie``: cross-entropy over [positive, ``candidates`` easy negatives, hard negative], all logits equal:
    ln(candidates + 2). ``ezvsl``: InfoNCE both ways over ``candidates``: 2 ln(candidates).
    """
    if objective == "tie":
        return math.log(candidates + 2)
    if objective == "ezvsl":
        return 2.0 * math.log(candidates)
    raise ValueError(f"no chance level for objective {objective!r}")


@dataclass(frozen=True)
class LearningCheck:
    """The figures of one check. ``loss``: mean contrastive loss (``l_cl1``) over the steps before ``step``;
    ``val_auc`` / ``centre_auc``: the latest validation's AUC and the centre prior's on the same clips (None when
    no validation ran yet)."""

    step: int
    epoch: int
    loss: float
    chance: float
    tolerance: float
    val_auc: float | None
    centre_auc: float | None

    @property
    def loss_at_chance(self) -> bool:
        return self.loss >= (1.0 - self.tolerance) * self.chance

    @property
    def val_at_centre(self) -> bool:
        return self.val_auc is not None and self.centre_auc is not None and self.val_auc <= self.centre_auc + AUC_MARGIN

    @property
    def learning(self) -> bool:
        return not (self.loss_at_chance or self.val_at_centre)

    def figures(self) -> str:
        text = f"L_cl {self.loss:.3f} = {100 * self.loss / self.chance:.0f}% of chance {self.chance:.3f}"
        if self.val_auc is not None and self.centre_auc is not None:
            text += f"; validation AUC {self.val_auc:.3f} vs centre prior {self.centre_auc:.3f}"
        return text

    def message(self) -> str:
        """The one line training prints: the verdict, the figures and (when not learning) the usual causes."""
        if self.learning:
            return f"learning check at step {self.step}: learning ({self.figures()})"
        what = " and ".join(w for w, bad in (("the loss is at chance", self.loss_at_chance),
                                             ("validation is at the centre prior", self.val_at_centre)) if bad)
        return (f"warning: not learning at step {self.step} (epoch {self.epoch}): {what} ({self.figures()}); "
                f"usual causes: {USUAL_CAUSES}")

    def record(self) -> dict:
        """What meta.json keeps (``learning_check``): the figures, the verdict and the line printed."""
        return {**asdict(self), "learning": self.learning, "loss_at_chance": self.loss_at_chance,
                "val_at_centre": self.val_at_centre, "message": self.message()}

    def metrics(self) -> dict[str, float]:
        """The numbers for the metrics sink (``learning_check/...`` in MLflow)."""
        values = {"l_cl": self.loss, "chance": self.chance, "not_learning": float(not self.learning)}
        if self.val_auc is not None and self.centre_auc is not None:
            values.update(val_auc=self.val_auc, centre_auc=self.centre_auc)
        return values


def verdict(meta: dict) -> str:
    """What ``sslt runs`` shows for a run's meta.json: ``ok``, ``NOT LEARNING`` or ``-`` (not checked)."""
    check = meta.get("learning_check")
    if not isinstance(check, dict):
        return "-"
    return "ok" if check.get("learning") else "NOT LEARNING"
