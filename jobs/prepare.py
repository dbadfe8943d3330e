"""mtcnn-jobs prepare: training samples for one stage, as Parquet shards (a Ray Data job).

annotations -> map_batches(SampleMaker: read, augment, [mine with the earlier stages], label,
crop) -> write_parquet to OUTPUT/<stage>/. P-Net samples are random windows; R-Net and O-Net
samples are the windows the trained earlier stages propose, labelled by IoU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from mtcnn.detector import DetectorConfig
from mtcnn.pyramid import PYRAMIDS

from .redaction import public_path, redact, redact_text
from .storage import filesystem, is_remote, parse_storage_options
from .stored_weights import load_weights_from
from .training.augment import AugmentConfig
from .training.samples import SampleConfig, face_samples, landmark_samples, to_table
from .training.fingerprint import prepare_settings
from .training.schema import KIND_NAMES, SAMPLE_SCHEMA, STAGES, SUMMARY_FILE, stage_folder

#: Earlier stages that propose the windows each stage trains on.
MINED_BY = {"rnet": "pnet", "onet": "rnet"}
#: Mining with the detector's own thresholds: each stage trains on the windows it will be handed
#: at detection time (lower ones multiply the windows, and the time, for little gain).
MINING_DETECTOR = DetectorConfig(min_face_size=20.0, thresholds=(0.6, 0.7, 0.7))


#: Rows gathered into one Parquet file at least (about 3.5 MB of 12 px, 57 MB of 48 px crops).
ROWS_PER_SHARD = 8192


class PrepareError(ValueError):
    """A prepare run that cannot start, with what to change."""


@dataclass(frozen=True)
class PrepareConfig:
    """What a prepare run reads, makes and writes."""

    output: str
    samples: SampleConfig = field(default_factory=SampleConfig)
    #: Face annotations, one source or several: a WIDER `*_bbx_gt.txt` (or a folder holding one
    #: and `images/`), a WebFaces ground-truth file, a dlib XML file, an FDDB ellipse list or an
    #: annotation table (.parquet); `FORMAT:PATH` names the format where the name does not tell.
    faces: str | Sequence[str] | None = None
    #: Image root of the face annotations (one source only; default: the format's own place).
    face_images: str | None = None
    #: 5-point list (`path x1 x2 y1 y2` + 5 points); its images are used for landmark samples only.
    landmarks: str | None = None
    landmark_images: str | None = None
    #: Trained earlier stages (file or training-run folder); needed for rnet and onet.
    weights: str | None = None
    mining: DetectorConfig = MINING_DETECTOR
    #: None: no augmentation.
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    seed: int = 0
    #: Use only the first N images of each annotation list (quick runs).
    limit: int | None = None
    #: Images per batch handed to one actor.
    batch_size: int = 8
    #: Actors making samples; None: one per CPU of the cluster.
    concurrency: int | None = None
    overwrite: bool = False
    storage_options: dict = field(default_factory=dict)
    address: str | None = None

    @property
    def stage(self) -> str:
        """The stage whose samples are made."""
        return self.samples.stage

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
            face_format(source)  # an unknown format fails here, before anything starts
        if self.face_images is not None and len(self.face_sources) > 1:
            raise PrepareError("--face-images names one image root; with several --faces sources, "
                               "keep each source's images where its format expects them")
        if self.stage in MINED_BY and self.weights is None:
            raise PrepareError(f"--stage {self.stage} mines its samples with the trained "
                               f"{MINED_BY[self.stage]}: pass --weights (a weights file or training-run "
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
        if samples.stage in MINED_BY:
            from mtcnn.detector import FaceDetector
            # Loaded once per actor: every batch it maps reuses the same nets.
            self.detector = FaceDetector(weights, config=mining)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from mtcnn.annotations import from_table

        from .decode import decode_image
        from .training.augment import augment

        annotations = from_table(batch)
        landmarks_only = batch.column("landmarks_only").to_pylist()
        indices = batch.column("index").to_pylist()
        images, kept = [], []
        errors = []
        for annotation, index, only_landmarks in zip(annotations, indices, landmarks_only):
            try:
                fs, inner = filesystem(annotation.path, self.storage_options)
                with fs.open(inner, "rb") as handle:
                    image = decode_image(handle.read())
            except Exception as error:  # noqa: BLE001 - one bad image must not stop the job
                errors.append((annotation.path, f"{type(error).__name__}: {error}"))
                continue
            # One stream per image, from the run's seed and the image's place in the list: the
            # same samples however the images are spread over workers.
            rng = np.random.default_rng([self.seed, index])
            boxes, points, ignore = annotation.boxes, annotation.landmarks, annotation.ignore
            if self.augment is not None:
                image, boxes, points, ignore = augment(image, boxes, points, ignore, self.augment, rng)
            images.append(image)
            kept.append((annotation.path, boxes, points, ignore, rng, only_landmarks))

        proposals = [None] * len(images)
        if self.detector is not None:
            mined = [i for i, entry in enumerate(kept) if not entry[-1]]
            if mined:
                found = self.detector.propose([images[i] for i in mined], up_to=MINED_BY[self.samples.stage])
                for i, detections in zip(mined, found):
                    proposals[i] = detections.boxes

        tables = []
        for image, (path, boxes, points, ignore, rng, only_landmarks), windows in zip(images, kept, proposals):
            sets = []
            if not only_landmarks:
                sets.append(face_samples(image, boxes, ignore, self.samples, rng, windows))
            sets.append(landmark_samples(image, boxes, points, ignore, self.samples, rng))
            for samples in sets:
                if len(samples):
                    # The shards keep the image's path minus any credentials it carries.
                    tables.append(to_table(samples, public_path(path), self.samples.stage))
        for path, reason in errors:
            # Surfaces in the driver's log; the summary lists every image without samples.
            print(redact_text(f"prepare: skipped {path}: {reason}"), file=sys.stderr)
        if not tables:
            return SAMPLE_SCHEMA.empty_table()
        table = pa.concat_tables(tables)
        # Kinds come out grouped per image; mixing rows here gives training batches of every
        # kind without a global shuffle.
        order = np.random.default_rng([self.seed, *indices]).permutation(table.num_rows)
        return table.take(pa.array(order))


# -- the job ------------------------------------------------------------------------------------

#: Face annotation formats --faces reads (mtcnn.annotations has a reader for each).
FACE_FORMATS = ("wider", "webfaces", "dlib", "fddb", "table")


def face_format(source: str) -> tuple[str, str]:
    """(format, path) of a --faces source: FORMAT:PATH, or a path whose name tells the format."""
    head, colon, rest = source.partition(":")
    if colon and head.lower() in FACE_FORMATS:
        return head.lower(), rest
    path = Path(source)
    name = path.name.lower()
    if path.is_dir() or name.endswith("_bbx_gt.txt"):
        return "wider", source
    if name.endswith(".xml"):
        return "dlib", source
    if name.endswith(".parquet"):
        return "table", source
    if "ellipselist" in name:
        return "fddb", source
    if "webfaces" in name or "groundthruth" in name:
        return "webfaces", source
    raise PrepareError(f"--faces {source}: cannot tell the annotation format from the name; write it "
                       f"as FORMAT:PATH, FORMAT one of {', '.join(FACE_FORMATS)}")


def _wider_paths(faces: str, face_images: str | None) -> tuple[str, str]:
    """The gt file and image root for --faces given as a file or a folder."""
    path = Path(faces)
    if path.is_dir():
        found = sorted(path.glob("*_bbx_gt.txt"))
        if len(found) != 1:
            raise PrepareError(f"--faces {faces} is a folder; expected exactly one *_bbx_gt.txt in it, "
                               f"found {len(found)}: pass the gt file itself")
        return str(found[0]), face_images or str(path / "images")
    if not path.is_file():
        raise PrepareError(f"--faces {faces}: no such file or folder")
    return str(path), face_images or str(path.parent / "images")


def read_face_source(source: str, images: str | None = None) -> list:
    """The face annotations of one --faces source, read by its format's reader."""
    from mtcnn.annotations import from_table, read_dlib_xml, read_fddb, read_webfaces, read_wider

    kind, path = face_format(source)
    if "://" in path:
        raise PrepareError(f"--faces {source}: annotation files are read from local disk (the images "
                           "they name may be anywhere); copy the file here and pass its path")
    if kind == "wider":
        return read_wider(*_wider_paths(path, images))
    if not Path(path).is_file():
        raise PrepareError(f"--faces {source}: no such file")
    if kind == "webfaces":
        return read_webfaces(path, images)
    if kind == "dlib":
        return read_dlib_xml(path)
    if kind == "fddb":
        return read_fddb(path, images)
    return from_table(pq.read_table(path))


