"""Talking to the store that holds OUTPUT: which errors are the store's, and one retry rule for them.

An object store that is unreachable for a while (a restart, a network partition, throttling)
raises errors of several libraries: OSError subclasses from fsspec and the local filesystem,
botocore's BotoCoreError family (EndpointConnectionError is not an OSError), aiohttp's
ClientError, asyncio and fsspec time-outs, and ClientErrors with a 5xx or throttling code. They
are all retried the same way, with backoff, for up to `patience` seconds; a store that stays
down ends the job with one line (StoreUnavailable, exit status 1) and what was committed kept.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

#: errno values that waiting cannot fix: the store is full, or the path is wrong.
_FINAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOTDIR, errno.EISDIR,
                 errno.ENAMETOOLONG, errno.EACCES, errno.EPERM}
#: S3 error codes that are the store's momentary state, not the request's fault.
_RETRY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "503", "500"}


class StoreUnavailable(RuntimeError):
    """The store holding OUTPUT did not answer for longer than the job waits; nothing half written."""

    exit_status = 1  # not the input's fault: 2 is for bad input


class OutputFull(RuntimeError):
    """OUTPUT's disk or quota is full: the job stops; every committed part is whole."""

    exit_status = 1


@dataclass(frozen=True)
class StorePatience:
    """How long to keep trying a store that does not answer."""

    #: Seconds from the first failure after which the job gives up on the store.
    seconds: float = 300.0
    #: First wait; each next one doubles, up to max_backoff.
    backoff: float = 0.5
    max_backoff: float = 15.0


def is_store_error(error: BaseException) -> bool:
    """Whether an error is the store's momentary state (retry it), not a request that cannot work."""
    if isinstance(error, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return False
    if isinstance(error, OSError):
        return error.errno not in _FINAL_ERRNOS
    if isinstance(error, (asyncio.TimeoutError, TimeoutError, ConnectionError)):
        return True
    module = type(error).__module__.split(".")[0]
    if module in ("botocore", "aiobotocore"):
        code = str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))
        # ClientError carries the store's answer: only throttling and server errors are worth waiting for.
        return not code or code in _RETRY_CODES
    if module in ("aiohttp", "urllib3", "requests", "fsspec"):
        return True
    return False


def is_disk_full(error: BaseException) -> bool:
    """Whether an error says the disk (or quota) is full."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def retry_store(call: Callable[[], T], what: str, patience: StorePatience = StorePatience()) -> T:
    """call(), retried with backoff while it fails with a store error, for up to patience.seconds.

    Raises StoreUnavailable (one line naming `what`) when the store stays down, OutputFull when the
    disk is full, and any other error as it is.
    """
    started, attempt = time.monotonic(), 0
    while True:
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - sorted below
            if is_disk_full(error):
                raise OutputFull(f"no space left {what}: free space (or raise the quota) and run "
                                 "the same command again; every committed part is kept") from None
            if not is_store_error(error):
                raise
            waited = time.monotonic() - started
            if waited >= patience.seconds:
                raise StoreUnavailable(
                    f"the store did not answer {what} for {waited:.0f} s "
                    f"({type(error).__name__}: {_first_line(error)}); every committed part is kept: "
                    "run the same command again when it is back") from None
            pause = min(patience.max_backoff, patience.backoff * 2 ** attempt,
                        max(0.0, patience.seconds - waited))
            if attempt == 0 or pause >= patience.max_backoff:
                log.warning("the store did not answer %s (%s); retrying for up to %.0f s", what,
                            type(error).__name__, patience.seconds - waited)
            time.sleep(pause)
            attempt += 1


def _first_line(error: BaseException) -> str:
    from jobs.common.redaction import redact_text

    text = str(error).strip().splitlines()
    return redact_text(text[0]) if text else type(error).__name__
