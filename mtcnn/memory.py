"""How much memory FaceDetector.detect needs for an image of a given size, and how far to shrink it.

The detector's memory grows with the image's area: on a CPU a 9000 x 9000 photo (81 Mpx) peaks at
about 5.8 GB beyond the loaded nets and the decoded pixels. This module models that peak from the
same quantities the detector allocates, per phase of one detect call on a CPU detector:

- the summed-area table of the image (used by the classic pyramid and by R-/O-Net's crops): on
  images up to 2**31 / 255 pixels (about 8.4 Mpx) OpenCV's int32 table with a padding lane, 16
  bytes a pixel, built through a 4-byte RGBA copy; above that torch's int64 table, 24 bytes a
  pixel, built through two more int64 images (the cast and the first cumulative sum) alive at once;
- the pyramid (mtcnn.pyramid): every level kept until P-Net has seen all of them, float32 (12
  bytes a pixel) or uint8 ("dynamic", 3 bytes); the classic levels are written from the table
  directly; "chain2" and "octave" first convert the whole image to float32;
- P-Net on one level: the stacked float32 input, and conv1's output with its PReLU's (10 channels,
  40 bytes a pixel each), the largest activations; later layers work on a quarter of the pixels;
- P-Net's candidates: boxes, scores, offsets, owners and levels of every window over the score
  threshold, gathered features while a level is scored, their concatenation and NMS after;
- R-Net and O-Net: chunks of stage_batch_size windows, a few MB however large the image.

The peak is the largest phase's bytes (each phase with what is still held from before it), times a
margin, plus a fixed allowance for what is not modelled (pages of code and oneDNN kernels touched on
a first call, allocator slack). Those constants were fitted to measured peaks: see the MEASURED
block below.

Only the CPU is modelled: on a GPU the pyramid and the nets' activations live in device memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .detector import Detections, DetectorConfig
from .pyramid import level_size, pyramid_scales

# ---------------------------------------------------------------------------------------------
# Byte counts read from the code (mtcnn/boxes.py, mtcnn/pyramid.py, mtcnn/detector.py).

#: P-Net's conv1: 10 float32 channels; its output and its PReLU's are alive together.
_PNET_CONV1_BYTES = 10 * 4
#: precision="bf16" on CPUs: P-Net runs through oneDNN's bf16 modules, with a bf16 copy of the
#: input and blocked-layout outputs converted back: measured 63-69 MB more than fp32 at 3840x2160
#: (570-576 against 507 MB; level 0 has 2.98 M conv1 pixels), about 22-24 bytes a conv1 pixel.
_PNET_BF16_EXTRA_BYTES = 24
#: Per P-Net candidate kept across levels: box (16), score (4), offsets (16), owner (8), level (8).
_CANDIDATE_KEPT_BYTES = 52
#: Per candidate of the level being scored: hit indices (24), cells and boxes (32 + 16), gathered
#: features (32 float32 = 128), offsets, owners, levels, scores (36).
_CANDIDATE_LEVEL_BYTES = 236
#: After the last level: the kept pieces, their concatenation and the NMS's sorted copies.
_CANDIDATE_NMS_BYTES = 2 * _CANDIDATE_KEPT_BYTES + 96
#: Per window of an O-Net chunk: conv1's output and its PReLU's (32 x 46 x 46 float32 each), the
#: largest activations of R-Net and O-Net (measured: 41 MB for 64 windows, 146 MB for 256).
_ONET_WINDOW_BYTES = 2 * 32 * 46 * 46 * 4
#: Windows per R-/O-Net chunk on CPUs when stage_batch_size is None (FaceDetector.__init__).
_CPU_STAGE_BATCH = 64

# ---------------------------------------------------------------------------------------------
# Constants fitted to measured peaks (see the MEASURED block below).

#: P-Net candidates per P-Net output cell assumed (windows over the 0.6 threshold / output cells),
#: before NMS. Measured over every level: 0.052-0.064 on the most crowded WIDER validation photo
#: (624 faces) tiled to 640x480 .. 3000x3000, 0.002 on the astronaut resized to 1920x1080, 0.003
#: on uniform noise, 0 on a flat image. Twice the crowd's, for photos more crowded still; even at
#: 0.10 candidates stay a few percent of the peak (the P-Net activations and the table dominate).
CANDIDATE_DENSITY = 0.10
#: Heap that malloc keeps after P-Net: freed blocks under its 32 MB mmap threshold (allocator.py)
#: stay in the process, so what comes after P-Net (the table of the non-classic pyramids, R-Net's
#: and O-Net's chunks) adds to them. Resident memory after P-Net with the dynamic pyramid (first
#: call, so about 20 MB of code pages included): 41 MB at 1280x720, 108 MB at 1920x1080, 128 MB
#: at 2560x1440, 137 MB at 3840x2160, 187 MB at 3000x3000, 148 MB at 4000x3000, 202 MB at
#: 5000x4000, 197 MB at 6000x6000 (classic, beside its table: 171 MB at 4000x3000). It stops
#: growing once the large levels' tensors pass the threshold (those go back to the kernel on free).
#: Counted as min(this, the P-Net phase) after P-Net.
RETAINED_HEAP_BYTES = 192 << 20
#: Allowance for what the model leaves out, bytes: on a first call about 20-25 MB of code and
#: oneDNN kernel pages (17-29 MB measured for a 64x64 and a 200x200 image), plus allocator slack
#: that overlaps the phases on small images (the measured peak exceeds 1.15 x the largest phase by
#: up to 47 MB at 640x480 .. 1920x1080 on crowded photos).
FIXED_OVERHEAD_BYTES = 80 << 20
#: Multiplier on the modelled phases. Without it the largest phase is within 1% of the measured
#: peak where the table dominates (3000x3000 and up, classic), and 7-12% below it where P-Net's
#: first level does (3840x2160: 474 MB modelled, 507-533 MB measured, first call included);
#: 1.15 covers that and leaves room for other CPUs and torch builds (oneDNN's choice of
#: convolution kernels and scratch buffers), which were not measured.
MARGIN = 1.15

# ---------------------------------------------------------------------------------------------
# MEASURED: benchmarks/detector_memory.py (each row a fresh process, one detect call, the first;
# peak = VmHWM during the call minus VmRSS before it, the nets and the image already in memory),
# Intel(R) Xeon(R) Processor (2 logical CPUs, AVX-512, AVX-512 BF16, AMX), torch 2.13.0+cpu, one
# torch thread, default DetectorConfig (min_face_size 20, factor 0.709, fp32) but for the pyramid.
# "astronaut": tests/data/astronaut.png resized (one face); "crowd": the WIDER validation photo
# with 624 faces (../shared/data) tiled at its own scale (many faces and P-Net candidates).
# MB = 2**20 bytes. The largest modelled phase is the last column.
#
#        size   Mpx    source  pyramid  peak MB estimate MB est/peak      s faces  largest phase
#   640x480     0.3 astronaut  classic       36         144     3.96    0.1     1  windows
#   640x480     0.3     crowd  classic       98         144     1.47    0.3    50  windows
#  1280x720     0.9 astronaut  classic       72         196     2.73    0.2     1  windows
#  1280x720     0.9     crowd  classic      114         196     1.72    0.8   182  windows
#  1920x1080    2.1 astronaut  classic      162         293     1.81    0.3     1  windows
#  1920x1080    2.1     crowd  classic      189         293     1.55    1.9   321  windows
#  3840x2160    8.3 astronaut  classic      507         625     1.23    1.6     1  pnet
#  3840x2160    8.3     crowd  classic      533         625     1.17   11.0  1159  pnet
#  3000x3000    9.0 astronaut  classic      644         791     1.23    2.6     1  table
#  3000x3000    9.0     crowd  classic      655         791     1.21   13.5   986  table
#  4000x3000   12.0 astronaut  classic      827        1028     1.24    3.7     1  table
#  4000x3000   12.0     crowd  classic      825        1028     1.25   20.1  1332  table
#  6000x6000   36.0 astronaut  classic     2473        2923     1.18   12.4     1  table
#  6000x6000   36.0     crowd  classic     2473        2923     1.18  141.5  4005  table
#  9000x9000   81.0 astronaut  classic     5563        6477     1.16   45.2     1  table
#  9000x9000   81.0     crowd  classic     5563        6477     1.16  761.7  8890  table
#  1920x1080    2.1 astronaut  dynamic      113         244     2.16    0.5     1  windows
#  3840x2160    8.3 astronaut  dynamic      305         493     1.62    1.3     1  windows
#  4000x3000   12.0 astronaut  dynamic      961        1261     1.31    2.8     1  table
#  6000x6000   36.0 astronaut  dynamic     2662        3181     1.19    9.9     1  table
#  1920x1080    2.1 astronaut   chain2      123         256     2.09    0.4     1  windows
#  3840x2160    8.3 astronaut   chain2      333         493     1.48    2.3     1  windows
#  4000x3000   12.0 astronaut   chain2      948        1261     1.33    4.9     1  table
#  6000x6000   36.0 astronaut   chain2     2677        3181     1.19   13.5     1  table
#  1920x1080    2.1 astronaut   octave      119         256     2.16    0.3     1  windows
#  3840x2160    8.3 astronaut   octave      364         493     1.35    1.5     1  windows
#  4000x3000   12.0 astronaut   octave     1007        1261     1.25    3.0     1  table
#  6000x6000   36.0 astronaut   octave     2694        3181     1.18   14.0     1  table
# precision bf16 (--precision bf16; estimates with the bf16 P-Net term above):
#  1920x1080    2.1 astronaut  classic      159         312     1.97    0.4     1  windows
#  3840x2160    8.3 astronaut  classic      576         703     1.22    1.8     1  pnet
#  4000x3000   12.0 astronaut  classic      833        1087     1.31    4.2     1  pnet
#
# Above 2**31 / 255 pixels (8.4 Mpx) the int64 summed-area table dominates: building it holds 72
# bytes an image pixel (the 9000 x 9000 peak, 5563 MB, is that to 0.1%); under it P-Net's first
# level does, about 61 bytes an image pixel at 3840x2160. (The reported 9000 x 9000 JPEG: about
# 6.05 GB of process memory, nets and pixels included, and 87 s on one thread.) The estimate stays
# within 1.5x of these peaks from 9 Mpx up (1.16-1.33x; classic from 8.3 Mpx up, 1.16-1.25x); on
# smaller images the fixed allowance weighs more (up to 4x at 640x480, where it says 144 MB).


@dataclass(frozen=True)
class _Level:
    height: int
    width: int

    @property
    def pixels(self) -> int:
        return self.height * self.width

    @property
    def conv1_pixels(self) -> int:
        return max(self.height - 2, 0) * max(self.width - 2, 0)

    @property
    def cells(self) -> int:
        """P-Net output cells: conv1 (3x3), 2x2 ceil pooling, then two 3x3 convolutions."""
        pooled_h, pooled_w = math.ceil(max(self.height - 2, 0) / 2), math.ceil(max(self.width - 2, 0) / 2)
        return max(pooled_h - 4, 0) * max(pooled_w - 4, 0)


def _levels(height: int, width: int, config: DetectorConfig) -> list[_Level]:
    """The pyramid levels the detector builds for this image size and config, largest first."""
    scales = pyramid_scales(height, width, config.min_face_size, config.scale_factor)
    return [_Level(*level_size(height, width, scale)) for scale in scales]


def _int32_table(height: int, width: int) -> bool:
    """Whether the image's summed-area table is OpenCV's int32 one (_ImageSources.table)."""
    return height * width * 255 < 2**31


def _table_bytes(height: int, width: int) -> tuple[int, int]:
    """(held, peak while building) bytes of the image's summed-area table on a CPU detector."""
    table_pixels = (height + 1) * (width + 1)
    if _int32_table(height, width):
        # host_integral_image: cv2.integral of an RGBA copy, int32 x 4 lanes.
        held = 16 * table_pixels
        return held, held + 4 * height * width
    # integral_image: zeros table, then image.to(int64).cumsum(0).cumsum(1): two int64 images at once.
    held = 24 * table_pixels
    return held, held + 2 * 24 * height * width


