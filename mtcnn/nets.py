"""P-Net, R-Net and O-Net: the three stages of the MTCNN cascade."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: Heads a stage may carry; "classifier" and "box_regression" are always present.
HEADS = ("classifier", "box_regression", "landmarks")

#: Side of the square input window of each stage, in pixels.
INPUT_SIZE = {"pnet": 12, "rnet": 24, "onet": 48}


@dataclass
class StageOutput:
    """What one stage predicts for each window."""

    face_logits: torch.Tensor  # (N, 2, ...) non-face / face logits
    box_offsets: torch.Tensor  # (N, 4, ...) x1, y1, x2, y2 offsets relative to the window size
    landmarks: torch.Tensor | None  # (N, 10, ...) x of 5 points then y of 5 points, or None

    def face_probability(self) -> torch.Tensor:
        """Probability that each window is a face."""
        return torch.softmax(self.face_logits, dim=1)[:, 1]


class _Stage(nn.Module):
    """Shared head handling: every stage has a classifier and a box head, landmarks optional."""

    name: str

    def __init__(self, has_landmarks: bool) -> None:
        super().__init__()
        self.has_landmarks = has_landmarks

    @property
    def heads(self) -> tuple[str, ...]:
        """Names of the heads this stage carries."""
        return HEADS if self.has_landmarks else HEADS[:2]


class PNet(_Stage):
    """Proposal net: fully convolutional, one 12x12 window every 2 pixels."""

    name = "pnet"

    def __init__(self, has_landmarks: bool = True) -> None:
        super().__init__(has_landmarks)
        self.body = nn.Sequential(
            nn.Conv2d(3, 10, 3), nn.PReLU(10), nn.MaxPool2d(2, 2, ceil_mode=True),
            nn.Conv2d(10, 16, 3), nn.PReLU(16),
            nn.Conv2d(16, 32, 3), nn.PReLU(32),
        )
        self.classifier = nn.Conv2d(32, 2, 1)
        self.box_regression = nn.Conv2d(32, 4, 1)
        self.landmarks = nn.Conv2d(32, 10, 1) if has_landmarks else None

    def forward(self, x: torch.Tensor) -> StageOutput:
        """Score every 12x12 window of a normalised (N, 3, H, W) batch."""
        features = self.body(x)
        return StageOutput(
            self.classifier(features),
            self.box_regression(features),
            self.landmarks(features) if self.landmarks is not None else None,
        )


class _DenseStage(_Stage):
    """R-Net and O-Net: a conv body, one dense layer with PReLU, then dense heads."""

    def __init__(self, body: nn.Sequential, flat_features: int, hidden: int,
                 has_landmarks: bool, dropout: float) -> None:
        super().__init__(has_landmarks)
        self.body = body
        self.dense = nn.Sequential(nn.Flatten(), nn.Linear(flat_features, hidden), nn.PReLU(hidden))
        # Dropout only acts in training mode; at inference all units are kept (paper, section II).
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, 2)
        self.box_regression = nn.Linear(hidden, 4)
        self.landmarks = nn.Linear(hidden, 10) if has_landmarks else None

    def forward(self, x: torch.Tensor) -> StageOutput:
        """Score a normalised (N, 3, S, S) batch of windows."""
        features = self.dropout(self.dense(self.body(x)))
        return StageOutput(
            self.classifier(features),
            self.box_regression(features),
            self.landmarks(features) if self.landmarks is not None else None,
        )


class RNet(_DenseStage):
    """Refine net: rescores and recalibrates 24x24 candidate windows."""

    name = "rnet"

    def __init__(self, has_landmarks: bool = True, dropout: float = 0.25) -> None:
        body = nn.Sequential(
            nn.Conv2d(3, 28, 3), nn.PReLU(28), nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(28, 48, 3), nn.PReLU(48), nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(48, 64, 2), nn.PReLU(64),
        )
        super().__init__(body, 64 * 3 * 3, 128, has_landmarks, dropout)


class ONet(_DenseStage):
    """Output net: final score, box and five landmarks on 48x48 windows."""

    name = "onet"

    def __init__(self, has_landmarks: bool = True, dropout: float = 0.25) -> None:
        body = nn.Sequential(
            nn.Conv2d(3, 32, 3), nn.PReLU(32), nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(32, 64, 3), nn.PReLU(64), nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(64, 64, 3), nn.PReLU(64), nn.MaxPool2d(2, 2, ceil_mode=True),
            nn.Conv2d(64, 128, 2), nn.PReLU(128),
        )
        super().__init__(body, 128 * 3 * 3, 256, has_landmarks, dropout)


STAGES: dict[str, type[_Stage]] = {"pnet": PNet, "rnet": RNet, "onet": ONet}


def build_stage(name: str, has_landmarks: bool = True) -> _Stage:
    """A freshly initialised stage by name ("pnet", "rnet" or "onet")."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; expected one of {sorted(STAGES)}")
    return STAGES[name](has_landmarks=has_landmarks)


def normalize_pixels(x: torch.Tensor) -> torch.Tensor:
    """Map uint8-range pixels to about [-1, 1] as every stage expects."""
    return (x - 127.5) * 0.0078125
