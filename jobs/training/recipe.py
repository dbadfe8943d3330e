"""The whole cascade in one run: prepare P -> train P -> mine R -> train R -> mine O -> train O."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from mtcnn.annotations import split_format
from mtcnn.nets import STAGE_NAMES
from mtcnn.pyramid import PYRAMIDS

from jobs.common.redaction import redact, redact_text
from jobs.common.settings import build, merge, read_yaml
from jobs.common.storage import filesystem, is_remote, is_url, join
from jobs.inputs.stored_weights import WEIGHTS_FILE, load_weights_from
from jobs.training.fingerprint import prepare_settings, refuse_unless_restart
from jobs.training.samples import SampleConfig
from jobs.training.schema import SUMMARY_FILE, stage_folder
from jobs.training.trainer import TrainConfig, TrainSummary, run_settings, train_stage


#: Per-stage keys a recipe may set: the training and sample settings that differ by stage.
#: The rest of TrainConfig is set once for the recipe (RecipeConfig) or by the recipe itself.
_RECIPE_LEVEL = {"stage", "data", "output", "run_name", "previous_weights", "inject_failure_at_epoch", "restart",
                 "ohem", "num_workers", "use_gpu", "cpus_per_worker", "storage_path", "storage_options", "seed"}
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in _RECIPE_LEVEL)
SAMPLE_KEYS = tuple(f.name for f in dataclasses.fields(SampleConfig) if f.name != "stage")


class StageSettings(dict):
    """One stage's settings: overrides of TrainConfig and SampleConfig fields, by field name.

    Not a schema of its own: the keys are those classes' fields, and an unset key reads as their
    default (`settings.epochs`).
    """

    def __getattr__(self, name: str):
        if name in self:
            return self[name]
        for cls in (TrainConfig, SampleConfig):
            for f in dataclasses.fields(cls):
                if f.name == name:
                    return f.default if f.default is not dataclasses.MISSING else f.default_factory()
        raise AttributeError(name)

    @staticmethod
    def checked(values, where: str) -> "StageSettings":
        """The settings of a recipe's stage entry, naming keys that are no such setting."""
        if not isinstance(values, dict):
            raise ValueError(f"{where} must be a mapping, got {type(values).__name__}")
        unknown = sorted(set(values) - set(TRAIN_KEYS) - set(SAMPLE_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; expected some of "
                             f"{sorted(TRAIN_KEYS + SAMPLE_KEYS)}")
        return StageSettings(values)

    def samples(self, stage: str) -> SampleConfig:
        """The stage's SampleConfig."""
        return SampleConfig(stage=stage, **{k: v for k, v in self.items() if k in SAMPLE_KEYS})

    def training(self) -> dict:
        """The stage's TrainConfig overrides."""
        return {k: v for k, v in self.items() if k in TRAIN_KEYS}


@dataclass
class RecipeConfig:
    """Where the data is and how each stage is prepared and trained."""

    #: Face annotations: one source or a list (WIDER gt file or folder, WebFaces, dlib XML, FDDB,
    #: annotation table; FORMAT:PATH where the name does not tell), as `mtcnn-jobs prepare --faces`.
    faces: str | list[str] = field(metadata={"help": "recipe: face annotation sources, as prepare --faces"})
    #: Default: the format's own place (a WIDER folder's images/).
    face_images: str | None = field(default=None, metadata={
        "help": "recipe: image root of the face annotations (one source only), e.g. s3://bucket/WIDER_train/images"})
    landmarks: str | None = field(default=None, metadata={"help": "recipe: 5-point list (cnn_facepoint format)"})
    limit: int | None = field(default=None, metadata={"help": "recipe: first N images of each list (quick runs)"})
    augment: bool = field(default=True, metadata={"help": "recipe: augment the images samples are cut from"})
    #: Per stage, overrides of the TrainConfig and SampleConfig defaults (TRAIN_KEYS, SAMPLE_KEYS).
    stages: dict[str, StageSettings] = field(default_factory=lambda: {s: StageSettings() for s in STAGE_NAMES})
    num_workers: int = 2
    cpus_per_worker: float | None = None  # None: up to 1, leaving Ray Data a CPU
    use_gpu: bool = False
    ohem: bool = False
    prepare_concurrency: int | None = field(default=None, metadata={
        "help": "recipe: sample-making actors (None: one per CPU)"})
    mining_min_face_size: float = field(default=20.0, metadata={
        "help": "recipe: smallest face the mining cascade looks for"})
    mining_pyramid: str = field(default="dynamic", metadata={"help": "recipe: pyramid of the mining cascade",
                                                            "choices": PYRAMIDS})
    storage_path: str | None = None  # checkpoints; None: under each stage's run folder
    storage_options: dict = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.stages) - set(STAGE_NAMES)
        if unknown or list(self.stages) != [s for s in STAGE_NAMES if s in self.stages]:
            raise ValueError(f"stages must be a subset of {list(STAGE_NAMES)} in cascade order, "
                             f"got {list(self.stages)}")
        if "pnet" not in self.stages:
            raise ValueError("the recipe starts with pnet: every later stage is mined with it")


