"""Augmentation moves labels with pixels: dots stay under their landmarks, boxes around their fill."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.training.augment import (FLIPPED_LANDMARK_ORDER, AugmentConfig, apply_transform, augment,
                                   make_transform, random_transform)

WIDTH, HEIGHT = 200, 160
# Five landmarks of a frontal face: left eye, right eye, nose, left mouth, right mouth.
POINTS = np.array([[[80.5, 60.5], [120.5, 62.5], [100.5, 80.5], [85.5, 100.5], [116.5, 99.5]]], np.float32)
COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]], np.uint8)
BOX = np.array([[70.0, 45.0, 131.0, 115.0]], np.float32)

TRANSFORMS = {
    "identity": dict(),
    "flip": dict(flip=True),
    "rotate +40": dict(rotation=40.0),
    "rotate -40": dict(rotation=-40.0),
    "shift": dict(shift=(0.2, -0.2)),
    "zoom in": dict(zoom=1.2),
    "zoom out": dict(zoom=0.8),
    "flip + rotate": dict(flip=True, rotation=25.0),
    "all": dict(flip=True, rotation=-33.0, shift=(-0.15, 0.1), zoom=1.15),
    "all, no flip": dict(rotation=38.0, shift=(0.12, 0.18), zoom=0.85),
}


def dots_image() -> np.ndarray:
    """A black image with a 9 x 9 coloured dot centred on each landmark."""
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    for (x, y), colour in zip(POINTS[0], COLOURS):
        column, row = int(np.floor(x)), int(np.floor(y))
        image[row - 4:row + 5, column - 4:column + 5] = colour
    return image


def box_image() -> np.ndarray:
    """A black image with the box filled white, pixel edges exactly on the box's edges."""
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    x1, y1, x2, y2 = BOX[0].astype(int)
    image[y1:y2, x1:x2] = 255
    return image


def all_transforms():
    """The named transforms plus random ones with the paper's ranges."""
    named = [(name, make_transform(WIDTH, HEIGHT, **kwargs)) for name, kwargs in TRANSFORMS.items()]
    config = AugmentConfig(probability=1.0)
    randoms = [(f"random {seed}", random_transform(WIDTH, HEIGHT, config, np.random.default_rng(seed)))
               for seed in range(12)]
    return named + randoms


@pytest.mark.parametrize("name,transform", all_transforms(), ids=[n for n, _ in all_transforms()])
def test_dots_stay_under_their_landmarks(name, transform):
    image, _, points, _ = apply_transform(dots_image(), BOX, POINTS, np.zeros(1, bool), transform)
    order = FLIPPED_LANDMARK_ORDER if transform.flipped else np.arange(5)
    for index, (x, y) in enumerate(points[0]):
        assert np.isfinite(x) and np.isfinite(y), f"{name}: landmark {index} left the image"
        pixel = image[int(np.floor(y)), int(np.floor(x))].astype(int)
        expected = COLOURS[order[index]].astype(int)
        assert np.abs(pixel - expected).max() <= 40, (
            f"{name}: landmark {index} at ({x:.1f}, {y:.1f}) sits on {pixel}, expected {expected}")


@pytest.mark.parametrize("name,transform", all_transforms(), ids=[n for n, _ in all_transforms()])
def test_left_points_stay_image_left(name, transform):
    _, _, points, _ = apply_transform(dots_image(), BOX, POINTS, np.zeros(1, bool), transform)
    # Rotations stay within 40 degrees, so image-left stays left of image-right.
    assert points[0, 0, 0] < points[0, 1, 0], f"{name}: left eye is right of the right eye"
    assert points[0, 3, 0] < points[0, 4, 0], f"{name}: left mouth corner is right of the right one"


