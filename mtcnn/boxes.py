"""Box arithmetic for the cascade: NMS, squaring and crop-resize, all in torch (the box coder: box_coder.py)."""

from __future__ import annotations

import functools

import cv2
import numpy as np
import torch

from .box_coder import box_iou

# Overlaps are computed a block of rows at a time so memory stays bounded however many boxes.
_NMS_BLOCK = 1024


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
                threshold: float, mode: str = "union", plus_one: bool = False) -> torch.Tensor:
    """Indices kept by greedy NMS run separately per group, ordered by group then score."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    keep = None
    # The grid search leaves out boxes that do not touch: right only where their overlap (0)
    # cannot pass the threshold, and where every coordinate and score is finite.
    if boxes.device.type == "cpu" and boxes.dtype in (torch.float32, torch.float64) and threshold >= 0:
        keep = _grid_nms(boxes, scores, groups, threshold, mode, plus_one)
    return keep if keep is not None else masked_nms(boxes, scores, groups, threshold, mode, plus_one)


def _grid_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, threshold: float,
              mode: str, plus_one: bool) -> torch.Tensor | None:
    """masked_nms's result on the CPU through compiled loops that compare each box only with the
    kept boxes near it: on a crowded 1080p frame's P-Net windows (19,645 in 9 levels) 5 ms
    where OpenCV's NMSBoxes, comparing with every kept box, took 181 ms; about 20 us on a few
    boxes. None where a box or score is not finite."""
    score_array = scores.numpy()
    if not np.isfinite(score_array).all():
        return None
    # masked_nms's order in numpy (fewer calls, which is most of the time on a few boxes).
    group_array = groups.numpy()
    order = np.lexsort((-score_array, group_array))
    starts = np.concatenate([[0], np.flatnonzero(np.diff(group_array[order])) + 1, [len(order)]])
    sorted_boxes = boxes.numpy()[order]
    # Constants in the boxes' own float type: the same arithmetic as box_iou on these tensors.
    real = sorted_boxes.dtype.type
    keep = np.zeros(len(order), dtype=bool)
    if not _compiled(_greedy_nms_loops)(sorted_boxes, starts, real(threshold), real(1.0 if plus_one else 0.0),
                                        real(1e-12), mode == "min", keep):
        return None
    return torch.from_numpy(order[keep])


def _greedy_nms_loops(boxes, starts, limit, one, tiny, min_mode, keep):
    """Greedy NMS over (N, 4) float boxes sorted by group, then best score first.

    starts: offsets of each group's first box (and N at the end). keep[i] becomes whether box i
    survives. Returns False, deciding nothing, where a coordinate is not finite. The same overlap
    arithmetic as box_coder.box_iou in the boxes' float type and the same `overlap > threshold`
    rule as the sequential definition, so the same boxes kept; each box is compared only with
    the kept boxes of its group in the grid cells near it, not with all of them.
    """
    count = boxes.shape[0]
    following = np.full(count, -1, np.int64)  # next kept box in the same cell: linked lists
    for g in range(starts.shape[0] - 1):
        first, stop = starts[g], starts[g + 1]
        # Boxes with no area never overlap anything (box_iou gives them 0): kept, out of the grid.
        side, low_x, low_y, high_x, high_y = 1.0, np.inf, np.inf, -np.inf, -np.inf
        for i in range(first, stop):
            for k in range(4):
                if not np.isfinite(boxes[i, k]):
                    return False
            width = boxes[i, 2] - boxes[i, 0] + one
            height = boxes[i, 3] - boxes[i, 1] + one
            if width > 0 and height > 0:
                side = max(side, float(width), float(height))
                low_x, low_y = min(low_x, float(boxes[i, 0])), min(low_y, float(boxes[i, 1]))
                high_x, high_y = max(high_x, float(boxes[i, 0])), max(high_y, float(boxes[i, 1]))
        if low_x > high_x:
            keep[first:stop] = True
            continue
        # A cell per box side (boxes of one pyramid level are all one size), at most 512 a side.
        cell = max(side, (high_x - low_x) / 512.0, (high_y - low_y) / 512.0)
        columns = int((high_x - low_x) / cell) + 1
        rows = int((high_y - low_y) / cell) + 1
        head = np.full(columns * rows, -1, np.int64)
        # A kept box can overlap box i only if its left edge lies less than a box side left of
        # i's, or left of i's right edge (plus the 1-pixel rule): those cells, with a margin
        # for the float rounding of coordinates this large, are searched.
        margin = 2.0 + 1e-5 * max(abs(low_x), abs(low_y), abs(high_x) + side, abs(high_y) + side)
        reach = side + margin
        for i in range(first, stop):
            x1, y1, x2, y2 = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3]
            if not (x2 - x1 + one > 0 and y2 - y1 + one > 0):
                keep[i] = True
                continue
            area = (x2 - x1 + one) * (y2 - y1 + one)
            survives = True
            c0 = max(int((x1 - reach - low_x) / cell), 0)
            c1 = min(int((x2 + margin - low_x) / cell), columns - 1)
            r0 = max(int((y1 - reach - low_y) / cell), 0)
            r1 = min(int((y2 + margin - low_y) / cell), rows - 1)
            for r in range(r0, r1 + 1):
                for c in range(c0, c1 + 1):
                    j = head[r * columns + c]
                    while j >= 0:
                        width = min(x2, boxes[j, 2]) - max(x1, boxes[j, 0]) + one
                        height = min(y2, boxes[j, 3]) - max(y1, boxes[j, 1]) + one
                        if width > 0 and height > 0:
                            inter = width * height
                            other = (boxes[j, 2] - boxes[j, 0] + one) * (boxes[j, 3] - boxes[j, 1] + one)
                            if min_mode:
                                overlap = inter / max(min(area, other), tiny)
                            else:
                                overlap = inter / max(area + other - inter, tiny)
                            if overlap > limit:
                                survives = False
                                break
                        j = following[j]
                    if not survives:
                        break
                if not survives:
                    break
            keep[i] = survives
            if survives:
                index = int((y1 - low_y) / cell) * columns + int((x1 - low_x) / cell)
                following[i] = head[index]
                head[index] = i
    return True


def masked_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
               threshold: float, mode: str = "union", plus_one: bool = False) -> torch.Tensor:
    """Greedy NMS per group: overlap masks on the boxes' device, one scan of them on the host."""
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    sorted_boxes, sorted_groups = boxes[order], groups[order]
    count = len(order)
    removed = np.zeros(count, dtype=bool)
    kept: list[int] = []
    for start in range(0, count, _NMS_BLOCK):
        stop = min(start + _NMS_BLOCK, count)
        # Which later box of the same group each box of this block would suppress.
        overlap = box_iou(sorted_boxes[start:stop], sorted_boxes[start:], plus_one=plus_one, mode=mode)
        same = sorted_groups[start:stop, None] == sorted_groups[None, start:]
        rows = ((overlap > threshold) & same).cpu().numpy()  # one transfer per block
        for offset in range(stop - start):
            index = start + offset
            if removed[index]:
                continue
            kept.append(index)
            removed[start:] |= rows[offset]
    return order[torch.tensor(kept, dtype=torch.long, device=boxes.device)]


