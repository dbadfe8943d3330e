"""mtcnn-jobs submit / jobs against a real Ray head on loopback, with inputs and outputs on S3 (moto)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from jobs.common.storage import filesystem
from jobs.commands.submit import SubmitError, check_arguments, parse_env
from mtcnn.weights import load_weights
from shared_data import needs_shared_data, shared_data

REPO = Path(__file__).resolve().parents[1]
IMAGES = [REPO / "tests" / "data" / name for name in ("astronaut.png", "cmyk.jpg", "exif_rotated.jpg")]
#: submit options that ship the S3 settings and credentials of the client's environment.
SHIP_AWS = ["--env", "AWS_ENDPOINT_URL", "--env", "AWS_DEFAULT_REGION",
            "--env", "AWS_ACCESS_KEY_ID", "--env", "AWS_SECRET_ACCESS_KEY"]
HEAD_PORTS = ("port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
              "metrics-export-port", "dashboard-agent-grpc-port", "dashboard-agent-listen-port",
              "runtime-env-agent-port")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _without_cluster_settings(environ: dict) -> dict:
    """This environment minus anything that would point Ray or boto elsewhere or lend credentials."""
    return {k: v for k, v in environ.items()
            if not k.startswith(("AWS_", "RAY_")) and k not in ("PYTHONPATH",)}


def _session_pids(session_id: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session_id:  # fields after the command: state ppid pgrp session ...
            pids.append(int(entry.name))
    return pids


def _stop_session(session_id: int) -> None:
    """Stop every process of our head's session (never `ray stop`: it would stop others' Ray too)."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        for pid in _session_pids(session_id):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while _session_pids(session_id) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _session_pids(session_id):
            return


@dataclass
class RayHead:
    """A running head: the environment of a client that talks to it, and its temp dir."""

    environ: dict
    temp_dir: Path


