"""Reading one image for the job: byte and pixel limits, retries, and whose fault a failure is.

A failure is *permanent* when it is the file's own (gone, not an image, over a limit): the row is
final. It is *transient* when anything else is to blame (network, throttling, credentials, time
outs, memory, the detector): such rows are written with error_kind 'transient' and redone by the
next run. Transient reads are retried here first, with exponential backoff.

Whose fault it is follows from the exception's type and, for object stores, the error code the
store answered with (found on the exception's chain), never from words in its message: a path
may contain any word.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from jobs.inputs.decode import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, DecodeError, decode_image, image_size
from jobs.common.redaction import public_path, redact_text
from jobs.common.storage import filesystem

PERMANENT = "permanent"
TRANSIENT = "transient"
NOT_FOUND = "file not found (moved or deleted after listing?)"

#: A file that does not decode and was modified less than this long ago may still be being
#: written (a copy or download in progress, or one that stalled for a moment): its failure is
#: transient, so that the next run reads it again. Two minutes is longer than a copy stalls
#: between writes, and short enough that a really broken new file is final on a rerun soon after.
RECENT_WRITE_SECONDS = 120


@dataclass(frozen=True)
class ReadPolicy:
    """Limits and retries for reading images."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    #: Attempts after the first for a transient failure; waits of backoff_seconds * 2**attempt.
    retries: int = 4
    backoff_seconds: float = 0.5


@dataclass
class ReadFailure(Exception):
    """Why an image could not be read, and whether that is final."""

    reason: str
    kind: str

    def __str__(self) -> str:
        return self.reason


class _Permanent(Exception):
    """A failure that retrying cannot fix, with its message for the row."""


class FileChanged(Exception):
    """The file's size or contents changed while it was read (still being written or replaced)."""


def read_bytes(path: str, storage_options: dict, policy: ReadPolicy) -> bytes:
    """The file's bytes, retried on transient failures; raises ReadFailure."""
    return _read_retried(path, storage_options, policy)[0]


def _read_retried(path: str, storage_options: dict, policy: ReadPolicy) -> tuple[bytes, float | None]:
    """The file's bytes and modification time (None when the store gives none), with retries."""
    attempt = 0
    while True:
        try:
            return _read_once(path, storage_options, policy.max_bytes)
        except _Permanent as error:
            raise ReadFailure(str(error), PERMANENT) from None
        except Exception as error:  # noqa: BLE001 - classified below
            reason, kind = classify(error)
            if kind == PERMANENT or attempt >= policy.retries:
                raise ReadFailure(reason, kind) from None
        time.sleep(policy.backoff_seconds * 2 ** attempt)
        attempt += 1


def read_image(path: str, storage_options: dict, policy: ReadPolicy) -> np.ndarray:
    """RGB pixels of one image as displayed; raises ReadFailure with its kind."""
    return read_image_and_bytes(path, storage_options, policy)[0]


def read_image_and_bytes(path: str, storage_options: dict, policy: ReadPolicy) -> tuple[np.ndarray, bytes]:
    """read_image's pixels and the file's bytes (for a job that copies parts of the file, such as
    its colour profile, into what it writes); raises ReadFailure with its kind."""
    data, modified = _read_retried(path, storage_options, policy)
    inject_crash(path)
    try:
        return decode_image(data, policy.max_pixels), data
    except DecodeError as error:
        raise _decode_failure(error, data, modified, policy.max_pixels) from None
    except MemoryError:
        raise ReadFailure("out of memory decoding the image; lower --max-pixels or --batch-size",
                          TRANSIENT) from None


def _decode_failure(error: DecodeError, data: bytes, modified: float | None, max_pixels: int) -> ReadFailure:
    """A decode failure, transient when the file may still be being written: modified less than
    RECENT_WRITE_SECONDS ago, and not refused by a whole header (a pixel count over the limit, or
    none), which the rest of the file would not change."""
    age = None if modified is None else time.time() - modified
    size = image_size(data)
    # Either side of now: a store's clock may run a little ahead of this machine's.
    if age is None or abs(age) >= RECENT_WRITE_SECONDS or \
            (size is not None and not 0 < size[0] * size[1] <= max_pixels):
        return ReadFailure(str(error), PERMANENT)
    return ReadFailure(f"{error}; the file was modified {max(age, 0):.0f} s ago and may still be "
                       "being written: retried by the next run", TRANSIENT)


def classify(error: BaseException) -> tuple[str, str]:
    """(message for the row, 'permanent' or 'transient') for an exception from reading a file."""
    # Store errors can quote the URL they were given, presigned query and all.
    text = redact_text(first_line(error))
    if "NoSuchBucket" in _store_error_codes(error):
        # s3fs reports a missing bucket as FileNotFoundError, the store's answer on its chain:
        # the input's fault (a typo, a bucket not yet made), not the file's.
        return f"no such bucket: {text}", TRANSIENT
    if isinstance(error, FileNotFoundError):
        return NOT_FOUND, PERMANENT
    if isinstance(error, IsADirectoryError):
        return "is a folder, not an image file", PERMANENT
    if isinstance(error, PermissionError):
        # Locally a mode bit, remotely missing or expired credentials: fixable, so not final.
        return f"permission denied reading the file: {text}", TRANSIENT
    if isinstance(error, MemoryError):
        return "out of memory reading the file", TRANSIENT
    if isinstance(error, _changed_errors()):
        return f"file changed while it was read ({text}); retried by the next run", TRANSIENT
    name = type(error).__name__
    if isinstance(error, _network_errors()):
        return (f"store unreachable or not answering ({name}: {text}); retried by the next run",
                TRANSIENT)
    return f"cannot read: {name}: {text}", TRANSIENT


