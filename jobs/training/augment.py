"""Geometric augmentation of an image with its face boxes and landmarks (the paper's knobs).

Labels use continuous pixel coordinates: pixel (column i, row j) covers [i, i+1) x [j, j+1), so
a box is (x1, y1, x2, y2) of its outer edges and a landmark at (x, y) lies in pixel
(floor(x), floor(y)). Under rotation a box becomes the axis-aligned bounding box of its four
rotated corners, which is looser than the face: the exact face outline is not known.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from mtcnn.box_coder import LANDMARK_FLIP_ORDER

#: Where each landmark comes from after a horizontal flip, so "left" stays the image-left point.
FLIPPED_LANDMARK_ORDER = np.array(LANDMARK_FLIP_ORDER)


@dataclass(frozen=True)
class AugmentConfig:
    """Random geometric transforms; defaults are the paper's (Keras ImageDataGenerator knobs)."""

    max_rotation: float = field(default=40.0, metadata={
        "help": "rotation drawn uniformly from +- this many degrees"})
    max_shift: float = field(default=0.2, metadata={
        "help": "horizontal and vertical shifts, each up to this fraction of the image width / height"})
    #: The same for both axes so faces keep their aspect ratio.
    max_zoom: float = field(default=0.2, metadata={"help": "zoom factor drawn from 1 +- this"})
    horizontal_flip: bool = field(default=True, metadata={"help": "mirror left-right with probability 0.5"})
    #: The rest pass unchanged so the nets also see upright faces with tight boxes, the case
    #: the evaluation measures.
    probability: float = field(default=0.5, metadata={"help": "share of images augmented",
                                                      "flag": "--augment-probability"})
    #: Too little of the face is left to learn it from, but no negative may cover it.
    min_visible: float = field(default=0.5, metadata={
        "help": "a box with less than this share inside the image becomes an ignore box"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_rotation <= 180.0:
            raise ValueError(f"max_rotation must be in [0, 180] degrees, got {self.max_rotation!r}")
        if not 0.0 <= self.max_shift < 1.0:
            raise ValueError(f"max_shift must be in [0, 1), got {self.max_shift!r}")
        if not 0.0 <= self.max_zoom < 1.0:
            raise ValueError(f"max_zoom must be in [0, 1), got {self.max_zoom!r}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {self.probability!r}")
        if not 0.0 <= self.min_visible <= 1.0:
            raise ValueError(f"min_visible must be in [0, 1], got {self.min_visible!r}")


@dataclass(frozen=True)
class Transform:
    """One geometric transform: a 2 x 3 affine matrix on continuous coordinates, and a flip flag."""

    matrix: np.ndarray
    flipped: bool


def make_transform(width: int, height: int, rotation: float = 0.0, shift: tuple[float, float] = (0.0, 0.0),
                   zoom: float = 1.0, flip: bool = False) -> Transform:
    """The transform that flips, then rotates (degrees, counter-clockwise on screen) and zooms
    about the image centre, then shifts by a fraction of the image size."""
    centre = np.array([width / 2.0, height / 2.0])
    flip_matrix = np.array([[-1.0, 0.0, width], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) if flip else np.eye(3)
    rotate = np.vstack([cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), rotation, zoom),
                        [0.0, 0.0, 1.0]])
    move = np.array([[1.0, 0.0, shift[0] * width], [0.0, 1.0, shift[1] * height], [0.0, 0.0, 1.0]])
    return Transform((move @ rotate @ flip_matrix)[:2], bool(flip))


def random_transform(width: int, height: int, config: AugmentConfig, rng: np.random.Generator) -> Transform | None:
    """A random transform as the config allows, or None when this image stays as it is."""
    if rng.random() >= config.probability:
        return None
    rotation = rng.uniform(-config.max_rotation, config.max_rotation)
    shift = tuple(rng.uniform(-config.max_shift, config.max_shift, size=2))
    zoom = rng.uniform(1.0 - config.max_zoom, 1.0 + config.max_zoom)
    flip = bool(config.horizontal_flip and rng.random() < 0.5)
    return make_transform(width, height, rotation, shift, zoom, flip)


def warp_image(image: np.ndarray, transform: Transform) -> np.ndarray:
    """The image under a transform, same size, new pixels copied from the nearest edge pixel."""
    height, width = image.shape[:2]
    # warpAffine addresses pixel centres (integers); the labels' continuous coordinates put
    # centres at +0.5, so conjugate the matrix by that half-pixel shift.
    linear, offset = transform.matrix[:, :2], transform.matrix[:, 2]
    centre_offset = offset + linear @ np.array([0.5, 0.5]) - 0.5
    matrix = np.hstack([linear, centre_offset[:, None]])
    return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def transform_points(points: np.ndarray, transform: Transform) -> np.ndarray:
    """(..., 2) points under a transform (NaN stays NaN)."""
    flat = points.reshape(-1, 2).astype(np.float64)
    moved = flat @ transform.matrix[:, :2].T + transform.matrix[:, 2]
    return moved.reshape(points.shape).astype(np.float32)


def transform_boxes(boxes: np.ndarray, transform: Transform) -> np.ndarray:
    """(N, 4) boxes under a transform: the bounding box of each box's four moved corners."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    x1, y1, x2, y2 = boxes.T
    corners = np.stack([np.stack([x1, y1], 1), np.stack([x2, y1], 1),
                        np.stack([x1, y2], 1), np.stack([x2, y2], 1)], axis=1)
    moved = transform_points(corners, transform)
    return np.concatenate([moved.min(axis=1), moved.max(axis=1)], axis=1).astype(np.float32)


def transform_landmarks(landmarks: np.ndarray, transform: Transform) -> np.ndarray:
    """(N, 5, 2) landmarks under a transform, left and right swapped after a flip."""
    moved = transform_points(np.asarray(landmarks, np.float32).reshape(-1, 5, 2), transform)
    return moved[:, FLIPPED_LANDMARK_ORDER] if transform.flipped else moved


def augment(image: np.ndarray, boxes: np.ndarray, landmarks: np.ndarray, ignore: np.ndarray,
            config: AugmentConfig, rng: np.random.Generator):
    """A randomly transformed copy of an image with its labels moved along.

    Returns (image, boxes, landmarks, ignore). Boxes are clipped to the image; a box mostly
    pushed out of it becomes an ignore box, and landmarks that leave the image become NaN.
    """
    height, width = image.shape[:2]
    transform = random_transform(width, height, config, rng)
    if transform is None:
        return image, boxes, landmarks, ignore
    return apply_transform(image, boxes, landmarks, ignore, transform, config.min_visible)


def apply_transform(image: np.ndarray, boxes: np.ndarray, landmarks: np.ndarray, ignore: np.ndarray,
                    transform: Transform, min_visible: float = 0.5):
    """An image and its labels under one given transform (see `augment`)."""
    height, width = image.shape[:2]
    moved = transform_boxes(boxes, transform)
    clipped = np.clip(moved, 0, [width, height, width, height]).astype(np.float32)
    area = np.prod(moved[:, 2:] - moved[:, :2], axis=1)
    visible = np.prod(np.clip(clipped[:, 2:] - clipped[:, :2], 0, None), axis=1)
    mostly_out = visible < min_visible * np.maximum(area, 1e-6)
    points = transform_landmarks(landmarks, transform)
    outside = ((points < 0) | (points >= [width, height])).any(axis=2).any(axis=1)
    points[outside] = np.nan
    return (warp_image(image, transform), clipped, points,
            np.asarray(ignore, bool) | mostly_out)
