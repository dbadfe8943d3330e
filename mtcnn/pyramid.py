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


def _area_bins(length: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[begin, end) of each of size bins over length pixels, as area interpolation averages them."""
    index = torch.arange(size, device=device)
    return (index * length) // size, ((index + 1) * length + size - 1) // size


def resize_from_table(table: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Area-resize the image behind a summed-area table (H+1, W+1, C) to height x width (float)."""
    rows0, rows1 = _area_bins(table.shape[0] - 1, height, table.device)
    cols0, cols1 = _area_bins(table.shape[1] - 1, width, table.device)
    # Separable box sums: four gathers from the table instead of reading every source pixel.
    row_sums = table.index_select(0, rows1) - table.index_select(0, rows0)
    sums = row_sums.index_select(1, cols1) - row_sums.index_select(1, cols0)
    area = ((rows1 - rows0)[:, None] * (cols1 - cols0)[None, :]).float()
    return sums.float() / area[:, :, None]


def build_pyramid(image: np.ndarray, scales: list[float], pyramid: str = "dynamic",
                  table: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Every pyramid level of an H x W x C uint8 image as an H' x W' x C tensor, largest first.

    "classic" averages each level from the full image, through its summed-area table (pass it
    in when it is already made), exactly as area interpolation of the full image; "dynamic"
    area-resizes each level from the previous one with OpenCV, reading ever smaller sources.
    """
    if pyramid not in PYRAMIDS:
        raise ValueError(f"pyramid must be one of {PYRAMIDS}, got {pyramid!r}")
    height, width = image.shape[:2]
    sizes = [level_size(height, width, scale) for scale in scales]
    if pyramid == "classic":
        if table is None:
            table = torch.from_numpy(cv2.integral(image, sdepth=cv2.CV_64F))
        if image.ndim == 3:
            table = table[:, :, :image.shape[2]]  # a table made for cropping may carry a padding lane
        return [resize_from_table(table, *size) for size in sizes]
    levels, source = [], image
    for level_h, level_w in sizes:
        source = cv2.resize(source, (level_w, level_h), interpolation=cv2.INTER_AREA)
        levels.append(torch.from_numpy(source))
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
