"""Sample labelling by IoU, box and landmark targets, crops, and the shard rows."""

from __future__ import annotations

import numpy as np
import torch
import pyarrow as pa
import pytest

from jobs.training.samples import (DISCARD, SampleConfig, crop_windows, face_samples, iou, label_windows,
                                   landmark_samples, proposal_windows, to_table)
from mtcnn.annotations import DETECTOR_WINDOW_RULE, box_from_points
from mtcnn.box_coder import encode_boxes, encode_landmarks
from jobs.training.schema import LANDMARK, NEGATIVE, PART, POSITIVE, SAMPLE_SCHEMA

GT = np.array([[0.0, 0.0, 100.0, 100.0]], np.float32)


def window_with_iou(target: float) -> np.ndarray:
    """A window inside GT, its full width and `target` of its height: IoU exactly target."""
    return np.array([0.0, 0.0, 100.0, 100.0 * target], np.float32)


@pytest.mark.parametrize("overlap,kind", [
    (1.0, POSITIVE), (0.7, POSITIVE), (0.66, POSITIVE), (0.65, PART), (0.6, PART), (0.45, PART),
    (0.4, PART), (0.39, NEGATIVE), (0.1, NEGATIVE),
])
def test_iou_labels(overlap, kind):
    window = window_with_iou(overlap)[None]
    assert iou(window, GT)[0, 0] == pytest.approx(overlap, abs=1e-6)
    kinds, matched = label_windows(window, GT, np.zeros(1, bool), SampleConfig())
    assert kinds[0] == kind
    assert matched[0] == 0


def test_original_negative_threshold_drops_the_gap():
    config = SampleConfig(negative_iou=0.3)
    windows = np.stack([window_with_iou(0.35), window_with_iou(0.25)])
    kinds, _ = label_windows(windows, GT, np.zeros(1, bool), config)
    assert kinds.tolist() == [DISCARD, NEGATIVE]


def test_window_far_from_faces_and_image_without_faces_are_negative():
    far = np.array([[300.0, 300.0, 340.0, 340.0]], np.float32)
    assert label_windows(far, GT, np.zeros(1, bool), SampleConfig())[0][0] == NEGATIVE
    empty = np.zeros((0, 4), np.float32)
    assert label_windows(far, empty, np.zeros(0, bool), SampleConfig())[0][0] == NEGATIVE


def test_best_overlap_decides_the_match():
    boxes = np.array([[0, 0, 100, 100], [50, 0, 150, 100]], np.float32)
    window = np.array([[45.0, 0.0, 145.0, 100.0]], np.float32)
    kinds, matched = label_windows(window, boxes, np.zeros(2, bool), SampleConfig())
    assert kinds[0] == POSITIVE and matched[0] == 1


def test_ignore_boxes_are_neither_faces_nor_negatives():
    ignore = np.ones(1, bool)
    windows = np.stack([window_with_iou(1.0), window_with_iou(0.5), window_with_iou(0.41),
                        window_with_iou(0.2)])
    kinds, _ = label_windows(windows, GT, ignore, SampleConfig())
    assert kinds.tolist() == [DISCARD, DISCARD, DISCARD, NEGATIVE]


def test_box_targets():
    np.testing.assert_array_equal(encode_boxes(GT, GT), np.zeros((1, 4), np.float32))
    shifted = np.array([[10.0, 20.0, 110.0, 120.0]])
    np.testing.assert_allclose(encode_boxes(GT, shifted), [[-0.1, -0.2, -0.1, -0.2]], atol=1e-7)
    wider = np.array([[0.0, 0.0, 200.0, 100.0]])  # offsets over width for x, height for y
    np.testing.assert_allclose(encode_boxes(GT, wider), [[0.0, 0.0, -0.5, 0.0]], atol=1e-7)


def test_landmark_targets_are_five_x_then_five_y():
    window = np.array([[10.0, 20.0, 110.0, 120.0]])
    points = np.array([[[60, 70], [10, 20], [110, 120], [35, 95], [85, 45]]], np.float32)
    targets = encode_landmarks(points, window)
    np.testing.assert_allclose(targets[0, :5], [0.5, 0.0, 1.0, 0.25, 0.75], atol=1e-7)
    np.testing.assert_allclose(targets[0, 5:], [0.5, 0.0, 1.0, 0.75, 0.25], atol=1e-7)


def test_crops_stretch_the_part_inside_the_image_as_the_detector_does():
    image = np.full((40, 50, 3), 200, np.uint8)
    image[:, 25:] = 100
    crops = crop_windows(image, np.array([[-10, -10, 10, 10], [20, 0, 40, 20], [30, -20, 60, 20]]), 20)
    assert crops.shape == (3, 20, 20, 3) and crops.dtype == np.uint8
    assert (crops[0] == 200).all()  # the 10 x 10 pixels inside, stretched: no black border
    assert (crops[1, :, :5] == 200).all() and (crops[1, :, 5:] == 100).all()
    assert (crops[2] == 100).all()


