"""Fit the WebFaces point -> box rule on faces whose boxes are known, and check it on held-out faces.

    python benchmarks/webfaces_box_rule.py

Caltech WebFaces gives eyes, nose and mouth centre but no box. The 5-point set (cnn_facepoint_5pt)
gives boxes and five points; its mouth centre is the mean of the mouth corners. The rule
(`mtcnn.annotations.PointBoxRule`) is fitted on the train list as medians and checked on the test list.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mtcnn.annotations import WEBFACES_BOX_RULE, PointBoxRule, box_from_points, read_facepoint_list

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cnn_facepoint_5pt"


def faces(list_file: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """True boxes, left eyes, right eyes and mouth centres of every face of a 5-point list."""
    images = read_facepoint_list(list_file)
    boxes = np.concatenate([a.boxes for a in images]).astype(np.float64)
    points = np.concatenate([a.landmarks for a in images]).astype(np.float64)
    return boxes, points[:, 0], points[:, 1], (points[:, 3] + points[:, 4]) / 2


def fit(boxes, left_eye, right_eye, mouth_centre) -> PointBoxRule:
    """Median centre position along the eye-to-mouth axis and median side over the face scale."""
    eye_mid = (left_eye + right_eye) / 2
    axis = mouth_centre - eye_mid
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    along = ((centre - eye_mid) * axis).sum(axis=1) / (axis * axis).sum(axis=1)
    scale = np.hypot(np.linalg.norm(right_eye - left_eye, axis=1), np.linalg.norm(axis, axis=1))
    side = ((boxes[:, 2] - boxes[:, 0]) + (boxes[:, 3] - boxes[:, 1])) / 2
    return PointBoxRule(centre_along_axis=float(np.median(along)), side_scale=float(np.median(side / scale)))


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of two (N, 4) box arrays."""
    inter = (np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
             * np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None))
    area = lambda box: (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def main() -> None:
    train, test = faces(DATA / "trainImageList.txt"), faces(DATA / "testImageList.txt")
    fitted = fit(*train)
    print(f"fitted on {len(train[0])} train faces: centre_along_axis {fitted.centre_along_axis:.4f}, "
          f"side_scale {fitted.side_scale:.4f}")
    print(f"in use (WEBFACES_BOX_RULE): centre_along_axis {WEBFACES_BOX_RULE.centre_along_axis}, "
          f"side_scale {WEBFACES_BOX_RULE.side_scale}")
    for name, (boxes, left_eye, right_eye, mouth) in (("train", train), ("test", test)):
        overlap = iou(box_from_points(left_eye, right_eye, mouth, WEBFACES_BOX_RULE), boxes)
        print(f"{name:5s} {len(boxes)} faces: IoU median {np.median(overlap):.3f}, 10th percentile "
              f"{np.percentile(overlap, 10):.3f}, >= 0.7 {np.mean(overlap >= 0.7):.1%}, "
              f">= 0.5 {np.mean(overlap >= 0.5):.1%}")


if __name__ == "__main__":
    main()
