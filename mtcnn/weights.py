"""The project's weights file: all three stages in one safetensors file with a small header."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .nets import STAGES, build_stage

FORMAT_NAME = "mtcnn-cascade"
FORMAT_VERSION = 1
REFERENCE_FILE = "mtcnn_reference.safetensors"

# Parameter names in facenet-pytorch's state dicts -> this project's module paths.
_REFERENCE_NAMES = {
    "pnet": {"conv1": "body.0", "prelu1": "body.1", "conv2": "body.3", "prelu2": "body.4",
             "conv3": "body.5", "prelu3": "body.6", "conv4_1": "classifier",
             "conv4_2": "box_regression"},
    "rnet": {"conv1": "body.0", "prelu1": "body.1", "conv2": "body.3", "prelu2": "body.4",
             "conv3": "body.6", "prelu3": "body.7", "dense4": "dense.1", "prelu4": "dense.2",
             "dense5_1": "classifier", "dense5_2": "box_regression"},
    "onet": {"conv1": "body.0", "prelu1": "body.1", "conv2": "body.3", "prelu2": "body.4",
             "conv3": "body.6", "prelu3": "body.7", "conv4": "body.9", "prelu4": "body.10",
             "dense5": "dense.1", "prelu5": "dense.2", "dense6_1": "classifier",
             "dense6_2": "box_regression", "dense6_3": "landmarks"},
}
# The reference's first dense layer reads the last feature map flattened as (N, W, H, C).
_REFERENCE_FLATTENED = {"rnet": ("dense4", 64, 3, 3), "onet": ("dense5", 128, 3, 3)}


class WeightsError(ValueError):
    """A weights file that cannot be used, with the reason."""


@dataclass
class CascadeWeights:
    """Stages loaded from one weights file, with the file's header."""

    stages: dict[str, torch.nn.Module]
    provenance: dict = field(default_factory=dict)
    sha256: str = ""
    source: str = ""

    def heads(self) -> dict[str, list[str]]:
        """Which heads each stage carries."""
        return {name: list(stage.heads) for name, stage in self.stages.items()}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def reference_weights_path() -> Path:
    """Path of the bundled reference weights (original MTCNN, MIT via facenet-pytorch)."""
    return Path(str(resources.files("mtcnn") / "data" / REFERENCE_FILE))


#: Weights shipped with the package, by name: the reference, and the cascade that
#: configs/shared-data.yaml trains (its header holds the config, data and metrics).
BUNDLED_WEIGHTS = {"reference": REFERENCE_FILE, "shared-data-recipe": "shared_data_recipe.safetensors"}


def bundled_weights_path(name: str) -> Path:
    """Path of bundled weights by name (see BUNDLED_WEIGHTS)."""
    return Path(str(resources.files("mtcnn") / "data" / BUNDLED_WEIGHTS[name]))


def save_weights(path: str | os.PathLike, stages: dict[str, torch.nn.Module],
                 provenance: dict | None = None) -> None:
    """Write stages (any of pnet, rnet, onet) and a provenance header to one file."""
    tensors: dict[str, torch.Tensor] = {}
    heads: dict[str, list[str]] = {}
    for name, stage in stages.items():
        if name not in STAGES:
            raise WeightsError(f"unknown stage {name!r}; expected one of {sorted(STAGES)}")
        heads[name] = list(stage.heads)
        for key, value in stage.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().to("cpu", torch.float32).contiguous()
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "heads": json.dumps(heads, sort_keys=True),
        "provenance": json.dumps(provenance or {}, sort_keys=True),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # never leave a half-written weights file behind
    os.chmod(path, 0o644)


def resolve_weights_path(weights: str | os.PathLike) -> Path:
    """Turn a bundled name ("reference", "shared-data-recipe"), a weights file or a training run's
    folder into a file path."""
    if str(weights) in BUNDLED_WEIGHTS:
        return bundled_weights_path(str(weights))
    path = Path(weights)
    if path.is_dir():
        # A training run's output folder: its final weights, written when the run ends.
        candidate = path / "weights.safetensors"
        if not candidate.is_file():
            raise WeightsError(f"{path} is a folder without weights.safetensors; "
                               "pass a weights file or a finished training run's folder")
        return candidate
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; "
                           "use 'reference' or 'shared-data-recipe', a .safetensors file or a training run's folder")
    return path


def load_weights(weights: str | os.PathLike = "reference") -> CascadeWeights:
    """Load the stages stored in a weights file (no unpickling: safetensors only)."""
    path = resolve_weights_path(weights)
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise WeightsError(f"{path} is not a safetensors weights file: {error}") from error
    with handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT_NAME:
            raise WeightsError(f"{path} is not an MTCNN cascade weights file "
                               f"(header format {metadata.get('format')!r})")
        version = int(metadata.get("format_version", "0"))
        if version > FORMAT_VERSION:
            raise WeightsError(f"{path} has format version {version}; this mtcnn reads up to "
                               f"{FORMAT_VERSION}, upgrade the package")
        heads = json.loads(metadata["heads"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    stages = {}
    for name, stage_heads in heads.items():
        stage = build_stage(name, has_landmarks="landmarks" in stage_heads)
        prefix = f"{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        missing, unexpected = stage.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise WeightsError(f"{path}: stage {name} does not match the architecture "
                               f"(missing {missing}, unexpected {unexpected})")
        stages[name] = stage.eval()
    return CascadeWeights(stages, json.loads(metadata.get("provenance", "{}")),
                          file_sha256(path), str(weights))


def convert_reference_state(name: str, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Build a stage from one of facenet-pytorch's state dicts."""
    names = _REFERENCE_NAMES[name]
    converted = {}
    for key, value in state.items():
        layer, _, param = key.rpartition(".")
        if layer not in names:
            raise WeightsError(f"unexpected tensor {key!r} in the reference {name} weights")
        if name in _REFERENCE_FLATTENED and layer == _REFERENCE_FLATTENED[name][0] \
                and param == "weight":
            _, channels, height, width = _REFERENCE_FLATTENED[name]
            # Reorder input columns from (W, H, C) flattening to PyTorch's (C, H, W).
            value = value.reshape(-1, width, height, channels).permute(0, 3, 2, 1).reshape(
                value.shape[0], -1)
        converted[f"{names[layer]}.{param}"] = value
    # The reference P-Net and R-Net have no landmark head: build them without one.
    stage = build_stage(name, has_landmarks=name == "onet")
    stage.load_state_dict(converted, strict=True)
    return stage.eval()


def convert_reference(source_dir: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Convert facenet-pytorch's pnet.pt, rnet.pt, onet.pt into one project weights file."""
    source = Path(source_dir)
    stages, hashes = {}, {}
    for name in STAGES:
        file = source / f"{name}.pt"
        if not file.is_file():
            raise WeightsError(f"{file} not found; point at facenet_pytorch/data/ of "
                               "facenet-pytorch 2.6.0 (pip download --no-deps facenet-pytorch==2.6.0)")
        state = torch.load(file, map_location="cpu", weights_only=True)
        stages[name] = convert_reference_state(name, state)
        hashes[name] = file_sha256(file)
    provenance = {
        "name": "reference",
        "description": "Original MTCNN weights (Zhang, Zhang, Li, Qiao, IEEE SPL 2016), "
                       "as redistributed by facenet-pytorch 2.6.0",
        "license": "MIT (facenet-pytorch, Copyright (c) 2019 Timothy Esler)",
        "source_sha256": hashes,
    }
    save_weights(output, stages, provenance)
    return Path(output)
