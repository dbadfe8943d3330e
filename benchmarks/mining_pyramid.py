"""Mining R-Net samples with a P-Net: the dynamic vs the classic image pyramid, side by side.

The paper's claim: building each pyramid level from the previous one (dynamic) instead of from the
full image (classic) makes sample preparation faster, with the same scales. This times, on the
same decoded images and in one process, (1) building the pyramids alone, (2) P-Net proposals
(pyramid + P-Net + NMS), (3) the whole mining step (proposals + IoU labels + crops), and checks
that both pyramids propose about the same windows. Process CPU time is printed next to wall time:
on a shared machine it is the steadier figure. The AP half of the claim needs an R-Net trained on
each sample set (prepare --pyramid classic|dynamic, train, evaluate); --weights takes the P-Net
to mine with (a trained one from the recipe, or the reference).

    python benchmarks/mining_pyramid.py [--weights reference] [--limit 100] [--threads 2]
        [--trained CLASSIC_CASCADE DYNAMIC_CASCADE [--onet WEIGHTS] [--eval-limit N]]

--trained may name R-Net runs (P-Net + R-Net) with --onet giving one O-Net for both cascades, so
that only the R-Net, trained on samples mined with each pyramid, differs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from jobs.inputs.decode import decode_image
from jobs.training.samples import SampleConfig, face_samples
from mtcnn.annotations import read_wider
from mtcnn.detector import DetectorConfig, FaceDetector
from mtcnn.pyramid import build_pyramid, pyramid_scales

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wider_face_train_small"
VALIDATION = DATA.parent / "wider_face_val_dev"


class Clock:
    """Wall and process-CPU seconds of timed blocks, added up."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> "Clock":
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu


