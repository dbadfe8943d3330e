"""The annotate job's input side under awkward inputs: every entry of a listing is listed or named
by one error entry (keys with '//', folders nested past the recursion limit, symlink loops,
unreadable folders, file names and manifest lines that are not UTF-8, BOMs, binary and mistyped
Parquet path columns), and read failures are someone's fault by their type, not their text
(missing files under folders called 'bucket', missing buckets, unreachable stores, files still
being written). Real files, real symlinks, a real S3 endpoint (moto's server)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from pathlib import Path

import cv2
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import jobs.inputs.sources as sources
from jobs.inputs.reading import (NOT_FOUND, PERMANENT, TRANSIENT, ReadFailure, ReadPolicy, classify, read_bytes,
                          read_image)
from jobs.inputs.sources import InputError, Unlisted, first_inputs, list_entries, list_inputs, plan_shards
from jobs.common.storage import filesystem

DATA = Path(__file__).parent / "data"
#: No retries and no waits: each test looks at the first verdict.
ONCE = ReadPolicy(retries=0, backoff_seconds=0)


def touch(path: Path | bytes) -> None:
    """An (empty) file at path, its folders made first."""
    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb"):
        pass


def arrow_safe(entries) -> None:
    """What the job does with a chunk: each path or name into an Arrow string column."""
    names = [entry if isinstance(entry, str) else entry.name for entry in entries]
    assert pa.array(names, pa.string()).to_pylist() == names


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    """A real photo (the astronaut test image) encoded as JPEG."""
    ok, data = cv2.imencode(".jpg", cv2.imread(str(DATA / "astronaut.png")))
    assert ok
    return data.tobytes()


# -- listing ---------------------------------------------------------------------------------

def test_s3_keys_with_double_slashes_are_listed_across_pages_in_key_order(s3_server):
    bucket = f"inputs-slashes-{uuid.uuid4().hex[:8]}"
    fs, _ = filesystem(f"s3://{bucket}")
    fs.mkdir(bucket)
    # Over one page of 1,000 keys, so the listing streams through pages.
    keys = ["in//a.jpg", "in/sub//b.jpg", "in/c.jpg", "in/sub/d.PNG", "in///e.png"] + \
           [f"in/many/{i:04d}.jpg" for i in range(1000)]
    fs.pipe({f"{bucket}/{key}": b"x" for key in keys + ["in/readme.md", "in/folder/", "other/f.jpg"]})
    listed = list_inputs(f"s3://{bucket}/in")
    assert listed == sorted(f"s3://{bucket}/{key}" for key in keys)
    assert list_inputs(f"s3://{bucket}") == sorted(f"s3://{bucket}/{key}" for key in keys + ["other/f.jpg"])


def test_a_folder_nested_deeper_than_the_recursion_limit_is_listed(tmp_path):
    top = tmp_path / "images"
    deep = top
    for _ in range(1101):  # a loop: os.makedirs and Path.mkdir recurse too
        deep.mkdir()
        deep = deep / "d"
    deep = deep.parent
    for path in (top / "a.jpg", deep / "b.jpg", top / "z.jpg"):
        touch(path)
    try:
        assert list_inputs(str(top)) == [str(top / "a.jpg"), str(deep / "b.jpg"), str(top / "z.jpg")]
    finally:
        # shutil.rmtree, and so pytest's cleanup of tmp_path, recurses: empty the chain bottom up.
        os.remove(deep / "b.jpg")
        while deep != top:
            os.rmdir(deep)
            deep = deep.parent


def test_a_symlink_back_to_an_ancestor_is_one_error_entry_and_the_listing_goes_on(tmp_path):
    top = tmp_path / "images"
    for name in ("a.jpg", "sub/b.jpg", "sub/inner/c.jpg", "z.jpg"):
        touch(top / name)
    (top / "sub" / "inner" / "up").symlink_to("../..")   # back to images/
    (top / "sub" / "here").symlink_to(".")                # back to itself
    (top / "itself.jpg").symlink_to("itself.jpg")         # a link to itself: ELOOP on stat
    (top / "elsewhere").symlink_to(top / "sub" / "inner")  # not a loop: followed as before
    entries = list_entries(str(top))
    loops = [entry for entry in entries if isinstance(entry, Unlisted)]
    assert [entry.name for entry in loops] == [str(top / "elsewhere" / "up"), str(top / "itself.jpg"),
                                               str(top / "sub" / "here"), str(top / "sub" / "inner" / "up")]
    assert "a link back to" in loops[0].reason and str(top) in loops[0].reason
    assert "symbolic links" in loops[1].reason
    assert [entry for entry in entries if isinstance(entry, str)] == \
        [str(top / name) for name in ("a.jpg", "elsewhere/c.jpg", "sub/b.jpg", "sub/inner/c.jpg", "z.jpg")]
    arrow_safe(entries)


def test_a_folder_that_cannot_be_read_even_by_root_is_one_error_entry(tmp_path):
    # chmod 000 does not stop root (these tests run as root); a path over PATH_MAX stops anyone.
    top = tmp_path / "images"
    touch(top / "a.jpg")
    touch(top / "z.jpg")
    names, fd = [], os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while len(str(top.joinpath(*names))) <= 4200:
            names.append(f"m{len(names):02d}" + "x" * 200)
            os.mkdir(names[-1], dir_fd=fd)
            inner = os.open(names[-1], os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        os.close(os.open("deep.jpg", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
    finally:
        os.close(fd)
    entries = list_entries(str(top))
    too_long = next(i for i in range(len(names)) if len(str(top.joinpath(*names[:i + 1]))) > 4095)
    assert entries[0] == str(top / "a.jpg") and entries[-1] == str(top / "z.jpg")
    assert entries[1:-1] == [Unlisted(str(top.joinpath(*names[:too_long + 1])),
                                      "cannot be read: File name too long")]


def test_a_file_name_that_is_not_utf8_is_one_error_entry_naming_it(tmp_path):
    top = tmp_path / "images"
    touch(top / "a.jpg")
    touch(top / "z.jpg")
    touch(os.path.join(os.fsencode(top), b"caf\xe9.jpg"))          # Latin-1, as old cameras and zips write
    os.mkdir(os.path.join(os.fsencode(top), b"d\xe9j\xe0"))
    touch(os.path.join(os.fsencode(top), b"d\xe9j\xe0", b"x.jpg"))
    touch(os.path.join(os.fsencode(top), b"notes \xe9.txt"))       # not an image: not listed at all
    entries = list_entries(str(top))
    assert [entries[0], entries[-1]] == [str(top / "a.jpg"), str(top / "z.jpg")]
    assert [entry.name for entry in entries[1:-1]] == [f"{top}/caf\\xe9.jpg", f"{top}/d\\xe9j\\xe0/x.jpg"]
    assert all("not valid UTF-8" in entry.reason and "convmv" in entry.reason for entry in entries[1:-1])
    arrow_safe(entries)
    assert list_inputs(str(top)) == [str(top / "a.jpg"), str(top / "z.jpg")]


def test_a_text_manifest_with_a_bom_lists_its_first_path(tmp_path):
    manifest = tmp_path / "list.txt"
    manifest.write_text("a.jpg\r\nb.jpg\r\n", encoding="utf-8-sig")  # Notepad, PowerShell 7
    assert list_inputs(str(manifest)) == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]


def test_a_utf16_text_manifest_is_refused_up_front(tmp_path):
    manifest = tmp_path / "list.txt"
    manifest.write_text("a.jpg\nb.jpg\n", encoding="utf-16")  # Windows PowerShell 5's '>'
    with pytest.raises(InputError, match=f"manifest {manifest} is UTF-16 text; save it as UTF-8"):
        plan_shards(str(manifest))


def test_manifest_lines_that_are_not_utf8_are_error_entries_named_by_line_in_every_shard(tmp_path,
                                                                                          monkeypatch):
    lines = [f"photo {i:04d}.jpg".encode() if i % 37 else f"caf\xe9 {i:04d}.jpg".encode("latin-1")
             for i in range(600)]
    manifest = tmp_path / "list.txt"
    manifest.write_bytes(sources.UTF8_BOM + b"# first line: a comment\n" + b"\n".join(lines) + b"\n")
    expected = [Unlisted(f"{manifest}:{i + 2}", "manifest line is not UTF-8 text; save the manifest as UTF-8")
                if i % 37 == 0 else str(tmp_path / f"photo {i:04d}.jpg") for i in range(600)]
    assert list_entries(str(manifest)) == expected
    # The job's probe reads paths only: the first chunk's error entry is passed over.
    assert first_inputs(plan_shards(str(manifest)), count=3) == [str(tmp_path / f"photo {i:04d}.jpg")
                                                                  for i in (1, 2)]
    monkeypatch.setattr(sources, "TEXT_SHARD_BYTES", 101)  # shards start in the middle of lines
    shards = plan_shards(str(manifest))
    assert len(shards) > 50
    assert [entry for shard in shards for chunk in shard.chunks(chunk_paths=5) for entry in chunk] == expected


@pytest.mark.parametrize("kind", [pa.binary(), pa.large_binary()])
def test_a_binary_parquet_path_column_is_decoded_and_bad_values_are_named_by_row(tmp_path, kind):
    rows = 200_001
    paths = [f"{i}.jpg".encode() for i in range(rows)]
    paths[1], paths[150_000], paths[2] = "caf\xe9.jpg".encode("latin-1"), b"\xff.jpg", None
    manifest = tmp_path / "list.parquet"
    pq.write_table(pa.table({"path": pa.array(paths, kind)}), manifest, row_group_size=100_000)
    shards = plan_shards(str(manifest))
    assert len(shards) == 3
    entries = [entry for shard in shards for chunk in shard.chunks() for entry in chunk]
    assert [entry for entry in entries if isinstance(entry, Unlisted)] == [
        Unlisted(f"{manifest}:row 1", "path is not UTF-8 text"),
        Unlisted(f"{manifest}:row 150000", "path is not UTF-8 text")]
    assert len(entries) == rows - 1  # the null is no entry, as in string columns
    assert entries[0] == str(tmp_path / "0.jpg") and entries[-1] == str(tmp_path / f"{rows - 1}.jpg")


@pytest.mark.parametrize("column, shown", [
    (pa.array([1, 2]), "int64"),
    (pa.array([["a.jpg"], ["b.jpg"]]), "list<element: string>"),
    (pa.array([{"file": "a.jpg"}, {"file": "b.jpg"}]), "struct<file: string>"),
])
def test_a_parquet_path_column_that_is_not_text_is_refused_up_front(tmp_path, column, shown):
    manifest = tmp_path / "list.parquet"
    pq.write_table(pa.table({"path": column}), manifest)
    with pytest.raises(InputError) as error:
        plan_shards(str(manifest))
    assert str(error.value) == (f"manifest {manifest} has a 'path' column of type {shown}; "
                                "it must be text (string or UTF-8 binary)")


# -- whose fault -----------------------------------------------------------------------------

def test_a_missing_local_file_under_a_folder_named_bucket_is_permanent(tmp_path):
    folder = tmp_path / "photo-bucket"
    folder.mkdir()
    with pytest.raises(ReadFailure) as failure:
        read_bytes(str(folder / "x.jpg"), {}, ONCE)
    assert (failure.value.reason, failure.value.kind) == (NOT_FOUND, PERMANENT)


def test_on_s3_a_missing_key_is_permanent_and_only_a_missing_bucket_is_transient(s3_server):
    bucket = f"my-bucket-photos-{uuid.uuid4().hex[:8]}"
    fs, _ = filesystem(f"s3://{bucket}")
    fs.mkdir(bucket)
    fs.pipe(f"{bucket}/my-bucket-photos/here.jpg", b"x")
    for path in (f"s3://{bucket}/x.jpg", f"s3://{bucket}/my-bucket-photos/x.jpg"):
        with pytest.raises(ReadFailure) as failure:
            read_bytes(path, {}, ONCE)
        assert (failure.value.reason, failure.value.kind) == (NOT_FOUND, PERMANENT)
    with pytest.raises(ReadFailure) as failure:
        read_bytes(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x.jpg", {}, ONCE)
    assert failure.value.kind == TRANSIENT and failure.value.reason.startswith("no such bucket: ")


def test_an_unreachable_store_is_transient(s3_server):
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    options = {"client_kwargs": {"endpoint_url": closed},
               "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}
    with pytest.raises(ReadFailure) as failure:
        read_bytes("s3://any-bucket/x.jpg", options, ONCE)
    assert failure.value.kind == TRANSIENT
    assert failure.value.reason.startswith("store unreachable or not answering (EndpointConnectionError: ")


def test_store_errors_that_are_not_oserrors_are_transient_and_show_no_credentials():
    import aiohttp
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError

    url = ("http://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY@store.example/b/x.jpg"
           "?X-Amz-Signature=0123456789abcdef0123456789abcdef&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE")
    errors = [EndpointConnectionError(endpoint_url=url), ConnectTimeoutError(endpoint_url=url),
              ReadTimeoutError(endpoint_url=url), aiohttp.ClientConnectionError(f"cannot connect to {url}"),
              aiohttp.ServerDisconnectedError(), asyncio.TimeoutError()]
    for error in errors:
        reason, kind = classify(error)
        assert kind == TRANSIENT
        assert reason.startswith(f"store unreachable or not answering ({type(error).__name__}")
        assert "AKIA" not in reason and "wJalr" not in reason and "0123456789abcdef" not in reason


def test_a_truncated_jpeg_is_transient_while_fresh_and_permanent_once_old(tmp_path, jpeg):
    path = tmp_path / "copying.jpg"
    path.write_bytes(jpeg[:len(jpeg) // 2])
    with pytest.raises(ReadFailure) as failure:
        read_image(str(path), {}, ONCE)
    assert failure.value.kind == TRANSIENT
    assert "truncated JPEG" in failure.value.reason and "may still be being written" in failure.value.reason
    hour_ago = time.time() - 3600
    os.utime(path, (hour_ago, hour_ago))
    with pytest.raises(ReadFailure) as failure:
        read_image(str(path), {}, ONCE)
    assert (failure.value.reason, failure.value.kind) == ("truncated JPEG: the file ends before the image "
                                                          "data does", PERMANENT)


def test_a_fresh_file_whose_whole_header_is_over_the_pixel_limit_is_permanent(tmp_path):
    # More bytes would not change a header's pixel count: no reason to wait for them.
    ok, png = cv2.imencode(".png", cv2.imread(str(DATA / "astronaut.png")))
    path = tmp_path / "big.png"
    path.write_bytes(png.tobytes())
    with pytest.raises(ReadFailure) as failure:
        read_image(str(path), {}, ReadPolicy(max_pixels=100_000, retries=0))
    assert failure.value.kind == PERMANENT and "megapixels" in failure.value.reason


def test_a_truncated_jpeg_just_uploaded_to_s3_is_transient(s3_server, jpeg):
    bucket = f"inputs-fresh-{uuid.uuid4().hex[:8]}"
    fs, _ = filesystem(f"s3://{bucket}")
    fs.mkdir(bucket)
    fs.pipe(f"{bucket}/half.jpg", jpeg[:len(jpeg) // 2])
    with pytest.raises(ReadFailure) as failure:
        read_image(f"s3://{bucket}/half.jpg", {}, ONCE)
    assert failure.value.kind == TRANSIENT and "may still be being written" in failure.value.reason


def test_a_file_read_while_it_is_being_copied_never_fails_permanently(tmp_path, jpeg):
    path = tmp_path / "copying.jpg"
    path.write_bytes(b"")
    done = threading.Event()

    def copy_slowly():
        with open(path, "ab") as out:
            for start in range(0, len(jpeg), 2048):
                out.write(jpeg[start:start + 2048])
                out.flush()
                time.sleep(0.001)
        done.set()

    writer = threading.Thread(target=copy_slowly)
    writer.start()
    verdicts = []
    while not done.is_set():
        try:
            read_image(str(path), {}, ONCE)
            verdicts.append("read")
        except ReadFailure as failure:
            verdicts.append(failure.kind)
    writer.join()
    assert PERMANENT not in verdicts and TRANSIENT in verdicts
    assert read_image(str(path), {}, ONCE).shape == (512, 512, 3)


# -- end to end: the annotate job on such inputs ---------------------------------------------

@pytest.mark.slow
def test_the_job_gives_every_awkward_entry_one_row_and_annotates_the_rest(ray_session, tmp_path, jpeg):
    import duckdb

    from jobs.pipelines.annotate import AnnotateConfig, annotate

    folder = tmp_path / "in"
    folder.mkdir()
    deep = folder / "deep"
    for _ in range(1100):  # past the recursion limit; a loop: os.makedirs recurses too
        deep.mkdir()
        deep = deep / "d"
    deep = deep.parent
    (deep / "bottom.jpg").write_bytes(jpeg)
    (folder / "good.jpg").write_bytes(jpeg)
    (folder / "sub").mkdir()
    (folder / "sub" / "loop").symlink_to(folder)  # a link back to an ancestor
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.jpg"), "wb") as handle:  # Latin-1 name
        handle.write(jpeg)
    manifest = tmp_path / "list.txt"
    manifest.write_bytes(b"\xef\xbb\xbf" + str(folder / "good.jpg").encode() + b"\n"  # a BOM first
                         + str(folder).encode() + b"/caf\xe9.jpg\n" + str(folder / "gone.jpg").encode() + b"\n")
    try:
        for source, expected in ((folder, 4), (manifest, 3)):
            output = tmp_path / f"out-{source.name}"
            summary = annotate(AnnotateConfig(str(source), str(output), show_progress=False))
            rows = duckdb.sql(f"select path, len(faces), error, error_kind from '{output}/*.parquet'").fetchall()
            assert summary.images == len(rows) == expected and len({row[0] for row in rows}) == expected
            by_path = {path: (faces, error, kind) for path, faces, error, kind in rows}
            assert by_path[str(folder / "good.jpg")] == (1, None, None)  # a BOM did not hide it
            if source == folder:
                latin1 = [path for path in by_path if "caf" in path]  # named with its byte escaped
                assert len(latin1) == 1 and "\\xe9" in latin1[0] and "UTF-8" in by_path[latin1[0]][1]
                assert by_path[str(deep / "bottom.jpg")] == (1, None, None)
                loop = [row for path, row in by_path.items() if "loop" in path]
                assert len(loop) == 1 and loop[0][2] == "permanent"
            else:
                line = by_path[f"{manifest}:2"]  # the line that is not UTF-8, named by its number
                assert "UTF-8" in line[1] and line[2] == "permanent"
                assert by_path[str(folder / "gone.jpg")][2] == "permanent"
    finally:
        # pytest's clean-up recurses; 1,100 levels are taken apart from the bottom up.
        while deep != folder:
            for entry in os.listdir(deep):
                os.remove(deep / entry)
            os.rmdir(deep)
            deep = deep.parent
