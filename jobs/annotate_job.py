"""The annotate job: Ray Data streams images through the cascade into Parquet, one row per image.

The pipeline: list (read tasks, in chunks, leaving out what is done) -> [decode tasks, on GPU
clusters] -> FaceAnnotator actors -> commit tasks that write the Parquet parts. The driver only
plans, holds the OUTPUT's lease, and reads small commit records for the summary. Its command
line is jobs/annotate.py; `mtcnn-jobs evaluate --ray` runs it too.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mtcnn import Detections, DetectorConfig, FaceDetector
from mtcnn.weights import CascadeWeights

from .decode import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from .parts import (Lease, OutputError, commit_file, committed_parts, new_owner, parquet_bytes,
                    part_name, remove_stale_temporaries)
from .progress import ProgressLine
from .reading import PERMANENT, TRANSIENT, ReadFailure, ReadPolicy, first_line, read_image
from .run_state import MAX_STRIKES, RunState, path_digests
from .schema import (ANNOTATION_SCHEMA, annotation_table, read_metadata, run_metadata, settings_of,
                     with_metadata)
from .sources import CHUNK_PATHS, ListingShard, plan_shards
from .redaction import public_path, redact, redact_text
from .storage import filesystem, is_remote, join
from .stored_weights import load_weights_from

log = logging.getLogger(__name__)


class JobStopped(RuntimeError):
    """The run stopped before annotating anything, for a reason that is not any image's fault."""

    exit_status = 1  # not the input's fault either: 2 is for bad input


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
    #: Detector actors: a fixed count, or (min, max) for a pool that grows with the cluster.
    #: None: as many as the cluster's GPUs (or CPUs) allow now, growing to twice that.
    concurrency: int | tuple[int, int] | None = None
    #: Images per detector call.
    batch_size: int = 16
    storage_options: dict = field(default_factory=dict)
    overwrite: bool = False
    #: Redo every error row of earlier runs (by default only transient ones are redone).
    retry_errors: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    #: Retries of a transient read failure, with exponential backoff from 0.5 s.
    read_retries: int = 4
    #: Decoded pixels an actor holds at once; a batch is cut into detector calls under it.
    pixels_in_flight: int = 64_000_000
    #: Rows per Parquet part (a part is committed when it is full, or at the end).
    rows_per_file: int = 4096
    #: Decode in separate CPU tasks (True), inside the detector actors (False), or None: only
    #: when the actors use GPUs, so that CPUs feed them; on CPUs it saves copying pixels around.
    separate_decode: bool | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
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

    @property
    def read_policy(self) -> ReadPolicy:
        """The limits and retries for reading images."""
        return ReadPolicy(max_pixels=self.max_pixels, max_bytes=self.max_bytes, retries=self.read_retries)


@dataclass
class AnnotateSummary:
    """What a run did."""

    listed: int = 0
    skipped: int = 0
    images: int = 0
    faces: int = 0
    errors: int = 0
    transient: int = 0
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        """Images annotated per wall-clock second of the run, start-up included."""
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """One-line report for the end of a run."""
        text = (f"annotated {self.images} images ({self.skipped} already done), {self.faces} faces, "
                f"{self.errors} errors, {self.images_per_second:.2f} images/s "
                f"in {self.seconds:.1f} s; {len(self.files)} files written")
        if self.transient:
            text += f"; {self.transient} transient errors will be retried by the next run"
        return text


# -- listing ---------------------------------------------------------------------------------

#: Bytes at which Ray Data cuts the listing into blocks (about 500 paths with their URLs); each
#: is then split in SPLIT_BLOCKS, so a block carries a few detector batches and even a short job
#: spreads over every actor.
PATH_BLOCK_BYTES = 64 * 1024
SPLIT_BLOCKS = 8
#: Paths the listing may run ahead of the annotated images.
LIST_AHEAD = 50_000


