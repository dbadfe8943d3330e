"""Box arithmetic for the cascade: NMS, calibration, squaring and crop-resize, all in torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# IoU matrices are built a block at a time so memory stays bounded however many boxes come in.
_NMS_BLOCK = 2048
# The fixed-point NMS below converges in as many rounds as the longest suppression chain;
# past this many rounds a block finishes with the plain sequential scan instead.
_MAX_FIXED_POINT_ROUNDS = 64


def pairwise_overlap(a: torch.Tensor, b: torch.Tensor, mode: str = "union",
                     plus_one: bool = False) -> torch.Tensor:
    """Overlap of every box in a (N, 4) with every box in b (M, 4): IoU or intersection/min."""
    one = 1.0 if plus_one else 0.0
    area_a = (a[:, 2] - a[:, 0] + one) * (a[:, 3] - a[:, 1] + one)
    area_b = (b[:, 2] - b[:, 0] + one) * (b[:, 3] - b[:, 1] + one)
    width = (torch.minimum(a[:, None, 2], b[None, :, 2])
             - torch.maximum(a[:, None, 0], b[None, :, 0]) + one).clamp(min=0)
    height = (torch.minimum(a[:, None, 3], b[None, :, 3])
              - torch.maximum(a[:, None, 1], b[None, :, 1]) + one).clamp(min=0)
    inter = width * height
    if mode == "min":
        return inter / torch.minimum(area_a[:, None], area_b[None, :]).clamp(min=1e-12)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-12)


def _greedy_within_block(suppresses: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """Greedy NMS result for one block, given which box suppresses which (upper triangle)."""
    keep = alive.clone()
    for _ in range(_MAX_FIXED_POINT_ROUNDS):
        # A box survives when no surviving earlier box suppresses it; the unique fixed point
        # of this rule is exactly the sequential greedy result.
        hit = (suppresses & keep[:, None]).any(dim=0)
        new_keep = alive & ~hit
        if torch.equal(new_keep, keep):
            return keep
        keep = new_keep
    rows = suppresses.cpu()
    result = alive.cpu().clone()
    for i in range(rows.shape[0]):
        if result[i]:
            result &= ~rows[i]
    return result.to(keep.device)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
                threshold: float, mode: str = "union", plus_one: bool = False) -> torch.Tensor:
    """Indices kept by greedy NMS run separately per group, ordered by group then score."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    # Sort by group, then by descending score, so each group's boxes are contiguous.
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    sorted_boxes, sorted_groups = boxes[order], groups[order]
    kept_chunks: list[torch.Tensor] = []
    kept_boxes = boxes.new_zeros((0, 4))
    kept_groups = groups.new_zeros((0,))
    for start in range(0, len(order), _NMS_BLOCK):
        block_boxes = sorted_boxes[start:start + _NMS_BLOCK]
        block_groups = sorted_groups[start:start + _NMS_BLOCK]
        alive = torch.ones(len(block_boxes), dtype=torch.bool, device=boxes.device)
        if len(kept_boxes):
            # Earlier blocks' survivors of the same group suppress boxes in this block.
            active = kept_groups >= block_groups[0]
            earlier, earlier_groups = kept_boxes[active], kept_groups[active]
            if len(earlier):
                same = earlier_groups[:, None] == block_groups[None, :]
                over = pairwise_overlap(earlier, block_boxes, mode, plus_one) > threshold
                alive &= ~(over & same).any(dim=0)
        same = block_groups[:, None] == block_groups[None, :]
        over = pairwise_overlap(block_boxes, block_boxes, mode, plus_one) > threshold
        suppresses = torch.triu(over & same, diagonal=1)
        keep = _greedy_within_block(suppresses, alive)
        kept_chunks.append(order[start:start + _NMS_BLOCK][keep])
        kept_boxes = torch.cat([kept_boxes, block_boxes[keep]])
        kept_groups = torch.cat([kept_groups, block_groups[keep]])
    return torch.cat(kept_chunks)


def calibrate(boxes: torch.Tensor, offsets: torch.Tensor, plus_one: bool) -> torch.Tensor:
    """Apply box-regression offsets (relative to box size) to (N, 4) boxes."""
    one = 1.0 if plus_one else 0.0
    width = boxes[:, 2] - boxes[:, 0] + one
    height = boxes[:, 3] - boxes[:, 1] + one
    size = torch.stack([width, height, width, height], dim=1)
    return boxes + offsets * size


def square(boxes: torch.Tensor) -> torch.Tensor:
    """Grow (N, 4) boxes to squares of their longer side around the same centre."""
    width = boxes[:, 2] - boxes[:, 0]
    height = boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(width, height)
    x1 = boxes[:, 0] + width * 0.5 - side * 0.5
    y1 = boxes[:, 1] + height * 0.5 - side * 0.5
    return torch.stack([x1, y1, x1 + side, y1 + side], dim=1)


def crop_regions(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Pixel-edge regions (N, 4) that the cascade crops for boxes, clipped to the image."""
    # Matches the original MTCNN's 1-based integer convention: pixels trunc(x1)-1 .. trunc(x2)-1.
    whole = boxes.trunc()
    x1 = whole[:, 0].clamp(min=1) - 1
    y1 = whole[:, 1].clamp(min=1) - 1
    x2 = whole[:, 2].clamp(max=width)
    y2 = whole[:, 3].clamp(max=height)
    return torch.stack([x1, y1, x2, y2], dim=1)


def integral_image(image: torch.Tensor) -> torch.Tensor:
    """Summed-area table (H+1, W+1, C) of an H x W x C uint8 image, exact in integers."""
    height, width, channels = image.shape
    # int32 holds every sum of an image up to about 8 megapixels; larger ones need int64.
    dtype = torch.int32 if height * width * 255 < 2**31 else torch.int64
    table = torch.zeros((height + 1, width + 1, channels), dtype=dtype, device=image.device)
    table[1:, 1:] = image.to(dtype).cumsum(0).cumsum(1)
    return table


def _area_bins(start: torch.Tensor, length: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer [begin, end) of each of size output bins over [start, start + length)."""
    index = torch.arange(size, device=start.device, dtype=torch.long)
    begin = start[:, None] + (index[None, :] * length[:, None]) // size
    end = start[:, None] + ((index[None, :] + 1) * length[:, None] + size - 1) // size
    return begin, end


def crop_resize(table: torch.Tensor, regions: torch.Tensor, size: int) -> torch.Tensor:
    """Area-resize pixel-edge regions of an image, given its summed-area table, to (N, C, size, size)."""
    channels = table.shape[2]
    if len(regions) == 0:
        return torch.zeros((0, channels, size, size), device=table.device)
    # Each output pixel is the mean of its bin: the same bins as adaptive average pooling
    # ("area" interpolation), read from the summed-area table with four lookups.
    whole = regions.long()
    y0, y1 = _area_bins(whole[:, 1], (whole[:, 3] - whole[:, 1]).clamp(min=1), size)
    x0, x1 = _area_bins(whole[:, 0], (whole[:, 2] - whole[:, 0]).clamp(min=1), size)
    y0, y1 = y0[:, :, None], y1[:, :, None]
    x0, x1 = x0[:, None, :], x1[:, None, :]
    sums = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    area = ((y1 - y0) * (x1 - x0)).unsqueeze(-1)
    return (sums.float() / area.float()).permute(0, 3, 1, 2)
