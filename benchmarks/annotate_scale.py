"""The annotate job at scale: 100k tiny images, manifests of 1M and 10M lines, resume with 1M done.

Prints, for this machine:
- the whole job on N tiny real photos (hard links of one 160x120 crop with a face) against the
  in-process detector on the same crop and cores (read + decode + detect, one process), with the
  driver's peak RSS and the number of files written;
- manifests of M lines (distinct real paths, through symlinked copies of the folder), each job
  stopped soon after its first part is committed: the time to that first part and the driver's
  peak RSS;
- resume: the job over a manifest whose R paths are all committed already, start to exit.

    python benchmarks/annotate_scale.py                      # N=100,000; M=1M,10M; R=1M
    python benchmarks/annotate_scale.py --images 5000 --manifests 1000000 --resume 100000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def tiny_photo(path: Path) -> None:
    """A 160x120 crop around the astronaut's face, as PNG."""
    image = cv2.imread(str(REPO / "tests" / "data" / "astronaut.png"))
    crop = image[40:340, 100:500]
    cv2.imwrite(str(path), cv2.resize(crop, (160, 120), interpolation=cv2.INTER_AREA))


#: Hard links made of one copy of the photo (file systems cap links per file: ext4 at 65,000).
LINKS_PER_COPY = 50_000


def make_folder(root: Path, count: int, per_folder: int = 1000) -> Path:
    """count hard links of one photo in folders of per_folder; the top folder."""
    top = root / "images"
    if top.exists():
        return top  # made by an earlier run with this --work folder
    # ext4 allows 65,000 links to one file: every LINKS_PER_COPY links get a copy of their own.
    for index in range(count):
        if index % LINKS_PER_COPY == 0:
            source = root / f"photo-{index // LINKS_PER_COPY}.png"
            tiny_photo(source)
        folder = top / f"{index // per_folder:04d}"
        if index % per_folder == 0:
            folder.mkdir(parents=True, exist_ok=True)
        os.link(source, folder / f"{index % per_folder:04d}.png")
    return top


