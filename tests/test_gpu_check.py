"""benchmarks/gpu_check.py, the device check, runs whole on the CPU (--device cpu --quick).

The device is lent to few sessions: the script must work the first time it meets one, so every
section runs here on real photos, with the CPU standing in for the GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from shared_data import data_root, needs_shared_data

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"

pytestmark = needs_shared_data("wider_face_val_dev", "cnn_facepoint_5pt")


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MTCNN_SHARED_DATA": str(data_root())}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_the_device_check_runs_on_the_cpu_and_writes_its_figures(tmp_path):
    carried, out = tmp_path / "carry", tmp_path / "out"
    packed = run("--pack", str(carried), "--photos", "10", "--no-wheel")
    assert packed.returncode == 0, packed.stderr
    manifest = json.loads((carried / "manifest.json").read_text())
    assert len(manifest["crowded"]) == 8 and len(manifest["light"]) == 8 and len(manifest["equivalence"]) == 10

    done = run("--device", "cpu", "--quick", "--carried", str(carried), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["machine"]["cpus"] >= 1 and report["machine"]["device"] == "cpu"
    # The CPU against itself: every confident face found again, so the matching itself is sound.
    equivalence = report["equivalence"]
    assert equivalence["cpu_faces"] > 0 and equivalence["share"] == 1.0
    rows = {(r["frames"], r["detector"], r["precision"]): r for r in report["speed"]}
    for frames in ("crowded", "light"):
        for precision in ("fp32", "bf16"):
            batches = rows[(frames, "mtcnn", precision)]["batches"]
            assert all(m["images_per_s"] > 0 for m in batches.values()), batches
        assert "GPUs only" in rows[(frames, "mtcnn", "fp16")]["skipped"]
        assert (frames, "facenet-pytorch", "fp32") in rows  # measured, or skipped with why
    actor = report["actor"]
    for figure in ("decode_all_cores_images_per_s", "actor_decoding_images_per_s",
                   "actor_decode_pool_images_per_s", "bare_detector_images_per_s"):
        assert actor[figure] > 0, actor
    assert actor["bound"]
    table = (out / "gpu_check.md").read_text()
    assert "| 640x360 | crowded | mtcnn | fp32 |" in table and "JPEG decode, all cores" in table
