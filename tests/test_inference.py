from pathlib import Path

import pytest
import torch

from mtcnn.inference import ChannelsLastPReLU, MaxPool2x2, ProposalNet, WindowNet
from mtcnn.nets import STAGES, build_stage
from mtcnn.weights import load_weights


def test_inference_forms_give_the_stages_outputs():
    stages = load_weights("reference").stages
    torch.manual_seed(0)
    with torch.inference_mode():
        pixels = torch.randint(0, 256, (2, 3, 40, 52)).float()
        features, logits = ProposalNet(stages["pnet"])(pixels)
        plain = stages["pnet"](pixels / 128.0 - 127.5 / 128.0)
        assert torch.allclose(torch.sigmoid(logits), plain.face_probability(), atol=1e-5)
        for name in ("rnet", "onet"):
            size = STAGES[name].input_size
            pixels = torch.randint(0, 256, (6, 3, size, size)).float()
            probability, offsets, landmarks = WindowNet(stages[name])(pixels)
            plain = stages[name](pixels / 128.0 - 127.5 / 128.0)
            assert torch.allclose(probability, plain.face_probability(), atol=1e-5)
            assert torch.allclose(offsets, plain.box_offsets, atol=1e-5)
            if name == "onet":
                assert torch.allclose(landmarks, plain.landmarks, atol=1e-5)
            else:
                assert landmarks is None


def test_window_net_keeps_a_landmark_head_it_was_given():
    stage = build_stage("rnet", has_landmarks=True).eval()
    with torch.inference_mode():
        _, _, landmarks = WindowNet(stage)(torch.zeros(3, 3, 24, 24))
    assert landmarks.shape == (3, 10)


def test_prepacked_window_nets_give_the_same_outputs():
    stages = load_weights("reference").stages
    torch.manual_seed(1)
    with torch.inference_mode():
        for name in ("rnet", "onet"):
            size = STAGES[name].input_size
            pixels = torch.randint(0, 256, (5, 3, size, size)).float().contiguous(
                memory_format=torch.channels_last)
            eager = WindowNet(stages[name]).eval()
            packed = WindowNet(stages[name]).eval().prepack_for_cpu()
            for got, want in zip(packed(pixels), eager(pixels)):
                if want is None:
                    assert got is None
                else:
                    assert torch.allclose(got, want, atol=1e-5)


def test_prepacking_falls_back_to_the_eager_body(monkeypatch):
    from torch.utils import mkldnn

    def unavailable(module, dtype=torch.float32):
        raise RuntimeError("oneDNN is not built into this torch")

    monkeypatch.setattr(mkldnn, "to_mkldnn", unavailable)
    stages = load_weights("reference").stages
    net = WindowNet(stages["rnet"]).eval().prepack_for_cpu()
    with torch.inference_mode():
        probability, _, _ = net(torch.zeros(2, 3, 24, 24))
    assert probability.shape == (2,) and net._onednn_dtype is None
    # bf16 falls back to eager bf16, P-Net too.
    assert WindowNet(stages["onet"]).prepack_for_cpu(torch.bfloat16)._bfloat16
    pnet = ProposalNet(stages["pnet"]).prepack_for_cpu(torch.bfloat16)
    assert pnet._onednn_dtype is None and pnet._body_dtype == torch.bfloat16


def test_cpu_prelu_and_pooling_forms_give_identical_values():
    torch.manual_seed(2)
    pool = torch.nn.MaxPool2d(2, 2, ceil_mode=True)
    with torch.inference_mode():
        for channels, height, width in ((10, 31, 47), (10, 30, 46), (16, 9, 8), (3, 1, 1)):
            prelu = torch.nn.PReLU(channels)
            prelu.weight.uniform_(-1.5, 1.5)
            fast = ChannelsLastPReLU(prelu)
            x = torch.randn(2, channels, height, width)
            for layout in (torch.channels_last, torch.contiguous_format):
                x = x.contiguous(memory_format=layout)
                assert torch.equal(fast(x), prelu(x))
                pooled = MaxPool2x2()(x)
                assert torch.equal(pooled, pool(x))
                assert pooled.is_contiguous(memory_format=layout)


