"""mtcnn-jobs preview: draw an annotate run's boxes, scores and landmarks into an HTML gallery.

The pictures are made by jobs/pipelines/preview.py; this module is its command line, built from
PreviewConfig.
"""

from __future__ import annotations

import argparse

from jobs.common.redaction import redact_text
from jobs.common.settings import add_config_arguments, config_from_args
from jobs.pipelines.preview import PreviewConfig, make_preview

#: Besides cli.INPUT_ERRORS: the run cannot be read or the pictures written.
INPUT_ERRORS = (OSError,)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of mtcnn-jobs preview: one per PreviewConfig setting."""
    add_config_arguments(parser, PreviewConfig, required=("out_dir",))


def run(args: argparse.Namespace) -> int:
    """Run mtcnn-jobs preview; exit status."""
    index = make_preview(config_from_args(PreviewConfig, args))
    print(f"wrote {redact_text(index)}")
    return 0
