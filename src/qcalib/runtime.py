"""Process-wide CPU memory settings for calibration runs.

Library code never changes process state by itself: the ``qcalib`` command and the
benchmark runners own their processes and call :func:`retain_freed_cpu_memory` at start;
an API user who owns the process may call it too.

What it changes: a reconstruction iteration allocates and frees a few activation-sized
tensors per op (about 1.6 MB each for a 32 x 16 x 28 x 28 block). glibc serves blocks
above its mmap threshold with fresh ``mmap`` calls and hands freed heap memory above its
trim threshold back to the kernel, so each new tensor page-faults its memory in again
(``tests/test_runtime.py`` counts those faults in a reconstruction-like loop after
warm-up: thousands without the settings below, at most one tensor's pages with them; the
timing effect per host is the ``allocator`` column of ``bench/results/recon-timing.md``,
``recon.py --cpu-allocator default`` for the other side: no measurable difference on the
AVX2 host of session 15). Fixed thresholds keep freed memory in the heap for reuse; the
price is that the process does not shrink back after a peak (blocks above
``mmap_threshold`` are still mapped and unmapped as before).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["cpu_allocator_settings", "retain_freed_cpu_memory"]

log = logging.getLogger(__name__)

# What this process set, for the benchmark cells' stamps (settings are process-wide).
_applied: dict[str, int] = {}

# glibc's <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit).
MMAP_THRESHOLD_MAX = 32 << 20


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    # musl and others have no gnu_get_libc_version; their mallopt (if any) ignores these.
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def retain_freed_cpu_memory(
    mmap_threshold: int = MMAP_THRESHOLD_MAX, trim_threshold: int = 1 << 30
) -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the kernel:
    blocks up to ``mmap_threshold`` bytes come from the heap, and the heap is trimmed
    only when more than ``trim_threshold`` bytes at its top are free. Returns True when
    both settings took effect, False (and changes nothing) off glibc."""
    if not 0 < mmap_threshold <= MMAP_THRESHOLD_MAX:
        raise ValueError(
            f"mmap_threshold must be in (0, {MMAP_THRESHOLD_MAX}] bytes (glibc's limit), "
            f"got {mmap_threshold}"
        )
    if trim_threshold <= 0:
        raise ValueError(f"trim_threshold must be positive, got {trim_threshold}")
    libc = _glibc()
    if libc is None:
        log.debug("not glibc: CPU allocator settings left as they are")
        return False
    trim_threshold = min(trim_threshold, 2**31 - 1)  # mallopt takes a C int
    ok = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold)) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(trim_threshold)) == 1 and ok
    if ok:
        _applied.update(mmap_threshold=mmap_threshold, trim_threshold=trim_threshold)
    return ok


def cpu_allocator_settings() -> dict[str, int]:
    """The glibc thresholds :func:`retain_freed_cpu_memory` set in this process ({} when
    the defaults are in force)."""
    return dict(_applied)
