"""What the CPU can do fast: its model name and the instruction-set flags the detector's choices
(and benchmark reports) depend on."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

#: Flags that decide reduced-precision speed: native bf16 dot products (AVX-512 BF16, AMX) and
#: int8 ones (VNNI); the rest say which vector width oneDNN has.
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_tile",
               "amx_int8")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """Model name and flags of the first processor in /proc/cpuinfo (Linux), else what platform says."""
    model, flags = None, None
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:  # every processor repeats them: the first of each is enough
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name" and model is None:
            model = value
        elif key in ("flags", "Features") and flags is None:
            flags = frozenset(value.split())
    return model or platform.processor() or platform.machine(), flags or frozenset()


def cpu_model() -> str:
    """The CPU's model name, e.g. 'AMD EPYC 9R14 96-Core Processor'."""
    return _cpuinfo()[0]


def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags as Linux names them (empty where they cannot be read)."""
    return _cpuinfo()[1]


def speed_flags() -> dict[str, bool]:
    """Each of SPEED_FLAGS: whether this CPU has it."""
    flags = cpu_flags()
    return {flag: flag in flags for flag in SPEED_FLAGS}


def has_native_bf16() -> bool:
    """Whether the CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX); without, oneDNN
    emulates it, slower than fp32."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags
