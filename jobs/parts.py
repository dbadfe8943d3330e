"""An OUTPUT of Parquet parts: each committed whole or not at all, named by its rows, one job at a time.

The commit protocol, locally and on object storage:
- A part is serialised in memory first, so a failure while writing Parquet never touches OUTPUT.
- Locally it goes to a hidden temporary file in OUTPUT, is fsynced, then renamed into place (a
  rename is atomic). On an object store it is one PUT (or one multipart upload, which the store
  only shows once completed): an interrupted upload leaves no object, never a truncated one.
- A part's name is a digest of the paths in it. A retried write (Ray retries a task whose worker
  died) makes the same name and so replaces, never duplicates. Resume reads only names of the
  form part-<digest>.parquet; temporary files are never read.
- A lease file (_lease.json) with a heartbeat keeps a second job out of an OUTPUT that one holds.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from .storage import filesystem, is_remote, join

PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
LEASE_NAME = "_lease.json"
#: Rows per Parquet row group: DuckDB, Polars and Spark parallelise over row groups.
ROW_GROUP_ROWS = 16_384


class OutputError(ValueError):
    """OUTPUT cannot be written, is held by another job, or holds results of other settings."""


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
    if is_remote(output):
        fs.pipe_file(final, data)
        return final
    temporary = join(root, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    _fsync_folder(root)
    return final


def remove_file(output: str, path: str, storage_options: dict | None = None) -> None:
    """Delete one file of OUTPUT (its full path inside the filesystem)."""
    fs, _ = filesystem(output, storage_options)
    fs.rm_file(path)


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


# -- the lease -------------------------------------------------------------------------------

@dataclass
class Lease:
    """One job's hold on an OUTPUT, renewed by a heartbeat thread until released."""

    output: str
    storage_options: dict
    owner: str
    ttl_seconds: float = 120.0
    heartbeat_seconds: float = 20.0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fs, root = filesystem(self.output, self.storage_options)
        self.path = join(root, LEASE_NAME)

    def acquire(self) -> None:
        """Take the lease, or raise OutputError naming the job that holds it."""
        holder = self._read()
        if holder is not None and holder.get("owner") != self.owner and not _holder_is_gone(holder):
            age = time.time() - float(holder.get("heartbeat", 0))
            if age < self.ttl_seconds:
                raise OutputError(
                    f"OUTPUT {self.output} is in use by another annotate job ({holder.get('owner')}, "
                    f"last heartbeat {age:.0f} s ago); wait for it to finish or choose another OUTPUT. "
                    f"A job that was killed lets go after {self.ttl_seconds:.0f} s")
        self._write()
        # Two jobs that both saw a free (or expired) lease both wrote it: the later write wins,
        # and the job that reads back someone else's name backs off.
        time.sleep(0.2)
        holder = self._read()
        if holder is None or holder.get("owner") != self.owner:
            raise OutputError(f"OUTPUT {self.output} was taken by another job that started at the "
                              "same moment; choose another OUTPUT or retry later")
        self._thread = threading.Thread(target=self._beat, name="output-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise OutputError unless the lease file still names this owner (a fencing check)."""
        holder = self._read()
        if holder is None or holder.get("owner") != self.owner:
            raise OutputError(f"this job no longer holds OUTPUT {self.output} (held by "
                              f"{(holder or {}).get('owner', 'nobody')}); its rows were not written")

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file (if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._read()
        if holder is not None and holder.get("owner") == self.owner:
            try:
                self.fs.rm_file(self.path)
            except OSError:
                pass

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                self._write()
            except Exception:  # noqa: BLE001 - a missed beat is retried at the next one
                pass

    def _read(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {"owner": "unreadable lease file", "heartbeat": 0}

    def _write(self) -> None:
        record = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                  "heartbeat": time.time()}
        data = json.dumps(record).encode()
        if is_remote(self.output):
            self.fs.pipe_file(self.path, data)
        else:
            commit_file(self.output, LEASE_NAME, data)


def _holder_is_gone(holder: dict) -> bool:
    """Whether a lease's holder was a process on this host that no longer runs (killed, say)."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False


def new_owner() -> str:
    """A job identity for the lease: host, process and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
