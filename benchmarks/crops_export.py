"""Crops/s of `mtcnn-jobs crops` against the annotate job on the same WIDER photos; export time per format.

    python benchmarks/crops_export.py [--limit 1000] [--export-rows 1000000] [--wider-rows N]
        [--skip-crops] [--skip-export]

Both jobs run as a user runs them (a fresh `mtcnn-jobs` process with an embedded Ray), so Python
and Ray start-up and writing Parquet are counted. Photos: `wider_face_val_dev`, then the two
WIDER training folders, up to --limit. Exports run over --export-rows generated annotate rows
(0 to 5 faces each, 2.5 on average, in parts of 100,000 rows), in this process, streamed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
FOLDERS = ["wider_face_val_dev", "wider_face_train_small", "wider_face_train_more"]


def photos(limit: int) -> list[Path]:
    """Up to limit WIDER photos, the validation subset first."""
    found: list[Path] = []
    for folder in FOLDERS:
        found += sorted((SHARED / folder / "images").rglob("*.jpg"))
    return found[:limit]


def timed(command: list[str]) -> tuple[float, str]:
    """Seconds from process start to exit, and the last line it printed; fails loudly."""
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "jobs.cli", *command], capture_output=True, text=True,
                            env=env, cwd=ROOT)
    seconds = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return seconds, result.stdout.strip().splitlines()[-1]


def crops_against_annotate(limit: int, work: Path) -> None:
    """Print images/s of annotate and crops/s (and images/s) of crops over the same photos."""
    paths = photos(limit)
    manifest = work / "photos.txt"
    manifest.write_text("".join(f"{p}\n" for p in paths))
    annotations, chips = work / "faces", work / "chips"
    seconds, line = timed(["annotate", str(manifest), str(annotations)])
    print(f"annotate: {len(paths)} photos in {seconds:.1f} s = {len(paths) / seconds:.2f} images/s  ({line})",
          flush=True)
    for align in ("similarity", "box"):
        out = chips.with_name(f"chips-{align}")
        seconds, line = timed(["crops", str(annotations), str(out), "--align", align])
        table = pq.read_table(sorted(out.glob("part-*.parquet")), columns=["path", "error"])
        count = table.column("error").null_count  # rows without an error are chips
        images = len(set(table.column("path").to_pylist()))
        print(f"crops --align {align}: {count} chips of {images} photos in {seconds:.1f} s = "
              f"{count / seconds:.1f} crops/s, {images / seconds:.2f} images/s  ({line})", flush=True)


def generated_rows(rows: int, folder: Path, part_rows: int = 100_000) -> None:
    """Write `rows` annotate rows with random faces as Parquet parts of part_rows rows."""
    from jobs.common.schema import ANNOTATION_SCHEMA, FACE_TYPE

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, rows, part_rows):
        count = min(part_rows, rows - start)
        faces_per_row = rng.integers(0, 6, count).astype(np.int32)
        offsets = np.concatenate([[0], np.cumsum(faces_per_row)]).astype(np.int32)
        total = int(offsets[-1])
        corner = rng.uniform(0, 900, (total, 2))
        size = rng.uniform(12, 200, (total, 1))
        boxes = np.hstack([corner, corner + size]).astype(np.float32)
        points = (np.repeat(corner, 5, axis=0).reshape(total, 10)
                  + rng.uniform(0, 1, (total, 10)) * np.repeat(size, 10, axis=1)).astype(np.float32)
        faces = pa.StructArray.from_arrays(
            [pa.FixedSizeListArray.from_arrays(pa.array(boxes.ravel()), 4),
             pa.array(rng.uniform(0.7, 1.0, total).astype(np.float32)),
             pa.FixedSizeListArray.from_arrays(pa.array(points.ravel()), 10)], fields=list(FACE_TYPE))
        paths = [f"s3://bucket/photos/{(start + i) % 61}--event/img_{start + i:08d}.jpg" for i in range(count)]
        columns = {"path": pa.array(paths, pa.string()), "width": pa.array(np.full(count, 1024, np.int32)),
                   "height": pa.array(np.full(count, 768, np.int32)),
                   "faces": pa.ListArray.from_arrays(pa.array(offsets), faces),
                   "error": pa.nulls(count, pa.string())}
        if "error_kind" in ANNOTATION_SCHEMA.names:
            columns["error_kind"] = pa.nulls(count, pa.string())
        table = pa.table(columns).cast(ANNOTATION_SCHEMA)
        pq.write_table(table, folder / f"part-{start // part_rows:05d}.parquet")


def export_times(rows: int, wider_rows: int, work: Path) -> None:
    """Print the seconds each export format takes over generated rows."""
    from jobs.pipelines.export import ExportConfig, export

    for count in sorted({rows, wider_rows}):
        started = time.perf_counter()
        generated_rows(count, work / f"rows-{count}")
        print(f"generated {count:,} rows in {time.perf_counter() - started:.1f} s", flush=True)
    for fmt, count, out in (("coco", rows, "faces.json"), ("csv", rows, "faces.csv"), ("wider", wider_rows, "wider")):
        summary = export(ExportConfig(str(work / f"rows-{count}"), fmt, str(work / out)))
        size = sum(f.stat().st_size for f in (work / out).rglob("*")) if (work / out).is_dir() \
            else (work / out).stat().st_size
        print(f"export {fmt}: {count:,} rows, {summary.faces:,} faces, {summary.files:,} files, "
              f"{size / 1e6:.0f} MB in {summary.seconds:.1f} s ({count / summary.seconds:,.0f} rows/s)", flush=True)


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=1000, help="WIDER photos for annotate and crops")
    parser.add_argument("--export-rows", type=int, default=1_000_000, help="generated rows for COCO and CSV")
    parser.add_argument("--wider-rows", type=int, default=None,
                        help="generated rows for the WIDER layout (one file each; default --export-rows)")
    parser.add_argument("--skip-crops", action="store_true")
    parser.add_argument("--skip-export", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="crops-bench-") as scratch:
        work = Path(scratch)
        if not args.skip_crops:
            crops_against_annotate(args.limit, work)
        if not args.skip_export:
            export_times(args.export_rows, args.wider_rows or args.export_rows, work)


if __name__ == "__main__":
    main()
