"""Listing INPUT: local folders, object-store prefixes over a real S3 endpoint, and manifests."""

import os
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.inputs.sources import InputError, list_inputs
from jobs.common.storage import filesystem


@pytest.fixture
def folder(tmp_path):
    """Images in nested folders with mixed-case extensions, names with spaces, and other files."""
    names = ["a.jpg", "b.JPEG", "sub/c.png", "sub/deeper/d.Bmp", "sub/é photo.webp", "x.tif",
             "y.TIFF", "notes.txt", "data.json", "sub/.hidden.jpgx", "noext"]
    for name in names:
        path = tmp_path / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return tmp_path / "images"


def test_folder_is_listed_recursively_by_extension_any_case(folder):
    paths = list_inputs(str(folder))
    relative = sorted(os.path.relpath(p, folder) for p in paths)
    assert relative == sorted(["a.jpg", "b.JPEG", "sub/c.png", "sub/deeper/d.Bmp", "sub/é photo.webp",
                               "x.tif", "y.TIFF"])
    assert all(os.path.isabs(p) for p in paths)


def test_text_manifest_resolves_relative_paths_skips_comments_and_repeats(folder, tmp_path):
    manifest = folder / "list.txt"
    manifest.write_text("# my images\na.jpg\n\nsub/é photo.webp\n  a.jpg  \n/abs/elsewhere.png\n"
                        "s3://bucket/key.jpg\n", encoding="utf-8")
    assert list_inputs(str(manifest)) == [str(folder / "a.jpg"), str(folder / "sub" / "é photo.webp"),
                                          "/abs/elsewhere.png", "s3://bucket/key.jpg"]


def test_parquet_manifest_reads_the_path_column(folder):
    manifest = folder / "list.parquet"
    pq.write_table(pa.table({"path": ["sub/c.png", str(folder / "a.jpg")], "label": [1, 2]}), manifest)
    assert list_inputs(str(manifest)) == [str(folder / "sub" / "c.png"), str(folder / "a.jpg")]


def test_parquet_manifest_without_path_column_is_a_clear_error(folder):
    manifest = folder / "list.parquet"
    pq.write_table(pa.table({"file": ["a.jpg"]}), manifest)
    with pytest.raises(InputError, match="no 'path' column"):
        list_inputs(str(manifest))
    (folder / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        list_inputs(str(folder / "broken.parquet"))


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list_inputs(str(tmp_path / "nowhere"))


def test_single_file_is_its_own_list(folder):
    assert list_inputs(str(folder / "a.jpg")) == [str(folder / "a.jpg")]


def test_s3_prefix_and_manifest_over_a_real_endpoint(s3_server):
    bucket = f"sources-{uuid.uuid4().hex[:8]}"
    fs, _ = filesystem(f"s3://{bucket}")
    fs.mkdir(bucket)
    for key in ["in/a.jpg", "in/sub/b.PNG", "in/sub/readme.md", "other/c.jpg"]:
        fs.pipe(f"{bucket}/{key}", b"x")
    assert list_inputs(f"s3://{bucket}/in") == [f"s3://{bucket}/in/a.jpg", f"s3://{bucket}/in/sub/b.PNG"]
    fs.pipe(f"{bucket}/lists/todo.txt", b"../other/c.jpg\ns3://elsewhere/d.jpg\n")
    assert list_inputs(f"s3://{bucket}/lists/todo.txt") == [f"s3://{bucket}/other/c.jpg",
                                                            "s3://elsewhere/d.jpg"]
    with pytest.raises(InputError, match="does not exist"):
        list_inputs(f"s3://{bucket}/missing-prefix")


def test_a_text_manifest_cut_into_byte_ranges_lists_every_line_once(tmp_path, monkeypatch):
    import jobs.inputs.sources as sources

    lines = [f"s3://bucket/folder {i}/image-{i * 7919 % 1000:04d}.jpg" for i in range(500)]
    manifest = tmp_path / "big.txt"
    manifest.write_text("# a comment\n" + "\n".join(lines) + "\n\n")
    monkeypatch.setattr(sources, "TEXT_SHARD_BYTES", 97)  # shards end in the middle of lines
    shards = sources.plan_shards(str(manifest))
    assert len(shards) > 100
    listed = [p for shard in shards for chunk in shard.chunks(chunk_paths=7) for p in chunk]
    assert listed == lines
    assert all(len(chunk) <= 7 for shard in shards for chunk in shard.chunks(chunk_paths=7))


def test_a_parquet_manifest_is_cut_at_row_groups(tmp_path):
    from jobs.inputs.sources import plan_shards

    paths = [f"/images/{i}.jpg" for i in range(250_000)]
    pq.write_table(pa.table({"path": paths}), tmp_path / "m.parquet", row_group_size=30_000)
    shards = plan_shards(str(tmp_path / "m.parquet"))
    assert len(shards) == 3  # ~100k paths each, cut where row groups end
    assert [p for shard in shards for chunk in shard.chunks() for p in chunk] == paths


def test_a_store_other_than_s3_is_listed_by_fsspec_find():
    folder = f"/sources-{uuid.uuid4().hex[:8]}"
    fs, _ = filesystem(f"memory://{folder}")
    fs.pipe({f"{folder}/in/b.jpg": b"x", f"{folder}/in/a/c.PNG": b"x", f"{folder}/in/notes.txt": b"x"})
    try:
        assert list_inputs(f"memory://{folder}/in") == [f"memory://{folder}/in/a/c.PNG",
                                                        f"memory://{folder}/in/b.jpg"]
    finally:
        fs.rm(folder, recursive=True)