def test_proposal_net_with_cpu_kernels_matches_the_plain_one():
    pnet = load_weights("reference").stages["pnet"]
    plain = ProposalNet(pnet).to(memory_format=torch.channels_last).eval()
    fast = ProposalNet(pnet).to(memory_format=torch.channels_last).eval().use_cpu_kernels()
    assert any(isinstance(m, MaxPool2x2) for m in fast.body)
    assert any(isinstance(m, ChannelsLastPReLU) for m in fast.body)
    torch.manual_seed(3)
    with torch.inference_mode():
        for height, width in ((37, 53), (40, 52)):
            pixels = torch.randint(0, 256, (1, 3, height, width)).float()
            pixels = pixels.contiguous(memory_format=torch.channels_last)
            for got, expected in zip(fast(pixels), plain(pixels)):
                assert torch.equal(got, expected)


@pytest.mark.parametrize("prepacked", [False, True])
def test_bfloat16_nets_stay_close_to_fp32(prepacked):
    # Eager bf16 (GPUs) and oneDNN's prepacked bf16 modules (CPUs): rounded, not wrong.
    stages = load_weights("reference").stages
    torch.manual_seed(2)
    with torch.inference_mode():
        pixels = torch.randint(0, 256, (2, 3, 40, 52)).float().contiguous(memory_format=torch.channels_last)
        features, exact = ProposalNet(stages["pnet"])(pixels)
        pnet = ProposalNet(stages["pnet"])
        rounded_features, rounded = (pnet.prepack_for_cpu(torch.bfloat16) if prepacked else pnet.use_bfloat16())(pixels)
        assert rounded.dtype == torch.float32 and rounded_features.shape == features.shape
        assert (torch.sigmoid(rounded) - torch.sigmoid(exact)).abs().max() < 0.05
        assert (rounded_features - features).abs().max() < 0.05 * features.abs().max()
        for name in ("rnet", "onet"):
            size = STAGES[name].input_size
            pixels = torch.randint(0, 256, (6, 3, size, size)).float().contiguous(memory_format=torch.channels_last)
            net = WindowNet(stages[name])
            net = net.prepack_for_cpu(torch.bfloat16) if prepacked else net.use_bfloat16()
            for got, want in zip(net(pixels), WindowNet(stages[name])(pixels)):
                if want is None:
                    assert got is None
                else:
                    assert got.dtype == torch.float32 and (got - want).abs().max() < 0.05
                    assert not torch.equal(got, want)  # bf16 really ran


def test_float16_forms_stay_close_to_fp32():
    # The arithmetic of precision="fp16" on GPUs: eager float16 bodies, fp32 heads. Run here on the
    # CPU, whose float16 convolutions give the same roundings up to accumulation order.
    torch.manual_seed(3)
    stages = load_weights("reference").stages
    pixels = torch.rand(2, 3, 48, 48) * 255
    with torch.inference_mode():
        _, exact = ProposalNet(stages["pnet"]).eval()(pixels)
        _, rounded = ProposalNet(stages["pnet"]).eval().use_reduced(torch.float16)(pixels)
        assert rounded.dtype == torch.float32 and (rounded - exact).abs().max() < 0.05
        for name, size in (("rnet", 24), ("onet", 48)):
            window = pixels[:, :, :size, :size].contiguous()
            exact = WindowNet(stages[name]).eval()(window)
            rounded = WindowNet(stages[name]).eval().use_reduced(torch.float16)(window)
            assert (rounded[0] - exact[0]).abs().max() < 1e-3 and (rounded[1] - exact[1]).abs().max() < 1e-2


def test_cpu_flags_say_whether_bf16_is_native():
    from mtcnn.cpu import cpu_flags, cpu_model, has_native_bf16, speed_flags

    assert cpu_model()
    flags = cpu_flags()
    if Path("/proc/cpuinfo").exists():
        assert flags, "Linux lists the CPU's flags in /proc/cpuinfo"
    assert has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)
    assert speed_flags()["avx512_bf16"] == ("avx512_bf16" in flags)
