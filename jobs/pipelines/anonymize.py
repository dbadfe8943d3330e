"""The anonymize job: every image of INPUT written to OUTPUT under the same relative path, its faces hidden.

The pipeline is annotate's (jobs/pipelines/annotate.py), with a different worker and record:
list (annotate's streamed listing, leaving out what OUTPUT's record already holds) ->
FaceAnonymizer actors (read, detect or look up the boxes of an annotate run, hide each face,
encode in the input's format, write the file atomically) -> one record row per input to the
driver, which commits them as Parquet parts through jobs/output (lease, resume scan, settings
check, a part at least every commit_seconds). A file is written before its row is committed, so
a committed row's file is whole and there; a file written whose row was not committed yet (a kill)
is written again by the next run, with the same bytes.

Pixels: the image is decoded as displayed (EXIF orientation applied) and written upright, so the
mask lands where a viewer shows the face and no orientation tag is needed. The file is re-encoded
from the pixels: nothing of the input's metadata is carried over but its ICC colour profile (JPEG
APP2, PNG iCCP), unless --keep-metadata (JPEG and PNG: EXIF with its orientation set to 1 and its
thumbnail, which shows the faces unhidden, blanked; XMP, IPTC and text chunks as they are).
Its command line is jobs/commands/anonymize.py.
"""

from __future__ import annotations

import html
import logging
import os
import posixpath
import shutil
import struct
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Callable

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtcnn import DetectorConfig, FaceDetector, in_original, shrunk
from mtcnn.weights import CascadeWeights

from jobs.common.detector_args import DETECTOR_FLAGS
from jobs.common.pages import file_stem, shown
from jobs.common.redaction import public_path, redact, redact_text
from jobs.common.schema import ErrorKind, run_metadata
from jobs.common.storage import filesystem, is_remote, parse_storage_options, protocol_prefix
from jobs.inputs.annotation_files import annotation_files, flatten_faces, iter_batches, run_metadata_of
from jobs.inputs.decode import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from jobs.inputs.reading import ReadFailure, ReadPolicy, first_line, read_image, read_image_and_bytes
from jobs.inputs.sources import plan_shards
from jobs.inputs.stored_weights import load_weights_from
from jobs.output import CommitBuffer, OutputError, OutputMode, PartsOutput, StorePatience, path_digests
from jobs.output.parts import committed_parts, write_whole
# The same run machinery as annotate: its streamed listing with resume and claims, its crash
# journal, its start (resume scan and read probe) and its Ray connection.
from jobs.pipelines.image_run import (PATH_BLOCK_BYTES, SPLIT_BLOCKS, Journal, RunPlan, RunSummary, detection_budget,
                                      detection_scale, connect, image_source, row_urls,
                                      start_run, unlisted_reasons)
from jobs.runtime.data_context import ray_data_context
from jobs.runtime.progress import ProgressLine

PERMANENT, TRANSIENT, CRASHED = (kind.value for kind in ErrorKind)

log = logging.getLogger(__name__)

#: Key of the run's settings (JSON) in each record part's key-value metadata.
METADATA_KEY = b"mtcnn_jobs.anonymize"
RECORD_VERSION = 1
MODES = ("blur", "pixelate", "solid")
SHAPES = ("ellipse", "box")
#: Detection for recall: faces from 14 px (annotate: 20) and lower R- and O-Net thresholds (annotate:
#: 0.6, 0.7, 0.7). A face missed is a face shown; a false box only blurs a patch of background.
RECALL_MIN_FACE = 14.0
RECALL_THRESHOLDS = (0.6, 0.6, 0.6)
#: Cells across a face's longer side: blur averages it down to this many, pixelate shows this many blocks.
BLUR_CELLS = 3
PIXELATE_CELLS = 4
#: Same-format encoding per file signature: (OpenCV extension, parameters).
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Below a local OUTPUT: where copies are written before they are renamed into place, so that what
#: a killed worker leaves is in one folder, swept when the next run holds the lease.
SCRATCH = "_anonymize_tmp"

RECORD_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),      # the input as listed, minus credentials
    pa.field("output_path", pa.string()),               # the anonymized copy; null on error (no file)
    pa.field("faces_hidden", pa.int32()),               # masks drawn; null on error
    pa.field("boxes", pa.list_(pa.list_(pa.float32(), 4))),  # the faces' boxes (x1, y1, x2, y2, as displayed)
    pa.field("width", pa.int32()),                      # as displayed (and as written)
    pa.field("height", pa.int32()),
    pa.field("error", pa.string()),
    pa.field("error_kind", pa.string()),                # as annotate: permanent, transient, crashed
])


def _recall_detector() -> DetectorConfig:
    return DetectorConfig(min_face_size=RECALL_MIN_FACE, thresholds=RECALL_THRESHOLDS)


