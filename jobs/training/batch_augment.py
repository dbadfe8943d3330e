"""Random mirror images and colour changes of training batches, with their targets kept in step.

Prepare-time augmentation (augment.py) fixes each crop once; these transforms are drawn afresh
every time a crop is seen, so over the epochs a net meets each sample in both orientations and
under many lightings, at almost no cost (a few tensor operations per batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtcnn.box_coder import flip_targets

from jobs.training.schema import LANDMARK


@dataclass(frozen=True)
class BatchAugmentConfig:
    """What training changes in each batch; all off by default (the paper trains without them)."""

    #: Mirror each crop left-right with probability 0.5.
    flip: bool = False
    #: Brightness, contrast and saturation each scaled by a factor drawn from
    #: [1 - color_jitter, 1 + color_jitter] per crop; 0 leaves colours alone.
    color_jitter: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.color_jitter < 1.0:
            raise ValueError(f"color_jitter must be in [0, 1), got {self.color_jitter!r}")

    @property
    def active(self) -> bool:
        """Whether any transform is on."""
        return self.flip or self.color_jitter > 0


def flip_samples(pixels: torch.Tensor, kinds: torch.Tensor, boxes: torch.Tensor,
                 landmarks: torch.Tensor, chosen: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mirror the chosen (N,) crops of (N, C, S, S) pixels left-right, with their targets."""
    pixels = torch.where(chosen[:, None, None, None], pixels.flip(-1), pixels)
    mirrored_boxes, mirrored_marks = flip_targets(boxes, landmarks)
    boxes = torch.where(chosen[:, None], mirrored_boxes, boxes)
    # Only landmark samples carry landmarks (the others' zeros stay zeros).
    with_marks = chosen & (kinds == LANDMARK)
    landmarks = torch.where(with_marks[:, None], mirrored_marks, landmarks)
    return pixels, boxes, landmarks


def jitter_colors(pixels: torch.Tensor, strength: float, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """(N, 3, S, S) RGB pixels in [0, 255] with random brightness, contrast and saturation.

    Random numbers come from `generator` (a CPU one), so a seeded run draws the same on any device.
    """
    count = pixels.shape[0]

    def factors() -> torch.Tensor:
        drawn = torch.rand(count, 1, 1, 1, generator=generator).to(pixels.device)
        return 1.0 + strength * (2.0 * drawn - 1.0)

    # ITU-R BT.601 luma, the grey that saturation and contrast move away from or towards.
    luma = torch.tensor([0.299, 0.587, 0.114], device=pixels.device, dtype=pixels.dtype)
    pixels = pixels * factors()
    grey = (pixels * luma[None, :, None, None]).sum(dim=1, keepdim=True)
    pixels = grey + (pixels - grey) * factors()
    mean = grey.mean(dim=(2, 3), keepdim=True)
    pixels = mean + (pixels - mean) * factors()
    return pixels.clamp_(0.0, 255.0)


def augment_batch(pixels: torch.Tensor, kinds: torch.Tensor, boxes: torch.Tensor,
                  landmarks: torch.Tensor, config: BatchAugmentConfig,
                  generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch's (N, 3, S, S) float pixels and targets under random flips and colour changes."""
    if config.flip:
        chosen = (torch.rand(pixels.shape[0], generator=generator) < 0.5).to(pixels.device)
        pixels, boxes, landmarks = flip_samples(pixels, kinds, boxes, landmarks, chosen)
    if config.color_jitter > 0:
        pixels = jitter_colors(pixels, config.color_jitter, generator)
    return pixels, boxes, landmarks
