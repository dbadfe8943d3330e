"""Evaluation: the WIDER FACE protocol, landmark error, and precision-recall pictures."""

from .landmarks import LandmarkResult, evaluate_landmarks, landmark_nme, match_faces
from .plots import draw_pr_curves, save_pr_curves
from .wider import (SETTINGS, PrecisionRecall, WiderGroundTruth, WiderResult, evaluate_wider,
                    load_wider_ground_truth, match_image, voc_ap)

__all__ = [
    "LandmarkResult", "PrecisionRecall", "SETTINGS", "WiderGroundTruth", "WiderResult", "draw_pr_curves",
    "evaluate_landmarks", "evaluate_wider", "landmark_nme", "load_wider_ground_truth", "match_faces",
    "match_image", "save_pr_curves", "voc_ap",
]