@dataclass(frozen=True)
class MaskSettings:
    """How faces are hidden and files written: everything that changes the output images."""

    mode: str = field(default="blur", metadata={"choices": MODES, "help": (
        "blur (averaged down to a few cells across the face, then smoothed), pixelate (large blocks) "
        "or solid (black)")})
    mask_scale: float = field(default=1.3, metadata={
        "help": "the mask covers the face box grown by this factor about its centre"})
    shape: str = field(default="ellipse", metadata={"choices": SHAPES,
                                                    "help": "mask shape inside the grown box"})
    quality: int = field(default=95, metadata={"help": "JPEG (and WebP) quality of the written copies"})
    keep_metadata: bool = field(default=False, metadata={"help": (
        "keep EXIF (orientation reset, thumbnail blanked), XMP and IPTC of JPEG and PNG inputs; "
        "default: only the ICC colour profile is kept, GPS and every other field dropped")})

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"--shape must be one of {', '.join(SHAPES)}, got {self.shape!r}")
        if not 1.0 <= self.mask_scale <= 4.0:
            raise ValueError(f"--mask-scale must be from 1 to 4, got {self.mask_scale}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality must be 1 to 100, got {self.quality}")


@dataclass
class AnonymizeConfig:
    """Everything one anonymize run needs: the one declaration of each setting, its flag and its help
    (jobs/common/settings.py builds `mtcnn-jobs anonymize`'s options and reads --config YAML from it)."""

    input: str = field(metadata={"positional": True, "metavar": "INPUT", "help": (
        "folder, object-store prefix (s3://bucket/prefix) or manifest (.txt, one path a line; "
        ".parquet with a 'path' column)")})
    output: str = field(metadata={"positional": True, "metavar": "OUTPUT", "help": (
        "folder or object-store prefix: each image under its path relative to INPUT (a manifest's "
        "folder), and the Parquet record")})
    masks: MaskSettings = field(default_factory=MaskSettings, metadata={"nested": ""})
    annotations: str | None = field(default=None, metadata={"metavar": "RUN", "help": (
        "hide the boxes of this annotate OUTPUT instead of detecting (an image it lacks becomes a "
        "transient error row)")})
    weights: str | CascadeWeights = field(default="reference", metadata={
        "parse": str, "help": "'reference', a weights file, or a training run folder"})
    detector: DetectorConfig = field(default_factory=_recall_detector, metadata={
        "nested": "", "fields": DETECTOR_FLAGS})
    address: str | None = field(default=None, metadata={
        "help": "Ray cluster address (default: embedded local Ray)"})
    num_gpus: float = field(default=0.0, metadata={"help": "GPUs per actor, fractions allowed (0: CPU)"})
    cpus_per_actor: float | None = field(default=None, metadata={
        "help": "CPUs (and torch threads) per actor (default 1)"})
    concurrency: int | None = field(default=None, metadata={"help": "actors (default: one per CPU or GPU share)"})
    batch_size: int = field(default=16, metadata={"help": "images per actor call"})
    storage_options: dict = field(default_factory=dict, metadata={
        "parse": str, "help": "JSON object of fsspec/s3fs options, e.g. credentials or endpoint_url"})
    overwrite: bool = field(default=False, metadata={
        "flag": "--restart", "aliases": ("--overwrite",),
        "help": "start the record over (files are rewritten as the images come), instead of resuming"})
    retry_errors: bool = field(default=False, metadata={
        "help": "redo every error row of earlier runs (default: only transient and crashed ones)"})
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={"help": "larger images become error rows"})
    max_bytes: int = field(default=DEFAULT_MAX_BYTES, metadata={"help": "larger files become error rows"})
    read_retries: int = field(default=4, metadata={"help": "retries of a read that fails for a transient reason"})
    max_side: int | None = field(default=None, metadata={"help": (
        "detect on a copy shrunk so its longer side is at most this (faster on huge images; faces under "
        "min-face-size / scale are missed); the mask is drawn on the full image")})
    memory_per_actor: int | None = field(default=None, metadata={"help": (
        "bytes of memory an actor may use (default: its CPU share of its node's or container's memory); "
        "an image whose detection would need more is detected on a shrunk copy, as in annotate; the "
        "mask is drawn on the full image")})
    pixels_in_flight: int = field(default=64_000_000, metadata={
        "help": "decoded pixels an actor holds at once"})
    rows_per_file: int = field(default=4096, metadata={"help": "rows per Parquet part of the record"})
    commit_seconds: float = field(default=60.0, metadata={"help": "commit record rows at least this often"})
    store_patience_seconds: float = field(default=300.0, metadata={"flag": "--store-patience", "help": (
        "seconds to keep retrying an OUTPUT store that does not answer")})
    preview: str | None = field(default=None, metadata={"metavar": "DIR", "help": (
        "after the run, write DIR/index.html: a sample of originals beside their anonymized copies")})
    preview_limit: int = field(default=24, metadata={"help": "images on the --preview page"})
    show_progress: bool = field(default=True, metadata={"cli": False})

    def __post_init__(self) -> None:
        if isinstance(self.storage_options, str):
            self.storage_options = parse_storage_options(self.storage_options)
        for name in ("batch_size", "max_pixels", "max_bytes", "rows_per_file", "pixels_in_flight", "preview_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1, got {self.concurrency}")
        if self.cpus_per_actor is not None and self.cpus_per_actor <= 0:
            raise ValueError(f"--cpus-per-actor must be positive, got {self.cpus_per_actor}")
        if self.num_gpus < 0:
            raise ValueError(f"--num-gpus must be 0 or more, got {self.num_gpus}")
        if self.commit_seconds <= 0:
            raise ValueError(f"--commit-seconds must be positive, got {self.commit_seconds}")

    @property
    def read_policy(self) -> ReadPolicy:
        """The limits and retries for reading images (annotate's)."""
        return ReadPolicy(max_pixels=self.max_pixels, max_bytes=self.max_bytes, retries=self.read_retries)


