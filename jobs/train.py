"""mtcnn-jobs train: one stage from its sample shards, or the whole cascade from a recipe config."""

from __future__ import annotations

import argparse
import sys

from mtcnn.nets import STAGES

from .ray_env import init_ray
from .redaction import redact_text
from .storage import parse_storage_options
from .training.trainer import TrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `mtcnn-jobs train`."""
    parser.add_argument("--config", help="recipe YAML (e.g. configs/shared-data.yaml): prepare and "
                                         "train every stage in turn; the stage options below are ignored")
    parser.add_argument("--output", required=True,
                        help="run folder (or URL for one stage): weights.safetensors is written there")
    parser.add_argument("--stage", choices=list(STAGES), help="the stage to train (without --config)")
    parser.add_argument("--data", help="the stage's Parquet sample shards (folder or URL), "
                                       "e.g. PREPARE_OUTPUT/pnet")
    parser.add_argument("--previous-weights",
                        help="earlier stages to ship with this one ('reference', a weights file or "
                             "a run folder); the detector needs all three stages")
    defaults = TrainConfig(stage="pnet", data="", output="")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="samples per step across all workers (default %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--learning-rate-decay", type=float, default=defaults.learning_rate_decay,
                        help="factor applied to the learning rate after each epoch")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                        help="L2 penalty on the weights (default %(default)s)")
    parser.add_argument("--flip", action="store_true",
                        help="mirror crops (and their targets) at random in every batch")
    parser.add_argument("--color-jitter", type=float, default=defaults.color_jitter,
                        help="scale brightness, contrast and saturation of each crop by up to "
                             "1 +- this, at random (default %(default)s: off)")
    parser.add_argument("--ohem", action="store_true",
                        help="back-propagate only the hardest 70%% of face/non-face samples per batch")
    parser.add_argument("--workers", type=int, default=defaults.num_workers,
                        help="Ray Train workers (default %(default)s)")
    parser.add_argument("--cpus-per-worker", type=float, default=None,
                        help="CPUs per worker (default: up to 1, leaving one for reading shards)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--storage-path", help="checkpoints (folder or s3://...); default OUTPUT/checkpoints")
    parser.add_argument("--run-name", help="Ray Train run name; reuse it to resume a stopped run")
    parser.add_argument("--max-failures", type=int, default=defaults.max_failures,
                        help="worker-group restarts from the last checkpoint (default %(default)s)")
    parser.add_argument("--restart", action="store_true",
                        help="when earlier checkpoints (or, with --config, samples and weights) of this "
                             "output were made with other settings, discard them and start afresh; "
                             "without it such a run is refused, naming the differences")
    parser.add_argument("--storage-options", help="fsspec options for URLs, as JSON")
    parser.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")


def _run_recipe(args: argparse.Namespace) -> int:
    from .training.recipe import load_recipe, run_recipe

    config = load_recipe(args.config)
    init_ray(args.address, num_cpus=args.num_cpus, dashboard=True)
    summary = run_recipe(config, args.output, restart=args.restart)
    print(f"recipe finished in {summary.seconds / 60:.1f} min: {redact_text(summary.weights_path)}")
    for stage, record in summary.stages.items():
        metrics = record.get("final_metrics") or {}
        print(f"  {stage}: {record.get('counts')} accuracy {metrics.get('accuracy', float('nan')):.3f} "
              f"loss {metrics.get('loss', float('nan')):.4f}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run `mtcnn-jobs train`; 0 on success, 2 on bad input."""
    from .training.trainer import train_stage

    try:
        if args.config:
            return _run_recipe(args)
        if not (args.stage and args.data):
            raise ValueError("give --stage and --data (one stage), or --config (the whole recipe)")
        config = TrainConfig(
            stage=args.stage, data=args.data, output=args.output, epochs=args.epochs,
            batch_size=args.batch_size, learning_rate=args.learning_rate,
            learning_rate_decay=args.learning_rate_decay, weight_decay=args.weight_decay,
            flip=args.flip, color_jitter=args.color_jitter, ohem=args.ohem, num_workers=args.workers,
            use_gpu=args.gpu, cpus_per_worker=args.cpus_per_worker, storage_path=args.storage_path,
            run_name=args.run_name, max_failures=args.max_failures,
            previous_weights=args.previous_weights, restart=args.restart,
            storage_options=parse_storage_options(args.storage_options))
        init_ray(args.address, num_cpus=args.num_cpus, dashboard=True)
        summary = train_stage(config)
    except ValueError as error:  # includes WeightsError and PrepareError
        print(f"train: {redact_text(str(error))}", file=sys.stderr)
        return 2
    print(f"weights: {redact_text(summary.weights_path)}")
    return 0
