"""Train one cascade stage data-parallel with Ray Train, from Parquet sample shards."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, astuple, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import ray
import ray.train
import torch
from pyarrow.fs import FSSpecHandler, PyFileSystem
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from mtcnn.nets import STAGE_NAMES, build_stage, normalize_pixels, stage_spec
from mtcnn.weights import save_weights

from jobs.runtime.data_context import ray_data_context
from jobs.runtime.ray_env import init_ray
from jobs.common.redaction import redact, redact_text
from jobs.common.storage import filesystem, is_remote, join
from jobs.inputs.stored_weights import WEIGHTS_FILE, load_weights_from
from jobs.training.batch_augment import BatchAugmentConfig, augment_batch
from jobs.training.fingerprint import RUN_SETTINGS_FILE, refuse_unless_restart, train_settings
from jobs.training.losses import LANDMARK_LOSSES, LossTerms, multitask_loss, task_weights
from jobs.training.schema import SUMMARY_FILE

#: Columns of the sample schema (jobs/training/schema.py) that training reads.
SAMPLE_COLUMNS = ("image", "size", "kind", "box", "landmarks")
_STATE_FILE = "train_state.pt"


@dataclass
class TrainConfig:
    """One stage's training run."""

    stage: str = field(metadata={"help": "the stage to train", "choices": STAGE_NAMES})
    data: str = field(metadata={"help": "the stage's Parquet sample shards (folder or URL), e.g. PREPARE_OUTPUT/pnet"})
    #: weights.safetensors goes there (and checkpoints unless storage_path is set).
    output: str = field(metadata={"help": "run folder (or URL for one stage): weights.safetensors is written there"})
    epochs: int = field(default=10, metadata={"help": "passes over the samples"})
    batch_size: int = field(default=384, metadata={"help": "samples per optimiser step, across all workers"})
    learning_rate: float = field(default=1e-3, metadata={"help": "Adam's learning rate in the first epoch"})
    learning_rate_decay: float = field(default=1.0, metadata={
        "help": "factor applied to the learning rate after each epoch (1: constant)"})
    weight_decay: float = field(default=0.0, metadata={"help": "L2 penalty on the weights (Adam's weight_decay)"})
    ohem: bool = field(default=False, metadata={
        "help": "back-propagate only the hardest ohem_keep of face/non-face samples per batch"})
    ohem_keep: float = field(default=0.7, metadata={"help": "share of classification samples OHEM keeps"})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "face / non-face targets smoothed by this much (torch's cross-entropy rule; 0: off)"})
    #: None keeps the paper's weight for the stage (losses.STAGE_TASK_WEIGHTS). Added after runs
    #: were recorded, so a run's fingerprint holds it only when set (fingerprint.train_settings).
    landmark_weight: float | None = field(default=None, metadata={
        "help": "weight of the landmark loss in the stage's total (default: the paper's, 0.5 in P- and "
                "R-Net, 1 in O-Net)", "recorded": "when set"})
    #: Wing's gradient at typical O-Net errors is about 16x the squared loss's: pair it with a
    #: landmark_weight near 0.1 to keep the tasks' balance (docs/train.md).
    landmark_loss: str = field(default="l2", metadata={
        "help": "landmark loss: l2 (squared distance, the paper's) or wing (Feng et al. 2018)",
        "choices": LANDMARK_LOSSES, "recorded": "when set"})
    #: Drawn every time a crop is seen.
    flip: bool = field(default=False, metadata={
        "help": "mirror crops (and their targets) at random in every batch"})
    color_jitter: float = field(default=0.0, metadata={
        "help": "scale brightness, contrast and saturation of each crop by up to 1 +- this, at random (0: off)"})
    num_workers: int = field(default=2, metadata={"help": "Ray Train workers", "flag": "--workers"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker", "flag": "--gpu"})
    #: None leaves the cluster a CPU to read and decode shards with.
    cpus_per_worker: float | None = field(default=None, metadata={
        "help": "CPUs per worker (default: up to 1, leaving one for reading shards)"})
    storage_path: str | None = field(default=None, metadata={
        "help": "where Ray Train keeps per-epoch checkpoints (folder or s3://...); default OUTPUT/checkpoints"})
    run_name: str | None = field(default=None, metadata={
        "help": "Ray Train run name; reusing it (and storage_path) resumes a stopped run"})
    max_failures: int = field(default=2, metadata={
        "help": "worker-group restarts from the last checkpoint before giving up"})
    previous_weights: str | None = field(default=None, metadata={
        "help": "earlier stages to ship with this one ('reference', a weights file or a run folder); "
                "the detector needs all three stages"})
    storage_options: dict = field(default_factory=dict, metadata={"help": "fsspec options for URLs, as JSON"})
    shuffle_buffer: int = field(default=20_000, metadata={"help": "samples mixed in each worker's local shuffle buffer"})
    seed: int = field(default=0, metadata={"help": "seed of the initial weights, shuffles and batch transforms"})
    log_every: int = field(default=50, metadata={"help": "batches between progress lines within an epoch"})
    #: Testing aid: the first worker raises once when this epoch starts (recovery checks).
    inject_failure_at_epoch: int | None = field(default=None, metadata={"cli": False})
    restart: bool = field(default=False, metadata={
        "help": "when earlier checkpoints (or, with --config, samples and weights) of this output were "
                "made with other settings, discard them and start afresh; without it such a run is "
                "refused, naming the differences"})

    def __post_init__(self) -> None:
        stage_spec(self.stage)  # an unknown stage fails here
        if self.epochs < 1 or self.batch_size < 1 or self.num_workers < 1:
            raise ValueError("epochs, batch_size and num_workers must be at least 1 "
                             f"(got {self.epochs}, {self.batch_size}, {self.num_workers})")
        if self.batch_size < self.num_workers:
            raise ValueError(f"batch_size {self.batch_size} is smaller than num_workers "
                             f"{self.num_workers}: every worker needs samples in each step")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if not 0.0 < self.ohem_keep <= 1.0:
            raise ValueError(f"ohem_keep must be in (0, 1], got {self.ohem_keep!r}")
        if self.landmark_weight is not None and not self.landmark_weight >= 0.0:
            raise ValueError(f"landmark_weight must be at least 0, got {self.landmark_weight!r}")
        if self.landmark_loss not in LANDMARK_LOSSES:
            raise ValueError(f"landmark_loss must be one of {LANDMARK_LOSSES}, got {self.landmark_loss!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        BatchAugmentConfig(flip=self.flip, color_jitter=self.color_jitter)  # checks color_jitter

    @property
    def batch_augment(self) -> BatchAugmentConfig:
        """The per-batch transforms this run applies."""
        return BatchAugmentConfig(flip=self.flip, color_jitter=self.color_jitter)

    @property
    def checkpoint_storage(self) -> str:
        """Where checkpoints go: storage_path, or the output folder's checkpoints/."""
        return self.storage_path or f"{self.output.rstrip('/')}/checkpoints"


@dataclass
class TrainSummary:
    """What a finished stage run produced."""

    weights_path: str
    metrics: dict  # the last epoch's metrics
    history: list[dict]  # every epoch's metrics, oldest first
    samples: int
    seconds: float


# -- data --------------------------------------------------------------------------------------

def _fixed_width(column: pa.ChunkedArray, width: int, name: str) -> np.ndarray:
    """(N, width) float32 from a fixed_size_list<float32>[width] (or list) column."""
    array = column.combine_chunks()
    values = array.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if values.size != len(array) * width:
        raise ValueError(f"sample column {name!r} must hold {width} numbers per row")
    return values.reshape(len(array), width)


def decode_samples(batch: pa.Table) -> dict[str, np.ndarray]:
    """Shard rows -> arrays: pixels (N, S, S, 3) uint8, kind, box (N, 4), landmarks (N, 10)."""
    images = batch.column("image").combine_chunks()
    sizes = batch.column("size").to_numpy(zero_copy_only=False).astype(np.int64)
    side = int(sizes[0]) if len(sizes) else 0
    if len(sizes) and not np.all(sizes == side):
        raise ValueError(f"a batch mixes crop sizes {sorted(set(sizes.tolist()))}; "
                         "a stage trains on one size")
    if pa.types.is_large_binary(images.type):
        offsets = np.frombuffer(images.buffers()[1], np.int64)
    else:
        offsets = np.frombuffer(images.buffers()[1], np.int32)
    offsets = offsets[images.offset:images.offset + len(images) + 1]
    if len(images) and not np.all(np.diff(offsets) == side * side * 3):
        raise ValueError(f"image bytes do not match size {side}: each row must hold "
                         f"{side}x{side}x3 uint8 RGB pixels")
    data = np.frombuffer(images.buffers()[2], np.uint8)[offsets[0]:offsets[-1]] if len(images) \
        else np.zeros(0, np.uint8)
    return {
        "pixels": data.reshape(len(images), side, side, 3),
        "kind": batch.column("kind").to_numpy(zero_copy_only=False).astype(np.int64),
        "box": _fixed_width(batch.column("box"), 4, "box"),
        "landmarks": _fixed_width(batch.column("landmarks"), 10, "landmarks"),
    }


def _check_shards(config: TrainConfig) -> None:
    """Fail early, with a fix, if the shards are missing or are not this stage's samples."""
    fs, path = filesystem(config.data, config.storage_options)
    if not fs.exists(path):
        raise ValueError(f"sample shards {config.data} not found; run `mtcnn-jobs prepare` first")
    dataset = pads.dataset(path, format="parquet", filesystem=PyFileSystem(FSSpecHandler(fs)))
    missing = [c for c in SAMPLE_COLUMNS if c not in dataset.schema.names]
    if missing:
        raise ValueError(f"{config.data} is not a sample shard folder: columns {missing} are missing "
                         f"(found {dataset.schema.names})")
    head = dataset.head(1, columns=["size"]).column("size").to_pylist()
    if not head:
        raise ValueError(f"{config.data} holds no samples")
    size = stage_spec(config.stage).input_size
    if head[0] != size:
        raise ValueError(f"{config.data} holds {head[0]}px samples but {config.stage} trains on "
                         f"{size}px ones; prepare samples for this stage")


def load_samples(config: TrainConfig) -> tuple[ray.data.Dataset, int]:
    """The stage's samples as a Ray Dataset of training arrays, and how many there are.

    Reading and decoding ask for no CPU of their own (at most two tasks of each at a time): the
    training workers may hold every CPU there is, as after a lost node when the restarted worker
    group takes what is left, and a read that waits for a free CPU would stall training forever.
    """
    fs, path = filesystem(config.data, config.storage_options)
    with ray_data_context(list_files_on_driver=True):
        shards = ray.data.read_parquet(path, filesystem=PyFileSystem(FSSpecHandler(fs)),
                                      file_extensions=["parquet"], num_cpus=0, concurrency=2,
                                      ).select_columns(list(SAMPLE_COLUMNS))
        count = shards.count()  # from the Parquet footers, before any decoding
        # Shards are written kind by kind; a random block order plus each worker's local shuffle
        # buffer mixes kinds within every batch without a full all-to-all shuffle per epoch.
        dataset = shards.randomize_block_order().map_batches(
            decode_samples, batch_format="pyarrow", batch_size=4096, num_cpus=0, concurrency=2)
    return dataset, count


# -- the loop each worker runs -----------------------------------------------------------------

def _maybe_inject_failure(config: TrainConfig, epoch: int) -> None:
    """Raise once (per run folder) at the configured epoch, to exercise failure recovery."""
    if config.inject_failure_at_epoch != epoch or ray.train.get_context().get_world_rank() != 0:
        return
    marker = Path(config.output) / f".injected-failure-{config.stage}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"failed at epoch {epoch}\n")
    raise RuntimeError(f"injected failure at epoch {epoch} (inject_failure_at_epoch)")


@dataclass
class EpochTotals:
    """Per-task sums of loss x samples over an epoch on one worker, for means across all workers."""

    loss: float = 0.0
    samples: float = 0.0
    classification: float = 0.0
    classified: float = 0.0
    box: float = 0.0
    boxed: float = 0.0
    landmarks: float = 0.0
    landmarked: float = 0.0
    correct: float = 0.0

    def add(self, terms: LossTerms, count: int) -> None:
        """Count one batch of count samples."""
        self.loss += terms.total.item() * count
        self.samples += count
        self.classification += terms.classification.item() * terms.classified
        self.classified += terms.classified
        self.box += terms.box.item() * terms.boxed
        self.boxed += terms.boxed
        self.landmarks += terms.landmarks.item() * terms.landmarked
        self.landmarked += terms.landmarked
        self.correct += terms.correct

    def summed(self, device: torch.device) -> "EpochTotals":
        """These totals summed over the worker group."""
        tensor = torch.tensor(astuple(self), dtype=torch.float64, device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(tensor)
        return EpochTotals(*tensor.tolist())

    def means(self) -> dict:
        """The epoch's metrics: mean losses per task, accuracy, samples."""
        return {
            "loss": self.loss / max(self.samples, 1),
            "classification_loss": self.classification / max(self.classified, 1),
            "box_loss": self.box / max(self.boxed, 1),
            "landmark_loss": self.landmarks / max(self.landmarked, 1),
            "accuracy": self.correct / max(self.classified, 1),
            "samples": int(self.samples),
        }


@dataclass(frozen=True)
class EpochSeeds:
    """The random streams of one worker's epoch, fixed by run seed, epoch and rank: resumes draw the same."""

    augment: int  # flips and colour jitter of the batches
    shuffle: int  # the local shuffle buffer's order

    @staticmethod
    def of(seed: int, epoch: int, rank: int) -> "EpochSeeds":
        """The seeds of (seed, epoch, rank); distinct for every worker and epoch."""
        return EpochSeeds(augment=seed * 7919 + epoch * 101 + rank, shuffle=seed * 1000 + epoch * 10 + rank)


def _progress(line: str) -> None:
    """Print a progress line from a training worker, once.

    Ray Train replaces `print` in its workers with one that logs the line and also prints it
    when stdout is wrapped (as it is in Ray workers), so the driver showed every line twice.
    """
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _quiet_report_log() -> None:
    """Drop Ray Train's INFO line per report (the whole metrics dict; the epoch line says it)."""
    try:  # an internal module: if it moves, the lines just come back
        from ray.train.v2._internal.execution import context as train_context

        train_context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):
        pass


def _train_loop(loop_config: dict) -> None:
    """Each worker's loop: resume from the last checkpoint, then train, report and checkpoint per epoch."""
    config = TrainConfig(**loop_config["config"])
    _quiet_report_log()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.seed + rank)
    device = ray.train.torch.get_device()

    net = build_stage(config.stage).train()  # train mode: dropout on in R-Net and O-Net
    model = ray.train.torch.prepare_model(net)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate,
                                 weight_decay=config.weight_decay)
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / _STATE_FILE, map_location=device, weights_only=True)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        if rank == 0:
            _progress(f"[{config.stage}] resuming after epoch {state['epoch']} from its checkpoint")
    resumed_from = start_epoch

    weights = task_weights(config.stage, config.landmark_weight)
    ohem_keep = config.ohem_keep if config.ohem else None
    worker_batch = max(1, config.batch_size // world)
    samples = loop_config["samples"]
    batches_per_epoch = max(1, math.ceil(samples / config.batch_size))
    shard = ray.train.get_dataset_shard("train")
    batch_augment = config.batch_augment
    generator = torch.Generator()  # seeded per epoch below

    for epoch in range(start_epoch, config.epochs):
        _maybe_inject_failure(config, epoch)
        learning_rate = config.learning_rate * config.learning_rate_decay ** epoch
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        model.train()
        started = time.perf_counter()
        totals = EpochTotals()
        seeds = EpochSeeds.of(config.seed, epoch, rank)
        generator.manual_seed(seeds.augment)  # resumes draw the same
        for step, batch in enumerate(shard.iter_torch_batches(
                batch_size=worker_batch, local_shuffle_buffer_size=config.shuffle_buffer,
                local_shuffle_seed=seeds.shuffle, device=device)):
            pixels, kinds = batch["pixels"].permute(0, 3, 1, 2).float(), batch["kind"]
            boxes, landmarks = batch["box"], batch["landmarks"]
            if batch_augment.active:
                pixels, boxes, landmarks = augment_batch(pixels, kinds, boxes, landmarks,
                                                         batch_augment, generator)
            terms = multitask_loss(model(normalize_pixels(pixels)), kinds, boxes, landmarks,
                                   weights, ohem_keep, config.label_smoothing, config.landmark_loss)
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            optimizer.step()
            totals.add(terms, len(kinds))
            if rank == 0 and config.log_every and (step + 1) % config.log_every == 0:
                _progress(f"[{config.stage}] epoch {epoch + 1}/{config.epochs} "
                          f"batch {step + 1}/{batches_per_epoch} loss {terms.total.item():.4f}")
        seconds = time.perf_counter() - started
        everyone = totals.summed(device)
        metrics = {"epoch": epoch, **everyone.means(), "epoch_seconds": seconds,
                   "samples_per_second": everyone.samples / max(seconds, 1e-9),
                   "learning_rate": learning_rate, "resumed_from_epoch": resumed_from}
        history = history + [metrics]
        with tempfile.TemporaryDirectory() as folder:
            saved = None
            if rank == 0:  # identical replicas after DDP's all-reduce: one copy is enough
                torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                            "epoch": epoch, "history": history}, Path(folder) / _STATE_FILE)
                saved = ray.train.Checkpoint.from_directory(folder)
                _progress(f"[{config.stage}] epoch {epoch + 1}/{config.epochs}: loss {metrics['loss']:.4f} "
                          f"(face {metrics['classification_loss']:.4f}, box {metrics['box_loss']:.4f}, "
                          f"landmarks {metrics['landmark_loss']:.4f}) accuracy {metrics['accuracy']:.3f} "
                          f"{metrics['samples_per_second']:.0f} samples/s")
            ray.train.report(metrics, checkpoint=saved)


