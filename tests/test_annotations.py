"""Annotation readers on the shared datasets and on small hand-written fixtures."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from mtcnn.annotations import (WEBFACES_BOX_RULE, AnnotationError, ImageAnnotation, box_from_points, from_table,
                               read_dlib_xml, read_facepoint_list, read_fddb, read_webfaces, read_wider, to_table)
from shared_data import shared_data

FIXTURES = Path(__file__).parent / "fixtures" / "annotations"


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter_w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    inter_h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = inter_w * inter_h
    area = lambda box: (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


# -- WIDER -----------------------------------------------------------------------------------------

def test_wider_fixture_boxes_ignore_and_empty_image():
    images = read_wider(FIXTURES / "wider_small_bbx_gt.txt", image_root="/data/wider")
    assert [Path(a.path).name for a in images] == ["a.jpg", "b.jpg", "c.jpg"]
    assert images[0].path == "/data/wider/0--Parade/a.jpg"
    np.testing.assert_array_equal(images[0].boxes, [[10, 20, 40, 60], [100, 50, 108, 62]])
    np.testing.assert_array_equal(images[0].ignore, [False, True])
    assert np.isnan(images[0].landmarks).all() and images[0].landmarks.shape == (2, 5, 2)
    # A count of 0 is followed by an all-zero row in the original files; it is not a face.
    assert len(images[1]) == 0 and images[1].boxes.shape == (0, 4)
    np.testing.assert_array_equal(images[2].boxes, [[5, 6, 12, 14]])


def test_wider_shared_validation_counts_match_its_readme():
    images = read_wider(shared_data("wider_face_val_dev/wider_face_val_bbx_gt.txt"))
    assert len(images) == 397
    assert sum(len(a) for a in images) == 4925
    assert sum(int(a.ignore.sum()) for a in images) == 120
    assert all(Path(a.path).is_file() for a in images[:20])
    assert all((a.boxes[:, 2:] >= a.boxes[:, :2]).all() for a in images)


@pytest.mark.parametrize("text, line, words", [
    ("a.jpg\n2\n1 2 3 4 0 0 0 0 0 0\n1 2 3 4 0 0 0 0 0\n", 4, "expected 10 fields"),
    ("a.jpg\n1\n1 2 x 4 0 0 0 0 0 0\n", 3, "expected numbers"),
    ("a.jpg\ntwo\n", 2, "number of faces"),
    ("a.jpg\n3\n1 2 3 4 0 0 0 0 0 0\n", 3, "announces 3 faces"),
])
def test_wider_bad_lines_name_file_and_line(tmp_path, text, line, words):
    path = tmp_path / "broken_bbx_gt.txt"
    path.write_text(text)
    with pytest.raises(AnnotationError, match=words) as caught:
        read_wider(path)
    assert caught.value.line == line
    assert f"{path}, line {line}:" in str(caught.value)


# -- 5-point list ----------------------------------------------------------------------------------

def test_facepoint_list_reads_x1_x2_y1_y2_order():
    images = read_facepoint_list(shared_data("cnn_facepoint_5pt/testImageList.txt"))
    assert len(images) == 2027
    first = images[0]
    assert first.path.endswith("net_7876/1016_0_0.jpg") and Path(first.path).is_file()
    np.testing.assert_array_equal(first.boxes, [[104, 100, 292, 288]])
    np.testing.assert_array_equal(first.landmarks[0, 0], [151, 151])
    # Read in the right order every landmark lies inside its box (README: checked on all lines).
    boxes = np.concatenate([a.boxes for a in images])
    points = np.concatenate([a.landmarks for a in images])
    inside = (points[..., 0] >= boxes[:, None, 0]) & (points[..., 0] <= boxes[:, None, 2]) & \
             (points[..., 1] >= boxes[:, None, 1]) & (points[..., 1] <= boxes[:, None, 3])
    assert inside.all()


def test_facepoint_original_list_backslashes_and_crlf():
    path = shared_data("cnn_facepoint_5pt/original_lists/trainImageList.txt")
    assert b"\r\n" in path.read_bytes()[:200] and b"\\" in path.read_bytes()[:200]
    images = read_facepoint_list(path, image_root="/faces")
    assert len(images) == 10000
    assert all("\\" not in a.path and "\r" not in a.path for a in images)
    assert images[0].path.startswith("/faces/") and images[0].path.endswith(".jpg")


def test_facepoint_bad_lines(tmp_path):
    path = tmp_path / "list.txt"
    good = "net/a.jpg 10 50 20 60 " + " ".join(["30"] * 10)
    path.write_text(good + "\n" + "net/b.jpg 10 50 20 60 1 2 3\n")
    with pytest.raises(AnnotationError, match=r"line 2: expected 15 fields"):
        read_facepoint_list(path)
    # The README's example of a box read in the wrong order: x1 y1 x2 y2 = 84 92 161 169.
    points = "100 110 140 110 120 130 105 150 135 150"
    path.write_text(f"lfw/a.jpg 84 161 92 169 {points}\r\nlfw/b.jpg 84 92 161 169 {points}\r\n")
    with pytest.raises(AnnotationError, match=r"line 2: landmarks lie far outside the box"):
        read_facepoint_list(path)
    path.write_text(f"lfw/a.jpg 161 84 92 169 {points}\n")
    with pytest.raises(AnnotationError, match=r"line 1: .*right < left"):
        read_facepoint_list(path)


# -- WebFaces --------------------------------------------------------------------------------------

def test_webfaces_points_and_derived_boxes():
    images = read_webfaces(shared_data("webfaces/WebFaces_GroundThruth.txt"))
    assert len(images) == 736 and sum(len(a) for a in images) == 1162
    assert max(len(a) for a in images) > 1  # several faces of one image grouped together
    assert all(Path(a.path).is_file() for a in images[:20])
    for image in images:
        assert np.isfinite(image.landmarks[:, :3]).all()
        assert np.isnan(image.landmarks[:, 3:]).all()  # the mouth centre is not a mouth corner
        known = image.landmarks[:, :3]
        assert (known >= image.boxes[:, None, :2]).all() and (known <= image.boxes[:, None, 2:]).all()


def test_webfaces_box_rule_against_faces_with_known_boxes():
    # The rule was fitted on the train list; the test list is held out.
    images = read_facepoint_list(shared_data("cnn_facepoint_5pt/testImageList.txt"))
    true_boxes = np.concatenate([a.boxes for a in images])
    points = np.concatenate([a.landmarks for a in images])
    mouth_centre = (points[:, 3] + points[:, 4]) / 2
    derived = box_from_points(points[:, 0], points[:, 1], mouth_centre, WEBFACES_BOX_RULE)
    iou = _iou(derived, true_boxes)
    assert np.median(iou) >= 0.8
    assert (iou >= 0.7).mean() >= 0.85
    assert (iou >= 0.5).mean() >= 0.99


def test_webfaces_bad_line(tmp_path):
    path = tmp_path / "gt.txt"
    path.write_text("pic1.jpg 1 2 3 4 5 6 7 8\npic2.jpg 1 2 3 4 5 6 7 nan\n")
    with pytest.raises(AnnotationError, match=r"line 2: .*finite"):
        read_webfaces(path)


# -- dlib XML --------------------------------------------------------------------------------------

def test_dlib_xml_with_68_points():
    images = read_dlib_xml(shared_data("dlib_xml/training_with_face_landmarks.xml"))
    assert len(images) == 4 and sum(len(a) for a in images) == 18
    first = images[0]
    assert Path(first.path).is_file() and (first.width, first.height) == (500, 375)
    # <box top='90' left='194' width='37' height='37'>: right edge at left + width.
    np.testing.assert_array_equal(first.boxes[0], [194, 90, 231, 127])
    marks = np.concatenate([a.landmarks for a in images])
    boxes = np.concatenate([a.boxes for a in images])
    assert np.isfinite(marks).all()
    assert (marks[:, 0, 0] < marks[:, 1, 0]).all() and (marks[:, 3, 0] < marks[:, 4, 0]).all()
    assert (marks[:, :2, 1] < marks[:, 3:, 1].min(axis=1, keepdims=True)).all()  # eyes above the mouth
    assert (marks >= boxes[:, None, :2] - 2).all() and (marks <= boxes[:, None, 2:] + 2).all()


def test_dlib_xml_fixture_ignore_and_no_parts():
    images = read_dlib_xml(FIXTURES / "dlib_small.xml")
    assert [Path(a.path).name for a in images] == ["one.jpg", "two.jpg"]
    assert images[0].path == str((FIXTURES / "faces" / "one.jpg").absolute())
    np.testing.assert_array_equal(images[0].boxes, [[20, 10, 70, 70], [150, 100, 180, 130]])
    np.testing.assert_array_equal(images[0].ignore, [False, True])
    assert np.isnan(images[0].landmarks).all()
    assert len(images[1]) == 0 and images[1].width is None


def test_dlib_xml_errors_name_the_line(tmp_path):
    with pytest.raises(AnnotationError, match=r"dlib_bad.xml, line 5: <box> lacks the attribute 'height'"):
        read_dlib_xml(FIXTURES / "dlib_bad.xml")
    broken = tmp_path / "broken.xml"
    broken.write_text("<dataset>\n<images>\n<image file='a.jpg'>\n</images>\n")
    with pytest.raises(AnnotationError, match=r"broken.xml, line 4: not well-formed"):
        read_dlib_xml(broken)


# -- FDDB ------------------------------------------------------------------------------------------

def test_fddb_ellipses_become_bounding_boxes():
    images = read_fddb(FIXTURES / "FDDB-fold-01-ellipseList.txt", image_root="/fddb")
    assert [a.path for a in images] == ["/fddb/2002/08/11/big/img_591.jpg", "/fddb/2002/08/26/big/img_265.jpg"]
    np.testing.assert_allclose(images[0].boxes, [[60, 60, 140, 100]])           # angle 0: major along x
    np.testing.assert_allclose(images[1].boxes, [[40, 30, 60, 90],              # angle pi/2: major along y
                                                 [180, 130, 220, 170]], atol=1e-4)  # a circle at any angle


def test_fddb_count_mismatch(tmp_path):
    path = tmp_path / "fold.txt"
    path.write_text("img_1\n2\n10 5 0 50 50 1\nimg_2\n1\n10 5 0 50 50 1\n")
    with pytest.raises(AnnotationError, match=r"line 4: expected 6 fields"):
        read_fddb(path)


# -- table form ------------------------------------------------------------------------------------

def test_table_round_trip_through_parquet_and_duckdb(tmp_path):
    images = read_wider(shared_data("wider_face_val_dev/wider_face_val_bbx_gt.txt"))[:30]
    images += read_facepoint_list(shared_data("cnn_facepoint_5pt/testImageList.txt"))[:5]
    images.append(ImageAnnotation("/empty.jpg", width=64, height=48))
    path = tmp_path / "annotations.parquet"
    pq.write_table(to_table(images), path)

    back = from_table(pq.read_table(path))
    assert len(back) == len(images)
    for original, restored in zip(images, back):
        assert (restored.path, restored.width, restored.height) == (original.path, original.width, original.height)
        np.testing.assert_array_equal(restored.boxes, original.boxes)
        np.testing.assert_array_equal(restored.landmarks, original.landmarks)  # NaN where unknown
        np.testing.assert_array_equal(restored.ignore, original.ignore)

    faces, ignored = duckdb.sql(
        f"SELECT sum(len(boxes)), sum(len(list_filter(ignore, lambda x: x))) FROM '{path}'").fetchall()[0]
    assert faces == sum(len(a) for a in images)
    assert ignored == sum(int(a.ignore.sum()) for a in images)
    # A slice of a table (as Ray Data hands out) reads back the same rows.
    sliced = from_table(to_table(images).slice(3, 4))
    assert [a.path for a in sliced] == [a.path for a in images[3:7]]
    np.testing.assert_array_equal(sliced[0].boxes, images[3].boxes)


def test_image_roots_in_object_storage_keep_their_scheme():
    from mtcnn.annotations import read_wider
    gt = shared_data("wider_face_train_small/wider_face_train_bbx_gt.txt")
    annotations = read_wider(gt, "s3://bucket/images/")
    assert annotations[0].path.startswith("s3://bucket/images/0--Parade/")
