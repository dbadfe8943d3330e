"""A sample of a crops run's chips, with the template points drawn, as an HTML page.

Its command line is jobs/commands/gallery.py."""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field

import cv2
import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads

from mtcnn.align import template_points

from jobs.common.pages import file_stem, shown
from jobs.output.parts import committed_parts
from jobs.common.storage import filesystem, parse_storage_options

# Landmark colours (BGR for OpenCV): left eye, right eye, nose, left and right mouth corner.
POINT_COLOURS = [(64, 64, 255), (255, 160, 64), (0, 220, 255), (255, 0, 255), (255, 255, 0)]


@dataclass
class GalleryConfig:
    """Which crops run to show and where the page goes: the one declaration of each setting, its
    flag and its help (jobs/common/settings.py builds `mtcnn-jobs gallery`'s options from it)."""

    output: str = field(metadata={"positional": True, "metavar": "CROPS",
                                  "help": "a crops run's OUTPUT folder or prefix"})
    out_dir: str = field(metadata={"flag": "--out", "metavar": "OUT",
                                   "help": "folder for the chips and index.html"})
    limit: int = field(default=60, metadata={"help": "chips to show"})
    marks: bool = field(default=True, metadata={
        "help": "draw the template points and the face's landmarks on the chips (--no-marks: bare chips)"})
    #: fsspec/s3fs options, or their JSON text (as the flag gives them).
    storage_options: dict = field(default_factory=dict, metadata={
        "parse": str, "help": "JSON object of fsspec/s3fs options"})

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {self.limit}")
        if isinstance(self.storage_options, str):
            self.storage_options = parse_storage_options(self.storage_options)


def make_gallery(config: GalleryConfig) -> str:
    """Write up to limit chips of a crops OUTPUT (and its error rows) to out_dir with an index.html; its path."""
    output, out_dir, limit, marks = config.output, config.out_dir, config.limit, config.marks
    storage_options = config.storage_options
    parts = committed_parts(output, storage_options)
    if not parts:
        raise FileNotFoundError(f"no crops parts (part-*.parquet) under {output}")
    fs, _ = filesystem(output, storage_options)
    dataset = pads.dataset(parts, filesystem=fs, format="parquet")
    good = dataset.to_table(columns=["path", "face", "score", "width", "height", "crop_landmarks", "crop"],
                            filter=pc.is_null(pc.field("error")))
    errors = dataset.to_table(columns=["path", "face", "error"], filter=pc.is_valid(pc.field("error")))
    # A spread sample (every k-th chip in path order), not only the first images' faces.
    good = good.sort_by([("path", "ascending"), ("face", "ascending")])
    step = max(1, good.num_rows // limit)
    sample = good.take(np.arange(0, good.num_rows, step)[:limit])
    os.makedirs(out_dir, exist_ok=True)
    cards = []
    for number, row in enumerate(sample.to_pylist()):
        chip = cv2.imdecode(np.frombuffer(row["crop"], np.uint8), cv2.IMREAD_COLOR)
        name = f"{number:04d}-{file_stem(row['path'])}-{row['face']}.png"
        if marks and row["crop_landmarks"] is not None:
            chip = _draw_points(chip, row["crop_landmarks"])
        cv2.imwrite(os.path.join(out_dir, name), chip)
        cards.append(f'<figure><img src="{html.escape(name)}" width="{row["width"]}" height="{row["height"]}">'
                     f'<figcaption>face {row["face"]}, score {row["score"]:.3f}<br>'
                     f'<span class="path">{shown(row["path"])}</span></figcaption></figure>')
    error_rows = "".join(f"<tr><td>{shown(r['path'])}</td><td>{'' if r['face'] is None else r['face']}</td>"
                         f"<td>{shown(r['error'])}</td></tr>"
                         for r in errors.slice(0, 100).to_pylist())
    page = _PAGE.format(title=shown(output), chips=good.num_rows, shown=len(cards),
                        failed=errors.num_rows, cards="\n".join(cards),
                        errors=f"<h2>Error rows (first 100)</h2><table><tr><th>image</th><th>face</th>"
                               f"<th>why</th></tr>{error_rows}</table>" if error_rows else "")
    index = os.path.join(out_dir, "index.html")
    with open(index, "w", encoding="utf-8") as handle:
        handle.write(page)
    return index


def _draw_points(chip: np.ndarray, points: list[float]) -> np.ndarray:
    """The chip with the template's points as rings and the face's mapped landmarks as dots."""
    canvas = chip.copy()
    size = chip.shape[1]
    radius = max(1, round(size / 80))
    for (tx, ty), colour in zip(template_points(size), POINT_COLOURS):
        cv2.circle(canvas, (round(tx), round(ty)), radius + 2, (255, 255, 255), 1, cv2.LINE_AA)
    for index, colour in enumerate(POINT_COLOURS):
        cv2.circle(canvas, (round(points[2 * index]), round(points[2 * index + 1])), radius, colour, -1, cv2.LINE_AA)
    return canvas


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Face chips in {title}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
main {{ display: flex; flex-wrap: wrap; gap: 10px; }}
figure {{ margin: 0; width: 160px; }}
img {{ width: 160px; height: auto; image-rendering: pixelated; }}
figcaption {{ font-size: 80%; }}
.path {{ color: #555; word-break: break-all; }}
td, th {{ padding: 2px 8px; border-bottom: 1px solid #ddd; font-size: 90%; text-align: left; }}
</style></head><body>
<h1>Face chips in {title}</h1>
<p>{chips} chips, {failed} error rows; {shown} chips shown, spread over the run. White rings: the
alignment template's points (ArcFace 5-point, scaled); dots: the face's own landmarks mapped into the
chip: left eye (red), right eye (blue), nose (yellow), mouth corners (magenta, cyan).</p>
<main>
{cards}
</main>
{errors}
</body></html>
"""
