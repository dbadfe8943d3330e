"""Ray Train on real samples: loss falls, weights load, checkpoints resume, failures recover."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from jobs.training.trainer import TrainConfig, train_stage
from mtcnn.detector import FaceDetector
from mtcnn.weights import load_weights

DATA = Path(__file__).parents[2] / "shared" / "data"
WIDER = DATA / "wider_face_train_small"
FACEPOINT = DATA / "cnn_facepoint_5pt"
NEGATIVE, POSITIVE, PART, LANDMARK = 0, 1, 2, 3


def _wider_faces(limit_images: int) -> list[tuple[Path, np.ndarray]]:
    """(image path, (N, 4) x1 y1 x2 y2 boxes of faces at least 24 px) from the WIDER gt file."""
    lines = (WIDER / "wider_face_train_bbx_gt.txt").read_text().splitlines()
    out, i = [], 0
    while i < len(lines) and len(out) < limit_images:
        name, count = lines[i], int(lines[i + 1])
        rows = [list(map(int, r.split()[:4])) for r in lines[i + 2:i + 2 + max(count, 1)]]
        i += 2 + max(count, 1)
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in rows if min(w, h) >= 24], np.float32)
        if len(boxes):
            out.append((WIDER / "images" / name, boxes))
    return out


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    w = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = w * h
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(boxes) - inter)


def _crop(image: np.ndarray, x: int, y: int, side: int, size: int) -> bytes:
    return cv2.resize(image[y:y + side, x:x + side], (size, size),
                      interpolation=cv2.INTER_AREA).tobytes()


def write_tiny_shards(folder: Path, size: int = 12, per_image: int = 6, seed: int = 0) -> int:
    """Real crops labelled by IoU (and landmark crops) in the shard schema; returns the count."""
    rng = np.random.default_rng(seed)
    rows = {k: [] for k in ("image", "size", "kind", "box", "landmarks", "source", "stage")}

    def add(pixels: bytes, kind: int, box, marks, source: str) -> None:
        rows["image"].append(pixels)
        rows["size"].append(size)
        rows["kind"].append(kind)
        rows["box"].append([float(v) for v in box])
        rows["landmarks"].append([float(v) for v in marks])
        rows["source"].append(source)
        rows["stage"].append({12: "pnet", 24: "rnet", 48: "onet"}[size])

    for path, faces in _wider_faces(40):
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        height, width = image.shape[:2]
        for face in faces[:per_image]:
            w, h = face[2] - face[0], face[3] - face[1]
            for _ in range(3):  # positives and parts: the face jittered
                side = int(max(w, h) * rng.uniform(0.85, 1.2))
                x = int(face[0] + w / 2 - side / 2 + rng.uniform(-0.2, 0.2) * w)
                y = int(face[1] + h / 2 - side / 2 + rng.uniform(-0.2, 0.2) * h)
                if x < 0 or y < 0 or x + side > width or y + side > height or side < 12:
                    continue
                crop = np.array([x, y, x + side, y + side], np.float32)
                iou = _iou(crop, faces).max()
                if iou < 0.4:
                    continue
                kind = POSITIVE if iou > 0.65 else PART
                add(_crop(image, x, y, side, size), kind, (face - crop) / side, [0] * 10, path.name)
        for _ in range(per_image * 2):  # negatives: random squares away from every face
            side = int(rng.uniform(12, min(height, width) / 2))
            x, y = int(rng.uniform(0, width - side)), int(rng.uniform(0, height - side))
            crop = np.array([x, y, x + side, y + side], np.float32)
            if _iou(crop, faces).max() < 0.3:
                add(_crop(image, x, y, side, size), NEGATIVE, [0] * 4, [0] * 10, path.name)
    for line in (FACEPOINT / "trainImageList.txt").read_text().splitlines()[:120]:
        parts = line.split()
        image = cv2.cvtColor(cv2.imread(str(FACEPOINT / parts[0])), cv2.COLOR_BGR2RGB)
        x1, x2, y1, y2 = map(int, parts[1:5])
        points = np.array(parts[5:], np.float32).reshape(5, 2)
        side = min(x2 - x1, y2 - y1)
        marks = np.concatenate([(points[:, 0] - x1) / side, (points[:, 1] - y1) / side])
        add(_crop(image, x1, y1, side, size), LANDMARK, [0] * 4, marks, parts[0])

    # Written kind by kind in two files, as a prepare job would: the trainer must mix them.
    order = np.argsort(rows["kind"], kind="stable")
    schema = pa.schema([("image", pa.binary()), ("size", pa.int16()), ("kind", pa.int8()),
                        ("box", pa.list_(pa.float32(), 4)), ("landmarks", pa.list_(pa.float32(), 10)),
                        ("source", pa.string()), ("stage", pa.string())])
    table = pa.table({k: [v[i] for i in order] for k, v in rows.items()}, schema=schema)
    folder.mkdir(parents=True, exist_ok=True)
    half = table.num_rows // 2
    pq.write_table(table.slice(0, half), folder / "part-0.parquet")
    pq.write_table(table.slice(half), folder / "part-1.parquet")
    return table.num_rows


@pytest.fixture(scope="session")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def pnet_shards(tmp_path_factory) -> tuple[Path, int]:
    folder = tmp_path_factory.mktemp("shards") / "pnet"
    return folder, write_tiny_shards(folder)


def _config(shards: Path, output: Path, **overrides) -> TrainConfig:
    settings = dict(stage="pnet", data=str(shards), output=str(output), epochs=3, batch_size=64,
                    learning_rate=3e-3, num_workers=2, cpus_per_worker=0.5, log_every=0)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_two_workers_loss_falls_and_weights_load_into_the_detector(ray_session, pnet_shards, tmp_path):
    shards, count = pnet_shards
    assert count >= 300
    summary = train_stage(_config(shards, tmp_path / "run", epochs=4, previous_weights="reference"))
    losses = [m["loss"] for m in summary.history]
    assert len(losses) == 4 and summary.samples == count
    # Each worker gets an equal share: at most num_workers - 1 samples are left out per epoch.
    assert all(count - 1 <= m["samples"] <= count for m in summary.history)
    assert losses[-1] < 0.8 * losses[0], losses
    assert summary.metrics["accuracy"] > 0.7

    weights = load_weights(tmp_path / "run")  # the run folder resolves to weights.safetensors
    assert sorted(weights.stages) == ["onet", "pnet", "rnet"]
    assert weights.provenance["epochs"] == 4 and weights.provenance["stage"] == "pnet"
    assert weights.provenance["final_metrics"]["loss"] == pytest.approx(losses[-1], rel=1e-4)
    assert weights.provenance["previous"]["name"] == "reference"
    reference = load_weights("reference")
    # The trained P-Net replaced the reference's; R- and O-Net came through unchanged.
    assert not np.allclose(weights.stages["pnet"].classifier.weight.detach(),
                           reference.stages["pnet"].classifier.weight.detach())
    assert all(np.array_equal(a.detach(), b.detach()) for a, b in
               zip(weights.stages["onet"].parameters(), reference.stages["onet"].parameters()))
    image = cv2.cvtColor(cv2.imread(str(Path(__file__).parent / "data" / "astronaut.png")),
                         cv2.COLOR_BGR2RGB)
    detections = FaceDetector(weights=str(tmp_path / "run")).detect([image])
    assert len(detections) == 1 and detections[0].boxes.shape[1] == 4


def test_a_failing_worker_is_recovered_from_the_last_checkpoint(ray_session, pnet_shards, tmp_path):
    shards, _ = pnet_shards
    summary = train_stage(_config(shards, tmp_path / "run", epochs=2, inject_failure_at_epoch=1,
                                  max_failures=1))
    assert (tmp_path / "run" / ".injected-failure-pnet").exists()  # it did fail once
    assert [m["epoch"] for m in summary.history] == [0, 1]
    assert summary.metrics["resumed_from_epoch"] == 1  # restarted from epoch 0's checkpoint
    assert (tmp_path / "run" / "weights.safetensors").is_file()


@pytest.fixture()
def s3_endpoint(monkeypatch):
    from moto.server import ThreadedMotoServer
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(key, value)
    import boto3
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="runs")
    yield f"http://127.0.0.1:{port}"
    server.stop()


def test_a_stopped_run_resumes_from_its_s3_checkpoint(ray_session, pnet_shards, tmp_path, s3_endpoint):
    import boto3
    shards, _ = pnet_shards
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}, "key": "testing", "secret": "testing"}
    stopped = _config(shards, tmp_path / "run", epochs=2, num_workers=1, cpus_per_worker=1,
                      storage_path="s3://runs/checkpoints", run_name="pnet-s3", max_failures=0,
                      inject_failure_at_epoch=1, storage_options=options)
    with pytest.raises(Exception, match="injected failure"):
        train_stage(stopped)  # no retries left: the run stops after epoch 0's checkpoint
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint)
            .list_objects_v2(Bucket="runs").get("Contents", [])]
    assert any(k.startswith("checkpoints/pnet-s3/") and k.endswith("train_state.pt") for k in keys)
    assert not (tmp_path / "run" / "weights.safetensors").exists()

    resumed = train_stage(_config(shards, tmp_path / "run", epochs=2, num_workers=1,
                                  cpus_per_worker=1, storage_path="s3://runs/checkpoints",
                                  run_name="pnet-s3", storage_options=options))
    assert resumed.metrics["resumed_from_epoch"] == 1 and resumed.metrics["epoch"] == 1
    assert [m["epoch"] for m in resumed.history] == [0, 1]
    provenance = load_weights(tmp_path / "run").provenance
    assert provenance["config"]["storage_options"]["secret"] == "***"  # secrets stay out
    assert "testing" not in json.dumps(provenance)


def test_shards_of_another_stage_or_missing_get_a_clear_error(pnet_shards, tmp_path):
    shards, _ = pnet_shards
    with pytest.raises(ValueError, match="12px samples but rnet trains on 24px"):
        train_stage(_config(shards, tmp_path / "run", stage="rnet"))
    with pytest.raises(ValueError, match="run `mtcnn-jobs prepare` first"):
        train_stage(_config(tmp_path / "nowhere", tmp_path / "run"))
    with pytest.raises(ValueError, match="stage must be one of"):
        _config(shards, tmp_path / "run", stage="qnet")
