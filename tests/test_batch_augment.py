"""Per-batch flips and colour changes: targets follow the pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs.training.batch_augment import BatchAugmentConfig, augment_batch, flip_samples, jitter_colors
from jobs.training.schema import LANDMARK, NEGATIVE, POSITIVE
from jobs.training.trainer import TrainConfig

SIDE = 48
# Five dots, each its own colour, at asymmetric places: left eye, right eye, nose, mouth corners.
POINTS = np.array([[14.5, 17.5], [31.5, 15.5], [22.5, 26.5], [16.5, 36.5], [30.5, 37.5]])
COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]])
FACE = (6.0, 9.0, 40.0, 44.0)  # x1, y1, x2, y2 of a grey rectangle, continuous pixels


def _drawn_crop() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One crop: a face rectangle with coloured landmark dots, and its box and landmark targets."""
    image = np.zeros((SIDE, SIDE, 3), np.float32)
    x1, y1, x2, y2 = (int(v) for v in FACE)
    image[y1:y2, x1:x2] = 100.0
    for (x, y), colour in zip(POINTS, COLOURS):
        image[int(y), int(x)] = colour
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None]
    box = torch.tensor([[FACE[0] / SIDE, FACE[1] / SIDE, (FACE[2] - SIDE) / SIDE, (FACE[3] - SIDE) / SIDE]])
    marks = torch.from_numpy(np.concatenate([POINTS[:, 0], POINTS[:, 1]]) / SIDE).float()[None]
    return pixels, box, marks


def _face_columns(pixels: torch.Tensor) -> tuple[int, int]:
    """First and one-past-last column of the drawn face, found in the pixels."""
    columns = np.flatnonzero((pixels[0].sum(0) > 0).any(0).numpy())
    return int(columns[0]), int(columns[-1]) + 1


def test_a_flipped_crop_keeps_its_box_and_landmarks_on_the_pixels():
    pixels, box, marks = _drawn_crop()
    kinds = torch.tensor([LANDMARK])
    flipped, new_box, new_marks = flip_samples(pixels, kinds, box, marks, torch.tensor([True]))
    # The box targets decode to the columns where the face now is; rows are unchanged.
    left, right = _face_columns(flipped)
    assert new_box[0, 0].item() * SIDE == pytest.approx(left)
    assert new_box[0, 2].item() * SIDE + SIDE == pytest.approx(right)
    assert new_box[0, 1].item() == box[0, 1].item() and new_box[0, 3].item() == box[0, 3].item()
    # Every landmark label sits on a dot; "left eye" is now the dot that was the right eye
    # (the image-left one), and so on: labels name image sides, as the detector reports them.
    xs, ys = new_marks[0, :5].numpy() * SIDE, new_marks[0, 5:].numpy() * SIDE
    swapped = [1, 0, 2, 4, 3]
    for index in range(5):
        colour = flipped[0, :, int(ys[index]), int(xs[index])].numpy()
        assert np.array_equal(colour, COLOURS[swapped[index]]), index
    assert xs[0] < xs[1] and xs[3] < xs[4]


def test_only_chosen_crops_flip_and_only_landmark_samples_get_landmarks_moved():
    pixels, box, marks = _drawn_crop()
    pixels, box = pixels.repeat(3, 1, 1, 1), box.repeat(3, 1)
    marks = torch.cat([marks, torch.zeros(2, 10)])  # a negative and a positive carry no landmarks
    kinds = torch.tensor([LANDMARK, NEGATIVE, POSITIVE])
    chosen = torch.tensor([False, True, True])
    flipped, new_box, new_marks = flip_samples(pixels, kinds, box, marks, chosen)
    assert torch.equal(flipped[0], pixels[0]) and torch.equal(new_marks[0], marks[0])
    assert torch.equal(flipped[1], pixels[1].flip(-1))
    assert torch.equal(new_marks[1:], torch.zeros(2, 10))  # not turned into 1 - 0
    assert torch.equal(new_box[2], torch.stack([-box[2, 2], box[2, 1], -box[2, 0], box[2, 3]]))


def test_colour_jitter_stays_in_range_varies_per_crop_and_leaves_targets_alone():
    pixels, box, marks = _drawn_crop()
    pixels = (pixels.repeat(16, 1, 1, 1) + 20.0).clamp(max=255.0)  # no pure black anywhere
    kinds = torch.full((16,), LANDMARK)
    generator = torch.Generator().manual_seed(3)
    jittered, new_box, new_marks = augment_batch(pixels, kinds, box.repeat(16, 1), marks.repeat(16, 1),
                                                 BatchAugmentConfig(color_jitter=0.4), generator)
    assert torch.equal(new_box, box.repeat(16, 1)) and torch.equal(new_marks, marks.repeat(16, 1))
    assert jittered.min() >= 0 and jittered.max() <= 255
    means = jittered.mean(dim=(1, 2, 3))
    assert means.max() - means.min() > 5  # each crop got its own factors
    assert torch.allclose(jitter_colors(pixels.clone(), 0.0), pixels, atol=1e-3)  # strength 0: unchanged
    # Same seed, same draws: a resumed epoch sees the same batches.
    again = augment_batch(pixels, kinds, box.repeat(16, 1), marks.repeat(16, 1),
                          BatchAugmentConfig(color_jitter=0.4), torch.Generator().manual_seed(3))[0]
    assert torch.equal(again, jittered)


def test_flip_draws_about_half_and_bad_settings_are_refused():
    pixels, box, marks = _drawn_crop()
    pixels = pixels.repeat(400, 1, 1, 1)
    flipped, _, _ = augment_batch(pixels, torch.full((400,), LANDMARK), box.repeat(400, 1),
                                  marks.repeat(400, 1), BatchAugmentConfig(flip=True),
                                  torch.Generator().manual_seed(0))
    mirrored = (flipped != pixels).flatten(1).any(1).float().mean().item()
    assert 0.4 < mirrored < 0.6
    with pytest.raises(ValueError, match="color_jitter"):
        TrainConfig(stage="pnet", data="x", output="y", color_jitter=1.5)
    assert not BatchAugmentConfig().active
