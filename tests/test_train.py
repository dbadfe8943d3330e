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

from jobs.training.samples import SampleConfig, face_samples, landmark_samples, to_table
from jobs.training.fingerprint import SettingsChanged
from jobs.training.trainer import TrainConfig, train_stage
from mtcnn.annotations import read_facepoint_list, read_wider
from mtcnn.detector import FaceDetector
from mtcnn.weights import load_weights
from shared_data import DEFAULT_ROOT, shared_data, shared_path

WIDER = shared_path("wider_face_train_small")
FACEPOINT = shared_path("cnn_facepoint_5pt")


def write_tiny_shards(folder: Path, stage: str = "pnet", images: int = 30, seed: int = 0) -> int:
    """Real samples of real images (the prepare job's labelling, without Ray) as two shards.
    Skips (or fails) the calling test or fixture when the shared data is missing."""
    shared_data("wider_face_train_small")
    shared_data("cnn_facepoint_5pt/trainImageList.txt")
    rng = np.random.default_rng(seed)
    config = SampleConfig(stage=stage, samples_per_image=24, landmark_samples_per_image=3)
    tables = []
    for annotation in read_wider(WIDER / "wider_face_train_bbx_gt.txt", WIDER / "images")[:images]:
        image = cv2.cvtColor(cv2.imread(annotation.path), cv2.COLOR_BGR2RGB)
        made = face_samples(image, annotation.boxes, annotation.ignore, config, rng)
        tables.append(to_table(made, annotation.path, stage))
    for annotation in read_facepoint_list(FACEPOINT / "trainImageList.txt")[:images * 2]:
        image = cv2.cvtColor(cv2.imread(annotation.path), cv2.COLOR_BGR2RGB)
        made = landmark_samples(image, annotation.boxes, annotation.landmarks, annotation.ignore,
                                config, rng)
        tables.append(to_table(made, annotation.path, stage))
    # Sorted kind by kind into two files, the worst case for mixing: the trainer must shuffle.
    table = pa.concat_tables(tables)
    table = table.take(pa.array(np.argsort(table.column("kind").to_numpy(), kind="stable")))
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


def test_two_workers_loss_falls_survives_a_failure_and_weights_load(ray_session, pnet_shards, tmp_path):
    shards, count = pnet_shards
    assert count >= 300
    # A worker raises once when epoch 2 starts: the group restarts from epoch 1's checkpoint.
    summary = train_stage(_config(shards, tmp_path / "run", epochs=4, previous_weights="reference",
                                  inject_failure_at_epoch=2, max_failures=1))
    assert (tmp_path / "run" / ".injected-failure-pnet").exists()  # it did fail once
    assert [m["epoch"] for m in summary.history] == [0, 1, 2, 3]
    assert summary.metrics["resumed_from_epoch"] == 2
    losses = [m["loss"] for m in summary.history]
    assert summary.samples == count
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
                      inject_failure_at_epoch=1, storage_options=options, flip=True, color_jitter=0.2)
    with pytest.raises(Exception, match="injected failure"):
        train_stage(stopped)  # no retries left: the run stops after epoch 0's checkpoint
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint)
            .list_objects_v2(Bucket="runs").get("Contents", [])]
    assert any(k.startswith("checkpoints/pnet-s3/") and k.endswith("train_state.pt") for k in keys)
    assert not (tmp_path / "run" / "weights.safetensors").exists()

    resumed = train_stage(_config(shards, tmp_path / "run", epochs=2, num_workers=1,
                                  cpus_per_worker=1, storage_path="s3://runs/checkpoints",
                                  run_name="pnet-s3", storage_options=options,
                                  flip=True, color_jitter=0.2))
    assert resumed.metrics["resumed_from_epoch"] == 1 and resumed.metrics["epoch"] == 1
    assert [m["epoch"] for m in resumed.history] == [0, 1]
    provenance = load_weights(tmp_path / "run").provenance
    assert provenance["config"]["flip"] and provenance["config"]["color_jitter"] == 0.2
    assert np.isfinite(resumed.metrics["loss"])  # the epoch trained on flipped, jittered batches
    assert provenance["config"]["storage_options"]["secret"] == "***"  # secrets stay out
    assert "testing" not in json.dumps(provenance)


