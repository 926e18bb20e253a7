"""oneDNN's own account of what a step executes: its verbose log, captured and counted.

``onednn_log(fn)`` runs ``fn`` with oneDNN's verbose mode on and returns the log (oneDNN writes it to
the process's stdout from C++, so it is captured through the file descriptor); ``count_primitives``
counts the executed primitives by kind and splits the reorders into weight-shaped ones (4-d,
kernel-sized trailing dims: frozen weights re-packed at every call) and the rest. A count is a
property of the code path, not of the machine's load: valid on a busy machine, and testable.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections import Counter
from typing import Callable

import torch

KINDS = ("convolution", "deconvolution", "reorder", "matmul", "inner_product", "eltwise", "pooling", "binary", "sum")


def weight_shaped(dims: str) -> bool:
    """A 4-d tensor whose trailing two dims are a small square kernel (1x1 .. 7x7), or its grouped 5-d
    form (groups x out/groups x in/groups x k x k, e.g. a depthwise convolution's): a conv weight."""
    parts = dims.split("x")
    if len(parts) == 5:  # grouped: fold the groups into the output channels
        parts = [str(int(parts[0]) * int(parts[1])), *parts[2:]]
    return len(parts) == 4 and parts[2] == parts[3] and int(parts[2]) <= 7 and int(parts[0]) >= 8


def count_primitives(log: str) -> dict:
    """Executed primitives in a oneDNN verbose log: {"primitives": {kind + propagation: n},
    "reorders": {"weight-shaped" | "other": n}, "milliseconds": the same keys (primitives and
    "reorder weight-shaped" / "reorder other"): oneDNN's own execution times summed}."""
    counts, reorders, ms = Counter(), Counter(), Counter()
    for line in log.splitlines():
        if not line.startswith("onednn_verbose") or ",exec," not in line:
            continue
        fields = line.split(",")
        kind = next((f for f in fields if f in KINDS), "other")
        prop = next((f for f in fields if f.startswith(("forward", "backward"))), "")
        key = f"{kind} {prop}".strip()
        counts[key] += 1
        try:
            took = float(fields[-1])  # the exec time, in ms, is the line's last field
        except ValueError:
            took = 0.0
        ms[key] += took
        if kind == "reorder":
            dims = re.findall(r"\b\d+(?:x\d+){3,4}\b", line)
            which = "weight-shaped" if dims and weight_shaped(dims[-1]) else "other"
            reorders[which] += 1
            ms[f"reorder {which}"] += took
    return {"primitives": dict(sorted(counts.items())), "reorders": dict(sorted(reorders.items())),
            "milliseconds": {k: round(v, 3) for k, v in sorted(ms.items())}}


def onednn_log(fn: Callable[[], object]) -> str:
    """oneDNN's verbose log of one call of ``fn`` (its C++ stdout captured through the file descriptor)."""
    with tempfile.TemporaryFile(mode="w+") as log:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(log.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                fn()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        return log.read()


__all__ = ["count_primitives", "onednn_log", "weight_shaped"]
