"""The crops job: Ray Data cuts aligned face chips out of an annotate run's images into Parquet, one row per face.

The pipeline: read the annotations (Parquet) -> pick each image's faces (filters, resume) ->
FaceCropper actors (read the image, warp each face, encode it) -> each actor commits its batch as
one part through jobs/output's PartWriter (fenced, retried, atomic, named by its paths) -> small
summaries to the driver. The chips' bytes never pass through the driver; a batch is a part, so a
kill loses at most one batch per actor.
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mtcnn.align import ALIGN_METHODS, AlignError, align_face, transform_points

from jobs.inputs.annotation_files import annotation_files, check_schema, run_metadata_of
from jobs.inputs.decode import DEFAULT_MAX_PIXELS
from jobs.runtime.data_context import ray_data_context
from jobs.output import OutputMode, PartsOutput, PartWriter, path_digests
from jobs.inputs.reading import PERMANENT, TRANSIENT, ReadFailure, ReadPolicy, first_line, read_image
from jobs.common.storage import filesystem, is_remote, join

log = logging.getLogger(__name__)

#: Key of the crops run's settings (JSON) in each part's key-value metadata.
METADATA_KEY = b"mtcnn_jobs.crops"
FACE_CHOICES = ("all", "largest", "best")
#: CPU share of the read and face-choosing tasks.
LIGHT_CPUS = 0.25
IMAGE_FORMATS = ("jpeg", "png")

CROP_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),           # the source image, as the annotations name it
    pa.field("face", pa.int32()),                           # index in the annotation row's faces; null: image error
    pa.field("box", pa.list_(pa.float32(), 4)),              # x1, y1, x2, y2 in the source image
    pa.field("score", pa.float32()),
    pa.field("landmarks", pa.list_(pa.float32(), 10)),       # five points in the source image
    pa.field("crop", pa.binary()),                          # the chip, encoded (JPEG or PNG)
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("crop_landmarks", pa.list_(pa.float32(), 10)),  # the five points in the chip
    pa.field("transform", pa.list_(pa.float32(), 6)),        # 2 x 3 source -> chip matrix, row-major
    pa.field("error", pa.string()),
    pa.field("error_kind", pa.string()),                     # 'permanent' or 'transient' (redone on resume)
])

#: The selected faces of one image: the annotation's face struct plus its index in the row.
SELECTED_FACE = pa.struct([pa.field("index", pa.int32()), pa.field("box", pa.list_(pa.float32(), 4)),
                           pa.field("score", pa.float32()), pa.field("landmarks", pa.list_(pa.float32(), 10))])


@dataclass(frozen=True)
class CropSettings:
    """How faces are chosen and cut: everything that changes the rows."""

    align: str = field(default="similarity", metadata={"choices": ALIGN_METHODS, "help": (
        "similarity: the five landmarks onto the ArcFace 5-point template scaled to --size; box: the "
        "square around the box with --margin")})
    size: int = field(default=112, metadata={"help": "chip width and height in pixels"})
    margin: float = field(default=0.0, metadata={
        "help": "chip pixels of context around the face, half on each side"})
    min_score: float = field(default=0.0, metadata={"help": "cut only faces scoring at least this"})
    min_size: float = field(default=0.0, metadata={
        "help": "cut only faces whose box is at least this many pixels on its shorter side"})
    faces: str = field(default="all", metadata={"choices": FACE_CHOICES, "help": (
        "all faces of an image, or only its largest, or its best-scoring")})
    image_format: str = field(default="jpeg", metadata={"choices": IMAGE_FORMATS, "help": "chip encoding"})
    quality: int = field(default=95, metadata={"help": "JPEG quality"})

    def __post_init__(self) -> None:
        if self.align not in ALIGN_METHODS:
            raise ValueError(f"--align must be one of {', '.join(ALIGN_METHODS)}, got {self.align!r}")
        if self.faces not in FACE_CHOICES:
            raise ValueError(f"--faces must be one of {', '.join(FACE_CHOICES)}, got {self.faces!r}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"--image-format must be one of {', '.join(IMAGE_FORMATS)}, got {self.image_format!r}")
        if int(self.size) != self.size or not 8 <= self.size <= 4096:
            raise ValueError(f"--size must be a whole number of pixels from 8 to 4096, got {self.size!r}")
        if not 0 <= self.margin < self.size:
            raise ValueError(f"--margin must be at least 0 and less than --size {self.size}, got {self.margin!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality must be 1 to 100, got {self.quality}")
        if self.min_size < 0:
            raise ValueError(f"--min-size must be 0 or more, got {self.min_size}")


@dataclass
class CropsConfig:
    """Everything one crops run needs: the one declaration of each setting, its flag and its help."""

    annotations: str = field(metadata={"positional": True, "metavar": "ANNOTATIONS", "help": (
        "an annotate OUTPUT (folder or s3:// prefix) or a Parquet file with its schema")})
    output: str = field(metadata={"positional": True, "metavar": "OUTPUT",
                                  "help": "folder or object-store prefix for the chips' Parquet parts"})
    settings: CropSettings = field(default_factory=CropSettings, metadata={"nested": ""})
    files: str | None = field(default=None, metadata={"help": (
        "also write each chip as a file: FILES/<image folder>/<image name>_<face>.jpg")})
    address: str | None = field(default=None, metadata={
        "help": "Ray cluster address (default: embedded local Ray)"})
    concurrency: int | None = field(default=None, metadata={"help": "cropper actors (default: one per CPU)"})
    cpus_per_actor: float = field(default=1.0, metadata={"help": "CPUs per cropper actor"})
    batch_size: int = field(default=64, metadata={"help": "images per cropper call and part"})
    storage_options: dict = field(default_factory=dict, metadata={
        "help": "JSON object of fsspec/s3fs options, e.g. credentials or endpoint_url"})
    overwrite: bool = field(default=False, metadata={
        "flag": "--restart", "aliases": ("--overwrite",),
        "help": "remove earlier chips in OUTPUT and start over, instead of resuming"})
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={"help": "larger images become error rows"})
    #: Log a progress line every progress_seconds (Ray Data's own bars: RAY_DATA_PROGRESS=1).
    show_progress: bool = field(default=True, metadata={"cli": False})
    progress_seconds: float = field(default=30.0, metadata={"help": "seconds between progress lines"})

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1, got {self.concurrency}")
        if self.cpus_per_actor <= 0:
            raise ValueError(f"--cpus-per-actor must be positive, got {self.cpus_per_actor}")


@dataclass
class CropsSummary:
    """What a run did."""

    skipped: int = 0
    redo: int = 0
    images: int = 0
    crops: int = 0
    errors: int = 0
    parts: int = 0
    seconds: float = 0.0

    @property
    def crops_per_second(self) -> float:
        """Chips cut per wall-clock second of the run, start-up included."""
        return self.crops / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """One-line report for the end of a run."""
        return (f"cut {self.crops} face chips from {self.images} images ({self.skipped} already done), "
                f"{self.errors} error rows, {self.crops_per_second:.1f} crops/s in {self.seconds:.1f} s; "
                f"{self.parts} parts written")


# -- choosing faces ---------------------------------------------------------------------------

def select_faces(batch: pa.Table, settings: CropSettings, done) -> pa.Table:
    """Annotation rows -> (path, width, height, selected faces) for images with a face to cut that are not done yet."""
    import ray

    done_digests = ray.get(done) if isinstance(done, ray.ObjectRef) else done
    paths = batch.column("path").to_pylist()
    errors = batch.column("error").to_pylist() if "error" in batch.column_names else [None] * len(paths)
    faces_lists = batch.column("faces").to_pylist()
    keep_paths, widths, heights, chosen = [], [], [], []
    pending = np.ones(len(paths), dtype=bool)
    if len(done_digests):
        digests = path_digests(paths)
        where = np.searchsorted(done_digests, digests).clip(max=len(done_digests) - 1)
        pending = done_digests[where] != digests
    width_column = batch.column("width").to_pylist() if "width" in batch.column_names else [None] * len(paths)
    height_column = batch.column("height").to_pylist() if "height" in batch.column_names else [None] * len(paths)
    for row, (path, error, faces) in enumerate(zip(paths, errors, faces_lists)):
        if error is not None or not faces or not pending[row]:
            continue  # annotate could not look at it, found no face, or this output has it
        picked = []
        for index, face in enumerate(faces):
            box = face.get("box")
            if box is None or face.get("score") is None or face["score"] < settings.min_score:
                continue
            if min(box[2] - box[0], box[3] - box[1]) < settings.min_size:
                continue
            picked.append({"index": index, "box": box, "score": face["score"],
                           "landmarks": face.get("landmarks")})
        if picked and settings.faces == "largest":
            picked = [max(picked, key=lambda f: (f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1]))]
        elif picked and settings.faces == "best":
            picked = [max(picked, key=lambda f: f["score"])]
        if picked:
            keep_paths.append(path)
            widths.append(width_column[row])
            heights.append(height_column[row])
            chosen.append(picked)
    return pa.table({"path": pa.array(keep_paths, pa.string()), "width": pa.array(widths, pa.int32()),
                     "height": pa.array(heights, pa.int32()),
                     "faces": pa.array(chosen, pa.list_(SELECTED_FACE))})


# -- cutting ----------------------------------------------------------------------------------

def chip_file_name(path: str, face: int, common_root: str, extension: str) -> str:
    """Where a chip's file goes under --files: the image's folder below the common root, then <stem>_<face>.<ext>."""
    relative = path[len(common_root):].lstrip("/") if common_root and path.startswith(common_root) \
        else path.split("://", 1)[-1].lstrip("/")
    folder, name = posixpath.split(relative.replace("\\", "/"))
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return posixpath.join(folder, f"{stem}_{face}.{extension}")


class FaceCropper:
    """Ray Data actor: cuts the chosen faces of a batch of images and commits them as one part."""

    def __init__(self, settings: CropSettings, writer: PartWriter, storage_options: dict,
                 files: str | None, common_root: str, max_pixels: int) -> None:
        # Ray gives each actor its CPU share; OpenCV's own threads would fight the other actors.
        cv2.setNumThreads(1)
        self.settings = settings
        self.writer = writer
        self.storage_options = storage_options
        self.files = files
        self.common_root = common_root
        self.policy = ReadPolicy(max_pixels=max_pixels)
        self.extension = "jpg" if settings.image_format == "jpeg" else "png"
        self.encode_params = [cv2.IMWRITE_JPEG_QUALITY, settings.quality] if settings.image_format == "jpeg" \
            else [cv2.IMWRITE_PNG_COMPRESSION, 3]
        self.files_fs, self.files_root = filesystem(files, storage_options) if files else (None, "")

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows: list[dict] = []
        paths = batch.column("path").to_pylist()
        if not paths:
            return pa.table({"part": pa.array([], pa.string()), "images": pa.array([], pa.int64()),
                             "crops": pa.array([], pa.int64()), "errors": pa.array([], pa.int64())})
        for path, width, height, faces in zip(paths, batch.column("width").to_pylist(),
                                               batch.column("height").to_pylist(),
                                               batch.column("faces").to_pylist()):
            try:
                rows.extend(self._cut(path, width, height, faces))
            except Exception as error:  # noqa: BLE001 - one image's failure becomes its error row
                rows.append(_error_row(path, f"cutting failed: {type(error).__name__}: {first_line(error)}",
                                       TRANSIENT))
        table = pa.Table.from_pylist(rows, schema=CROP_SCHEMA)
        # The part is the batch's write: committed whole, named by its paths, so a retried task
        # replaces it rather than adding a second copy of its rows.
        name = self.writer.commit(table).rsplit("/", 1)[-1]
        errors = table.num_rows - table.column("error").null_count
        return pa.table({"part": [name], "images": [len(paths)], "crops": [table.num_rows - errors],
                         "errors": [errors]})

    def _cut(self, path: str, width: int | None, height: int | None, faces: list[dict]) -> list[dict]:
        """The rows of one image: a chip per face, or one error row if the image cannot be read."""
        try:
            image = read_image(path, self.storage_options, self.policy)
        except ReadFailure as failure:
            return [_error_row(path, failure.reason, failure.kind)]
        if width is not None and height is not None and (image.shape[1], image.shape[0]) != (width, height):
            return [_error_row(path, f"image is {image.shape[1]}x{image.shape[0]} but was annotated at "
                                     f"{width}x{height}: changed since annotate ran?", PERMANENT)]
        rows = []
        for face in faces:
            row = {"path": path, "face": face["index"], "box": face["box"], "score": face["score"],
                   "landmarks": face["landmarks"]}
            try:
                landmarks = np.asarray(face["landmarks"], np.float64) if face["landmarks"] is not None else None
                chip, matrix = align_face(image, np.asarray(face["box"], np.float64), landmarks,
                                          self.settings.align, self.settings.size, self.settings.margin)
            except AlignError as error:
                rows.append({**row, "error": str(error), "error_kind": PERMANENT})
                continue
            ok, encoded = cv2.imencode("." + self.extension, cv2.cvtColor(chip, cv2.COLOR_RGB2BGR),
                                       self.encode_params)
            if not ok:
                rows.append({**row, "error": f"could not encode the chip as {self.settings.image_format}",
                             "error_kind": TRANSIENT})
                continue
            data = encoded.tobytes()
            if self.files_fs is not None:
                # Files first, then the part: a committed row's file is always there.
                target = join(self.files_root, chip_file_name(path, face["index"], self.common_root, self.extension))
                if not is_remote(self.files):
                    os.makedirs(posixpath.dirname(target), exist_ok=True)
                self.files_fs.pipe_file(target, data)
            points = transform_points(landmarks, matrix).ravel() if landmarks is not None else None
            rows.append({**row, "crop": data, "width": chip.shape[1], "height": chip.shape[0],
                         "crop_landmarks": points.tolist() if points is not None else None,
                         "transform": matrix.ravel().tolist()})
        return rows


def _error_row(path: str, reason: str, kind: str) -> dict:
    return {"path": path, "error": reason, "error_kind": kind}


# -- output -----------------------------------------------------------------------------------

def settings_metadata(config: CropsConfig, source: dict | None) -> dict:
    """What made these chips: the crop settings and the annotate run they came from."""
    return {"settings": asdict(config.settings),
            "annotations": {"weights_sha256": ((source or {}).get("weights") or {}).get("sha256"),
                            "detector": (source or {}).get("detector")},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def crop_settings_of(metadata: dict) -> dict:
    """The part of a crops run's metadata that changes its rows."""
    return {"settings": metadata.get("settings")}


