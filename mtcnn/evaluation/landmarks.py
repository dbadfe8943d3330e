"""Landmark error: mean point distance over the inter-ocular distance (NME), for a detector's faces."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..box_coder import box_iou


def landmark_nme(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per face (N,), the mean distance of the known points over the distance between the eye centres.

    Points are (N, 5, 2) in the order left eye, right eye, nose, left and right mouth corner; a
    NaN point in `truth` is unknown and left out of that face's mean.
    """
    predicted = np.asarray(predicted, np.float64).reshape(-1, 5, 2)
    truth = np.asarray(truth, np.float64).reshape(-1, 5, 2)
    if predicted.shape != truth.shape:
        raise ValueError(f"predicted {predicted.shape} and true {truth.shape} landmarks differ in shape")
    interocular = np.linalg.norm(truth[:, 1] - truth[:, 0], axis=1)
    if not (np.isfinite(interocular) & (interocular > 0)).all():
        raise ValueError("every true face needs both eye centres, at distinct positions, to normalise the error")
    distances = np.linalg.norm(predicted - truth, axis=2)  # (N, 5); NaN where the truth is unknown
    known = np.isfinite(truth).all(axis=2)
    if not np.isfinite(predicted[known]).all():
        raise ValueError("predicted landmarks must be finite numbers where the truth is known")
    return np.nansum(np.where(known, distances, np.nan), axis=1) / known.sum(axis=1) / interocular


def match_faces(detected_boxes: np.ndarray, true_boxes: np.ndarray, iou_threshold: float = 0.5) -> np.ndarray:
    """For each true face (M,), the index of the detection with the highest IoU >= threshold, or -1."""
    detected_boxes = np.asarray(detected_boxes, np.float64).reshape(-1, 4)
    true_boxes = np.asarray(true_boxes, np.float64).reshape(-1, 4)
    if len(detected_boxes) == 0 or len(true_boxes) == 0:
        return np.full(len(true_boxes), -1, np.int64)
    overlaps = box_iou(true_boxes, detected_boxes)
    best = overlaps.argmax(axis=1)
    return np.where(overlaps[np.arange(len(true_boxes)), best] >= iou_threshold, best, -1)


@dataclass
class LandmarkResult:
    """Landmark error over a set of annotated faces; faces the detector missed are counted apart."""

    nme: np.ndarray          # per matched face
    num_faces: int           # annotated faces
    num_missed: int          # annotated faces with no detection at IoU >= the threshold
    failure_threshold: float = 0.1

    @property
    def mean_nme(self) -> float:
        """Mean NME over the matched faces (NaN when none matched)."""
        return float(self.nme.mean()) if len(self.nme) else float("nan")

    @property
    def median_nme(self) -> float:
        """Median NME over the matched faces (NaN when none matched)."""
        return float(np.median(self.nme)) if len(self.nme) else float("nan")

    @property
    def miss_rate(self) -> float:
        """Fraction of annotated faces that no detection matched."""
        return self.num_missed / self.num_faces if self.num_faces else float("nan")

    @property
    def failure_rate(self) -> float:
        """Fraction of matched faces whose NME exceeds `failure_threshold`."""
        return float((self.nme > self.failure_threshold).mean()) if len(self.nme) else float("nan")

    def as_dict(self) -> dict:
        """The summary figures as plain numbers (for JSON)."""
        return {"mean_nme": self.mean_nme, "median_nme": self.median_nme, "failure_rate": self.failure_rate,
                "failure_threshold": self.failure_threshold, "num_faces": self.num_faces,
                "num_matched": int(len(self.nme)), "num_missed": self.num_missed, "miss_rate": self.miss_rate}


def evaluate_landmarks(detections: list[tuple[np.ndarray, np.ndarray]],
                       truths: list[tuple[np.ndarray, np.ndarray]], iou_threshold: float = 0.5,
                       failure_threshold: float = 0.1) -> LandmarkResult:
    """Landmark error of detections [(boxes (N,4), landmarks (N,5,2))] against truths [(boxes, landmarks)], per image.

    Each true face takes the detection with the highest IoU >= `iou_threshold`; a face without one
    counts as missed, never silently dropped.
    """
    if len(detections) != len(truths):
        raise ValueError(f"{len(detections)} images of detections but {len(truths)} of annotations")
    errors, num_faces, num_missed = [], 0, 0
    for (boxes, landmarks), (true_boxes, true_landmarks) in zip(detections, truths):
        match = match_faces(boxes, true_boxes, iou_threshold)
        num_faces += len(match)
        num_missed += int((match < 0).sum())
        found = match >= 0
        if found.any():
            predicted = np.asarray(landmarks, np.float64).reshape(-1, 5, 2)[match[found]]
            errors.append(landmark_nme(predicted, np.asarray(true_landmarks).reshape(-1, 5, 2)[found]))
    nme = np.concatenate(errors) if errors else np.zeros(0)
    return LandmarkResult(nme, num_faces, num_missed, failure_threshold)
