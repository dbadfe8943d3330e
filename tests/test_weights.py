import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mtcnn import FaceDetector
from mtcnn.nets import STAGES, build_stage
from mtcnn.weights import (WeightsError, convert_reference_state, load_weights,
                           reference_weights_path, save_weights)


def test_round_trip_keeps_tensors_heads_and_provenance(tmp_path):
    torch.manual_seed(1)
    stages = {"pnet": build_stage("pnet").eval(), "onet": build_stage("onet", False).eval()}
    path = tmp_path / "w.safetensors"
    save_weights(path, stages, {"trained_on": "unit test", "epochs": 3})
    loaded = load_weights(path)
    assert loaded.heads() == {"pnet": ["classifier", "box_regression", "landmarks"],
                              "onet": ["classifier", "box_regression"]}
    assert loaded.provenance == {"trained_on": "unit test", "epochs": 3}
    assert len(loaded.sha256) == 64
    x = torch.randn(2, 3, 48, 48)
    assert torch.equal(loaded.stages["onet"](x).face_logits, stages["onet"](x).face_logits)
    # A run folder resolves to its weights file.
    (tmp_path / "run").mkdir()
    save_weights(tmp_path / "run" / "weights.safetensors", stages)
    assert set(load_weights(tmp_path / "run").stages) == {"pnet", "onet"}


def test_reference_pnet_and_rnet_have_no_landmark_head():
    weights = load_weights("reference")
    assert weights.heads()["pnet"] == ["classifier", "box_regression"]
    assert weights.heads()["rnet"] == ["classifier", "box_regression"]
    assert weights.heads()["onet"] == ["classifier", "box_regression", "landmarks"]
    assert weights.stages["pnet"].landmarks is None
    assert "MIT" in weights.provenance["license"]
    notice = reference_weights_path().with_name("REFERENCE_WEIGHTS_NOTICE.txt").read_text()
    for digest in weights.provenance["source_sha256"].values():
        assert digest in notice


def test_header_claiming_a_head_without_its_tensors_is_refused(tmp_path):
    # Never fill a missing head with random weights: the header and tensors must agree.
    stage = build_stage("onet", has_landmarks=False)
    tensors = {f"onet.{k}": v.contiguous() for k, v in stage.state_dict().items()}
    metadata = {"format": "mtcnn-cascade", "format_version": "1",
                "heads": json.dumps({"onet": ["classifier", "box_regression", "landmarks"]}),
                "provenance": "{}"}
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(WeightsError, match="missing"):
        load_weights(tmp_path / "bad.safetensors")


def test_detector_refuses_an_onet_without_landmarks(tmp_path):
    reference = load_weights("reference")
    stages = dict(reference.stages, onet=build_stage("onet", has_landmarks=False))
    save_weights(tmp_path / "w.safetensors", stages)
    with pytest.raises(ValueError, match="landmark"):
        FaceDetector(weights=tmp_path / "w.safetensors")


def test_pickles_and_foreign_files_are_refused(tmp_path):
    torch.save({"x": torch.zeros(1)}, tmp_path / "model.pt")
    with pytest.raises(WeightsError):
        load_weights(tmp_path / "model.pt")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightsError, match="not an MTCNN"):
        load_weights(tmp_path / "other.safetensors")
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(tmp_path / "missing.safetensors")


