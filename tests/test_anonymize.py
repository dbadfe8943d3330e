"""mtcnn-jobs anonymize on real files, real local Ray and a real S3 endpoint (moto's server).

One small folder: the astronaut (PNG, one face), a photo stored on its side with EXIF orientation 6,
GPS and an ICC profile (JPEG), a face-free photo in a sub-folder and a file that is not an image.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from jobs.common.schema import annotation_table
from jobs.inputs.decode import decode_image
from jobs.output import committed_parts
from jobs.pipelines.annotate import commit_rows
from jobs.pipelines.anonymize import (AnonymizeConfig, MaskSettings, anonymize, encode_image, hide_faces,
                                      mask_region, read_record, relative_name, upright_exif)
from mtcnn import Detections, FaceDetector

ROOT = Path(__file__).parent.parent
DATA = Path(__file__).parent / "data"
#: What the tests hide the faces from: the reference cascade at its defaults (annotate's settings).
REFERENCE = FaceDetector()
GPS_LATITUDE = struct.pack("<6I", 48, 1, 51, 1, 30, 1)
ICC_BODY = b"ICC_PROFILE\0\x01\x01" + b"fake-profile-bytes" * 8


# -- fixtures -------------------------------------------------------------------------------------

def exif_tiff(orientation: int, thumbnail: bytes = b"") -> bytes:
    """Little-endian EXIF: IFD0 with Orientation and a GPS IFD (latitude N 48/51/30); optionally an
    IFD1 with a JPEG thumbnail."""
    ifd0, gps = 8, 8 + 2 + 2 * 12 + 4
    data_at = gps + 2 + 2 * 12 + 4
    ifd1 = data_at + len(GPS_LATITUDE) if thumbnail else 0
    thumb_at = ifd1 + 2 + 2 * 12 + 4
    out = b"II*\x00" + struct.pack("<I", ifd0)
    out += struct.pack("<H", 2) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) \
        + struct.pack("<HHII", 0x8825, 4, 1, gps) + struct.pack("<I", ifd1)
    out += struct.pack("<H", 2) + struct.pack("<HHI2sH", 0x0001, 2, 2, b"N\0", 0) \
        + struct.pack("<HHII", 0x0002, 5, 3, data_at) + struct.pack("<I", 0)
    out += GPS_LATITUDE
    if thumbnail:
        out += struct.pack("<H", 2) + struct.pack("<HHII", 0x0201, 4, 1, thumb_at) \
            + struct.pack("<HHII", 0x0202, 4, 1, len(thumbnail)) + struct.pack("<I", 0) + thumbnail
    return out


def rotated_jpeg(displayed_rgb: np.ndarray) -> bytes:
    """A JPEG whose pixels lie on their side (EXIF orientation 6 turns them upright), with GPS and ICC."""
    stored = cv2.rotate(displayed_rgb, cv2.ROTATE_90_COUNTERCLOCKWISE)
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(stored, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    tiff = exif_tiff(6)
    app1 = b"\xff\xe1" + struct.pack(">H", 8 + len(tiff)) + b"Exif\0\0" + tiff
    app2 = b"\xff\xe2" + struct.pack(">H", 2 + len(ICC_BODY)) + ICC_BODY
    data = encoded.tobytes()
    return data[:2] + app1 + app2 + data[2:]


def displayed_photo() -> np.ndarray:
    """The astronaut's head and shoulders, 256 wide and 192 high, upright."""
    astronaut = decode_image((DATA / "astronaut.png").read_bytes())
    return cv2.resize(astronaut[0:384, 0:512], (256, 192), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("anonymize") / "photos"
    (folder / "people").mkdir(parents=True)
    (folder / "things").mkdir()
    shutil.copy(DATA / "astronaut.png", folder / "people" / "astronaut.png")
    (folder / "people" / "rotated.jpg").write_bytes(rotated_jpeg(displayed_photo()))
    shutil.copy(ROOT / "examples" / "images" / "coffee.png", folder / "things" / "coffee.png")
    (folder / "things" / "broken.jpg").write_bytes(b"this is not a JPEG at all")
    # A file that does not decode is final only once it is not being written any more (reading.py).
    an_hour_ago = os.path.getmtime(folder / "things" / "broken.jpg") - 3600
    os.utime(folder / "things" / "broken.jpg", (an_hour_ago, an_hour_ago))
    return folder


@pytest.fixture(scope="module")
def run(ray_session, photos, tmp_path_factory):
    """One anonymize run over the photos with the defaults (blur, ellipse, 1.3), and its preview."""
    out = tmp_path_factory.mktemp("anonymized") / "out"
    page = out.parent / "page"
    summary = anonymize(AnonymizeConfig(str(photos), str(out), batch_size=2, show_progress=False,
                                        preview=str(page)))
    return out, summary, page


def by_name(table) -> dict[str, dict]:
    return {row["path"].rsplit("/", 1)[-1]: row for row in table.to_pylist()}


def outside_mask(shape, boxes, settings: MaskSettings) -> np.ndarray:
    """True where no mask may change a pixel (outside every grown box)."""
    keep = np.ones(shape[:2], bool)
    for box in boxes:
        region = mask_region(box, settings.mask_scale, shape[1], shape[0])
        if region is not None:
            left, top, right, bottom = region
            keep[top:bottom, left:right] = False
    return keep


# -- the job on a folder --------------------------------------------------------------------------

def test_one_row_per_input_and_a_copy_per_readable_image_in_its_format(run, photos):
    out, summary, _ = run
    rows = by_name(read_record(str(out)))
    assert sorted(rows) == ["astronaut.png", "broken.jpg", "coffee.png", "rotated.jpg"]
    assert summary.images == 4 and summary.errors == 1
    broken = rows["broken.jpg"]
    assert broken["error_kind"] == "permanent" and broken["output_path"] is None and broken["faces_hidden"] is None
    assert not (out / "things" / "broken.jpg").exists()
    for name, relative, magic in (("astronaut.png", "people/astronaut.png", b"\x89PNG"),
                                  ("rotated.jpg", "people/rotated.jpg", b"\xff\xd8"),
                                  ("coffee.png", "things/coffee.png", b"\x89PNG")):
        assert rows[name]["error"] is None and rows[name]["output_path"] == str(out / relative)
        assert (out / relative).read_bytes().startswith(magic)
    assert rows["astronaut.png"]["faces_hidden"] >= 1 and rows["rotated.jpg"]["faces_hidden"] >= 1
    # No temporaries left beside the copies.
    assert not [p for p in out.rglob(".*.tmp")]


def test_blurred_faces_are_not_found_and_other_pixels_are_untouched(run, photos):
    out, _, _ = run
    row = by_name(read_record(str(out)))["astronaut.png"]
    original = decode_image((photos / "people" / "astronaut.png").read_bytes())
    copy = decode_image((out / "people" / "astronaut.png").read_bytes())
    assert len(REFERENCE.detect([original])[0]) == 1
    assert len(REFERENCE.detect([copy])[0]) == 0
    keep = outside_mask(original.shape, row["boxes"], MaskSettings())
    assert keep.mean() > 0.8
    np.testing.assert_array_equal(copy[keep], original[keep])  # PNG: no re-encoding noise
    x1, y1, x2, y2 = (int(v) for v in row["boxes"][0])
    face_change = np.abs(copy[y1:y2, x1:x2].astype(int) - original[y1:y2, x1:x2]).mean()
    assert face_change > 10


def test_exif_rotated_photo_is_blurred_where_shown_written_upright_without_gps(run, photos):
    out, _, _ = run
    row = by_name(read_record(str(out)))["rotated.jpg"]
    shown = decode_image((photos / "people" / "rotated.jpg").read_bytes())  # as a viewer shows it
    assert shown.shape == (192, 256, 3)
    face = REFERENCE.detect([shown])[0]
    assert len(face) == 1
    data = (out / "people" / "rotated.jpg").read_bytes()
    stored = decode_image(data, orientation=False)  # the pixels as written: upright, no tag needed
    assert stored.shape == shown.shape and (row["width"], row["height"]) == (256, 192)
    assert len(REFERENCE.detect([stored])[0]) == 0
    # The mask covers the face the viewer sees.
    x1, y1, x2, y2 = face.boxes[0]
    assert any(b[0] <= x1 + 4 and b[1] <= y1 + 4 and b[2] >= x2 - 4 and b[3] >= y2 - 4 for b in row["boxes"])
    keep = outside_mask(shown.shape, row["boxes"], MaskSettings())
    difference = np.abs(stored.astype(int) - shown)[keep].mean()
    assert difference < 3.0, difference  # JPEG quality 95 re-encoding only
    assert b"Exif\0\0" not in data and GPS_LATITUDE not in data
    assert ICC_BODY in data  # the colour profile kept


def test_a_resumed_run_writes_no_file_twice(run, photos):
    out, _, _ = run
    files = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    summary = anonymize(AnonymizeConfig(str(photos), str(out), batch_size=2, show_progress=False))
    assert summary.images == 0 and summary.skipped == 4
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()
             and p.name != "_lease.json"}
    assert after == {p: v for p, v in files.items() if p.name != "_lease.json"}


