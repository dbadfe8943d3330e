"""mtcnn-jobs train: one stage from its sample shards, or the whole cascade from a recipe config.

Flags are built from TrainConfig (and, for a recipe, RecipeConfig): with --config the file sets
the recipe and every flag given overrides it, training settings for every stage.
"""

from __future__ import annotations

import argparse

from jobs.runtime.ray_env import init_ray
from jobs.common.redaction import redact_text
from jobs.common.settings import add_config_arguments, config_from_args, given
from jobs.training.recipe import TRAIN_KEYS, RecipeConfig
from jobs.training.trainer import TrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `mtcnn-jobs train`: one flag per TrainConfig setting, the recipe's, and --config."""
    parser.add_argument("--config", help="recipe YAML (e.g. configs/shared-data.yaml): prepare and train "
                                         "every stage in turn; the options given here override its values "
                                         "(training options for every stage; --stage, --data, "
                                         "--previous-weights and --run-name do not apply)")
    add_config_arguments(parser, TrainConfig)
    shared = {f for f in TrainConfig.__dataclass_fields__}
    add_config_arguments(parser, RecipeConfig, exclude=("stages", *shared))
    parser.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")


def _run_recipe(args: argparse.Namespace) -> int:
    from jobs.training.recipe import load_recipe, run_recipe

    if not getattr(args, "output", None):
        raise ValueError("give --output (the run folder)")
    every_stage = {k: v for k, v in given(args, TrainConfig).items() if k in TRAIN_KEYS}
    overrides = {**given(args, RecipeConfig), "stage_overrides": every_stage}
    config = load_recipe(args.config, overrides)
    init_ray(args.address, num_cpus=args.num_cpus, dashboard=True)
    summary = run_recipe(config, args.output, restart=bool(getattr(args, "restart", False)))
    print(f"recipe finished in {summary.seconds / 60:.1f} min: {redact_text(summary.weights_path)}")
    for stage, record in summary.stages.items():
        metrics = record.get("final_metrics") or {}
        print(f"  {stage}: {record.get('counts')} accuracy {metrics.get('accuracy', float('nan')):.3f} "
              f"loss {metrics.get('loss', float('nan')):.4f}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run `mtcnn-jobs train`; 0 on success (bad input: cli.main reports it, exit 2)."""
    from jobs.training.trainer import train_stage

    if args.config:
        return _run_recipe(args)
    if not (getattr(args, "stage", None) and getattr(args, "data", None)):
        raise ValueError("give --stage and --data (one stage), or --config (the whole recipe)")
    config = config_from_args(TrainConfig, args, required=("output",))
    init_ray(args.address, num_cpus=args.num_cpus, dashboard=True)
    summary = train_stage(config)
    print(f"weights: {redact_text(summary.weights_path)}")
    return 0
