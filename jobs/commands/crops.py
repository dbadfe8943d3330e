"""mtcnn-jobs crops: cut aligned face chips out of an annotate run's images into Parquet.

The job is jobs/pipelines/crops.py (annotations -> faces chosen -> FaceCropper actors, each committing
its part); this module is its command line, built from CropsConfig (and CropSettings inside it).
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.pipelines.crops import CropsConfig, crops
from jobs.common.settings import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `mtcnn-jobs crops`: one per CropsConfig setting, and --config."""
    parser.add_argument("--config", help="YAML of CropsConfig settings; options given here override it")
    add_config_arguments(parser, CropsConfig)


def run(args: argparse.Namespace) -> int:
    """Run mtcnn-jobs crops from parsed arguments; exit status."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    summary = crops(config_from_args(CropsConfig, args, args.config))
    print(summary.line())
    return 0