@pytest.fixture(scope="module")
def ray_head() -> RayHead:
    """A Ray head with its job server on 127.0.0.1, token auth on, in its own session."""
    root = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths must stay < 108
    token_file = root / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    environ = _without_cluster_settings(dict(os.environ))
    environ["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    ports = dict(zip(HEAD_PORTS, _free_ports(len(HEAD_PORTS))))
    command = ["ray", "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               "--num-cpus=2", "--include-dashboard=true", "--disable-usage-stats",
               f"--temp-dir={root / 'ray'}",
               *[f"--{name}={port}" for name, port in ports.items()]]
    log = open(root / "start.log", "w")
    starter = subprocess.Popen(command, env={**environ, "RAY_AUTH_MODE": "token"}, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert starter.wait(timeout=120) == 0, (root / "start.log").read_text()[-3000:]
        # The client finds the token through RAY_AUTH_TOKEN_PATH and switches token mode on itself.
        client = {**environ, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{ports['dashboard-port']}"}
        yield RayHead(environ=client, temp_dir=root / "ray")
    finally:
        _stop_session(starter.pid)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def mtcnn_jobs(environ: dict, *arguments: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the mtcnn-jobs command line as a user would, in a separate process."""
    try:
        return subprocess.run([sys.executable, "-m", "jobs.cli", *arguments], env=environ, cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as timeout_error:
        output = timeout_error.output or b""
        output = output.decode(errors="replace") if isinstance(output, bytes) else output
        pytest.fail(f"mtcnn-jobs {' '.join(arguments[:3])} ... still running after {timeout:.0f} s; "
                    f"its output so far:\n{output[-4000:]}")


def test_env_values_come_from_this_environment_and_secrets_stay_off_the_command_line():
    settings = parse_env(["AWS_ENDPOINT_URL", "REGION=eu-west-1", "AWS_SECRET_ACCESS_KEY"],
                         {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value"})
    assert settings.plain == {"AWS_ENDPOINT_URL": "http://minio:9000", "REGION": "eu-west-1"}
    assert settings.secret == {"AWS_SECRET_ACCESS_KEY": "s3cr3t-value"}
    assert settings.mask("key=s3cr3t-value.") == "key=***."
    forced = parse_env([], {"DATABASE_URL": "postgres://u:pw@db"}, secret_names=["DATABASE_URL"])
    assert forced.secret == {"DATABASE_URL": "postgres://u:pw@db"} and not forced.plain
    with pytest.raises(SubmitError, match="export AWS_SECRET_ACCESS_KEY"):
        parse_env(["AWS_SECRET_ACCESS_KEY=abc"], {})
    with pytest.raises(SubmitError, match="not set"):
        parse_env(["AWS_SESSION_TOKEN"], {})
    with pytest.raises(SubmitError, match="not an environment variable name"):
        parse_env(["1BAD"], {})
    with pytest.raises(SubmitError, match="hold credentials"):
        check_arguments(["in", "out", '--storage-options={"secret": "x", "anon": false}'], settings)
    with pytest.raises(SubmitError, match="secret --env value"):
        check_arguments(["in", "s3://bucket/s3cr3t-value"], settings)
    check_arguments(["in", "out", '--storage-options={"anon": false}'], settings)


def test_bad_submissions_fail_before_reaching_a_cluster(monkeypatch, capsys):
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # keep this process's Ray settings as they are
    [unused_port] = _free_ports(1)
    address = f"http://127.0.0.1:{unused_port}"
    with pytest.raises(SystemExit) as usage:
        main(["submit", "--address", address, "annotate", "only-input"])
    assert usage.value.code == 2 and "OUTPUT" in capsys.readouterr().err
    assert main(["submit", "--address", address, "jobs", "status", "x"]) == 2
    assert "runs on this machine" in capsys.readouterr().err
    assert main(["submit", "--address", address, "annotate", "s3://b/in", "s3://b/out"]) == 2
    assert f"cannot reach the Ray job server at {address}" in capsys.readouterr().err
    assert main(["jobs", "status", "some-job"]) == 2
    assert "--address" in capsys.readouterr().err


@pytest.mark.slow
def test_annotate_job_on_s3_with_credentials_that_never_show(ray_head, s3_server):
    fs, _ = filesystem("s3://submit-test")
    fs.mkdir("submit-test")
    for image in IMAGES:
        fs.put_file(str(image), f"submit-test/images/{image.name}")
    # Distinct credentials to search for; moto accepts any. The head has no AWS_* of its own, so
    # the job can only sign its S3 requests with what --env ships.
    key_id, secret_key = "AKIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
    client_env = {**ray_head.environ, "AWS_ENDPOINT_URL": s3_server, "AWS_DEFAULT_REGION": "us-east-1",
                  "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret_key}

    # A job that fails (no such input) exits non-zero and says why; submitted without --wait.
    failing = mtcnn_jobs(client_env, "submit", *SHIP_AWS, "--job-id", "missing-input",
                         "annotate", "s3://submit-test/no-such-prefix", "s3://submit-test/out-missing")
    assert failing.returncode == 0, failing.stderr
    assert "submitted missing-input" in failing.stdout

    done = mtcnn_jobs(client_env, "submit", "--wait", *SHIP_AWS, "--job-id", "annotate-s3",
                      "annotate", "s3://submit-test/images", "s3://submit-test/out", "--batch-size", "2",
                      "--concurrency", "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "annotated 3 images" in done.stdout  # the job's log, streamed
    # The job's driver joined this cluster (its Ray Data logs are in the head's session), rather
    # than starting a Ray of its own.
    assert str(ray_head.temp_dir) in done.stdout + done.stderr

    table = pq.ParquetDataset("submit-test/out", filesystem=fs).read().to_pylist()
    assert sorted(Path(row["path"]).name for row in table) == sorted(i.name for i in IMAGES)
    astronaut = next(row for row in table if row["path"].endswith("astronaut.png"))
    assert len(astronaut["faces"]) >= 1
    assert all(row["error"] is None for row in table)

    follow = mtcnn_jobs(client_env, "jobs", "logs", "missing-input", "--follow")
    assert follow.returncode == 1
    assert "no-such-prefix" in follow.stdout

    # Nothing the cluster stores or shows about the jobs holds the credentials: read everything
    # back (job details, logs, `jobs status`) in one process.
    readback = subprocess.run([sys.executable, "-c", _READBACK, "annotate-s3", "missing-input"],
                              env=ray_head.environ, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert readback.returncode == 0, readback.stderr
    jobs = json.loads(readback.stdout)
    assert "FAILED" in jobs["missing-input"]["status_command"]
    assert "SUCCEEDED" in jobs["annotate-s3"]["status_command"]
    for details in jobs.values():
        env_vars = details["info"]["runtime_env"]["env_vars"]
        assert env_vars["AWS_ENDPOINT_URL"] == s3_server  # plain settings stay visible
        assert "AWS_SECRET_ACCESS_KEY" not in env_vars and "AWS_ACCESS_KEY_ID" not in env_vars
        assert details["info"]["entrypoint"].startswith("python -m _mtcnn_job_env mtcnn-jobs annotate s3://")
    shown = readback.stdout + done.stdout + done.stderr + failing.stdout + follow.stdout + follow.stderr
    assert secret_key not in shown and key_id not in shown


# Prints {job id: {info, logs, status_command}} for the job ids given, as the CLI and SDK see them.
_READBACK = """
import contextlib, io, json, sys
from jobs.cli import main
from jobs.runtime.cluster_client import connect
client, out = connect(None), {}
for job_id in sys.argv[1:]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["jobs", "status", job_id])
    out[job_id] = {"info": client.get_job_info(job_id).model_dump(mode="json"),
                   "logs": client.get_job_logs(job_id), "status_command": printed.getvalue()}
print(json.dumps(out))
"""


def _pnet_shard(images: int = 3):
    """P-Net samples from the first WIDER training images, made with the project's sampler."""
    import cv2
    import numpy as np
    import pyarrow as pa

    from jobs.training.samples import SampleConfig, face_samples, to_table

    wider = shared_data("wider_face_train_small")
    lines = (wider / "wider_face_train_bbx_gt.txt").read_text().splitlines()
    config, rng, tables, i = SampleConfig(stage="pnet", samples_per_image=60), np.random.default_rng(0), [], 0
    while len(tables) < images:
        name, count = lines[i], int(lines[i + 1])
        rows = [list(map(float, r.split()[:4])) for r in lines[i + 2:i + 2 + max(count, 1)]]
        i += 2 + max(count, 1)
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in rows if w > 0 and h > 0], np.float32)
        image = cv2.cvtColor(cv2.imread(str(wider / "images" / name)), cv2.COLOR_BGR2RGB)
        samples = face_samples(image, boxes, np.zeros(len(boxes), bool), config, rng)
        tables.append(to_table(samples, name, "pnet"))
    return pa.concat_tables(tables)


@pytest.mark.slow
@needs_shared_data("wider_face_train_small")
def test_tiny_training_job_writes_weights_to_s3(ray_head, s3_server, tmp_path):
    fs, _ = filesystem("s3://submit-train")
    fs.mkdir("submit-train")
    with fs.open("submit-train/samples/pnet/part-0.parquet", "wb") as file:
        pq.write_table(_pnet_shard(), file)
    client_env = {**ray_head.environ, "AWS_ENDPOINT_URL": s3_server, "AWS_DEFAULT_REGION": "us-east-1",
                  "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
                  "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30)}
    done = mtcnn_jobs(client_env, "submit", "--wait", *SHIP_AWS,
                      "train", "--stage", "pnet", "--data", "s3://submit-train/samples/pnet",
                      "--output", "s3://submit-train/run", "--epochs", "1", "--workers", "1",
                      "--cpus-per-worker", "1", "--batch-size", "64")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    fs.get_file("submit-train/run/weights.safetensors", str(tmp_path / "weights.safetensors"))
    weights = load_weights(str(tmp_path / "weights.safetensors"))
    assert "pnet" in weights.stages
    assert client_env["AWS_SECRET_ACCESS_KEY"] not in done.stdout + done.stderr


@pytest.mark.slow
def test_a_stopped_job_reports_stopped(ray_head, tmp_path):
    submitted = mtcnn_jobs(ray_head.environ, "submit", "--job-id", "to-stop", "--no-working-dir",
                           "annotate", str(REPO / "tests" / "data"), str(tmp_path / "out"))
    assert submitted.returncode == 0, submitted.stderr
    stop = mtcnn_jobs(ray_head.environ, "jobs", "stop", "to-stop", "--wait")
    assert stop.returncode == 0, stop.stderr
    assert "stop requested for to-stop" in stop.stdout and "STOPPED" in stop.stdout
    follow = mtcnn_jobs(ray_head.environ, "jobs", "logs", "to-stop", "--follow")
    assert follow.returncode == 3  # --wait and --follow exit 3 for a stopped job
