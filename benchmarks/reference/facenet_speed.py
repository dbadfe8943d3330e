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
parser.add_argument("--batch-size", type=int, default=1, help="frames per detect call (same size)")
args = parser.parse_args()
torch.set_num_threads(args.threads)
frames = np.load(args.frames)
detector = MTCNN(min_face_size=args.min_face_size, thresholds=[0.6, 0.7, 0.7], factor=0.709,
                 keep_all=True, device="cpu")
images = [Image.fromarray(frame) for frame in frames]
# Warm-up on a first call of the timed shape (one frame, or a batch: oneDNN sets up per shape).
if args.batch_size == 1:
    detector.detect(images[0])
else:
    detector.detect(images[:args.batch_size])
detections = []
start = time.perf_counter()
for _ in range(args.repeats):
    detections = []
    for first in range(0, len(images), args.batch_size):
        chunk = images[first:first + args.batch_size]
        if args.batch_size == 1:
            found = [detector.detect(chunk[0], landmarks=True)]
        else:  # a list of same-size images goes through facenet-pytorch's batched path
            found = list(zip(*detector.detect(chunk, landmarks=True)))
        for boxes, scores, points in found:
            if boxes is None:  # no face: facenet-pytorch returns None (and [None] scores)
                detections.append({"boxes": [], "scores": [], "landmarks": []})
                continue
            detections.append({"boxes": np.asarray(boxes, np.float64).tolist(),
                               "scores": [float(s) for s in scores],
                               "landmarks": np.asarray(points, np.float64).tolist()})
seconds = time.perf_counter() - start
print(json.dumps({"images_per_second": args.repeats * len(images) / seconds,
                  "detections": detections}))