def _store_error_codes(error: BaseException | None) -> list[str]:
    """The error codes object stores answered with (botocore's ClientError.response), on the
    exception and the ones it was raised from or while handling."""
    codes: list[str] = []
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        response = getattr(error, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            codes.append(str(response["Error"].get("Code")))
        error = error.__cause__ or error.__context__
    return codes


@functools.cache
def _changed_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean the file changed under the read (s3fs: another ETag mid-read)."""
    from s3fs.utils import FileExpired

    return FileChanged, FileExpired


@functools.cache
def _network_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean the store could not be reached or did not answer in time.

    botocore's and aiohttp's are not all OSErrors; imported here, on a failure, not with the module.
    """
    import aiohttp
    from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError

    return (ConnectionError, TimeoutError, asyncio.TimeoutError, BotoConnectionError, HTTPClientError,
            aiohttp.ClientError)


def _read_once(path: str, storage_options: dict, max_bytes: int) -> tuple[bytes, float | None]:
    """The file's bytes and modification time, checked against what the file was when opened."""
    inject_read_failure(path)
    fs, inner = filesystem(path, storage_options)
    with fs.open(inner, "rb") as handle:
        size, modified = _opened_state(fs, inner, handle)
        if size is not None and size > max_bytes:
            raise _Permanent(f"file is {size / 1e6:.1f} MB, over the limit of {max_bytes / 1e6:g} MB; "
                             "raise --max-bytes to annotate it")
        # One byte past the limit tells a file that grew (or a size the store did not give).
        data = handle.read(max_bytes + 1)
    if size is not None and len(data) != size:
        # A copy in progress, or a file replaced between the open and the read: the bytes are
        # not the image the file will be, so they are not a verdict on it.
        raise FileChanged(f"{size} bytes when opened, {len(data)} read")
    if len(data) > max_bytes:
        raise _Permanent(f"file is over the limit of {max_bytes / 1e6:g} MB; raise --max-bytes to annotate it")
    return data, modified


def _opened_state(fs, inner: str, handle) -> tuple[int | None, float | None]:
    """(size, modification time) of an open file: one fstat locally; elsewhere what the store
    said when the file was opened (s3fs's HEAD), or one info call when the handle kept nothing."""
    if isinstance(fs, LocalFileSystem):
        stat = os.fstat(handle.fileno())
        return stat.st_size, stat.st_mtime
    details = getattr(handle, "details", None) or fs.info(inner)
    size = details.get("size")
    return (None if size is None else int(size)), _timestamp(
        details.get("mtime") or details.get("LastModified") or details.get("last_modified"))


def _timestamp(value) -> float | None:
    """Seconds since the epoch from a file's details (a number, a datetime or ISO text)."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return value.timestamp() if isinstance(value, datetime) else None


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type when there is none."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# -- fault injection -------------------------------------------------------------------------
# MTCNN_JOBS_FAILPOINTS, for tests of the job's fault handling with real processes:
#   "fail_reads=N:TEXT"  the first N reads in a process of each path containing TEXT raise
#                        ConnectionError (a transient failure)
#   "kill_on=TEXT"       the process decoding a path containing TEXT kills itself with SIGKILL
#                        (as a decoder crash or the kernel's OOM killer would)
# Unset (always, outside tests) it costs one dictionary lookup per read.

_reads_failed: dict[str, int] = {}


def _failpoints() -> dict[str, str]:
    spec = os.environ.get("MTCNN_JOBS_FAILPOINTS", "")
    return dict(item.split("=", 1) for item in spec.split(";") if "=" in item)


def inject_read_failure(path: str) -> None:
    """Apply MTCNN_JOBS_FAILPOINTS to a read of path (a no-op when it is unset)."""
    if "MTCNN_JOBS_FAILPOINTS" not in os.environ:
        return
    points = _failpoints()
    if "fail_reads" in points:
        count, text = points["fail_reads"].split(":", 1)
        if text in path and _reads_failed.get(path, 0) < int(count):
            _reads_failed[path] = _reads_failed.get(path, 0) + 1
            raise ConnectionError(f"injected transient failure {_reads_failed[path]} of {count}")


def inject_crash(path: str) -> None:
    """Apply MTCNN_JOBS_FAILPOINTS' kill_on to the decoding of path (a no-op when it is unset)."""
    if "MTCNN_JOBS_FAILPOINTS" not in os.environ:
        return
    points = _failpoints()
    if "kill_on" in points and points["kill_on"] in path:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def probe_reads(paths: list[str], storage_options: dict, policy: ReadPolicy) -> str | None:
    """Why the job should not start, when the listing's first images all fail the same way, or None.

    One transient reason for all of them (no credentials, no such bucket, no endpoint) is not the
    images' fault: annotating on would record a run of rows that only say so. None of them found
    at all most often means paths written relative to another folder than the one they are read
    from. Either way the job stops before anything is marked done.
    """
    from concurrent.futures import ThreadPoolExecutor

    if not paths:
        return None

    def outcome(path: str):
        try:
            read_bytes(path, storage_options, policy)
            return None
        except ReadFailure as failure:
            return failure

    with ThreadPoolExecutor(len(paths)) as pool:
        failures = list(pool.map(outcome, paths))
    if any(failure is None for failure in failures) or len({f.reason for f in failures}) != 1:
        return None
    failure = failures[0]
    if failure.kind == TRANSIENT:
        return (f"the first {len(paths)} images all fail to read the same way, which is not the "
                f"images' fault: {failure.reason}; fix access (credentials, bucket, endpoint) and run again")
    if failure.reason == NOT_FOUND:
        return (f"none of the first {len(paths)} images exists (the first is {public_path(paths[0])}); "
                "check the paths: relative ones in a manifest are read from the manifest's folder")
    return None