def test_other_settings_are_refused_and_output_inside_input_too(run, photos):
    out, _, _ = run
    with pytest.raises(ValueError, match="other settings.*mode"):
        anonymize(AnonymizeConfig(str(photos), str(out), MaskSettings(mode="solid"), show_progress=False))
    with pytest.raises(ValueError, match="inside it"):
        anonymize(AnonymizeConfig(str(photos), str(photos / "copies"), show_progress=False))


def test_preview_page_shows_originals_beside_copies(run):
    _, summary, page = run
    text = (page / "index.html").read_text()
    assert summary.preview == str(page / "index.html")
    assert text.count("-original.jpg") == 3 and text.count("-anonymized.jpg") == 3


# -- boxes of an annotate run --------------------------------------------------------------------

def test_annotations_run_boxes_are_hidden_instead_of_detecting(ray_session, photos, tmp_path):
    # A made-up annotate run: one box on the coffee photo (which has no face) and no row for the
    # astronaut. The mask goes where the run says, and the image it lacks becomes a transient row.
    coffee = photos / "things" / "coffee.png"
    image = decode_image(coffee.read_bytes())
    box = np.array([[40, 30, 120, 110]], np.float32)
    table = annotation_table([str(coffee)], [(image.shape[1], image.shape[0])],
                             [Detections(box, np.array([0.99], np.float32), np.zeros((1, 5, 2), np.float32))],
                             [None])
    runs = tmp_path / "faces"
    runs.mkdir()
    commit_rows(table, str(runs), {}, "{}")
    out = tmp_path / "out"
    anonymize(AnonymizeConfig(str(photos / "things"), str(out), MaskSettings(mode="solid", shape="box"),
                              annotations=str(runs), show_progress=False))
    rows = by_name(read_record(str(out)))
    assert rows["coffee.png"]["boxes"] == box.tolist() and rows["coffee.png"]["faces_hidden"] == 1
    copy = decode_image((out / "coffee.png").read_bytes())
    left, top, right, bottom = mask_region(box[0], 1.3, image.shape[1], image.shape[0])
    assert copy[top:bottom, left:right].max() == 0
    keep = outside_mask(image.shape, box, MaskSettings())
    np.testing.assert_array_equal(copy[keep], image[keep])
    assert rows["broken.jpg"]["error_kind"] == "permanent"


