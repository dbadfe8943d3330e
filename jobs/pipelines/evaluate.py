"""The evaluate job: WIDER AP (easy / medium / hard) and landmark error of a weights file or of existing predictions.

Its command line is jobs/commands/evaluate.py."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtcnn import Detections, DetectorConfig, FaceDetector
from mtcnn.annotations import AnnotationError, read_facepoint_list
from mtcnn.evaluation import (SETTINGS, LandmarkResult, WiderResult, evaluate_landmarks, evaluate_wider,
                              load_wider_ground_truth, save_pr_curves)

from jobs.inputs.annotation_files import flatten_faces, iter_batches, run_metadata_of
from jobs.common.redaction import public_path, redact, redact_text
from jobs.inputs.decode import DecodeError, read_rgb
from jobs.common.schema import row_detections
from jobs.inputs.annotation_files import read_annotations
from jobs.common.detector_args import DETECTOR_FLAGS
from jobs.common.storage import is_url, parse_storage_options
from jobs.inputs.stored_weights import load_weights_from


class ImageReadError(ValueError):
    """An evaluation image that cannot be read; evaluation needs every image of the set."""


def evaluation_image(path: str) -> np.ndarray:
    """An evaluation image (local path or fsspec URL) as RGB in its stored pixel grid, or ImageReadError."""
    try:
        # Annotations refer to the stored pixels, so EXIF orientation is not applied (as Pillow's
        # Image.open, which the reference numbers used).
        return read_rgb(path, orientation=False)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: image not found (is the dataset folder complete?)") from None
    except DecodeError:
        raise ImageReadError(f"{path}: not a decodable image") from None


class Progress:
    """Prints images done / total and images/s at most every `interval` seconds."""

    def __init__(self, label: str, total: int, interval: float = 10.0, stream=None) -> None:
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
                  f"about {remaining:.0f} s left", file=self.stream or sys.stderr, flush=True)

    @property
    def images_per_second(self) -> float:
        """Throughput so far."""
        return self.done / max(time.perf_counter() - self.started, 1e-9)


class InProcessDetection:
    """Detects faces in image files with one FaceDetector in this process, with progress lines."""

    def __init__(self, detector: FaceDetector, batch_size: int = 4, progress_interval: float = 10.0) -> None:
        self.detector, self.batch_size, self.progress_interval = detector, batch_size, progress_interval

    def __call__(self, paths: list[str], label: str) -> list[Detections]:
        """Detections for each image file, in order."""
        progress = Progress(label, len(paths), self.progress_interval)
        results = []
        for start in range(0, len(paths), self.batch_size):
            images = [evaluation_image(path) for path in paths[start:start + self.batch_size]]
            results.extend(self.detector.detect(images))
            progress.advance(len(images))
        return results


@dataclass
class AnnotateJobDetection:
    """Detects faces in image files with the annotate Ray job (Ray Data actors, local or on a cluster)."""

    weights: str
    detector: DetectorConfig
    work_dir: str
    address: str | None = None
    num_gpus: float = 0.0
    concurrency: int | None = None
    batch_size: int = 16

    def __call__(self, paths: list[str], label: str) -> list[Detections]:
        """Detections for each image file, in order; the job's rows stay under work_dir/label."""
        from jobs.pipelines.annotate import AnnotateConfig, annotate

        folder = Path(self.work_dir) / label
        folder.mkdir(parents=True, exist_ok=True)
        manifest = folder / "images.txt"
        manifest.write_text("".join(path + "\n" for path in paths))
        output = str(folder / "detections")
        summary = annotate(AnnotateConfig(
            input=str(manifest), output=output, weights=self.weights, detector=self.detector,
            address=self.address, num_gpus=self.num_gpus, concurrency=self.concurrency,
            batch_size=self.batch_size, overwrite=True))
        print(redact_text(f"{label}: {summary.line()}"), file=sys.stderr, flush=True)
        table = read_annotations(output)
        rows = {_row_key(path): (found, error) for path, found, error in
                zip(table["path"].to_pylist(), row_detections(table["faces"]), table["error"].to_pylist())}
        results = []
        for path in paths:
            found, error = rows.get(_row_key(path), (None, "the annotate job returned no row for it"))
            if error is not None or found is None:
                raise ImageReadError(f"{path}: {error}")
            order = np.argsort(-found.scores, kind="stable")  # best first
            results.append(Detections(found.boxes[order], found.scores[order], found.landmarks[order]))
        return results


