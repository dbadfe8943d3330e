"""Weights where the jobs keep them: 'reference', a local file or run folder, or an object-store URL."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

from mtcnn.weights import CascadeWeights, WeightsError, load_weights

from jobs.common.redaction import public_path
from jobs.common.storage import filesystem, is_remote, join

#: The file a training run (and a recipe) writes its cascade to; a run folder means this file.
WEIGHTS_FILE = "weights.safetensors"


def load_weights_from(location: str | os.PathLike | CascadeWeights,
                      storage_options: dict | None = None) -> CascadeWeights:
    """The cascade at location; a URL (file or run folder) is fetched once and read locally."""
    if isinstance(location, CascadeWeights):
        return location
    if not is_remote(str(location)):
        return load_weights(location)
    fs, path = filesystem(str(location), storage_options)
    if fs.isdir(path):
        path = join(path, WEIGHTS_FILE)
    if not fs.exists(path):
        raise WeightsError(f"no weights at {public_path(str(location))}: expected a .safetensors file "
                           f"or a finished run folder holding {WEIGHTS_FILE}")
    # safetensors reads from a file; the tensors are in memory once loaded, so the copy can go.
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder) / WEIGHTS_FILE
        fs.get_file(path, str(local))
        weights = load_weights(local)
    return dataclasses.replace(weights, source=public_path(str(location)))
