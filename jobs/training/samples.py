"""Training samples for one stage: windows labelled by IoU, their targets and their crops.

Coordinates are continuous pixels (pixel i covers [i, i+1)); windows are integer
(x1, y1, x2, y2) edges. A window is labelled by its best IoU with the ground truth:
above `positive_iou` positive, from `part_iou` to `positive_iou` part face, and negative only
when it overlaps *every* box, ignore boxes included, below `negative_iou`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from mtcnn.box_coder import box_iou, box_of_window, box_windows, crop_regions, encode_boxes, encode_landmarks
from mtcnn.boxes import crop_resize, host_integral_image, integral_image

from mtcnn.annotations import DETECTOR_WINDOW_RULE, box_from_points
from mtcnn.nets import STAGE_NAMES, stage_spec

from jobs.training.schema import LANDMARK, NEGATIVE, PART, POSITIVE, SAMPLE_SCHEMA

#: Label of a window that is none of the kinds (between thresholds, or on an ignore box).
DISCARD = -1
#: Side of the smallest random negative window: P-Net's input, the smallest face it sees.
MIN_NEGATIVE_SIZE = 12


#: What landmark sample windows are drawn around (SampleConfig.landmark_windows).
LANDMARK_WINDOWS = ("detector", "annotated")


@dataclass(frozen=True)
class SampleConfig:
    """How many samples of which kind to make per image, and the IoU rules that label them."""

    stage: str = field(default="pnet", metadata={"help": "the stage whose samples to make",
                                                 "choices": STAGE_NAMES})
    #: Split by `mix` (fewer when an image has too few usable faces).
    samples_per_image: int = field(default=100, metadata={"help": "negatives + positives + parts per face image"})
    mix: tuple[float, float, float, float] = field(default=(3.0, 1.0, 1.0, 2.0), metadata={
        "help": "negative,positive,part,landmark ratio of the samples"})
    #: None: as many as `mix` asks for when there are as many landmark images as face images
    #: (`prepare` scales it to the real image counts).
    landmark_samples_per_image: float | None = field(default=None, metadata={
        "help": "landmark samples per landmark image (None: as --mix asks, given the numbers of images)"})
    positive_iou: float = field(default=0.65, metadata={"help": "positives overlap a face above this IoU"})
    part_iou: float = field(default=0.4, metadata={"help": "part faces overlap a face from this IoU to positive_iou"})
    #: The paper's 0.4; the original MTCNN uses 0.3 (windows between it and part_iou are dropped),
    #: as do the shipped recipes.
    negative_iou: float = field(default=0.4, metadata={"help": "negatives overlap every face below this IoU"})
    #: They still keep negatives off them.
    min_face_size: float = field(default=20.0, metadata={
        "help": "faces smaller than this (longer side, px) give no positives, parts or landmark samples"})
    attempts_per_sample: int = field(default=20, metadata={
        "help": "random windows tried per sample wanted before giving up on a quota"})
    #: "detector": landmark windows are drawn around the window O-Net is handed at detection time
    #: (DETECTOR_WINDOW_RULE, from the five points), so the landmarks are learned in the frame they
    #: are predicted in. "annotated": around the list's own boxes, which are about 1.26x smaller
    #: and centred lower. Measured (benchmarks/landmark_frame.py): the cascade's median NME 0.093
    #: -> 0.085, its mean 0.105 -> 0.102; O-Net's error in the detector's frame did not change.
    landmark_windows: str = field(default="detector", metadata={
        "help": "what landmark windows are drawn around", "choices": LANDMARK_WINDOWS})
    #: So every image contributes all kinds.
    top_up: bool = field(default=True, metadata={
        "help": "mined stages: fill the quotas the proposals leave short with random windows"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "mix", tuple(float(m) for m in self.mix))
        stage_spec(self.stage)  # an unknown stage fails here
        if len(self.mix) != 4 or any(not math.isfinite(m) or m < 0 for m in self.mix) or sum(self.mix) == 0:
            raise ValueError(f"mix must be four non-negative numbers negative:positive:part:landmark "
                             f"(e.g. 3,1,1,2), got {self.mix!r}")
        if int(self.samples_per_image) < 0:
            raise ValueError(f"samples_per_image must be >= 0, got {self.samples_per_image!r}")
        if not 0.0 < self.negative_iou <= self.part_iou < self.positive_iou < 1.0:
            raise ValueError("IoU thresholds must satisfy 0 < negative_iou <= part_iou < positive_iou < 1, got "
                             f"{self.negative_iou}, {self.part_iou}, {self.positive_iou}")
        if self.landmark_windows not in LANDMARK_WINDOWS:
            raise ValueError(f"landmark_windows must be one of {LANDMARK_WINDOWS}, got {self.landmark_windows!r}")
        if self.landmark_samples_per_image is not None and self.landmark_samples_per_image < 0:
            raise ValueError(f"landmark_samples_per_image must be >= 0, got {self.landmark_samples_per_image!r}")

    @property
    def size(self) -> int:
        """Crop side in pixels for this stage."""
        return stage_spec(self.stage).input_size

    def quotas(self) -> tuple[float, float, float]:
        """Expected negatives, positives and parts per face image."""
        negative, positive, part, _ = self.mix
        total = negative + positive + part
        if total == 0:
            return 0.0, 0.0, 0.0
        return tuple(self.samples_per_image * m / total for m in (negative, positive, part))

    def landmark_quota(self) -> float:
        """Expected landmark samples per landmark image."""
        if self.landmark_samples_per_image is not None:
            return float(self.landmark_samples_per_image)
        face_share = sum(self.mix[:3])
        return self.samples_per_image * self.mix[3] / face_share if face_share else float(self.samples_per_image)


@dataclass
class SampleSet:
    """Crops with their kinds and targets, ready to become schema rows."""

    images: np.ndarray = field(default_factory=lambda: np.zeros((0, 12, 12, 3), np.uint8))
    kinds: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    landmarks: np.ndarray = field(default_factory=lambda: np.zeros((0, 10), np.float32))
    #: The integer windows (x1, y1, x2, y2) the crops were cut from (not written to shards).
    windows: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))

    def __len__(self) -> int:
        return len(self.kinds)

    @staticmethod
    def concatenate(parts: list["SampleSet"], size: int) -> "SampleSet":
        """One set from several (an empty set of crops of side size when there are none)."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return SampleSet(np.zeros((0, size, size, 3), np.uint8))
        return SampleSet(*(np.concatenate([getattr(p, name) for p in parts])
                           for name in ("images", "kinds", "boxes", "landmarks", "windows")))