@pytest.mark.parametrize("host_kernels", [True, False])
def test_training_crops_are_the_detectors_crops_of_the_same_boxes(host_kernels):
    from mtcnn.detector import _ImageSources

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (57, 83, 3), dtype=np.uint8)
    corners = rng.integers(-30, 70, (40, 2))
    sides = rng.integers(3, 60, (40, 1))
    windows = np.concatenate([corners, corners + sides], axis=1)  # many cross an edge
    assert ((windows[:, :2] < 0) | (windows[:, 2:] > [83, 57])).any(axis=1).sum() > 10
    for size in (12, 24, 48):
        training = crop_windows(image, windows, size)
        boxes = torch.from_numpy((windows + [1, 1, 0, 0]).astype(np.float32))
        sources = _ImageSources([image], torch.device("cpu"), host_kernels)
        detector, valid = sources.crops(boxes, torch.zeros(len(boxes), dtype=torch.long), size)
        detector = detector.permute(0, 2, 3, 1).numpy()
        valid = valid.numpy()
        assert valid.sum() > 20
        np.testing.assert_array_less(np.abs(training[valid].astype(np.float32) - detector[valid]), 0.5 + 1e-3)
        assert (training[~valid] == 0).all()  # wholly outside: nothing to see


def test_crops_resize_to_the_stage_size():
    image = np.zeros((100, 100, 3), np.uint8)
    image[:50] = 255  # top half white
    crop = crop_windows(image, np.array([[0, 0, 100, 100]]), 12)[0]
    assert (crop[:6] == 255).all() and (crop[6:] == 0).all()


def test_proposal_windows_follow_the_detector_crop_rule():
    boxes = np.array([[11.7, 21.2, 50.9, 60.3], [5.0, 5.0, 5.5, 30.0]])
    np.testing.assert_array_equal(proposal_windows(boxes), [[10, 20, 50, 60], [4, 4, 5, 30]])


