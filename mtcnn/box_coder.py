"""The box coder: IoU, the crop-window rule, and box / landmark targets to and from a window.

One module for the conventions training, inference and evaluation must share:

- Continuous coordinates: pixel i covers [i, i + 1). A *window* is an integer pixel-edge region
  (x1, y1, x2, y2) of an image: what a stage is shown, resized to its input size.
- The detector's boxes follow the original MTCNN's 1-based rule (its MATLAB heritage): a box
  (x1, y1, x2, y2) is cropped as the window (trunc(x1) - 1, trunc(y1) - 1, trunc(x2), trunc(y2)),
  and its size is x2 - x1 + 1 (`plus_one`). `box_of_window` is the integer box of a window.
- Targets are relative to the window: box offsets (target - window edge) / window size, landmarks
  (point - window origin) / window size as the five x then the five y. `encode_*` makes them
  (training samples), `decode_*` applies them (the detector); with the detector's `plus_one`
  the decoded box of an integer box is in the same 1-based rule, its landmarks continuous.
"""

from __future__ import annotations

import numpy as np
import torch

#: A horizontal flip turns the subject's left into image-right: left eye <-> right eye and
#: left mouth corner <-> right mouth corner (the nose stays).
LANDMARK_FLIP_ORDER = (1, 0, 2, 4, 3)


# -- overlap ----------------------------------------------------------------------------------

def box_iou(a, b, *, plus_one: bool = False, mode: str = "union"):
    """Overlap (N, M) of every box in a (N, 4) with every box in b (M, 4).

    mode "union" is IoU, "min" intersection over the smaller area; `plus_one` counts a box's
    size as x2 - x1 + 1 (the original MTCNN's NMS and the WIDER evaluation). Takes and returns
    torch tensors, or numpy arrays (and lists), computed in the wider of their float types
    (float64 for integers).
    """
    if isinstance(a, torch.Tensor):
        return _box_iou(a, b, plus_one, mode)
    a, b = _floats(a), _floats(b)
    dtype = np.result_type(a.dtype, b.dtype)
    return _box_iou(torch.from_numpy(a.astype(dtype, copy=False)),
                    torch.from_numpy(b.astype(dtype, copy=False)), plus_one, mode).numpy()


def _floats(boxes) -> np.ndarray:
    array = np.asarray(boxes)
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)
    return np.ascontiguousarray(array.reshape(-1, 4))


def _box_iou(a: torch.Tensor, b: torch.Tensor, plus_one: bool, mode: str) -> torch.Tensor:
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


# -- the crop-window rule ---------------------------------------------------------------------

def box_windows(boxes):
    """Integer windows (N, 4) the detector crops for boxes, unclipped (torch or numpy)."""
    if isinstance(boxes, torch.Tensor):
        whole = boxes.trunc()
        return torch.stack([whole[:, 0] - 1, whole[:, 1] - 1, whole[:, 2], whole[:, 3]], dim=1)
    whole = np.trunc(np.asarray(boxes, np.float64)).astype(np.int64).reshape(-1, 4)
    return np.stack([whole[:, 0] - 1, whole[:, 1] - 1, whole[:, 2], whole[:, 3]], axis=1)


def box_of_window(windows):
    """The integer boxes whose crop window is exactly each window: the inverse of box_windows."""
    shift = [1, 1, 0, 0]
    if isinstance(windows, torch.Tensor):
        return windows + torch.tensor(shift, dtype=windows.dtype, device=windows.device)
    return np.asarray(windows) + np.asarray(shift)


def crop_regions(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The detector's crop windows (N, 4) of boxes, clipped to a width x height image.

    A box wholly outside the image keeps an in-bounds (empty or 1-pixel) region; the detector
    drops empty ones. The clipped region is stretched to the stage's input size (training crops
    instead pad the outside with zeros: jobs/training/samples.py).
    """
    windows = box_windows(boxes)
    x1 = windows[:, 0].clamp(min=0, max=width - 1)
    y1 = windows[:, 1].clamp(min=0, max=height - 1)
    x2 = windows[:, 2].clamp(max=width)
    y2 = windows[:, 3].clamp(max=height)
    return torch.stack([x1, y1, x2, y2], dim=1)


# -- targets ----------------------------------------------------------------------------------

def encode_boxes(boxes: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """Offsets (N, 4) of each box's sides from its window's, over the window width / height."""
    windows = np.asarray(windows, np.float64)
    size = np.concatenate([windows[:, 2:] - windows[:, :2]] * 2, axis=1)
    return ((np.asarray(boxes, np.float64) - windows) / size).astype(np.float32)


def decode_boxes(boxes: torch.Tensor, offsets: torch.Tensor, plus_one: bool) -> torch.Tensor:
    """Boxes (N, 4) moved by regression offsets relative to their size (plus_one: x2 - x1 + 1)."""
    one = 1.0 if plus_one else 0.0
    width = boxes[:, 2] - boxes[:, 0] + one
    height = boxes[:, 3] - boxes[:, 1] + one
    size = torch.stack([width, height, width, height], dim=1)
    return boxes + offsets * size


def encode_landmarks(landmarks: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """Points (N, 5, 2) relative to their windows, as (N, 10): the five x, then the five y."""
    windows = np.asarray(windows, np.float64)
    origin = windows[:, None, :2]
    size = (windows[:, 2:] - windows[:, :2])[:, None, :]
    relative = (np.asarray(landmarks, np.float64) - origin) / size
    return np.concatenate([relative[:, :, 0], relative[:, :, 1]], axis=1).astype(np.float32)


def decode_landmarks(boxes: torch.Tensor, points: torch.Tensor, plus_one: bool) -> torch.Tensor:
    """Points (N, 5, 2) in the image from (N, 10) targets relative to boxes (or windows).

    With plus_one (the detector's boxes) the window is the box's crop window: its origin is
    x1 - 1, y1 - 1 and its size x2 - x1 + 1.
    """
    one = 1.0 if plus_one else 0.0
    size = boxes[:, 2:] - boxes[:, :2] + one
    return torch.stack([points[:, :5], points[:, 5:]], dim=2) * size[:, None, :] \
        + boxes[:, None, :2] - one


def flip_targets(boxes: torch.Tensor, landmarks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Box (N, 4) and landmark (N, 10) targets of crops mirrored left-right inside their windows."""
    # Box targets are (gt - window edge) / window size. Mirroring inside the window maps the
    # face's right edge to its left one: x1' = -x2, x2' = -x1; rows are unchanged.
    boxes = torch.stack([-boxes[:, 2], boxes[:, 1], -boxes[:, 0], boxes[:, 3]], dim=1)
    # Landmarks are the five x then the five y, as fractions of the window: x' = 1 - x, and the
    # image-left and image-right points trade places.
    order = torch.as_tensor(LANDMARK_FLIP_ORDER, device=landmarks.device)
    landmarks = torch.cat([1.0 - landmarks[:, :5][:, order], landmarks[:, 5:][:, order]], dim=1)
    return boxes, landmarks