# -- the driver --------------------------------------------------------------------------------

def _run_config(config: TrainConfig) -> RunConfig:
    fs, path = filesystem(config.checkpoint_storage, config.storage_options)
    if not is_remote(config.checkpoint_storage):
        path = os.path.abspath(path)
        Path(path).mkdir(parents=True, exist_ok=True)
    return RunConfig(
        name=config.run_name or config.stage,
        storage_path=path,
        storage_filesystem=PyFileSystem(FSSpecHandler(fs)),
        failure_config=FailureConfig(max_failures=config.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
    )


def _default_cpus_per_worker(num_workers: int) -> float:
    """CPUs per worker that leave Ray Data a CPU to read and decode samples beside the workers
    (it needs none to make progress, but training waits on samples when it has none)."""
    total = float(ray.cluster_resources().get("CPU", 1.0))
    return min(1.0, max(total - 1.0, total / 2.0) / num_workers)


def _provenance(config: TrainConfig, samples: int, metrics: dict, history: list[dict],
                previous: dict | None) -> dict:
    settings = {k: v for k, v in asdict(config).items() if k not in ("inject_failure_at_epoch", "restart")}
    # All of it, not only storage_options: data, output and previous weights may be URLs that
    # carry credentials, and the provenance travels inside the weights file.
    return redact({
        "name": f"trained {config.stage}",
        "stage": config.stage,
        "config": settings,
        "data": {"shards": config.data, "samples": samples},
        "epochs": config.epochs,
        "final_metrics": {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()},
        "loss_history": [round(m["loss"], 6) for m in history],
        "previous": previous,
    })


def _write_weights(config: TrainConfig, stages: dict, provenance: dict) -> str:
    """Write the run's weights.safetensors locally or to object storage."""
    destination = f"{config.output.rstrip('/')}/{WEIGHTS_FILE}"
    if not is_remote(config.output):
        save_weights(destination, stages, provenance)
        return destination
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder) / WEIGHTS_FILE
        save_weights(local, stages, provenance)
        fs, path = filesystem(destination, config.storage_options)
        fs.put(str(local), path)
    return destination


