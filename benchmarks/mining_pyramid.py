"""Mining R-Net samples with a P-Net: the dynamic vs the classic image pyramid, side by side.

The paper's claim: building each pyramid level from the previous one (dynamic) instead of from the
full image (classic) makes sample preparation faster, with the same scales. This times, on the
same decoded images and in one process, (1) building the pyramids alone, (2) P-Net proposals
(pyramid + P-Net + NMS), (3) the whole mining step (proposals + IoU labels + crops), and checks
that both pyramids propose about the same windows. The AP half of the claim needs an R-Net
trained on each set of samples; pass the trained cascades with --weights-dynamic/--weights-classic
to have them evaluated here is left to `mtcnn-jobs evaluate`.

    python benchmarks/mining_pyramid.py [--weights reference] [--limit 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from jobs.decode import decode_image
from jobs.training.samples import SampleConfig, face_samples
from mtcnn.annotations import read_wider
from mtcnn.detector import DetectorConfig, FaceDetector
from mtcnn.pyramid import build_pyramid, pyramid_scales

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wider_face_train_small"


def time_pyramids(images: list[np.ndarray], config: DetectorConfig, pyramid: str) -> tuple[float, int]:
    """Seconds to build every image's pyramid, and the number of levels."""
    levels = 0
    started = time.perf_counter()
    for image in images:
        scales = pyramid_scales(*image.shape[:2], config.min_face_size, config.scale_factor)
        levels += len(build_pyramid(image, scales, pyramid))
    return time.perf_counter() - started, levels


def mine(images: list[np.ndarray], annotations: list, detector: FaceDetector, samples: SampleConfig,
         batch_size: int, seed: int) -> dict:
    """Proposals and R-Net samples for every image, with the time of each part."""
    propose_seconds = label_seconds = 0.0
    windows = made = 0
    proposals = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        began = time.perf_counter()
        found = detector.propose(batch, up_to="pnet")
        propose_seconds += time.perf_counter() - began
        began = time.perf_counter()
        for offset, (image, detections) in enumerate(zip(batch, found)):
            annotation = annotations[start + offset]
            rng = np.random.default_rng([seed, start + offset])
            result = face_samples(image, annotation.boxes, annotation.ignore, samples, rng, detections.boxes)
            made += len(result)
            windows += len(detections)
            proposals.append(detections.boxes)
        label_seconds += time.perf_counter() - began
    return {"propose": propose_seconds, "label": label_seconds, "windows": windows, "samples": made,
            "proposals": proposals}


def agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Share of a's windows that b also proposes (IoU > 0.9)."""
    from jobs.training.samples import iou

    matched = total = 0
    for first, second in zip(a, b):
        total += len(first)
        if len(first) and len(second):
            matched += int((iou(first, second).max(axis=1) > 0.9).sum())
    return matched / total if total else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="reference", help="cascade holding the P-Net that mines")
    parser.add_argument("--data", default=str(DATA), help="WIDER-format folder (gt file + images/)")
    parser.add_argument("--limit", type=int, default=100, help="images used (default %(default)s)")
    parser.add_argument("--min-face-size", type=float, default=20.0)
    parser.add_argument("--threshold", type=float, default=0.3, help="P-Net threshold while mining")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeat", type=int, default=2, help="runs per pyramid; the fastest counts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    gt_file = next(Path(args.data).glob("*_bbx_gt.txt"))
    annotations = read_wider(gt_file, Path(args.data) / "images")[: args.limit]
    images = [decode_image(Path(a.path).read_bytes()) for a in annotations]
    pixels = sum(i.shape[0] * i.shape[1] for i in images) / 1e6
    print(f"{len(images)} images ({pixels:.1f} Mpixel) of {args.data}, weights {args.weights}, "
          f"min face {args.min_face_size:g}, P-Net threshold {args.threshold:g}, {args.threads} threads")
    samples = SampleConfig(stage="rnet", top_up=False)

    results = {}
    for pyramid in ("classic", "dynamic"):
        config = DetectorConfig(min_face_size=args.min_face_size, thresholds=(args.threshold, 0.7, 0.7),
                                pyramid=pyramid)
        detector = FaceDetector(args.weights, config=config)
        mine(images[:2], annotations[:2], detector, samples, args.batch_size, 0)  # warm-up
        runs = []
        for _ in range(args.repeat):
            pyramid_seconds, levels = time_pyramids(images, config, pyramid)
            mined = mine(images, annotations, detector, samples, args.batch_size, 0)
            runs.append((pyramid_seconds, levels, mined))
        best_pyramid = min(r[0] for r in runs)
        mined = min((r[2] for r in runs), key=lambda m: m["propose"] + m["label"])
        results[pyramid] = (best_pyramid, runs[0][1], mined)

    rows = [
        ("pyramid levels", lambda r: f"{r[1]}"),
        ("pyramids alone (s)", lambda r: f"{r[0]:.2f}"),
        ("P-Net proposals (s)", lambda r: f"{r[2]['propose']:.2f}"),
        ("labels + crops (s)", lambda r: f"{r[2]['label']:.2f}"),
        ("mining total (s)", lambda r: f"{r[2]['propose'] + r[2]['label']:.2f}"),
        ("images / s", lambda r: f"{len(images) / (r[2]['propose'] + r[2]['label']):.1f}"),
        ("proposed windows", lambda r: f"{r[2]['windows']}"),
        ("R-Net samples", lambda r: f"{r[2]['samples']}"),
    ]
    print(f"\n{'':24}{'classic':>12}{'dynamic':>12}")
    for name, cell in rows:
        print(f"{name:24}{cell(results['classic']):>12}{cell(results['dynamic']):>12}")
    classic, dynamic = results["classic"], results["dynamic"]
    print(f"\npyramid speed-up {classic[0] / dynamic[0]:.2f}x; mining speed-up "
          f"{(classic[2]['propose'] + classic[2]['label']) / (dynamic[2]['propose'] + dynamic[2]['label']):.2f}x")
    print(f"windows proposed by both: {agreement(classic[2]['proposals'], dynamic[2]['proposals']):.1%} of "
          f"classic's found by dynamic, {agreement(dynamic[2]['proposals'], classic[2]['proposals']):.1%} "
          "the other way")
    print("AP of an R-Net trained on each sample set: train one per pyramid (mtcnn-jobs prepare "
          "--pyramid classic|dynamic, then train) and compare them with mtcnn-jobs evaluate.")


if __name__ == "__main__":
    main()