def square(boxes: torch.Tensor) -> torch.Tensor:
    """Grow (N, 4) boxes to squares of their longer side around the same centre."""
    width = boxes[:, 2] - boxes[:, 0]
    height = boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(width, height)
    x1 = boxes[:, 0] + width * 0.5 - side * 0.5
    y1 = boxes[:, 1] + height * 0.5 - side * 0.5
    return torch.stack([x1, y1, x1 + side, y1 + side], dim=1)


def integral_image(image: torch.Tensor) -> torch.Tensor:
    """Summed-area table (H+1, W+1, C) of an H x W x C uint8 image, exact in integers."""
    height, width, channels = image.shape
    # int32 holds every sum of an image up to about 8 megapixels; larger ones need int64.
    dtype = torch.int32 if height * width * 255 < 2**31 else torch.int64
    table = torch.zeros((height + 1, width + 1, channels), dtype=dtype, device=image.device)
    table[1:, 1:] = image.to(dtype).cumsum(0).cumsum(1)
    return table


def host_integral_image(image: np.ndarray) -> torch.Tensor:
    """Summed-area table (H+1, W+1, 4) of an RGB uint8 image on the CPU: the fast way to make one.

    OpenCV's integral is several times faster than two torch cumsums. A fourth (unused) channel
    makes each pixel's sums 16 bytes, which crop_resize reads faster; pass channels=3 to it.
    Images over about 8 megapixels overflow int32: use integral_image for those.
    """
    rgba = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2RGBA)
    return torch.from_numpy(cv2.integral(rgba, sdepth=cv2.CV_32S))


