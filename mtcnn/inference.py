"""Inference-time forms of the stages: pixel normalisation folded in, heads fused into one GEMM.

Both rewrites are exact algebra on a trained stage; they only save memory passes and kernel calls.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .nets import PIXEL_MEAN, PIXEL_SCALE, PNet


def fold_normalization(body: nn.Sequential) -> nn.Sequential:
    """A copy of a conv body that takes raw 0-255 pixels: normalize_pixels folded into conv1."""
    folded = copy.deepcopy(body)
    conv = folded[0]
    with torch.no_grad():
        # No padding in any stage, so the fold is exact at every output position.
        conv.bias -= PIXEL_MEAN * PIXEL_SCALE * conv.weight.sum(dim=(1, 2, 3))
        conv.weight *= PIXEL_SCALE
    return folded


def _face_direction(classifier_weight: torch.Tensor, classifier_bias: torch.Tensor):
    """Weights and bias of the face-minus-background logit: softmax(l)[1] == sigmoid(l1 - l0)."""
    weight = classifier_weight.reshape(2, -1)
    return weight[1] - weight[0], classifier_bias[1] - classifier_bias[0]


def onednn_body(body: nn.Sequential, dtype: torch.dtype) -> nn.Sequential | None:
    """The conv body with its weights held in oneDNN's own layout and dtype (CPU only), or None where torch cannot."""
    try:
        with warnings.catch_warnings():
            # Its modules are TorchScript ones, which torch now flags as deprecated.
            warnings.simplefilter("ignore", DeprecationWarning)
            from torch.utils import mkldnn

            return mkldnn.to_mkldnn(body, dtype)
    except Exception:  # noqa: BLE001 - an optimisation only; eager is always correct
        return None


def prepack_body(net, dtype: torch.dtype):
    """Give net (P-, R- or O-Net) a oneDNN-prepacked body in dtype; where torch cannot, bf16 runs eager and fp32 stays."""
    packed = onednn_body(net.body, dtype)
    if packed is None:
        return net.use_bfloat16() if dtype == torch.bfloat16 else net
    net.body, net._onednn_dtype = packed, dtype
    return net


class ChannelsLastPReLU(nn.Module):
    """PReLU that stays fast on channels_last activations with few channels (same values).

    torch's channels_last PReLU takes a slow scalar path when the channel count is not a multiple
    of its vector width (P-Net's conv1 has 10): about 4x slower than on 16 channels. Viewing the
    activations as rows of whole image rows, with the slopes repeated, gives the vectorised path
    the same per-element arithmetic.
    """

    def __init__(self, prelu: nn.PReLU) -> None:
        super().__init__()
        self.register_buffer("weight", prelu.weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """PReLU of an (N, C, H, W) tensor."""
        channels = x.shape[1]
        if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last) or channels % 8 == 0:
            return F.prelu(x, self.weight)
        # One image row (W pixels of C channels) per vector row: W always divides the pixels.
        nhwc = x.permute(0, 2, 3, 1)
        width = x.shape[3]
        rows = F.prelu(nhwc.reshape(-1, width * channels), self.weight.repeat(width))
        return rows.reshape(nhwc.shape).permute(0, 3, 1, 2)


