"""The OUTPUT protocol in one class: open (probe, lease, settings, restart or resume), commit, close.

Every job that writes Parquet parts (annotate, crops) goes through `PartsOutput`:
- `check()` before anything is touched: OUTPUT can be written, and what it holds was made with the
  same settings (or the run was asked to restart);
- `open()` takes the lease, removes earlier parts (restart) or scans them (resume), and clears
  temporaries killed writers left;
- `commit(table)` writes one part: fenced by the lease, retried while the store is down,
  content-named and atomic (jobs/output/parts.py);
- `close()` lets the lease go.
`CommitBuffer` sits in front of it where rows arrive in small batches: it commits a part when
rows_per_part rows are buffered *or* the oldest buffered row has waited commit_seconds, and on
flush (a stop), so a kill loses at most commit_seconds of work.
"""

from __future__ import annotations

import enum
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.common.redaction import public_path
# The one wording of what differs between settings records (annotate, crops and train alike);
# jobs.output re-exports it from here.
from jobs.common.settings import settings_difference
from jobs.common.storage import filesystem, is_remote, join
from jobs.output.lease import Lease, new_owner
from jobs.output.parts import (OutputError, commit_file, committed_parts, naming_damage, parquet_bytes,
                    part_name, remove_stale_temporaries)
from jobs.output.resume import ResumeIndex, scan_parts
from jobs.output.store import OutputFull, StorePatience, StoreUnavailable, retry_store

_STORE_FAILURES = (StoreUnavailable, OutputFull)

log = logging.getLogger(__name__)


class OutputMode(enum.Enum):
    """What a job does with the parts an earlier run left in OUTPUT."""

    #: Keep them, skip what they hold for good, redo what is not final.
    RESUME = "resume"
    #: Remove them and start over (--restart, or its older name --overwrite).
    RESTART = "restart"


@dataclass
class PartsOutput:
    """An OUTPUT of Parquet parts that one job holds, commits whole, and resumes."""

    output: str
    storage_options: dict
    #: Key of the run's metadata (JSON) in each part's schema metadata.
    metadata_key: bytes
    #: The metadata stored with every part (credentials already redacted).
    metadata: dict
    #: The part of a run's metadata that changes the rows: runs agreeing on it may share OUTPUT.
    settings_of: Callable[[dict], dict]
    #: The command writing, for messages ("in use by another annotate job").
    job: str = "mtcnn-jobs"
    mode: OutputMode = OutputMode.RESUME
    retry_errors: bool = False
    patience: StorePatience = field(default_factory=StorePatience)
    lease_ttl_seconds: float = 120.0
    lease_heartbeat_seconds: float = 20.0

    def __post_init__(self) -> None:
        self.owner = new_owner()
        self.lease = Lease(self.output, self.storage_options, self.owner,
                           ttl_seconds=self.lease_ttl_seconds, heartbeat_seconds=self.lease_heartbeat_seconds,
                           job=self.job)
        self.parts: list[str] = []
        self.metadata_bytes = json.dumps(self.metadata, sort_keys=True).encode()

    # -- before the run ----------------------------------------------------------------------

    def check(self) -> list[str]:
        """Check OUTPUT can be written and holds results of these settings; its committed parts."""
        try:
            fs, root = filesystem(self.output, self.storage_options)
            if not is_remote(self.output):
                fs.makedirs(root, exist_ok=True)
            probe = join(root, f"_write_test-{self.owner.rsplit(':', 1)[-1]}")
            fs.pipe_file(probe, b"ok")
            fs.rm_file(probe)
            self.parts = committed_parts(self.output, self.storage_options)
        except Exception as error:  # noqa: BLE001 - any failure here means the run cannot start
            text = str(error).strip().splitlines()
            raise OutputError(f"OUTPUT {self.output} is not writable: "
                              f"{text[0] if text else type(error).__name__}") from None
        if self.parts and self.mode is OutputMode.RESUME:
            earlier = self._settings_in(fs, self.parts[0])
            now = self.settings_of(self.metadata)
            if earlier != now:
                raise OutputError(
                    f"OUTPUT {self.output} holds results made with other settings "
                    f"({settings_difference(earlier, now)}); pass --restart (or --overwrite) to "
                    "replace them or choose another OUTPUT")
        return self.parts

    def _settings_in(self, fs, path: str) -> dict:
        with fs.open(path, "rb") as handle, naming_damage(path):
            raw = (pq.read_schema(handle).metadata or {}).get(self.metadata_key)
        return self.settings_of(json.loads(raw)) if raw else {}

    # -- the run -----------------------------------------------------------------------------

    def open(self) -> None:
        """Take the lease; remove earlier parts (restart) and temporaries killed writers left."""
        self.lease.acquire()
        try:
            remove_stale_temporaries(self.output)
            if self.mode is OutputMode.RESTART and self.parts:
                fs, _ = filesystem(self.output, self.storage_options)
                for path in self.parts:
                    retry_store(lambda path=path: fs.rm_file(path), f"removing {path}", self.patience)
                log.info("--restart: removed %d files of earlier runs from %s", len(self.parts),
                         public_path(self.output))
                self.parts = []
        except BaseException:
            self.lease.release()
            raise

    def scan(self) -> ResumeIndex:
        """The resume index of the parts found by check() (after open(): none left on restart)."""
        return scan_parts(self.output, self.storage_options, self.parts, self.retry_errors,
                          patience=self.patience)

    def commit(self, table: pa.Table) -> str:
        """Write rows as one part: fenced, retried while the store is down, atomic; its path."""
        return self.writer(self.lease).commit(table)

    def writer(self, lease: Lease | None = None) -> "PartWriter":
        """What commits parts, for this process or (picklable) for workers that commit their own."""
        return PartWriter(self.output, self.storage_options, self.metadata_key, self.metadata_bytes,
                          lease or self.lease.fence(), self.patience)

    def close(self) -> None:
        """Let go of the lease (if this job still holds it)."""
        self.lease.release()


