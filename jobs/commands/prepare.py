"""mtcnn-jobs prepare: training samples for one stage, as Parquet shards (a Ray Data job).

The job itself is jobs/training/prepare_stage.py; this module is its command line, built from
PrepareConfig (and the SampleConfig, AugmentConfig and mining DetectorConfig inside it).
"""

from __future__ import annotations

import argparse

from jobs.common.redaction import redact_text
from jobs.common.settings import add_config_arguments, config_from_args
from jobs.training.prepare_stage import PrepareConfig, prepare_stage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `mtcnn-jobs prepare`: one flag per PrepareConfig setting, and --config."""
    parser.add_argument("--config", help="YAML of PrepareConfig settings (samples, augment and mining "
                                         "as nested mappings); options given here override it")
    add_config_arguments(parser, PrepareConfig)


def run(args: argparse.Namespace) -> int:
    """Run `mtcnn-jobs prepare`; 0 on success."""
    config = config_from_args(PrepareConfig, args, args.config, required=("samples.stage", "output"))
    summary = prepare_stage(config)
    for line in summary.lines():
        print(redact_text(line))
    return 0