def _image_source(shards: list[ListingShard], storage_options: dict, state):
    """A Ray Datasource reading the shards' chunks, each trimmed to the paths this run annotates."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    def read_shard(shard: ListingShard):
        import ray

        for number, chunk in enumerate(shard.chunks(storage_options, CHUNK_PATHS)):
            # Rows store (and resume matches) each path minus any credentials it carries, such as a
            # presigned URL's signature; the file is read through the URL as listed.
            stored = [public_path(url) for url in chunk]
            keep = ray.get(state.claim.remote(path_digests(stored), f"{shard.index}:{number}"))
            if keep.any():
                yield pa.table({"path": pa.array(np.array(stored, dtype=object)[keep], pa.string()),
                                "url": pa.array(np.array(chunk, dtype=object)[keep], pa.string())})
            # Flow control: listing a 10M-line manifest as fast as it reads would take the CPUs
            # from the detectors for minutes (and fill the claims index early); stay a window ahead.
            while ray.get(state.ahead.remote()) > LIST_AHEAD:
                time.sleep(0.5)
        state.shard_listed.remote()

    class ImageSource(Datasource):
        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return [ReadTask(lambda shard=shard: read_shard(shard),
                             BlockMetadata(num_rows=None, size_bytes=None, input_files=None,
                                           exec_stats=None))
                    for shard in shards]

        def estimate_inmemory_data_size(self):
            return None

        def get_name(self):
            return "ListImages"

    return ImageSource()


# -- workers ---------------------------------------------------------------------------------

def decode_batch(batch: pa.Table, storage_options: dict, policy: ReadPolicy, state=None) -> pa.Table:
    """Read and decode a batch of paths into raw RGB pixels with their sizes (or an error)."""
    paths = batch.column("path").to_pylist()
    urls = _urls(batch)
    journal = _Journal(state, paths)
    pixels, widths, heights, errors, kinds = [], [], [], [], []
    for path, url in zip(paths, urls):
        image, error, kind = None, journal.poisoned(path), PERMANENT
        if error is None:
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


def _urls(batch: pa.Table) -> list[str]:
    """Where each row's file is read from: the listed URL, or the path when they are the same."""
    return batch.column("url" if "url" in batch.column_names else "path").to_pylist()


class _Journal:
    """A batch's entries in the run's crash journal (no-ops without a run state)."""

    def __init__(self, state, paths: list[str]) -> None:
        import ray

        self.state, self.token = state, part_name(paths)
        self.strikes = ray.get(state.start.remote(self.token, paths)) if state is not None else {}

    def poisoned(self, path: str) -> str | None:
        """The error for an image that has killed its worker MAX_STRIKES times, else None."""
        strikes = self.strikes.get(path, 0)
        if strikes >= MAX_STRIKES:
            return (f"the worker process died {strikes} times while this image was being read, "
                    "decoded or detected (a file that crashes the decoder, or needs more memory "
                    "than the worker has); left out")
        return None

    def suspect(self, path: str) -> bool:
        """Whether the image was in flight at an earlier death of a worker (so goes alone)."""
        return self.strikes.get(path, 0) > 0

    def working_on(self, paths: list[str]) -> None:
        """Record what is about to be decoded and detected, before doing it."""
        if self.state is not None:
            import ray

            ray.get(self.state.working_on.remote(self.token, paths))

    def finish(self) -> None:
        """The batch is done."""
        if self.state is not None:
            self.state.finish.remote(self.token)


class _Rows:
    """What a batch's output rows will say: size and detections, or an error and its kind."""

    def __init__(self, batch: pa.Table) -> None:
        count = batch.num_rows
        self.sizes: list[tuple[int, int] | None] = [None] * count
        self.detections: list[Detections | None] = [None] * count
        self.errors: list[str | None] = [None] * count
        self.kinds: list[str | None] = [None] * count
        if "pixels" in batch.column_names:  # decode tasks' errors come with their pixels
            self.errors = batch.column("error").to_pylist()
            self.kinds = batch.column("error_kind").to_pylist()

    def failed(self, index: int, reason: str, kind: str) -> None:
        """Row index is an error row."""
        self.errors[index], self.kinds[index] = reason, kind

    def detected(self, index: int, image: np.ndarray, found: Detections | str) -> None:
        """Row index holds what detection found in image (a string: why detection failed)."""
        if isinstance(found, str):
            self.failed(index, found, TRANSIENT)
        else:
            self.detections[index] = found
            self.sizes[index] = (image.shape[1], image.shape[0])

    def counts(self) -> tuple[int, int, int, int]:
        """Rows, faces, error rows and transient error rows, for the progress line."""
        return (len(self.errors), int(sum(len(d) for d in self.detections if d is not None)),
                sum(error is not None for error in self.errors),
                sum(kind == TRANSIENT for kind in self.kinds))