def data_settings(config: TrainConfig) -> dict | None:
    """The settings that made the stage's shards (from prepare's record), or None if unrecorded."""
    fs, root = filesystem(config.data, config.storage_options)
    record_path = join(root, SUMMARY_FILE)
    if not fs.exists(record_path):
        return None
    with fs.open(record_path, "r") as handle:
        return json.load(handle).get("settings")


def run_settings(config: TrainConfig) -> dict:
    """What determines this run's result (jobs/training/fingerprint.py), with its data and stages."""
    previous = load_weights_from(config.previous_weights, config.storage_options).sha256 \
        if config.previous_weights else None
    return train_settings(config, data_settings(config), previous)


def _check_resume(config: TrainConfig, settings: dict) -> None:
    """Refuse (or, with restart, clear) a run of this name started with other settings; record ours."""
    fs, path = filesystem(config.checkpoint_storage, config.storage_options)
    run_folder = join(path if is_remote(config.checkpoint_storage) else os.path.abspath(path),
                      config.run_name or config.stage)
    record = join(run_folder, RUN_SETTINGS_FILE)
    if fs.exists(run_folder) and fs.ls(run_folder):
        earlier = json.loads(fs.cat_file(record)) if fs.exists(record) else None
        if earlier != settings:
            changed = refuse_unless_restart(
                earlier, settings, config.restart,
                f"{config.stage}: run {config.run_name or config.stage!r} in "
                f"{redact_text(config.checkpoint_storage)} was started",
                "discard its checkpoints and train afresh, or choose another --output (or --run-name)")
            print(f"[{config.stage}] --restart: discarding checkpoints made with other settings "
                  f"({changed})", flush=True)
            fs.rm(run_folder, recursive=True)
    fs.makedirs(run_folder, exist_ok=True)
    fs.pipe_file(record, json.dumps(settings, indent=2, sort_keys=True).encode())


