"""mtcnn-jobs: the command line. Each subcommand lives in its own module under jobs/commands/."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from jobs.common.redaction import install_log_redaction, redact_text

#: Errors that mean the input is wrong (options, files, access): one line, exit status 2, no
#: traceback. An error with an `exit_status` attribute exits with that instead.
INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, ConnectionError)

# Subcommand -> (module, one-line help). Each module defines add_arguments(parser) and
# run(args) -> int (the exit status); it may name INPUT_ERRORS of its own (e.g. OSError for a
# command whose files are its input). No command module imports another: what two commands
# share lives below them (tests/test_layout.py).
COMMANDS = {
    "annotate": ("jobs.commands.annotate", "detect faces in a folder, bucket or manifest of images into Parquet"),
    "preview": ("jobs.commands.preview", "draw an annotate run's detections into an HTML gallery"),
    "anonymize": ("jobs.commands.anonymize", "copy images with every detected face blurred, pixelated or filled"),
    "crops": ("jobs.commands.crops", "cut aligned face chips out of an annotate run's images into Parquet"),
    "gallery": ("jobs.commands.gallery", "a sample of a crops run's chips as an HTML gallery"),
    "export": ("jobs.commands.export", "an annotate run as COCO keypoints JSON, WIDER prediction files or CSV"),
    "prepare": ("jobs.commands.prepare", "make training samples for one stage as Parquet shards"),
    "train": ("jobs.commands.train", "train a stage, or the whole cascade from a config, with Ray Train"),
    "evaluate": ("jobs.commands.evaluate", "WIDER AP and landmark error of a weights file or of existing predictions"),
    "submit": ("jobs.commands.submit", "submit an mtcnn-jobs command to a Ray cluster"),
    "jobs": ("jobs.commands.cluster_jobs", "status, logs or stop of a submitted job"),
    "convert-weights": ("jobs.commands.convert_weights", "convert facenet-pytorch's reference weights"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser with every available subcommand, or with only one fully built.

    With `only`, the other subcommands are listed by name and help but their modules are not
    imported: the training modules pull in Ray Train and torch, seconds of start-up that a
    command like annotate would otherwise pay before it starts any work.
    """
    parser = argparse.ArgumentParser(prog="mtcnn-jobs", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if only is not None and name != only:
            subparsers.add_parser(name, help=help_text, description=help_text)
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue  # not part of this install
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the mtcnn-jobs console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # Before any command runs: whatever a library logs (a failing URL, a request's headers) is
    # masked on its way to the console and to Ray's log files.
    install_log_redaction()
    # The subcommand comes first; without a known one (help, a typo) nothing needs importing.
    command = argv[0] if argv and argv[0] in COMMANDS else ""
    args = build_parser(only=command).parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (`ray job stop`, a scheduler's timeout, kill) ends a command as Ctrl-C does, so
        # its finally blocks run: an annotate job lets go of its OUTPUT's lease.
        signal.signal(signal.SIGTERM, _interrupt)
    expected = INPUT_ERRORS + tuple(getattr(args._module, "INPUT_ERRORS", ()))
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - sorted below: input errors end here, bugs go on
        status = getattr(error, "exit_status", 2 if isinstance(error, expected) else None)
        if status is None:
            raise
        # Messages may quote paths or URLs that carry credentials.
        print(f"mtcnn-jobs {args.command}: {redact_text(str(error))}", file=sys.stderr)
        return int(status)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
