"""What the jobs over a listing of images share (annotate, anonymize): one run, from its plan to its stream.

- RunPlan: what a run reads and the OUTPUT it writes, checked before OUTPUT is touched;
- connect(): join or start Ray, and check it has the GPUs asked for;
- start_run(): with the lease held, the run-state actor on the driver's node, the resume scan of
  OUTPUT and the probe of the first reads;
- image_source(): the listing as a Ray Datasource, each chunk trimmed to the paths this run does;
- Journal: a batch's entries in the run's crash journal, which turns deaths into crashed rows;
- row_urls() / unlisted_reasons(): where a listed row is read from, or why it could not be listed;
- RunSummary: the counts a run reports at its end;
- detection_budget() / detection_scale(): the memory a worker's detector calls may use, and the scale
  an image is detected at to fit it (and --max-side).

Each job's config has the fields these read (input, output, storage_options, address, num_gpus,
retry_errors, read_policy).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from mtcnn import DetectorConfig, scale_to_fit
from mtcnn.weights import CascadeWeights

from jobs.common.redaction import public_path
from jobs.common.schema import ErrorKind
from jobs.inputs.reading import ReadFailure
from jobs.inputs.sources import CHUNK_PATHS, ListingShard, Unlisted
from jobs.output import OutputError, OutputFull, PartsOutput, StoreUnavailable, part_name, path_digests
from jobs.pipelines.run_state import MAX_STRIKES, RunState

PERMANENT, TRANSIENT, CRASHED = (kind.value for kind in ErrorKind)

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What a run did: counts from the run state and the committed parts."""

    listed: int = 0
    skipped: int = 0
    repeated: int = 0
    images: int = 0
    faces: int = 0
    errors: int = 0
    transient: int = 0
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        """Images done per wall-clock second of the run, start-up included."""
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def retry_note(self) -> str:
        """What the end-of-run line adds when the next run has rows to redo."""
        return f"; {self.transient} transient errors will be retried by the next run" if self.transient else ""


class JobStopped(RuntimeError):
    """The run stopped before annotating anything, for a reason that is not any image's fault."""

    exit_status = 1  # not the input's fault either: 2 is for bad input


# -- listing ---------------------------------------------------------------------------------

#: Bytes at which Ray Data cuts the listing into blocks (about 500 paths with their URLs); each
#: is then split in SPLIT_BLOCKS, so a block carries a few detector batches and even a short job
#: spreads over every actor.
PATH_BLOCK_BYTES = 64 * 1024
SPLIT_BLOCKS = 8
#: Paths the listing may run ahead of the annotated images.
LIST_AHEAD = 50_000


def image_source(shards: list[ListingShard], storage_options: dict, state):
    """A Ray Datasource reading the shards' chunks, each trimmed to the paths this run annotates."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    def read_shard(shard: ListingShard):
        import ray

        for number, chunk in enumerate(shard.chunks(storage_options, CHUNK_PATHS)):
            # Rows store (and resume matches) each path minus any credentials it carries, such as a
            # presigned URL's signature; the file is read through the URL as listed. An entry the
            # listing could not read as a path (Unlisted) goes on as an error row naming it.
            stored = [entry.name if isinstance(entry, Unlisted) else public_path(entry) for entry in chunk]
            keep = ray.get(state.claim.remote(path_digests(stored), f"{shard.index}:{number}"))
            if keep.any():
                kept = np.array(chunk, dtype=object)[keep]
                yield pa.table({
                    "path": pa.array(np.array(stored, dtype=object)[keep], pa.string()),
                    "url": pa.array([None if isinstance(e, Unlisted) else e for e in kept], pa.string()),
                    "unlisted": pa.array([e.reason if isinstance(e, Unlisted) else None for e in kept],
                                         pa.string())})
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


def row_urls(batch: pa.Table) -> list[str]:
    """Where each row's file is read from: the listed URL, or the path when they are the same."""
    return batch.column("url" if "url" in batch.column_names else "path").to_pylist()


def unlisted_reasons(batch: pa.Table) -> list[str | None]:
    """Per row, why the listing could not give it as a path (it becomes an error row), or None."""
    if "unlisted" in batch.column_names:
        return batch.column("unlisted").to_pylist()
    return [None] * batch.num_rows


class Journal:
    """A batch's entries in the run's crash journal (no-ops without a run state)."""

    def __init__(self, state, paths: list[str]) -> None:
        self.state, self.token, self.history = state, part_name(paths), {}
        if state is not None:  # Ray only where there is a run state: the actor runs without it too
            import ray

            self.history = ray.get(state.start.remote(self.token, paths))

    def poisoned(self, path: str) -> tuple[str | None, str | None]:
        """(error, kind) for an image that has killed its worker MAX_STRIKES times, else (None, None).

        Deaths are not the image's fault until shown to be: a worker may die of a kill from
        outside, a spot preemption or another image's memory. So the row is 'crashed', which the
        next run redoes alone; only an image that crashed in an earlier run too gets a final row.
        """
        strikes, before = self.history.get(path, (0, False))
        if strikes < MAX_STRIKES:
            return None, None
        if before:
            return (f"the worker process died {strikes} times in this run and in an earlier one while "
                    "this image was being read, decoded or detected (a file that crashes the decoder, "
                    "or needs more memory than a worker has); left out", PERMANENT)
        return (f"the worker process died {strikes} times while this image was being read, decoded or "
                "detected; the next run tries it again, alone", CRASHED)

    def suspect(self, path: str) -> bool:
        """Whether the image was in flight at an earlier death of a worker (so goes alone)."""
        strikes, before = self.history.get(path, (0, False))
        return strikes > 0 or before

    def working_on(self, paths: list[str]) -> None:
        """Record what is about to be decoded and detected, before doing it."""
        if self.state is not None:
            import ray

            ray.get(self.state.working_on.remote(self.token, paths))

    def finish(self) -> None:
        """The batch is done."""
        if self.state is not None:
            self.state.finish.remote(self.token)


