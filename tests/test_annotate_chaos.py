"""The annotate job when things fail for real: stops, kills, store outages, a full disk, damaged parts.

Each test ends with exactly one row per input after the job (and, where the fault stops it, a rerun)
is done. Processes are real and killed for real; the store is moto's S3 server over HTTP, stopped
for real; the full disk is a real tmpfs. Tests wait for states (a file, a part, a process), never
for a guessed time.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import duckdb
import pytest

from jobs.pipelines.annotate import AnnotateConfig, annotate
from jobs.output import committed_parts
from jobs.common.storage import filesystem

from test_annotate_faults import DATA, REPO, cli, output_rows, photo_folder, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.chaos]


def ray_processes(title: bytes) -> list[int]:
    """Processes whose Ray title (cmdline 'ray::<title>...') names title."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(b"ray::" + title):
                pids.append(int(entry))
    return pids


def assert_one_row_each(output: str, paths: list[str], faces: int | None = 1) -> list[tuple]:
    rows = output_rows(output)
    assert sorted(path for path, *_ in rows) == sorted(paths)  # each once, none lost
    if faces is not None:
        assert all(count == faces and error is None for _, count, error, _ in rows), rows
    return rows


def test_rows_are_committed_every_commit_seconds_and_on_sigterm_and_exit_130(ray_session, tmp_path):
    paths = photo_folder(tmp_path / "images", 24)
    output = str(tmp_path / "out")
    received = tmp_path / "received"
    # Every image's first read fails (a transient error, retried after 0.5 s): the job takes 12 s or
    # more, and 1,000 rows a part would commit nothing before its end.
    job = cli(["annotate", str(tmp_path / "images"), output, "--batch-size", "1", "--concurrency", "1",
               "--rows-per-file", "1000", "--commit-seconds", "2"],
              env={"MTCNN_JOBS_FAILPOINTS": f"fail_reads=1:img;rows_received={received}"})
    # Parts far smaller than --rows-per-file appear while the job runs: a kill loses 2 s of rows.
    wait_for(lambda: committed_parts(output) or job.poll() is not None, 300, "a part committed by time")
    assert job.poll() is None, job.communicate()
    assert 0 < len(output_rows(output)) < 24
    job.send_signal(signal.SIGTERM)  # `ray job stop`, a scheduler's time-out, a drained node
    _, err = job.communicate(timeout=120)
    assert job.returncode == 130, err
    # Every row the driver held when it was stopped was committed before it exited.
    made = int(received.read_text())
    rows = output_rows(output)
    assert len(rows) == made < 24 and len({path for path, *_ in rows}) == made
    summary = annotate(AnnotateConfig(str(tmp_path / "images"), output, show_progress=False))
    assert summary.skipped == made and summary.images == 24 - made
    assert_one_row_each(output, paths)


def test_an_s3_outage_of_20_seconds_is_waited_out(ray_session, s3_server, stop_s3_for, tmp_path):
    bucket = f"outage-{uuid.uuid4().hex[:8]}"
    fs, _ = filesystem(f"s3://{bucket}")
    fs.mkdir(bucket)
    paths = photo_folder(tmp_path / "images", 16)
    config = AnnotateConfig(str(tmp_path / "images"), f"s3://{bucket}/out", batch_size=2, rows_per_file=2,
                            concurrency=1, show_progress=False)
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=annotate(config)))
    job.start()
    wait_for(lambda: (fs.invalidate_cache() or True) and fs.glob(f"{bucket}/out/part-*"), 240, "a first part")
    stop_s3_for(20.0)  # commits (and their fencing reads) fail with EndpointConnectionError meanwhile
    job.join(timeout=300)
    assert not job.is_alive() and result["summary"].images == 16
    fs.invalidate_cache()
    rows = output_rows_s3(fs, f"s3://{bucket}/out")
    assert sorted(rows) == sorted(paths)


def output_rows_s3(fs, output: str) -> list[str]:
    import pyarrow.parquet as pq

    return [path for part in committed_parts(output)
            for path in pq.read_table(fs.open(part, "rb"), columns=["path"]).column("path").to_pylist()]


def test_a_store_that_stays_down_ends_the_job_with_one_line_and_exit_1(ray_session, s3_server, s3_down, tmp_path,
                                                                       capfd):
    from jobs.cli import main

    bucket = f"down-{uuid.uuid4().hex[:8]}"
    fs, _ = filesystem(f"s3://{bucket}")
    fs.mkdir(bucket)
    paths = photo_folder(tmp_path / "images", 16)
    output = f"s3://{bucket}/out"
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(status=main(
        ["annotate", str(tmp_path / "images"), output, "--batch-size", "1", "--concurrency", "1",
         "--rows-per-file", "2", "--store-patience", "5"])))
    job.start()
    wait_for(lambda: (fs.invalidate_cache() or True) and fs.glob(f"{bucket}/out/part-*") or not job.is_alive(),
             300, "a first part")
    assert job.is_alive()
    with s3_down():  # and back only once the job has ended
        job.join(timeout=120)
    assert not job.is_alive() and result["status"] == 1
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mtcnn-jobs annotate:")]
    assert len(lines) == 1 and "did not answer" in lines[0] and "Traceback" not in err, err
    annotate(AnnotateConfig(str(tmp_path / "images"), output, show_progress=False))
    fs.invalidate_cache()
    assert sorted(output_rows_s3(fs, output)) == sorted(paths)


