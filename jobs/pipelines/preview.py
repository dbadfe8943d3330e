"""Drawing an annotate run's boxes, scores and landmarks into an HTML gallery.

Its command line is jobs/commands/preview.py."""

from __future__ import annotations

import html
import os
import sys
from dataclasses import dataclass, field

import cv2
import numpy as np
import pyarrow.compute as pc

from jobs.inputs.reading import ReadFailure, ReadPolicy, read_image
from jobs.common.pages import file_stem, shown
from jobs.common.redaction import public_path
from jobs.common.storage import parse_storage_options
from jobs.inputs.annotation_files import read_annotations

# Landmark colours (RGB): left eye, right eye, nose, left and right mouth corner.
POINT_COLOURS = [(255, 64, 64), (64, 160, 255), (255, 220, 0), (255, 0, 255), (0, 255, 255)]


@dataclass
class PreviewConfig:
    """Which annotations to draw and where the gallery goes: the one declaration of each setting,
    its flag and its help (jobs/common/settings.py builds `mtcnn-jobs preview`'s options from it)."""

    output: str = field(metadata={"positional": True, "metavar": "OUTPUT",
                                  "help": "an annotate run's OUTPUT folder or prefix"})
    out_dir: str = field(metadata={"flag": "--out", "metavar": "OUT",
                                   "help": "folder for the drawn images and index.html"})
    limit: int = field(default=24, metadata={"help": "images to draw"})
    min_score: float = field(default=0.0, metadata={"help": "draw only faces scoring at least this"})
    #: fsspec/s3fs options, or their JSON text (as the flag gives them).
    storage_options: dict = field(default_factory=dict, metadata={
        "parse": str, "help": "JSON object of fsspec/s3fs options"})

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {self.limit}")
        if isinstance(self.storage_options, str):
            self.storage_options = parse_storage_options(self.storage_options)


def draw_faces(image: np.ndarray, faces: list[dict], min_score: float = 0.0) -> np.ndarray:
    """A copy of an RGB image with each face's box, score and five landmarks drawn on it."""
    canvas = image.copy()
    thickness = max(1, round(max(image.shape[:2]) / 400))
    for face in faces:
        if face["score"] < min_score:
            continue
        x1, y1, x2, y2 = (int(round(v)) for v in face["box"])
        cv2.rectangle(canvas, (x1, y1), (x2, y2), (0, 255, 0), thickness)
        label = f"{face['score']:.2f}"
        scale = 0.4 * thickness
        (width, height), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        top = max(y1 - height - 4, 0)
        cv2.rectangle(canvas, (x1, top), (x1 + width + 4, top + height + 4), (0, 255, 0), -1)
        cv2.putText(canvas, label, (x1 + 2, top + height + 1), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (0, 0, 0), thickness, cv2.LINE_AA)
        points = face["landmarks"]
        for index, colour in enumerate(POINT_COLOURS):
            centre = (int(round(points[2 * index])), int(round(points[2 * index + 1])))
            cv2.circle(canvas, centre, thickness + 1, colour, -1, cv2.LINE_AA)
    return canvas


def make_preview(config: PreviewConfig) -> str:
    """Draw up to limit annotated images into out_dir with an index.html; the index's path."""
    table = read_annotations(config.output, config.storage_options)
    annotated = table.filter(pc.is_null(table.column("error"))).sort_by("path")
    failed = table.filter(pc.is_valid(table.column("error"))).sort_by("path")
    os.makedirs(config.out_dir, exist_ok=True)
    cards = []
    for index, row in enumerate(annotated.slice(0, config.limit).to_pylist()):
        faces = [f for f in row["faces"] or [] if f["score"] >= config.min_score]
        try:
            image, error = read_image(row["path"], config.storage_options, ReadPolicy(retries=1)), None
        except ReadFailure as failure:
            image, error = None, failure.reason
        caption = f"{len(faces)} face{'s' if len(faces) != 1 else ''}, {row['width']}x{row['height']}"
        if image is None:
            cards.append(_card(row["path"], None, f"cannot show: {error}"))
            continue
        name = f"{index:04d}-{file_stem(public_path(row['path']))}.jpg"
        drawn = draw_faces(image, faces, config.min_score)
        cv2.imwrite(os.path.join(config.out_dir, name), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
        cards.append(_card(row["path"], name, caption))
        if sys.stderr.isatty():
            print(f"\r{index + 1}/{min(config.limit, annotated.num_rows)} images drawn", end="",
                  file=sys.stderr)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    # Rows written before paths were stored without credentials may still hold some: mask them.
    errors = "".join(f"<tr><td>{shown(r['path'])}</td><td>{shown(r['error'])}</td></tr>"
                     for r in failed.slice(0, 100).select(["path", "error"]).to_pylist())
    page = _PAGE.format(
        title=shown(config.output), count=table.num_rows, annotated=annotated.num_rows,
        failed=failed.num_rows, shown=len(cards), cards="\n".join(cards),
        errors=f"<h2>Images with errors (first 100)</h2><table>{errors}</table>" if errors else "")
    index_path = os.path.join(config.out_dir, "index.html")
    with open(index_path, "w", encoding="utf-8") as handle:
        handle.write(page)
    return index_path


def _card(path: str, image_name: str | None, caption: str) -> str:
    picture = f'<a href="{html.escape(image_name)}"><img src="{html.escape(image_name)}" loading="lazy"></a>' \
        if image_name else ""
    return (f'<figure>{picture}<figcaption><b>{shown(caption)}</b><br>'
            f'<span class="path">{shown(path)}</span></figcaption></figure>')


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Faces in {title}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
main {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; width: 320px; }}
img {{ max-width: 320px; max-height: 320px; }}
.path {{ font-size: 80%; color: #555; word-break: break-all; }}
td {{ padding: 2px 8px; border-bottom: 1px solid #ddd; font-size: 90%; }}
</style></head><body>
<h1>Faces in {title}</h1>
<p>{count} images in the results: {annotated} annotated, {failed} with errors; {shown} shown.
Green boxes with scores; dots: left eye (red), right eye (blue), nose (yellow), mouth corners
(magenta, cyan).</p>
<main>
{cards}
</main>
{errors}
</body></html>
"""
