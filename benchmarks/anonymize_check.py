"""What anonymize hides on WIDER, what it leaves alone, and its speed against annotate on the same images.

    python benchmarks/anonymize_check.py [--wider DIR] [--limit N] [--modes blur,pixelate,solid]
        [--jobs M] [--skip-privacy | --skip-jobs]

Privacy (in process, the job's own functions): for the first N images of `wider_face_val_dev` (in
ground-truth order), faces are found with anonymize's recall defaults, hidden (mask scale 1.3,
ellipse), the copy JPEG-encoded at quality 95 and decoded, then the reference detector at annotate's
defaults looks for faces again. Printed per mode:
- found: the share of annotated faces >= 20 px high that a reference detection matches (IoU >= 0.5)
  in the copies (goal < 2%), beside the same share in the originals;
- visible: the share of annotated faces (>= 20 px high, all, and those each WIDER setting counts:
  easy, medium, hard) whose box is less than half covered by a mask;
- with facenet-pytorch's environment (--reference-python, see benchmarks/README.md): the share of
  faces >= 20 px that the reference itself finds in the copies, as written (JPEG files);
- outside: the mean absolute difference (0-255) of the pixels outside every mask, copy against
  original (re-encoding only);
- WIDER AP (easy / medium / hard) and recall of the recall defaults against annotate's defaults on
  these N images.
Jobs: `mtcnn-jobs annotate` (its defaults, and anonymize's detector settings) and `mtcnn-jobs
anonymize` on the same first M images, each a fresh process with an embedded Ray, wall clock
start to exit (Ray start-up included in all three); ratio anonymize / annotate (goal >= 0.8).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_WIDER = ROOT.parent / "shared" / "data" / "wider_face_val_dev"
SETTINGS = ("easy", "medium", "hard")


def iou(boxes: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """IoU of each truth box (rows) with each box (columns)."""
    if not len(boxes) or not len(truth):
        return np.zeros((len(truth), len(boxes)))
    x1 = np.maximum(truth[:, None, 0], boxes[None, :, 0])
    y1 = np.maximum(truth[:, None, 1], boxes[None, :, 1])
    x2 = np.minimum(truth[:, None, 2], boxes[None, :, 2])
    y2 = np.minimum(truth[:, None, 3], boxes[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(truth)[:, None] + area(boxes)[None, :] - inter + 1e-9)


def mask_raster(shape, boxes: np.ndarray, settings) -> np.ndarray:
    """Where hide_faces changes pixels (marked by hiding a blank image with a solid mask)."""
    from dataclasses import replace

    from jobs.pipelines.anonymize import hide_faces

    blank = np.full((*shape[:2], 3), 255, np.uint8)
    return hide_faces(blank, boxes, replace(settings, mode="solid"))[..., 0] == 0


def facenet_found(reference_python: str, copies: dict[str, Path], big_truth: dict[str, np.ndarray]) -> int:
    """How many of the >= 20 px annotated faces facenet-pytorch (the reference, in its own venv)
    finds (IoU >= 0.5) in the copies {image name: file}."""
    script = Path(__file__).parent / "reference" / "facenet_detect.py"
    names = list(copies)
    out = subprocess.run([reference_python, str(script), *[str(copies[n]) for n in names]], capture_output=True,
                         text=True, check=True).stdout
    found = 0
    for name, line in zip(names, out.strip().splitlines()):
        boxes = np.asarray(json.loads(line)["boxes"], np.float64).reshape(-1, 4)
        found += int((iou(boxes, big_truth[name]).max(axis=1, initial=0) >= 0.5).sum())
    return found


def privacy(wider: Path, limit: int, modes: list[str], reference_python: str | None) -> None:
    from dataclasses import replace

    from jobs.inputs.decode import decode_image
    from jobs.pipelines.anonymize import MaskSettings, _recall_detector, encode_image, hide_faces
    from mtcnn import FaceDetector
    from mtcnn.evaluation import load_wider_ground_truth
    from mtcnn.evaluation.wider import evaluate_wider

    truth = load_wider_ground_truth(wider)
    names = truth.images[:limit]
    truth = truth.subset(names)
    recall_detector, reference = FaceDetector(config=_recall_detector()), FaceDetector()
    found_recall, found_reference = {}, {}
    totals = {mode: {"found": 0, "visible20": 0, "visible": 0, "outside": [],
                     **{f"visible_{s}": 0 for s in SETTINGS}} for mode in modes}
    big_total = all_total = found_original = 0
    setting_total = dict.fromkeys(SETTINGS, 0)
    scratch = Path(tempfile.mkdtemp(prefix="anonymize-check-"))
    copies: dict[str, dict[str, Path]] = {mode: {} for mode in modes}
    big_truth: dict[str, np.ndarray] = {}
    started = time.perf_counter()
    for number, name in enumerate(names):
        data = Path(truth.image_path(name)).read_bytes()
        image = decode_image(data)
        hits = recall_detector.detect([image])[0]
        plain = reference.detect([image])[0]
        found_recall[name] = (hits.boxes, hits.scores)
        found_reference[name] = (plain.boxes, plain.scores)
        gt = truth.boxes[number].reshape(-1, 4)
        big = (gt[:, 3] - gt[:, 1]) >= 20
        big_total += int(big.sum())
        all_total += len(gt)
        big_truth[name] = gt[big]
        for setting in SETTINGS:
            setting_total[setting] += len(truth.counted[setting][number])
        found_original += int((iou(plain.boxes, gt[big]).max(axis=1, initial=0) >= 0.5).sum())
        for mode in modes:
            settings = MaskSettings(mode=mode)
            encoded = encode_image(hide_faces(image, hits.boxes, settings), data, ".jpg", settings)
            copy = decode_image(encoded)
            if reference_python:
                copies[mode][name] = scratch / mode / f"{number:05d}.jpg"
                copies[mode][name].parent.mkdir(parents=True, exist_ok=True)
                copies[mode][name].write_bytes(encoded)
            again = reference.detect([copy])[0]
            totals[mode]["found"] += int((iou(again.boxes, gt[big]).max(axis=1, initial=0) >= 0.5).sum())
            raster = mask_raster(image.shape, hits.boxes, replace(settings))
            covered = np.array([raster[int(max(0, y1)):int(np.ceil(y2)), int(max(0, x1)):int(np.ceil(x2))].mean()
                                if x2 - x1 >= 1 and y2 - y1 >= 1 else 0.0 for x1, y1, x2, y2 in gt])
            covered = np.nan_to_num(covered)
            totals[mode]["visible20"] += int(((covered < 0.5) & big).sum())
            totals[mode]["visible"] += int((covered < 0.5).sum())
            for setting in SETTINGS:
                counted = truth.counted[setting][number]
                totals[mode][f"visible_{setting}"] += int((covered[counted] < 0.5).sum())
            if (~raster).any():
                totals[mode]["outside"].append(float(np.abs(copy.astype(np.int16) - image)[~raster].mean()))
        if (number + 1) % 25 == 0:
            print(f"  {number + 1}/{len(names)} images, {time.perf_counter() - started:.0f} s", flush=True)
    print(f"{len(names)} WIDER val_dev images, {all_total} annotated faces, {big_total} >= 20 px high; "
          f"the reference detector (annotate defaults) finds {found_original / big_total:.1%} of those in the "
          f"originals", flush=True)
    for mode in modes:
        t = totals[mode]
        print(f"{mode:8s} found in copies {t['found'] / big_total:.2%} ({t['found']}/{big_total}); left visible "
              f"{t['visible20'] / big_total:.1%} of >= 20 px, {t['visible'] / all_total:.1%} of all; pixels outside "
              f"masks: mean abs difference {np.mean(t['outside']):.2f}", flush=True)
        shares = ", ".join(f"{s} {t[f'visible_{s}'] / max(1, setting_total[s]):.1%} of {setting_total[s]}"
                           for s in SETTINGS)
        print(f"{'':8s} faces left visible (less than half covered) per WIDER setting: {shares}", flush=True)
        if reference_python:
            found = facenet_found(reference_python, copies[mode], big_truth)
            print(f"{'':8s} facenet-pytorch (the reference) finds {found / big_total:.2%} ({found}/{big_total}) of the "
                  f">= 20 px faces in the copies", flush=True)
    for label, found in (("recall defaults (min face 14, 0.6/0.6/0.6)", found_recall),
                         ("annotate defaults (min face 20, 0.6/0.7/0.7)", found_reference)):
        result = evaluate_wider(found, truth)
        ap = " / ".join(f"{result.ap[s]:.3f}" for s in ("easy", "medium", "hard"))
        recall = " / ".join(f"{result.curves[s].recall.max():.3f}" for s in ("easy", "medium", "hard"))
        print(f"{label}: WIDER AP {ap}, recall {recall} (easy / medium / hard, these {len(names)} images)",
              flush=True)


def job_seconds(command: list[str], label: str) -> float:
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "jobs.cli", *command], capture_output=True, text=True,
                            env=env, cwd=ROOT)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        print(result.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{label} failed with exit status {result.returncode}")
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    print(f"{label}: {seconds:.1f} s  [{summary}]", flush=True)
    return seconds


def jobs(wider: Path, count: int) -> None:
    paths = sorted((wider / "images").rglob("*.jpg"))[:count]
    with tempfile.TemporaryDirectory() as folder:
        manifest = Path(folder) / "images.txt"
        manifest.write_text("\n".join(str(p) for p in paths) + "\n")
        same = ["--min-face-size", "14", "--thresholds", "0.6,0.6,0.6"]
        annotate = job_seconds(["annotate", str(manifest), f"{folder}/faces"], "annotate (its defaults)")
        annotate_same = job_seconds(["annotate", str(manifest), f"{folder}/faces-same", *same],
                                    "annotate (anonymize's detector settings)")
        anonymize = job_seconds(["anonymize", str(manifest), f"{folder}/copies"], "anonymize (defaults)")
    print(f"{len(paths)} images; throughput anonymize / annotate: {annotate / anonymize:.2f} against annotate's "
          f"defaults, {annotate_same / anonymize:.2f} against annotate with the same detector settings "
          f"(goal >= 0.8)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wider", type=Path, default=DEFAULT_WIDER)
    parser.add_argument("--limit", type=int, default=100, help="WIDER images for the privacy figures")
    parser.add_argument("--modes", default="blur", help="comma-separated: blur,pixelate,solid")
    parser.add_argument("--jobs", type=int, default=80, help="images for the job timings")
    parser.add_argument("--skip-privacy", action="store_true")
    parser.add_argument("--skip-jobs", action="store_true")
    parser.add_argument("--reference-python", default="/opt/refvenv/bin/python", help=(
        "facenet-pytorch's environment (benchmarks/README.md): it also looks for faces in the copies"))
    args = parser.parse_args()
    cv2.setNumThreads(1)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{os.cpu_count()} CPUs ({cpu}), load average {os.getloadavg()[0]:.1f}", flush=True)
    if not args.skip_privacy:
        reference = args.reference_python if Path(args.reference_python).exists() else None
        if reference is None:
            print(f"no {args.reference_python}: facenet-pytorch's figures left out", flush=True)
        privacy(args.wider, args.limit, args.modes.split(","), reference)
    if not args.skip_jobs:
        jobs(args.wider, args.jobs)


if __name__ == "__main__":
    main()