# -- S3 in and out --------------------------------------------------------------------------------

def test_s3_in_and_out_through_the_command_line(ray_session, s3_server, photos, capsys):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir("anon-in")
    fs.mkdir("anon-out")
    fs.put_file(str(photos / "people" / "astronaut.png"), "anon-in/photos/astronaut.png")
    fs.pipe_file("anon-in/photos/broken.png", b"\x89PNG not really")
    secret = "s3cr3t-Value-0f-the-test-4201"
    options = json.dumps({"key": "AKIAANONYMIZETEST", "secret": secret, "client_kwargs": {"endpoint_url": s3_server}})
    status = main(["anonymize", "s3://anon-in/photos", "s3://anon-out/copies", "--mode", "pixelate",
                   "--shape", "box", "--batch-size", "1", "--storage-options", options])
    assert status == 0
    printed = capsys.readouterr()
    assert "anonymized 1 images" in printed.out and secret not in printed.out + printed.err
    parts = committed_parts("s3://anon-out/copies")
    assert parts and not any(secret.encode() in fs.cat_file(part) for part in parts)
    rows = by_name(pq.read_table(parts, filesystem=fs))
    assert rows["broken.png"]["error"] is not None and not fs.exists("anon-out/copies/broken.png")
    assert rows["astronaut.png"]["output_path"] == "s3://anon-out/copies/astronaut.png"
    copy = decode_image(fs.cat_file("anon-out/copies/astronaut.png"))
    original = decode_image((photos / "people" / "astronaut.png").read_bytes())
    keep = outside_mask(original.shape, rows["astronaut.png"]["boxes"], MaskSettings())
    np.testing.assert_array_equal(copy[keep], original[keep])
    assert len(REFERENCE.detect([copy])[0]) == 0


