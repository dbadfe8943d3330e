"""mtcnn-jobs annotate: detect faces in a folder, bucket or manifest of images into Parquet.

The job is jobs/pipelines/annotate.py (list -> [decode] -> FaceAnnotator actors -> commit); this module
is its command line, built from AnnotateConfig (and the DetectorConfig inside it).
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.pipelines.annotate import AnnotateConfig, annotate
from jobs.common.redaction import redact_text
from jobs.common.settings import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `mtcnn-jobs annotate`: one per AnnotateConfig setting, and --config."""
    parser.add_argument("--config", help="YAML of AnnotateConfig settings (detector as a nested "
                                         "mapping); options given here override it")
    add_config_arguments(parser, AnnotateConfig)


def run(args: argparse.Namespace) -> int:
    """Run mtcnn-jobs annotate from parsed arguments; exit status."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    summary = annotate(config_from_args(AnnotateConfig, args, args.config))
    print(redact_text(summary.line()))
    return 0
