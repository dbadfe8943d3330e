"""The multi-task MTCNN loss: face classification, box regression and landmarks, masked by kind."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from mtcnn.nets import StageOutput

from jobs.training.schema import LANDMARK, NEGATIVE, PART, POSITIVE


@dataclass(frozen=True)
class TaskWeights:
    """How much each task counts in a stage's total loss."""

    classification: float = 1.0
    box: float = 0.5
    landmarks: float = 0.5


#: The original MTCNN's task weights: landmarks matter most in O-Net, which outputs them.
STAGE_TASK_WEIGHTS = {
    "pnet": TaskWeights(1.0, 0.5, 0.5),
    "rnet": TaskWeights(1.0, 0.5, 0.5),
    "onet": TaskWeights(1.0, 0.5, 1.0),
}


def task_weights(stage: str, landmark_weight: float | None = None) -> TaskWeights:
    """The stage's task weights, the landmark weight replaced when one is given."""
    weights = STAGE_TASK_WEIGHTS[stage]
    return weights if landmark_weight is None else dataclasses.replace(weights, landmarks=landmark_weight)


@dataclass
class LossTerms:
    """The weighted total and each task's loss for one batch, plus how many samples fed each."""

    total: torch.Tensor
    classification: torch.Tensor
    box: torch.Tensor
    landmarks: torch.Tensor
    correct: int  # classification samples whose predicted class is right
    classified: int  # positives and negatives in the batch
    boxed: int  # positives and parts
    landmarked: int  # landmark samples


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(N, C) from P-Net's (N, C, 1, 1) maps or R/O-Net's (N, C) outputs."""
    return t.reshape(t.shape[0], -1)


def hardest_samples(per_sample_loss: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Indices of the `keep_fraction` of samples with the highest loss (at least one if any)."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction!r}")
    count = per_sample_loss.shape[0]
    keep = min(count, max(1, round(keep_fraction * count))) if count else 0
    return torch.topk(per_sample_loss, keep, sorted=False).indices


def classification_loss(face_logits: torch.Tensor, kinds: torch.Tensor,
                        ohem_keep: float | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over positives and negatives only; with OHEM, over the hardest of them.

    label_smoothing > 0 trains towards 1 - s/2 and s/2 instead of 1 and 0 (torch's rule).
    """
    mask = (kinds == POSITIVE) | (kinds == NEGATIVE)
    if not mask.any():
        return face_logits.sum() * 0.0  # keeps the graph (and DDP's gradient buckets) intact
    logits = _flat(face_logits)[mask]
    labels = (kinds[mask] == POSITIVE).long()
    losses = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    if ohem_keep is not None:
        losses = losses[hardest_samples(losses.detach(), ohem_keep)]
    return losses.mean()


def _masked_distance(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                     penalty=torch.square) -> torch.Tensor:
    """Mean over the masked samples of the summed per-coordinate penalty of their difference
    (squared by default: the squared Euclidean distance); 0 when none is masked."""
    if not mask.any():
        return predicted.sum() * 0.0
    return penalty(_flat(predicted)[mask] - target[mask]).sum(dim=1).mean()


def box_loss(box_offsets: torch.Tensor, targets: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
    """Squared L2 between predicted and true box offsets, over positives and parts."""
    return _masked_distance(box_offsets, targets, (kinds == POSITIVE) | (kinds == PART))


#: Landmark losses a stage can train with: "l2" is the paper's; "wing" is Feng et al.'s (CVPR 2018).
LANDMARK_LOSSES = ("l2", "wing")
#: Wing's width and curvature in window fractions: Feng et al.'s w = 10 and epsilon = 2 pixels
#: on their 64-pixel inputs. Below the width it is logarithmic, so errors of a few pixels keep
#: pulling where the squared loss's gradient fades; above it, L1.
WING_WIDTH = 10.0 / 64.0
WING_CURVATURE = 2.0 / 64.0


def wing(difference: torch.Tensor, width: float = WING_WIDTH, curvature: float = WING_CURVATURE) -> torch.Tensor:
    """The wing loss of each element of a difference (continuous at |x| = width)."""
    magnitude = difference.abs()
    offset = width - width * math.log1p(width / curvature)
    return torch.where(magnitude < width, width * torch.log1p(magnitude / curvature), magnitude - offset)


def landmark_loss(landmarks: torch.Tensor, targets: torch.Tensor, kinds: torch.Tensor,
                  form: str = "l2") -> torch.Tensor:
    """The landmark loss over landmark samples: squared L2 of the 10 coordinates, or their wing sum."""
    if form not in LANDMARK_LOSSES:
        raise ValueError(f"landmark loss must be one of {LANDMARK_LOSSES}, got {form!r}")
    return _masked_distance(landmarks, targets, kinds == LANDMARK, torch.square if form == "l2" else wing)


def multitask_loss(output: StageOutput, kinds: torch.Tensor, box_targets: torch.Tensor,
                   landmark_targets: torch.Tensor, weights: TaskWeights,
                   ohem_keep: float | None = None, label_smoothing: float = 0.0,
                   landmark_form: str = "l2") -> LossTerms:
    """The stage's weighted loss for a batch of samples of mixed kinds."""
    classification = classification_loss(output.face_logits, kinds, ohem_keep, label_smoothing)
    box = box_loss(output.box_offsets, box_targets, kinds)
    if output.landmarks is not None:
        landmarks = landmark_loss(output.landmarks, landmark_targets, kinds, landmark_form)
    else:
        landmarks = classification.new_zeros(())
    total = (weights.classification * classification + weights.box * box
             + weights.landmarks * landmarks)
    with torch.no_grad():
        mask = (kinds == POSITIVE) | (kinds == NEGATIVE)
        predicted = _flat(output.face_logits)[mask].argmax(dim=1)
        correct = int((predicted == (kinds[mask] == POSITIVE).long()).sum())
    return LossTerms(total, classification, box, landmarks, correct, int(mask.sum()),
                     int(((kinds == POSITIVE) | (kinds == PART)).sum()), int((kinds == LANDMARK).sum()))
