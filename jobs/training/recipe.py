"""The whole cascade in one run: prepare P -> train P -> mine R -> train R -> mine O -> train O."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from mtcnn.nets import STAGE_NAMES

from mtcnn.annotations import split_format
from mtcnn.pyramid import PYRAMIDS

from ..redaction import redact, redact_text
from ..settings import build, merge, read_yaml
from ..storage import is_url
from .samples import SampleConfig
from .schema import SUMMARY_FILE, stage_folder
from .trainer import WEIGHTS_FILE, TrainConfig, TrainSummary, train_stage


#: Per-stage keys a recipe may set: the training and sample settings that differ by stage.
#: The rest of TrainConfig is set once for the recipe (RecipeConfig) or by the recipe itself.
_RECIPE_LEVEL = {"stage", "data", "output", "run_name", "previous_weights", "inject_failure_at_epoch",
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
    if values.get("landmarks"):
        values["landmarks"] = _resolve_from(path.parent, values["landmarks"])
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


def _prepare(config: RecipeConfig, stage: str, samples_root: Path, weights: str | None) -> dict:
    """Make (or reuse, when a finished earlier run left them) a stage's samples."""
    from mtcnn.detector import DetectorConfig

    from .augment import AugmentConfig
    from .prepare_stage import MINING_DETECTOR, PrepareConfig, prepare_stage

    folder = Path(stage_folder(str(samples_root), stage))
    summary_file = folder / SUMMARY_FILE
    if summary_file.is_file():
        record = json.loads(summary_file.read_text())
        print(f"[recipe] {stage}: reusing samples in {folder} ({record['counts']})", flush=True)
        return {"counts": record["counts"], "prepare_seconds": record["seconds"], "reused": True}
    prepare = PrepareConfig(
        output=str(samples_root), samples=config.stages[stage].samples(stage),
        faces=config.faces, landmarks=config.landmarks, weights=weights,
        mining=DetectorConfig(min_face_size=config.mining_min_face_size,
                              thresholds=MINING_DETECTOR.thresholds, pyramid=config.mining_pyramid),
        augment=AugmentConfig() if config.augment else None, seed=config.seed, limit=config.limit,
        concurrency=config.prepare_concurrency, overwrite=True,
        storage_options=config.storage_options)
    print(f"[recipe] {stage}: preparing samples"
          f"{f' mined with {weights}' if weights else ''}", flush=True)
    summary = prepare_stage(prepare)
    for line in summary.lines():
        print(f"[recipe] {redact_text(line)}", flush=True)
    return {"counts": summary.counts, "prepare_seconds": round(summary.seconds, 1)}


def _train(config: RecipeConfig, stage: str, samples_root: Path, run_folder: Path,
           previous: str | None) -> TrainSummary | None:
    settings = config.stages[stage]
    if (run_folder / WEIGHTS_FILE).is_file():
        print(f"[recipe] {stage}: reusing trained weights in {run_folder}", flush=True)
        return None
    # Same run name and storage path as an interrupted attempt: Ray Train resumes its checkpoint.
    return train_stage(TrainConfig(
        stage=stage, data=stage_folder(str(samples_root), stage), output=str(run_folder),
        **settings.training(), ohem=config.ohem, num_workers=config.num_workers, use_gpu=config.use_gpu,
        cpus_per_worker=config.cpus_per_worker, storage_path=config.storage_path,
        run_name=f"recipe-{stage}", previous_weights=previous,
        storage_options=config.storage_options, seed=config.seed))


def run_recipe(config: RecipeConfig, output: str | Path) -> RecipeSummary:
    """Prepare and train every configured stage in turn; the final weights land in output/."""
    started = time.perf_counter()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    samples_root = output / "samples"
    previous: str | None = None
    report: dict[str, dict] = {}
    for stage in config.stages:
        stage_started = time.perf_counter()
        report[stage] = _prepare(config, stage, samples_root, previous)
        run_folder = output / stage
        trained = _train(config, stage, samples_root, run_folder, previous)
        if trained is not None:
            report[stage].update(train_seconds=round(trained.seconds, 1), samples=trained.samples,
                                 final_metrics=trained.metrics)
        report[stage]["stage_seconds"] = round(time.perf_counter() - stage_started, 1)
        previous = str(run_folder)  # its weights file holds this stage and all earlier ones
        print(f"[recipe] {stage} finished after {time.perf_counter() - started:.0f} s in all",
              flush=True)
    final = output / WEIGHTS_FILE
    shutil.copyfile(Path(previous) / WEIGHTS_FILE, final)  # `load_weights(output)` finds it
    seconds = time.perf_counter() - started
    record = {"config": redact(dataclasses.asdict(config)), "stages": report,
              "seconds": round(seconds, 1), "weights": str(final)}
    (output / "recipe.json").write_text(json.dumps(record, indent=2, default=str))
    return RecipeSummary(str(final), report, seconds)