@dataclass
class PartWriter:
    """Commits parts of one OUTPUT for the job holding its lease: the one commit of every job."""

    output: str
    storage_options: dict
    metadata_key: bytes
    metadata_bytes: bytes
    lease: Lease
    patience: StorePatience

    def commit(self, table: pa.Table) -> str:
        """Write rows as one part named by their paths: fenced, retried while the store is down,
        atomic; its path. The same paths make the same name, so a retried commit replaces."""
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               self.metadata_key: self.metadata_bytes})
        data = parquet_bytes(table)
        name = part_name(table.column("path").to_pylist())

        def fenced_commit() -> str:
            # Fencing: a job that lost its lease (paused past its expiry, cut off, a worker left
            # over from a dead driver) writes nothing more.
            self.lease.check()
            return commit_file(self.output, name, data, self.storage_options)

        return retry_store(fenced_commit, f"writing {name} to {public_path(self.output)}", self.patience)


class CommitBuffer:
    """Rows on their way to OUTPUT: a part at rows_per_part rows, or when the oldest waited commit_seconds."""

    def __init__(self, output: PartsOutput, rows_per_part: int, commit_seconds: float,
                 on_commit: Callable[[pa.Table, str], None] | None = None,
                 finish_part: Callable[[pa.Table], pa.Table] | None = None) -> None:
        self.output, self.rows_per_part, self.commit_seconds = output, rows_per_part, commit_seconds
        self.on_commit = on_commit
        #: Turns a part's buffered rows into what is written (e.g. a column summed up in its
        #: metadata); its schema metadata is kept beside the OUTPUT's own.
        self.finish_part = finish_part
        self._tables: list[pa.Table] = []
        self._rows = 0
        self._oldest: float | None = None
        self._lock = threading.Lock()
        self._failure: BaseException | None = None
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._commit_when_due, name="commit-timer", daemon=True)

    def __enter__(self) -> "CommitBuffer":
        self._timer.start()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self._stop.set()
        self._timer.join(timeout=30)
        if error is None:
            self.flush()  # raises a failure of the timer's commits, if there was one
        elif self._failure is None and not isinstance(error, (OutputError, *_STORE_FAILURES)):
            # A stop (Ctrl-C, SIGTERM, a failure elsewhere): what is buffered is committed before
            # the job ends. After a failure of the commit itself nothing more is tried.
            self.flush()

    def add(self, table: pa.Table) -> None:
        """Buffer rows; commit every full part."""
        self._raise_failure()
        with self._lock:
            if table.num_rows:
                self._tables.append(table)
                self._rows += table.num_rows
                self._oldest = self._oldest or time.monotonic()
            while self._rows >= self.rows_per_part:
                self._commit(self.rows_per_part)

    def flush(self) -> None:
        """Commit everything buffered."""
        self._raise_failure()
        with self._lock:
            while self._rows:
                self._commit(min(self._rows, self.rows_per_part))

    def _commit(self, rows: int) -> None:
        table = pa.concat_tables(self._tables) if len(self._tables) > 1 else self._tables[0]
        part, rest = table.slice(0, rows), table.slice(rows)
        part = part.combine_chunks()
        if self.finish_part is not None:
            part = self.finish_part(part)
        path = self.output.commit(part)
        self._tables = [rest] if rest.num_rows else []
        self._rows = rest.num_rows
        self._oldest = time.monotonic() if self._rows else None
        if self.on_commit is not None:
            self.on_commit(part, path)

    def _commit_when_due(self) -> None:
        while not self._stop.wait(min(1.0, self.commit_seconds / 4)):
            try:
                with self._lock:
                    if self._oldest is not None and time.monotonic() - self._oldest >= self.commit_seconds:
                        while self._rows:
                            self._commit(min(self._rows, self.rows_per_part))
            except BaseException as error:  # noqa: BLE001 - handed to the job's thread
                self._failure = error
                return

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure
