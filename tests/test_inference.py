import pytest
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
