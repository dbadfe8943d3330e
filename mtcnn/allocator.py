"""Heap settings for CPU inference: large freed blocks stay in the process for reuse.

R-Net and O-Net run in chunks of 64 windows whose activations are up to 17 MB each (O-Net's first
convolution). glibc's malloc serves blocks above its mmap threshold with fresh pages, and returns
them to the kernel on free (or trims the heap top), so every chunk faults in and zeroes its pages
again: about 37,000 page faults per crowded 720p frame, a fifth of its time on this project's CPUs
(benchmarks/detector_speed.py). Raising the mmap threshold to 32 MB and the trim threshold to 1 GB
keeps those blocks in the heap, where the next chunk reuses them; detections are unchanged.

The settings are process-wide. The process then holds on to memory it has freed (up to its peak),
which a long-running detector reaches again on its next crowded image anyway.
"""

from __future__ import annotations

import ctypes
import os
import threading

#: mallopt parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's own upper bound for the dynamic threshold on 64-bit
TRIM_THRESHOLD_BYTES = 1 << 30
#: Set to 0 to leave malloc as it is; glibc's own MALLOC_*_ variables also take precedence.
OPT_OUT_VARIABLE = "MTCNN_KEEP_FREED_MEMORY"
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_lock = threading.Lock()
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks up to 32 MB for reuse (once per process); whether the settings are in force."""
    global _applied
    with _lock:
        if _applied is not None:
            return _applied
        _applied = False
        if os.environ.get(OPT_OUT_VARIABLE, "1").strip() in ("0", "false", "no", "off"):
            return False
        if any(name in os.environ for name in _USER_SETTINGS):
            return False  # the user tuned malloc already
        try:
            libc = ctypes.CDLL(None)
            libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (not musl, macOS, Windows)
            mallopt = libc.mallopt
        except (OSError, AttributeError, TypeError):
            return False
        mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        # mallopt returns 1 on success; the mmap threshold first, since setting either one stops
        # glibc's own adjustment of both.
        _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                        and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
        return _applied
