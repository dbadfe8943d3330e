"""WIDER AP (easy / medium / hard) of the classic vs the dynamic pyramid, reference weights.

    python benchmarks/pyramid_ap.py [--min-face-size 20] [--sample N] [--save-detections DIR]

The dynamic pyramid (each level resized from the previous one) should cost no accuracy: the goal
is |AP dynamic - AP classic| <= 0.005 in every setting. Both pyramids run on the same images;
`--sample N` takes N images spread evenly over the set (a paired comparison on fewer images).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from jobs.evaluate import InProcessDetection
from mtcnn import FaceDetector
from mtcnn.evaluation import SETTINGS, evaluate_wider, load_wider_ground_truth

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GOAL = 0.005


def read_detections(jsonl: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{image name: (boxes, scores)} from a JSON-lines file like the stored reference detections."""
    detections = {}
    with open(jsonl) as stream:
        for line in stream:
            row = json.loads(line)
            boxes = np.array(row["boxes"], np.float64).reshape(-1, 4)
            # The reference writes a score of NaN for an image without faces.
            detections[row["path"].removeprefix("images/")] = (boxes, np.array(row["scores"])[:len(boxes)])
    return detections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA / "wider_face_val_dev")
    parser.add_argument("--min-face-size", type=float, default=20.0)
    parser.add_argument("--pyramids", nargs="+", default=["classic", "dynamic"], choices=["classic", "dynamic"])
    parser.add_argument("--sample", type=int, default=None, help="N images spread evenly over the set")
    parser.add_argument("--save-detections", type=Path, default=None,
                        help="folder for <pyramid>.min<size>.jsonl files of the detections")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ground_truth = load_wider_ground_truth(args.data)
    if args.sample is not None and args.sample < len(ground_truth.images):
        picks = np.linspace(0, len(ground_truth.images) - 1, args.sample).round().astype(int)
        ground_truth = ground_truth.subset([ground_truth.images[i] for i in picks])
    names = ground_truth.images
    print(f"{len(names)} images of {args.data}, min face {args.min_face_size:g}", flush=True)

    results = {}
    for pyramid in args.pyramids:
        detector = FaceDetector(weights="reference", pyramid=pyramid, min_face_size=args.min_face_size)
        detect = InProcessDetection(detector, batch_size=4, progress_interval=15)
        started = time.perf_counter()
        found = detect([ground_truth.image_path(name) for name in names], f"{pyramid} pyramid")
        seconds = time.perf_counter() - started
        if args.save_detections:
            args.save_detections.mkdir(parents=True, exist_ok=True)
            with open(args.save_detections / f"{pyramid}.min{args.min_face_size:g}.jsonl", "w") as stream:
                for name, d in zip(names, found):
                    row = {"path": "images/" + name, "boxes": d.boxes.astype(float).round(3).tolist(),
                           "scores": d.scores.astype(float).round(6).tolist(),
                           "landmarks": d.landmarks.astype(float).round(3).tolist()}
                    stream.write(json.dumps(row) + "\n")
        result = evaluate_wider({name: (d.boxes, d.scores) for name, d in zip(names, found)}, ground_truth)
        results[pyramid] = result.ap
        print(f"{pyramid:8s} AP " + "  ".join(f"{s} {result.ap[s]:.4f}" for s in SETTINGS)
              + f"   ({result.num_detections} detections, {seconds:.0f} s)", flush=True)

    jsonl = DATA / "reference_mtcnn" / f"wider_face_val_dev.min{args.min_face_size:g}.jsonl"
    if args.data == DATA / "wider_face_val_dev" and jsonl.is_file():
        stored = read_detections(jsonl)
        ap = evaluate_wider({name: stored[name] for name in names}, ground_truth).ap
        print(f"{'facenet':8s} AP " + "  ".join(f"{s} {ap[s]:.4f}" for s in SETTINGS)
              + f"   (stored reference detections, {jsonl.name}, same images)")
    if {"classic", "dynamic"} <= results.keys():
        difference = {s: results["dynamic"][s] - results["classic"][s] for s in SETTINGS}
        worst = max(abs(d) for d in difference.values())
        print("dynamic - classic " + "  ".join(f"{s} {d:+.4f}" for s, d in difference.items())
              + f"   max |diff| {worst:.4f} ({'within' if worst <= GOAL else 'OUTSIDE'} the {GOAL} goal)")


if __name__ == "__main__":
    main()
