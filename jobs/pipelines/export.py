"""The export job: annotations as COCO keypoints JSON, WIDER FACE prediction files or a flat CSV, streamed.

Its command line is jobs/commands/export.py."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import posixpath
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from jobs.inputs.annotation_files import AnnotationsError, flatten_faces, iter_batches, run_metadata_of
from jobs.common.storage import filesystem, is_remote

FORMATS = ("coco", "wider", "csv")
#: Landmark names in the schema's point order (image-left first), for COCO and CSV.
KEYPOINT_NAMES = ("left_eye", "right_eye", "nose", "left_mouth", "right_mouth")
#: COCO skeleton, 1-based: eyes to each other and to the nose, nose to the mouth corners, mouth.
SKELETON = [[1, 2], [1, 3], [2, 3], [3, 4], [3, 5], [4, 5]]
FACE_CATEGORY = {"id": 1, "name": "face", "supercategory": "face", "keypoints": list(KEYPOINT_NAMES),
                 "skeleton": SKELETON}
CSV_COLUMNS = ["path", "width", "height", "face", "x1", "y1", "x2", "y2", "score"] + \
    [f"{name}_{axis}" for name in KEYPOINT_NAMES for axis in "xy"]


@dataclass
class ExportConfig:
    """What to export, how, and where: the one declaration of each setting, its flag and its help."""

    annotations: str = field(metadata={"positional": True, "metavar": "ANNOTATIONS", "help": (
        "an annotate OUTPUT (folder or s3:// prefix), or a Parquet file with its schema")})
    format: str = field(metadata={"choices": FORMATS, "help": (
        "coco: one JSON with 5 keypoints per face; wider: one .txt per image in event folders (the "
        "official evaluation's layout); csv: one face per line")})
    out: str = field(metadata={"positional": True, "metavar": "OUT", "help": (
        "the .json or .csv file, or for wider the folder (local or s3://)")})
    min_score: float = field(default=0.0, metadata={"help": "export only faces scoring at least this"})
    relative_to: str | None = field(default=None, metadata={
        "help": "strip this prefix from image paths (COCO file_name, CSV path); WIDER uses folder/name anyway"})
    storage_options: dict = field(default_factory=dict, metadata={"help": "JSON object of fsspec/s3fs options"})
    decimals: int = field(default=2, metadata={"help": "digits after the point for coordinates and scores"})
    batch_size: int = field(default=8192, metadata={"cli": False})

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not 0 <= self.decimals <= 8:
            raise ValueError(f"decimals must be 0 to 8, got {self.decimals}")


@dataclass
class ExportSummary:
    """What an export wrote."""

    images: int = 0
    faces: int = 0
    errors: int = 0
    files: int = 0
    seconds: float = 0.0

    def line(self, config: ExportConfig) -> str:
        """One-line report for the end of an export."""
        return (f"exported {self.faces} faces of {self.images} images ({self.errors} rows with an error: no faces) as "
                f"{config.format} to {config.out}: {self.files} files in {self.seconds:.1f} s")


def export(config: ExportConfig) -> ExportSummary:
    """Run the export; what it wrote."""
    started = time.perf_counter()
    writer = {"coco": _export_coco, "wider": _export_wider, "csv": _export_csv}[config.format]
    summary = writer(config)
    summary.seconds = time.perf_counter() - started
    return summary


def _batches(config: ExportConfig, columns: list[str]):
    return iter_batches(config.annotations, columns, config.storage_options, config.batch_size)


def _kept(config: ExportConfig, batch):
    """The batch's faces scoring at least --min-score (and with a finite box)."""
    faces = flatten_faces(batch.column("faces"))
    keep = (faces.scores >= config.min_score) & np.isfinite(faces.boxes).all(axis=1)
    if not keep.all():
        faces = type(faces)(faces.row[keep], faces.index[keep], faces.boxes[keep], faces.scores[keep],
                            faces.landmarks[keep])
    return faces