class Miner:
    """One pyramid's detector and its running totals."""

    def __init__(self, weights: str, config: DetectorConfig, samples: SampleConfig) -> None:
        self.config = config
        self.detector = FaceDetector(weights, config=config)
        self.samples = samples
        self.pyramid, self.propose, self.label = Clock(), Clock(), Clock()
        self.levels = self.windows = self.made = 0
        self.proposals: list[np.ndarray] = []

    def run(self, images: list[np.ndarray], annotations: list, first_index: int, seed: int) -> None:
        """Pyramids alone, then proposals and R-Net samples, for one batch of images."""
        with self.pyramid:
            for image in images:
                scales = pyramid_scales(*image.shape[:2], self.config.min_face_size, self.config.scale_factor)
                self.levels += len(build_pyramid(image, scales, self.config.pyramid))
        with self.propose:
            found = self.detector.propose(images, up_to="pnet")
        with self.label:
            for offset, (image, detections) in enumerate(zip(images, found)):
                annotation = annotations[offset]
                rng = np.random.default_rng([seed, first_index + offset])
                result = face_samples(image, annotation.boxes, annotation.ignore, self.samples, rng,
                                      detections.boxes)
                self.made += len(result)
                self.windows += len(detections)
                self.proposals.append(detections.boxes)


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
    parser.add_argument("--threshold", type=float, default=0.6, help="P-Net threshold while mining")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trained", nargs=2, metavar=("CLASSIC", "DYNAMIC"),
                        help="full cascades whose later stages trained on samples mined with each pyramid: "
                             "their WIDER AP is printed side by side")
    parser.add_argument("--onet", default=None,
                        help="weights whose O-Net completes both --trained cascades (e.g. the recipe's run)")
    parser.add_argument("--validation", default=str(VALIDATION), help="WIDER-format folder for --trained")
    parser.add_argument("--eval-limit", type=int, default=None, help="first N validation images only")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    gt_file = next(Path(args.data).glob("*_bbx_gt.txt"))
    annotations = read_wider(gt_file, Path(args.data) / "images")[: args.limit]
    images = [decode_image(Path(a.path).read_bytes()) for a in annotations]
    pixels = sum(i.shape[0] * i.shape[1] for i in images) / 1e6
    print(f"{len(images)} images ({pixels:.1f} Mpixel) of {args.data}, weights {args.weights}, "
          f"min face {args.min_face_size:g}, P-Net threshold {args.threshold:g}, {args.threads} threads")
    samples = SampleConfig(stage="rnet", top_up=False)

    miners = {}
    for pyramid in ("classic", "dynamic"):
        config = DetectorConfig(min_face_size=args.min_face_size, thresholds=(args.threshold, 0.7, 0.7),
                                pyramid=pyramid)
        miners[pyramid] = Miner(args.weights, config, samples)
        miners[pyramid].detector.propose(images[:1])  # warm-up
    # Batches alternate which pyramid goes first, so load from elsewhere hits both alike.
    for number, start in enumerate(range(0, len(images), args.batch_size)):
        order = ("classic", "dynamic") if number % 2 == 0 else ("dynamic", "classic")
        for pyramid in order:
            miners[pyramid].run(images[start:start + args.batch_size],
                                annotations[start:start + args.batch_size], start, args.seed)

    def total(m: Miner, kind: str) -> float:
        return getattr(m.propose, kind) + getattr(m.label, kind)

    rows = [
        ("pyramid levels", lambda m: f"{m.levels}"),
        ("pyramids alone, CPU s", lambda m: f"{m.pyramid.cpu:.2f}"),
        ("pyramids alone, wall s", lambda m: f"{m.pyramid.wall:.2f}"),
        ("P-Net proposals, CPU s", lambda m: f"{m.propose.cpu:.2f}"),
        ("labels + crops, CPU s", lambda m: f"{m.label.cpu:.2f}"),
        ("mining total, CPU s", lambda m: f"{total(m, 'cpu'):.2f}"),
        ("mining total, wall s", lambda m: f"{total(m, 'wall'):.2f}"),
        ("images / wall s", lambda m: f"{len(images) / total(m, 'wall'):.2f}"),
        ("proposed windows", lambda m: f"{m.windows}"),
        ("R-Net samples", lambda m: f"{m.made}"),
    ]
    print(f"\n{'':26}{'classic':>12}{'dynamic':>12}")
    for name, cell in rows:
        print(f"{name:26}{cell(miners['classic']):>12}{cell(miners['dynamic']):>12}")
    classic, dynamic = miners["classic"], miners["dynamic"]
    print(f"\npyramid speed-up {classic.pyramid.cpu / dynamic.pyramid.cpu:.2f}x (CPU time); mining "
          f"speed-up {total(classic, 'cpu') / total(dynamic, 'cpu'):.2f}x (CPU), "
          f"{total(classic, 'wall') / total(dynamic, 'wall'):.2f}x (wall)")
    print(f"windows proposed by both (IoU > 0.9): {agreement(classic.proposals, dynamic.proposals):.1%} of "
          f"classic's found by dynamic, {agreement(dynamic.proposals, classic.proposals):.1%} the other way")
    if not args.trained:
        print("AP of the stages trained on each sample set: train a cascade per pyramid (mtcnn-jobs prepare "
              "--pyramid classic|dynamic, then train) and pass both with --trained CLASSIC DYNAMIC.")
        return
    from jobs.pipelines.evaluate import InProcessDetection, evaluate_wider_folder
    from mtcnn.weights import load_weights

    aps = {}
    for pyramid, weights in zip(("classic", "dynamic"), args.trained):
        cascade = load_weights(weights)
        if args.onet:
            cascade.stages["onet"] = load_weights(args.onet).stages["onet"]
        # Both evaluated with the same (dynamic) detection pyramid: only the training samples differ.
        detect = InProcessDetection(FaceDetector(cascade, min_face_size=args.min_face_size))
        aps[pyramid] = evaluate_wider_folder(detect, args.validation, args.eval_limit).ap
    print(f"\nWIDER AP on {args.validation}" + (f" (first {args.eval_limit} images)" if args.eval_limit else ""))
    print(f"{'':26}{'classic':>12}{'dynamic':>12}")
    for setting in aps["classic"]:
        print(f"{setting:26}{aps['classic'][setting]:>12.3f}{aps['dynamic'][setting]:>12.3f}")


if __name__ == "__main__":
    main()
