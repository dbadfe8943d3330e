"""Peak memory of FaceDetector.detect per image size, measured, beside mtcnn.memory's estimate.

Each (size, source, pyramid) runs in a fresh Python process, so peaks do not mix: it loads the
detector, makes the image, frees what it can (gc, malloc_trim), notes its resident memory, resets
the kernel's high-water mark (/proc/self/clear_refs, 5), runs one detect call and reads VmHWM.
The measured peak is VmHWM minus the resident memory before the call: what detecting adds beyond
the loaded nets and the decoded image, on a first call (pages of code and kernels that the call
touches first are included, as in a worker whose first image is large). Where clear_refs is
refused it falls back to ru_maxrss, which then also holds whatever peak came before the call.

Sources: "astronaut" (tests/data/astronaut.png resized to each size, one large face) and "crowd"
(the WIDER validation photo with the most faces, ../shared/data, tiled at its own scale to fill
each size: many faces, many P-Net candidates).

    python benchmarks/detector_memory.py [--sizes 640x480,1920x1080] [--sources astronaut,crowd]
        [--pyramids classic,dynamic] [--threads 1] [--precision fp32] [--large]

--large adds 9000x9000 (81 Mpx, about 90 s and 6 GB on one thread). Prints one row per run:
size, megapixels, measured peak MB, estimate MB, estimate / measured, seconds, faces, and which
modelled phase is the largest.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASTRONAUT = ROOT / "tests" / "data" / "astronaut.png"
CROWD = (ROOT.parent / "shared" / "data" / "wider_face_val_dev" / "images" / "10--People_Marching"
         / "10_People_Marching_People_Marching_10_People_Marching_People_Marching_10_69.jpg")
SIZES = [(640, 480), (1280, 720), (1920, 1080), (3840, 2160), (3000, 3000), (4000, 3000), (6000, 6000)]
LARGE = [(9000, 9000)]


def status_kib(field: str) -> int:
    """A VmRSS / VmHWM figure of this process, KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_high_water_mark() -> bool:
    """Set VmHWM back to the current VmRSS (Linux 4.0+); whether the kernel allowed it."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def release_free_heap() -> None:
    """gc, then glibc's malloc_trim: freed heap pages back to the kernel before the baseline."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def make_image(source: str, width: int, height: int):
    """An RGB uint8 height x width image: the astronaut resized, or the crowd photo tiled."""
    import cv2
    import numpy as np

    path = ASTRONAUT if source == "astronaut" else CROWD
    photo = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if photo is None:
        raise SystemExit(f"cannot read {path}")
    photo = cv2.cvtColor(photo, cv2.COLOR_BGR2RGB)
    if source == "astronaut":
        return cv2.resize(photo, (width, height), interpolation=cv2.INTER_LINEAR)
    # Tiled with alternate mirror images, so the seams do not make straight edges of one tile.
    tile = np.concatenate([photo, photo[:, ::-1]], axis=1)
    tile = np.concatenate([tile, tile[::-1]], axis=0)
    reps = (-(-height // tile.shape[0]), -(-width // tile.shape[1]), 1)
    return np.ascontiguousarray(np.tile(tile, reps)[:height, :width])


def measure(width: int, height: int, source: str, pyramid: str, threads: int,
            precision: str = "fp32") -> dict:
    """One detect call in this process: its peak memory beyond the baseline, and its time."""
    import torch

    from mtcnn import DetectorConfig, FaceDetector
    from mtcnn.memory import estimate_peak_bytes, phase_bytes

    torch.set_num_threads(threads)
    config = DetectorConfig(pyramid=pyramid, precision=precision)
    detector = FaceDetector(config=config)
    image = make_image(source, width, height)
    release_free_heap()
    baseline_kib = status_kib("VmRSS")
    exact = reset_high_water_mark()
    start = time.perf_counter()
    found = detector.detect([image])
    seconds = time.perf_counter() - start
    peak_kib = status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    phases = phase_bytes(height, width, config)
    return {"width": width, "height": height, "source": source, "pyramid": pyramid, "precision": precision,
            "baseline_mb": baseline_kib / 1024, "peak_extra_mb": (peak_kib - baseline_kib) / 1024,
            "estimate_mb": estimate_peak_bytes(height, width, config) / 2**20,
            "largest_phase": max(phases, key=phases.get), "seconds": seconds,
            "faces": len(found[0]), "exact_reset": exact, "threads": torch.get_num_threads()}


def measure_in_subprocess(width: int, height: int, source: str, pyramid: str, threads: int,
                          precision: str = "fp32") -> dict:
    """measure() in a fresh interpreter; its JSON result."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", f"{width}x{height}",
               "--sources", source, "--pyramids", pyramid, "--threads", str(threads),
               "--precision", precision]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    """The CPU's model name and bf16 / AMX flags, from /proc/cpuinfo."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    extras = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flag in flags]
    return f"{model} ({os.cpu_count()} logical CPUs; {' '.join(extras) or 'no AVX2'})"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        width, height = item.lower().split("x")
        sizes.append((int(width), int(height)))
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=parse_sizes, default=None,
                        help="WxH,WxH (default: a spread to 6000x6000)")
    parser.add_argument("--large", action="store_true", help="add 9000x9000 (about 90 s, 6 GB)")
    parser.add_argument("--sources", default="astronaut,crowd")
    parser.add_argument("--pyramids", default="classic")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--worker", type=parse_sizes, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        (width, height), = args.worker
        print(json.dumps(measure(width, height, args.sources, args.pyramids, args.threads,
                                args.precision)))
        return

    import torch

    sizes = (args.sizes or SIZES) + (LARGE if args.large else [])
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {args.threads} thread(s) per detect, "
          f"precision {args.precision}")
    header = (f"{'size':>11} {'Mpx':>5} {'source':>9} {'pyramid':>8} {'peak MB':>8} {'estimate MB':>11} "
              f"{'est/peak':>8} {'s':>6} {'faces':>5}  largest phase")
    print(header)
    for pyramid in args.pyramids.split(","):
        for width, height in sizes:
            for source in args.sources.split(","):
                row = measure_in_subprocess(width, height, source, pyramid, args.threads,
                                            args.precision)
                note = "" if row["exact_reset"] else " (ru_maxrss: clear_refs refused)"
                print(f"{width:>5}x{height:<5} {width * height / 1e6:5.1f} {source:>9} {pyramid:>8} "
                      f"{row['peak_extra_mb']:8.0f} {row['estimate_mb']:11.0f} "
                      f"{row['estimate_mb'] / max(row['peak_extra_mb'], 1e-9):8.2f} {row['seconds']:6.1f} "
                      f"{row['faces']:5d}  {row['largest_phase']}{note}", flush=True)


if __name__ == "__main__":
    main()
