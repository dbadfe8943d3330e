"""Command-line options shared by every command that runs the detector."""

from __future__ import annotations

import argparse

from mtcnn import DetectorConfig
from mtcnn.pyramid import PYRAMIDS


def comma_floats(text: str) -> tuple[float, ...]:
    """Parse '0.6,0.7,0.7' (or space-separated) into floats, as an argparse type."""
    try:
        return tuple(float(part) for part in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.6,0.7,0.7, "
                                         f"got {text!r}") from None


def add_detector_arguments(parser: argparse.ArgumentParser) -> None:
    """--weights, --min-face-size, --thresholds, --scale-factor and --pyramid."""
    defaults = DetectorConfig()
    parser.add_argument("--weights", default="reference",
                        help="'reference', a weights file, or a training run folder")
    parser.add_argument("--min-face-size", type=float, default=defaults.min_face_size)
    parser.add_argument("--thresholds", type=comma_floats, default=defaults.thresholds,
                        help="P-, R-, O-Net score thresholds, e.g. 0.6,0.7,0.7")
    parser.add_argument("--scale-factor", type=float, default=defaults.scale_factor)
    parser.add_argument("--pyramid", choices=PYRAMIDS, default=defaults.pyramid)


def detector_config(args: argparse.Namespace) -> DetectorConfig:
    """The DetectorConfig the parsed detector options describe (ValueError if invalid)."""
    return DetectorConfig(min_face_size=args.min_face_size, thresholds=args.thresholds,
                          scale_factor=args.scale_factor, pyramid=args.pyramid)