def load_recipe(path: str | Path, overrides: dict | None = None) -> RecipeConfig:
    """Read a recipe YAML file; relative data paths are taken from the file's folder.

    overrides (e.g. from the command line) are laid over the file's values: RecipeConfig keys,
    and "stage_overrides", settings applied to every stage.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"recipe config {path} not found")
    values = merge(read_yaml(path), dict(overrides or {}))
    every_stage = values.pop("stage_overrides", {})
    stages = values.pop("stages", None)
    if stages is None and every_stage:
        stages = {name: {} for name in STAGE_NAMES}
    if stages is not None:
        if not isinstance(stages, dict):
            raise ValueError(f"{path}: stages must map stage names to settings")
        values["stages"] = {name: StageSettings.checked({**(settings or {}), **every_stage},
                                                        f"{path}: stages.{name}")
                            for name, settings in stages.items()}
    if isinstance(values.get("faces"), list):
        values["faces"] = [_resolve_from(path.parent, source) for source in values["faces"]]
    elif values.get("faces"):
        values["faces"] = _resolve_from(path.parent, values["faces"])
    for key in ("landmarks", "face_images"):
        if values.get(key):
            values[key] = _resolve_from(path.parent, values[key])
    return build(RecipeConfig, values, str(path))


def _resolve_from(folder: Path, source: str) -> str:
    """A relative local path (after an optional FORMAT: prefix) taken from folder; others as they are."""
    named, location = split_format(source)
    prefix = f"{named}:" if named else ""
    if is_url(location) or Path(location).is_absolute():
        return str(source)
    return prefix + str((folder / location).resolve())


@dataclass
class RecipeSummary:
    """What a recipe run produced."""

    weights_path: str
    stages: dict[str, dict]  # per stage: samples, prepare seconds, train seconds, final metrics
    seconds: float


def _prepare(config: RecipeConfig, stage: str, samples_root: str, weights: str | None,
             restart: bool) -> dict:
    """Make a stage's samples, or reuse those an earlier run made with the same settings."""
    from mtcnn.detector import DetectorConfig

    from jobs.training.augment import AugmentConfig
    from jobs.training.prepare_stage import MINING_DETECTOR, PrepareConfig, prepare_stage

    prepare = PrepareConfig(
        output=samples_root, samples=config.stages[stage].samples(stage),
        faces=config.faces, face_images=config.face_images, landmarks=config.landmarks, weights=weights,
        mining=DetectorConfig(min_face_size=config.mining_min_face_size,
                              thresholds=MINING_DETECTOR.thresholds, pyramid=config.mining_pyramid),
        augment=AugmentConfig() if config.augment else None, seed=config.seed, limit=config.limit,
        concurrency=config.prepare_concurrency, overwrite=True,
        storage_options=config.storage_options)
    folder = stage_folder(samples_root, stage)
    fs, root = filesystem(folder, config.storage_options)
    summary_file = join(root, SUMMARY_FILE)
    if fs.exists(summary_file):
        record = json.loads(fs.cat_file(summary_file))
        wanted = prepare_settings(prepare, load_weights_from(weights, config.storage_options).sha256 if weights else None)
        if record.get("settings") == wanted:
            print(f"[recipe] {stage}: reusing samples in {redact_text(folder)} ({record['counts']})",
                  flush=True)
            return {"counts": record["counts"], "prepare_seconds": record["seconds"], "reused": True}
        changed = refuse_unless_restart(
            record.get("settings"), wanted, restart, f"{stage}: the samples in {redact_text(folder)} were made",
            "make them again (and retrain from there), or choose another --output")
        print(f"[recipe] {stage}: --restart: making samples again ({changed})", flush=True)
    print(f"[recipe] {stage}: preparing samples"
          f"{f' mined with {redact_text(weights)}' if weights else ''}", flush=True)
    summary = prepare_stage(prepare)
    for line in summary.lines():
        print(f"[recipe] {redact_text(line)}", flush=True)
    return {"counts": summary.counts, "prepare_seconds": round(summary.seconds, 1)}