def test_the_run_state_actor_killed_mid_job_is_rebuilt_and_nothing_is_lost_or_twice(ray_session, tmp_path):
    paths = photo_folder(tmp_path / "images", 24)
    output = str(tmp_path / "out")
    killed: list[int] = []

    def kill_run_state(summary) -> None:
        if not killed and summary.images >= 2:
            for pid in ray_processes(b"RunState"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    config = AnnotateConfig(str(tmp_path / "images"), output, batch_size=1, concurrency=1, rows_per_file=3,
                            show_progress=False)
    summary = annotate(config, on_rows=kill_run_state)
    assert killed, "no RunState process was found to kill"
    assert summary.images == 24
    assert_one_row_each(output, paths)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_disk_ends_the_job_with_one_line_and_no_temporary_left(ray_session, tmp_path, capfd):
    from jobs.cli import main

    paths = photo_folder(tmp_path / "images", 30)
    disk = tmp_path / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        output = str(disk / "out")
        # Each part is about 4 KB: the disk fills after a dozen or so.
        capfd.readouterr()
        assert main(["annotate", str(tmp_path / "images"), output, "--batch-size", "1", "--rows-per-file", "1"]) == 1
        err = capfd.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("mtcnn-jobs annotate:")]
        assert len(lines) == 1 and "no space left" in lines[0] and "Traceback" not in err, err
        assert not [name for name in os.listdir(output) if name.endswith(".tmp")]
        kept = output_rows(output)
        assert 0 < len(kept) < 30 and len({path for path, *_ in kept}) == len(kept)
        # Space again: the same command goes on from what was committed.
        shutil.copytree(output, tmp_path / "out")
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    annotate(AnnotateConfig(str(tmp_path / "images"), str(tmp_path / "out"), show_progress=False))
    assert_one_row_each(str(tmp_path / "out"), paths)


def test_a_damaged_part_is_named_by_annotate_export_and_evaluate(ray_session, tmp_path, capfd):
    from jobs.cli import main

    photo_folder(tmp_path / "images", 6)
    output = tmp_path / "out"
    annotate(AnnotateConfig(str(tmp_path / "images"), str(output), rows_per_file=2, show_progress=False))
    damaged = committed_parts(str(output))[1]
    data = Path(damaged).read_bytes()
    Path(damaged).write_bytes(data[: len(data) // 2])  # a copy cut short
    name = Path(damaged).name
    capfd.readouterr()
    for args in (["annotate", str(tmp_path / "images"), str(output)],
                 ["export", str(output), "--format", "csv", str(tmp_path / "faces.csv")]):
        assert main(args) == 1
        err = capfd.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("mtcnn-jobs")]
        assert len(lines) == 1 and name in lines[0] and ".damaged" in lines[0] and "Traceback" not in err, err
    # Set aside as the message says, the part's images are annotated again.
    os.rename(damaged, damaged + ".damaged")
    annotate(AnnotateConfig(str(tmp_path / "images"), str(output), show_progress=False))
    assert len(output_rows(str(output))) == 6


def test_a_huge_legal_image_in_a_memory_limited_job_is_detected_shrunk_not_killed(tmp_path):
    import cv2
    import numpy as np

    from test_detector_memory import _make_cgroup, _remove_cgroup

    # 7168 x 7168 (51 Mpx, under the 100 Mpx limit): detecting it whole needs about 4 GB beyond the
    # process; the whole job (Ray included) gets 5 GiB, as a container or a scheduler would give it.
    folder = tmp_path / "images"
    photo = cv2.imread(str(DATA / "astronaut.png"))
    folder.mkdir()
    ok, data = cv2.imencode(".jpg", np.tile(photo, (14, 14, 1)))
    (folder / "huge.jpg").write_bytes(data.tobytes())
    paths = photo_folder(folder, 2) + [str(folder / "huge.jpg")]
    cgroup = _make_cgroup(5 << 30)
    if cgroup is None:
        pytest.skip("no memory cgroup can be made here")
    try:
        job = subprocess.Popen(
            ["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$0" -m jobs.cli "$@"', sys.executable,
             "annotate", str(folder), str(tmp_path / "out"), "--batch-size", "1"],
            cwd=REPO, env={k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = job.communicate(timeout=600)
    finally:
        _remove_cgroup(cgroup)
    assert job.returncode == 0, err
    rows = {path: [len(faces or []), error, scale, max((face["box"][2] for face in faces or []), default=None)]
            for path, faces, error, scale in duckdb.sql(
                f"select path, faces, error, scale from '{tmp_path}/out/*.parquet'").fetchall()}
    assert sorted(rows) == sorted(paths)
    faces, error, scale, right = rows[str(folder / "huge.jpg")]
    assert error is None and scale is not None and scale < 1.0, rows  # shrunk, and the row says so
    assert faces >= 1 and right > 7168 * scale  # boxes in the original's pixels
    assert all(rows[path][:3] == [1, None, None] for path in paths[:2])