def phase_bytes(height: int, width: int, config: DetectorConfig) -> dict[str, int]:
    """Modelled bytes of each phase of detecting one height x width image (no margin, no allowance).

    Keys: "table" (building the summed-area table), "pyramid" (building the levels), "pnet"
    (the largest level's P-Net pass), "candidates" (P-Net's NMS), "windows" (R-Net and O-Net).
    """
    levels = _levels(height, width, config)
    table_held, table_build = _table_bytes(height, width)
    cells = [level.cells for level in levels]
    candidates = [int(CANDIDATE_DENSITY * count) for count in cells]
    all_candidates = sum(candidates)
    mode = config.pyramid

    # Pyramid levels held from the end of their build until P-Net has seen them all.
    level_bytes = 3 if mode == "dynamic" else 12
    levels_held = level_bytes * sum(level.pixels for level in levels)

    # Building the pyramid.
    if mode == "classic":
        # resize_from_table per level: on the CPU compiled loops write each level straight from
        # the table, with no intermediate copies; earlier levels are held.
        pyramid = table_held + levels_held
        held_during_pnet = table_held + levels_held
    elif mode == "dynamic":
        pyramid = levels_held  # each level is cv2.resize of the one before: no other copy
        held_during_pnet = levels_held
    else:
        # chain2 and octave: the image in float32 (and octave's halvings of it) while building.
        full = 12 * height * width
        octaves = full // 3 if mode == "octave" else 0
        pyramid = full + octaves + levels_held
        held_during_pnet = levels_held

    # P-Net, level by level: input stacked (uint8 + float32 for dynamic, float32 otherwise), conv1
    # output and its PReLU; candidates of earlier levels kept, those of this level being gathered.
    pnet, kept = 0, 0
    for level, found in zip(levels, candidates):
        batch = (3 + 12 if mode == "dynamic" else 12) * level.pixels
        per_pixel = 2 * _PNET_CONV1_BYTES + (_PNET_BF16_EXTRA_BYTES if config.precision == "bf16" else 0)
        activations = per_pixel * level.conv1_pixels
        pnet = max(pnet, held_during_pnet + kept + batch + activations + _CANDIDATE_LEVEL_BYTES * found)
        kept += _CANDIDATE_KEPT_BYTES * found

    retained = min(RETAINED_HEAP_BYTES, pnet)
    held_after_pnet = retained + (table_held if mode == "classic" else 0)
    candidate_phase = held_after_pnet + _CANDIDATE_NMS_BYTES * all_candidates
    # Non-classic pyramids make the table only for R-Net's crops, after P-Net.
    if mode == "classic":
        table = table_build
    else:
        table = retained + table_build + _CANDIDATE_KEPT_BYTES * all_candidates
    chunk = int(config.stage_batch_size or _CPU_STAGE_BATCH)
    windows = (retained + table_held + _CANDIDATE_KEPT_BYTES * all_candidates
               + chunk * _ONET_WINDOW_BYTES)
    return {"table": table, "pyramid": pyramid, "pnet": pnet, "candidates": candidate_phase,
            "windows": windows}