def scene(seed: int = 0):
    """A 240 x 320 noise image with three faces, one of them an ignore box."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, size=(240, 320, 3), dtype=np.uint8)
    boxes = np.array([[40, 30, 100, 100], [150, 60, 230, 150], [250, 20, 300, 70]], np.float32)
    ignore = np.array([False, False, True])
    points = np.full((3, 5, 2), np.nan, np.float32)
    points[1] = [[170, 90], [210, 90], [190, 110], [175, 130], [205, 130]]
    return image, boxes, ignore, points


@pytest.mark.parametrize("stage", ["pnet", "rnet", "onet"])
def test_face_samples_follow_the_mix_and_the_labels(stage):
    image, boxes, ignore, _ = scene()
    config = SampleConfig(stage=stage, samples_per_image=100)
    samples = face_samples(image, boxes, ignore, config, np.random.default_rng(1))
    counts = {kind: int((samples.kinds == kind).sum()) for kind in (NEGATIVE, POSITIVE, PART)}
    assert counts == {NEGATIVE: 60, POSITIVE: 20, PART: 20}
    size = config.size
    assert samples.images.shape == (100, size, size, 3)
    overlaps = iou(samples.windows, boxes)
    for kind, window, target, overlap in zip(samples.kinds, samples.windows, samples.boxes, overlaps):
        if kind == NEGATIVE:
            # Never above the threshold with any box, ignore boxes included.
            assert overlap.max() < config.negative_iou
            assert not target.any()
            continue
        best = overlap.argmax()
        assert not ignore[best]
        assert overlap[best] > 0.65 if kind == POSITIVE else 0.4 <= overlap[best] <= 0.65
        # The targets bring the window back onto its face.
        side = np.array([window[2] - window[0], window[3] - window[1]] * 2, np.float32)
        np.testing.assert_allclose(window + target * side, boxes[best], atol=1e-3)
    # The crop is the window's pixels.
    first = samples.windows[0]
    expected = crop_windows(image, first[None], size)[0]
    np.testing.assert_array_equal(samples.images[0], expected)


def test_negatives_never_overlap_ignore_boxes():
    # Nearly all of the image is covered by ignore boxes: negatives must stay in the gaps.
    image = np.zeros((120, 120, 3), np.uint8)
    boxes = np.array([[0, 0, 60, 60], [60, 0, 120, 60], [0, 60, 60, 120], [60, 60, 100, 100]], np.float32)
    ignore = np.ones(4, bool)
    config = SampleConfig(samples_per_image=200)
    samples = face_samples(image, boxes, ignore, config, np.random.default_rng(3))
    negatives = samples.windows[samples.kinds == NEGATIVE]
    assert len(negatives) > 0
    assert (iou(negatives, boxes).max(axis=1) < config.negative_iou).all()
    assert not (samples.kinds == POSITIVE).any() and not (samples.kinds == PART).any()


def test_mined_windows_are_labelled_and_topped_up():
    image, boxes, ignore, _ = scene()
    # A proposal equal to face 0 in the detector's 1-based convention, one on nothing, one on the ignore box.
    proposals = np.array([[41.0, 31.0, 100.0, 100.0], [5.0, 150.0, 35.0, 180.0], [251.0, 21.0, 300.0, 70.0]])
    config = SampleConfig(stage="rnet", samples_per_image=5, mix=(1, 1, 0, 0), top_up=False)
    samples = face_samples(image, boxes, ignore, config, np.random.default_rng(0), proposals)
    # The window on the ignore box is neither kind.
    assert sorted(samples.kinds.tolist()) == [NEGATIVE, POSITIVE]
    positive = samples.kinds == POSITIVE
    np.testing.assert_array_equal(samples.windows[positive], [[40, 30, 100, 100]])
    np.testing.assert_allclose(samples.boxes[positive], 0.0, atol=1e-7)
    topped = face_samples(image, boxes, ignore, SampleConfig(stage="rnet", samples_per_image=40), np.random.default_rng(0),
                          proposals)
    assert (topped.kinds == POSITIVE).sum() == 8 and (topped.kinds == PART).sum() == 8


def test_landmark_samples_hold_every_point():
    image, boxes, ignore, points = scene()
    config = SampleConfig(stage="onet", landmark_samples_per_image=30, landmark_windows="annotated")
    samples = landmark_samples(image, boxes, points, ignore, config, np.random.default_rng(2))
    assert len(samples) == 30 and (samples.kinds == LANDMARK).all()
    assert (samples.landmarks >= 0).all() and (samples.landmarks < 1).all()
    assert not samples.boxes.any()
    # Only face 1 has points: every window overlaps it as a positive, and maps the points back.
    assert (iou(samples.windows, boxes[1:2])[:, 0] > 0.65).all()
    for window, target in zip(samples.windows, samples.landmarks):
        side = np.array([window[2] - window[0], window[3] - window[1]], np.float32)
        restored = np.stack([target[:5], target[5:]], axis=1) * side + window[:2]
        np.testing.assert_allclose(restored, points[1], atol=1e-3)


def test_landmark_windows_follow_the_detectors_frame():
    # The default draws landmark windows around the window O-Net gets at detection time, derived
    # from the five points: larger than the annotated box and centred higher.
    image, boxes, ignore, points = scene()
    config = SampleConfig(stage="onet", landmark_samples_per_image=200)
    samples = landmark_samples(image, boxes, points, ignore, config, np.random.default_rng(3))
    face = points[1]
    frame = box_from_points(face[0], face[1], (face[3] + face[4]) / 2, DETECTOR_WINDOW_RULE)
    assert len(samples) > 100
    assert (iou(samples.windows, frame)[:, 0] > 0.65).all()
    sides = samples.windows[:, 2] - samples.windows[:, 0]
    centres = (samples.windows[:, 1] + samples.windows[:, 3]) / 2
    assert np.median(sides) == pytest.approx(frame[0, 2] - frame[0, 0], rel=0.1)
    assert np.median(centres) == pytest.approx((frame[0, 1] + frame[0, 3]) / 2, abs=0.05 * sides.mean())
    annotated = landmark_samples(image, boxes, points, ignore,
                                 SampleConfig(stage="onet", landmark_samples_per_image=200,
                                              landmark_windows="annotated"), np.random.default_rng(3))
    assert np.median(sides) > 1.1 * np.median(annotated.windows[:, 2] - annotated.windows[:, 0])
    with pytest.raises(ValueError, match="landmark_windows"):
        SampleConfig(landmark_windows="list")


def test_samples_are_seeded():
    image, boxes, ignore, _ = scene()
    config = SampleConfig()
    a = face_samples(image, boxes, ignore, config, np.random.default_rng(5))
    b = face_samples(image, boxes, ignore, config, np.random.default_rng(5))
    np.testing.assert_array_equal(a.windows, b.windows)
    np.testing.assert_array_equal(a.images, b.images)


def test_rows_have_the_shard_schema():
    image, boxes, ignore, points = scene()
    config = SampleConfig(stage="rnet", samples_per_image=10, landmark_samples_per_image=3)
    rng = np.random.default_rng(0)
    samples = face_samples(image, boxes, ignore, config, rng)
    marks = landmark_samples(image, boxes, points, ignore, config, rng)
    table = pa.concat_tables([to_table(samples, "a.jpg", "rnet"), to_table(marks, "a.jpg", "rnet")])
    assert table.schema.equals(SAMPLE_SCHEMA)
    assert table.num_rows == 13
    row = table.slice(0, 1).to_pylist()[0]
    assert row["size"] == 24 and row["stage"] == "rnet" and row["source"] == "a.jpg"
    crop = np.frombuffer(row["image"], np.uint8).reshape(24, 24, 3)
    np.testing.assert_array_equal(crop, samples.images[0])
    last = table.slice(12, 1).to_pylist()[0]
    assert last["kind"] == LANDMARK
    np.testing.assert_allclose(last["landmarks"], marks.landmarks[-1])


@pytest.mark.parametrize("bad", [dict(negative_iou=0.5), dict(mix=(3, 1, 1)), dict(mix=(0, 0, 0, 0)),
                                 dict(stage="xnet"), dict(positive_iou=0.3)])
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError):
        SampleConfig(**bad)
