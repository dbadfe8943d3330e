"""Inference-time forms of the stages: pixel normalisation folded in, heads fused into one GEMM.

Both rewrites are exact algebra on a trained stage; they only save memory passes and kernel calls.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .nets import PNet


def fold_normalization(body: nn.Sequential) -> nn.Sequential:
    """A copy of a conv body that takes raw 0-255 pixels: (x - 127.5) / 128 folded into conv1."""
    folded = copy.deepcopy(body)
    conv = folded[0]
    with torch.no_grad():
        # No padding in any stage, so the fold is exact at every output position.
        conv.bias -= 127.5 * 0.0078125 * conv.weight.sum(dim=(1, 2, 3))
        conv.weight *= 0.0078125
    return folded


def _face_direction(classifier_weight: torch.Tensor, classifier_bias: torch.Tensor):
    """Weights and bias of the face-minus-background logit: softmax(l)[1] == sigmoid(l1 - l0)."""
    weight = classifier_weight.reshape(2, -1)
    return weight[1] - weight[0], classifier_bias[1] - classifier_bias[0]


class ProposalNet(nn.Module):
    """P-Net for detection: face logit everywhere, box offsets only where asked."""

    def __init__(self, pnet: PNet) -> None:
        super().__init__()
        self.body = fold_normalization(pnet.body)
        direction, bias = _face_direction(pnet.classifier.weight.detach(), pnet.classifier.bias.detach())
        self.register_buffer("face_weight", direction[:, None].clone())
        self.register_buffer("face_bias", bias.clone())
        self.register_buffer("box_weight", pnet.box_regression.weight.detach().reshape(4, -1).t().clone())
        self.register_buffer("box_bias", pnet.box_regression.bias.detach().clone())

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (N, H, W, 32) and face logits (N, H, W) for a batch of 0-255 images."""
        features = self.body(pixels).permute(0, 2, 3, 1)  # a free view in channels_last
        logits = (features.reshape(-1, features.shape[-1]) @ self.face_weight).reshape(
            features.shape[:3]) + self.face_bias
        return features, logits

    def box_offsets(self, features: torch.Tensor) -> torch.Tensor:
        """Box offsets (K, 4) for (K, 32) feature vectors."""
        return torch.addmm(self.box_bias, features, self.box_weight)


class WindowNet(nn.Module):
    """R-Net or O-Net for detection: one GEMM computes the face logit, offsets and landmarks."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.body = fold_normalization(stage.body)
        self.dense = copy.deepcopy(stage.dense)
        direction, bias = _face_direction(stage.classifier.weight.detach(), stage.classifier.bias.detach())
        weights = [direction[None], stage.box_regression.weight.detach()]
        biases = [bias[None], stage.box_regression.bias.detach()]
        if stage.landmarks is not None:
            weights.append(stage.landmarks.weight.detach())
            biases.append(stage.landmarks.bias.detach())
        self.register_buffer("head_weight", torch.cat(weights).t().contiguous())
        self.register_buffer("head_bias", torch.cat(biases))
        self._onednn_body = False

    def prepack_for_cpu(self) -> "WindowNet":
        """Hold the conv body's weights in oneDNN's own layout (CPU only, after moving there).

        Eager convolutions re-lay out their weights on every call; R-Net runs in many small
        chunks per image, so keeping them prepacked makes it about 12% faster on one thread.
        Where torch cannot do it, the body stays as it is (same results, a little slower).
        """
        try:
            with warnings.catch_warnings():
                # Its modules are TorchScript ones, which torch now flags as deprecated.
                warnings.simplefilter("ignore", DeprecationWarning)
                from torch.utils import mkldnn

                self.body = mkldnn.to_mkldnn(self.body)
        except Exception:  # noqa: BLE001 - an optimisation only; eager is always correct
            return self
        self._onednn_body = True
        return self

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Face probability (N,), box offsets (N, 4) and landmarks (N, 10) or None."""
        if self._onednn_body:
            features = self.body(pixels.to_mkldnn()).to_dense()
        else:
            features = self.body(pixels)
        out = torch.addmm(self.head_bias, self.dense(features), self.head_weight)
        landmarks = out[:, 5:] if out.shape[1] > 5 else None
        return torch.sigmoid(out[:, 0]), out[:, 1:5], landmarks