# -- pieces, without Ray --------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["blur", "pixelate", "solid"])
@pytest.mark.parametrize("shape", ["ellipse", "box"])
def test_masks_change_only_pixels_inside_the_grown_box(mode, shape):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    box = np.array([[50.0, 30.0, 90.0, 80.0]])
    settings = MaskSettings(mode=mode, shape=shape)
    hidden = hide_faces(image, box, settings)
    changed = np.any(hidden != image, axis=2)
    keep = outside_mask(image.shape, box, settings)
    assert not changed[keep].any() and changed[~keep].mean() > (0.7 if shape == "ellipse" else 0.95)
    if mode == "solid":
        assert hidden[55, 70].max() == 0


def test_relative_names():
    assert relative_name("/data/in/a/b.jpg", "/data/in") == "a/b.jpg"
    assert relative_name("s3://bucket/in/a.png", "s3://bucket/in") == "a.png"
    assert relative_name("s3://other/x/a.png", "s3://bucket/in") == "other/x/a.png"
    assert relative_name("/elsewhere/a.jpg", "/data") == "elsewhere/a.jpg"


def test_keep_metadata_keeps_exif_upright_without_its_thumbnail():
    thumbnail = b"\xff\xd8THUMBNAIL-OF-THE-FACE\xff\xd9"
    tiff = upright_exif(exif_tiff(6, thumbnail))
    assert tiff is not None and thumbnail not in tiff and GPS_LATITUDE in tiff
    assert struct.unpack("<H", tiff[8 + 2 + 8:8 + 2 + 10])[0] == 1  # Orientation: as stored
    source = rotated_jpeg(displayed_photo())
    image = decode_image(source)
    kept = encode_image(image, source, ".jpg", MaskSettings(keep_metadata=True))
    dropped = encode_image(image, source, ".jpg", MaskSettings())
    assert GPS_LATITUDE in kept and GPS_LATITUDE not in dropped and ICC_BODY in kept and ICC_BODY in dropped
    # Written upright with orientation 1: shown as it is stored.
    assert decode_image(kept).shape == decode_image(kept, orientation=False).shape == image.shape


def test_flags_come_from_the_config_with_recall_defaults():
    from jobs.cli import build_parser
    from jobs.common.settings import config_from_args

    parser = build_parser(only="anonymize")
    config = config_from_args(AnonymizeConfig, parser.parse_args(["anonymize", "in", "out"]))
    assert config == AnonymizeConfig("in", "out")
    assert config.detector.min_face_size == 14 and config.detector.thresholds == (0.6, 0.6, 0.6)
    assert config.masks == MaskSettings(mode="blur", mask_scale=1.3, shape="ellipse", quality=95)
    given = parser.parse_args(["anonymize", "in", "out", "--mode", "pixelate", "--mask-scale", "1.5", "--shape",
                               "box", "--keep-metadata", "--annotations", "runs/faces", "--min-face-size", "20"])
    config = config_from_args(AnonymizeConfig, given)
    assert config.masks == MaskSettings(mode="pixelate", mask_scale=1.5, shape="box", keep_metadata=True)
    assert config.annotations == "runs/faces" and config.detector.min_face_size == 20
    with pytest.raises(ValueError, match="--mask-scale"):
        MaskSettings(mask_scale=0.5)


