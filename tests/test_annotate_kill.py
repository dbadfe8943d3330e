"""A detector actor's process killed mid-job: Ray restarts it, and no image is lost or duplicated."""

import os
import shutil
import signal
from pathlib import Path

import duckdb

from jobs.pipelines.annotate import AnnotateConfig, annotate

DATA = Path(__file__).parent / "data"


def annotator_pids() -> list[int]:
    """Processes of live FaceAnnotator actors (Ray titles them ray::MapWorker(...FaceAnnotator))."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            title = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if title.startswith(b"ray::") and b"FaceAnnotator" in title:
            pids.append(int(entry))
    return pids


def test_killed_actor_loses_and_duplicates_nothing(ray_session, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(12):
        shutil.copy(DATA / ("astronaut.png" if index % 2 else "cmyk.jpg"), folder / f"img {index:02d}.png")
    killed: list[int] = []
    rows_at_kill: list[int] = []

    def kill_after_first_rows(summary) -> None:
        # Rows of one batch are in; the actors are busy with the rest. Kill them all, once.
        if not killed:
            rows_at_kill.append(summary.images)
            for pid in annotator_pids():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    config = AnnotateConfig(str(folder), str(tmp_path / "out"), batch_size=1, concurrency=1,
                            show_progress=False)
    summary = annotate(config, on_rows=kill_after_first_rows)

    assert killed, "no FaceAnnotator process was found to kill"
    assert rows_at_kill[0] < 12  # the kill hit a job with work left to retry
    assert summary.images == 12 and summary.errors == 0
    found = duckdb.sql(f"select path, len(faces) from '{tmp_path}/out/*.parquet'").fetchall()
    paths = [path for path, _ in found]
    assert len(paths) == len(set(paths)) == 12
    assert sorted(paths) == sorted(str(p) for p in folder.iterdir())
    assert all(faces == 1 for _, faces in found)
    assert not set(killed) & set(annotator_pids())  # the work was finished by a restarted actor