def _image_key(path: str) -> str:
    """An image's folder and file name ('0--Parade/x.jpg'): how predictions find ground-truth images."""
    parts = path.replace("\\", "/").rstrip("/").split("/")
    return "/".join(parts[-2:])


@dataclass
class StoredPredictions:
    """Detections already made: annotate-schema Parquet, or a folder of WIDER prediction .txt files."""

    source: str
    storage_options: dict = dataclasses.field(default_factory=dict)

    def __call__(self, paths: list[str], label: str) -> list[Detections]:
        """The stored detections of each image, in order; raises ImageReadError for an image without any."""
        wanted = {_image_key(path): i for i, path in enumerate(paths)}
        found: list[Detections | None] = [None] * len(paths)
        reasons: dict[int, str] = {}
        for key, detections, error in self._rows(wanted):
            index = wanted.get(key)
            if index is None:
                continue  # an image of the run that is not in this set
            if found[index] is not None:
                raise ImageReadError(f"{paths[index]}: the predictions hold two rows for {key}")
            if error is not None:
                reasons[index] = error
                continue
            found[index] = detections
        missing = [i for i, d in enumerate(found) if d is None]
        if missing:
            first = missing[0]
            why = reasons.get(first, "no row in the predictions")
            raise ImageReadError(f"{len(missing)} of {len(paths)} {label} images have no predictions, e.g. "
                                 f"{paths[first]}: {why} (evaluation needs every image of the set; "
                                 "rows are matched by folder and file name)")
        print(f"{label}: predictions for {len(paths)} images from {self.source}", file=sys.stderr, flush=True)
        return found

    def _rows(self, wanted: dict[str, int]):
        """(image key, detections, error) for every stored image; only wanted ones are kept in memory."""
        local = not is_url(self.source)
        if local and os.path.isdir(self.source) and not any(
                name.endswith(".parquet") for name in os.listdir(self.source)):
            yield from _wider_prediction_rows(self.source)
            return
        for batch in iter_batches(self.source, ["path", "faces", "error"], self.storage_options):
            keys = [_image_key(p) for p in batch.column("path").to_pylist()]
            errors = batch.column("error").to_pylist()
            faces = flatten_faces(batch.column("faces"))
            starts = np.searchsorted(faces.row, np.arange(batch.num_rows + 1))
            for row, key in enumerate(keys):
                if key not in wanted:
                    continue
                lo, hi = starts[row], starts[row + 1]
                yield key, Detections(faces.boxes[lo:hi].astype(np.float32), faces.scores[lo:hi].astype(np.float32),
                                      faces.landmarks[lo:hi].reshape(-1, 5, 2).astype(np.float32)), errors[row]


def _wider_prediction_rows(folder: str):
    """(image key, detections, None) from event/name.txt files: name line, count line, `x y w h score` lines."""
    for event in sorted(os.listdir(folder)):
        event_dir = os.path.join(folder, event)
        if not os.path.isdir(event_dir):
            continue
        for name in sorted(os.listdir(event_dir)):
            if not name.endswith(".txt"):
                continue
            with open(os.path.join(event_dir, name), encoding="utf-8") as handle:
                lines = handle.read().splitlines()
            try:
                count = int(lines[1])
                numbers = np.array([[float(v) for v in line.split()[:5]] for line in lines[2:2 + count]],
                                   np.float64).reshape(-1, 5)
            except (IndexError, ValueError):
                raise AnnotationError(os.path.join(event_dir, name), None,
                                      "expected a name line, a count line and `x y w h score` lines") from None
            boxes = numbers[:, :4].copy()
            boxes[:, 2:] += boxes[:, :2]
            # The files name images without extension; WIDER's are all .jpg.
            yield f"{event}/{lines[0].strip()}.jpg", Detections(
                boxes.astype(np.float32), numbers[:, 4].astype(np.float32),
                np.full((len(numbers), 5, 2), np.nan, np.float32)), None


