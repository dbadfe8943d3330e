"""mtcnn-jobs annotate: Ray Data streams images through the cascade into Parquet, one row per image."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from jobs.detector_args import add_detector_arguments, detector_config
from mtcnn import DetectorConfig, FaceDetector, load_weights
from mtcnn.weights import CascadeWeights

from .decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from .schema import (ANNOTATION_SCHEMA, annotation_table, read_metadata, run_metadata, settings_of,
                     with_metadata)
from .sources import InputError, list_inputs
from .storage import filesystem, is_remote, parse_storage_options, redact

log = logging.getLogger(__name__)

#: Output files are named part-<run>-<sequence>.parquet; only these count as results.
PART_PREFIX = "part-"


class OutputError(ValueError):
    """OUTPUT cannot be written, or holds results of incompatible settings."""


@dataclass
class AnnotateConfig:
    """Everything one annotate run needs."""

    input: str
    output: str
    #: 'reference', a weights file or run folder, or weights already loaded.
    weights: str | CascadeWeights = "reference"
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    #: Ray cluster to connect to; None starts an embedded local instance.
    address: str | None = None
    #: GPUs per detector actor (fractions share a GPU); 0 runs the nets on CPU.
    num_gpus: float = 0.0
    #: CPUs per detector actor; also its torch threads. None: 1.
    cpus_per_actor: float | None = None
    #: Detector actors; None: as many as the cluster's GPUs (or CPUs) allow.
    concurrency: int | None = None
    #: Images per detector call.
    batch_size: int = 16
    storage_options: dict = field(default_factory=dict)
    overwrite: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: A Parquet file is committed after this many rows, or flush_seconds, whichever comes first.
    rows_per_file: int = 100_000
    flush_seconds: float = 300.0
    #: Decode in separate CPU tasks (True), inside the detector actors (False), or None: only
    #: when the actors use GPUs, so that CPUs feed them; on CPUs it saves copying pixels around.
    separate_decode: bool | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.num_gpus < 0:
            raise ValueError(f"--num-gpus must be 0 or more, got {self.num_gpus}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1, got {self.concurrency}")
        if self.cpus_per_actor is not None and self.cpus_per_actor <= 0:
            raise ValueError(f"--cpus-per-actor must be positive, got {self.cpus_per_actor}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.max_pixels < 1:
            raise ValueError(f"--max-pixels must be at least 1, got {self.max_pixels}")
        if self.rows_per_file < 1:
            raise ValueError(f"rows_per_file must be at least 1, got {self.rows_per_file}")


@dataclass
class AnnotateSummary:
    """What a run did."""

    listed: int = 0
    skipped: int = 0
    images: int = 0
    faces: int = 0
    errors: int = 0
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        """Images annotated per wall-clock second of the run, start-up included."""
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """One-line report for the end of a run."""
        return (f"annotated {self.images} images ({self.skipped} already done), {self.faces} faces, "
                f"{self.errors} errors, {self.images_per_second:.2f} images/s "
                f"in {self.seconds:.1f} s; {len(self.files)} files written")


# -- workers --------------------------------------------------------------------------------

def read_image(path: str, storage_options: dict, max_pixels: int):
    """(pixels, None) for a readable image, or (None, reason) when it cannot be annotated."""
    try:
        fs, inner = filesystem(path, storage_options)
        with fs.open(inner, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return None, "file not found (moved or deleted after listing?)"
    except IsADirectoryError:
        return None, "is a folder, not an image file"
    except PermissionError:
        return None, "permission denied reading the file"
    except Exception as error:  # network and object-store errors come in many types
        return None, f"cannot read: {type(error).__name__}: {_first_line(error)}"
    try:
        return decode_image(data, max_pixels), None
    except DecodeError as error:
        return None, str(error)
    except MemoryError:
        return None, "out of memory decoding the image; lower --max-pixels or --batch-size"


def decode_batch(batch: pa.Table, storage_options: dict, max_pixels: int) -> pa.Table:
    """Read and decode a batch of paths into raw RGB pixels with their sizes (or an error)."""
    paths = batch.column("path").to_pylist()
    pixels, widths, heights, errors = [], [], [], []
    for path in paths:
        image, error = read_image(path, storage_options, max_pixels)
        pixels.append(image.tobytes() if image is not None else None)
        widths.append(image.shape[1] if image is not None else None)
        heights.append(image.shape[0] if image is not None else None)
        errors.append(error)
    return pa.table({"path": pa.array(paths, pa.string()), "pixels": pa.array(pixels, pa.large_binary()),
                     "width": pa.array(widths, pa.int32()), "height": pa.array(heights, pa.int32()),
                     "error": pa.array(errors, pa.string())})


class FaceAnnotator:
    """Ray Data actor: builds the detector once, then annotates batches of images."""

    def __init__(self, weights: CascadeWeights, detector: DetectorConfig, use_gpu: bool,
                 threads: int, storage_options: dict, max_pixels: int) -> None:
        import torch

        device = "cpu"
        if use_gpu:
            if torch.cuda.is_available():
                device = "cuda"
            else:
                log.warning("--num-gpus given but this worker sees no CUDA device; using its CPU")
        if device == "cpu":
            # Ray gives each actor its CPU share; threads beyond it would fight the other actors.
            torch.set_num_threads(threads)
        self.detector = FaceDetector(weights, device=device, config=detector)
        self.storage_options = storage_options
        self.max_pixels = max_pixels

    def __call__(self, batch: pa.Table) -> pa.Table:
        import numpy as np

        if "pixels" not in batch.column_names:
            batch = decode_batch(batch, self.storage_options, self.max_pixels)
        paths = batch.column("path").to_pylist()
        errors = batch.column("error").to_pylist()
        sizes = list(zip(batch.column("width").to_pylist(), batch.column("height").to_pylist()))
        images, where = [], []
        for index, (pixels, (width, height)) in enumerate(zip(batch.column("pixels").to_pylist(), sizes)):
            if pixels is not None:
                images.append(np.frombuffer(pixels, np.uint8).reshape(height, width, 3))
                where.append(index)
        detections = [None] * len(paths)
        for index, found in zip(where, self._detect(images, errors, where)):
            detections[index] = found
        sizes = [size if detections[i] is not None else None for i, size in enumerate(sizes)]
        return annotation_table(paths, sizes, detections, errors)

    def _detect(self, images, errors, where):
        """Detections per image: one call for the batch, one per image if it fails (one cannot sink all)."""
        # On CPU the detector itself takes the images one at a time over the actor's threads.
        try:
            return self.detector.detect(images)
        except Exception:  # noqa: BLE001 - narrowed to the culprit below
            pass
        results = []
        for image, index in zip(images, where):
            try:
                results.append(self.detector.detect([image])[0])
            except Exception as error:  # noqa: BLE001 - the row records it
                errors[index] = f"detection failed: {type(error).__name__}: {_first_line(error)}"
                results.append(None)
        return results


# -- output ---------------------------------------------------------------------------------

class PartWriter:
    """Commits rows to OUTPUT as part files, each written whole or not at all."""

    def __init__(self, output: str, storage_options: dict, metadata: dict) -> None:
        self.fs, self.root = filesystem(output, storage_options)
        self.local = not is_remote(output)
        if self.local:
            os.makedirs(self.root, exist_ok=True)
        self.schema = with_metadata(ANNOTATION_SCHEMA, metadata)
        self.run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
        self.written: list[str] = []

    def write(self, table: pa.Table) -> str:
        """Commit one file of rows and return its path."""
        name = f"{PART_PREFIX}{self.run_id}-{len(self.written):05d}.parquet"
        final = _join(self.root, name)
        table = table.cast(self.schema)
        if self.local:
            # A rename is atomic: readers and resumed runs never see half a file.
            temporary = _join(self.root, f".{name}.tmp")
            pq.write_table(table, temporary, filesystem=None)
            os.replace(temporary, final)
        else:
            # An object-store PUT (or multipart upload) only appears once complete.
            with self.fs.open(final, "wb") as handle:
                pq.write_table(table, handle)
        self.written.append(final)
        return final


def prepare_output(config: AnnotateConfig, settings: dict) -> set[str]:
    """Check OUTPUT is writable, clear or read it; the paths already annotated there."""
    try:
        fs, root = filesystem(config.output, config.storage_options)
        if not is_remote(config.output):
            os.makedirs(root, exist_ok=True)
            for stale in fs.glob(_join(root, f".{PART_PREFIX}*.tmp")):
                fs.rm(stale)  # half-written files of a run that was stopped
        probe = _join(root, f"_write_test-{uuid.uuid4().hex[:8]}")
        with fs.open(probe, "wb") as handle:
            handle.write(b"ok")
        fs.rm(probe)
        parts = sorted(fs.glob(_join(root, f"{PART_PREFIX}*.parquet")))
    except Exception as error:  # noqa: BLE001 - any failure here means the run cannot start
        raise OutputError(f"OUTPUT {config.output} is not writable: {_first_line(error)}") from None
    if not parts:
        return set()
    if config.overwrite:
        fs.rm(parts)
        log.info("--overwrite: removed %d files of earlier runs from %s", len(parts), config.output)
        return set()
    with fs.open(parts[0], "rb") as handle:
        earlier = read_metadata(pq.read_schema(handle)) or {}
    if settings_of(earlier) != settings:
        raise OutputError(
            f"OUTPUT {config.output} holds results made with other settings "
            f"({_difference(settings_of(earlier), settings)}); pass --overwrite to replace them "
            f"or choose another OUTPUT")
    done = pads.dataset(parts, filesystem=fs, format="parquet").to_table(columns=["path"])
    return set(done.column("path").to_pylist())


# -- the job --------------------------------------------------------------------------------

def annotate(config: AnnotateConfig,
             on_rows: Callable[[AnnotateSummary], None] | None = None) -> AnnotateSummary:
    """Run the annotate job; on_rows is called after each batch of rows arrives."""
    import ray

    from .ray_env import init_ray

    started = time.perf_counter()
    weights = config.weights if isinstance(config.weights, CascadeWeights) \
        else load_weights(config.weights)
    metadata = run_metadata(str(weights.source or "(in memory)"), weights.sha256,
                            redact(weights.provenance), config.detector,
                            config.max_pixels)
    metadata["device"] = "cuda" if config.num_gpus > 0 else "cpu"
    paths = list_inputs(config.input, config.storage_options)
    done = prepare_output(config, settings_of(metadata))
    pending = [path for path in paths if path not in done]
    summary = AnnotateSummary(listed=len(paths), skipped=len(paths) - len(pending))
    log.info("%d images listed under %s; %d already annotated in %s, %d to do",
             len(paths), config.input, summary.skipped, config.output, len(pending))
    if not pending:
        summary.seconds = time.perf_counter() - started
        return summary

    init_ray(config.address)
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = config.show_progress
    context.execution_options.preserve_order = False

    dataset = _build_dataset(pending, config, weights, ray.cluster_resources())
    writer = PartWriter(config.output, config.storage_options, metadata)
    buffered: list[pa.Table] = []
    buffered_rows, last_flush, last_report = 0, time.monotonic(), time.monotonic()

    def flush() -> None:
        nonlocal buffered, buffered_rows, last_flush
        if buffered_rows:
            path = writer.write(pa.concat_tables(buffered))
            summary.files.append(path)
            log.info("wrote %s (%d rows)", path, buffered_rows)
        buffered, buffered_rows, last_flush = [], 0, time.monotonic()

    try:
        for rows in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            rows = rows.select(ANNOTATION_SCHEMA.names)
            buffered.append(rows)
            buffered_rows += rows.num_rows
            summary.images += rows.num_rows
            summary.errors += rows.num_rows - rows.column("error").null_count
            faces = rows.column("faces")
            summary.faces += int(pc.sum(pc.list_value_length(faces)).as_py() or 0)
            if buffered_rows >= config.rows_per_file or \
                    time.monotonic() - last_flush >= config.flush_seconds:
                flush()
            if time.monotonic() - last_report >= 30:
                last_report = time.monotonic()
                rate = summary.images / (time.perf_counter() - started)
                log.info("%d/%d images, %d faces, %d errors, %.2f images/s",
                         summary.images, len(pending), summary.faces, summary.errors, rate)
            if on_rows is not None:
                on_rows(summary)
    finally:
        # Whatever stopped the run, rows already received are committed so a rerun resumes.
        flush()
        summary.seconds = time.perf_counter() - started
    return summary


def _build_dataset(pending: list[str], config: AnnotateConfig, weights: CascadeWeights,
                   resources: dict):
    """paths -> (decode tasks) -> FaceAnnotator actors: a Ray Dataset of annotation rows."""
    import ray

    use_gpu = config.num_gpus > 0
    cpus_per_actor = config.cpus_per_actor or 1.0
    if use_gpu and resources.get("GPU", 0) <= 0:
        raise ValueError(f"--num-gpus {config.num_gpus} asks for GPUs but the Ray cluster has none; "
                         "drop --num-gpus to run on CPUs, or connect to a GPU cluster with --address")
    if config.concurrency is not None:
        actors = config.concurrency
    elif use_gpu:
        actors = max(1, int(resources.get("GPU", 0) // config.num_gpus))
    else:
        actors = max(1, int(resources.get("CPU", 1) // cpus_per_actor))
    separate_decode = use_gpu if config.separate_decode is None else config.separate_decode
    table = pa.table({"path": pa.array(pending, pa.string())})
    # Blocks of one batch each spread the work evenly over the actors from the start.
    blocks = max(1, math.ceil(len(pending) / config.batch_size))
    # An actor beyond one per block would never get work, only cost a process start.
    actors = min(actors, blocks)
    dataset = ray.data.from_arrow([table.slice(i * config.batch_size, config.batch_size)
                                   for i in range(blocks)])
    if separate_decode:
        dataset = dataset.map_batches(decode_batch, batch_size=config.batch_size, batch_format="pyarrow",
                                      fn_kwargs={"storage_options": config.storage_options,
                                                 "max_pixels": config.max_pixels})
    return dataset.map_batches(
        FaceAnnotator, batch_size=config.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor, num_gpus=config.num_gpus or None,
        fn_constructor_kwargs={"weights": weights, "detector": config.detector, "use_gpu": use_gpu,
                               "threads": max(1, int(cpus_per_actor)),
                               "storage_options": config.storage_options,
                               "max_pixels": config.max_pixels})


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _difference(before: dict, now: dict) -> str:
    """Which settings differ, e.g. 'detector.min_face_size 20.0 -> 40.0'."""
    changes = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += [f"{key}.{k} {old.get(k)} -> {new.get(k)}" for k in sorted(set(old) | set(new))
                        if old.get(k) != new.get(k)]
        elif old != new:
            changes.append(f"{key} {old} -> {new}")
    return ", ".join(changes) or "unknown"


# -- command line ---------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of mtcnn-jobs annotate."""
    parser.add_argument("input", metavar="INPUT",
                        help="folder, object-store prefix (s3://bucket/prefix) or manifest "
                             "(.txt, one path a line; .parquet with a 'path' column)")
    parser.add_argument("output", metavar="OUTPUT", help="folder or object-store prefix for the Parquet files")
    add_detector_arguments(parser)
    parser.add_argument("--address", default=None, help="Ray cluster address (default: embedded local Ray)")
    parser.add_argument("--num-gpus", type=float, default=0.0,
                        help="GPUs per detector actor, fractions allowed (default 0: CPU)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="detector actors (default: one per GPU share, or per --cpus-per-actor CPUs)")
    parser.add_argument("--cpus-per-actor", type=float, default=None,
                        help="CPUs (and torch threads) per detector actor (default 1)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per detector call")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="larger images become error rows, checked before decoding (default 100e6)")
    parser.add_argument("--storage-options", default=None,
                        help="JSON object of fsspec/s3fs options, e.g. credentials or endpoint_url")
    parser.add_argument("--overwrite", action="store_true",
                        help="remove earlier results in OUTPUT instead of resuming")


def run(args: argparse.Namespace) -> int:
    """Run mtcnn-jobs annotate from parsed arguments; exit status."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        detector = detector_config(args)
        config = AnnotateConfig(
            input=args.input, output=args.output, weights=args.weights, detector=detector,
            address=args.address, num_gpus=args.num_gpus, concurrency=args.concurrency,
            cpus_per_actor=args.cpus_per_actor, batch_size=args.batch_size,
            storage_options=parse_storage_options(args.storage_options), overwrite=args.overwrite,
            max_pixels=args.max_pixels)
        summary = annotate(config)
    except (InputError, OutputError, ValueError, ConnectionError) as error:
        print(f"mtcnn-jobs annotate: {error}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


__all__ = ["AnnotateConfig", "AnnotateSummary", "FaceAnnotator", "annotate", "decode_batch",
           "read_image"]
