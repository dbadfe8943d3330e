"""mtcnn-jobs gallery: a sample of a crops run's chips, with the template points drawn, as an HTML page.

The page is made by jobs/pipelines/gallery.py; this module is its command line.
"""

from __future__ import annotations

import argparse

from jobs.pipelines.gallery import make_gallery
from jobs.common.storage import parse_storage_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of mtcnn-jobs gallery."""
    parser.add_argument("output", metavar="CROPS", help="a crops run's OUTPUT folder or prefix")
    parser.add_argument("--out", required=True, help="folder for the chips and index.html")
    parser.add_argument("--limit", type=int, default=60, help="chips to show (default 60)")
    parser.add_argument("--no-marks", action="store_true", help="show the chips without template and landmarks")
    parser.add_argument("--storage-options", default=None, help="JSON object of fsspec/s3fs options")


#: Besides cli.INPUT_ERRORS: the chips cannot be read or the gallery written.
INPUT_ERRORS = (OSError,)


def run(args: argparse.Namespace) -> int:
    """Run mtcnn-jobs gallery; exit status."""
    if args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    index = make_gallery(args.output, args.out, args.limit, parse_storage_options(args.storage_options),
                         marks=not args.no_marks)
    print(f"wrote {index}")
    return 0