# -- a killed driver ------------------------------------------------------------------------------

def test_a_driver_killed_mid_run_then_rerun_gives_one_row_per_input_and_rewrites_no_recorded_copy(
        ray_session, tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for index in range(32):  # hard links of one photo with a face
        os.link(DATA / "astronaut.png", folder / f"img {index:03d}.png")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    job = subprocess.Popen([sys.executable, "-m", "jobs.cli", "anonymize", str(folder), str(out), "--batch-size",
                            "2", "--rows-per-file", "4", "--concurrency", "1"], cwd=ROOT, env=environment,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not committed_parts(str(out)) and job.poll() is None:
        assert time.monotonic() < deadline, "timed out waiting for a first committed part"
        time.sleep(0.1)
    assert job.poll() is None, job.communicate()[1][-2000:]
    job.send_signal(signal.SIGKILL)
    job.wait()
    recorded = read_record(str(out))
    assert 0 < recorded.num_rows < 32
    # The copies whose rows were committed before the kill, as they are on disk.
    before = {row["output_path"]: (os.stat(row["output_path"]).st_ino, os.stat(row["output_path"]).st_mtime_ns)
              for row in recorded.to_pylist()}

    # The rerun takes the dead driver's lease (same host, its process gone) and does the rest.
    summary = anonymize(AnonymizeConfig(str(folder), str(out), batch_size=4, show_progress=False))
    rows = read_record(str(out)).to_pylist()
    assert summary.skipped == recorded.num_rows and summary.images == 32 - recorded.num_rows
    assert sorted(row["path"] for row in rows) == sorted(str(p) for p in folder.iterdir())  # each once
    assert all(row["error"] is None and row["faces_hidden"] == 1 for row in rows)
    assert {path: (os.stat(path).st_ino, os.stat(path).st_mtime_ns) for path in before} == before
    assert sorted(p.name for p in out.glob("img *.png")) == sorted(p.name for p in folder.iterdir())
    # What the killed run's workers left half-written was in one scratch folder, swept by the rerun.
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name == "_anonymize_tmp"]


# -- memory, as annotate ----------------------------------------------------------------------------

def test_an_image_that_does_not_fit_the_memory_budget_is_detected_shrunk_and_masked_in_full(tmp_path):
    from jobs.inputs.reading import ReadFailure, ReadPolicy
    from jobs.pipelines.anonymize import FaceAnonymizer
    from jobs.pipelines.image_run import detection_scale
    from mtcnn import DetectorConfig, estimate_peak_bytes, load_weights, shrunk

    image = cv2.cvtColor(cv2.imread(str(DATA / "astronaut.png")), cv2.COLOR_BGR2RGB)
    height, width = image.shape[:2]
    config = DetectorConfig()
    full = estimate_peak_bytes(height, width, config)
    # The rule annotate and anonymize share: a budget under the full-size estimate gives a copy that fits.
    budget = int(0.9 * full)
    scale = detection_scale(height, width, config, budget, None)
    assert scale < 1 and estimate_peak_bytes(*shrunk(image, scale).shape[:2], config) <= budget
    assert detection_scale(height, width, config, None, 256) == 0.5
    with pytest.raises(ReadFailure) as failure:
        detection_scale(height, width, config, 1000, None)
    assert failure.value.kind == "transient" and "--memory-per-actor" in failure.value.reason

    worker = FaceAnonymizer(load_weights("reference"), config, use_gpu=False, threads=1, settings=MaskSettings(),
                            storage_options={}, policy=ReadPolicy(), output=str(tmp_path), base="/", lease=None)
    exact = worker._faces([image], ["a.png"])[0]
    worker.budget = budget
    fitted, starved = worker._faces([image, image], ["a.png", "b.png"])[0], None
    worker.budget = 1000
    starved = worker._faces([image], ["b.png"])[0]
    # Found on the shrunk copy, the box is in the full image's pixels, where the mask is drawn.
    assert len(exact) == len(fitted) == 1 and np.abs(fitted[0] - exact[0]).max() < 0.1 * width
    assert isinstance(starved, tuple) and starved[1] == "transient"
