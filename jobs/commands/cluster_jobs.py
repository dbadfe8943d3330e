"""mtcnn-jobs jobs status|logs|stop: follow up on jobs submitted to a Ray cluster's job server."""

from __future__ import annotations

import argparse
import sys

from jobs.runtime.cluster_client import job_info, connect, exit_status, follow, wait_until_done
from jobs.common.redaction import redact_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the jobs command."""
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_text in (("status", "print a job's status and entrypoint"),
                            ("logs", "print a job's log (--follow: until it ends)"),
                            ("stop", "stop a running job")):
        action = actions.add_parser(name, help=help_text, description=help_text)
        action.add_argument("job_id", metavar="JOB_ID", help="as printed by `mtcnn-jobs submit`")
        action.add_argument("--address", default=None,
                            help="job server, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS or "
                                 "an http:// $RAY_ADDRESS)")
        if name == "logs":
            action.add_argument("--follow", action="store_true",
                                help="stream until the job ends and exit with its status")
        if name == "stop":
            action.add_argument("--wait", action="store_true", help="wait until the job has stopped")


def run(args: argparse.Namespace) -> int:
    """Carry out one action on one job."""
    client = connect(args.address)
    info = job_info(client, args.job_id)
    if args.action == "status":
        # Jobs submitted by other means may carry credentials in their entrypoint or message.
        print(f"{args.job_id}: {info.status.value}")
        print(f"entrypoint: {redact_text(info.entrypoint)}")
        if info.message:
            print(f"message: {redact_text(info.message)}")
        return 0
    if args.action == "logs":
        if args.follow:
            status = follow(client, args.job_id)
            print(f"job {args.job_id} {status.value}", file=sys.stderr)
            return exit_status(status)
        sys.stdout.write(redact_text(client.get_job_logs(args.job_id)))
        return 0
    # stop
    if info.status.is_terminal():
        print(f"job {args.job_id} already ended: {info.status.value}")
        return 0
    client.stop_job(args.job_id)
    print(f"stop requested for {args.job_id}")
    if args.wait:
        status = wait_until_done(client, args.job_id)
        print(f"job {args.job_id} {status.value}")
    return 0
