"""The annotate job's Parquet schema, its rows, and the run metadata stored with them."""

from __future__ import annotations

import datetime
import enum
import json
import platform
from dataclasses import asdict

import numpy as np
import pyarrow as pa

from mtcnn import Detections, DetectorConfig

class ErrorKind(str, enum.Enum):
    """Whose fault an error row is, which decides whether a later run redoes it."""

    #: The file's own (gone, not an image, over a limit): final.
    PERMANENT = "permanent"
    #: Anything else (network, credentials, memory, a file changing while read): the next run redoes it.
    TRANSIENT = "transient"
    #: Its worker process died on it twice in this run (a decoder crash, the OOM killer, a kill
    #: from outside): the next run tries it once more, alone, and only a second run's deaths are final.
    CRASHED = "crashed"


#: Key of the run metadata (JSON) in each Parquet file's key-value metadata.
METADATA_KEY = b"mtcnn_jobs.annotate"
#: A part's key-value metadata: the arithmetic its rows were detected in ("fp32", "bf16", or
#: several, comma-separated, when workers of a heterogeneous cluster chose differently under
#: precision "auto"); the run's METADATA_KEY says what was asked for.
PRECISION_KEY = b"mtcnn_jobs.precision"

FACE_TYPE = pa.struct([
    pa.field("box", pa.list_(pa.float32(), 4)),        # x1, y1, x2, y2 in displayed-image pixels
    pa.field("score", pa.float32()),
    pa.field("landmarks", pa.list_(pa.float32(), 10)),  # x, y of l eye, r eye, nose, l/r mouth
])

ANNOTATION_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("faces", pa.list_(FACE_TYPE)),
    pa.field("error", pa.string()),
    # An ErrorKind value: 'permanent' (final), 'transient' or 'crashed' (redone by the next run); null if no error.
    pa.field("error_kind", pa.string()),
    # Null: detected as it is. Otherwise the factor the image was shrunk by before detection, to fit
    # the worker's memory or --max-side: faces under min_face_size / scale pixels may be missed.
    # Boxes and landmarks are in the original image's pixels either way.
    pa.field("scale", pa.float32()),
])
#: Bumped when ANNOTATION_SCHEMA changes: parts of two versions are not mixed in one OUTPUT.
SCHEMA_VERSION = 2


def annotation_table(paths: list[str], sizes: list[tuple[int, int] | None],
                     detections: list[Detections | None], errors: list[str | None],
                     error_kinds: list[str | None] | None = None,
                     scales: list[float | None] | None = None) -> pa.Table:
    """Rows of the output schema: one per path, faces null-free (an empty list when none)."""
    if error_kinds is None:
        error_kinds = ["permanent" if error is not None else None for error in errors]
    count = len(paths)
    face_counts = np.array([len(d) if d is not None else 0 for d in detections], dtype=np.int32)
    offsets = np.zeros(count + 1, dtype=np.int32)
    np.cumsum(face_counts, out=offsets[1:])
    present = [d for d in detections if d is not None and len(d)]
    boxes = np.concatenate([d.boxes for d in present]).astype(np.float32) if present \
        else np.zeros((0, 4), np.float32)
    scores = np.concatenate([d.scores for d in present]).astype(np.float32) if present \
        else np.zeros(0, np.float32)
    # Landmarks (N, 5, 2) flattened as x, y pairs in point order.
    points = np.concatenate([d.landmarks.reshape(-1, 10) for d in present]).astype(np.float32) \
        if present else np.zeros((0, 10), np.float32)
    faces_struct = pa.StructArray.from_arrays(
        [pa.FixedSizeListArray.from_arrays(pa.array(boxes.ravel()), 4),
         pa.array(scores),
         pa.FixedSizeListArray.from_arrays(pa.array(points.ravel()), 10)],
        fields=list(FACE_TYPE))
    # Images that failed to decode get a null faces list, not an empty one: nothing was looked at.
    failed = np.array([d is None for d in detections], dtype=bool)
    faces = pa.ListArray.from_arrays(pa.array(offsets), faces_struct,
                                     mask=pa.array(failed) if failed.any() else None)
    widths = pa.array([s[0] if s else None for s in sizes], pa.int32())
    heights = pa.array([s[1] if s else None for s in sizes], pa.int32())
    return pa.Table.from_arrays([pa.array(paths, pa.string()), widths, heights, faces,
                                 pa.array(errors, pa.string()), pa.array(error_kinds, pa.string()),
                                 pa.array(scales if scales is not None else [None] * count, pa.float32())],
                                schema=ANNOTATION_SCHEMA)


def row_detections(faces: pa.Array | pa.ChunkedArray) -> list[Detections | None]:
    """A faces column back as one Detections per row, faces in stored order; None for error rows.

    The inverse of `annotation_table` for the faces: boxes (N, 4), scores (N,), landmarks (N, 5, 2).
    """
    if isinstance(faces, pa.ChunkedArray):
        faces = faces.combine_chunks() if faces.num_chunks != 1 else faces.chunk(0)
    faces = faces.cast(pa.list_(FACE_TYPE))
    offsets = faces.offsets.to_numpy()
    # `values` ignores a slice of the list array but `offsets` index into it, so they agree.
    values = faces.values

    def column(name: str, width: int) -> np.ndarray:
        field = values.field(name)
        flat = field.flatten() if width > 1 else field
        return flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)

    boxes, scores, points = column("box", 4), column("score", 1)[:, 0], column("landmarks", 10)
    valid = faces.is_valid().to_numpy(zero_copy_only=False)
    return [Detections(boxes[lo:hi].copy(), scores[lo:hi].copy(), points[lo:hi].reshape(-1, 5, 2).copy())
            if ok else None for lo, hi, ok in zip(offsets[:-1], offsets[1:], valid)]


def run_metadata(weights_source: str, weights_sha256: str, weights_provenance: dict,
                 detector: DetectorConfig, max_pixels: int, max_bytes: int | None = None) -> dict:
    """What made these rows: weights identity, detection parameters, versions and time."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package_version = version("mtcnn-jobs")
    except PackageNotFoundError:
        package_version = "unknown"
    return {
        "weights": {"source": weights_source, "sha256": weights_sha256,
                    "provenance": weights_provenance},
        "detector": _jsonable(asdict(detector)),
        "max_pixels": max_pixels,
        "max_bytes": max_bytes,
        "schema_version": SCHEMA_VERSION,
        "package": "mtcnn-jobs", "version": package_version,
        "python": platform.python_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def settings_of(metadata: dict) -> dict:
    """The parts of run metadata that change the rows (so runs with equal settings can be mixed)."""
    return {"weights_sha256": metadata.get("weights", {}).get("sha256"),
            "detector": metadata.get("detector"), "max_pixels": metadata.get("max_pixels"),
            "max_bytes": metadata.get("max_bytes"), "schema_version": metadata.get("schema_version", 1),
            "max_side": metadata.get("max_side")}


def with_metadata(schema: pa.Schema, metadata: dict) -> pa.Schema:
    """The schema carrying run metadata as JSON in its key-value metadata."""
    return schema.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})


def read_metadata(schema: pa.Schema) -> dict | None:
    """Run metadata stored in a Parquet file's schema, or None if it has none."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else None


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value
