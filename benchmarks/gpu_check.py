"""The device check: the cascade on a GPU, against the same code on the CPU and facenet-pytorch.

One command measures everything issue 27 asks of a GPU machine and writes it under --out as
gpu_check.json and gpu_check.md (the Markdown is printed too):
- the machine: GPU, driver, torch, CUDA, CPU model, flags and count;
- equivalence: classic fp32 detections on the device against the CPU on the carried WIDER photos
  (share of CPU faces with score >= 0.9 found with IoU >= 0.9 and landmarks within 2 px);
- speed: images/s and peak device memory at each size, on crowded and on one-face frames, in
  batches of 1, 8, 32, 128 (and larger while that helps), per precision, beside facenet-pytorch's
  batched call on the same device in the same run;
- the actor: the annotate job's FaceAnnotator in process on encoded JPEGs, decoding in the actor
  and decoding in a pool of CPU threads (as the job's decode tasks do), beside the bare detector
  and the machine's JPEG decode rate on every core.

The device machine has no network and no Ray, so what it needs travels in one ignored folder:
    python benchmarks/gpu_check.py --pack .gpu_carry            # here: photos + facenet's wheel
    python benchmarks/gpu_check.py --device cpu --quick --carried .gpu_carry --out /tmp/gpu_check
    # on the device (run tool, carry [".gpu_carry"]):
    pip install --no-deps --no-index --target .gpu_carry/site .gpu_carry/wheels/*.whl -q; \
    PYTHONPATH=.gpu_carry/site python3 benchmarks/gpu_check.py --carried .gpu_carry --out $OUT

Every measurement checks a deadline (--budget seconds, 420 by default) and is recorded as skipped
past it, so the check ends inside one device call; the most wanted figures are measured first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mtcnn import DetectorConfig, FaceDetector, load_weights  # noqa: E402
from mtcnn.annotations import read_wider  # noqa: E402

SHARED = Path(os.environ.get("MTCNN_SHARED_DATA", REPO.parent / "shared" / "data"))
FACENET_VERSION = "2.6.0"
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


@dataclass(frozen=True)
class Plan:
    """What one run measures."""

    device: str
    sizes: tuple[tuple[int, int], ...]
    batches: tuple[int, ...]
    precisions: tuple[str, ...]
    equivalence_photos: int
    actor_images: int
    actor_batch: int
    min_seconds: float  # timed calls of one measurement run at least this long
    largest_batch: int  # "larger while it helps" stops here

    @staticmethod
    def of(device: str, quick: bool) -> "Plan":
        if quick:
            return Plan(device, ((640, 360),), (1, 2), ("fp32", "bf16", "fp16"), 3, 4, 2, 0.0, 4)
        return Plan(device, ((1920, 1080), (1280, 720)), (1, 8, 32, 128), ("fp32", "fp16", "bf16"),
                    100, 512, 128, 1.0, 1024)


class Deadline:
    """The check's time budget: measurements past it are recorded as skipped."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def passed(self) -> bool:
        return time.perf_counter() >= self.end


# -- the carried photos -------------------------------------------------------------------------

def pack(folder: Path, photos: int, wheel: bool) -> None:
    """Copy the photos the check needs (and facenet-pytorch's wheel) into folder, with a manifest."""
    wider = SHARED / "wider_face_val_dev"
    annotations = read_wider(next(wider.glob("*_bbx_gt.txt")), wider / "images")
    ranked = sorted(annotations, key=lambda a: len(a.boxes), reverse=True)
    crowded = [Path(a.path) for a in ranked[:8]]
    rest = sorted(Path(a.path) for a in annotations)
    equivalence = [p for p in rest if p not in crowded][:max(0, photos - len(crowded))]
    light = sorted((SHARED / "cnn_facepoint_5pt").rglob("*.jpg"))[:8]
    (folder / "photos").mkdir(parents=True, exist_ok=True)
    manifest: dict[str, list[str]] = {"crowded": [], "light": [], "equivalence": []}
    for group, files in (("crowded", crowded), ("light", light), ("equivalence", crowded + equivalence)):
        for file in files:
            name = f"{file.parent.name}--{file.name}"
            shutil.copyfile(file, folder / "photos" / name)
            manifest[group].append(name)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if wheel:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                        str(folder / "wheels"), f"facenet-pytorch=={FACENET_VERSION}"], check=True)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"packed {len(manifest['equivalence'])} photos ({len(crowded)} crowded, {len(light)} one-face)"
          f"{' and facenet-pytorch' if wheel else ''} into {folder}: {size / 2**20:.1f} MiB")