def _row_key(path: str) -> str:
    """An image's key among annotate's rows, whose `path` is the input minus any credentials."""
    return public_path(path) if is_url(path) else os.path.abspath(path)


#: Detection backend: (image paths, label for progress) -> detections per image, in order.
Detect = Callable[[list[str], str], list[Detections]]


def evaluate_wider_folder(detect: Detect, folder: str, limit: int | None = None) -> WiderResult:
    """WIDER AP of a detector over a WIDER-format folder (its first `limit` images if given)."""
    ground_truth = load_wider_ground_truth(folder)
    if limit is not None:
        ground_truth = ground_truth.subset(ground_truth.images[:limit])
    found = detect([ground_truth.image_path(name) for name in ground_truth.images], "wider")
    detections = {name: (d.boxes, d.scores) for name, d in zip(ground_truth.images, found)}
    return evaluate_wider(detections, ground_truth)


def evaluate_landmark_list(detect: Detect, list_file: str, limit: int | None = None) -> LandmarkResult:
    """Landmark error (NME) of a detector over the faces of a 5-point list file."""
    annotations = read_facepoint_list(list_file)
    if limit is not None:
        annotations = annotations[:limit]
    found = detect([a.path for a in annotations], "landmarks")
    return evaluate_landmarks([(d.boxes, d.landmarks) for d in found],
                              [(a.boxes, a.landmarks) for a in annotations])


@dataclass
class EvaluateConfig:
    """What to evaluate and with which detector: the one declaration of each setting, its flag and
    its help (jobs/common/settings.py builds `mtcnn-jobs evaluate`'s options from it)."""

    wider: str | None = dataclasses.field(default=None, metadata={"metavar": "DIR", "help": (
        "WIDER-format folder: *_bbx_gt.txt, images/, easy.txt, medium.txt, hard.txt")})
    landmarks: str | None = dataclasses.field(default=None, metadata={"metavar": "LIST_FILE", "help": (
        "5-point list (path x1 x2 y1 y2 and 5 points a line) for landmark error")})
    #: Score these stored detections (annotate-schema Parquet or WIDER .txt files) instead of detecting.
    predictions: str | None = dataclasses.field(default=None, metadata={"metavar": "ANNOTATIONS", "help": (
        "score these detections instead of detecting: an annotate OUTPUT (local or s3://), any Parquet "
        "with its schema, or a folder of WIDER prediction .txt files; images are matched by folder and "
        "file name")})
    #: fsspec/s3fs options, or their JSON text (as the flag gives them).
    storage_options: dict = dataclasses.field(default_factory=dict, metadata={
        "parse": str, "help": "with --predictions: JSON object of fsspec/s3fs options"})
    weights: str = dataclasses.field(default="reference", metadata={
        "help": "'reference', a weights file, or a training run folder"})
    detector: DetectorConfig = dataclasses.field(default_factory=DetectorConfig, metadata={
        "nested": "", "fields": DETECTOR_FLAGS})
    device: str = dataclasses.field(default="cpu", metadata={"help": "torch device, e.g. cpu or cuda"})
    output: str | None = dataclasses.field(default=None, metadata={
        "metavar": "DIR", "help": "folder for metrics.json and pr_curves.png"})
    limit: int | None = dataclasses.field(default=None, metadata={
        "help": "evaluate the first N images of each set only"})
    batch_size: int = dataclasses.field(default=4, metadata={"help": "images per detector call"})
    #: Detect with the annotate Ray job instead of in this process.
    use_ray: bool = dataclasses.field(default=False, metadata={"flag": "--ray", "help": (
        "detect with the annotate Ray job (Ray Data actors) instead of in this process; its rows are "
        "kept under OUTPUT/annotate")})
    address: str | None = dataclasses.field(default=None, metadata={
        "help": "with --ray: Ray cluster address (default: local Ray)"})
    num_gpus: float = dataclasses.field(default=0.0, metadata={"help": "with --ray: GPUs per detector actor"})
    concurrency: int | None = dataclasses.field(default=None, metadata={"help": "with --ray: detector actors"})

    def __post_init__(self) -> None:
        if isinstance(self.storage_options, str):
            self.storage_options = parse_storage_options(self.storage_options)


