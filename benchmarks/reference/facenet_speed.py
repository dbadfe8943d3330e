"""Time facenet-pytorch's MTCNN (the reference) on frames saved as .npy; print one JSON object.

Runs in the reference's own environment; benchmarks/detector_speed.py calls it:
    /opt/refvenv/bin/python benchmarks/reference/facenet_speed.py FRAMES.npy --repeats 2
"""

import argparse
import json
import time

import numpy as np
import torch
from facenet_pytorch import MTCNN
from PIL import Image

parser = argparse.ArgumentParser()
parser.add_argument("frames")
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--repeats", type=int, default=1)
parser.add_argument("--min-face-size", type=float, default=20)
args = parser.parse_args()
torch.set_num_threads(args.threads)
frames = np.load(args.frames)
detector = MTCNN(min_face_size=args.min_face_size, thresholds=[0.6, 0.7, 0.7], factor=0.709,
                 keep_all=True, device="cpu")
images = [Image.fromarray(frame) for frame in frames]
detector.detect(images[0])  # warm-up
detections = []
start = time.perf_counter()
for _ in range(args.repeats):
    detections = []
    for image in images:
        boxes, scores, points = detector.detect(image, landmarks=True)
        if boxes is None:  # no face: facenet-pytorch returns None (and [None] scores)
            detections.append({"boxes": [], "scores": [], "landmarks": []})
            continue
        detections.append({"boxes": np.asarray(boxes, np.float64).tolist(),
                           "scores": [float(s) for s in scores],
                           "landmarks": np.asarray(points, np.float64).tolist()})
seconds = time.perf_counter() - start
print(json.dumps({"images_per_second": args.repeats * len(images) / seconds,
                  "detections": detections}))
