"""Every secret shape of the corpus pushed through annotate, locally and on moto's S3: no byte of any
output file, printed line or Ray log holds a secret, and paths are stored minus their credentials."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from jobs.output import committed_parts
from jobs.common.storage import filesystem
from secret_shapes import all_secrets, build_corpus, scan, scan_tree

DATA = Path(__file__).parent / "data"
CORPUS = build_corpus()
SECRETS = all_secrets(CORPUS)
URLS = [shape for shape in CORPUS if shape.public]

pytestmark = pytest.mark.slow


def ray_logs(ray_session) -> Path:
    return Path(ray_session._private.worker._global_node.get_session_dir_path()) / "logs"


def test_annotate_local_stores_public_paths_and_leaks_no_secret(ray_session, tmp_path, capfd):
    shutil.copy(DATA / "astronaut.png", tmp_path / "astronaut.png")
    manifest = tmp_path / "todo.txt"
    manifest.write_text("\n".join([str(tmp_path / "astronaut.png")] + [s.text for s in URLS]) + "\n")
    args = ["annotate", str(manifest), str(tmp_path / "out"), "--read-retries", "0"]
    assert main(args) == 0
    captured = capfd.readouterr()
    table = pa.concat_tables([pq.read_table(p) for p in committed_parts(str(tmp_path / "out"))])
    stored = set(table.column("path").to_pylist())
    assert stored == {str(tmp_path / "astronaut.png")} | {s.public for s in URLS}
    assert table.num_rows == 1 + len(URLS)
    assert not scan_tree(SECRETS, tmp_path / "out")
    assert not scan(SECRETS, captured.out, captured.err)
    # A rerun matches the same inputs through their public paths: nothing is redone twice.
    assert main(args) == 0
    rerun = capfd.readouterr()
    assert "annotated 0 images" in rerun.out or "transient" in rerun.out
    again = pa.concat_tables([pq.read_table(p) for p in committed_parts(str(tmp_path / "out"))])
    assert sorted(again.column("path").to_pylist()) == sorted(table.column("path").to_pylist())
    assert not scan(SECRETS, rerun.out, rerun.err)
    leaked = [p for p in ray_logs(ray_session).rglob("*") if p.is_file() and scan(SECRETS, p.read_bytes())]
    assert not leaked


def test_annotate_on_s3_with_secret_storage_options_leaks_nothing(ray_session, s3_server, capfd):
    bucket = f"secrets-{uuid.uuid4().hex[:8]}"
    fs, _ = filesystem(f"s3://{bucket}")
    fs.mkdir(bucket)
    fs.put_file(str(DATA / "astronaut.png"), f"{bucket}/in/astronaut.png")
    fs.pipe_file(f"{bucket}/todo.txt", ("\n".join([f"s3://{bucket}/in/astronaut.png"] + [s.text for s in URLS])
                                       + "\n").encode())
    # moto accepts any key pair: the secret travels the whole way, as a real one would.
    secret = "".join(part for shape in CORPUS if not shape.public for part in shape.secrets[:1])[:200]
    options = {"key": "testing", "secret": secret, "client_kwargs": {"region_name": "us-east-1"}}
    status = main(["annotate", f"s3://{bucket}/todo.txt", f"s3://{bucket}/out", "--read-retries", "0",
                   "--storage-options", json.dumps(options)])
    captured = capfd.readouterr()
    assert status == 0, captured.err
    fs.invalidate_cache()
    files = fs.find(f"{bucket}/out")
    assert files
    table = pa.concat_tables([pq.read_table(fs.open(p, "rb")) for p in committed_parts(f"s3://{bucket}/out")])
    assert set(table.column("path").to_pylist()) == {f"s3://{bucket}/in/astronaut.png"} | {s.public for s in URLS}
    everything = SECRETS + [secret]
    assert not [p for p in files if scan(everything, fs.cat_file(p))]
    assert not scan(everything, captured.out, captured.err)
    leaked = [p for p in ray_logs(ray_session).rglob("*") if p.is_file() and scan(everything, p.read_bytes())]
    assert not leaked
