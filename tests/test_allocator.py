"""The heap settings for CPU inference: fewer page faults, the same detections (each case in a fresh process)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"

# Detects on the astronaut scaled to 1280 x 720 (P-Net's first levels allocate several MB per
# call) and prints the page faults of the timed calls and the boxes found.
SCRIPT = f"""
import json, resource, cv2, torch
from mtcnn import FaceDetector
from mtcnn.allocator import keep_freed_memory
torch.set_num_threads(1)
image = cv2.resize(cv2.cvtColor(cv2.imread({str(DATA / "astronaut.png")!r}), cv2.COLOR_BGR2RGB), (1280, 720))
detector = FaceDetector()
found = detector.detect([image])[0]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    detector.detect([image])
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({{"applied": keep_freed_memory(), "faults": faults, "boxes": found.boxes.tolist(),
                  "landmarks": found.landmarks.tolist()}}))
"""


def run(**environment) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(environment)
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_and_detections_unchanged():
    tuned, plain = run(), run(MTCNN_KEEP_FREED_MEMORY="0")
    assert tuned["applied"] and not plain["applied"]
    # The plain heap hands freed activations back and faults them in again on every call.
    assert tuned["faults"] * 3 < plain["faults"], (tuned["faults"], plain["faults"])
    assert tuned["boxes"] == plain["boxes"] and tuned["landmarks"] == plain["landmarks"]
    assert len(tuned["boxes"]) >= 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_users_own_malloc_settings_win():
    assert not run(MALLOC_TRIM_THRESHOLD_="1000000")["applied"]