def evaluate(config: EvaluateConfig) -> dict:
    """Run the evaluation; the metrics as a JSON-ready dict (also written to the output folder)."""
    if not config.wider and not config.landmarks:
        raise ValueError("nothing to evaluate: give --wider DIR and/or --landmarks LIST_FILE")
    if config.limit is not None and config.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {config.limit}")
    if config.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.predictions:
        metrics: dict = {"predictions": config.predictions, "detection": "stored predictions"}
        if not os.path.isdir(config.predictions) or any(
                n.endswith(".parquet") for n in os.listdir(config.predictions)):
            run = run_metadata_of(config.predictions, config.storage_options) or {}
            # The run's own record of what made the rows, when it has one (secrets already redacted).
            metrics["weights"] = run.get("weights") or {"source": "unknown", "sha256": ""}
            metrics["detector"] = run.get("detector")
        else:
            metrics["weights"], metrics["detector"] = {"source": "unknown", "sha256": ""}, None
    else:
        weights = load_weights_from(config.weights, config.storage_options)
        metrics = {
            "weights": {"source": str(weights.source or config.weights), "sha256": weights.sha256,
                        "provenance": redact(weights.provenance)},
            "detector": dataclasses.asdict(config.detector),
            "detection": "annotate Ray job" if config.use_ray else f"in process on {config.device}",
        }
    with tempfile.TemporaryDirectory(prefix="mtcnn-evaluate-") as scratch:
        if config.predictions:
            detect: Detect = StoredPredictions(config.predictions, config.storage_options)
        elif config.use_ray:
            detect = AnnotateJobDetection(
                str(config.weights), config.detector, str(Path(config.output) / "annotate") if config.output
                else scratch, config.address, config.num_gpus, config.concurrency, config.batch_size)
        else:
            detect = InProcessDetection(FaceDetector(weights, config.device, config.detector), config.batch_size)
        wider = None
        if config.wider:
            started = time.perf_counter()
            wider = evaluate_wider_folder(detect, config.wider, config.limit)
            metrics["wider"] = {
                "folder": str(config.wider), "images": wider.num_images, "detections": wider.num_detections,
                "ap": wider.ap, "seconds": time.perf_counter() - started,
                "curves": {s: {"recall": np.round(c.recall, 6).tolist(),
                               "precision": np.round(c.precision, 6).tolist()} for s, c in wider.curves.items()},
            }
        if config.landmarks:
            started = time.perf_counter()
            landmarks = evaluate_landmark_list(detect, config.landmarks, config.limit)
            metrics["landmarks"] = {"list": str(config.landmarks), **landmarks.as_dict(),
                                    "seconds": time.perf_counter() - started}
    # Sources, folders and provenance may name URLs that carry credentials.
    metrics = redact(metrics)
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
    lines = [f"predictions {metrics['predictions']}"] if metrics.get("predictions") else []
    weights = metrics.get("weights") or {}
    lines.append(f"weights  {weights.get('source', 'unknown')}  (sha256 {str(weights.get('sha256') or '')[:12]})")
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
