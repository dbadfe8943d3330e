"""The OUTPUT lease with real processes: a paused holder, a second PID namespace, a clock ahead.

Each holder is a separate Python process that takes the lease and then commits a part every
0.2 s through the fencing check, as a job does; it prints what it does and exits 1 once it finds
the lease lost. The lease's ttl is seconds here (120 in a job), so the tests wait for states.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from jobs.output import LEASE_NAME, Lease, LeaseLost, OutputError
from jobs.common.storage import filesystem, join

REPO = Path(__file__).resolve().parents[1]
TTL, BEAT = 3.0, 0.5

HOLDER = textwrap.dedent("""
    import sys, time
    from jobs.output import Lease, LeaseLost
    from jobs.output.parts import commit_file
    output, owner, ttl, beat, clock_ahead = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
    if clock_ahead:
        real = time.time
        time.time = lambda: real() + clock_ahead
    lease = Lease(output, {}, owner, ttl_seconds=ttl, heartbeat_seconds=beat)
    lease.acquire()
    print("held", flush=True)
    count = 0
    while True:
        try:
            lease.check()
        except LeaseLost as error:
            print("lost:", error, flush=True)
            sys.exit(1)
        commit_file(output, f"{owner}-{count}.txt", b"x", {})
        count += 1
        time.sleep(0.2)
""")


def _start_holder(output: str, owner: str, prefix: list[str] = (), clock_ahead: float = 0.0) -> subprocess.Popen:
    process = subprocess.Popen([*prefix, sys.executable, "-c", HOLDER, output, owner, str(TTL), str(BEAT),
                                str(clock_ahead)], stdout=subprocess.PIPE, text=True, cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    assert process.stdout.readline().strip() == "held"
    return process


def _kill(process: subprocess.Popen) -> None:
    """SIGKILL the holder and everything in its session (unshare's child outlives unshare)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _record(output: str) -> dict:
    fs, root = filesystem(output, {})
    return json.loads(fs.cat_file(join(root, LEASE_NAME)))


def _wait_for(condition, timeout: float = 60.0, what: str = "a state") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _commits(output: str, owner: str) -> int:
    return len(list(Path(output).glob(f"{owner}-*.txt")))


@pytest.fixture
def output(tmp_path) -> str:
    folder = tmp_path / "out"
    folder.mkdir()
    return str(folder)


def test_a_paused_holder_never_takes_back_a_lease_it_lost(output):
    a = _start_holder(output, "job-a")
    try:
        _wait_for(lambda: _commits(output, "job-a") > 2, what="A committing")
        a.send_signal(signal.SIGSTOP)  # a VM pause, a swap storm, a partition
        stopped_at = time.time()
        _wait_for(lambda: time.time() - _record(output)["heartbeat"] > TTL, what="A's lease to expire")
        b = Lease(output, {}, "job-b", ttl_seconds=TTL, heartbeat_seconds=BEAT)
        b.acquire()
        a_commits = _commits(output, "job-a")
        a.send_signal(signal.SIGCONT)
        # A finds the lease lost at its next fencing check (or beat) and stops, having written nothing more.
        out, _ = a.communicate(timeout=30)
        assert a.returncode == 1 and "lost:" in out and "job-b" in out
        assert _commits(output, "job-a") == a_commits
        # A's heartbeat thread never wrote its name back: B still holds it, several beats later.
        time.sleep(4 * BEAT)
        assert _record(output)["owner"] == "job-b"
        b.check()
        assert stopped_at < _record(output)["heartbeat"]
        b.release()
    finally:
        _kill(a)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_a_live_holder_in_another_pid_namespace_on_this_host_is_not_taken_over(output):
    # A container on the host network: the same host name, its own PID namespace.
    a = _start_holder(output, "job-a", prefix=["unshare", "--pid", "--fork", "--mount-proc"])
    try:
        record = _record(output)
        assert record["pid_namespace"] != os.readlink("/proc/self/ns/pid")
        # A's pid means nothing here (in this namespace it may be no process, or another one).
        with pytest.raises(OutputError, match="in use by another"):
            Lease(output, {}, "job-b", ttl_seconds=TTL, heartbeat_seconds=BEAT).acquire()
        assert a.poll() is None and _record(output)["owner"] == "job-a"
    finally:
        _kill(a)
    # Killed, it lets go after the ttl (its pid cannot be checked from here).
    b = Lease(output, {}, "job-b", ttl_seconds=TTL, heartbeat_seconds=BEAT)
    _wait_for(lambda: time.time() - _record(output)["heartbeat"] > TTL, what="A's lease to expire")
    b.acquire()
    b.release()


def test_a_holder_killed_on_this_host_lets_go_at_once(output):
    a = _start_holder(output, "job-a")
    _kill(a)
    started = time.monotonic()
    b = Lease(output, {}, "job-b", ttl_seconds=60, heartbeat_seconds=BEAT)
    b.acquire()  # same host, boot and PID namespace, pid gone: no need to wait for the ttl
    assert time.monotonic() - started < 10
    b.release()


def test_a_lease_dated_an_hour_ahead_by_a_dead_host_blocks_for_one_ttl_not_an_hour(output):
    fs, root = filesystem(output, {})
    fs.pipe_file(join(root, LEASE_NAME), json.dumps({
        "owner": "crashed-host:7:abcd", "generation": 4, "beat": 9, "heartbeat": time.time() + 3600,
        "host": "crashed-host", "pid": 7}).encode())
    started = time.monotonic()
    b = Lease(output, {}, "job-b", ttl_seconds=TTL, heartbeat_seconds=BEAT)
    b.acquire()
    waited = time.monotonic() - started
    assert TTL <= waited < TTL + 10, waited
    assert _record(output)["generation"] == 5  # a take-over is a new generation
    b.release()


def test_a_live_holder_whose_clock_runs_ahead_is_not_taken_over(output):
    a = _start_holder(output, "job-a", clock_ahead=3600.0)
    try:
        with pytest.raises(OutputError, match="in use by another"):
            Lease(output, {}, "job-b", ttl_seconds=TTL, heartbeat_seconds=BEAT).acquire()
        assert a.poll() is None
    finally:
        _kill(a)


def test_the_lease_on_s3_is_swapped_on_condition(s3_server):
    import s3fs

    s3 = s3fs.S3FileSystem()
    s3.mkdir("lease-cas")
    output = "s3://lease-cas/out"
    a = Lease(output, {}, "job-a", ttl_seconds=TTL, heartbeat_seconds=BEAT)
    a.acquire()
    a._stop.set()  # A's heartbeat stalls, as in a paused process
    _wait_for(lambda: time.time() - json.loads(s3.cat_file("lease-cas/out/" + LEASE_NAME))["heartbeat"] > TTL,
              what="A's lease to expire")
    b = Lease(output, {}, "job-b", ttl_seconds=TTL, heartbeat_seconds=BEAT)
    b.acquire()
    # A wakes: a conditional write from its stale read is refused by the store itself.
    stale = a._read()
    stale.etag = '"0123456789abcdef0123456789abcdef"'
    assert not a._write_if_unchanged(stale)
    with pytest.raises(LeaseLost, match="job-b"):
        a.check()
    assert json.loads(s3.cat_file("lease-cas/out/" + LEASE_NAME))["owner"] == "job-b"
    b.release()
    # Released: the record says so, and the next job takes it at once.
    c = Lease(output, {}, "job-c", ttl_seconds=60, heartbeat_seconds=BEAT)
    c.acquire()
    c.release()
