"""Run facenet-pytorch's MTCNN (the reference) on images and print JSON lines.

Runs in the reference's own virtual environment (see benchmarks/README.md):
    /opt/refvenv/bin/python benchmarks/reference/facenet_detect.py IMAGE [IMAGE ...]
"""

import json
import sys

import numpy as np
import torch
from facenet_pytorch import MTCNN
from PIL import Image

torch.set_num_threads(2)
detector = MTCNN(min_face_size=20, thresholds=[0.6, 0.7, 0.7], factor=0.709, keep_all=True,
                 device="cpu")
for path in sys.argv[1:]:
    image = Image.open(path).convert("RGB")
    boxes, scores, points = detector.detect(image, landmarks=True)
    boxes = np.zeros((0, 4)) if boxes is None else boxes
    print(json.dumps({
        "path": path, "width": image.width, "height": image.height,
        "boxes": np.round(np.asarray(boxes, dtype=np.float64), 3).tolist(),
        # No face: facenet-pytorch gives boxes None and scores [None].
        "scores": [round(float(s), 6) for s in (scores if len(boxes) else [])],
        "landmarks": np.round(np.asarray(points, dtype=np.float64), 3).tolist() if points is not None else [],
    }))
