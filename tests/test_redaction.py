"""Secrets by shape, not by name: the redaction module, and every command that could echo a secret.

The corpus (tests/secret_shapes.py) holds fresh random credentials in every recognised shape; each
test pushes them through a real command and scans every byte it printed, logged or wrote.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shlex
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import jobs.common.storage
from jobs.common import redaction
from jobs.cli import main
from jobs.common.redaction import MASK, StreamRedactor, install_log_redaction, looks_like_secret, public_path, redact, redact_text
from jobs.commands.submit import SubmitError, check_arguments, parse_env
from secret_shapes import all_secrets, build_corpus, scan, scan_tree
from shared_data import shared_data

REPO = Path(__file__).resolve().parents[1]
CORPUS = build_corpus()
SECRETS = all_secrets(CORPUS)
PATH_SHAPES = [s for s in CORPUS if s.public is not None]
OPTION_SHAPES = [s for s in CORPUS if s.options is not None]
#: Lines that hold no credential and must come through unchanged.
ORDINARY = [
    "annotated 3 images in 4.2 s (0.7 images/s), 0 errors",
    "s3://bucket/images/face.jpg: KeyError: 'faces'",
    "stage=pnet lr=0.001 batch_size=64",
    "mtcnn-jobs annotate s3://b/in s3://b/out --batch-size 2 --storage-options '{\"anon\": false}'",
    "https://example.com/a.jpg?w=640&h=480#top",
    '{"anon": false, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "us-east-1"}}',
    "/data/WIDER_val/images/0--Parade/0_Parade_marchingband_1_465.jpg",
    "2026-01-01 12:00:00,001 WARNING ray.data: 2 blocks, sp=3 se=high",
    "Traceback (most recent call last):\n  File \"x.py\", line 3, in <module>\nValueError: bad",
]


def _shape(name: str):
    return next(s for s in CORPUS if s.name == name)


def test_the_corpus_has_at_least_15_distinct_shapes():
    assert len({shape.name for shape in CORPUS}) == len(CORPUS) >= 15
    assert len(PATH_SHAPES) >= 6 and len(OPTION_SHAPES) >= 5
    # Fresh per session: two corpora share no secret, so a hit can only come from this input.
    assert not set(SECRETS) & set(all_secrets(build_corpus()))


# -- the functions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", CORPUS, ids=lambda s: s.name)
def test_redact_text_masks_every_shape_alone_and_inside_a_line(shape):
    for text in (shape.text, f"error: cannot open {shape.text}: 403 Forbidden\nnext line",
                 json.dumps({"message": shape.text}), repr([shape.text])):
        masked = redact_text(text)
        assert not scan(shape.secrets, masked), masked
        assert MASK in masked
    assert redact_text(redact_text(shape.text)) == redact_text(shape.text)


def test_redact_text_keeps_the_context_that_says_what_went_wrong():
    shape = next(s for s in CORPUS if s.name == "aws-presigned-v4")
    masked = redact_text(f"cannot read {shape.text}: 403")
    assert masked.startswith("cannot read https://bucket.s3.us-east-1.amazonaws.com/images/face2.jpg?")
    assert masked.endswith(": 403")
    connection = next(s for s in CORPUS if s.name == "azure-connection-string")
    assert "AccountName=acct;AccountKey=***;EndpointSuffix=core.windows.net" in redact_text(connection.text)
    assert redact_text("Authorization: Bearer abcdefgh12345678") == "Authorization: Bearer ***"
    assert redact_text("postgresql://app:pw@db:5432/x") == "postgresql://***@db:5432/x"


@pytest.mark.parametrize("text", ORDINARY)
def test_redact_text_leaves_ordinary_text_alone(text):
    assert redact_text(text) == text


@pytest.mark.parametrize("shape", PATH_SHAPES, ids=lambda s: s.name)
def test_public_path_is_the_path_minus_its_credentials(shape):
    stored = public_path(shape.text)
    assert stored == shape.public
    assert not scan(shape.secrets, stored)
    assert public_path(stored) == stored  # stable: a resumed run computes the same key


def test_public_path_is_the_same_for_a_re_signed_url_and_keeps_what_is_not_a_credential():
    # A presigned URL signed again (new signature and expiry) names the same object: resume must
    # find its row.
    first = "https://b.s3.amazonaws.com/k/x.jpg?versionId=3&X-Amz-Date=1&X-Amz-Signature=aaa&X-Amz-Credential=c1"
    again = "https://b.s3.amazonaws.com/k/x.jpg?versionId=3&X-Amz-Date=2&X-Amz-Signature=bbb&X-Amz-Credential=c2"
    assert public_path(first) == public_path(again) == "https://b.s3.amazonaws.com/k/x.jpg?versionId=3"
    # Azure SAS fields only go with a signature; alone, sp/se are the user's own parameters.
    assert public_path("https://h/x.jpg?sp=r&se=2") == "https://h/x.jpg?sp=r&se=2"
    assert public_path("https://h/x.jpg?sp=r&se=2&sig=zz") == "https://h/x.jpg"
    for unchanged in ("/data/a b/x.jpg", "relative/x.jpg", "s3://bucket/k/x.jpg", "https://h:8080/x.jpg?w=1#f",
                      "file:///tmp/x.jpg", "gs://bkt/dir/"):
        assert public_path(unchanged) == unchanged
    assert public_path("s3://AKIAIOSFODNN7EXAMPLE:wJalr%2Fxyz@bucket/k.jpg") == "s3://bucket/k.jpg"
    # `key` often names the object: distinct images keep distinct paths; a key-shaped value goes.
    assert public_path("https://h/get?key=photos/1.jpg") != public_path("https://h/get?key=photos/2.jpg")
    google_key = _shape("google-api-key").text
    assert public_path(f"https://h/get?id=1&key={google_key}") == "https://h/get?id=1"
    assert redact_text("https://h/get?key=photos/1.jpg") == "https://h/get?key=***"  # masked when shown


def test_redact_masks_options_by_name_and_by_shape():
    for shape in OPTION_SHAPES:
        masked = redact(shape.options)
        assert not scan(shape.secrets, json.dumps(masked)), shape.name
    options = {"key": "AKIAXX", "secret": "s", "token": None, "anon": False,
               "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1",
                                 "headers": {"Authorization": "Basic dXNlcjpwdw==", "Accept": "image/*"}},
               "config_kwargs": {"s3": {"addressing_style": "path"}}, "list": ["a", ("b", "Bearer abcdefgh123")]}
    masked = redact(options)
    assert masked == {"key": MASK, "secret": MASK, "token": None, "anon": False,
                      "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1",
                                        "headers": {"Authorization": MASK, "Accept": "image/*"}},
                      "config_kwargs": {"s3": {"addressing_style": "path"}}, "list": ["a", ("b", "Bearer ***")]}
    assert options["secret"] == "s"  # a copy: the job still needs the real options
    # Names as the issue lists them, and more.
    for name in ("AccountKey", "connection_string", "x-api-key", "Authorization", "SharedAccessSignature",
                 "Pwd", "client_secret", "sas_token", "sig", "DATABASE_URL", "private_key", "cookie"):
        assert redact({name: "v"}) == {name: MASK}, name
    for name in ("endpoint_url", "region_name", "anon", "use_ssl", "signal", "passes", "keep", "stage"):
        assert redact({name: "v"}) == {name: "v"}, name


def test_the_name_list_lives_in_the_redaction_module_only():
    assert not hasattr(jobs.common.storage, "redact")  # one home: jobs.common.redaction
    assert not hasattr(jobs.common.storage, "SECRET_KEYS")
    names = [l for l in (REPO / "jobs").rglob("*.py") if "SECRET_NAME_PARTS" in l.read_text()
             or '"secret", "token"' in l.read_text()]
    assert names == [REPO / "jobs" / "common" / "redaction.py"]


def test_looks_like_secret_by_name_or_by_value():
    for name in ("AZURE_STORAGE_CONNECTION_STRING", "DATABASE_URL", "GOOGLE_APPLICATION_CREDENTIALS",
                 "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "PGPASSWORD", "SENTRY_DSN"):
        assert looks_like_secret(name, "harmless")
    for shape in CORPUS:
        assert looks_like_secret("SETTING", shape.text), shape.name
    for name, value in (("AWS_ENDPOINT_URL", "http://127.0.0.1:9000"), ("AWS_DEFAULT_REGION", "us-east-1"),
                        ("OMP_NUM_THREADS", "4"), ("INPUT", "s3://bucket/images/")):
        assert not looks_like_secret(name, value)


def test_a_stream_cut_anywhere_is_masked_like_the_whole_text():
    text = "".join(f"line {i}: {shape.text}\n" for i, shape in enumerate(CORPUS)) + "last, unterminated"
    whole = redact_text(text)
    for size in (1, 7, 64, 1000):
        redactor = StreamRedactor()
        streamed = "".join(redactor.feed(text[i:i + size]) for i in range(0, len(text), size)) + redactor.close()
        assert streamed == whole, size
        assert not scan(SECRETS, streamed)


@pytest.fixture
def log_redaction():
    """install_log_redaction for one test, then the process's logging as it was."""
    factory, hook = logging.getLogRecordFactory(), sys.excepthook
    install_log_redaction()
    yield
    logging.setLogRecordFactory(factory)
    sys.excepthook = hook
    redaction._installed_factory = None


