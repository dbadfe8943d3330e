"""Image pyramids for P-Net: the scales, and the classic and dynamic ways to build the levels."""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

PYRAMIDS = ("classic", "dynamic")
#: P-Net's window side: a level whose short side is below it cannot hold a face.
WINDOW = 12


def pyramid_scales(height: int, width: int, min_face_size: float, scale_factor: float) -> list[float]:
    """Scales at which a min_face_size face maps to P-Net's 12-pixel window, largest first."""
    scale = WINDOW / min_face_size
    short_side = min(height, width) * scale
    scales = []
    while short_side >= WINDOW:
        scales.append(scale)
        scale *= scale_factor
        short_side *= scale_factor
    return scales


def level_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """Height and width of the pyramid level at a scale (rounded up, as the original MTCNN)."""
    return int(height * scale + 1), int(width * scale + 1)


def build_pyramid(image: np.ndarray, scales: list[float], pyramid: str = "dynamic") -> list[np.ndarray]:
    """Resize an H x W x C uint8 image to every scale with area interpolation."""
    if pyramid not in PYRAMIDS:
        raise ValueError(f"pyramid must be one of {PYRAMIDS}, got {pyramid!r}")
    height, width = image.shape[:2]
    levels = []
    source = image
    for scale in scales:
        level_h, level_w = level_size(height, width, scale)
        # cv2 area interpolation reads the whole source: from the previous (smaller) level
        # that is a fraction of the work of reading the full image every time.
        level = cv2.resize(source, (level_w, level_h), interpolation=cv2.INTER_AREA)
        levels.append(level)
        if pyramid == "dynamic":
            source = level
    return levels


def build_pyramid_tensor(image: torch.Tensor, scales: list[float],
                         pyramid: str = "dynamic") -> list[torch.Tensor]:
    """Resize a (1, C, H, W) float image to every scale on its own device (area interpolation)."""
    if pyramid not in PYRAMIDS:
        raise ValueError(f"pyramid must be one of {PYRAMIDS}, got {pyramid!r}")
    height, width = image.shape[-2:]
    levels = []
    source = image
    for scale in scales:
        level = F.interpolate(source, size=level_size(height, width, scale), mode="area")
        levels.append(level)
        if pyramid == "dynamic":
            source = level
    return levels