def _name(config: ExportConfig, path: str) -> str:
    if config.relative_to and path.startswith(config.relative_to):
        return path[len(config.relative_to):].lstrip("/")
    return path


@contextlib.contextmanager
def _open_text(config: ExportConfig, path: str):
    """A text stream to OUT that only becomes OUT once written to the end (a failed export leaves none)."""
    fs, inner = filesystem(path, config.storage_options)
    if is_remote(path):
        # An object appears only when its upload completes; abort it on failure.
        handle = fs.open(inner, "w", encoding="utf-8", newline="")
        try:
            yield handle
        except BaseException:
            buffer = getattr(handle, "buffer", None)
            if buffer is not None and hasattr(buffer, "discard"):
                buffer.discard()
                buffer.closed = True  # so closing the text wrapper cannot complete the upload
            raise
        handle.close()
        return
    fs.makedirs(posixpath.dirname(inner) or ".", exist_ok=True)
    temporary = f"{inner}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8", newline="") as handle:
            yield handle
        os.replace(temporary, inner)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _errors_in(batch) -> int:
    return batch.num_rows - batch.column("error").null_count


def _export_coco(config: ExportConfig) -> ExportSummary:
    """COCO keypoints JSON: images, then annotations, each streamed in a pass over the Parquet."""
    summary = ExportSummary(files=1)
    digits = config.decimals
    metadata = run_metadata_of(config.annotations, config.storage_options) or {}
    info = {"description": f"faces detected by mtcnn-jobs annotate in {config.annotations}",
            "version": str(metadata.get("version", "")), "date_created": str(metadata.get("created", "")),
            "detector": metadata.get("detector"), "weights_sha256": (metadata.get("weights") or {}).get("sha256")}
    with _open_text(config, config.out) as out:
        out.write('{"info": ' + json.dumps(info) + ', "licenses": [], "categories": ['
                  + json.dumps(FACE_CATEGORY) + '],\n"images": [')
        # Image ids are row numbers over the files in order; error rows (no pixels were looked at)
        # get no image, but keep their number so both passes agree without a lookup table.
        first, number = True, 0
        for batch in _batches(config, ["path", "width", "height", "error"]):
            paths = batch.column("path").to_pylist()
            widths = batch.column("width").to_pylist()
            heights = batch.column("height").to_pylist()
            errors = batch.column("error").to_pylist()
            chunk = []
            for offset, (path, width, height, error) in enumerate(zip(paths, widths, heights, errors)):
                if error is not None:
                    summary.errors += 1
                    continue
                chunk.append(('' if first and not chunk else ',\n')
                             + json.dumps({"id": number + offset + 1, "file_name": _name(config, path),
                                           "width": width, "height": height}))
            if chunk:
                first = False
                summary.images += len(chunk)
                out.write("".join(chunk))
            number += batch.num_rows
        out.write('],\n"annotations": [')
        first, number, annotation_id = True, 0, 0
        for batch in _batches(config, ["faces", "error"]):
            faces = _kept(config, batch)
            if len(faces):
                boxes, points = faces.boxes, faces.landmarks
                widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
                visible = np.isfinite(points).reshape(-1, 5, 2).all(axis=2)
                points = np.where(np.isfinite(points), points, 0.0)
                lines = []
                for i in range(len(faces)):
                    annotation_id += 1
                    x, y, w, h = (round(float(v), digits) for v in (boxes[i, 0], boxes[i, 1], widths[i], heights[i]))
                    keypoints = []
                    for k in range(5):
                        keypoints += [round(float(points[i, 2 * k]), digits),
                                      round(float(points[i, 2 * k + 1]), digits), 2 if visible[i, k] else 0]
                    lines.append(
                        f'{{"id": {annotation_id}, "image_id": {number + int(faces.row[i]) + 1}, "category_id": 1, '
                        f'"bbox": [{x}, {y}, {w}, {h}], "area": {round(w * h, digits)}, "iscrowd": 0, '
                        f'"score": {round(float(faces.scores[i]), 4)}, "keypoints": {json.dumps(keypoints)}, '
                        f'"num_keypoints": {int(visible[i].sum())}}}')
                out.write(("" if first else ",\n") + ",\n".join(lines))
                first = False
            number += batch.num_rows
        out.write("]}\n")
        summary.faces = annotation_id
    return summary