@dataclass
class RunPlan:
    """What a run reads and what it found in OUTPUT, checked before OUTPUT is touched."""

    weights: CascadeWeights
    shards: list[ListingShard]
    output: PartsOutput


def connect(config) -> dict:
    """Join (or start) Ray and check it has what the run asks for; its resources."""
    import ray

    from jobs.runtime.ray_env import init_ray

    init_ray(config.address)
    resources = ray.cluster_resources()
    if config.num_gpus > 0 and resources.get("GPU", 0) <= 0:
        raise ValueError(f"--num-gpus {config.num_gpus} asks for GPUs but the Ray cluster has none; "
                         "drop --num-gpus to run on CPUs, or connect to a GPU cluster with --address")
    return resources


def start_run(config, plan: RunPlan):
    """With the lease held: start the run state actor, resume from OUTPUT, probe the reads."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    dedupe = any(shard.kind in ("text", "parquet") for shard in plan.shards)
    # On the driver's node, which the job cannot outlive anyway: no worker node's loss takes it
    # along. Restarted if its process dies (rebuilding what is done from OUTPUT), and calls
    # in flight then are retried.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    state = ray.remote(RunState).options(
        max_concurrency=8, num_cpus=0, max_restarts=-1, max_task_retries=-1, scheduling_strategy=here,
    ).remote(dedupe, config.output, config.storage_options, len(plan.shards))
    # The probe runs on a worker (a cluster's workers may lack the driver's credentials), the
    # run-state actor's, while the driver goes on setting up the run.
    probe = state.probe.remote(plan.shards, config.storage_options, config.read_policy)
    if plan.output.parts:
        try:
            index = ray.get(state.scan.remote(config.output, config.storage_options, plan.output.parts,
                                              config.retry_errors))
        except ray.exceptions.RayTaskError as error:
            # A damaged part, a store that stays down: the actor's own one-line error, not Ray's wrapper.
            if isinstance(error.cause, (OutputError, StoreUnavailable, OutputFull)):
                raise error.cause from None
            raise
        log.info("resuming: %d images already done in %s; %d error rows to redo%s",
                 index["done"], public_path(config.output), index["redo"],
                 f"; {index['duplicates']} rows of paths held twice taken out" if index["duplicates"] else "")
    try:
        reason = ray.get(probe)
    except ray.exceptions.RayError:
        reason = None  # the probe only looks for a common cause; the job finds any other
    if reason is not None:
        raise JobStopped(f"{public_path(config.input)}: {reason}. Nothing was marked done")
    return state


# -- memory ----------------------------------------------------------------------------------

def detection_budget(memory_per_actor: int | None) -> int:
    """Bytes this actor's detector calls may add: memory_per_actor, or by default this actor's CPU
    share of the memory its node (or container) has, less what the process holds already."""
    if memory_per_actor:
        return max(0, memory_per_actor - _resident_bytes())
    limit = min(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), _cgroup_memory_limit())
    share = 1.0
    try:
        import ray

        if not ray.is_initialized():
            raise RuntimeError("outside Ray")
        context = ray.get_runtime_context()
        mine = context.get_assigned_resources().get("CPU", 0.0)
        total = next((node["Resources"].get("CPU", 0.0) for node in ray.nodes()
                      if node["NodeID"] == context.get_node_id()), 0.0)
        if mine and total:
            share = min(1.0, mine / total)
    except Exception:  # noqa: BLE001 - outside Ray (tests, tools): the whole machine
        pass
    # 80%: the rest of the node (Ray's own processes, decode tasks, the page cache) needs some too.
    return max(0, int(0.8 * limit * share) - _resident_bytes())


def _cgroup_memory_limit() -> int:
    """The smallest memory limit of this process's cgroup and its ancestors (v1 or v2), or a huge
    number where there is none: a container's or a job scheduler's limit is the one that kills."""
    limit = 1 << 62
    try:
        with open("/proc/self/cgroup") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return limit
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            folder, name = "/sys/fs/cgroup", "memory.max"  # v2
        elif "memory" in controllers.split(","):
            folder, name = "/sys/fs/cgroup/memory", "memory.limit_in_bytes"  # v1
        else:
            continue
        parts = [part for part in path.split("/") if part]
        for depth in range(len(parts), -1, -1):
            try:
                with open(os.path.join(folder, *parts[:depth], name)) as handle:
                    text = handle.read().strip()
            except OSError:
                continue
            if text.isdigit():
                limit = min(limit, int(text))
    return limit


def _resident_bytes() -> int:
    """This process's resident memory (0 where /proc is not there to say)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def detection_scale(height: int, width: int, config: DetectorConfig, budget: int | None,
                    max_side: int | None) -> float:
    """The scale an image is detected at: 1, or less to fit max_side and the memory budget (None: no
    budget, as on GPUs). Raises a transient ReadFailure when even the smallest useful copy does not fit."""
    scale = min(1.0, max_side / max(height, width)) if max_side else 1.0
    if budget is not None:
        try:
            scale = min(scale, scale_to_fit(height, width, config, budget))
        except ValueError:
            raise ReadFailure(f"detecting a {width}x{height} image needs more memory than this worker has "
                              f"({budget / 2**20:.0f} MB for detection) even shrunk to the smallest face; "
                              "give the actors more memory (--memory-per-actor)", TRANSIENT) from None
    return scale