class MaxPool2x2(nn.Module):
    """Max-pooling over 2 x 2 windows with stride 2, ceil mode (partial windows at the far edges).

    The same values as nn.MaxPool2d(2, 2, ceil_mode=True) as the elementwise maximum of four
    strided views: about 3x faster on CPUs, where the pooling kernel also computes indices.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled (N, C, ceil(H / 2), ceil(W / 2)) tensor, in x's memory format."""
        rows, cols = x.shape[2] // 2, x.shape[3] // 2
        out = x[:, :, 0::2, 0::2].clone()
        out[:, :, :, :cols].clamp_min_(x[:, :, 0::2, 1::2])
        out[:, :, :rows, :].clamp_min_(x[:, :, 1::2, 0::2])
        out[:, :, :rows, :cols].clamp_min_(x[:, :, 1::2, 1::2])
        return out


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
        self._body_dtype = torch.float32
        self._onednn_dtype: torch.dtype | None = None

    def use_bfloat16(self) -> "ProposalNet":
        """Run the conv body in bfloat16 (faster where the CPU or GPU has bf16 units); heads stay fp32."""
        return self.use_reduced(torch.bfloat16)

    def use_reduced(self, dtype: torch.dtype) -> "ProposalNet":
        """Run the conv body in dtype (bfloat16, or float16 on GPUs); heads stay fp32."""
        self.body = self.body.to(dtype)
        self._body_dtype = dtype
        return self

    def prepack_for_cpu(self, dtype: torch.dtype = torch.bfloat16) -> "ProposalNet":
        """The conv body through oneDNN's prepacked modules in dtype (CPU only); heads stay fp32.

        In bf16 about 1.9x faster than fp32 on a 720p level of an AVX-512 BF16 CPU, where eager
        bf16 is slower (torch's bf16 PReLU and pooling take scalar paths). In fp32 it measured
        slower than use_cpu_kernels, which the detector uses there. Where torch cannot prepack,
        bf16 runs eager (same values, slower) and fp32 stays as it is.
        """
        return prepack_body(self, dtype)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (N, H, W, 32) and face logits (N, H, W) for a batch of 0-255 images."""
        # The face and box heads are one small GEMM each: kept in fp32, so only the body rounds.
        if self._onednn_dtype is not None:
            # oneDNN hands back plain NCHW: one copy to NHWC for the heads.
            out = self.body(pixels.to_mkldnn(self._onednn_dtype)).to_dense(torch.float32)
            features = out.permute(0, 2, 3, 1).contiguous()
        else:
            features = self.body(pixels.to(self._body_dtype)).permute(0, 2, 3, 1).float()  # free in NHWC
        logits = (features.reshape(-1, features.shape[-1]) @ self.face_weight).reshape(
            features.shape[:3]) + self.face_bias
        return features, logits

    def use_cpu_kernels(self) -> "ProposalNet":
        """Swap in PReLU and max-pooling forms that are faster on CPUs (same results)."""
        for index, module in enumerate(self.body):
            if isinstance(module, nn.PReLU):
                self.body[index] = ChannelsLastPReLU(module)
            elif (isinstance(module, nn.MaxPool2d) and module.kernel_size in (2, (2, 2))
                  and module.stride in (2, (2, 2)) and module.padding in (0, (0, 0))
                  and module.dilation in (1, (1, 1)) and module.ceil_mode):
                self.body[index] = MaxPool2x2()
        return self

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
        self._onednn_dtype: torch.dtype | None = None
        #: dtype of the eager body and dense layer when reduced (bf16, or fp16 on GPUs).
        self._reduced_dtype: torch.dtype | None = None

    @property
    def _bfloat16(self) -> bool:
        return self._reduced_dtype == torch.bfloat16

    def use_bfloat16(self) -> "WindowNet":
        """Run the conv body and dense layer in bfloat16; the fused head GEMM stays fp32."""
        return self.use_reduced(torch.bfloat16)

    def use_reduced(self, dtype: torch.dtype) -> "WindowNet":
        """Run the conv body and dense layer in dtype (bfloat16, or float16 on GPUs); the head stays fp32."""
        self.body = self.body.to(dtype)
        self.dense = self.dense.to(dtype)
        self._onednn_dtype = None
        self._reduced_dtype = dtype
        return self

    def prepack_for_cpu(self, dtype: torch.dtype = torch.float32) -> "WindowNet":
        """Hold the conv body's weights in oneDNN's own layout, in fp32 or bf16 (CPU only, after moving there).

        Eager convolutions re-lay out their weights on every call; R-Net runs in many small
        chunks per image, so keeping them prepacked makes it about 12% faster on one thread.
        In bf16 the prepacked body is 1.6x (R-Net) and 1.9x (O-Net) faster than fp32 on AVX-512
        BF16 CPUs, where eager bf16 is slower (scalar bf16 PReLU and pooling). The dense layer
        and heads stay fp32. Where torch cannot prepack, fp32 stays eager (same results, a little
        slower) and bf16 runs eager.
        """
        return prepack_body(self, dtype)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Face probability (N,), box offsets (N, 4) and landmarks (N, 10) or None."""
        if self._reduced_dtype is not None:
            dense = self.dense(self.body(pixels.to(self._reduced_dtype))).float()
        elif self._onednn_dtype is not None:
            dense = self.dense(self.body(pixels.to_mkldnn(self._onednn_dtype)).to_dense(torch.float32))
        else:
            dense = self.dense(self.body(pixels))
        out = torch.addmm(self.head_bias, dense, self.head_weight)
        landmarks = out[:, 5:] if out.shape[1] > 5 else None
        return torch.sigmoid(out[:, 0]), out[:, 1:5], landmarks