def test_log_redaction_masks_messages_arguments_and_tracebacks_of_any_logger(log_redaction):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    logger = logging.getLogger("botocore.endpoint.test")  # a child: its records propagate up
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        for shape in CORPUS:
            logger.warning("request to %s failed", shape.text)
            logger.warning(f"inline {shape.text}")
            try:
                raise ConnectionError(f"cannot reach {shape.text}")
            except ConnectionError:
                logger.exception("lost the connection")
        logging.getLogger("ray.data").error("%(url)s", {"url": CORPUS[0].text})
    finally:
        root.removeHandler(handler)
    written = stream.getvalue()
    assert written.count("lost the connection") == len(CORPUS) and "ConnectionError: cannot reach" in written
    assert not scan(SECRETS, written)
    # Uncaught exceptions are masked too.
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        try:
            raise RuntimeError(CORPUS[1].text)
        except RuntimeError:
            sys.excepthook(*sys.exc_info())
    assert "RuntimeError" in captured.getvalue() and not scan(CORPUS[1].secrets, captured.getvalue())


def test_the_cli_masks_what_it_logs(tmp_path):
    # A real process: the CLI installs the redaction when it starts; what any library logs
    # afterwards in that process is masked.
    shape = _shape("url-userinfo")
    script = ("import logging, sys\nfrom jobs import cli\nlogging.basicConfig()\n"
              "status = cli.main(['preview', sys.argv[1], '--out', sys.argv[2]])\n"
              "logging.getLogger('fsspec.http').warning('opening %s', sys.argv[3])\nsys.exit(status)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "none"), str(tmp_path / "gallery"),
                           shape.text], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no annotate results" in done.stderr
    assert "WARNING:fsspec.http:opening https://***@files.example.com/images/face6.jpg" in done.stderr
    assert not scan(shape.secrets, done.stdout + done.stderr)


