"""Face chips from detections: a similarity transform onto the 5-point template, or a square box crop."""

from __future__ import annotations

import cv2
import numpy as np

#: The ArcFace 5-point template in a 112 x 112 chip (InsightFace's `arcface_dst`): left eye, right
#: eye, nose, left and right mouth corner, image-left first, as the detector's landmarks are.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], np.float64)
TEMPLATE_SIZE = 112
ALIGN_METHODS = ("similarity", "box")


class AlignError(ValueError):
    """A face that cannot be cut out (degenerate landmarks or box, bad size or margin)."""


def template_points(size: int = TEMPLATE_SIZE, margin: float = 0.0) -> np.ndarray:
    """The template's five points (5, 2) scaled to a size x size chip with margin/2 pixels on each side."""
    _check_size(size, margin)
    return ARCFACE_TEMPLATE * ((size - margin) / TEMPLATE_SIZE) + margin / 2.0


def umeyama(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2 x 3 least-squares similarity (rotation, uniform scale, shift; no reflection) taking source points to target."""
    source = np.asarray(source, np.float64).reshape(-1, 2)
    target = np.asarray(target, np.float64).reshape(-1, 2)
    if len(source) != len(target) or len(source) < 2:
        raise AlignError(f"need two or more point pairs, got {len(source)} and {len(target)}")
    if not (np.isfinite(source).all() and np.isfinite(target).all()):
        raise AlignError("landmarks must be finite numbers (missing points cannot be aligned)")
    source_mean, target_mean = source.mean(axis=0), target.mean(axis=0)
    source_centred, target_centred = source - source_mean, target - target_mean
    variance = (source_centred ** 2).sum() / len(source)
    if variance < 1e-12:
        raise AlignError("landmarks all lie on one point: no scale or rotation to fit")
    covariance = target_centred.T @ source_centred / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    # Umeyama (1991), eq. 39-40: flip the last axis when the best orthogonal map is a reflection,
    # so a mirrored face is rotated, never mirrored, onto the template.
    signs = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        signs[-1] = -1.0
    rotation = u @ np.diag(signs) @ vt
    scale = float((singular * signs).sum() / variance)
    shift = target_mean - scale * rotation @ source_mean
    return np.hstack([scale * rotation, shift[:, None]])


def similarity_matrix(landmarks: np.ndarray, size: int = TEMPLATE_SIZE, margin: float = 0.0) -> np.ndarray:
    """The 2 x 3 map of an image onto a size x size chip with the five landmarks on the scaled template."""
    return umeyama(np.asarray(landmarks, np.float64).reshape(5, 2), template_points(size, margin))


def box_matrix(box: np.ndarray, size: int = 160, margin: float = 0.0) -> np.ndarray:
    """The 2 x 3 map of an image onto a size x size chip of the square around a box, margin/2 chip pixels each side."""
    _check_size(size, margin)
    x1, y1, x2, y2 = (float(v) for v in np.asarray(box, np.float64).reshape(4))
    side = max(x2 - x1, y2 - y1)
    if not np.isfinite(side) or side <= 0:
        raise AlignError(f"box {[x1, y1, x2, y2]} has no area")
    # As facenet-pytorch's extract_face: the margin is in chip pixels, so it is the same share of
    # every chip whatever the face's size in its image (facenet's script adds source pixels).
    scale = (size - margin) / side
    centre = np.array([(x1 + x2) / 2.0, (y1 + y2) / 2.0])
    shift = (size - 1) / 2.0 - scale * centre
    return np.array([[scale, 0.0, shift[0]], [0.0, scale, shift[1]]])


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Points (N, 2) mapped by a 2 x 3 affine matrix."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    return points @ np.asarray(matrix, np.float64)[:, :2].T + np.asarray(matrix, np.float64)[:, 2]


def warp(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """The size x size chip that a 2 x 3 matrix maps out of an image (black outside it), anti-aliased when shrinking."""
    matrix = np.asarray(matrix, np.float64)
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    if scale < 0.5:
        # Bilinear sampling at under half scale skips pixels and aliases; shrink the region the
        # chip covers with INTER_AREA first, then warp at a scale near 1.
        corners = np.array([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1]], np.float64)
        inverse = cv2.invertAffineTransform(matrix)
        source = transform_points(corners, inverse)
        height, width = image.shape[:2]
        x0 = int(max(0, np.floor(source[:, 0].min()) - 2))
        y0 = int(max(0, np.floor(source[:, 1].min()) - 2))
        x1 = int(min(width, np.ceil(source[:, 0].max()) + 3))
        y1 = int(min(height, np.ceil(source[:, 1].max()) + 3))
        if x1 - x0 >= 2 and y1 - y0 >= 2:
            factor = 1.0 / (2.0 * scale)  # leaves the warp a scale of 2 x the target (~0.5 after)
            small_w = max(1, int(round((x1 - x0) / factor)))
            small_h = max(1, int(round((y1 - y0) / factor)))
            small = cv2.resize(image[y0:y1, x0:x1], (small_w, small_h), interpolation=cv2.INTER_AREA)
            fx, fy = (x1 - x0) / small_w, (y1 - y0) / small_h
            # small pixel (u, v) is source pixel (x0 + (u + 0.5) fx - 0.5, y0 + (v + 0.5) fy - 0.5).
            to_source = np.array([[fx, 0.0, x0 + 0.5 * fx - 0.5], [0.0, fy, y0 + 0.5 * fy - 0.5], [0, 0, 1]])
            matrix = matrix @ to_source
            image = small
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def align_face(image: np.ndarray, box: np.ndarray | None = None, landmarks: np.ndarray | None = None,
               method: str = "similarity", size: int = TEMPLATE_SIZE,
               margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(chip, 2 x 3 matrix) of one face: landmarks onto the template ('similarity') or its square box ('box')."""
    if method == "similarity":
        if landmarks is None:
            raise AlignError("--align similarity needs the five landmarks")
        matrix = similarity_matrix(landmarks, size, margin)
    elif method == "box":
        if box is None:
            raise AlignError("--align box needs the box")
        matrix = box_matrix(box, size, margin)
    else:
        raise AlignError(f"align method must be one of {ALIGN_METHODS}, got {method!r}")
    return warp(image, matrix, size), matrix


def _check_size(size: int, margin: float) -> None:
    if int(size) != size or size < 8:
        raise AlignError(f"chip size must be a whole number of pixels, 8 or more; got {size!r}")
    if not 0 <= margin < size:
        raise AlignError(f"margin must be at least 0 and less than the chip size {size}, got {margin!r}")


__all__ = ["ALIGN_METHODS", "ARCFACE_TEMPLATE", "AlignError", "TEMPLATE_SIZE", "align_face", "box_matrix",
           "similarity_matrix", "template_points", "transform_points", "umeyama", "warp"]
