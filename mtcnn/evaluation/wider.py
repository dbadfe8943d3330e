"""The WIDER FACE evaluation protocol (easy / medium / hard AP), vectorised in numpy.

Follows the official python evaluation as `wider_face_val_dev/README.md` describes it: scores
min-max normalised once over all images, "+1 pixel" IoU, ignore boxes, first-come matching with no
re-assignment, 1000 score thresholds and VOC all-point AP.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..annotations import AnnotationError, read_wider
from ..box_coder import box_iou

SETTINGS = ("easy", "medium", "hard")


@dataclass
class WiderGroundTruth:
    """All annotated boxes per image, and per setting the indices of the faces that count."""

    images: list[str]                   # names relative to the image root, e.g. "0--Parade/x.jpg"
    boxes: list[np.ndarray]             # float64 (N, 4) x1, y1, x2 = x + w, y2 = y + h
    counted: dict[str, list[np.ndarray]]  # setting -> per image, 0-based indices of counted faces
    image_root: str = ""

    def __post_init__(self) -> None:
        if len(self.boxes) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.boxes)} box arrays")
        for setting, indices in self.counted.items():
            if len(indices) != len(self.images):
                raise ValueError(f"setting {setting!r} lists {len(indices)} images, the ground truth has "
                                 f"{len(self.images)}")

    def image_path(self, name: str) -> str:
        """The file path of an image of the set."""
        return os.path.join(self.image_root, name)

    def num_faces(self, setting: str) -> int:
        """The number of faces that count in `setting` (the positives of its recall)."""
        return int(sum(len(indices) for indices in self.counted[setting]))

    def subset(self, names: list[str]) -> WiderGroundTruth:
        """The ground truth of some of the images only (e.g. the first N of a quick run)."""
        position = {name: i for i, name in enumerate(self.images)}
        unknown = [name for name in names if name not in position]
        if unknown:
            raise ValueError(f"{len(unknown)} images are not in the ground truth, e.g. {unknown[0]!r}")
        keep = [position[name] for name in names]
        return WiderGroundTruth([self.images[i] for i in keep], [self.boxes[i] for i in keep],
                                {s: [indices[i] for i in keep] for s, indices in self.counted.items()},
                                self.image_root)


@dataclass
class PrecisionRecall:
    """A precision-recall curve over the score thresholds, and its average precision."""

    thresholds: np.ndarray  # descending, in normalised score units
    precision: np.ndarray
    recall: np.ndarray
    average_precision: float


@dataclass
class WiderResult:
    """AP and precision-recall curve per setting."""

    curves: dict[str, PrecisionRecall] = field(default_factory=dict)
    num_images: int = 0
    num_detections: int = 0

    @property
    def ap(self) -> dict[str, float]:
        """Average precision per setting."""
        return {setting: curve.average_precision for setting, curve in self.curves.items()}


def _read_setting_list(path: Path, images: list[str], face_counts: list[int]) -> list[np.ndarray]:
    """Per image (in ground-truth order), the 0-based indices listed in an easy/medium/hard file."""
    listed: dict[str, np.ndarray] = {}
    with open(path, encoding="utf-8") as stream:
        for line_number, line in enumerate(stream, start=1):
            fields = line.split()
            if not fields:
                continue
            try:
                indices = np.array([int(text) for text in fields[1:]], np.int64) - 1
            except ValueError:
                raise AnnotationError(path, line_number, "expected an image name and 1-based face indices") from None
            listed[fields[0]] = indices
    position = {name: i for i, name in enumerate(images)}
    for name, indices in listed.items():
        if name not in position:
            raise AnnotationError(path, None, f"lists image {name!r}, which the ground-truth file does not have")
        count = face_counts[position[name]]
        if len(indices) and (indices.min() < 0 or indices.max() >= count):
            raise AnnotationError(path, None, f"image {name!r} has {count} faces but the list names face "
                                  f"{int(indices.max()) + 1 if indices.max() >= count else int(indices.min()) + 1}")
    # An image the list leaves out has no face that counts in this setting.
    return [listed.get(name, np.zeros(0, np.int64)) for name in images]


def load_wider_ground_truth(folder: str | os.PathLike) -> WiderGroundTruth:
    """The ground truth of a WIDER-format folder: `*_bbx_gt.txt`, `images/`, `easy|medium|hard.txt`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"WIDER folder {folder} does not exist")
    gt_files = sorted(folder.glob("*_bbx_gt.txt"))
    if len(gt_files) != 1:
        raise FileNotFoundError(f"expected one *_bbx_gt.txt in {folder}, found {[p.name for p in gt_files]}")
    image_root = folder / "images"
    annotations = read_wider(gt_files[0], image_root)
    images = [os.path.relpath(a.path, os.path.abspath(image_root)).replace(os.sep, "/") for a in annotations]
    boxes = [a.boxes.astype(np.float64) for a in annotations]
    counted = {}
    for setting in SETTINGS:
        path = folder / f"{setting}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{folder} lacks {setting}.txt (image name and 1-based indices of the "
                                    f"faces that count in the {setting} setting, one image per line)")
        counted[setting] = _read_setting_list(path, images, [len(b) for b in boxes])
    return WiderGroundTruth(images, boxes, counted, str(image_root))


