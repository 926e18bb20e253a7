"""What produced a result: versions, hardware and threads, recorded in every results file."""

from __future__ import annotations

import platform

import torch

from . import __version__
from .allocator import allocator_info
from .threads import thread_info


def environment() -> dict:
    """What produced a result: versions and the hardware it ran on."""
    return {
        "advface_fast": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        **thread_info(),
        **allocator_info(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
