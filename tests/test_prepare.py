"""The prepare job on real images with a real local Ray, writing Parquet locally and to S3."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from jobs import cli
from jobs.training.prepare_stage import (PrepareConfig, PrepareError, SampleMaker, input_table, prepare_stage,
                                         read_inputs)
from jobs.training.augment import AugmentConfig
from jobs.training.samples import SampleConfig
from jobs.training.schema import LANDMARK, NEGATIVE, PART, POSITIVE, SAMPLE_SCHEMA, SUMMARY_FILE
from shared_data import needs_shared_data, shared_data, shared_path

WIDER = shared_path("wider_face_train_small")
POINTS = shared_path("cnn_facepoint_5pt/trainImageList.txt")

pytestmark = needs_shared_data("wider_face_train_small", "cnn_facepoint_5pt/trainImageList.txt")


def read_shards(folder: str, filesystem=None) -> pa.Table:
    files = [p for p in (filesystem.find(folder) if filesystem else map(str, Path(folder).rglob("*")))
             if p.endswith(".parquet")]
    assert files, f"no Parquet shards in {folder}"
    if filesystem is None:
        return pads.dataset(files, format="parquet").to_table()
    from pyarrow.fs import FSSpecHandler, PyFileSystem
    return pads.dataset(files, format="parquet", filesystem=PyFileSystem(FSSpecHandler(filesystem))).to_table()


def test_pnet_samples_on_real_images(ray_session, tmp_path):
    samples = SampleConfig(stage="pnet", samples_per_image=50)
    config = PrepareConfig(output=str(tmp_path / "samples"), samples=samples, faces=str(WIDER),
                           landmarks=str(POINTS), limit=4, batch_size=2, seed=3)
    summary = prepare_stage(config)

    table = read_shards(str(tmp_path / "samples" / "pnet"))
    assert table.schema.remove_metadata().equals(SAMPLE_SCHEMA)
    kinds = table.column("kind").to_numpy()
    counts = {kind: int((kinds == kind).sum()) for kind in (NEGATIVE, POSITIVE, PART, LANDMARK)}
    assert counts == {NEGATIVE: summary.counts["negative"], POSITIVE: summary.counts["positive"],
                      PART: summary.counts["part"], LANDMARK: summary.counts["landmark"]}
    # 4 face images x 50 split 3:1:1, and landmark samples as 2 parts of that 5.
    assert counts[NEGATIVE] == 120
    assert 30 <= counts[POSITIVE] <= 40 and 30 <= counts[PART] <= 40
    assert counts[LANDMARK] == 80
    assert all(len(image) == 12 * 12 * 3 for image in table.column("image").to_pylist())
    assert set(table.column("size").to_pylist()) == {12} and set(table.column("stage").to_pylist()) == {"pnet"}
    boxes = np.array(table.column("box").to_pylist(), np.float32)
    points = np.array(table.column("landmarks").to_pylist(), np.float32)
    assert not boxes[kinds == NEGATIVE].any() and not boxes[kinds == LANDMARK].any()
    assert np.abs(boxes[kinds == POSITIVE]).max() > 0
    assert not points[kinds != LANDMARK].any()
    assert ((points[kinds == LANDMARK] >= 0) & (points[kinds == LANDMARK] < 1)).all()
    # Landmark samples come from the 5-point images only, faces from WIDER only.
    sources = np.array(table.column("source").to_pylist())
    assert all("cnn_facepoint_5pt" in s for s in sources[kinds == LANDMARK])
    assert all("wider_face_train_small" in s for s in sources[kinds != LANDMARK])
    record = json.loads((tmp_path / "samples" / "pnet" / SUMMARY_FILE).read_text())
    assert record["counts"] == summary.counts and record["seed"] == 3

    # A second run into the same folder must not mix its shards with these.
    with pytest.raises(PrepareError, match="--overwrite"):
        prepare_stage(config)


def test_rnet_samples_mined_into_s3(ray_session, s3_server, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir("prepare-test")
    samples = SampleConfig(stage="rnet", samples_per_image=30, mix=(3, 1, 1, 0), top_up=False)
    config = PrepareConfig(output="s3://prepare-test/run", samples=samples, faces=str(WIDER), limit=2,
                           weights="reference", augment=None, batch_size=1)
    summary = prepare_stage(config)
    table = read_shards("prepare-test/run/rnet", fs)
    assert table.schema.remove_metadata().equals(SAMPLE_SCHEMA)
    kinds = table.column("kind").to_numpy()
    # Without top-up every sample is a window the reference P-Net proposed.
    assert (kinds == NEGATIVE).sum() > 0 and (kinds == POSITIVE).sum() > 0
    assert not (kinds == LANDMARK).any()
    assert summary.total == table.num_rows
    assert set(table.column("size").to_pylist()) == {24}
    assert fs.exists(f"prepare-test/run/rnet/{SUMMARY_FILE}")


def test_sample_maker_is_deterministic_and_skips_bad_images(tmp_path, capsys):
    config = PrepareConfig(output=str(tmp_path), faces=str(WIDER), landmarks=str(POINTS), limit=2,
                           augment=AugmentConfig(probability=1.0))
    faces, landmarks = read_inputs(config)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    faces[1].path = str(broken)
    table = input_table(faces, landmarks)
    maker = SampleMaker(SampleConfig(samples_per_image=20), config.augment, seed=11)
    first, second = maker(table), maker(table)
    assert first.equals(second)
    assert str(broken) not in first.column("source").to_pylist()
    assert "broken.jpg" in capsys.readouterr().err
    other = SampleMaker(SampleConfig(samples_per_image=20), config.augment, seed=12)(table)
    assert not other.equals(first)


def test_cli_reports_bad_input(tmp_path, capsys):
    status = cli.main(["prepare", "--stage", "rnet", "--faces", str(WIDER), "--output", str(tmp_path)])
    assert status == 2
    assert "--weights" in capsys.readouterr().err
    status = cli.main(["prepare", "--stage", "pnet", "--faces", str(tmp_path / "missing.txt"),
                       "--output", str(tmp_path)])
    assert status == 2
    assert "missing.txt" in capsys.readouterr().err
    bad_list = tmp_path / "list.txt"
    bad_list.write_text("a.jpg 1 2 3\n")
    status = cli.main(["prepare", "--stage", "pnet", "--landmarks", str(bad_list), "--output", str(tmp_path)])
    assert status == 2
    assert "line 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["prepare", "--stage", "pnet", "--faces", str(WIDER), "--mix", "3,1", "--output", str(tmp_path)])


def test_weights_without_the_mining_stages_are_refused(tmp_path):
    from mtcnn.nets import build_stage
    from mtcnn.weights import save_weights

    path = tmp_path / "pnet_only.safetensors"
    save_weights(path, {"pnet": build_stage("pnet")}, {"note": "test"})
    config = PrepareConfig(output=str(tmp_path / "out"), samples=SampleConfig(stage="onet"), faces=str(WIDER),
                           weights=str(path))
    with pytest.raises(PrepareError, match="rnet"):
        prepare_stage(config)
    assert not (tmp_path / "out").exists()


def test_faces_from_several_sources_and_formats(tmp_path):
    from mtcnn.annotations import read_dlib_xml, read_webfaces, read_wider, to_table

    webfaces = shared_data("webfaces/WebFaces_GroundThruth.txt")
    dlib = shared_data("dlib_xml/training.xml")
    table_file = tmp_path / "my_faces.parquet"
    import pyarrow.parquet as pq
    pq.write_table(to_table(read_dlib_xml(dlib)), table_file)
    # The format is told from each name, or named with FORMAT:PATH.
    config = PrepareConfig(output=str(tmp_path / "out"), faces=(str(WIDER), str(webfaces), str(dlib),
                                                                  f"table:{table_file}"), limit=3)
    faces, landmarks = read_inputs(config)
    assert landmarks == []
    expected = (read_wider(WIDER / "wider_face_train_bbx_gt.txt")[:3] + read_webfaces(webfaces)[:3]
                + read_dlib_xml(dlib)[:3] + read_dlib_xml(dlib)[:3])
    assert [a.path for a in faces] == [a.path for a in expected]
    assert all(np.array_equal(a.boxes, b.boxes) for a, b in zip(faces, expected))
    # A name that tells nothing needs the prefix; an unknown prefix is no format.
    renamed = tmp_path / "labels.txt"
    renamed.write_text(webfaces.read_text())
    with pytest.raises(PrepareError, match="FORMAT:PATH"):
        PrepareConfig(output=str(tmp_path / "out"), faces=str(renamed))
    config = PrepareConfig(output=str(tmp_path / "out"), faces=f"webfaces:{renamed}",
                           face_images=str(webfaces.parent / "images"), limit=2)
    assert [a.path for a in read_inputs(config)[0]] == [a.path for a in read_webfaces(webfaces)[:2]]
    with pytest.raises(PrepareError, match="one image root"):
        PrepareConfig(output=str(tmp_path / "out"), faces=(str(WIDER), str(dlib)), face_images=str(tmp_path))
    with pytest.raises(PrepareError, match="no such file"):
        read_inputs(PrepareConfig(output=str(tmp_path / "out"), faces=str(tmp_path / "missing.xml")))
    with pytest.raises(PrepareError, match="local disk"):
        read_inputs(PrepareConfig(output=str(tmp_path / "out"), faces="s3://bucket/train_bbx_gt.txt"))
