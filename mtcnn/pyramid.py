"""Image pyramids for P-Net: the scales, and the ways to build the levels from the image.

"classic" averages every level from the full image (exact area interpolation, as the original).
The others read smaller sources, which is faster but blurs a little more than one area average:
"dynamic" resizes each level from the previous one, so the blur of every step compounds;
"chain2" resizes each level from the one two steps up (0.709^2 is about 0.5), half as many steps;
"octave" resizes each level once, from the smallest exact 2x halving of the image at least twice
its size, so no level is resized from a resized level of the pyramid.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .boxes import area_resize_host

PYRAMIDS = ("classic", "dynamic", "chain2", "octave")
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


def resize_from_table(table: torch.Tensor, height: int, width: int, channels: int | None = None,
                      rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Area-resize the image behind a summed-area table (H+1, W+1, C) to height x width x C (float).

    C is the table's channel count, or its first `channels` (a table may carry a padding lane).
    rows: only output rows [first, stop) of that resize (a band of a pyramid level), on the CPU.
    """
    channels = channels or table.shape[2]
    if table.device.type == "cpu":
        # Compiled loops: one pass, no gathered copies (at 1080p 7x faster than the tensor form).
        whole = np.array([[0, 0, table.shape[1] - 1, table.shape[0] - 1]])
        return torch.from_numpy(area_resize_host(table.numpy(), whole, height, width, channels, rows)[0])
    if rows is not None:
        raise ValueError("resize_from_table takes a band of rows on the CPU only")
    return _resize_from_table_tensors(table[:, :, :channels], height, width)


def _resize_from_table_tensors(table: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """resize_from_table with tensor operations, on any device."""
    rows0, rows1 = _area_bins(table.shape[0] - 1, height, table.device)
    cols0, cols1 = _area_bins(table.shape[1] - 1, width, table.device)
    # Separable box sums: four gathers from the table instead of reading every source pixel.
    row_sums = table.index_select(0, rows1) - table.index_select(0, rows0)
    sums = row_sums.index_select(1, cols1) - row_sums.index_select(1, cols0)
    area = ((rows1 - rows0)[:, None] * (cols1 - cols0)[None, :]).float()
    return sums.float() / area[:, :, None]


def _source_octave(octaves: list, level_h: int, level_w: int, halve, size_of) -> object:
    """The smallest octave at least twice a level's size; octaves grows by exact 2x halvings.

    Levels come largest first, so the octaves made for earlier levels are at least as large as
    this one needs, and only the last one can be the smallest that still suffices.
    """
    while True:
        height, width = size_of(octaves[-1])
        if height // 2 < 2 * level_h or width // 2 < 2 * level_w:
            return octaves[-1]
        octaves.append(halve(octaves[-1]))


def _halve_host(image: np.ndarray) -> np.ndarray:
    """Mean of every 2 x 2 block (the last odd row or column is area-averaged in)."""
    height, width = image.shape[:2]
    return cv2.resize(image, (width // 2, height // 2), interpolation=cv2.INTER_AREA)


def _halve_tensor(image: torch.Tensor) -> torch.Tensor:
    """Mean of every 2 x 2 block of a (1, C, H, W) tensor (torch's area bins on odd sizes)."""
    return F.interpolate(image, size=(image.shape[-2] // 2, image.shape[-1] // 2), mode="area")


def build_pyramid(image: np.ndarray, scales: list[float], pyramid: str = "classic",
                  table: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Every pyramid level of an H x W x C uint8 image as an H' x W' x C tensor, largest first.

    "classic" averages each level from the full image, through its summed-area table (pass it
    in when it is already made), exactly as area interpolation of the full image; the others
    area-resize with OpenCV from smaller sources (see the module docstring).
    """
    if pyramid not in PYRAMIDS:
        raise ValueError(f"pyramid must be one of {PYRAMIDS}, got {pyramid!r}")
    height, width = image.shape[:2]
    sizes = [level_size(height, width, scale) for scale in scales]
    if pyramid == "classic":
        if table is None:
            table = torch.from_numpy(cv2.integral(image, sdepth=cv2.CV_64F))
        if table.ndim == 2:  # OpenCV's table of a one-channel image has no channel axis
            table = table[:, :, None]
        # A table made for cropping may carry a padding lane; levels keep the image's own axes.
        channels = image.shape[2] if image.ndim == 3 else 1
        return [resize_from_table(table, *size, channels).reshape(*size, *image.shape[2:]) for size in sizes]
    if pyramid == "dynamic":
        levels, source = [], image
        for level_h, level_w in sizes:
            source = cv2.resize(source, (level_w, level_h), interpolation=cv2.INTER_AREA)
            levels.append(torch.from_numpy(source))
        return levels
    # float32 sources: no rounding to 8 bits between steps (OpenCV's float area path is also
    # faster than its 8-bit one here).
    full = image.astype(np.float32)
    levels = []
    if pyramid == "chain2":
        for depth, (level_h, level_w) in enumerate(sizes):
            source = full if depth < 2 else levels[depth - 2]
            levels.append(cv2.resize(source, (level_w, level_h), interpolation=cv2.INTER_AREA))
    else:
        octaves = [full]
        for level_h, level_w in sizes:
            source = _source_octave(octaves, level_h, level_w, _halve_host, lambda a: a.shape[:2])
            levels.append(cv2.resize(source, (level_w, level_h), interpolation=cv2.INTER_AREA))
    # cv2 drops the channel axis of 1-channel images; keep H' x W' x C.
    return [torch.from_numpy(level.reshape(*level.shape[:2], *image.shape[2:])) for level in levels]


def build_pyramid_tensor(image: torch.Tensor, scales: list[float],
                         pyramid: str = "classic") -> list[torch.Tensor]:
    """Resize a (1, C, H, W) float image to every scale on its own device (area interpolation)."""
    if pyramid not in PYRAMIDS:
        raise ValueError(f"pyramid must be one of {PYRAMIDS}, got {pyramid!r}")
    height, width = image.shape[-2:]
    levels: list[torch.Tensor] = []
    octaves = [image]
    for depth, scale in enumerate(scales):
        size = level_size(height, width, scale)
        if pyramid == "dynamic" and levels:
            source = levels[-1]
        elif pyramid == "chain2" and depth >= 2:
            source = levels[depth - 2]
        elif pyramid == "octave":
            source = _source_octave(octaves, *size, _halve_tensor, lambda t: t.shape[-2:])
        else:
            source = image
        levels.append(F.interpolate(source, size=size, mode="area"))
    return levels
