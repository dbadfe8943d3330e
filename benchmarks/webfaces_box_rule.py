"""Fit the point -> box rules on faces whose boxes are known, and check them on held-out faces.

    python benchmarks/webfaces_box_rule.py [--skip-detector]

Caltech WebFaces gives eyes, nose and mouth centre but no box. The 5-point set (cnn_facepoint_5pt)
gives boxes and five points; its mouth centre is the mean of the mouth corners. The rule
(`mtcnn.annotations.PointBoxRule`) is fitted on the train list as medians and checked on the test list.

The same fit against the reference cascade's squared R-Net windows on those faces (the windows
O-Net is handed at detection time) gives `DETECTOR_WINDOW_RULE`, around which training draws
landmark samples (`SampleConfig.landmark_windows`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mtcnn.annotations import (DETECTOR_WINDOW_RULE, WEBFACES_BOX_RULE, PointBoxRule, box_from_points,
                               read_facepoint_list)

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


def detector_windows(list_file: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The reference cascade's R-Net windows matched to the faces of a 5-point list, with their points."""
    import cv2
    import torch

    from mtcnn import FaceDetector
    from mtcnn.evaluation.landmarks import match_faces

    torch.set_num_threads(2)
    detector = FaceDetector()
    windows, points = [], []
    for annotation in read_facepoint_list(list_file):
        image = cv2.cvtColor(cv2.imread(annotation.path), cv2.COLOR_BGR2RGB)
        proposals = detector.propose([image], up_to="rnet")[0]
        match = match_faces(proposals.boxes, annotation.boxes, 0.3)
        if match[0] >= 0:
            windows.append(proposals.boxes[match[0]])
            points.append(annotation.landmarks[0])
    windows, points = np.asarray(windows, np.float64), np.asarray(points, np.float64)
    return windows, points[:, 0], points[:, 1], (points[:, 3] + points[:, 4]) / 2


def report(title: str, rule: PointBoxRule, in_use: PointBoxRule, name: str, train, test) -> None:
    """The fitted rule, the one in use, and the IoU of its boxes with the target boxes on both lists."""
    print(f"{title}, fitted on {len(train[0])} train faces: centre_along_axis {rule.centre_along_axis:.4f}, "
          f"side_scale {rule.side_scale:.4f}")
    print(f"  in use ({name}): centre_along_axis {in_use.centre_along_axis}, side_scale {in_use.side_scale}")
    for part, (boxes, left_eye, right_eye, mouth) in (("train", train), ("test", test)):
        overlap = iou(box_from_points(left_eye, right_eye, mouth, in_use), boxes)
        print(f"  {part:5s} {len(boxes)} faces: IoU median {np.median(overlap):.3f}, 10th percentile "
              f"{np.percentile(overlap, 10):.3f}, >= 0.7 {np.mean(overlap >= 0.7):.1%}, "
              f">= 0.5 {np.mean(overlap >= 0.5):.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-detector", action="store_true", help="only the annotated-box rule")
    args = parser.parse_args()
    train, test = faces(DATA / "trainImageList.txt"), faces(DATA / "testImageList.txt")
    report("annotated boxes", fit(*train), WEBFACES_BOX_RULE, "WEBFACES_BOX_RULE", train, test)
    if not args.skip_detector:
        train, test = detector_windows(DATA / "trainImageList.txt"), detector_windows(DATA / "testImageList.txt")
        report("reference R-Net windows", fit(*train), DETECTOR_WINDOW_RULE, "DETECTOR_WINDOW_RULE", train, test)


if __name__ == "__main__":
    main()
