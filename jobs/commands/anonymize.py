"""mtcnn-jobs anonymize: every image of a folder, bucket or manifest copied with its faces hidden.

The job is jobs/pipelines/anonymize.py (annotate's listing and run state -> FaceAnonymizer actors,
which write the copies -> the Parquet record committed through jobs/output); this module is its
command line, built from AnonymizeConfig (MaskSettings and DetectorConfig inside it).
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.common.redaction import redact_text
from jobs.common.settings import add_config_arguments, config_from_args
from jobs.pipelines.anonymize import AnonymizeConfig, anonymize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `mtcnn-jobs anonymize`: one per AnonymizeConfig setting, and --config."""
    parser.add_argument("--config", help="YAML of AnonymizeConfig settings; options given here override it")
    add_config_arguments(parser, AnonymizeConfig)


def run(args: argparse.Namespace) -> int:
    """Run mtcnn-jobs anonymize from parsed arguments; exit status."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    summary = anonymize(config_from_args(AnonymizeConfig, args, args.config))
    print(redact_text(summary.line()))
    return 0
