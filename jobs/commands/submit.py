"""mtcnn-jobs submit: run an mtcnn-jobs command on a Ray cluster through Ray's job server.

What travels with a job (its runtime environment):
  - the code: the `mtcnn` and `jobs` packages of this install (py_modules), so the cluster runs the
    code you have here; the nodes provide the dependencies (ray_cluster.yaml installs the project);
  - the working directory (default: the current one, minus .gitignore'd files), so that relative
    paths in the command, such as a training config, mean on the cluster what they mean here;
  - settings named with --env: plain ones as environment variables of the job (visible in the job's
    details), secret ones in a private package that sets them in the job's processes, so that their
    values appear in no job metadata, entrypoint or log. A setting is secret when its name says so
    (KEY, SECRET, TOKEN, PASSWORD, CREDENTIAL, CONNECTION_STRING, DATABASE_URL, ...), when its value
    looks like a credential (a URL with user:password@, a presigned or SAS query, a connection
    string with AccountKey= or Password=, a bearer token, a private key, ...; see jobs.common.redaction),
    or when it is named with --secret-env.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets as random_tokens
import shlex
import stat
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from jobs.runtime.cluster_client import connect, exit_status, follow
from jobs.common.redaction import is_secret_name, looks_like_secret, redact, redact_text

#: Name of the generated package that carries secret settings to the job's processes.
ENV_PACKAGE = "_mtcnn_job_env"
#: Commands that make no sense on the cluster itself.
LOCAL_ONLY_COMMANDS = ("submit", "jobs")

_ENV_PACKAGE_INIT = '''"""Settings shipped with one job by mtcnn-jobs submit."""
import json
import os
from pathlib import Path


def apply() -> None:
    """Put the shipped settings into this process's environment (Ray runs it in every worker)."""
    os.environ.update(json.loads((Path(__file__).parent / "values.json").read_text()))
    try:  # the job's one setup hook: mask what the worker logs, as the CLI does
        from jobs.common.redaction import install_log_redaction
    except ImportError:
        return
    install_log_redaction()
'''
# The job's driver is not a Ray worker, so the entrypoint runs it through this module.
_ENV_PACKAGE_MAIN = '''import os
import sys

from . import apply