def test_a_run_started_with_other_settings_is_refused_naming_them_or_restarted(ray_session, pnet_shards,
                                                                              tmp_path, capsys):
    shards, _ = pnet_shards
    one_worker = dict(epochs=1, num_workers=1, cpus_per_worker=1)
    first = train_stage(_config(shards, tmp_path / "run", **one_worker))
    assert first.metrics["resumed_from_epoch"] == 0
    # A changed learning rate, or other data in the same output, never resumes silently.
    with pytest.raises(SettingsChanged, match=r"learning_rate 0.003 -> 0.001.*--restart"):
        train_stage(_config(shards, tmp_path / "run", learning_rate=1e-3, **one_worker))
    other = tmp_path / "other" / "pnet"
    write_tiny_shards(other, images=8, seed=1)
    with pytest.raises(SettingsChanged, match=r"\(samples[ .]"):
        train_stage(_config(other, tmp_path / "run", **one_worker))
    assert load_weights(tmp_path / "run").provenance["config"]["learning_rate"] == 3e-3  # untouched
    # Operational settings may change: more workers resume the finished run. No epoch is left, so
    # no worker group starts: the weights are written again from the last checkpoint.
    (tmp_path / "run" / "weights.safetensors").unlink()
    capsys.readouterr()
    again = train_stage(_config(shards, tmp_path / "run", epochs=1, num_workers=2, cpus_per_worker=0.5))
    assert again.history == first.history and again.samples == first.samples
    out = capsys.readouterr().out
    assert "all 1 epochs are checkpointed already" in out and "worker(s)" not in out, out
    assert load_weights(tmp_path / "run").provenance["loss_history"] == [round(first.metrics["loss"], 6)]
    # Asked to, it discards the old checkpoints and trains afresh with the new settings.
    restarted = train_stage(_config(shards, tmp_path / "run", learning_rate=1e-3, restart=True, **one_worker))
    assert restarted.metrics["resumed_from_epoch"] == 0 and restarted.metrics["learning_rate"] == 1e-3
    provenance = load_weights(tmp_path / "run").provenance
    assert provenance["config"]["learning_rate"] == 1e-3
    assert provenance["settings"]["learning_rate"] == 1e-3


def test_a_setting_added_later_matches_runs_recorded_before_it_until_it_is_set(pnet_shards, tmp_path):
    from jobs.training.fingerprint import differences, train_settings

    shards, _ = pnet_shards
    paper = train_settings(_config(shards, tmp_path / "run"), None, None)
    # A record written before landmark_weight existed holds no such key: left unset, it matches.
    assert "landmark_weight" not in paper
    heavier = train_settings(_config(shards, tmp_path / "run", landmark_weight=4.0), None, None)
    assert differences(paper, heavier) == ["landmark_weight (none) -> 4.0"]
    with pytest.raises(ValueError, match="landmark_weight must be at least 0"):
        _config(shards, tmp_path / "run", landmark_weight=-1.0)
    assert "landmark_loss" not in paper
    wing = train_settings(_config(shards, tmp_path / "run", landmark_loss="wing"), None, None)
    assert differences(paper, wing) == ['landmark_loss (none) -> "wing"']
    with pytest.raises(ValueError, match="landmark_loss must be one of"):
        _config(shards, tmp_path / "run", landmark_loss="l1")


def test_shards_of_another_stage_or_missing_get_a_clear_error(pnet_shards, tmp_path):
    shards, _ = pnet_shards
    with pytest.raises(ValueError, match="12px samples but rnet trains on 24px"):
        train_stage(_config(shards, tmp_path / "run", stage="rnet"))
    with pytest.raises(ValueError, match="run `mtcnn-jobs prepare` first"):
        train_stage(_config(tmp_path / "nowhere", tmp_path / "run"))
    with pytest.raises(ValueError, match="stage must be one of"):
        _config(shards, tmp_path / "run", stage="qnet")


def test_recipe_config_is_read_into_dataclasses_with_clear_errors(tmp_path):
    from jobs.training.recipe import load_recipe

    # The shipped recipes name ../shared/data beside the repository (relative to configs/).
    for name in ("wider_face_train_small", "wider_face_train_more", "webfaces", "cnn_facepoint_5pt"):
        shared_data(name, root=DEFAULT_ROOT)
    for config_file in sorted((Path(__file__).parents[1] / "configs").glob("shared-data*.yaml")):
        config = load_recipe(config_file)
        assert list(config.stages) == ["pnet", "rnet", "onet"] and not config.ohem
        faces = config.faces if isinstance(config.faces, list) else [config.faces]
        assert all(Path(source).exists() for source in faces)  # resolved from the file's folder
        assert Path(config.landmarks).is_file()
    # The cluster recipe names the user's own data: it reads, its paths are theirs to fill in.
    cluster = load_recipe(Path(__file__).parents[1] / "configs" / "wider-full.yaml")
    assert cluster.use_gpu and cluster.num_workers >= 4 and cluster.storage_path.startswith("s3://")
    assert cluster.face_images.startswith("s3://")
    tuned = tmp_path / "tuned.yaml"
    tuned.write_text("faces: x\nstages:\n  pnet: {epochs: 2, weight_decay: 0.0005, flip: true, "
                     "color_jitter: 0.2}\n")
    pnet = load_recipe(tuned).stages["pnet"]
    assert pnet.weight_decay == 0.0005 and pnet.flip and pnet.color_jitter == 0.2
    listed = tmp_path / "listed.yaml"
    listed.write_text("faces: [wider, 'webfaces:gt/WebFaces.txt', /data/x.xml]\n")
    assert load_recipe(listed).faces == [str(tmp_path / "wider"), f"webfaces:{tmp_path / 'gt' / 'WebFaces.txt'}",
                                         "/data/x.xml"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("faces: x\nstages:\n  pnet: {epochs: 2, epoch: 3}\n")
    with pytest.raises(ValueError, match=r"stages.pnet: unknown keys \['epoch'\]"):
        load_recipe(bad)
    bad.write_text("faces: x\nstages:\n  rnet: {epochs: 2}\n")
    with pytest.raises(ValueError, match="starts with pnet"):
        load_recipe(bad)