def _reference_layout_forward(name, state, x):
    """The reference nets' forward pass, flattening the last feature map as (N, W, H, C)."""
    def prelu(t, key):
        return F.prelu(t, state[f"{key}.weight"])
    def conv(t, key):
        return F.conv2d(t, state[f"{key}.weight"], state[f"{key}.bias"])
    pool = dict(kernel_size=3, stride=2, ceil_mode=True)
    t = F.max_pool2d(prelu(conv(x, "conv1"), "prelu1"), **pool)
    t = F.max_pool2d(prelu(conv(t, "conv2"), "prelu2"), **pool)
    if name == "rnet":
        t = prelu(conv(t, "conv3"), "prelu3")
        dense, head = "dense4", "dense5_1"
    else:
        t = F.max_pool2d(prelu(conv(t, "conv3"), "prelu3"), kernel_size=2, stride=2, ceil_mode=True)
        t = prelu(conv(t, "conv4"), "prelu4")
        dense, head = "dense5", "dense6_1"
    t = t.permute(0, 3, 2, 1).reshape(len(t), -1)
    hidden = F.prelu(F.linear(t, state[f"{dense}.weight"], state[f"{dense}.bias"]),
                     state[f"prelu{4 if name == 'rnet' else 5}.weight"])
    return F.linear(hidden, state[f"{head}.weight"], state[f"{head}.bias"])


@pytest.mark.parametrize("name", ["rnet", "onet"])
def test_conversion_reorders_dense_inputs_from_whc(name):
    torch.manual_seed(2)
    shapes = {"rnet": {"conv1": (28, 3, 3, 3), "prelu1": (28,), "conv2": (48, 28, 3, 3),
                       "prelu2": (48,), "conv3": (64, 48, 2, 2), "prelu3": (64,),
                       "dense4": (128, 576), "prelu4": (128,), "dense5_1": (2, 128),
                       "dense5_2": (4, 128)},
              "onet": {"conv1": (32, 3, 3, 3), "prelu1": (32,), "conv2": (64, 32, 3, 3),
                       "prelu2": (64,), "conv3": (64, 64, 3, 3), "prelu3": (64,),
                       "conv4": (128, 64, 2, 2), "prelu4": (128,), "dense5": (256, 1152),
                       "prelu5": (256,), "dense6_1": (2, 256), "dense6_2": (4, 256),
                       "dense6_3": (10, 256)}}[name]
    state = {}
    for layer, shape in shapes.items():
        state[f"{layer}.weight"] = torch.randn(shape) * 0.2
        if not layer.startswith("prelu"):
            state[f"{layer}.bias"] = torch.randn(shape[0]) * 0.1
    stage = convert_reference_state(name, state)
    x = torch.randn(5, 3, STAGES[name].input_size, STAGES[name].input_size)
    expected = _reference_layout_forward(name, state, x)
    # Logits of random weights reach hundreds, their intermediates thousands: float32 sums in another
    # order (thread count, kernel choice) move them by up to ~5e-4. The wrong layout is off by far more.
    assert torch.allclose(stage(x).face_logits, expected, rtol=1e-5, atol=5e-3)
    # Loading the same tensors without reordering gives different answers: the trap is real.
    naive = build_stage(name, has_landmarks=name == "onet").eval()
    naive.load_state_dict(convert_reference_state(name, state).state_dict())
    naive.dense[1].weight.data = state[f"{'dense4' if name == 'rnet' else 'dense5'}.weight"]
    assert not torch.allclose(naive(x).face_logits, expected, atol=1e-2)


def test_the_shared_data_recipe_cascade_ships_with_its_recipe_and_figures():
    import cv2
    import yaml

    from mtcnn import FaceDetector

    weights = load_weights("shared-data-recipe")
    assert sorted(weights.stages) == ["onet", "pnet", "rnet"]
    provenance = weights.provenance
    # The header's config is the shipped recipe's: same data and stage settings.
    shipped = yaml.safe_load((Path(__file__).parents[1] / "configs" / "shared-data.yaml").read_text())
    assert yaml.safe_load(provenance["config_yaml"]) == shipped
    assert provenance["stages"]["onet"]["config"]["epochs"] == shipped["stages"]["onet"]["epochs"]
    assert set(provenance["evaluation"]["wider"]["ap"]) == {"easy", "medium", "hard"}
    image = cv2.cvtColor(cv2.imread(str(Path(__file__).parent / "data" / "astronaut.png")), cv2.COLOR_BGR2RGB)
    found = FaceDetector(weights="shared-data-recipe").detect([image])[0]
    assert len(found) >= 1 and found.scores.max() > 0.9
