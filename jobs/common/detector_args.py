"""Command-line options shared by every command that runs the detector."""

from __future__ import annotations

import argparse

from mtcnn import DetectorConfig

from jobs.common.settings import add_config_arguments, build, given_under

#: The DetectorConfig fields the commands expose; the others keep their defaults.
DETECTOR_FLAGS = ("min_face_size", "thresholds", "scale_factor", "pyramid", "precision")


def add_detector_arguments(parser: argparse.ArgumentParser) -> None:
    """--weights and the DetectorConfig flags: --min-face-size, --thresholds, --scale-factor, --pyramid, --precision."""
    parser.add_argument("--weights", default="reference",
                        help="'reference', a weights file, or a training run folder")
    add_config_arguments(parser, DetectorConfig, only=DETECTOR_FLAGS, dest_prefix="detector.")


def detector_config(args: argparse.Namespace) -> DetectorConfig:
    """The DetectorConfig the parsed detector options describe (ValueError if invalid)."""
    return build(DetectorConfig, given_under(args, "detector."), "detector options")
