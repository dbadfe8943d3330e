"""mtcnn-jobs gallery: a sample of a crops run's chips, with the template points drawn, as an HTML page.

The page is made by jobs/pipelines/gallery.py; this module is its command line, built from
GalleryConfig.
"""

from __future__ import annotations

import argparse

from jobs.common.settings import add_config_arguments, config_from_args
from jobs.pipelines.gallery import GalleryConfig, make_gallery

#: Besides cli.INPUT_ERRORS: the chips cannot be read or the gallery written.
INPUT_ERRORS = (OSError,)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of mtcnn-jobs gallery: one per GalleryConfig setting."""
    add_config_arguments(parser, GalleryConfig, required=("out_dir",))


def run(args: argparse.Namespace) -> int:
    """Run mtcnn-jobs gallery; exit status."""
    index = make_gallery(config_from_args(GalleryConfig, args))
    print(f"wrote {index}")
    return 0