def read_inputs(config: PrepareConfig) -> tuple[list, list]:
    """The face images' and landmark images' annotations, as the config names them."""
    from mtcnn.annotations import read_facepoint_list

    faces, landmarks = [], []
    for source in config.face_sources:
        faces += read_face_source(source, config.face_images)[: config.limit]
    if config.landmarks is not None:
        if not Path(config.landmarks).is_file():
            raise PrepareError(f"--landmarks {config.landmarks}: no such file")
        landmarks = read_facepoint_list(config.landmarks, config.landmark_images)[: config.limit]
    return faces, landmarks


def input_table(faces: list, landmarks: list) -> pa.Table:
    """One row per image: its annotation, whether it only gives landmark samples, its index."""
    from mtcnn.annotations import to_table as annotation_table

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
                               "--overwrite to replace them or choose another --output")
        fs.rm(root, recursive=True)
    if not is_remote(folder):
        fs.makedirs(root, exist_ok=True)
    return fs, root


def _check_weights(config: PrepareConfig) -> None:
    """Fail before any work when the weights lack the stages that mine this stage's samples."""
    if config.stage not in MINED_BY:
        return
    try:
        weights = load_weights_from(config.weights, config.storage_options)
    except Exception as error:  # noqa: BLE001 - reported with what to pass instead
        raise PrepareError(f"cannot load --weights {config.weights}: {error}") from None
    needed = ["pnet"] if config.stage == "rnet" else ["pnet", "rnet"]
    missing = [name for name in needed if name not in weights.stages]
    if missing:
        raise PrepareError(f"--weights {config.weights} lack {missing}, which mine {config.stage} samples; "
                           f"they hold {sorted(weights.stages)}")


