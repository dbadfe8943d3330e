"""Write a finished recipe run's cascade as a bundled weights file, its recipe and figures in the header.

    python tools/bundle_weights.py RUN_FOLDER EVALUATION_FOLDER CONFIG.yaml mtcnn/data/NAME.safetensors

RUN_FOLDER is `mtcnn-jobs train --config CONFIG.yaml --output RUN_FOLDER`, EVALUATION_FOLDER is
`mtcnn-jobs evaluate --weights RUN_FOLDER ... --output EVALUATION_FOLDER`. The header then holds
what anyone needs to check the file: the config as written, the recipe's record (settings,
samples, times per stage), each stage's training provenance and the evaluation's figures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jobs.common.redaction import redact
from mtcnn.weights import load_weights, save_weights


def main(run: str, evaluation: str, config: str, destination: str) -> None:
    """Bundle run's final weights into destination with the provenance described above."""
    weights = load_weights(run)
    metrics = json.loads((Path(evaluation) / "metrics.json").read_text())
    provenance = {
        "name": Path(destination).stem.replace("_", "-"),
        "config": Path(config).name,
        "config_yaml": Path(config).read_text(),
        "recipe": json.loads((Path(run) / "recipe.json").read_text()),
        "stages": {stage: load_weights(Path(run) / stage).provenance for stage in ("pnet", "rnet", "onet")},
        "evaluation": {
            "wider": {"folder": metrics["wider"]["folder"], "images": metrics["wider"]["images"],
                      "ap": metrics["wider"]["ap"]},
            "landmarks": {k: v for k, v in metrics["landmarks"].items() if not isinstance(v, (list, dict))},
            "detector": metrics["detector"],
        },
        "sha256_of_trained_file": weights.sha256,
    }
    save_weights(destination, weights.stages, redact(provenance))
    print(f"wrote {destination} ({Path(destination).stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(*sys.argv[1:])
