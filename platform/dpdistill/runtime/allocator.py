"""Keep large tensor buffers in the process heap: glibc's malloc thresholds, set once per process.

Why: by default glibc serves allocations above a threshold (128 KiB, raised dynamically as mapped chunks are
freed) with a fresh ``mmap`` and gives them back with ``munmap``, and it trims the heap's free top above twice
that threshold. A CPU training step allocates and frees many activation-sized tensors (a ConvNet chunk's feature
map is ~4 MB), so in many phases each one arrives as fresh pages that fault in on first touch (the kernel zeroes
them page by page). Measured on the 2-core machine, one thread, steady state: the evaluation ConvNet (width 32,
400 images, micro-batches) ~32,000 page faults and 0.28-0.30 s per epoch by default, ~0-100 faults and 0.20 s
with the settings below; one elementwise expression over three 4 MB temporaries 8.5 ms -> 0.67 ms; a DP-GenG
distillation step faulted 0 to 63,000 times per step by default depending on the threshold's history, 0 with
them. The freed buffers stay in the heap and are reused; the price is that a process keeps up to about 1 GiB of
freed heap instead of returning it to the system (its peak use itself does not grow).

:func:`tune` fixes ``M_MMAP_THRESHOLD`` at 256 MiB (larger allocations still get their own mapping and go back
when freed), ``M_TRIM_THRESHOLD`` at 1 GiB and ``M_TOP_PAD`` at 256 MiB (the heap grows in large steps and keeps
that much free at its top) through ``mallopt``; it runs when :mod:`dpdistill` is imported, so the CLI, Ray tasks and
actors, Ray Train workers and spawned evaluation workers all get it (each imports the package). Set
``DPDISTILL_MALLOC=default`` to leave the system's settings alone. Elsewhere than glibc (macOS, musl) it does
nothing. The same effect without code: ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the
environment, or an allocator such as jemalloc or tcmalloc preloaded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV = "DPDISTILL_MALLOC"
# mallopt parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 256 << 20

_state: dict[str, bool] = {}


def tune() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); True if they are in force."""
    if "tuned" in _state:
        return _state["tuned"]
    _state["tuned"] = False
    if os.environ.get(ENV, "").strip().lower() == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success. Setting either threshold turns off glibc's dynamic adjustment, so both are
    # set (the trim threshold alone would leave the mmap threshold at 128 KiB: every tensor a fresh mapping).
    ok = all(mallopt(param, value) == 1 for param, value in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                                              (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                                                              (_M_TOP_PAD, TOP_PAD)))
    _state["tuned"] = ok
    return ok


def tuned() -> bool:
    """Whether :func:`tune` has set the thresholds in this process."""
    return _state.get("tuned", False)
