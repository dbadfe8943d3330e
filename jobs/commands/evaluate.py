"""mtcnn-jobs evaluate: WIDER AP (easy / medium / hard) and landmark error of a weights file or of existing predictions.

The job is jobs/pipelines/evaluate.py; this module is its command line, built from EvaluateConfig
(and the DetectorConfig inside it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.common.settings import add_config_arguments, config_from_args
from jobs.pipelines.evaluate import EvaluateConfig, evaluate, format_table

#: Besides cli.INPUT_ERRORS: a dataset file that is not there.
INPUT_ERRORS = (FileNotFoundError,)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of mtcnn-jobs evaluate: one per EvaluateConfig setting."""
    add_config_arguments(parser, EvaluateConfig)


def run(args: argparse.Namespace) -> int:
    """Run mtcnn-jobs evaluate from parsed arguments; exit status."""
    config = config_from_args(EvaluateConfig, args)
    metrics = evaluate(config)
    print(format_table(metrics))
    if config.output:
        print(f"wrote {Path(config.output) / 'metrics.json'}"
              + (f" and {Path(config.output) / 'pr_curves.png'}" if "wider" in metrics else ""))
    return 0
