"""Wall-clock images/s of the whole annotate job against the in-process FaceDetector on the same images.

    python benchmarks/annotate_throughput.py [--images DIR [DIR ...]] [--limit N] [--threads 2]
        [--layouts 2x1,1x2] [--num-gpus G]

The job runs as the user runs it (`mtcnn-jobs annotate`, a fresh process with an embedded Ray), so
Python start-up, Ray start-up and writing Parquet are all counted. The in-process baseline reads
and decodes each batch of `--batch-size` images on `--threads` threads, then detects them (on CPU
the detector spreads a batch's images over its `--threads` torch threads, its fastest use); its
own start-up (imports, loading the weights) is not counted.
Layouts AxT: A detector actors with T CPUs (torch threads) each. Goal: job / in-process >= 0.85.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "wider_face_val_dev" / "images"


def in_process_rate(paths: list[Path], threads: int, batch_size: int, device: str) -> float:
    """Images/s of read + decode + FaceDetector.detect in this process."""
    import torch

    from jobs.inputs.decode import decode_image
    from mtcnn import FaceDetector

    torch.set_num_threads(threads)
    detector = FaceDetector(device=device)
    detector.detect([decode_image(paths[0].read_bytes())])  # warm-up: allocator, kernels
    started = time.perf_counter()
    faces = 0
    # Decoding on as many threads as detection (OpenCV releases the GIL): the job's actors decode
    # in parallel too, so a one-thread decode would flatter the job on small images.
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(paths), batch_size):
            images = list(pool.map(lambda p: decode_image(p.read_bytes()), paths[start:start + batch_size]))
            faces += sum(len(d) for d in detector.detect(images))
    seconds = time.perf_counter() - started
    print(f"in-process: {len(paths)} images, {faces} faces, {seconds:.1f} s, "
          f"{len(paths) / seconds:.2f} images/s ({threads} threads, {device})", flush=True)
    return len(paths) / seconds


def job_rate(manifest: Path, count: int, extra: list[str], label: str) -> float:
    """Images/s of `mtcnn-jobs annotate` over a manifest, process start to exit."""
    with tempfile.TemporaryDirectory() as output:
        command = [sys.executable, "-m", "jobs.cli", "annotate", str(manifest), output, *extra]
        env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        seconds = time.perf_counter() - started
    if result.returncode != 0:
        print(result.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"job {label} failed with exit status {result.returncode}")
    # Ray workers' log lines share stdout with the job; its summary is the line starting "annotated".
    summary = next((line for line in reversed(result.stdout.splitlines()) if line.startswith("annotated")),
                   "no summary line")
    print(f"job {label}: {seconds:.1f} s wall, {count / seconds:.2f} images/s  [{summary}]", flush=True)
    return count / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, nargs="+", default=[DEFAULT_IMAGES],
                        help="folders of images (default: the WIDER validation subset)")
    parser.add_argument("--limit", type=int, default=None, help="use the first N images (sorted)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the in-process baseline")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--layouts", default="2x1,1x2", help="actors x CPUs each, comma-separated")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor (then one layout)")
    parser.add_argument("--no-repeat-baseline", dest="repeat_baseline", action="store_false",
                        help="measure the in-process rate only before the jobs, not after too")
    args = parser.parse_args()

    paths = sorted(p.resolve() for folder in args.images for p in folder.rglob("*")
                   if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    paths = paths[:args.limit] if args.limit else paths
    if not paths:
        raise SystemExit(f"no images under {', '.join(map(str, args.images))}")
    print(f"{len(paths)} images from {', '.join(map(str, args.images))}; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        manifest = Path(folder) / "images.txt"
        manifest.write_text("\n".join(str(p) for p in paths) + "\n")
        device = "cuda" if args.num_gpus > 0 else "cpu"
        # Other work on a shared machine changes the speed of both sides: measure the in-process
        # rate before and after the jobs and compare each job with their mean.
        before = in_process_rate(paths, args.threads, args.batch_size, device)
        common = ["--batch-size", str(args.batch_size)]
        if args.num_gpus > 0:
            layouts = [("gpu", common + ["--num-gpus", str(args.num_gpus)])]
        else:
            layouts = []
            for layout in args.layouts.split(","):
                actors, cpus = layout.split("x")
                layouts.append((layout, common + ["--concurrency", actors, "--cpus-per-actor", cpus]))
        rates = {label: job_rate(manifest, len(paths), extra, label) for label, extra in layouts}
        after = in_process_rate(paths, args.threads, args.batch_size, device) if args.repeat_baseline \
            else before
        baseline = (before + after) / 2
        print(f"in-process mean {baseline:.2f} images/s; load average now {os.getloadavg()[0]:.1f}")
        for label, rate in rates.items():
            print(f"ratio job {label} / in-process: {rate / baseline:.2f} (goal >= 0.85)", flush=True)


if __name__ == "__main__":
    main()
