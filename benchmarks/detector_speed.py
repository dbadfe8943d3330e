"""Images/s of FaceDetector at 1920x1080, 1280x720 and 960x540, both pyramids, beside the reference.

Frames are real photos (../shared/data/wider_face_val_dev) resized to each resolution. When the
reference's environment is found (--reference-python, default /opt/refvenv/bin/python, see
benchmarks/README.md), facenet-pytorch's MTCNN runs on the same frames in the same run, and the
script prints the speed ratio and whether the classic pyramid's detections match it (score >= 0.9
faces: IoU >= 0.9, score within 0.01, landmarks within 2 px). Also times pyramid construction alone
and where the detector's time goes.

    python benchmarks/detector_speed.py [--frames 16] [--threads 2] [--device cpu] [--batch-sizes 1,8,16] [--images DIR]

Each side runs one frame per call and frames in batches (the project spreads a batch's frames over
its threads on CPU; facenet-pytorch stacks same-size frames); ratios use each side's best.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from mtcnn import FaceDetector
from mtcnn.pyramid import build_pyramid, level_size, pyramid_scales

sys.path.insert(0, str(Path(__file__).parent))
from reference_equivalence import match_faces  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wider_face_val_dev" / "images"
RESOLUTIONS = [(1920, 1080), (1280, 720), (960, 540)]
REFERENCE_SCRIPT = Path(__file__).parent / "reference" / "facenet_speed.py"


def load_frames(count: int, width: int, height: int, folder: Path = DATA) -> list[np.ndarray]:
    """count real photos from a folder (spread over it), RGB, resized to width x height."""
    everything = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    files = everything[:: max(1, len(everything) // count)][:count]
    frames = []
    for file in files:
        image = cv2.cvtColor(cv2.imread(str(file)), cv2.COLOR_BGR2RGB)
        frames.append(cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA))
    return frames


def images_per_second(detector: FaceDetector, frames: list[np.ndarray], batch_size: int,
                      repeats: int) -> tuple[float, list]:
    """Throughput of detector.detect over frames in batches, after one warm-up batch."""
    detector.detect(frames[:batch_size])
    start = time.perf_counter()
    for _ in range(repeats):
        results = []
        for i in range(0, len(frames), batch_size):
            results.extend(detector.detect(frames[i:i + batch_size]))
    if detector.device.type == "cuda":
        torch.cuda.synchronize()
    return repeats * len(frames) / (time.perf_counter() - start), results


def time_pyramids(frame: np.ndarray, repeats: int = 10) -> dict[str, float]:
    """Milliseconds to build one frame's pyramid: classic, dynamic, and torch area (the reference's)."""
    scales = pyramid_scales(*frame.shape[:2], 20, 0.709)
    timings = {}
    for name in ("classic", "dynamic"):
        start = time.perf_counter()
        for _ in range(repeats):
            build_pyramid(frame, scales, name)
        timings[name] = (time.perf_counter() - start) / repeats * 1000
    full = torch.from_numpy(frame).permute(2, 0, 1)[None].float()
    start = time.perf_counter()
    for _ in range(repeats):
        for scale in scales:
            F.interpolate(full, size=level_size(*frame.shape[:2], scale), mode="area")
    timings["torch area, full image (reference)"] = (time.perf_counter() - start) / repeats * 1000
    return timings


def breakdown(detector: FaceDetector, frames: list[np.ndarray]) -> dict[str, float]:
    """Share of wall time per labelled part of the cascade, in ms per frame."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for frame in frames:
            detector.detect([frame])
        total = time.perf_counter() - start
    parts = {}
    for event in prof.key_averages():
        if event.key.startswith("mtcnn."):
            parts[event.key[6:]] = event.cpu_time_total / 1000 / len(frames)
    parts["total (under the profiler)"] = total * 1000 / len(frames)
    return parts


def run_reference(python: str, frames: list[np.ndarray], threads: int, batch_size: int) -> dict | None:
    """facenet-pytorch's images/s and detections on the same frames, or None if unavailable."""
    if not python or not Path(python).exists():
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "frames.npy"
        np.save(path, np.stack(frames))
        done = subprocess.run([python, str(REFERENCE_SCRIPT), str(path), "--threads", str(threads),
                               "--batch-size", str(batch_size)], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"  reference failed: {done.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(done.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", default="1,8,16", help="frames per detect call, comma-separated")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--resolutions", default="1920x1080,1280x720,960x540")
    parser.add_argument("--images", type=Path, default=DATA,
                        help="folder of photos to resize into frames (default: WIDER val, crowded scenes)")
    parser.add_argument("--reference-python", default="/opt/refvenv/bin/python")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch_sizes = [int(v) for v in args.batch_sizes.split(",")]
    print(f"torch {torch.__version__}, {args.threads} threads, device {args.device}, "
          f"batches of {batch_sizes}, {args.frames} frames per resolution from {args.images}")
    for resolution in args.resolutions.split(","):
        width, height = (int(v) for v in resolution.split("x"))
        frames = load_frames(args.frames, width, height, args.images)
        print(f"\n{width}x{height}")
        ours: dict[str, tuple[float, list]] = {}
        theirs: dict[int, dict] = {}
        for batch_size in batch_sizes:
            for pyramid in ("dynamic", "classic"):
                detector = FaceDetector(device=args.device, pyramid=pyramid)
                label = f"{pyramid}, batch {batch_size}"
                ours[label] = images_per_second(detector, frames, batch_size, args.repeats)
                print(f"  mtcnn {pyramid:8s} batch {batch_size:2d}  {ours[label][0]:7.2f} images/s", flush=True)
            reference = None if args.device != "cpu" else run_reference(
                args.reference_python, frames, args.threads, batch_size)
            if reference:
                theirs[batch_size] = reference
                print(f"  facenet-pytorch  batch {batch_size:2d}  {reference['images_per_second']:7.2f} images/s",
                      flush=True)
        if theirs:
            best_batch = max(theirs, key=lambda b: theirs[b]["images_per_second"])
            rate = theirs[best_batch]["images_per_second"]
            for pyramid in ("dynamic", "classic"):
                label = max((k for k in ours if k.startswith(pyramid)), key=lambda k: ours[k][0])
                print(f"  ratio {pyramid} (best: {label}) / reference (best: batch {best_batch}): "
                      f"{ours[label][0] / rate:.2f}x")
            expected_faces = theirs[min(theirs)]["detections"]
            for batch_size in batch_sizes:
                total = reproduced = 0
                for found, expected in zip(ours[f"classic, batch {batch_size}"][1], expected_faces):
                    count, ok, _ = match_faces(expected, found)
                    total, reproduced = total + count, reproduced + ok
                print(f"  classic batch {batch_size} detections vs reference: {reproduced}/{total} faces "
                      "(score >= 0.9) reproduced")
        if args.device == "cpu":
            pyramids = time_pyramids(frames[0])
            print("  pyramid alone: " + ", ".join(f"{k} {v:.1f} ms" for k, v in pyramids.items()))
            for pyramid in ("dynamic", "classic"):
                parts = breakdown(FaceDetector(pyramid=pyramid), frames[: max(4, args.frames // 4)])
                print(f"  where the time goes ({pyramid}, ms/frame): "
                      + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
