"""The client side of a Ray cluster's job server: connect, find a job, follow its log.

`mtcnn-jobs submit` and `mtcnn-jobs jobs` both talk to the job server through this module.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Callable, TextIO

from ray.job_submission import JobStatus, JobSubmissionClient

from jobs.common.redaction import StreamRedactor, redact_text

#: Exit status of `submit --wait` and `jobs logs --follow` per final job status.
EXIT_STATUS = {JobStatus.SUCCEEDED: 0, JobStatus.FAILED: 1, JobStatus.STOPPED: 3}
#: Environment variables that name the job server when --address is not given (Ray's own names).
ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


class ClusterError(RuntimeError):
    """The job server cannot be reached or refuses the request; the message says what to do."""

    exit_status = 2  # an input error (address, token, job id), reported as one line


def job_server_address(address: str | None) -> str:
    """The job server's URL: --address, else RAY_API_SERVER_ADDRESS or an http(s) RAY_ADDRESS."""
    if address:
        return address
    for name in ADDRESS_VARIABLES:
        value = os.environ.get(name, "")
        if value.startswith(("http://", "https://")):
            return value
    raise ClusterError("no job server given: pass --address http://HEAD:8265 (the Ray dashboard "
                       "port; `ray dashboard ray_cluster.yaml` forwards it to 127.0.0.1:8265)")


def _use_token_if_available() -> None:
    # A Ray >= 2.5x head started with a token in ~/.ray/auth_token (or RAY_AUTH_TOKEN[_PATH]) only
    # answers requests carrying it, and the client sends it only in token mode: switch that on
    # when a token is at hand and the user has not chosen a mode.
    if "RAY_AUTH_MODE" in os.environ:
        return
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(token_file):
        os.environ["RAY_AUTH_MODE"] = "token"
        try:  # Ray read its settings when imported; make it read the mode again
            from ray._raylet import Config

            Config.initialize("")
        except (ImportError, AttributeError):
            pass


def connect(address: str | None) -> JobSubmissionClient:
    """A client of the cluster's job server, or a ClusterError that says what to check."""
    url = job_server_address(address)
    _use_token_if_available()
    try:
        return JobSubmissionClient(url)
    except ConnectionError as error:
        raise ClusterError(f"cannot reach the Ray job server at {url}: is the cluster up and its "
                           f"dashboard port reachable from here? ({error})") from None
    except Exception as error:  # Ray raises several types (auth, version); keep its explanation
        if type(error).__name__ == "AuthenticationError":
            raise ClusterError(f"the job server at {url} requires Ray's auth token: set "
                               "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token "
                               "and RAY_AUTH_MODE=token") from None
        raise


def job_info(client: JobSubmissionClient, job_id: str):
    """A job's info, or a ClusterError when the cluster has no such job."""
    try:
        return client.get_job_info(job_id)
    except RuntimeError as error:
        if "does not exist" in str(error) or "404" in str(error):
            raise ClusterError(f"no job {job_id!r} on this cluster "
                               "(list them with `ray job list --address ...`)") from None
        raise


def follow(client: JobSubmissionClient, job_id: str, out: TextIO = sys.stdout,
           mask: Callable[[str], str] = redact_text) -> JobStatus:
    """Stream a job's log to out, masked, until it ends; the final status."""

    async def stream() -> None:
        # Chunks end anywhere, also inside a secret: the redactor masks whole lines and blocks.
        redactor = StreamRedactor(mask)
        async for chunk in client.tail_job_logs(job_id):
            out.write(redactor.feed(chunk))
            out.flush()
        out.write(redactor.close())
        out.flush()

    asyncio.run(stream())
    # The log stream closes when the job ends; its status may lag behind by a moment.
    return wait_until_done(client, job_id)


def wait_until_done(client: JobSubmissionClient, job_id: str, poll_seconds: float = 0.5) -> JobStatus:
    """Block until a job has ended; its final status."""
    status = client.get_job_status(job_id)
    while not status.is_terminal():
        time.sleep(poll_seconds)
        status = client.get_job_status(job_id)
    return status


def exit_status(status: JobStatus) -> int:
    """The process exit status that reports a finished job's status (0 only if it succeeded)."""
    return EXIT_STATUS.get(status, 1)
