"""One job at a time per OUTPUT: a lease file renewed by compare-and-swap, and the fencing check.

`OUTPUT/_lease.json` names its holder, a generation (one more at each take-over) and a beat count.
Every write of it is conditional on what the writer last read:
- on S3 (and stores that speak its API) by `If-Match` on the object's ETag, or `If-None-Match: *`
  when there is none yet, so the store itself refuses a write based on a stale read;
- on a local or mounted filesystem under an exclusive `flock` of `OUTPUT/_lease.lock`, held
  across a re-read and the rename of a record written beforehand (microseconds: nothing slow);
- elsewhere (other fsspec stores) by reading back what was written: best effort, and said so.
So a job that was paused (SIGSTOP, a VM pause, a partition) past the lease's expiry and then goes
on cannot take the lease back: its heartbeat finds another holder and marks the lease lost, and
`check()`, which every commit calls first, refuses from then on.

Whether a holder is alive:
- its heartbeat is younger than `ttl_seconds` by the reader's clock (clocks may differ by up to
  MAX_CLOCK_SKEW seconds); or
- it is a process on this host, with the same boot and PID namespace, that still runs; a process
  that is gone lets go at once. A pid means nothing across hosts, boots or PID namespaces (a
  container on the host network shares the host name), so no pid is checked there.
A heartbeat dated in the future by more than the skew (a crashed host whose clock ran ahead) is
not trusted: the lease is watched for up to ttl_seconds by the reader's own clock and taken if it
never beats. So a dead holder blocks an OUTPUT for at most ttl_seconds, whatever its clock said.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from jobs.common.storage import filesystem, is_remote, join
from jobs.output.parts import OutputError

LEASE_NAME = "_lease.json"
LOCK_NAME = "_lease.lock"
#: Owners whose jobs in this process have ended (released, or failed to release).
_GIVEN_UP: set[str] = set()
#: Seconds to wait for the local lease lock (held for microseconds by a running process).
LOCK_WAIT_SECONDS = 30.0
#: Seconds by which the clocks of two hosts sharing an OUTPUT may differ and leases still work.
MAX_CLOCK_SKEW = 30.0


class LeaseLost(OutputError):
    """Another job took OUTPUT while this one was paused or cut off: this job writes no more."""

    exit_status = 1


def new_owner() -> str:
    """A job identity for the lease: host, process and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _read_text(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def _process_identity() -> dict:
    """Where a pid means something: the host, its boot and the PID namespace."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = None
    return {"host": socket.gethostname(), "boot": _read_text("/proc/sys/kernel/random/boot_id"),
            "pid_namespace": namespace, "pid": os.getpid()}


@dataclass
class _Version:
    """A lease record as read, with what a conditional write of it needs."""

    record: dict | None
    etag: str | None = None


@dataclass
class Lease:
    """One job's hold on an OUTPUT, renewed by a heartbeat thread until released."""

    output: str
    storage_options: dict
    owner: str
    ttl_seconds: float = 120.0
    heartbeat_seconds: float = 20.0
    #: The command holding it, for messages ("in use by another annotate job").
    job: str = "annotate"
    #: Set once a beat or a check found another holder: nothing may be committed after it.
    lost: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fs, self.root = filesystem(self.output, self.storage_options)
        self.path = join(self.root, LEASE_NAME)
        self.generation = 0
        self._beats = 0
        self._taken_by: dict | None = None
        self._local = not is_remote(self.output)
        self._s3 = type(self.fs).__module__.startswith("s3fs")

    # -- the protocol ------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lease, or raise OutputError naming the job that holds it."""
        watched_since: float | None = None
        first_seen: dict | None = None
        while True:
            version = self._read()
            holder = version.record
            verdict = self._judge(holder)
            if verdict == "future" and first_seen is not None:
                if not _same_beat(first_seen, holder):
                    verdict = "live"  # dated ahead, but it beats: a live job with a fast clock
                elif time.monotonic() - watched_since >= self.ttl_seconds:
                    verdict = "free"  # dated ahead, and silent for a whole ttl by our clock
            if verdict == "live":
                age = time.time() - float(holder.get("heartbeat", 0))
                raise OutputError(
                    f"OUTPUT {self.output} is in use by another {holder.get('job') or 'annotate'} job "
                    f"({holder.get('owner')}, "
                    f"last heartbeat {max(age, 0):.0f} s ago); wait for it to finish or choose "
                    f"another OUTPUT. A job that was killed lets go after {self.ttl_seconds:.0f} s")
            if verdict == "free":
                self.generation = int((holder or {}).get("generation", 0)) + 1
                self._beats = 0
                if self._write_if_unchanged(version):
                    break
                continue  # another job wrote in between: look again
            # Dated in the future: watch whether it still beats, by this host's clock.
            if first_seen is None:
                first_seen, watched_since = holder, time.monotonic()
            time.sleep(min(self.heartbeat_seconds, max(0.1, self.ttl_seconds / 10)))
        self.lost.clear()
        self._thread = threading.Thread(target=self._beat, name="output-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise LeaseLost unless this job still holds the lease (the fencing check of a commit).

        Workers that commit parts themselves call it on a copy made by `fence()`: no heartbeat,
        the same owner and generation."""
        if self.lost.is_set():
            raise self._lost_error(self._taken_by)
        holder = self._read().record
        if not self._mine(holder):
            self._lose(holder)
            raise self._lost_error(holder)

    def fence(self) -> "Lease":
        """A copy for another process that only checks (it is sent to workers that commit)."""
        copy = Lease(self.output, self.storage_options, self.owner, self.ttl_seconds, self.heartbeat_seconds,
                     self.job)
        copy.generation = self.generation
        return copy

    def __getstate__(self) -> dict:
        # Threads, events and filesystems stay in this process; the copy opens its own.
        return {"output": self.output, "storage_options": self.storage_options, "owner": self.owner,
                "ttl_seconds": self.ttl_seconds, "heartbeat_seconds": self.heartbeat_seconds,
                "job": self.job, "generation": self.generation}

    def __setstate__(self, state: dict) -> None:
        generation = state.pop("generation")
        self.__init__(**state)
        self.generation = generation

    def release(self) -> None:
        """Stop the heartbeat and give the lease up, if it is still this job's."""
        # Known here even when the store cannot be told (it is down): a later job in this process
        # may take the lease at once instead of waiting for the record to expire.
        _GIVEN_UP.add(self.owner)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost.is_set():
            return
        with contextlib.suppress(Exception):
            if self._local:
                with self._exclusive():
                    if self._mine(self._read().record):
                        self.fs.rm_file(self.path)
                return
            version = self._read()
            if self._mine(version.record):
                # A conditional delete is not on every store: a released record, written on
                # condition, frees it as well and can never remove a newer holder's lease.
                self._write_if_unchanged(version, released=True)

    # -- parts -------------------------------------------------------------------------------

    def _judge(self, holder: dict | None) -> str:
        """'free', 'live' or 'future' (dated ahead by more than the skew) for a lease record."""
        if holder is None or holder.get("released") or holder.get("owner") in (self.owner, *_GIVEN_UP):
            return "free"
        if _holder_is_gone(holder):
            return "free"
        age = time.time() - float(holder.get("heartbeat", 0))
        if age < -MAX_CLOCK_SKEW:
            return "future"
        return "live" if age < self.ttl_seconds else "free"

    def _mine(self, holder: dict | None) -> bool:
        return (holder is not None and not holder.get("released") and holder.get("owner") == self.owner
                and int(holder.get("generation", 0)) == self.generation)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                version = self._read()
                if not self._mine(version.record):
                    # Taken while this job was paused or cut off: never write it back.
                    self._lose(version.record)
                    return
                self._beats += 1
                if not self._write_if_unchanged(version):
                    self._lose(self._read().record)
                    return
            except Exception:  # noqa: BLE001 - a missed beat (store down) is retried at the next
                pass

    def _lose(self, holder: dict | None) -> None:
        self._taken_by = holder
        self.lost.set()

    def _record(self, released: bool = False) -> dict:
        return {"owner": self.owner, "job": self.job, "generation": self.generation, "beat": self._beats,
                "heartbeat": time.time(), "ttl": self.ttl_seconds, "released": released,
                **_process_identity()}

    def _lost_error(self, holder: dict | None = None) -> LeaseLost:
        who = (holder or {}).get("owner") or "another job"
        return LeaseLost(f"this job lost OUTPUT {self.output} to {who} (it was paused or cut off for "
                         f"longer than the lease's {self.ttl_seconds:.0f} s); it stopped writing. "
                         "Every committed part is kept; the job now holding OUTPUT goes on")

    # -- reading and conditional writing -----------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self):
        """An exclusive flock of OUTPUT/_lease.lock, held only across a re-read and a rename.

        Nothing slow happens under it (the new record is written and fsynced before), so a
        process stopped while holding it is unlikely; one that is stopped there holds everybody
        else off for as long as it stays stopped, which waiting LOCK_WAIT_SECONDS then says."""
        import fcntl

        os.makedirs(self.root, exist_ok=True)
        descriptor = os.open(join(self.root, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + LOCK_WAIT_SECONDS
            while True:
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise OutputError(
                            f"{join(self.root, LOCK_NAME)} stayed locked for {LOCK_WAIT_SECONDS:.0f} s: a "
                            "process holding it is stopped (SIGSTOP, a paused VM); continue or kill it") from None
                    time.sleep(0.02)
            yield
        finally:
            os.close(descriptor)  # closing releases the lock

    def _read(self) -> _Version:
        etag = None
        try:
            if self._s3:
                info = self.fs.info(self.path, refresh=True)
                etag = info.get("ETag")
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return _Version(None)
        try:
            return _Version(json.loads(data), etag)
        except ValueError:
            return _Version({"owner": "unreadable lease file", "heartbeat": 0}, etag)

    def _swap_local(self, version: _Version, data: bytes) -> bool:
        """Locally: rename a new record into place if the lease is still as `version` read it."""
        temporary = join(self.root, f".{LEASE_NAME}.{uuid.uuid4().hex[:8]}.tmp")
        with open(temporary, "wb") as handle:  # written and synced before the lock is taken
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            with self._exclusive():
                if not _same_record(self._read().record, version.record):
                    return False
                os.replace(temporary, self.path)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary)

    def _write_if_unchanged(self, version: _Version, released: bool = False) -> bool:
        """Write this job's record unless the lease changed since `version` was read; written?"""
        data = json.dumps(self._record(released)).encode()
        if self._local:
            return self._swap_local(version, data)
        if self._s3:
            condition = {"IfMatch": version.etag} if version.etag else {"IfNoneMatch": "*"}
            try:
                self.fs.pipe_file(self.path, data, **condition)
            except Exception as error:  # noqa: BLE001 - a failed precondition is a lost race
                if _precondition_failed(error):
                    return False
                raise
            return True
        # No conditional write here: write, then read back who won.
        self.fs.pipe_file(self.path, data)
        time.sleep(0.2)
        return self._mine(self._read().record) or released


def _same_record(a: dict | None, b: dict | None) -> bool:
    return (a is None) == (b is None) and (a is None or all(a.get(k) == b.get(k) for k in
                                                             ("owner", "generation", "beat", "heartbeat")))


def _precondition_failed(error: BaseException) -> bool:
    for cause in (error, error.__cause__, error.__context__):
        response = getattr(cause, "response", None) or {}
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status in (409, 412) or response.get("Error", {}).get("Code") in (
                "PreconditionFailed", "ConditionalRequestConflict"):
            return True
    return False


def _same_beat(first: dict | None, now: dict | None) -> bool:
    keys = ("owner", "generation", "beat", "heartbeat")
    return first is not None and now is not None and all(first.get(k) == now.get(k) for k in keys)


def _holder_is_gone(holder: dict) -> bool:
    """Whether a lease's holder was a process here (same host, boot and PID namespace) that has ended."""
    here = _process_identity()
    if any(holder.get(key) != here[key] or here[key] is None
           for key in ("host", "boot", "pid_namespace")):
        return False
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False