def common_root(location: str, storage_options: dict) -> str:
    """The longest folder that holds every image the annotations name (from the min and max path of each file)."""
    fs, files = annotation_files(location, storage_options)
    low = high = None
    for path in files:
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            for batch in parquet.iter_batches(columns=["path"], batch_size=65536):
                bounds = pc.min_max(batch.column(0))
                if bounds["min"].as_py() is None:
                    continue
                low = bounds["min"].as_py() if low is None else min(low, bounds["min"].as_py())
                high = bounds["max"].as_py() if high is None else max(high, bounds["max"].as_py())
    if low is None:
        return ""
    # The common prefix of the smallest and largest string is that of all strings between them.
    prefix = os.path.commonprefix([low, high])
    return prefix[:prefix.rfind("/") + 1] if "/" in prefix else ""


# -- the job ----------------------------------------------------------------------------------

def crops(config: CropsConfig, on_batch: Callable[[CropsSummary], None] | None = None) -> CropsSummary:
    """Run the crops job; on_batch is called after each committed part."""
    from jobs.runtime.ray_env import init_ray

    started = time.perf_counter()
    fs, files = annotation_files(config.annotations, config.storage_options)
    with fs.open(files[0], "rb") as handle:
        schema = pq.read_schema(handle)
    check_schema(schema, files[0])
    metadata = settings_metadata(config, run_metadata_of(config.annotations, config.storage_options))
    output = PartsOutput(config.output, config.storage_options, METADATA_KEY, metadata, crop_settings_of, "crops",
                         mode=OutputMode.RESTART if config.overwrite else OutputMode.RESUME)
    output.check()
    output.open()
    summary = CropsSummary()
    try:
        index = output.scan()
        done, summary.redo = index.done, index.redo
        summary.skipped = len(done)
        log.info("%d images already cut in %s (%d transient error rows to redo)", len(done), config.output,
                 summary.redo)
        root = common_root(config.annotations, config.storage_options) if config.files else ""
        init_ray(config.address)
        _run_pipeline(config, output, files, fs, schema, done, root, summary, started, on_batch)
    finally:
        output.close()
        summary.seconds = time.perf_counter() - started
    return summary


