"""The box coder: training's encoding and the detector's decoding, checked against each other."""

import numpy as np
import torch

from jobs.training.batch_augment import flip_samples
from jobs.training.samples import proposal_windows
from mtcnn.box_coder import (box_iou, box_of_window, box_windows, crop_regions, decode_boxes,
                             decode_landmarks, encode_boxes, encode_landmarks, flip_targets)

RNG = np.random.default_rng(17)


def _windows(count):
    x1, y1 = RNG.integers(0, 200, count), RNG.integers(0, 200, count)
    side = RNG.integers(12, 90, count)
    return np.stack([x1, y1, x1 + side, y1 + side], axis=1)


def test_encode_then_decode_is_the_identity_on_windows():
    windows = _windows(50)
    faces = windows + RNG.uniform(-8, 8, (50, 4))
    points = windows[:, None, :2] + RNG.uniform(0, 1, (50, 5, 2)) * (windows[:, None, 2:] - windows[:, None, :2])
    window_t = torch.from_numpy(windows.astype(np.float64))
    boxes = decode_boxes(window_t, torch.from_numpy(encode_boxes(faces, windows)).double(), plus_one=False)
    marks = decode_landmarks(window_t, torch.from_numpy(encode_landmarks(points, windows)).double(),
                             plus_one=False)
    np.testing.assert_allclose(boxes.numpy(), faces, atol=1e-4)
    np.testing.assert_allclose(marks.numpy(), points, atol=1e-4)


def test_targets_made_for_a_detector_crop_decode_back_through_the_detector_rule():
    # The detector crops box_windows(box) and decodes its outputs relative to the box itself
    # (1-based rule, size x2 - x1 + 1). Training encodes targets relative to that same window.
    windows = _windows(50)
    detector_boxes = box_of_window(windows).astype(np.float32)
    np.testing.assert_array_equal(box_windows(detector_boxes), windows)
    np.testing.assert_array_equal(proposal_windows(detector_boxes), windows)
    regions = crop_regions(torch.from_numpy(detector_boxes), 10_000, 10_000)
    np.testing.assert_array_equal(regions.numpy(), windows)  # inside the image: nothing clipped

    faces = (windows + RNG.uniform(-8, 8, (50, 4))).astype(np.float32)
    points = (windows[:, None, :2] + RNG.uniform(0, 1, (50, 5, 2)) * 30).astype(np.float32)
    box_t = torch.from_numpy(detector_boxes)
    decoded = decode_boxes(box_t, torch.from_numpy(encode_boxes(faces, windows)), plus_one=True)
    marks = decode_landmarks(box_t, torch.from_numpy(encode_landmarks(points, windows)), plus_one=True)
    # Landmarks come back as given; boxes in the detector's 1-based rule for the same face.
    np.testing.assert_allclose(marks.numpy(), points, atol=1e-3)
    np.testing.assert_allclose(decoded.numpy(), box_of_window(faces), atol=1e-3)


def test_flipped_targets_decode_to_the_mirrored_face():
    window = np.array([[0, 0, 100, 100]])
    face = np.array([[10.0, 20.0, 60.0, 90.0]])
    points = np.array([[[30, 40], [50, 40], [40, 55], [32, 70], [48, 70]]], np.float64)
    boxes, marks = flip_targets(torch.from_numpy(encode_boxes(face, window)).double(),
                                torch.from_numpy(encode_landmarks(points, window)).double())
    mirrored = decode_boxes(torch.tensor(window, dtype=torch.float64), boxes, plus_one=False)
    # Mirrored in the window [0, 100): x -> 100 - x, then the box's sides trade places.
    np.testing.assert_allclose(mirrored.numpy(), [[40.0, 20.0, 90.0, 90.0]], atol=1e-5)
    back = decode_landmarks(torch.tensor(window, dtype=torch.float64), marks, plus_one=False).numpy()[0]
    np.testing.assert_allclose(back[0], [100 - 50, 40], atol=1e-5)  # image-left eye: was the right one
    # The batch transform uses the same rule.
    kinds = torch.tensor([3])
    _, same_boxes, same_marks = flip_samples(torch.zeros(1, 3, 12, 12), kinds,
                                             torch.from_numpy(encode_boxes(face, window)),
                                             torch.from_numpy(encode_landmarks(points, window)),
                                             torch.tensor([True]))
    torch.testing.assert_close(same_boxes.double(), boxes)
    torch.testing.assert_close(same_marks.double(), marks)


def test_one_iou_for_tensors_and_arrays_with_its_variants():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[5, 0, 15, 10], [0, 0, 5, 5]])
    np.testing.assert_allclose(box_iou(a, b), [[50 / 150, 25 / 100]])
    np.testing.assert_allclose(box_iou(a, b, mode="min"), [[0.5, 1.0]])
    np.testing.assert_allclose(box_iou(a, b, plus_one=True), [[66 / 176, 36 / 121]])
    as_tensor = box_iou(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32))
    np.testing.assert_allclose(as_tensor.numpy(), box_iou(a, b), rtol=1e-6)
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 2)
