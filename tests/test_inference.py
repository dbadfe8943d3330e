import torch

from mtcnn.inference import ProposalNet, WindowNet
from mtcnn.nets import INPUT_SIZE, build_stage
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
            size = INPUT_SIZE[name]
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
            size = INPUT_SIZE[name]
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

    def unavailable(module):
        raise RuntimeError("oneDNN is not built into this torch")

    monkeypatch.setattr(mkldnn, "to_mkldnn", unavailable)
    stage = load_weights("reference").stages["rnet"]
    net = WindowNet(stage).eval().prepack_for_cpu()
    with torch.inference_mode():
        probability, _, _ = net(torch.zeros(2, 3, 24, 24))
    assert probability.shape == (2,) and not net._onednn_body
