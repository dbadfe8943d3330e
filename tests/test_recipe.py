"""The training recipe end to end on a real S3 endpoint (moto's server over HTTP), with a tiny
configuration: every stage prepared and trained into s3://, reused when rerun, refused when a
setting changed, and made again from the changed stage on when asked."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import s3fs

from jobs.cli import main
from jobs.inputs.stored_weights import load_weights_from
from shared_data import data_root, needs_shared_data

DATA = data_root()

pytestmark = [pytest.mark.slow, needs_shared_data("wider_face_train_small", "cnn_facepoint_5pt/trainImageList.txt")]


def tiny_recipe(folder: Path, endpoint: str, onet_epochs: int = 1) -> Path:
    """A recipe of a few images and one epoch per stage, keeping its data where it is."""
    stage = "{samples_per_image: 12, epochs: %d, batch_size: 64, learning_rate: 0.003}"
    config = folder / "tiny.yaml"
    config.write_text(
        f"faces: {DATA / 'wider_face_train_small'}\n"
        f"landmarks: {DATA / 'cnn_facepoint_5pt' / 'trainImageList.txt'}\n"
        "limit: 6\nnum_workers: 1\ncpus_per_worker: 1\nprepare_concurrency: 1\n"
        "mining_min_face_size: 40\n"
        f"storage_options: {{client_kwargs: {{endpoint_url: '{endpoint}'}}, key: testing, secret: testing}}\n"
        "stages:\n"
        f"  pnet: {stage % 1}\n  rnet: {stage % 1}\n  onet: {stage % onet_epochs}\n")
    return config


def test_recipe_writes_to_s3_reuses_refuses_changed_settings_and_restarts(ray_session, s3_server,
                                                                         tmp_path, capsys):
    bucket = f"recipe-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, key="testing", secret="testing")
    fs.mkdir(bucket)
    output = f"s3://{bucket}/runs/tiny"
    assert main(["train", "--config", str(tiny_recipe(tmp_path, s3_server)), "--output", output]) == 0
    keys = set(fs.find(f"{bucket}/runs/tiny"))
    for name in ("weights.safetensors", "recipe.json", "pnet/weights.safetensors",
                 "rnet/weights.safetensors", "onet/weights.safetensors", "samples/onet/_prepare.json"):
        assert f"{bucket}/runs/tiny/{name}" in keys, name
    assert not Path("s3:").exists() and not (tmp_path / "s3:").exists()  # nothing written locally
    weights = load_weights_from(output, {"client_kwargs": {"endpoint_url": s3_server},
                                         "key": "testing", "secret": "testing"})
    assert sorted(weights.stages) == ["onet", "pnet", "rnet"]
    assert weights.provenance["stage"] == "onet" and weights.provenance["settings"]["epochs"] == 1
    record = json.loads(fs.cat_file(f"{bucket}/runs/tiny/recipe.json"))
    assert "testing" not in json.dumps(record)  # the secret stays out of the record
    capsys.readouterr()

    # The same command again: every stage's samples and weights are reused, nothing retrained.
    assert main(["train", "--config", str(tiny_recipe(tmp_path, s3_server)), "--output", output]) == 0
    out = capsys.readouterr().out
    assert out.count("reusing samples") == 3 and out.count("reusing trained weights") == 3, out

    # One O-Net setting changed: refused, naming it, and nothing is replaced.
    changed = tiny_recipe(tmp_path, s3_server, onet_epochs=2)
    before = fs.info(f"{bucket}/runs/tiny/onet/weights.safetensors")["ETag"]
    assert main(["train", "--config", str(changed), "--output", output]) == 2
    err = capsys.readouterr().err
    assert "onet" in err and "epochs 1 -> 2" in err and "--restart" in err, err
    assert fs.info(f"{bucket}/runs/tiny/onet/weights.safetensors")["ETag"] == before

    # Asked to restart: P- and R-Net are reused, only O-Net trains again, with the new setting.
    assert main(["train", "--config", str(changed), "--output", output, "--restart"]) == 0
    out = capsys.readouterr().out
    assert out.count("reusing trained weights") == 2 and "onet: --restart: training again" in out, out
    retrained = load_weights_from(f"{output}/onet", {"client_kwargs": {"endpoint_url": s3_server},
                                                     "key": "testing", "secret": "testing"})
    assert retrained.provenance["settings"]["epochs"] == 2
