"""P-Net, R-Net and O-Net: the three stages of the MTCNN cascade."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: Heads a stage may carry; "classifier" and "box_regression" are always present.
HEADS = ("classifier", "box_regression", "landmarks")

#: What the nets take: (x - PIXEL_MEAN) * PIXEL_SCALE maps 0-255 pixels to about [-1, 1].
PIXEL_MEAN = 127.5
PIXEL_SCALE = 0.0078125  # 1 / 128


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


# -- the stage table ---------------------------------------------------------------------------

@dataclass(frozen=True)
class StageSpec:
    """One stage of the cascade: its net, its square input window and its place in the order."""

    name: str
    net: type[_Stage]
    #: Side of the square input window, in pixels.
    input_size: int
    #: Position in the cascade; also the index of the stage's entry in per-stage settings
    #: such as DetectorConfig.thresholds and stage_nms.
    order: int
    #: The stage that hands this one its windows (None for P-Net, which scans the pyramid);
    #: training samples of a stage with one are mined with the stages before it.
    previous: str | None

    @property
    def earlier(self) -> tuple[str, ...]:
        """Every stage before this one, in cascade order."""
        return STAGE_NAMES[:self.order]


#: The cascade, in order.
STAGES: dict[str, StageSpec] = {spec.name: spec for spec in (
    StageSpec("pnet", PNet, 12, 0, None),
    StageSpec("rnet", RNet, 24, 1, "pnet"),
    StageSpec("onet", ONet, 48, 2, "rnet"),
)}
STAGE_NAMES: tuple[str, ...] = tuple(STAGES)


def stage_spec(name: str) -> StageSpec:
    """The spec of a stage by name; ValueError naming the stages for any other name."""
    if name not in STAGES:
        raise ValueError(f"stage must be one of {STAGE_NAMES}, got {name!r}")
    return STAGES[name]


def build_stage(name: str, has_landmarks: bool = True) -> _Stage:
    """A freshly initialised stage by name ("pnet", "rnet" or "onet")."""
    return stage_spec(name).net(has_landmarks=has_landmarks)


def normalize_pixels(x: torch.Tensor) -> torch.Tensor:
    """Map uint8-range pixels to about [-1, 1] as every stage expects."""
    return (x - PIXEL_MEAN) * PIXEL_SCALE
