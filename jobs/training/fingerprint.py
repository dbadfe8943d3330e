"""What made a stage's samples, checkpoints and weights: compared before anything is reused.

A run is resumed, and a recipe reuses a stage's samples or weights, only when the settings that
determine the result are the same as those that made it. Operational settings (where output goes,
how many workers, retries, logging) may change between attempts; everything else may not, and a
difference is named rather than resumed silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from jobs.common.redaction import redact
from jobs.common.settings import setting_changes, settings_difference

#: TrainConfig fields that change how a run is carried out, not what it learns.
OPERATIONAL_TRAIN_FIELDS = frozenset({
    "output", "num_workers", "use_gpu", "cpus_per_worker", "storage_path", "run_name",
    "max_failures", "storage_options", "log_every", "inject_failure_at_epoch", "restart",
})

#: PrepareConfig fields that change how samples are made, not which.
OPERATIONAL_PREPARE_FIELDS = frozenset({"output", "batch_size", "concurrency", "overwrite",
                                        "storage_options", "address"})

#: File in a Ray Train run folder with the settings the run was started with.
RUN_SETTINGS_FILE = "mtcnn_settings.json"


class SettingsChanged(ValueError):
    """Earlier results were made with other settings; the message names the differences."""


def _plain(value):
    """JSON-comparable form: tuples as lists, dataclasses as dicts."""
    return json.loads(json.dumps(value, default=lambda v: dataclasses.asdict(v)
                                 if dataclasses.is_dataclass(v) else str(v)))


def digest(value) -> str:
    """Short stable hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(_plain(value), sort_keys=True).encode()).hexdigest()[:16]


def prepare_settings(config, weights_sha256: str | None) -> dict:
    """The settings that determine a stage's samples: its prepare config less operational fields,
    with the mining weights known by their hash (a retrained stage keeps its path)."""
    fields = {name: value for name, value in dataclasses.asdict(config).items()
              if name not in OPERATIONAL_PREPARE_FIELDS}
    fields["weights"] = weights_sha256
    if weights_sha256 is None:
        fields["mining"] = None  # P-Net samples are not mined
    return redact(_plain(fields))


def train_settings(config, data_settings: dict | None, previous_sha256: str | None) -> dict:
    """The settings that determine a stage run's result: its config less operational fields,
    what made its samples, and the earlier stages it ships with."""
    # A field added after runs were recorded carries metadata "recorded": "when set": left at its
    # default it is not recorded, so a run made before the field existed still matches.
    unset = {f.name for f in dataclasses.fields(config)
             if f.metadata.get("recorded") == "when set" and getattr(config, f.name) == f.default}
    fields = {name: value for name, value in dataclasses.asdict(config).items()
              if name not in OPERATIONAL_TRAIN_FIELDS and name not in unset}
    # The samples are known by what made them, not by their folder: new shards in the same
    # folder are other data, and the same recipe in another output folder is the same data.
    fields.pop("data", None)
    fields["samples"] = digest(data_settings) if data_settings is not None else f"unknown ({config.data})"
    fields["previous_weights"] = previous_sha256
    return redact(_plain(fields))


#: What names the differences when the earlier results kept no settings record.
UNKNOWN_EARLIER = "settings of the earlier run unknown (made by an older version)"


def differences(earlier: dict | None, now: dict) -> list[str]:
    """The differing settings, each 'key earlier -> now' (nested keys dotted), worded as annotate
    and crops word theirs (jobs.common.settings.setting_changes)."""
    if earlier is None:
        return [UNKNOWN_EARLIER]
    return setting_changes(earlier, now)


def refuse_unless_restart(earlier: dict | None, now: dict, restart: bool, what: str, remedy: str) -> str:
    """The differences as one line (for the log of a restart); raises SettingsChanged naming them
    as "{what} with other settings (...); pass --restart to {remedy}" unless restart."""
    changed = UNKNOWN_EARLIER if earlier is None else settings_difference(earlier, now)
    if not restart:
        raise SettingsChanged(f"{what} with other settings ({changed}); pass --restart to {remedy}")
    return changed
