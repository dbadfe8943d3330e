"""mtcnn-jobs annotate: detect faces in a folder, bucket or manifest of images into Parquet.

The job is jobs/annotate_job.py (list -> [decode] -> FaceAnnotator actors -> commit); this module
is its command line.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .annotate_job import AnnotateConfig, annotate
from .decode import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from .detector_args import add_detector_arguments, detector_config
from .redaction import redact_text
from .storage import parse_storage_options


def _concurrency(text: str) -> int | tuple[int, int]:
    if "," in text:
        low, high = text.split(",", 1)
        return int(low), int(high)
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of mtcnn-jobs annotate."""
    parser.add_argument("input", metavar="INPUT",
                        help="folder, object-store prefix (s3://bucket/prefix) or manifest "
                             "(.txt, one path a line; .parquet with a 'path' column)")
    parser.add_argument("output", metavar="OUTPUT", help="folder or object-store prefix for the Parquet files")
    add_detector_arguments(parser)
    parser.add_argument("--address", default=None, help="Ray cluster address (default: embedded local Ray)")
    parser.add_argument("--num-gpus", type=float, default=0.0,
                        help="GPUs per detector actor, fractions allowed (default 0: CPU)")
    parser.add_argument("--concurrency", type=_concurrency, default=None,
                        help="detector actors: N, or MIN,MAX for a pool that scales with the cluster "
                             "(default: one per GPU share or per --cpus-per-actor CPUs; on a cluster "
                             "up to twice that)")
    parser.add_argument("--cpus-per-actor", type=float, default=None,
                        help="CPUs (and torch threads) per detector actor (default 1)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per detector call")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="larger images become error rows, checked before decoding (default 100e6)")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                        help="larger files become error rows, checked before reading (default 256 MiB)")
    parser.add_argument("--read-retries", type=int, default=4,
                        help="retries of a read that fails for a transient reason (default 4)")
    parser.add_argument("--rows-per-file", type=int, default=4096,
                        help="rows per Parquet part (default 4096)")
    parser.add_argument("--commit-seconds", type=float, default=60.0,
                        help="commit made rows at least this often, in parts smaller than --rows-per-file "
                             "if need be: what a kill loses at most (default 60)")
    parser.add_argument("--store-patience", type=float, default=300.0,
                        help="seconds to keep retrying an OUTPUT store that does not answer before the "
                             "job ends with exit status 1, every committed part kept (default 300)")
    parser.add_argument("--storage-options", default=None,
                        help="JSON object of fsspec/s3fs options, e.g. credentials or endpoint_url")
    parser.add_argument("--retry-errors", action="store_true",
                        help="redo every error row of earlier runs (default: only transient ones)")
    parser.add_argument("--restart", "--overwrite", dest="overwrite", action="store_true",
                        help="remove earlier results in OUTPUT and start over, instead of resuming")


def run(args: argparse.Namespace) -> int:
    """Run mtcnn-jobs annotate from parsed arguments; exit status."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    detector = detector_config(args)
    config = AnnotateConfig(
        input=args.input, output=args.output, weights=args.weights, detector=detector,
        address=args.address, num_gpus=args.num_gpus, concurrency=args.concurrency,
        cpus_per_actor=args.cpus_per_actor, batch_size=args.batch_size,
        storage_options=parse_storage_options(args.storage_options), overwrite=args.overwrite,
        retry_errors=args.retry_errors, max_pixels=args.max_pixels, max_bytes=args.max_bytes,
        read_retries=args.read_retries, rows_per_file=args.rows_per_file,
        commit_seconds=args.commit_seconds, store_patience_seconds=args.store_patience, show_progress=True)
    summary = annotate(config)
    print(redact_text(summary.line()))
    return 0
