"""mtcnn-jobs export: an annotate run as COCO keypoints JSON, WIDER FACE prediction files or a flat CSV.

The job is jobs/pipelines/export.py; this module is its command line, built from ExportConfig.
"""

from __future__ import annotations

import argparse

from jobs.pipelines.export import ExportConfig, export
from jobs.common.settings import add_config_arguments, config_from_args

#: Besides cli.INPUT_ERRORS: the output file cannot be written.
INPUT_ERRORS = (OSError,)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of mtcnn-jobs export: one per ExportConfig setting."""
    add_config_arguments(parser, ExportConfig, required=("format",))


def run(args: argparse.Namespace) -> int:
    """Run mtcnn-jobs export; exit status."""
    config = config_from_args(ExportConfig, args)
    summary = export(config)
    print(summary.line(config))
    return 0
