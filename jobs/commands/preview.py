"""mtcnn-jobs preview: draw an annotate run's boxes, scores and landmarks into an HTML gallery.

The pictures are made by jobs/pipelines/preview.py; this module is its command line.
"""

from __future__ import annotations

import argparse

from jobs.pipelines.preview import PreviewConfig, make_preview
from jobs.common.redaction import redact_text
from jobs.common.storage import parse_storage_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of mtcnn-jobs preview."""
    parser.add_argument("output", metavar="OUTPUT", help="an annotate run's OUTPUT folder or prefix")
    parser.add_argument("--limit", type=int, default=24, help="images to draw (default 24)")
    parser.add_argument("--out", required=True, help="folder for the drawn images and index.html")
    parser.add_argument("--min-score", type=float, default=0.0, help="draw only faces scoring at least this")
    parser.add_argument("--storage-options", default=None, help="JSON object of fsspec/s3fs options")


#: Besides cli.INPUT_ERRORS: the run cannot be read or the pictures written.
INPUT_ERRORS = (OSError,)


def run(args: argparse.Namespace) -> int:
    """Run mtcnn-jobs preview; exit status."""
    if args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    config = PreviewConfig(output=args.output, out_dir=args.out, limit=args.limit,
                           min_score=args.min_score,
                           storage_options=parse_storage_options(args.storage_options))
    index = make_preview(config)
    print(f"wrote {redact_text(index)}")
    return 0
