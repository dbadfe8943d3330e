"""How many of the reference MTCNN's faces the project's cascade reproduces.

Reads the reference detections in ../shared/data/reference_mtcnn (facenet-pytorch 2.6.0, original
weights, min face 20) and runs FaceDetector with the same parameters on the same images. A reference
face with score >= 0.9 is reproduced when a detection has IoU >= 0.9 with it, a score within 0.01
and every landmark within 2 px.

    python benchmarks/reference_equivalence.py [--pyramid classic] [--precision fp32] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from mtcnn import FaceDetector
from mtcnn.box_coder import box_iou
from mtcnn.detector import PRECISIONS
from mtcnn.pyramid import PYRAMIDS

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = {
    "wider_face_val_dev": ("wider_face_val_dev.min20.jsonl", DATA / "wider_face_val_dev"),
    "cnn_facepoint_5pt_test": ("cnn_facepoint_5pt_test.min20.jsonl", DATA / "cnn_facepoint_5pt"),
}


def match_faces(reference: dict, found, min_score: float = 0.9) -> tuple[int, int, list[str]]:
    """Reference faces (score >= min_score) in one image, how many are reproduced, and why not."""
    ref_boxes = np.asarray(reference["boxes"], np.float32).reshape(-1, 4)
    ref_scores = np.asarray(reference["scores"], np.float32)
    ref_points = np.asarray(reference["landmarks"], np.float32).reshape(-1, 5, 2)
    wanted = np.flatnonzero(ref_scores >= min_score)
    if len(wanted) == 0:
        return 0, 0, []
    if len(found) == 0:
        return len(wanted), 0, ["missed"] * len(wanted)
    iou = box_iou(torch.from_numpy(ref_boxes[wanted]), torch.from_numpy(found.boxes)).numpy()
    reproduced, reasons = 0, []
    for row, index in enumerate(wanted):
        best = int(iou[row].argmax())
        point_error = np.linalg.norm(found.landmarks[best] - ref_points[index], axis=1).max()
        score_error = abs(float(found.scores[best]) - float(ref_scores[index]))
        if iou[row, best] < 0.9:
            reasons.append(f"iou {iou[row, best]:.3f}")
        elif score_error > 0.01:
            reasons.append(f"score {score_error:.4f}")
        elif point_error > 2.0:
            reasons.append(f"landmark {point_error:.2f}px")
        else:
            reproduced += 1
    return len(wanted), reproduced, reasons


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyramid", default="classic", choices=PYRAMIDS)
    parser.add_argument("--limit", type=int, default=None, help="images per set")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="the nets' arithmetic (bf16: how far reduced precision moves the faces)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    detector = FaceDetector(weights="reference", pyramid=args.pyramid, min_face_size=20, precision=args.precision,
                            thresholds=(0.6, 0.7, 0.7), scale_factor=0.709)
    for name, (jsonl, folder) in SETS.items():
        lines = (DATA / "reference_mtcnn" / jsonl).read_text().splitlines()[: args.limit]
        total = reproduced = 0
        failures: dict[str, int] = {}
        start = time.perf_counter()
        for number, line in enumerate(lines, 1):
            reference = json.loads(line)
            image = cv2.imread(str(folder / reference["path"]), cv2.IMREAD_COLOR)
            found = detector.detect([cv2.cvtColor(image, cv2.COLOR_BGR2RGB)])[0]
            count, ok, reasons = match_faces(reference, found)
            total, reproduced = total + count, reproduced + ok
            for reason in reasons:
                kind = reason.split()[0]
                failures[kind] = failures.get(kind, 0) + 1
                if args.verbose:
                    print(f"  {reference['path']}: {reason}")
            if number % 50 == 0:
                print(f"  {name}: {number}/{len(lines)} images", file=sys.stderr)
        seconds = time.perf_counter() - start
        rate = reproduced / total if total else float("nan")
        print(f"{name} ({args.pyramid}, {args.precision}): {reproduced}/{total} reference faces (score >= 0.9) "
              f"reproduced = {rate:.2%}; not reproduced by reason: {failures or 'none'}; "
              f"{len(lines)} images in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