@dataclass
class AnonymizeSummary(RunSummary):
    """What an anonymize run did."""

    preview: str | None = None

    def line(self) -> str:
        """One-line report for the end of a run."""
        text = (f"anonymized {self.images - self.errors} images ({self.skipped} already done), {self.faces} "
                f"faces hidden, {self.errors} error rows (no file written), {self.images_per_second:.2f} "
                f"images/s in {self.seconds:.1f} s; {len(self.files)} record parts written{self.retry_note()}")
        return text + (f"; preview {self.preview}" if self.preview else "")


# -- masks ------------------------------------------------------------------------------------

def mask_region(box, scale: float, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The pixel rectangle (x1, y1, x2, y2, end exclusive) of a box grown by scale about its centre,
    clipped to the image; None if nothing of it is inside."""
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy, half_w, half_h = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * scale / 2, (y2 - y1) * scale / 2
    left, top = max(0, int(np.floor(cx - half_w))), max(0, int(np.floor(cy - half_h)))
    right, bottom = min(width, int(np.ceil(cx + half_w))), min(height, int(np.ceil(cy + half_h)))
    if right <= left or bottom <= top:
        return None
    return left, top, right, bottom


def hide_faces(image: np.ndarray, boxes: np.ndarray, settings: MaskSettings) -> np.ndarray:
    """A copy of an RGB image with every box hidden; pixels outside the masks are left as they are."""
    out = image.copy()
    height, width = image.shape[:2]
    for box in np.asarray(boxes, np.float64).reshape(-1, 4):
        x1, y1, x2, y2 = box
        if not np.all(np.isfinite(box)) or x2 <= x1 or y2 <= y1:
            continue
        region = mask_region(box, settings.mask_scale, width, height)
        if region is None:
            continue
        left, top, right, bottom = region
        patch = out[top:bottom, left:right]
        face = max(x2 - x1, y2 - y1)
        hidden = _hidden(patch, settings.mode, face)
        if settings.shape == "ellipse":
            inside = np.zeros(patch.shape[:2], np.uint8)
            # The ellipse of the whole grown box (which may reach past the image's edge).
            cx, cy = (x1 + x2) / 2 - left, (y1 + y2) / 2 - top
            axes = ((x2 - x1) * settings.mask_scale / 2, (y2 - y1) * settings.mask_scale / 2)
            cv2.ellipse(inside, ((cx, cy), (2 * axes[0], 2 * axes[1]), 0.0), 1, -1)
            np.copyto(patch, hidden, where=inside[..., None].astype(bool))
        else:
            patch[...] = hidden
    return out


def _hidden(patch: np.ndarray, mode: str, face: float) -> np.ndarray:
    """What replaces a patch: averaged to a few cells per face then smoothed, blocks, or black."""
    height, width = patch.shape[:2]
    if mode == "solid":
        return np.zeros_like(patch)
    cells = BLUR_CELLS if mode == "blur" else PIXELATE_CELLS
    cell = max(2.0, face / cells)
    small = cv2.resize(patch, (max(1, round(width / cell)), max(1, round(height / cell))),
                       interpolation=cv2.INTER_AREA)
    if mode == "pixelate":
        return cv2.resize(small, (width, height), interpolation=cv2.INTER_NEAREST)
    smooth = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    # Two box filters of a cell's size (close to a Gaussian, at a cost that does not grow with it)
    # take out the cells' edges, which a detector could still read as features.
    size = max(3, int(cell) | 1)
    for _ in range(2):
        smooth = cv2.blur(smooth, (size, size), borderType=cv2.BORDER_REPLICATE)
    return smooth


# -- encoding, metadata -----------------------------------------------------------------------

def image_format(data: bytes, name: str) -> str:
    """The OpenCV extension to write a copy in the input's own format (its signature, else its name)."""
    head = bytes(data[:16])
    if head.startswith(b"\xff\xd8"):
        return ".jpg"
    if head.startswith(PNG_SIGNATURE):
        return ".png"
    if head.startswith(b"BM"):
        return ".bmp"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return ".webp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return ".tiff"
    extension = posixpath.splitext(name)[1].lower()
    if extension in (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"):
        return extension
    raise ValueError("cannot tell which format to write it in (not JPEG, PNG, BMP, WebP or TIFF)")


def encode_image(image: np.ndarray, original: bytes, extension: str, settings: MaskSettings) -> bytes:
    """RGB pixels encoded like the original (format, ICC profile; with keep_metadata its metadata too)."""
    jpeg = [cv2.IMWRITE_JPEG_QUALITY, settings.quality]
    params = {".jpg": jpeg, ".jpeg": jpeg, ".webp": [cv2.IMWRITE_WEBP_QUALITY, settings.quality],
              ".png": [cv2.IMWRITE_PNG_COMPRESSION, 3]}
    ok, encoded = cv2.imencode(extension, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params.get(extension, []))
    if not ok:
        raise ValueError(f"OpenCV could not encode the copy as {extension}")
    data = encoded.tobytes()
    if extension in (".jpg", ".jpeg"):
        return _jpeg_with(data, _jpeg_segments(original, settings.keep_metadata))
    if extension == ".png":
        return _png_with(data, _png_chunks(original, settings.keep_metadata))
    return data


def _jpeg_segments(data: bytes, keep_metadata: bool) -> list[bytes]:
    """The APPn/COM segments of a JPEG to carry over: ICC (APP2) always; EXIF, XMP, IPTC with keep_metadata."""
    if not data.startswith(b"\xff\xd8"):
        return []
    kept, position = [], 2
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:
            position += 1
            continue
        if marker == 0xDA or marker == 0xD9:  # start of scan, end of image: no more headers
            break
        (length,) = struct.unpack(">H", data[position + 2:position + 4])
        segment = data[position:position + 2 + length]
        body = segment[4:]
        if marker == 0xE2 and body.startswith(b"ICC_PROFILE\0"):
            kept.append(segment)
        elif keep_metadata and marker == 0xE1 and body.startswith(b"Exif\0\0"):
            tiff = upright_exif(body[6:])
            if tiff is not None:
                kept.append(b"\xff\xe1" + struct.pack(">H", 8 + len(tiff)) + b"Exif\0\0" + tiff)
        elif keep_metadata and (marker in (0xE1, 0xED, 0xFE)):  # XMP, IPTC (APP13), comments
            kept.append(segment)
        position += 2 + length
    return kept


def _jpeg_with(encoded: bytes, segments: list[bytes]) -> bytes:
    """An encoded JPEG with segments inserted after SOI and OpenCV's JFIF APP0."""
    if not segments:
        return encoded
    position = 2
    if encoded[2:4] == b"\xff\xe0":
        position = 4 + struct.unpack(">H", encoded[4:6])[0]
    return encoded[:position] + b"".join(segments) + encoded[position:]


def _png_chunks(data: bytes, keep_metadata: bool) -> list[bytes]:
    """The chunks of a PNG to carry over: iCCP always; eXIf (sanitised) and text chunks with keep_metadata."""
    if not data.startswith(PNG_SIGNATURE):
        return []
    kept, position = [], 8
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        chunk = data[position:position + 12 + length]
        if kind == b"IDAT" or kind == b"IEND":
            break
        if kind == b"iCCP":
            kept.append(chunk)
        elif keep_metadata and kind == b"eXIf":
            tiff = upright_exif(chunk[8:8 + length])
            if tiff is not None:
                kept.append(_png_chunk(b"eXIf", tiff))
        elif keep_metadata and kind in (b"tEXt", b"iTXt", b"zTXt"):
            kept.append(chunk)
        position += 12 + length
    return kept


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png_with(encoded: bytes, chunks: list[bytes]) -> bytes:
    """An encoded PNG with chunks inserted after IHDR (where iCCP and eXIf belong: before PLTE and IDAT)."""
    if not chunks:
        return encoded
    position = 8 + 12 + struct.unpack(">I", encoded[8:12])[0]
    return encoded[:position] + b"".join(chunks) + encoded[position:]


def upright_exif(tiff: bytes) -> bytes | None:
    """EXIF (a TIFF structure) for upright pixels: Orientation set to 1, and the thumbnail (IFD1, an
    unmasked copy of the image) unlinked and its bytes zeroed. None if it cannot be parsed (dropped)."""
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        data = bytearray(tiff)
        (ifd0,) = struct.unpack(order + "I", data[4:8])
        (count,) = struct.unpack(order + "H", data[ifd0:ifd0 + 2])
        for index in range(count):
            entry = ifd0 + 2 + 12 * index
            if struct.unpack(order + "H", data[entry:entry + 2])[0] == 0x0112:  # Orientation, SHORT
                data[entry + 8:entry + 10] = struct.pack(order + "H", 1)
        next_at = ifd0 + 2 + 12 * count
        (ifd1,) = struct.unpack(order + "I", data[next_at:next_at + 4])
        if ifd1:
            (count1,) = struct.unpack(order + "H", data[ifd1:ifd1 + 2])
            values = {}
            for index in range(count1):
                entry = ifd1 + 2 + 12 * index
                tag, kind = struct.unpack(order + "HH", data[entry:entry + 4])
                values[tag] = struct.unpack(order + ("H" if kind == 3 else "I"),
                                            data[entry + 8:entry + (10 if kind == 3 else 12)])[0]
            if 0x0201 in values and 0x0202 in values:  # JPEG thumbnail: offset, length
                start, length = values[0x0201], values[0x0202]
                data[start:start + length] = bytes(len(data[start:start + length]))
            data[next_at:next_at + 4] = bytes(4)
        return bytes(data)
    except (KeyError, struct.error, IndexError):
        return None


# -- where copies go --------------------------------------------------------------------------

def input_base(source: str, storage_options: dict, kind: str) -> str:
    """What output names are relative to: INPUT itself for a folder or prefix, else its folder.

    In the form the listing gives paths in (absolute local paths, or scheme://bucket/key)."""
    fs, root = filesystem(source, storage_options)
    prefix = protocol_prefix(source)
    if not prefix:
        root = os.path.abspath(root)
    base = root if kind == "folder" else (posixpath.dirname(root) if prefix else os.path.dirname(root))
    return prefix + base.rstrip("/") if prefix else base.rstrip(os.sep) or os.sep


def relative_name(path: str, base: str) -> str:
    """Where an input's copy goes below OUTPUT: its path below base; one outside base (a manifest
    naming other folders or buckets) keeps its whole path, scheme and leading '/' left out."""
    if path.startswith(base.rstrip("/") + "/"):
        name = path[len(base.rstrip("/")) + 1:]
    else:
        name = path.split("://", 1)[-1]
    name = posixpath.normpath(name.replace("\\", "/").split("?", 1)[0]).lstrip("/")
    if name in ("", ".") or name.startswith("../"):
        name = posixpath.normpath(path.split("://", 1)[-1].split("?", 1)[0]).lstrip("/")
    return name


def _output_root(output: str, storage_options: dict) -> str:
    fs, root = filesystem(output, storage_options)
    return protocol_prefix(output) + root if is_remote(output) else os.path.abspath(root)


# -- boxes of an annotate run -----------------------------------------------------------------

@dataclass
class BoxIndex:
    """An annotate run's boxes by path digest, compact (16 bytes a path, 16 a face), for the actors."""

    digests: np.ndarray   # S16, sorted
    offsets: np.ndarray   # int64 (N + 1,) into boxes
    boxes: np.ndarray     # float32 (F, 4)
    sizes: np.ndarray     # int32 (N, 2) width, height; -1 where unknown

    def lookup(self, path: str) -> tuple[np.ndarray, tuple[int, int] | None] | None:
        """(boxes, (width, height) or None) of path, or None if the run has no usable row for it."""
        if not len(self.digests):
            return None
        digest = path_digests([path])[0]
        at = int(np.searchsorted(self.digests, digest))
        if at >= len(self.digests) or self.digests[at] != digest:
            return None
        size = tuple(int(v) for v in self.sizes[at])
        return self.boxes[self.offsets[at]:self.offsets[at + 1]], (size if min(size) >= 0 else None)


def load_box_index(location: str, storage_options: dict) -> BoxIndex:
    """The boxes of every annotated row (error rows left out) of an annotate OUTPUT."""
    digests, counts, boxes, sizes = [], [], [], []
    for batch in iter_batches(location, ["path", "faces", "width", "height", "error"], storage_options):
        table = pa.Table.from_batches([batch]).filter(pc.is_null(batch.column("error")))
        faces = table.column("faces")
        flat = flatten_faces(faces)
        digests.append(path_digests(table.column("path").to_pylist()))
        counts.append(pc.fill_null(pc.list_value_length(faces), 0).to_numpy(zero_copy_only=False))
        boxes.append(flat.boxes.astype(np.float32))
        sizes.append(np.stack([pc.fill_null(table.column(c), -1).to_numpy() for c in ("width", "height")], 1))
    if not digests:
        return BoxIndex(np.zeros(0, "S16"), np.zeros(1, np.int64), np.zeros((0, 4), np.float32),
                        np.zeros((0, 2), np.int32))
    digest, count = np.concatenate(digests), np.concatenate(counts).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(count)])
    all_boxes, all_sizes = np.concatenate(boxes), np.concatenate(sizes).astype(np.int32)
    order = np.argsort(digest, kind="stable")
    lengths = count[order]
    new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # Each face's place in all_boxes: its row's old start plus its position within the row.
    where = np.repeat(offsets[:-1][order] - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
    return BoxIndex(digest[order], new_offsets, all_boxes[where].reshape(-1, 4), all_sizes[order])


# -- the worker -------------------------------------------------------------------------------

class FaceAnonymizer:
    """Ray Data actor: reads, finds (or looks up) faces, hides them and writes each copy; one record row per input."""

    def __init__(self, weights: CascadeWeights | None, detector: DetectorConfig, use_gpu: bool, threads: int,
                 settings: MaskSettings, storage_options: dict, policy: ReadPolicy, output: str, base: str,
                 lease, boxes=None, state=None, max_side: int | None = None,
                 pixels_in_flight: int = 64_000_000, memory_per_actor: int | None = None) -> None:
        import ray
        import torch

        cv2.setNumThreads(1)
        self.detector, self.budget = None, None
        if weights is not None:
            device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
            if device == "cpu":
                torch.set_num_threads(threads)
            self.detector = FaceDetector(weights, device=device, config=detector)
            # annotate's rule: on CPUs each detection fits the actor's memory, shared by the images its
            # threads detect at once; GPU memory is not what the estimate models.
            if device == "cpu":
                self.budget = detection_budget(memory_per_actor) // max(1, threads)
        self.boxes = ray.get(boxes) if isinstance(boxes, ray.ObjectRef) else boxes
        self.settings, self.storage_options, self.policy = settings, storage_options, policy
        self.output, self.base, self.lease, self.state = output, base, lease, state
        self.remote = is_remote(output)
        self.scratch = None if self.remote else os.path.join(output, SCRATCH)
        self.fs, _ = filesystem(output, storage_options)
        self.max_side, self.pixels_in_flight = max_side, pixels_in_flight

    def __call__(self, batch: pa.Table) -> pa.Table:
        paths, urls, unlisted = batch.column("path").to_pylist(), row_urls(batch), unlisted_reasons(batch)
        rows: list[dict] = [{"path": path} for path in paths]
        journal = Journal(self.state, paths)
        todo = []
        for index, (path, reason) in enumerate(zip(paths, unlisted)):
            poison, kind = journal.poisoned(path)
            if reason is not None:
                rows[index].update(error=reason, error_kind=PERMANENT)
            elif poison is not None:
                rows[index].update(error=poison, error_kind=kind)
            else:
                todo.append(index)
        # Images that were in flight when a worker died go alone, the rest together (annotate's rule).
        alone = [[i] for i in todo if journal.suspect(paths[i])]
        together = [i for i in todo if not journal.suspect(paths[i])]
        if todo:
            self.lease.check()  # fencing: a job that lost OUTPUT writes no more files into it
        for group in alone + ([together] if together else []):
            journal.working_on([paths[i] for i in group])
            self._run(group, paths, urls, rows)
        journal.finish()
        table = pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)
        if self.state is not None:
            kinds = table.column("error_kind").to_pylist()
            self.state.add.remote(table.num_rows, int(pc.sum(table.column("faces_hidden")).as_py() or 0),
                                  table.num_rows - table.column("error").null_count,
                                  sum(k in (TRANSIENT, CRASHED) for k in kinds))
        return table

    def _run(self, indices: list[int], paths: list[str], urls: list[str], rows: list[dict]) -> None:
        """Read, find, hide and write the images of indices, pixels_in_flight at a time."""
        loaded, pixels = [], 0
        for index in indices:
            try:
                image, data = read_image_and_bytes(urls[index], self.storage_options, self.policy)
            except ReadFailure as failure:
                rows[index].update(error=failure.reason, error_kind=failure.kind)
                continue
            loaded.append((index, image, data))
            pixels += image.shape[0] * image.shape[1]
            if pixels >= self.pixels_in_flight:
                self._hide_and_write(loaded, paths, rows)
                loaded, pixels = [], 0
        if loaded:
            self._hide_and_write(loaded, paths, rows)

    def _hide_and_write(self, loaded: list, paths: list[str], rows: list[dict]) -> None:
        found = self._faces([image for _, image, _ in loaded], [paths[i] for i, _, _ in loaded])
        for (index, image, data), boxes in zip(loaded, found):
            row = rows[index]
            row.update(width=image.shape[1], height=image.shape[0])
            if isinstance(boxes, tuple):  # (error, kind)
                row.update(error=boxes[0], error_kind=boxes[1])
                continue
            try:
                target = self.output.rstrip("/") + "/" + relative_name(paths[index], self.base)
                if target == paths[index]:
                    row.update(error="its copy would replace it: choose an OUTPUT outside INPUT", error_kind=PERMANENT)
                    continue
                encoded = encode_image(hide_faces(image, boxes, self.settings), data,
                                       image_format(data, paths[index]), self.settings)
                _, inner = filesystem(target, self.storage_options)
                write_whole(self.fs, inner, encoded, self.remote, self.scratch)
            except Exception as error:  # noqa: BLE001 - one image's failure is its row
                row.update(error=redact_text(f"writing the copy failed: {type(error).__name__}: {first_line(error)}"),
                           error_kind=TRANSIENT)
                continue
            row.update(output_path=public_path(target), faces_hidden=len(boxes),
                       boxes=np.asarray(boxes, np.float32).reshape(-1, 4).tolist())

    def _faces(self, images: list[np.ndarray], paths: list[str]) -> list:
        """Per image, its boxes (N, 4) as displayed, or (error, kind)."""
        if self.boxes is not None:
            results = []
            for image, path in zip(images, paths):
                entry = self.boxes.lookup(path)
                if entry is None:
                    results.append(("no annotated row for it in --annotations (annotate it, or run without "
                                    "--annotations)", TRANSIENT))
                elif entry[1] is not None and entry[1] != (image.shape[1], image.shape[0]):
                    results.append((f"image is {image.shape[1]}x{image.shape[0]} but was annotated at "
                                    f"{entry[1][0]}x{entry[1][1]}: changed since annotate ran?", PERMANENT))
                else:
                    results.append(entry[0])
            return results
        config, scaled, failed = self.detector.config, [], {}
        for index, image in enumerate(images):
            try:
                scale = detection_scale(*image.shape[:2], config, self.budget, self.max_side)
            except ReadFailure as failure:
                # Its row is this error; a tiny stand-in keeps the call's images in step.
                failed[index], scale = (failure.reason, failure.kind), min(1.0, 64 / max(image.shape[:2]))
            scaled.append(shrunk(image, scale))
        try:
            found = self.detector.detect(scaled)
        except Exception:  # noqa: BLE001 - one at a time, to find the culprit
            found = []
            for image in scaled:
                try:
                    found.append(self.detector.detect([image])[0])
                except Exception as error:  # noqa: BLE001 - its row says so
                    found.append((redact_text(f"detection failed: {type(error).__name__}: {first_line(error)}"),
                                  TRANSIENT))
        found = [failed.get(index, f) for index, f in enumerate(found)]
        return [f if isinstance(f, tuple) else in_original(f, image.shape[:2], small.shape[:2]).boxes
                for f, image, small in zip(found, images, scaled)]