def carried(folder: Path) -> dict[str, list[Path]]:
    """The packed photo groups: crowded, light (one face) and equivalence."""
    manifest = json.loads((folder / "manifest.json").read_text())
    return {group: [folder / "photos" / name for name in names] for group, names in manifest.items()}


def rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def frames_at(files: list[Path], width: int, height: int) -> list[np.ndarray]:
    return [cv2.resize(rgb(f), (width, height), interpolation=cv2.INTER_AREA) for f in files]


# -- the machine --------------------------------------------------------------------------------

def machine(device: str) -> dict:
    """What ran the check."""
    cpu_model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu_model in ("", platform.processor()):
                cpu_model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    info = {"cpu": cpu_model, "cpu_flags": [f for f in CPU_FLAGS if f in flags], "cpus": os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "device": device,
            "python": platform.python_version()}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count)
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info


# -- equivalence --------------------------------------------------------------------------------

def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one x1, y1, x2, y2 box with each of boxes."""
    x1, y1 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x2, y2 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-9)


def equivalence(device: str, files: list[Path]) -> dict:
    """Share of the CPU's confident faces that the device finds too, with the same box and landmarks."""
    photos = [rgb(f) for f in files]
    on_cpu = FaceDetector(device="cpu").detect(photos)
    target = FaceDetector(device=device)
    # Batches of 16 on the device: same-size photos share P-Net passes there.
    on_device = [found for start in range(0, len(photos), 16) for found in target.detect(photos[start:start + 16])]
    wanted = found = 0
    misses: dict[str, int] = {}
    for cpu, dev in zip(on_cpu, on_device):
        for index in np.flatnonzero(cpu.scores >= 0.9):
            wanted += 1
            if len(dev) == 0:
                misses["missed"] = misses.get("missed", 0) + 1
                continue
            overlaps = iou(cpu.boxes[index], dev.boxes)
            best = int(overlaps.argmax())
            error = float(np.linalg.norm(dev.landmarks[best] - cpu.landmarks[index], axis=1).max())
            if overlaps[best] < 0.9:
                misses["iou < 0.9"] = misses.get("iou < 0.9", 0) + 1
            elif error > 2.0:
                misses["landmark > 2 px"] = misses.get("landmark > 2 px", 0) + 1
            else:
                found += 1
    return {"photos": len(photos), "cpu_faces": wanted, "found": found,
            "share": found / wanted if wanted else None, "misses": misses}


# -- speed --------------------------------------------------------------------------------------

def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(call, frames: list[np.ndarray], device: str, min_seconds: float) -> dict:
    """images/s of call(frames) after one warm-up call, and the device's peak memory in MiB."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        call(frames)
        _synchronize(device)
        calls, start = 0, time.perf_counter()
        while True:
            call(frames)
            calls += 1
            _synchronize(device)
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of device memory"}
    result = {"images_per_s": round(calls * len(frames) / elapsed, 2), "seconds_per_call": round(elapsed / calls, 4)}
    if device.startswith("cuda"):
        result["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return result


def batch_of(frames: list[np.ndarray], size: int) -> list[np.ndarray]:
    return [frames[i % len(frames)] for i in range(size)]


def facenet_detector(device: str):
    """facenet-pytorch's MTCNN with the reference settings, or the reason it cannot run here."""
    try:
        from facenet_pytorch import MTCNN
    except ImportError as error:
        return None, f"facenet-pytorch not importable ({error})"
    return MTCNN(min_face_size=20, thresholds=[0.6, 0.7, 0.7], factor=0.709, keep_all=True,
                 device=device), None


