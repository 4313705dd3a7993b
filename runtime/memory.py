"""How serving processes keep freed memory: glibc malloc thresholds for large, short-lived buffers.

A request through the service allocates and frees buffers of the input's size several
times (a 224x224x3 float input is 600 kB: the gRPC message, its parsed copy, the tensor
content; the simulator's per-layer arrays are a few MB). With glibc's defaults, blocks
above the dynamic mmap threshold are fresh mappings, and whenever more than twice that
threshold lies free at the top of the heap it is given back to the kernel; either way the
next request faults the same pages in again, zeroed. On the 2-core development machine
that costs ~1-2.5 ms per gRPC float request (measured: building and serialising one
600 kB ``PredictRequest`` took 1.5-2.5 ms with the defaults, 0.15 ms with the settings
below), more than the whole protocol overhead budget, and about as much as the simulation
of a small model in a worker process.

The settings: blocks up to 32 MiB come from the heap (``M_MMAP_THRESHOLD``), and up to
256 MiB of free memory stays mapped at the top of each heap (``M_TRIM_THRESHOLD``), so
the next request reuses the pages. Worker processes get them through the environment
(:data:`MALLOC_ENV`, read by glibc at start); the server's own process sets them with
``mallopt`` (:func:`keep_freed_memory`). A setting already given in the environment wins
in both cases. On a C library without ``mallopt`` nothing changes.
"""

from __future__ import annotations

import ctypes
import os

#: ``mallopt`` parameter numbers (glibc ``malloc.h``).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 256 << 20

#: The same settings as environment variables, for processes started from here.
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD_BYTES),
}

_PARAMS = (
    ("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
    ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
)


def keep_freed_memory() -> bool:
    """Apply the thresholds to this process (idempotent); True if glibc accepted them.

    Settings named in the environment are left as glibc read them at start.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): keep its own policy
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = True
    for env, param, value in _PARAMS:
        if env not in os.environ:
            ok = bool(mallopt(param, value)) and ok
    return ok