def _train(config: RecipeConfig, stage: str, samples_root: str, run_folder: str,
           previous: str | None, restart: bool) -> TrainSummary | None:
    """Train a stage, or reuse the weights an earlier run trained with the same settings."""
    settings = config.stages[stage]
    # Same run name and storage path as an interrupted attempt: Ray Train resumes its checkpoint
    # (train_stage refuses one started with other settings, unless restart).
    train = TrainConfig(
        stage=stage, data=stage_folder(samples_root, stage), output=run_folder,
        **settings.training(), ohem=config.ohem, num_workers=config.num_workers, use_gpu=config.use_gpu,
        cpus_per_worker=config.cpus_per_worker, storage_path=config.storage_path,
        run_name=f"recipe-{stage}", previous_weights=previous,
        storage_options=config.storage_options, seed=config.seed, restart=restart)
    weights_file = join(run_folder, WEIGHTS_FILE)
    fs, path = filesystem(weights_file, config.storage_options)
    if fs.exists(path):
        earlier = load_weights_from(weights_file, config.storage_options).provenance.get("settings")
        wanted = run_settings(train)
        if earlier == wanted:
            print(f"[recipe] {stage}: reusing trained weights in {redact_text(run_folder)}", flush=True)
            return None
        changed = refuse_unless_restart(
            earlier, wanted, restart, f"{stage}: the weights in {redact_text(run_folder)} were trained",
            "train again, or choose another --output")
        print(f"[recipe] {stage}: --restart: training again ({changed})", flush=True)
    return train_stage(train)


def run_recipe(config: RecipeConfig, output: str, restart: bool = False) -> RecipeSummary:
    """Prepare and train every configured stage in turn; the final weights land in output/.

    Output may be a local folder or an object-store URL. A stage's samples and weights from an
    earlier run are reused only when the settings that made them are the same; otherwise the run
    is refused naming the differences, or, with restart, made again from that stage on.
    """
    started = time.perf_counter()
    output = str(output).rstrip("/")
    fs, root = filesystem(output, config.storage_options)
    if not is_remote(output):
        output = os.path.abspath(output)
        fs.makedirs(output, exist_ok=True)
    samples_root = join(output, "samples")
    previous: str | None = None
    report: dict[str, dict] = {}
    for stage in config.stages:
        stage_started = time.perf_counter()
        report[stage] = _prepare(config, stage, samples_root, previous, restart)
        run_folder = join(output, stage)
        trained = _train(config, stage, samples_root, run_folder, previous, restart)
        if trained is not None:
            report[stage].update(train_seconds=round(trained.seconds, 1), samples=trained.samples,
                                 final_metrics=trained.metrics)
        report[stage]["stage_seconds"] = round(time.perf_counter() - stage_started, 1)
        previous = run_folder  # its weights file holds this stage and all earlier ones
        print(f"[recipe] {stage} finished after {time.perf_counter() - started:.0f} s in all",
              flush=True)
    # `load_weights(output)` finds the final cascade there.
    final = join(output, WEIGHTS_FILE)
    fs, _ = filesystem(final, config.storage_options)
    fs.copy(filesystem(join(previous, WEIGHTS_FILE), config.storage_options)[1],
            filesystem(final, config.storage_options)[1])
    seconds = time.perf_counter() - started
    record = {"config": redact(dataclasses.asdict(config)), "stages": report,
              "seconds": round(seconds, 1), "weights": redact_text(final)}
    fs.pipe_file(filesystem(join(output, "recipe.json"), config.storage_options)[1],
                 json.dumps(record, indent=2, default=str).encode())
    return RecipeSummary(final, report, seconds)
