"""An OUTPUT of Parquet parts: each committed whole or not at all, named by its rows, one job at a time.

The commit protocol, locally and on object storage:
- A part is serialised in memory first, so a failure while writing Parquet never touches OUTPUT.
- Locally it goes to a hidden temporary file in OUTPUT, is fsynced, then renamed into place (a
  rename is atomic). On an object store it is one PUT (or one multipart upload, which the store
  only shows once completed): an interrupted upload leaves no object, never a truncated one.
- A part's name is a digest of the paths in it. A retried write (Ray retries a task whose worker
  died) makes the same name and so replaces, never duplicates. Resume reads only names of the
  form part-<digest>.parquet; temporary files are never read.
- A temporary file is removed when its write fails (a full disk leaves none behind); one left by a
  killed writer is removed by the next run after an hour.
- A part that cannot be read (truncated by a foreign tool, a disk error) is named, with how to set
  it aside, rather than reported as a bare Parquet error.
The lease that keeps a second job out is jobs/output/lease.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.common.storage import filesystem, is_remote, join

PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
#: Rows per Parquet row group: DuckDB, Polars and Spark parallelise over row groups.
ROW_GROUP_ROWS = 16_384


class OutputError(ValueError):
    """OUTPUT cannot be written, is held by another job, or holds results of other settings."""


class DamagedPart(OutputError):
    """A committed part that cannot be read; the message names it and how to set it aside."""

    exit_status = 1


def part_name(paths: list[str]) -> str:
    """The part file name for a set of input paths (the same set, the same name)."""
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(paths):
        digest.update(path.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return f"{PART_PREFIX}{digest.hexdigest()}{PART_SUFFIX}"


def is_part(name: str) -> bool:
    """Whether a file name is a committed part (temporary and other files are not)."""
    base = name.rsplit("/", 1)[-1]
    return base.startswith(PART_PREFIX) and base.endswith(PART_SUFFIX)


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as the bytes of one Parquet file (zstd, row groups of ROW_GROUP_ROWS)."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    return buffer.getvalue()


def commit_file(output: str, name: str, data: bytes, storage_options: dict | None = None) -> str:
    """Write data as OUTPUT/name atomically; the file's full path."""
    fs, root = filesystem(output, storage_options)
    final = join(root, name)
    write_whole(fs, final, data, is_remote(output))
    if not is_remote(output):
        _fsync_folder(root)
    return final


def write_whole(fs, target: str, data: bytes, remote: bool, scratch: str | None = None) -> None:
    """target written whole or not at all: one PUT on object stores; locally a hidden temporary
    beside it, or in scratch (a folder on the same file system, which a job can sweep), fsynced,
    then renamed into place (folders made if need be)."""
    if remote:
        fs.pipe_file(target, data)
        return
    folder, name = os.path.split(target)
    os.makedirs(folder, exist_ok=True)
    if scratch is not None:
        os.makedirs(scratch, exist_ok=True)
    temporary = os.path.join(scratch or folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        # A full disk or an interrupt: the half-written temporary goes, the old file (if any) stays.
        try:
            os.remove(temporary)
        except OSError:
            pass
        raise


def read_part(fs, path: str, columns: list[str] | None = None) -> pa.Table:
    """One committed part (or some of its columns); DamagedPart naming it if it cannot be read."""
    with fs.open(path, "rb") as handle, naming_damage(path):
        return pq.read_table(handle, columns=columns)


@contextlib.contextmanager
def naming_damage(path: str):
    """Arrow's errors about a file's bytes ("magic bytes not found") as DamagedPart naming the file.

    Arrow's own errors are about the bytes (no footer, a cut page); the store's errors come through
    as the filesystem raised them and stay the caller's to retry."""
    try:
        yield
    except pa.ArrowException as error:
        raise DamagedPart(damaged_message(path, error)) from None


def damaged_message(path: str, error: BaseException) -> str:
    """'part X cannot be read (...): rename it ...' for a part that is not whole Parquet."""
    text = str(error).strip().splitlines()
    reason = text[0] if text else type(error).__name__
    return (f"{path} cannot be read ({reason}); it is not whole Parquet (a copy cut short?). Set it "
            f"aside by renaming it (e.g. to {path.rsplit('/', 1)[-1]}.damaged, which no job reads) "
            "and run again: its images are annotated again")


def committed_parts(output: str, storage_options: dict | None = None) -> list[str]:
    """Full paths of the committed parts in OUTPUT, sorted (listed, never globbed)."""
    fs, root = filesystem(output, storage_options)
    try:
        names = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if is_part(name))


def remove_stale_temporaries(output: str, max_age_seconds: float = 3600.0) -> int:
    """Delete local temporary files older than max_age_seconds left by killed writers; how many."""
    if is_remote(output):
        return 0  # object stores have no temporaries: a part is one PUT
    removed = 0
    root = os.path.abspath(output)
    for entry in os.scandir(root):
        if entry.name.startswith(f".{PART_PREFIX}") and entry.name.endswith(".tmp"):
            if time.time() - entry.stat().st_mtime > max_age_seconds:
                os.remove(entry.path)
                removed += 1
    return removed


def _fsync_folder(folder: str) -> None:
    # The rename is durable once the folder's entry is on disk too.
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