# -- the job ----------------------------------------------------------------------------------

def settings_of(metadata: dict) -> dict:
    """What changes the copies and rows: runs agreeing on it may share an OUTPUT."""
    return {key: metadata.get(key) for key in ("masks", "detector", "weights_sha256", "annotations", "max_pixels",
                                               "max_bytes", "max_side", "record_version")}


def _metadata(config: AnonymizeConfig, weights: CascadeWeights | None) -> dict:
    source = None
    if config.annotations:
        run = run_metadata_of(config.annotations, config.storage_options) or {}
        source = {"weights_sha256": (run.get("weights") or {}).get("sha256"), "detector": run.get("detector")}
    base = run_metadata(str(weights.source or "(in memory)") if weights else "", weights.sha256 if weights else None,
                        {}, config.detector, config.max_pixels, config.max_bytes)
    return redact({"masks": asdict(config.masks), "detector": None if config.annotations else base["detector"],
                   "weights_sha256": weights.sha256 if weights else None, "annotations": source,
                   "max_pixels": config.max_pixels, "max_bytes": config.max_bytes, "max_side": config.max_side,
                   "record_version": RECORD_VERSION, "version": base["version"], "created": base["created"]})


def _check_apart(config: AnonymizeConfig, base: str, kind: str) -> None:
    """OUTPUT may not be INPUT's folder or inside it: a later run would list the copies as inputs."""
    out = _output_root(config.output, config.storage_options).rstrip("/")
    if kind == "folder" and (out == base or out.startswith(base.rstrip("/") + "/")):
        raise OutputError(f"OUTPUT {public_path(config.output)} is INPUT or inside it: the next run would "
                          "take the anonymized copies for inputs; choose an OUTPUT outside INPUT")


