"""Landmark error of a cascade's O-Net in three frames: its own detections, the reference's windows, the list's boxes.

    python benchmarks/landmark_frame.py [--weights reference,shared-data-recipe] [--every 4] [--list FILE]

On the 5-point test list (every --every-th face), per cascade:
- "cascade": the landmarks of its full detection (what `mtcnn-jobs evaluate --landmarks` scores);
- "reference windows": its O-Net on the reference cascade's squared R-Net windows of the face;
- "list boxes": its O-Net on the list's annotated boxes, squared.
An O-Net whose error grows from the list's boxes to the detector's windows learned its landmarks
in a frame it is not handed at detection time (see SampleConfig.landmark_windows). Given the
train list (--list), the gap between its figures and the test list's is how far O-Net learned its
training faces by heart.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import torch

from mtcnn import FaceDetector
from mtcnn.annotations import read_facepoint_list
from mtcnn.box_coder import decode_landmarks
from mtcnn.boxes import square
from mtcnn.detector import _ImageSources
from mtcnn.evaluation.landmarks import landmark_nme, match_faces

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TEST_LIST = SHARED / "cnn_facepoint_5pt" / "testImageList.txt"


def onet_landmarks(detector: FaceDetector, image: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """The detector's O-Net landmarks (N, 5, 2) for windows (N, 4) of one image, squared as the cascade does."""
    sources = _ImageSources([image], detector.device, detector.device.type == "cpu")
    boxes = square(torch.as_tensor(np.asarray(windows, np.float32).reshape(-1, 4)))
    crops, _ = sources.crops(boxes, torch.zeros(len(boxes), dtype=torch.long), 48)
    with torch.inference_mode():
        _, _, points = detector._nets["onet"](crops)
    return decode_landmarks(boxes, points, plus_one=True).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="reference,shared-data-recipe",
                        help="cascades to compare, comma-separated (bundled names, files or run folders)")
    parser.add_argument("--every", type=int, default=4, help="take every N-th face of the test list")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--list", type=Path, default=TEST_LIST, help="5-point list to score on")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faces = read_facepoint_list(args.list)[:: args.every]
    reference = FaceDetector(weights="reference")
    windows = []  # the reference's R-Net window of each face, or None
    for face in faces:
        image = cv2.cvtColor(cv2.imread(face.path), cv2.COLOR_BGR2RGB)
        proposals = reference.propose([image], up_to="rnet")[0]
        match = match_faces(proposals.boxes, face.boxes, 0.3)[0]
        windows.append(proposals.boxes[match] if match >= 0 else None)
    print(f"{len(faces)} faces of {args.list.name}; NME (mean distance over the inter-ocular distance), mean:")
    print(f"{'weights':28s} {'cascade':>9s} {'reference windows':>18s} {'list boxes':>11s}")
    for weights in args.weights.split(","):
        detector = reference if weights == "reference" else FaceDetector(weights=weights)
        errors = {"cascade": [], "windows": [], "list": []}
        for face, window in zip(faces, windows):
            image = cv2.cvtColor(cv2.imread(face.path), cv2.COLOR_BGR2RGB)
            truth = face.landmarks[:1]
            found = detector.detect([image])[0]
            match = match_faces(found.boxes, face.boxes)[0]
            if match >= 0:
                errors["cascade"].append(landmark_nme(found.landmarks[match][None], truth)[0])
            if window is not None:
                errors["windows"].append(landmark_nme(onet_landmarks(detector, image, window), truth)[0])
            errors["list"].append(landmark_nme(onet_landmarks(detector, image, face.boxes[:1]), truth)[0])
        print(f"{weights:28s} {np.mean(errors['cascade']):9.4f} {np.mean(errors['windows']):18.4f} "
              f"{np.mean(errors['list']):11.4f}   ({len(errors['cascade'])} faces detected)")


if __name__ == "__main__":
    main()