class FaceAnnotator:
    """Ray Data actor: builds the detector once, then annotates batches of images."""

    def __init__(self, weights: CascadeWeights, detector: DetectorConfig, use_gpu: bool,
                 threads: int, storage_options: dict, policy: ReadPolicy,
                 pixels_in_flight: int = 64_000_000, state=None) -> None:
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

    def __call__(self, batch: pa.Table) -> pa.Table:
        """One output row per image of the batch: its faces, or why not."""
        paths = batch.column("path").to_pylist()
        rows = _Rows(batch)
        journal = _Journal(self.state, paths)
        for group in self._groups(batch, rows, journal):
            for (index, image), found in zip(group, self._detect([image for _, image in group])):
                rows.detected(index, image, found)
        journal.finish()
        if self.state is not None:
            self.state.add.remote(*rows.counts())
        return annotation_table(paths, rows.sizes, rows.detections, rows.errors, rows.kinds)

    def _groups(self, batch: pa.Table, rows: "_Rows", journal: "_Journal"):
        """Images to detect in one call each, up to pixels_in_flight; failures to read go to rows."""
        paths, urls = batch.column("path").to_pylist(), _urls(batch)
        decoded = "pixels" in batch.column_names
        if decoded:
            # Decode tasks made the pixels (GPU clusters); their errors are already in rows.
            pixels = batch.column("pixels").to_pylist()
            shapes = list(zip(batch.column("height").to_pylist(), batch.column("width").to_pylist()))
        group: list[tuple[int, np.ndarray]] = []
        group_pixels = 0
        for index, path in enumerate(paths):
            if rows.errors[index] is not None:
                continue
            poison = journal.poisoned(path)
            if poison is not None:
                rows.failed(index, poison, PERMANENT)
                continue
            alone = journal.suspect(path)
            if alone:
                # Split: an image that was in flight when a worker died is tried on its own.
                if group:
                    yield group
                group, group_pixels = [], 0
                journal.working_on([path])
            elif not group:
                journal.working_on([p for i, p in enumerate(paths[index:], index)
                                    if rows.errors[i] is None and not journal.suspect(p)])
            try:
                if decoded:
                    image = np.frombuffer(pixels[index], np.uint8).reshape(*shapes[index], 3)
                else:
                    image = read_image(urls[index], self.storage_options, self.policy)
            except ReadFailure as failure:
                rows.failed(index, failure.reason, failure.kind)
                continue
            group.append((index, image))
            group_pixels += image.shape[0] * image.shape[1]
            if alone or group_pixels >= self.pixels_in_flight:
                yield group
                group, group_pixels = [], 0
        if group:
            yield group

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


def commit_rows(batch: pa.Table, output: str, storage_options: dict, metadata: str,
                retries: int = 4, owner: str | None = None) -> pa.Table:
    """Write a batch of rows as one part of OUTPUT; its commit record (file, rows, faces, errors)."""
    schema = with_metadata(ANNOTATION_SCHEMA, json.loads(metadata))
    table = batch.select(ANNOTATION_SCHEMA.names).cast(schema)
    data = parquet_bytes(table)
    name = part_name(table.column("path").to_pylist())
    for attempt in range(retries + 1):
        try:
            if owner is not None:
                # Fencing: a worker left over from a job whose driver died must not write into
                # an OUTPUT that a newer job now holds (their rows would be there twice).
                Lease(output, storage_options, owner).check()
            path = commit_file(output, name, data, storage_options)
            break
        except OSError:
            # The store is unreachable for a moment; the part is whole in memory, so wait and
            # try again. The last failure fails the task, which Ray Data retries.
            if attempt == retries:
                raise
            time.sleep(0.5 * 2 ** attempt)
    kinds = table.column("error_kind")
    return pa.table({
        "file": [path], "rows": [table.num_rows],
        "faces": [int(pc.sum(pc.list_value_length(table.column("faces"))).as_py() or 0)],
        "errors": [table.num_rows - table.column("error").null_count],
        "transient": [int(pc.sum(pc.equal(kinds, TRANSIENT)).as_py() or 0)],
    })


