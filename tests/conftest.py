"""Session fixtures shared by the test files: one local Ray instance and one S3 endpoint over HTTP; and the
check of needs_shared_data marks (tests/shared_data.py)."""

from __future__ import annotations

import os
import socket
import time

import pytest

import shared_data

# Ray Train's controller looks at its workers every 2 s by default, and a tiny training run waits
# a few of those intervals between start, epochs and end: 0.5 s takes about 17% off each training
# test (141 against 170 s for tests/test_train.py), with the same code paths. Set before any test
# starts Ray, so every controller (and every submitted job's driver) inherits it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def pytest_configure(config):
    config.addinivalue_line("markers", "shared_data(*names): the test needs these shared datasets "
                                       "(tests/shared_data.py: skips, or fails with MTCNN_REQUIRE_SHARED_DATA=1)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """A test marked needs_shared_data(...) skips (or fails) before its fixtures start when the data is missing."""
    shared_data.check_marks(item)


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """A real local Ray instance (2 CPUs) shared by every test of the session.

    Started after the S3 server so that its workers inherit the AWS_* variables pointing at it.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=True, logging_level="WARNING")
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


_MOTO: dict = {}


@pytest.fixture
def stop_s3_for(s3_server):
    """A function that stops the S3 server for some seconds, then starts it on the same port.

    moto keeps its buckets in this process, so the restarted server serves the same objects.
    """
    from moto.server import ThreadedMotoServer

    def stop_for(seconds: float) -> None:
        _MOTO["server"].stop()
        time.sleep(seconds)
        restarted = ThreadedMotoServer(ip_address="127.0.0.1", port=_MOTO["port"], verbose=False)
        restarted.start()
        _MOTO["server"] = restarted

    return stop_for


@pytest.fixture
def s3_down(s3_server):
    """A context manager: the S3 server is stopped inside it, and started on the same port after."""
    import contextlib

    from moto.server import ThreadedMotoServer

    @contextlib.contextmanager
    def down():
        _MOTO["server"].stop()
        try:
            yield
        finally:
            restarted = ThreadedMotoServer(ip_address="127.0.0.1", port=_MOTO["port"], verbose=False)
            restarted.start()
            _MOTO["server"] = restarted

    return down


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1, with AWS_* variables pointing boto3/s3fs at it.

    Yields the endpoint URL. Create buckets with s3fs or boto3; tests should use their own bucket.
    """
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    _MOTO.update(server=server, port=port)
    endpoint = f"http://127.0.0.1:{port}"
    names = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
             "AWS_SESSION_TOKEN")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    os.environ.pop("AWS_SESSION_TOKEN", None)
    try:
        yield endpoint
    finally:
        _MOTO["server"].stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