def sweep(call, frames: list[np.ndarray], plan: Plan, deadline: Deadline) -> dict[int, dict]:
    """Measurements at each batch size of the plan, then doubled while images/s rises by 5% or more."""
    results: dict[int, dict] = {}
    sizes = list(plan.batches)
    for index, size in enumerate(sizes):  # sizes grows while it helps
        if deadline.passed():
            results[size] = {"skipped": "time budget"}
            continue
        results[size] = timed(call, batch_of(frames, size), plan.device, plan.min_seconds)
        if index == len(sizes) - 1 and index > 0 and size * 2 <= plan.largest_batch:
            now = results[size].get("images_per_s", 0.0)
            before = results[sizes[index - 1]].get("images_per_s", 0.0)
            if before and now >= 1.05 * before and results[size]["seconds_per_call"] < 20:
                sizes.append(size * 2)
    return results


def speed(plan: Plan, photos: dict[str, list[Path]], deadline: Deadline) -> list[dict]:
    """Rows of (size, frames, detector, precision) with their batch sweeps; most wanted first."""
    reference, why_not = facenet_detector(plan.device)
    rows = []
    for precision in plan.precisions:
        for width, height in plan.sizes:
            for kind in ("crowded", "light"):
                frames = frames_at(photos[kind], width, height)
                base = {"size": f"{width}x{height}", "frames": kind}
                try:
                    detector = FaceDetector(device=plan.device, config=DetectorConfig(precision=precision))
                except ValueError as error:
                    rows.append({**base, "detector": "mtcnn", "precision": precision, "skipped": str(error)})
                    continue
                rows.append({**base, "detector": "mtcnn", "precision": precision,
                             "batches": sweep(detector.detect, frames, plan, deadline)})
                if precision != "fp32":
                    continue
                if reference is None:
                    rows.append({**base, "detector": "facenet-pytorch", "precision": "fp32", "skipped": why_not})
                    continue
                # Its batched call takes a stacked uint8 array of same-size frames.
                rows.append({**base, "detector": "facenet-pytorch", "precision": "fp32",
                             "batches": sweep(lambda f: reference.detect(np.stack(f), landmarks=True),
                                              frames, plan, deadline)})
            print(f"  speed: {precision} done ({time.strftime('%H:%M:%S')})", flush=True)
    return rows


def best(row: dict) -> tuple[int | None, float]:
    """The batch size with the most images/s in a speed row, and that rate."""
    rates = {size: m["images_per_s"] for size, m in row.get("batches", {}).items() if "images_per_s" in m}
    if not rates:
        return None, 0.0
    size = max(rates, key=rates.get)
    return size, rates[size]


# -- the actor ----------------------------------------------------------------------------------

