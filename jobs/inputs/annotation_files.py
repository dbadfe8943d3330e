"""Reading annotate-schema Parquet (an annotate OUTPUT, one file, or another tool's) one batch at a time."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.output.parts import committed_parts, naming_damage, read_part
from jobs.common.schema import read_metadata
from jobs.common.storage import filesystem

#: Columns every annotations file needs; faces are list<struct<box[4], score, landmarks[10]>>.
REQUIRED_COLUMNS = ("path", "faces")


class AnnotationsError(ValueError):
    """ANNOTATIONS is missing, empty, or not in the annotate job's schema."""


def annotation_files(location: str, storage_options: dict | None = None):
    """(filesystem, sorted Parquet files) of an annotate OUTPUT folder or prefix, or of one Parquet file."""
    try:
        fs, root = filesystem(location, storage_options)
        if fs.isfile(root):
            return fs, [root]
        # Listed, never globbed: a folder name with '[' or '*' in it is taken literally.
        names = [name for name in fs.ls(root, detail=False) if name.endswith(".parquet")]
        found = sorted(name for name in names if posixpath.basename(name).startswith("part-"))
        if not found:
            # Any Parquet with the schema (another tool's output converted to it), not hidden
            # files or _-prefixed ones that writers keep for their own bookkeeping.
            found = sorted(name for name in names if not posixpath.basename(name).startswith((".", "_")))
    except FileNotFoundError:
        found = []
    except Exception as error:  # noqa: BLE001 - object stores raise many types
        raise AnnotationsError(f"cannot list ANNOTATIONS {location}: {type(error).__name__}: {error}") from None
    if not found:
        raise AnnotationsError(f"no annotations (part-*.parquet or *.parquet) under {location}")
    return fs, found


def check_schema(schema: pa.Schema, source: str, needed: tuple[str, ...] = REQUIRED_COLUMNS) -> None:
    """Raise AnnotationsError naming what is missing when a file lacks the annotate schema's columns."""
    missing = [name for name in needed if name not in schema.names]
    if missing:
        raise AnnotationsError(f"{source} lacks column(s) {missing}; expected the annotate schema "
                               "(path, width, height, faces list<struct<box[4], score, landmarks[10]>>, error)")
    if "faces" in needed:
        faces = schema.field("faces").type
        item = faces.value_type if pa.types.is_list(faces) or pa.types.is_large_list(faces) else None
        if item is None or not pa.types.is_struct(item) or \
                not {"box", "score"} <= {item.field(i).name for i in range(item.num_fields)}:
            raise AnnotationsError(f"{source}: column faces is {faces}, expected "
                                   "list<struct<box: list<float>[4], score: float, landmarks: list<float>[10]>>")


def iter_batches(location: str, columns: list[str], storage_options: dict | None = None,
                 batch_size: int = 8192) -> Iterator[pa.RecordBatch]:
    """Batches of the given columns over every annotations file in order (one file open at a time)."""
    fs, files = annotation_files(location, storage_options)
    for path in files:
        with fs.open(path, "rb") as handle, naming_damage(path):
            parquet = pq.ParquetFile(handle)
            check_schema(parquet.schema_arrow, path, tuple(c for c in columns if c in ("path", "faces")) or ())
            present = [c for c in columns if c in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=batch_size, columns=present):
                # Optional columns (width, height, error) come back null when a file lacks them.
                for name in columns:
                    if name not in present:
                        batch = batch.append_column(name, pa.nulls(batch.num_rows, _OPTIONAL.get(name, pa.string())))
                yield batch.select(columns)


def run_metadata_of(location: str, storage_options: dict | None = None) -> dict | None:
    """The annotate run metadata of the first annotations file, or None if it has none."""
    fs, files = annotation_files(location, storage_options)
    with fs.open(files[0], "rb") as handle, naming_damage(files[0]):
        return read_metadata(pq.read_schema(handle))


@dataclass
class FlatFaces:
    """The faces of a batch of rows, one entry per face: its row, its index in the row's list, and its numbers."""

    row: np.ndarray        # int64 (N,) row of the batch
    index: np.ndarray      # int32 (N,) position in that row's faces list
    boxes: np.ndarray      # float64 (N, 4) x1, y1, x2, y2
    scores: np.ndarray     # float64 (N,)
    landmarks: np.ndarray  # float64 (N, 10), NaN where not given

    def __len__(self) -> int:
        return len(self.scores)


def flatten_faces(faces: pa.Array | pa.ChunkedArray) -> FlatFaces:
    """One entry per face of a faces column (null lists, i.e. error rows, contribute none)."""
    if isinstance(faces, pa.ChunkedArray):
        faces = faces.combine_chunks() if faces.num_chunks != 1 else faces.chunk(0)
    flat = pc.list_flatten(faces)
    row = pc.list_parent_indices(faces).to_numpy().astype(np.int64)
    count = len(row)
    index = (np.arange(count) - np.searchsorted(row, row, side="left")).astype(np.int32)
    boxes = _fixed(flat.field("box"), 4, count)
    scores = flat.field("score").to_numpy(zero_copy_only=False).astype(np.float64)
    names = [flat.type.field(i).name for i in range(flat.type.num_fields)]
    landmarks = _fixed(flat.field("landmarks"), 10, count) if "landmarks" in names \
        else np.full((count, 10), np.nan)
    return FlatFaces(row, index, boxes, np.nan_to_num(scores, nan=0.0), landmarks)


def _fixed(values: pa.Array, width: int, count: int) -> np.ndarray:
    """A list<float> column of `width` numbers per entry as float64 (count, width); nulls become NaN."""
    if values.null_count:
        values = pc.fill_null(values, pa.scalar([None] * width, values.type))
    numbers = pc.list_flatten(values).to_numpy(zero_copy_only=False).astype(np.float64)
    if numbers.size != count * width:
        raise AnnotationsError(f"expected {width} numbers per face, found {numbers.size} for {count} faces")
    return numbers.reshape(count, width)


def read_bytes(path: str, storage_options: dict | None = None) -> tuple[bytes | None, str | None]:
    """(file contents, None), or (None, why not) for a file that has gone or cannot be read."""
    try:
        fs, inner = filesystem(path, storage_options)
        with fs.open(inner, "rb") as handle:
            return handle.read(), None
    except FileNotFoundError:
        return None, "image not found (moved or deleted since it was annotated?)"
    except IsADirectoryError:
        return None, "is a folder, not an image file"
    except PermissionError:
        return None, "permission denied reading the image"
    except Exception as error:  # noqa: BLE001 - network and object-store errors come in many types
        text = str(error).strip().splitlines()
        return None, f"cannot read the image: {type(error).__name__}: {text[0] if text else ''}"


_OPTIONAL = {"width": pa.int32(), "height": pa.int32(), "error": pa.string()}


def read_annotations(output: str, storage_options: dict | None = None,
                     columns: list[str] | None = None) -> pa.Table:
    """The committed rows of an annotate OUTPUT as one Arrow table (for tools on small outputs)."""
    import pyarrow.dataset as pads

    parts = committed_parts(output, storage_options)
    if not parts:
        raise FileNotFoundError(f"no annotate results (part-*.parquet) under {output}")
    fs, _ = filesystem(output, storage_options)
    try:
        return pads.dataset(parts, filesystem=fs, format="parquet").to_table(columns=columns)
    except pa.ArrowException:
        for part in parts:  # which one: read each on its own, to name it
            read_part(fs, part, columns)
        raise