def match_image(boxes: np.ndarray, gt_boxes: np.ndarray, counted: np.ndarray,
                iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Per detection (in the given order): is it a proposal (not dropped), and is it a true positive.

    Each detection takes the single ground-truth box with the highest IoU. At IoU >= threshold, a
    detection of an ignore box is dropped; the first detection of a counted face is a true positive
    and later ones are false positives (no re-assignment to another box).
    """
    if len(boxes) == 0 or len(gt_boxes) == 0:
        return np.ones(len(boxes), bool), np.zeros(len(boxes), bool)
    overlaps = box_iou(np.asarray(boxes, np.float64), np.asarray(gt_boxes, np.float64), plus_one=True)
    best = overlaps.argmax(axis=1)
    hit = overlaps[np.arange(len(boxes)), best] >= iou_threshold
    is_counted = np.zeros(len(gt_boxes), bool)
    is_counted[counted] = True
    proposal = ~(hit & ~is_counted[best])
    candidates = np.flatnonzero(hit & is_counted[best])
    true_positive = np.zeros(len(boxes), bool)
    # The first detection (in order) of each counted face is its match.
    _, first = np.unique(best[candidates], return_index=True)
    true_positive[candidates[first]] = True
    return proposal, true_positive


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC all-point interpolated AP of a curve given in order of increasing recall."""
    recall = np.concatenate([[0.0], np.asarray(recall, np.float64), [1.0]])
    precision = np.concatenate([[0.0], np.nan_to_num(np.asarray(precision, np.float64)), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    changes = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[changes + 1] - recall[changes]) * precision[changes + 1]))


def normalize_scores(detections: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Scores min-max normalised once over all images (the running min starts at 1, the max at 0)."""
    scores = [np.asarray(s, np.float64).reshape(-1) for _, s in detections.values()]
    nonempty = [s for s in scores if len(s)]
    low = min([1.0] + [float(s.min()) for s in nonempty])
    high = max([0.0] + [float(s.max()) for s in nonempty])
    span = high - low
    if span <= 0:
        # All scores equal: every detection sits at the top threshold.
        return {name: np.ones_like(s) for name, s in zip(detections, scores)}
    return {name: (s - low) / span for name, s in zip(detections, scores)}


def evaluate_wider(detections: dict[str, tuple[np.ndarray, np.ndarray]], ground_truth: WiderGroundTruth,
                   iou_threshold: float = 0.5, num_thresholds: int = 1000) -> WiderResult:
    """AP and PR curves (easy, medium, hard) of detections {image name: (boxes x1y1x2y2 (N,4), scores (N,))}.

    Every image of `ground_truth` needs an entry (empty arrays when nothing was found), and no other
    image may appear: evaluate part of a set with `ground_truth.subset(names)`.
    """
    known = set(ground_truth.images)
    unknown = [name for name in detections if name not in known]
    missing = [name for name in ground_truth.images if name not in detections]
    if unknown:
        raise ValueError(f"detections for {len(unknown)} images that the ground truth lacks, e.g. {unknown[0]!r}; "
                         "names are relative to the images/ folder, like '0--Parade/0_Parade_Parade_0_628.jpg'")
    if missing:
        raise ValueError(f"no detections entry for {len(missing)} images of the ground truth, e.g. {missing[0]!r}; "
                         "give empty arrays for images without faces, or evaluate ground_truth.subset(names)")
    for name, (boxes, scores) in detections.items():
        if np.asarray(boxes).reshape(-1, 4).shape[0] != np.asarray(scores).reshape(-1).shape[0]:
            raise ValueError(f"{name}: {np.asarray(boxes).shape} boxes but {np.asarray(scores).shape} scores")
        if not np.isfinite(np.asarray(scores, np.float64)).all():
            raise ValueError(f"{name}: scores must be finite numbers, got {np.asarray(scores).tolist()}")
    normalized = normalize_scores(detections)
    thresholds = 1 - np.arange(1, num_thresholds + 1, dtype=np.float64) / num_thresholds

    # Detections sorted by score within each image: the protocol's "last detection above a
    # threshold" is then a prefix, so totals per threshold are sums over all detections >= it.
    ordered = []
    for index, name in enumerate(ground_truth.images):
        boxes = np.asarray(detections[name][0], np.float64).reshape(-1, 4)
        scores = normalized[name]
        order = np.argsort(-scores, kind="stable")
        ordered.append((boxes[order], scores[order], index))

    result = WiderResult(num_images=len(ground_truth.images),
                         num_detections=int(sum(len(s) for _, s, _ in ordered)))
    for setting, counted in ground_truth.counted.items():
        all_scores, all_proposals, all_hits = [], [], []
        for boxes, scores, index in ordered:
            if len(boxes) == 0 or len(ground_truth.boxes[index]) == 0:
                continue  # the protocol skips these images (their faces still count as positives)
            proposal, true_positive = match_image(boxes, ground_truth.boxes[index], counted[index], iou_threshold)
            all_scores.append(scores)
            all_proposals.append(proposal)
            all_hits.append(true_positive)
        if all_scores:
            scores = np.concatenate(all_scores)
            order = np.argsort(scores, kind="stable")
            scores = scores[order]
            proposals_above = np.concatenate([[0], np.cumsum(np.concatenate(all_proposals)[order][::-1])])
            hits_above = np.concatenate([[0], np.cumsum(np.concatenate(all_hits)[order][::-1])])
            count_above = len(scores) - np.searchsorted(scores, thresholds, side="left")
            proposals, hits = proposals_above[count_above], hits_above[count_above]
        else:
            proposals = hits = np.zeros(num_thresholds, np.int64)
        positives = ground_truth.num_faces(setting)
        precision = np.divide(hits, proposals, out=np.zeros(num_thresholds), where=proposals > 0)
        recall = hits / positives if positives else np.zeros(num_thresholds)
        result.curves[setting] = PrecisionRecall(thresholds, precision, recall, voc_ap(recall, precision))
    return result