# -- submit ----------------------------------------------------------------------------------------

def test_submit_ships_credential_shaped_settings_as_secrets():
    environ = {f"SETTING_{i}": shape.text for i, shape in enumerate(CORPUS)}
    named = {"AZURE_STORAGE_CONNECTION_STRING": "UseDevelopmentStorage=true", "DATABASE_URL": "postgres://db/x",
             "GOOGLE_APPLICATION_CREDENTIALS": "/secrets/sa.json"}
    environ.update(named, AWS_ENDPOINT_URL="http://127.0.0.1:9000", OMP_NUM_THREADS="2")
    settings = parse_env(list(environ), environ)
    assert settings.plain == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "OMP_NUM_THREADS": "2"}
    assert set(settings.secret) == set(environ) - set(settings.plain)
    masked = settings.mask("\n".join(environ.values()))
    assert not scan(SECRETS + list(named.values()), masked)


@pytest.mark.parametrize("shape", CORPUS, ids=lambda s: s.name)
def test_submit_refuses_a_credential_given_on_the_command_line(shape):
    with pytest.raises(SubmitError, match=r"export SETTING=\.\.\.` and pass --env SETTING") as refused:
        parse_env([f"SETTING={shape.text}"], {})
    assert not scan(shape.secrets, str(refused.value))
    settings = parse_env([], {})
    with pytest.raises(SubmitError, match="--env NAME or --secret-env NAME|pass them as variables") as refused:
        check_arguments(["in", shape.text, "out"], settings)
    assert not scan(shape.secrets, str(refused.value))
    if shape.options is not None:
        with pytest.raises(SubmitError, match="hold credentials"):
            check_arguments(["in", "out", f"--storage-options={json.dumps(shape.options)}"], settings)