def wider_file_name(path: str) -> tuple[str, str]:
    """(event folder, image name without extension) of an image path, as WIDER prediction files use."""
    parts = path.rstrip("/").split("/")
    stem = parts[-1].rsplit(".", 1)[0] if "." in parts[-1] else parts[-1]
    return (parts[-2] if len(parts) > 1 else ""), stem


def _export_wider(config: ExportConfig) -> ExportSummary:
    """One `.txt` per image in its event folder: name, count, then `x y w h score` lines, best first."""
    summary = ExportSummary()
    fs, root = filesystem(config.out, config.storage_options)
    if not is_remote(config.out):
        fs.makedirs(root, exist_ok=True)
    made: set[str] = set()
    seen: set[str] = set()
    for batch in _batches(config, ["path", "faces", "error"]):
        faces = _kept(config, batch)
        paths = batch.column("path").to_pylist()
        errors = batch.column("error").to_pylist()
        starts = np.searchsorted(faces.row, np.arange(batch.num_rows + 1))
        for row, path in enumerate(paths):
            event, stem = wider_file_name(path)
            key = f"{event}/{stem}"
            if key in seen:
                raise AnnotationsError(f"{path}: a second row becomes {key}.txt (WIDER files are named by "
                                       "folder and image name only; is an image listed twice?)")
            seen.add(key)
            if errors[row] is not None:
                # The protocol needs a file per image; an image not looked at has no detection.
                summary.errors += 1
            lo, hi = starts[row], starts[row + 1]
            order = lo + np.argsort(-faces.scores[lo:hi], kind="stable")
            lines = [stem, str(len(order))]
            for i in order:
                x1, y1, x2, y2 = faces.boxes[i]
                lines.append(f"{x1:.{config.decimals}f} {y1:.{config.decimals}f} {x2 - x1:.{config.decimals}f} "
                             f"{y2 - y1:.{config.decimals}f} {faces.scores[i]:.6f}")
            folder = root.rstrip("/") + "/" + event if event else root.rstrip("/")
            if folder not in made and not is_remote(config.out):
                fs.makedirs(folder, exist_ok=True)
                made.add(folder)
            with fs.open(f"{folder}/{stem}.txt", "w", encoding="utf-8") as handle:
                handle.write("\n".join(lines) + "\n")
            summary.files += 1
            summary.images += 1
            summary.faces += len(order)
    return summary


def _export_csv(config: ExportConfig) -> ExportSummary:
    """A header and one line per face: path, image size, face index, box, score, five landmark points."""
    summary = ExportSummary(files=1)
    digits = config.decimals
    with _open_text(config, config.out) as out:
        writer = csv.writer(out)
        writer.writerow(CSV_COLUMNS)
        for batch in _batches(config, ["path", "width", "height", "faces", "error"]):
            summary.errors += _errors_in(batch)
            summary.images += batch.num_rows - _errors_in(batch)
            faces = _kept(config, batch)
            if not len(faces):
                continue
            paths = batch.column("path").to_pylist()
            widths = batch.column("width").to_pylist()
            heights = batch.column("height").to_pylist()
            numbers = np.round(np.hstack([faces.boxes, faces.scores[:, None], faces.landmarks]), digits)
            buffer = io.StringIO()
            rows = csv.writer(buffer)
            for i, row in enumerate(faces.row):
                values = ["" if math.isnan(v) else v for v in numbers[i].tolist()]
                rows.writerow([_name(config, paths[row]), widths[row], heights[row], int(faces.index[i])] + values)
            out.write(buffer.getvalue())
            summary.faces += len(faces)
    return summary
