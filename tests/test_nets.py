import pytest
import torch

from mtcnn.nets import STAGES, ONet, PNet, RNet, build_stage


@pytest.mark.parametrize("name", ["pnet", "rnet", "onet"])
def test_stage_outputs_one_prediction_per_window(name):
    stage = build_stage(name).eval()
    size = STAGES[name].input_size
    out = stage(torch.zeros(3, 3, size, size))
    assert out.face_logits.shape[:2] == (3, 2)
    assert out.box_offsets.shape[:2] == (3, 4)
    assert out.landmarks.shape[:2] == (3, 10)
    assert out.face_probability().shape[0] == 3


def test_pnet_is_fully_convolutional_with_stride_two():
    out = PNet().eval()(torch.zeros(1, 3, 40, 30))
    # (40 - 12) / 2 + 1 = 15 rows, (30 - 12) / 2 + 1 = 10 columns of 12x12 windows.
    assert out.face_logits.shape == (1, 2, 15, 10)


@pytest.mark.parametrize("cls", [PNet, RNet, ONet])
def test_landmark_head_is_explicit(cls):
    stage = cls(has_landmarks=False).eval()
    assert stage.landmarks is None and stage.heads == ("classifier", "box_regression")
    size = STAGES[stage.name].input_size
    assert stage(torch.zeros(1, 3, size, size)).landmarks is None
    assert not any(key.startswith("landmarks") for key in stage.state_dict())


@pytest.mark.parametrize("cls", [RNet, ONet])
def test_dropout_only_in_training(cls):
    torch.manual_seed(0)
    stage = cls(dropout=0.5)
    size = STAGES[stage.name].input_size
    x = torch.randn(4, 3, size, size)
    stage.train()
    assert not torch.equal(stage(x).face_logits, stage(x).face_logits)
    stage.eval()
    assert torch.equal(stage(x).face_logits, stage(x).face_logits)