def _load_state(checkpoint: ray.train.Checkpoint) -> dict:
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / _STATE_FILE, map_location="cpu", weights_only=True)


def _finished_state(config: TrainConfig) -> dict | None:
    """The run's last checkpointed state if it already holds every epoch asked for, else None.

    A finished run asked again (a command or recipe rerun, a driver that died while writing the
    weights) then needs no worker group: locally about 10 s, on a cluster nodes and GPUs.
    """
    run_config = _run_config(config)
    try:
        result = ray.train.Result.from_path(join(run_config.storage_path, run_config.name),
                                            storage_filesystem=run_config.storage_filesystem)
    except (RuntimeError, FileNotFoundError):  # no run of this name yet, or none checkpointed
        return None
    if result.checkpoint is None:
        return None
    state = _load_state(result.checkpoint)
    return state if state["epoch"] + 1 >= config.epochs else None


def _count_samples(config: TrainConfig) -> int:
    """How many samples the shards hold, from their Parquet footers."""
    fs, path = filesystem(config.data, config.storage_options)
    return pads.dataset(path, format="parquet", filesystem=PyFileSystem(FSSpecHandler(fs))).count_rows()


def _fit(config: TrainConfig) -> tuple[dict, int, TrainConfig]:
    """Train with Ray Train from the run's last checkpoint on: the final state, the sample count,
    and the config as run (its CPUs per worker settled)."""
    init_ray(dashboard=True)
    if config.cpus_per_worker is None:
        config = replace(config, cpus_per_worker=_default_cpus_per_worker(config.num_workers))
    dataset, samples = load_samples(config)
    print(f"[{config.stage}] {samples} samples from {redact_text(config.data)}; {config.epochs} epochs on "
          f"{config.num_workers} worker(s){' with GPUs' if config.use_gpu else ''}"
          f"{', OHEM' if config.ohem else ''}{', random flips' if config.flip else ''}"
          f"{f', colour jitter {config.color_jitter:g}' if config.color_jitter else ''}", flush=True)
    trainer = TorchTrainer(
        _train_loop,
        # Ray Train stores this with the run (and the workers need none of the paths or options).
        train_loop_config={"config": redact(asdict(config)), "samples": samples},
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker}),
        run_config=_run_config(config),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training {config.stage} reported no checkpoint")
    return _load_state(result.checkpoint), samples, config


