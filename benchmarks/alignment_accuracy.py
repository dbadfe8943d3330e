"""How close `--align similarity` chips put eyes and mouth to the template, against the floor the fit itself sets.

    python benchmarks/alignment_accuracy.py [--limit 300] [--size 112] [--pyramid classic]

On the 5-point set's test faces (their landmarks are known), for each face the detector finds:
- "re-detected": the chip cut from the detected landmarks, the detector run again on it
  (mirrored border for context), its eye and mouth centres' distance from the template's;
- "true points in the chip": the face's annotated landmarks mapped by the same transform;
- "floor": the chip cut from the annotated landmarks themselves. The least-squares similarity
  over five points cannot put every face's eyes and mouth on one template: faces differ in
  proportions, and the nose pulls the fit. No landmark detector can get the chips closer than this.
The floor is also given over the whole list (no detection), and per point.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import torch

from mtcnn import DetectorConfig, FaceDetector
from mtcnn.align import align_face, similarity_matrix, template_points, transform_points
from mtcnn.annotations import read_facepoint_list
from mtcnn.pyramid import PYRAMIDS

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FACEPOINTS = SHARED / "cnn_facepoint_5pt" / "testImageList.txt"
POINT_NAMES = ("left eye", "right eye", "nose", "left mouth", "right mouth")
#: Eye centre and mouth centre: the pairs of points the alignment check measures.
CENTRES = ((0, 1), (3, 4))


def centre_distances(points: np.ndarray, template: np.ndarray) -> list[float]:
    """Distances of the eye centre and the mouth centre of points (5, 2) from the template's."""
    return [float(np.linalg.norm(points[list(pair)].mean(0) - template[list(pair)].mean(0))) for pair in CENTRES]


def floor_over_list(faces, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre distances and per-point distances of every annotated face aligned on its own true landmarks."""
    template = template_points(size)
    centres, points = [], []
    for face in faces:
        truth = face.landmarks[0]
        mapped = transform_points(truth, similarity_matrix(truth, size))
        centres += centre_distances(mapped, template)
        points.append(np.linalg.norm(mapped - template, axis=1))
    return np.asarray(centres), np.asarray(points)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=300, help="faces of the test list to detect on")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--pyramid", default="classic", choices=PYRAMIDS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    faces = read_facepoint_list(FACEPOINTS)
    centres, points = floor_over_list(faces, args.size)
    print(f"floor over all {len(faces)} faces of the list ({args.size} px chips from the true landmarks): "
          f"eye/mouth centre median {np.median(centres):.2f} px, mean {centres.mean():.2f}")
    print("  per point, median px: " + ", ".join(f"{name} {value:.2f}" for name, value in
                                                 zip(POINT_NAMES, np.median(points, axis=0))))

    detector = FaceDetector(config=DetectorConfig(pyramid=args.pyramid))
    # The chip is the face edge to edge; the border lets the detector see it whole.
    border = args.size // 2
    again_detector = FaceDetector(config=DetectorConfig(pyramid=args.pyramid, min_face_size=args.size / 3))
    template = template_points(args.size)
    redetected, truth_in_chip, floor, repeat, skipped = [], [], [], [], 0
    for face in faces[: args.limit]:
        image = cv2.cvtColor(cv2.imread(face.path), cv2.COLOR_BGR2RGB)
        found = detector.detect([image])[0]
        if not len(found):
            skipped += 1
            continue
        best = int(np.argmax(found.scores))
        chip, matrix = align_face(image, landmarks=found.landmarks[best], size=args.size)
        framed = cv2.copyMakeBorder(chip, border, border, border, border, cv2.BORDER_REFLECT)
        again = again_detector.detect([framed])[0]
        if not len(again):
            skipped += 1
            continue
        points_again = again.landmarks[int(np.argmax(again.scores))] - border
        redetected += centre_distances(points_again, template)
        repeat.append(float(np.linalg.norm(points_again - transform_points(found.landmarks[best], matrix),
                                           axis=1)[[0, 1, 3, 4]].mean()))
        truth_in_chip += centre_distances(transform_points(face.landmarks[0], matrix), template)
        truth = face.landmarks[0]
        floor += centre_distances(transform_points(truth, similarity_matrix(truth, args.size)), template)
    print(f"\n{len(repeat)} faces detected of the first {args.limit} ({skipped} not found or not found again), "
          f"{args.pyramid} pyramid, eye/mouth centre to the template's, median px:")
    print(f"  re-detected on the chip           {np.median(redetected):.2f}")
    print(f"  true points mapped into the chip  {np.median(truth_in_chip):.2f}")
    print(f"  floor (chip from the true points) {np.median(floor):.2f}")
    print(f"re-detected eyes and mouth corners to where the transform put the detected ones: "
          f"median {np.median(repeat):.2f} px (the detector's repeatability)")


if __name__ == "__main__":
    main()
