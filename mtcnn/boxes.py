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


def crop_resize(image: torch.Tensor, regions: torch.Tensor, size: int,
                max_supersample: int = 4) -> torch.Tensor:
    """Crop pixel-edge regions of a (1, C, H, W) float image and area-resize each to size x size."""
    if len(regions) == 0:
        return image.new_zeros((0, image.shape[1], size, size))
    _, channels, height, width = image.shape
    extent = (regions[:, 2:] - regions[:, :2]).clamp(min=1e-3)
    # Average k x k bilinear samples per output pixel: close to area interpolation when
    # shrinking, without a Python loop over boxes.
    k = int(min(max_supersample, max(1, int(torch.ceil(extent.max() / size).item()))))
    samples = size * k
    steps = (torch.arange(samples, device=image.device, dtype=image.dtype) + 0.5) / samples
    xs = regions[:, 0:1] + steps[None, :] * extent[:, 0:1]
    ys = regions[:, 1:2] + steps[None, :] * extent[:, 1:2]
    grid_x = (2.0 * xs / width - 1.0)[:, None, :].expand(-1, samples, -1)
    grid_y = (2.0 * ys / height - 1.0)[:, :, None].expand(-1, -1, samples)
    # All crops' sample grids stacked into one tall grid: one grid_sample call, no image copies.
    grid = torch.stack([grid_x, grid_y], dim=-1).reshape(1, len(regions) * samples, samples, 2)
    crops = F.grid_sample(image, grid, mode="bilinear", padding_mode="border",
                          align_corners=False)
    crops = crops.reshape(channels, len(regions), samples, samples).transpose(0, 1)
    return F.avg_pool2d(crops, k) if k > 1 else crops.contiguous()