# -- jobs status / logs and submit, on a real Ray head on loopback ----------------------------------

from test_submit import mtcnn_jobs, ray_head  # noqa: E402,F401 - the module's fixture and runner


def _job_details(environ: dict, *job_ids: str) -> str:
    """Everything the job server stores about the jobs (details and logs), as one text."""
    script = ("import json, sys\nfrom jobs.runtime.cluster_client import connect\nc = connect(None)\n"
              "print(json.dumps({j: {'info': c.get_job_info(j).model_dump(mode='json'),"
              " 'logs': c.get_job_logs(j)} for j in sys.argv[1:]}))")
    done = subprocess.run([sys.executable, "-c", script, *job_ids], env=environ, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
def test_jobs_status_and_logs_mask_every_shape(ray_head):
    # A job submitted by other means (the SDK, a colleague's script): its entrypoint holds every
    # shape, and it prints them all into its log.
    entrypoint = shlex.join(["printf", "%s\\n", *[shape.text for shape in CORPUS]])
    script = ("import sys\nfrom jobs.runtime.cluster_client import connect, wait_until_done\nc = connect(None)\n"
              "c.submit_job(entrypoint=sys.stdin.read(), submission_id='prints-secrets')\n"
              "print(wait_until_done(c, 'prints-secrets').value)")
    submitted = subprocess.run([sys.executable, "-c", script], input=entrypoint, env=ray_head.environ,
                               cwd=REPO, capture_output=True, text=True, timeout=180)
    assert submitted.stdout.strip() == "SUCCEEDED", submitted.stderr
    assert scan(SECRETS, _job_details(ray_head.environ, "prints-secrets")) == SECRETS  # all there, raw

    status = mtcnn_jobs(ray_head.environ, "jobs", "status", "prints-secrets")
    logs = mtcnn_jobs(ray_head.environ, "jobs", "logs", "prints-secrets")
    follow = mtcnn_jobs(ray_head.environ, "jobs", "logs", "prints-secrets", "--follow")
    assert status.returncode == logs.returncode == follow.returncode == 0, status.stderr + logs.stderr
    assert "SUCCEEDED" in status.stdout and "entrypoint: printf" in status.stdout
    for shown in (status, logs, follow):
        assert not scan(SECRETS, shown.stdout, shown.stderr)
        assert shown.stdout.count(MASK) >= len(CORPUS) - 2  # masked in place, line by line
    assert "https://***@files.example.com/images/face6.jpg" in logs.stdout
    assert "https://***@files.example.com/images/face6.jpg" in follow.stdout


@pytest.mark.slow
def test_submit_ships_every_shape_without_showing_it(ray_head, tmp_path):
    environ = {**ray_head.environ, **{f"SETTING_{i}": shape.text for i, shape in enumerate(CORPUS)},
               "AZURE_STORAGE_CONNECTION_STRING": next(s.text for s in CORPUS if s.name == "azure-connection-string"),
               "DATABASE_URL": next(s.text for s in CORPUS if s.name == "database-url"),
               "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "sa.json"), "OMP_NUM_THREADS": "1"}
    names = [n for n in environ if n.startswith("SETTING_")] + [
        "AZURE_STORAGE_CONNECTION_STRING", "DATABASE_URL", "GOOGLE_APPLICATION_CREDENTIALS", "OMP_NUM_THREADS"]
    # Any quick command does; preview of a missing run fails at once and says why.
    done = mtcnn_jobs(environ, "submit", "--wait", "--no-working-dir", "--job-id", "ships-secrets",
                      *[a for n in names for a in ("--env", n)],
                      "preview", str(tmp_path / "no-run"), "--out", str(tmp_path / "gallery"))
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "no annotate results" in done.stdout
    assert "environment: AZURE_STORAGE_CONNECTION_STRING, DATABASE_URL" in done.stdout
    details = json.loads(_job_details(ray_head.environ, "ships-secrets"))["ships-secrets"]
    assert details["info"]["runtime_env"]["env_vars"] == {"OMP_NUM_THREADS": "1"}  # the rest travel as secrets
    status = mtcnn_jobs(ray_head.environ, "jobs", "status", "ships-secrets")
    logs = mtcnn_jobs(ray_head.environ, "jobs", "logs", "ships-secrets")
    shown = [done.stdout, done.stderr, json.dumps(details), status.stdout, status.stderr, logs.stdout, logs.stderr]
    assert not scan(SECRETS + [environ["GOOGLE_APPLICATION_CREDENTIALS"]], *shown)
    # Ray's own log files of the head (its job manager, agents, this job's driver) hold none
    # either; only the job above that printed them on purpose has them in its driver's log.
    session_logs = [p for p in ray_head.temp_dir.glob("session_*/logs") if p.is_dir()]
    leaks = {path: found for path, found in scan_tree(SECRETS, *session_logs).items()
             if "prints-secrets" not in Path(path).name}
    assert session_logs and not leaks
    assert list(session_logs[0].glob("job-driver-ships-secrets*"))

    refused = mtcnn_jobs(environ, "submit", "--no-working-dir", "preview",
                         next(s.text for s in CORPUS if s.name == "azure-sas-url"), "--out", str(tmp_path / "g"))
    assert refused.returncode == 2 and "manifest" in refused.stderr
    assert not scan(SECRETS, refused.stdout, refused.stderr)


# -- training provenance, prepare, preview and evaluate --------------------------------------------

def test_training_provenance_and_loop_config_hold_no_secret(tmp_path):
    import torch  # noqa: F401 - the trainer's import needs it
    from jobs.training.trainer import TrainConfig, _provenance
    from mtcnn.weights import load_weights, save_weights

    options = {"key": _shape("aws-access-key-id").text, "secret": "plain-secret-value",
               **_shape("endpoint-url-userinfo").options, **_shape("bearer-header").options}
    config = TrainConfig(stage="pnet", data=_shape("aws-presigned-v4").text, output=_shape("url-userinfo").text,
                         storage_path=_shape("url-token-only-userinfo").text,
                         previous_weights=_shape("gcs-signed-v2").text, storage_options=options,
                         run_name=_shape("jwt").text)
    secrets = SECRETS + ["plain-secret-value"]
    provenance = _provenance(config, 10, {"loss": 0.5}, [{"loss": 0.5}],
                             {"source": _shape("azure-sas-url").text, "sha256": "0" * 64, "name": "x"})
    assert not scan(secrets, json.dumps(provenance))
    assert provenance["config"]["storage_options"]["secret"] == MASK
    assert provenance["data"]["shards"].startswith("https://bucket.s3.us-east-1.amazonaws.com/images/face2.jpg?")
    # The provenance travels inside the weights file: no byte of it holds a secret.
    stages = dict(load_weights("reference").stages)
    save_weights(tmp_path / "w.safetensors", {"pnet": stages["pnet"]}, provenance)
    assert not scan(secrets, (tmp_path / "w.safetensors").read_bytes())
    # What Ray Train stores with the run (train_loop_config) is redacted, and still a valid config.
    stored = redact(asdict(config))
    assert not scan(secrets, json.dumps(stored))
    assert TrainConfig(**stored).stage == "pnet"


def test_prepare_errors_hold_no_secret(capsys):
    shape = _shape("url-userinfo")
    status = main(["prepare", "--stage", "pnet", "--faces", f"wider:{shape.text}", "--output", "/tmp/unused-out"])
    err = capsys.readouterr().err
    assert status == 2 and "read from local disk" in err and "https://***@files.example.com" in err
    assert not scan(shape.secrets, err)


def _results_with_every_shape(folder: Path) -> None:
    """An annotate-format part file as an older run (before paths lost their credentials) wrote it."""
    from jobs.output.parts import PART_PREFIX

    face = pa.struct([("box", pa.list_(pa.float32())), ("score", pa.float32()),
                      ("landmarks", pa.list_(pa.float32()))])
    paths = [str(REPO / "tests" / "data" / "astronaut.png")] + [shape.text for shape in CORPUS]
    errors = [None] + [f"cannot read {shape.text}: 403 Forbidden ({shape.text})" for shape in CORPUS]
    table = pa.table({"path": paths, "width": pa.array([512] + [None] * len(CORPUS), pa.int32()),
                      "height": pa.array([512] + [None] * len(CORPUS), pa.int32()),
                      "faces": pa.array([[]] + [None] * len(CORPUS), pa.list_(face)), "error": errors})
    folder.mkdir(parents=True)
    pq.write_table(table, folder / f"{PART_PREFIX}0.parquet")


def test_preview_shows_paths_and_errors_without_their_secrets(tmp_path, capsys):
    _results_with_every_shape(tmp_path / "out")
    assert main(["preview", str(tmp_path / "out"), "--out", str(tmp_path / "gallery"), "--limit", "100"]) == 0
    captured = capsys.readouterr()
    page = (tmp_path / "gallery" / "index.html").read_text(encoding="utf-8")
    # One row per failed image; a header line masks to its end, the rest keep their context.
    assert page.count("<tr>") == len(CORPUS) and "astronaut.png" in page
    assert page.count("403 Forbidden") >= len(CORPUS) - 3
    assert "https://***@files.example.com/images/face6.jpg" in page
    assert not scan_tree(SECRETS, tmp_path / "gallery")
    assert not scan(SECRETS, captured.out, captured.err, *[p.name for p in (tmp_path / "gallery").iterdir()])


@pytest.mark.slow
def test_evaluate_metrics_hold_no_secret_from_the_weights_provenance(tmp_path, capsys):
    from mtcnn.weights import load_weights, save_weights

    landmarks = shared_data("cnn_facepoint_5pt/testImageList.txt")
    # Weights written by an older trainer, its provenance still holding the run's credentials.
    leaky = {"name": "old run", "data": {"shards": _shape("aws-presigned-v2").text},
             "config": {"storage_options": _shape("azure-connection-string").options,
                        "output": _shape("database-url").text, "note": _shape("private-key-pem").text}}
    weights = tmp_path / "old.safetensors"
    save_weights(weights, load_weights("reference").stages, leaky)
    secrets = [p for name in ("aws-presigned-v2", "azure-connection-string", "database-url", "private-key-pem")
               for p in _shape(name).secrets]
    assert scan(secrets, weights.read_bytes())  # the input really holds them
    status = main(["evaluate", "--weights", str(weights), "--landmarks",
                   str(landmarks), "--limit", "1",
                   "--output", str(tmp_path / "metrics")])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    metrics = json.loads((tmp_path / "metrics" / "metrics.json").read_text())
    assert metrics["weights"]["provenance"]["config"]["storage_options"] == {"connection_string": MASK,
                                                                              "account_name": "acct"}
    assert not scan_tree(secrets, tmp_path / "metrics")
    assert not scan(secrets, captured.out, captured.err)


def test_environment_is_untouched_by_the_corpus():
    # The corpus must never reach this process's environment (other tests' Ray and S3 use it).
    assert not scan(SECRETS, "\n".join(f"{k}={v}" for k, v in os.environ.items()))


def test_settings_that_name_an_auth_kind_are_not_masked():
    from jobs.common.redaction import redact_text

    assert redact_text("set RAY_AUTH_MODE=disabled to turn it off") == "set RAY_AUTH_MODE=disabled to turn it off"
    assert "hunter2" not in redact_text("RAY_AUTH_TOKEN=hunter2 AUTH=hunter2")


@pytest.mark.parametrize("token", ["AIza" + "Bc4_" * 8 + "d-x", "AIza" + "Bc4_" * 8 + "dx-",
                                   "glpat-" + "aB3_" * 5 + "-"])
def test_key_formats_ending_in_a_dash_are_masked_before_a_space_or_the_end(token):
    # A token whose last character is '-' has no word boundary before a space or the end of text.
    for text in (f"key {token} in a log line", f"key {token}", f"{token}\nnext"):
        assert token not in redact_text(text), text