def _run_pipeline(config: CropsConfig, output: PartsOutput, files: list[str], fs, schema, done, root: str,
                  summary: CropsSummary, started: float, on_batch) -> None:
    """read annotations -> select faces -> FaceCropper actors (each commits its part) -> summaries."""
    import ray
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    with ray_data_context():
        columns = [c for c in ("path", "width", "height", "faces", "error") if c in schema.names]
        # Local paths as they are; object stores through the same fsspec filesystem (and options) as
        # everything else, so endpoints and credentials work the same way for Ray's readers.
        # Reading and choosing faces are light; small CPU shares keep them from waiting behind
        # croppers that hold every whole CPU (which would stall the pipeline on a small machine).
        dataset = ray.data.read_parquet(files, filesystem=PyFileSystem(FSSpecHandler(fs)), partitioning=None,
                                        num_cpus=LIGHT_CPUS).select_columns(columns)  # pushed into the read
        dataset = dataset.map_batches(select_faces, batch_format="pyarrow", batch_size=4096, num_cpus=LIGHT_CPUS,
                                      fn_kwargs={"settings": config.settings, "done": ray.put(done)})
        resources = ray.cluster_resources()
        actors = config.concurrency or max(1, int((resources.get("CPU", 1) - LIGHT_CPUS) // config.cpus_per_actor))
        dataset = dataset.map_batches(
            FaceCropper, batch_size=config.batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=config.cpus_per_actor,
            fn_constructor_kwargs={"settings": config.settings, "writer": output.writer(),
                                   "storage_options": config.storage_options,
                                   "files": config.files, "common_root": root, "max_pixels": config.max_pixels})
        last_report = time.monotonic()
        for rows in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            summary.parts += rows.num_rows
            summary.images += int(pc.sum(rows.column("images")).as_py() or 0)
            summary.crops += int(pc.sum(rows.column("crops")).as_py() or 0)
            summary.errors += int(pc.sum(rows.column("errors")).as_py() or 0)
            if config.show_progress and time.monotonic() - last_report >= config.progress_seconds:
                last_report = time.monotonic()
                elapsed = time.perf_counter() - started
                log.info("%d images, %d crops, %d errors, %.1f crops/s, %d parts", summary.images,
                         summary.crops, summary.errors, summary.crops / elapsed, summary.parts)
            if on_batch is not None:
                on_batch(summary)


__all__ = ["CROP_SCHEMA", "CropSettings", "CropsConfig", "CropsSummary", "FaceCropper", "chip_file_name",
           "crops", "select_faces"]
