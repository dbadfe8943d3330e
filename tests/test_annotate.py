"""The annotate job end to end on a real local Ray: one row per input, resume, overwrite, S3, secrets."""

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import cv2
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.pipelines.annotate import AnnotateConfig, OutputError, annotate
from jobs.cli import main
from jobs.inputs.reading import ReadPolicy
from jobs.common.schema import ANNOTATION_SCHEMA, PRECISION_KEY, read_metadata
from jobs.common.storage import filesystem
from mtcnn import DetectorConfig, load_weights

DATA = Path(__file__).parent / "data"
BROKEN = {"truncated.jpg": "truncated", "empty.jpg": "empty file", "not an image.png": "not an image",
          "huge.png": "megapixels"}
MAX_PIXELS = 1_000_000


def write_fixture_images(folder: Path) -> None:
    """Valid but unusual images of one face, and broken files, written with OpenCV."""
    astronaut = cv2.imread(str(DATA / "astronaut.png"))  # BGR, 512 x 512
    small = cv2.resize(astronaut, (192, 192), interpolation=cv2.INTER_AREA)
    (folder / "sub dir").mkdir(parents=True)
    shutil.copy(DATA / "astronaut.png", folder / "astronaut.png")
    shutil.copy(DATA / "cmyk.jpg", folder / "cmyk.jpg")
    shutil.copy(DATA / "exif_rotated.jpg", folder / "exif_rotated.jpg")
    images = {
        "sub dir/näme with spaces ü.JPG": small,
        "gray.png": cv2.cvtColor(small, cv2.COLOR_BGR2GRAY),
        "rgba.png": cv2.cvtColor(small, cv2.COLOR_BGR2BGRA),
        "deep16.png": small.astype(np.uint16) * 257,
        "small.bmp": small, "small.webp": small, "small.tiff": small,
        "one pixel.png": small[:1, :1],
    }
    for name, pixels in images.items():
        ok, data = cv2.imencode(Path(name).suffix, pixels)
        assert ok
        (folder / name).write_bytes(data.tobytes())
    ok, jpeg = cv2.imencode(".jpg", astronaut)
    (folder / "truncated.jpg").write_bytes(jpeg.tobytes()[:len(jpeg) // 3])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "not an image.png").write_text("just some text, no pixels")
    ok, huge = cv2.imencode(".png", np.zeros((1000, 1100), np.uint8))
    (folder / "huge.png").write_bytes(huge.tobytes())
    # Broken files written long ago: a broken file modified moments before it is read may still
    # be being copied, which is not its fault (a transient row, redone by the next run).
    hour_ago = time.time() - 3600
    for name in ("truncated.jpg", "empty.jpg", "not an image.png"):
        os.utime(folder / name, (hour_ago, hour_ago))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("annotate") / "images"
    write_fixture_images(folder)
    return folder


@pytest.fixture(scope="module")
def first_run(ray_session, images, tmp_path_factory):
    """One job over the fixture folder; (config, summary)."""
    output = tmp_path_factory.mktemp("annotate-out") / "faces"
    config = AnnotateConfig(str(images), str(output), max_pixels=MAX_PIXELS, batch_size=4,
                            show_progress=False)
    return config, annotate(config)


def rows(output: str):
    return duckdb.sql(f"select path, width, height, faces, error from '{output}/*.parquet'").fetchall()


def test_every_input_gets_one_row_with_faces_or_an_error(first_run, images):
    config, summary = first_run
    listed = sorted(str(p) for p in images.rglob("*") if p.is_file())
    assert summary.listed == len(listed) == 15
    assert (summary.images, summary.errors, summary.skipped) == (15, len(BROKEN), 0)
    by_path = {row[0]: row for row in rows(config.output)}
    assert sorted(by_path) == listed
    for path, (_, width, height, faces, error) in by_path.items():
        name = os.path.relpath(path, images)
        if name in BROKEN:
            assert BROKEN[name] in error and faces is None and width is None, (name, error)
            continue
        assert error is None, (name, error)
        if name == "one pixel.png":
            assert (width, height, faces) == (1, 1, [])
            continue
        # Every other image shows the one astronaut, so exactly one confident face.
        assert len(faces) == 1, name
        assert faces[0]["score"] > 0.95
        x1, y1, x2, y2 = faces[0]["box"]
        assert 0 <= x1 < x2 <= width + 1 and 0 <= y1 < y2 <= height + 1
        eyes_y, mouth_y = faces[0]["landmarks"][1], faces[0]["landmarks"][7]
        assert eyes_y < mouth_y, f"{name}: face upside down or on its side"
    # Boxes refer to the displayed (EXIF-rotated) image: 192 wide, 144 high, face upright.
    assert by_path[str(images / "exif_rotated.jpg")][1:3] == (192, 144)
    assert summary.faces == sum(len(row[3] or []) for row in by_path.values())


def test_duckdb_counts_faces_per_image_with_unnest(first_run):
    config, _ = first_run
    counts = dict(duckdb.sql(
        f"select path, count(*) from (select path, unnest(faces) as face "
        f"from '{config.output}/*.parquet') where face.score > 0.9 group by path").fetchall())
    assert len(counts) == 10 and set(counts.values()) == {1}


def test_run_metadata_is_in_every_file(first_run):
    config, _ = first_run
    files = sorted(Path(config.output).glob("part-*.parquet"))
    assert files
    metadata = read_metadata(pq.read_schema(files[0]))
    assert metadata["weights"]["sha256"] == load_weights("reference").sha256
    assert metadata["detector"]["min_face_size"] == 20.0
    assert metadata["detector"]["thresholds"] == [0.6, 0.7, 0.7]
    assert metadata["max_pixels"] == MAX_PIXELS and metadata["version"] and metadata["created"]
    for file in files:  # and the arithmetic the rows were detected in, per part
        schema = pq.read_schema(file)
        assert schema.metadata[PRECISION_KEY] == b"fp32" and schema.names == ANNOTATION_SCHEMA.names


def test_precision_auto_says_in_each_part_which_precision_it_took(ray_session, images, tmp_path):
    from mtcnn.cpu import has_native_bf16

    output = tmp_path / "faces"
    config = AnnotateConfig(str(images), str(output), max_pixels=MAX_PIXELS, batch_size=4,
                            show_progress=False, detector=DetectorConfig(precision="auto"))
    summary = annotate(config)
    assert summary.images == 15
    files = sorted(output.glob("part-*.parquet"))
    assert read_metadata(pq.read_schema(files[0]))["detector"]["precision"] == "auto"
    # Each part names the precisions of its rows, comma-separated: each actor's detector times
    # the two for itself, so on a loaded machine two actors may choose differently.
    used = {precision for file in files
            for precision in pq.read_schema(file).metadata[PRECISION_KEY].decode().split(",")}
    # Without bf16 units auto is fp32; with them the start-up timing decides (either is fine).
    assert used == {"fp32"} if not has_native_bf16() else used <= {"fp32", "bf16"}


def test_resume_skips_done_paths_overwrite_starts_over(first_run, images, tmp_path):
    config, _ = first_run
    # Same OUTPUT again: nothing to do, nothing written.
    files_before = sorted(Path(config.output).glob("*.parquet"))
    again = annotate(config)
    assert (again.images, again.skipped, again.files) == (0, 15, [])
    # A grown folder (a copy with one more image) gets only its new image.
    grown = tmp_path / "grown"
    shutil.copytree(images, grown)
    output = tmp_path / "out"
    shutil.copytree(config.output, output)
    for row_file in output.glob("*.parquet"):  # point the copied rows at the copied folder
        table = pq.read_table(row_file)
        paths = [p.replace(str(images), str(grown)) for p in table.column("path").to_pylist()]
        pq.write_table(table.set_column(0, "path", pa.array(paths)), row_file)
    shutil.copy(DATA / "cmyk.jpg", grown / "new image.jpg")
    grown_config = AnnotateConfig(str(grown), str(output), max_pixels=MAX_PIXELS, show_progress=False)
    resumed = annotate(grown_config)
    assert (resumed.images, resumed.skipped, resumed.errors) == (1, 15, 0)
    paths = [row[0] for row in rows(str(output))]
    assert len(paths) == len(set(paths)) == 16
    # Other detection settings into the same OUTPUT: refused with what differs.
    with pytest.raises(OutputError, match=r"min_face_size 20.0 -> 40\b.*--overwrite"):
        annotate(AnnotateConfig(str(grown), str(output), max_pixels=MAX_PIXELS, show_progress=False,
                                detector=DetectorConfig(min_face_size=40)))
    redone = annotate(AnnotateConfig(str(grown), str(output), max_pixels=MAX_PIXELS, overwrite=True,
                                     detector=DetectorConfig(min_face_size=40), show_progress=False))
    assert (redone.images, redone.skipped) == (16, 0)
    assert len(rows(str(output))) == 16
    assert sorted(Path(config.output).glob("*.parquet")) == files_before


def test_cli_s3_input_and_output_never_show_the_secret(ray_session, s3_server, images, capfd):
    secret = f"SeCrEt-{uuid.uuid4().hex}"
    bucket = f"annotate-{uuid.uuid4().hex[:8]}"
    fs, _ = filesystem(f"s3://{bucket}")
    fs.mkdir(bucket)
    names = ["astronaut.png", "gray.png", "sub dir/näme with spaces ü.JPG", "truncated.jpg", "empty.jpg"]
    for name in names:
        fs.put_file(str(images / name), f"{bucket}/in/{name}")
    # moto accepts any key pair, so the secret travels the whole way like a real one would.
    options = json.dumps({"key": "testing", "secret": secret, "client_kwargs": {"region_name": "us-east-1"}})
    status = main(["annotate", f"s3://{bucket}/in", f"s3://{bucket}/out", "--batch-size", "2",
                   "--storage-options", options])
    captured = capfd.readouterr()
    assert status == 0, captured.err
    assert "annotated 5 images" in captured.out and "2 errors" in captured.out
    fs.invalidate_cache()
    parts = fs.glob(f"{bucket}/out/part-*.parquet")
    assert parts
    annotations = pa.concat_tables([pq.read_table(fs.open(p, "rb")) for p in parts])
    found = duckdb.sql("select count(*), count(error), sum(len(faces)) from annotations").fetchall()[0]
    assert found == (5, 2, 3)
    assert sorted(annotations.column("path").to_pylist()) == sorted(f"s3://{bucket}/in/{n}" for n in names)
    # The secret is nowhere: not in the console output, the Parquet files, or Ray's logs.
    assert secret not in captured.out + captured.err
    assert not any(secret.encode() in fs.cat_file(p) for p in fs.find(f"{bucket}/out"))
    logs = Path(ray_session._private.worker._global_node.get_session_dir_path()) / "logs"
    leaked = [p for p in logs.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaked


def test_cli_exits_non_zero_with_one_line_when_it_cannot_run(ray_session, images, tmp_path, capfd):
    assert main(["annotate", str(tmp_path / "no such folder"), str(tmp_path / "out")]) == 2
    error = capfd.readouterr().err.strip()
    assert error.count("\n") == 0 and "does not exist" in error
    blocker = tmp_path / "a file"
    blocker.write_text("x")
    assert main(["annotate", str(images), str(blocker / "out")]) == 2
    error = capfd.readouterr().err.strip()
    assert error.count("\n") == 0 and "not writable" in error
    assert main(["annotate", str(images), str(tmp_path / "o"), "--storage-options", "[1]"]) == 2
    assert "JSON object" in capfd.readouterr().err


def test_decoding_in_separate_tasks_gives_the_same_rows(first_run, images, tmp_path):
    # The layout used with GPUs (CPU tasks decode, actors only detect), run here on CPUs.
    config, _ = first_run
    manifest = tmp_path / "some.txt"
    names = ["astronaut.png", "deep16.png", "exif_rotated.jpg", "truncated.jpg", "one pixel.png"]
    manifest.write_text("\n".join(str(images / n) for n in names))
    summary = annotate(AnnotateConfig(str(manifest), str(tmp_path / "out"), max_pixels=MAX_PIXELS,
                                      batch_size=2, concurrency=1, separate_decode=True,
                                      show_progress=False))
    assert (summary.images, summary.errors) == (5, 1)
    expected = {row[0]: row for row in rows(config.output) if Path(row[0]).name in names}
    assert {row[0]: row for row in rows(str(tmp_path / "out"))} == expected
    with pytest.raises(ValueError, match="has none"):
        annotate(AnnotateConfig(str(manifest), str(tmp_path / "gpu"), num_gpus=1, show_progress=False))


def test_a_detection_failure_marks_only_its_own_row(tmp_path):
    """When the batch call fails, each image is retried alone and only the culprit gets an error."""
    from jobs.pipelines.annotate import FaceAnnotator

    astronaut = cv2.imread(str(DATA / "astronaut.png"))
    paths = []
    for name, image in {"a.png": astronaut, "odd.png": astronaut[:300, :301], "c.png": astronaut[::2, ::2]}.items():
        cv2.imwrite(str(tmp_path / name), image)
        paths.append(str(tmp_path / name))
    threads = torch.get_num_threads()
    try:  # the actor sets torch's (process-wide) thread count; give it back to the other tests
        annotator = FaceAnnotator(load_weights("reference"), DetectorConfig(), use_gpu=False, threads=2,
                                  storage_options={}, policy=ReadPolicy(max_pixels=MAX_PIXELS))
        detect = annotator.detector.detect

        def fails_on_odd_widths(images):
            if any(image.shape[1] % 2 for image in images):
                raise MemoryError("out of memory on this one")
            return detect(images)

        annotator.detector.detect = fails_on_odd_widths
        rows = annotator(pa.table({"path": paths})).to_pylist()
    finally:
        torch.set_num_threads(threads)
    assert [row["path"] for row in rows] == paths
    assert rows[1]["error"] == "detection failed: MemoryError: out of memory on this one"
    assert rows[1]["faces"] is None
    assert rows[1]["error_kind"] == "transient"  # not the image's fault: the next run redoes it
    assert rows[0]["error"] is None and len(rows[0]["faces"]) == 1
    assert rows[2]["error"] is None and len(rows[2]["faces"]) == 1