def _area_bins(start: torch.Tensor, length: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer [begin, end) of each of size output bins over [start, start + length)."""
    index = torch.arange(size, device=start.device, dtype=torch.long)
    begin = start[:, None] + (index[None, :] * length[:, None]) // size
    end = start[:, None] + ((index[None, :] + 1) * length[:, None] + size - 1) // size
    return begin, end


def _pixel_reader(table: torch.Tensor):
    """A function returning the table's pixels (rows of its last dimension) at flat indices."""
    channels = table.shape[2]
    flat = table.reshape(-1, channels)
    if table.device.type == "cpu" and table.dtype == torch.int32 and channels == 4:
        # Four int32 sums are 16 bytes: read each pixel as one complex128 element. torch gathers
        # single elements about twice as fast as it gathers short rows.
        packed = flat.view(torch.complex128).reshape(-1)
        return lambda index: packed.index_select(0, index).view(torch.int32).reshape(-1, channels)
    return lambda index: flat.index_select(0, index)


def _area_resize_loops(table: np.ndarray, regions: np.ndarray, out: np.ndarray, first_row: int,
                       full_height: int) -> None:
    """Area-resize as plain loops: out (N, H', W', C) from an (H+1, W+1, >= C) table's regions.

    out holds rows [first_row, first_row + H') of resizes full_height rows high (a band of a
    pyramid level; crops are whole: first_row 0, full_height H').
    The same bins, the same integer sums and the same float32 division as the tensor forms
    (crop_resize's and pyramid.resize_from_table's), so the same values bit for bit; 2.5x to
    3.5x faster on CPUs, where the tensor forms spend their time building and gathering index
    tensors. nogil: window chunks and pyramid levels run in parallel.
    """
    height, width, channels = out.shape[1], out.shape[2], out.shape[3]
    # Unsigned indices: numba then skips its negative-index checks in the inner loops.
    rows0, rows1 = np.empty(height, np.uint64), np.empty(height, np.uint64)
    cols0, cols1 = np.empty(width, np.uint64), np.empty(width, np.uint64)
    # A 4-lane table (host_integral_image's) is summed 4 lanes at a time, a vector's width
    # the compiler can see, and the first channels stored: 15-25% faster than lane by lane.
    four_lanes = table.shape[2] == 4 and channels <= 4
    pixel = np.empty(4, np.float32)
    for n in range(regions.shape[0]):
        left, top = regions[n, 0], regions[n, 1]
        span_x, span_y = max(regions[n, 2] - left, 1), max(regions[n, 3] - top, 1)
        for i in range(height):
            row = i + first_row
            rows0[i] = top + (row * span_y) // full_height
            rows1[i] = top + ((row + 1) * span_y + full_height - 1) // full_height
        for j in range(width):
            cols0[j] = left + (j * span_x) // width
            cols1[j] = left + ((j + 1) * span_x + width - 1) // width
        for i in range(height):
            upper, lower = table[rows0[i]], table[rows1[i]]
            for j in range(width):
                c0, c1 = cols0[j], cols1[j]
                area = np.float32((rows1[i] - rows0[i]) * (c1 - c0))
                if four_lanes:
                    for c in range(4):
                        pixel[c] = np.float32(lower[c1, c] - upper[c1, c] - lower[c0, c] + upper[c0, c]) / area
                    for c in range(channels):
                        out[n, i, j, c] = pixel[c]
                else:
                    for c in range(channels):
                        total = lower[c1, c] - upper[c1, c] - lower[c0, c] + upper[c0, c]
                        out[n, i, j, c] = np.float32(total) / area


def area_resize_host(table: np.ndarray, regions: np.ndarray, height: int, width: int,
                     channels: int, rows: tuple[int, int] | None = None) -> np.ndarray:
    """(N, height, width, channels) float32 area resizes of integer pixel-edge regions (N, 4)
    of the image behind a CPU summed-area table (H+1, W+1, >= channels); regions inside it.
    rows: only output rows [first, stop) of the resizes, (N, stop - first, width, channels)."""
    first, stop = rows or (0, height)
    out = np.empty((len(regions), stop - first, width, channels), np.float32)
    _compiled(_area_resize_loops)(table, np.ascontiguousarray(regions, dtype=np.int64), out, first, height)
    return out


@functools.cache
def _compiled(loops):
    """A loop function of this module compiled by numba, on first use: a process that never
    crops or runs NMS (a job's driver) does not load numba and LLVM (about 50 MB). nogil: the
    detector's threads run them in parallel."""
    import numba

    try:  # compiled once per machine where numba can keep its cache (next to this file, or the user's)
        return numba.njit(nogil=True, cache=True)(loops)
    except RuntimeError:  # nowhere writable: compiled in each process instead (under a second)
        return numba.njit(nogil=True)(loops)


def _regions_inside(table: torch.Tensor, regions: torch.Tensor) -> bool:
    """Whether every region's bins stay inside the table (crop_regions' promise): the loops do
    not check their reads, and the tensor form's flat indices would wrap into other rows."""
    height, width = table.shape[0] - 1, table.shape[1] - 1
    # Two reductions and one transfer per chunk, not one per bound: this runs for every chunk.
    low, high = (values.tolist() for values in regions.aminmax(dim=0))
    return min(low[:2]) >= 0 and high[0] < width and high[1] < height and high[2] <= width and high[3] <= height


def crop_resize(table: torch.Tensor, regions: torch.Tensor, size: int,
                channels: int | None = None) -> torch.Tensor:
    """Area-resize pixel-edge regions of an image, given its summed-area table, to (N, C, size, size).

    C is the table's channel count, or its first `channels` (a table may carry a padding lane).
    On the CPU the result's memory is channels-last.
    """
    channels = channels or table.shape[2]
    if len(regions) == 0:
        return torch.zeros((0, channels, size, size), device=table.device)
    whole = regions.long()
    if not _regions_inside(table, whole):
        raise ValueError(f"crop regions must lie inside the {table.shape[1] - 1} x {table.shape[0] - 1} image "
                         "(clip them with mtcnn.box_coder.crop_regions)")
    if table.device.type == "cpu":
        crops = area_resize_host(table.numpy(), whole.numpy(), size, size, channels)
        return torch.from_numpy(crops).permute(0, 3, 1, 2)
    return _crop_resize_tensors(table, whole, size, channels)


def _crop_resize_tensors(table: torch.Tensor, whole: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """crop_resize with tensor operations, on any device (regions as integers)."""
    # Each output pixel is the mean of its bin: the same bins as adaptive average pooling
    # ("area" interpolation), read from the summed-area table with four lookups.
    rows0, rows1 = _area_bins(whole[:, 1], (whole[:, 3] - whole[:, 1]).clamp(min=1), size)
    cols0, cols1 = _area_bins(whole[:, 0], (whole[:, 2] - whole[:, 0]).clamp(min=1), size)
    # Lookups by flat index are much faster than 2-D fancy indexing.
    read = _pixel_reader(table)
    stride = table.shape[1]
    top, bottom = (rows0 * stride)[:, :, None], (rows1 * stride)[:, :, None]
    left, right = cols0[:, None, :], cols1[:, None, :]
    sums = (read((bottom + right).reshape(-1)) - read((top + right).reshape(-1))
            - read((bottom + left).reshape(-1)) + read((top + left).reshape(-1)))
    area = ((rows1 - rows0)[:, :, None] * (cols1 - cols0)[:, None, :]).reshape(-1, 1)
    crops = (sums[:, :channels].float() / area.float()).reshape(len(whole), size, size, channels)
    return crops.permute(0, 3, 1, 2)