@pytest.mark.parametrize("name,transform", all_transforms(), ids=[n for n, _ in all_transforms()])
def test_box_is_bounding_box_of_the_moved_fill(name, transform):
    image, boxes, _, ignore = apply_transform(box_image(), BOX, POINTS, np.zeros(1, bool), transform)
    rows, columns = np.nonzero(image[:, :, 0] > 127)
    assert len(rows), f"{name}: the filled box vanished"
    filled = np.array([columns.min(), rows.min(), columns.max() + 1, rows.max() + 1], np.float32)
    # Within a pixel and a half: the fill's edges are resampled, the box is exact.
    assert np.abs(filled - boxes[0]).max() <= 1.5, f"{name}: fill spans {filled}, box says {boxes[0]}"
    assert not ignore[0]


def test_flip_swaps_left_and_right():
    transform = make_transform(WIDTH, HEIGHT, flip=True)
    _, boxes, points, _ = apply_transform(dots_image(), BOX, POINTS, np.zeros(1, bool), transform)
    # The new left eye is the mirrored old right eye: x -> width - x.
    np.testing.assert_allclose(points[0, 0], [WIDTH - POINTS[0, 1, 0], POINTS[0, 1, 1]], atol=1e-4)
    np.testing.assert_allclose(points[0, 2], [WIDTH - POINTS[0, 2, 0], POINTS[0, 2, 1]], atol=1e-4)
    np.testing.assert_allclose(boxes[0], [WIDTH - BOX[0, 2], BOX[0, 1], WIDTH - BOX[0, 0], BOX[0, 3]], atol=1e-4)


def test_rotated_box_is_bounding_box_of_its_corners():
    transform = make_transform(WIDTH, HEIGHT, rotation=30.0)
    _, boxes, _, _ = apply_transform(box_image(), BOX, POINTS, np.zeros(1, bool), transform)
    width, height = BOX[0, 2] - BOX[0, 0], BOX[0, 3] - BOX[0, 1]
    angle = np.radians(30.0)
    expected_w = width * np.cos(angle) + height * np.sin(angle)
    expected_h = width * np.sin(angle) + height * np.cos(angle)
    np.testing.assert_allclose(boxes[0, 2:] - boxes[0, :2], [expected_w, expected_h], rtol=1e-4)


def test_labels_that_leave_the_image():
    # Shift the face mostly out at the left: its box turns ignore, its landmarks NaN.
    transform = make_transform(WIDTH, HEIGHT, shift=(-0.6, 0.0))
    _, boxes, points, ignore = apply_transform(dots_image(), BOX, POINTS, np.zeros(1, bool), transform)
    assert ignore[0]
    assert np.isnan(points[0]).all()
    assert boxes[0, 0] == 0.0  # clipped to the image


def test_ignore_flags_survive():
    transform = make_transform(WIDTH, HEIGHT, rotation=10.0)
    _, _, _, ignore = apply_transform(dots_image(), BOX, POINTS, np.ones(1, bool), transform)
    assert ignore[0]


def test_augment_is_seeded_and_can_be_off():
    image = dots_image()
    args = (image, BOX, POINTS, np.zeros(1, bool), AugmentConfig(probability=1.0))
    first = augment(*args, np.random.default_rng(7))
    second = augment(*args, np.random.default_rng(7))
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], image)
    unchanged = augment(image, BOX, POINTS, np.zeros(1, bool), AugmentConfig(probability=0.0),
                        np.random.default_rng(7))
    assert unchanged[0] is image and unchanged[1] is BOX


def test_random_transforms_stay_in_range():
    config = AugmentConfig(probability=1.0)
    for seed in range(50):
        transform = random_transform(WIDTH, HEIGHT, config, np.random.default_rng(seed))
        linear = transform.matrix[:, :2]
        zoom = np.sqrt(abs(np.linalg.det(linear)))
        assert 0.8 - 1e-6 <= zoom <= 1.2 + 1e-6
        angle = np.degrees(np.arctan2(abs(linear[1, 0]), abs(linear[0, 0])))
        assert angle <= 40.0 + 1e-6


@pytest.mark.parametrize("bad", [dict(max_rotation=-1), dict(max_shift=1.5), dict(max_zoom=1.0),
                                 dict(probability=2.0)])
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError):
        AugmentConfig(**bad)