def anonymize(config: AnonymizeConfig, on_rows: Callable[[AnonymizeSummary], None] | None = None) -> AnonymizeSummary:
    """Run the anonymize job; on_rows is called with the progress counts as they change."""
    started = time.perf_counter()
    shards = plan_shards(config.input, config.storage_options)
    base = input_base(config.input, config.storage_options, shards[0].kind)
    _check_apart(config, base, shards[0].kind)
    if config.annotations:
        annotation_files(config.annotations, config.storage_options)  # exists and holds Parquet
    weights = None if config.annotations else load_weights_from(config.weights, config.storage_options)
    output = PartsOutput(config.output, config.storage_options, METADATA_KEY, _metadata(config, weights),
                         settings_of, "anonymize", mode=OutputMode.RESTART if config.overwrite else OutputMode.RESUME,
                         retry_errors=config.retry_errors,
                         patience=StorePatience(seconds=config.store_patience_seconds))
    output.check()
    plan = RunPlan(weights, shards, output)
    boxes = load_box_index(config.annotations, config.storage_options) if config.annotations else None
    resources = connect(config)
    output.open()
    summary = AnonymizeSummary()
    scratch = None if is_remote(config.output) else os.path.join(_output_root(config.output, config.storage_options),
                                                                   SCRATCH)
    try:
        if scratch:  # the lease is ours: what is left there is from killed workers of earlier runs
            shutil.rmtree(scratch, ignore_errors=True)
        state = start_run(config, plan)
        _stream(config, plan, base, boxes, resources, state, summary, on_rows)
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    finally:
        output.close()
        summary.seconds = time.perf_counter() - started
    if config.preview:
        summary.preview = make_page(config.output, config.preview, config.preview_limit, config.storage_options)
    return summary