apply()
os.execvp(sys.argv[1], sys.argv[1:])
'''
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class SubmitError(ValueError):
    """The submission is refused before anything reaches the cluster; the message says why."""


@dataclass
class JobSettings:
    """Environment variables for a job, split by whether their values may be shown."""

    plain: dict[str, str] = field(default_factory=dict)
    secret: dict[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        """Every variable name, for messages (never the values)."""
        return sorted([*self.plain, *self.secret])

    def mask(self, text: str) -> str:
        """text with every secret value, and anything else shaped like a credential, replaced by ***."""
        for value in sorted(self.secret.values(), key=len, reverse=True):
            if len(value) >= 4:
                text = text.replace(value, "***")
        return redact_text(text)


def parse_env(specs: Sequence[str], environ: Mapping[str, str],
              secret_names: Sequence[str] = ()) -> JobSettings:
    """--env KEY (value from this environment) or KEY=VALUE (plain settings only), and
    --secret-env KEY (always handled as a secret) -> JobSettings."""
    settings = JobSettings()
    for spec in [*specs, *secret_names]:
        name, has_value, value = spec.partition("=")
        if not _ENV_NAME.fullmatch(name):
            raise SubmitError(f"--env {name!r}: not an environment variable name")
        if has_value and (spec in secret_names or looks_like_secret(name, value)):
            what = "secret values" if is_secret_name(name) else "values that look like credentials"
            raise SubmitError(f"--env {name}=...: {what} do not belong on the command line "
                              f"(shell history, process lists, the job's details); run "
                              f"`export {name}=...` and pass --env {name} (it then travels as a secret)")
        if not has_value:
            if name not in environ:
                raise SubmitError(f"--env {name}: {name} is not set in this environment")
            value = environ[name]
        secret = spec in secret_names or looks_like_secret(name, value)
        (settings.secret if secret else settings.plain)[name] = value
    return settings


def check_arguments(arguments: list[str], settings: JobSettings) -> None:
    """Refuse command arguments that would put credentials into the job's entrypoint."""
    for argument in arguments:
        if any(len(v) >= 4 and v in argument for v in settings.secret.values()):
            raise SubmitError("a secret --env value appears in the command's arguments; the "
                              "entrypoint is stored and shown with the job, refer to the variable instead")
        _check_json_options(argument)
        if redact_text(argument) != argument:
            raise SubmitError(
                f"the command's argument {redact_text(argument)!r} holds a credential (a URL with "
                "user:password@, a presigned or SAS query, a key or token); the entrypoint is stored "
                "and shown with the job. Pass credentials as variables instead (export them and add "
                "--env NAME or --secret-env NAME), and list presigned URLs in a manifest file in the "
                "working directory rather than on the command line")


def _check_json_options(argument: str) -> None:
    """Refuse JSON options (e.g. --storage-options) that hold credentials by name or by shape."""
    for candidate in (argument, argument.partition("=")[2]):
        if not candidate.lstrip().startswith("{"):
            continue
        try:
            options = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if redact(options) != options:
            raise SubmitError(
                "the command's arguments hold credentials (e.g. in --storage-options); the "
                "entrypoint is stored and shown with the job: drop them from the options and "
                "pass them as variables, e.g. --env AWS_ACCESS_KEY_ID --env AWS_SECRET_ACCESS_KEY")


def local_paths(arguments: list[str]) -> list[str]:
    """Arguments that are absolute paths on this machine (other nodes will not have them)."""
    return [a for a in arguments if a.startswith("/") and os.path.exists(a)]


@contextlib.contextmanager
def runtime_environment(settings: JobSettings, working_dir: str | None) -> Iterator[tuple[dict, list[str]]]:
    """The job's runtime_env and the entrypoint prefix; temporary files live until the block ends."""
    import jobs
    import mtcnn

    runtime_env: dict = {
        "py_modules": [str(Path(mtcnn.__file__).parent), str(Path(jobs.__file__).parent)],
        "excludes": ["**/__pycache__", "**/*.pyc", ".git"],
    }
    if working_dir is not None:
        if not Path(working_dir).is_dir():
            raise SubmitError(f"--working-dir {working_dir}: not a folder")
        runtime_env["working_dir"] = str(Path(working_dir).resolve())
    if settings.plain:
        runtime_env["env_vars"] = dict(settings.plain)
    if not settings.secret:
        # Workers mask what they log, as the CLI does (with secrets, the package's hook does it).
        runtime_env["worker_process_setup_hook"] = "jobs.common.redaction.install_log_redaction"
        yield runtime_env, []
        return
    with tempfile.TemporaryDirectory(prefix="mtcnn-submit-") as folder:
        package = Path(folder) / ENV_PACKAGE
        package.mkdir(mode=0o700)
        values = package / "values.json"
        values.touch(mode=stat.S_IRUSR | stat.S_IWUSR)
        values.write_text(json.dumps(settings.secret))
        (package / "__init__.py").write_text(_ENV_PACKAGE_INIT)
        (package / "__main__.py").write_text(_ENV_PACKAGE_MAIN)
        runtime_env["py_modules"].append(str(package))
        runtime_env["worker_process_setup_hook"] = f"{ENV_PACKAGE}.apply"
        # Uploaded as a content-addressed zip: only its gcs:// address shows in the job details.
        yield runtime_env, ["python", "-m", ENV_PACKAGE]


def job_id_for(command: str) -> str:
    """A readable, unique submission id: mtcnn-<command>-<UTC time>-<random>."""
    return f"mtcnn-{command}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{random_tokens.token_hex(3)}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the submit command."""
    parser.add_argument("--address", default=None,
                        help="job server, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS or an "
                             "http:// $RAY_ADDRESS)")
    parser.add_argument("--wait", action="store_true",
                        help="stream the job's log and exit with its status "
                             "(0 succeeded, 1 failed, 3 stopped)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                        help="environment variable for the job, from this environment (KEY) or given "
                             "(KEY=VALUE, not for secrets); repeat for more")
    parser.add_argument("--secret-env", action="append", default=[], metavar="KEY",
                        help="environment variable from this environment whose value must not show, "
                             "whatever its name or shape (names with KEY, SECRET, TOKEN, ... and "
                             "credential-shaped values are secret anyway)")
    parser.add_argument("--working-dir", default=".",
                        help="folder shipped as the job's working directory (default: the current one)")
    parser.add_argument("--no-working-dir", action="store_true",
                        help="ship only the code, not the current folder")
    parser.add_argument("--job-id", default=None, help="submission id (default: mtcnn-COMMAND-TIME-RANDOM)")
    parser.add_argument("command", metavar="COMMAND", help="an mtcnn-jobs command, e.g. annotate or train")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, metavar="ARGS",
                        help="the command's arguments, as you would give them locally")


def _check_command(command: str, arguments: list[str]) -> None:
    from jobs.cli import build_parser

    if command in LOCAL_ONLY_COMMANDS:
        raise SubmitError(f"{command!r} runs on this machine, not as a cluster job")
    # Parsing here turns a usage error into an immediate message instead of a failed job.
    build_parser().parse_args([command, *arguments])


def run(args: argparse.Namespace) -> int:
    """Submit the command; with --wait, follow it to the end."""
    settings = parse_env(args.env, os.environ, args.secret_env)
    # Credentials first: a usage error from parsing would echo the arguments as given.
    check_arguments(args.arguments, settings)
    _check_command(args.command, args.arguments)
    for path in local_paths(args.arguments):
        print(f"note: {path} is a path on this machine; cluster nodes only see their own disks "
              "(use object storage, e.g. s3://, or a shared filesystem)", file=sys.stderr)
    client = connect(args.address)
    job_id = args.job_id or job_id_for(args.command)
    working_dir = None if args.no_working_dir else args.working_dir
    with runtime_environment(settings, working_dir) as (runtime_env, prefix):
        entrypoint = shlex.join([*prefix, "mtcnn-jobs", args.command, *args.arguments])
        client.submit_job(entrypoint=entrypoint, submission_id=job_id, runtime_env=runtime_env,
                          metadata={"submitted_by": "mtcnn-jobs submit", "command": args.command})
    address = redact_text(client.get_address())
    print(f"submitted {job_id} to {address}")
    if settings.names():
        print(f"environment: {', '.join(settings.names())} (values not shown)")
    print(f"  status: mtcnn-jobs jobs status {job_id} --address {address}")
    print(f"  logs:   mtcnn-jobs jobs logs {job_id} --follow --address {address}")
    print(f"  stop:   mtcnn-jobs jobs stop {job_id} --address {address}")
    sys.stdout.flush()
    if not args.wait:
        return 0
    try:
        status = follow(client, job_id, mask=settings.mask)
    except KeyboardInterrupt:
        print(f"\nstopped following; {job_id} keeps running (stop it with the command above)",
              file=sys.stderr)
        return 130
    print(f"job {job_id} {status.value}", file=sys.stderr)
    return exit_status(status)
