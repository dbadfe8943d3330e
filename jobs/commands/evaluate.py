"""mtcnn-jobs evaluate: WIDER AP (easy / medium / hard) and landmark error of a weights file or of existing predictions.

The job is jobs/pipelines/evaluate.py; this module is its command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.common.detector_args import add_detector_arguments, detector_config
from jobs.pipelines.evaluate import EvaluateConfig, evaluate, format_table
from jobs.common.storage import parse_storage_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of mtcnn-jobs evaluate."""
    parser.add_argument("--wider", metavar="DIR",
                        help="WIDER-format folder: *_bbx_gt.txt, images/, easy.txt, medium.txt, hard.txt")
    parser.add_argument("--landmarks", metavar="LIST_FILE",
                        help="5-point list (path x1 x2 y1 y2 and 5 points a line) for landmark error")
    parser.add_argument("--predictions", metavar="ANNOTATIONS",
                        help="score these detections instead of detecting: an annotate OUTPUT (local or s3://), "
                             "any Parquet with its schema, or a folder of WIDER prediction .txt files; "
                             "images are matched by folder and file name")
    parser.add_argument("--storage-options", default=None, help="with --predictions: JSON object of fsspec/s3fs options")
    add_detector_arguments(parser)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--output", metavar="DIR", help="folder for metrics.json and pr_curves.png")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N images of each set only")
    parser.add_argument("--batch-size", type=int, default=4, help="images per detector call")
    parser.add_argument("--ray", action="store_true",
                        help="detect with the annotate Ray job (Ray Data actors) instead of in this process; "
                             "its rows are kept under OUTPUT/annotate")
    parser.add_argument("--address", default=None, help="with --ray: Ray cluster address (default: local Ray)")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="with --ray: GPUs per detector actor")
    parser.add_argument("--concurrency", type=int, default=None, help="with --ray: detector actors")


#: Besides cli.INPUT_ERRORS: a dataset file that is not there.
INPUT_ERRORS = (FileNotFoundError,)


def run(args: argparse.Namespace) -> int:
    """Run mtcnn-jobs evaluate from parsed arguments; exit status."""
    detector = detector_config(args)
    metrics = evaluate(EvaluateConfig(
        wider=args.wider, landmarks=args.landmarks, weights=args.weights, detector=detector,
        device=args.device, output=args.output, limit=args.limit, batch_size=args.batch_size,
        use_ray=args.ray, address=args.address, num_gpus=args.num_gpus, concurrency=args.concurrency,
        predictions=args.predictions, storage_options=parse_storage_options(args.storage_options)))
    print(format_table(metrics))
    if args.output:
        print(f"wrote {Path(args.output) / 'metrics.json'}"
              + (f" and {Path(args.output) / 'pr_curves.png'}" if "wider" in metrics else ""))
    return 0
