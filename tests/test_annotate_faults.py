"""The annotate job under faults, with real parts: a driver killed with SIGKILL, an S3 server that
stops mid-job, workers without credentials, flaky reads, an image that kills its worker, two jobs
on one OUTPUT, and paths with characters that URL and glob parsers like to eat."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.pipelines.annotate import AnnotateConfig, FaceAnnotator, annotate, commit_rows
from jobs.cli import main
from jobs.output import LEASE_NAME, Lease, OutputError, committed_parts
from jobs.inputs.reading import ReadPolicy
from jobs.output import path_digests
from jobs.pipelines.run_state import RunState
from jobs.common.schema import annotation_table
from jobs.common.storage import filesystem
from mtcnn import DetectorConfig, load_weights

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def photo_folder(folder: Path, count: int, name: str = "img {:03d}.png") -> list[str]:
    """count hard links of one real photo with a face; their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / name.format(index)
        os.link(DATA / "astronaut.png", path)
        paths.append(str(path))
    return paths


def cli(args: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
    """mtcnn-jobs in its own process, with its own embedded Ray."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    environment.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def output_rows(output: str) -> list[tuple]:
    return duckdb.sql(f"select path, len(faces), error, error_kind from '{output}/part-*.parquet'").fetchall()


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_driver_killed_with_sigkill_then_rerun_gives_exactly_one_row_per_input(ray_session, tmp_path):
    paths = photo_folder(tmp_path / "images", 48)
    output = tmp_path / "out"
    job = cli(["annotate", str(tmp_path / "images"), str(output), "--batch-size", "2",
               "--rows-per-file", "4"])
    wait_for(lambda: len(committed_parts(str(output))) >= 2 or job.poll() is not None, 240,
             "the first committed parts")
    assert job.poll() is None, job.communicate()
    job.send_signal(signal.SIGKILL)
    job.wait()
    before = len(output_rows(str(output)))
    assert 0 < before < 48

    # The rerun takes over the dead driver's lease at once (same host, its process is gone).
    summary = annotate(AnnotateConfig(str(tmp_path / "images"), str(output), batch_size=4,
                                      show_progress=False))
    rows = output_rows(str(output))
    assert summary.skipped == before and summary.images == 48 - before
    assert sorted(path for path, *_ in rows) == sorted(paths)  # each once, none lost
    assert all(faces == 1 and error is None for _, faces, error, _ in rows)
    assert not (output / LEASE_NAME).exists()
    assert not [name for name in os.listdir(output) if name.endswith(".tmp")]


def test_s3_server_stopped_mid_job_loses_nothing_and_leaves_no_truncated_part(ray_session, s3_server,
                                                                             stop_s3_for, tmp_path):
    bucket = f"flaky-{uuid.uuid4().hex[:8]}"
    fs, _ = filesystem(f"s3://{bucket}")
    fs.mkdir(bucket)
    names = [f"in/photo {i:02d}.png" for i in range(24)]
    for name in names:
        fs.put_file(str(DATA / "astronaut.png"), f"{bucket}/{name}")
    config = AnnotateConfig(f"s3://{bucket}/in", f"s3://{bucket}/out", batch_size=2, rows_per_file=2,
                            concurrency=1, show_progress=False)
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=annotate(config)))
    job.start()
    wait_for(lambda: (fs.invalidate_cache() or True) and fs.glob(f"{bucket}/out/part-*"), 240,
             "a first part on S3")
    # The server goes away for 3 s while reads and uploads are in flight, then comes back on the
    # same port (moto keeps its buckets in this process).
    stop_s3_for(3.0)
    job.join(timeout=300)
    assert not job.is_alive()
    summary = result["summary"]
    assert summary.images == 24 and summary.errors == 0
    fs.invalidate_cache()
    parts = committed_parts(f"s3://{bucket}/out")
    tables = [pq.read_table(fs.open(part, "rb")) for part in parts]  # every part whole
    paths = [p for table in tables for p in table.column("path").to_pylist()]
    assert sorted(paths) == sorted(f"s3://{bucket}/{name}" for name in names)


def test_workers_without_credentials_stop_early_with_exit_1_and_mark_nothing_done(s3_server, tmp_path):
    bucket = f"nocreds-{uuid.uuid4().hex[:8]}"
    fs, _ = filesystem(f"s3://{bucket}")
    fs.mkdir(bucket)
    for index in range(10):
        fs.put_file(str(DATA / "astronaut.png"), f"{bucket}/{index}.png")
    manifest = tmp_path / "todo.txt"
    manifest.write_text("".join(f"s3://{bucket}/{index}.png\n" for index in range(10)))
    nowhere = str(tmp_path / "none")
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": nowhere,
           "AWS_CONFIG_FILE": nowhere, "AWS_EC2_METADATA_DISABLED": "true"}
    job = cli(["annotate", str(manifest), str(tmp_path / "out"), "--read-retries", "1"],
              env={**env, "AWS_ENDPOINT_URL": s3_server})
    out, err = job.communicate(timeout=300)
    assert job.returncode == 1, err
    lines = [line for line in err.splitlines() if line.startswith("mtcnn-jobs annotate:")]
    assert len(lines) == 1 and "credentials" in lines[0].lower(), err
    assert committed_parts(str(tmp_path / "out")) == []


def test_a_manifest_whose_first_paths_all_miss_stops_early_and_one_missing_path_does_not(tmp_path):
    # Paths written relative to another folder: every one is "not found", a mistake of the listing
    # rather than a million final error rows.
    photos = photo_folder(tmp_path / "photos", 10)
    manifest = tmp_path / "lists" / "todo.txt"
    manifest.parent.mkdir()
    manifest.write_text("".join(f"photos/{Path(path).name}\n" for path in photos))
    job = cli(["annotate", str(manifest), str(tmp_path / "out")])
    out, err = job.communicate(timeout=300)
    assert job.returncode == 1, err
    lines = [line for line in err.splitlines() if line.startswith("mtcnn-jobs annotate:")]
    assert len(lines) == 1 and "none of the first 8 images exists" in lines[0], err
    assert committed_parts(str(tmp_path / "out")) == []
    # One missing file among real ones is that file's own error row.
    manifest.write_text("".join(f"../photos/{Path(path).name}\n" for path in photos[:9]) + "../photos/gone.png\n")
    summary = annotate(AnnotateConfig(str(manifest), str(tmp_path / "out"), show_progress=False))
    assert (summary.images, summary.errors) == (10, 1)


def test_flaky_reads_are_retried_and_give_the_right_rows(tmp_path, monkeypatch):
    paths = photo_folder(tmp_path, 3, "flaky {}.png")
    monkeypatch.setenv("MTCNN_JOBS_FAILPOINTS", "fail_reads=2:flaky 1")
    annotator = FaceAnnotator(load_weights("reference"), DetectorConfig(), use_gpu=False, threads=1,
                              storage_options={}, policy=ReadPolicy(retries=2, backoff_seconds=0.01))
    rows = annotator(pa.table({"path": paths})).to_pylist()
    assert [(row["error"], len(row["faces"])) for row in rows] == [(None, 1)] * 3
    # One retry fewer than the failures: the row is an error, transient, so not final.
    monkeypatch.setenv("MTCNN_JOBS_FAILPOINTS", "fail_reads=2:flaky 2")
    annotator.policy = ReadPolicy(retries=1, backoff_seconds=0.01)
    rows = annotator(pa.table({"path": paths})).to_pylist()
    assert rows[2]["error_kind"] == "transient" and "ConnectionError" in rows[2]["error"]
    assert rows[0]["error"] is None and rows[1]["error"] is None


def test_transient_error_rows_are_redone_by_the_next_run(ray_session, tmp_path):
    photo_folder(tmp_path / "images", 3)
    output = tmp_path / "out"
    output.mkdir()
    first = AnnotateConfig(str(tmp_path / "images"), str(output), show_progress=False)
    annotate(first)
    # Make the earlier rows look like one transient and one permanent failure.
    table = pq.read_table(committed_parts(str(output))[0])
    for part in committed_parts(str(output)):
        os.remove(part)
    metadata = (table.schema.metadata or {})[b"mtcnn_jobs.annotate"].decode()
    errors = ["cannot read: ConnectionError: reset", "truncated or corrupt image", None]
    kinds = ["transient", "permanent", None]
    order = table.column("path").to_pylist()
    broken = annotation_table(order, [None, None, (512, 512)], [None, None, None], errors, kinds)
    commit_rows(broken, str(output), {}, metadata)
    summary = annotate(first)
    rows = {path: (faces, error, kind) for path, faces, error, kind in output_rows(str(output))}
    assert summary.images == 1 and len(rows) == 3
    assert rows[order[0]] == (1, None, None)  # the transient failure was redone
    assert rows[order[1]][1] == "truncated or corrupt image"  # the permanent one is final
    summary = annotate(AnnotateConfig(str(tmp_path / "images"), str(output), retry_errors=True,
                                      show_progress=False))
    rows = output_rows(str(output))
    assert summary.images == 1 and len(rows) == 3 and all(error is None for _, _, error, _ in rows)


def test_an_image_that_kills_its_worker_becomes_an_error_row_and_the_job_ends(tmp_path):
    paths = photo_folder(tmp_path / "images", 6)
    # poison.png crashes the decoder every time; poison-victim.png is a good image whose worker is
    # killed from outside (an operator, a spot preemption, the OOM killer choosing it) in run 1 only.
    poison, victim = tmp_path / "images" / "poison.png", tmp_path / "images" / "poison-victim.png"
    os.link(DATA / "astronaut.png", poison)
    os.link(DATA / "astronaut.png", victim)
    job = cli(["annotate", str(tmp_path / "images"), str(tmp_path / "out"), "--batch-size", "4"],
              env={"MTCNN_JOBS_FAILPOINTS": "kill_on=poison"})
    out, err = job.communicate(timeout=400)
    assert job.returncode == 0, err
    rows = {path: (faces, error, kind) for path, faces, error, kind in output_rows(str(tmp_path / "out"))}
    assert sorted(rows) == sorted(paths + [str(poison), str(victim)])
    # A worker's death is not shown to be the image's fault by one run: the next run retries both.
    for path in (poison, victim):
        assert "worker process died" in rows[str(path)][1] and rows[str(path)][2] == "crashed"
    assert all(rows[path] == (1, None, None) for path in paths)
    job = cli(["annotate", str(tmp_path / "images"), str(tmp_path / "out")],
              env={"MTCNN_JOBS_FAILPOINTS": "kill_on=poison."})
    out, err = job.communicate(timeout=400)
    assert job.returncode == 0 and "annotated 2 images" in out, (out, err)
    rows = {path: (faces, error, kind) for path, faces, error, kind in output_rows(str(tmp_path / "out"))}
    assert sorted(rows) == sorted(paths + [str(poison), str(victim)])
    assert rows[str(victim)] == (1, None, None)  # the good image is annotated
    # The bad one killed its worker again, alone this time: now its row is final.
    assert "earlier one" in rows[str(poison)][1] and rows[str(poison)][2] == "permanent"


def test_a_second_job_on_a_held_output_is_refused(ray_session, tmp_path, capfd):
    photo_folder(tmp_path / "images", 2)
    output = tmp_path / "out"
    output.mkdir()
    holder = Lease(str(output), {}, "other-host:1:running-job")
    holder.acquire()  # a live job's lease (this process is alive, so it never looks gone)
    try:
        status = main(["annotate", str(tmp_path / "images"), str(output)])
        err = capfd.readouterr().err
        assert status == 2 and "in use by another annotate job" in err and "running-job" in err
        assert committed_parts(str(output)) == []
    finally:
        holder.release()
    assert not (output / LEASE_NAME).exists()


def test_a_lease_whose_heartbeat_stopped_expires(tmp_path):
    stale = {"owner": "elsewhere:1:crashed", "host": "elsewhere", "pid": 1, "heartbeat": time.time() - 500}
    (tmp_path / LEASE_NAME).write_text(json.dumps(stale))
    lease = Lease(str(tmp_path), {}, "me:2:now", ttl_seconds=120)
    lease.acquire()
    lease.check()
    lease.release()
    fresh = dict(stale, heartbeat=time.time())
    (tmp_path / LEASE_NAME).write_text(json.dumps(fresh))
    with pytest.raises(OutputError, match="in use"):
        Lease(str(tmp_path), {}, "me:3:later").acquire()


ODD = "we[ird] *?#%::ü dir"
ODD_NAMES = ["a::b.jpg", "c#d%e?.png", "f[1] *.png", "ünïcode ñ.png"]


def _odd_images(folder: Path) -> list[str]:
    folder.mkdir(parents=True)
    for name in ODD_NAMES:
        shutil.copy(DATA / "astronaut.png", folder / name)
    return sorted(str(folder / name) for name in ODD_NAMES)


def test_paths_with_special_characters_locally(ray_session, tmp_path):
    expected = _odd_images(tmp_path / ODD / "in")
    output = tmp_path / ODD / "out [1]"
    summary = annotate(AnnotateConfig(str(tmp_path / ODD / "in"), str(output), show_progress=False))
    assert summary.images == 4 and summary.errors == 0
    table = pa.concat_tables([pq.read_table(p) for p in committed_parts(str(output))])
    assert sorted(table.column("path").to_pylist()) == expected
    again = annotate(AnnotateConfig(str(tmp_path / ODD / "in"), str(output), show_progress=False))
    assert again.skipped == 4 and again.images == 0  # resume finds the parts despite the brackets


def test_paths_with_special_characters_on_s3(ray_session, s3_server, tmp_path):
    bucket = f"odd-{uuid.uuid4().hex[:8]}"
    fs, _ = filesystem(f"s3://{bucket}")
    fs.mkdir(bucket)
    for name in ODD_NAMES:
        fs.put_file(str(DATA / "astronaut.png"), f"{bucket}/{ODD}/in/{name}")
    source, output = f"s3://{bucket}/{ODD}/in", f"s3://{bucket}/{ODD}/out [1]"
    summary = annotate(AnnotateConfig(source, output, show_progress=False))
    assert summary.images == 4 and summary.errors == 0
    fs.invalidate_cache()
    parts = committed_parts(output)
    table = pa.concat_tables([pq.read_table(fs.open(p, "rb")) for p in parts])
    assert sorted(table.column("path").to_pylist()) == sorted(f"{source}/{n}" for n in ODD_NAMES)
    again = annotate(AnnotateConfig(source, output, show_progress=False))
    assert again.skipped == 4 and again.images == 0


def test_run_state_claims_each_path_once_retries_included_and_skips_done():
    state = RunState(dedupe=True)
    a, b, c = path_digests(["a", "b", "c"]), path_digests(["b", "d"]), path_digests(["c", "c", "e"])
    assert state.claim(a, "0:0").tolist() == [True, True, True]
    assert state.claim(a, "0:0").tolist() == [True, True, True]  # a retried chunk gets its own back
    assert state.claim(b, "0:1").tolist() == [False, True]  # 'b' was listed before
    assert state.claim(c, "1:0").tolist() == [False, False, True]
    done = RunState(dedupe=False)
    done._done = np.sort(path_digests(["x", "y"]))
    assert done.claim(path_digests(["y", "z", "x"]), "0:0").tolist() == [False, True, False]
    assert done.snapshot()["skipped"] == 2


def test_a_retried_listing_chunk_is_counted_once_and_repeats_are_not_called_done():
    state = RunState(dedupe=True)
    state._done = np.sort(path_digests(["done"]))
    chunk = path_digests(["a", "b", "a", "done"])
    state.claim(chunk, "0:0")
    state.claim(chunk, "0:0")  # the listing task was retried: its chunk comes again
    counts = state.snapshot()
    assert (counts["listed"], counts["skipped"], counts["repeated"]) == (4, 1, 1)
    assert state.ahead() == 2  # 'a' and 'b' are this run's to annotate
