"""mtcnn-jobs preview draws real detections from annotate-format Parquet into a gallery."""

import shutil
from pathlib import Path

import cv2
import numpy as np

from jobs.pipelines.annotate import commit_rows
from jobs.cli import main
from jobs.inputs.decode import decode_image
from jobs.common.schema import annotation_table
from mtcnn import FaceDetector

DATA = Path(__file__).parent / "data"


def test_preview_draws_boxes_and_landmarks_and_lists_errors(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(DATA / "astronaut.png", images / "astronaut one.png")
    shutil.copy(DATA / "exif_rotated.jpg", images / "rotated.jpg")
    paths = [str(images / "astronaut one.png"), str(images / "rotated.jpg"), str(images / "gone.jpg")]
    pixels = [decode_image(Path(p).read_bytes()) for p in paths[:2]]
    found = FaceDetector().detect(pixels)
    table = annotation_table(paths, [(p.shape[1], p.shape[0]) for p in pixels] + [None],
                             found + [None], [None, None, "file not found"])
    (tmp_path / "out").mkdir()
    commit_rows(table, str(tmp_path / "out"), {}, '{"detector": {}}')

    status = main(["preview", str(tmp_path / "out"), "--limit", "5", "--out", str(tmp_path / "gallery")])
    assert status == 0 and "index.html" in capsys.readouterr().out
    page = (tmp_path / "gallery" / "index.html").read_text(encoding="utf-8")
    assert "astronaut one.png" in page and "1 face," in page
    assert "gone.jpg" in page and "file not found" in page  # errors are listed, not drawn
    drawn = sorted((tmp_path / "gallery").glob("*.jpg"))
    assert len(drawn) == 2
    # The box outline is drawn in green where the detector put it, in displayed orientation.
    picture = cv2.imread(str(drawn[1]))  # rotated.jpg: 192 wide, 144 high once EXIF is applied
    assert picture.shape[:2] == (144, 192)
    x1, y1, x2, y2 = (int(round(v)) for v in found[1].boxes[0])
    edge = picture[(y1 + y2) // 2, max(x1, 0)]
    assert edge[1] > 150 and edge[1] > int(edge[0]) + 60 and edge[1] > int(edge[2]) + 60  # JPEG-soft green
    assert not np.array_equal(picture, cv2.cvtColor(pixels[1], cv2.COLOR_RGB2BGR))


def test_preview_of_a_folder_without_results_says_so(tmp_path, capsys):
    assert main(["preview", str(tmp_path), "--out", str(tmp_path / "g")]) == 2
    assert "no annotate results" in capsys.readouterr().err