def actor(plan: Plan, photos: dict[str, list[Path]], deadline: Deadline, scratch: Path) -> dict:
    """The annotate job's FaceAnnotator on encoded JPEGs at the largest size, crowded frames."""
    from jobs.inputs.decode import decode_image
    from jobs.inputs.reading import ReadPolicy
    from jobs.pipelines.annotate import FaceAnnotator, decode_batch

    if deadline.passed():
        return {"skipped": "time budget"}
    width, height = plan.sizes[0]
    frames = frames_at(photos["crowded"], width, height)
    paths = []
    for index in range(plan.actor_images):
        path = scratch / f"frame-{index:05d}.jpg"
        if index < len(frames):
            cv2.imwrite(str(path), cv2.cvtColor(frames[index], cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        else:  # the same bytes under another name: the job reads and decodes each anew
            os.link(scratch / f"frame-{index % len(frames):05d}.jpg", path)
        paths.append(str(path))
    encoded = [Path(p).read_bytes() for p in paths]
    cpus = os.cpu_count() or 1
    batch = plan.actor_batch
    chunks = [paths[i:i + batch] for i in range(0, len(paths), batch)]
    result = {"size": f"{width}x{height}", "frames": "crowded", "images": len(paths), "batch": batch,
              "jpeg_kb": round(sum(map(len, encoded)) / len(encoded) / 1024), "cpus": cpus}
    # The machine's decode rate: every core decoding JPEGs of this size (the job's decode_image).
    cv2.setNumThreads(1)
    with ThreadPoolExecutor(cpus) as pool:
        list(pool.map(decode_image, encoded[:cpus]))
        start = time.perf_counter()
        list(pool.map(decode_image, encoded))
        result["decode_all_cores_images_per_s"] = round(len(encoded) / (time.perf_counter() - start), 2)

    use_gpu = plan.device.startswith("cuda")
    annotator = FaceAnnotator(load_weights("reference"), DetectorConfig(), use_gpu=use_gpu, threads=cpus,
                              storage_options={}, policy=ReadPolicy(), pixels_in_flight=batch * width * height)
    annotator(pa.table({"path": chunks[0]}))  # warm-up
    _synchronize(plan.device)
    # Three ways through the same batches, each given a third of the time left (at least one batch).
    slot = max(0.0, deadline.end - time.perf_counter()) / 3

    def throughput(batches, run) -> float:
        images, start = 0, time.perf_counter()
        for item in batches:
            images += run(item)
            if time.perf_counter() - start >= slot:
                break
        _synchronize(plan.device)
        return round(images / (time.perf_counter() - start), 2)

    def annotated(table: pa.Table) -> int:
        rows = annotator(table)
        assert rows.num_rows == table.num_rows and rows.column("error").null_count == rows.num_rows
        return rows.num_rows

    # Decoding in the actor: it reads and decodes each batch, then detects.
    result["actor_decoding_images_per_s"] = throughput((pa.table({"path": c}) for c in chunks), annotated)
    # Decode tasks: a pool of CPU threads decodes the next two batches while the actor detects.
    with ThreadPoolExecutor(cpus) as pool, ThreadPoolExecutor(2) as feeder:
        def decoded(chunk: list[str]) -> pa.Table:
            parts = [chunk[i::cpus] for i in range(min(cpus, len(chunk)))]
            return pa.concat_tables(pool.map(lambda part: decode_batch(pa.table({"path": part}), {}, ReadPolicy()),
                                             parts))

        def fed():
            ahead = deque(feeder.submit(decoded, c) for c in chunks[:2])
            for chunk in chunks[2:] + [None] * 2:
                table = ahead.popleft().result()
                if chunk is not None:
                    ahead.append(feeder.submit(decoded, chunk))
                yield table

        result["actor_decode_pool_images_per_s"] = throughput(fed(), annotated)
    # The bare detector on decoded frames, same batches.
    frames = [decode_image(data) for data in encoded[:len(frames)]]
    result["bare_detector_images_per_s"] = throughput(
        (batch_of(frames, len(c)) for c in chunks), lambda images: len(annotator.detector.detect(images)))
    bare, decode = result["bare_detector_images_per_s"], result["decode_all_cores_images_per_s"]
    result["bound"] = ("decode: the detector outruns every core's JPEG decoding" if bare >= decode
                       else "detector: every core decodes faster than the detector runs")
    return result


# -- report -------------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    m = report["machine"]
    driver = f" (driver {m['driver']})" if m.get("driver") else ""
    lines = [f"# Device check, {time.strftime('%Y-%m-%d', time.gmtime(report['started']))}", "",
             f"{m.get('gpu', m['device'])}{driver}, torch {m['torch']} (CUDA {m['cuda']}), "
             f"{m['cpus']} CPUs: {m['cpu']} ({', '.join(m['cpu_flags']) or 'no AVX-512'}). "
             f"{report['seconds']:.0f} s.", ""]
    eq = report.get("equivalence", {})
    if "share" in eq:
        share = "n/a" if eq["share"] is None else f"{100 * eq['share']:.2f}%"
        lines += [f"Equivalence (classic fp32, {m['device']} vs CPU, {eq['photos']} WIDER photos): "
                  f"{eq['found']} of {eq['cpu_faces']} CPU faces (score >= 0.9) found, {share}; "
                  f"misses {eq['misses'] or 'none'}.", ""]
    lines += ["| size | frames | detector | precision | best batch | images/s | peak MiB | per batch (images/s) |",
              "|---|---|---|---|---|---|---|---|"]
    reference = {(r["size"], r["frames"]): best(r)[1] for r in report.get("speed", [])
                 if r["detector"] == "facenet-pytorch"}
    for row in report.get("speed", []):
        if "skipped" in row:
            lines.append(f"| {row['size']} | {row['frames']} | {row['detector']} | {row['precision']} | "
                         f"skipped: {row['skipped']} | | | |")
            continue
        size, ips = best(row)
        peak = row["batches"].get(size, {}).get("peak_mib", "") if size else ""
        ratio = reference.get((row["size"], row["frames"]))
        ratio_text = f" ({ips / ratio:.1f}x facenet)" if ratio and row["detector"] == "mtcnn" else ""
        sweep_text = ", ".join(f"{b}: {m.get('images_per_s', m.get('skipped', m.get('error')))}"
                               for b, m in row["batches"].items())
        lines.append(f"| {row['size']} | {row['frames']} | {row['detector']} | {row['precision']} | {size or '-'} | "
                     f"{ips or '-'}{ratio_text} | {peak} | {sweep_text} |")
    act = report.get("actor", {})
    if "skipped" not in act and act:
        lines += ["", f"The annotate actor, {act['size']} crowded JPEGs ({act['jpeg_kb']} KB), batches of "
                      f"{act['batch']} (of {act['images']} prepared), images/s:", "",
                  "| JPEG decode, all cores | actor decoding | actor fed by a decode pool | bare detector | bound by |",
                  "|---|---|---|---|---|",
                  f"| {act['decode_all_cores_images_per_s']} | {act['actor_decoding_images_per_s']} | "
                  f"{act['actor_decode_pool_images_per_s']} | {act['bare_detector_images_per_s']} | {act['bound']} |"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pack", type=Path, help="copy the photos (and facenet-pytorch's wheel) here and stop")
    parser.add_argument("--no-wheel", action="store_true", help="with --pack: photos only")
    parser.add_argument("--photos", type=int, default=100, help="with --pack: WIDER photos for equivalence")
    parser.add_argument("--carried", type=Path, default=REPO / ".gpu_carry", help="the packed folder")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a small run to test the script (under a minute on CPUs)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds before measurements are skipped")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    args = parser.parse_args()
    if args.pack:
        pack(args.pack, args.photos, wheel=not args.no_wheel)
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: torch {torch.__version__} sees no CUDA device", file=sys.stderr)
        return 2
    plan = Plan.of(args.device, args.quick)
    photos = carried(args.carried)
    deadline = Deadline(args.budget)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"started": time.time(), "plan": {"quick": args.quick, "budget_s": args.budget}}
    started = time.perf_counter()
    report["machine"] = machine(args.device)
    print(json.dumps(report["machine"]), flush=True)
    report["equivalence"] = equivalence(args.device, photos["equivalence"][:plan.equivalence_photos])
    print(f"  equivalence: {report['equivalence']}", flush=True)
    # Speed may use 70% of the budget; the actor, measured last, the rest.
    report["speed"] = speed(plan, photos, Deadline(0.7 * args.budget - (time.perf_counter() - started)))
    with tempfile.TemporaryDirectory() as scratch:
        report["actor"] = actor(plan, photos, deadline, Path(scratch))
    report["seconds"] = time.perf_counter() - started
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (args.out / "gpu_check.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
