"""The prepare job: training samples for one stage, as Parquet shards (a Ray Data job).

annotations -> map_batches(SampleMaker: read, augment, [mine with the earlier stages], label,
crop) -> write_parquet to OUTPUT/<stage>/. P-Net samples are random windows; R-Net and O-Net
samples are the windows the trained earlier stages propose, labelled by IoU. `mtcnn-jobs prepare`
and the recipe (recipe.py) run it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from mtcnn.annotations import FACE_FORMATS, FaceSourceError, face_format, from_table, read_face_source, read_facepoint_list
from mtcnn.annotations import to_table as annotation_table
from mtcnn.detector import DetectorConfig
from mtcnn.nets import stage_spec
from mtcnn.weights import CascadeWeights

from jobs.inputs.decode import read_rgb
from jobs.common.redaction import public_path, redact, redact_text
from jobs.common.storage import filesystem, is_remote
from jobs.inputs.stored_weights import load_weights_from
from jobs.training.augment import AugmentConfig, augment
from jobs.training.fingerprint import prepare_settings
from jobs.training.samples import SampleConfig, SampleSet, face_samples, landmark_samples, to_table
from jobs.training.schema import KIND_NAMES, SAMPLE_SCHEMA, SUMMARY_FILE, stage_folder

#: Mining with the detector's own thresholds: each stage trains on the windows it will be handed
#: at detection time (lower ones multiply the windows, and the time, for little gain).
#: The dynamic pyramid: mining only needs the windows, and builds them in a third of the time.
MINING_DETECTOR = DetectorConfig(min_face_size=20.0, thresholds=(0.6, 0.7, 0.7), pyramid="dynamic")


#: Rows gathered into one Parquet file at least (about 3.5 MB of 12 px, 57 MB of 48 px crops).
ROWS_PER_SHARD = 8192


class PrepareError(ValueError):
    """A prepare run that cannot start, with what to change."""


@contextmanager
def _as_prepare_error(option: str):
    """A face source's problem as a PrepareError naming the option that gave it."""
    try:
        yield
    except FaceSourceError as error:
        raise PrepareError(f"{option} {error}") from None


