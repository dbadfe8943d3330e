"""mtcnn-jobs evaluate: WIDER AP (easy / medium / hard) and landmark error of a weights file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from mtcnn import DetectorConfig, FaceDetector
from mtcnn.annotations import AnnotationError, read_facepoint_list
from mtcnn.evaluation import (SETTINGS, LandmarkResult, WiderResult, evaluate_landmarks, evaluate_wider,
                              load_wider_ground_truth, save_pr_curves)

from .storage import filesystem, redact


class ImageReadError(ValueError):
    """An evaluation image that cannot be read; evaluation needs every image of the set."""


def read_rgb(path: str) -> np.ndarray:
    """An image file (local path or fsspec URL) as H x W x 3 uint8 RGB, in its stored pixel grid."""
    try:
        fs, inner = filesystem(path)
        with fs.open(inner, "rb") as handle:
            data = np.frombuffer(handle.read(), np.uint8)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: image not found (is the dataset folder complete?)") from None
    # Annotations refer to the stored pixels, so EXIF orientation is not applied (as Pillow's
    # Image.open, which the reference numbers used).
    image = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise ImageReadError(f"{path}: not a decodable image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class Progress:
    """Prints images done / total and images/s at most every `interval` seconds."""

    def __init__(self, label: str, total: int, interval: float = 10.0, stream=sys.stderr) -> None:
        self.label, self.total, self.interval, self.stream = label, total, interval, stream
        self.started = self.last = time.perf_counter()
        self.done = 0

    def advance(self, count: int) -> None:
        """Count `count` more images done, printing a line when due or at the end."""
        self.done += count
        now = time.perf_counter()
        if now - self.last >= self.interval or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            remaining = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(f"{self.label}: {self.done}/{self.total} images, {rate:.2f} images/s, "
                  f"about {remaining:.0f} s left", file=self.stream, flush=True)

    @property
    def images_per_second(self) -> float:
        """Throughput so far."""
        return self.done / max(time.perf_counter() - self.started, 1e-9)


def detect_files(detector: FaceDetector, paths: list[str], batch_size: int = 4,
                 progress: Progress | None = None) -> list:
    """Detections for each image file, in order, with the detector in this process."""
    results = []
    for start in range(0, len(paths), batch_size):
        images = [read_rgb(path) for path in paths[start:start + batch_size]]
        results.extend(detector.detect(images))
        if progress is not None:
            progress.advance(len(images))
    return results


def evaluate_wider_folder(detector: FaceDetector, folder: str, limit: int | None = None, batch_size: int = 4,
                          on_progress: Callable[[str, int], Progress] | None = None) -> WiderResult:
    """WIDER AP of a detector over a WIDER-format folder (its first `limit` images if given)."""
    ground_truth = load_wider_ground_truth(folder)
    if limit is not None:
        ground_truth = ground_truth.subset(ground_truth.images[:limit])
    progress = (on_progress or Progress)("wider", len(ground_truth.images))
    found = detect_files(detector, [ground_truth.image_path(name) for name in ground_truth.images],
                         batch_size, progress)
    detections = {name: (d.boxes, d.scores) for name, d in zip(ground_truth.images, found)}
    return evaluate_wider(detections, ground_truth)


def evaluate_landmark_list(detector: FaceDetector, list_file: str, limit: int | None = None, batch_size: int = 4,
                           on_progress: Callable[[str, int], Progress] | None = None) -> LandmarkResult:
    """Landmark error (NME) of a detector over the faces of a 5-point list file."""
    annotations = read_facepoint_list(list_file)
    if limit is not None:
        annotations = annotations[:limit]
    progress = (on_progress or Progress)("landmarks", len(annotations))
    found = detect_files(detector, [a.path for a in annotations], batch_size, progress)
    return evaluate_landmarks([(d.boxes, d.landmarks) for d in found],
                              [(a.boxes, a.landmarks) for a in annotations])


@dataclass
class EvaluateConfig:
    """What to evaluate and with which detector."""

    wider: str | None = None
    landmarks: str | None = None
    weights: str = "reference"
    detector: DetectorConfig = dataclasses.field(default_factory=DetectorConfig)
    device: str = "cpu"
    output: str | None = None
    limit: int | None = None
    batch_size: int = 4


def evaluate(config: EvaluateConfig) -> dict:
    """Run the evaluation; the metrics as a JSON-ready dict (also written to the output folder)."""
    if not config.wider and not config.landmarks:
        raise ValueError("nothing to evaluate: give --wider DIR and/or --landmarks LIST_FILE")
    if config.limit is not None and config.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {config.limit}")
    if config.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {config.batch_size}")
    detector = FaceDetector(weights=config.weights, device=config.device, config=config.detector)
    metrics: dict = {
        "weights": {"source": str(detector.weights.source or config.weights), "sha256": detector.weights.sha256,
                    "provenance": redact(detector.weights.provenance)},
        "detector": dataclasses.asdict(detector.config),
        "device": config.device,
    }
    wider = None
    if config.wider:
        started = time.perf_counter()
        wider = evaluate_wider_folder(detector, config.wider, config.limit, config.batch_size)
        seconds = time.perf_counter() - started
        metrics["wider"] = {
            "folder": str(config.wider), "images": wider.num_images, "detections": wider.num_detections,
            "ap": wider.ap, "seconds": seconds,
            "curves": {s: {"recall": np.round(c.recall, 6).tolist(), "precision": np.round(c.precision, 6).tolist()}
                       for s, c in wider.curves.items()},
        }
    if config.landmarks:
        started = time.perf_counter()
        landmarks = evaluate_landmark_list(detector, config.landmarks, config.limit, config.batch_size)
        metrics["landmarks"] = {"list": str(config.landmarks), **landmarks.as_dict(),
                                "seconds": time.perf_counter() - started}
    if config.output:
        output = Path(config.output)
        output.mkdir(parents=True, exist_ok=True)
        (output / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        if wider is not None:
            save_pr_curves(output / "pr_curves.png",
                           {s: (c.recall, c.precision, c.average_precision) for s, c in wider.curves.items()},
                           title=f"WIDER precision-recall, {Path(config.wider).name} ({wider.num_images} images)")
    return metrics


def format_table(metrics: dict) -> str:
    """The headline figures as a small text table."""
    lines = [f"weights  {metrics['weights']['source']}  (sha256 {metrics['weights']['sha256'][:12]})"]
    if "wider" in metrics:
        wider = metrics["wider"]
        lines.append(f"WIDER    {wider['images']} images, {wider['detections']} detections")
        lines.append("         " + "  ".join(f"{s:>7}" for s in SETTINGS))
        lines.append("AP       " + "  ".join(f"{wider['ap'][s]:7.4f}" for s in SETTINGS))
    if "landmarks" in metrics:
        marks = metrics["landmarks"]
        lines.append(f"landmarks {marks['num_faces']} faces: NME mean {marks['mean_nme']:.4f}, median "
                     f"{marks['median_nme']:.4f}, failures (NME > {marks['failure_threshold']}) "
                     f"{marks['failure_rate']:.2%}, missed {marks['num_missed']} ({marks['miss_rate']:.2%})")
    return "\n".join(lines)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers like 0.6,0.7,0.7, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of mtcnn-jobs evaluate."""
    defaults = DetectorConfig()
    parser.add_argument("--wider", metavar="DIR",
                        help="WIDER-format folder: *_bbx_gt.txt, images/, easy.txt, medium.txt, hard.txt")
    parser.add_argument("--landmarks", metavar="LIST_FILE",
                        help="5-point list (path x1 x2 y1 y2 and 5 points a line) for landmark error")
    parser.add_argument("--weights", default="reference",
                        help="'reference', a weights file, or a training run folder")
    parser.add_argument("--min-face-size", type=float, default=defaults.min_face_size)
    parser.add_argument("--thresholds", type=_floats, default=defaults.thresholds,
                        help="P-, R-, O-Net score thresholds, e.g. 0.6,0.7,0.7")
    parser.add_argument("--scale-factor", type=float, default=defaults.scale_factor)
    parser.add_argument("--pyramid", choices=["dynamic", "classic"], default=defaults.pyramid)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--output", metavar="DIR", help="folder for metrics.json and pr_curves.png")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N images of each set only")
    parser.add_argument("--batch-size", type=int, default=4, help="images per detector call")


def run(args: argparse.Namespace) -> int:
    """Run mtcnn-jobs evaluate from parsed arguments; exit status."""
    try:
        detector = DetectorConfig(min_face_size=args.min_face_size, thresholds=args.thresholds,
                                  scale_factor=args.scale_factor, pyramid=args.pyramid)
        metrics = evaluate(EvaluateConfig(
            wider=args.wider, landmarks=args.landmarks, weights=args.weights, detector=detector,
            device=args.device, output=args.output, limit=args.limit, batch_size=args.batch_size))
    except (AnnotationError, ImageReadError, FileNotFoundError, ValueError) as error:
        print(f"mtcnn-jobs evaluate: {error}", file=sys.stderr)
        return 2
    print(format_table(metrics))
    if args.output:
        print(f"wrote {Path(args.output) / 'metrics.json'}"
              + (f" and {Path(args.output) / 'pr_curves.png'}" if "wider" in metrics else ""))
    return 0