def make_manifest(root: Path, images: Path, count: int, lines: int) -> Path:
    """A .txt manifest of `lines` distinct paths: the images, seen through symlinked mirrors."""
    mirrors = -(-lines // count)
    for index in range(mirrors):
        link = root / f"mirror{index:04d}"
        if not link.exists():
            link.symlink_to(images, target_is_directory=True)
    manifest = root / f"manifest-{lines}.txt"
    names = [f"{i // 1000:04d}/{i % 1000:04d}.png" for i in range(count)]
    written = 0
    with open(manifest, "w") as handle:
        for index in range(mirrors):
            prefix = f"{root}/mirror{index:04d}/"
            batch = names[:min(count, lines - written)]
            handle.write("".join(prefix + name + "\n" for name in batch))
            written += len(batch)
    return manifest


def peak_rss_mb(pid: int) -> float:
    """A process's peak resident set size (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_job(args: list[str], stop_when=None, timeout: float = 7200) -> dict:
    """Run mtcnn-jobs annotate in a process; wall time, peak RSS, and when stop_when() first held."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    started = time.perf_counter()
    job = subprocess.Popen([sys.executable, "-m", "jobs.cli", "annotate", *args], cwd=REPO,
                           env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, first = 0.0, None
    while job.poll() is None and time.perf_counter() - started < timeout:
        try:
            peak = max(peak, peak_rss_mb(job.pid))
        except OSError:
            pass
        if stop_when is not None and first is None and stop_when():
            first = time.perf_counter() - started
            # SIGTERM, not SIGINT: a process started in the background ignores SIGINT.
            job.send_signal(signal.SIGTERM)
        time.sleep(0.25)
    out, err = job.communicate(timeout=120)
    return {"seconds": time.perf_counter() - started, "peak_mb": peak, "first": first,
            "status": job.returncode, "out": out.strip(), "err": err}


def fresh(folder: Path) -> Path:
    """folder, with whatever an earlier run with the same --work left there removed."""
    if folder.exists():
        shutil.rmtree(folder)
    return folder


def parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet")) if folder.exists() else []


def in_process_rate(images: Path, count: int) -> float:
    """Images/s of read + decode + detect in this process on 2 threads, as the job's actors do."""
    import torch

    from jobs.inputs.decode import decode_image
    from mtcnn import FaceDetector

    torch.set_num_threads(2)
    detector = FaceDetector()
    paths = sorted(images.rglob("*.png"))[:count]
    detector.detect([decode_image(paths[0].read_bytes())])  # warm-up
    started = time.perf_counter()
    for start in range(0, len(paths), 16):
        batch = [decode_image(p.read_bytes()) for p in paths[start:start + 16]]
        detector.detect(batch)
    return len(paths) / (time.perf_counter() - started)


def committed_output(root: Path, manifest: Path, count: int) -> Path:
    """An OUTPUT holding one committed row for each of the manifest's first `count` paths."""

    from jobs.pipelines.annotate import commit_rows
    from jobs.inputs.decode import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
    from jobs.common.schema import annotation_table, run_metadata
    from mtcnn import DetectorConfig, Detections, load_weights

    weights = load_weights("reference")
    metadata = run_metadata(str(weights.source), weights.sha256, weights.provenance, DetectorConfig(),
                            DEFAULT_MAX_PIXELS, DEFAULT_MAX_BYTES)
    metadata["device"] = "cpu"
    output = fresh(root / f"resume-{count}")
    output.mkdir()
    empty = Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))
    with open(manifest) as handle:
        paths = [next(handle).rstrip("\n") for _ in range(count)]
    for start in range(0, count, 4096):
        chunk = paths[start:start + 4096]
        table = annotation_table(chunk, [(160, 120)] * len(chunk), [empty] * len(chunk), [None] * len(chunk))
        commit_rows(table, str(output), {}, json.dumps(metadata, sort_keys=True))
    resume_manifest = root / f"done-{count}.txt"
    resume_manifest.write_text("".join(p + "\n" for p in paths))
    return output, resume_manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--manifests", default="1000000,10000000")
    parser.add_argument("--resume", type=int, default=1_000_000)
    parser.add_argument("--baseline-images", type=int, default=3000)
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--no-full-job", action="store_true", help="only the manifest and resume figures")
    args = parser.parse_args()
    root = Path(args.work or tempfile.mkdtemp(prefix="annotate-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"scratch: {root}; {os.cpu_count()} CPUs", flush=True)
    started = time.perf_counter()
    images = make_folder(root, args.images)
    print(f"{args.images:,} hard links in {time.perf_counter() - started:.1f} s", flush=True)

    if args.no_full_job:
        args.baseline_images = 0
    baseline = in_process_rate(images, args.baseline_images) if args.baseline_images else 0.0
    print(f"in-process detector (read + decode + detect, 2 threads): {baseline:.1f} images/s", flush=True)
    out = fresh(root / "out-full")  # an earlier run's rows would be resumed, not annotated
    job = run_job([str(images), str(out)]) if not args.no_full_job else None
    rate = args.images / job["seconds"] if job else 0.0
    print(f"| full job, {args.images:,} tiny images | {job['seconds']:.0f} s, {rate:.1f} images/s "
          f"(start-up included), {rate / baseline:.2f} of in-process | driver peak RSS "
          f"{job['peak_mb']:.0f} MB | {len(parts(out))} files | exit {job['status']}: {job['out']}",
          flush=True) if job else None

    for lines in (int(x) for x in args.manifests.split(",") if x):
        made = time.perf_counter()
        manifest = make_manifest(root, images, args.images, lines)
        print(f"manifest of {lines:,} lines written in {time.perf_counter() - made:.0f} s "
              f"({manifest.stat().st_size / 1e6:.0f} MB)", flush=True)
        out = fresh(root / f"out-manifest-{lines}")
        job = run_job([str(manifest), str(out)], stop_when=lambda out=out: bool(parts(out)))
        print(f"| manifest of {lines:,} lines | first part committed after {job['first']:.1f} s "
              f"(then stopped) | driver peak RSS {job['peak_mb']:.0f} MB | exit {job['status']}",
              flush=True)

    if args.resume:
        manifest = make_manifest(root, images, args.images, args.resume)
        output, done_manifest = committed_output(root, manifest, args.resume)
        job = run_job([str(done_manifest), str(output)])
        print(f"| resume with {args.resume:,} done | {job['seconds']:.1f} s start to exit | driver "
              f"peak RSS {job['peak_mb']:.0f} MB | {job['out']}", flush=True)


if __name__ == "__main__":
    main()
