"""Keep freed memory in the process for reuse: no page faults on every attack step.

An attack step allocates and frees the same large tensors over and over (the image-sized input
gradient, its sign, the activations and their gradients: megabytes each, hundreds of megabytes for a
112 x 112 MobileFaceNet at batch 64). glibc's malloc serves blocks above its mmap threshold with fresh
``mmap`` pages and returns them to the kernel on ``free``, so every step pays page faults again on
first touch. ``keep_freed_memory()`` applies glibc's documented ``mallopt`` knobs:

* ``"heap"`` (the default): the main arena never serves a block by ``mmap`` (M_MMAP_MAX = 0) and the
  heap is never trimmed (M_TRIM_THRESHOLD): freed blocks, however large, stay in the process for the
  next step. Blocks that other threads allocate above glibc's per-thread heap size (64 MiB) still
  come from ``mmap``; the tensors of an attack step are allocated by the calling thread.
* ``"threshold"``: the mmap threshold raised to glibc's maximum (32 MiB, M_MMAP_THRESHOLD) and no
  trimming: blocks above 32 MiB still come from fresh pages (the setting before "heap").

The price is memory. Neither setting returns freed memory to the system, and with "heap" a large
block freed while a small allocation made after it still lives cannot merge back into the heap's
top: a program that alternates the two can grow the heap by a block each time
(tests/test_allocator.py shows both the reuse and that growth). Attack loops reuse their blocks:
PGD-10 at batch 64 peaked within 2% of "threshold"'s resident size, "heap" without page faults
and 14% faster for SFace (benchmarks/results/allocator_page_faults_heap.json, per model and setting).
Commands that run for hours can choose "threshold" or turn it off.

Process-wide and glibc-only: the command-line tools call it once per command; elsewhere (macOS,
musl, Windows) it does nothing. ``ADVFACE_KEEP_FREED_MEMORY``: 0 / off / false turns it off,
threshold or heap chooses (1, on, true or unset: heap).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2**31 - 1
SETTINGS = ("heap", "threshold")
OFF = ("0", "off", "false", "no")
ON = ("", "1", "on", "true", "yes")

_state: dict = {"keep_freed_memory": False, "why": "not requested"}


def keep_freed_memory() -> dict:
    """Apply the setting (see the module docstring) once; returns ``allocator_info()``."""
    if _state["keep_freed_memory"]:
        return allocator_info()
    choice = os.environ.get("ADVFACE_KEEP_FREED_MEMORY", "1").strip().lower()
    if choice in OFF:
        _state.update(keep_freed_memory=False, why=f"off (ADVFACE_KEEP_FREED_MEMORY={choice})")
        return allocator_info()
    setting = "heap" if choice in ON else choice
    if setting not in SETTINGS:
        raise ValueError(f"ADVFACE_KEEP_FREED_MEMORY must be one of {OFF + ON + SETTINGS}, got {choice!r}")
    if not sys.platform.startswith("linux"):
        _state.update(keep_freed_memory=False, why=f"not glibc ({sys.platform})")
        return allocator_info()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
    except (OSError, AttributeError):
        _state.update(keep_freed_memory=False, why="not glibc")
        return allocator_info()
    knobs = [(M_TRIM_THRESHOLD, TRIM_THRESHOLD)]
    knobs += [(M_MMAP_MAX, 0)] if setting == "heap" else [(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)]
    refused = [param for param, value in knobs if libc.mallopt(param, value) != 1]  # every knob tried
    ok = not refused
    _state.update(keep_freed_memory=ok, why=f"glibc {version}: mallopt {setting} "
                  + ("applied" if ok else f"refused for parameter(s) {refused}"))
    return allocator_info()


def allocator_info() -> dict:
    """What results files record."""
    return {"keep_freed_memory": _state["keep_freed_memory"], "allocator": _state["why"]}


__all__ = ["SETTINGS", "allocator_info", "keep_freed_memory"]
