"""What produced a result: versions, hardware and threads, recorded in every results file."""

from __future__ import annotations

import os
import platform
import shlex
import sys

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


def command_line() -> str:
    """The command as a user would retype it: program name without its folder, data path as <LFW>."""
    args = [os.path.basename(sys.argv[0])] + sys.argv[1:]
    for i, arg in enumerate(args[:-1]):
        if arg == "--lfw":
            args[i + 1] = "<LFW>"
    return shlex.join(args)
