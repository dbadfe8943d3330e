"""The annotate job: Ray Data streams images through the cascade into Parquet, one row per image.

The pipeline: list (read tasks, in chunks, leaving out what is done) -> [decode tasks, on GPU
clusters] -> FaceAnnotator actors -> rows to the driver, which commits them as Parquet parts
(jobs/output: fenced by its lease, a part every rows_per_file rows or commit_seconds, and what is
made when the job is stopped). Rows are small (a path and its faces); pixels never leave the
workers. Its command line is jobs/commands/annotate.py; `mtcnn-jobs evaluate --ray` runs it too.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtcnn import Detections, DetectorConfig, FaceDetector, estimate_peak_bytes, in_original, shrunk
from mtcnn.weights import CascadeWeights

from jobs.common.detector_args import DETECTOR_FLAGS
from jobs.common.redaction import redact, redact_text
from jobs.common.schema import ANNOTATION_SCHEMA, METADATA_KEY, PRECISION_KEY, ErrorKind, annotation_table, run_metadata, settings_of
from jobs.common.storage import parse_storage_options
from jobs.inputs.decode import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from jobs.inputs.reading import ReadFailure, ReadPolicy, first_line, read_image
from jobs.inputs.sources import ListingShard, plan_shards
from jobs.output import CommitBuffer, OutputError, OutputMode, PartsOutput, StorePatience, part_name
from jobs.pipelines.image_run import (PATH_BLOCK_BYTES, SPLIT_BLOCKS, JobStopped, Journal, RunPlan, RunSummary, connect,
                                      detection_budget, detection_scale,
                                      image_source, row_urls, start_run, unlisted_reasons)
from jobs.runtime.data_context import ray_data_context
from jobs.runtime.progress import ProgressLine
from jobs.inputs.stored_weights import load_weights_from

PERMANENT, TRANSIENT, CRASHED = (kind.value for kind in ErrorKind)

log = logging.getLogger(__name__)


def _concurrency(text: str) -> int | tuple[int, int]:
    """N, or MIN,MAX."""
    if "," in text:
        low, high = text.split(",", 1)
        return int(low), int(high)
    return int(text)


@dataclass
class AnnotateConfig:
    """Everything one annotate run needs: the one declaration of each setting, its flag and its help
    (jobs/common/settings.py builds `mtcnn-jobs annotate`'s options and reads --config YAML from it)."""

    input: str = field(metadata={"positional": True, "metavar": "INPUT", "help": (
        "folder, object-store prefix (s3://bucket/prefix) or manifest (.txt, one path a line; "
        ".parquet with a 'path' column)")})
    output: str = field(metadata={"positional": True, "metavar": "OUTPUT",
                                  "help": "folder or object-store prefix for the Parquet files"})
    #: 'reference', a weights file or run folder, or weights already loaded.
    weights: str | CascadeWeights = field(default="reference", metadata={
        "parse": str, "help": "'reference', a weights file, or a training run folder"})
    detector: DetectorConfig = field(default_factory=DetectorConfig, metadata={
        "nested": "", "fields": DETECTOR_FLAGS})
    address: str | None = field(default=None, metadata={
        "help": "Ray cluster address (default: embedded local Ray)"})
    num_gpus: float = field(default=0.0, metadata={
        "help": "GPUs per detector actor, fractions allowed (0: CPU)"})
    cpus_per_actor: float | None = field(default=None, metadata={
        "help": "CPUs (and torch threads) per detector actor (default 1)"})
    concurrency: int | tuple[int, int] | None = field(default=None, metadata={"parse": _concurrency, "help": (
        "detector actors: N, or MIN,MAX for a pool that scales with the cluster (default: one per GPU "
        "share or per --cpus-per-actor CPUs; on a cluster up to twice that)")})
    batch_size: int = field(default=16, metadata={"help": "images per detector call"})
    #: fsspec/s3fs options, or their JSON text (as the flag gives them; checked here, so that a
    #: malformed one is an input error with one line and exit status 2).
    storage_options: dict = field(default_factory=dict, metadata={
        "parse": str, "help": "JSON object of fsspec/s3fs options, e.g. credentials or endpoint_url"})
    overwrite: bool = field(default=False, metadata={
        "flag": "--restart", "aliases": ("--overwrite",),
        "help": "remove earlier results in OUTPUT and start over, instead of resuming"})
    retry_errors: bool = field(default=False, metadata={
        "help": "redo every error row of earlier runs (default: only transient and crashed ones)"})
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={
        "help": "larger images become error rows, checked before decoding"})
    max_bytes: int = field(default=DEFAULT_MAX_BYTES, metadata={
        "help": "larger files become error rows, checked before reading"})
    read_retries: int = field(default=4, metadata={
        "help": "retries of a read that fails for a transient reason, with backoff from 0.5 s"})
    pixels_in_flight: int = field(default=64_000_000, metadata={
        "help": "decoded pixels an actor holds at once; a batch is cut into detector calls under it"})
    memory_per_actor: int | None = field(default=None, metadata={"help": (
        "bytes of memory a detector actor may use (default: its CPU share of its node's or container's "
        "memory); an image whose detection would need more is detected on a shrunk copy, its row's "
        "scale says by how much")})
    max_side: int | None = field(default=None, metadata={"help": (
        "detect on a copy shrunk so its longer side is at most this many pixels (faster on huge "
        "images; faces under min-face-size / scale are missed); the row's scale says so")})
    rows_per_file: int = field(default=4096, metadata={"help": "rows per Parquet part"})
    commit_seconds: float = field(default=60.0, metadata={"help": (
        "commit made rows at least this often, in parts smaller than --rows-per-file if need be: "
        "what a kill loses at most")})
    store_patience_seconds: float = field(default=300.0, metadata={"flag": "--store-patience", "help": (
        "seconds to keep retrying an OUTPUT store that does not answer before the job ends with exit "
        "status 1, every committed part kept")})
    separate_decode: bool | None = field(default=None, metadata={"help": (
        "decode in separate CPU tasks rather than in the detector actors (default: only when the "
        "actors use GPUs, so that CPUs feed them)")})
    show_progress: bool = field(default=True, metadata={"cli": False})

    def __post_init__(self) -> None:
        if isinstance(self.storage_options, str):
            self.storage_options = parse_storage_options(self.storage_options)
        if self.num_gpus < 0:
            raise ValueError(f"--num-gpus must be 0 or more, got {self.num_gpus}")
        low, high = _bounds(self.concurrency)
        if low is not None and (low < 1 or high < low):
            raise ValueError(f"--concurrency must be N or MIN,MAX with 1 <= MIN <= MAX, got {self.concurrency}")
        if self.cpus_per_actor is not None and self.cpus_per_actor <= 0:
            raise ValueError(f"--cpus-per-actor must be positive, got {self.cpus_per_actor}")
        for name in ("batch_size", "max_pixels", "max_bytes", "rows_per_file", "pixels_in_flight"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.read_retries < 0:
            raise ValueError(f"--read-retries must be 0 or more, got {self.read_retries}")
        if self.commit_seconds <= 0:
            raise ValueError(f"--commit-seconds must be positive, got {self.commit_seconds}")
        if getattr(self.detector, "precision", None) == "fp16" and not self.num_gpus:
            raise ValueError("--precision fp16 runs on GPUs only: pass --num-gpus, or use bf16 or fp32")

    @property
    def read_policy(self) -> ReadPolicy:
        """The limits and retries for reading images."""
        return ReadPolicy(max_pixels=self.max_pixels, max_bytes=self.max_bytes, retries=self.read_retries)


@dataclass
class AnnotateSummary(RunSummary):
    """What an annotate run did."""

    def line(self) -> str:
        """One-line report for the end of a run."""
        again = f", {self.repeated} listed twice" if self.repeated else ""
        return (f"annotated {self.images} images ({self.skipped} already done{again}), {self.faces} faces, "
                f"{self.errors} errors, {self.images_per_second:.2f} images/s "
                f"in {self.seconds:.1f} s; {len(self.files)} files written{self.retry_note()}")


# -- workers ---------------------------------------------------------------------------------

def decode_batch(batch: pa.Table, storage_options: dict, policy: ReadPolicy, state=None) -> pa.Table:
    """Read and decode a batch of paths into raw RGB pixels with their sizes (or an error)."""
    paths = batch.column("path").to_pylist()
    urls = row_urls(batch)
    unlisted = unlisted_reasons(batch)
    journal = Journal(state, paths)
    pixels, widths, heights, errors, kinds = [], [], [], [], []
    for path, url, reason in zip(paths, urls, unlisted):
        image, (error, kind) = None, journal.poisoned(path)
        if reason is not None:
            error, kind = reason, PERMANENT
        elif error is None:
            journal.working_on([path])
            try:
                image = read_image(url, storage_options, policy)
            except ReadFailure as failure:
                error, kind = failure.reason, failure.kind
        pixels.append(image.tobytes() if image is not None else None)
        widths.append(image.shape[1] if image is not None else None)
        heights.append(image.shape[0] if image is not None else None)
        errors.append(error)
        kinds.append(kind if error is not None else None)
    journal.finish()
    return pa.table({"path": pa.array(paths, pa.string()), "pixels": pa.array(pixels, pa.large_binary()),
                     "width": pa.array(widths, pa.int32()), "height": pa.array(heights, pa.int32()),
                     "error": pa.array(errors, pa.string()), "error_kind": pa.array(kinds, pa.string())})


class _Rows:
    """What a batch's output rows will say: size, detections and scale, or an error and its kind."""

    def __init__(self, batch: pa.Table) -> None:
        count = batch.num_rows
        self.sizes: list[tuple[int, int] | None] = [None] * count
        self.detections: list[Detections | None] = [None] * count
        self.errors: list[str | None] = [None] * count
        self.kinds: list[str | None] = [None] * count
        self.scales: list[float | None] = [None] * count
        if "pixels" in batch.column_names:  # decode tasks' errors come with their pixels
            self.errors = batch.column("error").to_pylist()
            self.kinds = batch.column("error_kind").to_pylist()
        else:
            for index, reason in enumerate(unlisted_reasons(batch)):
                if reason is not None:
                    self.failed(index, reason, PERMANENT)

    def failed(self, index: int, reason: str, kind: str) -> None:
        """Row index is an error row."""
        self.errors[index], self.kinds[index] = reason, kind

    def detected(self, item: "_Image", found: Detections | str) -> None:
        """Row of item holds what detection found (a string: why detection failed)."""
        if isinstance(found, str):
            self.failed(item.index, found, TRANSIENT)
            return
        height, width = item.original
        self.detections[item.index] = in_original(found, item.original, item.pixels.shape[:2])
        self.sizes[item.index] = (width, height)
        self.scales[item.index] = item.scale if item.scale < 1.0 else None

    def counts(self) -> tuple[int, int, int, int]:
        """Rows, faces, error rows and transient error rows, for the progress line."""
        return (len(self.errors), int(sum(len(d) for d in self.detections if d is not None)),
                sum(error is not None for error in self.errors),
                sum(kind in (TRANSIENT, CRASHED) for kind in self.kinds))


@dataclass
class _Image:
    """One image on its way to the detector: its row, the pixels detected, and how they were shrunk."""

    index: int
    pixels: np.ndarray
    original: tuple[int, int]  # height, width as decoded
    scale: float = 1.0
    #: Estimated peak memory of detecting it (bytes).
    cost: int = 0


class FaceAnnotator:
    """Ray Data actor: builds the detector once, then annotates batches of images."""

    def __init__(self, weights: CascadeWeights, detector: DetectorConfig, use_gpu: bool,
                 threads: int, storage_options: dict, policy: ReadPolicy,
                 pixels_in_flight: int = 64_000_000, state=None, memory_per_actor: int | None = None,
                 max_side: int | None = None) -> None:
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
        self.policy = policy
        self.pixels_in_flight = pixels_in_flight
        self.state = state
        self.max_side = max_side
        # GPU memory is not what the estimate models; on GPUs only --max-side shrinks.
        self.budget = detection_budget(memory_per_actor) if device == "cpu" else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        """One output row per image of the batch: its faces, or why not."""
        paths = batch.column("path").to_pylist()
        rows = _Rows(batch)
        journal = Journal(self.state, paths)
        for group in self._groups(batch, rows, journal):
            for item, found in zip(group, self._detect([item.pixels for item in group])):
                rows.detected(item, found)
        journal.finish()
        if self.state is not None:
            self.state.add.remote(*rows.counts())
        table = annotation_table(paths, rows.sizes, rows.detections, rows.errors, rows.kinds, rows.scales)
        # Which arithmetic made these rows ("auto" may differ by node): summed up per part by the driver.
        return table.append_column(PRECISION_COLUMN, pa.array([self.detector.precision] * table.num_rows,
                                                               pa.string()))

    def _groups(self, batch: pa.Table, rows: "_Rows", journal: "Journal"):
        """Images to detect in one call each, within pixels_in_flight and the memory budget;
        failures to read go to rows."""
        paths, urls = batch.column("path").to_pylist(), row_urls(batch)
        decoded = "pixels" in batch.column_names
        if decoded:
            # Decode tasks made the pixels (GPU clusters); their errors are already in rows.
            pixels = batch.column("pixels").to_pylist()
            shapes = list(zip(batch.column("height").to_pylist(), batch.column("width").to_pylist()))
        group: list[_Image] = []
        group_pixels = group_cost = 0
        for index, path in enumerate(paths):
            if rows.errors[index] is not None:
                continue
            poison, kind = journal.poisoned(path)
            if poison is not None:
                rows.failed(index, poison, kind)
                continue
            alone = journal.suspect(path)
            if alone:
                # Split: an image that was in flight when a worker died is tried on its own.
                if group:
                    yield group
                group, group_pixels, group_cost = [], 0, 0
                journal.working_on([path])
            elif not group:
                journal.working_on([p for i, p in enumerate(paths[index:], index)
                                    if rows.errors[i] is None and not journal.suspect(p)])
            try:
                if decoded:
                    image = np.frombuffer(pixels[index], np.uint8).reshape(*shapes[index], 3)
                else:
                    image = read_image(urls[index], self.storage_options, self.policy)
                item = self._fitted(index, image)
            except ReadFailure as failure:
                rows.failed(index, failure.reason, failure.kind)
                continue
            if group and self.budget is not None and group_cost + item.cost > self.budget:
                yield group  # together they would not fit: the group so far goes first
                group, group_pixels, group_cost = [], 0, 0
            group.append(item)
            group_pixels += item.pixels.shape[0] * item.pixels.shape[1]
            group_cost += item.cost
            if alone or group_pixels >= self.pixels_in_flight:
                yield group
                group, group_pixels, group_cost = [], 0, 0
        if group:
            yield group

    def _fitted(self, index: int, image: np.ndarray) -> _Image:
        """The image as it will be detected: shrunk to --max-side, and to what fits the memory budget."""
        height, width = image.shape[:2]
        config = self.detector.config
        scale = detection_scale(height, width, config, self.budget, self.max_side)
        pixels = shrunk(image, scale)
        cost = estimate_peak_bytes(*pixels.shape[:2], config) if self.budget is not None else 0
        return _Image(index, pixels, (height, width), scale, cost)

    def _detect(self, images: list[np.ndarray]) -> list[Detections | str]:
        """Detections per image, or an error string: one call, then one per image if it fails."""
        # On CPU the detector itself takes the images one at a time over the actor's threads.
        try:
            return self.detector.detect(images)
        except Exception:  # noqa: BLE001 - narrowed to the culprit below
            pass
        results = []
        for image in images:
            try:
                results.append(self.detector.detect([image])[0])
            except Exception as error:  # noqa: BLE001 - the row records it
                results.append(redact_text(f"detection failed: {type(error).__name__}: {first_line(error)}"))
        return results


def commit_rows(batch: pa.Table, output: str, storage_options: dict, metadata: str) -> str:
    """Write annotation rows as one part of an OUTPUT that no job holds (for tools and tests); its path.

    A job commits through jobs/output's PartsOutput instead, fenced by its lease."""
    from jobs.output.parts import commit_file, parquet_bytes

    schema = ANNOTATION_SCHEMA.with_metadata({METADATA_KEY: metadata.encode()})
    table = batch.select(ANNOTATION_SCHEMA.names).cast(schema)
    return commit_file(output, part_name(table.column("path").to_pylist()), parquet_bytes(table), storage_options)


#: The column the detector actors add to their rows: the precision their detector runs in.
PRECISION_COLUMN = "precision"
_ACTOR_ROWS = ANNOTATION_SCHEMA.append(pa.field(PRECISION_COLUMN, pa.string()))


def note_precision(part: pa.Table) -> pa.Table:
    """A part as committed: the precision column left out, what it held in the part's metadata."""
    used = sorted(set(part.column(PRECISION_COLUMN).to_pylist()))
    return part.drop_columns([PRECISION_COLUMN]).replace_schema_metadata(
        {PRECISION_KEY: ",".join(used).encode()})


def commit_record(table: pa.Table, path: str) -> dict:
    """What a committed part holds, for the summary: file, rows, faces, errors, transient errors."""
    kinds = table.column("error_kind")
    return {"file": path, "rows": table.num_rows,
            "faces": int(pc.sum(pc.list_value_length(table.column("faces"))).as_py() or 0),
            "errors": table.num_rows - table.column("error").null_count,
            "transient": int(pc.sum(pc.is_in(kinds, pa.array([TRANSIENT, CRASHED]))).as_py() or 0)}


# -- the job ---------------------------------------------------------------------------------

def annotate(config: AnnotateConfig,
             on_rows: Callable[[AnnotateSummary], None] | None = None) -> AnnotateSummary:
    """Run the annotate job; on_rows is called with the progress counts as they change."""
    started = time.perf_counter()
    plan = _plan(config)
    resources = connect(config)
    plan.output.open()
    summary = AnnotateSummary()
    try:
        state = start_run(config, plan)
        _stream(config, plan, resources, state, summary, on_rows)
    finally:
        plan.output.close()
        summary.seconds = time.perf_counter() - started
    return summary


def _plan(config: AnnotateConfig) -> RunPlan:
    """Everything that can be wrong, checked before OUTPUT is touched: inputs, weights, OUTPUT."""
    weights = load_weights_from(config.weights, config.storage_options)
    metadata = run_metadata(str(weights.source or "(in memory)"), weights.sha256,
                            weights.provenance, config.detector, config.max_pixels, config.max_bytes)
    metadata["device"] = "cuda" if config.num_gpus > 0 else "cpu"
    metadata["max_side"] = config.max_side
    shards = plan_shards(config.input, config.storage_options)
    output = PartsOutput(config.output, config.storage_options, METADATA_KEY, redact(metadata), settings_of, "annotate",
                         mode=OutputMode.RESTART if config.overwrite else OutputMode.RESUME,
                         retry_errors=config.retry_errors,
                         patience=StorePatience(seconds=config.store_patience_seconds))
    output.check()
    return RunPlan(weights, shards, output)


def _stream(config: AnnotateConfig, plan: RunPlan, resources: dict, state,
            summary: AnnotateSummary, on_rows) -> None:
    """The pipeline, run: read -> [decode] -> detect -> rows committed here, counted in summary."""
    import ray

    def committed(table: pa.Table, path: str) -> None:
        record = commit_record(table, path)
        summary.files.append(record["file"])
        summary.images += record["rows"]
        summary.faces += record["faces"]
        summary.errors += record["errors"]
        summary.transient += record["transient"]

    with ray_data_context(block_size=PATH_BLOCK_BYTES):
        dataset = _build_dataset(plan.shards, config, plan.weights, resources, state)
        progress = ProgressLine(state, summary, config.show_progress, on_rows)
        progress.start()
        try:
            received = 0
            with CommitBuffer(plan.output, config.rows_per_file, config.commit_seconds, committed,
                              finish_part=note_precision) as buffer:
                for rows in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                    buffer.add(rows.select(_ACTOR_ROWS.names).cast(_ACTOR_ROWS))
                    received += rows.num_rows
                    announce_rows_received(received)
        finally:
            progress.stop()
    counts = ray.get(state.snapshot.remote())
    summary.listed, summary.skipped, summary.repeated = counts["listed"], counts["skipped"], counts["repeated"]


def announce_rows_received(count: int) -> None:
    """MTCNN_JOBS_FAILPOINTS' rows_received=FILE: the driver writes how many rows it holds or
    committed into FILE, so a test can stop a job at a known state (a no-op when unset)."""
    if "MTCNN_JOBS_FAILPOINTS" not in os.environ:
        return
    for item in os.environ["MTCNN_JOBS_FAILPOINTS"].split(";"):
        if item.startswith("rows_received="):
            target = item.split("=", 1)[1]
            with open(target + ".tmp", "w") as handle:
                handle.write(str(count))
            os.replace(target + ".tmp", target)


def _build_dataset(shards: list[ListingShard], config: AnnotateConfig, weights: CascadeWeights,
                   resources: dict, state):
    """list -> [decode] -> FaceAnnotator actors: a Ray Dataset of annotation rows."""
    import ray

    use_gpu = config.num_gpus > 0
    cpus_per_actor = config.cpus_per_actor or 1.0
    low, high = _bounds(config.concurrency)
    if low is None:
        fits = int(resources.get("GPU", 0) // config.num_gpus) if use_gpu \
            else int(resources.get("CPU", 1) // cpus_per_actor)
        low = max(1, fits)
        # Only a cluster that can grow gets a pool that can: locally the CPUs are all there is.
        high = low if config.address is None else max(low, 2 * fits)
    separate_decode = use_gpu if config.separate_decode is None else config.separate_decode
    # Listing is I/O with little CPU: at 0 CPUs it never waits behind the detector actors, which
    # take every CPU (or GPU share) the cluster has.
    dataset = ray.data.read_datasource(image_source(shards, config.storage_options, state),
                                       num_cpus=0, concurrency=1,
                                       override_num_blocks=SPLIT_BLOCKS * len(shards))
    if separate_decode:
        dataset = dataset.map_batches(decode_batch, batch_size=config.batch_size, batch_format="pyarrow",
                                      fn_kwargs={"storage_options": config.storage_options,
                                                 "policy": config.read_policy, "state": state})
    return dataset.map_batches(
        FaceAnnotator, batch_size=config.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
        num_cpus=cpus_per_actor, num_gpus=config.num_gpus or None,
        fn_constructor_kwargs={"weights": weights, "detector": config.detector, "use_gpu": use_gpu,
                               "threads": max(1, int(cpus_per_actor)),
                               "storage_options": config.storage_options,
                               "policy": config.read_policy,
                               "pixels_in_flight": config.pixels_in_flight, "state": state,
                               "memory_per_actor": config.memory_per_actor, "max_side": config.max_side})


def _bounds(concurrency) -> tuple[int | None, int | None]:
    if concurrency is None:
        return None, None
    if isinstance(concurrency, int):
        return concurrency, concurrency
    low, high = concurrency
    return int(low), int(high)


__all__ = ["AnnotateConfig", "AnnotateSummary", "FaceAnnotator", "JobStopped", "OutputError",
           "annotate", "commit_record", "commit_rows", "decode_batch"]