@dataclass(frozen=True)
class PrepareConfig:
    """What a prepare run reads, makes and writes."""

    output: str = field(metadata={"help": "folder or URL; shards go to OUTPUT/<stage>/"})
    samples: SampleConfig = field(default_factory=SampleConfig, metadata={"nested": ""})
    faces: str | Sequence[str] | None = field(default=None, metadata={"help": (
        "face annotations, one or more: WIDER *_bbx_gt.txt or a folder holding one and images/, "
        "WebFaces ground truth, dlib XML, FDDB ellipse list, or an annotation table (.parquet); "
        f"FORMAT:PATH names the format ({', '.join(FACE_FORMATS)}) where the file name does not tell it")})
    face_images: str | None = field(default=None, metadata={
        "help": "image root of a single --faces source (default: where its format keeps them)"})
    landmarks: str | None = field(default=None, metadata={
        "help": "5-point list 'path x1 x2 y1 y2 + 5 points'; its images give landmark samples only"})
    landmark_images: str | None = field(default=None, metadata={
        "help": "image root of --landmarks (default: the list's folder)"})
    weights: str | None = field(default=None, metadata={
        "help": "trained earlier stages (file or training-run folder); required for rnet and onet, "
                "whose samples are mined"})
    mining: DetectorConfig = field(default=MINING_DETECTOR, metadata={
        "nested": "mining-", "fields": ("min_face_size", "thresholds", "pyramid"),
        "aliases": {"pyramid": ("--pyramid",)}})
    augment: AugmentConfig | None = field(default_factory=AugmentConfig, metadata={
        "nested": "", "help": "random rotation, shift, zoom and flip of each image (off: none)"})
    seed: int = field(default=0, metadata={"help": "seed of every random draw"})
    limit: int | None = field(default=None, metadata={
        "help": "use only the first N images of each annotation list (quick runs)"})
    batch_size: int = field(default=8, metadata={"help": "images per batch handed to one actor"})
    concurrency: int | None = field(default=None, metadata={
        "help": "actors making samples (None: one per CPU of the cluster)"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace shards of an earlier run", "flag": "--restart", "aliases": ("--overwrite",)})
    storage_options: dict = field(default_factory=dict, metadata={
        "help": "fsspec options for --output and image URLs, as JSON"})
    address: str | None = field(default=None, metadata={"help": "Ray cluster address (None: a local Ray)"})

    @property
    def stage(self) -> str:
        """The stage whose samples are made."""
        return self.samples.stage

    @property
    def mined_by(self) -> str | None:
        """The stage whose proposals this stage's samples are mined from (None for pnet)."""
        return stage_spec(self.stage).previous

    @property
    def face_sources(self) -> tuple[str, ...]:
        """The face annotation sources, as given."""
        if self.faces is None:
            return ()
        return (self.faces,) if isinstance(self.faces, str) else tuple(self.faces)

    def __post_init__(self) -> None:
        if not self.face_sources and self.landmarks is None:
            raise PrepareError("give --faces (face annotations: a WIDER gt file or folder, ...) and/or "
                               "--landmarks (a 5-point list)")
        for source in self.face_sources:
            with _as_prepare_error("--faces"):
                face_format(source)  # an unknown format fails here, before anything starts
        if self.face_images is not None and len(self.face_sources) > 1:
            raise PrepareError("--face-images names one image root; with several --faces sources, "
                               "keep each source's images where its format expects them")
        if self.mined_by is not None and self.weights is None:
            raise PrepareError(f"--stage {self.stage} mines its samples with the trained "
                               f"{self.mined_by}: pass --weights (a weights file or training-run "
                               "folder holding it)")
        if self.limit is not None and self.limit < 1:
            raise PrepareError(f"--limit must be at least 1, got {self.limit}")
        if self.batch_size < 1:
            raise PrepareError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.concurrency is not None and self.concurrency < 1:
            raise PrepareError(f"--concurrency must be at least 1, got {self.concurrency}")


@dataclass
class PrepareSummary:
    """What a prepare run wrote."""

    stage: str
    output: str
    counts: dict[str, int]
    face_images: int
    landmark_images: int
    #: Images that gave no sample at all (unreadable, or no usable face and no room for negatives).
    empty_images: list[str]
    seconds: float
    shards: int

    @property
    def total(self) -> int:
        """Samples written."""
        return sum(self.counts.values())

    def lines(self) -> list[str]:
        """A short human-readable report."""
        counts = ", ".join(f"{name} {self.counts.get(name, 0)}" for name in KIND_NAMES.values())
        rate = self.total / self.seconds if self.seconds > 0 else float("nan")
        lines = [f"{self.stage}: {self.total} samples ({counts}) from {self.face_images} face images and "
                 f"{self.landmark_images} landmark images in {self.seconds:.1f} s ({rate:.0f} samples/s)",
                 f"{self.shards} Parquet shards in {self.output}"]
        if self.empty_images:
            lines.append(f"{len(self.empty_images)} images gave no samples (unreadable, or nothing usable "
                         "in them; the workers' log says why):")
            lines += [f"  {path}" for path in self.empty_images[:10]]
            if len(self.empty_images) > 10:
                lines.append(f"  ... and {len(self.empty_images) - 10} more (listed in {SUMMARY_FILE})")
        return lines


# -- the per-batch worker ---------------------------------------------------------------------

@dataclass
class PreparedImage:
    """One image on its way to samples: pixels and labels after augmentation, its random stream."""

    path: str
    pixels: np.ndarray
    boxes: np.ndarray
    landmarks: np.ndarray
    ignore: np.ndarray
    rng: np.random.Generator
    #: A landmark-list image: it gives landmark samples only.
    landmarks_only: bool
    #: Windows the earlier stages propose in it (mined stages' face images), else None.
    proposals: np.ndarray | None = None


class SampleMaker:
    """Makes one stage's samples for batches of annotated images (a Ray Data actor)."""

    def __init__(self, samples: SampleConfig, augment: AugmentConfig | None, seed: int,
                 weights=None, mining: DetectorConfig = MINING_DETECTOR,
                 storage_options: dict | None = None) -> None:
        self.samples = samples
        self.augment = augment
        self.seed = seed
        self.storage_options = storage_options or {}
        self.detector = None
        self.mined_by = stage_spec(samples.stage).previous
        if self.mined_by is not None:
            from mtcnn.detector import FaceDetector
            # Loaded once per actor: every batch it maps reuses the same nets.
            self.detector = FaceDetector(weights, config=mining)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The sample rows of a batch of annotated images, kinds mixed."""
        indices = batch.column("index").to_pylist()
        prepared = [image for image in map(self._prepare, from_table(batch), indices,
                                            batch.column("landmarks_only").to_pylist())
                    if image is not None]
        self._propose(prepared)
        # The shards keep each image's path minus any credentials it carries.
        tables = [to_table(samples, public_path(image.path), self.samples.stage)
                  for image in prepared for samples in self._samples(image) if len(samples)]
        if not tables:
            return SAMPLE_SCHEMA.empty_table()
        table = pa.concat_tables(tables)
        # Kinds come out grouped per image; mixing rows here gives training batches of every
        # kind without a global shuffle.
        order = np.random.default_rng([self.seed, *indices]).permutation(table.num_rows)
        return table.take(pa.array(order))

    def _prepare(self, annotation, index: int, landmarks_only: bool) -> PreparedImage | None:
        """Read and augment one image; None (and a line in the log) when it cannot be read."""
        try:
            pixels = read_rgb(annotation.path, self.storage_options)
        except Exception as error:  # noqa: BLE001 - one bad image must not stop the job
            # Surfaces in the driver's log; the summary lists every image without samples.
            print(redact_text(f"prepare: skipped {annotation.path}: {type(error).__name__}: {error}"),
                  file=sys.stderr)
            return None
        # One stream per image, from the run's seed and the image's place in the list: the
        # same samples however the images are spread over workers.
        rng = np.random.default_rng([self.seed, index])
        boxes, points, ignore = annotation.boxes, annotation.landmarks, annotation.ignore
        if self.augment is not None:
            pixels, boxes, points, ignore = augment(pixels, boxes, points, ignore, self.augment, rng)
        return PreparedImage(annotation.path, pixels, boxes, points, ignore, rng, landmarks_only)

    def _propose(self, prepared: list[PreparedImage]) -> None:
        """Set the earlier stages' windows on the face images of a mined stage (one detector call)."""
        mined = [image for image in prepared if not image.landmarks_only]
        if self.detector is None or not mined:
            return
        found = self.detector.propose([image.pixels for image in mined], up_to=self.mined_by)
        for image, detections in zip(mined, found):
            image.proposals = detections.boxes

    def _samples(self, image: PreparedImage) -> list[SampleSet]:
        """The face samples (unless landmarks only) and landmark samples of one image."""
        sets = []
        if not image.landmarks_only:
            sets.append(face_samples(image.pixels, image.boxes, image.ignore, self.samples, image.rng,
                                     image.proposals))
        sets.append(landmark_samples(image.pixels, image.boxes, image.landmarks, image.ignore,
                                     self.samples, image.rng))
        return sets


# -- the job ------------------------------------------------------------------------------------

def read_inputs(config: PrepareConfig) -> tuple[list, list]:
    """The face images' and landmark images' annotations, as the config names them."""
    faces, landmarks = [], []
    for source in config.face_sources:
        with _as_prepare_error("--faces"):
            faces += read_face_source(source, config.face_images)[: config.limit]
    if config.landmarks is not None:
        if not Path(config.landmarks).is_file():
            raise PrepareError(f"--landmarks {config.landmarks}: no such file")
        landmarks = read_facepoint_list(config.landmarks, config.landmark_images)[: config.limit]
    return faces, landmarks


def input_table(faces: list, landmarks: list) -> pa.Table:
    """One row per image: its annotation, whether it only gives landmark samples, its index."""
    table = annotation_table(faces + landmarks)
    table = table.append_column("landmarks_only", pa.array([False] * len(faces) + [True] * len(landmarks)))
    return table.append_column("index", pa.array(np.arange(len(faces) + len(landmarks), dtype=np.int64)))


def scaled_samples(config: PrepareConfig, face_images: int, landmark_images: int) -> SampleConfig:
    """The sample config with landmark samples per image set so the whole run follows `mix`."""
    samples = config.samples
    if samples.landmark_samples_per_image is not None or landmark_images == 0:
        return samples
    wanted = samples.landmark_quota() * max(face_images, 1)
    return dataclasses.replace(samples, landmark_samples_per_image=wanted / landmark_images)


def _prepare_output(config: PrepareConfig) -> tuple[object, str]:
    """The stage folder, checked empty (or emptied with overwrite) and writable."""
    folder = stage_folder(config.output, config.stage)
    try:
        fs, root = filesystem(folder, config.storage_options)
        existing = fs.ls(root, detail=False) if fs.exists(root) else []
    except Exception as error:  # noqa: BLE001 - any failure here means the run cannot start
        raise PrepareError(f"cannot use --output {config.output}: {type(error).__name__}: {error}") from None
    if existing:
        if not config.overwrite:
            raise PrepareError(f"{folder} already holds {len(existing)} files from an earlier run; pass "
                               "--restart (or --overwrite) to replace them or choose another --output")
        fs.rm(root, recursive=True)
    if not is_remote(folder):
        fs.makedirs(root, exist_ok=True)
    return fs, root


def _mining_weights(config: PrepareConfig) -> CascadeWeights | None:
    """The weights that mine this stage's samples (None for P-Net), loaded once; fails before any
    work when they cannot be read or lack the stages needed."""
    if config.mined_by is None:
        return None
    try:
        weights = load_weights_from(config.weights, config.storage_options)
    except Exception as error:  # noqa: BLE001 - reported with what to pass instead
        raise PrepareError(f"cannot load --weights {config.weights}: {error}") from None
    needed = stage_spec(config.stage).earlier
    missing = [name for name in needed if name not in weights.stages]
    if missing:
        raise PrepareError(f"--weights {config.weights} lack {missing}, which mine {config.stage} samples; "
                           f"they hold {sorted(weights.stages)}")
    return weights


def prepare_stage(config: PrepareConfig) -> PrepareSummary:
    """Run the prepare job for one stage and summarise what it wrote."""
    import ray
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from jobs.runtime.ray_env import init_ray

    started = time.perf_counter()
    weights = _mining_weights(config)
    faces, landmarks = read_inputs(config)
    if not faces and not landmarks:
        raise PrepareError("the annotation files list no images")
    fs, root = _prepare_output(config)
    samples = scaled_samples(config, len(faces), len(landmarks))

    init_ray(config.address)
    concurrency = config.concurrency or max(1, int(ray.cluster_resources().get("CPU", 1)))
    table = input_table(faces, landmarks)
    # Shuffle rows so every block mixes face and landmark images: actors finish together.
    order = np.random.default_rng(config.seed).permutation(len(table))
    table = table.take(pa.array(order))
    blocks = max(1, math.ceil(len(table) / config.batch_size))
    dataset = ray.data.from_arrow([table.slice(i * config.batch_size, config.batch_size)
                                   for i in range(blocks)])
    dataset = dataset.map_batches(
        SampleMaker, batch_size=config.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=min(concurrency, blocks)), num_cpus=1,
        fn_constructor_kwargs={"samples": samples, "augment": config.augment, "seed": config.seed,
                               "weights": weights, "mining": config.mining,
                               "storage_options": config.storage_options})
    # Writers take no CPU: the actors hold every CPU until the last image, and the shards
    # should land as they come rather than wait in the object store. A few thousand rows per
    # file keep the file count (and the trainer's listing) small.
    dataset.write_parquet(root, filesystem=PyFileSystem(FSSpecHandler(fs)), ray_remote_args={"num_cpus": 0},
                          min_rows_per_file=ROWS_PER_SHARD)

    shards = [path for path in fs.find(root) if path.endswith(".parquet")]
    written = (pads.dataset(shards, filesystem=PyFileSystem(FSSpecHandler(fs)), format="parquet")
               .to_table(columns=["kind", "source"]) if shards else SAMPLE_SCHEMA.empty_table())
    kinds = np.asarray(written.column("kind").to_numpy(), np.int64)
    counts = {name: int((kinds == kind).sum()) for kind, name in KIND_NAMES.items()}
    sources = set(written.column("source").unique().to_pylist())
    empty = [public_path(a.path) for a in faces + landmarks if public_path(a.path) not in sources]
    summary = PrepareSummary(config.stage, stage_folder(config.output, config.stage), counts, len(faces),
                             len(landmarks), empty, time.perf_counter() - started, len(shards))
    _write_summary(fs, root, config, samples, summary, weights.sha256 if weights else None)
    return summary


def _write_summary(fs, root: str, config: PrepareConfig, samples: SampleConfig, summary: PrepareSummary,
                   weights_sha256: str | None) -> None:
    """Record the run next to its shards (secrets in options and paths redacted)."""
    record = redact({
        "stage": summary.stage, "counts": summary.counts, "seconds": round(summary.seconds, 3),
        "face_images": summary.face_images, "landmark_images": summary.landmark_images,
        "images_without_samples": summary.empty_images, "shards": summary.shards,
        "samples": dataclasses.asdict(samples),
        "augment": dataclasses.asdict(config.augment) if config.augment else None,
        "mining": dataclasses.asdict(config.mining) if config.mined_by else None,
        "weights": config.weights, "seed": config.seed, "faces": config.faces, "landmarks": config.landmarks,
        "storage_options": config.storage_options,
    })
    record["weights_sha256"] = weights_sha256
    record["settings"] = prepare_settings(config, weights_sha256)
    with fs.open(root.rstrip("/") + "/" + SUMMARY_FILE, "w") as handle:
        json.dump(record, handle, indent=2, default=str)