# -- labels and targets --------------------------------------------------------------------


def iou(windows: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU (N, M) of every window with every box (continuous coordinates), in float32."""
    return box_iou(np.asarray(windows, np.float32), np.asarray(boxes, np.float32))


def label_windows(windows: np.ndarray, boxes: np.ndarray, ignore: np.ndarray,
                  config: SampleConfig) -> tuple[np.ndarray, np.ndarray]:
    """Kind of each window (DISCARD for none) and the index of the box it was matched to."""
    overlaps = iou(windows, boxes)
    kinds = np.full(len(windows), DISCARD, np.int8)
    if overlaps.shape[1] == 0:
        kinds[:] = NEGATIVE
        return kinds, np.zeros(len(windows), np.int64)
    best = overlaps.argmax(axis=1)
    best_iou = overlaps[np.arange(len(windows)), best]
    on_ignored = np.asarray(ignore, bool)[best]
    kinds[best_iou < config.negative_iou] = NEGATIVE
    usable = ~on_ignored
    kinds[usable & (best_iou >= config.part_iou) & (best_iou <= config.positive_iou)] = PART
    kinds[usable & (best_iou > config.positive_iou)] = POSITIVE
    return kinds, best


def crop_windows(image: np.ndarray, windows: np.ndarray, size: int) -> np.ndarray:
    """(N, size, size, 3) uint8 crops of integer windows, cut as the detector cuts its crops.

    The part of a window inside the image is stretched to size x size with the detector's own
    area resize (mtcnn.box_coder.crop_regions + mtcnn.boxes.crop_resize), so a net trains on
    exactly the pixels it later sees: the detector (like the reference) stretches clipped crops
    rather than padding them.
    """
    windows = np.asarray(windows, np.int64).reshape(-1, 4)
    if len(windows) == 0:
        return np.zeros((0, size, size, 3), np.uint8)
    height, width = image.shape[:2]
    regions = crop_regions(torch.from_numpy(box_of_window(windows).astype(np.float32)), width, height)
    table = host_integral_image(image) if height * width * 255 < 2**31 \
        else integral_image(torch.from_numpy(np.ascontiguousarray(image)))
    crops = crop_resize(table, regions, size, channels=3).permute(0, 2, 3, 1).round().clamp(0, 255)
    out = crops.to(torch.uint8).numpy()
    empty = ((regions[:, 2] <= regions[:, 0]) | (regions[:, 3] <= regions[:, 1])).numpy()
    out[empty] = 0  # wholly outside the image: nothing to see
    return out


# -- windows ---------------------------------------------------------------------------------


def jittered_windows(box: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Random square windows around a face, as the original MTCNN draws them.

    Side in [0.8 * shorter side, 1.25 * longer side], centre moved up to 0.2 of the face
    size each way.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    width, height = x2 - x1, y2 - y1
    low = max(1, int(min(width, height) * 0.8))
    high = max(low + 1, int(math.ceil(1.25 * max(width, height))))
    side = rng.integers(low, high, size=count)
    centre_x = x1 + width / 2 + rng.uniform(-0.2, 0.2, size=count) * width
    centre_y = y1 + height / 2 + rng.uniform(-0.2, 0.2, size=count) * height
    left = np.floor(centre_x - side / 2).astype(np.int64)
    top = np.floor(centre_y - side / 2).astype(np.int64)
    return np.stack([left, top, left + side, top + side], axis=1)


def random_windows(width: int, height: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """Random square windows inside an image, sides from 12 px to half the shorter image side."""
    limit = min(width, height)
    if limit < MIN_NEGATIVE_SIZE:
        return np.zeros((0, 4), np.int64)
    side = rng.integers(MIN_NEGATIVE_SIZE, max(MIN_NEGATIVE_SIZE + 1, limit // 2 + 1), size=count)
    left = (rng.random(count) * (width - side + 1)).astype(np.int64)
    top = (rng.random(count) * (height - side + 1)).astype(np.int64)
    return np.stack([left, top, left + side, top + side], axis=1)


def near_windows(boxes: np.ndarray, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """One random square window touching each face, candidates for hard negatives (as the original)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    limit = min(width, height)
    if limit < MIN_NEGATIVE_SIZE or len(boxes) == 0:
        return np.zeros((0, 4), np.int64)
    side = rng.integers(MIN_NEGATIVE_SIZE, max(MIN_NEGATIVE_SIZE + 1, limit // 2 + 1), size=len(boxes))
    # The window's corner lands anywhere from one side before the face's corner to its far edge.
    left = np.floor(boxes[:, 0] + rng.uniform(-side, boxes[:, 2] - boxes[:, 0]))
    top = np.floor(boxes[:, 1] + rng.uniform(-side, boxes[:, 3] - boxes[:, 1]))
    left = np.clip(left, 0, width - side).astype(np.int64)
    top = np.clip(top, 0, height - side).astype(np.int64)
    return np.stack([left, top, left + side, top + side], axis=1)


def proposal_windows(boxes: np.ndarray) -> np.ndarray:
    """Integer windows the detector crops for proposed boxes (its rule, unclipped), empty ones left out."""
    windows = box_windows(boxes)
    return windows[(windows[:, 2] > windows[:, 0]) & (windows[:, 3] > windows[:, 1])]


def _inside(windows: np.ndarray, width: int, height: int) -> np.ndarray:
    return (windows[:, 0] >= 0) & (windows[:, 1] >= 0) & (windows[:, 2] <= width) & (windows[:, 3] <= height)


def _count(expected: float, rng: np.random.Generator) -> int:
    """An integer with the given expectation: fractional quotas even out over many images."""
    whole = int(math.floor(expected))
    return whole + int(rng.random() < expected - whole)


# -- per image -------------------------------------------------------------------------------


class _Picker:
    """Collects labelled windows up to a quota per kind."""

    def __init__(self, quotas: dict[int, int]) -> None:
        self.quotas = dict(quotas)
        self.windows: dict[int, list[np.ndarray]] = {kind: [] for kind in quotas}
        self.matched: dict[int, list[np.ndarray]] = {kind: [] for kind in quotas}

    def missing(self, kind: int) -> int:
        return self.quotas.get(kind, 0) - sum(len(w) for w in self.windows.get(kind, []))

    def offer(self, windows: np.ndarray, kinds: np.ndarray, matched: np.ndarray,
              rng: np.random.Generator) -> None:
        """Take a random subset of each kind's windows, as many as its quota still needs."""
        for kind in self.quotas:
            need = self.missing(kind)
            chosen = np.flatnonzero(kinds == kind)
            if need <= 0 or len(chosen) == 0:
                continue
            if len(chosen) > need:
                chosen = rng.choice(chosen, size=need, replace=False)
            self.windows[kind].append(windows[chosen])
            self.matched[kind].append(matched[chosen])

    def result(self, kind: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.windows.get(kind):
            return np.zeros((0, 4), np.int64), np.zeros(0, np.int64)
        return np.concatenate(self.windows[kind]), np.concatenate(self.matched[kind])


def _usable_faces(boxes: np.ndarray, ignore: np.ndarray, config: SampleConfig) -> np.ndarray:
    sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) if len(boxes) else np.zeros(0)
    return np.flatnonzero(~np.asarray(ignore, bool) & (sides >= config.min_face_size))


def _face_windows(boxes: np.ndarray, faces: np.ndarray, width: int, height: int, count: int,
                  rng: np.random.Generator) -> np.ndarray:
    """About count jittered windows spread over the given faces, kept inside the image."""
    if len(faces) == 0 or count <= 0:
        return np.zeros((0, 4), np.int64)
    per_face = max(1, int(math.ceil(count / len(faces))))
    windows = np.concatenate([jittered_windows(boxes[f], per_face, rng) for f in faces])
    return windows[_inside(windows, width, height)]


def face_samples(image: np.ndarray, boxes: np.ndarray, ignore: np.ndarray, config: SampleConfig,
                 rng: np.random.Generator, proposals: np.ndarray | None = None) -> SampleSet:
    """Negatives, positives and parts of one image: from proposed windows when given, else
    (and to top up) from random windows."""
    height, width = image.shape[:2]
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    ignore = np.asarray(ignore, bool).reshape(-1)
    negative, positive, part = (_count(q, rng) for q in config.quotas())
    picker = _Picker({NEGATIVE: negative, POSITIVE: positive, PART: part})

    if proposals is not None:
        windows = proposal_windows(proposals)
        kinds, matched = label_windows(windows, boxes, ignore, config)
        picker.offer(windows, kinds, matched, rng)
    if proposals is None or config.top_up:
        faces = _usable_faces(boxes, ignore, config)
        attempts = 0
        budget = config.attempts_per_sample * max(1, positive + part)
        while (picker.missing(POSITIVE) > 0 or picker.missing(PART) > 0) and len(faces) and attempts < budget:
            batch = max(32, 2 * (picker.missing(POSITIVE) + picker.missing(PART)))
            windows = _face_windows(boxes, faces, width, height, batch, rng)
            attempts += batch
            kinds, matched = label_windows(windows, boxes, ignore, config)
            kinds[kinds == NEGATIVE] = DISCARD  # negatives come from the draws below
            picker.offer(windows, kinds, matched, rng)
        attempts = 0
        budget = config.attempts_per_sample * max(1, negative)
        while picker.missing(NEGATIVE) > 0 and attempts < budget:
            need = picker.missing(NEGATIVE)
            batch = max(32, 2 * need)
            windows = random_windows(width, height, batch, rng)
            if len(boxes):
                # Half the candidates touch a face: harder negatives, as in the original MTCNN.
                near = near_windows(boxes[rng.integers(0, len(boxes), size=batch // 2)], width, height, rng)
                windows = np.concatenate([windows[: batch - len(near)], near])
            if len(windows) == 0:
                break
            attempts += batch
            kinds, matched = label_windows(windows, boxes, ignore, config)
            kinds[kinds != NEGATIVE] = DISCARD
            picker.offer(windows, kinds, matched, rng)

    sets = []
    for kind in (NEGATIVE, POSITIVE, PART):
        windows, matched = picker.result(kind)
        targets = (np.zeros((len(windows), 4), np.float32) if kind == NEGATIVE
                   else encode_boxes(boxes[matched], windows))
        sets.append(SampleSet(crop_windows(image, windows, config.size), np.full(len(windows), kind, np.int8),
                              targets, np.zeros((len(windows), 10), np.float32), windows))
    return SampleSet.concatenate(sets, config.size)


def landmark_samples(image: np.ndarray, boxes: np.ndarray, landmarks: np.ndarray, ignore: np.ndarray,
                     config: SampleConfig, rng: np.random.Generator) -> SampleSet:
    """Landmark samples of one image: windows around faces with all five points known, each
    overlapping its face above positive_iou and holding every point."""
    height, width = image.shape[:2]
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    landmarks = np.asarray(landmarks, np.float32).reshape(-1, 5, 2)
    known = np.isfinite(landmarks).all(axis=(1, 2))
    if config.landmark_windows == "detector" and known.any():
        boxes = boxes.copy()
        points = landmarks[known]
        boxes[known] = box_from_points(points[:, 0], points[:, 1], (points[:, 3] + points[:, 4]) / 2,
                                       DETECTOR_WINDOW_RULE)
    faces = np.intersect1d(_usable_faces(boxes, ignore, config), np.flatnonzero(known))
    wanted = _count(config.landmark_quota(), rng)
    chosen: list[np.ndarray] = []
    owners: list[np.ndarray] = []
    have, attempts = 0, 0
    budget = config.attempts_per_sample * max(1, wanted)
    while have < wanted and len(faces) and attempts < budget:
        batch = max(32, 2 * (wanted - have))
        face = rng.choice(faces, size=batch)
        windows = np.concatenate([jittered_windows(boxes[f], 1, rng) for f in face])
        attempts += batch
        overlap = iou(windows, boxes)[np.arange(batch), face]
        points = landmarks[face]
        holds = ((points >= windows[:, None, :2]) & (points < windows[:, None, 2:])).all(axis=(1, 2))
        good = np.flatnonzero((overlap > config.positive_iou) & holds & _inside(windows, width, height))
        good = good[: wanted - have]
        chosen.append(windows[good])
        owners.append(face[good])
        have += len(good)
    if not chosen:
        return SampleSet.concatenate([], config.size)
    windows, owner = np.concatenate(chosen), np.concatenate(owners)
    return SampleSet(crop_windows(image, windows, config.size), np.full(len(windows), LANDMARK, np.int8),
                     np.zeros((len(windows), 4), np.float32), encode_landmarks(landmarks[owner], windows),
                     windows)


def to_table(samples: SampleSet, source: str, stage: str) -> pa.Table:
    """Schema rows (`SAMPLE_SCHEMA`) for the samples of one source image."""
    count = len(samples)
    size = stage_spec(stage).input_size
    data = np.ascontiguousarray(samples.images, np.uint8).reshape(-1)
    offsets = np.arange(count + 1, dtype=np.int32) * (size * size * 3)
    images = pa.Array.from_buffers(pa.binary(), count, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    return pa.Table.from_arrays([
        images,
        pa.array(np.full(count, size, np.int16)),
        pa.array(samples.kinds.astype(np.int8)),
        pa.FixedSizeListArray.from_arrays(pa.array(samples.boxes.astype(np.float32).reshape(-1)), 4),
        pa.FixedSizeListArray.from_arrays(pa.array(samples.landmarks.astype(np.float32).reshape(-1)), 10),
        pa.array([source] * count, pa.string()),
        pa.array([stage] * count, pa.string()),
    ], schema=SAMPLE_SCHEMA)
