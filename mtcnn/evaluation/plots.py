"""Precision-recall curves drawn to a PNG with OpenCV (no plotting library needed)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

# BGR colours that stay apart for colour-blind readers (Okabe-Ito blue, orange, green, purple).
_COLOURS = [(178, 114, 0), (0, 159, 230), (115, 158, 0), (167, 121, 204), (0, 94, 213)]
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _text(canvas: np.ndarray, text: str, origin: tuple[int, int], scale: float = 0.5,
          colour=(0, 0, 0), anchor: str = "left") -> None:
    """Write `text` with its baseline at origin; anchor 'left', 'centre' or 'right'."""
    (width, _), _ = cv2.getTextSize(text, _FONT, scale, 1)
    x = origin[0] - {"left": 0, "centre": width // 2, "right": width}[anchor]
    cv2.putText(canvas, text, (x, origin[1]), _FONT, scale, colour, 1, cv2.LINE_AA)


def draw_pr_curves(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], title: str = "",
                   size: tuple[int, int] = (800, 640)) -> np.ndarray:
    """An image (H x W x 3, BGR) of precision-recall curves {name: (recall, precision, AP)}."""
    width, height = size
    canvas = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 80, 30, 50 if title else 25, 60
    plot_w, plot_h = width - left - right, height - top - bottom

    def to_pixels(recall: np.ndarray, precision: np.ndarray) -> np.ndarray:
        x = left + np.clip(recall, 0, 1) * plot_w
        y = top + (1 - np.clip(precision, 0, 1)) * plot_h
        return np.round(np.stack([x, y], axis=1)).astype(np.int32)

    for tick in np.linspace(0, 1, 11):
        x, y = to_pixels(np.array([tick]), np.array([tick]))[0]
        cv2.line(canvas, (x, top), (x, top + plot_h), (225, 225, 225), 1)
        cv2.line(canvas, (left, y), (left + plot_w, y), (225, 225, 225), 1)
        cv2.line(canvas, (x, top + plot_h), (x, top + plot_h + 5), (0, 0, 0), 1)
        cv2.line(canvas, (left - 5, y), (left, y), (0, 0, 0), 1)
        _text(canvas, f"{tick:.1f}", (x, top + plot_h + 22), 0.45, anchor="centre")
        _text(canvas, f"{tick:.1f}", (left - 9, y + 5), 0.45, anchor="right")
    cv2.rectangle(canvas, (left, top), (left + plot_w, top + plot_h), (0, 0, 0), 1)
    _text(canvas, "Recall", (left + plot_w // 2, height - 12), 0.6, anchor="centre")
    # A vertical axis label: write it on its own strip, then rotate the strip.
    label = np.full((30, 120, 3), 255, np.uint8)
    _text(label, "Precision", (60, 21), 0.6, anchor="centre")
    label = cv2.rotate(label, cv2.ROTATE_90_COUNTERCLOCKWISE)
    y0 = top + plot_h // 2 - label.shape[0] // 2
    canvas[y0:y0 + label.shape[0], 4:4 + label.shape[1]] = label
    if title:
        _text(canvas, title, (width // 2, 30), 0.65, anchor="centre")

    legend_rows = []
    for index, (name, (recall, precision, ap)) in enumerate(curves.items()):
        colour = _COLOURS[index % len(_COLOURS)]
        recall, precision = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
        shown = recall > 0  # thresholds above every score have no proposal and no point
        if shown.any():
            cv2.polylines(canvas, [to_pixels(recall[shown], precision[shown])], False, colour, 2, cv2.LINE_AA)
        legend_rows.append((f"{name}  AP {ap:.3f}", colour))
    # The legend sits bottom-left, where PR curves of a detector rarely run.
    row_h, box_w = 24, 210
    box_top = top + plot_h - 12 - row_h * len(legend_rows)
    cv2.rectangle(canvas, (left + 12, box_top - 8), (left + 12 + box_w, top + plot_h - 12), (0, 0, 0), 1)
    for row, (text, colour) in enumerate(legend_rows):
        y = box_top + row * row_h + row_h // 2
        cv2.line(canvas, (left + 22, y), (left + 52, y), colour, 3, cv2.LINE_AA)
        _text(canvas, text, (left + 62, y + 5), 0.5)
    return canvas


def save_pr_curves(path: str | os.PathLike, curves: dict[str, tuple[np.ndarray, np.ndarray, float]],
                   title: str = "") -> Path:
    """Draw precision-recall curves {name: (recall, precision, AP)} into a PNG file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), draw_pr_curves(curves, title)):
        raise OSError(f"could not write {path}")
    return path
