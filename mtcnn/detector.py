"""FaceDetector: the P-Net -> R-Net -> O-Net cascade over batches of images."""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace

from torch.profiler import record_function

import numpy as np
import torch

from .allocator import keep_freed_memory
from .cpu import has_native_bf16
from .box_coder import crop_regions, decode_boxes, decode_landmarks
from .boxes import batched_nms, crop_resize, host_integral_image, integral_image, square
from .inference import ProposalNet, WindowNet
from .nets import STAGE_NAMES, STAGES
from .pyramid import PYRAMIDS, build_pyramid, build_pyramid_tensor, level_size, pyramid_scales, resize_from_table
from .weights import CascadeWeights, load_weights


PRECISIONS = ("fp32", "bf16", "fp16", "auto")
#: Reduced precisions' dtypes; fp16 only on GPUs (CPUs have no fast fp16 convolutions in torch).
_REDUCED = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class DetectorConfig:
    """Detection parameters; the defaults are the original MTCNN's."""

    min_face_size: float = field(default=20.0, metadata={"help": "smallest face looked for, in pixels"})
    #: Indexed by each stage's order in mtcnn.nets.STAGES.
    thresholds: tuple[float, float, float] = field(default=(0.6, 0.7, 0.7), metadata={
        "help": "P-, R-, O-Net score thresholds, e.g. 0.6,0.7,0.7"})
    scale_factor: float = field(default=0.709, metadata={"help": "size ratio of neighbouring pyramid levels"})
    #: "classic" (exact area interpolation of the full image, as the reference): the faster
    #: variants differ from it by up to 0.008 WIDER AP (benchmarks/pyramid_ap.py, issue 15).
    pyramid: str = field(default="classic", metadata={"help": "how the image pyramid is built",
                                                      "choices": PYRAMIDS})
    #: IoU above which P-Net windows of one pyramid level suppress each other.
    level_nms: float = 0.5
    #: IoU thresholds of the NMS after P-Net (across levels), R-Net and O-Net ("min" overlap).
    stage_nms: tuple[float, float, float] = (0.7, 0.7, 0.7)
    #: Windows per R-Net / O-Net forward pass: caps memory however many candidates there are.
    #: None picks per device: 64 on CPUs (small batches stay in cache: 2-3x faster than 1024),
    #: 2048 on GPUs.
    stage_batch_size: int | None = None
    #: On CPUs, take the images of one call one at a time, spread over torch's threads with
    #: each image single-threaded: on CPUs a batch's pyramids and windows together miss the
    #: cache, and small R-/O-Net batches scale badly over threads, whole images do not (about
    #: 1.2x the images/s on 2 cores). While such a call runs, torch's intra-op thread count is
    #: 1 process-wide. False: the images go through together, using every thread.
    concurrent_images: bool = True
    #: Arithmetic of the three nets' bodies. "fp32" (the default) is exact: the classic pyramid
    #: then reproduces the reference. "bf16" runs the convolutions and dense layers in bfloat16
    #: (heads, boxes and NMS stay fp32); on CPUs through oneDNN's prepacked bf16 modules.
    #: "fp16" does the same in float16, on GPUs only.
    #: Its AP and speed: benchmarks/pyramid_ap.py --precision bf16, benchmarks/detector_speed.py,
    #: benchmarks/gpu_check.py.
    #: "auto" takes bf16 on CPUs that multiply it in hardware (AVX-512 BF16 or AMX) when a timing
    #: of the three nets at start-up shows it faster there, and fp32 everywhere else (GPUs included,
    #: until benchmarks/gpu_check.py has measured a card); FaceDetector.precision says which.
    precision: str = field(default="fp32", metadata={
        "help": "the nets' arithmetic: fp32 (exact), bf16 (faster on CPUs with AVX-512 BF16 or AMX, "
                "slower on others), fp16 (GPUs only), or auto (bf16 where it measures faster, else fp32)",
        "choices": PRECISIONS})

    def __post_init__(self) -> None:
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        object.__setattr__(self, "stage_nms", tuple(float(t) for t in self.stage_nms))
        if not (isinstance(self.min_face_size, (int, float)) and self.min_face_size > 0):
            raise ValueError(f"min_face_size must be a positive number of pixels, got {self.min_face_size!r}")
        if len(self.thresholds) != 3 or not all(0.0 <= t <= 1.0 for t in self.thresholds):
            raise ValueError(f"thresholds must be three probabilities in [0, 1] for P-, R- and O-Net, "
                             f"got {self.thresholds!r}")
        if not 0.0 < self.scale_factor < 1.0:
            raise ValueError(f"scale_factor must be between 0 and 1 (exclusive), got {self.scale_factor!r}")
        if self.pyramid not in PYRAMIDS:
            raise ValueError(f"pyramid must be one of {PYRAMIDS}, got {self.pyramid!r}")
        overlaps = (self.level_nms, *self.stage_nms)
        if len(self.stage_nms) != 3 or not all(0.0 < t <= 1.0 for t in overlaps):
            raise ValueError(f"NMS thresholds must lie in (0, 1], got {overlaps!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.stage_batch_size is not None and int(self.stage_batch_size) < 1:
            raise ValueError(f"stage_batch_size must be at least 1, got {self.stage_batch_size!r}")


@dataclass
class Detections:
    """Faces found in one image, best score first."""

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    landmarks: np.ndarray = field(default_factory=lambda: np.zeros((0, 5, 2), np.float32))

    def __len__(self) -> int:
        return len(self.scores)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """An H x W x 3 uint8 view or copy of a grayscale, RGB or RGBA uint8 image."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"images must be numpy arrays, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (0-255), got dtype {image.dtype}; "
                         "convert with np.clip(...).astype(np.uint8) or scale 16-bit images by 1/257")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]  # alpha carries no face information
    elif image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"images must be H x W (gray), H x W x 1, H x W x 3 (RGB) or H x W x 4 "
                         f"(RGBA), got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image has no pixels (shape {image.shape})")
    return np.ascontiguousarray(image)


# NMS group ids of pyramid levels: image index * this + level depth.
_LEVELS_PER_IMAGE = 1 << 16


def _levels_may_overlap(boxes: torch.Tensor, levels: torch.Tensor, owners: torch.Tensor,
                        level_threshold: float, threshold: float) -> bool:
    """Whether NMS across pyramid levels at this IoU threshold could remove any box at all.

    IoU(a, b) <= smaller area / larger area, and boxes of one level already overlap by at most
    level_threshold. With the original factor 0.709 the window area halves from level to level,
    so the cross-level NMS at 0.7 is provably a no-op and is skipped.
    """
    if level_threshold > threshold or len(boxes) == 0:
        return True
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    level_ids, compact = torch.unique(levels, return_inverse=True)
    smallest = torch.full((len(level_ids),), math.inf, device=boxes.device).scatter_reduce(
        0, compact, areas, "amin")
    largest = torch.zeros(len(level_ids), device=boxes.device).scatter_reduce(
        0, compact, areas, "amax")
    # Levels sorted by (image, smallest area): each must stay clear of the next of its image.
    image = level_ids // _LEVELS_PER_IMAGE
    order = torch.argsort(smallest, stable=True)
    order = order[torch.argsort(image[order], stable=True)]
    same_image = image[order][1:] == image[order][:-1]
    close = largest[order][:-1] >= threshold * smallest[order][1:]
    return bool((same_image & close).any())


def _logit(probability: float) -> float:
    """Inverse of the sigmoid, with the ends of [0, 1] mapped to -inf and inf."""
    if probability <= 0.0:
        return -math.inf
    if probability >= 1.0:
        return math.inf
    return math.log(probability / (1.0 - probability))


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here; use 'cpu'")
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {device!r}; use 'cpu' or 'cuda'")
    return resolved


class FaceDetector:
    """MTCNN face detector: boxes, scores and five landmarks for batches of RGB images."""

    def __init__(self, weights: str | os.PathLike | CascadeWeights = "reference",
                 device: str | torch.device = "cpu", config: DetectorConfig | None = None,
                 **overrides) -> None:
        unknown = set(overrides) - {f.name for f in fields(DetectorConfig)}
        if unknown:
            raise ValueError(f"unknown detector options {sorted(unknown)}")
        self.config = replace(config or DetectorConfig(), **overrides)
        self.device = _resolve_device(device)
        self.weights = weights if isinstance(weights, CascadeWeights) else load_weights(weights)
        if "pnet" not in self.weights.stages:
            raise ValueError(f"weights {self.weights.source!r} hold no pnet; every use of the "
                             "cascade starts with it")
        onet = self.weights.stages.get("onet")
        if onet is not None and not onet.has_landmarks:
            raise ValueError("the O-Net in these weights has no landmark head")
        # channels_last lets oneDNN run the convolutions about twice as fast on CPUs.
        # On CPUs the summed-area tables use OpenCV, the classic pyramid, crops and NMS compiled
        # loops (mtcnn/boxes.py); elsewhere everything stays in torch on the device.
        self._host_kernels = self.device.type == "cpu"
        if self.config.precision == "fp16" and self._host_kernels:
            raise ValueError("precision 'fp16' runs on GPUs only; on CPUs use 'bf16' or 'fp32'")
        if self._host_kernels:
            keep_freed_memory()  # large activations reused, not faulted in anew per chunk
        self._stage_batch_size = int(self.config.stage_batch_size or (64 if self._host_kernels else 2048))
        if self.config.precision == "bf16" and self._host_kernels and not has_native_bf16():
            warnings.warn("precision 'bf16' on a CPU without bf16 units (AVX-512 BF16 or AMX) is emulated, "
                          "slower than fp32 here; precision 'auto' picks the faster", stacklevel=2)
        #: The arithmetic the nets run in: the configured one, or what "auto" chose here.
        self.precision = self.config.precision
        if self.precision == "auto":
            self.precision = _auto_precision(self) if self._host_kernels and has_native_bf16() else "fp32"
        self._nets = self._build_nets(self.precision)

    def _build_nets(self, precision: str) -> dict[str, torch.nn.Module]:
        """The inference forms of the weights' stages on the device, in precision."""
        memory_format = torch.channels_last if self._host_kernels else torch.contiguous_format
        nets = {}
        for name, stage in self.weights.stages.items():
            net = ProposalNet(stage) if name == "pnet" else WindowNet(stage)
            net = net.to(self.device, memory_format=memory_format).eval()
            if precision in _REDUCED:
                # On CPUs through oneDNN's prepacked bf16 modules: eager bf16 there is slower than
                # fp32 (torch's bf16 PReLU and pooling take scalar paths).
                dtype = _REDUCED[precision]
                nets[name] = net.prepack_for_cpu(dtype) if self._host_kernels else net.use_reduced(dtype)
                continue
            # Prepacked oneDNN weights pay off for the many small window batches, not for P-Net's
            # few large levels (measured slower there).
            if self._host_kernels and name != "pnet" and torch.backends.mkldnn.is_available():
                net.prepack_for_cpu()
            elif self._host_kernels and name == "pnet":
                net.use_cpu_kernels()
            nets[name] = net
        return nets

    def detect(self, images) -> list[Detections]:
        """Detect faces in a list of H x W x 3 uint8 RGB images (any sizes, one result each)."""
        self._require("rnet", "onet")
        return self._run(_as_image_list(images), self._detect_together)

    def propose(self, images, up_to: str = "pnet") -> list[Detections]:
        """Candidate windows after P-Net or R-Net (squared boxes and scores, no landmarks)."""
        if up_to not in STAGE_NAMES[:-1]:
            raise ValueError(f"up_to must be 'pnet' or 'rnet', got {up_to!r}")
        self._require(up_to)
        return self._run(_as_image_list(images), lambda rgb, threads: self._propose_together(rgb, up_to, threads))

    def _run(self, rgb: list[np.ndarray], together) -> list[Detections]:
        """together(rgb) for all images at once, or on CPUs image by image over threads.

        On CPUs with several threads, one image alone is split instead: its pyramid levels and
        its R-Net / O-Net window chunks go over the threads, each single-threaded, so a caller
        with one frame at a time (video) gets the cores too.
        """
        if not rgb:
            return []
        threads = torch.get_num_threads()
        if not (self._host_kernels and self.config.concurrent_images):
            return together(rgb, None)
        if len(rgb) == 1 and threads > 1:
            with _single_threaded_ops(), ThreadPoolExecutor(threads, thread_name_prefix="mtcnn") as pool:
                return together(rgb, _Threads(pool, threads))
        workers = min(len(rgb), threads)
        if workers == 1:
            return [result for image in rgb for result in together([image], None)]
        # Largest images first: the last ones to finish are then small, so threads idle less
        # at the end of a call with mixed sizes.
        order = sorted(range(len(rgb)), key=lambda i: rgb[i].shape[0] * rgb[i].shape[1], reverse=True)
        results: list[Detections | None] = [None] * len(rgb)
        with _single_threaded_ops(), ThreadPoolExecutor(workers, thread_name_prefix="mtcnn") as pool:
            for index, found in zip(order, pool.map(lambda i: together([rgb[i]], None)[0], order)):
                results[index] = found
        return results

    def _detect_together(self, rgb: list[np.ndarray], threads: "_Threads | None") -> list[Detections]:
        with torch.inference_mode():
            sources = _ImageSources(rgb, self.device, self._host_kernels, threads)
            boxes, owners, _ = self._propose(sources)
            boxes, owners, _ = self._refine(sources, boxes, owners)
            boxes, owners, scores, landmarks = self._output(sources, boxes, owners)
        return _split_by_image(len(rgb), boxes, owners, scores, landmarks)

    def _propose_together(self, rgb: list[np.ndarray], up_to: str,
                          threads: "_Threads | None") -> list[Detections]:
        with torch.inference_mode():
            sources = _ImageSources(rgb, self.device, self._host_kernels, threads)
            boxes, owners, scores = self._propose(sources)
            if up_to == "rnet":
                boxes, owners, scores = self._refine(sources, boxes, owners)
        return _split_by_image(len(rgb), boxes, owners, scores, boxes.new_zeros((len(boxes), 5, 2)))

    def _require(self, *stages: str) -> None:
        missing = [name for name in stages if name not in self._nets]
        if missing:
            raise ValueError(f"weights {self.weights.source!r} lack the stages {missing} "
                             f"needed here; they hold only {sorted(self._nets)}")

    # -- stage 1 ------------------------------------------------------------------------
    def _propose(self, sources: "_ImageSources"):
        """P-Net over every image's pyramid: squared candidate boxes, image index and score."""
        # Images of one size share every level size, so their levels share forward passes; the
        # pyramids of one size group at a time are built just before use, keeping them in cache.
        by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, image in enumerate(sources.images):
            by_shape[image.shape[:2]].append(index)
        cfg = self.config
        pieces = [piece for members in by_shape.values()
                  for piece in self._propose_same_size(sources, members)]
        if not pieces:
            empty = torch.zeros((0, 4), device=self.device)
            return empty, torch.zeros(0, dtype=torch.long, device=self.device), empty[:, 0]
        boxes, scores, offsets, owners, levels = (torch.cat(p) for p in zip(*pieces))
        with record_function("mtcnn.nms"):
            # One call for every level (one NMS per image and level).
            keep = batched_nms(boxes, scores, levels, cfg.level_nms)
            boxes, scores, offsets, owners = boxes[keep], scores[keep], offsets[keep], owners[keep]
            levels = levels[keep]
            if _levels_may_overlap(boxes, levels, owners, cfg.level_nms, cfg.stage_nms[0]):
                keep = batched_nms(boxes, scores, owners, cfg.stage_nms[0])
                boxes, scores, offsets = boxes[keep], scores[keep], offsets[keep]
                owners = owners[keep]
        return square(decode_boxes(boxes, offsets, plus_one=False)), owners, scores

    def _propose_same_size(self, sources: "_ImageSources", members: list[int]) -> list[tuple]:
        """P-Net candidates of images that have the same size, before NMS, in level order."""
        cfg = self.config
        height, width = sources.images[members[0]].shape[:2]
        scales = pyramid_scales(height, width, cfg.min_face_size, cfg.scale_factor)
        sizes = [level_size(height, width, scale) for scale in scales]
        classic_tables = self._host_kernels and cfg.pyramid == "classic"
        levels_per_image = []
        for index in members:
            image = sources.images[index]
            with record_function("mtcnn.pyramid"):
                if classic_tables:
                    # Each classic level (or band of one) is averaged from the table alone:
                    # made with its P-Net pass.
                    sources.table(index)
                elif self._host_kernels:
                    levels_per_image.append(build_pyramid(image, scales, cfg.pyramid))
                else:
                    full = torch.from_numpy(image).to(self.device).permute(2, 0, 1)[None].float()
                    levels_per_image.append([level[0].permute(1, 2, 0) for level in
                                             build_pyramid_tensor(full, scales, cfg.pyramid)])
        # P-Net's face probability passes the threshold exactly when its logit passes this.
        threshold_logit = _logit(cfg.thresholds[0])
        owner_ids = torch.tensor(members, device=self.device)

        def band_input(depth: int, rows: tuple[int, int], index: int) -> torch.Tensor:
            """Input rows [rows) of pyramid level depth of image members[index], H' x W' x 3."""
            if classic_tables:
                return resize_from_table(sources.table(members[index]), *sizes[depth], 3, rows)
            return levels_per_image[index][depth][rows[0]:rows[1]]

        def band_candidates(band: "_LevelBand"):
            depth, scale = band.depth, scales[band.depth]
            rows = band.input_rows(sizes[depth][0])
            with record_function("mtcnn.pyramid"):
                level = [band_input(depth, rows, index) for index in range(len(members))]
            batch = torch.stack(level).to(self.device)
            # NHWC in memory viewed as NCHW: the channels_last layout the CPU kernels like best.
            batch = batch.permute(0, 3, 1, 2).float()
            with record_function("mtcnn.pnet"):
                features, logits = self._nets["pnet"](batch)
                hits = (logits >= threshold_logit).nonzero()
            if len(hits) == 0:
                return None
            member, row, col = hits.unbind(1)
            offsets = self._nets["pnet"].box_offsets(features[member, row, col])
            scores = torch.sigmoid(logits[member, row, col])
            row = row + band.first
            cell = torch.stack([col, row, col, row], dim=1).float()
            # Window of output cell (row, col): 12 px at stride 2, in the original's 1-based rule.
            boxes = torch.floor((2 * cell + torch.tensor([1.0, 1.0, 12.0, 12.0], device=self.device))
                                / torch.tensor(scale, dtype=torch.float32))
            owners = owner_ids[member]
            # One group per (image, level) in what follows.
            levels = owners * _LEVELS_PER_IMAGE + depth
            return boxes, scores, offsets, owners, levels

        bands = _level_bands(sizes, sources.workers if self._host_kernels else 1)
        # Largest bands first, so the threads finish together; results back in level order.
        by_work = sorted(bands, key=lambda band: band.work(sizes[band.depth][1]), reverse=True)
        found = dict(zip(by_work, sources.map(band_candidates, by_work)))
        return [found[band] for band in bands if found[band] is not None]

    # -- stages 2 and 3 -----------------------------------------------------------------
    def _score_windows(self, name: str, sources: "_ImageSources", boxes: torch.Tensor,
                       owners: torch.Tensor):
        """Crop every box from its image, run one stage in bounded chunks, keep those passing."""
        spec = STAGES[name]
        net = self._nets[name]
        chunk = self._stage_batch_size
        # Windows taken in reading order of each image: a chunk's crops then read neighbouring
        # rows of the summed-area table (on crowded CPU frames about 1.4x faster cropping). The
        # results go back to the given order, so what follows sees no difference.
        order = _reading_order(boxes, owners) if sources.host_kernels else None
        if order is not None:
            boxes, owners = boxes[order], owners[order]

        def run_chunk(start: int):
            with record_function("mtcnn.crops"):
                crops, inside = sources.crops(boxes[start:start + chunk], owners[start:start + chunk],
                                              spec.input_size)
            with record_function(f"mtcnn.{name}"):
                return net(crops), inside

        # Crop and run one chunk at a time: memory stays bounded and the chunk stays in cache.
        outputs, valid = zip(*sources.map(run_chunk, range(0, len(boxes), chunk)))
        scores, offsets, landmarks, inside = (
            _given_order(torch.cat(part), order) if part[0] is not None else None
            for part in (*zip(*outputs), valid))
        threshold = self.config.thresholds[spec.order]
        # Crops that fell wholly outside the image are dropped with the low scores.
        passed = (scores > threshold) & inside
        return passed, scores, offsets, landmarks

    def _refine(self, sources: "_ImageSources", boxes: torch.Tensor, owners: torch.Tensor):
        """R-Net: rescore and recalibrate P-Net's candidates."""
        if len(boxes) == 0:
            return boxes, owners, boxes.new_zeros(0)
        passed, scores, offsets, _ = self._score_windows("rnet", sources, boxes, owners)
        boxes, scores, offsets, owners = boxes[passed], scores[passed], offsets[passed], owners[passed]
        with record_function("mtcnn.nms"):
            keep = batched_nms(boxes, scores, owners, self.config.stage_nms[1])
        boxes = square(decode_boxes(boxes[keep], offsets[keep], plus_one=True))
        return boxes, owners[keep], scores[keep]

    def _output(self, sources: "_ImageSources", boxes: torch.Tensor, owners: torch.Tensor):
        """O-Net: final scores, boxes and landmarks."""
        if len(boxes) == 0:
            return boxes, owners, boxes.new_zeros(0), boxes.new_zeros((0, 5, 2))
        passed, scores, offsets, points = self._score_windows("onet", sources, boxes, owners)
        boxes, scores, offsets, owners = boxes[passed], scores[passed], offsets[passed], owners[passed]
        points = points[passed]
        # O-Net predicts the five x then the five y coordinates relative to its window.
        landmarks = decode_landmarks(boxes, points, plus_one=True)
        boxes = decode_boxes(boxes, offsets, plus_one=True)
        with record_function("mtcnn.nms"):
            keep = batched_nms(boxes, scores, owners, self.config.stage_nms[2], mode="min",
                               plus_one=True)
        return boxes[keep], owners[keep], scores[keep], landmarks[keep]


#: What precision="auto" chose in this process, per torch thread count: timed once.
_auto_choices: dict[int, str] = {}


def _auto_precision(detector: "FaceDetector") -> str:
    """bf16 if the three nets run at least 5% faster in it than in fp32 on this CPU, else fp32."""
    threads = torch.get_num_threads()
    if threads not in _auto_choices:
        seconds = _time_nets({precision: detector._build_nets(precision) for precision in ("fp32", "bf16")},
                             detector._stage_batch_size)
        _auto_choices[threads] = "bf16" if seconds["bf16"] < 0.95 * seconds["fp32"] else "fp32"
    return _auto_choices[threads]


def _time_nets(candidates: dict[str, dict[str, torch.nn.Module]], windows: int) -> dict[str, float]:
    """Seconds each candidate's nets take on one 360 x 640 P-Net level and a chunk of R-Net and
    O-Net windows, on random pixels: best of three per net after a warm-up.

    The candidates take turns on each net, so load that comes and goes while timing (other
    actors starting on the node) weighs on all of them alike rather than on whichever ran then.
    """
    import time

    generator = torch.Generator().manual_seed(0)
    inputs = {"pnet": (1, 360, 640), "rnet": (windows, 24, 24), "onet": (windows, 48, 48)}
    totals = dict.fromkeys(candidates, 0.0)
    with torch.inference_mode():
        for name in next(iter(candidates.values())):
            count, height, width = inputs[name]
            pixels = (torch.rand((count, 3, height, width), generator=generator) * 255).contiguous(
                memory_format=torch.channels_last)
            best = dict.fromkeys(candidates, math.inf)
            for nets in candidates.values():
                nets[name](pixels)
            for _ in range(3):
                for key, nets in candidates.items():
                    start = time.perf_counter()
                    nets[name](pixels)
                    best[key] = min(best[key], time.perf_counter() - start)
            for key in candidates:
                totals[key] += best[key]
    return totals


_thread_lock = threading.Lock()
_thread_users = 0
_saved_threads = 1


@contextmanager
def _single_threaded_ops():
    """torch's intra-op thread count set to 1 while any concurrent detect call runs.

    The count is process-wide, so overlapping calls share one saved value: the first to enter
    saves it, the last to leave puts it back.
    """
    global _thread_users, _saved_threads
    with _thread_lock:
        if _thread_users == 0:
            _saved_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        _thread_users += 1
    try:
        yield
    finally:
        with _thread_lock:
            _thread_users -= 1
            if _thread_users == 0:
                torch.set_num_threads(_saved_threads)


def _as_image_list(images) -> list[np.ndarray]:
    """RGB uint8 images from a list of arrays, a 4-D batch array, or one image."""
    if isinstance(images, np.ndarray):
        images = list(images) if images.ndim == 4 else [images]
    return [as_rgb(image) for image in images]


@dataclass(frozen=True)
class _Threads:
    """The worker threads one detect call spreads its parts over, and how many there are."""

    pool: ThreadPoolExecutor
    count: int


class _ImageSources:
    """Images of one call, with summed-area tables made once per image on demand for cropping."""

    def __init__(self, images: list[np.ndarray], device: torch.device, host_kernels: bool,
                 threads: _Threads | None = None) -> None:
        self.images = images
        self.device = device
        self.host_kernels = host_kernels
        self._threads = threads
        self._tables: dict[int, torch.Tensor] = {}

    @property
    def workers(self) -> int:
        """How many threads this call's parts run over."""
        return self._threads.count if self._threads else 1

    def map(self, work, items) -> list:
        """[work(item) for item in items], over the call's threads where it has them (in order)."""
        items = list(items)
        if self._threads is None or len(items) < 2:
            return [work(item) for item in items]

        def in_worker(item):
            with torch.inference_mode():  # a per-thread mode: the pool's threads need their own
                return work(item)

        return list(self._threads.pool.map(in_worker, items))

    def table(self, index: int) -> torch.Tensor:
        """Summed-area table of image index on the device."""
        if index not in self._tables:
            image = self.images[index]
            if self.host_kernels and image.shape[0] * image.shape[1] * 255 < 2**31:
                table = host_integral_image(image)
            else:
                table = integral_image(torch.from_numpy(image).to(self.device))
            self._tables[index] = table
        return self._tables[index]

    def crops(self, boxes: torch.Tensor, owners: torch.Tensor, size: int):
        """size x size crops of boxes (owners sorted by image), and which regions are non-empty."""
        counts = torch.bincount(owners, minlength=len(self.images)).tolist()
        chunks, valid, start = [], [], 0
        for index, count in enumerate(counts):
            if count == 0:
                continue
            height, width = self.images[index].shape[:2]
            regions = crop_regions(boxes[start:start + count], width, height)
            valid.append((regions[:, 2] > regions[:, 0]) & (regions[:, 3] > regions[:, 1]))
            chunks.append(crop_resize(self.table(index), regions, size, channels=3))
            start += count
        crops = torch.cat(chunks)
        if self.host_kernels:
            crops = crops.contiguous(memory_format=torch.channels_last)
        return crops, torch.cat(valid)


#: P-Net bands are at least this many output rows high: thinner ones repeat too much of their
#: neighbours' input (each band reads 10 rows past its own).
_MIN_BAND_ROWS = 16


@dataclass(frozen=True)
class _LevelBand:
    """P-Net output rows [first, stop) of pyramid level depth, one P-Net pass."""

    depth: int
    first: int
    stop: int

    def input_rows(self, level_height: int) -> tuple[int, int]:
        """The level's rows these outputs see: a 12-row window every 2 rows."""
        return 2 * self.first, min(2 * self.stop + 10, level_height)

    def work(self, level_width: int) -> int:
        """P-Net's work on this band, in output cells."""
        return (self.stop - self.first) * _pnet_cells(level_width)


def _pnet_cells(side: int) -> int:
    """P-Net's output length along a level side: 3x3 conv, 2x2 ceil pool, two 3x3 convs."""
    return max((side - 1) // 2 - 4, 0)


def _level_bands(sizes: list[tuple[int, int]], workers: int) -> list[_LevelBand]:
    """P-Net passes over pyramid levels of these sizes, in level and row order: whole levels, or
    with several threads, levels with more than a share of the work cut into row bands.

    The first level holds about half of P-Net's work: whole, it leaves the other threads idle
    while one thread finishes it. A share is half a thread's part, so every thread gets pieces.
    Bands give the same results as their whole level (P-Net sees only its window).
    """
    cells = [_pnet_cells(height) * _pnet_cells(width) for height, width in sizes]
    share = sum(cells) / (2 * workers)
    bands = []
    for depth, (height, _) in enumerate(sizes):
        rows = _pnet_cells(height)
        count = 1 if workers == 1 else max(1, min(round(cells[depth] / share), rows // _MIN_BAND_ROWS))
        bounds = [rows * k // count for k in range(count + 1)]
        bands += [_LevelBand(depth, first, stop) for first, stop in zip(bounds, bounds[1:])]
    return bands


def _reading_order(boxes: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
    """Permutation of (N, 4) boxes sorted by image, then top edge, then left edge."""
    key = np.lexsort((boxes[:, 0].numpy(), boxes[:, 1].numpy(), owners.numpy()))
    return torch.from_numpy(key)


def _given_order(values: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """values computed for items[order], put back in the items' own order."""
    if order is None:
        return values
    restored = torch.empty_like(values)
    restored[order] = values
    return restored


def _split_by_image(count: int, boxes: torch.Tensor, owners: torch.Tensor, scores: torch.Tensor,
                    landmarks: torch.Tensor) -> list[Detections]:
    """One Detections per image from flat tensors ordered by image, then score."""
    boxes = boxes.float().cpu().numpy()
    scores = scores.float().cpu().numpy()
    landmarks = landmarks.float().cpu().numpy()
    sizes = np.bincount(owners.cpu().numpy(), minlength=count)
    results, start = [], 0
    for size in sizes:
        end = start + int(size)
        results.append(Detections(boxes[start:end].copy(), scores[start:end].copy(),
                                  landmarks[start:end].copy()))
        start = end
    return results