# -- before the run --------------------------------------------------------------------------

def check_output(config: AnnotateConfig, settings: dict) -> list[str]:
    """Check OUTPUT can be written and holds results of these settings; its committed parts."""
    try:
        fs, root = filesystem(config.output, config.storage_options)
        if not is_remote(config.output):
            fs.makedirs(root, exist_ok=True)
        probe = join(root, f"_write_test-{new_owner().rsplit(':', 1)[-1]}")
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
        parts = committed_parts(config.output, config.storage_options)
    except Exception as error:  # noqa: BLE001 - any failure here means the run cannot start
        raise OutputError(f"OUTPUT {config.output} is not writable: {first_line(error)}") from None
    if parts and not config.overwrite:
        with fs.open(parts[0], "rb") as handle:
            earlier = read_metadata(pq.read_schema(handle)) or {}
        if settings_of(earlier) != settings:
            raise OutputError(
                f"OUTPUT {config.output} holds results made with other settings "
                f"({_difference(settings_of(earlier), settings)}); pass --overwrite to replace them "
                f"or choose another OUTPUT")
    return parts


# -- the job ---------------------------------------------------------------------------------

@dataclass
class _Plan:
    """What a run reads and what it found in OUTPUT, checked before OUTPUT is touched."""

    weights: CascadeWeights
    metadata: dict  # stored with every part (secrets redacted)
    shards: list[ListingShard]
    parts: list[str]  # committed parts of earlier runs


def annotate(config: AnnotateConfig,
             on_rows: Callable[[AnnotateSummary], None] | None = None) -> AnnotateSummary:
    """Run the annotate job; on_rows is called with the progress counts as they change."""
    started = time.perf_counter()
    plan = _plan(config)
    resources = _connect(config)
    lease = Lease(config.output, config.storage_options, new_owner())
    lease.acquire()
    summary = AnnotateSummary()
    try:
        state = _start_run(config, plan)
        _stream(config, plan, resources, state, lease.owner, summary, on_rows)
    finally:
        lease.release()
        summary.seconds = time.perf_counter() - started
    return summary


def _plan(config: AnnotateConfig) -> _Plan:
    """Everything that can be wrong, checked before OUTPUT is touched: inputs, weights, OUTPUT."""
    weights = load_weights_from(config.weights, config.storage_options)
    metadata = run_metadata(str(weights.source or "(in memory)"), weights.sha256,
                            weights.provenance, config.detector, config.max_pixels, config.max_bytes)
    metadata["device"] = "cuda" if config.num_gpus > 0 else "cpu"
    metadata = redact(metadata)
    shards = plan_shards(config.input, config.storage_options)
    parts = check_output(config, settings_of(metadata))
    return _Plan(weights, metadata, shards, parts)


def _connect(config: AnnotateConfig) -> dict:
    """Join (or start) Ray and check it has what the run asks for; its resources."""
    import ray

    from .ray_env import init_ray

    init_ray(config.address)
    resources = ray.cluster_resources()
    if config.num_gpus > 0 and resources.get("GPU", 0) <= 0:
        raise ValueError(f"--num-gpus {config.num_gpus} asks for GPUs but the Ray cluster has none; "
                         "drop --num-gpus to run on CPUs, or connect to a GPU cluster with --address")
    return resources


def _start_run(config: AnnotateConfig, plan: _Plan):
    """With the lease held: clear or resume OUTPUT, start the run state actor, probe the reads."""
    import ray

    parts = plan.parts
    if config.overwrite and parts:
        fs, _ = filesystem(config.output, config.storage_options)
        for path in parts:
            fs.rm_file(path)
        log.info("--overwrite: removed %d files of earlier runs from %s", len(parts), config.output)
        parts = []
    dedupe = any(shard.kind in ("text", "parquet") for shard in plan.shards)
    state = ray.remote(RunState).options(max_concurrency=8, num_cpus=0).remote(dedupe)
    # The probe runs on a worker (a cluster's workers may lack the driver's credentials), the
    # run-state actor's, while the driver goes on setting up the run.
    probe = state.probe.remote(plan.shards, config.storage_options, config.read_policy)
    remove_stale_temporaries(config.output)
    state.plan.remote(len(plan.shards))
    if parts:
        index = ray.get(state.scan.remote(config.output, config.storage_options, parts,
                                          config.retry_errors))
        log.info("resuming: %d images already done in %s; %d error rows to redo",
                 index["done"], public_path(config.output), index["redo"])
    try:
        reason = ray.get(probe)
    except ray.exceptions.RayError:
        reason = None  # the probe only looks for a common cause; the job finds any other
    if reason is not None:
        raise JobStopped(f"{public_path(config.input)}: {reason}. Nothing was marked done")
    return state


