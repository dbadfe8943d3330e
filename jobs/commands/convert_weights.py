"""mtcnn-jobs convert-weights: facenet-pytorch's pnet.pt, rnet.pt, onet.pt -> one project file."""

from __future__ import annotations

import argparse

from mtcnn.weights import convert_reference, load_weights


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the convert-weights command."""
    parser.add_argument("source", help="folder holding pnet.pt, rnet.pt and onet.pt "
                        "(facenet_pytorch/data of facenet-pytorch 2.6.0)")
    parser.add_argument("output", help="weights file to write (.safetensors)")


def run(args: argparse.Namespace) -> int:
    """Convert and report what was written."""
    path = convert_reference(args.source, args.output)
    weights = load_weights(path)
    print(f"wrote {path} (sha256 {weights.sha256[:16]}...), heads: {weights.heads()}")
    return 0
