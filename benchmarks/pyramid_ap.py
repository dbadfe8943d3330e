"""WIDER AP (easy / medium / hard) of the classic vs the dynamic pyramid, reference weights.

    python benchmarks/pyramid_ap.py [--min-face-size 20] [--limit N]

The dynamic pyramid (each level resized from the previous one) should cost no accuracy: the goal
is |AP dynamic - AP classic| <= 0.005 in every setting.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from jobs.evaluate import InProcessDetection, evaluate_wider_folder
from mtcnn import FaceDetector
from mtcnn.evaluation import SETTINGS, evaluate_wider, load_wider_ground_truth

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GOAL = 0.005


def reference_ap(folder: Path, jsonl: Path) -> dict[str, float]:
    """AP of the reference implementation's stored detections (facenet-pytorch, min face 20)."""
    ground_truth = load_wider_ground_truth(folder)
    detections = {}
    with open(jsonl) as stream:
        for line in stream:
            row = json.loads(line)
            boxes = np.array(row["boxes"], np.float64).reshape(-1, 4)
            # The reference writes a score of NaN for an image without faces.
            detections[row["path"].removeprefix("images/")] = (boxes, np.array(row["scores"])[:len(boxes)])
    return evaluate_wider(detections, ground_truth).ap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA / "wider_face_val_dev")
    parser.add_argument("--min-face-size", type=float, default=20.0)
    parser.add_argument("--pyramids", nargs="+", default=["classic", "dynamic"], choices=["classic", "dynamic"])
    parser.add_argument("--limit", type=int, default=None, help="first N images only (quick look)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = {}
    for pyramid in args.pyramids:
        detector = FaceDetector(weights="reference", pyramid=pyramid, min_face_size=args.min_face_size)
        started = time.perf_counter()
        detect = InProcessDetection(detector, batch_size=4, progress_interval=15)
        result = evaluate_wider_folder(lambda paths, _: detect(paths, f"{pyramid} pyramid"), str(args.data), args.limit)
        seconds = time.perf_counter() - started
        results[pyramid] = result.ap
        print(f"{pyramid:8s} AP " + "  ".join(f"{s} {result.ap[s]:.4f}" for s in SETTINGS)
              + f"   ({result.num_images} images, {result.num_detections} detections, {seconds:.0f} s)", flush=True)

    jsonl = DATA / "reference_mtcnn" / f"wider_face_val_dev.min{args.min_face_size:g}.jsonl"
    if args.limit is None and args.data == DATA / "wider_face_val_dev" and jsonl.is_file():
        ap = reference_ap(args.data, jsonl)
        print(f"{'facenet':8s} AP " + "  ".join(f"{s} {ap[s]:.4f}" for s in SETTINGS)
              + f"   (stored reference detections, {jsonl.name})")
    if {"classic", "dynamic"} <= results.keys():
        difference = {s: results["dynamic"][s] - results["classic"][s] for s in SETTINGS}
        worst = max(abs(d) for d in difference.values())
        print("dynamic - classic " + "  ".join(f"{s} {d:+.4f}" for s, d in difference.items())
              + f"   max |diff| {worst:.4f} ({'within' if worst <= GOAL else 'OUTSIDE'} the {GOAL} goal)")


if __name__ == "__main__":
    main()