def _stream(config: AnnotateConfig, plan: _Plan, resources: dict, state, owner: str,
            summary: AnnotateSummary, on_rows) -> None:
    """The pipeline, run: read -> [decode] -> detect -> write, commit records added to summary."""
    import ray
    from ray.data import DataContext

    saved_block_size = DataContext.get_current().target_max_block_size
    dataset = _build_dataset(plan.shards, config, plan.weights, resources, state, plan.metadata, owner)
    progress = ProgressLine(state, summary, config.show_progress, on_rows)
    progress.start()
    try:
        for records in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            for record in records.to_pylist():
                summary.files.append(record["file"])
                summary.images += record["rows"]
                summary.faces += record["faces"]
                summary.errors += record["errors"]
                summary.transient += record["transient"]
    finally:
        progress.stop()
        DataContext.get_current().target_max_block_size = saved_block_size
    counts = ray.get(state.snapshot.remote())
    summary.listed, summary.skipped = counts["listed"], counts["skipped"]


def _build_dataset(shards: list[ListingShard], config: AnnotateConfig, weights: CascadeWeights,
                   resources: dict, state, metadata: dict, owner: str):
    """list -> [decode] -> FaceAnnotator actors -> commit: a Ray Dataset of commit records."""
    import ray
    from ray.data import DataContext

    context = DataContext.get_current()
    # The progress line replaces Ray's operator bars unless asked for (RAY_DATA_PROGRESS=1).
    context.enable_progress_bars = bool(int(os.environ.get("RAY_DATA_PROGRESS", "0")))
    context.execution_options.preserve_order = False
    # Ray Data buffers a read task's output until it reaches target_max_block_size (128 MB):
    # a whole folder's listing would be one block, nothing would flow until it was listed, and a
    # listing held back by flow control would never flow. Blocks of paths are small: cut there.
    context.target_max_block_size = PATH_BLOCK_BYTES

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
    # Listing and committing are I/O with little CPU: at 0 CPUs they never wait behind the
    # detector actors, which take every CPU (or GPU share) the cluster has.
    dataset = ray.data.read_datasource(_image_source(shards, config.storage_options, state),
                                       num_cpus=0, concurrency=1,
                                       override_num_blocks=SPLIT_BLOCKS * len(shards))
    if separate_decode:
        dataset = dataset.map_batches(decode_batch, batch_size=config.batch_size, batch_format="pyarrow",
                                      fn_kwargs={"storage_options": config.storage_options,
                                                 "policy": config.read_policy, "state": state})
    dataset = dataset.map_batches(
        FaceAnnotator, batch_size=config.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
        num_cpus=cpus_per_actor, num_gpus=config.num_gpus or None,
        fn_constructor_kwargs={"weights": weights, "detector": config.detector, "use_gpu": use_gpu,
                               "threads": max(1, int(cpus_per_actor)),
                               "storage_options": config.storage_options,
                               "policy": config.read_policy,
                               "pixels_in_flight": config.pixels_in_flight, "state": state})
    # Workers write: each commit task turns up to rows_per_file rows into one part.
    return dataset.map_batches(
        commit_rows, batch_size=config.rows_per_file, batch_format="pyarrow", num_cpus=0,
        fn_kwargs={"output": config.output, "storage_options": config.storage_options,
                   "metadata": json.dumps(metadata, sort_keys=True), "owner": owner})


def _bounds(concurrency) -> tuple[int | None, int | None]:
    if concurrency is None:
        return None, None
    if isinstance(concurrency, int):
        return concurrency, concurrency
    low, high = concurrency
    return int(low), int(high)


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


__all__ = ["AnnotateConfig", "AnnotateSummary", "FaceAnnotator", "JobStopped", "OutputError",
           "annotate", "commit_rows", "decode_batch"]