def train_stage(config: TrainConfig) -> TrainSummary:
    """Train config.stage on its shards with Ray Train and write the run's weights file."""
    started = time.perf_counter()
    previous = load_weights_from(config.previous_weights, config.storage_options) \
        if config.previous_weights else None
    _check_shards(config)
    settings = run_settings(config)
    _check_resume(config, settings)
    state = _finished_state(config)
    if state is not None:
        samples = _count_samples(config)
        print(f"[{config.stage}] all {config.epochs} epochs are checkpointed already: "
              "its weights come from the last checkpoint", flush=True)
    else:
        state, samples, config = _fit(config)
    net = build_stage(config.stage)
    net.load_state_dict(state["model"])
    history = state["history"]
    stages = {name: stage for name, stage in (previous.stages.items() if previous else [])
              if name != config.stage}
    stages[config.stage] = net.eval()
    previous_info = ({"source": previous.source, "sha256": previous.sha256,
                      "name": previous.provenance.get("name")} if previous else None)
    provenance = _provenance(config, samples, history[-1], history, previous_info)
    provenance["settings"] = settings
    path = _write_weights(config, stages, provenance)
    summary = TrainSummary(path, history[-1], history, samples, time.perf_counter() - started)
    print(f"[{config.stage}] done in {summary.seconds:.0f} s: {redact_text(path)} "
          f"({json.dumps({k: round(v, 4) for k, v in history[-1].items() if isinstance(v, float)})})",
          flush=True)
    return summary