def _stream(config: AnonymizeConfig, plan: RunPlan, base: str, boxes: BoxIndex | None, resources: dict, state,
            summary: AnonymizeSummary, on_rows) -> None:
    """list -> FaceAnonymizer actors (files written there) -> record rows committed here."""
    import ray

    def committed(table: pa.Table, path: str) -> None:
        summary.files.append(path)
        summary.images += table.num_rows
        summary.faces += int(pc.sum(table.column("faces_hidden")).as_py() or 0)
        summary.errors += table.num_rows - table.column("error").null_count
        summary.transient += int(pc.sum(pc.is_in(table.column("error_kind"),
                                                 pa.array([TRANSIENT, CRASHED]))).as_py() or 0)

    use_gpu = config.num_gpus > 0 and not config.annotations
    cpus = config.cpus_per_actor or 1.0
    actors = config.concurrency or max(1, int(resources.get("GPU", 0) // config.num_gpus) if use_gpu
                                       else int(resources.get("CPU", 1) // cpus))
    with ray_data_context(block_size=PATH_BLOCK_BYTES):
        dataset = ray.data.read_datasource(image_source(plan.shards, config.storage_options, state),
                                           num_cpus=0, concurrency=1,
                                           override_num_blocks=SPLIT_BLOCKS * len(plan.shards))
        dataset = dataset.map_batches(
            FaceAnonymizer, batch_size=config.batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus,
            num_gpus=config.num_gpus if use_gpu else None,
            fn_constructor_kwargs={
                "weights": plan.weights, "detector": config.detector, "use_gpu": use_gpu, "threads": max(1, int(cpus)),
                "settings": config.masks, "storage_options": config.storage_options, "policy": config.read_policy,
                "output": _output_root(config.output, config.storage_options), "base": base,
                "lease": plan.output.lease.fence(), "boxes": ray.put(boxes) if boxes is not None else None,
                "state": state, "max_side": config.max_side, "pixels_in_flight": config.pixels_in_flight,
                "memory_per_actor": config.memory_per_actor})
        progress = ProgressLine(state, summary, config.show_progress, on_rows)
        progress.start()
        try:
            with CommitBuffer(plan.output, config.rows_per_file, config.commit_seconds, committed) as buffer:
                for rows in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                    buffer.add(rows.select(RECORD_SCHEMA.names).cast(RECORD_SCHEMA))
        finally:
            progress.stop()
    counts = ray.get(state.snapshot.remote())
    summary.listed, summary.skipped, summary.repeated = counts["listed"], counts["skipped"], counts["repeated"]


def read_record(output: str, storage_options: dict | None = None) -> pa.Table:
    """The committed record rows of an anonymize OUTPUT."""
    import pyarrow.dataset as pads

    parts = committed_parts(output, storage_options)
    if not parts:
        return RECORD_SCHEMA.empty_table()
    fs, _ = filesystem(output, storage_options)
    return pads.dataset(parts, filesystem=fs, format="parquet").to_table()


# -- the page ---------------------------------------------------------------------------------

def make_page(output: str, out_dir: str, limit: int = 24, storage_options: dict | None = None) -> str:
    """DIR/index.html: up to limit originals (as displayed) beside their anonymized copies; its path."""
    storage_options = storage_options or {}
    table = read_record(output, storage_options)
    done = table.filter(pc.is_null(table.column("error"))).sort_by("path")
    failed = table.num_rows - done.num_rows
    os.makedirs(out_dir, exist_ok=True)
    cards, policy = [], ReadPolicy(retries=1)
    for index, row in enumerate(done.slice(0, limit).to_pylist()):
        try:
            pair = [read_image(row["path"], storage_options, policy), read_image(row["output_path"], storage_options,
                                                                                 policy)]
        except ReadFailure as failure:
            cards.append(f"<figure><figcaption>cannot show: {shown(failure.reason)}<br>"
                         f"<span class=path>{shown(row['path'])}</span></figcaption></figure>")
            continue
        names = []
        for side, image in zip(("original", "anonymized"), pair):
            name = f"{index:04d}-{file_stem(row['path'])}-{side}.jpg"
            scale = min(1.0, 480 / max(image.shape[:2]))
            small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else image
            cv2.imwrite(os.path.join(out_dir, name), cv2.cvtColor(small, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, 88])
            names.append(html.escape(name))
        cards.append(f'<figure><img src="{names[0]}" loading="lazy"><img src="{names[1]}" loading="lazy">'
                     f"<figcaption><b>{row['faces_hidden']} faces hidden</b><br>"
                     f"<span class=path>{shown(row['path'])}</span></figcaption></figure>")
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>Anonymized {shown(output)}</title><style>"
            "body{font-family:sans-serif;margin:1em}main{display:flex;flex-wrap:wrap;gap:16px}"
            "figure{margin:0}img{max-width:320px;max-height:320px;margin-right:4px}"
            ".path{font-size:80%;color:#555;word-break:break-all}</style></head><body>"
            f"<h1>Anonymized {shown(output)}</h1><p>{table.num_rows} images in the record: {done.num_rows} "
            f"written, {failed} error rows; {len(cards)} shown, each original (left, as displayed) beside "
            f"its anonymized copy (right).</p><main>{''.join(cards)}</main></body></html>")
    path = os.path.join(out_dir, "index.html")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(page)
    return path


__all__ = ["AnonymizeConfig", "AnonymizeSummary", "BoxIndex", "FaceAnonymizer", "MaskSettings", "RECORD_SCHEMA",
           "anonymize", "encode_image", "hide_faces", "image_format", "load_box_index", "make_page", "mask_region",
           "read_record", "relative_name", "upright_exif"]