def estimate_peak_bytes(height: int, width: int, config: DetectorConfig, batch: int = 1) -> int:
    """Peak memory, in bytes, that FaceDetector.detect adds on a CPU to detect height x width images.

    Beyond what the process holds before the call: the loaded nets and the decoded uint8 RGB
    images themselves are not counted. `batch` is how many images of this size the detector holds
    at once. On CPUs with the default concurrent_images=True a call goes through its images one
    at a time per thread, so that is min(images in the call, torch.get_num_threads()); with
    concurrent_images=False it is every image of the call (their pyramids, tables and P-Net
    passes are stacked). Either way each image's own peak is counted whole, an upper bound.

    The estimate is at least the peak measured (benchmarks/detector_memory.py) at every size
    measured, and within 1.5x of it from 9 Mpx up (the MEASURED block of this module).
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height} x {width}")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    one_image = max(phase_bytes(int(height), int(width), config).values())
    return int(batch * (MARGIN * one_image + FIXED_OVERHEAD_BYTES))


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """Height and width of the image resized by scale (floored, at least 1 pixel)."""
    return max(1, int(height * scale)), max(1, int(width * scale))


def scale_to_fit(height: int, width: int, config: DetectorConfig, budget_bytes: int,
                 batch: int = 1) -> float:
    """The largest scale in (0, 1] at which detecting the image fits budget_bytes (1.0 if it fits).

    Resize the image to scaled_size(height, width, scale) (cv2.INTER_AREA), detect, then map
    boxes and landmarks back to the original: x times width / resized width, y times height /
    resized height. The estimate for the resized image is at most budget_bytes; the budget is
    what detection may add beyond the process's memory before the call (nets, pixels). A
    smaller image finds only larger faces: see downscaled_min_face. Raises ValueError when even
    an image whose short side is the smallest face looked for (below it nothing can be found)
    does not fit.
    """
    if estimate_peak_bytes(height, width, config, batch) <= budget_bytes:
        return 1.0
    smallest = min(1.0, config.min_face_size / min(height, width))
    if estimate_peak_bytes(*scaled_size(height, width, smallest), config, batch) > budget_bytes:
        raise ValueError(f"a budget of {budget_bytes} bytes does not fit even a {height} x {width} "
                         f"image shrunk to a short side of {config.min_face_size:g} px "
                         f"(the smallest face looked for)")
    low, high = smallest, 1.0
    # The estimate grows with the scale (every term grows with both sides), so bisect.
    for _ in range(60):
        middle = (low + high) / 2
        if estimate_peak_bytes(*scaled_size(height, width, middle), config, batch) <= budget_bytes:
            low = middle
        else:
            high = middle
        if high - low < 1e-9:
            break
    return low


def downscaled_min_face(config: DetectorConfig, scale: float) -> float:
    """Smallest face, in pixels of the original image, found when detecting a copy shrunk by scale.

    The detector finds faces of at least config.min_face_size pixels in the image it is given; in
    a copy resized by scale (< 1) those are min_face_size / scale pixels of the original. A job
    that shrinks an image to fit its memory should record this with the image's detections.
    """
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"scale must be in (0, 1], got {scale!r}")
    return config.min_face_size / scale


def shrunk(image: np.ndarray, scale: float) -> np.ndarray:
    """The image resized by scale (<= 1) with area resampling, to scaled_size."""
    if scale >= 1.0:
        return image
    height, width = scaled_size(image.shape[0], image.shape[1], scale)
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def in_original(found: Detections, original: tuple[int, int], detected: tuple[int, int]) -> Detections:
    """Detections made on a resized copy (detected: its height, width), in the original's pixels."""
    if original == detected:
        return found
    y_factor, x_factor = original[0] / detected[0], original[1] / detected[1]
    boxes = found.boxes * np.array([x_factor, y_factor, x_factor, y_factor], found.boxes.dtype)
    landmarks = found.landmarks * np.array([x_factor, y_factor], found.landmarks.dtype)
    return Detections(boxes=boxes, scores=found.scores, landmarks=landmarks)