def prepare_stage(config: PrepareConfig) -> PrepareSummary:
    """Run the prepare job for one stage and summarise what it wrote."""
    import ray
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from .ray_env import init_ray

    started = time.perf_counter()
    _check_weights(config)
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
                               "weights": load_weights_from(config.weights, config.storage_options)
                               if config.stage in MINED_BY else None, "mining": config.mining,
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
    _write_summary(fs, root, config, samples, summary)
    return summary


def _write_summary(fs, root: str, config: PrepareConfig, samples: SampleConfig, summary: PrepareSummary) -> None:
    """Record the run next to its shards (secrets in options and paths redacted)."""
    record = redact({
        "stage": summary.stage, "counts": summary.counts, "seconds": round(summary.seconds, 3),
        "face_images": summary.face_images, "landmark_images": summary.landmark_images,
        "images_without_samples": summary.empty_images, "shards": summary.shards,
        "samples": dataclasses.asdict(samples),
        "augment": dataclasses.asdict(config.augment) if config.augment else None,
        "mining": dataclasses.asdict(config.mining) if config.stage in MINED_BY else None,
        "weights": config.weights, "seed": config.seed, "faces": config.faces, "landmarks": config.landmarks,
        "storage_options": config.storage_options,
    })
    record["weights_sha256"] = None
    if config.stage in MINED_BY:
        record["weights_sha256"] = load_weights_from(config.weights, config.storage_options).sha256
    record["settings"] = prepare_settings(config, record["weights_sha256"])
    with fs.open(root.rstrip("/") + "/" + SUMMARY_FILE, "w") as handle:
        json.dump(record, handle, indent=2, default=str)


# -- command line ------------------------------------------------------------------------------

