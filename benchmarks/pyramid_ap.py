"""WIDER AP (easy / medium / hard) per pyramid variant, with the time of one 720p pyramid, one table.

    python benchmarks/pyramid_ap.py [--pyramids classic dynamic chain2 octave] [--min-face-size 20]
                                    [--data DIR] [--sample N] [--save-detections DIR] [--precision bf16]

Goal (issue 15): a fast pyramid within 0.002 AP of the classic one in every setting, at most half
of the classic pyramid's time at 1280x720. Every variant runs on the same images; `--sample N`
takes N images spread evenly over the set (a paired comparison on fewer images).

A WIDER folder without easy/medium/hard.txt (e.g. `../shared/data/wider_face_train_small`, whose
ground truth is in WIDER format but which, as a training split, has no official settings) is
scored with settings by face height instead: all valid faces, >= 20 px and >= 50 px tall (marked
"by height" in the output; not comparable to the official settings' figures).

The pyramid time is the median over a few WIDER photos resized to 1280x720, one thread, of
`build_pyramid` at the chosen min face size; "classic" is timed with its own summed-area table
(in the detector that table is shared with the crops, so its real cost there is lower).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from jobs.pipelines.evaluate import InProcessDetection
from mtcnn import FaceDetector
from mtcnn.annotations import read_wider
from mtcnn.detector import PRECISIONS
from mtcnn.evaluation import SETTINGS, WiderGroundTruth, evaluate_wider, load_wider_ground_truth
from mtcnn.pyramid import PYRAMIDS, build_pyramid, pyramid_scales

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GOAL = 0.002
HEIGHT_SETTINGS = {"all": 0.0, ">=20px": 20.0, ">=50px": 50.0}


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


def ground_truth_by_height(folder: Path) -> WiderGroundTruth:
    """A WIDER-format folder's ground truth with settings by face height (valid faces only)."""
    gt_file = next(folder.glob("*_bbx_gt.txt"))
    image_root = folder / "images"
    annotations = read_wider(gt_file, image_root)
    names = [str(Path(a.path).resolve().relative_to(image_root.resolve())) for a in annotations]
    boxes = [a.boxes.astype(np.float64) for a in annotations]
    counted = {setting: [np.flatnonzero(~a.ignore & (b[:, 3] - b[:, 1] >= tall))
                         for a, b in zip(annotations, boxes)]
               for setting, tall in HEIGHT_SETTINGS.items()}
    return WiderGroundTruth(names, boxes, counted, str(image_root))


def pyramid_milliseconds(pyramid: str, frames: list[np.ndarray], min_face_size: float,
                         repeats: int = 5) -> float:
    """Median milliseconds of build_pyramid over 720p frames (one thread)."""
    scales = pyramid_scales(*frames[0].shape[:2], min_face_size, 0.709)
    times = []
    for frame in frames:
        build_pyramid(frame, scales, pyramid)
        for _ in range(repeats):
            start = time.perf_counter()
            build_pyramid(frame, scales, pyramid)
            times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA / "wider_face_val_dev")
    parser.add_argument("--min-face-size", type=float, default=20.0)
    parser.add_argument("--pyramids", nargs="+", default=list(PYRAMIDS), choices=PYRAMIDS)
    parser.add_argument("--sample", type=int, default=None, help="N images spread evenly over the set")
    parser.add_argument("--save-detections", type=Path, default=None,
                        help="folder for <pyramid>.min<size>.jsonl files of the detections")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="the nets' arithmetic for every variant (AP of bf16 beside fp32's)")
    parser.add_argument("--timing-frames", type=int, default=4, help="720p frames the pyramid time is taken on")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    official = all((args.data / f"{s}.txt").is_file() for s in SETTINGS)
    ground_truth = load_wider_ground_truth(args.data) if official else ground_truth_by_height(args.data)
    settings = list(ground_truth.counted)
    if args.sample is not None and args.sample < len(ground_truth.images):
        picks = np.linspace(0, len(ground_truth.images) - 1, args.sample).round().astype(int)
        ground_truth = ground_truth.subset([ground_truth.images[i] for i in picks])
    names = ground_truth.images
    print(f"{len(names)} images of {args.data}, min face {args.min_face_size:g}, {args.precision}, settings "
          f"{'official' if official else 'by height (no easy/medium/hard lists here)'}", flush=True)

    paths = [ground_truth.image_path(name) for name in names]
    timing_frames = [cv2.resize(cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB), (1280, 720),
                                interpolation=cv2.INTER_AREA)
                     for path in paths[:: max(1, len(paths) // args.timing_frames)][:args.timing_frames]]
    rows = {}
    for pyramid in args.pyramids:
        detector = FaceDetector(weights="reference", pyramid=pyramid, min_face_size=args.min_face_size,
                                precision=args.precision)
        detect = InProcessDetection(detector, batch_size=4, progress_interval=30)
        started = time.perf_counter()
        found = detect(paths, f"{pyramid} pyramid")
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
        torch.set_num_threads(1)
        milliseconds = pyramid_milliseconds(pyramid, timing_frames, args.min_face_size)
        torch.set_num_threads(args.threads)
        rows[pyramid] = (result.ap, milliseconds, seconds)
        print(f"  {pyramid}: " + "  ".join(f"{s} {result.ap[s]:.4f}" for s in settings)
              + f"   ({result.num_detections} detections, {seconds:.0f} s)", flush=True)

    reference = None
    jsonl = DATA / "reference_mtcnn" / f"wider_face_val_dev.min{args.min_face_size:g}.jsonl"
    if args.data == DATA / "wider_face_val_dev" and jsonl.is_file():
        stored = read_detections(jsonl)
        reference = evaluate_wider({name: stored[name] for name in names}, ground_truth).ap

    classic = rows.get("classic")
    header = ["pyramid", *settings, "max |AP - classic|", "720p pyramid ms", "/ classic"]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for pyramid, (ap, milliseconds, _) in rows.items():
        cells = [pyramid, *(f"{ap[s]:.4f}" for s in settings)]
        if classic:
            worst = max(abs(ap[s] - classic[0][s]) for s in settings)
            cells += [f"{worst:.4f}" + ("" if pyramid == "classic" else
                                       (" ok" if worst <= GOAL else " OVER")),
                      f"{milliseconds:.1f}", f"{milliseconds / classic[1]:.2f}"]
        else:
            cells += ["", f"{milliseconds:.1f}", ""]
        print("| " + " | ".join(cells) + " |")
    if reference:
        print("| facenet-pytorch (stored detections) | " + " | ".join(f"{reference[s]:.4f}" for s in settings)
              + " | | | |")
    if classic:
        meeting = [p for p, (ap, ms, _) in rows.items() if p != "classic"
                   and max(abs(ap[s] - classic[0][s]) for s in settings) <= GOAL and ms <= 0.5 * classic[1]]
        print(f"\nwithin {GOAL} AP of classic in every setting at <= half its 720p pyramid time: "
              f"{', '.join(meeting) or 'none'}")


if __name__ == "__main__":
    main()