def _mix(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mix takes four numbers like 3,1,1,2, got {text!r}") from None
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"--mix takes four numbers negative,positive,part,landmark, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `mtcnn-jobs prepare`."""
    parser.add_argument("--stage", choices=STAGES, required=True, help="the stage whose samples to make")
    parser.add_argument("--faces", nargs="+", action="extend", metavar="SOURCE",
                        help="face annotations, one or more: WIDER *_bbx_gt.txt or a folder holding one "
                             "and images/, WebFaces ground truth, dlib XML, FDDB ellipse list, or an "
                             "annotation table (.parquet); FORMAT:PATH names the format "
                             f"({', '.join(FACE_FORMATS)}) where the file name does not tell it")
    parser.add_argument("--face-images", help="image root of a single --faces source "
                                              "(default: where its format keeps them)")
    parser.add_argument("--landmarks", help="5-point list 'path x1 x2 y1 y2 + 5 points' for landmark samples")
    parser.add_argument("--landmark-images", help="image root of --landmarks (default: the list's folder)")
    parser.add_argument("--weights", help="trained earlier stages (file or training-run folder); "
                                          "required for rnet and onet, whose samples are mined")
    parser.add_argument("--output", required=True, help="folder or URL; shards go to OUTPUT/<stage>/")
    parser.add_argument("--samples-per-image", type=int, default=SampleConfig.samples_per_image,
                        help="negatives + positives + parts per face image (default %(default)s)")
    parser.add_argument("--landmark-samples-per-image", type=float, default=None,
                        help="landmark samples per landmark image (default: as --mix asks, "
                             "given the numbers of images)")
    parser.add_argument("--mix", type=_mix, default=SampleConfig.mix,
                        help="negative,positive,part,landmark ratio (default 3,1,1,2)")
    parser.add_argument("--negative-iou", type=float, default=SampleConfig.negative_iou,
                        help="negatives overlap every face below this IoU (default %(default)s; "
                             "the original MTCNN uses 0.3)")
    parser.add_argument("--min-face-size", type=float, default=SampleConfig.min_face_size,
                        help="faces smaller than this (longer side, px) give no positives (default %(default)s)")
    parser.add_argument("--pyramid", choices=PYRAMIDS, default="dynamic", help="pyramid used when mining")
    parser.add_argument("--mining-min-face-size", type=float, default=MINING_DETECTOR.min_face_size,
                        help="smallest face the mining cascade looks for (default %(default)s)")
    parser.add_argument("--mining-thresholds", type=float, nargs=2, default=MINING_DETECTOR.thresholds[:2],
                        metavar=("PNET", "RNET"),
                        help="score thresholds of the proposing stages (default %(default)s)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="random rotation, shift, zoom and flip (default on)")
    parser.add_argument("--augment-probability", type=float, default=AugmentConfig.probability,
                        help="share of images augmented (default %(default)s)")
    parser.add_argument("--max-rotation", type=float, default=AugmentConfig.max_rotation,
                        help="degrees (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images of each list")
    parser.add_argument("--batch-size", type=int, default=8, help="images per actor batch (default 8)")
    parser.add_argument("--concurrency", type=int, default=None, help="actors (default: one per CPU)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards of an earlier run")
    parser.add_argument("--storage-options", help="fsspec options for --output and image URLs, as JSON")
    parser.add_argument("--address", help="Ray cluster address (default: a local Ray)")


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    """The PrepareConfig that the command-line options describe."""
    samples = SampleConfig(stage=args.stage, samples_per_image=args.samples_per_image, mix=args.mix,
                           landmark_samples_per_image=args.landmark_samples_per_image,
                           negative_iou=args.negative_iou, min_face_size=args.min_face_size)
    augment = (AugmentConfig(max_rotation=args.max_rotation, probability=args.augment_probability)
               if args.augment else None)
    thresholds = (*args.mining_thresholds, MINING_DETECTOR.thresholds[2])
    mining = DetectorConfig(min_face_size=args.mining_min_face_size, thresholds=thresholds, pyramid=args.pyramid)
    return PrepareConfig(output=args.output, samples=samples, faces=args.faces, face_images=args.face_images,
                         landmarks=args.landmarks, landmark_images=args.landmark_images, weights=args.weights,
                         mining=mining, augment=augment, seed=args.seed, limit=args.limit,
                         batch_size=args.batch_size, concurrency=args.concurrency, overwrite=args.overwrite,
                         storage_options=parse_storage_options(args.storage_options), address=args.address)


def run(args: argparse.Namespace) -> int:
    """Run `mtcnn-jobs prepare`; 0 on success, 2 on bad input."""
    from mtcnn.annotations import AnnotationError

    try:
        config = config_from_args(args)
        summary = prepare_stage(config)
    except (PrepareError, AnnotationError, ValueError) as error:
        print(f"prepare: {redact_text(str(error))}", file=sys.stderr)
        return 2
    for line in summary.lines():
        print(redact_text(line))
    return 0
